"""Re-identification risk through the real worker on the broker.

One source partition (so the worker sees the records in produce order), three audiences
over a visits schema with quasi-identifiers POSTCODE, BIRTH_DATE, GENDER:

* ``fraud`` measures only (k, and l over DIAGNOSIS);
* ``analytics`` enforces k = 3 by suppression;
* ``support`` enforces k = 3 with a postcode ladder (prefix 2, then 1), then suppression.

After the worker processed every record: what each audience received (read back from
its topic, decrypted with its key) is compared with an independent count over the
inputs (which records must have been suppressed or generalized), and the gauges scraped
from the worker's /metrics endpoint with pycanon over exactly what the audience received.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    WorkerProcess,
    make_workspace,
    produce_raw,
    read_topics,
    wait_for,
)
from tests.integration.servers import free_port
from tests.unit.test_risk_pipeline import (
    LADDER,
    RULES,
    SCHEMA,
    K,
    base_tuple,
    expected,
    pycanon_report,
    visits,
)

pytestmark = pytest.mark.integration

N = 300


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def gauge(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{([^}}]*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_gauges_and_enforcement_through_the_worker(tmp_path: Path, kafka_bootstrap: str, unique: str,
                                                   workers: list[WorkerProcess]) -> None:
    from streamproc.client import RecordSealer
    from streamproc.runtime.topics import apply_topics

    port = free_port()
    ws = make_workspace(
        tmp_path, kafka_bootstrap, unique, sources=("orders",), partitions=1,
        batch={"max_records": 40, "max_wait_ms": 50},
        extra={"metrics": {"enabled": True, "host": "127.0.0.1", "port": port}},
    )
    (ws.schemas / "order.avsc").unlink()
    (ws.schemas / "visit.avsc").write_text(json.dumps(SCHEMA))
    risk = {"quasi_identifiers": ["POSTCODE", "BIRTH_DATE", "GENDER"], "k": K, "window": "1h"}
    ws.policy.write_text(yaml.safe_dump({
        "name": "risk-test",
        "keys": {"pseudonym": "pseudonym-master"},
        "audiences": {
            "fraud": {"record_key": "keep", "tags": RULES,
                      "risk": {**risk, "l": 2, "sensitive": "DIAGNOSIS"}},
            "analytics": {"record_key": "keep", "tags": RULES, "risk": {**risk, "action": "suppress"}},
            "support": {"record_key": "keep", "tags": RULES,
                        "risk": {**risk, "action": "generalize_more", "ladder": LADDER}},
        },
    }, sort_keys=False))
    apply_topics(ws.load_config())

    records = visits(N, 21)
    sealer = RecordSealer(ws.kms(), "orders-kek", ws.topic("orders"), SCHEMA, ws.schema_source())
    produce_raw(ws.bootstrap, ws.topic("orders"),
                [(r["visit_id"].encode(), v, r) for r, v in zip(records, sealer.seal_many(records), strict=True)])
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned(60)

    dests = {a: ws.dest("orders", a) for a in ("fraud", "analytics", "support")}
    got = read_topics(ws.bootstrap, [*dests.values(), ws.dlq("orders")],
                      until=lambda r: all(len(r[t]) >= N for t in dests.values()), timeout=120)
    assert got[ws.dlq("orders")] == []
    opener = ws.opener()
    received = {a: [opener.open(t, r.value)[1] for r in sorted(got[t], key=lambda r: r.offset)]
                for a, t in dests.items()}
    assert all(len(v) == N for v in received.values())
    assert [r["visit_id"] for r in received["analytics"]] == [r["visit_id"] for r in records]

    # enforcement: exactly the records an independent count over the inputs says
    for aud, levels in (("analytics", 0), ("support", 2)):
        want = expected(records, levels)
        have = [None if r["postcode"] is None else (r["postcode"], r["birth_date"], r["gender"])
                for r in received[aud]]
        assert have == want, aud
        assert any(t is None for t in want)
    assert all(r["postcode"] is not None for r in received["fraud"])  # measured only
    assert [(r["postcode"], r["birth_date"], r["gender"]) for r in received["fraud"]] == [
        base_tuple(v) for v in records]

    # the gauges the worker exports match pycanon over what each audience received
    text = ""

    def scraped_all() -> bool:
        nonlocal text
        text = scrape(port)
        return all(gauge(text, "streamproc_risk_window_records", audience=a) == N for a in dests)

    wait_for(scraped_all, 30, what="risk gauges over every record")
    for aud in dests:
        ref = pycanon_report(received[aud])
        assert gauge(text, "streamproc_risk_min_class_size", audience=aud) == ref["k"], aud
        assert gauge(text, "streamproc_risk_share_below_k", audience=aud) == pytest.approx(ref["below_k"]), aud
        assert gauge(text, "streamproc_risk_share_unique", audience=aud) == pytest.approx(ref["unique"]), aud
        assert gauge(text, "streamproc_risk_k_target", audience=aud) == K
    assert gauge(text, "streamproc_risk_min_l", audience="fraud") == pycanon_report(received["fraud"])["l"]
    assert gauge(text, "streamproc_risk_min_l", audience="analytics") is None  # no l configured
    suppressed = sum(1 for t in expected(records, 0) if t is None)
    assert gauge(text, "streamproc_risk_enforced_total", audience="analytics", action="suppressed") == suppressed
    lad = expected(records, 2)
    assert gauge(text, "streamproc_risk_enforced_total", audience="support", action="generalized") == sum(
        1 for t, v in zip(lad, records, strict=True) if t is not None and t != base_tuple(v))
    w.terminate()
    assert w.wait(30) == 0
