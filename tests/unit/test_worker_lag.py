"""streamproc.runtime.lag: lag = high watermark - position (else committed, else low),
from librdkafka's cached watermarks, at most once per interval."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from streamproc.runtime.lag import LagReporter
from tests.unit.worker_fakes import FakeClock, FakeConsumer, RecordingObserver, kerr


def reporter(committed: dict[tuple[str, int], int] | None = None) -> tuple[LagReporter, RecordingObserver, FakeClock]:
    obs, clock = RecordingObserver(), FakeClock(1000.0)
    c = committed or {}
    return LagReporter(obs, 5.0, c.get, clock=clock), obs, clock


def test_due_at_most_once_per_interval() -> None:
    lag, _obs, clock = reporter()
    assert lag.due() is True  # the first call
    clock.advance(4.999)
    assert lag.due() is False
    clock.advance(0.001)
    assert lag.due() is True
    assert lag.due() is False


def test_report_positions_committed_and_low_watermarks() -> None:
    lag, obs, _ = reporter(committed={("orders", 1): 90})
    c = FakeConsumer()
    c.positions = {("orders", 0): 40, ("orders", 3): 500}
    c.watermarks = {
        ("orders", 0): (0, 100),  # position 40 -> 60
        ("orders", 1): (0, 100),  # no position yet, committed 90 -> 10
        ("orders", 2): (25, 100),  # no position, nothing committed: low 25 -> 75
        ("orders", 3): (0, 450),  # position past a stale cached high -> 0, never negative
        ("orders", 4): (0, -1),  # no watermark known yet: skipped
        ("orders", 5): KafkaException(kerr(KafkaError._UNKNOWN_PARTITION)),  # skipped
        ("orders", 6): (-1, 30),  # nothing known but the high watermark -> 30
    }
    lag.report(c, {("orders", p) for p in range(7)})  # type: ignore[arg-type]
    assert c.of("position") == [([("orders", p) for p in range(7)],)]
    assert obs.of("consumer_lag") == [
        ({("orders", 0): 60, ("orders", 1): 10, ("orders", 2): 75, ("orders", 3): 0, ("orders", 6): 30},)
    ]


def test_report_nothing_owned_or_nothing_known_observes_nothing() -> None:
    lag, obs, _ = reporter()
    c = FakeConsumer()
    lag.report(c, set())  # type: ignore[arg-type]
    assert c.calls == []
    c.position_error = KafkaException(kerr(KafkaError._TRANSPORT))
    lag.report(c, {("orders", 0)})  # type: ignore[arg-type]
    c.position_error = None
    c.watermarks = {("orders", 0): (None, None)}
    lag.report(c, {("orders", 0)})  # type: ignore[arg-type]
    assert obs.calls == []
