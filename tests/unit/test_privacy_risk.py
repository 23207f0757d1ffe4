"""k-anonymity / l-diversity / uniqueness over a sliding window (streamproc.privacy.risk),
cross-checked against pycanon (a library made for the field) on the same window."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.pipeline import native
from streamproc.privacy.risk import RiskTarget, RiskWindow

pd = pytest.importorskip("pandas")
anonymity = pytest.importorskip("pycanon.anonymity")

QI = ("POSTCODE", "BIRTH_YEAR", "GENDER")


def pycanon_k_l(rows: list[tuple[Any, ...]], sens: list[Any] | None) -> tuple[int, int | None]:
    df = pd.DataFrame(rows, columns=list(QI))
    qi = list(QI)
    k = int(anonymity.k_anonymity(df, qi))
    if sens is None:
        return k, None
    df["DIAGNOSIS"] = sens
    return k, int(anonymity.l_diversity(df, qi, ["DIAGNOSIS"]))


def test_hand_computed_window() -> None:
    w = RiskWindow(RiskTarget(QI, k=3, window_s=3600, l=2, sensitive="DIAGNOSIS"), clock=lambda: 0.0)
    rows = [
        (("SW1A", 1980, "F"), "flu"), (("SW1A", 1980, "F"), "flu"), (("SW1A", 1980, "F"), "asthma"),
        (("E1", 1975, "M"), "flu"), (("E1", 1975, "M"), "flu"),
        (("N7", 1990, "F"), "covid"),
    ]
    sizes = [w.add(qi, s, ts=float(i)) for i, (qi, s) in enumerate(rows)]
    assert sizes == [1, 2, 3, 1, 2, 1]
    r = w.report(now=10.0)
    assert (r.records, r.classes, r.min_class) == (6, 3, 1)
    assert r.share_below_k == pytest.approx(3 / 6)  # E1 (2) and N7 (1) are below k=3
    assert r.share_unique == pytest.approx(1 / 6)
    assert r.min_l == 1 and r.share_below_l == pytest.approx(3 / 6)  # E1 (flu only), N7
    assert not r.meets_target
    assert pycanon_k_l([qi for qi, _ in rows], [s for _, s in rows]) == (1, 1)


def test_records_leave_the_window_by_age() -> None:
    w = RiskWindow(RiskTarget(QI, k=2, window_s=60), clock=lambda: 0.0)
    w.add(("A", 1, "F"), ts=0.0)
    w.add(("A", 1, "F"), ts=30.0)
    w.add(("B", 2, "M"), ts=50.0)
    assert w.report(now=55.0).min_class == 1
    r = w.report(now=61.0)  # the record at 0 left: (A,1,F) is unique now
    assert (r.records, r.min_class, r.share_unique) == (2, 1, 1.0)
    assert w.report(now=200.0).records == 0 and w.report(now=200.0).meets_target


def test_the_cap_evicts_oldest_first_and_says_so() -> None:
    w = RiskWindow(RiskTarget(QI, k=2, window_s=1e9, max_records=3), clock=lambda: 0.0)
    for i, qi in enumerate([("A", 1, "F"), ("A", 1, "F"), ("B", 2, "M"), ("B", 2, "M")]):
        w.add(qi, ts=float(i))
    r = w.report(now=4.0)
    assert len(w) == 3 and w.evicted_by_cap == 1
    assert (r.records, r.classes, r.min_class, r.covered_s) == (3, 2, 1, 2.0)
    assert w.class_size(("A", 1, "F")) == 1


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    cap=st.sampled_from([50, 150, 10_000]),
    with_l=st.booleans(),
)
def test_same_k_and_l_as_pycanon_on_the_same_window(seed: int, n: int, cap: int, with_l: bool) -> None:
    """A random stream (timestamps, skewed quasi-identifiers): after it, the window's k and
    l equal pycanon's on exactly the records a plain list says are inside it."""
    rng = random.Random(seed)
    window = 100.0
    target = RiskTarget(QI, k=5, window_s=window, max_records=cap,
                        l=2 if with_l else None, sensitive="DIAGNOSIS" if with_l else None)
    w = RiskWindow(target, clock=lambda: 0.0)
    stream: list[tuple[float, tuple[Any, ...], Any]] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(2.0)
        qi = (rng.choice(["SW1A", "E1", "N7", "M1"][: rng.randint(1, 4)]), rng.randint(1970, 1973),
              rng.choice("FM"))
        s = rng.choice(["flu", "asthma", "covid"])
        stream.append((t, qi, s))
        w.add(qi, s, ts=t)
    now = t
    inside = [e for e in stream if e[0] > now - window][-cap:]
    r = w.report(now=now)
    assert r.records == len(inside)
    k, l_div = pycanon_k_l([qi for _, qi, _ in inside], [s for _, _, s in inside] if with_l else None)
    assert r.min_class == k
    assert r.min_l == l_div
    sizes = Counter(qi for _, qi, _ in inside)
    assert r.share_unique == pytest.approx(sum(1 for c in sizes.values() if c == 1) / len(inside))
    assert r.share_below_k == pytest.approx(sum(c for c in sizes.values() if c < 5) / len(inside))


def test_targets_are_validated() -> None:
    with pytest.raises(ValueError):
        RiskTarget((), k=5, window_s=60)
    with pytest.raises(ValueError):
        RiskTarget(QI, k=1, window_s=60)
    with pytest.raises(ValueError):
        RiskTarget(QI, k=5, window_s=60, l=2)
    with pytest.raises(ValueError):
        RiskTarget(QI, k=5, window_s=0)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    cap=st.sampled_from([7, 40, 10_000]),
    with_l=st.booleans(),
)
def test_incremental_counters_equal_a_recount_through_adds_expiry_and_rollbacks(
    seed: int, n: int, cap: int, with_l: bool
) -> None:
    """report() (kept incrementally) equals recount() (from scratch over the held records)
    after any mix of additions, expiry by age, eviction by the cap and rollbacks; and a
    rollback holds exactly the records a plain list says were committed."""
    rng = random.Random(seed)
    target = RiskTarget(QI, k=3, window_s=50.0, max_records=cap,
                        l=2 if with_l else None, sensitive="DIAGNOSIS" if with_l else None)
    w = RiskWindow(target, clock=lambda: 0.0)
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(1.0)
        sp = w.savepoint()
        before = w.held()
        batch = rng.randint(1, 6)
        for _ in range(batch):
            qi = (rng.choice(["A", "B", "C"]), rng.randint(0, 2), "F")
            w.add(qi, rng.choice(["x", "y", "z"]), ts=t)
        if rng.random() < 0.3:
            w.rollback(sp)
            # what is left is the committed records that neither age nor the cap removed
            assert w.held() == before[len(before) - len(w):]
        assert w.report(now=t) == w.recount()
    assert w.report(now=t + 1000.0) == w.recount() and len(w) == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), cap=st.sampled_from([5, 30, 10_000]),
       with_l=st.booleans())
def test_add_many_keeps_the_same_counters_as_add(seed: int, n: int, cap: int, with_l: bool) -> None:
    """The batch path (the worker's) and the per-record path hold the same window."""
    rng = random.Random(seed)
    target = RiskTarget(QI, k=3, window_s=20.0, max_records=cap,
                        l=2 if with_l else None, sensitive="DIAGNOSIS" if with_l else None)
    one, many = RiskWindow(target, clock=lambda: 0.0), RiskWindow(target, clock=lambda: 0.0)
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(0.5)
        rows = [((rng.choice("AB"), rng.randint(0, 2), "F"), rng.choice("xyz") if with_l else None)
                for _ in range(rng.randint(1, 8))]
        for qi, sv in rows:
            one.add(qi, sv, t)
        many.add_many(rows, t)
        assert many.report(now=t) == one.report(now=t) == many.recount()
        assert many.savepoint() == one.savepoint() and many.evicted_by_cap == one.evicted_by_cap


needs_counts = pytest.mark.skipif(
    native.RiskCounts is None, reason="streamproc._native (with RiskCounts) is not built"
)


def _b(v: Any) -> bytes:
    """A test value as the bytes key the worker would give (distinct values, distinct bytes)."""
    return repr(v).encode()


@needs_counts
@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 150),
    cap=st.sampled_from([5, 30, 10_000]),
    with_l=st.booleans(),
    batched=st.booleans(),
)
def test_compiled_counters_equal_the_python_ones_and_a_recount(
    seed: int, n: int, cap: int, with_l: bool, batched: bool
) -> None:
    """The compiled counters (the worker's, when the extension is built) against the Python
    counters and a recount from scratch, through batches or single adds, expiry by age,
    eviction by the cap, rollbacks and class_size."""
    rng = random.Random(seed)
    target = RiskTarget(QI, k=3, window_s=20.0, max_records=cap,
                        l=2 if with_l else None, sensitive="DIAGNOSIS" if with_l else None)
    fast = RiskWindow(target, clock=lambda: 0.0, counts=native.RiskCounts(3, 2 if with_l else 0))
    slow = RiskWindow(target, clock=lambda: 0.0)
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(0.5)
        sps = fast.savepoint(), slow.savepoint()
        rows = [(_b((rng.choice("AB"), rng.randint(0, 2))), _b(rng.choice("xyz")) if with_l else None)
                for _ in range(rng.randint(1, 8))]
        if batched:
            for w in (fast, slow):
                w.add_many(rows, t)
        else:
            for qi, sv in rows:
                assert fast.add(qi, sv, t) == slow.add(qi, sv, t)
        if rng.random() < 0.2:
            assert fast.rollback(sps[0]) == slow.rollback(sps[1])
        probe = _b((rng.choice("AB"), rng.randint(0, 2)))
        assert fast.class_size(probe) == slow.class_size(probe)
        assert fast.report(now=t) == slow.report(now=t) == fast.recount()
    assert fast.report(now=t + 1000.0) == slow.report(now=t + 1000.0) and len(fast) == 0


@needs_counts
def test_compiled_counters_refuse_a_record_they_do_not_hold() -> None:
    """A removal of a class or pair never added is a bug of the caller, not a negative count."""
    c = native.RiskCounts(3, 2)
    c.apply([b"a"], [b"x"], [], [])
    with pytest.raises(ValueError):
        c.apply([], [], [b"b"], [b"x"])
    with pytest.raises(ValueError):
        c.apply([], [], [b"a"], [b"y"])
    with pytest.raises(TypeError):
        c.apply(["a"], [b"x"], [], [])
