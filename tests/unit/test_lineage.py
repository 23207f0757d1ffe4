"""OpenLineage events from plan compilations, validated against the OpenLineage JSON schema.

The pipeline reports each new (schema, destination) plan through its ``on_compile``
callback; :class:`LineageEmitter` sends the events through openlineage-python's real file
transport; the test reads the file back and validates every event against the vendored
spec (tests/data/openlineage: the event against OpenLineage.json, each facet against the
schema its ``_schemaURL`` names).  The column lineage of the analytics audience is
written out by hand from policy.yaml and schemas/order.avsc.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openlineage.client import OpenLineageClient
from openlineage.client.transport.file import FileConfig, FileTransport
from referencing import Registry, Resource

from streamproc.config import parse_config
from streamproc.errors import ConfigError
from streamproc.observability.lineage import LineageEmitter, dataset_namespace
from streamproc.pipeline.core import CompiledPlan
from tests.unit.conftest import DESTINATIONS, Maker
from tests.unit.test_pipeline import inp, order, sealers

SPEC = Path(__file__).resolve().parents[1] / "data" / "openlineage"
NS = "kafka://127.0.0.1:9092"


def _registry() -> tuple[Registry, dict[str, Any]]:
    docs = [json.loads(p.read_text()) for p in sorted(SPEC.glob("*.json"))]
    registry: Registry = Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in docs)
    main = next(d for d in docs if d["$id"].endswith("/OpenLineage.json"))
    return registry, main


def validate(event: dict[str, Any]) -> None:
    registry, main = _registry()
    Draft202012Validator(main, registry=registry).validate(event)
    facet_sets = [event["job"].get("facets", {})]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        facet_sets.append(ds.get("facets", {}))
    checked = 0
    for facets in facet_sets:
        for facet in facets.values():
            Draft202012Validator({"$ref": facet["_schemaURL"]}, registry=registry).validate(facet)
            checked += 1
    assert checked >= 1


def _emitter(path: Path) -> LineageEmitter:
    client = OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(path), append=True)), config={"transport": {"type": "file"}})
    return LineageEmitter(
        client, job_namespace="streamproc", job_name="orders-processor", dataset_namespace=NS,
        sources=["orders", "logins"], destinations=[d.topic for d in DESTINATIONS], policy_version="sha256:x",
    )


#: analytics (policy.yaml) on schemas/order.avsc, by hand: output field -> (subtype, description).
ANALYTICS = {
    "order_id": ("IDENTITY", "keep"),
    "customer_id": ("TRANSFORMATION", "token"),
    "email": ("TRANSFORMATION", 'token(normalize=["lower","strip"])'),
    "ip_address": ("TRANSFORMATION", "generalize(cidr=24)"),
    "birth_date": ("TRANSFORMATION", 'generalize(to="year")'),
    "amount_cents": ("IDENTITY", "keep"),
    "currency": ("IDENTITY", "keep"),
    "placed_at": ("IDENTITY", "keep"),
    "shipping_address.city": ("IDENTITY", "keep"),
    "shipping_address.postcode": ("TRANSFORMATION", 'generalize(until=" ")'),
    "shipping_address.country": ("IDENTITY", "keep"),
    "items.sku": ("IDENTITY", "keep"),
    "items.quantity": ("IDENTITY", "keep"),
    "items.unit_price_cents": ("IDENTITY", "keep"),
    "coupon_code": ("IDENTITY", "keep"),
}  # card_number, phone and shipping_address.street are dropped: no output field, no lineage


def _leaves(schema: Any, prefix: str = "") -> list[str]:
    """Output field paths read off the output schema JSON (records, arrays of records)."""
    out = []
    for f in schema["fields"]:
        t = f["type"]
        if isinstance(t, dict) and t.get("type") == "array" and isinstance(t["items"], dict):
            t = t["items"]
        if isinstance(t, dict) and t.get("type") == "record":
            out += _leaves(t, f"{prefix}{f['name']}.")
        else:
            out.append(prefix + f["name"])
    return out


def test_compilation_events_carry_column_lineage(make_pipeline: Maker, tmp_path: Path) -> None:
    kit = make_pipeline()
    compiled: list[CompiledPlan] = []
    kit.pipeline.on_compile = compiled.append
    orders_sealer, _ = sealers(kit)
    res = kit.pipeline.process([inp("orders", orders_sealer.seal(order(1)))])
    assert not res.quarantined
    assert sorted(c.destination.topic for c in compiled) == sorted(d.topic for d in DESTINATIONS)
    kit.pipeline.process([inp("orders", orders_sealer.seal(order(2)), offset=1)])
    assert len(compiled) == 3  # compiled once per (schema, destination)

    path = tmp_path / "lineage.jsonl"
    em = _emitter(path)
    em.start()
    for c in compiled:
        em.plan_compiled(c)
    em.finish(True)
    em.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "RUNNING", "RUNNING", "RUNNING", "COMPLETE"]
    assert len({e["run"]["runId"] for e in events}) == 1
    for e in events:
        validate(e)
    assert [d["name"] for d in events[0]["outputs"]] == [d.topic for d in DESTINATIONS]

    analytics = next(e for e in events[1:4] if e["outputs"][0]["name"] == "sanitized.analytics")
    assert [d["name"] for d in analytics["inputs"]] == ["orders", "logins"]
    in_fields = analytics["inputs"][0]["facets"]["schema"]["fields"]
    first = in_fields[0]
    assert (first["name"], first["type"], first["ordinal_position"]) == ("order_id", "string", 1)
    address = next(f for f in in_fields if f["name"] == "shipping_address")
    assert address["type"] == "record"
    assert [f["name"] for f in address["fields"]] == ["street", "city", "postcode", "country"]
    out = analytics["outputs"][0]["facets"]
    lineage = out["columnLineage"]["fields"]
    got = {}
    for name, spec in lineage.items():
        ins = spec["inputFields"]
        assert [(i["namespace"], i["name"], i["field"]) for i in ins] == [(NS, "orders", name), (NS, "logins", name)]
        (t,) = ins[0]["transformations"]
        assert t["type"] == "DIRECT"
        assert t["masking"] is (t["subtype"] != "IDENTITY")
        got[name] = (t["subtype"], t["description"])
    assert got == ANALYTICS
    # Every output field has lineage, and nothing else does.
    out_schema = next(c.output_schema for c in compiled if c.destination.audience == "analytics")
    assert sorted(lineage) == sorted(_leaves(out_schema))
    assert [f["name"] for f in out["schema"]["fields"]] == [f["name"] for f in out_schema["fields"]]

    # A policy change / key rotation drops the plans: recompiling reports again.
    kit.pipeline.reset_plans()
    kit.pipeline.process([inp("orders", orders_sealer.seal(order(3)), offset=2)])
    assert len(compiled) == 6


def test_a_failing_observer_never_fails_a_record(make_pipeline: Maker) -> None:
    kit = make_pipeline()

    def broken(_: CompiledPlan) -> None:
        raise RuntimeError("transport down")

    kit.pipeline.on_compile = broken
    orders_sealer, _ = sealers(kit)
    res = kit.pipeline.process([inp("orders", orders_sealer.seal(order(1)))])
    assert not res.quarantined and len(res.outputs) == 3
    assert kit.pipeline.observer_errors == 3


def test_unsendable_event_is_counted_not_raised(tmp_path: Path) -> None:
    em = _emitter(tmp_path / "no-such-dir" / "x.jsonl")
    em.start()
    em.close()
    assert em.failed == 1


def test_dataset_namespace() -> None:
    assert dataset_namespace("b1:9092,b2:9092") == "kafka://b1:9092"
    assert dataset_namespace("SASL_SSL://kafka.example:9093") == "kafka://kafka.example:9093"


def _cfg(tmp_path: Path, lineage: Any) -> Any:
    (tmp_path / "policy.yaml").write_text("audiences: {a: {record_key: keep, tags: {PUBLIC: keep}}}\n")
    raw = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "schemas": {"directory": str(tmp_path)},
        "kms": {"provider": "local", "path": str(tmp_path / "ring.json")},
        "policy": str(tmp_path / "policy.yaml"),
        "pipelines": [{"sources": ["s"], "dead_letter_topic": "s.dlq", "destinations": [{"topic": "s.a", "audience": "a", "kek": "k"}]}],
    }
    if lineage is not None:
        raw["lineage"] = lineage
    return parse_config(raw, base_dir=tmp_path, env={})


def test_lineage_config(tmp_path: Path) -> None:
    assert _cfg(tmp_path, None).lineage is None  # off by default
    c = _cfg(tmp_path, {"transport": {"type": "console"}, "namespace": "acme"}).lineage
    assert c.enabled and c.namespace == "acme" and c.job is None and c.transport == {"type": "console"}
    em = LineageEmitter.from_config(_cfg(tmp_path, {"transport": {"type": "file", "log_file_path": str(tmp_path / "l.jsonl"), "append": True}}), "v")
    assert em is not None and em.job_name == "streamproc" and em.namespace == "kafka://127.0.0.1:1"
    em.start()
    em.close()
    validate(json.loads((tmp_path / "l.jsonl").read_text()))
    assert LineageEmitter.from_config(_cfg(tmp_path, {"enabled": False, "transport": {"type": "console"}}), "v") is None


@pytest.mark.parametrize(
    ("lineage", "where"),
    [
        ({"transport": {"type": "carrier-pigeon"}}, "lineage.transport.type"),
        ({"transport": {"type": "http"}}, "lineage.transport.url"),
        ({"transport": {"type": "kafka", "topic": "t"}}, "lineage.transport"),
        ({"transport": {"type": "console"}, "colour": "blue"}, "lineage"),
    ],
)
def test_bad_lineage_config(tmp_path: Path, lineage: Any, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        _cfg(tmp_path, lineage)


def test_the_schema_check_is_live(tmp_path: Path) -> None:
    """The validator rejects what the spec forbids (so the checks above can fail)."""
    from jsonschema import ValidationError

    em = _emitter(tmp_path / "l.jsonl")
    em.start()
    em.close()
    good = json.loads((tmp_path / "l.jsonl").read_text())
    validate(good)
    no_producer = {k: v for k, v in good.items() if k != "producer"}
    with pytest.raises(ValidationError):
        validate(no_producer)
    bad_facet = json.loads(json.dumps(good))
    bad_facet["job"]["facets"]["jobType"]["processingType"] = 42
    with pytest.raises(ValidationError):
        validate(bad_facet)


def test_a_stalled_transport_never_blocks_the_caller(tmp_path: Path) -> None:
    """The consume loop only queues: a transport stuck in emit() costs it nothing."""
    import threading

    release = threading.Event()
    sent: list[Any] = []

    class Stuck:
        def emit(self, event: Any) -> None:
            release.wait(30)
            sent.append(event)

    em = LineageEmitter(
        Stuck(), job_namespace="n", job_name="j", dataset_namespace=NS, sources=["s"], destinations=["d"],
        policy_version="v", queue_size=2,
    )
    em.start()  # taken by the sender thread, which now hangs in emit()
    for _ in range(5):
        em.finish(True)  # returns at once; beyond the queue's 2 slots, events are dropped
    assert em.failed >= 2
    release.set()
    em.close()
    assert 1 <= len(sent) <= 3 and sent[0].eventType.value == "START"


def test_http_transport_posts_to_a_lineage_endpoint(tmp_path: Path) -> None:
    """``type: http`` (Marquez's API): events are POSTed to <url>/api/v1/lineage."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[tuple[str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        em = LineageEmitter.from_config(_cfg(tmp_path, {"transport": {"type": "http", "url": url}}), "v")
        assert em is not None
        em.start()
        em.finish(True)
        em.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [p for p, _ in received] == ["/api/v1/lineage", "/api/v1/lineage"]
    assert [e["eventType"] for _, e in received] == ["START", "COMPLETE"]
    for _, e in received:
        validate(e)


def test_console_transport_logs_the_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    em = LineageEmitter.from_config(_cfg(tmp_path, {"transport": {"type": "console"}}), "v")
    assert em is not None
    with caplog.at_level("INFO", logger="openlineage.client.transport.console"):
        em.start()
        em.close()
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "openlineage.client.transport.console"]
    assert [e["eventType"] for e in events] == ["START"]
    validate(events[0])
