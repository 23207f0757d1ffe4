"""``risk.action: hold`` through the real worker on the broker, across a SIGKILL.

One source partition; ``analytics`` holds records below k = 3.  Phase 1: class C reaches
k (released), classes A and B stay below it (held in ``<group_id>.risk-hold``).  The
worker is SIGKILLed with A and B held; a new instance (same transactional id) restores
them from the changelog, and one more A record brings A to k: A's held records go out
then.  What ``analytics`` received (read_committed) is compared with an independent
simulation over the inputs: every released id exactly once, nothing of B, nothing lost.

Real Kafka only (Tansu shows aborted transactions to read_committed readers).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    Broker,
    WorkerProcess,
    make_workspace,
    produce_raw,
    read_topics,
)
from tests.unit.test_risk_hold import simulate, visit
from tests.unit.test_risk_pipeline import RULES, SCHEMA, K

pytestmark = pytest.mark.integration


@pytest.fixture
def real_kafka(kafka_broker: Broker) -> Broker:
    if kafka_broker.kind == "tansu":
        pytest.skip("Tansu shows aborted transactions to read_committed readers")
    return kafka_broker


def test_held_records_survive_sigkill_and_are_released_once(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess]
) -> None:
    from streamproc.client import RecordSealer
    from streamproc.runtime.topics import apply_topics

    ws = make_workspace(tmp_path, real_kafka.bootstrap, unique, sources=("orders",), partitions=1,
                        batch={"max_records": 4, "max_wait_ms": 50})  # fmt: skip
    (ws.schemas / "order.avsc").unlink()
    (ws.schemas / "visit.avsc").write_text(json.dumps(SCHEMA))
    hold = {"quasi_identifiers": ["POSTCODE", "BIRTH_DATE", "GENDER"], "k": K, "window": "1h",
            "action": "hold", "hold": {"max_records": 1000}}
    ws.policy.write_text(yaml.safe_dump({
        "name": "risk-hold-test",
        "keys": {"pseudonym": "pseudonym-master"},
        "audiences": {
            "fraud": {"record_key": "keep", "tags": RULES},
            "analytics": {"record_key": "keep", "tags": RULES, "risk": hold},
            "support": {"record_key": "keep", "tags": RULES},
        },
    }, sort_keys=False))
    cfg = ws.load_config()
    hold_topic = cfg.risk_hold_topic
    assert hold_topic == f"{cfg.group_id}.risk-hold"
    apply_topics(cfg)

    sealer = RecordSealer(ws.kms(), "orders-kek", ws.topic("orders"), SCHEMA, ws.schema_source())

    def send(records: list[dict[str, Any]]) -> None:
        produce_raw(ws.bootstrap, ws.topic("orders"),
                    [(r["visit_id"].encode(), v, r) for r, v in zip(records, sealer.seal_many(records), strict=True)])

    phase1 = [visit(0, "SW1A"), visit(1, "N1CD"), visit(2, "N7AB"), visit(3, "N1CD"),
              visit(4, "SW1A"), visit(5, "N1CD"), visit(6, "N7AB")]
    phase2 = [visit(7, "SW1A")]
    want1 = simulate([phase1])[0]
    want = sorted(want1 + simulate([phase1, phase2])[1])
    assert want1 and len(want) > len(want1)  # the scenario holds, then releases after the kill
    dest = ws.dest("orders", "analytics")

    def ids(until: list[str]) -> list[str]:
        got = read_topics(ws.bootstrap, [dest, hold_topic],
                          until=lambda r: len(r[dest]) >= len(until), timeout=60)
        opener = ws.opener()
        return [opener.open(dest, r.value)[1]["visit_id"] for r in got[dest]]

    def still_held() -> list[bytes | None]:
        """Keys whose last committed hold record is not a tombstone."""
        last: dict[bytes | None, bytes | None] = {}
        for r in read_topics(ws.bootstrap, [hold_topic], timeout=30, idle=1.0)[hold_topic]:
            last[r.key] = r.value
        return [k for k, v in last.items() if v is not None]

    send(phase1)
    w = WorkerProcess(ws, "--instance", "one", name="w1")
    workers.append(w)
    assert sorted(ids(want1)) == want1
    assert len(still_held()) == len(phase1) - len(want1)  # committed with the released outputs
    w.proc.send_signal(signal.SIGKILL)  # between hold and release
    w.wait(10)

    w2 = WorkerProcess(ws, "--instance", "one", name="w2")
    workers.append(w2)
    send(phase2)
    got = ids(want)
    assert Counter(got) == Counter(want), w2.log()[-3000:]  # exactly once: none lost, none twice
    restored = [e for e in w2.log_events() if e.get("message") == "state restored" and e.get("topic") == hold_topic]
    assert restored and sum(e["records"] for e in restored) > 0, w2.log()[-3000:]
    assert len(still_held()) == len(phase1) + len(phase2) - len(want)  # B's records, still held
    w2.terminate()
    assert w2.wait(60) == 0, w2.log()[-3000:]
