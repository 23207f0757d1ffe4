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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from streamproc.errors import ConfigError, Reason
from streamproc.pipeline.core import BatchResult, InputRecord, Quarantined

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


def split_oversized(
    inputs: list[InputRecord], limit: RecordLimit | None
) -> tuple[list[InputRecord], list[Quarantined]]:
    """Quarantine inputs (key + value + headers) over the record limit."""
    if limit is None:
        return inputs, []
    max_bytes = limit.max_bytes
    ok: list[InputRecord] = []
    big: list[Quarantined] = []
    for rec in inputs:
        v, k = rec.value, rec.key
        # Cheap bound first: most records are far below the limit.
        if (len(v) if v else 0) + (len(k) if k else 0) + 4096 < max_bytes and not rec.headers:
            ok.append(rec)
            continue
        n = record_size(k, v, rec.headers)
        if n > max_bytes:
            big.append(Quarantined(rec, Reason.OVERSIZED, f"{n} bytes > limit {max_bytes}"))
        else:
            ok.append(rec)
    return ok, big


def enforce_output_limit(
    result: BatchResult,
    early: list[Quarantined],
    limit: RecordLimit | None,
    audience_of: Callable[[str], str],
) -> None:
    """Dead-letter every input one of whose outputs a transform made too large, and merge
    ``early`` (inputs already over the limit) into ``result.quarantined`` in offset order.

    All or nothing per input: its other outputs are dropped too, and the egress counters
    (``audience_of(topic)`` names the audience of a destination topic) forget them.
    """
    if limit is not None:
        too_big: dict[int, tuple[str, int]] = {}
        for o in result.outputs:
            n = record_size(o.key, o.value, o.headers)
            if n > limit.max_bytes:
                too_big.setdefault(id(o.source), (o.topic, n))
        if too_big:
            kept = []
            stats = result.stats
            for o in result.outputs:
                if id(o.source) in too_big:
                    ek = (o.topic, audience_of(o.topic))
                    if ek in stats.egress_records:
                        stats.egress_records[ek] -= 1
                        stats.egress_bytes[ek] -= len(o.value or b"")
                else:
                    kept.append(o)
            seen: set[int] = set()
            for o in result.outputs:
                sid = id(o.source)
                if sid in too_big and sid not in seen:
                    seen.add(sid)
                    topic, n = too_big[sid]
                    detail = f"output for {topic!r} is {n} bytes > limit {limit.max_bytes}"
                    early.append(Quarantined(o.source, Reason.OVERSIZED, detail))
            result.outputs = kept
    if early:
        for q in early:
            result.stats.quarantined[q.reason] = result.stats.quarantined.get(q.reason, 0) + 1
        merged = [*result.quarantined, *early]
        merged.sort(key=lambda q: (q.record.topic, q.record.partition, q.record.offset))
        result.quarantined = merged
