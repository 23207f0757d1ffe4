"""The SASL_SSL test broker is what it claims: TLS with a pinned CA and hostname checks,
SCRAM-SHA-512, and an authorizer that denies what no ACL allows.

These check the test harness itself (``KafkaBroker(security="sasl_ssl")``); the product's
least-privilege ACLs and their denials are tested on top of it.  Every expectation comes
from the broker's own answers through confluent-kafka, not from our code.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from streamproc.devkafka import KafkaBroker, kafka_available

    ok, reason = kafka_available()
    if not ok:
        pytest.skip(reason)
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-sasl"), security="sasl_ssl")
    try:
        broker.start()
    except BaseException:
        print(broker.log_tail())
        broker.cleanup()
        raise
    try:
        yield broker
    finally:
        broker.cleanup()


def _errors(conf: dict[str, Any]) -> tuple[AdminClient, list[KafkaError]]:
    seen: list[KafkaError] = []
    return AdminClient({**conf, "error_cb": seen.append, "log_level": 0}), seen


def _metadata_fails(conf: dict[str, Any]) -> list[KafkaError]:
    admin, seen = _errors(conf)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=4)
    admin.poll(1)  # error_cb is served from poll()
    return seen


def test_admin_and_scram_user_over_sasl_ssl(secure_kafka: Any) -> None:
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(secure_kafka.client_config())
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)
    user, password = f"u{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    secure_kafka.create_scram_user(user, password)
    described = admin.describe_user_scram_credentials([user])[user].result(10)
    assert [i.mechanism.name for i in described.scram_credential_infos] == ["SCRAM_SHA_512"]

    # Authenticated, but no ACL: the authorizer denies (allow.everyone.if.no.acl.found=false).
    p = Producer({**secure_kafka.client_config(user, password), "log_level": 0})
    errs: list[Any] = []
    p.produce(topic, b"v", on_delivery=lambda e, m: errs.append(e))
    p.flush(15)
    assert errs and errs[0] is not None
    assert errs[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

    # The super user can produce and read back over the same listener.
    sp = Producer(secure_kafka.client_config())
    sp.produce(topic, b"hello")
    assert sp.flush(15) == 0
    c = Consumer({**secure_kafka.client_config(), "group.id": f"g-{uuid.uuid4().hex[:6]}"})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got = [m for m in c.consume(10, 10) if m.error() is None]
        assert [m.value() for m in got] == [b"hello"]
    finally:
        c.close()


def test_unauthenticated_wrong_password_and_foreign_ca_are_refused(secure_kafka: Any) -> None:
    from streamproc.devtls import DevCA

    # A PLAINTEXT client gets no metadata from a SASL_SSL listener.
    _metadata_fails({"bootstrap.servers": secure_kafka.bootstrap})
    # A wrong SCRAM password is an authentication failure.
    seen = _metadata_fails(secure_kafka.client_config("admin", "not-the-password"))
    assert any(e.code() == KafkaError._AUTHENTICATION for e in seen), seen
    # A client that pins a different CA refuses the broker's certificate.
    other = DevCA("a stranger CA").write_ca(secure_kafka.workdir / "stranger-ca.pem")
    seen = _metadata_fails({**secure_kafka.client_config(), "ssl.ca.location": str(other)})
    assert any(e.code() == KafkaError._SSL for e in seen), seen
