"""The canary test: known fake personal data must not leak where the policy says it is gone.

Records full of unmistakable canary values (``EventGenerator(seed).order(canary=True)``)
go through every audience of ``policy.yaml``.  Which fields are transformed for an
audience is derived from the compiled plan (token, encrypt_deterministic, mask,
generalize, date_shift, redact, drop), not restated here.  For every output:

* the decoded record holds no transformed canary value anywhere (in any field -- a
  masked card keeps its last 4 digits, a generalized postcode its outward code, but the
  full value never appears);
* the raw sealed bytes, the headers, the transformed key and the output schema hold no
  canary at all;

and on every error path (tampered, unknown key, wrong topic, garbage Avro, unknown and
unsupported schema, transform failures) no canary appears in quarantine details,
dead-letter headers, exception messages or tracebacks, or any log line at DEBUG.
"""

from __future__ import annotations

import copy
import io
import ipaddress
import json
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordOpener, RecordSealer
from streamproc.client.generator import CANARY_PREFIX, EventGenerator
from streamproc.crypto.envelope import Opener
from streamproc.crypto.provenance import from_headers
from streamproc.errors import EnvelopeError, Reason
from streamproc.observability.logging import JsonFormatter, RedactionGuard
from streamproc.pipeline.codegen import TransformFailed, compile_plan
from streamproc.pipeline.core import InputRecord, Quarantined
from streamproc.pipeline.plan import (
    Apply,
    ArrayNode,
    Drop,
    Keep,
    MapNode,
    Node,
    Plan,
    RecordNode,
    UnionNode,
    build_plan,
)
from streamproc.pipeline.reference import run_reference
from streamproc.runtime.dlq import dead_letter_headers
from streamproc.schema.avro import Record
from tests.unit.conftest import (
    AUDIENCES,
    DESTINATIONS,
    LOGIN_SCHEMA,
    ORDER_SCHEMA,
    Maker,
    PipelineKit,
    new_keyring,
)

ORDER_CANARY_PATHS = ("customer_id", "email", "card_number", "ip_address", "phone",
                      "shipping_address.street", "shipping_address.postcode")
LOGIN_CANARY_PATHS = ("customer_id", "username", "recovery_emails", "device.device_id")
log = logging.getLogger("streamproc.runtime.worker")


def get_path(rec: dict[str, Any], path: str) -> Any:
    v: Any = rec
    for part in path.split("."):
        v = v[part]
    return v


def canaries(kind: str, rec: dict[str, Any]) -> dict[str, str]:
    out = {}
    for p in ORDER_CANARY_PATHS if kind == "order" else LOGIN_CANARY_PATHS:
        v = get_path(rec, p)
        out[p] = v[0] if isinstance(v, list) else v
    assert all(isinstance(v, str) and len(v) >= 8 for v in out.values()), out
    return out


def action(n: Node, path: list[str]) -> str:
    """What the plan does to the value at ``path``: keep, drop, or an operator name."""
    if isinstance(n, Keep):
        return "keep"
    if isinstance(n, Drop):
        return "drop"
    if isinstance(n, Apply):
        return n.op
    if isinstance(n, (ArrayNode, MapNode)):
        return action(n.items if isinstance(n, ArrayNode) else n.values, path)
    if isinstance(n, UnionNode):
        found = {action(b, path) for b in n.branches if b.t.kind != "null"}
        assert len(found) == 1, found
        return found.pop()
    assert isinstance(n, RecordNode)
    if not path:
        return "transformed record"
    child = next(c for f, c in n.fields if f.name == path[0])
    return action(child, path[1:])


def strings(v: Any) -> Iterator[str]:
    """Every string (and decoded bytes) in a decoded record, map keys included."""
    if isinstance(v, str):
        yield v
    elif isinstance(v, bytes):
        yield v.decode("utf-8", "replace")
    elif isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from strings(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from strings(x)
    elif v is not None:
        yield str(v)


def assert_clean(text: str | bytes, values: Any, where: str) -> None:
    for c in values:
        needle = c.encode() if isinstance(text, bytes) else c
        assert needle not in text, f"canary {c!r} leaked into {where}"


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Capture everything at DEBUG: caplog, plus the production JSON handler and guard."""
    caplog.set_level(logging.DEBUG)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactionGuard())
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield buf
    finally:
        root.removeHandler(handler)


def log_like_the_worker(q: Quarantined) -> None:
    """The worker's dead-letter log line (streamproc.runtime.report.report_commit)."""
    log.warning(
        "record dead-lettered (%s)", q.detail,
        extra={"reason": q.reason.value, "topic": q.record.topic, "partition": q.record.partition, "offset": q.record.offset},
    )


class Run:
    def __init__(self, kit: PipelineKit) -> None:
        self.kit = kit
        self.sealers = {
            "order": RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas),
            "login": RecordSealer(kit.keyring, "logins-kek", "logins", LOGIN_SCHEMA, kit.schemas),
        }
        self.topic = {"order": "orders", "login": "logins"}
        self.plans: dict[tuple[str, str], Plan] = {}
        for kind, s in self.sealers.items():
            node = kit.schemas.get(s.schema_id).node
            assert isinstance(node, Record)
            for aud in AUDIENCES:
                self.plans[(kind, aud)] = build_plan(node, kit.policy.audience(aud), kit.keys)


def embedded_needles(value: str) -> list[str]:
    """Texts that give away the IPv4 address inside an IPv6 canary: its dotted quad and,
    for 6to4, the /48 that carries it in hex (what a /48 generalization used to output)."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return []
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    v4 = ip.ipv4_mapped or ip.sixtofour
    if v4 is None and (ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("::/96")):
        v4 = ipaddress.IPv4Address(ip.packed[12:])
    if v4 is None:
        return []
    needles = [str(v4)]
    if ip.sixtofour:
        needles.append(str(ipaddress.ip_network(f"{ip}/48", strict=False)).split("::")[0])
    return needles


@pytest.mark.parametrize("edge", [False, True], ids=["plain", "edge-values"])
def test_canaries_do_not_survive_transforms(make_pipeline: Maker, json_log: io.StringIO, caplog: pytest.LogCaptureFixture,
                                            edge: bool) -> None:
    kit = make_pipeline()
    run = Run(kit)
    gen = EventGenerator(2024)
    records = [("order", gen.order(canary=True, edge=edge)) for _ in range(12)] + [
        ("login", gen.login(canary=True)) for _ in range(12)]
    originals = copy.deepcopy(records)
    batch = []
    for i, (kind, rec) in enumerate(records):
        key = canaries(kind, rec)["customer_id"].encode()
        batch.append(InputRecord(run.topic[kind], 0, i, key, run.sealers[kind].seal(rec)))
    res = kit.pipeline.process(batch)
    assert res.quarantined == []
    assert len(res.outputs) == len(records) * len(DESTINATIONS)
    assert records == originals

    opener = RecordOpener(kit.keyring, kit.schemas)
    checked = {"transformed": 0, "kept": 0}
    for o in res.outputs:
        kind, rec = records[o.source.offset]
        aud = from_headers(o.headers).audience
        plan = run.plans[(kind, aud)]
        cans = canaries(kind, rec)
        all_canaries = list(cans.values())
        # raw sealed bytes, headers, key (unless the audience keeps keys) and schema: nothing
        assert o.value is not None
        assert_clean(o.value, all_canaries, f"sealed bytes for {aud}")
        for name, value in o.headers:
            assert_clean(value, all_canaries, f"header {name}")
        if kit.policy.audience(aud).record_key.op != "keep":
            assert o.key is not None
            assert_clean(o.key, all_canaries, f"record key for {aud}")
        rs, decoded = opener.open(o.topic, o.value)
        assert_clean(rs.text, all_canaries, f"output schema for {aud}")
        assert_clean(json.dumps(plan.out_schema), all_canaries, f"plan output schema for {aud}")
        out_strings = list(strings(decoded))
        for path, value in cans.items():
            what = action(plan.root, path.split("."))
            if what == "keep":
                # positive control: the scanner does see a kept canary
                assert any(value in s for s in out_strings), (aud, path)
                checked["kept"] += 1
            else:
                for s in out_strings:
                    assert value not in s, f"{aud}: canary at {path} ({what}) leaked into the output: {s!r}"
                    for needle in embedded_needles(value):
                        assert needle not in s, f"{aud}: embedded IPv4 of {path} ({what}) in the output: {s!r}"
                checked["transformed"] += 1
    # every audience transforms something and keeps something: the test is not vacuous
    assert checked["transformed"] > 100 and checked["kept"] > 20
    assert_clean(caplog.text, [v for k, r in records for v in canaries(k, r).values()], "logs")
    assert_clean(json_log.getvalue(), [v for k, r in records for v in canaries(k, r).values()], "JSON logs")


def test_analytics_and_fraud_transform_what_the_policy_says(make_pipeline: Maker) -> None:
    """The derivation above is from the plan; pin it to the policy so neither drifts."""
    run = Run(make_pipeline())
    got = {(k, a): {p: action(run.plans[(k, a)].root, p.split(".")) for p in (ORDER_CANARY_PATHS if k == "order" else LOGIN_CANARY_PATHS)}
           for k, a in run.plans}
    assert got[("order", "analytics")] == {
        "customer_id": "token", "email": "token", "card_number": "drop", "ip_address": "generalize",
        "phone": "drop", "shipping_address.street": "drop", "shipping_address.postcode": "generalize"}
    assert got[("order", "fraud")] == {
        "customer_id": "token", "email": "encrypt_deterministic", "card_number": "mask", "ip_address": "keep",
        "phone": "mask", "shipping_address.street": "redact", "shipping_address.postcode": "keep"}
    assert got[("login", "support")] == {
        "customer_id": "keep", "username": "mask", "recovery_emails": "mask", "device.device_id": "drop"}


def test_canaries_stay_out_of_every_error_path(make_pipeline: Maker, json_log: io.StringIO, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    kit = make_pipeline()
    run = Run(kit)
    gen = EventGenerator(77)
    s_order = run.sealers["order"]
    recs = [gen.order(canary=True) for _ in range(8)]
    n = recs[4]["customer_id"].removeprefix(f"{CANARY_PREFIX}CUST")
    recs[4]["ip_address"] = f"{CANARY_PREFIX}IP{n}"  # not an IP: analytics' cidr fails on it
    values = [v for r in recs for v in canaries("order", r).values()] + [recs[4]["ip_address"]]

    plains = [s_order.encode(r) for r in recs]
    sealed = [s_order.sealer.seal(p) for p in plains]
    tampered = bytearray(sealed[0])
    tampered[-20] ^= 0x40
    rogue = new_keyring(tmp_path / "rogue")
    rogue.create_key("rogue-kek")
    unknown_key = RecordSealer(rogue, "rogue-kek", "orders", ORDER_SCHEMA, kit.schemas).seal(recs[1])
    odd = copy.deepcopy(ORDER_SCHEMA)
    odd["name"] = "OddOrder"
    odd["fields"][5] = {"name": "birth_date", "type": "string", "confluent:tags": ["PII", "BIRTH_DATE"]}
    s_odd = RecordSealer(kit.keyring, "orders-kek", "orders", odd, kit.schemas)
    odd_rec = {**recs[6], "birth_date": f"{CANARY_PREFIX}DOB{n}"}
    values.append(odd_rec["birth_date"])
    inputs = [
        (bytes(tampered), "orders", Reason.TAMPERED),
        (unknown_key, "orders", Reason.UNKNOWN_KEY),
        (sealed[2], "logins", Reason.WRONG_TOPIC),
        (s_order.sealer.seal(plains[3][: len(plains[3]) * 2 // 3]), "orders", Reason.BAD_PAYLOAD),
        (s_order.sealer.seal(plains[3][5:]), "orders", Reason.BAD_PAYLOAD),  # unframed plaintext
        (s_order.sealer.seal(b"\x00\x00\x00\x03\x09" + plains[3][5:]), "orders", Reason.UNKNOWN_SCHEMA),
        (sealed[4], "orders", Reason.TRANSFORM_FAILED),
        (s_odd.seal(odd_rec), "orders", Reason.UNSUPPORTED_SCHEMA),
        (sealed[7], "audit", Reason.NO_ROUTE),
    ]
    batch = [InputRecord(t, 1, i, b"k", v, None, (("trace", b"t-1"),)) for i, (v, t, _) in enumerate(inputs)]
    res = kit.pipeline.process(batch)
    assert [q.reason for q in res.quarantined] == [r for _, _, r in inputs]
    assert res.outputs == []
    for q in res.quarantined:
        assert_clean(q.detail, values, f"quarantine detail ({q.reason.value})")
        assert_clean(repr(q.reason) + q.reason.value, values, "reason")
        for name, hv in dead_letter_headers(q):
            assert hv is None or isinstance(hv, bytes)
            assert_clean(hv or b"", values, f"dead-letter header {name}")
        assert_clean(q.record.value or b"", values, "dead-letter value (the original envelope)")
        log_like_the_worker(q)

    # exceptions raised on the same data, outside the pipeline
    errors: list[BaseException] = []
    plan = run.plans[("order", "analytics")]
    node = kit.schemas.get(s_order.schema_id).node
    assert isinstance(node, Record)
    fn, _src = compile_plan(plan, node, offset=5)
    for attempt in (lambda: fn(plains[4]), lambda: run_reference(plan, ORDER_SCHEMA, plains[4][5:])):
        with pytest.raises(TransformFailed) as info:
            attempt()
        assert info.value.args == ("ip_address",)
        errors.append(info.value)
    for bad in (plains[3][: len(plains[3]) // 2], plains[3] + b"\x00"):
        with pytest.raises(Exception) as info2:
            fn(bad)
        errors.append(info2.value)
    opener = Opener.for_kms(kit.keyring)
    for v, t in ((bytes(tampered), "orders"), (sealed[2], "logins"), (unknown_key, "orders")):
        with pytest.raises(EnvelopeError) as info3:
            opener.open(t, v)
        errors.append(info3.value)
    for exc in errors:
        text = "".join(traceback.format_exception(exc))  # what a logger prints (context suppressed)
        assert_clean(text + repr(exc) + str(exc), values, f"exception {type(exc).__name__}")
        log.error("processing failed", exc_info=exc, extra={"reason": "transform_failed"})
        log.debug("debug line with a bad extra", extra={"value": values[0], "detail": "field ip_address"})

    assert_clean(caplog.text, values, "caplog")
    for r in caplog.records:
        assert_clean(r.getMessage(), values, "log message")
    text = json_log.getvalue()
    assert text.count("\n") == len(inputs) + 2 * len(errors)
    assert_clean(text, values, "JSON log lines")
    assert '"redacted_fields": ["value"]' in text  # the guard did act on the bad extra
