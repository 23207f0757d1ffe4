"""In-process anomaly detection: deterministic scenarios on a fake clock, plus properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.errors import Reason
from streamproc.observability.anomaly import (
    Anomaly,
    AnomalyConfig,
    AnomalyDetector,
    AnomalyKind,
    Baseline,
)

TOPIC, KEK = "orders", "orders-kek"
CFG = AnomalyConfig(interval=10.0, warmup_intervals=10, z_threshold=6.0, min_rate=1.0)


class FakeClock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make(cfg: AnomalyConfig = CFG, **kw: object) -> tuple[AnomalyDetector, FakeClock]:
    clock = FakeClock()
    return AnomalyDetector(cfg, clock=clock, **kw), clock  # type: ignore[arg-type]


def run_intervals(det: AnomalyDetector, clock: FakeClock, counts: list[int], batches: int = 4) -> list[list[AnomalyKind]]:
    """Feed each interval's count in a few batches, then let the interval close."""
    per_interval = []
    for c in counts:
        found = []
        for i in range(batches):
            share = c // batches + (1 if i < c % batches else 0)
            found += det.observe_decryptions({(TOPIC, KEK): share})
            clock.advance(det.config.interval / batches)
        found += det.tick()
        per_interval.append([a.kind for a in found])
    return per_interval


def kinds(det: AnomalyDetector) -> list[AnomalyKind]:
    return [a.kind for a in det.history]


def test_steady_traffic_never_alerts_after_warmup() -> None:
    det, clock = make()
    rng = random.Random(1)
    run_intervals(det, clock, [int(500 * rng.uniform(0.9, 1.1)) for _ in range(200)])
    assert det.history == []


def test_tenfold_burst_gives_exactly_one_decryption_spike() -> None:
    det, clock = make()
    rng = random.Random(2)
    steady = [int(200 * rng.uniform(0.9, 1.1)) for _ in range(30)]
    res = run_intervals(det, clock, [*steady, 2000, *steady[:10]])
    assert kinds(det) == [AnomalyKind.DECRYPTION_SPIKE]
    # Reported when the burst's interval closed, with identifiers and counts only.
    assert res[30] == [AnomalyKind.DECRYPTION_SPIKE]
    a = det.history[0]
    assert dict(a.labels) == {"topic": TOPIC, "kek_id": KEK}
    assert a.observed == 2000 and 150 < a.baseline < 250 and a.z_score > CFG.z_threshold


def test_burst_during_warmup_is_not_reported() -> None:
    det, clock = make()
    run_intervals(det, clock, [200] * 5 + [2000] + [200] * 5)
    assert det.history == []


def test_below_min_rate_floor_never_alerts() -> None:
    det, clock = make(AnomalyConfig(interval=10.0, warmup_intervals=5, min_rate=5.0))
    run_intervals(det, clock, [1] * 20 + [40] + [1] * 5)  # 40/10 s = 4/s < 5/s
    assert det.history == []


def test_sustained_shift_alerts_once_then_is_learnt() -> None:
    det, clock = make()
    run_intervals(det, clock, [200] * 20 + [2000] * 60)
    assert 1 <= kinds(det).count(AnomalyKind.DECRYPTION_SPIKE) <= 5
    n = len(det.history)
    run_intervals(det, clock, [2000] * 30)
    assert len(det.history) == n


def test_failure_burst_over_absolute_threshold_alerts_immediately() -> None:
    det, clock = make(AnomalyConfig(interval=10.0, warmup_intervals=10, failure_threshold=100))
    for _ in range(20):
        det.observe_failures({Reason.TAMPERED: 1})
        clock.advance(10)
    assert det.history == []
    found = det.observe_failures({Reason.TAMPERED: 60, Reason.MALFORMED: 60})
    assert [a.kind for a in found] == [AnomalyKind.DECRYPTION_FAILURE_BURST]
    det.observe_failures({Reason.TAMPERED: 500})  # same interval: reported once
    clock.advance(10)
    det.tick()
    assert kinds(det) == [AnomalyKind.DECRYPTION_FAILURE_BURST]


def test_failure_burst_against_baseline() -> None:
    det, clock = make(AnomalyConfig(interval=10.0, warmup_intervals=10, failure_threshold=10_000, failure_min=10))
    for _ in range(20):
        det.observe_failures({Reason.WRONG_TOPIC: 1, Reason.BAD_PAYLOAD: 50})  # bad_payload is no envelope failure
        clock.advance(10)
    det.tick()
    assert det.history == []
    det.observe_failures({Reason.WRONG_TOPIC: 40})
    clock.advance(10)
    det.tick()
    assert kinds(det) == [AnomalyKind.DECRYPTION_FAILURE_BURST]
    assert det.history[0].observed == 40


def test_unknown_and_revoked_keys_alert_once_per_interval() -> None:
    det, clock = make()
    got = det.observe_failures({Reason.UNKNOWN_KEY: 1})
    assert [a.kind for a in got] == [AnomalyKind.UNKNOWN_KEY]
    assert det.observe_failures({Reason.UNKNOWN_KEY: 3}) == []
    got = det.observe_failures({Reason.KEY_REVOKED: 2})
    assert [a.kind for a in got] == [AnomalyKind.REVOKED_KEY]
    clock.advance(10)
    got = det.observe_failures({Reason.UNKNOWN_KEY: 1})
    assert [a.kind for a in got] == [AnomalyKind.UNKNOWN_KEY]
    assert kinds(det).count(AnomalyKind.UNKNOWN_KEY) == 2


def test_unexpected_destination() -> None:
    det, _clock = make(allowed_destinations={"orders.analytics"})
    assert det.observe_egress({("orders.analytics", "analytics"): 10}) == []
    got = det.observe_egress({("orders.leak", "analytics"): 1})
    assert [a.kind for a in got] == [AnomalyKind.UNEXPECTED_DESTINATION]
    assert got[0].labels["destination"] == "orders.leak"
    assert det.observe_egress({("orders.leak", "analytics"): 1}) == []


def test_egress_spike_counts_once_per_destination_and_interval() -> None:
    det, clock = make()
    for i in range(40):
        n = 2000 if i == 30 else 200
        det.observe_egress({("orders.analytics", "analytics"): n}, {("orders.analytics", "analytics"): n * 300})
        clock.advance(10)
    det.tick()
    assert kinds(det) == [AnomalyKind.EGRESS_SPIKE]
    assert det.history[0].labels["destination"] == "orders.analytics"


def test_rebase_restarts_warmup() -> None:
    det, clock = make()
    run_intervals(det, clock, [200] * 20)
    det.rebase()  # e.g. a rebalance doubled this worker's partitions
    run_intervals(det, clock, [400] * 5)
    assert det.history == []


def test_silent_series_starts_over_when_it_resumes() -> None:
    det, clock = make()
    run_intervals(det, clock, [200] * 20)
    clock.advance(3600)  # an hour without traffic
    det.tick()
    run_intervals(det, clock, [200] * 5)
    assert det.history == []


def test_on_anomaly_callback_and_warning_log(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Anomaly] = []
    det, _clock = make(on_anomaly=seen.append)
    with caplog.at_level("WARNING", logger="streamproc.anomaly"):
        det.observe_failures({Reason.UNKNOWN_KEY: 1})
    assert [a.kind for a in seen] == [AnomalyKind.UNKNOWN_KEY]
    rec = caplog.records[-1]
    assert rec.levelname == "WARNING" and rec.kind == "unknown_key"  # type: ignore[attr-defined]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        AnomalyConfig(interval=0)
    with pytest.raises(ValueError):
        AnomalyConfig(alpha=0)


# -- properties ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(rate=st.integers(20, 20_000), noise=st.floats(0.0, 0.1), seed=st.integers(0, 2**16))
def test_property_steady_noisy_traffic_is_quiet(rate: int, noise: float, seed: int) -> None:
    det, clock = make()
    rng = random.Random(seed)
    run_intervals(det, clock, [max(0, int(rate * rng.uniform(1 - noise, 1 + noise))) for _ in range(40)], batches=2)
    assert det.history == []


@settings(max_examples=40, deadline=None)
@given(rate=st.integers(20, 20_000), factor=st.integers(10, 100))
def test_property_large_burst_is_one_spike(rate: int, factor: int) -> None:
    det, clock = make()
    run_intervals(det, clock, [rate] * 15 + [rate * factor] + [rate] * 3, batches=2)
    assert kinds(det) == [AnomalyKind.DECRYPTION_SPIKE]


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(0.01, 1.0))
def test_property_baseline_mean_within_range_and_variance_nonnegative(xs: list[float], alpha: float) -> None:
    b = Baseline(alpha)
    for x in xs:
        b.update(x)
    assert b.var >= -1e-6
    assert min(xs) - 1e-6 <= b.mean <= max(xs) + 1e-6
