"""streamproc.runtime.startup: the record limit from DescribeConfigs (retried while the
broker is away, defaulted where denied) and the quarantine-KEK check, before consuming."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamproc.errors import ConfigError, KeyNotFound, KmsUnavailable
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.checkpoint import FatalWorkerError
from streamproc.runtime.limits import RecordLimit
from streamproc.runtime.startup import TopicLimits, check_quarantine_kek, record_limit, start_checks
from tests.unit.worker_fakes import BROKER_TEXT, kerr


class Future:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def result(self, timeout: float) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class FakeAdmin:
    """``script``: per describe_configs call, an exception to raise or, per topic, the
    ``max.message.bytes`` value ("" / None: not reported; an exception: that future fails)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[list[str]] = []
        self.polls = 0
        self.on_poll: Any = None

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll()
        return 0

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Future]:
        self.calls.append([r.name for r in resources])
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        out = {}
        for r in resources:
            v = step.get(r.name)
            if isinstance(v, BaseException):
                out[r] = Future(v)
            elif v is None:
                out[r] = Future({})
            else:
                out[r] = Future({"max.message.bytes": SimpleNamespace(value=v)})
        return out


def limits(admin: FakeAdmin, security: list[str | None] | None = None) -> tuple[TopicLimits, list[int], threading.Event]:
    downs: list[int] = []
    stop = threading.Event()
    sec = security if security is not None else [None]
    t = TopicLimits(
        admin, timeout=3.0, backoff=Backoff(base=0.0, cap=0.0, jitter=False), stop=stop,
        security_error=lambda: sec[0], broker_down=downs.append,
    )  # fmt: skip
    return t, downs, stop


def test_get_reads_max_message_bytes_per_topic() -> None:
    admin = FakeAdmin({"a": "524288", "b": "", "c": None})
    t, downs, _ = limits(admin)
    assert t.get(["a", "b", "c"]) == {"a": 524_288, "b": None, "c": None}
    assert admin.calls == [["a", "b", "c"]] and downs == []


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
    ],
)
def test_a_denied_describe_configs_falls_back_to_the_default(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    admin = FakeAdmin({"a": KafkaException(kerr(code)), "b": "2000000"})
    t, _downs, _ = limits(admin)
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    assert t.get(["a", "b"]) == {"a": None, "b": 2_000_000}
    (rec,) = caplog.records
    assert rec.topic == "a" and rec.operation == "DESCRIBE_CONFIGS"  # type: ignore[attr-defined]
    assert KafkaError(code).name() in rec.getMessage() and BROKER_TEXT not in caplog.text


def test_a_broker_outage_is_retried_and_reported() -> None:
    admin = FakeAdmin(
        KafkaException(kerr(KafkaError._TRANSPORT)),
        {"a": KafkaException(kerr(KafkaError._TIMED_OUT))},  # a failed future: not a denial
        TimeoutError(),
        {"a": "700000"},
    )
    t, downs, _ = limits(admin)
    assert t.get(["a"]) == {"a": 700_000}
    assert downs == [1, 2, 3] and admin.polls == 3


def test_a_refused_login_seen_while_retrying_is_a_config_error() -> None:
    admin = FakeAdmin(TimeoutError(), {"a": "1"})
    sec: list[str | None] = [None]
    admin.on_poll = lambda: sec.__setitem__(0, "authentication of User:x failed (PLAIN, _AUTHENTICATION)")
    t, downs, _ = limits(admin, sec)
    with pytest.raises(ConfigError, match=r"^authentication of User:x failed"):
        t.get(["a"])
    assert downs == [] and len(admin.calls) == 1


def test_stop_while_retrying_is_fatal() -> None:
    admin = FakeAdmin(KafkaException(kerr(KafkaError._TRANSPORT)))
    t, downs, stop = limits(admin)
    stop.set()
    with pytest.raises(FatalWorkerError, match="describe_configs: stopped while retrying"):
        t.get(["a"])
    assert downs == [1]


@dataclass
class FakeConfig:
    destination_topics: list[str] = field(default_factory=lambda: ["orders.analytics", "orders.fraud"])
    dead_letter_topics: list[str] = field(default_factory=lambda: ["orders.dlq"])
    max_record_bytes: int | None = None
    dead_letter_kek: str = "quarantine-kek"


def test_record_limit_is_the_smallest_written_topic_less_the_batch_header() -> None:
    admin = FakeAdmin({"orders.analytics": "2000000", "orders.fraud": "524288", "orders.dlq": None,
                       "orders": "8000000"})  # fmt: skip
    t, _, _ = limits(admin)
    lim = record_limit(FakeConfig(), t, sources=["orders"],  # type: ignore[arg-type]
                       producer_conf={"message.max.bytes": "3000000"},
                       consumer_conf={"receive.message.max.bytes": "9000000"})  # fmt: skip
    # the source's 8 MB does not bound what is written; 524288 - 61 (v2 batch header)
    assert lim == RecordLimit(524_227, "topic 'orders.fraud' max.message.bytes 524288")
    assert admin.calls == [["orders.analytics", "orders.fraud", "orders.dlq", "orders"]]


def test_record_limit_refuses_a_consumer_that_cannot_fetch_the_largest_source_record() -> None:
    t, _, _ = limits(FakeAdmin({"orders": "8000000"}))
    with pytest.raises(ConfigError, match=r"receive.message.max.bytes 8000000 is below source topic 'orders'"):
        record_limit(FakeConfig(), t, sources=["orders"], producer_conf={},  # type: ignore[arg-type]
                     consumer_conf={"receive.message.max.bytes": "8000000"})  # fmt: skip


class FakeDeadLetters:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.checked: list[list[str]] = []
        self.limit: RecordLimit | None = None

    def check(self, topics: list[str]) -> None:
        self.checked.append(list(topics))
        if self.error is not None:
            raise self.error


def test_quarantine_kek_checked_per_dlq_topic() -> None:
    dl = FakeDeadLetters()
    check_quarantine_kek(FakeConfig(dead_letter_topics=["a.dlq", "b.dlq"]), dl)  # type: ignore[arg-type]
    assert dl.checked == [["a.dlq", "b.dlq"]]


def test_an_unusable_quarantine_kek_is_a_config_error() -> None:
    dl = FakeDeadLetters(KeyNotFound("kek 'quarantine-kek' not found: provider text"))
    with pytest.raises(ConfigError) as ei:
        check_quarantine_kek(FakeConfig(), dl)  # type: ignore[arg-type]
    assert str(ei.value) == (
        "dead_letter.kek 'quarantine-kek': cannot seal dead letters under it (KeyNotFound); "
        "create it or grant the processor generate-data-key on it (docs/keys.md)"
    )


def test_a_kms_outage_at_start_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    check_quarantine_kek(FakeConfig(), FakeDeadLetters(KmsUnavailable("down")))  # type: ignore[arg-type]
    assert "the quarantine KEK is checked when it is used" in caplog.text


def test_start_checks_hands_the_limit_to_the_pipeline_and_the_dead_letter_writer() -> None:
    t, _, _ = limits(FakeAdmin({}))
    pipeline = SimpleNamespace(source_topics=["orders"], max_record_bytes=1 << 30)
    dl = FakeDeadLetters()
    lim = start_checks(FakeConfig(max_record_bytes=100_000), pipeline, dl, t,  # type: ignore[arg-type]
                       producer_conf={}, consumer_conf={})  # fmt: skip
    assert lim == RecordLimit(100_000, "max_record_bytes")
    assert pipeline.max_record_bytes == 100_000 and dl.limit is lim
    assert dl.checked == [["orders.dlq"]]
