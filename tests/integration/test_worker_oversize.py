"""Issue 12.1, reproduced at worker level with the shipped example's settings: a value
over librdkafka's message.max.bytes, a 5 MB value and a *valid* record with a 1 MiB key
used to make the worker exit 1 at every start (the producer refused the dead letter).
Now each is dead-lettered as ``oversized`` -- within the record limit -- and the
partition moves on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from streamproc.errors import Reason
from streamproc.runtime.dlq import H_DLQ_REASON
from streamproc.runtime.limits import KAFKA_MAX_MESSAGE_BYTES, LIBRDKAFKA_MESSAGE_MAX_BYTES
from tests.integration.conftest import (
    WorkerProcess,
    make_workspace,
    open_dead_letters,
    produce_events,
    read_topics,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "streamproc.yaml").read_text())


def _produce_big(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> dict[int, bytes]:
    """Produce records larger than librdkafka's default limit; offset -> key."""
    p = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 8_000_000, "linger.ms": 0}
    )
    where: dict[int, bytes] = {}
    errors: list[str] = []

    def cb(key: bytes) -> Any:
        def done(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err.name())
            else:
                where[msg.offset()] = key

        return done

    for key, value in items:
        p.produce(topic, key=key, value=value, partition=0, on_delivery=cb(key))
    assert p.flush(60) == 0 and not errors, errors
    return where


def test_oversized_records_are_dead_lettered_not_fatal_with_the_example_defaults(
    tmp_path: Path, kafka_bootstrap: str, unique: str, workers: list[WorkerProcess]
) -> None:
    from streamproc.runtime.topics import apply_topics

    assert "max_record_bytes" not in EXAMPLE, "the example must keep the derived limit"
    ws = make_workspace(
        tmp_path / "ws",
        kafka_bootstrap,
        unique,
        sources=("orders",),
        partitions=1,
        extra={
            "consumer": EXAMPLE.get("consumer") or {},
            "producer": EXAMPLE.get("producer") or {},
            "batch": EXAMPLE["batch"],
            # The source accepts 8 MB records (as a topic may); the destinations and the
            # DLQ keep the broker's default limit.
            "topics": {
                "defaults": {"partitions": 1, "replication_factor": 1},
                "overrides": {f"orders-{unique}": {"config": {"max.message.bytes": "8388608"}}},
            },
        },
    )
    apply_topics(ws.load_config())
    from streamproc.client.generator import EventGenerator

    valid = ws.sealer("orders").seal(EventGenerator(9).order())
    before = produce_events(ws, "orders", 10, seed=41)
    big_key = b"customer-" + os.urandom(1 << 20)
    big = _produce_big(
        ws.bootstrap,
        ws.topic("orders"),
        [
            (b"k-1020000", os.urandom(1_020_000)),  # garbage, just over message.max.bytes
            (b"k-5mb", os.urandom(5_000_000)),
            (big_key, valid),  # a valid record, but its key alone is 1 MiB
        ],
    )
    after = produce_events(ws, "orders", 10, seed=42)
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned()
    dest, dlq = ws.dest("orders", "analytics"), ws.dlq("orders")
    out = read_topics(
        ws.bootstrap,
        [dest, dlq],
        until=lambda r: len(r[dest]) >= 20 and len(r[dlq]) >= 3,
        timeout=90,
    )
    assert w.alive(), w.log()[-3000:]
    assert {r.source[2] for r in out[dest]} == {
        o for _, o in [*before.records, *after.records]
    }, "good records before and after the big ones were all processed"
    assert len(out[dlq]) == 3
    # Every record produced fits what the producer and a default topic accept.
    limit = min(LIBRDKAFKA_MESSAGE_MAX_BYTES, KAFKA_MAX_MESSAGE_BYTES)
    for r in [*out[dlq], *out[dest]]:
        size = len(r.key or b"") + len(r.value or b"") + sum(
            len(k) + len(v or b"") for k, v in r.headers
        )
        assert size < limit
    assert {r.header(H_DLQ_REASON) for r in out[dlq]} == {Reason.OVERSIZED.value}
    opened = {d.offset: d for d in open_dead_letters(ws, out[dlq])}
    assert set(opened) == set(big)
    by_key = {key[:16]: opened[off] for off, key in big.items()}
    garbage = by_key[b"k-1020000"]
    assert garbage.truncated and garbage.value_length == 1_020_000 and garbage.key == b"k-1020000"
    assert by_key[b"k-5mb"].truncated and by_key[b"k-5mb"].value_length == 5_000_000
    keyed = by_key[big_key[:16]]
    # Even key and headers would not fit: a reference (lengths and digests only).
    assert keyed.reference and keyed.key is None and keyed.key_length == len(big_key)
    assert "bytes > limit" in keyed.detail
    events = w.log_events()
    assert any(e.get("message", "").startswith("record limit") for e in events)
    w.terminate()
    assert w.wait(30) == 0


def test_an_output_a_transform_made_too_large_is_dead_lettered(
    workspace_factory: Any, workers: list[WorkerProcess]
) -> None:
    """The input fits the limit; its sanitized output (provenance headers, the audience's
    envelope) does not: the input is dead-lettered, none of its outputs is written."""
    from streamproc.client.generator import EventGenerator
    from tests.integration.conftest import produce_raw

    limit = 20_000
    ws = workspace_factory(sources=("orders",), partitions=1, max_record_bytes=limit)
    sealer = ws.sealer("orders")
    order = EventGenerator(5).order()
    key = b"k-grown"
    # Size the input to 40 bytes under the limit (record framing: 36 bytes, no headers).
    for pad in range(limit, 0, -1):
        order["order_id"] = "o" * pad
        value = sealer.seal(order)
        if 36 + len(key) + len(value) <= limit - 40:
            break
    assert 36 + len(key) + len(value) > limit - 200
    before = produce_events(ws, "orders", 5, seed=51)
    grown = produce_raw(ws.bootstrap, ws.topic("orders"), [(key, value, "grown")])
    after = produce_events(ws, "orders", 5, seed=52)
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned()
    dests, dlq = ws.destinations(), ws.dlq("orders")
    out = read_topics(
        ws.bootstrap,
        [*dests, dlq],
        until=lambda r: all(len(r[d]) >= 10 for d in dests) and len(r[dlq]) >= 1,
        timeout=60,
    )
    assert w.alive(), w.log()[-3000:]
    [(part, off)] = grown.records
    for d in dests:  # all or nothing: no destination got the grown record
        assert sorted(r.source[2] for r in out[d]) == sorted(
            o for _, o in [*before.records, *after.records]
        )
        assert off not in {r.source[2] for r in out[d]}
    [dead] = open_dead_letters(ws, out[dlq])
    assert (dead.partition, dead.offset, dead.reason) == (part, off, Reason.OVERSIZED.value)
    assert dead.detail.startswith("output for ")
    # The dead letter adds its own envelope and payload framing, so at 40 bytes under the
    # limit the original no longer fits whole: a prefix and the full value's digest.
    assert dead.value is not None and value.startswith(dead.value) and dead.key == key
    assert dead.value_sha256 == hashlib.sha256(value).digest()
    w.terminate()
    assert w.wait(30) == 0
