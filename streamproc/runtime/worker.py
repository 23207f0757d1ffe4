"""The processor worker: consume a batch, run the pipeline, produce, commit.

One worker = one consumer + one producer, in one thread.  The loop is deliberately
simple: rebalance callbacks only ever run inside ``consume()``, and a transaction is
never open while ``consume()`` runs, so a rebalance can never land in the middle of a
transaction (the ``on_revoke`` handler still checks, and aborts one if it ever finds it).

Checkpoint, ``processing_guarantee: exactly_once`` (per batch)
--------------------------------------------------------------

Steps 3-7 are :class:`~streamproc.runtime.checkpoint.TransactionalCheckpoint` (its
invariants, retry classification and unit tests live there); the worker does 1, 2 and 8.

1. **Consume** up to ``batch.max_records`` records within ``batch.max_wait_ms`` from the
   owned partitions (``isolation.level=read_committed``, ``enable.auto.commit=false``).
2. **Process**: ``pipeline.process(records)`` -- pure, no Kafka I/O.  A
   :class:`~streamproc.errors.TransientError` (KMS or registry outage) pauses the
   partitions, backs off and retries *the same records* (step 2 again); nothing is
   produced and nothing goes to the DLQ for it.
3. **Begin** the transaction.  *Invariant: no transaction is open.*
4. **Produce** every output record and every dead letter into the transaction.
   *Invariant: one produce per output and per quarantined record.*
5. **Compute offsets**: per partition, last record offset + 1.  *Invariants: every
   partition is still owned by this worker, and every offset is beyond the last one this
   worker committed for it.*
6. **Send offsets** with ``send_offsets_to_transaction(offsets,
   consumer_group_metadata())``: the offsets join the transaction and are fenced by the
   group generation (KIP-447), so a worker that lost its partitions cannot commit them.
7. **Commit** the transaction: outputs, dead letters and offsets become visible at once.
8. **Report** to the observer (transaction, latency, dead letters, lag, cache counters).

Failures in steps 3-7: a *retriable* error retries the same call (with backoff); an
*abortable* error aborts the transaction, seeks every partition of the batch back to the
batch's first offset -- which, because batches commit in order, is the last committed
offset -- and continues with step 1; a *fatal* error (fenced by a newer instance with the
same ``transactional.id``, unsupported broker...) stops the worker with a non-zero exit
and commits nothing.  Invariant violations raise :class:`InvariantViolation` and are
fatal too: they mean a bug, and committing past one could lose data.

``transactional.id`` is ``<group_id>-<instance>-<index>`` (instance: ``--instance`` /
``STREAMPROC_INSTANCE`` / the host name).  It must be unique among live processes and
stable across restarts: a restarted worker then fences its own zombie
(``init_transactions`` bumps the epoch and aborts whatever the dead instance left open)
instead of leaving read_committed consumers stalled until the transaction times out.

Checkpoint, ``processing_guarantee: at_least_once``
---------------------------------------------------

Steps 1-2 as above; then produce everything with the idempotent producer, ``flush()``
and check every delivery report; only then commit the offsets synchronously.  A failed
delivery seeks back and re-processes the batch, so outputs may be duplicated, never lost.

Rebalances
----------

Eager assignment (``range``) by default.  With eager rebalancing every partition is
revoked at once, which is the clean barrier a transactional worker wants: the revoke
callback runs between batches, after the last commit, so there is nothing to hand over
but committed offsets.  Cooperative-sticky would move fewer partitions but needs two
rebalance rounds per change, and each round costs a group join (about half the session
timeout on Tansu); it works here too (set ``partition.assignment.strategy:
cooperative-sticky`` under ``consumer:``) because the callbacks only look at the
partitions they are given.

Signals
-------

SIGTERM/SIGINT only set a flag.  The loop finishes (commits) the batch in hand, or
abandons it if it is waiting out a transient outage (nothing was produced, offsets stay
where they were), closes the consumer (leaving the group) and returns 0.  SIGKILL loses
nothing: an open transaction is aborted by the next instance's ``init_transactions`` or
by the transaction timeout, and its records are re-read from the committed offsets.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamproc.config import Config
from streamproc.crypto.envelope import fast_dataclass_constructor
from streamproc.errors import (
    ConfigError,
    KmsError,
    KmsUnavailable,
    Reason,
    SchemaRegistryUnavailable,
    SealingUnavailable,
    TransientError,
)
from streamproc.observability import Observer
from streamproc.pipeline.core import BatchResult, InputRecord, Pipeline, Quarantined
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.checkpoint import (
    FENCED_CODES,
    Aborted,
    AccessDenied,
    AtLeastOnceCheckpoint,
    Checkpoint,
    FatalWorkerError,
    InvariantViolation,
    TransactionalCheckpoint,
    describe,
    kafka_error,
)
from streamproc.runtime.dlq import KEY_TOKEN_DOMAIN, DeadLetterWriter
from streamproc.runtime.kafka_conf import consumer_conf, producer_conf
from streamproc.runtime.limits import RecordLimit, check_consumer, derive_limit, record_size

log = logging.getLogger("streamproc.runtime.worker")

TP = tuple[str, int]

#: Exit codes of :meth:`Worker.run` (and of ``streamproc run``).
EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: do not restart, fix the config


class _DeadLetter(NamedTuple):
    """A quarantined record on its way to the dead-letter topic (an ``OutRecord``)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class _Health:
    """The checkpoint's view of broker health: the worker's readiness and retry metrics.

    ``down`` also serves librdkafka's error callback: an authentication failure shows up
    there only, while the blocking call merely times out, and waiting cannot fix it.
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def down(self, attempt: int) -> None:
        w = self._worker
        w._broker_down(attempt)
        if w._security_error is None and w.producer is not None:
            with contextlib.suppress(KafkaException):  # a fatal producer raises here
                w.producer.poll(0)
        if w._security_error is not None:
            raise AccessDenied(w._security_error)

    def ok(self) -> None:
        self._worker._broker_ok()


def dependency_of(exc: BaseException) -> str:
    """The ``dependency`` label of a transient outage (metrics, readiness reason)."""
    if isinstance(exc, KmsUnavailable):
        return "kms"
    if isinstance(exc, SchemaRegistryUnavailable):
        return "schema_registry"
    return "dependency"


@dataclass
class _Batch:
    messages: list[Message]
    first: dict[TP, int] = field(default_factory=dict)
    last: dict[TP, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        first: dict[Any, Any] = self.first  # Message methods are typed Optional
        last: dict[Any, Any] = self.last
        for m in self.messages:  # per record: Message methods inline, no helper calls
            tp = (m.topic(), m.partition())
            off = m.offset()
            if tp not in first:
                first[tp] = off
            last[tp] = off

    def keep_only(self, owned: set[TP]) -> None:
        """Drop records of partitions this worker no longer owns (after a revoke)."""
        if all(tp in owned for tp in self.first):
            return
        self.messages = [m for m in self.messages if _tp(m) in owned]
        self.first = {tp: o for tp, o in self.first.items() if tp in owned}
        self.last = {tp: o for tp, o in self.last.items() if tp in owned}


class Worker:
    """Runs the consume-process-produce loop for one worker index of a consumer group.

    Collaborators are passed in: ``pipeline`` (built by
    :func:`streamproc.runtime.factory.build_pipeline` in production), ``observer`` (the
    no-op :class:`Observer` by default), and the consumer/producer factories (tests).
    """

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        *,
        index: int = 0,
        instance: str = "",
        observer: Observer | None = None,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        admin_factory: Callable[[dict[str, Any]], Any] | None = None,
        backoff: Backoff | None = None,
        kafka_timeout: float = 30.0,
        lag_interval: float = 1.0,
        audit: Any = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.index = index
        self.observer = observer or Observer()
        self._consumer_factory = consumer_factory
        self._producer_factory = producer_factory
        self._admin_factory = admin_factory
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.kafka_timeout = kafka_timeout
        self.lag_interval = lag_interval
        self.exactly_once = config.exactly_once
        self.instance = instance or default_instance()
        self.transactional_id = f"{config.group_id}-{self.instance}-{index}"
        self._stop = threading.Event()
        self._fatal_error: str | None = None
        self._owned: set[TP] = set()
        #: The commit protocol (built in ``_start``, once the producer exists).
        self.checkpoint: Checkpoint | None = None
        self._in_backoff = False
        self._dropped_during_backoff: dict[TP, int] = {}
        self._broker_down_since: float | None = None
        #: Dependencies (broker, kms, schema_registry) currently being retried: while any
        #: is down, /readyz names it, even after the partitions were lost because of it.
        self._deps_down: dict[str, float] = {}
        self._broker_attempt = 0
        self._last_lag = 0.0
        self._dlq_for = {s: p.dead_letter_topic for p in config.pipelines for s in p.sources}
        #: A broker refusal (authentication, a missing ACL) seen anywhere: exit 78.
        self._security_error: str | None = None
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        #: Counters for tests and the final log line.
        self.batches_committed = 0
        self.records_committed = 0
        self.aborts = 0
        self._consecutive_aborts = 0
        self._revoked_in_flight: set[TP] = set()
        pipeline.instrument_kms(self.observer)  # no-op where build_pipeline did it
        #: The audit trail (a ``streamproc.runtime.factory.WorkerAudit``) or ``None``.
        self.audit = audit
        #: Every record this worker produces must fit; set at start-up (_derive_limit).
        self.limit: RecordLimit | None = None
        #: The current batch's sealed dead letters (built in _process, produced in step 4).
        self._dead: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes | None]]]] = []
        self.dead_letters = DeadLetterWriter(
            pipeline.kms, config.dead_letter_kek, key_token=_dlq_key_token(pipeline)
        )
        if audit is not None and hasattr(self.observer, "on_anomaly"):
            self.observer.on_anomaly = audit.anomaly  # in-process detector -> anomaly events

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the current batch and exit (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> :meth:`stop` (main thread only)."""
        import signal

        def handler(signum: int, _frame: object) -> None:
            log.info("signal received; draining", extra={"signal": signal.Signals(signum).name})
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Run until stopped; returns an exit code (0 clean, 1 fatal, 78 bad settings)."""
        try:
            self._start()
            while not self._stop.is_set():
                self._step()
            if self._security_error is not None:
                raise ConfigError(self._security_error)
            if self._fatal_error is not None:
                raise FatalWorkerError(self._fatal_error)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            self._close(clean=False)
            return EXIT_CONFIG
        except AccessDenied as exc:
            # The checkpoint says which call the broker refused; _deny says who and what.
            if self._security_error is None and exc.error is not None:
                self._deny(exc.error, exc.topic, produce=True)
            log.error("configuration error: %s", self._security_error or exc)
            self._close(clean=False)
            return EXIT_CONFIG
        except FatalWorkerError as exc:
            if self._security_error is not None:  # the root cause, e.g. behind a timeout
                log.error("configuration error: %s", self._security_error)
                self._close(clean=False)
                return EXIT_CONFIG
            # Value-free: every FatalWorkerError message is built here from names, ids and
            # librdkafka error names (see _describe), never from a third-party message.
            log.error("fatal %s: %s", type(exc).__name__, exc)
            self._close(clean=False)
            return EXIT_FATAL
        except KafkaException as exc:
            log.error("fatal Kafka error: %s", _describe(exc))
            self._close(clean=False)
            return EXIT_FATAL
        except Exception:
            # A bug (the pipeline is supposed to turn every record problem into a
            # quarantine).  Commit nothing more; the stack goes to the log, and the
            # formatter keeps third-party exception messages out of it.
            log.exception("unexpected error; stopping without committing the batch")
            self._close(clean=False)
            return EXIT_FATAL
        self._close(clean=True)
        if self.audit is not None:
            try:
                self.audit.stopped(self.records_committed)
            except FatalWorkerError as exc:
                log.error("fatal %s: %s", type(exc).__name__, exc)
                return EXIT_FATAL
        log.info(
            "stopped after %d batches (%d aborted transactions)",
            self.batches_committed,
            self.aborts,
            extra={"records": self.records_committed, "worker": self.index},
        )
        return EXIT_OK

    def _client(
        self, factory: Callable[[dict[str, Any]], Any], conf: dict[str, Any], what: str
    ) -> Any:
        """Build a client; a librdkafka settings error is a configuration error (exit 78)."""
        try:
            return factory(conf)
        except KafkaException as exc:
            err = _err(exc)
            if err is not None and err.code() == KafkaError._INVALID_ARG:
                raise ConfigError(f"{what} settings: {_setting_error(err.str(), conf)}") from None
            raise

    def _start(self) -> None:
        self.observer.ready(False, "starting")
        if self.audit is not None:  # audited before anything is consumed
            self.audit.started(self.pipeline.policy, self.config.policy)
        pconf = producer_conf(
            self.config,
            index=self.index,
            transactional_id=self.transactional_id if self.exactly_once else None,
            error_cb=self._on_client_error,
            # Only failed deliveries call back (no per-record cost): a commit that fails
            # because a topic refused a write then names the topic (_denied_write).
            on_delivery=self._on_txn_delivery if self.exactly_once else None,
        )
        self.producer = self._client(self._producer_factory, pconf, "producer")
        self._derive_limit(pconf)
        self._check_quarantine_kek()
        kind = TransactionalCheckpoint if self.exactly_once else AtLeastOnceCheckpoint
        self.checkpoint = kind(
            self.producer,
            None,
            timeout=self.kafka_timeout,
            delay=self.backoff.delay,
            stop=self._stop,
            health=_Health(self),
            observer=self.observer,
            transactional_id=self.transactional_id,
            on_delivery_error=self._on_delivery_error,
        )
        # Exactly once: fences any earlier instance with the same transactional.id and
        # aborts what it left open, so a restarted worker never races its own zombie.
        # Short attempts: init_transactions serves no callbacks while it blocks, and an
        # authentication failure only surfaces through error_cb (see _Health.down).
        self.checkpoint.init(timeout=min(self.kafka_timeout, 5.0))
        cconf = consumer_conf(self.config, index=self.index, error_cb=self._on_client_error)
        self.consumer = self._client(self._consumer_factory, cconf, "consumer")
        self.checkpoint.consumer = self.consumer
        sources = self.pipeline.source_topics
        self.consumer.subscribe(
            sources, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info(
            "worker started (%s) on %s",
            self.config.processing_guarantee,
            ", ".join(sources),
            extra={
                "group_id": self.config.group_id,
                "worker": self.index,
                "transactional_id": self.transactional_id if self.exactly_once else None,
            },
        )

    def _close(self, *, clean: bool) -> None:
        c, self.consumer = self.consumer, None
        p, self.producer = self.producer, None
        if self.checkpoint is not None:
            # After a fatal error an open transaction is left as SIGKILL would leave it:
            # the next instance's init_transactions (or the transaction timeout) aborts it.
            self.checkpoint.close(clean=clean)
        if c is not None:
            try:
                c.close()  # leaves the group; on_revoke runs with nothing in flight
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer close failed: %s", _describe(exc))
        if p is not None and clean:
            p.flush(5.0)
        if not clean and self.audit is not None:
            self.audit.abandon()  # flush and release the file; no processor_stopped event
        self.observer.ready(False, "stopped")

    # -- record size and the quarantine KEK (start-up) -----------------------------------
    def _topic_limits(self, topics: Sequence[str]) -> dict[str, int | None]:
        """``max.message.bytes`` per topic (``None``: the broker does not report it).

        Retried while the broker is unreachable; a denied DescribeConfigs (an ACL without
        it) falls back to Kafka's default with a warning naming topic and operation.
        """
        from confluent_kafka.admin import AdminClient, ConfigResource

        factory = self._admin_factory or AdminClient
        # error_cb: an authentication failure stops the worker with exit 78, as elsewhere.
        conf = {**self.config.admin_config(), "error_cb": self._on_client_error}
        admin = factory(conf)
        attempt = 0
        while True:
            resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
            out: dict[str, int | None] = {}
            try:
                futures = admin.describe_configs(resources, request_timeout=self.kafka_timeout)
                for res, fut in futures.items():
                    try:
                        entries = fut.result(timeout=self.kafka_timeout)
                    except KafkaException as exc:
                        err = _err(exc)
                        if err is None or err.code() not in _AUTH_CODES:
                            raise
                        log.warning(
                            "DescribeConfigs on topic %s denied (%s); assuming Kafka's default "
                            "max.message.bytes",
                            res.name,
                            err.name(),
                            extra={"topic": res.name, "operation": "DESCRIBE_CONFIGS"},
                        )
                        out[res.name] = None
                        continue
                    entry = entries.get("max.message.bytes")
                    raw = getattr(entry, "value", None)
                    out[res.name] = int(raw) if raw not in (None, "") else None
                return out
            except (KafkaException, TimeoutError) as exc:  # TimeoutError: e.g. a login refused
                admin.poll(0)  # serve error_cb: an authentication failure?
                if self._security_error is not None:
                    raise ConfigError(self._security_error) from None
                attempt += 1
                log.warning("describe_configs: %s (attempt %d)", _describe(exc), attempt)
                self._broker_down(attempt)
                if not self._wait_plain(self.backoff.delay(attempt)):
                    raise FatalWorkerError("describe_configs: stopped while retrying") from None

    def _derive_limit(self, pconf: dict[str, Any]) -> None:
        """Set :attr:`limit` from the producer's and the topics' limits (see limits.py)."""
        written = [*self.config.destination_topics, *self.config.dead_letter_topics]
        sources = self.pipeline.source_topics
        limits = self._topic_limits([*written, *sources])
        self.limit = derive_limit(
            configured=self.config.max_record_bytes,
            producer_conf=pconf,
            topic_limits={t: limits.get(t) for t in written},
        )
        cconf = consumer_conf(self.config, index=self.index, error_cb=self._on_client_error)
        check_consumer(cconf, {t: limits.get(t) for t in sources})
        # The pipeline's own value check uses the same bound (a value alone may be too big).
        self.pipeline.max_record_bytes = self.limit.max_bytes
        self.dead_letters.limit = self.limit
        unknown = sorted(t for t in written if limits.get(t) is None)
        if unknown:
            log.info(
                "max.message.bytes not reported for %s; assuming Kafka's default",
                ", ".join(unknown),
            )
        log.info(
            "record limit %d bytes (%s)",
            self.limit.max_bytes,
            self.limit.decided_by,
            extra={"bytes": self.limit.max_bytes},
        )

    def _check_quarantine_kek(self) -> None:
        """Generate a data key under the quarantine KEK per DLQ topic.

        A KEK that does not exist or that the processor may not use is a configuration
        error (exit 78) now rather than a stalled batch at the first bad record.  An
        outage is not: the worker starts, and a dead letter that cannot be sealed waits
        out the outage like any other transient error.
        """
        try:
            self.dead_letters.check(self.config.dead_letter_topics)
        except TransientError:
            log.warning("start-up: kms unavailable; the quarantine KEK is checked when it is used")
        except KmsError as exc:
            raise ConfigError(
                f"dead_letter.kek {self.config.dead_letter_kek!r}: cannot seal dead letters "
                f"under it ({type(exc).__name__}); create it or grant the processor "
                "generate-data-key on it (docs/keys.md)"
            ) from None

    def _seal_dead_letters(
        self, result: BatchResult
    ) -> list[tuple[str, bytes | None, bytes, list[tuple[str, bytes | None]]]]:
        """``(dlq topic, key, value, headers)`` per quarantined record, in order.

        Every KMS error of the quarantine KEK is :class:`SealingUnavailable` (transient):
        the KEK is configuration, never a record's fault, so the batch waits, it does not
        exit and it does not go anywhere unsealed.
        """
        out = []
        for q in result.quarantined:
            dlq = self._dlq_for.get(q.record.topic)
            if dlq is None:
                raise InvariantViolation(
                    f"quarantined record of {q.record.topic!r} has no dead-letter topic"
                )
            try:
                key, value, headers = self.dead_letters.build(q, dlq)
            except SealingUnavailable:
                raise
            except KmsError as exc:
                raise SealingUnavailable(
                    f"dead letters for {dlq!r} under {self.config.dead_letter_kek!r}: "
                    f"{type(exc).__name__}"
                ) from None
            out.append((dlq, key, value, headers))
        return out

    def _enforce_limit(
        self, inputs: list[InputRecord]
    ) -> tuple[list[InputRecord], list[Quarantined]]:
        """Quarantine inputs (key + value + headers) over the record limit."""
        limit = self.limit
        if limit is None:
            return inputs, []
        max_bytes = limit.max_bytes
        ok: list[InputRecord] = []
        big: list[Quarantined] = []
        for rec in inputs:
            v, k = rec.value, rec.key
            # Cheap bound first: most records are far below the limit.
            if (len(v) if v else 0) + (len(k) if k else 0) + 4096 < max_bytes and not rec.headers:
                ok.append(rec)
                continue
            n = record_size(k, v, rec.headers)
            if n > max_bytes:
                big.append(Quarantined(rec, Reason.OVERSIZED, f"{n} bytes > limit {max_bytes}"))
            else:
                ok.append(rec)
        return ok, big

    def _enforce_output_limit(self, result: BatchResult, early: list[Quarantined]) -> None:
        """Dead-letter every input one of whose outputs a transform made too large.

        All or nothing per input: its other outputs are dropped too.
        """
        limit = self.limit
        if limit is not None:
            too_big: dict[int, tuple[str, int]] = {}
            for o in result.outputs:
                n = record_size(o.key, o.value, o.headers)
                if n > limit.max_bytes:
                    too_big.setdefault(id(o.source), (o.topic, n))
            if too_big:
                kept = []
                stats = result.stats
                for o in result.outputs:
                    if id(o.source) in too_big:
                        aud = next(
                            (d.audience for d in self.pipeline.destinations if d.topic == o.topic),
                            "",
                        )
                        ek = (o.topic, aud)
                        if ek in stats.egress_records:
                            stats.egress_records[ek] -= 1
                            stats.egress_bytes[ek] -= len(o.value or b"")
                    else:
                        kept.append(o)
                seen: set[int] = set()
                for o in result.outputs:
                    sid = id(o.source)
                    if sid in too_big and sid not in seen:
                        seen.add(sid)
                        topic, n = too_big[sid]
                        detail = f"output for {topic!r} is {n} bytes > limit {limit.max_bytes}"
                        early.append(Quarantined(o.source, Reason.OVERSIZED, detail))
                result.outputs = kept
        if early:
            for q in early:
                result.stats.quarantined[q.reason] = result.stats.quarantined.get(q.reason, 0) + 1
            merged = [*result.quarantined, *early]
            merged.sort(key=lambda q: (q.record.topic, q.record.partition, q.record.offset))
            result.quarantined = merged

    # -- the loop -------------------------------------------------------------------------
    def _step(self) -> None:
        assert self.consumer is not None
        msgs = self.consumer.consume(
            self.config.batch_max_records, self.config.batch_max_wait_ms / 1000.0
        )
        records = [m for m in msgs if self._check_message(m)]
        if records:
            self._broker_ok()
            self._handle(_Batch(records))
        self._report_lag()
        if self.audit is not None:
            self.audit.tick()  # the signed chain head, outside the log, when due

    def _check_message(self, m: Message) -> bool:
        err = m.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        if err.code() in _AUTHZ_OPERATION:
            self._deny(err, m.topic())
            raise ConfigError(cast(str, self._security_error))
        if _is_fatal(err):
            raise FatalWorkerError(f"consumer: {err.name()}")
        log.warning(
            "consumer error: %s", err.name(), extra={"topic": m.topic(), "partition": m.partition()}
        )
        return False

    def _handle(self, batch: _Batch) -> None:
        self._revoked_in_flight = set()
        for tp, n in _counts(batch.messages).items():
            self.observer.records_consumed(tp[0], tp[1], n)
        result = self._process(batch)
        if result is None:  # stopped while waiting out an outage: abandon (nothing produced)
            return
        if self.audit is not None and result.quarantined:
            # Audited before committed: if the write fails (fatal), the batch is redone.
            self.audit.after_batch(result.quarantined)
        if self.audit is not None and result.stats.withheld:  # consent: counts only, audited before commit
            self.audit.withheld(result.stats.withheld, self.pipeline.policy)
        assert self.checkpoint is not None
        try:
            self.checkpoint.commit(self._out_records(result), batch.last, self._owned)
        except Aborted:
            self.aborts += 1
            self._consecutive_aborts += 1
            self._rewind(batch)
            self._wait_plain(self.backoff.delay(self._consecutive_aborts))
            return
        self._consecutive_aborts = 0
        self._after_commit(batch, result)

    # -- step 2: process, retrying transient outages ------------------------------------------
    def _process(self, batch: _Batch) -> BatchResult | None:
        attempt = 0
        while True:
            batch.keep_only(self._owned - self._revoked_in_flight)
            if not batch.messages:
                self._end_backoff(batch)
                return None
            inputs, oversized = self._enforce_limit([_to_input(m) for m in batch.messages])
            t0 = time.perf_counter()
            try:
                result = self.pipeline.process(inputs)
                self._enforce_output_limit(result, oversized)
                # Sealed here, not inside the transaction: a quarantine KEK that cannot
                # seal right now is an outage to wait out like any other.
                self._dead = self._seal_dead_letters(result)
            except TransientError as exc:
                attempt += 1
                dep = dependency_of(exc)
                log.warning(
                    "transient outage (%s); pausing and retrying the batch",
                    type(exc).__name__,
                    extra={
                        "dependency": dep,
                        "attempt": attempt,
                        "records": len(inputs),
                        # value-free by construction (configured topic and KEK, error class)
                        "detail": exc.detail if isinstance(exc, SealingUnavailable) else None,
                    },
                )
                self.observer.retrying(dep, attempt)
                self._deps_down.setdefault(dep, time.monotonic())
                self._report_ready()
                self._begin_backoff()
                if not self._wait(self.backoff.delay(attempt)):
                    self._end_backoff(batch)
                    log.info("stopping during an outage; batch abandoned (offsets not committed)")
                    return None
                continue
            self.observer.batch_processed(
                result.stats, len(inputs) + len(oversized), time.perf_counter() - t0
            )
            if attempt:
                self._end_backoff(batch)
                for dep in [d for d in self._deps_down if d != "broker"]:
                    del self._deps_down[dep]
                    self.observer.dependency_restored(dep)
                self._report_ready()
                log.info("dependency recovered", extra={"attempt": attempt})
            return result

    def _begin_backoff(self) -> None:
        if self._in_backoff:
            return
        assert self.consumer is not None
        self._in_backoff = True
        self._dropped_during_backoff = {}
        parts = [TopicPartition(t, p) for t, p in sorted(self._owned)]
        if parts:
            self.consumer.pause(parts)

    def _wait(self, seconds: float) -> bool:
        """Wait while serving rebalances and group heartbeats; False if stop was requested.

        Partitions are paused, but ``consume()`` must still be called: it runs the
        rebalance callbacks and keeps ``max.poll.interval.ms`` from expiring during a long
        outage.  Anything it returns anyway (a newly assigned partition) is dropped and
        its partition rewound on resume.
        """
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            for m in self.consumer.consume(100, min(left, 0.2)):
                if m.error() is None:
                    tp, moff = _tp(m), _off(m)
                    off = self._dropped_during_backoff.get(tp)
                    if off is None or moff < off:
                        self._dropped_during_backoff[tp] = moff
        return False

    def _end_backoff(self, batch: _Batch) -> None:
        if not self._in_backoff:
            return
        assert self.consumer is not None
        self._in_backoff = False
        parts = [TopicPartition(t, p) for t, p in sorted(self._owned)]
        if parts:
            self.consumer.resume(parts)
        # Anything consume() returned while we waited is after the batch in its partition
        # (or from a newly assigned partition): seek back to the first such record.
        for tp, off in self._dropped_during_backoff.items():
            if tp in self._owned:
                self._seek(tp, off)
        self._dropped_during_backoff = {}

    # -- steps 3-7: the checkpoint ----------------------------------------------------------------
    def _out_records(self, result: BatchResult) -> list[Any]:
        """Outputs, then one dead letter per quarantined record (the produce order)."""
        if not result.quarantined:
            return result.outputs
        records: list[Any] = list(result.outputs)
        if len(self._dead) != len(result.quarantined):
            raise InvariantViolation("dead letters were not sealed for this batch")
        # Sealed in _process (under the quarantine KEK, within the record limit).
        records.extend(_DeadLetter(*d) for d in self._dead)
        return records

    def _on_delivery_error(self, err: KafkaError, topic: str | None) -> None:
        """A failed delivery (at least once): a refusal names the topic."""
        if err.code() in _AUTHZ_OPERATION:
            self._deny(err, topic, produce=True)

    def _on_txn_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """Producer-wide delivery callback (failures only) of the transactional producer."""
        if err is not None and err.code() in _AUTHZ_OPERATION:
            self._deny(err, msg.topic(), produce=True)

    # -- security: authentication and authorization ------------------------------------------
    def _principal(self) -> str:
        """Who we are to the broker, for messages: never a password."""
        acls = getattr(self.config, "acls", None)
        if acls is not None:
            return str(acls.processor)
        user = self.config.producer_config().get("sasl.username")
        return f"User:{user}" if user else "the client's principal"

    def _deny(self, err: KafkaError, topic: str | None, *, produce: bool = False) -> None:
        """Record the first broker refusal, as a message naming principal, operation, resource."""
        if self._security_error is not None:
            return
        code = err.code()
        if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            op = "WRITE" if produce else "READ"
            names = [topic] if topic else self._hidden_outputs() if produce else []
            res = f"TOPIC {', '.join(repr(t) for t in names)}" if names else "a topic"
        elif code == KafkaError.GROUP_AUTHORIZATION_FAILED:
            op, res = "READ", f"GROUP {self.config.group_id!r}"
        elif code == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            op, res = "WRITE", f"TRANSACTIONAL_ID {self.transactional_id!r}"
        else:  # CLUSTER_AUTHORIZATION_FAILED
            op, res = _AUTHZ_OPERATION[code], "the CLUSTER"
        self._security_error = (
            f"{self._principal()} is not authorized to {op} {res} ({err.name()}); "
            "grant it with `streamproc acls apply` (docs/configuration.md#acls)"
        )
        self.stop()  # run() logs it once and returns EXIT_CONFIG

    def _hidden_outputs(self) -> list[str]:
        """Output topics the broker will not even describe to us: the ones missing WRITE.

        A refused transaction says "Topic authorization failed" without naming the topic;
        Kafka implies DESCRIBE from WRITE, so a topic our principal cannot see in the
        metadata is one it cannot write.
        """
        if self.producer is None:
            return []
        try:
            visible = self.producer.list_topics(timeout=min(self.kafka_timeout, 10.0)).topics
        except KafkaException:
            return []
        outputs = [*self.config.destination_topics, *self.config.dead_letter_topics]
        if self.config.audit is not None and self.config.audit.kafka_topic:
            outputs.append(self.config.audit.kafka_topic)
        return [t for t in dict.fromkeys(outputs) if t not in visible or visible[t].error]

    def _authentication_failed(self, err: KafkaError) -> None:
        if self._security_error is not None:
            return
        conf = self.config.producer_config()
        mech = conf.get("sasl.mechanisms") or conf.get("sasl.mechanism") or "SASL"
        if err.code() == KafkaError._AUTHENTICATION:
            what = (
                f"authentication of {self._principal()} failed ({mech}, {err.name()}); "
                "check sasl.username and sasl.password"
            )
        else:
            what = (
                f"the broker's TLS certificate was not accepted ({err.name()}); check that "
                "ssl.ca.location holds the cluster's CA and the broker name matches it"
            )
        self._security_error = what
        self.stop()

    def _after_commit(self, batch: _Batch, result: BatchResult) -> None:
        self.batches_committed += 1
        self.records_committed += len(batch.messages)
        now = time.time()
        lat = [
            now - ts / 1000.0 for ts in (_timestamp(m) for m in batch.messages) if ts is not None
        ]
        if lat:
            self.observer.end_to_end_latency(lat)
        dl: dict[tuple[str, str], int] = defaultdict(int)
        for q in result.quarantined:
            dl[(q.reason.value, q.record.topic)] += 1
            log.warning(
                "record dead-lettered (%s)",
                q.detail,
                extra={
                    "reason": q.reason.value,
                    "dlq_topic": self._dlq_for.get(q.record.topic),
                    "topic": q.record.topic,
                    "partition": q.record.partition,
                    "offset": q.record.offset,
                },
            )
        for (reason, topic), n in dl.items():
            self.observer.dead_lettered(reason, topic, n)
        cache = self.pipeline.dek_cache_stats()
        self.observer.dek_cache(cache.hits, cache.misses)
        log.debug(
            "batch committed: %d outputs, %d dead letters",
            len(result.outputs),
            len(result.quarantined),
            extra={"records": len(batch.messages)},
        )

    def _rewind(self, batch: _Batch) -> None:
        """Seek every batch partition back to the batch start.

        Batches commit in order, so the batch's first offset in a partition is the last
        committed offset (or past it only by offsets that hold no data records, such as
        transaction markers): re-consuming from there redoes exactly this batch.
        """
        for tp, first in batch.first.items():
            if tp not in self._owned:
                continue  # the new owner starts from the committed offset
            committed = self._committed_offset(tp)
            if committed is not None and committed > first:
                raise InvariantViolation(
                    f"{tp[0]}[{tp[1]}]: batch starts at {first}, before the committed {committed}"
                )
            self._seek(tp, first)

    def _seek(self, tp: TP, offset: int) -> None:
        assert self.consumer is not None
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            # Seeking right after an assignment can race the fetcher start; a revoke-and-
            # reassign re-reads from the committed offsets anyway, so fail loudly instead
            # of skipping records.
            raise FatalWorkerError(f"seek {tp[0]}[{tp[1]}] to {offset}: {_describe(exc)}") from None

    def _committed_offset(self, tp: TP) -> int | None:
        return None if self.checkpoint is None else self.checkpoint.committed.get(tp)

    def _wait_plain(self, seconds: float) -> bool:
        return not self._stop.wait(seconds)

    # -- broker health -----------------------------------------------------------------------
    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's error callback: transport-level trouble (it reconnects by itself)."""
        if err.code() == KafkaError._AUTHENTICATION or (
            err.code() == KafkaError._SSL and "certificate" in (err.str() or "")
        ):
            self._authentication_failed(err)  # a restart cannot fix it: exit 78
            return
        if err.code() in _AUTHZ_OPERATION:
            self._deny(err, None)
            return
        if _is_fatal(err):
            log.error("fatal client error: %s", err.name())
            self._fatal_error = f"client: {err.name()}"
            self.stop()
            return
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            self._broker_attempt += 1
            self._broker_down(self._broker_attempt)
        else:
            log.warning("client error: %s", err.name())

    def _broker_down(self, attempt: int) -> None:
        if self._broker_down_since is None:
            self._broker_down_since = time.monotonic()
            log.warning("broker unavailable; retrying")
        self.observer.retrying("broker", attempt)
        self._deps_down.setdefault("broker", time.monotonic())
        self._report_ready()

    def _broker_ok(self) -> None:
        if self._broker_down_since is not None:
            log.info(
                "broker reachable again",
                extra={"seconds": round(time.monotonic() - self._broker_down_since, 3)},
            )
            self._broker_down_since = None
            self._broker_attempt = 0
            if self._deps_down.pop("broker", None) is not None:
                self.observer.dependency_restored("broker")
            self._report_ready()

    def _broker_answers(self) -> bool:
        """A metadata request round trip (only while the broker is believed down)."""
        assert self.consumer is not None
        try:
            self.consumer.list_topics(self.pipeline.source_topics[0], timeout=1.0)
        except KafkaException:
            return False
        return True

    def _report_ready(self) -> None:
        """Readiness from the worker's state: a dependency outage names the dependency.

        An outage outranks "no partitions": the group drops a worker that cannot reach
        the broker, and the reason an operator needs is the broker, not the symptom.
        """
        if self._deps_down:
            self.observer.ready(False, min(self._deps_down, key=self._deps_down.__getitem__))
        elif not self._owned:
            self.observer.ready(False, "no partitions")
        else:
            self.observer.ready(not self._in_backoff, "" if not self._in_backoff else "paused")

    def _report_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < self.lag_interval or self.consumer is None:
            return
        self._last_lag = now
        tick = getattr(self.observer, "tick", None)  # optional: liveness/anomaly intervals
        if tick is not None:
            tick()
        if "broker" in self._deps_down and self._broker_answers():
            self._broker_ok()  # idle partitions bring no record to say so
        if not self._owned:
            return
        parts = [TopicPartition(t, p) for t, p in sorted(self._owned)]
        try:
            positions = self.consumer.position(parts)
        except KafkaException:
            return
        lags: dict[TP, int] = {}
        for tp in positions:
            try:
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high is None or high < 0:
                continue
            pos = (
                tp.offset
                if tp.offset >= 0
                else (self._committed_offset((tp.topic, tp.partition)) or low)
            )
            lags[(tp.topic, tp.partition)] = (
                max(0, high - pos) if pos is not None and pos >= 0 else high
            )
        if lags:
            self.observer.consumer_lag(lags)

    # -- rebalance callbacks (run inside consume()) ---------------------------------------------
    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        added = {(tp.topic, tp.partition) for tp in partitions}
        self._broker_ok()  # an assignment came from the group coordinator: it answers
        self._owned |= added
        if self.checkpoint is not None:
            self.checkpoint.forget(added)  # someone else may have committed meanwhile
        log.info(
            "partitions assigned", extra={"partitions": _fmt(added), "count": len(self._owned)}
        )
        self.observer.assignment(sorted(self._owned))
        self._report_ready()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, lost=False)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, lost=True)

    def _release(self, partitions: list[TopicPartition], *, lost: bool) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        cp = self.checkpoint
        if isinstance(cp, TransactionalCheckpoint) and cp.txn_open:
            # Not reachable with this loop (no consume() inside a transaction), but if it
            # ever is: the offsets in it may be for partitions we no longer own.  Abort.
            log.warning("rebalance with an open transaction; aborting it")
            cp.abort()
        self._owned -= gone
        # A partition revoked while its records wait in hand must not be processed even
        # if it comes back: another worker may have committed past them meanwhile.
        self._revoked_in_flight |= gone
        if cp is not None:
            cp.forget(gone)
        for tp in gone:
            self._dropped_during_backoff.pop(tp, None)
        log.info(
            "partitions lost" if lost else "partitions revoked",
            extra={"partitions": _fmt(gone), "count": len(self._owned)},
        )
        self.observer.assignment(sorted(self._owned))
        self._report_ready()


# -- helpers -------------------------------------------------------------------------------------
_PROPERTY = re.compile(r'property:? "([A-Za-z0-9._-]+)"')


def _setting_error(message: str, keys: Iterable[str] = ()) -> str:
    """librdkafka's complaint about a setting, without the value it quotes.

    librdkafka says ``Invalid value "<value>" for configuration property "<name>"``; the
    value may be a SASL password or an SSL key, so only the property name is kept.  Some
    failures name the property unquoted (``ssl.ca.location failed: ...``) or not at all
    (``No provider for SASL mechanism GSSAPI``): then the configured key (``keys``) the
    message mentions is named, or the setting the message is about.
    """
    names = _PROPERTY.findall(message)
    if names and "No such configuration property" in message:
        return f"unknown librdkafka property {names[-1]!r}"
    if names:
        return f"invalid or unsupported value for librdkafka property {names[-1]!r}"
    for k in sorted((k for k in keys if isinstance(k, str)), key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", message):
            return f"librdkafka cannot use the value of {k!r} (a file it cannot read, an unsupported choice)"
    if "SASL mechanism" in message:
        return "unsupported SASL mechanism: set 'sasl.mechanisms' (e.g. SCRAM-SHA-512, PLAIN) for security.protocol SASL_*"
    return "invalid librdkafka setting (see librdkafka CONFIGURATION.md)"


def _dlq_key_token(pipeline: Pipeline) -> Callable[[bytes], bytes] | None:
    """original key -> DLQ key: a token in a domain of its own, or ``None`` (no keys)."""
    keys = getattr(pipeline, "keys", None)
    if keys is None:
        return None
    from streamproc.crypto.pseudonym import TOKEN_SALT, hkdf, make_tokenizer

    # HKDF info "dead_letter\0<domain>": outside the "audience\0..." and "shared\0..."
    # namespaces of every audience's token keys, so DLQ keys never join with any output.
    version, master = keys.master()
    tok = make_tokenizer(version, hkdf(master, TOKEN_SALT, f"dead_letter\x00{KEY_TOKEN_DOMAIN}"))
    return lambda k: tok(k).encode()


#: DescribeConfigs denied: fall back to defaults instead of refusing to start.
_AUTH_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
    }
)


def _tp(m: Message) -> TP:
    return cast(str, m.topic()), cast(int, m.partition())


def _off(m: Message) -> int:
    return cast(int, m.offset())


#: InputRecord(topic, partition, offset, key, value, timestamp_ms, headers) without the
#: frozen-dataclass __init__: the same object in about half the time (once per record).
_new_input = fast_dataclass_constructor(
    InputRecord, ("topic", "partition", "offset", "key", "value", "timestamp_ms", "headers")
)


def _to_input(m: Message) -> InputRecord:
    kind, ts = m.timestamp()
    headers = m.headers()
    return _new_input(
        m.topic(),
        m.partition(),
        m.offset(),
        m.key(),
        m.value(),
        ts if kind != 0 and ts >= 0 else None,  # 0 = TIMESTAMP_NOT_AVAILABLE
        tuple(headers) if headers else (),
    )


def _timestamp(m: Message) -> int | None:
    kind, ts = m.timestamp()
    return ts if kind != 0 and ts >= 0 else None  # 0 = TIMESTAMP_NOT_AVAILABLE


def _counts(messages: list[Message]) -> dict[TP, int]:
    out: dict[TP, int] = defaultdict(int)
    for m in messages:
        out[_tp(m)] += 1
    return out


def _fmt(tps: set[TP]) -> list[str]:
    return [f"{t}[{p}]" for t, p in sorted(tps)]


#: Broker authorization refusals and the operation each one means.  Not retried: an ACL
#: does not appear by waiting, and a worker that keeps trying looks alive while it does
#: nothing.  The commit path classifies them as DENIED (checkpoint.classify).
_AUTHZ_OPERATION = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "READ",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "READ",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "WRITE",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "IDEMPOTENT_WRITE",
}


def _err(exc: BaseException) -> KafkaError | None:
    return kafka_error(exc)


def _is_fatal(err: KafkaError) -> bool:
    """librdkafka's fatal flag, plus fencing (client and consumer errors; the commit path
    classifies with :func:`streamproc.runtime.checkpoint.classify`)."""
    return bool(err.fatal()) or err.code() in FENCED_CODES


#: Value-free description of a client error (the librdkafka error name); see checkpoint.
_describe = describe


def default_instance() -> str:
    """``STREAMPROC_INSTANCE`` or the host name: stable per pod in a StatefulSet."""
    import os
    import socket

    return os.environ.get("STREAMPROC_INSTANCE") or socket.gethostname() or "streamproc"


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FATAL",
    "EXIT_OK",
    "FatalWorkerError",
    "InvariantViolation",
    "Worker",
    "default_instance",
    "dependency_of",
]
