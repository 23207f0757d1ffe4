"""State in the transaction: the epoch protocol, changelog writes through the checkpoint,
restore on assignment and drop on revocation (streamproc.pipeline.state and
streamproc.runtime.state), with the scripted fake producer of ``test_checkpoint``.

The store used here is a small keyed counter written the way a real store is (an
:class:`UndoLog` saving previous values, a :class:`StateWrite` per changed key): the
tests check the protocol the worker relies on, whatever the store counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from streamproc.errors import ConfigError
from streamproc.pipeline.state import StateWrite, UndoLog
from streamproc.runtime import checkpoint as cp
from streamproc.runtime.state import StateStores, StateUnavailable, with_state
from tests.unit.test_checkpoint import ABORTABLE, FakeConsumer, FakeProducer, Out

TOPIC = "app.counts-changelog"


class CounterStore:
    """Counts per (partition, key); every change is a changelog write for that partition."""

    topic = TOPIC

    def __init__(self) -> None:
        self.counts: dict[tuple[int, bytes], int] = {}
        self.dirty: set[tuple[int, bytes]] = set()
        self.undo: UndoLog[tuple[int, bytes], int] = UndoLog(self._put)
        self.dropped: list[int] = []

    def _put(self, k: tuple[int, bytes], v: int | None) -> None:
        if v is None:
            self.counts.pop(k, None)
        else:
            self.counts[k] = v

    def add(self, partition: int, key: bytes) -> None:
        k = (partition, key)
        self.undo.touch(k, lambda: self.counts.get(k))
        self.counts[k] = self.counts.get(k, 0) + 1
        self.dirty.add(k)

    def writes(self) -> list[StateWrite]:
        out = [StateWrite(TOPIC, p, key, str(self.counts[(p, key)]).encode()) for p, key in sorted(self.dirty)]
        self.dirty.clear()
        return out

    # the epoch protocol
    def begin(self, epoch: int) -> None:
        self.undo.begin(epoch)

    def committed(self, epoch: int) -> None:
        self.undo.committed(epoch)

    def discard(self, epoch: int) -> None:
        self.dirty.clear()
        self.undo.discard(epoch)

    def rollback(self) -> None:
        self.dirty.clear()
        self.undo.rollback()

    # the changelog
    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        self._put((partition, key), None if value is None else int(value))

    def drop(self, partition: int) -> None:
        self.dropped.append(partition)
        for k in [k for k in self.counts if k[0] == partition]:
            del self.counts[k]


class FakeReader:
    """A changelog held in memory: records per partition, in offset order."""

    def __init__(self, log: dict[int, list[tuple[bytes, bytes | None]]]) -> None:
        self.log = log
        self.reads: list[tuple[str, list[int]]] = []
        self.fail = False

    def read(
        self, topic: str, partitions: Sequence[int], apply: Callable[[int, bytes, bytes | None], None], timeout: float
    ) -> int:
        self.reads.append((topic, list(partitions)))
        if self.fail:
            raise StateUnavailable("not read to the end")
        n = 0
        for p in partitions:
            for key, value in self.log.get(p, []):
                apply(p, key, value)
                n += 1
        return n

    def close(self) -> None:
        pass


class PartitionProducer(FakeProducer):
    """The fake producer, also recording the partition each record was produced to."""

    def __init__(self, **script: Any) -> None:
        super().__init__(**script)
        self.partitions: list[int | None] = []

    def produce(self, topic: str, value: Any = None, key: Any = None, **kw: Any) -> None:
        super().produce(topic, value, key, **kw)
        self.partitions.append(kw.get("partition"))


def test_undo_log_discards_one_epoch_and_rolls_back_every_open_one() -> None:
    s = CounterStore()
    s.begin(1)
    s.add(0, b"a")
    s.add(0, b"a")
    s.committed(1)
    s.begin(2)
    s.add(0, b"a")
    s.add(0, b"b")
    s.discard(2)  # a transient failure: batch 2's attempt is undone alone
    assert s.counts == {(0, b"a"): 2}
    s.begin(3)
    s.add(0, b"a")
    s.begin(4)  # pipelined: batch 4 begins while 3's commit is in flight
    s.add(0, b"a")
    s.add(1, b"c")
    s.rollback()  # 3 aborted: 3 and 4 are redone from the last committed state
    assert s.counts == {(0, b"a"): 2}
    s.begin(5)
    s.add(0, b"a")
    s.begin(6)
    s.add(0, b"a")
    s.committed(5)
    s.rollback()  # 6 aborted after 5 committed: 5 stays
    assert s.counts == {(0, b"a"): 3}
    with pytest.raises(ValueError, match="does not follow"):
        s.begin(6)
        s.begin(6)


def test_changelog_writes_commit_in_the_transaction_on_their_partition() -> None:
    store = CounterStore()
    states = StateStores([store], lambda: FakeReader({}))
    producer = PartitionProducer()
    ck = cp.TransactionalCheckpoint(producer, FakeConsumer(), delay=lambda a: 0)
    epoch = states.begin()
    store.add(3, b"k")
    outputs = [Out("out", b"x", b"v")]
    ck.commit(with_state(outputs, store.writes()), {("in", 3): 9}, {("in", 3)})
    states.committed(epoch)
    # produced inside the transaction, before the offsets and the commit
    assert producer.calls == [
        "begin_transaction", "produce", "produce", "send_offsets_to_transaction", "commit_transaction",
    ]  # fmt: skip
    assert producer.produced[1] == (TOPIC, b"k", b"1")
    assert producer.partitions == [None, 3]  # the output by the partitioner, the write on 3


def test_an_aborted_transaction_rolls_the_state_back_and_the_redo_charges_once() -> None:
    store = CounterStore()
    states = StateStores([store], lambda: FakeReader({}))
    producer = PartitionProducer(commit_transaction=[ABORTABLE()])
    ck = cp.TransactionalCheckpoint(producer, FakeConsumer(), delay=lambda a: 0)

    def batch() -> None:
        epoch = states.begin()
        store.add(0, b"k")
        try:
            ck.commit(with_state([], store.writes()), {("in", 0): 0}, {("in", 0)})
        except cp.Aborted:
            states.rollback()
            raise
        states.committed(epoch)

    with pytest.raises(cp.Aborted):
        batch()
    assert "abort_transaction" in producer.calls
    assert store.counts == {}  # back to the committed state
    batch()  # redone
    assert store.counts == {(0, b"k"): 1}
    assert [v for t, _, v in producer.produced if t == TOPIC] == [b"1", b"1"]


def test_assignment_restores_once_before_processing_and_revocation_drops() -> None:
    store = CounterStore()
    reader = FakeReader({0: [(b"a", b"4"), (b"b", b"1"), (b"b", None)], 1: [(b"c", b"2")]})
    states = StateStores([store], lambda: reader)
    states.assigned({("in", 0), ("other", 0), ("in", 1)})
    assert store.counts == {}  # nothing read inside the rebalance callback
    states.restore_pending()
    assert reader.reads == [(TOPIC, [0, 1])]
    assert store.counts == {(0, b"a"): 4, (1, b"c"): 2}  # the last record per key wins
    states.restore_pending()
    states.assigned({("in", 1)})  # already held: not read again
    states.restore_pending()
    assert len(reader.reads) == 1
    # partition number 0 is still owned through "other": kept
    states.released({("other", 0), ("in", 1)})
    assert store.dropped == []
    states.released({("in", 1)})
    assert store.dropped == [0] and store.counts == {(1, b"c"): 2}
    states.assigned({("in", 0)})  # back: restored again (another owner may have written)
    states.restore_pending()
    assert reader.reads[-1] == (TOPIC, [0]) and store.counts[(0, b"a")] == 4


def test_a_changelog_not_read_to_its_end_stops_processing() -> None:
    store = CounterStore()
    reader = FakeReader({})
    reader.fail = True
    states = StateStores([store], lambda: reader)
    states.assigned({("in", 0)})
    with pytest.raises(StateUnavailable):
        states.restore_pending()
    assert states.pending == {0}  # still owed: never processed as if restored


def test_without_stores_nothing_changes() -> None:
    states = StateStores([])
    assert not states
    states.assigned({("in", 0)})
    states.restore_pending()
    assert states.pending == set()
    records: list[Any] = [Out("out", None, b"v")]
    assert with_state(records, []) is records
    with pytest.raises(ValueError):
        StateStores([CounterStore()])


class FakeMsg:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None, eof: bool = False) -> None:
        self._p, self._o, self._k, self._v, self._eof = partition, offset, key, value, eof

    def error(self) -> Any:
        if not self._eof:
            return None
        from confluent_kafka import KafkaError

        return KafkaError(KafkaError._PARTITION_EOF)

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v


class FakeChangelogConsumer:
    """A changelog as a read_committed consumer sees it.  ``logs[p]`` is a list of polls:
    the records each poll makes visible (the first poll stops at the last stable offset;
    a transaction that resolves later shows its records on a later poll), every poll
    ends with EOF; ``high[p]`` is the high watermark when the read starts (the pending
    records and the commit marker included)."""

    def __init__(
        self, partitions: int, logs: dict[int, list[list[tuple[bytes, bytes | None]]]], high: dict[int, int]
    ) -> None:
        self.partitions, self.logs, self.high = partitions, logs, high
        self.positions: dict[int, int] = {}
        self.assigned: list[int] = []
        self.polls = 0

    def list_topics(self, topic: str, timeout: float) -> Any:
        from types import SimpleNamespace

        meta = SimpleNamespace(error=None, partitions={p: None for p in range(self.partitions)})
        return SimpleNamespace(topics={topic: meta})

    def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, self.high.get(tp.partition, 0)

    def assign(self, tps: list[Any]) -> None:
        self.assigned = [tp.partition for tp in tps]
        self.positions = dict.fromkeys(self.assigned, 0)

    def consume(self, n: int, timeout: float) -> list[FakeMsg]:
        out = []
        for p in self.assigned:
            polls = self.logs.get(p, [])
            if self.polls < len(polls):
                for key, value in polls[self.polls]:
                    out.append(FakeMsg(p, self.positions[p], key, value))
                    self.positions[p] += 1
                if self.polls == len(polls) - 1:
                    self.positions[p] = self.high[p]  # past the last commit marker
            out.append(FakeMsg(p, self.positions[p], None, None, eof=True))
        self.polls += 1
        return out

    def position(self, tps: list[Any]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(tp.topic, tp.partition, self.positions[tp.partition]) for tp in tps]

    def unassign(self) -> None:
        self.assigned = []

    def close(self) -> None:
        pass


def test_the_kafka_reader_reads_to_the_high_watermark_not_the_first_eof() -> None:
    """The first EOF comes at the last stable offset, before a transaction that commits a
    moment later: a restore that stopped there would miss its state (a spent budget
    restored as unspent).  The reader reads on until its position reaches the high
    watermark taken at the start."""
    from streamproc.runtime.state import KafkaChangelogReader

    fake = FakeChangelogConsumer(2, {1: [[(b"a", b"1"), (b"a", b"2")], [(b"a", b"3")]]}, {0: 0, 1: 5})
    reader = KafkaChangelogReader({}, group_prefix="g", consumer_factory=lambda conf: fake)
    got: dict[tuple[int, bytes], bytes | None] = {}
    n = reader.read(TOPIC, [0, 1], lambda p, k, v: got.__setitem__((p, k), v), timeout=5)
    assert n == 3 and got == {(1, b"a"): b"3"}
    assert fake.assigned == []  # unassigned afterwards


def test_the_kafka_reader_refuses_a_changelog_with_too_few_partitions_or_bad_state() -> None:
    from streamproc.runtime.state import KafkaChangelogReader

    fake = FakeChangelogConsumer(1, {}, {})
    reader = KafkaChangelogReader({}, group_prefix="g", consumer_factory=lambda conf: fake)
    with pytest.raises(ConfigError, match="input partition 2 needs"):
        reader.read(TOPIC, [0, 2], lambda p, k, v: None, timeout=5)
    fake = FakeChangelogConsumer(1, {0: [[(b"k", b"junk")]]}, {0: 2})
    reader = KafkaChangelogReader({}, group_prefix="g", consumer_factory=lambda conf: fake)

    def bad(p: int, k: bytes, v: bytes | None) -> None:
        raise ValueError("budget state too short")

    with pytest.raises(StateUnavailable, match="offset 0: unreadable state"):
        reader.read(TOPIC, [0], bad, timeout=5)
