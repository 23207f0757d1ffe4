"""The tools around the worker on a real broker: ``topics apply``, ``produce``/``consume``
(JSON lines round trip) and the confluent-kafka serializer adapters."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from streamproc.cli.consume import consume
from streamproc.cli.produce import produce
from streamproc.cli.topics import topics
from streamproc.runtime.topics import apply_topics
from tests.integration.conftest import produce_events

pytestmark = pytest.mark.integration


def test_topics_apply_is_idempotent(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=2)  # the factory applied once
    config = ws.load_config()
    again = apply_topics(config)
    assert [r.topic for r in again] == config.all_topics()
    assert {r.status for r in again} == {"exists"}
    assert all(r.partitions == 2 for r in again)
    res = CliRunner().invoke(topics, ["apply", "--config", str(ws.config_path)])
    assert res.exit_code == 0, res.output
    assert res.output.count("exists") == len(config.all_topics())
    assert ws.dlq("orders") in res.output


def test_topics_apply_creates_with_overrides(
    tmp_path: Any, kafka_bootstrap: str, unique: str
) -> None:
    from confluent_kafka.admin import AdminClient

    from tests.integration.conftest import make_workspace

    ws = make_workspace(
        tmp_path / "ws",
        kafka_bootstrap,
        unique,
        sources=("orders",),
        partitions=2,
        extra={
            "topics": {
                "defaults": {"partitions": 2, "replication_factor": 1},
                "overrides": {f"orders.dlq-{unique}": {"partitions": 1}},
            }
        },
    )
    res = CliRunner().invoke(topics, ["apply", "--config", str(ws.config_path)])
    assert res.exit_code == 0, res.output
    assert res.output.count("created") == 5  # source, 3 destinations, DLQ
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert len(md[ws.dlq("orders")].partitions) == 1
    assert len(md[ws.topic("orders")].partitions) == 2


def test_produce_consume_jsonl_round_trip(workspace_factory: Any, tmp_path: Any) -> None:
    """consume prints ISO dates and base64; produce --from-jsonl accepts them back.

    Reading the source topic is an (audited) incident-response read.
    """
    ws = workspace_factory(
        sources=("orders",), partitions=1, extra={"audit": {"file": str(tmp_path / "audit.jsonl")}}
    )
    produce_events(ws, "orders", 5, seed=41)
    runner = CliRunner()
    args = [
        "--config",
        str(ws.config_path),
        "--topic",
        ws.topic("orders"),
        "--from-beginning",
        "--timeout",
        "3",
        "--incident-response",
        "--reason",
        "TEST-1",
    ]
    first = runner.invoke(consume, args)
    assert first.exit_code == 0, first.output
    lines = [json.loads(x) for x in first.stdout.splitlines()]
    assert len(lines) == 5 and all("error" not in x for x in lines)
    assert isinstance(lines[0]["value"]["birth_date"], str)  # ISO date
    jsonl = tmp_path / "orders.jsonl"
    jsonl.write_text("".join(json.dumps(x["value"]) + "\n" for x in lines))
    res = runner.invoke(
        produce,
        ["--config", str(ws.config_path), "--topic", ws.topic("orders"), "--schema",
         str(ws.schemas / "order.avsc"), "--kek", "orders-kek", "--from-jsonl", str(jsonl)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    second = runner.invoke(consume, args)
    again = [json.loads(x) for x in second.stdout.splitlines()]
    assert len(again) == 10
    assert [x["value"] for x in again[5:]] == [x["value"] for x in lines]
    assert [x["key"] for x in again[5:]] == [x["value"]["customer_id"] for x in lines]


def test_consume_reports_unopenable_records_without_their_bytes(workspace_factory: Any) -> None:
    from tests.integration.conftest import produce_raw

    ws = workspace_factory(sources=("orders",), partitions=1)
    dest = ws.dest("orders", "analytics")
    produce_raw(ws.bootstrap, dest, [(b"k", b"\x01" + b"S" * 80, None)], [("streamproc.prov", b"f=1;a=analytics;p=sha256:0")])
    res = CliRunner().invoke(
        consume,
        [
            "--config",
            str(ws.config_path),
            "--topic",
            dest,
            "--from-beginning",
            "--timeout",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout.splitlines()[0])
    assert line["error"] == "malformed_envelope" and "value" not in line
    assert "SSSS" not in res.output


def test_serializer_adapters_with_confluent_kafka(workspace_factory: Any) -> None:
    from confluent_kafka import DeserializingConsumer, SerializingProducer
    from confluent_kafka.serialization import (
        MessageField,
        SerializationContext,
        SerializationError,
        StringDeserializer,
        StringSerializer,
    )

    from streamproc.client.generator import EventGenerator
    from streamproc.client.kafka import OpeningDeserializer, SealingSerializer

    ws = workspace_factory(sources=("orders",), partitions=1)
    topic = ws.topic("orders")
    ser = SealingSerializer(ws.sealer("orders"))
    with pytest.raises(SerializationError, match="binds the topic"):
        ser({"x": 1}, SerializationContext("elsewhere", MessageField.VALUE))
    with pytest.raises(SerializationError, match="does not match the schema"):
        ser({"order_id": 1}, SerializationContext(topic, MessageField.VALUE))
    assert ser(None, SerializationContext(topic, MessageField.VALUE)) is None
    prod = SerializingProducer(
        {
            "bootstrap.servers": ws.bootstrap,
            "key.serializer": StringSerializer(),
            "value.serializer": ser,
        }
    )
    orders = list(EventGenerator(51).events("order", 3))
    for o in orders:
        prod.produce(topic, key=o["customer_id"], value=o)
    assert prod.flush(30) == 0
    cons = DeserializingConsumer(
        {
            "bootstrap.servers": ws.bootstrap,
            "group.id": f"ser-{ws.suffix}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "key.deserializer": StringDeserializer(),
            "value.deserializer": OpeningDeserializer(ws.opener()),
        }
    )
    cons.subscribe([topic])
    got = []
    try:
        while len(got) < 3:
            m = cons.poll(15)
            assert m is not None, "timed out"
            got.append(m)
    finally:
        cons.close()
    assert [m.key() for m in got] == [o["customer_id"] for o in orders]
    assert [m.value()["order_id"] for m in got] == [o["order_id"] for o in orders]
    des = OpeningDeserializer(ws.opener())
    with pytest.raises(SerializationError, match=r"tampered|malformed"):
        des(b"\x01" + b"\x00" * 60, SerializationContext(topic, MessageField.VALUE))


def test_produce_bad_line_after_good_ones_delivers_them_and_exits_65(workspace_factory: Any, tmp_path: Any) -> None:
    """Records before the bad line are delivered and counted; the bad value is never echoed."""
    from streamproc.client.generator import EventGenerator
    from tests.integration.conftest import read_topics

    ws = workspace_factory(sources=("orders",), partitions=1)
    gen = EventGenerator(9)
    good = [gen.order() for _ in range(3)]
    lines = [json.dumps(r, default=str) for r in good]
    bad = {**good[0], "birth_date": "CANARY-31-02-1990"}
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join([*lines, json.dumps(bad, default=str), *lines]) + "\n")
    res = CliRunner().invoke(
        produce,
        ["--config", str(ws.config_path), "--topic", ws.topic("orders"), "--schema",
         str(ws.schemas / "order.avsc"), "--kek", "orders-kek", "--from-jsonl", str(jsonl)],
    )  # fmt: skip
    assert res.exit_code == 65, res.output
    assert "line 4: field birth_date: not an ISO-8601 date" in res.output
    assert "(3 earlier record(s) produced)" in res.output and "CANARY" not in res.output
    got = read_topics(ws.bootstrap, [ws.topic("orders")], until=lambda r: len(r[ws.topic("orders")]) >= 3)
    assert len(got[ws.topic("orders")]) == 3  # the lines after the bad one were not produced
