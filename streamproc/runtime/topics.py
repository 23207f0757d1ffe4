"""``streamproc topics apply``: create the topics a config needs, idempotently.

Sources, destinations and dead-letter topics are created with the partitions,
replication factor and topic configs of ``topics.defaults`` overlaid with
``topics.overrides.<topic>``.  Topics that already exist are reported, not changed: a
partition count cannot be lowered and changing it re-keys the topic, so that decision is
left to an operator.  A mismatch between an existing topic's partition count and the
config is reported as ``exists (partitions N != M)`` so it is visible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamproc.config import Config

log = logging.getLogger("streamproc.runtime.topics")


@dataclass(frozen=True)
class TopicResult:
    topic: str
    status: str  # "created" | "exists"
    partitions: int
    replication_factor: int
    note: str = ""


def apply_topics(
    config: Config, *, admin: AdminClient | None = None, timeout: float = 30.0
) -> list[TopicResult]:
    """Create every topic of ``config`` that does not exist; raise on any other error."""
    if admin is None:  # not `admin or ...`: a client with an empty queue has len() 0
        admin = AdminClient(config.admin_config())
    wanted = config.all_topics()
    existing = admin.list_topics(timeout=timeout).topics
    results: dict[str, TopicResult] = {}
    new: list[NewTopic] = []
    for t in wanted:
        s = config.topics.for_topic(t)
        parts, rf = s.partitions or 1, s.replication_factor or 1
        meta = existing.get(t)
        if meta is not None and meta.error is None:
            have = len(meta.partitions)
            note = f"partitions {have} != {parts}" if have != parts else ""
            results[t] = TopicResult(t, "exists", have, rf, note)
            continue
        new.append(NewTopic(t, num_partitions=parts, replication_factor=rf, config=dict(s.config)))
    if new:
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
        for nt in new:
            try:
                futures[nt.topic].result(timeout)
                status = "created"
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                status = "exists"  # created concurrently by someone else
            results[nt.topic] = TopicResult(
                nt.topic, status, nt.num_partitions, nt.replication_factor
            )
            log.info("topic %s", status, extra={"topic": nt.topic, "partitions": nt.num_partitions})
    return [results[t] for t in wanted]


__all__ = ["TopicResult", "apply_topics"]
