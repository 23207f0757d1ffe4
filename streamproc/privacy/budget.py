"""Per-subject privacy budgets: how much of one person's data an audience may receive.

A policy audience may set ``budget: {epsilon: 4.0, delta: 1e-6, window: 1d}``: over any
window of that length, the differentially private releases *about one subject* that the
audience receives must compose to at most ``(epsilon, delta)``.  Every record carrying a
subject's noised fields costs the composition of those fields' mechanisms (their epsilons
add up: several noised fields of one record are several releases).  When a record's cost
does not fit in what is left, the record's DP fields are suppressed (null) and nothing is
charged: nothing is ever released beyond the budget.

**Composition.** Two valid accountings run side by side, and a release is allowed when
either stays within the budget (both bound the same sequence of releases):

* basic composition: epsilons add, deltas add (Dwork & Roth, Thm 3.16);
* zero-concentrated DP (Bun & Steinke 2016): every release has a rho (a Gaussian
  mechanism's own rho = Delta^2 / (2 sigma^2), as OpenDP's map gives it; a pure
  epsilon-DP release is (epsilon^2 / 2)-zCDP, their Prop. 1.4), rhos add, and the total
  converts to (rho + 2 sqrt(rho ln(1/delta)), delta)-DP (their Prop. 1.3).  Only when the
  budget has a delta > 0.  Many Gaussian releases cost far less this way: 16 releases at
  rho = 0.005 each (sensitivity 1, sigma 10) are epsilon 2.18 by zCDP (delta 1e-6), but
  basic composition of their (0.43, 1e-6) guarantees gives 6.9 (and a delta of 1.6e-5).

**Windows.** The window is sliding, kept bounded: time is cut into ``buckets`` slices of
``window / buckets`` (24 by default: hours of a day), and a subject's state is the spend
of the last ``buckets + 1`` slices.  At time t the spend counted is that of every slice
that overlaps ``(t - window, t]``, a superset of the true sliding window, so the
guarantee "at most epsilon in any window-long interval" holds exactly, at the price of
refusing a little early (by at most one slice).  Slices older than that fall off; a
subject whose slices are all old has an empty state, which the runtime deletes (a
tombstone in the changelog).

**State.** :class:`SubjectState` serializes to 8 + 24 (buckets + 1) bytes
(:meth:`SubjectState.to_bytes`), designed to be the value of a compacted changelog topic
keyed by :func:`changelog_key` (the audience and a *keyed token* of the subject, never the
subject itself).  :class:`Accountant` keeps the states of the subjects it has seen,
reports which changed (:meth:`Accountant.take_dirty`, to be written in the same
transaction as the outputs) and is restored from the changelog with
:meth:`Accountant.restore`.  Exact accounting requires every record of one subject to be
handled by one worker, i.e. the input topic keyed (partitioned) by subject: two workers
holding the same subject's state would each spend the whole budget.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from streamproc.crypto.pseudonym import hmac_sha256_fn

#: A sum of float epsilons may exceed a budget it should meet by rounding (0.1 x 40).
_TOLERANCE = 1e-12
_FORMAT_VERSION = 1
_HEADER = struct.Struct(">BxxxI")  # version, bucket count (of the state's slices)
_INDEX = struct.Struct(">q")


@dataclass(frozen=True)
class Budget:
    """One audience's per-subject budget (``budget:`` in the policy)."""

    epsilon: float
    window_s: float
    delta: float = 0.0
    buckets: int = 24

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError("budget epsilon must be a positive number")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise ValueError("budget window must be positive")
        if not 0 <= self.delta < 1:
            raise ValueError("budget delta must be in [0, 1)")
        if not 1 <= self.buckets <= 1000:
            raise ValueError("budget buckets must be 1..1000")

    @property
    def slice_s(self) -> float:
        return self.window_s / self.buckets


@dataclass(frozen=True)
class Cost:
    """What one release (or one record's releases) costs.

    ``rho`` is the zCDP cost; ``None`` means "derive it": a pure epsilon-DP release
    (``delta == 0``) is (epsilon^2 / 2)-zCDP; an approximate-DP release with no stated
    rho has no zCDP bound, so it makes the zCDP accounting unusable (infinite rho).
    """

    epsilon: float
    delta: float = 0.0
    rho: float | None = None

    @property
    def zcdp(self) -> float:
        if self.rho is not None:
            return self.rho
        return self.epsilon**2 / 2 if self.delta == 0 else math.inf

    def __add__(self, other: Cost) -> Cost:
        """Basic composition (and zCDP composition of the rhos)."""
        return Cost(self.epsilon + other.epsilon, self.delta + other.delta, self.zcdp + other.zcdp)


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """(rho)-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP (Bun & Steinke, Prop. 1.3)."""
    if rho == 0:
        return 0.0
    if math.isinf(rho) or delta <= 0:
        return math.inf
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


@dataclass
class SubjectState:
    """One subject's spend per time slice: ``eps[i]``, ``delta[i]``, ``rho[i]`` for slice
    ``newest - i`` (index 0 is the newest slice)."""

    newest: int
    eps: list[float]
    delta: list[float]
    rho: list[float]
    _total: tuple[float, float, float] | None = field(default=None, compare=False, repr=False)
    """The sums of the three lists (``None``: to be computed): kept between spends, so a
    decision does not sum every slice again; dropped whenever slices fall off."""

    @classmethod
    def empty(cls, slices: int, now_slice: int) -> SubjectState:
        return cls(now_slice, [0.0] * slices, [0.0] * slices, [0.0] * slices)

    def advance(self, now_slice: int) -> None:
        """Roll the slices forward to ``now_slice``: older ones fall off the end."""
        shift = now_slice - self.newest
        if shift <= 0:
            return  # a clock that goes back never frees budget: the newest slice is charged
        n = len(self.eps)
        shift = min(shift, n)
        for arr in (self.eps, self.delta, self.rho):
            arr[:] = [0.0] * shift + arr[: n - shift]
        self.newest = now_slice
        self._total = None

    def totals(self) -> tuple[float, float, float]:
        """(epsilon, delta, rho) spent over the slices (exact sums, cached)."""
        t = self._total
        if t is None:
            t = self._total = (math.fsum(self.eps), math.fsum(self.delta), math.fsum(self.rho))
        return t

    def charge(self, cost: Cost) -> None:
        """Add ``cost`` to the newest slice (and to the cached sums)."""
        rho = cost.zcdp
        self.eps[0] += cost.epsilon
        self.delta[0] += cost.delta
        self.rho[0] += rho
        t = self._total
        if t is not None:
            # One rounding per spend on top of the exact sum: far below _TOLERANCE.
            self._total = (t[0] + cost.epsilon, t[1] + cost.delta, t[2] + rho)

    def spent(self) -> Cost:
        e, d, r = self.totals()
        return Cost(e, d, r)

    def is_empty(self) -> bool:
        return not any(self.eps) and not any(self.rho) and not any(self.delta)

    def to_bytes(self) -> bytes:
        n = len(self.eps)
        floats = struct.pack(f">{3 * n}d", *self.eps, *self.delta, *self.rho)
        return _HEADER.pack(_FORMAT_VERSION, n) + _INDEX.pack(self.newest) + floats

    @classmethod
    def from_bytes(cls, data: bytes) -> SubjectState:
        """Parse :meth:`to_bytes`; a malformed value raises ``ValueError`` (never a partial state)."""
        if len(data) < _HEADER.size + _INDEX.size:
            raise ValueError("budget state too short")
        version, n = _HEADER.unpack_from(data)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unknown budget state version {version}")
        if n < 1 or len(data) != _HEADER.size + _INDEX.size + 24 * n:
            raise ValueError("budget state length does not match its slice count")
        (newest,) = _INDEX.unpack_from(data, _HEADER.size)
        vals = struct.unpack_from(f">{3 * n}d", data, _HEADER.size + _INDEX.size)
        if not all(math.isfinite(v) and v >= 0 for v in vals):
            raise ValueError("budget state holds a negative or non-finite spend")
        return cls(newest, list(vals[:n]), list(vals[n : 2 * n]), list(vals[2 * n :]))


def changelog_key(audience: str, subject_token: bytes) -> bytes:
    """The changelog record key of a subject's state: audience, NUL, the subject's token.

    ``subject_token`` must come from a keyed function (:class:`SubjectTokens`): the
    changelog is readable by whoever runs the processor, and must not list subjects.
    """
    if "\x00" in audience:
        raise ValueError("audience names hold no NUL")
    return audience.encode() + b"\x00" + subject_token


class SubjectTokens:
    """``subject bytes -> 16-byte HMAC-SHA256 token`` under an audience-scoped secret key.

    The key must be derived from a secret (the pseudonym master through HKDF, per
    audience), so that the changelog's keys are neither the subjects nor linkable across
    audiences.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the subject token key must be at least 16 bytes")
        self._mac = hmac_sha256_fn(key)

    def __call__(self, subject: bytes) -> bytes:
        return self._mac(subject)[:16]


@dataclass
class Decision:
    released: bool
    spent: Cost
    """The subject's spend in the window after the decision."""


@dataclass
class Accountant:
    """Per-(audience, subject) budget decisions for one audience.

    ``clock`` returns seconds (the record timestamp or wall clock the runtime chooses;
    injectable for tests).  Decisions are deterministic given the states and the clock.
    """

    budget: Budget
    clock: Callable[[], float] = time.time
    states: dict[bytes, SubjectState] = field(default_factory=dict)
    dirty: set[bytes] = field(default_factory=set)
    suppressed: int = 0
    """Records whose DP fields were suppressed because the budget was spent."""

    def _slice(self, now: float) -> int:
        return math.floor(now / self.budget.slice_s)

    def _state(self, key: bytes, now_slice: int) -> SubjectState:
        st = self.states.get(key)
        if st is None:
            st = SubjectState.empty(self.budget.buckets + 1, now_slice)
            self.states[key] = st
        st.advance(now_slice)
        return st

    def fits(self, spent: Cost, cost: Cost) -> bool:
        """Whether ``spent + cost`` stays within the budget by either accounting."""
        return self._fits(spent.epsilon, spent.delta, spent.zcdp, cost)

    def _fits(self, eps: float, delta: float, rho: float, cost: Cost) -> bool:
        b = self.budget
        limit = b.epsilon * (1 + _TOLERANCE)
        if eps + cost.epsilon <= limit and delta + cost.delta <= b.delta * (1 + _TOLERANCE):
            return True
        return b.delta > 0 and zcdp_to_epsilon(rho + cost.zcdp, b.delta) <= limit

    def try_spend(self, key: bytes, cost: Cost) -> Decision:
        """Charge ``cost`` to the subject if it fits (released), else charge nothing."""
        now_slice = self._slice(self.clock())
        st = self._state(key, now_slice)
        if not self._fits(*st.totals(), cost):
            self.suppressed += 1
            return Decision(False, st.spent())
        st.charge(cost)
        self.dirty.add(key)
        return Decision(True, st.spent())

    def take_dirty(self) -> dict[bytes, bytes | None]:
        """Changed states since the last call, as changelog records (None: a tombstone,
        the state is empty).  The runtime writes them in the outputs' transaction."""
        out: dict[bytes, bytes | None] = {}
        for key in sorted(self.dirty):
            st = self.states.get(key)
            out[key] = None if st is None or st.is_empty() else st.to_bytes()
        self.dirty.clear()
        return out

    def expire(self) -> list[bytes]:
        """Forget subjects with nothing left in the window (bounded memory); returns the
        keys, whose changelog records become tombstones (also marked dirty)."""
        now_slice = self._slice(self.clock())
        gone = []
        for key, st in list(self.states.items()):
            st.advance(now_slice)
            if st.is_empty():
                del self.states[key]
                self.dirty.add(key)
                gone.append(key)
        return gone

    def restore(self, key: bytes, value: bytes | None) -> None:
        """Load one changelog record (the latest per key wins, as compaction keeps it)."""
        if value is None:
            self.states.pop(key, None)
            return
        st = SubjectState.from_bytes(value)
        if len(st.eps) != self.budget.buckets + 1:
            # The policy's slicing changed, so the stored slice index is in other units:
            # keep the whole total, conservatively, as spent in the current slice.
            total = st.spent()
            st = SubjectState.empty(self.budget.buckets + 1, self._slice(self.clock()))
            st.charge(total)
        self.states[key] = st
