"""Metrics: the registry of names, what each Observer call records, label hygiene."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from streamproc import __version__
from streamproc.errors import Reason
from streamproc.observability import Observer
from streamproc.observability.anomaly import AnomalyConfig
from streamproc.observability.metrics import (
    METRICS,
    METRICS_BY_NAME,
    OTHER,
    KnownLabels,
    Metrics,
    exported_series,
)
from streamproc.pipeline.core import BatchStats

ROOT = Path(__file__).resolve().parents[2]
BOUNDED_LABELS = {
    "topic", "partition", "audience", "kek_id", "reason", "operator", "provider",
    "operation", "outcome", "kind", "dependency", "version", "component", "action",
}


#: What a config for these tests would name (topics, audiences, KEK ids).
KNOWN = KnownLabels.of(
    topics=["orders", "orders.analytics", "orders.dlq"],
    audiences=["analytics"],
    kek_ids=["orders-kek", "analytics-kek"],
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def stats(n: int = 10, **over: Any) -> BatchStats:
    s = BatchStats(
        decryptions={("orders", "orders-kek"): n},
        egress_records={("orders.analytics", "analytics"): n},
        egress_bytes={("orders.analytics", "analytics"): n * 250},
        transforms={"token": 2 * n, "generalize": 3 * n},
        quarantined={Reason.TAMPERED: 1, Reason.BAD_PAYLOAD: 2},
        tombstones=1,
    )
    for k, v in over.items():
        setattr(s, k, v)
    return s


# -- the registry ---------------------------------------------------------------------------
def test_metric_registry_is_well_formed() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"streamproc_[a-z0-9_]+", m.name), m.name
        assert set(m.labels) <= BOUNDED_LABELS, m.name
        assert (m.type == "counter") == m.name.endswith("_total"), m.name
        assert m.help
        if m.type == "gauge":
            assert m.multiprocess_mode, f"{m.name}: gauges must say how workers combine"
    assert "streamproc_decryptions_total" in exported_series()
    assert "streamproc_end_to_end_latency_seconds_bucket" in exported_series()


def test_exposition_matches_registry() -> None:
    m = Metrics(known=KNOWN)
    m.batch_processed(stats(), 13, 0.01)
    m.records_consumed("orders", 0, 13)
    m.dead_lettered("tampered", "orders", 1)
    m.kms_call("local", "unwrap", "ok", 0.001)
    m.consumer_lag({("orders", 0): 5})
    m.retrying("kms", 1)
    m.end_to_end_latency([0.1])
    m.dek_cache(3, 1)
    text = generate_latest(m.registry).decode()
    families = set(re.findall(r"^# TYPE (streamproc_\S+) (\S+)", text, re.M))
    for spec in METRICS:
        assert (spec.name, spec.type) in families, spec.name
    samples = set(re.findall(r"^(streamproc_[a-z0-9_]+)", text, re.M))
    assert samples <= exported_series()


def test_docs_list_every_metric() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for spec in METRICS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{spec.name}`")), None)
        assert row is not None, f"{spec.name} missing from docs/metrics.md"
        assert spec.type in row, spec.name
        for label in spec.labels:
            assert label in row, f"{spec.name}: label {label} undocumented"


# -- what the observer calls record -------------------------------------------------------------
def test_batch_processed_counts() -> None:
    m = Metrics(anomaly=False, known=KNOWN)
    m.batch_processed(stats(10), 13, 0.02)
    m.batch_processed(stats(5), 8, 0.01)
    assert value(m, "streamproc_decryptions_total", topic="orders", kek_id="orders-kek") == 15
    assert value(m, "streamproc_egress_records_total", topic="orders.analytics", audience="analytics") == 15
    assert value(m, "streamproc_egress_bytes_total", topic="orders.analytics", audience="analytics") == 15 * 250
    assert value(m, "streamproc_transformed_fields_total", operator="generalize") == 45
    assert value(m, "streamproc_records_quarantined_total", reason="bad_payload") == 4
    assert value(m, "streamproc_decryption_failures_total", reason="tampered") == 2
    # bad_payload is not a decryption failure: the envelope opened fine.
    assert m.registry.get_sample_value("streamproc_decryption_failures_total", {"reason": "bad_payload"}) is None
    assert value(m, "streamproc_tombstones_total") == 2
    assert value(m, "streamproc_batch_size_count") == 2
    assert value(m, "streamproc_batch_size_sum") == 21
    assert value(m, "streamproc_batch_duration_seconds_sum") == pytest.approx(0.03)


def test_simple_observer_calls() -> None:
    m = Metrics(anomaly=False, known=KNOWN)
    m.records_consumed("orders", 3, 7)
    m.dead_lettered(Reason.UNKNOWN_KEY, "orders", 2)  # a str enum is accepted too
    m.dead_lettered("tampered", "orders", 1)
    m.transaction("committed")
    m.transaction("committed")
    m.transaction("aborted")
    m.transaction("weird")
    m.end_to_end_latency([0.02, 0.3, -1.0])
    m.retrying("kms", 1)
    m.retrying("mystery", 1)
    assert value(m, "streamproc_records_consumed_total", topic="orders", partition="3") == 7
    assert value(m, "streamproc_dead_letters_total", topic="orders", reason="unknown_key") == 2
    assert value(m, "streamproc_transactions_total", outcome="committed") == 2
    assert value(m, "streamproc_transactions_total", outcome="aborted") == 1
    assert value(m, "streamproc_transactions_total", outcome=OTHER) == 1
    assert value(m, "streamproc_end_to_end_latency_seconds_count") == 3
    assert value(m, "streamproc_end_to_end_latency_seconds_bucket", le="0.005") == 1  # negative clamps to 0
    assert value(m, "streamproc_retries_total", dependency="kms") == 1
    assert value(m, "streamproc_retries_total", dependency=OTHER) == 1
    assert value(m, "streamproc_build_info", version=__version__) == 1
    # Closed label sets exist from the start so increase() sees the first event.
    assert m.registry.get_sample_value("streamproc_anomalies_total", {"kind": "decryption_spike"}) == 0


def test_kms_calls_normalise_outcome_and_operation() -> None:
    m = Metrics(anomaly=False, known=KNOWN)
    for outcome in ("ok", "KeyNotFound", "KeyRevoked", "UnwrapFailed", "unavailable", "SomethingNew"):
        m.kms_call("vault", "unwrap", outcome, 0.001)
    m.kms_call("vault", "frobnicate", "ok", 0.1)
    for outcome in ("ok", "not_found", "revoked", "unwrap_failed", "unavailable", "error"):
        assert value(m, "streamproc_kms_calls_total", provider="vault", operation="unwrap", outcome=outcome) == 1
    assert value(m, "streamproc_kms_calls_total", provider="vault", operation=OTHER, outcome="ok") == 1
    assert value(m, "streamproc_kms_call_duration_seconds_count", provider="vault", operation="unwrap") == 6


def test_instrumented_kms_with_a_real_dek_cache(tmp_path: Path) -> None:
    from streamproc.crypto.envelope import Opener, Sealer
    from streamproc.crypto.kms.instrumented import InstrumentedKms
    from streamproc.crypto.kms.local import LocalKeyring

    k = LocalKeyring.create(tmp_path / "k.json")
    k.create_key("orders-kek")
    m = Metrics(anomaly=False, known=KNOWN)
    opener = Opener.for_kms(InstrumentedKms(k, m))
    sealed = Sealer(k, "orders-kek", "orders").seal_many([b"a", b"b", b"c"])
    for s in sealed:
        opener.open("orders", s)
    stats = opener.cache.stats()
    m.dek_cache(stats.hits, stats.misses)
    assert value(m, "streamproc_kms_calls_total", provider="local", operation="unwrap", outcome="ok") == 1
    assert value(m, "streamproc_dek_cache_hits_total") == 2
    assert value(m, "streamproc_dek_cache_misses_total") == 1


def test_dek_cache_counters_are_deltas_and_survive_a_new_cache() -> None:
    m = Metrics(anomaly=False, known=KNOWN)
    m.dek_cache(10, 2)
    m.dek_cache(15, 2)
    m.dek_cache(3, 1)  # a fresh cache instance started from zero
    assert value(m, "streamproc_dek_cache_hits_total") == 18
    assert value(m, "streamproc_dek_cache_misses_total") == 3


def test_consumer_lag_follows_assignment() -> None:
    m = Metrics(anomaly=False, known=KNOWN)
    m.assignment([("orders", 0), ("orders", 1)])
    m.consumer_lag({("orders", 0): 10, ("orders", 1): 20})
    assert value(m, "streamproc_consumer_lag", topic="orders", partition="1") == 20
    assert value(m, "streamproc_assigned_partitions") == 2
    m.assignment([("orders", 0)])  # partition 1 moved to another worker
    assert m.registry.get_sample_value("streamproc_consumer_lag", {"topic": "orders", "partition": "1"}) is None
    assert value(m, "streamproc_consumer_lag", topic="orders", partition="0") == 10
    assert value(m, "streamproc_assigned_partitions") == 1


def test_readiness_and_liveness() -> None:
    m = Metrics(anomaly=False, known=KNOWN)
    assert m.readiness() == (False, "starting")
    m.ready(True)
    assert m.readiness() == (True, "")  # partitions not reported yet: trust ready()
    m.assignment([])
    assert m.readiness() == (False, "no partitions assigned")
    m.assignment([("orders", 0)])
    assert m.readiness() == (True, "")
    assert value(m, "streamproc_ready") == 1
    m.ready(False, "kms unreachable")
    assert m.readiness() == (False, "kms unreachable")
    assert value(m, "streamproc_ready") == 0
    assert m.liveness()[0] and m.liveness(timeout=60)[0]
    m._last_beat -= 120
    assert m.liveness(timeout=60)[0] is False
    m.heartbeat()
    assert m.liveness(timeout=60)[0]
    m.close()
    assert m.liveness() == (False, "shutting down")


def test_label_guard_caps_partitions_and_rejects_unknown_values() -> None:
    m = Metrics(anomaly=False, max_label_values=3, known=KnownLabels.of(topics=[f"t{i}" for i in range(5)]))
    for i in range(5):
        m.records_consumed("t0", i, 1)
    m.records_consumed("t1", 0, 1)
    m.records_consumed("has space and ✓", 0, 1)
    m.records_consumed("x" * 300, 0, 1)
    assert value(m, "streamproc_records_consumed_total", topic="t0", partition="2") == 1
    # partitions past the cap of 3 distinct values become _other
    assert value(m, "streamproc_records_consumed_total", topic="t0", partition=OTHER) == 2
    assert value(m, "streamproc_records_consumed_total", topic="t1", partition="0") == 1
    assert value(m, "streamproc_records_consumed_total", topic=OTHER, partition="0") == 2


#: Identifiers that a shape test (``[A-Za-z0-9._-:/@+]``) lets through: an e-mail address, a
#: card number (Luhn-valid test PAN), IPv4 and IPv6 addresses, a phone number, a customer id.
CANARIES = (
    "alice@example.com",
    "4111111111111111",
    "203.0.113.7",
    "2001:db8::7",
    "+14155550123",
    "cust-000123",
)


@pytest.mark.parametrize("canary", CANARIES)
def test_label_values_come_from_known_sets_only(canary: str) -> None:
    """Every Observer path that takes a label: an unknown value never reaches the exposition."""
    m = Metrics(anomaly=False, known=KNOWN)
    m.records_consumed(canary, 0, 1)
    m.batch_processed(
        stats(
            3,
            decryptions={(canary, "orders-kek"): 1, ("orders", canary): 2},
            egress_records={(canary, "analytics"): 1, ("orders.analytics", canary): 1},
            egress_bytes={(canary, "analytics"): 10, ("orders.analytics", canary): 10},
            transforms={canary: 4},
            quarantined={canary: 1},
        ),
        3,
        0.01,
    )
    m.dead_lettered(canary, "orders", 1)
    m.dead_lettered("tampered", canary, 1)
    m.kms_call(canary, canary, canary, 0.001)
    m.consumer_lag({(canary, 0): 5})
    m.assignment([(canary, 0)])
    m.retrying(canary, 1)
    m.transaction(canary)
    text = generate_latest(m.registry).decode()
    assert canary not in text
    # ...and each of them was counted under _other, not dropped.
    assert value(m, "streamproc_records_consumed_total", topic=OTHER, partition="0") == 1
    assert value(m, "streamproc_decryptions_total", topic=OTHER, kek_id="orders-kek") == 1
    assert value(m, "streamproc_decryptions_total", topic="orders", kek_id=OTHER) == 2
    assert value(m, "streamproc_egress_records_total", topic="orders.analytics", audience=OTHER) == 1
    assert value(m, "streamproc_transformed_fields_total", operator=OTHER) == 4
    assert value(m, "streamproc_records_quarantined_total", reason=OTHER) == 1
    assert value(m, "streamproc_dead_letters_total", topic=OTHER, reason="tampered") == 1
    assert value(m, "streamproc_kms_calls_total", provider=OTHER, operation=OTHER, outcome="error") == 1


def test_label_guard_without_known_sets_fails_closed() -> None:
    """No config, no names: a Metrics built without ``known`` reports every topic as _other."""
    m = Metrics(anomaly=False)
    m.records_consumed("orders", 0, 1)
    assert value(m, "streamproc_records_consumed_total", topic=OTHER, partition="0") == 1
    m.records_consumed("orders", "0", 1)  # type: ignore[arg-type]  # partitions are ints
    assert value(m, "streamproc_records_consumed_total", topic=OTHER, partition=OTHER) == 1


def test_known_labels_from_the_shipped_config() -> None:
    from streamproc.config import load_config

    known = KnownLabels.from_config(load_config(ROOT / "examples" / "streamproc.yaml", check_policy=False))
    # Written out from examples/streamproc.yaml, not derived with the code under test.
    assert known.topics == {
        "orders", "logins", "orders.analytics", "orders.fraud", "orders.support",
        "logins.analytics", "logins.fraud", "orders.dlq", "logins.dlq",
    }
    assert known.audiences == {"analytics", "fraud", "support"}
    assert {"orders-kek", "logins-kek", "analytics-kek", "fraud-kek", "support-kek"} <= known.kek_ids


def test_anomalies_are_counted() -> None:
    clock = FakeClock()
    m = Metrics(anomaly=AnomalyConfig(interval=1.0, warmup_intervals=5), clock=clock,
                allowed_destinations={"orders.analytics"}, known=KNOWN)
    for i in range(12):
        n = 1000 if i == 10 else 100
        m.batch_processed(stats(n, quarantined={}), n, 0.01)
        clock.t += 1.0
    m.tick()
    m.batch_processed(stats(1, egress_records={("orders.leak", "analytics"): 1}, quarantined={Reason.UNKNOWN_KEY: 1}), 1, 0.0)
    assert value(m, "streamproc_anomalies_total", kind="decryption_spike") == 1
    assert value(m, "streamproc_anomalies_total", kind="egress_spike") == 1
    assert value(m, "streamproc_anomalies_total", kind="unexpected_destination") == 1
    assert value(m, "streamproc_anomalies_total", kind="unknown_key") == 1


def test_is_an_observer() -> None:
    assert isinstance(Metrics(anomaly=False, known=KNOWN), Observer)


def test_no_record_value_reaches_a_metric(tmp_path: Path) -> None:
    """Run canary records (including failures) through a pipeline; scan the exposition."""
    from streamproc.client import RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.envelope import Opener
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
    from streamproc.policy import load_policy
    from streamproc.schema.registry import build_schema_source

    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    k = LocalKeyring.create(tmp_path / "k.json")
    for kid in ("orders-kek", "analytics-kek"):
        k.create_key(kid)
    k.create_key("pseudonym-master", "secret")
    schemas = build_schema_source(str(tmp_path / "schemas"))
    p = Pipeline(
        routes=build_routes([{"sources": ["orders"], "source_keks": ["orders-kek"], "destinations": [{"topic": "orders.analytics", "audience": "analytics", "kek": "analytics-kek"}]}]),
        policy=load_policy(str(ROOT / "policy.yaml")), opener=Opener.for_kms(k), kms=k, schemas=schemas,
        keys=PseudonymKeys(k, "pseudonym-master"),
    )
    sealer = RecordSealer(k, "orders-kek", "orders", json.loads((ROOT / "schemas" / "order.avsc").read_text()), schemas)
    gen = EventGenerator(seed=3)
    recs = [gen.order(canary=True) for _ in range(20)]
    recs[0] = {**recs[0], "ip_address": "CANARY-not-an-ip"}
    vals = sealer.seal_many(recs)
    vals[1] = vals[1][:-3] + b"CANARY"
    m = Metrics(allowed_destinations={"orders.analytics"}, known=KNOWN)
    p.instrument_kms(m)
    res = p.process([InputRecord("orders", 0, i, b"CANARY-key", v) for i, v in enumerate(vals)])
    m.batch_processed(res.stats, len(vals), 0.01)
    for q in res.quarantined:
        m.dead_lettered(q.reason.value, q.record.topic, 1)
    text = generate_latest(m.registry).decode()
    assert value(m, "streamproc_decryptions_total", topic="orders", kek_id="orders-kek") == 18  # counted only when fully processed
    assert value(m, "streamproc_records_quarantined_total", reason="transform_failed") == 1
    assert value(m, "streamproc_decryption_failures_total", reason="tampered") == 1
    assert "canary" not in text.lower()
    for r in recs:
        assert r["card_number"] not in text and r["ip_address"] not in text


def test_metrics_by_name_lookup() -> None:
    assert METRICS_BY_NAME["streamproc_consumer_lag"].multiprocess_mode == "livemostrecent"


def test_demo_summary_names_exported_samples() -> None:
    """Every name the demo sums up is a sample of a real exposition after the events it counts."""
    from streamproc.cli.demo_kafka import SUMMARY_METRICS

    m = Metrics(known=KNOWN)
    m.records_consumed("orders", 0, 3)
    m.batch_processed(stats(3), 3, 0.01)
    m.dead_lettered("tampered", "orders", 1)
    m.transaction("committed")
    m.kms_call("local", "unwrap", "ok", 0.001)
    text = generate_latest(m.registry).decode()
    samples = set(re.findall(r"^(streamproc_[a-z0-9_]+)[{ ]", text, re.M))
    missing = [k for k in SUMMARY_METRICS if k not in samples]
    assert not missing
    assert "streamproc_dead_letters_total" in SUMMARY_METRICS  # the demo's dead letters show


def test_risk_gauges_per_audience_and_enforcement_counter() -> None:
    """The risk windows' reports become gauges per configured audience; an audience the
    config does not name gets no series, and an unknown action label becomes _other."""
    from streamproc.pipeline.core import BatchStats
    from streamproc.privacy.risk import RiskTarget, RiskWindow

    w = RiskWindow(RiskTarget(("A", "B"), 3, 60.0, 2, "S"), clock=lambda: 0.0)
    for qi, sv in [(("x", 1), "p"), (("x", 1), "q"), (("x", 1), "p"), (("y", 2), "p")]:
        w.add(qi, sv, ts=0.0)
    st = BatchStats()
    st.risk = {"analytics": w.report(now=0.0), "not-configured": w.report(now=0.0)}
    st.risk_enforced = {("analytics", "suppressed"): 2, ("analytics", "generalized"): 1, ("analytics", "bogus"): 5,
                        ("analytics", "held"): 7, ("analytics", "released"): 4, ("analytics", "expired"): 3}
    m = Metrics(known=KNOWN)
    m.batch_processed(st, 4, 0.01)
    text = generate_latest(m.registry).decode()

    def val(name: str, **labels: str) -> float | None:
        sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        hit = re.search(rf"^{name}\{{{sel}\}} (\S+)$", text, re.M)
        return None if hit is None else float(hit.group(1))

    assert val("streamproc_risk_window_records", audience="analytics") == 4
    assert val("streamproc_risk_min_class_size", audience="analytics") == 1  # ("y", 2) once
    assert val("streamproc_risk_share_below_k", audience="analytics") == 0.25
    assert val("streamproc_risk_share_unique", audience="analytics") == 0.25
    assert val("streamproc_risk_min_l", audience="analytics") == 1
    assert val("streamproc_risk_share_below_l", audience="analytics") == 0.25
    assert (val("streamproc_risk_k_target", audience="analytics"), val("streamproc_risk_l_target", audience="analytics")) == (3, 2)
    assert val("streamproc_risk_enforced_total", action="suppressed", audience="analytics") == 2
    assert val("streamproc_risk_enforced_total", action="generalized", audience="analytics") == 1
    assert val("streamproc_risk_enforced_total", action="_other", audience="analytics") == 5
    for action, n in (("held", 7), ("released", 4), ("expired", 3)):  # action: hold's labels pass the guard
        assert val("streamproc_risk_enforced_total", action=action, audience="analytics") == n
    assert "not-configured" not in text and 'audience="_other"' not in text
