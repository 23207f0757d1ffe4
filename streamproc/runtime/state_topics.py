"""The settings of the state topics, and their drift on the broker.

Four topics hold *state*, not a stream: the consent table (``consent.topic``), the
subject-key topic of crypto-shredding (``erasure.topic``), the budget changelog
(``<group_id>.budget-changelog``) and the risk-hold changelog (``<group_id>.risk-hold``).  Their correctness rests on topic configs:

* all three must be ``cleanup.policy=compact`` (and not ``compact,delete``): the last
  record per key *is* the state, and a record deleted by age turns a withdrawal back into
  "no record", a shredded subject's marker into "no key yet", a spent budget into a fresh
  one;
* the subject-key topic's ``segment.ms``, ``min.cleanable.dirty.ratio``,
  ``max.compaction.lag.ms`` and ``delete.retention.ms`` bound how long the old record of
  a shredded key survives in the log (:data:`KEY_TOPIC_CONFIG`, docs/governance.md).

``topics apply`` creates them with these settings and realigns an existing topic
(incremental alter configs: the other configs stay); ``topics check`` and the worker's
:class:`~streamproc.runtime.retention.RetentionMonitor` report drift.  Drift reports
name the topic and the settings, never a record value (there is none to name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from streamproc.config import Config

#: The subject-key topic's settings (overridable per topic except ``cleanup.policy``): the
#: old record of a shredded key is deleted by compaction once its segment is closed and
#: cleaned.  A segment closes at the first write after ``segment.ms``; the cleaner takes
#: any dirty segment (ratio 0.01) and at the latest ``max.compaction.lag.ms`` after the
#: write; shred records and markers carry no key and stay (they are the last record of
#: their key); a null tombstone (a lifted marker) is kept ``delete.retention.ms`` so that
#: restoring readers still see it.
KEY_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "3600000",
    "min.cleanable.dirty.ratio": "0.01",
    "max.compaction.lag.ms": "3600000",
    "delete.retention.ms": "86400000",
}

COMPACT = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class StateTopic:
    """One state topic and the configs it must have."""

    topic: str
    role: str
    """``consent``, ``subject_keys``, ``budget_changelog`` or ``risk_hold``."""
    settings: Mapping[str, str]


@dataclass(frozen=True)
class LiveConfigs:
    topic: str
    values: Mapping[str, str | None] = field(default_factory=dict)
    error: str = ""
    """Why the topic could not be described (a Kafka error name, never a value)."""


def expected_state_configs(config: Config) -> dict[str, StateTopic]:
    """Every state topic of ``config`` -> the configs it must have, in config order.

    The subject-key topic takes :data:`KEY_TOPIC_CONFIG` overlaid with
    ``topics.overrides.<topic>`` for the settings listed there; ``cleanup.policy`` is
    ``compact`` whatever an override says.
    """
    out: dict[str, StateTopic] = {}
    if config.consent is not None:
        out[config.consent.topic] = StateTopic(config.consent.topic, "consent", dict(COMPACT))
    if config.erasure is not None:
        t = config.erasure.topic
        override = config.topics.overrides.get(t)
        extra = {k: str(v) for k, v in (override.config if override is not None else {}).items() if k in KEY_TOPIC_CONFIG}
        out.setdefault(t, StateTopic(t, "subject_keys", {**KEY_TOPIC_CONFIG, **extra, **COMPACT}))
    changelog = config.budget_changelog_topic
    if changelog:
        out.setdefault(changelog, StateTopic(changelog, "budget_changelog", dict(COMPACT)))
    hold = config.risk_hold_topic
    if hold:
        # Held records: a record deleted by age would be a held record lost.
        out.setdefault(hold, StateTopic(hold, "risk_hold", dict(COMPACT)))
    return out


def _same(name: str, want: str, have: str | None) -> bool:
    if have is None:
        return False
    if name == "cleanup.policy":
        parts = lambda s: {p.strip() for p in s.split(",") if p.strip()}  # noqa: E731
        return parts(want) == parts(have)
    try:
        return float(want) == float(have)
    except ValueError:
        return want.strip() == have.strip()


def config_drift(expected: Mapping[str, StateTopic], live: Mapping[str, LiveConfigs]) -> dict[str, list[str] | None]:
    """Per state topic: the names of its settings that differ from the expected ones
    (sorted), ``["<unreadable: ERROR>"]`` when it could not be described, or None."""
    out: dict[str, list[str] | None] = {}
    for t, want in expected.items():
        have = live.get(t)
        if have is None or have.error:
            out[t] = [f"<unreadable: {have.error if have is not None else 'not described'}>"]
            continue
        bad = sorted(k for k, v in want.settings.items() if not _same(k, v, have.values.get(k)))
        out[t] = bad or None
    return out


def describe_state_configs(admin: Any, expected: Mapping[str, StateTopic], timeout: float = 10.0) -> dict[str, LiveConfigs]:
    """The live values of the settings each state topic must have (confluent-kafka's describe_configs)."""
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in expected]
    out: dict[str, LiveConfigs] = {}
    if not resources:
        return out
    for res, fut in admin.describe_configs(resources, request_timeout=timeout).items():
        topic = res.name
        try:
            entries = fut.result(timeout)
        except Exception as exc:  # KafkaException with a KafkaError, or a timeout
            err: Any = exc.args[0] if exc.args else None
            name = err.name() if callable(getattr(err, "name", None)) else type(exc).__name__
            out[topic] = LiveConfigs(topic, {}, str(name))
            continue
        values: dict[str, str | None] = {}
        for k in expected[topic].settings:
            e = entries.get(k)
            values[k] = None if e is None else e.value
        out[topic] = LiveConfigs(topic, values)
    return out


def realign(admin: Any, expected: Mapping[str, StateTopic], topics: Iterable[str], timeout: float = 30.0) -> dict[str, list[str]]:
    """Set the drifted settings of the existing state ``topics`` (incremental alter configs:
    only those settings change).  Returns topic -> the settings set."""
    wanted = {t: expected[t] for t in topics if t in expected}
    drift = config_drift(wanted, describe_state_configs(admin, wanted, timeout))
    changes: dict[str, list[str]] = {}
    for t, names in drift.items():
        if not names:
            continue
        # An unreadable topic gets every setting: setting a value is safe, skipping is not.
        changes[t] = sorted(wanted[t].settings) if names[0].startswith("<unreadable") else names
    if not changes:
        return {}
    resources = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            t,
            incremental_configs=[
                ConfigEntry(k, wanted[t].settings[k], incremental_operation=AlterConfigOpType.SET) for k in names
            ],
        )
        for t, names in changes.items()
    ]
    for fut in admin.incremental_alter_configs(resources, request_timeout=timeout).values():
        fut.result(timeout)
    return changes


__all__ = [
    "KEY_TOPIC_CONFIG",
    "LiveConfigs",
    "StateTopic",
    "config_drift",
    "describe_state_configs",
    "expected_state_configs",
    "realign",
]
