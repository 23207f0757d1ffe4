"""librdkafka settings errors name the property, never the value (it may be a password)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, Producer

from streamproc.runtime.worker import _setting_error


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
