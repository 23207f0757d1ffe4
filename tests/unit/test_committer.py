"""The overlapped commit, interleaving by interleaving, with a fake producer and consumer.

Each test forces one interleaving of the batch loop's thread and the committer thread
with events (never with sleeps or timing assertions): the fake producer's blocking call
waits on a gate the test opens when the interleaving under test has happened.  The rules
are those of ``streamproc.runtime.committer``'s docstring: depth one (nothing of N+1 is
produced before N's commit returned), a rebalance joins the commit in flight, an abort
of N is reported when N is settled (the worker then discards N+1 and rewinds both), a
fatal error stops, and a stuck call turns into ``TransactionStuck``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from streamproc.runtime import checkpoint as cp
from streamproc.runtime.assignment import Assignment
from streamproc.runtime.batch import Batch
from streamproc.runtime.committer import BatchAlreadyInFlight, Committer
from streamproc.runtime.watchdog import Watchdog
from tests.unit.test_checkpoint import (
    ABORTABLE,
    FENCED,
    FakeConsumer,
    FakeProducer,
    Obs,
    Out,
)

GATE_TIMEOUT = 30.0  # only reached if the code under test is broken (then the test fails)


class Msg:
    """Just enough of a confluent_kafka Message for :class:`Batch`."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._t, self._p, self._o = topic, partition, offset

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


def batch(**ranges: tuple[int, int]) -> Batch:
    """``batch(p0=(10, 12))``: records of src[0] at offsets 10, 11, 12."""
    msgs = [
        Msg("src", int(name[1:]), off)
        for name, (lo, hi) in ranges.items()
        for off in range(lo, hi + 1)
    ]
    return Batch(msgs)  # type: ignore[arg-type]


class GatedProducer(FakeProducer):
    """A fake producer whose ``gated`` call blocks until :attr:`gate` opens, and logs
    when each call starts and returns into a log shared with the test."""

    def __init__(self, log: list[str], gated: str = "commit_transaction", **script: Any) -> None:
        super().__init__(**script)
        self.log = log
        self.gated = gated
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _step(self, name: str) -> None:
        if name == self.gated:
            self.log.append(f"{name}:enter")
            self.entered.set()
            assert self.gate.wait(GATE_TIMEOUT), "the test never opened the gate"
        try:
            super()._step(name)
        finally:
            if name == self.gated:
                self.log.append(f"{name}:return")


def eos(producer: FakeProducer, **kw: Any) -> tuple[cp.TransactionalCheckpoint, Obs]:
    obs = Obs()
    c = cp.TransactionalCheckpoint(
        producer, FakeConsumer(), delay=lambda a: 0.0, observer=obs, transactional_id="g-h-0", **kw
    )
    return c, obs


OWNED = {("src", 0), ("src", 1), ("src", 2)}
RECORDS = [Out("out.a", b"k", b"v")]


def wait(event: threading.Event) -> None:
    assert event.wait(GATE_TIMEOUT), "the interleaving under test never happened"


# -- overlap and depth one -------------------------------------------------------------------------
def test_the_commit_of_n_overlaps_the_processing_of_n_plus_1() -> None:
    log: list[str] = []
    p = GatedProducer(log)
    c, obs = eos(p)
    committer = Committer(c, overlap=True)
    n = batch(p0=(10, 19))
    committer.submit(n, "result-N", RECORDS, OWNED)  # returns with N's commit blocked
    wait(p.entered)
    log.append("process N+1")  # the loop's thread works while N's commit waits
    p.gate.set()
    done = committer.settle()
    assert done is not None and done.batch is n and done.result == "result-N"
    assert done.error is None and obs.outcomes == ["committed"]
    assert log == ["commit_transaction:enter", "process N+1", "commit_transaction:return"]
    assert c.committed == {("src", 0): 20} and not c.txn_open
    assert committer.settle() is None  # nothing in flight any more
    committer.close()


def test_nothing_of_n_plus_1_is_produced_before_n_is_settled() -> None:
    log: list[str] = []
    p = GatedProducer(log)
    c, _ = eos(p)
    committer = Committer(c, overlap=True)
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    wait(p.entered)
    calls = list(p.calls)
    with pytest.raises(BatchAlreadyInFlight):
        committer.submit(batch(p0=(20, 29)), None, [Out("out.a", b"k2", b"v2")], OWNED)
    assert p.calls == calls  # no begin_transaction, no produce for N+1
    p.gate.set()
    assert committer.settle() is not None
    committer.submit(batch(p0=(20, 29)), None, [Out("out.a", b"k2", b"v2")], OWNED)
    assert committer.settle() is not None
    # N+1 was begun and produced only after N's commit returned
    assert p.calls.index("produce", p.calls.index("commit_transaction")) > p.calls.index(
        "commit_transaction"
    )
    assert [k for _, k, _ in p.produced] == [b"k", b"k2"]
    assert c.committed == {("src", 0): 30}
    committer.close()


# -- rebalance while a commit is in flight ---------------------------------------------------------
class OpeningWatchdog(Watchdog):
    """Opens ``gate`` the first time a waiting thread consults it: proof that the caller
    is blocked on the commit in flight, at which point the commit may return."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.consulted = 0

    def overdue(self) -> str | None:
        self.consulted += 1
        self.gate.set()
        return super().overdue()


@pytest.mark.parametrize("outcome", ["committed", "aborted"])
def test_a_revoke_waits_for_the_commit_in_flight_before_releasing(outcome: str) -> None:
    log: list[str] = []
    script = {"commit_transaction": [ABORTABLE()]} if outcome == "aborted" else {}
    p = GatedProducer(log, **script)
    c, obs = eos(p)
    dog = OpeningWatchdog(p.gate)
    committer = Committer(c, overlap=True, watchdog=dog, poll=0.001)
    consumer = SeekingConsumer()
    a = Assignment(_NullObserver(), consumer=lambda: consumer, checkpoint=lambda: c)  # type: ignore[arg-type,return-value]
    a.owned = set(OWNED)

    def before_release(gone: set[tuple[str, int]]) -> None:
        log.append("revoke:start")
        committer.release(gone)

    a.before_release = before_release
    n = batch(p0=(10, 19), p1=(5, 9))
    committer.submit(n, None, RECORDS, OWNED)
    wait(p.entered)
    a.on_revoke(None, [TopicPartition("src", 1)])  # type: ignore[arg-type]
    log.append("revoke:released")
    assert dog.consulted >= 1  # the revoke waited on the commit
    assert log == [
        "commit_transaction:enter",
        "revoke:start",
        "commit_transaction:return",
        "revoke:released",
    ]
    assert a.owned == {("src", 0), ("src", 2)}
    assert not c.txn_open  # never released with a transaction open
    done = committer.settle()
    assert done is not None and done.revoked == {("src", 1)}
    if outcome == "committed":
        assert done.error is None and obs.outcomes == ["committed"]
        assert c.committed == {("src", 0): 20}  # src[1] forgotten: the new owner's now
    else:
        assert isinstance(done.error, cp.Aborted) and obs.outcomes == ["aborted"]
        assert p.calls.count("abort_transaction") == 1 and c.committed == {}
    committer.close()


def test_a_revoke_with_nothing_in_flight_does_not_wait() -> None:
    c, _ = eos(FakeProducer())
    dog = OpeningWatchdog(threading.Event())
    committer = Committer(c, overlap=True, watchdog=dog, poll=0.001)
    committer.release({("src", 0)})
    assert dog.consulted == 0


# -- abort of N after N+1 was processed: N+1 is discarded, both are rewound -------------------------
class SeekingConsumer(FakeConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.seeks: list[tuple[str, int, int]] = []

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


class _NullObserver:
    def assignment(self, parts: Any) -> None:
        pass


def assignment_with(owned: set[tuple[str, int]], committed: dict[Any, int] | None = None) -> tuple[Assignment, SeekingConsumer]:
    consumer = SeekingConsumer()
    c, _ = eos(FakeProducer())
    c.committed.update(committed or {})
    a = Assignment(_NullObserver(), consumer=lambda: consumer, checkpoint=lambda: c)  # type: ignore[arg-type,return-value]
    a.owned = set(owned)
    return a, consumer


def test_abort_of_n_rewinds_n_and_n_plus_1_to_ns_first_offsets() -> None:
    a, consumer = assignment_with(OWNED, {("src", 0): 10, ("src", 1): 5})
    n = batch(p0=(10, 19), p1=(5, 9))
    n1 = batch(p0=(20, 29), p2=(3, 7))  # src[2] first appears in N+1
    a.rewind(n, n1)
    assert sorted(consumer.seeks) == [("src", 0, 10), ("src", 1, 5), ("src", 2, 3)]


def test_rewind_skips_partitions_revoked_while_n_was_in_flight() -> None:
    # src[1] was revoked during N's commit and not given back: not ours to seek.
    a, consumer = assignment_with({("src", 0)})
    a.rewind(batch(p0=(10, 19), p1=(5, 9)), batch(p0=(20, 29)), skip={("src", 1)})
    assert consumer.seeks == [("src", 0, 10)]
    # src[1] revoked and given back: the reassignment restarted it at the committed offset
    # (5, N aborted) and N+1 re-read it from there; N's own start is not used for it.
    a, consumer = assignment_with(OWNED)
    a.rewind(batch(p0=(10, 19), p1=(5, 9)), batch(p1=(5, 12)), skip={("src", 1)})
    assert sorted(consumer.seeks) == [("src", 0, 10), ("src", 1, 5)]
    a, consumer = assignment_with(OWNED)
    a.rewind(batch(p1=(5, 9)), None, skip={("src", 1)})
    assert consumer.seeks == []


def test_rewind_behind_a_committed_offset_is_an_invariant_violation() -> None:
    a, _ = assignment_with(OWNED, {("src", 0): 20})  # N committed up to 20, yet rewound to 10
    with pytest.raises(cp.InvariantViolation):
        a.rewind(batch(p0=(10, 19)), batch(p0=(20, 29)))


def test_an_aborted_n_is_settled_with_its_error_and_the_next_batch_can_begin() -> None:
    log: list[str] = []
    p = GatedProducer(log, send_offsets_to_transaction=[ABORTABLE()], gated="send_offsets_to_transaction")
    c, obs = eos(p)
    committer = Committer(c, overlap=True)
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    wait(p.entered)
    p.gate.set()
    done = committer.settle()
    assert done is not None and isinstance(done.error, cp.Aborted)
    assert obs.outcomes == ["aborted"] and c.committed == {} and not c.txn_open
    assert "commit_transaction" not in p.calls
    committer.submit(batch(p0=(10, 29)), None, RECORDS, OWNED)  # redone from N's start
    assert committer.settle().error is None  # type: ignore[union-attr]
    assert c.committed == {("src", 0): 30}
    committer.close()


# -- fencing, stuck calls, shutdown -----------------------------------------------------------------
def test_fencing_in_flight_is_raised_at_settle_without_an_abort() -> None:
    p = FakeProducer(commit_transaction=[FENCED()])
    c, obs = eos(p)
    committer = Committer(c, overlap=True)
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    done = committer.settle()
    assert done is not None and isinstance(done.error, cp.Fenced)
    assert "g-h-0" in str(done.error)
    assert "abort_transaction" not in p.calls and obs.outcomes == [] and c.committed == {}
    committer.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_commit_stuck_past_its_timeout_is_a_named_fatal_error() -> None:
    log: list[str] = []
    p = GatedProducer(log)
    clock = Clock()
    dog = Watchdog(grace=5.0, clock=clock)
    c, _ = eos(p, timeout=10.0, watchdog=dog)
    committer = Committer(c, overlap=True, poll=0.001)
    assert committer.watchdog is dog  # the checkpoint's
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    wait(p.entered)
    try:
        clock.now += 14.0  # inside timeout + grace: still waiting, not stuck
        assert dog.overdue() is None
        clock.now += 2.0
        with pytest.raises(cp.TransactionStuck, match=r"commit_transaction has not returned 15 s"):
            committer.settle()
        with pytest.raises(cp.TransactionStuck):  # a rebalance would not hang either
            committer.release({("src", 0)})
        committer.close()  # logs it and gives up waiting
        committer.release({("src", 0)})  # the consumer's close then leaves the group
    finally:
        p.gate.set()


def test_close_lets_the_commit_in_flight_finish() -> None:
    log: list[str] = []
    p = GatedProducer(log)
    c, obs = eos(p)
    dog = OpeningWatchdog(p.gate)
    committer = Committer(c, overlap=True, watchdog=dog, poll=0.001)
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    committer.close()
    assert log[-1] == "commit_transaction:return" and obs.outcomes == ["committed"]


def test_watchdog_tracks_each_thread_until_its_call_returns() -> None:
    clock = Clock()
    dog = Watchdog(grace=1.0, clock=clock)
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with dog.guard("send_offsets_to_transaction", 2.0):
            inside.set()
            release.wait(GATE_TIMEOUT)

    t = threading.Thread(target=other)
    t.start()
    wait(inside)
    with dog.guard("flush", 10.0):
        clock.now += 3.5
        assert "send_offsets_to_transaction has not returned 3 s" in (dog.overdue() or "")
    release.set()
    t.join()
    assert dog.overdue() is None  # returned calls are forgotten


# -- at least once ---------------------------------------------------------------------------------
def test_at_least_once_flushes_and_commits_on_the_committer_thread() -> None:
    log: list[str] = []
    p = GatedProducer(log, gated="flush")
    original_flush = p.flush

    def flush(timeout: float) -> int:
        p._step("flush")
        return original_flush(timeout)

    p.flush = flush  # type: ignore[method-assign]
    consumer = FakeConsumer()
    threads: list[str] = []
    commit: Callable[..., None] = consumer.commit

    def recording_commit(**kw: Any) -> None:
        threads.append(threading.current_thread().name)
        commit(**kw)

    consumer.commit = recording_commit  # type: ignore[method-assign]
    c = cp.AtLeastOnceCheckpoint(p, consumer, delay=lambda a: 0.0)
    committer = Committer(c, overlap=True)
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    wait(p.entered)
    assert consumer.commits == []  # offsets only after every delivery is confirmed
    log.append("process N+1")
    p.gate.set()
    assert committer.settle().error is None  # type: ignore[union-attr]
    assert consumer.commits == [[("src", 0, 20)]] and threads == ["streamproc-commit"]
    assert log == ["flush:enter", "process N+1", "flush:return"]
    committer.close()


def test_at_least_once_failed_delivery_in_flight_is_an_abort_at_settle() -> None:
    p, consumer = FakeProducer(), FakeConsumer()
    p.deliver_error = cp.KafkaError(cp.KafkaError._MSG_TIMED_OUT)
    c = cp.AtLeastOnceCheckpoint(p, consumer, delay=lambda a: 0.0)
    committer = Committer(c, overlap=True)
    committer.submit(batch(p0=(10, 19)), None, RECORDS, OWNED)
    done = committer.settle()
    assert done is not None and isinstance(done.error, cp.Aborted)
    assert consumer.commits == [] and c.committed == {}
    committer.close()


def test_a_stuck_call_exits_1_with_one_line_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    from streamproc.runtime.exits import EXIT_FATAL, exit_code

    class NoRefusal:  # the AccessGuard's view: no broker refusal behind the error
        error = None

    clock = Clock()
    dog = Watchdog(grace=5.0, clock=clock)
    with dog.guard("send_offsets_to_transaction", 10.0):
        clock.now += 16.0
        what = dog.overdue()
    assert what is not None
    stuck = cp.TransactionStuck(what)
    with caplog.at_level("ERROR", logger="streamproc.runtime.worker"):
        assert exit_code(stuck, NoRefusal()) == EXIT_FATAL  # type: ignore[arg-type]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("fatal TransactionStuck: send_offsets_to_transaction")
