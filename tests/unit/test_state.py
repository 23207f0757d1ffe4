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
