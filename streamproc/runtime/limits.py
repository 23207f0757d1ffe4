"""How large one record may be, derived from what the producer and the topics accept.

A record the producer refuses (``MSG_SIZE_TOO_LARGE``) or the broker rejects can never be
committed: the worker would stop on it at every start and its partition would never move
on -- a poison pill.  So the worker never hands the producer a record that may not fit:
every input, every output and every dead letter is measured against one limit, computed
once at start-up as the smallest of

* the producer's ``message.max.bytes`` (librdkafka's default is 1,000,000),
* ``max.message.bytes`` of every destination and dead-letter topic (``describe_configs``;
  Kafka's default 1,048,588 when the broker does not report it),

less the record-batch header, and validated against ``max_record_bytes`` when that is
set (a configured limit the producer or a topic cannot honour is a configuration error).
Sizes are counted as librdkafka counts them (key + value + every header name and value +
a fixed per-record overhead), rounded up so that whatever fits here fits there.

Why the consumer side matters too: a source record larger than the consumer's
``receive.message.max.bytes`` can never be fetched, which stalls its partition just the
same; :func:`check_consumer` refuses such settings at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from streamproc.errors import ConfigError

#: librdkafka's default ``message.max.bytes``.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
#: librdkafka's default ``receive.message.max.bytes``.
LIBRDKAFKA_RECEIVE_MESSAGE_MAX_BYTES = 100_000_000
#: Kafka's default ``max.message.bytes`` (broker ``message.max.bytes``): 1 MiB + 12.
KAFKA_MAX_MESSAGE_BYTES = 1_048_588
#: A v2 record batch header (61 bytes) -- counted once per record to stay on the safe side.
BATCH_OVERHEAD = 61
#: A v2 record's worst-case framing (length, attributes, timestamp/offset deltas, key and
#: value lengths, header count: varints at their widest) -- librdkafka uses the same bound.
RECORD_OVERHEAD = 36
#: Per header: the two length varints at their widest.
HEADER_OVERHEAD = 10

Headers = Iterable[tuple[str, bytes | None]]


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Worst-case wire size of one record (without the batch header)."""
    n = RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
    for name, v in headers:
        n += HEADER_OVERHEAD + len(name.encode()) + (len(v) if v else 0)
    return n


@dataclass(frozen=True)
class RecordLimit:
    """The largest record (as :func:`record_size` counts it) the worker may produce."""

    max_bytes: int
    #: Which setting decided it, for log lines and errors (names, never values of records).
    decided_by: str

    def fits(self, key: bytes | None, value: bytes | None, headers: Headers) -> bool:
        return record_size(key, value, headers) <= self.max_bytes


def _int_setting(conf: Mapping[str, object], name: str, default: int) -> int:
    raw = conf.get(name, default)
    try:
        return int(str(raw))
    except ValueError:
        raise ConfigError(f"librdkafka property {name!r} must be an integer") from None


def derive_limit(
    *,
    configured: int | None,
    producer_conf: Mapping[str, object],
    topic_limits: Mapping[str, int | None],
) -> RecordLimit:
    """The record limit, or :class:`ConfigError` when ``configured`` cannot be honoured.

    ``topic_limits`` maps every topic the worker writes to its ``max.message.bytes``
    (``None``: not reported; Kafka's default is assumed).
    """
    producer_max = _int_setting(producer_conf, "message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES)
    bounds = [(producer_max - BATCH_OVERHEAD, f"producer message.max.bytes {producer_max}")]
    for topic, limit in sorted(topic_limits.items()):
        value = KAFKA_MAX_MESSAGE_BYTES if limit is None else limit
        what = "max.message.bytes" if limit is not None else "max.message.bytes (Kafka default)"
        bounds.append((value - BATCH_OVERHEAD, f"topic {topic!r} {what} {value}"))
    best, why = min(bounds)
    if best <= RECORD_OVERHEAD + 1024:
        raise ConfigError(f"{why} leaves no room for a record")
    if configured is None:
        return RecordLimit(best, why)
    if configured > best:
        raise ConfigError(
            f"max_record_bytes {configured} exceeds what can be written ({why}, less "
            f"{BATCH_OVERHEAD} bytes of batch header = {best}); lower max_record_bytes, or raise "
            "the producer's message.max.bytes and the topics' max.message.bytes"
        )
    return RecordLimit(configured, "max_record_bytes")


def check_consumer(consumer_conf: Mapping[str, object], source_limits: Mapping[str, int | None]) -> None:
    """Refuse consumer settings that could never fetch a record the sources accept."""
    receive = _int_setting(
        consumer_conf, "receive.message.max.bytes", LIBRDKAFKA_RECEIVE_MESSAGE_MAX_BYTES
    )
    for topic, limit in sorted(source_limits.items()):
        value = KAFKA_MAX_MESSAGE_BYTES if limit is None else limit
        if receive < value + 512:
            raise ConfigError(
                f"consumer receive.message.max.bytes {receive} is below source topic "
                f"{topic!r} max.message.bytes {value} + 512: its largest records could never be "
                "fetched and the partition would stall"
            )


__all__ = [
    "BATCH_OVERHEAD",
    "KAFKA_MAX_MESSAGE_BYTES",
    "LIBRDKAFKA_MESSAGE_MAX_BYTES",
    "RecordLimit",
    "check_consumer",
    "derive_limit",
    "record_size",
]
