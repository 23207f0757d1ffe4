"""State in the transaction, the runtime half: changelog stores around the commit protocol.

A *changelog store* is a stateful pipeline collaborator whose in-memory state is backed
by a compacted Kafka topic, one changelog partition per input partition number (the Kafka
Streams state-store pattern).  The pure half -- :class:`~streamproc.pipeline.state.StateWrite`,
the epoch protocol :class:`~streamproc.pipeline.state.Stateful` and the
:class:`~streamproc.pipeline.state.UndoLog` -- lives in :mod:`streamproc.pipeline.state`.
:class:`StateStores` is the worker's collaborator that sequences it:

* **Batch epochs.**  ``begin()`` before each processing attempt (a new, increasing epoch);
  ``committed(epoch)`` after its transaction committed; ``discard(epoch)`` when the attempt
  failed before anything was produced (a transient outage: the same records are processed
  again, and must not be charged twice); ``rollback()`` when a transaction aborted (the
  batch is redone from the committed offsets, so the state returns to the last committed
  state -- every open epoch, as a pipelined commit may have begun batch N+1 on top of N).
* **In the transaction.**  The pipeline returns the batch's changelog writes in
  ``BatchResult.state_writes``; the worker hands them to the checkpoint after the outputs
  and dead letters, so they commit (or abort) with the outputs and the input offsets.  A
  write names the changelog partition (the input partition of the records that caused it):
  the checkpoint produces it there.
* **Assignment.**  When input partition number p is assigned (through any source topic),
  changelog partition p is read from the beginning to its end (``read_committed``) into the
  stores *before* any record of p is processed (:meth:`StateStores.restore_pending`, called
  by the worker before each batch).  When the last source partition numbered p is revoked
  or lost, the stores drop p's state: the next owner restores it from the changelog, which
  holds everything this worker committed.  With the default eager assignment a revocation
  happens between batches, after the last commit, so nothing is in flight.

**Reading to the end.**  The end is the partition's high watermark when the restore
starts.  With ``read_committed`` the position stops before a transaction that is still
open (a dead worker's, until the transaction is aborted by its successor or times out),
so the restore waits for it to resolve rather than miss changes a commit could still
make visible, bounded by ``restore_timeout`` (then :class:`StateUnavailable`: the worker
stops rather than process with a state it cannot prove complete).  A changelog that does
not exist, or has fewer partitions than the input, is a
:class:`~streamproc.errors.ConfigError` (exit 78: ``streamproc topics apply`` creates it
with the input's partition count).

Reuse.  Another store (per-subject erasure keys) implements :class:`ChangelogStore`
(``topic`` plus the four epoch methods plus ``restore``/``drop``), is exposed by the
pipeline in ``Pipeline.state_stores``, and returns its writes in ``state_writes``; the
worker needs no change.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

from streamproc.errors import ConfigError
from streamproc.pipeline.state import StateWrite
from streamproc.runtime.checkpoint import FatalWorkerError

log = logging.getLogger("streamproc.runtime.state")

TP = tuple[str, int]


class StateUnavailable(FatalWorkerError):
    """A changelog partition could not be read to its end (or holds a record the store
    cannot read): the worker stops rather than process without its state."""


class ChangelogStore(Protocol):
    """A stateful collaborator backed by a changelog topic (see the module docstring).

    A store whose ``partitioned`` attribute is False (the subject-key table of
    :mod:`streamproc.runtime.erasure`) takes part in the epochs and the transaction only:
    it needs its whole topic, which it restores at start and follows itself, so
    :meth:`StateStores.restore_pending` and :meth:`StateStores.released` skip it.
    """

    @property
    def topic(self) -> str: ...
    def begin(self, epoch: int) -> None: ...
    def committed(self, epoch: int) -> None: ...
    def discard(self, epoch: int) -> None: ...
    def rollback(self) -> None: ...
    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record (offset order; the last per key wins)."""
        ...

    def drop(self, partition: int) -> None:
        """Forget the state of ``partition`` (revoked: its next owner restores it)."""
        ...


class ChangelogReader(Protocol):
    """Reads changelog partitions to their end (a Kafka consumer; a fake in unit tests)."""

    def read(
        self,
        topic: str,
        partitions: Sequence[int],
        apply: Callable[[int, bytes, bytes | None], None],
        timeout: float,
    ) -> int:
        """Call ``apply(partition, key, value)`` for every record, in offset order per
        partition, up to each partition's end; return the record count.  Raises
        :class:`StateUnavailable` when the end is not reached within ``timeout``."""
        ...

    def close(self) -> None: ...


class StateStores:
    """The worker's view of every changelog store: epochs, restore and drop."""

    def __init__(
        self,
        stores: Sequence[ChangelogStore],
        reader: Callable[[], ChangelogReader] | None = None,
        *,
        restore_timeout: float = 120.0,
    ) -> None:
        if stores and reader is None:
            raise ValueError("changelog stores need a reader")
        self.stores = list(stores)
        self._reader_factory = reader
        self._reader: ChangelogReader | None = None
        self.restore_timeout = restore_timeout
        self.epoch = 0
        #: Input partition numbers whose state the stores hold (restored or pending).
        self.held: set[int] = set()
        #: Held partitions whose changelog has not been read yet.
        self.pending: set[int] = set()
        self.restored_records = 0

    def __bool__(self) -> bool:
        return bool(self.stores)

    # -- epochs -------------------------------------------------------------------------
    def begin(self) -> int:
        """Open the next epoch (one per processing attempt) and return it."""
        self.epoch += 1
        for s in self.stores:
            s.begin(self.epoch)
        return self.epoch

    def committed(self, epoch: int) -> None:
        for s in self.stores:
            s.committed(epoch)

    def discard(self, epoch: int) -> None:
        for s in self.stores:
            s.discard(epoch)

    def rollback(self) -> None:
        for s in self.stores:
            s.rollback()

    # -- assignment ---------------------------------------------------------------------
    def assigned(self, tps: Iterable[TP]) -> None:
        """Source partitions assigned: partition numbers not held yet are restored before
        their first batch."""
        if not self.stores:
            return
        new = {p for _, p in tps} - self.held
        self.held |= new
        self.pending |= new

    def released(self, owned: Iterable[TP]) -> None:
        """Source partitions revoked or lost; ``owned`` is what remains: a partition
        number no owned source partition has any more is dropped from every store."""
        if not self.stores:
            return
        gone = self.held - {p for _, p in owned}
        if not gone:
            return
        for p in sorted(gone):
            for s in self.stores:
                if getattr(s, "partitioned", True):
                    s.drop(p)
        self.held -= gone
        self.pending -= gone
        log.info("state dropped", extra={"partitions": sorted(gone)})

    def restore_pending(self) -> None:
        """Read the changelog partitions assigned since the last call into the stores."""
        if not self.pending:
            return
        assert self._reader_factory is not None
        if self._reader is None:
            self._reader = self._reader_factory()
        parts = sorted(self.pending)
        t0 = time.monotonic()
        for s in self.stores:
            if not getattr(s, "partitioned", True):
                continue  # a whole-topic table (subject keys): restored at start, followed
            n = self._reader.read(s.topic, parts, s.restore, self.restore_timeout)
            self.restored_records += n
            log.info(
                "state restored",
                extra={"topic": s.topic, "partitions": parts, "records": n,
                       "seconds": round(time.monotonic() - t0, 3)},
            )  # fmt: skip
        self.pending.clear()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def with_state(records: list[Any], writes: Sequence[StateWrite]) -> list[Any]:
    """The checkpoint's records: outputs and dead letters, then the changelog writes."""
    return [*records, *writes] if writes else records


class KafkaChangelogReader:
    """Changelog partitions read from the beginning with an assign-only consumer.

    ``read_committed``, no offsets committed (the group id, ``<group_id>.state-<random>``,
    is never used for a commit; ACLs grant READ on the prefix ``<group_id>.state-``).
    Done with a partition when its position reaches the high watermark taken when the read
    began (see the module docstring).
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        *,
        group_prefix: str,
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        from confluent_kafka import Consumer

        conf = {
            **consumer_config,
            "group.id": f"{group_prefix}.state-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
        }
        for k in ("group.instance.id", "partition.assignment.strategy"):
            conf.pop(k, None)
        self.consumer = (consumer_factory or Consumer)(conf)

    def read(
        self,
        topic: str,
        partitions: Sequence[int],
        apply: Callable[[int, bytes, bytes | None], None],
        timeout: float,
    ) -> int:
        from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

        deadline = time.monotonic() + timeout
        meta = self.consumer.list_topics(topic, timeout=max(1.0, timeout / 4)).topics.get(topic)
        # A missing or too small changelog is a deployment to fix, not an outage: exit 78.
        if meta is None or meta.error is not None or not meta.partitions:
            raise ConfigError(
                f"changelog {topic!r} does not exist or cannot be described (create it with `streamproc topics apply`)"
            )
        missing = sorted(set(partitions) - set(meta.partitions))
        if missing:
            raise ConfigError(
                f"changelog {topic!r} has {len(meta.partitions)} partitions; input partition {missing[0]} needs "
                "its own (a changelog has at least the input's partition count)"
            )
        ends: dict[int, int] = {}
        for p in partitions:
            _low, high = self.consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=max(1.0, deadline - time.monotonic()), cached=False
            )
            if high > 0:
                ends[p] = high
        if not ends:
            return 0
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(ends)])
        n = 0
        try:
            while ends:
                if time.monotonic() > deadline:
                    raise StateUnavailable(
                        f"changelog {topic!r}: partitions {sorted(ends)} not read to their end "
                        f"within {timeout:.0f}s (an open transaction of a dead worker?)"
                    )
                eof: set[int] = set()
                for m in self.consumer.consume(1000, 0.2):
                    err = m.error()
                    part = cast(int, m.partition())
                    if err is None:
                        key = m.key()
                        if key is not None:
                            try:
                                apply(part, key, m.value())
                            except ValueError as exc:  # value-free messages (the store's)
                                raise StateUnavailable(
                                    f"changelog {topic!r}[{part}] offset {m.offset()}: unreadable state ({exc})"
                                ) from None
                            n += 1
                    elif err.code() == KafkaError._PARTITION_EOF:
                        eof.add(part)
                    elif err.fatal():
                        raise StateUnavailable(f"changelog {topic!r}: {err.name()}")
                    else:
                        log.warning("changelog consumer error: %s", err.name(), extra={"topic": topic})
                if eof:
                    pos = self.consumer.position([TopicPartition(topic, p) for p in eof])
                    for tp in pos:
                        # At EOF the position is past every record the broker lets this
                        # read_committed consumer see; at or past the end taken above it
                        # has passed every transaction that was open then.
                        if tp.offset >= ends.get(tp.partition, 0):
                            ends.pop(tp.partition, None)
        finally:
            self.consumer.unassign()
        return n

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:  # closing twice, or after a fatal error
            log.debug("changelog consumer close: %s", type(exc).__name__)


__all__ = [
    "ChangelogReader",
    "ChangelogStore",
    "KafkaChangelogReader",
    "StateStores",
    "StateUnavailable",
    "with_state",
]
