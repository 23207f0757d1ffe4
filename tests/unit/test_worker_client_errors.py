"""streamproc.runtime.client_errors: librdkafka's error callback and errored messages.

Each class of error has one outcome: a refusal is a configuration error naming the
resource (exit 78), a fatal client stops the worker, a lost broker is retried and
reported, anything else is a warning; no broker text reaches a log line.
"""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError

from streamproc.errors import ConfigError
from streamproc.runtime.access import AccessGuard
from streamproc.runtime.checkpoint import FENCED_CODES, FatalWorkerError
from streamproc.runtime.client_errors import ClientErrors, is_fatal
from streamproc.runtime.health import Health
from tests.unit.test_worker_access import FakeConfig
from tests.unit.worker_fakes import BROKER_TEXT, FakeClock, RecordingObserver, kerr, msg


def make() -> tuple[ClientErrors, RecordingObserver, list[str]]:
    obs = RecordingObserver()
    stops: list[str] = []
    access = AccessGuard(
        FakeConfig(producer={"sasl.username": "erin"}), "tid", producer=lambda: None,  # type: ignore[arg-type]
        stop=lambda: stops.append("access"), timeout=1.0,
    )  # fmt: skip
    health = Health(obs, owned=lambda: {("orders", 0)}, paused=lambda: False, clock=FakeClock())
    return ClientErrors(access, health, lambda: stops.append("errors")), obs, stops


def test_is_fatal() -> None:
    assert is_fatal(kerr(KafkaError._FATAL, fatal=True))
    for code in FENCED_CODES:
        assert is_fatal(kerr(code))
    assert not is_fatal(kerr(KafkaError._TRANSPORT))
    assert not is_fatal(kerr(KafkaError._MSG_TIMED_OUT, retriable=True))


def test_on_error_refused_login_is_a_config_error() -> None:
    e, obs, stops = make()
    e.on_error(kerr(KafkaError._AUTHENTICATION))
    assert e.access.error is not None and e.access.error.startswith("authentication of User:erin")
    assert stops == ["access"] and e.fatal is None and obs.calls == []


def test_on_error_missing_acl_names_the_resource() -> None:
    e, _obs, stops = make()
    e.on_error(kerr(KafkaError.GROUP_AUTHORIZATION_FAILED))
    assert e.access.error is not None and "READ GROUP 'orders-processor'" in e.access.error
    assert stops == ["access"]


def test_on_error_fatal_client_stops(caplog: pytest.LogCaptureFixture) -> None:
    e, _obs, stops = make()
    caplog.set_level(logging.ERROR, "streamproc.runtime.worker")
    e.on_error(kerr(KafkaError.PRODUCER_FENCED))
    assert e.fatal == "client: PRODUCER_FENCED" and stops == ["errors"]
    assert [r.getMessage() for r in caplog.records] == ["fatal client error: PRODUCER_FENCED"]


@pytest.mark.parametrize("code", [KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE])
def test_on_error_lost_broker_is_retried(code: int) -> None:
    e, obs, stops = make()
    e.on_error(kerr(code))
    e.on_error(kerr(code))
    assert obs.of("retrying") == [("broker", 1), ("broker", 2)]
    assert obs.of("ready")[-1] == (False, "broker")
    assert stops == [] and e.fatal is None and e.access.error is None


def test_on_error_anything_else_is_a_warning_without_broker_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e, obs, stops = make()
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    e.on_error(kerr(KafkaError._MSG_TIMED_OUT))
    assert [r.getMessage() for r in caplog.records] == ["client error: _MSG_TIMED_OUT"]
    assert obs.calls == [] and stops == []
    assert BROKER_TEXT not in caplog.text


def test_check_message() -> None:
    e, _obs, _stops = make()
    assert e.check_message(msg()) is True
    assert e.check_message(msg(error=kerr(KafkaError._PARTITION_EOF))) is False


def test_check_message_refused_topic_raises_a_config_error() -> None:
    e, _obs, stops = make()
    with pytest.raises(ConfigError) as ei:
        e.check_message(msg("orders", error=kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert str(ei.value) == e.access.error
    assert "User:erin is not authorized to READ TOPIC 'orders'" in str(ei.value)
    assert stops == ["access"]


def test_check_message_fatal_raises() -> None:
    e, _obs, _stops = make()
    with pytest.raises(FatalWorkerError, match=r"^consumer: _FATAL$"):
        e.check_message(msg(error=kerr(KafkaError._FATAL, fatal=True)))


def test_check_message_other_error_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e, _obs, _stops = make()
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    assert e.check_message(msg("orders", 3, error=kerr(KafkaError._MSG_TIMED_OUT))) is False
    (rec,) = caplog.records
    assert rec.getMessage() == "consumer error: _MSG_TIMED_OUT"
    assert (rec.topic, rec.partition) == ("orders", 3)  # type: ignore[attr-defined]
