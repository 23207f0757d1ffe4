"""Dependency outages as operators see them: retries series exist at zero from start-up,
the outage gauge grows while a dependency is retried and drops to 0 when it answers."""

from __future__ import annotations

from prometheus_client import generate_latest

from streamproc.observability.metrics import Metrics


def test_retries_series_exist_at_zero_before_the_first_retry() -> None:
    m = Metrics(anomaly=False)
    text = generate_latest(m.registry).decode()
    for dep in ("broker", "kms", "schema_registry"):
        # Parsed from the exposition text, as Prometheus would scrape it.
        assert f'streamproc_retries_total{{dependency="{dep}"}} 0.0' in text, dep
        assert f'streamproc_dependency_outage_seconds{{dependency="{dep}"}} 0.0' in text, dep


def test_outage_gauge_tracks_the_current_outage() -> None:
    m = Metrics(anomaly=False)

    def outage(dep: str) -> float:
        v = m.registry.get_sample_value("streamproc_dependency_outage_seconds", {"dependency": dep})
        assert v is not None
        return v

    m.retrying("kms", 1)
    m._outage_since["kms"] -= 300  # the outage began five minutes ago
    m.tick()
    assert outage("kms") >= 300
    assert outage("broker") == 0
    assert m.registry.get_sample_value("streamproc_retries_total", {"dependency": "kms"}) == 1
    m.retrying("kms", 2)  # a further retry keeps the start of the outage
    assert outage("kms") >= 300
    m.dependency_restored("kms")
    assert outage("kms") == 0
    m.tick()
    assert outage("kms") == 0
    m.retrying("kms", 1)  # a new outage starts from zero
    assert outage("kms") < 300
