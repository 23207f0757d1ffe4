"""Bad input on a real broker: every bad record lands in the DLQ, byte for byte, with the
right reason class; the worker stays up and processes the good records around them."""

from __future__ import annotations

import os
from typing import Any

import pytest

from streamproc import __version__
from streamproc.crypto.envelope import Sealer
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import Reason
from streamproc.pipeline.core import (
    H_PROCESSOR,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
)
from streamproc.runtime.dlq import H_DLQ_DETAIL, H_DLQ_REASON
from streamproc.schema.framing import frame
from tests.integration.conftest import WorkerProcess, produce_events, produce_raw, read_topics

pytestmark = pytest.mark.integration

GOOD = 40
LIMIT = 64 * 1024


def _bad_records(ws: Any, tmp_path: Any) -> list[tuple[bytes, bytes, Reason]]:
    """(key, value, expected reason) for every kind of bad input."""
    topic = ws.topic("orders")
    kms = ws.kms()
    from streamproc.client.generator import EventGenerator

    sealer = ws.sealer("orders")
    valid = sealer.seal(EventGenerator(3).order())
    tampered = bytearray(valid)
    tampered[-20] ^= 0x01
    ghost_ring = LocalKeyring.create(tmp_path / "ghost.json")
    ghost_ring.create_key("ghost-kek")
    unknown_kek = Sealer(ghost_ring, "ghost-kek", topic).seal(frame(sealer.schema_id, b"\x00"))
    raw_sealer = Sealer(kms, "orders-kek", topic)
    unknown_schema = raw_sealer.seal(frame(0x0BAD_C0DE, b"\x02\x04ab"))
    garbage_avro = raw_sealer.seal(
        frame(sealer.schema_id, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    )
    not_framed = raw_sealer.seal(b"plain text, no framing")
    wrong_topic = Sealer(kms, "orders-kek", ws.topic("logins")).seal(
        frame(sealer.schema_id, b"\x00")
    )
    oversized = raw_sealer.seal(frame(sealer.schema_id, os.urandom(LIMIT + 1000)))
    return [
        (b"k-random", b"\x07" + os.urandom(200), Reason.UNSUPPORTED_VERSION),
        (b"k-empty", b"", Reason.MALFORMED),
        (b"k-truncated", valid[:30], Reason.MALFORMED),
        (b"k-tampered", bytes(tampered), Reason.TAMPERED),
        (b"k-unknown-kek", unknown_kek, Reason.UNKNOWN_KEY),
        (b"k-unknown-schema", unknown_schema, Reason.UNKNOWN_SCHEMA),
        (b"k-garbage-avro", garbage_avro, Reason.BAD_PAYLOAD),
        (b"k-not-framed", not_framed, Reason.BAD_PAYLOAD),
        (b"k-wrong-topic", wrong_topic, Reason.WRONG_TOPIC),
        (b"k-oversized", oversized, Reason.OVERSIZED),
    ]


@pytest.mark.tansu_smoke
def test_bad_records_go_to_the_dlq_and_the_worker_carries_on(
    workspace_factory: Any, workers: list[WorkerProcess], tmp_path: Any
) -> None:
    ws = workspace_factory(sources=("orders", "logins"), max_record_bytes=LIMIT)
    bad = _bad_records(ws, tmp_path)
    before = produce_events(ws, "orders", GOOD, seed=5)
    trace = [("trace-id", b"t-123"), ("origin", b"integration-test")]
    dl = produce_raw(
        ws.bootstrap, ws.topic("orders"), [(k, v, r) for k, v, r in bad], headers=trace
    )
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned()
    after = produce_events(ws, "orders", GOOD, seed=6)
    expected_good = {**before.records, **after.records}
    dest = ws.dest("orders", "fraud")
    out = read_topics(
        ws.bootstrap,
        [dest, ws.dlq("orders")],
        until=lambda r: len(r[dest]) >= 2 * GOOD and len(r[ws.dlq("orders")]) >= len(bad),
        timeout=60,
    )
    assert w.alive(), w.log()[-3000:]
    assert sorted((r.source[1], r.source[2]) for r in out[dest]) == sorted(expected_good)
    dlq = out[ws.dlq("orders")]
    assert len(dlq) == len(bad), [r.header(H_DLQ_REASON) for r in dlq]
    by_loc = {(r.header(H_SOURCE_PARTITION), r.header(H_SOURCE_OFFSET)): r for r in dlq}
    for (part, off), reason in dl.records.items():
        r = by_loc[(str(part), str(off))]
        assert r.header(H_DLQ_REASON) == reason.value, (r.key, r.header(H_DLQ_DETAIL))
        assert r.key == dl.keys[(part, off)]
        assert r.value == dl.values[(part, off)], "the DLQ must keep the original bytes"
        assert list(r.headers[: len(trace)]) == trace, "original headers come first, untouched"
        assert r.header(H_SOURCE_TOPIC) == ws.topic("orders")
        assert r.header(H_PROCESSOR) == __version__
        detail = r.header(H_DLQ_DETAIL)
        assert detail is not None and len(detail) < 200
    # No bad record produced an output anywhere.
    for t in ws.destinations():
        assert not any(
            r.source[1:] in dl.records
            for r in read_topics(ws.bootstrap, [t], idle=0.3)[t]
            if r.source[0] == ws.topic("orders")
        )
    assert not read_topics(ws.bootstrap, [ws.dlq("logins")], idle=0.3)[ws.dlq("logins")]
    events = w.log_events()
    reasons = {
        e.get("reason") for e in events if e.get("message", "").startswith("record dead-lettered")
    }
    assert reasons == {r.value for _, _, r in bad}
    # Logs name reason classes and offsets, never the bytes.
    log = w.log()
    for _, v, _ in bad:
        if len(v) > 8:
            assert v[8:40].hex() not in log
    w.terminate()
    assert w.wait(30) == 0
