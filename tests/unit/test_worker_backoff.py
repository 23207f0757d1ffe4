"""streamproc.runtime.backoff: capped exponential delays, jittered into [0.5, 1] x."""

from __future__ import annotations

import random

from streamproc.runtime.backoff import Backoff


def test_without_jitter_the_delays_double_up_to_the_cap() -> None:
    b = Backoff(base=0.2, cap=1.0, jitter=False)
    assert [b.delay(n) for n in range(0, 6)] == [0.2, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_jitter_scales_each_delay_by_half_to_one_from_its_generator() -> None:
    b = Backoff(base=0.1, cap=10.0, _rng=random.Random(1234))
    twin = random.Random(1234)  # the same draws, computed here
    for attempt, raw in [(1, 0.1), (2, 0.2), (3, 0.4), (10, 10.0)]:
        assert b.delay(attempt) == raw * (0.5 + 0.5 * twin.random())
    many = Backoff(base=1.0, cap=1.0, _rng=random.Random(7))
    delays = [many.delay(1) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays) and len(set(delays)) > 100
