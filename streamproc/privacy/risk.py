"""Re-identification risk of what an audience receives: k-anonymity, l-diversity, uniqueness.

A policy audience may name its quasi-identifiers (``quasi_identifiers: [POSTCODE,
BIRTH_DATE, GENDER]``: tags whose combined *output* values could single a person out), a
target ``k``, and optionally ``l`` over a ``sensitive`` tag.  :class:`RiskWindow` keeps the
quasi-identifier tuples (and sensitive values) of an audience's recent outputs and
measures, over that window:

* the equivalence classes (records with equal tuples) and the smallest class size: the
  window is k-anonymous for every k up to it;
* the share of records in classes smaller than the target k (the records at risk);
* the share of records whose tuple is unique in the window (class size 1);
* distinct l-diversity: the smallest number of distinct sensitive values in a class, and
  the share of records in classes with fewer than the target l.

**Sliding window, bounded memory.** Records enter with a timestamp and leave when older
than ``window_s`` or, if more than ``max_records`` are inside the window, oldest first (a
capped table with eviction).  Memory is O(``max_records``): one deque entry per record
plus one counter per distinct tuple (and per distinct sensitive value of a class).  The
measurement is *exact* over the records it holds.  The only approximation is coverage:
when the cap evicts records younger than the window (``evicted_by_cap`` counts them),
the report covers the newest ``max_records`` records (``covered_s`` < ``window_s``).  For
every record it holds, the class size it sees is a lower bound of that record's class
over the full window (removing records never merges classes or adds sensitive values),
so a record reported at risk is at risk and enforcement errs on the cautious side; the
evicted records themselves are no longer assessed.  Size the cap to the window's
expected volume (100 000 by default: about 10 MB for three short quasi-identifiers).

**Incremental.** The measurements are kept up to date on every addition and removal (a
histogram of class sizes, the records in classes below k, the unique classes, and the same
for distinct sensitive values), so :meth:`RiskWindow.report` costs O(distinct class
sizes), not O(classes): the worker reports once per batch at no cost per record.

**Savepoints.** The runtime adds a batch's outputs before its transaction commits; when
the transaction aborts, the same records come again.  :meth:`RiskWindow.savepoint` and
:meth:`RiskWindow.rollback` take a batch's records back out (newest first), so a record
is never counted twice.  Records that left by age or by the cap while the batch was
added stay gone: the window only gets smaller, which errs on the cautious side.

Values are compared as they are given (the caller passes output values, after the
policy's transformations: a suppressed value is ``None`` or ``*`` and is one value like
any other, as in ARX and pycanon).  Nothing here logs or exports a value: the report holds
counts and shares only.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

#: Enforcement actions (``risk.action``): ``suppress`` writes null for the record's
#: quasi-identifiers; ``generalize_more`` walks the policy's ladder first.
ACTIONS = ("suppress", "generalize_more")


@dataclass(frozen=True)
class RiskTarget:
    """An audience's risk settings (``risk:`` in the policy)."""

    quasi_identifiers: tuple[str, ...]
    k: int
    window_s: float
    l: int | None = None  # noqa: E741 -- the name the literature uses
    sensitive: str | None = None
    max_records: int = 100_000
    action: str | None = None
    """``None``: measure only; else one of :data:`ACTIONS` (enforce k on the outputs)."""

    def __post_init__(self) -> None:
        if not self.quasi_identifiers:
            raise ValueError("risk needs at least one quasi-identifier tag")
        if self.k < 2:
            raise ValueError("k must be at least 2")
        if (self.l is None) != (self.sensitive is None):
            raise ValueError("l and sensitive go together")
        if self.l is not None and self.l < 2:
            raise ValueError("l must be at least 2")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError("the risk window must be positive")
        if not 1 <= self.max_records <= 10_000_000:
            raise ValueError("max_records must be 1..10000000")
        if self.action is not None and self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}")


@dataclass(frozen=True)
class RiskReport:
    records: int
    classes: int
    min_class: int
    """The window's k (0 when empty)."""
    share_below_k: float
    share_unique: float
    min_l: int | None
    """Distinct l-diversity of the window (None without a sensitive attribute; 0 when empty)."""
    share_below_l: float | None
    covered_s: float
    """The time span the held records cover (less than the window when the cap evicted)."""
    k_target: int
    l_target: int | None = None

    @property
    def meets_target(self) -> bool:
        """k (and l) met by every record in the window; an empty window meets any target."""
        if self.records == 0:
            return True
        ok = self.min_class >= self.k_target
        if self.l_target is not None and self.min_l is not None:
            ok = ok and self.min_l >= self.l_target
        return ok


def _bump(hist: Counter[int], key: int, by: int) -> None:
    n = hist[key] + by
    if n:
        hist[key] = n
    else:
        del hist[key]


@dataclass
class RiskWindow:
    """The sliding window of one audience's quasi-identifier tuples (see the module doc)."""

    target: RiskTarget
    clock: Callable[[], float] = time.time
    _entries: deque[tuple[float, Hashable, Hashable]] = field(default_factory=deque)
    _classes: Counter[Hashable] = field(default_factory=Counter)
    _values: dict[Hashable, dict[Hashable, int]] = field(default_factory=dict)
    """tuple -> its sensitive values -> records: the class's distinct values are the
    inner dict's length, so l-diversity costs two lookups per record."""
    _sizes: Counter[int] = field(default_factory=Counter)
    """class size -> number of classes of that size (the smallest key is the window's k)."""
    _diversity: Counter[int] = field(default_factory=Counter)
    """distinct sensitive values -> number of classes with that many (smallest: the window's l)."""
    _below_k: int = 0
    """Records in classes smaller than the target k."""
    _below_l: int = 0
    """Records in classes with fewer distinct sensitive values than the target l."""
    evicted_by_cap: int = 0
    added: int = 0
    """Records ever added (a savepoint is a value of this counter)."""

    def add(self, qi: tuple[Hashable, ...], sensitive: Hashable = None, ts: float | None = None) -> int:
        """Add one output's tuple; returns the size of its class in the window afterwards
        (what enforcement compares with k)."""
        now = self.clock() if ts is None else ts
        entries = self._entries
        t = self.target
        if entries and entries[0][0] <= now - t.window_s:
            self._expire(now)
        if len(entries) >= t.max_records:
            self._pop()
            self.evicted_by_cap += 1
        entries.append((now, qi, sensitive))
        self.added += 1
        classes = self._classes
        c = classes[qi]
        classes[qi] = n = c + 1
        sizes = self._sizes
        if c:
            _bump(sizes, c, -1)
        sizes[n] += 1
        k = t.k
        if n < k:
            self._below_k += 1
        elif n == k:
            self._below_k -= c
        if t.sensitive is not None:
            vals = self._values.get(qi)
            if vals is None:
                vals = self._values[qi] = {}
            d = len(vals)
            vals[sensitive] = vals.get(sensitive, 0) + 1
            self._move_diversity(c, d, n, len(vals))
        return n

    def add_many(self, rows: list[tuple[tuple[Hashable, ...], Hashable]], now: float) -> None:
        """:meth:`add` for a batch of ``(tuple, sensitive)`` rows at one time (the worker's
        path: one expiry check per batch, locals bound once; same counters as :meth:`add`)."""
        t = self.target
        if t.sensitive is not None:
            self._add_many_l(rows, now)
            return
        entries = self._entries
        rows = self._make_room(rows, now)
        k = t.k
        classes, sizes = self._classes, self._sizes
        append, get = entries.append, classes.get
        below = 0
        for qi, _ in rows:
            append((now, qi, None))
            c = get(qi, 0)
            n = c + 1
            classes[qi] = n
            if c:
                m = sizes[c] - 1
                if m:
                    sizes[c] = m
                else:
                    del sizes[c]
            sizes[n] = sizes.get(n, 0) + 1
            if n < k:
                below += 1
            elif n == k:
                below -= c
        self._below_k += below

    def _make_room(
        self, rows: list[tuple[tuple[Hashable, ...], Hashable]], now: float
    ) -> list[tuple[tuple[Hashable, ...], Hashable]]:
        """Before a batch: expire by age, then evict the oldest records the cap would evict
        while adding ``rows`` one by one (the held records end the same: the newest
        ``max_records``).  Returns the rows to append (all, unless the batch alone exceeds
        the cap) and counts them all as added."""
        t = self.target
        entries = self._entries
        if entries and entries[0][0] <= now - t.window_s:
            self._expire(now)
        self.added += len(rows)
        excess = len(entries) + len(rows) - t.max_records
        if excess > 0:
            held = min(excess, len(entries))
            self._drop_oldest(held)
            self.evicted_by_cap += excess
            if excess > held:  # the batch alone is over the cap: its oldest rows never stay
                rows = rows[excess - held:]
        return rows

    def _drop_oldest(self, n: int, horizon: float | None = None) -> None:
        """Remove the ``n`` oldest records (or, with ``horizon``, those at or before it):
        :meth:`_remove` inlined, for eviction and expiry in bulk."""
        entries = self._entries
        classes, sizes, k = self._classes, self._sizes, self.target.k
        lt = self.target.l
        values, div = self._values, self._diversity
        popleft = entries.popleft
        below_k = below_l = 0
        while entries and (n > 0 if horizon is None else entries[0][0] <= horizon):
            n -= 1
            _, qi, sv = popleft()
            c = classes[qi]
            m = c - 1
            if m:
                classes[qi] = m
            else:
                del classes[qi]
            x = sizes[c] - 1
            if x:
                sizes[c] = x
            else:
                del sizes[c]
            if m:
                sizes[m] = sizes.get(m, 0) + 1
            below_k += (m if m < k else 0) - (c if c < k else 0)
            if lt is not None:
                vals = values[qi]
                d = len(vals)
                y = vals[sv] - 1
                if y:
                    vals[sv] = y
                else:
                    del vals[sv]
                d2 = len(vals)
                if not m:
                    del values[qi]
                if c:
                    z = div[d] - 1
                    if z:
                        div[d] = z
                    else:
                        del div[d]
                if m:
                    div[d2] = div.get(d2, 0) + 1
                below_l += (m if d2 < lt else 0) - (c if d < lt else 0)
        self._below_k += below_k
        self._below_l += below_l

    def _add_many_l(self, rows: list[tuple[tuple[Hashable, ...], Hashable]], now: float) -> None:
        """:meth:`add_many` with l-diversity (the same counters as :meth:`add`, inlined)."""
        t = self.target
        entries = self._entries
        rows = self._make_room(rows, now)
        k = t.k
        lt = t.l
        assert lt is not None
        classes, sizes, values, div = self._classes, self._sizes, self._values, self._diversity
        append, get, vget = entries.append, classes.get, values.get
        below_k = below_l = 0
        for qi, sv in rows:
            append((now, qi, sv))
            c = get(qi, 0)
            n = c + 1
            classes[qi] = n
            if c:
                m = sizes[c] - 1
                if m:
                    sizes[c] = m
                else:
                    del sizes[c]
                vals = vget(qi)
                assert vals is not None
            else:
                vals = values[qi] = {}
            sizes[n] = sizes.get(n, 0) + 1
            if n < k:
                below_k += 1
            elif n == k:
                below_k -= c
            d = len(vals)
            vals[sv] = vals.get(sv, 0) + 1
            d2 = len(vals)
            if d2 != d:
                if c:
                    m = div[d] - 1
                    if m:
                        div[d] = m
                    else:
                        del div[d]
                div[d2] = div.get(d2, 0) + 1
                below_l += (n if d2 < lt else 0) - (c if d < lt else 0)
            elif d < lt:
                below_l += 1
        self._below_k += below_k
        self._below_l += below_l

    def _move_diversity(self, c: int, d: int, n: int, d2: int) -> None:
        """A class went from ``c`` records with ``d`` distinct values to ``n`` with ``d2``."""
        lt = self.target.l
        assert lt is not None
        if c:
            _bump(self._diversity, d, -1)
        if n:
            self._diversity[d2] += 1
        self._below_l += (n if d2 < lt else 0) - (c if d < lt else 0)

    def class_size(self, qi: tuple[Hashable, ...]) -> int:
        return self._classes.get(qi, 0)

    @staticmethod
    def _decrement(counter: dict[Any, int], key: Any) -> int:
        n = counter[key] - 1
        if n:
            counter[key] = n
        else:
            del counter[key]
        return n

    def _remove(self, qi: Hashable, s: Hashable) -> None:
        c = self._classes[qi]
        n = self._decrement(self._classes, qi)
        _bump(self._sizes, c, -1)
        if n:
            self._sizes[n] += 1
        k = self.target.k
        self._below_k += (n if n < k else 0) - (c if c < k else 0)
        if self.target.sensitive is not None:
            vals = self._values[qi]
            d = len(vals)
            self._decrement(vals, s)
            d2 = len(vals)
            if not vals:
                del self._values[qi]
            self._move_diversity(c, d, n, d2)

    def _pop(self) -> None:
        _, qi, s = self._entries.popleft()
        self._remove(qi, s)

    def _expire(self, now: float) -> None:
        self._drop_oldest(0, now - self.target.window_s)

    def savepoint(self) -> int:
        """A mark to :meth:`rollback` to (the number of records ever added)."""
        return self.added

    def rollback(self, savepoint: int) -> int:
        """Take back every record added after ``savepoint`` (newest first); returns how
        many were still held.  Records evicted meanwhile stay gone (see the module doc)."""
        n = min(self.added - savepoint, len(self._entries))
        entries = self._entries
        for _ in range(max(0, n)):
            _, qi, s = entries.pop()
            self._remove(qi, s)
        self.added = min(self.added, max(savepoint, 0))
        return max(0, n)

    def __len__(self) -> int:
        return len(self._entries)

    def report(self, now: float | None = None) -> RiskReport:
        """The measurements over the records in the window at ``now`` (default: the clock);
        O(distinct class sizes), from the counters kept by :meth:`add`."""
        self._expire(self.clock() if now is None else now)
        t = self.target
        n = len(self._entries)
        min_l: int | None = None
        share_below_l: float | None = None
        if t.sensitive is not None:
            min_l = min(self._diversity, default=0)
            share_below_l = self._below_l / n if n else 0.0
        covered = (self._entries[-1][0] - self._entries[0][0]) if n else 0.0
        return RiskReport(
            records=n,
            classes=len(self._classes),
            min_class=min(self._sizes, default=0),
            share_below_k=self._below_k / n if n else 0.0,
            share_unique=self._sizes.get(1, 0) / n if n else 0.0,
            min_l=min_l,
            share_below_l=share_below_l,
            covered_s=covered,
            k_target=t.k,
            l_target=t.l,
        )

    def recount(self) -> RiskReport:
        """The same report computed from scratch over the held records (tests compare the
        two; never on the hot path)."""
        t = self.target
        n = len(self._entries)
        sizes = Counter(qi for _, qi, _ in self._entries)
        below_k = sum(c for c in sizes.values() if c < t.k)
        min_l: int | None = None
        share_below_l: float | None = None
        if t.sensitive is not None:
            values: dict[Hashable, set[Hashable]] = {}
            for _, qi, s in self._entries:
                values.setdefault(qi, set()).add(s)
            min_l = min((len(v) for v in values.values()), default=0)
            assert t.l is not None
            below = sum(sizes[qi] for qi, v in values.items() if len(v) < t.l)
            share_below_l = below / n if n else 0.0
        covered = (self._entries[-1][0] - self._entries[0][0]) if n else 0.0
        return RiskReport(
            records=n, classes=len(sizes), min_class=min(sizes.values(), default=0),
            share_below_k=below_k / n if n else 0.0,
            share_unique=sum(1 for c in sizes.values() if c == 1) / n if n else 0.0,
            min_l=min_l, share_below_l=share_below_l, covered_s=covered, k_target=t.k, l_target=t.l,
        )
