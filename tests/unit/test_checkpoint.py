"""The commit protocol alone: every step's failure with a scripted fake producer/consumer.

Each test scripts what the fake producer or consumer raises at one step and checks the
outcome the protocol promises (module docstring of ``streamproc.runtime.checkpoint``):
retried, aborted and rewound, or fatal -- and what was (not) called on the client.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamproc.runtime import checkpoint as cp


def kerr(
    code: int, *, fatal: bool = False, retriable: bool = False, abortable: bool = False
) -> KafkaException:
    return KafkaException(
        KafkaError(
            code,
            "broker text that must not leak",
            fatal=fatal,
            retriable=retriable,
            txn_requires_abort=abortable,
        )
    )


RETRIABLE = lambda: kerr(KafkaError._TIMED_OUT, retriable=True)  # noqa: E731
ABORTABLE = lambda: kerr(KafkaError._STATE, abortable=True)  # noqa: E731
FENCED = lambda: kerr(KafkaError.PRODUCER_FENCED, abortable=True)  # noqa: E731
FATAL = lambda: kerr(KafkaError._FATAL, fatal=True)  # noqa: E731
DENIED = lambda: kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED)  # noqa: E731


@dataclass
class Out:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


class FakeProducer:
    """Records calls; ``script[name]`` is a list of exceptions to raise, one per call."""

    def __init__(self, **script: list[BaseException | None]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[str] = []
        self.produced: list[tuple[str, Any, Any]] = []
        self.offsets_sent: list[Any] = []
        self.deliver_error: KafkaError | None = None
        self.flush_left: list[int] = []

    def _step(self, name: str) -> None:
        self.calls.append(name)
        queue = self.script.get(name)
        if queue:
            exc = queue.pop(0)
            if exc is not None:
                raise exc

    def init_transactions(self, timeout: float) -> None:
        self._step("init_transactions")

    def begin_transaction(self) -> None:
        self._step("begin_transaction")

    def produce(self, topic: str, value: Any = None, key: Any = None, **kw: Any) -> None:
        self._step("produce")
        self.produced.append((topic, key, value))
        cb = kw.get("on_delivery")
        if cb is not None:
            cb(self.deliver_error, None)

    def poll(self, timeout: float) -> int:
        self.calls.append("poll")
        return 0

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        return self.flush_left.pop(0) if self.flush_left else 0

    def send_offsets_to_transaction(self, offsets: Any, meta: Any, timeout: float) -> None:
        self._step("send_offsets_to_transaction")
        self.offsets_sent.append([(t.topic, t.partition, t.offset) for t in offsets])

    def commit_transaction(self, timeout: float) -> None:
        self._step("commit_transaction")

    def abort_transaction(self, timeout: float) -> None:
        self._step("abort_transaction")


class FakeConsumer:
    def __init__(self, commit_errors: list[BaseException] | None = None) -> None:
        self.commit_errors = list(commit_errors or [])
        self.commits: list[Any] = []

    def consumer_group_metadata(self) -> object:
        return object()

    def commit(self, *, offsets: Any, asynchronous: bool) -> None:
        assert asynchronous is False
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        self.commits.append([(t.topic, t.partition, t.offset) for t in offsets])


class Health:
    def __init__(self) -> None:
        self.events: list[str] = []

    def down(self, attempt: int) -> None:
        self.events.append(f"down{attempt}")

    def ok(self) -> None:
        self.events.append("ok")


class Obs:
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def transaction(self, outcome: str) -> None:
        self.outcomes.append(outcome)


RECORDS = [Out("out.a", b"k1", b"v1"), Out("out.a", b"k2", b"v2"), Out("dlq", None, b"x")]
LAST = {("src", 0): 41, ("src", 1): 7}
OWNED = {("src", 0), ("src", 1)}


def txn(producer: FakeProducer, **kw: Any) -> tuple[cp.TransactionalCheckpoint, Health, Obs]:
    health, obs = Health(), Obs()
    c = cp.TransactionalCheckpoint(
        producer,
        FakeConsumer(),
        delay=lambda a: 0.0,
        health=health,
        observer=obs,
        transactional_id="g-host-0",
        **kw,
    )
    return c, health, obs


# -- classification ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RETRIABLE(), cp.ErrorClass.RETRIABLE),
        (ABORTABLE(), cp.ErrorClass.ABORTABLE),
        (kerr(KafkaError._TIMED_OUT, retriable=True, abortable=True), cp.ErrorClass.ABORTABLE),
        (FENCED(), cp.ErrorClass.FATAL),  # fencing wins over librdkafka's abortable flag
        (kerr(KafkaError.INVALID_PRODUCER_EPOCH, retriable=True), cp.ErrorClass.FATAL),
        (FATAL(), cp.ErrorClass.FATAL),
        (DENIED(), cp.ErrorClass.DENIED),
        (kerr(KafkaError.SASL_AUTHENTICATION_FAILED, retriable=True), cp.ErrorClass.DENIED),
        (
            kerr(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, abortable=True),
            cp.ErrorClass.DENIED,
        ),
        (kerr(KafkaError.UNKNOWN_TOPIC_OR_PART), cp.ErrorClass.FATAL),  # neither flag
        (KafkaException("no KafkaError inside"), cp.ErrorClass.FATAL),
    ],
)
def test_classify(exc: KafkaException, expected: cp.ErrorClass) -> None:
    assert cp.classify(exc) is expected


def test_messages_never_carry_the_broker_text() -> None:
    for make in (RETRIABLE, ABORTABLE, FENCED, FATAL, DENIED):
        p = FakeProducer(commit_transaction=[make()] * 30)
        c, _, _ = txn(p, max_retries=1)
        with pytest.raises((cp.Aborted, cp.FatalWorkerError)) as info:
            c.commit(RECORDS, LAST, OWNED)
        assert "broker text" not in str(info.value)


# -- exactly once: the happy path ---------------------------------------------------------------
def test_commit_runs_the_five_steps_in_order() -> None:
    p = FakeProducer()
    c, health, obs = txn(p)
    offsets = c.commit(RECORDS, LAST, OWNED)
    assert p.calls == [
        "begin_transaction",
        "produce",
        "produce",
        "produce",
        "send_offsets_to_transaction",
        "commit_transaction",
    ]
    assert p.produced == [(r.topic, r.key, r.value) for r in RECORDS]
    assert p.offsets_sent == [[("src", 0, 42), ("src", 1, 8)]]
    assert [(t.topic, t.partition, t.offset) for t in offsets] == [("src", 0, 42), ("src", 1, 8)]
    assert c.committed == {("src", 0): 42, ("src", 1): 8}
    assert not c.txn_open
    assert obs.outcomes == ["committed"]
    assert health.events == []


def test_init_retries_retriable_errors_then_reports_recovery() -> None:
    p = FakeProducer(init_transactions=[RETRIABLE(), RETRIABLE()])
    c, health, _ = txn(p)
    c.init()
    assert p.calls == ["init_transactions"] * 3
    assert health.events == ["down1", "down2", "ok"]


def test_init_fenced_or_fatal_stops() -> None:
    for make, exc_type in ((FENCED, cp.Fenced), (FATAL, cp.FatalWorkerError)):
        c, _, _ = txn(FakeProducer(init_transactions=[make()]))
        with pytest.raises(exc_type):
            c.init()


def test_init_abortable_only_error_outside_a_transaction_is_fatal() -> None:
    c, _, _ = txn(FakeProducer(init_transactions=[ABORTABLE()]))
    with pytest.raises(cp.FatalWorkerError):
        c.init()


def test_init_stops_retrying_when_asked_to_stop() -> None:
    stop = threading.Event()
    stop.set()
    p = FakeProducer(init_transactions=[RETRIABLE()] * 5)
    c = cp.TransactionalCheckpoint(p, FakeConsumer(), delay=lambda a: 0.0, stop=stop)
    with pytest.raises(cp.FatalWorkerError, match="stopped while retrying"):
        c.init()
    assert p.calls == ["init_transactions"]


def test_init_denied_is_access_denied() -> None:
    c, _, _ = txn(
        FakeProducer(init_transactions=[kerr(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED)])
    )
    with pytest.raises(cp.AccessDenied, match="TRANSACTIONAL_ID_AUTHORIZATION_FAILED"):
        c.init()


# -- step 1: begin ---------------------------------------------------------------------------------
def test_begin_with_a_transaction_open_is_an_invariant_violation() -> None:
    p = FakeProducer()
    c, _, _ = txn(p)
    c.txn_open = True
    with pytest.raises(cp.TransactionAlreadyOpen):
        c.commit(RECORDS, LAST, OWNED)
    assert "begin_transaction" not in p.calls


@pytest.mark.parametrize("make", [ABORTABLE, RETRIABLE])
def test_begin_abortable_or_retriable_aborts_without_an_open_transaction(make: Any) -> None:
    p = FakeProducer(begin_transaction=[make()])
    c, _, obs = txn(p)
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, OWNED)
    assert p.calls == ["begin_transaction"]  # nothing produced, nothing to abort
    assert not c.txn_open and c.committed == {} and obs.outcomes == []


@pytest.mark.parametrize(
    ("make", "exc_type"),
    [(FENCED, cp.Fenced), (FATAL, cp.FatalWorkerError), (DENIED, cp.AccessDenied)],
)
def test_begin_fatal_stops(make: Any, exc_type: type[Exception]) -> None:
    p = FakeProducer(begin_transaction=[make()])
    c, _, _ = txn(p)
    with pytest.raises(exc_type):
        c.commit(RECORDS, LAST, OWNED)
    assert not c.txn_open


# -- step 2: produce -------------------------------------------------------------------------------
def test_full_local_queue_takes_the_careful_path_and_loses_nothing() -> None:
    p = FakeProducer(produce=[None, BufferError(), BufferError(), None, None])
    c, _, _ = txn(p)
    c.commit(RECORDS, LAST, OWNED)
    assert [t for t, _, _ in p.produced] == ["out.a", "out.a", "dlq"]
    assert p.calls.count("poll") == 1


def test_oversized_record_at_produce_is_fatal_and_leaves_the_transaction_to_be_aborted() -> None:
    big = kerr(KafkaError.MSG_SIZE_TOO_LARGE)
    p = FakeProducer(produce=[big, big])
    c, _, _ = txn(p)
    with pytest.raises(cp.FatalWorkerError, match=r"message\.max\.bytes"):
        c.commit(RECORDS, LAST, OWNED)
    assert not c.txn_open
    assert "commit_transaction" not in p.calls


def test_produce_denied_is_access_denied() -> None:
    p = FakeProducer(produce=[DENIED(), DENIED()])
    c, _, _ = txn(p)
    with pytest.raises(cp.AccessDenied, match=r"out\.a"):
        c.commit(RECORDS, LAST, OWNED)
    assert "commit_transaction" not in p.calls


class _ShortList(list):  # type: ignore[type-arg]
    """Claims one more element than it yields: the produce count must catch it."""

    def __len__(self) -> int:
        return super().__len__() + 1

    def __iter__(self) -> Iterator[Any]:
        return super().__iter__()


def test_produce_count_mismatch_aborts_and_raises() -> None:
    p = FakeProducer()
    c, _, obs = txn(p)
    with pytest.raises(cp.ProduceCountMismatch):
        c.commit(_ShortList(RECORDS), LAST, OWNED)
    assert p.calls[-1] == "abort_transaction" and obs.outcomes == ["aborted"]
    assert "send_offsets_to_transaction" not in p.calls


# -- step 3: offsets -------------------------------------------------------------------------------
def test_revoked_partition_aborts_so_the_new_owner_redoes_it() -> None:
    p = FakeProducer()
    c, _, obs = txn(p)
    with pytest.raises(cp.Aborted, match=r"src\[1\]"):
        c.commit(RECORDS, LAST, {("src", 0)})
    assert p.calls[-1] == "abort_transaction" and obs.outcomes == ["aborted"]
    assert c.committed == {}


def test_offset_going_back_is_an_invariant_violation() -> None:
    p = FakeProducer()
    c, _, _ = txn(p)
    c.committed[("src", 0)] = 50
    with pytest.raises(cp.OffsetWentBack):
        c.commit(RECORDS, LAST, OWNED)
    assert p.calls[-1] == "abort_transaction"
    assert c.committed == {("src", 0): 50}


def test_empty_offsets_is_an_invariant_violation() -> None:
    c, _, _ = txn(FakeProducer())
    with pytest.raises(cp.EmptyCommit):
        c.commit(RECORDS, {}, OWNED)


def test_forget_drops_history_after_reassignment() -> None:
    c, _, _ = txn(FakeProducer())
    c.committed[("src", 0)] = 50
    c.forget([("src", 0)])
    c.commit(RECORDS, LAST, OWNED)  # 42 < 50 is fine now: someone else committed meanwhile
    assert c.committed[("src", 0)] == 42


# -- steps 4 and 5: send offsets, commit ----------------------------------------------------------
@pytest.mark.parametrize("step", ["send_offsets_to_transaction", "commit_transaction"])
def test_retriable_errors_are_retried_inside_the_transaction(step: str) -> None:
    p = FakeProducer(**{step: [RETRIABLE(), RETRIABLE()]})
    c, health, obs = txn(p)
    c.commit(RECORDS, LAST, OWNED)
    assert p.calls.count(step) == 3
    assert health.events == ["down1", "down2", "ok"]
    assert obs.outcomes == ["committed"] and c.committed[("src", 0)] == 42


@pytest.mark.parametrize("step", ["send_offsets_to_transaction", "commit_transaction"])
def test_retries_are_bounded_then_the_transaction_is_aborted(step: str) -> None:
    p = FakeProducer(**{step: [RETRIABLE()] * 10})
    c, _, obs = txn(p, max_retries=3)
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, OWNED)
    assert p.calls.count(step) == 4
    assert p.calls[-1] == "abort_transaction" and obs.outcomes == ["aborted"]
    assert not c.txn_open and c.committed == {}


@pytest.mark.parametrize("step", ["send_offsets_to_transaction", "commit_transaction"])
def test_abortable_errors_abort(step: str) -> None:
    p = FakeProducer(**{step: [ABORTABLE()]})
    c, _, obs = txn(p)
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, OWNED)
    assert p.calls[-1] == "abort_transaction" and obs.outcomes == ["aborted"]
    assert not c.txn_open and c.committed == {}
    # the next batch can begin again
    c.commit(RECORDS, LAST, OWNED)
    assert c.committed == {("src", 0): 42, ("src", 1): 8}


@pytest.mark.parametrize("step", ["send_offsets_to_transaction", "commit_transaction"])
@pytest.mark.parametrize(("make", "exc_type"), [(FENCED, cp.Fenced), (FATAL, cp.FatalWorkerError)])
def test_fatal_errors_stop_without_aborting(
    step: str, make: Any, exc_type: type[Exception]
) -> None:
    p = FakeProducer(**{step: [make()]})
    c, _, obs = txn(p)
    with pytest.raises(exc_type):
        c.commit(RECORDS, LAST, OWNED)
    # a fenced producer cannot abort; the successor's init_transactions does it
    assert "abort_transaction" not in p.calls
    assert not c.txn_open and c.committed == {} and obs.outcomes == []


@pytest.mark.parametrize("step", ["send_offsets_to_transaction", "commit_transaction"])
@pytest.mark.parametrize("abort_error", [None, FATAL()])
def test_denied_aborts_first_then_stops(step: str, abort_error: BaseException | None) -> None:
    p = FakeProducer(**{step: [DENIED()]}, abort_transaction=[abort_error])
    c, _, _ = txn(p)
    with pytest.raises(cp.AccessDenied) as info:
        c.commit(RECORDS, LAST, OWNED)
    assert p.calls[-1] == "abort_transaction"  # nothing of the batch becomes visible
    assert info.value.error is not None
    assert info.value.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert not c.txn_open and c.committed == {}


def test_delivery_errors_reach_the_hook_with_their_topic() -> None:
    p, cons = FakeProducer(), FakeConsumer()
    p.deliver_error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    seen: list[tuple[int, str | None]] = []

    class Msg:
        def topic(self) -> str:
            return "out.a"

    orig = p.produce

    def produce(topic: str, value: Any = None, key: Any = None, **kw: Any) -> None:
        cb = kw.pop("on_delivery", None)
        orig(topic, value, key, **kw)
        if cb is not None:
            cb(p.deliver_error, Msg())

    p.produce = produce  # type: ignore[method-assign]
    c = alo(p, cons, on_delivery_error=lambda e, t: seen.append((e.code(), t)))
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, OWNED)
    assert seen[0] == (KafkaError.TOPIC_AUTHORIZATION_FAILED, "out.a")
    assert cons.commits == []


def test_fenced_message_names_the_transactional_id() -> None:
    c, _, _ = txn(FakeProducer(commit_transaction=[FENCED()]))
    with pytest.raises(cp.Fenced, match="g-host-0"):
        c.commit(RECORDS, LAST, OWNED)


# -- abort ----------------------------------------------------------------------------------------
def test_abort_retries_retriable_errors() -> None:
    p = FakeProducer(commit_transaction=[ABORTABLE()], abort_transaction=[RETRIABLE(), None])
    c, _, obs = txn(p)
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, OWNED)
    assert p.calls.count("abort_transaction") == 2 and obs.outcomes == ["aborted"]


@pytest.mark.parametrize("errors", [[FATAL()], [RETRIABLE(), RETRIABLE(), RETRIABLE()]])
def test_abort_that_keeps_failing_is_fatal(errors: list[BaseException]) -> None:
    p = FakeProducer(commit_transaction=[ABORTABLE()], abort_transaction=errors)
    c, _, _ = txn(p)
    with pytest.raises(cp.FatalWorkerError, match="abort_transaction"):
        c.commit(RECORDS, LAST, OWNED)
    assert not c.txn_open


def test_close_aborts_only_an_open_transaction_on_a_clean_stop() -> None:
    p = FakeProducer()
    c, _, _ = txn(p)
    c.close(clean=True)
    assert p.calls == []
    c.txn_open = True
    c.close(clean=False)
    assert p.calls == [] and not c.txn_open
    c.txn_open = True
    c.close(clean=True)
    assert p.calls == ["abort_transaction"]


# -- at least once --------------------------------------------------------------------------------
def alo(producer: FakeProducer, consumer: FakeConsumer, **kw: Any) -> cp.AtLeastOnceCheckpoint:
    return cp.AtLeastOnceCheckpoint(producer, consumer, delay=lambda a: 0.0, **kw)


def test_at_least_once_produces_flushes_then_commits() -> None:
    p, cons = FakeProducer(), FakeConsumer()
    c = alo(p, cons)
    c.commit(RECORDS, LAST, OWNED)
    assert p.calls == ["produce", "produce", "produce", "flush"]
    assert cons.commits == [[("src", 0, 42), ("src", 1, 8)]]
    assert c.committed == {("src", 0): 42, ("src", 1): 8}
    assert not any(x.endswith("transaction") for x in p.calls)


def test_at_least_once_failed_delivery_redoes_the_batch_without_committing() -> None:
    p, cons = FakeProducer(), FakeConsumer()
    p.deliver_error = KafkaError(KafkaError._MSG_TIMED_OUT)
    c = alo(p, cons)
    with pytest.raises(cp.Aborted, match="_MSG_TIMED_OUT"):
        c.commit(RECORDS, LAST, OWNED)
    assert cons.commits == [] and c.committed == {}


def test_at_least_once_flush_waits_for_the_broker_and_gives_up_on_shutdown() -> None:
    stop = threading.Event()
    p, cons = FakeProducer(), FakeConsumer()
    health = Health()
    p.flush_left = [3, 2]
    c = alo(p, cons, health=health, stop=stop)
    c.commit(RECORDS, LAST, OWNED)  # two slow flushes, then delivered
    assert health.events == ["down1", "down2"] and len(cons.commits) == 1
    stop.set()
    p.flush_left = [1] * 10
    with pytest.raises(cp.FatalWorkerError, match="before shutdown"):
        c.commit(RECORDS, {("src", 0): 60}, OWNED)
    assert len(cons.commits) == 1


@pytest.mark.parametrize(
    "exc", [kerr(KafkaError.REBALANCE_IN_PROGRESS), kerr(KafkaError.UNKNOWN_MEMBER_ID), RETRIABLE()]
)
def test_at_least_once_commit_failure_redoes_the_batch(exc: KafkaException) -> None:
    cons = FakeConsumer([exc])
    c = alo(FakeProducer(), cons)
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, OWNED)
    assert c.committed == {}


@pytest.mark.parametrize(
    ("make", "exc_type"), [(FATAL, cp.FatalWorkerError), (DENIED, cp.AccessDenied)]
)
def test_at_least_once_fatal_commit_stops(make: Any, exc_type: type[Exception]) -> None:
    c = alo(FakeProducer(), FakeConsumer([make()]))
    with pytest.raises(exc_type):
        c.commit(RECORDS, LAST, OWNED)


def test_at_least_once_revoked_partition_is_not_committed() -> None:
    cons = FakeConsumer()
    c = alo(FakeProducer(), cons)
    with pytest.raises(cp.Aborted):
        c.commit(RECORDS, LAST, {("src", 1)})
    assert cons.commits == []
