"""Lineage from the real worker on the broker: OpenLineage events over the Kafka transport.

The worker runs with ``lineage: {transport: {type: kafka, ...}}``; the events it sends to
a topic on the same broker are read back and validated against the OpenLineage JSON
schema: START at start-up, one RUNNING per compiled (schema, destination) plan when the
first records arrive, COMPLETE after a clean SIGTERM drain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tests.integration.conftest import AUDIENCES, produce_events, read_topics
from tests.unit.test_lineage import validate

pytestmark = pytest.mark.integration


def test_worker_emits_validated_lineage_events(workspace_factory: Any, workers: list[Any], kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    from tests.integration.conftest import WorkerProcess

    topic = f"lineage-{unique}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)
    lineage = {
        "namespace": "acme",
        "job": "orders-privacy",
        "transport": {"type": "kafka", "topic": topic, "config": {"bootstrap.servers": kafka_bootstrap}, "flush": True},
    }
    ws = workspace_factory(sources=("orders",), extra={"lineage": lineage})
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned()
    produced = produce_events(ws, "orders", 5)

    def events(recs: dict[str, list[Any]]) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in recs[topic]]

    got = read_topics(kafka_bootstrap, [topic], until=lambda r: sum(e["eventType"] == "RUNNING" for e in events(r)) >= 3, timeout=60)
    w.terminate()
    assert w.wait(60) == 0, w.log()[-3000:]
    got = read_topics(kafka_bootstrap, [topic], until=lambda r: any(e["eventType"] == "COMPLETE" for e in events(r)), timeout=30)
    evs = events(got)
    assert [e["eventType"] for e in evs] == ["START", "RUNNING", "RUNNING", "RUNNING", "COMPLETE"]
    for e in evs:
        validate(e)
        assert e["job"]["namespace"] == "acme" and e["job"]["name"] == "orders-privacy"
    ns = f"kafka://{kafka_bootstrap}"
    assert [(d["namespace"], d["name"]) for d in evs[0]["inputs"]] == [(ns, ws.topic("orders"))]
    outs = sorted(e["outputs"][0]["name"] for e in evs[1:4])
    assert outs == sorted(ws.dest("orders", a) for a in AUDIENCES)
    fraud = next(e for e in evs[1:4] if e["outputs"][0]["name"] == ws.dest("orders", "fraud"))
    email = fraud["outputs"][0]["facets"]["columnLineage"]["fields"]["email"]["inputFields"][0]
    assert (email["namespace"], email["name"], email["field"]) == (ns, ws.topic("orders"), "email")
    assert email["transformations"] == [
        {"type": "DIRECT", "subtype": "TRANSFORMATION", "description": 'encrypt_deterministic(normalize=["lower","strip"])', "masking": True}
    ]
    # Lineage carries structure only: no produced value or key appears in any event.
    raw = "".join(r.value.decode() for r in got[topic])
    secrets = {str(rec[f]) for rec in produced.records.values() for f in ("email", "customer_id", "card_number", "phone")}
    assert secrets and not [v for v in secrets if v in raw]
