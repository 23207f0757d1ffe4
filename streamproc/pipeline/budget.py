"""Per-subject privacy budgets in the pipeline: the accountants of every budgeted audience.

:class:`BudgetBook` is what :class:`~streamproc.pipeline.core.Pipeline` asks, per record of
an audience with ``budget:``, whether the record's DP releases still fit the subject's
budget (:mod:`streamproc.privacy.budget` decides).  It is also a changelog store
(:mod:`streamproc.pipeline.state`, :mod:`streamproc.runtime.state`):

* **Per input partition.**  One :class:`~streamproc.privacy.budget.Accountant` per
  (audience, input partition): a subject's state lives with the partition its records
  come from, and its changelog record goes to the same partition number of the changelog
  topic.  Whoever owns input partition p owns that state: it is restored when p is
  assigned and dropped when p is revoked.  Accounting is exact when every record of a
  subject lands in one partition (inputs keyed by subject); otherwise each partition that
  sees the subject keeps its own state, and the subject may receive up to the budget once
  per such partition (docs/policy.md).
* **Keys.**  A changelog key is ``audience NUL token``, the token a keyed HMAC of the
  subject under a per-audience key derived from the pseudonym master
  (:meth:`~streamproc.crypto.pseudonym.PseudonymKeys.budget_key`): the changelog never
  lists subjects, and two audiences' keys for one subject do not match.
* **Epochs.**  Every state change of a batch is undone when the batch is not committed
  (:class:`~streamproc.pipeline.state.UndoLog`), so a redone batch is charged once.
* **Writes.**  :meth:`writes` returns the batch's changed states (and tombstones for
  subjects whose window emptied, swept once per time slice) as
  :class:`~streamproc.pipeline.state.StateWrite` records for the batch's transaction.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping

from streamproc.pipeline.state import StateWrite, UndoLog
from streamproc.privacy.budget import (
    Accountant,
    Budget,
    Cost,
    SubjectState,
    SubjectTokens,
    changelog_key,
)

log = logging.getLogger("streamproc.pipeline.budget")

#: Why a budgeted audience got a record's DP fields as null (``BatchStats.dp_suppressed``,
#: the ``reason`` of ``streamproc_dp_budget_suppressed_total``): the subject's budget is
#: spent, the record has no subject to account against, or the suppressed variant itself
#: failed and the record was withheld from the audience instead.  A closed set: metric
#: labels outside it are refused.
EXHAUSTED, NO_SUBJECT, WITHHELD = "exhausted", "no_subject", "withheld"
SUPPRESSED_REASONS = (EXHAUSTED, NO_SUBJECT, WITHHELD)

_Key = tuple[str, int, bytes]  # (audience, input partition, changelog key)


def _copy(st: SubjectState | None) -> SubjectState | None:
    return None if st is None else SubjectState(st.newest, st.eps[:], st.delta[:], st.rho[:])


class BudgetBook:
    """The budgets of every budgeted audience, per input partition (see the module doc)."""

    def __init__(
        self,
        topic: str,
        budgets: Mapping[str, Budget],
        token_keys: Mapping[str, bytes],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if set(token_keys) != set(budgets):
            raise ValueError("every budgeted audience needs a token key")
        self.topic = topic
        self.budgets = dict(budgets)
        self._tokens = {aud: SubjectTokens(k) for aud, k in token_keys.items()}
        self._clock = clock
        self._acc: dict[tuple[str, int], Accountant] = {}
        self._undo: UndoLog[_Key, SubjectState] = UndoLog(self._put)
        #: Sweep for emptied states once per the shortest time slice.
        self._sweep_every = min(b.slice_s for b in budgets.values()) if budgets else 0.0
        self._swept = clock()
        self.restored = 0

    # -- decisions -----------------------------------------------------------------------
    def key(self, audience: str, subject: bytes) -> bytes:
        """The changelog key of ``subject`` in ``audience`` (a keyed token, never the subject)."""
        return changelog_key(audience, self._tokens[audience](subject))

    def spend(self, audience: str, partition: int, key: bytes, cost: Cost) -> bool:
        """Charge ``cost`` to the subject if it fits its budget; ``False``: suppress."""
        acc = self._accountant(audience, partition)
        states = acc.states
        self._undo.touch((audience, partition, key), lambda: _copy(states.get(key)))
        return acc.try_spend(key, cost).released

    def _accountant(self, audience: str, partition: int) -> Accountant:
        acc = self._acc.get((audience, partition))
        if acc is None:
            acc = self._acc[(audience, partition)] = Accountant(self.budgets[audience], self._clock)
        return acc

    def writes(self) -> list[StateWrite]:
        """The changed states since the last call (tombstones for emptied ones)."""
        now = self._clock()
        if now - self._swept >= self._sweep_every:
            self._swept = now
            self._sweep()
        out: list[StateWrite] = []
        for (_aud, part), acc in self._acc.items():
            if acc.dirty:
                for key, value in acc.take_dirty().items():
                    out.append(StateWrite(self.topic, part, key, value))
        return out

    def _sweep(self) -> None:
        """Forget subjects with nothing spent in the window (bounded memory); their
        changelog records become tombstones."""
        for (aud, part), acc in self._acc.items():
            now_slice = acc._slice(self._clock())
            for key, st in list(acc.states.items()):
                st.advance(now_slice)
                if st.is_empty():
                    self._undo.touch((aud, part, key), functools.partial(_copy, st))
            acc.expire()

    @property
    def subjects(self) -> int:
        """Subject states held (all audiences and partitions)."""
        return sum(len(a.states) for a in self._acc.values())

    # -- the epoch protocol (streamproc.pipeline.state) -----------------------------------
    def begin(self, epoch: int) -> None:
        self._undo.begin(epoch)

    def committed(self, epoch: int) -> None:
        self._undo.committed(epoch)

    def discard(self, epoch: int) -> None:
        self._clear_dirty()
        self._undo.discard(epoch)

    def rollback(self) -> None:
        self._clear_dirty()
        self._undo.rollback()

    def _clear_dirty(self) -> None:
        for acc in self._acc.values():
            acc.dirty.clear()

    def _put(self, k: _Key, old: SubjectState | None) -> None:
        aud, part, key = k
        acc = self._acc.get((aud, part))
        if acc is None:
            return  # the partition was dropped meanwhile
        if old is None:
            acc.states.pop(key, None)
        else:
            acc.states[key] = old

    # -- the changelog (streamproc.runtime.state.ChangelogStore) --------------------------
    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record of ``partition`` (offset order: the last wins).

        A record of an audience that no longer has a budget is skipped; a malformed state
        raises ``ValueError`` (the worker stops: a budget it cannot read is not reset).
        """
        aud = key.partition(b"\x00")[0].decode("utf-8", "replace")
        if aud not in self.budgets:
            return
        self._accountant(aud, partition).restore(key, value)
        self.restored += 1

    def drop(self, partition: int) -> None:
        """Forget ``partition``'s states (revoked: the next owner restores them)."""
        for k in [k for k in self._acc if k[1] == partition]:
            del self._acc[k]
        self._undo.forget(lambda k: k[1] != partition)


__all__ = ["EXHAUSTED", "NO_SUBJECT", "SUPPRESSED_REASONS", "WITHHELD", "BudgetBook"]
