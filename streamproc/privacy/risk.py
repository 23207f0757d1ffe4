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
capped table with eviction).  Memory is O(``max_records``): two list slots per record
(records added together share one chunk) plus one counter per distinct tuple (and per
distinct (tuple, sensitive value) pair).  The
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
sizes), not O(classes): the worker reports once per batch at no cost per record.  The
worker's path, :meth:`RiskWindow.add_batch`, applies a batch (its additions, and the
records that expiry and the cap take out) as one net change per touched class, computed
with C-level passes (``Counter``, ``map``, ``dict.update``) instead of Python statements
per record; :meth:`RiskWindow.add` updates the same counters one record at a time.

**Savepoints.** The runtime adds a batch's outputs before its transaction commits; when
the transaction aborts, the same records come again.  :meth:`RiskWindow.savepoint` and
:meth:`RiskWindow.rollback` take a batch's records back out (newest first), so a record
is never counted twice.  Records that left by age or by the cap while the batch was
added stay gone: the window only gets smaller, which errs on the cautious side.

Values are compared as they are given, by equality (the worker passes each output's
quasi-identifier *encodings*, concatenated, and the sensitive field's encoding: equal
bytes iff equal values; the caller passes output values, after the
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
from itertools import compress, repeat
from operator import add, itemgetter, not_, sub
from typing import Any

#: Enforcement actions (``risk.action``): ``suppress`` writes null for the record's
#: quasi-identifiers; ``generalize_more`` walks the policy's ladder first; ``hold`` keeps
#: the record back (sealed, in the hold changelog) until its class reaches k in the window.
ACTIONS = ("suppress", "generalize_more", "hold")


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
    hold_max: int = 0
    """With ``action: hold``: the most records held at once (``hold.max_records``)."""

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
        if (self.action == "hold") != (self.hold_max > 0):
            raise ValueError("hold.max_records (>= 1) goes with action: hold, and only with it")
        if self.action == "hold" and self.l is not None:
            raise ValueError("action: hold does not take l (a held record's sensitive value is not kept)")


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


class _Chunk:
    """Records added at one time, oldest first: ``qis[start:]`` (and ``sens[start:]``) are
    still held.  One per batch on the worker's path, so holding a record costs two list
    slots, not a tuple and a deque entry of its own."""

    __slots__ = ("qis", "sens", "start", "ts")

    def __init__(self, ts: float, qis: list[Hashable], sens: list[Hashable] | None) -> None:
        self.ts = ts
        self.qis = qis
        self.sens = sens
        self.start = 0

    def __len__(self) -> int:
        return len(self.qis) - self.start


def _recount(counts: dict[Any, int], plus: list[Any], minus: list[Any]) -> tuple[list[Any], list[int], list[int]]:
    """Apply ``+1`` per key of ``plus`` and ``-1`` per key of ``minus`` to ``counts`` (keys
    at 0 removed); returns the keys touched and their counts before and after.  Every pass
    is a C loop (``Counter``'s counting, ``map``, ``dict.update``): the batch costs a few
    machine-level passes per record, not a Python statement per record and counter."""
    inc = Counter(plus)
    dec = Counter(minus)
    touched = list(inc.keys() | dec.keys())
    old = list(map(counts.get, touched, repeat(0)))
    new = list(map(sub, map(add, old, map(inc.get, touched, repeat(0))), map(dec.get, touched, repeat(0))))
    counts.update(zip(touched, new, strict=True))
    for key in compress(touched, map(not_, new)):
        del counts[key]
    return touched, old, new


@dataclass
class RiskWindow:
    """The sliding window of one audience's quasi-identifier tuples (see the module doc).

    A quasi-identifier "tuple" is any hashable value the caller derives from the record's
    quasi-identifiers, the same way for every record (the worker uses the concatenated
    encodings of the fields: equal values, equal bytes); the window only compares them."""

    target: RiskTarget
    clock: Callable[[], float] = time.time
    _chunks: deque[_Chunk] = field(default_factory=deque)
    _held: int = 0
    _classes: dict[Hashable, int] = field(default_factory=dict)
    """tuple -> records of that class in the window."""
    _pairs: dict[tuple[Hashable, Hashable], int] = field(default_factory=dict)
    """(tuple, sensitive value) -> records (with a sensitive attribute only)."""
    _distinct: dict[Hashable, int] = field(default_factory=dict)
    """tuple -> distinct sensitive values of its class (its pairs in ``_pairs``)."""
    _sizes: dict[int, int] = field(default_factory=dict)
    """class size -> number of classes of that size (the smallest key is the window's k)."""
    _diversity: dict[int, int] = field(default_factory=dict)
    """distinct sensitive values -> number of classes with that many (smallest: the window's l)."""
    _below_k: int = 0
    """Records in classes smaller than the target k."""
    _below_l: int = 0
    """Records in classes with fewer distinct sensitive values than the target l."""
    counts: Any = None
    """Optional: an object that keeps the counters instead of the dicts above (the compiled
    ``RiskCounts`` the pipeline passes when the extension is built; its keys must then be
    bytes).  Same methods as the Python path: ``apply``, ``step1``, ``class_size``,
    ``counters``; the tests run both against a recount."""
    evicted_by_cap: int = 0
    added: int = 0
    """Records ever added (a savepoint is a value of this counter)."""

    # -- the worker's path: a batch at a time ----------------------------------------------
    def add_batch(self, qis: list[Hashable], sens: list[Hashable] | None, now: float) -> None:
        """Add a batch of records at one time: ``qis[i]`` (and ``sens[i]`` with a sensitive
        attribute) per record.  The same window and counters as :meth:`add` one record at a
        time: expiry, then the cap's eviction of the oldest (all the cap would evict while
        adding the batch one by one), then the batch, applied as one net change per class."""
        t = self.target
        if t.sensitive is not None and (sens is None or len(sens) != len(qis)):
            raise ValueError("one sensitive value per record")
        gone_q, gone_s = self._expired(now)
        self.added += len(qis)
        excess = self._held + len(qis) - t.max_records
        if excess > 0:
            held = min(excess, self._held)
            q, s = self._take_oldest(held)
            gone_q += q
            gone_s += s
            self.evicted_by_cap += excess
            if excess > held:  # the batch alone is over the cap: its oldest rows never stay
                qis = qis[excess - held:]
                sens = None if sens is None else sens[excess - held:]
        if not qis and not gone_q:
            return
        if qis:
            qs = list(qis)
            ss = None if t.sensitive is None else list(sens or ())
            last = self._chunks[-1] if self._chunks else None
            if last is not None and last.ts == now and not last.start:
                last.qis += qs
                if ss is not None and last.sens is not None:
                    last.sens += ss
            else:
                self._chunks.append(_Chunk(now, qs, ss))
            self._held += len(qs)
        self._apply(list(qis), None if t.sensitive is None else list(sens or ()), gone_q, gone_s)

    def add_many(self, rows: list[tuple[Hashable, Hashable]], now: float) -> None:
        """:meth:`add_batch` for ``(tuple, sensitive)`` rows."""
        qis = [r[0] for r in rows]
        sens = [r[1] for r in rows] if self.target.sensitive is not None else None
        self.add_batch(qis, sens, now)

    def _apply(
        self, add_q: list[Hashable], add_s: list[Hashable] | None, rem_q: list[Hashable], rem_s: list[Hashable]
    ) -> None:
        """The counters after ``add_*`` entered and ``rem_*`` left (net, per class): the
        touched classes' (size, distinct values) before and after, counted per distinct
        pair, move the histograms and the below-k / below-l counts."""
        t = self.target
        if self.counts is not None:
            with_l = t.sensitive is not None
            self.counts.apply(add_q, add_s if with_l else None, rem_q, rem_s if with_l else None)
            return
        touched, old, new = _recount(self._classes, add_q, rem_q)
        lt = t.l
        if lt is None:
            self._move(Counter(new), Counter(old))
            return
        assert add_s is not None
        ptouched, pold, pnew = _recount(
            self._pairs,
            list(zip(add_q, add_s, strict=True)), list(zip(rem_q, rem_s, strict=True)),
        )
        # A pair at 0 before only gained records, one at 0 after only lost some (what leaves
        # was held before the batch): the pairs that came and went are the zeros.
        came = list(map(itemgetter(0), compress(ptouched, map(not_, pold))))
        went = list(map(itemgetter(0), compress(ptouched, map(not_, pnew))))
        distinct = self._distinct
        dold = list(map(distinct.get, touched, repeat(0)))
        if came or went:
            _recount(distinct, came, went)
            dnew = list(map(distinct.get, touched, repeat(0)))
        else:
            dnew = dold
        self._move(Counter(zip(new, dnew, strict=True)), Counter(zip(old, dold, strict=True)))

    def _move(self, plus: Counter[Any], minus: Counter[Any]) -> None:
        """Classes counted by size (or by (size, distinct values) with l) enter (``plus``)
        and leave (``minus``) the histograms and the below-k / below-l counts; size 0 is
        "no class".  One Python step per distinct size, not per class."""
        k, lt = self.target.k, self.target.l
        sizes, div = self._sizes, self._diversity
        bk = bl = 0
        for sign, hist in ((1, plus), (-1, minus)):
            for key, c in hist.items():
                if lt is None:
                    size, d = key, 0
                else:
                    size, d = key
                if not size:
                    continue
                m = sizes.get(size, 0) + sign * c
                if m:
                    sizes[size] = m
                else:
                    del sizes[size]
                if size < k:
                    bk += sign * c * size
                if lt is not None:
                    m = div.get(d, 0) + sign * c
                    if m:
                        div[d] = m
                    else:
                        del div[d]
                    if d < lt:
                        bl += sign * c * size
        self._below_k += bk
        self._below_l += bl

    def _take_oldest(self, n: int) -> tuple[list[Hashable], list[Hashable]]:
        """Remove the ``n`` oldest held records from the chunks; returns their tuples and
        sensitive values (the counters are the caller's)."""
        qs: list[Hashable] = []
        ss: list[Hashable] = []
        chunks = self._chunks
        while n > 0 and chunks:
            c = chunks[0]
            m = min(n, len(c))
            qs += c.qis[c.start:c.start + m]
            if c.sens is not None:
                ss += c.sens[c.start:c.start + m]
            c.start += m
            n -= m
            self._held -= m
            if c.start == len(c.qis):
                chunks.popleft()
        return qs, ss

    def _expired(self, now: float) -> tuple[list[Hashable], list[Hashable]]:
        """Take the records older than the window out of the chunks (counters: the caller's)."""
        horizon = now - self.target.window_s
        qs: list[Hashable] = []
        ss: list[Hashable] = []
        chunks = self._chunks
        while chunks and chunks[0].ts <= horizon:
            c = chunks.popleft()
            qs += c.qis[c.start:]
            if c.sens is not None:
                ss += c.sens[c.start:]
            self._held -= len(c)
        return qs, ss

    def _expire(self, now: float) -> None:
        q, s = self._expired(now)
        if q:
            self._apply([], [] if self.target.sensitive is not None else None, q, s)

    # -- one record at a time (enforcement's candidate windows, ``streamproc risk``) ----------
    def add(self, qi: Hashable, sensitive: Hashable = None, ts: float | None = None) -> int:
        """Add one output's tuple; returns the size of its class in the window afterwards
        (what enforcement compares with k)."""
        now = self.clock() if ts is None else ts
        t = self.target
        chunks = self._chunks
        if chunks and chunks[0].ts <= now - t.window_s:
            self._expire(now)
        if self._held >= t.max_records:
            q, s = self._take_oldest(1)
            self._step(q[0], s[0] if s else None, -1)
            self.evicted_by_cap += 1
        last = chunks[-1] if chunks else None
        if last is not None and last.ts == now:
            last.qis.append(qi)
            if last.sens is not None:
                last.sens.append(sensitive)
        else:
            chunks.append(_Chunk(now, [qi], None if t.sensitive is None else [sensitive]))
        self._held += 1
        self.added += 1
        return self._step(qi, sensitive, 1)

    def _step(self, qi: Hashable, s: Hashable, d: int) -> int:
        """One record of ``qi`` (with ``s``) in (``d`` = 1) or out (-1); returns the class size."""
        if self.counts is not None:
            n: int = self.counts.step1(qi, s if self.target.sensitive is not None else None, d > 0)
            return n
        classes = self._classes
        c = classes.get(qi, 0)
        n = c + d
        if n:
            classes[qi] = n
        else:
            del classes[qi]
        sizes = self._sizes
        if c:
            m = sizes[c] - 1
            if m:
                sizes[c] = m
            else:
                del sizes[c]
        if n:
            sizes[n] = sizes.get(n, 0) + 1
        k = self.target.k
        self._below_k += (n if n < k else 0) - (c if c < k else 0)
        lt = self.target.l
        if lt is not None:
            pairs = self._pairs
            p = (qi, s)
            pc = pairs.get(p, 0)
            pn = pc + d
            if pn:
                pairs[p] = pn
            else:
                del pairs[p]
            dd = self._distinct.get(qi, 0)
            dn = dd + (1 if not pc else 0) - (1 if not pn else 0)
            if dn:
                self._distinct[qi] = dn
            else:
                self._distinct.pop(qi, None)
            div = self._diversity
            if c:
                m = div[dd] - 1
                if m:
                    div[dd] = m
                else:
                    del div[dd]
            if n:
                div[dn] = div.get(dn, 0) + 1
            self._below_l += (n if dn < lt else 0) - (c if dd < lt else 0)
        return n

    def class_size(self, qi: Hashable) -> int:
        if self.counts is not None:
            n: int = self.counts.class_size(qi)
            return n
        return self._classes.get(qi, 0)

    def held(self) -> list[tuple[float, Hashable, Hashable]]:
        """The held records, oldest first, as ``(time, tuple, sensitive)`` (tests, recount)."""
        out: list[tuple[float, Hashable, Hashable]] = []
        for c in self._chunks:
            sens = c.sens[c.start:] if c.sens is not None else [None] * len(c)
            out += [(c.ts, q, s) for q, s in zip(c.qis[c.start:], sens, strict=True)]
        return out

    def newest(self) -> float | None:
        """The time of the newest record held (``None``: empty)."""
        return self._chunks[-1].ts if self._chunks else None

    def savepoint(self) -> int:
        """A mark to :meth:`rollback` to (the number of records ever added)."""
        return self.added

    def rollback(self, savepoint: int) -> int:
        """Take back every record added after ``savepoint`` (newest first); returns how
        many were still held.  Records evicted meanwhile stay gone (see the module doc)."""
        n = max(0, min(self.added - savepoint, self._held))
        qs: list[Hashable] = []
        ss: list[Hashable] = []
        chunks = self._chunks
        left = n
        while left > 0:
            c = chunks[-1]
            m = min(left, len(c))
            qs += c.qis[len(c.qis) - m:]
            del c.qis[len(c.qis) - m:]
            if c.sens is not None:
                ss += c.sens[len(c.sens) - m:]
                del c.sens[len(c.sens) - m:]
            left -= m
            self._held -= m
            if not len(c):
                chunks.pop()
        if qs:
            self._apply([], [] if self.target.sensitive is not None else None, qs, ss)
        self.added = min(self.added, max(savepoint, 0))
        return n

    def __len__(self) -> int:
        return self._held

    def report(self, now: float | None = None) -> RiskReport:
        """The measurements over the records in the window at ``now`` (default: the clock);
        O(distinct class sizes), from the counters kept by :meth:`add`."""
        self._expire(self.clock() if now is None else now)
        t = self.target
        n = self._held
        if self.counts is not None:
            classes, min_class, below_k, unique, least_l, below_l = self.counts.counters()
        else:
            classes, min_class, below_k = len(self._classes), min(self._sizes, default=0), self._below_k
            unique, least_l, below_l = self._sizes.get(1, 0), min(self._diversity, default=0), self._below_l
        min_l: int | None = None
        share_below_l: float | None = None
        if t.sensitive is not None:
            min_l = least_l
            share_below_l = below_l / n if n else 0.0
        covered = (self._chunks[-1].ts - self._chunks[0].ts) if n else 0.0
        return RiskReport(
            records=n,
            classes=classes,
            min_class=min_class,
            share_below_k=below_k / n if n else 0.0,
            share_unique=unique / n if n else 0.0,
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
        held = self.held()
        n = len(held)
        sizes = Counter(qi for _, qi, _ in held)
        below_k = sum(c for c in sizes.values() if c < t.k)
        min_l: int | None = None
        share_below_l: float | None = None
        if t.sensitive is not None:
            values: dict[Hashable, set[Hashable]] = {}
            for _, qi, s in held:
                values.setdefault(qi, set()).add(s)
            min_l = min((len(v) for v in values.values()), default=0)
            assert t.l is not None
            below = sum(sizes[qi] for qi, v in values.items() if len(v) < t.l)
            share_below_l = below / n if n else 0.0
        covered = (held[-1][0] - held[0][0]) if n else 0.0
        return RiskReport(
            records=n, classes=len(sizes), min_class=min(sizes.values(), default=0),
            share_below_k=below_k / n if n else 0.0,
            share_unique=sum(1 for c in sizes.values() if c == 1) / n if n else 0.0,
            min_l=min_l, share_below_l=share_below_l, covered_s=covered, k_target=t.k, l_target=t.l,
        )
