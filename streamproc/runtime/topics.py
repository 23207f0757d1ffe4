"""``streamproc topics apply``: create the topics a config needs, idempotently.

Sources, destinations and dead-letter topics are created with the partitions,
replication factor and topic configs of ``topics.defaults`` overlaid with
``topics.overrides.<topic>``.  Topics that already exist are reported, not changed: a
partition count cannot be lowered and changing it re-keys the topic, so that decision is
left to an operator.  A mismatch between an existing topic's partition count and the
config is reported as ``exists (partitions N != M)`` so it is visible.

Retention is the exception: it is policy (:mod:`streamproc.runtime.retention`).  Every
governed topic is created with, and an existing one is altered to, the ``retention.ms``
the policy and config call for; a config that would keep data longer than the policy
allows is refused before anything is created.

The consent topic (``consent.topic``) is created with ``cleanup.policy=compact``: it is a
table (the last record per subject and purpose is the state), and a withdrawal that
expired by age would turn back into "no record", i.e. into consent-by-default for the
opt-out bases.

The subject-key topic (``erasure.topic``) is compacted too, with settings that bound how
long a shredded key stays in the log (:data:`~streamproc.runtime.state_topics.KEY_TOPIC_CONFIG`, docs/governance.md): a
closed segment after ``segment.ms``, cleaned as soon as it is dirty
(``min.cleanable.dirty.ratio``) and at the latest after ``max.compaction.lag.ms``.
``topics.overrides.<key topic>`` may change them.  Unlike partitions, these settings are
realigned on an existing topic (as retention is): a state topic that deletes by age, or a
key topic compacted too late, breaks a guarantee, and setting them back loses nothing.

The budget changelog (``<group_id>.budget-changelog``, when an audience has ``budget:``)
is compacted too, with the largest partition count of the source topics (changelog
partition p holds the state of input partition p).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.policy.model import Policy
from streamproc.runtime.retention import (
    RETENTION_MS,
    config_violations,
    describe_retention,
    expected_retention,
    set_retention,
)
from streamproc.runtime.state_topics import StateTopic, expected_state_configs, realign

log = logging.getLogger("streamproc.runtime.topics")


@dataclass(frozen=True)
class TopicResult:
    topic: str
    status: str  # "created" | "exists"
    partitions: int
    replication_factor: int
    note: str = ""


def apply_topics(
    config: Config,
    *,
    admin: AdminClient | None = None,
    timeout: float = 30.0,
    policy: Policy | None = None,
) -> list[TopicResult]:
    """Create every topic of ``config`` that does not exist and set the policy's retention.

    Raises :class:`~streamproc.errors.ConfigError` when the config's topic settings would
    retain longer than the policy allows (nothing is created then), and the Kafka error on
    any other failure.
    """
    if admin is None:  # not `admin or ...`: a client with an empty queue has len() 0
        admin = AdminClient(config.admin_config())
    policy = policy if policy is not None else config.load_policy()
    problems = config_violations(config, policy)
    if problems:
        raise ConfigError("; ".join(problems))
    retention = {t: r.desired_ms for t, r in expected_retention(config, policy).items()}
    wanted = config.all_topics()
    existing = admin.list_topics(timeout=timeout).topics
    results: dict[str, TopicResult] = {}
    new: list[NewTopic] = []
    changelog = config.budget_changelog_topic
    state = expected_state_configs(config)
    for t in wanted:
        s = config.topics.for_topic(t)
        parts, rf = s.partitions or 1, s.replication_factor or 1
        if t in (changelog, config.risk_hold_topic):
            parts = _changelog_partitions(config, existing)
        meta = existing.get(t)
        if meta is not None and meta.error is None:
            have = len(meta.partitions)
            note = f"partitions {have} != {parts}" if have != parts else ""
            results[t] = TopicResult(t, "exists", have, rf, note)
            continue
        conf = dict(s.config)
        if t in retention:
            conf[RETENTION_MS] = str(retention[t])
        st = state.get(t)
        if st is not None:
            # A state topic (consent table, subject keys, budget changelog): the last record
            # per key is the state, so it is compacted, never deleted by age, and the key
            # topic's cleaning is bounded.  The settings `topics check` and the worker's
            # drift check compare with, so what is created is what is checked.
            # (retention.ms, if configured, is left: Kafka ignores it under compact only.)
            conf.update(st.settings)
        new.append(NewTopic(t, num_partitions=parts, replication_factor=rf, config=conf))
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
        _wait_for_leaders(admin, [nt.topic for nt in new], timeout)
    _align_retention(admin, results, retention, timeout)
    _align_state_configs(admin, state, results, timeout)
    return [results[t] for t in wanted]


def _changelog_partitions(config: Config, existing: Mapping[str, Any]) -> int:
    """The budget changelog's partition count: the largest of the source topics' (as they
    exist, else as configured), so input partition p always has changelog partition p."""
    counts = []
    for src in config.source_topics:
        meta = existing.get(src)
        if meta is not None and meta.error is None and meta.partitions:
            counts.append(len(meta.partitions))
        else:
            counts.append(config.topics.for_topic(src).partitions or 1)
    return max(counts, default=1)


def _align_retention(
    admin: AdminClient, results: dict[str, TopicResult], retention: dict[str, int], timeout: float
) -> None:
    """Set ``retention.ms`` on existing governed topics whose live value differs."""
    existing = [t for t, r in results.items() if r.status == "exists" and t in retention]
    live = describe_retention(admin, existing, timeout)
    change = {t: retention[t] for t in existing if live[t].error or live[t].retention_ms != retention[t]}
    set_retention(admin, change, timeout)
    for t, ms in change.items():
        r = results[t]
        note = ", ".join(x for x in (r.note, f"retention.ms set to {ms}") if x)
        results[t] = TopicResult(t, r.status, r.partitions, r.replication_factor, note)
        log.info("topic retention set", extra={"topic": t, "retention_ms": ms})


def _align_state_configs(
    admin: AdminClient, state: Mapping[str, StateTopic], results: dict[str, TopicResult], timeout: float
) -> None:
    """Realign the compaction settings of existing state topics (:mod:`streamproc.runtime.state_topics`)."""
    existing = [t for t, r in results.items() if r.status == "exists"]
    for t, names in realign(admin, state, existing, timeout).items():
        r = results[t]
        note = ", ".join(x for x in (r.note, f"{', '.join(names)} realigned") if x)
        results[t] = TopicResult(t, r.status, r.partitions, r.replication_factor, note)
        log.info("state topic configs realigned", extra={"topic": t, "settings": names})


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout: float) -> None:
    """Return once every partition of ``topics`` has a leader in the broker's metadata.

    A CreateTopics reply means the controller accepted the topics; on Apache Kafka (KRaft)
    the brokers learn the partition leaders a moment later, and a client that reads or
    writes in between gets NOT_LEADER_FOR_PARTITION / UNKNOWN_TOPIC errors.  ``topics
    apply`` is followed by producers and workers, so it returns only once they can work.
    """
    deadline = time.monotonic() + timeout
    pending = set(topics)
    while pending:
        md = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        for t in list(pending):
            meta = md.get(t)
            if (
                meta is not None
                and meta.error is None
                and meta.partitions
                and all(p.leader >= 0 and p.error is None for p in meta.partitions.values())
            ):
                pending.discard(t)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without partition leaders after {timeout:.0f}s: {sorted(pending)}")
        time.sleep(0.1)


__all__ = ["TopicResult", "apply_topics"]
