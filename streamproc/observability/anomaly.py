"""In-process anomaly detection on counts the pipeline already produces.

Why in-process: the processor is the only component that sees decryptions and egress
per (KEK, topic) the moment they happen.  A compromised producer, a stolen consumer
credential replaying a topic, or a misrouted policy shows up here first as a change of
*rate*.  Prometheus alerting rules (``deploy/prometheus/rules.yml``) do the same on the
scraped rates across all workers; this module is the low-latency, per-process twin and
works even where nobody runs Prometheus.

Model.  Time is cut into fixed intervals (``interval`` seconds, 10 s by default).  For
every series -- decryptions per (source topic, KEK id), egress records and egress bytes
per destination topic, envelope failures -- the count of each closed interval is compared
with an exponentially weighted mean and variance of the previous intervals:

    z = (count - mean) / max(std, sqrt(mean), min_relative_std * mean)

The floor on the standard deviation matters: perfectly steady traffic has a variance of
zero, and any jitter would otherwise be an infinite z.  ``sqrt(mean)`` is the Poisson
noise of a count, ``min_relative_std`` bounds the relative change that can alert.  A
series alerts only after ``warmup_intervals`` intervals of history, only upwards (a drop
is an outage, which the lag alerts cover), only above ``min_rate`` events per second, and
at most once per interval.  Anomalous counts enter the baseline clamped to the threshold
so a burst neither hides itself nor the next one, while a lasting shift is learnt.

Some events need no baseline at all: any use of an unknown or revoked key
(``unknown_key``, ``revoked_key``), any source record sealed under a KEK its pipeline does
not allow (``kek_not_allowed``: for example a destination audience's KEK) and any egress to a destination the configuration does
not name (``unexpected_destination``) alert immediately, once per interval.

Nothing here ever sees a record value: inputs are the bounded-label counts of
:class:`~streamproc.pipeline.core.BatchStats`.  The clock is injectable so tests are
deterministic.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("streamproc.anomaly")


class AnomalyKind(str, enum.Enum):
    """The ``kind`` label of ``streamproc_anomalies_total`` (a closed set)."""

    DECRYPTION_SPIKE = "decryption_spike"
    EGRESS_SPIKE = "egress_spike"
    DECRYPTION_FAILURE_BURST = "decryption_failure_burst"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    UNEXPECTED_DESTINATION = "unexpected_destination"
    KEK_NOT_ALLOWED = "kek_not_allowed"


#: Quarantine reasons that mean "the envelope could not be opened".
ENVELOPE_REASONS: frozenset[str] = frozenset(
    {
        "unknown_key", "key_revoked", "tampered", "malformed_envelope", "unsupported_version",
        "wrong_topic", "kek_not_allowed", "kms_error",
    }
)


@dataclass(frozen=True)
class AnomalyConfig:
    """Tuning knobs; the defaults suit a processor doing tens to thousands of records/s."""

    interval: float = 10.0
    """Seconds per bucket; a spike shorter than this is averaged over it."""
    alpha: float = 0.1
    """Weight of the newest interval in the moving mean/variance (half-life ~6.6 intervals)."""
    z_threshold: float = 6.0
    """Sensitivity: how many (floored) standard deviations above the mean alert."""
    warmup_intervals: int = 30
    """Intervals of history a series needs before it may alert (5 min at 10 s)."""
    min_rate: float = 1.0
    """Records (or failures) per second below which a count never alerts."""
    min_bytes_rate: float = 4096.0
    """Bytes per second below which egress bytes never alert."""
    min_relative_std: float = 0.25
    """Floor on std as a fraction of the mean: steady traffic must jump >1 + z*this to alert."""
    failure_threshold: int = 100
    """Envelope failures in one interval that always alert, warm or not."""
    failure_min: int = 10
    """Envelope failures in one interval below which the baseline test never alerts."""
    max_gap_intervals: int = 6
    """A series silent for more intervals than this starts a fresh warm-up when it resumes.

    Without it a topic that is busy only at night would alert every evening: its baseline
    decays towards zero during the day.  The Prometheus rules, which compare with a whole
    day, still see such a resumption."""

    def __post_init__(self) -> None:
        if self.interval <= 0 or not 0 < self.alpha <= 1 or self.z_threshold <= 0:
            raise ValueError("interval and z_threshold must be > 0 and alpha in (0, 1]")
        if self.warmup_intervals < 0 or self.min_relative_std < 0:
            raise ValueError("warmup_intervals and min_relative_std must be >= 0")


@dataclass(frozen=True)
class Anomaly:
    """One detected anomaly.  ``labels`` are identifiers (topic, kek_id, destination, reason)."""

    kind: AnomalyKind
    labels: Mapping[str, str]
    observed: float
    """Count in the interval (records, bytes or failures), never a value."""
    baseline: float = 0.0
    z_score: float = 0.0


@dataclass
class Baseline:
    """Exponentially weighted mean and variance of per-interval counts.

    West's incremental form: O(1) state, no window to store, and old intervals fade
    instead of falling off a cliff.
    """

    alpha: float
    n: int = 0
    mean: float = 0.0
    var: float = 0.0

    def std_floor(self, min_relative_std: float) -> float:
        return max(math.sqrt(max(self.var, 0.0)), math.sqrt(max(self.mean, 0.0)), min_relative_std * self.mean, 1.0)

    def z(self, x: float, min_relative_std: float) -> float:
        return (x - self.mean) / self.std_floor(min_relative_std)

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            diff = x - self.mean
            incr = self.alpha * diff
            self.mean += incr
            self.var = (1.0 - self.alpha) * (self.var + diff * incr)
        self.n += 1


@dataclass
class _Series:
    kind: AnomalyKind
    labels: dict[str, str]
    floor_per_interval: float
    baseline: Baseline
    count: float = 0.0
    group: tuple[str, ...] = field(default_factory=tuple)
    idle: int = 0
    """Series in one group (records and bytes of a destination) alert at most once per interval."""


class AnomalyDetector:
    """Feed it per-batch counts; it closes intervals lazily and reports anomalies.

    Thread-safe (one lock; every call is O(number of series)).  ``on_anomaly`` is called
    outside the lock for every anomaly, after the warning was logged.
    """

    def __init__(
        self,
        config: AnomalyConfig | None = None,
        *,
        on_anomaly: Callable[[Anomaly], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        allowed_destinations: Iterable[str] | None = None,
        name: Callable[[str, Any], str] | None = None,
    ) -> None:
        self.config = config or AnomalyConfig()
        #: ``name(label, value)``: maps a topic/KEK/destination to what may be logged
        #: (the metrics' label guard: config-known names, anything else ``_other``).
        self._name: Callable[[str, Any], str] = name or (lambda _label, v: str(v))
        self._failure_topics: dict[str, int] = {}
        self._failure_reasons: dict[str, int] = {}
        self.on_anomaly = on_anomaly
        self._clock = clock
        self.allowed_destinations = frozenset(allowed_destinations) if allowed_destinations is not None else None
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        self._bucket_end = clock() + self.config.interval
        self._fired: set[tuple[str, ...]] = set()
        self._failures = 0.0
        self._failure_baseline = Baseline(self.config.alpha)
        #: Every anomaly reported so far (bounded; for tests and the demo).
        self.history: list[Anomaly] = []

    # -- inputs ---------------------------------------------------------------------------
    def observe_decryptions(self, counts: Mapping[tuple[str, str], int]) -> list[Anomaly]:
        """(source topic, KEK id) -> records opened in this batch."""
        out = self._roll()
        with self._lock:
            floor = self.config.min_rate * self.config.interval
            for (raw_topic, raw_kek), n in counts.items():
                topic, kek_id = self._name("topic", raw_topic), self._name("kek_id", raw_kek)
                key = ("decryptions", topic, kek_id)
                s = self._series.get(key)
                if s is None:
                    s = self._series[key] = _Series(
                        AnomalyKind.DECRYPTION_SPIKE, {"topic": topic, "kek_id": kek_id}, floor, Baseline(self.config.alpha)
                    )
                s.count += n
        return self._emit(out)

    def observe_egress(
        self, records: Mapping[tuple[str, str], int], nbytes: Mapping[tuple[str, str], int] | None = None
    ) -> list[Anomaly]:
        """(destination topic, audience) -> records and bytes written in this batch."""
        out = self._roll()
        cfg = self.config
        with self._lock:
            for unit, counts, rate in (("records", records, cfg.min_rate), ("bytes", nbytes or {}, cfg.min_bytes_rate)):
                for (raw_topic, raw_audience), n in counts.items():
                    topic, audience = self._name("topic", raw_topic), self._name("audience", raw_audience)
                    key = ("egress", unit, topic)
                    s = self._series.get(key)
                    if s is None:
                        s = self._series[key] = _Series(
                            AnomalyKind.EGRESS_SPIKE,
                            {"destination": topic, "audience": audience, "unit": unit},
                            rate * cfg.interval,
                            Baseline(cfg.alpha),
                            group=("egress", topic),
                        )
                    s.count += n
            if self.allowed_destinations is not None:
                for topic, audience in records:
                    if topic not in self.allowed_destinations:
                        # Not configured, so its name is _other: the count and the
                        # audience (if known) are what may be logged.
                        dest = self._name("topic", topic)
                        self._fire_once(
                            out, ("unexpected", dest),
                            Anomaly(AnomalyKind.UNEXPECTED_DESTINATION,
                                    {"destination": dest, "audience": self._name("audience", audience)},
                                    float(records[(topic, audience)])),
                        )
        return self._emit(out)

    def observe_failures(
        self, reasons: Mapping[Any, int], by_topic: Mapping[tuple[str, Any], int] | None = None
    ) -> list[Anomaly]:
        """Quarantine reason (a :class:`~streamproc.errors.Reason` or its value) -> count.

        ``by_topic`` -- (source topic, reason) -> count, the same failures by source -- lets
        the anomaly name where they come from: an operator's first question, and the
        runbook's.  Topic names pass the detector's ``name`` guard like every label.
        """
        out = self._roll()
        topics: dict[str, dict[str, int]] = {}  # reason -> source topic -> count
        for (topic, reason), n in (by_topic or {}).items():
            r = getattr(reason, "value", reason)
            if r in ENVELOPE_REASONS and n > 0:
                t = self._name("topic", topic)
                topics.setdefault(r, {})[t] = topics.get(r, {}).get(t, 0) + n
        with self._lock:
            for r, per_topic in topics.items():
                for t, n in per_topic.items():
                    self._failure_topics[t] = self._failure_topics.get(t, 0) + n
                    self._failure_reasons[r] = self._failure_reasons.get(r, 0) + n
            for reason, n in reasons.items():
                r = getattr(reason, "value", reason)
                if r not in ENVELOPE_REASONS or n <= 0:
                    continue
                self._failures += n
                if r in ("unknown_key", "key_revoked", "kek_not_allowed"):
                    kind = {
                        "unknown_key": AnomalyKind.UNKNOWN_KEY,
                        "key_revoked": AnomalyKind.REVOKED_KEY,
                        "kek_not_allowed": AnomalyKind.KEK_NOT_ALLOWED,
                    }[r]
                    labels = {"reason": r}
                    if r in topics:
                        labels["topic"] = _names(topics[r])
                    self._fire_once(out, (kind.value,), Anomaly(kind, labels, float(n)))
            if self._failures >= self.config.failure_threshold:
                self._fire_once(
                    out, ("failure_burst",),
                    Anomaly(AnomalyKind.DECRYPTION_FAILURE_BURST, self._burst_labels(), self._failures,
                            self._failure_baseline.mean,
                            self._failure_baseline.z(self._failures, self.config.min_relative_std)),
                )
        return self._emit(out)

    def observe_batch(self, stats: Any) -> list[Anomaly]:
        """All of the above from one :class:`~streamproc.pipeline.core.BatchStats`."""
        out = self.observe_decryptions(stats.decryptions)
        out += self.observe_egress(stats.egress_records, stats.egress_bytes)
        out += self.observe_failures(stats.quarantined, stats.failures)
        return out

    def tick(self) -> list[Anomaly]:
        """Close every interval that has ended (call it periodically when idle)."""
        return self._emit(self._roll())

    def rebase(self) -> None:
        """Forget every baseline: the traffic this process sees changed for a known reason.

        Called when the partition assignment changes, since taking over a second worker's
        partitions doubles every rate without anything being wrong.
        """
        with self._lock:
            for s in self._series.values():
                s.baseline = Baseline(self.config.alpha)
            self._failure_baseline = Baseline(self.config.alpha)

    # -- internals ------------------------------------------------------------------------
    def _fire_once(self, out: list[Anomaly], key: tuple[str, ...], anomaly: Anomaly) -> None:
        if key not in self._fired:
            self._fired.add(key)
            out.append(anomaly)

    def _roll(self) -> list[Anomaly]:
        out: list[Anomaly] = []
        now = self._clock()
        with self._lock:
            if now < self._bucket_end:
                return out
            # The current interval, then the empty ones that passed while nothing was observed.
            ended = int((now - self._bucket_end) // self.config.interval) + 1
            self._bucket_end += ended * self.config.interval
            for _ in range(min(ended, self.config.max_gap_intervals + 2)):
                self._close(out)
        return out

    def _close(self, out: list[Anomaly]) -> None:
        cfg = self.config
        thr = cfg.z_threshold
        for s in self._series.values():
            b, x = s.baseline, s.count
            s.count = 0.0
            if x == 0:
                s.idle += 1
                if s.idle > cfg.max_gap_intervals:
                    if b.n:
                        s.baseline = Baseline(cfg.alpha)
                    continue
            else:
                s.idle = 0
            if b.n >= cfg.warmup_intervals and x >= s.floor_per_interval and x > b.mean:
                z = b.z(x, cfg.min_relative_std)
                if z > thr:
                    key = s.group or (s.kind.value, *s.labels.values())
                    self._fire_once(out, key, Anomaly(s.kind, dict(s.labels), x, b.mean, z))
                    x = min(x, b.mean + thr * b.std_floor(cfg.min_relative_std))
            b.update(x)
        fb, f = self._failure_baseline, self._failures
        self._failures = 0.0
        if fb.n >= cfg.warmup_intervals and f >= max(cfg.failure_min, cfg.min_rate * cfg.interval):
            z = fb.z(f, cfg.min_relative_std)
            if z > thr:
                self._fire_once(out, ("failure_burst",),
                                Anomaly(AnomalyKind.DECRYPTION_FAILURE_BURST, self._burst_labels(), f, fb.mean, z))
                f = min(f, fb.mean + thr * fb.std_floor(cfg.min_relative_std))
        fb.update(f)
        self._failure_topics.clear()
        self._failure_reasons.clear()
        self._fired.clear()

    def _burst_labels(self) -> dict[str, str]:
        """Source topics and reasons of this interval's envelope failures (caller holds the lock)."""
        labels: dict[str, str] = {}
        if self._failure_topics:
            labels["topic"] = _names(self._failure_topics)
        if self._failure_reasons:
            labels["reason"] = _names(self._failure_reasons)
        return labels

    def _emit(self, anomalies: list[Anomaly]) -> list[Anomaly]:
        for a in anomalies:
            # Identifiers and counts only: the redaction guard would strip anything else.
            log.warning(
                "anomaly detected: %s",
                a.kind.value,
                extra={"kind": a.kind.value, **a.labels, "count": a.observed,
                       "baseline": round(a.baseline, 3), "z_score": round(a.z_score, 2)},
            )
            if len(self.history) < 10_000:
                self.history.append(a)
            if self.on_anomaly is not None:
                self.on_anomaly(a)
        return anomalies


def _names(counts: Mapping[str, int], limit: int = 5) -> str:
    """The most frequent names, comma-separated and capped (a log field, not a list)."""
    top = sorted(counts, key=lambda k: (-counts[k], k))
    text = ",".join(top[:limit])
    return text + (f",+{len(top) - limit}" if len(top) > limit else "")


__all__ = ["ENVELOPE_REASONS", "Anomaly", "AnomalyConfig", "AnomalyDetector", "AnomalyKind", "Baseline"]
