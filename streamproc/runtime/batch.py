"""One consumed batch: its messages, per-partition first/last offsets, and the inputs.

Kept apart from the worker because it is the per-record part of the runtime outside
the pipeline: every loop here runs once per record, so each is a comprehension or a
single pass with ``Message`` methods inlined, and no object is built per record except
the :class:`~streamproc.pipeline.core.InputRecord` the pipeline needs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from confluent_kafka import Message

from streamproc.crypto.envelope import fast_dataclass_constructor
from streamproc.pipeline.core import InputRecord

TP = tuple[str, int]

#: InputRecord(topic, partition, offset, key, value, timestamp_ms, headers) without the
#: frozen-dataclass __init__: the same object in about half the time (once per record).
_new_input = fast_dataclass_constructor(
    InputRecord, ("topic", "partition", "offset", "key", "value", "timestamp_ms", "headers")
)


class Batch:
    """The messages of one ``consume()`` call and, per partition, their offset range."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.first: dict[TP, int] = {}
        self.last: dict[TP, int] = {}
        #: Records per partition (the ``records_consumed`` series).
        self.counts: dict[TP, int] = defaultdict(int)
        first: dict[Any, Any] = self.first  # Message methods are typed Optional
        last: dict[Any, Any] = self.last
        counts: dict[Any, int] = self.counts
        for m in messages:  # per record: Message methods inline, no helper calls
            tp = (m.topic(), m.partition())
            off = m.offset()
            if tp not in first:
                first[tp] = off
            last[tp] = off
            counts[tp] += 1

    def keep_only(self, owned: set[TP]) -> None:
        """Drop records of partitions this worker no longer owns (after a revoke)."""
        if all(tp in owned for tp in self.first):
            return
        self.messages = [m for m in self.messages if (m.topic(), m.partition()) in owned]
        self.first = {tp: o for tp, o in self.first.items() if tp in owned}
        self.last = {tp: o for tp, o in self.last.items() if tp in owned}

    def inputs(self) -> list[InputRecord]:
        """The pipeline's inputs, one per message (timestamps only where Kafka has one)."""
        new = _new_input
        return [
            new(
                m.topic(),
                m.partition(),
                m.offset(),
                m.key(),
                m.value(),
                ts if kind != 0 and ts >= 0 else None,  # 0 = TIMESTAMP_NOT_AVAILABLE
                tuple(h) if (h := m.headers()) else (),
            )
            for m in self.messages
            for kind, ts in (m.timestamp(),)
        ]

    def timestamps_ms(self) -> list[int]:
        """The Kafka timestamps of the batch's records (those that have one)."""
        return [
            ts for kind, ts in (m.timestamp() for m in self.messages) if kind != 0 and ts >= 0
        ]
