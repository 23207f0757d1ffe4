"""Logs are an egress channel: canary values must never reach a log line.

Canary records (every sensitive field holds an unmistakable marker) are sealed and pushed
through a real :class:`Pipeline`, including every error path a record can take (tampered,
unknown key, revoked key, wrong topic, garbage Avro, unknown schema, transform failure, no
route), while the root logger is at DEBUG and the processor's handler captures every line
in JSON and in the human format.  The test logs what the worker logs for each outcome
(dead-letter lines with the quarantine detail, exceptions, anomaly warnings) and also
tries to leak on purpose (a value in a non-allow-listed ``extra`` field, a third-party
exception quoting a value) to prove the redaction guard catches it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import Reason
from streamproc.observability.anomaly import AnomalyConfig
from streamproc.observability.logging import (
    ALLOWED_FIELDS,
    JsonFormatter,
    RedactionGuard,
    configure_logging,
)
from streamproc.observability.metrics import KnownLabels, Metrics
from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
from streamproc.policy import load_policy
from streamproc.schema.framing import frame_prefix
from streamproc.schema.registry import build_schema_source

ROOT = Path(__file__).resolve().parents[2]
SENSITIVE = ("customer_id", "email", "card_number", "ip_address", "phone")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def planted_values(rec: dict[str, Any]) -> list[str]:
    vals = [str(rec[f]) for f in SENSITIVE if rec.get(f)]
    vals += [rec["shipping_address"]["street"], rec["shipping_address"]["postcode"]]
    return vals


def run_scenario(tmp: Path) -> list[str]:
    """Every path a canary record can take, logged the way the worker logs it."""
    shutil.copytree(ROOT / "schemas", tmp / "schemas")
    k = LocalKeyring.create(tmp / "k.json")
    for kid in ("orders-kek", "analytics-kek"):
        k.create_key(kid)
    k.create_key("pseudonym-master", "secret")
    ghost = LocalKeyring.create(tmp / "ghost.json")
    # The KEK id in an envelope is producer-chosen text: here, personal data.
    ghost.create_key("canary.ghost@example.com")
    schemas = build_schema_source(str(tmp / "schemas"))
    order_schema = json.loads((ROOT / "schemas" / "order.avsc").read_text())
    gen = EventGenerator(seed=11)
    planted: list[str] = []

    def canaries(n: int) -> list[dict[str, Any]]:
        recs = [gen.order(canary=True) for _ in range(n)]
        for r in recs:
            planted.extend(planted_values(r))
        return recs

    # Sealed under orders-kek v1, which is revoked below -> key_revoked.
    sealer = RecordSealer(k, "orders-kek", "orders", order_schema, schemas)
    revoked_vals = sealer.seal_many(canaries(3))
    k.rotate("orders-kek")
    k.revoke("orders-kek", 1)
    sealer = RecordSealer(k, "orders-kek", "orders", order_schema, schemas)
    good = sealer.seal_many(canaries(20))
    tampered = [v[:-5] + bytes(b ^ 0x55 for b in v[-5:]) for v in sealer.seal_many(canaries(3))]
    ghost_vals = RecordSealer(ghost, "canary.ghost@example.com", "orders", order_schema, schemas).seal_many(canaries(3))
    ghost_wrong_topic = RecordSealer(ghost, "canary.ghost@example.com", "logins", order_schema, schemas).seal_many(canaries(1))
    # Sealed under a destination audience's KEK: never opened as input.
    not_allowed = RecordSealer(k, "analytics-kek", "orders", order_schema, schemas).seal_many(canaries(2))
    wrong_topic = RecordSealer(k, "orders-kek", "logins", order_schema, schemas).seal_many(canaries(2))
    garbage = [sealer.sealer.seal(frame_prefix(sealer.schema_id) + b"\xff\xff\xffCANARY garbage \x01\x02")]
    unknown_schema = [sealer.sealer.seal(frame_prefix(987654) + b"CANARY")]
    bad_ip = canaries(2)
    for r in bad_ip:
        r["ip_address"] = f"CANARY-IP-{r['customer_id']}"
        planted.append(r["ip_address"])
    transform_fail = sealer.seal_many(bad_ip)
    no_route = [Sealer(k, "orders-kek", "payments").seal(b"CANARY")]

    pipeline = Pipeline(
        routes=build_routes([{"sources": ["orders"], "destinations": [
            {"topic": "orders.analytics", "audience": "analytics", "kek": "analytics-kek"},
            {"topic": "orders.support", "audience": "support", "kek": "analytics-kek"},
        ]}]),
        policy=load_policy(str(ROOT / "policy.yaml")), opener=Opener.for_kms(k), kms=k,
        schemas=schemas, keys=PseudonymKeys(k, "pseudonym-master"),
    )
    clock = FakeClock()
    # orders.support is not in the allowed set: every batch is an unexpected destination.
    metrics = Metrics(allowed_destinations={"orders.analytics"}, clock=clock,
                      known=KnownLabels.of(topics=["orders", "orders.analytics", "orders.support"],
                                           audiences=["analytics", "support"], kek_ids=["orders-kek", "analytics-kek"]),
                      anomaly=AnomalyConfig(interval=1.0, warmup_intervals=3, failure_threshold=5))
    pipeline.instrument_kms(metrics)
    log = logging.getLogger("streamproc.runtime.worker")

    def process(topic_values: list[tuple[str, bytes]], offset0: int) -> None:
        inputs = [InputRecord(t, 0, offset0 + i, b"CANARY-KEY", v, 1_700_000_000_000) for i, (t, v) in enumerate(topic_values)]
        log.debug("batch fetched", extra={"count": len(inputs), "topic": "orders"})
        res = pipeline.process(inputs)
        metrics.batch_processed(res.stats, len(inputs), 0.001)
        for q in res.quarantined:
            # What the worker logs for a dead letter: identifiers plus the value-free detail.
            log.warning("record dead-lettered (%s)", q.detail, extra={
                "reason": q.reason.value, "topic": q.record.topic, "partition": q.record.partition,
                "offset": q.record.offset, "detail": q.detail})
            metrics.dead_lettered(q.reason.value, q.record.topic, 1)
        cache = pipeline.dek_cache_stats()
        metrics.dek_cache(cache.hits, cache.misses)

    # Steady traffic to warm the detector up, then a 10x burst, then every failure kind.
    off = 0
    for _ in range(5):
        process([("orders", v) for v in good[:2]], off)
        off += 2
        clock.t += 1.0
    process([("orders", v) for v in good] * 2, off)
    clock.t += 1.0
    metrics.tick()
    bad = [*revoked_vals, *tampered, *ghost_vals, *ghost_wrong_topic, *not_allowed, *garbage, *unknown_schema, *transform_fail]
    process([("orders", v) for v in bad] + [("orders", v) for v in wrong_topic] + [("payments", v) for v in no_route], 1000)

    # Deliberate leaks the guard must stop.
    secret = planted[0]
    log.info("oops", extra={"value": secret, "record": {"email": secret}})
    try:
        raise ValueError(f"cannot decode {secret!r}")
    except ValueError:
        log.exception("decoder failed", extra={"topic": "orders"})
    log.info("long field", extra={"detail": secret * 100})
    kinds = {a.kind.value for a in metrics.detector.history} if metrics.detector else set()
    assert {"decryption_spike", "unknown_key", "revoked_key", "decryption_failure_burst", "unexpected_destination", "kek_not_allowed"} <= kinds, kinds
    # ineffective_transform needs a rule with on_failure: quarantine (the shipped policy
    # redacts instead); its path is covered in test_fail_closed.py.  kms_error needs a
    # provider that misbehaves: tests/unit/test_key_hardening.py.
    reasons = {r.value for r in Reason} - {"oversized", "malformed_envelope", "unsupported_version", "unsupported_schema",
                                           "ineffective_transform", "kms_error"}
    seen = {ln for ln in reasons if metrics.registry.get_sample_value("streamproc_records_quarantined_total", {"reason": ln})}
    assert seen == reasons
    return planted


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_no_canary_value_in_any_log_line(fmt: str, tmp_path: Path, restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("DEBUG", fmt, stream=buf)
    planted = run_scenario(tmp_path)
    text = buf.getvalue()
    lines = text.splitlines()
    assert len(lines) > 20
    assert "dead-lettered" in text and "anomaly detected: decryption_spike" in text
    for line in lines:
        low = line.replace("test_logging_canary", "<this test file>").lower()  # stack frames name it
        assert "canary" not in low, line
        for v in planted:
            assert v not in line, (v, line)
    if fmt == "json":
        objs = [json.loads(ln) for ln in lines if ln.startswith("{")]
        assert all({"ts", "level", "logger", "message"} <= set(o) for o in objs)
        leak = next(o for o in objs if o["message"] == "oops")
        assert leak["redacted_fields"] == ["record", "value"] and "value" not in leak
        exc = next(o for o in objs if o["message"] == "decoder failed")
        assert exc["exc_type"] == "ValueError" and "exc_message" not in exc and exc["topic"] == "orders"
        dl = [o for o in objs if o["message"].startswith("record dead-lettered")]
        assert {o["reason"] for o in dl} >= {"tampered", "unknown_key", "key_revoked", "bad_payload", "transform_failed", "kek_not_allowed"}
        # unconfigured KEK ids appear as a digest only (computed here with hashlib)
        ghost = "sha256:" + hashlib.sha256(b"canary.ghost@example.com").hexdigest()[:12]
        assert {o["detail"] for o in dl if o["reason"] == "unknown_key"} == {f"key {ghost} v1"}
        assert f"key {ghost} v1; sealed for another topic" in {o["detail"] for o in dl}
        assert {o["detail"] for o in dl if o["reason"] == "kek_not_allowed"} == {
            "key 'analytics-kek' v1 may not seal this source topic"
        }
        assert all(isinstance(o["offset"], int) for o in dl)
        assert next(o for o in objs if o["message"] == "long field")["detail"] == "<redacted>"
        # The anomaly lines the runbook points to name the source topic (a configured name).
        anomalies = {o["kind"]: o for o in objs if o["logger"] == "streamproc.anomaly"}
        assert anomalies["unknown_key"]["topic"] == "orders"
        assert anomalies["revoked_key"]["topic"] == "orders"
        burst = anomalies["decryption_failure_burst"]
        assert burst["topic"] == "orders"
        assert set(burst["reason"].split(",")) == {"key_revoked", "tampered", "unknown_key", "wrong_topic", "kek_not_allowed"}
        assert anomalies["unexpected_destination"]["destination"] == "orders.support"


def test_guard_keeps_allowed_fields_and_drops_others() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    for k, v in {"topic": "orders", "kek_id": "orders-kek", "email": "a@b", "partitions": ["orders[0]"]}.items():
        setattr(rec, k, v)
    assert RedactionGuard().filter(rec)
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "hello world" and out["topic"] == "orders" and out["kek_id"] == "orders-kek"
    assert out["partitions"] == ["orders[0]"]
    assert "email" not in out and out["redacted_fields"] == ["email"]


def test_allow_list_is_identifiers_only() -> None:
    for bad in ("value", "key", "record", "plaintext", "payload", "email", "data"):
        assert bad not in ALLOWED_FIELDS


def test_configure_logging_is_idempotent_and_validates(restore_logging: None) -> None:
    configure_logging("INFO", "json", stream=io.StringIO())
    configure_logging("WARNING", "human", stream=io.StringIO())
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_streamproc_handler", False)]
    assert len(ours) == 1 and logging.getLogger().level == logging.WARNING
    with pytest.raises(ValueError):
        configure_logging("INFO", "xml")
