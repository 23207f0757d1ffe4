"""streamproc.runtime.access: every broker refusal becomes one sentence naming who
(principal), what (operation) and where (resource), never a password or broker text."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamproc.runtime.access import AUTHZ_OPERATION, AccessGuard
from tests.unit.worker_fakes import BROKER_TEXT, kerr, msg

GRANT = "; grant it with `streamproc acls apply` (docs/configuration.md#acls)"


@dataclass
class FakeConfig:
    producer: dict[str, Any] = field(default_factory=dict)
    acls: Any = None
    audit: Any = None
    group_id: str = "orders-processor"
    destination_topics: list[str] = field(
        default_factory=lambda: ["orders.analytics", "orders.fraud"]
    )
    dead_letter_topics: list[str] = field(default_factory=lambda: ["orders.dlq"])

    def producer_config(self) -> dict[str, Any]:
        return dict(self.producer)


class FakeProducer:
    """``list_topics`` answers with the topics the principal may see (``None``: error)."""

    def __init__(self, visible: dict[str, Any] | None = None, error: bool = False) -> None:
        self.visible = visible or {}
        self.error = error
        self.timeouts: list[float] = []

    def list_topics(self, timeout: float) -> Any:
        self.timeouts.append(timeout)
        if self.error:
            raise KafkaException(kerr(KafkaError._TRANSPORT))
        return SimpleNamespace(topics=self.visible)


def meta(error: KafkaError | None = None) -> Any:
    return SimpleNamespace(error=error)


def guard(
    config: FakeConfig | None = None, producer: FakeProducer | None = None
) -> tuple[AccessGuard, list[str]]:
    stops: list[str] = []
    g = AccessGuard(
        config or FakeConfig(), "orders-processor-host-0", producer=lambda: producer,  # type: ignore[arg-type]
        stop=lambda: stops.append("stop"), timeout=30.0,
    )  # fmt: skip
    return g, stops


def test_principal_prefers_the_acls_section_then_the_sasl_user() -> None:
    acls = SimpleNamespace(processor="User:streamproc-processor")
    assert guard(FakeConfig(acls=acls))[0].principal() == "User:streamproc-processor"
    cfg = FakeConfig(producer={"sasl.username": "alice", "sasl.password": "hunter2"})
    assert guard(cfg)[0].principal() == "User:alice"
    assert guard(FakeConfig())[0].principal() == "the client's principal"


@pytest.mark.parametrize(
    ("code", "topic", "produce", "sentence"),
    [
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "orders", False, "READ TOPIC 'orders'"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "orders.fraud", True, "WRITE TOPIC 'orders.fraud'"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, None, False, "READ a topic"),
        (KafkaError.GROUP_AUTHORIZATION_FAILED, None, False, "READ GROUP 'orders-processor'"),
        (
            KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            None,
            True,
            "WRITE TRANSACTIONAL_ID 'orders-processor-host-0'",
        ),
        (KafkaError.CLUSTER_AUTHORIZATION_FAILED, None, True, "IDEMPOTENT_WRITE the CLUSTER"),
    ],
)
def test_deny_names_principal_operation_and_resource(
    code: int, topic: str | None, produce: bool, sentence: str
) -> None:
    cfg = FakeConfig(producer={"sasl.username": "bob", "sasl.password": "hunter2"})
    g, stops = guard(cfg, FakeProducer())
    g.deny(kerr(code), topic, produce=produce)
    name = KafkaError(code).name()
    assert g.error == f"User:bob is not authorized to {sentence} ({name}){GRANT}"
    assert stops == ["stop"]
    assert "hunter2" not in g.error and BROKER_TEXT not in g.error


def test_only_the_first_refusal_is_kept() -> None:
    g, stops = guard()
    g.deny(kerr(KafkaError.GROUP_AUTHORIZATION_FAILED), None)
    first = g.error
    g.deny(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), "orders")
    g.authentication_failed(kerr(KafkaError._AUTHENTICATION))
    assert g.error == first and stops == ["stop"]


def test_a_refused_write_without_a_topic_names_the_outputs_we_cannot_see() -> None:
    audit = SimpleNamespace(kafka_topic="streamproc.audit")
    visible = {
        "orders.analytics": meta(),
        "orders.fraud": meta(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED)),  # listed, refused
        # orders.dlq and the audit topic are not even described to us
    }
    producer = FakeProducer(visible)
    g, _ = guard(FakeConfig(audit=audit), producer)
    g.deny(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), None, produce=True)
    assert g.error is not None
    assert "WRITE TOPIC 'orders.fraud', 'orders.dlq', 'streamproc.audit' (" in g.error
    assert producer.timeouts == [10.0]  # min(timeout, 10 s)


def test_hidden_outputs_are_deduplicated_and_exclude_visible_topics() -> None:
    cfg = FakeConfig(destination_topics=["a", "b", "a"], dead_letter_topics=["dlq", "b"])
    g, _ = guard(cfg, FakeProducer({"a": meta()}))
    assert g.hidden_outputs() == ["b", "dlq"]


def test_hidden_outputs_without_a_producer_or_metadata_is_empty() -> None:
    assert guard(FakeConfig(), None)[0].hidden_outputs() == []
    assert guard(FakeConfig(), FakeProducer(error=True))[0].hidden_outputs() == []
    g, _ = guard(FakeConfig(), FakeProducer(error=True))
    g.deny(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), None, produce=True)
    assert g.error is not None and "WRITE a topic (" in g.error


@pytest.mark.parametrize(
    ("producer", "mechanism"),
    [
        ({"sasl.mechanisms": "SCRAM-SHA-512"}, "SCRAM-SHA-512"),
        ({"sasl.mechanism": "PLAIN"}, "PLAIN"),
        ({}, "SASL"),
    ],
)
def test_authentication_failure_names_principal_and_mechanism(
    producer: dict[str, str], mechanism: str
) -> None:
    cfg = FakeConfig(producer={**producer, "sasl.username": "carol", "sasl.password": "hunter2"})
    g, stops = guard(cfg)
    g.authentication_failed(kerr(KafkaError._AUTHENTICATION))
    assert g.error == (
        f"authentication of User:carol failed ({mechanism}, _AUTHENTICATION); "
        "check sasl.username and sasl.password"
    )
    assert stops == ["stop"]


def test_an_untrusted_certificate_says_which_setting_to_check() -> None:
    g, stops = guard()
    g.authentication_failed(kerr(KafkaError._SSL, text="certificate verify failed"))
    assert g.error == (
        "the broker's TLS certificate was not accepted (_SSL); check that ssl.ca.location "
        "holds the cluster's CA and the broker name matches it"
    )
    assert stops == ["stop"]
    g.authentication_failed(kerr(KafkaError._AUTHENTICATION))  # later ones are ignored
    assert g.error is not None and g.error.startswith("the broker's TLS")


def test_is_authentication() -> None:
    assert AccessGuard.is_authentication(kerr(KafkaError._AUTHENTICATION))
    assert AccessGuard.is_authentication(kerr(KafkaError._SSL, text="SSL handshake: certificate verify failed"))
    assert not AccessGuard.is_authentication(kerr(KafkaError._SSL, text="connection reset"))
    assert not AccessGuard.is_authentication(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED))


def test_delivery_errors_deny_only_authorization_codes() -> None:
    g, stops = guard()
    g.on_delivery_error(kerr(KafkaError.MSG_SIZE_TOO_LARGE), "orders.fraud")
    g.on_txn_delivery(None, msg("orders.fraud"))
    g.on_txn_delivery(kerr(KafkaError._MSG_TIMED_OUT), msg("orders.fraud"))
    assert g.error is None and stops == []
    g.on_delivery_error(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), "orders.fraud")
    assert g.error is not None and "WRITE TOPIC 'orders.fraud'" in g.error

    g2, _ = guard()
    g2.on_txn_delivery(kerr(KafkaError.TOPIC_AUTHORIZATION_FAILED), msg("orders.analytics"))
    assert g2.error is not None and "WRITE TOPIC 'orders.analytics'" in g2.error


def test_every_authorization_code_has_a_sentence() -> None:
    for code in AUTHZ_OPERATION:
        g, _ = guard()
        g.deny(kerr(code), "t", produce=True)
        assert g.error is not None and " is not authorized to " in g.error
