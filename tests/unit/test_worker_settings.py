"""librdkafka settings errors name the property, never the value (it may be a password)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, Producer

from streamproc.runtime.kafka_conf import setting_error as _setting_error


@pytest.mark.parametrize(
    ("conf", "name"),
    [
        ({"security.protocol": "hunter2-secret"}, "security.protocol"),
        ({"no.such.prop": "hunter2-secret"}, "no.such.prop"),
        ({"linger.ms": "hunter2-secret"}, "queue.buffering.max.ms"),
    ],
)
def test_setting_errors_keep_the_name_and_drop_the_value(conf: dict[str, str], name: str) -> None:
    with pytest.raises(KafkaException) as info:
        Producer(conf)
    described = _setting_error(info.value.args[0].str())
    assert name in described
    assert "hunter2" not in described


def test_unrecognised_messages_fall_back_to_a_generic_text() -> None:
    assert "hunter2" not in _setting_error('something odd about "hunter2"')


@pytest.mark.parametrize(
    ("conf", "name"),
    [
        # librdkafka names these unquoted, or not at all: "<key> failed: ...", "No provider
        # for SASL mechanism GSSAPI".  The message used to be a bare "invalid librdkafka setting".
        ({"security.protocol": "ssl", "ssl.ca.location": "/nonexistent/hunter2-ca.pem"}, "ssl.ca.location"),
        ({"security.protocol": "ssl", "ssl.certificate.location": "/nonexistent/hunter2.pem"}, "ssl.certificate.location"),
        ({"security.protocol": "sasl_ssl"}, "sasl.mechanisms"),
    ],
)
def test_settings_named_without_quotes_are_named_too(conf: dict[str, str], name: str) -> None:
    with pytest.raises(KafkaException) as info:
        Producer(conf)
    described = _setting_error(info.value.args[0].str(), conf)
    assert repr(name) in described
    assert "hunter2" not in described and "/nonexistent" not in described
