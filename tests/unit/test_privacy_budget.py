"""Per-subject privacy budgets (streamproc.privacy.budget), with an injected clock.

Expected values are computed independently: counts by hand, the sliding-window guarantee
by brute force over every instant, the zCDP side against OpenDP's own composition and
zCDP -> (epsilon, delta) conversion.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.privacy.budget import (
    Accountant,
    Budget,
    Cost,
    SubjectState,
    SubjectTokens,
    changelog_key,
    zcdp_to_epsilon,
)

DAY = 86_400.0
HOUR = 3_600.0


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_budget_exhausts_then_suppresses_without_charging() -> None:
    clock = Clock()
    acc = Accountant(Budget(epsilon=4.0, window_s=DAY), clock)
    alice, bob = b"a\x00tok-alice", b"a\x00tok-bob"
    got = [acc.try_spend(alice, Cost(1.0)).released for _ in range(6)]
    assert got == [True, True, True, True, False, False]
    assert acc.suppressed == 2
    # suppressed records charged nothing, and another subject has its own budget
    assert acc.states[alice].spent().epsilon == 4.0
    assert all(acc.try_spend(bob, Cost(1.0)).released for _ in range(4))
    # a record that does not fit is refused whole, a smaller one may still fit
    acc2 = Accountant(Budget(epsilon=1.0, window_s=DAY), clock)
    assert acc2.try_spend(alice, Cost(0.7)).released
    assert not acc2.try_spend(alice, Cost(0.5)).released
    assert acc2.try_spend(alice, Cost(0.3)).released


def test_float_sums_do_not_lose_the_last_release() -> None:
    acc = Accountant(Budget(epsilon=4.0, window_s=DAY), Clock())
    got = [acc.try_spend(b"k", Cost(0.1)).released for _ in range(41)]
    assert got.count(True) == 40 and got[-1] is False  # 0.1 x 40 is 4.000000000000001 in floats


def test_window_rolls_over_one_slice_late_never_early() -> None:
    clock = Clock(0.0)
    acc = Accountant(Budget(epsilon=2.0, window_s=DAY, buckets=24), clock)
    assert acc.try_spend(b"k", Cost(2.0)).released
    for t in (HOUR, 12 * HOUR, DAY - 1, DAY + 0.5 * HOUR, 25 * HOUR - 1):
        clock.t = t
        assert not acc.try_spend(b"k", Cost(0.5)).released, t
    clock.t = 25 * HOUR  # the slice [0, 1h) no longer overlaps (t - 1d, t]
    assert acc.try_spend(b"k", Cost(2.0)).released
    clock.t = 49 * HOUR - 1  # the spend at 25h still counts
    assert acc.expire() == [] and not acc.try_spend(b"k", Cost(0.1)).released
    clock.t = 10 * DAY  # long after: everything has rolled off, the subject is forgotten
    assert acc.expire() == [b"k"] and acc.states == {}


def test_a_clock_going_back_frees_nothing() -> None:
    clock = Clock(10 * DAY)
    acc = Accountant(Budget(epsilon=1.0, window_s=DAY), clock)
    assert acc.try_spend(b"k", Cost(1.0)).released
    clock.t = 5 * DAY
    assert not acc.try_spend(b"k", Cost(0.1)).released


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.floats(0, 5 * DAY), st.sampled_from([0.25, 0.5, 1.0, 1.5])), min_size=1, max_size=60
    ),
    buckets=st.sampled_from([1, 4, 24]),
)
def test_no_window_long_interval_ever_exceeds_the_budget(events: list[tuple[float, float]], buckets: int) -> None:
    """Brute force: after any sequence, every interval (t - W, t] holds at most epsilon of
    released cost (checked at every release instant, where the sum peaks)."""
    eps = 2.0
    clock = Clock()
    acc = Accountant(Budget(epsilon=eps, window_s=DAY, buckets=buckets), clock)
    released: list[tuple[float, float]] = []
    for t, c in sorted(events):
        clock.t = t
        if acc.try_spend(b"k", Cost(c)).released:
            released.append((t, c))
    for t, _ in released:
        total = sum(c for u, c in released if t - DAY < u <= t)
        assert total <= eps + 1e-9


def test_zcdp_composes_gaussian_releases_tighter_than_basic() -> None:
    dp = pytest.importorskip("opendp.prelude")
    dp.enable_features("contrib")
    # one Gaussian release: sensitivity 1, sigma 10 -> rho = 1/200 (OpenDP's map)
    g = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), 10.0)
    rho = float(g.map(1.0))
    assert rho == pytest.approx(0.005)
    delta = 1e-6
    eps_one = float(dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(g), delta).map(1.0)[0])
    budget = Budget(epsilon=2.5, window_s=DAY, delta=delta)
    acc = Accountant(budget, Clock())
    n = 0
    while acc.try_spend(b"k", Cost(eps_one, delta, rho)).released:
        n += 1
    # basic composition allows one release (deltas add: 2 x 1e-6 > 1e-6); even ignoring
    # delta, only floor(2.5 / 0.43) = 5.  zCDP allows 20.
    assert n >= 4 * math.floor(2.5 / eps_one)
    # safety, by OpenDP: n releases composed and converted stay within (2.5, 1e-6)
    comp = dp.c.make_composition([g] * n)
    eps_n = float(dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(comp), delta).map(1.0)[0])
    assert eps_n <= 2.5
    # and one more would exceed the budget by the (looser) closed form the accountant uses
    assert zcdp_to_epsilon((n + 1) * rho, delta) > 2.5
    # the closed form is never tighter than OpenDP's conversion (it is the conservative one)
    assert zcdp_to_epsilon(n * rho, delta) >= eps_n


def test_pure_epsilon_releases_count_in_zcdp_as_eps_squared_over_two() -> None:
    c = Cost(0.1) + Cost(0.1)
    assert c.epsilon == pytest.approx(0.2) and c.zcdp == pytest.approx(0.01)
    assert Cost(1.0, 1e-6).zcdp == math.inf  # approximate DP without a rho has no zCDP bound


def test_state_survives_serialization_and_restore_elsewhere() -> None:
    """What the changelog gives another worker after a rebalance: no double spend."""
    clock = Clock(3 * DAY)
    a = Accountant(Budget(epsilon=4.0, window_s=DAY), clock)
    key = changelog_key("analytics", SubjectTokens(os.urandom(32))(b"cust-1"))
    for _ in range(3):
        assert a.try_spend(key, Cost(1.0)).released
    records = a.take_dirty()
    assert list(records) == [key] and a.take_dirty() == {}
    b = Accountant(Budget(epsilon=4.0, window_s=DAY), clock)
    for k, v in records.items():
        b.restore(k, v)
    assert b.try_spend(key, Cost(1.0)).released
    assert not b.try_spend(key, Cost(1.0)).released
    # the bytes are compact and exact
    value = records[key]
    assert value is not None and len(value) == 16 + 24 * 25
    st_ = SubjectState.from_bytes(value)
    assert st_.to_bytes() == value and st_.spent().epsilon == 3.0


def test_restore_with_other_slicing_keeps_the_total() -> None:
    clock = Clock(DAY)
    a = Accountant(Budget(epsilon=4.0, window_s=DAY, buckets=24), clock)
    a.try_spend(b"k", Cost(3.0))
    b = Accountant(Budget(epsilon=4.0, window_s=DAY, buckets=4), clock)
    b.restore(b"k", a.take_dirty()[b"k"])
    assert not b.try_spend(b"k", Cost(1.5)).released
    assert b.try_spend(b"k", Cost(1.0)).released


@pytest.mark.parametrize(
    "value",
    [b"", b"\x01", b"\x02\x00\x00\x00\x00\x00\x00\x01" + bytes(8) + bytes(24),
     b"\x01\x00\x00\x00\x00\x00\x00\x02" + bytes(8) + bytes(24),
     b"\x01\x00\x00\x00\x00\x00\x00\x01" + bytes(8) + b"\xff" * 8 + bytes(16)],
)
def test_malformed_state_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        SubjectState.from_bytes(value)


def test_expired_subjects_are_forgotten_and_tombstoned() -> None:
    clock = Clock(0.0)
    acc = Accountant(Budget(epsilon=1.0, window_s=HOUR, buckets=4), clock)
    acc.try_spend(b"old", Cost(0.5))
    acc.take_dirty()
    clock.t = 2 * HOUR
    acc.try_spend(b"new", Cost(0.5))
    assert acc.expire() == [b"old"]
    assert set(acc.states) == {b"new"}
    assert acc.take_dirty() == {b"new": acc.states[b"new"].to_bytes(), b"old": None}
    acc.restore(b"new", None)
    assert acc.states == {}


def test_changelog_keys_hold_no_subject_and_differ_per_key() -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    t1 = SubjectTokens(k1)(b"customer-12345")
    assert t1 == SubjectTokens(k1)(b"customer-12345") and len(t1) == 16
    assert t1 != SubjectTokens(k2)(b"customer-12345")
    key = changelog_key("fraud", t1)
    assert b"customer-12345" not in key and key.startswith(b"fraud\x00")
    with pytest.raises(ValueError):
        SubjectTokens(b"short")
    with pytest.raises(ValueError):
        Budget(epsilon=0, window_s=DAY)
