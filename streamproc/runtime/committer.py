"""The commit of batch N, overlapped with consuming and processing batch N+1.

Without overlap the worker's thread idles while the broker answers
``send_offsets_to_transaction`` and ``commit_transaction`` (about 30 ms per batch on
Apache Kafka, where both go to replicated internal topics).  Processing the next batch is
pure CPU work (no Kafka I/O) and those calls release the GIL, so the two can overlap.
Exactly once is kept by these rules (docs/runtime.md, "Overlapping the commit"):

1. **Depth one, in order.**  :meth:`Committer.submit` runs steps 1-3 of the checkpoint
   (begin, produce, offsets -- :meth:`~streamproc.runtime.checkpoint.
   TransactionalCheckpoint.stage`) on the caller's thread, then hands the blocking steps
   4-5 (``complete``) to one committer thread.  Nothing else is submitted before
   :meth:`settle` returned the batch in flight: a producer has one transaction at a time,
   so nothing of N+1 is produced before N's commit returned, and at most one processed
   batch waits in memory.
2. **Rebalances join.**  ``consume()`` (which runs the rebalance callbacks) now runs while
   N commits.  ``on_revoke``/``on_lost`` call :meth:`release` first: it waits for N's
   commit to finish (as Kafka Streams commits on revoke), so partitions are never handed
   over with a transaction of ours in flight, and remembers which partitions went while
   N was in flight.  KIP-447 still fences N's offsets by the group generation taken when N
   was staged: a commit after the generation moved is refused (abortable), never applied.
3. **An abort of N discards N+1.**  :meth:`settle` returns N with its outcome; if N
   aborted, the worker drops N+1 (processed, never produced), rolls stateful
   collaborators back to the last committed epoch (which undoes N and N+1), and rewinds
   every partition of N and N+1 to N's first offset -- the last committed one, because
   batches commit in order -- except partitions revoked while N was in flight, whose
   position the reassignment reset to the committed offset already.
4. **Shutdown drains.**  The loop settles N (and commits N+1 if it was processed) before
   closing; after a fatal error, the batch in flight is waited for (bounded by the
   watchdog) but nothing more is submitted.

With ``overlap`` off the worker settles each batch right after submitting it: the old
strictly sequential loop.  Either way the blocking calls run on the committer thread and
the waiting thread asks the :class:`~streamproc.runtime.watchdog.Watchdog` whether one is
stuck (:class:`~streamproc.runtime.checkpoint.TransactionStuck`, exit 1).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamproc.runtime.batch import Batch
from streamproc.runtime.checkpoint import (
    Checkpoint,
    InvariantViolation,
    OutRecord,
    Staged,
    TransactionStuck,
)
from streamproc.runtime.watchdog import Watchdog

log = logging.getLogger("streamproc.runtime.committer")

TP = tuple[str, int]

#: The GIL switch interval with the commit overlapped (CPython's default is 5 ms).  The
#: committer thread needs the GIL back each time a client call returns, while the loop's
#: thread holds it for the CPU-bound pipeline; CPython makes a waiting thread wait up to
#: the interval for it, a few times per commit.  At 1 ms the commit is not held up by
#: processing; the interval only matters while a thread waits, so it costs the loop
#: nothing otherwise.
SWITCH_INTERVAL = 0.001


class BatchAlreadyInFlight(InvariantViolation):
    """A batch was submitted while the previous one was not settled (depth one)."""


@dataclass(eq=False)
class InFlight:
    """One submitted batch: what to report once committed, and how its commit ended."""

    batch: Batch
    #: The pipeline's result for the batch (reported once committed).
    result: Any
    staged: Staged
    #: The worker's marks of stateful collaborators before the batch (its state epoch,
    #: the pipeline's risk savepoint): what a commit or an abort of it settles.
    marks: Any = None
    #: Partitions released by a rebalance while this batch was in flight.
    revoked: set[TP] = field(default_factory=set)
    #: ``None`` once committed; else the exception the commit raised (``Aborted``: redo).
    error: BaseException | None = None
    #: Wall-clock time the commit returned (the end-to-end latency's "now").
    finished_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class Committer:
    """Runs the blocking half of each batch's commit on one thread, one batch at a time.

    ``poll`` is how often a waiting thread looks at the watchdog (seconds); ``clock`` the
    wall clock recorded when a commit returns.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        overlap: bool,
        watchdog: Watchdog | None = None,
        poll: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.checkpoint = checkpoint
        self.overlap = overlap
        self.watchdog = watchdog or checkpoint.watchdog
        self.poll = poll
        self._clock = clock
        #: The batch submitted and not yet settled (at most one).
        self.in_flight: InFlight | None = None
        self._jobs: queue.SimpleQueue[InFlight | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        if overlap:  # process-wide, and only ever lowered (see SWITCH_INTERVAL)
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        #: Batches settled; seconds the caller blocked waiting for them; seconds their
        #: commits took on the committer thread (the worker's last log line reports them).
        self.settled = 0
        self.waited = self.busy = 0.0

    def submit(
        self,
        batch: Batch,
        result: Any,
        records: Sequence[OutRecord],
        owned: set[TP] | frozenset[TP],
        marks: Any = None,
    ) -> InFlight:
        """Stage ``batch`` here (steps 1-3) and start its commit on the committer thread.

        Raises what staging raises (``Aborted``: rewind and redo this batch; a fatal
        error: stop); then nothing is in flight.
        """
        if self.in_flight is not None:
            raise BatchAlreadyInFlight("a batch was submitted before the previous one settled")
        staged = self.checkpoint.stage(records, batch.last, owned)
        job = self.in_flight = InFlight(batch, result, staged, marks)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="streamproc-commit", daemon=True
            )  # daemon: a call stuck in librdkafka must not keep the process alive
            self._thread.start()
        self._jobs.put(job)
        return job

    def settle(self) -> InFlight | None:
        """Wait for the batch in flight and take it (``None`` if there is none)."""
        job = self.in_flight
        if job is None:
            return None
        t0 = time.perf_counter()
        self._wait(job)
        self.waited += time.perf_counter() - t0
        self.settled += 1
        self.in_flight = None
        return job

    def ms_per_batch(self) -> dict[str, float]:
        """Mean milliseconds per settled batch: ``commit`` (steps 6-7 on the committer
        thread) and ``wait`` (how long the loop still blocked for it)."""
        n = max(1, self.settled)
        return {"commit": round(self.busy / n * 1e3, 3), "wait": round(self.waited / n * 1e3, 3)}

    def release(self, gone: set[TP]) -> None:
        """A rebalance takes ``gone``: let the commit in flight finish first.

        Called from ``on_revoke``/``on_lost`` before the partitions are released; the
        batch stays in flight (the worker settles it), marked with what went.
        """
        job = self.in_flight
        if job is None:
            return
        if not self._closed:  # closed: waited for already (the consumer's close revokes)
            if not job.done.is_set():
                log.info("rebalance: waiting for the commit in flight", extra={"count": len(gone)})
            self._wait(job)
        job.revoked |= gone

    def close(self) -> None:
        """Wait (bounded by the watchdog) for a commit still in flight, stop the thread.

        Used after a fatal error, when the outcome no longer matters: the batch either
        committed or left its transaction for the next instance's ``init_transactions``.
        """
        self._closed = True
        job = self.in_flight
        if job is not None:
            try:
                self._wait(job)
            except TransactionStuck as exc:
                log.error("commit still in flight at shutdown: %s", exc)
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _wait(self, job: InFlight) -> None:
        while not job.done.wait(self.poll):
            stuck = self.watchdog.overdue()
            if stuck is not None:
                raise TransactionStuck(stuck)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            t0 = time.perf_counter()
            try:
                self.checkpoint.complete(job.staged)
            except BaseException as exc:  # handed to the waiting thread, raised there
                job.error = exc
            self.busy += time.perf_counter() - t0
            job.finished_at = self._clock()
            job.done.set()


__all__ = ["BatchAlreadyInFlight", "Committer", "InFlight"]
