"""State in the transaction, the pure half: changelog writes and per-batch undo.

Some collaborators of the pipeline keep state across records (a per-subject privacy
budget, per-subject keys): in memory for speed, in a compacted Kafka *changelog* topic for
durability (the Kafka Streams state-store pattern).  Exactly once holds for that state
only if

1. every change reaches the changelog **in the same transaction** as the outputs it
   decided and the input offsets that produced them (so a crash never leaves the state
   ahead of or behind the outputs), and
2. the in-memory state **goes back** to the last committed state when a batch is not
   committed (transaction aborted, batch redone; a transient outage retries the batch):
   a redone batch must not see its own first attempt's changes, or it would charge a
   budget twice.

This module has the two pure pieces; :mod:`streamproc.runtime.state` sequences them with
the Kafka transaction (and restores the state from the changelog on assignment).

* :class:`StateWrite`: one changelog record (topic, partition, key, value; ``None`` is a
  tombstone).  A stateful collaborator returns its writes with the batch
  (:attr:`BatchResult.state_writes <streamproc.pipeline.core.BatchResult>`); the worker
  produces them in the batch's transaction.  ``partition`` is the *input* partition whose
  records caused the change (a changelog has the input's partition count): whoever owns
  input partition p owns changelog partition p, restores it on assignment and drops it on
  revocation.  ``None`` lets the producer's partitioner choose (state that is not
  partition-affine).
* :class:`Stateful`: the epoch protocol every stateful collaborator implements.  The
  runtime calls ``begin(epoch)`` before a batch is processed (epochs increase), then
  exactly one of ``committed(epoch)`` (its transaction committed), ``discard(epoch)``
  (the batch's processing failed before anything was produced: undo that batch only) or
  ``rollback()`` (a transaction aborted: undo *every* epoch not yet committed -- with a
  commit pipelined behind processing, batch N+1 may have begun on top of N's state when
  N aborts, and both are redone).
* :class:`UndoLog`: the bookkeeping behind that protocol for keyed state: before a key is
  changed for the first time in an epoch, its previous value is saved; rolling back
  restores saved values newest epoch first.  Cost: one set lookup per change.

Other users (per-subject erasure keys) reuse all three: emit :class:`StateWrite` with the
batch, implement :class:`Stateful` with an :class:`UndoLog`, and implement
:class:`~streamproc.runtime.state.ChangelogStore`'s ``restore``/``drop`` for the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class StateWrite:
    """One changelog record, produced in the batch's transaction (an ``OutRecord``)."""

    topic: str
    partition: int | None
    key: bytes
    value: bytes | None
    """``None``: a tombstone (the key's state is gone; compaction deletes it)."""
    headers: tuple[tuple[str, bytes | None], ...] = ()


class Stateful(Protocol):
    """The per-batch epoch protocol (see the module docstring)."""

    def begin(self, epoch: int) -> None: ...
    def committed(self, epoch: int) -> None: ...
    def discard(self, epoch: int) -> None: ...
    def rollback(self) -> None: ...


class UndoLog(Generic[K, V]):
    """Saved previous values per open epoch; ``restore(key, old)`` puts one back
    (``old`` is ``None`` when the key had no value: the owner deletes it)."""

    def __init__(self, restore: Callable[[K, V | None], None]) -> None:
        self._restore = restore
        self._epochs: list[tuple[int, dict[K, V | None]]] = []
        self._current: dict[K, V | None] | None = None

    def begin(self, epoch: int) -> None:
        if self._epochs and epoch <= self._epochs[-1][0]:
            raise ValueError(f"epoch {epoch} does not follow the open epoch {self._epochs[-1][0]}")
        self._current = {}
        self._epochs.append((epoch, self._current))

    def touch(self, key: K, old: Callable[[], V | None]) -> None:
        """Before changing ``key``: save its value (``old()``, a copy) once per epoch.

        Outside an epoch (restoring from the changelog, tests) nothing is saved.
        """
        cur = self._current
        if cur is not None and key not in cur:
            cur[key] = old()

    def committed(self, epoch: int) -> None:
        """Epochs up to ``epoch`` are durable: their saved values are no longer needed."""
        self._epochs = [e for e in self._epochs if e[0] > epoch]
        if not self._epochs:
            self._current = None

    def discard(self, epoch: int) -> None:
        """Undo ``epoch`` (the newest open one) alone."""
        if not self._epochs or self._epochs[-1][0] != epoch:
            raise ValueError(f"epoch {epoch} is not the newest open epoch")
        _, saved = self._epochs.pop()
        self._undo(saved)
        self._current = self._epochs[-1][1] if self._epochs else None

    def rollback(self) -> None:
        """Undo every open epoch, newest first: back to the last committed state."""
        while self._epochs:
            _, saved = self._epochs.pop()
            self._undo(saved)
        self._current = None

    def forget(self, keep: Callable[[K], bool]) -> None:
        """Drop saved values of keys ``keep`` rejects (their state was dropped)."""
        for _, saved in self._epochs:
            for k in [k for k in saved if not keep(k)]:
                del saved[k]

    @property
    def open_epochs(self) -> list[int]:
        return [e for e, _ in self._epochs]

    def _undo(self, saved: dict[K, V | None]) -> None:
        for key, old in saved.items():
            self._restore(key, old)


__all__ = ["StateWrite", "Stateful", "UndoLog"]
