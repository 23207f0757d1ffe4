"""The partitions a worker owns, kept by the rebalance callbacks, and seeking within them.

Rebalance callbacks only run inside ``consume()``.  With the commit overlapped
(:mod:`streamproc.runtime.committer`) a batch's commit may be in flight then:
:attr:`Assignment.before_release` (the committer's ``release``) waits for it before any
partition is released, so the owned set never changes under a transaction.  A partition
revoked while its records wait in hand (during an outage's backoff) is remembered in
:attr:`Assignment.revoked_in_flight`: those records must not be processed even if the
partition comes back, because another worker may have committed past them meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamproc.observability import Observer
from streamproc.runtime.batch import Batch
from streamproc.runtime.checkpoint import (
    Checkpoint,
    FatalWorkerError,
    InvariantViolation,
    TransactionalCheckpoint,
    describe,
)
from streamproc.runtime.health import Health

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before

TP = tuple[str, int]


def _fmt(tps: set[TP]) -> list[str]:
    return [f"{t}[{p}]" for t, p in sorted(tps)]


class Assignment:
    """Owned partitions, the consumer's rebalance callbacks, seek and rewind.

    ``consumer`` and ``checkpoint`` return the worker's current ones (``None`` before
    start); ``forget`` is called with the partitions that went away (the pause's
    bookkeeping).
    """

    def __init__(
        self,
        observer: Observer,
        *,
        consumer: Callable[[], Consumer | None],
        checkpoint: Callable[[], Checkpoint | None],
    ) -> None:
        self.observer = observer
        self._consumer = consumer
        self._checkpoint = checkpoint
        self.owned: set[TP] = set()
        self.revoked_in_flight: set[TP] = set()
        #: Set by the worker once its health and pause exist (they read :attr:`owned`).
        self.health: Health | None = None
        self.on_gone: Callable[[set[TP]], None] = lambda _gone: None
        #: Called with the partitions assigned (the worker's changelog stores restore them).
        self.on_added: Callable[[set[TP]], None] = lambda _added: None
        #: Called first on revoke/lost: waits for the commit in flight (the committer).
        self.before_release: Callable[[set[TP]], None] = lambda _gone: None

    def committed(self, tp: TP) -> int | None:
        cp = self._checkpoint()
        return None if cp is None else cp.committed.get(tp)

    def on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        added = {(tp.topic, tp.partition) for tp in partitions}
        if self.health is not None:
            self.health.broker_ok()  # an assignment came from the group coordinator
        self.owned |= added
        self.on_added(added)
        cp = self._checkpoint()
        if cp is not None:
            cp.forget(added)  # someone else may have committed meanwhile
        log.info("partitions assigned", extra={"partitions": _fmt(added), "count": len(self.owned)})
        self.observer.assignment(sorted(self.owned))
        if self.health is not None:
            self.health.ready()

    def on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, lost=False)

    def on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, lost=True)

    def _release(self, partitions: list[TopicPartition], *, lost: bool) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.before_release(gone)  # the commit in flight finishes first
        cp = self._checkpoint()
        if isinstance(cp, TransactionalCheckpoint) and cp.txn_open:
            # Not reachable (no consume() between staging and settling a batch but the
            # joined one above), but if it ever is: the offsets in it may be for
            # partitions we no longer own.  Abort.
            log.warning("rebalance with an open transaction; aborting it")
            cp.abort()
        self.owned -= gone
        self.revoked_in_flight |= gone
        if cp is not None:
            cp.forget(gone)
        self.on_gone(gone)
        log.info(
            "partitions lost" if lost else "partitions revoked",
            extra={"partitions": _fmt(gone), "count": len(self.owned)},
        )
        self.observer.assignment(sorted(self.owned))
        if self.health is not None:
            self.health.ready()

    def rewind(
        self, batch: Batch, later: Batch | None = None, *, skip: set[TP] | frozenset[TP] = frozenset()
    ) -> None:
        """Seek every batch partition back to the batch start.

        Batches commit in order, so the batch's first offset in a partition is the last
        committed offset (or past it only by offsets that hold no data records, such as
        transaction markers): re-consuming from there redoes exactly this batch.

        ``later``: the next batch, processed while ``batch`` was committing and discarded
        with it; its partitions go back to its own start unless ``batch`` had records
        there (then to ``batch``'s, which is earlier).  ``skip``: partitions of ``batch``
        revoked meanwhile; a reassignment restarted them at the committed offset already,
        and any records of them in ``later`` were read from there.
        """
        targets = {} if later is None else dict(later.first)
        targets.update((tp, off) for tp, off in batch.first.items() if tp not in skip)
        for tp, first in targets.items():
            if tp not in self.owned:
                continue  # the new owner starts from the committed offset
            committed = self.committed(tp)
            if committed is not None and committed > first:
                raise InvariantViolation(
                    f"{tp[0]}[{tp[1]}]: batch starts at {first}, before the committed {committed}"
                )
            self.seek(tp, first)

    def seek(self, tp: TP, offset: int) -> None:
        consumer = self._consumer()
        assert consumer is not None
        try:
            consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as exc:
            # Seeking right after an assignment can race the fetcher start; a revoke-and-
            # reassign re-reads from the committed offsets anyway, so fail loudly instead
            # of skipping records.
            raise FatalWorkerError(f"seek {tp[0]}[{tp[1]}] to {offset}: {describe(exc)}") from None
