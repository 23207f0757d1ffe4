"""The end-to-end latency histogram updated once per batch (Metrics.end_to_end_latency_ms).

The oracle is prometheus_client itself: a Histogram with the same buckets, one public
``observe(max(0, now - ts / 1000))`` per record -- what the worker did before.  Bucket
counts must match exactly (boundaries included).  The sum is checked against the exact
rational sum (fractions): the per-record oracle's own sum carries ~1e-7 s of rounding per
record (epoch seconds minus epoch seconds), so it is only compared within that.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from prometheus_client import CollectorRegistry, Histogram

from streamproc.observability import Observer
from streamproc.observability.metrics import LATENCY_BUCKETS, Metrics

NAME = "streamproc_end_to_end_latency_seconds"


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    out = {}
    for fam in registry.collect():
        for s in fam.samples:
            if s.name.startswith(name) and not s.name.endswith("_created"):
                out[(s.name[len(name):], s.labels.get("le", ""))] = s.value
    return out


def oracle(now: float, stamps: list[int]) -> dict[tuple[str, str], float]:
    reg = CollectorRegistry()
    h = Histogram("oracle_latency_seconds", "oracle", buckets=LATENCY_BUCKETS, registry=reg)
    for ts in stamps:
        h.observe(max(0.0, now - ts / 1000.0))
    return samples(reg, "oracle_latency_seconds")


def batched(now: float, batches: list[list[int]]) -> dict[tuple[str, str], float]:
    m = Metrics(anomaly=False)
    for b in batches:
        m.end_to_end_latency_ms(now, b)
    return samples(m.registry, NAME)


def assert_same(
    got: dict[tuple[str, str], float], want: dict[tuple[str, str], float], now: float,
    stamps: list[int],
) -> None:  # fmt: skip
    assert got.keys() == want.keys()
    exact = sum((max(Fraction(0), Fraction(now) - Fraction(ts, 1000)) for ts in stamps), Fraction(0))
    for k, v in want.items():
        if k[0] == "_sum":
            assert got[k] == pytest.approx(float(exact), rel=1e-15, abs=1e-9)
            assert got[k] == pytest.approx(v, abs=len(stamps) * 1e-6)
        else:
            assert got[k] == v, k  # bucket counts and _count: exact


def test_boundaries_future_stamps_and_spread_match_one_observe_per_record() -> None:
    now = 1_765_000_000.0
    now_ms = int(now * 1000)
    stamps = [now_ms - int(b * 1000) for b in LATENCY_BUCKETS]  # exactly on each bound
    stamps += [now_ms - int(b * 1000) - 1 for b in LATENCY_BUCKETS]  # just above each
    stamps += [now_ms + 5_000, now_ms, now_ms - 10_000_000]  # skew, zero, beyond the last
    rng = random.Random(7)
    stamps += [now_ms - rng.randrange(0, 700_000) for _ in range(3000)]
    rng.shuffle(stamps)
    want = oracle(now, stamps)
    assert want[("_count", "")] == len(stamps)
    got = batched(now, [stamps])
    assert_same(got, want, now, stamps)
    # Three batches (one empty) add up to the same buckets.
    split = batched(now, [stamps[:1000], stamps[1000:], []])
    assert {k: v for k, v in split.items() if k[0] != "_sum"} == {
        k: v for k, v in got.items() if k[0] != "_sum"
    }


def test_fractional_now_matches_observe() -> None:
    now = 1_765_000_000.1237  # not a whole millisecond: float rounding at the bounds
    base = int(now * 1000)
    stamps = [base - d for d in range(0, 1200, 3)] + [base - 4999, base - 5000, base - 5001]
    assert_same(batched(now, [stamps]), oracle(now, stamps), now, stamps)


def test_default_observer_hands_seconds_to_end_to_end_latency() -> None:
    seen: list[float] = []

    class Recorder(Observer):
        def end_to_end_latency(self, seconds: object) -> None:
            seen.extend(seconds)  # type: ignore[call-overload]

    Recorder().end_to_end_latency_ms(100.0, [99_000, 100_500])
    assert seen == [1.0, -0.5]  # the per-record contract of end_to_end_latency (unclamped)
