"""Observability: what the runtime reports, and to whom.

The runtime reports through the :class:`Observer` interface below and never touches
Prometheus directly, so tests can pass a recording observer and the metrics
implementation can change without touching the worker.  Every argument is an identifier
from a bounded set (topic, partition, audience, KEK id, reason class, operator,
provider); no method ever receives a record value or key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class Observer:
    """No-op base; :class:`streamproc.observability.metrics.Metrics` implements it."""

    def records_consumed(self, topic: str, partition: int, count: int) -> None:
        """Records fetched from a source partition."""

    def batch_processed(self, stats: object, inputs: int, seconds: float) -> None:
        """A :class:`~streamproc.pipeline.core.BatchStats` for one processed batch."""

    def end_to_end_latency(self, seconds: Sequence[float]) -> None:
        """Now minus each input record's Kafka timestamp, when the batch commits."""

    def end_to_end_latency_ms(self, now: float, timestamps_ms: Sequence[int]) -> None:
        """The same for a whole batch: ``now`` (epoch seconds) and the records' Kafka
        timestamps (ms).  The runtime calls this, once per batch; an implementation may
        bucket the batch at once (Metrics does) instead of one update per record."""
        self.end_to_end_latency([now - ts / 1000.0 for ts in timestamps_ms])

    def dead_lettered(self, reason: str, source_topic: str, count: int) -> None:
        """Records written to the dead-letter topic, by reason class."""

    def transaction(self, outcome: str) -> None:
        """``committed`` or ``aborted``."""

    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        """One KMS call (unwrap on a cache miss, generate_data_key on a sealer rotation)."""

    def dek_cache(self, hits: int, misses: int) -> None:
        """Cumulative data-key cache counters (the runtime calls this once per batch)."""

    def consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """High watermark minus position, per assigned (topic, partition)."""

    def assignment(self, partitions: Sequence[tuple[str, int]]) -> None:
        """The partitions now owned by this worker."""

    def ready(self, ready: bool, reason: str = "") -> None:
        """Readiness: partitions assigned, broker and KMS reachable."""

    def retrying(self, dependency: str, attempt: int) -> None:
        """A transient outage (``kms``, ``schema_registry``, ``broker``) is being retried."""

    def insecure_transport(self, component: str) -> None:
        """TLS certificate verification is off for ``component`` (``kafka``, ``kms``)."""

    def dependency_restored(self, dependency: str) -> None:
        """A dependency that was being retried (``retrying``) answers again."""

    def retention_drift(self, topic: str, drifted: bool) -> None:
        """A governed topic's live retention differs (or not) from the policy's (runtime.retention)."""

    def state_topic_drift(self, topic: str, drifted: bool) -> None:
        """A state topic's live compaction settings differ (or not) from what ``topics apply`` sets (runtime.state_topics)."""
