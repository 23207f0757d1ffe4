"""streamproc.runtime.batch: offsets per partition, owned-only filtering, and the inputs
the pipeline gets (a Kafka timestamp only where the record has one)."""

from __future__ import annotations

from streamproc.pipeline.core import InputRecord
from streamproc.runtime.batch import Batch
from tests.unit.worker_fakes import msg


def interleaved() -> Batch:
    return Batch(
        [
            msg("orders", 0, 10),
            msg("logins", 2, 5),
            msg("orders", 0, 11),
            msg("orders", 1, 70),
            msg("orders", 0, 14),  # gaps (transaction markers, compaction) are fine
        ]
    )


def test_first_last_and_counts_per_partition() -> None:
    b = interleaved()
    assert b.first == {("orders", 0): 10, ("logins", 2): 5, ("orders", 1): 70}
    assert b.last == {("orders", 0): 14, ("logins", 2): 5, ("orders", 1): 70}
    assert dict(b.counts) == {("orders", 0): 3, ("logins", 2): 1, ("orders", 1): 1}


def test_keep_only_drops_partitions_no_longer_owned() -> None:
    b = interleaved()
    before = b.messages
    b.keep_only({("orders", 0), ("orders", 1), ("logins", 2), ("other", 0)})
    assert b.messages is before  # nothing to drop: no copy
    b.keep_only({("orders", 0)})
    assert [(m.topic(), m.partition(), m.offset()) for m in b.messages] == [
        ("orders", 0, 10), ("orders", 0, 11), ("orders", 0, 14),
    ]  # fmt: skip
    assert b.first == {("orders", 0): 10} and b.last == {("orders", 0): 14}
    b.keep_only(set())
    assert b.messages == [] and b.first == {} and b.last == {}


def test_inputs_carry_every_field_and_only_real_timestamps() -> None:
    b = Batch(
        [
            msg(
                "orders", 0, 1, key=b"k1", value=b"v1", timestamp=(1, 1_700_000_000_123),
                headers=[("trace", b"t"), ("empty", None)],
            ),
            msg("orders", 0, 2, key=None, value=None, timestamp=(0, 1_700_000_000_000)),  # NOT_AVAILABLE
            msg("orders", 0, 3, timestamp=(2, -1)),  # log-append type without a value
            msg("orders", 0, 4, timestamp=(2, 0)),  # epoch 0 is a real timestamp
        ]
    )
    assert b.inputs() == [
        InputRecord("orders", 0, 1, b"k1", b"v1", 1_700_000_000_123, (("trace", b"t"), ("empty", None))),
        InputRecord("orders", 0, 2, None, None, None, ()),
        InputRecord("orders", 0, 3, b"k", b"v", None, ()),
        InputRecord("orders", 0, 4, b"k", b"v", 0, ()),
    ]
    assert b.timestamps_ms() == [1_700_000_000_123, 0]


def test_inputs_are_real_input_records() -> None:
    (rec,) = Batch([msg("orders", 3, 9)]).inputs()
    assert type(rec) is InputRecord
    assert rec == InputRecord("orders", 3, 9, b"k", b"v", 1_700_000_000_000, ())
    assert hash(rec) == hash(InputRecord("orders", 3, 9, b"k", b"v", 1_700_000_000_000, ()))
