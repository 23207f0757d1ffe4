"""The processor worker: consume a batch, run the pipeline, produce, commit.

One consumer + one producer, driven by one thread (the batch loop) plus the committer
thread that waits for the broker's answer to each commit.  Per batch (docs/runtime.md):

1. **Consume** up to ``batch.max_records`` records within ``batch.max_wait_ms`` from the
   owned partitions (``isolation.level=read_committed``, ``enable.auto.commit=false``).
2. **Process**: ``pipeline.process(records)`` -- pure, no Kafka I/O.  A
   :class:`~streamproc.errors.TransientError` (KMS or registry outage) pauses the
   partitions, backs off and retries *the same records* (step 2 again); nothing is
   produced and nothing goes to the DLQ for it.
3-7. **Checkpoint** (:mod:`~streamproc.runtime.checkpoint`): begin, produce outputs, dead
   letters and changelog writes, compute offsets (invariants: owned, never backwards),
   send them into the transaction (fenced by the group generation, KIP-447), commit.
   Steps 3-5 run here; the blocking 6-7 on the committer thread
   (:mod:`~streamproc.runtime.committer`) while this one consumes and processes the next
   batch (``batch.overlap_commit``, on by default): nothing of N+1 is produced before
   N's commit returned; if N aborted, N+1 is discarded and both are redone from N's
   start; a rebalance waits for the commit in flight before releasing partitions.
8. **Report** to the observer (transaction, latency, dead letters, lag, cache counters).

Failures in steps 3-7: *retriable* errors retry the same call; *abortable* ones abort and
redo the batch from its start (the last committed offset: batches commit in order);
*fatal* ones (fenced by a newer instance with the same ``transactional.id``
``<group_id>-<instance>-<index>``, an invariant violation, a call stuck past its timeout)
stop the worker with a non-zero exit and commit nothing more.

SIGTERM/SIGINT only set a flag: the loop settles the commit in flight, commits the batch
in hand (or abandons it while waiting out an outage), closes the consumer and returns 0.
The worker only sequences the steps; each concern is a collaborator in this package.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from streamproc.config import Config
from streamproc.errors import ConfigError, TransientError
from streamproc.observability import Observer
from streamproc.pipeline.core import BatchResult, Pipeline
from streamproc.runtime.access import AccessGuard
from streamproc.runtime.assignment import Assignment
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.batch import Batch
from streamproc.runtime.checkpoint import (
    Aborted,
    AtLeastOnceCheckpoint,
    Checkpoint,
    FatalWorkerError,
    InvariantViolation,
    TransactionalCheckpoint,
    describe,
)
from streamproc.runtime.client_errors import ClientErrors
from streamproc.runtime.committer import Committer
from streamproc.runtime.dlq import DeadLetterWriter, OutDeadLetter, dlq_key_token, produce_order
from streamproc.runtime.exits import EXIT_CONFIG, EXIT_FATAL, EXIT_OK, exit_code, install_stop
from streamproc.runtime.factory import WorkerAudit
from streamproc.runtime.health import CheckpointHealth, Health, dependency_of
from streamproc.runtime.kafka_conf import (
    build_client,
    consumer_conf,
    default_instance,
    producer_conf,
)
from streamproc.runtime.lag import LagReporter
from streamproc.runtime.limits import RecordLimit, enforce_output_limit, split_oversized
from streamproc.runtime.pause import Pause
from streamproc.runtime.report import report_commit
from streamproc.runtime.startup import TopicLimits, start_checks
from streamproc.runtime.state import KafkaChangelogReader, StateStores, with_state
from streamproc.runtime.watchdog import Watchdog

log = logging.getLogger("streamproc.runtime.worker")

TP = tuple[str, int]


class Worker:
    """Runs the consume-process-produce loop for one worker index of a consumer group.

    Collaborators are passed in: ``pipeline`` (built by the composition root,
    :mod:`streamproc.runtime.app`), ``observer`` (the no-op :class:`Observer` by default),
    the consumer/producer/admin factories (tests) and the audit trail.
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
        audit: WorkerAudit | None = None,
        on_started: Callable[[], None] = lambda: None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.config, self.pipeline, self.index = config, pipeline, index
        self.observer = observer or Observer()
        self._consumer_factory, self._producer_factory = consumer_factory, producer_factory
        self._admin_factory = admin_factory
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.kafka_timeout = kafka_timeout
        self.exactly_once = config.exactly_once
        self.instance = instance or default_instance()
        self.transactional_id = f"{config.group_id}-{self.instance}-{index}"
        self._stop = threading.Event()
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        #: The commit protocol (built in ``_start``, once the producer exists).
        self.checkpoint: Checkpoint | None = None
        #: Steps 6-7 on the committer thread, overlapped with the next batch (``_start``).
        self.committer: Committer | None = None
        self.watchdog = watchdog or Watchdog()
        self.access = AccessGuard(
            config, self.transactional_id, producer=lambda: self.producer, stop=self.stop,
            timeout=kafka_timeout,
        )  # fmt: skip
        self.assignment = a = Assignment(
            self.observer, consumer=lambda: self.consumer, checkpoint=lambda: self.checkpoint
        )
        owned = lambda: a.owned  # noqa: E731
        self.pause = Pause(lambda: self.consumer, owned=owned, seek=a.seek, stop=self._stop)
        self.health = a.health = Health(self.observer, owned=owned, paused=lambda: self.pause.active)
        #: Changelog-backed state of the pipeline (privacy budgets): epochs around each
        #: batch, restored on assignment, dropped on revocation (streamproc.runtime.state).
        self.state = StateStores(
            pipeline.state_stores, self._changelog_reader, restore_timeout=kafka_timeout * 4
        )
        a.on_added = self.state.assigned

        def gone(tps: set[TP]) -> None:
            self.pause.forget(tps)
            self.state.released(a.owned)

        a.on_gone = gone
        self.errors = ClientErrors(self.access, self.health, self.stop)
        self.lag = LagReporter(self.observer, lag_interval, a.committed)
        self._dlq_for = {s: p.dead_letter_topic for p in config.pipelines for s in p.sources}
        audience_of = {d.topic: d.audience for d in reversed(pipeline.destinations)}
        self._audience = lambda topic: audience_of.get(topic, "")
        self._on_started = on_started  # after the clients exist (the root passes gc.freeze)
        self.batches_committed = self.records_committed = self.aborts = 0
        self._consecutive_aborts = 0
        pipeline.instrument_kms(self.observer)  # no-op where the composition root did it
        #: The audit trail (events before commit, the signed head) or ``None``.
        self.audit = audit
        #: Every record this worker produces must fit; set at start-up (record_limit).
        self.limit: RecordLimit | None = None
        #: The current batch's sealed dead letters (built in _process, produced in step 4).
        self._dead: list[OutDeadLetter] = []
        token = dlq_key_token(pipeline)
        self.dead_letters = DeadLetterWriter(pipeline.kms, config.dead_letter_kek, key_token=token)
        if audit is not None and hasattr(self.observer, "on_anomaly"):
            self.observer.on_anomaly = audit.anomaly  # in-process detector -> anomaly events

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the current batch and exit (thread- and signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> :meth:`stop` (main thread only)."""
        install_stop(self.stop)

    def run(self) -> int:
        """Run until stopped; returns an exit code (0 clean, 1 fatal, 78 bad settings)."""
        try:
            self._start()
            while not self._stop.is_set():
                self._step()
            self._settle()  # drain: the commit in flight, before the consumer closes
            if self.access.error is not None:
                raise ConfigError(self.access.error)
            if self.errors.fatal is not None:
                raise FatalWorkerError(self.errors.fatal)
        except Exception as exc:  # every failure has its exit code and one log line
            code = exit_code(exc, self.access)
            self._close(clean=False)
            return code
        self._close(clean=True)
        if self.audit is not None:
            try:
                self.audit.stopped(self.records_committed)
            except FatalWorkerError as exc:
                log.error("fatal %s: %s", type(exc).__name__, exc)
                return EXIT_FATAL
        ms = self.committer.ms_per_batch() if self.committer is not None else {}
        log.info(
            "stopped after %d batches (%d aborted transactions; commit %.2f ms/batch, waited "
            "%.2f ms/batch)", self.batches_committed, self.aborts, ms.get("commit", 0.0),
            ms.get("wait", 0.0), extra={"records": self.records_committed, "worker": self.index},
        )  # fmt: skip
        return EXIT_OK

    def _start(self) -> None:
        self.observer.ready(False, "starting")
        if self.audit is not None:  # audited before anything is consumed
            self.audit.started(self.pipeline.policy, self.config.policy)
        eos = self.exactly_once
        pconf = producer_conf(
            self.config, index=self.index, transactional_id=self.transactional_id if eos else None,
            error_cb=self.errors.on_error,
            # Only failed deliveries call back (no per-record cost): a commit that fails
            # because a topic refused a write then names the topic.
            on_delivery=self.access.on_txn_delivery if eos else None,
        )  # fmt: skip
        self.producer = build_client(self._producer_factory, pconf, "producer")
        cconf = consumer_conf(self.config, index=self.index, error_cb=self.errors.on_error)
        admin_conf: dict[str, Any] = {**self.config.admin_config(), "error_cb": pconf["error_cb"]}
        topics = TopicLimits(
            (self._admin_factory or AdminClient)(admin_conf), timeout=self.kafka_timeout,
            backoff=self.backoff, stop=self._stop, security_error=lambda: self.access.error,
            broker_down=self.health.broker_down,
        )  # fmt: skip
        self.limit = start_checks(
            self.config, self.pipeline, self.dead_letters, topics, producer_conf=pconf,
            consumer_conf=cconf,
        )  # fmt: skip
        self.checkpoint = (TransactionalCheckpoint if eos else AtLeastOnceCheckpoint)(
            self.producer, None, timeout=self.kafka_timeout, delay=self.backoff.delay,
            stop=self._stop, observer=self.observer, transactional_id=self.transactional_id,
            health=CheckpointHealth(self.health, self.access, lambda: self.producer),
            on_delivery_error=self.access.on_delivery_error, watchdog=self.watchdog,
        )  # fmt: skip
        self.committer = Committer(self.checkpoint, overlap=self.config.batch_overlap_commit)
        self.assignment.before_release = self.committer.release  # a rebalance joins it
        # Exactly once: fences any earlier instance with the same transactional.id and
        # aborts what it left open, so a restarted worker never races its own zombie.
        # Short attempts: init_transactions serves no callbacks while it blocks, and an
        # authentication failure only surfaces through error_cb (see CheckpointHealth).
        self.checkpoint.init(timeout=min(self.kafka_timeout, 5.0))
        self.consumer = build_client(self._consumer_factory, cconf, "consumer")
        self.checkpoint.consumer = self.consumer
        sources = self.pipeline.source_topics
        a = self.assignment
        self.consumer.subscribe(
            sources, on_assign=a.on_assign, on_revoke=a.on_revoke, on_lost=a.on_lost
        )
        log.info(
            "worker started (%s) on %s", self.config.processing_guarantee, ", ".join(sources),
            extra={"group_id": self.config.group_id, "worker": self.index,
                   "transactional_id": self.transactional_id if eos else None},
        )  # fmt: skip
        self._on_started()

    def _changelog_reader(self) -> KafkaChangelogReader:
        conf = consumer_conf(self.config, index=self.index, error_cb=self.errors.on_error)
        return KafkaChangelogReader(conf, group_prefix=self.config.group_id, consumer_factory=self._consumer_factory)

    def _close(self, *, clean: bool) -> None:
        self.state.close()
        c, self.consumer = self.consumer, None
        p, self.producer = self.producer, None
        if self.committer is not None:
            self.committer.close()  # after a fatal error: let a commit in flight end first
        if self.checkpoint is not None:
            # After a fatal error an open transaction is left as SIGKILL would leave it:
            # the next instance's init_transactions (or the transaction timeout) aborts it.
            self.checkpoint.close(clean=clean)
        if c is not None:
            try:
                c.close()  # leaves the group; on_revoke runs with nothing in flight
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer close failed: %s", describe(exc))
        if p is not None and clean:
            p.flush(5.0)
        if not clean and self.audit is not None:
            self.audit.abandon()  # flush and release the file; no processor_stopped event
        self.observer.ready(False, "stopped")

    # -- the loop (steps 1, 2 and 8; 3-7 are the checkpoint) ----------------------------
    def _step(self) -> None:
        assert self.consumer is not None
        msgs = self.consumer.consume(
            self.config.batch_max_records, self.config.batch_max_wait_ms / 1000.0
        )
        records = [m for m in msgs if m.error() is None or self.errors.check_message(m)]
        if records:
            self.health.broker_ok()
            self._handle(Batch(records))
        else:
            self._settle()  # idle: report the batch in flight now, not with the next one
        if self.lag.due() and self.consumer is not None:
            tick = getattr(self.observer, "tick", None)  # optional: liveness/anomaly intervals
            if tick is not None:
                tick()
            self.health.probe_broker(self.consumer, self.pipeline.source_topics[0])
            self.lag.report(self.consumer, self.assignment.owned)
        if self.audit is not None:
            self.audit.tick()  # the signed chain head, outside the log, when due

    def _handle(self, batch: Batch) -> None:
        self.assignment.revoked_in_flight = set()
        for tp, n in batch.counts.items():
            self.observer.records_consumed(tp[0], tp[1], n)
        self.state.restore_pending()  # newly assigned partitions' state, before their records
        saved = self.pipeline.savepoint()  # the risk windows, undone if the batch aborts
        result = self._process(batch)  # while the previous batch commits
        epoch = self.state.epoch
        if not self._settle(batch) or result is None:  # None: stopped during an outage
            return
        if self.audit is not None and result.quarantined:
            # Audited before committed: if the write fails (fatal), the batch is redone.
            self.audit.after_batch(result.quarantined)
        if self.audit is not None and result.stats.withheld:  # consent: counts, pre-commit
            self.audit.withheld(result.stats.withheld, self.pipeline.policy)
        assert self.committer is not None
        try:
            records = with_state(produce_order(result, self._dead), result.state_writes)
            self.committer.submit(batch, result, records, self.assignment.owned, (epoch, saved))
        except Aborted:
            self._aborted(batch, saved=saved)
            return
        if not self.committer.overlap:
            self._settle()

    def _settle(self, held: Batch | None = None) -> bool:
        """Settle the batch in flight: report it, or rewind it with ``held`` if it aborted."""
        done = None if self.committer is None else self.committer.settle()
        if done is None:
            return True
        if done.error is not None:
            if not isinstance(done.error, Aborted):
                raise done.error
            self._aborted(done.batch, held, skip=done.revoked, saved=done.marks[1])
            return False
        self.state.committed(done.marks[0])
        self._consecutive_aborts = 0
        self.batches_committed += 1
        self.records_committed += len(done.batch.messages)
        report_commit(
            self.observer, self.pipeline, self._dlq_for, done.batch, done.result, done.finished_at
        )
        return True

    def _aborted(self, batch: Batch, held: Batch | None = None, *, skip: set[TP] = set(), saved: Any) -> None:  # noqa: B006  (read only)
        self.state.rollback()  # every epoch not committed: this batch's and ``held``'s
        self.pipeline.rollback(saved)  # risk windows as before ``batch``: counted once
        self.aborts += 1
        self._consecutive_aborts += 1
        self.assignment.rewind(batch, held, skip=skip)
        self._stop.wait(self.backoff.delay(self._consecutive_aborts))

    def _process(self, batch: Batch) -> BatchResult | None:
        """Step 2, retrying a transient outage with the partitions paused."""
        attempt = 0
        while True:
            batch.keep_only(self.assignment.owned - self.assignment.revoked_in_flight)
            if not batch.messages:
                self.pause.end()
                return None
            inputs, oversized = split_oversized(batch.inputs(), self.limit)
            t0 = time.perf_counter()
            epoch = self.state.begin()
            marks = self.pipeline.savepoint()  # risk windows: a retried batch counts once
            try:
                result = self.pipeline.process(inputs)
                enforce_output_limit(result, oversized, self.limit, self._audience)
                # Sealed here, not inside the transaction: a quarantine KEK that cannot
                # seal right now is an outage to wait out like any other.
                self._dead = self.dead_letters.seal_batch(result.quarantined, self._dlq_for)
            except TransientError as exc:
                self.state.discard(epoch)  # the same records again: charged once
                self.pipeline.rollback(marks)  # ... and counted once (dead letters may fail late)
                attempt += 1
                self.health.dependency_down(exc, attempt, len(inputs))
                if not self.pause.hold(self.backoff.delay(attempt)):
                    log.info("stopping during an outage; batch abandoned (offsets not committed)")
                    return None
                continue
            self.observer.batch_processed(
                result.stats, len(inputs) + len(oversized), time.perf_counter() - t0
            )
            if attempt:
                self.pause.end()
                self.health.dependencies_restored()
                log.info("dependency recovered", extra={"attempt": attempt})
            return result


__all__ = ["EXIT_CONFIG", "EXIT_FATAL", "EXIT_OK", "FatalWorkerError", "InvariantViolation"]
__all__ += ["Worker", "default_instance", "dependency_of"]
