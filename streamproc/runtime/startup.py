"""Start-up checks of a worker: the record-size limit and the quarantine KEK.

Both turn a problem that would otherwise stall the first batch that meets it (a record
the producer refuses, a dead letter that cannot be sealed) into a decision made before
anything is consumed: a limit every written record is measured against, and a
configuration error (exit 78) for a quarantine KEK that does not exist or may not be used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from streamproc.config import Config
from streamproc.errors import ConfigError, KmsError, TransientError
from streamproc.pipeline.core import Pipeline
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.checkpoint import FatalWorkerError, describe, kafka_error
from streamproc.runtime.dlq import DeadLetterWriter
from streamproc.runtime.limits import RecordLimit, check_consumer, derive_limit

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before

#: DescribeConfigs denied: fall back to defaults instead of refusing to start.
_AUTH_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
    }
)


class TopicLimits:
    """``max.message.bytes`` per topic through DescribeConfigs, retried while the broker
    is unreachable.

    ``security_error`` returns the broker refusal seen so far (an authentication failure
    surfaces through ``error_cb`` only); ``broker_down(attempt)`` reports each retry.
    """

    def __init__(
        self,
        admin: Any,
        *,
        timeout: float,
        backoff: Backoff,
        stop: threading.Event,
        security_error: Callable[[], str | None],
        broker_down: Callable[[int], None],
    ) -> None:
        self.admin = admin
        self.timeout = timeout
        self.backoff = backoff
        self._stop = stop
        self._security_error = security_error
        self._broker_down = broker_down

    def get(self, topics: Sequence[str]) -> dict[str, int | None]:
        """``max.message.bytes`` per topic (``None``: the broker does not report it).

        A denied DescribeConfigs (an ACL without it) falls back to Kafka's default with a
        warning naming topic and operation.
        """
        from confluent_kafka.admin import ConfigResource

        attempt = 0
        while True:
            resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
            try:
                return self._describe(resources)
            except (KafkaException, TimeoutError) as exc:  # TimeoutError: e.g. a login refused
                self.admin.poll(0)  # serve error_cb: an authentication failure?
                denied = self._security_error()
                if denied is not None:
                    raise ConfigError(denied) from None
                attempt += 1
                log.warning("describe_configs: %s (attempt %d)", describe(exc), attempt)
                self._broker_down(attempt)
                if self._stop.wait(self.backoff.delay(attempt)):
                    raise FatalWorkerError("describe_configs: stopped while retrying") from None

    def _describe(self, resources: list[Any]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        futures = self.admin.describe_configs(resources, request_timeout=self.timeout)
        for res, fut in futures.items():
            try:
                entries = fut.result(timeout=self.timeout)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or err.code() not in _AUTH_CODES:
                    raise
                log.warning(
                    "DescribeConfigs on topic %s denied (%s); assuming Kafka's default "
                    "max.message.bytes",
                    res.name,
                    err.name(),
                    extra={"topic": res.name, "operation": "DESCRIBE_CONFIGS"},
                )
                out[res.name] = None
                continue
            entry = entries.get("max.message.bytes")
            raw = getattr(entry, "value", None)
            out[res.name] = int(raw) if raw not in (None, "") else None
        return out


def record_limit(
    config: Config,
    limits: TopicLimits,
    *,
    sources: Sequence[str],
    producer_conf: dict[str, Any],
    consumer_conf: dict[str, Any],
) -> RecordLimit:
    """The limit of every record the worker writes (see limits.py); also refuses consumer
    settings that cannot fetch the largest source record."""
    written = [*config.destination_topics, *config.dead_letter_topics]
    found = limits.get([*written, *sources])
    limit = derive_limit(
        configured=config.max_record_bytes,
        producer_conf=producer_conf,
        topic_limits={t: found.get(t) for t in written},
    )
    check_consumer(consumer_conf, {t: found.get(t) for t in sources})
    unknown = sorted(t for t in written if found.get(t) is None)
    if unknown:
        log.info(
            "max.message.bytes not reported for %s; assuming Kafka's default", ", ".join(unknown)
        )
    log.info(
        "record limit %d bytes (%s)",
        limit.max_bytes,
        limit.decided_by,
        extra={"bytes": limit.max_bytes},
    )
    return limit


def check_quarantine_kek(config: Config, dead_letters: DeadLetterWriter) -> None:
    """Generate a data key under the quarantine KEK per DLQ topic.

    A KEK that does not exist or that the processor may not use is a configuration
    error (exit 78) now rather than a stalled batch at the first bad record.  An
    outage is not: the worker starts, and a dead letter that cannot be sealed waits
    out the outage like any other transient error.
    """
    try:
        dead_letters.check(config.dead_letter_topics)
    except TransientError:
        log.warning("start-up: kms unavailable; the quarantine KEK is checked when it is used")
    except KmsError as exc:
        raise ConfigError(
            f"dead_letter.kek {config.dead_letter_kek!r}: cannot seal dead letters "
            f"under it ({type(exc).__name__}); create it or grant the processor "
            "generate-data-key on it (docs/keys.md)"
        ) from None


def start_checks(
    config: Config, pipeline: Pipeline, dead_letters: DeadLetterWriter, limits: TopicLimits, *,
    producer_conf: dict[str, Any], consumer_conf: dict[str, Any],
) -> RecordLimit:  # fmt: skip
    """Every start-up check, in order: the record limit (which the pipeline's own value
    check and the dead-letter writer then use), then the quarantine KEK."""
    limit = record_limit(
        config, limits, sources=pipeline.source_topics,
        producer_conf=producer_conf, consumer_conf=consumer_conf,
    )  # fmt: skip
    pipeline.max_record_bytes = limit.max_bytes  # a value alone may be too big
    dead_letters.limit = limit
    check_quarantine_kek(config, dead_letters)
    return limit
