"""streamproc.runtime.health: which dependency is down, what /readyz says, and when a
broker timeout is really a refused login (the checkpoint's view)."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamproc.errors import (
    KmsUnavailable,
    SchemaRegistryUnavailable,
    SealingUnavailable,
    TransientError,
)
from streamproc.runtime.access import AccessGuard
from streamproc.runtime.checkpoint import AccessDenied
from streamproc.runtime.health import CheckpointHealth, Health, dependency_of
from tests.unit.test_worker_access import FakeConfig
from tests.unit.worker_fakes import FakeClock, FakeConsumer, RecordingObserver, kerr

TP = tuple[str, int]


class World:
    """A Health over state the test sets: owned partitions, paused flag, clock."""

    def __init__(self) -> None:
        self.owned: set[TP] = {("orders", 0)}
        self.paused = False
        self.clock = FakeClock()
        self.obs = RecordingObserver()
        self.health = Health(
            self.obs, owned=lambda: self.owned, paused=lambda: self.paused, clock=self.clock
        )

    def last_ready(self) -> tuple[object, ...]:
        return self.obs.of("ready")[-1]


def test_dependency_of_labels() -> None:
    assert dependency_of(KmsUnavailable("kms down")) == "kms"
    assert dependency_of(SealingUnavailable("kek 'x' on 'orders.dlq'")) == "kms"  # a KMS error
    assert dependency_of(SchemaRegistryUnavailable("registry down")) == "schema_registry"
    assert dependency_of(TransientError("other")) == "dependency"


def test_readiness_from_state() -> None:
    w = World()
    w.health.ready()
    assert w.last_ready() == (True, "")
    w.paused = True
    w.health.ready()
    assert w.last_ready() == (False, "paused")
    w.owned = set()
    w.health.ready()
    assert w.last_ready() == (False, "no partitions")


def test_the_dependency_down_longest_is_named_even_without_partitions() -> None:
    w = World()
    w.owned = set()
    w.health.dependency_down(SchemaRegistryUnavailable("x"), 1, 10)
    w.clock.advance(5)
    w.health.broker_down(1)
    assert w.last_ready() == (False, "schema_registry")  # down first
    w.health.dependencies_restored()  # the registry answers; the broker does not
    assert w.obs.of("dependency_restored") == [("schema_registry",)]
    assert w.last_ready() == (False, "broker")
    assert w.health.down == {"broker": 1005.0}


def test_broker_down_and_back(caplog: pytest.LogCaptureFixture) -> None:
    w = World()
    caplog.set_level(logging.INFO, "streamproc.runtime.worker")
    w.health.broker_ok()  # not down: nothing happens
    assert w.obs.calls == []
    w.health.broker_down(1)
    w.clock.advance(2.5)
    w.health.broker_down(2)
    assert w.health.down == {"broker": 1000.0}  # the first time it went down
    assert w.obs.of("retrying") == [("broker", 1), ("broker", 2)]
    assert [r.message for r in caplog.records].count("broker unavailable; retrying") == 1
    w.clock.advance(1.25)
    w.health.broker_ok()
    back = [r for r in caplog.records if r.message == "broker reachable again"]
    assert len(back) == 1 and back[0].seconds == 3.75  # type: ignore[attr-defined]
    assert w.obs.of("dependency_restored") == [("broker",)]
    assert w.health.down == {} and w.last_ready() == (True, "")
    w.health.broker_ok()
    assert w.obs.of("dependency_restored") == [("broker",)]  # once


def test_transport_errors_count_attempts_until_the_broker_is_back() -> None:
    w = World()
    w.health.transport_error()
    w.health.transport_error()
    assert w.obs.of("retrying") == [("broker", 1), ("broker", 2)]
    w.health.broker_ok()
    assert w.health.broker_attempt == 0
    w.health.transport_error()
    assert w.obs.of("retrying")[-1] == ("broker", 1)


def test_probe_broker_only_while_down() -> None:
    w = World()
    c = FakeConsumer()
    w.health.probe_broker(c, "orders")  # type: ignore[arg-type]
    assert c.calls == []
    w.health.broker_down(1)
    c.list_topics_error = KafkaException(kerr(KafkaError._TRANSPORT))
    w.health.probe_broker(c, "orders")  # type: ignore[arg-type]
    assert "broker" in w.health.down and w.obs.of("dependency_restored") == []
    c.list_topics_error = None
    w.health.probe_broker(c, "orders")  # type: ignore[arg-type]
    assert c.of("list_topics") == [("orders", 1.0), ("orders", 1.0)]
    assert w.health.down == {} and w.obs.of("dependency_restored") == [("broker",)]


def test_dependency_down_logs_a_value_free_detail_only_for_sealing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    w.health.dependency_down(KmsUnavailable("secret-ish text"), 1, 500)
    w.health.dependency_down(SealingUnavailable("dead letters for 'orders.dlq' under 'q'"), 2, 500)
    details = [(r.dependency, r.attempt, r.records, r.detail) for r in caplog.records]  # type: ignore[attr-defined]
    assert details == [
        ("kms", 1, 500, None),
        ("kms", 2, 500, "dead letters for 'orders.dlq' under 'q'"),
    ]
    assert all("secret-ish" not in r.getMessage() for r in caplog.records)
    assert w.obs.of("retrying") == [("kms", 1), ("kms", 2)]
    assert w.health.down == {"kms": 1000.0}
    assert w.last_ready() == (False, "kms")


class PollingProducer:
    """``poll`` serves the error callback: here it may report a refused login."""

    def __init__(self, on_poll: object = None, raises: bool = False) -> None:
        self.polls = 0
        self.on_poll = on_poll
        self.raises = raises

    def poll(self, timeout: float) -> int:
        assert timeout == 0
        self.polls += 1
        if callable(self.on_poll):
            self.on_poll()
        if self.raises:
            raise KafkaException(kerr(KafkaError._FATAL, fatal=True))
        return 0


def checkpoint_health(producer: PollingProducer | None) -> tuple[CheckpointHealth, AccessGuard, World]:
    w = World()
    access = AccessGuard(
        FakeConfig(producer={"sasl.username": "dave"}), "tid", producer=lambda: None,  # type: ignore[arg-type]
        stop=lambda: None, timeout=1.0,
    )  # fmt: skip
    return CheckpointHealth(w.health, access, lambda: producer), access, w  # type: ignore[arg-type]


def test_checkpoint_health_down_polls_and_goes_on_while_nothing_is_refused() -> None:
    p = PollingProducer()
    ch, access, w = checkpoint_health(p)
    ch.down(1)
    ch.down(2)
    assert p.polls == 2 and access.error is None
    assert w.obs.of("retrying") == [("broker", 1), ("broker", 2)]
    ch.ok()
    assert w.health.down == {}


def test_checkpoint_health_raises_when_the_poll_reveals_a_refused_login() -> None:
    p = PollingProducer(on_poll=lambda: access.authentication_failed(kerr(KafkaError._AUTHENTICATION)))
    ch, access, _w = checkpoint_health(p)
    with pytest.raises(AccessDenied) as ei:
        ch.down(1)
    assert str(ei.value).startswith("authentication of User:dave failed")


def test_checkpoint_health_without_producer_or_with_a_fatal_poll() -> None:
    ch, access, _ = checkpoint_health(None)
    ch.down(1)  # nothing to poll, nothing refused
    assert access.error is None
    p = PollingProducer(raises=True)
    ch, access, _ = checkpoint_health(p)
    ch.down(1)  # a fatal producer raises from poll: suppressed, the commit path classifies it
    assert p.polls == 1


def test_checkpoint_health_does_not_poll_once_refused() -> None:
    p = PollingProducer()
    ch, access, _ = checkpoint_health(p)
    access.deny(kerr(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED), None)
    with pytest.raises(AccessDenied, match="TRANSACTIONAL_ID 'tid'"):
        ch.down(3)
    assert p.polls == 0
