"""Fakes for the worker's collaborators (streamproc.runtime.*): no broker, no threads.

* :class:`RecordingObserver` records every observer call in order;
* :class:`FakeClock` is a monotonic clock the test moves (no sleeping, no timing);
* :class:`FakeConsumer` answers the consumer calls the collaborators make, from a script;
* :func:`msg` builds a real :class:`confluent_kafka.Message` (the client allows it);
* :func:`kerr` a :class:`KafkaError` whose broker text must never reach a log line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from streamproc.observability import Observer

BROKER_TEXT = "broker text that must not leak"


def kerr(code: int, *, fatal: bool = False, retriable: bool = False, text: str = BROKER_TEXT) -> KafkaError:
    return KafkaError(code, text, fatal=fatal, retriable=retriable)


def msg(
    topic: str = "orders",
    partition: int = 0,
    offset: int = 0,
    *,
    key: bytes | None = b"k",
    value: bytes | None = b"v",
    headers: list[tuple[str, bytes | None]] | None = None,
    timestamp: tuple[int, int] = (1, 1_700_000_000_000),
    error: KafkaError | None = None,
) -> Message:
    return Message(
        topic=topic, partition=partition, offset=offset, key=key, value=value,
        headers=headers, timestamp=timestamp, error=error,
    )  # fmt: skip


class RecordingObserver(Observer):
    """Every call as ``(method, args...)``, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]

    def ready(self, ready: bool, reason: str = "") -> None:
        self.calls.append(("ready", ready, reason))

    def retrying(self, dependency: str, attempt: int) -> None:
        self.calls.append(("retrying", dependency, attempt))

    def dependency_restored(self, dependency: str) -> None:
        self.calls.append(("dependency_restored", dependency))

    def assignment(self, partitions: Sequence[tuple[str, int]]) -> None:
        self.calls.append(("assignment", list(partitions)))

    def consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        self.calls.append(("consumer_lag", dict(lags)))

    def end_to_end_latency_ms(self, now: float, timestamps_ms: Sequence[int]) -> None:
        self.calls.append(("end_to_end_latency_ms", now, list(timestamps_ms)))

    def dead_lettered(self, reason: str, source_topic: str, count: int) -> None:
        self.calls.append(("dead_lettered", reason, source_topic, count))

    def dek_cache(self, hits: int, misses: int) -> None:
        self.calls.append(("dek_cache", hits, misses))

    def transaction(self, outcome: str) -> None:
        self.calls.append(("transaction", outcome))


class FakeClock:
    """Monotonic seconds that move only when the test (or a fake client) says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeConsumer:
    """The consumer calls of pause, assignment, health and lag, recorded.

    ``batches``: what successive ``consume()`` calls return (then nothing); ``on_consume``
    runs at each call with the timeout (a test moves its clock or sets stop there).
    ``list_topics_error`` / ``position_error`` / ``seek_error``: raise that once set.
    ``watermarks``: (topic, partition) -> (low, high) or an exception to raise.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.batches: list[list[Message]] = []
        self.on_consume: Callable[[float], None] = lambda _t: None
        self.list_topics_error: KafkaException | None = None
        self.position_error: KafkaException | None = None
        self.seek_error: KafkaException | None = None
        self.positions: dict[tuple[str, int], int] = {}
        self.watermarks: dict[tuple[str, int], tuple[int | None, int | None] | KafkaException] = {}

    def pause(self, parts: list[TopicPartition]) -> None:
        self.calls.append(("pause", [(p.topic, p.partition) for p in parts]))

    def resume(self, parts: list[TopicPartition]) -> None:
        self.calls.append(("resume", [(p.topic, p.partition) for p in parts]))

    def seek(self, tp: TopicPartition) -> None:
        if self.seek_error is not None:
            raise self.seek_error
        self.calls.append(("seek", (tp.topic, tp.partition), tp.offset))

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.calls.append(("consume", num_messages, timeout))
        self.on_consume(timeout)
        return self.batches.pop(0) if self.batches else []

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> object:
        self.calls.append(("list_topics", topic, timeout))
        if self.list_topics_error is not None:
            raise self.list_topics_error
        return object()

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        self.calls.append(("position", [(p.topic, p.partition) for p in parts]))
        if self.position_error is not None:
            raise self.position_error
        return [
            TopicPartition(p.topic, p.partition, self.positions.get((p.topic, p.partition), -1001))
            for p in parts
        ]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[Any, Any]:
        assert cached, "lag reporting must not cost a broker round trip"
        wm = self.watermarks[(tp.topic, tp.partition)]
        if isinstance(wm, KafkaException):
            raise wm
        return wm

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]
