"""streamproc.runtime.exits: which failure gets which exit code and which one log line."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamproc.errors import ConfigError
from streamproc.runtime.access import AccessGuard
from streamproc.runtime.checkpoint import AccessDenied, FatalWorkerError, InvariantViolation
from streamproc.runtime.exits import EXIT_CONFIG, EXIT_FATAL, exit_code
from tests.unit.test_worker_access import FakeConfig
from tests.unit.worker_fakes import BROKER_TEXT, kerr


def access() -> AccessGuard:
    return AccessGuard(
        FakeConfig(producer={"sasl.username": "frank"}), "tid", producer=lambda: None,  # type: ignore[arg-type]
        stop=lambda: None, timeout=1.0,
    )  # fmt: skip


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "streamproc.runtime.worker"]


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "streamproc.runtime.worker")


def test_exit_codes_are_sysexits() -> None:
    assert (EXIT_CONFIG, EXIT_FATAL) == (78, 1)


def test_config_error(caplog: pytest.LogCaptureFixture) -> None:
    assert exit_code(ConfigError("kafka.bootstrap.servers: required"), access()) == 78
    assert lines(caplog) == ["configuration error: kafka.bootstrap.servers: required"]


def test_access_denied_names_the_resource_from_the_refused_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = access()
    exc = AccessDenied("commit_transaction: TOPIC_AUTHORIZATION_FAILED",
                       kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), "orders.fraud")  # fmt: skip
    assert exit_code(exc, a) == 78
    assert a.error is not None and "WRITE TOPIC 'orders.fraud'" in a.error
    assert lines(caplog) == [f"configuration error: {a.error}"]


def test_access_denied_keeps_an_earlier_refusal(caplog: pytest.LogCaptureFixture) -> None:
    a = access()
    a.authentication_failed(kerr(KafkaError._AUTHENTICATION))
    first = a.error
    exc = AccessDenied("x", kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), "orders.fraud")
    assert exit_code(exc, a) == 78
    assert a.error == first and lines(caplog) == [f"configuration error: {first}"]


def test_access_denied_without_an_error_logs_its_own_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = access()
    assert exit_code(AccessDenied("init_transactions: _AUTHENTICATION"), a) == 78
    assert a.error is None
    assert lines(caplog) == ["configuration error: init_transactions: _AUTHENTICATION"]


def test_a_fatal_error_behind_a_refusal_is_a_config_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = access()
    a.deny(kerr(KafkaError.GROUP_AUTHORIZATION_FAILED), None)
    assert exit_code(FatalWorkerError("init_transactions: timed out"), a) == 78
    assert lines(caplog) == [f"configuration error: {a.error}"]


def test_fatal_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert exit_code(FatalWorkerError("client: _FATAL"), access()) == 1
    assert exit_code(InvariantViolation("offset went back"), access()) == 1
    assert lines(caplog) == [
        "fatal FatalWorkerError: client: _FATAL",
        "fatal InvariantViolation: offset went back",
    ]


def test_kafka_exception_logs_the_error_name_not_the_broker_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = KafkaException(kerr(KafkaError._STATE))
    assert exit_code(exc, access()) == 1
    assert lines(caplog) == ["fatal Kafka error: _STATE"]
    assert BROKER_TEXT not in caplog.text


def test_a_bug_is_fatal_and_logged_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as exc:
        assert exit_code(exc, access()) == 1
    (rec,) = [r for r in caplog.records if r.name == "streamproc.runtime.worker"]
    assert rec.getMessage() == "unexpected error; stopping without committing the batch"
    assert rec.exc_info is not None and rec.exc_info[0] is ZeroDivisionError
