"""The commit protocol of one batch, as a class of its own.

The worker consumes a batch and hands what the pipeline made of it (output records and
dead letters) to a checkpoint, which makes it durable together with the consumer offsets.
Keeping the protocol here, apart from the consume loop, lets every failure at every step
be tested with a fake producer and consumer (``tests/unit/test_checkpoint.py``) instead of
only through a broker.

Exactly once (:class:`TransactionalCheckpoint`)
-----------------------------------------------

1. **Begin** the transaction.  *Invariant: no transaction is open*
   (:class:`TransactionAlreadyOpen`).
2. **Produce** every output record and every dead letter into the transaction.
   *Invariant: one produce per record handed in* (:class:`ProduceCountMismatch`).
3. **Compute offsets**: per partition, last record offset + 1.  *Invariants: every
   partition is still owned (else* :class:`Aborted` *: the new owner redoes it) and every
   offset is beyond the last one committed for it* (:class:`OffsetWentBack`).
4. **Send offsets** with ``send_offsets_to_transaction(offsets, group_metadata)``: they
   join the transaction and are fenced by the group generation (KIP-447), so a worker that
   lost its partitions cannot commit them.
5. **Commit** the transaction: outputs, dead letters and offsets become visible at once.

At least once (:class:`AtLeastOnceCheckpoint`)
----------------------------------------------

1. **Produce** everything with the idempotent producer (same invariant as above).
2. **Flush** and check every delivery report; a failed delivery is :class:`Aborted`.
3. **Compute offsets** (as step 3 above).
4. **Commit offsets** synchronously.  A failed commit is :class:`Aborted` too: outputs are
   written, so re-processing duplicates them, which at-least-once allows.

Errors
------

Every librdkafka error goes through one classification, :func:`classify`:

* ``RETRIABLE``: the same call is retried after a backoff (at most ``max_retries`` times
  inside a transaction, then the transaction is aborted);
* ``ABORTABLE``: the transaction is aborted and :class:`Aborted` tells the worker to
  rewind to the batch start and consume again;
* ``DENIED``: an authentication or authorization failure: :class:`AccessDenied`, a
  configuration problem (exit 78), never retried;
* ``FATAL``: fenced by a newer producer with the same ``transactional.id``
  (:class:`Fenced`), or librdkafka's fatal flag: :class:`FatalWorkerError`, commit nothing
  more.

Invariant violations (:class:`InvariantViolation` and its subclasses) mean a bug; the open
transaction is aborted and the worker stops, because committing past one could lose data.

Messages are value-free: they carry librdkafka error *names*, topic names, partitions and
offsets, never a librdkafka error string (it may quote broker- or input-supplied text).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streamproc.runtime.watchdog import Watchdog

log = logging.getLogger("streamproc.runtime.checkpoint")

TP = tuple[str, int]


# -- errors ------------------------------------------------------------------------------------
class FatalWorkerError(RuntimeError):
    """The worker cannot continue safely (fenced, fatal client error); exit non-zero."""


class Fenced(FatalWorkerError):
    """Another live producer uses this worker's ``transactional.id``."""


class AccessDenied(FatalWorkerError):
    """The broker refused authentication or an operation (missing ACL): fix the config.

    The message names the operation and the librdkafka error name; ``error`` and ``topic``
    let the worker name principal, operation and resource.  The worker exits with 78
    (EX_CONFIG) so a supervisor does not restart it in a loop.
    """

    def __init__(self, message: str, error: KafkaError | None = None, topic: str | None = None):
        super().__init__(message)
        self.error = error
        self.topic = topic


class InvariantViolation(FatalWorkerError):
    """A commit-protocol invariant does not hold: a bug.  Nothing more is committed."""


class TransactionAlreadyOpen(InvariantViolation):
    """Step 1 found a transaction open."""


class ProduceCountMismatch(InvariantViolation):
    """Step 2 produced a different number of records than it was handed."""


class OffsetWentBack(InvariantViolation):
    """Step 3 would commit an offset at or before one already committed."""


class EmptyCommit(InvariantViolation):
    """Step 3 found no offsets for a non-empty batch."""


class TransactionStuck(FatalWorkerError):
    """A blocking client call overran its timeout by the watchdog's grace (see
    :mod:`streamproc.runtime.watchdog`): exit rather than hang."""


class Aborted(Exception):
    """The batch was not committed (transaction aborted, delivery failed): rewind, redo."""


class ErrorClass(enum.Enum):
    RETRIABLE = "retriable"
    ABORTABLE = "abortable"
    DENIED = "denied"
    FATAL = "fatal"


#: Errors that mean another producer owns our transactional.id: never retry, never abort.
FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)

#: Authentication and authorization failures: a configuration problem, not an outage.
DENIED_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError.DELEGATION_TOKEN_AUTHORIZATION_FAILED,
    }
)


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The :class:`KafkaError` a ``KafkaException`` carries, if any."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


def classify(exc: BaseException) -> ErrorClass:
    """The one classification of a client error (see the module docstring).

    Order matters: authorization and fencing are checked before librdkafka's flags,
    because some brokers report them as abortable or even retriable, and retrying either
    only delays the inevitable stop.
    """
    err = kafka_error(exc)
    if err is None:
        return ErrorClass.FATAL
    code = err.code()
    if code in DENIED_CODES:
        return ErrorClass.DENIED
    if code in FENCED_CODES or err.fatal():
        return ErrorClass.FATAL
    if err.txn_requires_abort():
        return ErrorClass.ABORTABLE
    if err.retriable():
        return ErrorClass.RETRIABLE
    return ErrorClass.FATAL


def describe(exc: BaseException) -> str:
    """A value-free description: the librdkafka error name, or the exception type."""
    err = kafka_error(exc)
    return type(exc).__name__ if err is None else str(err.name())


def raise_stop(
    exc: BaseException, what: str, transactional_id: str = "", topic: str | None = None
) -> None:
    """Raise the worker-stopping exception for a DENIED or FATAL ``exc``."""
    kind = classify(exc)
    err = kafka_error(exc)
    if kind is ErrorClass.DENIED:
        raise AccessDenied(
            f"{what}: {describe(exc)} -- the broker refused this principal; check its "
            "credentials and ACLs (streamproc acls plan)",
            err,
            topic,
        ) from None
    if err is not None and err.code() in FENCED_CODES:
        raise Fenced(
            f"{what}: {describe(exc)}; another live producer uses transactional.id "
            f"{transactional_id!r} -- give every process its own --instance (or use --workers N)"
        ) from None
    raise FatalWorkerError(f"{what}: {describe(exc)}") from None


# -- collaborators -------------------------------------------------------------------------------
class OutRecord(Protocol):
    """What a checkpoint produces: a pipeline output or a dead letter."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


#: An OutRecord may also name its partition (``partition: int | None``): a changelog write
#: (:class:`~streamproc.pipeline.state.StateWrite`) goes to the changelog partition of the
#: input partition it belongs to.  Records without the attribute (outputs, dead letters)
#: are placed by the producer's partitioner, as before.
def _partition_of(r: OutRecord) -> int | None:
    return getattr(r, "partition", None)


class BrokerHealth(Protocol):
    """Told about retries and recoveries (the worker reports them as readiness/metrics).

    ``down`` may raise to stop the retrying: the worker raises a configuration error there
    when its error callback saw an authentication failure, which librdkafka reports only
    as timeouts to the blocking call.
    """

    def down(self, attempt: int) -> None: ...
    def ok(self) -> None: ...


class _NoHealth:
    def down(self, attempt: int) -> None:
        pass

    def ok(self) -> None:
        pass


class TransactionObserver(Protocol):
    def transaction(self, outcome: str) -> None: ...


@dataclass
class Staged:
    """A batch whose records are produced and whose offsets are computed (``stage``),
    waiting for the blocking rest of its commit (``complete``)."""

    offsets: list[TopicPartition]
    #: The consumer's group metadata, taken on the consuming thread (exactly once).
    group_metadata: object = None
    #: Failed deliveries seen so far (at least once: their error names).
    failures: list[str] = field(default_factory=list)


# -- the shared part ---------------------------------------------------------------------------
class _Base:
    """Offsets bookkeeping, produce and the retry loop shared by both guarantees."""

    def __init__(
        self,
        producer: Any,
        consumer: Any,
        *,
        timeout: float = 30.0,
        delay: Callable[[int], float] = lambda attempt: min(10.0, 0.2 * 2 ** (attempt - 1)),
        stop: threading.Event | None = None,
        health: BrokerHealth | None = None,
        observer: TransactionObserver | None = None,
        max_retries: int = 20,
        transactional_id: str = "",
        on_delivery_error: Callable[[KafkaError, str | None], None] | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.producer = producer
        self.consumer = consumer
        self.timeout = timeout
        self.delay = delay
        self.stop = stop or threading.Event()
        self.health: BrokerHealth = health or _NoHealth()
        self.observer = observer
        self.max_retries = max_retries
        self.transactional_id = transactional_id
        #: Told about every failed delivery (error, topic): the worker names refusals.
        self.on_delivery_error = on_delivery_error
        #: Next offset to read per partition, as committed by this worker.
        self.committed: dict[TP, int] = {}
        #: Deadlines of the blocking calls in flight (see :mod:`~streamproc.runtime.watchdog`).
        self.watchdog = watchdog or Watchdog()

    # offsets ---------------------------------------------------------------------------------
    def forget(self, tps: Iterable[TP]) -> None:
        """Partitions assigned or revoked: another worker may have committed meanwhile."""
        for tp in tps:
            self.committed.pop(tp, None)

    def offsets(
        self, last: Mapping[TP, int], owned: set[TP] | frozenset[TP]
    ) -> list[TopicPartition]:
        """Step 3: per partition ``last + 1``, checked against ownership and history."""
        out = []
        for tp, off in sorted(last.items()):
            if tp not in owned:
                raise Aborted(f"{tp[0]}[{tp[1]}] was revoked before the commit")
            nxt = off + 1
            prev = self.committed.get(tp)
            if prev is not None and nxt <= prev:
                raise OffsetWentBack(
                    f"offset for {tp[0]}[{tp[1]}] would go back from {prev} to {nxt}"
                )
            out.append(TopicPartition(tp[0], tp[1], nxt))
        if not out:
            raise EmptyCommit("a non-empty batch produced no offsets")
        return out

    def _committed(self, offsets: Sequence[TopicPartition]) -> None:
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset

    # produce ---------------------------------------------------------------------------------
    def produce_all(
        self, records: Iterable[OutRecord], on_delivery: Callable[..., None] | None = None
    ) -> int:
        """Step 2: one ``produce()`` per record; the count proves none was skipped.

        The fast path hands each record straight to librdkafka; only a full local queue or
        a produce error takes the careful path (:meth:`_produce_careful`).
        """
        produce = self.producer.produce
        if on_delivery is not None:
            produce = functools.partial(produce, on_delivery=on_delivery)
        n = 0
        for r in records:
            h = r.headers
            try:
                part = getattr(r, "partition", None)  # _partition_of, inlined (hot path)
                if part is None:
                    produce(r.topic, r.value, r.key, headers=h if type(h) is list else list(h))
                else:
                    produce(r.topic, r.value, r.key, partition=part, headers=list(h))
            except (BufferError, KafkaException):
                self._produce_careful(r, on_delivery)
            n += 1
        return n

    def _produce_careful(self, r: OutRecord, on_delivery: Callable[..., None] | None) -> None:
        kwargs: dict[str, Any] = {"key": r.key, "value": r.value, "headers": list(r.headers)}
        part = _partition_of(r)
        if part is not None:
            kwargs["partition"] = part
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        while True:
            try:
                self.producer.produce(r.topic, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.1)  # local queue full: let deliveries drain
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise FatalWorkerError(
                        f"record for {r.topic!r} exceeds the producer's message.max.bytes"
                    ) from None
                raise_stop(exc, f"produce to {r.topic!r}", self.transactional_id, r.topic)

    # retries ---------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], object], *, in_transaction: bool) -> None:
        """Run ``fn``; retry RETRIABLE errors; ABORTABLE -> :class:`Aborted`; else stop.

        Outside a transaction there is nothing to abort: an error that is abortable *and*
        retriable is retried, one that is only abortable stops the worker.  Inside one,
        retries are bounded by ``max_retries``, after which the transaction is aborted
        (and redone) rather than held open past the transaction timeout.
        """
        attempt = 0
        while True:
            try:
                with self.watchdog.guard(what, self.timeout):
                    fn()
            except KafkaException as exc:
                kind = classify(exc)
                err = kafka_error(exc)
                if kind is ErrorClass.ABORTABLE and not in_transaction:
                    kind = (
                        ErrorClass.RETRIABLE
                        if err is not None and err.retriable()
                        else ErrorClass.FATAL
                    )
                if kind is ErrorClass.RETRIABLE:
                    attempt += 1
                    log.warning("%s: retriable %s (attempt %d)", what, describe(exc), attempt)
                    self.health.down(attempt)
                    if in_transaction and attempt > self.max_retries:
                        raise Aborted(
                            f"{what}: still failing after {attempt - 1} retries"
                        ) from None
                    if self.stop.wait(self.delay(attempt)) and not in_transaction:
                        raise FatalWorkerError(f"{what}: stopped while retrying") from None
                    continue
                if kind is ErrorClass.ABORTABLE:
                    log.warning("%s failed (%s); aborting the transaction", what, describe(exc))
                    raise Aborted(f"{what}: {describe(exc)}") from None
                raise_stop(exc, what, self.transactional_id)
            else:
                if attempt:
                    self.health.ok()
                return


class TransactionalCheckpoint(_Base):
    """Exactly once: outputs, dead letters and offsets in one Kafka transaction."""

    def __init__(self, producer: Any, consumer: Any, **kwargs: Any) -> None:
        super().__init__(producer, consumer, **kwargs)
        self.txn_open = False

    def init(self, timeout: float | None = None) -> None:
        """Fence any earlier instance with the same ``transactional.id`` (retrying).

        ``timeout`` per attempt (default: the checkpoint's): short attempts let the
        health hook look at the error callback between them.
        """
        t = self.timeout if timeout is None else timeout
        self.call(
            "init_transactions", lambda: self.producer.init_transactions(t), in_transaction=False
        )

    def commit(
        self,
        records: Sequence[OutRecord],
        last: Mapping[TP, int],
        owned: set[TP] | frozenset[TP],
    ) -> list[TopicPartition]:
        """Steps 1-5 for one batch; returns the committed offsets.

        Raises :class:`Aborted` after aborting the transaction (rewind and redo the batch)
        and :class:`FatalWorkerError` (or a subclass) when the worker must stop.
        """
        staged = self.stage(records, last, owned)
        self.complete(staged)
        return staged.offsets

    def stage(
        self,
        records: Sequence[OutRecord],
        last: Mapping[TP, int],
        owned: set[TP] | frozenset[TP],
    ) -> Staged:
        """Steps 1-3, and the group metadata step 4 needs; the transaction stays open.

        Called on the consuming thread (the group metadata is the consumer's); every
        failure is handled as in :meth:`commit`.  :meth:`complete` must follow, before
        anything else is produced.
        """
        # 1. begin
        if self.txn_open:
            raise TransactionAlreadyOpen("begin_transaction with a transaction already open")
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            if classify(exc) in (ErrorClass.ABORTABLE, ErrorClass.RETRIABLE):
                raise Aborted(f"begin_transaction: {describe(exc)}") from None
            raise_stop(exc, "begin_transaction", self.transactional_id)
        self.txn_open = True
        with self._closing_on_failure():
            # 2. produce
            produced = self.produce_all(records)
            if produced != len(records):
                raise ProduceCountMismatch(f"produced {produced} records, expected {len(records)}")
            # 3. offsets
            return Staged(self.offsets(last, owned), self.consumer.consumer_group_metadata())

    def complete(self, staged: Staged) -> None:
        """Steps 4-5 of a staged batch: only blocking client calls, safe on another thread.

        Failures as in :meth:`commit`; on success the offsets count as committed (the
        ``OffsetWentBack`` history) and the observer hears ``committed``.
        """
        offsets, meta = staged.offsets, staged.group_metadata
        with self._closing_on_failure():
            # 4. offsets into the transaction, fenced by the group generation
            self.call(
                "send_offsets_to_transaction",
                lambda: self.producer.send_offsets_to_transaction(offsets, meta, self.timeout),
                in_transaction=True,
            )
            # 5. commit
            self.call(
                "commit_transaction",
                lambda: self.producer.commit_transaction(self.timeout),
                in_transaction=True,
            )
        self.txn_open = False
        self._committed(offsets)
        if self.observer is not None:
            self.observer.transaction("committed")

    @contextlib.contextmanager
    def _closing_on_failure(self) -> Iterator[None]:
        """What a failure inside the open transaction does to it (steps 2-5)."""
        try:
            yield
        except (Aborted, InvariantViolation):
            self.abort()
            raise
        except AccessDenied:
            # A refused write or offset commit: abort so nothing of the batch becomes
            # visible, best effort (the next instance's init_transactions aborts it too).
            with contextlib.suppress(FatalWorkerError):
                self.abort()
            self.txn_open = False
            raise
        except FatalWorkerError:
            # Left as SIGKILL would leave it: the next instance's init_transactions (or the
            # transaction timeout) aborts it.  Aborting a fenced producer fails anyway.
            self.txn_open = False
            raise

    def abort(self) -> None:
        """Abort the open transaction: a few quick retries, then give up (fatal)."""
        if not self.txn_open:
            return
        for attempt in range(1, 4):
            try:
                with self.watchdog.guard("abort_transaction", self.timeout):
                    self.producer.abort_transaction(self.timeout)
                break
            except KafkaException as exc:
                if classify(exc) is not ErrorClass.RETRIABLE or attempt == 3:
                    self.txn_open = False
                    raise FatalWorkerError(f"abort_transaction: {describe(exc)}") from None
                log.warning("abort_transaction: retriable %s (attempt %d)", describe(exc), attempt)
                self.stop.wait(self.delay(attempt))
        self.txn_open = False
        if self.observer is not None:
            self.observer.transaction("aborted")

    def close(self, *, clean: bool) -> None:
        """On shutdown: a clean stop aborts what is open (nothing is, between batches)."""
        if self.txn_open and clean:
            try:
                self.producer.abort_transaction(min(5.0, self.timeout))
                if self.observer is not None:
                    self.observer.transaction("aborted")
            except KafkaException as exc:
                log.warning("abort on close failed: %s", describe(exc))
        self.txn_open = False


class AtLeastOnceCheckpoint(_Base):
    """At least once: produce and flush, check every delivery, then commit the offsets."""

    txn_open = False

    def init(self, timeout: float | None = None) -> None:
        """Nothing to fence without transactions."""

    def commit(
        self,
        records: Sequence[OutRecord],
        last: Mapping[TP, int],
        owned: set[TP] | frozenset[TP],
    ) -> list[TopicPartition]:
        staged = self.stage(records, last, owned)
        self.complete(staged)
        return staged.offsets

    def stage(
        self,
        records: Sequence[OutRecord],
        last: Mapping[TP, int],
        owned: set[TP] | frozenset[TP],
    ) -> Staged:
        """Step 1 and the offsets (step 3, checked now, while the caller owns them)."""
        staged = Staged([])
        failures = staged.failures

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                failures.append(str(err.name()))
                if self.on_delivery_error is not None:
                    self.on_delivery_error(err, msg.topic() if msg is not None else None)

        # 1. produce
        produced = self.produce_all(records, on_delivery)
        if produced != len(records):
            raise ProduceCountMismatch(f"produced {produced} records, expected {len(records)}")
        # 3. offsets
        staged.offsets = self.offsets(last, owned)
        return staged

    def complete(self, staged: Staged) -> None:
        """Steps 2 and 4: only blocking client calls, safe on another thread."""
        # 2. flush and check deliveries
        attempt = 0
        while True:
            with self.watchdog.guard("flush", self.timeout):
                left = self.producer.flush(self.timeout)
            if left <= 0:
                break
            attempt += 1
            self.health.down(attempt)
            if self.stop.is_set() and attempt > 3:
                raise FatalWorkerError("could not deliver the batch before shutdown")
        if staged.failures:
            log.warning("delivery failed (%s); re-processing the batch", staged.failures[0])
            raise Aborted(f"delivery failed: {staged.failures[0]}")
        # 4. commit offsets
        offsets = staged.offsets
        try:
            with self.watchdog.guard("commit", self.timeout):
                self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Rebalance-in-progress, unknown member and the like are neither retriable nor
            # abortable in librdkafka's sense, but a group commit never fences a producer:
            # re-processing is safe.  Only denial, fencing and librdkafka's fatal flag stop.
            err = kafka_error(exc)
            if classify(exc) is ErrorClass.DENIED or (
                err is not None and (err.fatal() or err.code() in FENCED_CODES)
            ):
                raise_stop(exc, "commit", self.transactional_id)
            log.warning("offset commit failed (%s); re-processing the batch", describe(exc))
            raise Aborted(f"commit: {describe(exc)}") from None
        self._committed(offsets)

    def close(self, *, clean: bool) -> None:
        """Nothing is ever open between batches."""


Checkpoint = TransactionalCheckpoint | AtLeastOnceCheckpoint

__all__ = [
    "Aborted",
    "AccessDenied",
    "AtLeastOnceCheckpoint",
    "Checkpoint",
    "EmptyCommit",
    "ErrorClass",
    "FatalWorkerError",
    "Fenced",
    "InvariantViolation",
    "OffsetWentBack",
    "ProduceCountMismatch",
    "Staged",
    "TransactionAlreadyOpen",
    "TransactionStuck",
    "TransactionalCheckpoint",
    "classify",
    "describe",
    "kafka_error",
]
