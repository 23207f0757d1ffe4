"""The sealed dead-letter format and the record limit, without a broker."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import ConfigError, Reason
from streamproc.pipeline.core import InputRecord, Quarantined
from streamproc.runtime.dlq import (
    DeadLetterError,
    DeadLetterReader,
    DeadLetterWriter,
    decode_payload,
    encode_payload,
    from_quarantined,
)
from streamproc.runtime.limits import (
    BATCH_OVERHEAD,
    RecordLimit,
    check_consumer,
    derive_limit,
    record_size,
)


@pytest.fixture()
def ring(tmp_path: Path) -> LocalKeyring:
    k = LocalKeyring.create(tmp_path / "ring.json")
    k.create_key("quarantine-kek")
    return k


def q(key: bytes | None, value: bytes | None, headers: tuple[tuple[str, bytes | None], ...] = ()) -> Quarantined:
    rec = InputRecord("orders", 2, 41, key, value, 1_700_000_000_123, headers)
    return Quarantined(rec, Reason.MALFORMED, "bad length")


# -- the record limit ----------------------------------------------------------------------------
def test_limit_is_the_smallest_of_producer_and_topics_less_the_batch_header() -> None:
    lim = derive_limit(configured=None, producer_conf={}, topic_limits={"a": None, "b": None})
    assert lim.max_bytes == 1_000_000 - 61  # librdkafka's default message.max.bytes
    assert "message.max.bytes 1000000" in lim.decided_by
    lim = derive_limit(
        configured=None,
        producer_conf={"message.max.bytes": 5_000_000},
        topic_limits={"orders.fraud": 524_288, "orders.dlq": None},
    )
    assert lim.max_bytes == 524_288 - 61 and "orders.fraud" in lim.decided_by
    lim = derive_limit(configured=None, producer_conf={"message.max.bytes": "2000000"}, topic_limits={"x": None})
    assert lim.max_bytes == 1_048_588 - 61  # Kafka's default max.message.bytes


def test_a_configured_limit_the_producer_cannot_honour_is_a_config_error() -> None:
    # The old default (1 MiB) is over librdkafka's default message.max.bytes: refused.
    with pytest.raises(ConfigError, match=r"max_record_bytes 1048576 exceeds .*message.max.bytes 1000000"):
        derive_limit(configured=1 << 20, producer_conf={}, topic_limits={"t": None})
    assert derive_limit(configured=65_536, producer_conf={}, topic_limits={"t": None}) == RecordLimit(
        65_536, "max_record_bytes"
    )


def test_consumer_that_cannot_fetch_the_sources_largest_records_is_refused() -> None:
    check_consumer({}, {"orders": 8_388_608})
    with pytest.raises(ConfigError, match=r"receive\.message\.max\.bytes"):
        check_consumer({"receive.message.max.bytes": 1_000_000}, {"orders": None})


def test_record_size_never_underestimates_librdkafka() -> None:
    """librdkafka itself is the second implementation: whatever our count lets through
    with limit = message.max.bytes - batch header, its produce() accepts."""
    mmb = 20_000
    p = Producer({"bootstrap.servers": "127.0.0.1:9", "message.max.bytes": mmb, "socket.timeout.ms": 10})
    rnd = random.Random(7)
    accepted_at_limit = 0
    for _ in range(400):
        key = os.urandom(rnd.randrange(0, 3000)) if rnd.random() < 0.9 else None
        headers = [(f"h{i}" * rnd.randrange(1, 5), os.urandom(rnd.randrange(0, 400))) for i in range(rnd.randrange(0, 6))]
        value = os.urandom(rnd.randrange(0, 20_000))
        ours = record_size(key, value, headers) <= mmb - BATCH_OVERHEAD
        try:
            p.produce("t", value=value, key=key, headers=headers)
            theirs = True
        except KafkaException as exc:
            assert exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
            theirs = False
        if ours:
            assert theirs, (len(key or b""), len(value), headers and len(headers))
            accepted_at_limit += 1
    assert accepted_at_limit > 50
    p.purge()


# -- the sealed format ---------------------------------------------------------------------------
def test_payload_roundtrip_keeps_key_headers_and_value_byte_for_byte() -> None:
    hdrs = (("trace", b"t-1"), ("empty", None), ("bin", bytes(range(256))))
    d = from_quarantined(q(b"customer-42", b"\x00\x01garbage", hdrs))
    back = decode_payload(encode_payload(d))
    assert back == d
    assert back.key == b"customer-42" and back.headers == hdrs and back.value == b"\x00\x01garbage"
    assert back.value_sha256 == hashlib.sha256(b"\x00\x01garbage").digest()
    none = from_quarantined(q(None, None))
    assert decode_payload(encode_payload(none)) == none
    with pytest.raises(DeadLetterError):
        decode_payload(encode_payload(d)[:-1])
    with pytest.raises(DeadLetterError):
        decode_payload(encode_payload(d) + b"x")


def test_writer_seals_under_the_quarantine_kek_and_keys_by_token(ring: LocalKeyring) -> None:
    w = DeadLetterWriter(ring, "quarantine-kek", key_token=lambda k: b"tk-" + hashlib.sha256(k).hexdigest()[:8].encode())
    key, value, headers = w.build(q(b"alice@example.com", b"PLAINTEXT-CANARY", (("user", b"alice"),)), "orders.dlq")
    assert key == b"tk-" + hashlib.sha256(b"alice@example.com").hexdigest()[:8].encode()
    wire = (key or b"") + value + b"".join(n.encode() + (v or b"") for n, v in headers)
    for secret in (b"alice", b"PLAINTEXT-CANARY"):
        assert secret not in wire
    assert {n for n, _ in headers} == {
        "streamproc.dlq.reason", "streamproc.dlq.detail", "streamproc.dlq.format",
        "streamproc.source.topic", "streamproc.source.partition", "streamproc.source.offset",
        "streamproc.source.timestamp", "streamproc.processor.version",
    }
    d = DeadLetterReader(ring).open("orders.dlq", value, headers)
    assert (d.key, d.value, d.headers) == (b"alice@example.com", b"PLAINTEXT-CANARY", (("user", b"alice"),))
    assert (d.reason, d.detail, d.topic, d.partition, d.offset) == ("malformed_envelope", "bad length", "orders", 2, 41)
    assert d.timestamp_ms == 1_700_000_000_123 and d.complete
    # Sealed for one DLQ topic: it does not open as another's.
    with pytest.raises(DeadLetterError):
        DeadLetterReader(ring).open("logins.dlq", value, headers)
    # Clear headers that disagree with the sealed copy are refused.
    forged = [(n, b"7" if n == "streamproc.source.offset" else v) for n, v in headers]
    with pytest.raises(DeadLetterError, match="does not match"):
        DeadLetterReader(ring).open("orders.dlq", value, forged)
    # Without the quarantine KEK nothing opens.
    other = LocalKeyring.create(Path(str(ring.path) + ".other"))
    with pytest.raises(DeadLetterError):
        DeadLetterReader(other).open("orders.dlq", value, headers)


def test_writer_truncates_then_references_to_fit_the_limit(ring: LocalKeyring) -> None:
    limit = RecordLimit(4000, "test")
    w = DeadLetterWriter(ring, "quarantine-kek", key_token=None, limit=limit)
    big = os.urandom(10_000)
    key, value, headers = w.build(q(b"k", big), "orders.dlq")
    assert record_size(key, value, headers) <= 4000
    d = DeadLetterReader(ring).open("orders.dlq", value, headers)
    assert d.truncated and big.startswith(d.value or b"x") and d.value_length == 10_000
    assert len(d.value or b"") > 3000, "as much as fits is kept"
    key, value, headers = w.build(q(os.urandom(5000), b"small"), "orders.dlq")
    assert record_size(key, value, headers) <= 4000
    d = DeadLetterReader(ring).open("orders.dlq", value, headers)
    assert d.reference and d.key is None and d.value is None and d.key_length == 5000
    assert (w.truncated, w.references) == (1, 1)
