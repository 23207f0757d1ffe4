"""Retention as policy: what each topic may keep, what the config asks, what the broker does.

The policy states the longest an audience may keep a record (``retention: 30d`` on the
audience) and the longest dead letters are kept (``dead_letter: {retention: 7d}``).  Three
places turn that into behaviour, all through this module so they cannot disagree:

* ``streamproc topics apply`` sets ``retention.ms`` of every governed topic to
  :attr:`TopicRetention.desired_ms` (created or existing);
* ``streamproc policy check --config`` refuses a config whose topic settings would keep a
  record longer than the policy allows (:func:`config_violations`);
* ``streamproc topics check`` and the worker's :class:`RetentionMonitor` read the live
  topic configs (``describe_configs``) and report drift (:func:`live_drift`).

A topic is *governed* when the policy or the config states a retention for it.  Its
desired ``retention.ms`` is the config's value if it is not longer than the policy's,
else the policy's.  Drift is any difference between the live value and the desired one;
a drift that keeps data longer than the policy allows (a larger or infinite
``retention.ms``, or ``cleanup.policy=compact`` without ``delete``, under which records
are never deleted by age) is marked ``exceeds_policy``.

Bounds: Kafka deletes whole log segments, so a record may outlive ``retention.ms`` by up
to ``segment.ms``/``segment.bytes`` worth of data plus the broker's
``log.retention.check.interval.ms``; consumers' copies are outside the processor's reach.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.policy.model import Policy, format_duration_ms
from streamproc.runtime.state_topics import StateTopic, config_drift, describe_state_configs

log = logging.getLogger("streamproc.runtime.retention")

RETENTION_MS = "retention.ms"
CLEANUP_POLICY = "cleanup.policy"


@dataclass(frozen=True)
class TopicRetention:
    """What one governed topic should retain, and why."""

    topic: str
    role: str
    """``destination`` or ``dead_letter`` (or ``topic`` for one only the config governs)."""
    audience: str | None
    policy_ms: int | None
    """The policy's limit, None when the policy states none for this topic."""
    config_ms: int | None
    """``retention.ms`` from ``topics.defaults``/``overrides``; -1 is infinite."""

    @property
    def desired_ms(self) -> int:
        """The value ``topics apply`` sets: the config's unless it exceeds the policy."""
        if self.policy_ms is None:
            assert self.config_ms is not None
            return self.config_ms
        if self.config_ms is None or self.config_ms < 0 or self.config_ms > self.policy_ms:
            return self.policy_ms
        return self.config_ms


@dataclass(frozen=True)
class LiveRetention:
    topic: str
    retention_ms: int | None
    """None when the broker does not report it (or the topic could not be described)."""
    cleanup_policy: str | None
    error: str = ""
    """Why the topic could not be described (an error class, never a value)."""


@dataclass(frozen=True)
class Drift:
    topic: str
    desired_ms: int
    live_ms: int | None
    exceeds_policy: bool
    detail: str


def _config_ms(config: Config, topic: str) -> int | None:
    raw = config.topics.for_topic(topic).config.get(RETENTION_MS)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"topics: retention.ms of {topic!r} must be an integer (milliseconds, -1: infinite)") from None


def expected_retention(config: Config, policy: Policy) -> dict[str, TopicRetention]:
    """Every governed topic of ``config`` -> its :class:`TopicRetention`, in config order."""
    out: dict[str, TopicRetention] = {}
    for p in config.pipelines:
        for d in p.destinations:
            aud = policy.audiences.get(d.audience)
            limit = None if aud is None else aud.retention_ms
            out.setdefault(d.topic, TopicRetention(d.topic, "destination", d.audience, limit, _config_ms(config, d.topic)))
        out.setdefault(
            p.dead_letter_topic,
            TopicRetention(p.dead_letter_topic, "dead_letter", None, policy.dead_letter_retention_ms, _config_ms(config, p.dead_letter_topic)),
        )
    for t in config.all_topics():
        out.setdefault(t, TopicRetention(t, "topic", None, None, _config_ms(config, t)))
    return {t: r for t, r in out.items() if r.policy_ms is not None or r.config_ms is not None}


def _compacts_only(cleanup: str | None) -> bool:
    parts = {p.strip() for p in (cleanup or "").split(",") if p.strip()}
    return "compact" in parts and "delete" not in parts


def config_violations(config: Config, policy: Policy) -> list[str]:
    """Topic settings of ``config`` under which a topic keeps data longer than the policy allows."""
    problems: list[str] = []
    for r in expected_retention(config, policy).values():
        if r.policy_ms is None:
            continue
        who = f"audience {r.audience!r}" if r.audience else "dead_letter"
        limit = format_duration_ms(r.policy_ms)
        if r.config_ms is not None and (r.config_ms < 0 or r.config_ms > r.policy_ms):
            shown = "infinite (-1)" if r.config_ms < 0 else f"{r.config_ms} ms ({format_duration_ms(r.config_ms)})"
            problems.append(
                f"topic {r.topic!r}: retention.ms {shown} in the config exceeds the policy's "
                f"{limit} for {who}; lower it in topics.overrides.{r.topic}"
            )
        if _compacts_only(config.topics.for_topic(r.topic).config.get(CLEANUP_POLICY)):
            problems.append(
                f"topic {r.topic!r}: cleanup.policy=compact never deletes by age, but the policy "
                f"allows {limit} for {who}; use 'compact,delete' or 'delete'"
            )
    return problems


def live_drift(expected: Mapping[str, TopicRetention], live: Mapping[str, LiveRetention]) -> dict[str, Drift | None]:
    """Per governed topic: its :class:`Drift`, or None when the live config matches."""
    out: dict[str, Drift | None] = {}
    for t, want in expected.items():
        have = live.get(t)
        desired = want.desired_ms
        if have is None or have.error:
            why = have.error if have is not None else "not described"
            out[t] = Drift(t, desired, None, False, f"cannot read the topic config ({why})")
            continue
        ms = have.retention_ms
        limit = want.policy_ms
        exceeds = limit is not None and (ms is None or ms < 0 or ms > limit or _compacts_only(have.cleanup_policy))
        if ms == desired and not _compacts_only(have.cleanup_policy):
            out[t] = None
            continue
        if _compacts_only(have.cleanup_policy):
            detail = "cleanup.policy=compact never deletes by age"
        elif ms is None:
            detail = "retention.ms not reported (broker default applies)"
        else:
            detail = f"retention.ms {'infinite (-1)' if ms < 0 else ms} != {desired}"
        out[t] = Drift(t, desired, ms, exceeds, detail)
    return out


def describe_retention(admin: Any, topics: Iterable[str], timeout: float = 10.0) -> dict[str, LiveRetention]:
    """``retention.ms`` and ``cleanup.policy`` of each topic, with confluent-kafka's describe_configs.

    A topic that cannot be described gets an ``error`` (the Kafka error name, no more):
    the caller reports it as drift it cannot rule out.
    """
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    out: dict[str, LiveRetention] = {}
    if not resources:
        return out
    futures = admin.describe_configs(resources, request_timeout=timeout)
    for res, fut in futures.items():
        topic = res.name
        try:
            entries = fut.result(timeout)
        except Exception as exc:  # KafkaException with a KafkaError, or a timeout
            err: Any = exc.args[0] if exc.args else None
            name = err.name() if callable(getattr(err, "name", None)) else type(exc).__name__
            out[topic] = LiveRetention(topic, None, None, str(name))
            continue
        ret = entries.get(RETENTION_MS)
        cleanup = entries.get(CLEANUP_POLICY)
        try:
            ms = None if ret is None or ret.value is None else int(ret.value)
        except ValueError:
            ms = None
        out[topic] = LiveRetention(topic, ms, None if cleanup is None else cleanup.value)
    return out


def set_retention(admin: Any, wanted: Mapping[str, int], timeout: float = 30.0) -> None:
    """Set ``retention.ms`` on existing topics (incremental: other configs stay as they are)."""
    if not wanted:
        return
    resources = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            t,
            incremental_configs=[ConfigEntry(RETENTION_MS, str(ms), incremental_operation=AlterConfigOpType.SET)],
        )
        for t, ms in wanted.items()
    ]
    for fut in admin.incremental_alter_configs(resources, request_timeout=timeout).values():
        fut.result(timeout)


class RetentionMonitor:
    """Checks the live retention of the governed topics every ``interval`` seconds.

    Each check describes the topics with the injected ``admin`` client and reports, per
    topic, 1 (drift) or 0 through ``report(topic, drifted)`` -- the worker passes its
    observer's ``retention_drift`` (the ``streamproc_retention_drift`` gauge).  A topic
    that cannot be described keeps its last value and is logged: an unreadable config is
    neither proof of drift nor of compliance.  ``clock`` and ``admin`` are injected so the
    schedule and the broker can be replaced in tests.

    With ``state`` (:func:`~streamproc.runtime.state_topics.expected_state_configs`), the
    same check also reads the compaction settings of the state topics and reports them
    through ``report_state(topic, drifted)`` (``streamproc_state_topic_drift``).
    """

    def __init__(
        self,
        expected: Mapping[str, TopicRetention],
        admin: Any,
        report: Callable[[str, bool], None],
        *,
        interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 10.0,
        state: Mapping[str, StateTopic] | None = None,
        report_state: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.expected = dict(expected)
        self.state = dict(state or {})
        self.report_state = report_state
        self.last_state: dict[str, list[str] | None] = {}
        self.admin = admin
        self.report = report
        self.interval = interval
        self.clock = clock
        self.timeout = timeout
        self._last: float | None = None
        self.last_result: dict[str, Drift | None] = {}

    def due(self) -> bool:
        return self._last is None or self.clock() - self._last >= self.interval

    def check(self) -> dict[str, Drift | None]:
        """Describe now, report every topic that could be read, return the drift found."""
        self._last = self.clock()
        self._check_state()
        try:
            live = describe_retention(self.admin, self.expected, self.timeout)
        except Exception as exc:
            log.warning("retention check failed", extra={"error": type(exc).__name__})
            return {}
        result = live_drift(self.expected, live)
        for topic, drift in result.items():
            have = live.get(topic)
            if have is None or have.error:
                log.warning("retention check: cannot describe topic", extra={"topic": topic, "error": have.error if have else "missing"})
                continue
            self.report(topic, drift is not None)
            if drift is not None:
                log.warning(
                    "retention drift: %s",
                    drift.detail,
                    extra={"topic": topic, "desired_ms": drift.desired_ms, "live_ms": drift.live_ms, "exceeds_policy": drift.exceeds_policy},
                )
        self.last_result = result
        return result

    def _check_state(self) -> None:
        if not self.state or self.report_state is None:
            return
        try:
            live = describe_state_configs(self.admin, self.state, self.timeout)
        except Exception as exc:
            log.warning("state topic check failed", extra={"error": type(exc).__name__})
            return
        result = config_drift(self.state, live)
        for topic, names in result.items():
            have = live.get(topic)
            if have is None or have.error:
                log.warning("state topic check: cannot describe topic", extra={"topic": topic, "error": have.error if have else "missing"})
                continue
            self.report_state(topic, names is not None)
            if names:
                log.warning("state topic drift", extra={"topic": topic, "settings": names})
        self.last_state = result

    def maybe_check(self) -> dict[str, Drift | None] | None:
        """:meth:`check` when the interval has passed since the last one, else None."""
        return self.check() if self.due() else None

    def run(self, stop: threading.Event, poll: float = 1.0) -> None:
        """Check on schedule until ``stop`` is set (the body of the worker's monitor thread)."""
        while not stop.is_set():
            self.maybe_check()
            stop.wait(poll)


__all__ = [
    "Drift",
    "LiveRetention",
    "RetentionMonitor",
    "TopicRetention",
    "config_violations",
    "describe_retention",
    "expected_retention",
    "live_drift",
    "set_retention",
]
