"""A running worker on a real broker meets KEK ids it must not trust or accept.

* a producer puts an e-mail address in the envelope's KEK id: the id never reaches the
  worker's log lines nor any ``streamproc.*`` dead-letter header, only its digest does;
* a record sealed under a destination audience's KEK (default allow-list) and one under
  a KEK outside the pipeline's explicit ``source_keks`` are dead-lettered as
  ``kek_not_allowed`` and raise the ``kek_not_allowed`` anomaly, while good records flow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import Reason
from streamproc.runtime.dlq import H_DLQ_DETAIL, H_DLQ_REASON
from streamproc.runtime.topics import apply_topics
from tests.integration.conftest import (
    GEN_KIND,
    WorkerProcess,
    make_workspace,
    produce_raw,
    read_topics,
)

pytestmark = pytest.mark.integration

CANARY_KEK = "alice@example.com"
GOOD = 12


def digest(kek_id: str) -> str:
    return "sha256:" + hashlib.sha256(kek_id.encode()).hexdigest()[:12]


def sealed(ring: Any, kek: str, ws: Any, source: str, topic: str, n: int, seed: int) -> list[tuple[bytes, bytes, Any]]:
    s = RecordSealer(ring, kek, topic, ws.schema_json(source), ws.schema_source())
    recs = list(EventGenerator(seed).events(GEN_KIND[source], n))
    return [(r["customer_id"].encode(), v, r) for r, v in zip(recs, s.seal_many(recs), strict=True)]


def test_untrusted_and_disallowed_keks_never_leak_nor_open(
    tmp_path: Path, kafka_bootstrap: str, unique: str, workers: list[WorkerProcess]
) -> None:
    ws = make_workspace(
        tmp_path / "ws", kafka_bootstrap, unique, sources=("orders", "logins"), partitions=1,
        extra={"metrics": {"enabled": True, "host": "127.0.0.1", "port": 0}},
    )
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["pipelines"][1]["source_keks"] = ["logins-kek"]  # explicit on logins, default on orders
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    apply_topics(ws.load_config())
    ring = ws.kms()
    ring.create_key("legacy-kek")  # a real key of ours, but not in logins' source_keks
    theirs = LocalKeyring.create(tmp_path / "theirs.json")
    theirs.create_key(CANARY_KEK)
    orders, logins = ws.topic("orders"), ws.topic("logins")

    bad_orders = [
        *[(k, v, Reason.UNKNOWN_KEY) for k, v, _ in sealed(theirs, CANARY_KEK, ws, "orders", orders, 2, 1)],
        *[(k, v, Reason.WRONG_TOPIC) for k, v, _ in sealed(theirs, CANARY_KEK, ws, "orders", logins, 1, 2)],
        *[(k, v, Reason.KEK_NOT_ALLOWED) for k, v, _ in sealed(ring, "analytics-kek", ws, "orders", orders, 2, 3)],
    ]
    bad_logins = [
        *[(k, v, Reason.KEK_NOT_ALLOWED) for k, v, _ in sealed(ring, "legacy-kek", ws, "logins", logins, 2, 4)],
        *[(k, v, Reason.KEK_NOT_ALLOWED) for k, v, _ in sealed(theirs, CANARY_KEK, ws, "logins", logins, 1, 5)],
    ]
    good = produce_raw(ws.bootstrap, orders, sealed(ring, "orders-kek", ws, "orders", orders, GOOD, 6))
    dl_o = produce_raw(ws.bootstrap, orders, bad_orders)
    dl_l = produce_raw(ws.bootstrap, logins, bad_logins)
    good_l = produce_raw(ws.bootstrap, logins, sealed(ring, "logins-kek", ws, "logins", logins, GOOD, 7))

    w = WorkerProcess(ws)
    workers.append(w)
    dest_o, dest_l = ws.dest("orders", "analytics"), ws.dest("logins", "analytics")
    dlq_o, dlq_l = ws.dlq("orders"), ws.dlq("logins")
    out = read_topics(
        ws.bootstrap, [dest_o, dest_l, dlq_o, dlq_l],
        until=lambda r: len(r[dest_o]) >= GOOD and len(r[dest_l]) >= GOOD
        and len(r[dlq_o]) >= len(bad_orders) and len(r[dlq_l]) >= len(bad_logins),
        timeout=90,
    )
    assert w.alive(), w.log()[-3000:]
    assert {(r.source[1], r.source[2]) for r in out[dest_o]} == set(good.records)
    assert {(r.source[1], r.source[2]) for r in out[dest_l]} == set(good_l.records)
    for dlq, produced in ((out[dlq_o], dl_o), (out[dlq_l], dl_l)):
        assert len(dlq) == len(produced.records)
        got = {(r.header("streamproc.source.partition"), r.header("streamproc.source.offset")): r for r in dlq}
        for (part, off), reason in produced.records.items():
            r = got[(str(part), str(off))]
            assert r.header(H_DLQ_REASON) == reason.value
            for name, value in r.headers:
                if name.startswith("streamproc."):
                    assert b"alice" not in (value or b""), (name, value)
    details = {r.header(H_DLQ_DETAIL) for r in [*out[dlq_o], *out[dlq_l]]}
    assert details == {
        f"key {digest(CANARY_KEK)} v1",
        f"key {digest(CANARY_KEK)} v1; sealed for another topic",
        "key 'analytics-kek' v1 may not seal this source topic",
        f"key {digest('legacy-kek')} v1 may not seal this source topic",
        f"key {digest(CANARY_KEK)} v1 may not seal this source topic",
    }
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]
    log = w.log()
    assert "alice" not in log.lower() and CANARY_KEK not in log
    assert digest(CANARY_KEK) in log
    events = w.log_events()
    reasons = {e.get("reason") for e in events if str(e.get("message", "")).startswith("record dead-lettered")}
    assert reasons == {"unknown_key", "wrong_topic", "kek_not_allowed"}
    assert any(e.get("message") == "anomaly detected: kek_not_allowed" for e in events), log[-3000:]
