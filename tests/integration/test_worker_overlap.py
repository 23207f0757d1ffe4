"""The overlapped commit on a real broker: the two interleavings it adds, forced.

The worker runs in-process with its real producer wrapped, so a test can hold batch N's
``commit_transaction`` until the interleaving under test has happened:

* N aborts after N+1 was processed: N+1 must be discarded (never produced) and both
  redone from N's first offsets -- every source offset ends up in every audience topic
  exactly once (read_committed; on Tansu, which shows aborted records to read_committed
  readers, at least once);
* a second worker joins while N's commit is in flight: the revoke waits for the commit
  before releasing the partitions, and the two workers together still write every source
  offset exactly once (Kafka) / at least once (Tansu).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from streamproc.pipeline.state import UndoLog
from streamproc.runtime.factory import build_pipeline
from streamproc.runtime.watchdog import Watchdog
from streamproc.runtime.worker import Worker
from tests.integration.conftest import (
    Ticker,
    WorkerProcess,
    produce_events,
    read_topics,
    wait_for,
)
from tests.integration.test_worker_transient import RecordingObserver

pytestmark = pytest.mark.integration

HOLD = 30.0  # how long a held commit waits for the interleaving (only reached on failure)


class HeldProducer:
    """The real producer, except that ``commit_transaction`` can be held or failed."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.inner = Producer(conf)
        self.commits = 0
        #: Called before each commit with its number; may block or raise.
        self.before_commit: Any = lambda n: None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit_transaction(self, timeout: float) -> None:
        self.commits += 1
        self.before_commit(self.commits)
        self.inner.commit_transaction(timeout)


class CountingStore:
    """A stateful collaborator on the epoch protocol: counts every source record the
    pipeline processed (an :class:`UndoLog` undoes what uncommitted epochs added).  Once
    the worker stopped, each record must have been counted exactly once, however often
    it was processed: what the privacy budget relies on."""

    topic = "unused"
    partitioned = False  # takes part in the epochs only (no changelog topic to restore)

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}
        self.undo: UndoLog[tuple[int, int], int] = UndoLog(self._put)
        self.rolled_back: list[list[int]] = []  # the open epochs at each rollback

    def _put(self, key: tuple[int, int], old: int | None) -> None:
        if old is None:
            self.counts.pop(key, None)
        else:
            self.counts[key] = old

    def add(self, key: tuple[int, int]) -> None:
        self.undo.touch(key, lambda: self.counts.get(key))
        self.counts[key] = self.counts.get(key, 0) + 1

    def begin(self, epoch: int) -> None:
        self.undo.begin(epoch)

    def committed(self, epoch: int) -> None:
        self.undo.committed(epoch)

    def discard(self, epoch: int) -> None:
        self.undo.discard(epoch)

    def rollback(self) -> None:
        self.rolled_back.append(self.undo.open_epochs)
        self.undo.rollback()

    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        raise AssertionError("not partitioned: never restored")

    def drop(self, partition: int) -> None:
        raise AssertionError("not partitioned: never dropped")


def _check_outputs(ws: Any, produced: set[tuple[int, int]], tansu: bool) -> int:
    dests = ws.destinations()
    out = read_topics(
        ws.bootstrap,
        [*dests, ws.dlq("orders")],
        until=lambda r: all({x.source[1:] for x in r[d]} >= produced for d in dests),
        timeout=90,
        idle=2.0,
    )
    dups = 0
    for d in dests:
        seen = Counter(r.source[1:] for r in out[d])
        assert set(seen) == produced, f"{d}: {len(produced - set(seen))} source offsets missing"
        dups += sum(n - 1 for n in seen.values())
    if not tansu:
        assert dups == 0, f"{dups} duplicates on read_committed"
    assert not out[ws.dlq("orders")]
    return dups


def test_abort_of_n_after_n_plus_1_was_processed_redoes_both(
    workspace_factory: Any, broker_is_tansu: bool
) -> None:
    ws = workspace_factory(sources=("orders",), batch={"max_records": 40, "max_wait_ms": 50})
    produced = set(produce_events(ws, "orders", 400, seed=41).records)
    config = ws.load_config()
    assert config.batch_overlap_commit  # the default
    obs = RecordingObserver()
    held: list[HeldProducer] = []
    failed: list[int] = []

    def factory(conf: dict[str, Any]) -> HeldProducer:
        held.append(HeldProducer(conf))
        return held[-1]

    pipeline = build_pipeline(config, observer=obs)
    store = CountingStore()
    process = pipeline.process

    def counting_process(inputs: Any) -> Any:
        for r in inputs:
            store.add((r.partition, r.offset))
        return process(inputs)

    pipeline.process = counting_process  # type: ignore[method-assign]
    worker = Worker(config, pipeline, instance="abort", observer=obs,
                    producer_factory=factory)  # type: ignore[arg-type]  # fmt: skip
    worker.state.stores.append(store)

    def before_commit(n: int) -> None:
        if n != 2:
            return
        # Batch 2's commit: hold it until batch 3 was processed behind it, then fail it
        # with an abortable error (the transaction is then really aborted on the broker).
        wait_for(lambda: len(obs.of("batch_processed")) >= 3, HOLD, what="N+1 processed")
        failed.append(len(obs.of("batch_processed")))
        raise KafkaException(KafkaError(KafkaError._STATE, "test", txn_requires_abort=True))

    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    try:
        t.start()
        wait_for(lambda: bool(held), 30, what="producer")
        held[0].before_commit = before_commit
        wait_for(lambda: worker.records_committed >= len(produced), 90, what="all committed")
    finally:
        worker.stop()
        t.join(60)
    assert rc == [0]
    assert failed == [3]  # batch 2 aborted once batch 3 had been processed
    assert worker.aborts == 1 and obs.of("transaction").count(("aborted",)) == 1
    # Batch 3 was processed, never committed on its own: it was redone after the abort.
    assert worker.records_committed == len(produced)
    # The abort rolled the state back over both batches (N and N+1), and what stayed
    # counts every record exactly once although batches 2 and 3 were processed twice.
    assert store.rolled_back == [[2, 3]]
    assert store.counts == dict.fromkeys(produced, 1)
    assert store.undo.open_epochs == []  # drained: nothing left uncommitted
    dups = _check_outputs(ws, produced, broker_is_tansu)
    print(f"\n[overlap abort] tansu={broker_is_tansu} produced={len(produced)} duplicates={dups}")


def test_a_revoke_during_a_commit_in_flight_waits_for_it(
    workspace_factory: Any, workers: list[WorkerProcess], broker_is_tansu: bool
) -> None:
    ws = workspace_factory(sources=("orders",), batch={"max_records": 50, "max_wait_ms": 50})
    ticker = Ticker(ws, "orders", total=1500, rate=150).start()
    config = ws.load_config()
    obs = RecordingObserver()
    held: list[HeldProducer] = []

    def factory(conf: dict[str, Any]) -> HeldProducer:
        held.append(HeldProducer(conf))
        return held[-1]

    settling = threading.Event()

    class SettleSignal(Watchdog):
        """Consulted by a thread waiting for the commit in flight: the loop's settle."""

        def overdue(self) -> str | None:
            settling.set()
            return super().overdue()

    worker = Worker(config, build_pipeline(config, observer=obs), instance="w1", observer=obs,
                    producer_factory=factory, watchdog=SettleSignal())  # type: ignore[arg-type]  # fmt: skip
    events: list[str] = []
    revoking = threading.Event()
    armed = threading.Event()

    def before_commit(n: int) -> None:
        # While armed, hold each commit while the loop is busy elsewhere (in consume(),
        # where rebalances are served) until a revoke starts; let it go when the loop
        # waits for it (settle), to hold the next one: a revoke then finds it in flight.
        if not armed.is_set():
            return
        settling.clear()
        deadline = time.monotonic() + HOLD
        while not revoking.is_set() and not settling.is_set() and time.monotonic() < deadline:
            revoking.wait(0.02)

    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    try:
        t.start()
        wait_for(lambda: bool(obs.of("assignment")) and worker.committer is not None, 60,
                 what="w1 assigned")  # fmt: skip
        original = worker.assignment.before_release

        def before_release(gone: set[tuple[str, int]]) -> None:
            job = worker.committer.in_flight if worker.committer is not None else None
            busy = job is not None and not job.done.is_set()
            events.append("revoke started, commit in flight" if busy else "revoke started")
            revoking.set()
            armed.clear()
            original(gone)
            if busy:
                assert job is not None
                events.append("commit done" if job.done.is_set() else "commit still in flight")
            events.append("revoke released the partitions")

        worker.assignment.before_release = before_release
        held[0].before_commit = before_commit
        wait_for(lambda: worker.records_committed >= 100, 60, what="w1 progress")
        armed.set()
        w2 = WorkerProcess(ws, "--instance", "w2", name="w2")
        workers.append(w2)
        wait_for(lambda: "revoke released the partitions" in events, 90, what="the revoke")
        produced = set(ticker.join(timeout=60).records)
        wait_for(lambda: w2.alive(), 5, what="w2 alive")
    finally:
        worker.stop()
        t.join(60)
    assert rc == [0]
    # The revoke that found a commit in flight waited for it before releasing anything.
    assert "revoke started, commit in flight" in events, events
    i = events.index("revoke started, commit in flight")
    assert events[i : i + 3] == [
        "revoke started, commit in flight",
        "commit done",
        "revoke released the partitions",
    ], events
    dups = _check_outputs(ws, produced, broker_is_tansu)
    w2.terminate()
    assert w2.wait(30) == 0
    print(f"\n[overlap revoke] tansu={broker_is_tansu} produced={len(produced)} duplicates={dups}")
