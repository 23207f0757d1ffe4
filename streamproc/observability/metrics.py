"""Prometheus metrics for the processor: the :class:`Observer` the Kafka worker reports to.

Design rules, and why:

* **Labels come from bounded sets only** (topic, partition, audience, kek_id, reason,
  operator, provider, operation, outcome, kind, dependency, action).  A label value is never a
  record value or key: a time series per customer would both leak personal data into the
  monitoring system and blow up its memory.  As defence in depth every label value goes
  through :class:`_LabelGuard`, which caps the distinct values per label (overflow
  becomes ``_other``) and rejects anything that does not look like an identifier.
* **The list of metrics is data** (:data:`METRICS`), so tests can check that every metric
  a dashboard or alerting rule names is one the processor exports, and
  ``docs/metrics.md`` can be checked against it.
* **Multiprocess-ready.**  With ``--workers N`` the supervisor calls
  :func:`streamproc.observability.server.setup_multiprocess` before spawning; every
  worker's ``Metrics`` then writes to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``
  and the supervisor serves one aggregate scrape.  Gauges declare how they aggregate
  across workers (``multiprocess_mode``).
* **Anomaly detection rides along**: every batch's stats also feed an
  :class:`~streamproc.observability.anomaly.AnomalyDetector`, whose findings increment
  ``streamproc_anomalies_total{kind}``.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    values,
)

from streamproc import __version__
from streamproc.crypto.kms.factory import PROVIDERS as _KMS_PROVIDERS
from streamproc.errors import Reason
from streamproc.observability import Observer
from streamproc.observability.anomaly import (
    ENVELOPE_REASONS,
    Anomaly,
    AnomalyConfig,
    AnomalyDetector,
    AnomalyKind,
)
from streamproc.pipeline.budget import SUPPRESSED_REASONS as DP_SUPPRESSED_REASONS
from streamproc.policy.consent import WITHHELD_REASONS

if TYPE_CHECKING:
    from streamproc.config import Config

log = logging.getLogger("streamproc.metrics")

MetricType = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
KMS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family: what dashboards, rules and docs may refer to."""

    name: str
    """Family name as written in PromQL; counters end in ``_total``."""
    type: MetricType
    labels: tuple[str, ...]
    help: str
    multiprocess_mode: str = ""
    """Gauges only: how values from several worker processes combine in one scrape."""
    buckets: tuple[float, ...] = ()

    @property
    def base(self) -> str:
        """The name without ``_total``: what prometheus_client is given, and the stem of recorded rules."""
        return self.name[: -len("_total")] if self.type == "counter" else self.name

    @property
    def series(self) -> frozenset[str]:
        """Every sample name this family produces in the exposition format."""
        if self.type == "counter":
            return frozenset({self.name, self.base + "_created"})
        if self.type == "histogram":
            return frozenset({self.name + s for s in ("_bucket", "_sum", "_count", "_created")})
        return frozenset({self.name})


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("streamproc_build_info", "gauge", ("version",), "Always 1; the processor version as a label.", "max"),
    MetricSpec("streamproc_records_consumed_total", "counter", ("topic", "partition"), "Records fetched from a source partition."),
    MetricSpec("streamproc_decryptions_total", "counter", ("topic", "kek_id"), "Source records whose envelope was opened, by source topic and KEK."),
    MetricSpec("streamproc_decryption_failures_total", "counter", ("reason",), "Envelopes that could not be opened, by reason class (unknown_key, key_revoked, tampered, malformed_envelope, unsupported_version, wrong_topic)."),
    MetricSpec("streamproc_records_quarantined_total", "counter", ("reason",), "Records the pipeline quarantined (any reason class); they go to the dead-letter topic."),
    MetricSpec("streamproc_tombstones_total", "counter", (), "Tombstones (null values) forwarded to every destination."),
    MetricSpec("streamproc_consent_withheld_total", "counter", ("audience", "reason"), "Records withheld from an audience by its purpose's legal basis (not_granted, withdrawn, objected, no_subject); no output, no dead letter."),
    MetricSpec("streamproc_dp_budget_suppressed_total", "counter", ("audience", "reason"), "Records whose differentially private fields an audience received as null: the subject's privacy budget is spent (exhausted) or there is no subject to account against (no_subject); withheld: the record was not delivered to the audience at all (its null variant failed)."),
    MetricSpec("streamproc_egress_records_total", "counter", ("topic", "audience"), "Sanitized records produced, by destination topic and audience."),
    MetricSpec("streamproc_egress_bytes_total", "counter", ("topic", "audience"), "Bytes of sealed sanitized values produced, by destination topic and audience."),
    MetricSpec("streamproc_transformed_fields_total", "counter", ("operator",), "Field values transformed, by operator (token, mask, generalize, ...)."),
    MetricSpec("streamproc_dead_letters_total", "counter", ("topic", "reason"), "Records written to the dead-letter topic, by source topic and reason class."),
    MetricSpec("streamproc_kms_calls_total", "counter", ("provider", "operation", "outcome"), "KMS calls by provider, operation and outcome (ok, unavailable, not_found, revoked, unwrap_failed, denied, error)."),
    MetricSpec("streamproc_kms_call_duration_seconds", "histogram", ("provider", "operation"), "Latency of KMS calls.", buckets=KMS_BUCKETS),
    MetricSpec("streamproc_dek_cache_hits_total", "counter", (), "Data-key cache hits (no KMS call)."),
    MetricSpec("streamproc_dek_cache_misses_total", "counter", (), "Data-key cache misses (a KMS unwrap, or a cached failure)."),
    MetricSpec("streamproc_end_to_end_latency_seconds", "histogram", (), "Commit time minus the Kafka timestamp of each input record.", buckets=LATENCY_BUCKETS),
    MetricSpec("streamproc_batch_size", "histogram", (), "Input records per processed batch.", buckets=BATCH_SIZE_BUCKETS),
    MetricSpec("streamproc_batch_duration_seconds", "histogram", (), "Seconds spent in the pipeline per batch (decrypt, transform, seal).", buckets=BATCH_SECONDS_BUCKETS),
    MetricSpec("streamproc_transactions_total", "counter", ("outcome",), "Kafka transactions, by outcome (committed, aborted)."),
    MetricSpec("streamproc_consumer_lag", "gauge", ("topic", "partition"), "High watermark minus committed position, per assigned partition.", "livemostrecent"),
    MetricSpec("streamproc_assigned_partitions", "gauge", (), "Partitions currently assigned (summed over live workers).", "livesum"),
    MetricSpec("streamproc_retries_total", "counter", ("dependency",), "Retries of a transient outage, by dependency (kms, schema_registry, broker); every dependency's series exists from start-up at 0."),
    MetricSpec("streamproc_dependency_outage_seconds", "gauge", ("dependency",), "Seconds the current outage of a dependency (kms, schema_registry, broker) has lasted; 0 while it is reachable.", "livemax"),
    MetricSpec("streamproc_ready", "gauge", (), "1 when the worker reports ready (partitions assigned, broker and KMS reachable); one series per live worker in multiprocess mode.", "liveall"),
    MetricSpec("streamproc_workers", "gauge", (), "Live worker processes (1 per process, summed).", "livesum"),
    MetricSpec("streamproc_insecure_transport", "gauge", ("component",), "1 when TLS certificate verification is switched off for a component (kafka, kms, schema_registry) by an explicit insecure: true; 0 otherwise.", "max"),
    MetricSpec("streamproc_retention_drift", "gauge", ("topic",), "1 when a governed topic's live retention.ms (or cleanup.policy) differs from what the policy and config call for; 0 when it matches. Topics from the config only.", "max"),
    MetricSpec("streamproc_state_topic_drift", "gauge", ("topic",), "1 when a state topic's (consent, subject keys, budget changelog) live cleanup.policy or key-topic compaction settings differ from what topics apply sets; 0 when they match.", "max"),
    MetricSpec("streamproc_risk_window_records", "gauge", ("audience",), "Records in the audience's re-identification risk window (its outputs of the policy's risk window, capped by max_records); summed over live workers.", "livesum"),
    MetricSpec("streamproc_risk_min_class_size", "gauge", ("audience",), "Smallest equivalence class of quasi-identifier tuples the audience received in the window: its k (0 when empty); the worst live worker.", "livemin"),
    MetricSpec("streamproc_risk_share_below_k", "gauge", ("audience",), "Share of the window's records in classes smaller than the policy's k; the worst live worker.", "livemax"),
    MetricSpec("streamproc_risk_share_unique", "gauge", ("audience",), "Share of the window's records whose quasi-identifier tuple is unique in it; the worst live worker.", "livemax"),
    MetricSpec("streamproc_risk_min_l", "gauge", ("audience",), "Distinct l-diversity of the window: the fewest distinct sensitive values in a class (audiences with l only); the worst live worker.", "livemin"),
    MetricSpec("streamproc_risk_share_below_l", "gauge", ("audience",), "Share of the window's records in classes with fewer distinct sensitive values than the policy's l; the worst live worker.", "livemax"),
    MetricSpec("streamproc_risk_k_target", "gauge", ("audience",), "The policy's k for the audience (alerts compare the window with it).", "max"),
    MetricSpec("streamproc_risk_l_target", "gauge", ("audience",), "The policy's l for the audience (audiences with l only).", "max"),
    MetricSpec("streamproc_risk_enforced_total", "counter", ("audience", "action"), "Records whose quasi-identifiers k-anonymity enforcement rewrote, by audience and action (suppressed, generalized), or held back and released (held, released: full output once the class reached k, expired: suppressed after the window or over hold.max_records)."),
    MetricSpec("streamproc_anomalies_total", "counter", ("kind",), "Anomalies found by the in-process detector, by kind (decryption_spike, egress_spike, decryption_failure_burst, unknown_key, revoked_key, unexpected_destination, kek_not_allowed)."),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def exported_series() -> frozenset[str]:
    """Every sample name the processor can expose (``_total``, ``_bucket``, ... included)."""
    out: set[str] = set()
    for m in METRICS:
        out |= m.series
    return frozenset(out)


# -- label hygiene --------------------------------------------------------------------------
OTHER = "_other"

KMS_OUTCOMES = {
    "ok": "ok",
    "unavailable": "unavailable",
    "KmsUnavailable": "unavailable",
    "KeyNotFound": "not_found",
    "not_found": "not_found",
    "KeyRevoked": "revoked",
    "revoked": "revoked",
    "UnwrapFailed": "unwrap_failed",
    "unwrap_failed": "unwrap_failed",
    "KeyAccessDenied": "denied",
    "denied": "denied",
    "error": "error",
}
KMS_OPERATIONS = frozenset({"unwrap", "generate_data_key", "is_revoked", "get_secret", "encrypt", "decrypt", "describe"})
DEPENDENCIES = frozenset({"kms", "schema_registry", "broker"})
TX_OUTCOMES = frozenset({"committed", "aborted"})
#: KMS provider names (``kms.provider`` of the config): the factory's closed list.
KMS_PROVIDERS = frozenset(_KMS_PROVIDERS)
#: ``streamproc_risk_enforced_total{action}``: how enforcement released an at-risk record.
RISK_ACTIONS = frozenset({"suppressed", "generalized", "held", "released", "expired"})
#: Partitions are Kafka integers, never text; above this a value is not a partition.
MAX_PARTITION = 100_000


@dataclass(frozen=True)
class KnownLabels:
    """The label values the configuration names: nothing else may become a label.

    Why an allow-list rather than a pattern: e-mail addresses, card numbers, IP
    addresses, phone numbers and customer ids all look like identifiers, so no shape
    test can tell a topic name from a leaked value.  The config, however, names every
    topic, audience and KEK the processor legitimately reports on; a value outside those
    sets is a bug or an attack, and becomes ``_other``.
    """

    topics: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()
    kek_ids: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *, topics: Iterable[str] = (), audiences: Iterable[str] = (), kek_ids: Iterable[str] = ()) -> KnownLabels:
        return cls(frozenset(topics), frozenset(audiences), frozenset(kek_ids))

    @classmethod
    def from_config(cls, config: Config) -> KnownLabels:
        """Every topic (sources, destinations, dead-letter, audit), audience and KEK id the config names.

        KEK ids: each pipeline's ``source_keks``, each destination's ``kek`` and the
        pseudonym-secret ``kek``.  A source KEK the config does not name (a pipeline
        without ``source_keks``) is reported as ``_other``.
        """
        keks: set[str] = set()
        audiences: set[str] = set()
        for p in config.pipelines:
            keks.update(p.source_keks or ())
            for d in p.destinations:
                keks.add(d.kek)
                audiences.add(d.audience)
        if config.pseudonym_secrets.kek:
            keks.add(config.pseudonym_secrets.kek)
        return cls.of(topics=config.all_topics(), audiences=audiences, kek_ids=keks)
#: Components whose TLS verification an ``insecure: true`` can switch off (config.py).
INSECURE_COMPONENTS = ("kafka", "kms", "schema_registry")


class _LabelGuard:
    """Maps every label value to a member of its known set, or to ``_other``.

    * ``topic``, ``audience``, ``kek_id``: the :class:`KnownLabels` from the config;
    * ``reason``, ``operator``, ``provider``: closed enums of the code (reason classes,
      the operator registry, KMS providers);
    * ``partition``: a non-negative integer below :data:`MAX_PARTITION`;
    * any other label name: nothing is known about it, so everything is ``_other``.

    The per-label cap on distinct values stays as a second line of defence against a
    cardinality explosion (only partitions can come near it).
    """

    def __init__(self, max_values: int, known: KnownLabels | None = None) -> None:
        self.max_values = max_values
        k = known or KnownLabels()
        from streamproc.operators import REGISTRY

        self._allowed: dict[str, frozenset[str]] = {
            "topic": k.topics,
            "audience": k.audiences,
            "kek_id": k.kek_ids,
            "reason": frozenset(r.value for r in Reason) | frozenset(WITHHELD_REASONS) | frozenset(DP_SUPPRESSED_REASONS),
            "operator": frozenset(REGISTRY),
            "provider": KMS_PROVIDERS,
            "action": RISK_ACTIONS,
        }
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, value: object) -> str:
        v = getattr(value, "value", value)  # str enums (Reason) report their value
        if label == "partition":
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_PARTITION:
                return OTHER
            v = str(v)
        else:
            allowed = self._allowed.get(label)
            if allowed is None or not isinstance(v, str) or v not in allowed:
                return OTHER
        seen = self._seen.get(label)
        if seen is not None and v in seen:
            return v
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if len(seen) >= self.max_values:
                return OTHER
            seen.add(v)
        return v


def _ensure_multiprocess_value_class() -> None:
    """Switch prometheus_client to mmap-backed values if the env asks for it.

    prometheus_client picks its value class when it is first imported; a supervisor that
    imported it before setting ``PROMETHEUS_MULTIPROC_DIR`` (and forked workers inherit
    that choice) would otherwise silently keep per-process values nobody can scrape.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def worker_state_path(directory: str, pid: int) -> str:
    """Where a worker publishes its readiness for the supervisor (beside the .db files)."""
    return os.path.join(directory, f"streamproc_worker_{pid}.json")


def _within(stamps: list[int], now: float, bound: float) -> int:
    """How many of ``stamps`` (ascending) have ``now - ts / 1000 <= bound``."""
    return len(stamps) - bisect.bisect_left(
        stamps, True, key=lambda ts: now - ts / 1000.0 <= bound
    )


class Metrics(Observer):
    """The Prometheus implementation of :class:`Observer`.

    Args:
        allowed_destinations: destination topics the config names; egress anywhere else is
            an ``unexpected_destination`` anomaly.  ``None`` disables that check.
        anomaly: detector settings; ``False`` disables in-process anomaly detection.
        clock: time source of the anomaly detector (tests inject a fake one).
        registry: where single-process metrics live (a fresh one by default, so several
            instances can coexist in tests).  Ignored for exposition in multiprocess mode,
            where values go to ``PROMETHEUS_MULTIPROC_DIR``.
        multiprocess: force multiprocess mode on/off; by default on when the env var is set.
        worker: an identifier of this worker for log lines (index, not pid).
        known: the topics, audiences and KEK ids label values may take
            (:meth:`KnownLabels.from_config`); any other value becomes ``_other``.  Without
            it every topic, audience and KEK label is ``_other`` (fail closed).
    """

    def __init__(
        self,
        *,
        allowed_destinations: Iterable[str] | None = None,
        anomaly: AnomalyConfig | Literal[False] | None = None,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
        multiprocess: bool | None = None,
        version: str = __version__,
        max_label_values: int = 1000,
        worker: int | str | None = None,
        process_metrics: bool = True,
        known: KnownLabels | None = None,
    ) -> None:
        mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        self.multiprocess = bool(mp_dir) if multiprocess is None else multiprocess
        if self.multiprocess:
            if not mp_dir:
                raise ValueError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR (see server.setup_multiprocess)")
            _ensure_multiprocess_value_class()
        self.multiprocess_dir = mp_dir if self.multiprocess else ""
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_metrics and not self.multiprocess and registry is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self.worker = worker
        self._label = _LabelGuard(max_label_values, known)
        self._m: dict[str, Any] = {}
        for spec in METRICS:
            kwargs: dict[str, Any] = {"registry": self.registry}
            if spec.type == "counter":
                self._m[spec.name] = Counter(spec.base, spec.help, spec.labels, **kwargs)
            elif spec.type == "histogram":
                self._m[spec.name] = Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, **kwargs)
            else:
                mode: Any = spec.multiprocess_mode or "all"  # validated by prometheus_client
                self._m[spec.name] = Gauge(spec.name, spec.help, spec.labels, multiprocess_mode=mode, **kwargs)
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()
        self._child("streamproc_build_info", version).set(1)
        self._child("streamproc_workers").set(1)
        self._child("streamproc_ready").set(0)
        # Series of closed label sets start at 0, so increase() sees their first event.
        for kind in AnomalyKind:
            self._child("streamproc_anomalies_total", kind.value)
        for component in INSECURE_COMPONENTS:
            self._child("streamproc_insecure_transport", component).set(0)
        for outcome in sorted(TX_OUTCOMES):
            self._child("streamproc_transactions_total", outcome)
        # Without a 0 sample first, the first retries of an outage are invisible to
        # increase() (and so to StreamprocDependencyRetrying).
        for dep in sorted(DEPENDENCIES):
            self._child("streamproc_retries_total", dep)
            self._child("streamproc_dependency_outage_seconds", dep).set(0)
        #: dependency -> monotonic time its current outage was first reported.
        self._outage_since: dict[str, float] = {}
        for reason in Reason:
            self._child("streamproc_records_quarantined_total", reason.value)
            if reason.value in ENVELOPE_REASONS:
                self._child("streamproc_decryption_failures_total", reason.value)
        self._last_hits = 0
        self._last_misses = 0
        self._lag_keys: set[tuple[str, str]] = set()
        self._assigned: frozenset[tuple[str, int]] | None = None
        # Readiness / liveness state, also published to a file in multiprocess mode.
        self._ready = False
        self._ready_reason = "starting"
        self._partitions: int | None = None
        self._alive = True
        self._last_beat = time.monotonic()
        self._last_state_write = 0.0
        self.detector: AnomalyDetector | None = None
        #: Optional ``f(anomaly)`` called after the counter is incremented (the worker
        #: hooks its audit trail here: every finding becomes an ``anomaly`` audit event).
        self.on_anomaly: Callable[[Anomaly], None] | None = None
        if anomaly is not False:
            self.detector = AnomalyDetector(
                anomaly or AnomalyConfig(),
                on_anomaly=self._on_anomaly,
                clock=clock,
                allowed_destinations=allowed_destinations,
                name=self._label,
            )
        self._write_state(force=True)

    # -- helpers --------------------------------------------------------------------------
    def _child(self, name: str, *labelvalues: str) -> Any:
        key = (name, labelvalues)
        c = self._children.get(key)
        if c is None:
            metric = self._m[name]
            c = metric.labels(*labelvalues) if labelvalues else metric
            self._children[key] = c
        return c

    def metric(self, name: str) -> Any:
        """The prometheus_client object of a family in :data:`METRICS` (tests, extensions)."""
        return self._m[name]

    def _on_anomaly(self, a: Anomaly) -> None:
        self._child("streamproc_anomalies_total", a.kind.value).inc()
        if self.on_anomaly is not None:
            self.on_anomaly(a)

    # -- Observer -------------------------------------------------------------------------
    def records_consumed(self, topic: str, partition: int, count: int) -> None:
        L = self._label
        self._child("streamproc_records_consumed_total", L("topic", topic), L("partition", partition)).inc(count)
        self.heartbeat()

    def batch_processed(self, stats: object, inputs: int, seconds: float) -> None:
        L = self._label
        st: Any = stats
        self._child("streamproc_batch_size").observe(inputs)
        self._child("streamproc_batch_duration_seconds").observe(seconds)
        for (topic, kek), n in st.decryptions.items():
            self._child("streamproc_decryptions_total", L("topic", topic), L("kek_id", kek)).inc(n)
        for (topic, aud), n in st.egress_records.items():
            self._child("streamproc_egress_records_total", L("topic", topic), L("audience", aud)).inc(n)
        for (topic, aud), n in st.egress_bytes.items():
            self._child("streamproc_egress_bytes_total", L("topic", topic), L("audience", aud)).inc(n)
        for op, n in st.transforms.items():
            self._child("streamproc_transformed_fields_total", L("operator", op)).inc(n)
        for reason, n in st.quarantined.items():
            r = L("reason", getattr(reason, "value", reason))
            self._child("streamproc_records_quarantined_total", r).inc(n)
            if r in ENVELOPE_REASONS:
                self._child("streamproc_decryption_failures_total", r).inc(n)
        if st.tombstones:
            self._child("streamproc_tombstones_total").inc(st.tombstones)
        for (aud, why), n in getattr(st, "withheld", {}).items():
            self._child("streamproc_consent_withheld_total", L("audience", aud), L("reason", why)).inc(n)
        for (aud, why), n in getattr(st, "dp_suppressed", {}).items():
            self._child("streamproc_dp_budget_suppressed_total", L("audience", aud), L("reason", why)).inc(n)
        risk = getattr(st, "risk", None)
        if risk:
            self._risk(risk, getattr(st, "risk_enforced", {}))
        if self.detector is not None:
            self.detector.observe_batch(st)
        self.heartbeat()

    def _risk(self, reports: Mapping[str, Any], enforced: Mapping[tuple[str, str], int]) -> None:
        """The risk windows after a batch (one report per audience, counts and shares only)."""
        L = self._label
        for aud, r in reports.items():
            a = L("audience", aud)
            if a == OTHER:
                continue  # an audience the config does not name has no series of its own
            self._child("streamproc_risk_window_records", a).set(r.records)
            self._child("streamproc_risk_min_class_size", a).set(r.min_class)
            self._child("streamproc_risk_share_below_k", a).set(r.share_below_k)
            self._child("streamproc_risk_share_unique", a).set(r.share_unique)
            self._child("streamproc_risk_k_target", a).set(r.k_target)
            if r.l_target is not None:
                self._child("streamproc_risk_min_l", a).set(r.min_l or 0)
                self._child("streamproc_risk_share_below_l", a).set(r.share_below_l or 0.0)
                self._child("streamproc_risk_l_target", a).set(r.l_target)
        for (aud, action), n in enforced.items():
            self._child("streamproc_risk_enforced_total", L("audience", aud), L("action", action)).inc(n)

    def end_to_end_latency(self, seconds: Sequence[float]) -> None:
        h = self._child("streamproc_end_to_end_latency_seconds")
        for s in seconds:
            h.observe(max(0.0, s))

    def end_to_end_latency_ms(self, now: float, timestamps_ms: Sequence[int]) -> None:
        # Per batch, not per record: sort the timestamps once (in C), then find each
        # bucket's boundary by bisection with the very expression observe() compares
        # (max(0, now - ts / 1000) <= bound, monotone in ts), so every bucket count is
        # exactly what one observe() per record gives, in len(buckets) * log2(n) Python
        # steps instead of n observe() calls.  prometheus_client has no public batch
        # update; without the internals used here (another version) fall back to observe().
        h = self._child("streamproc_end_to_end_latency_seconds")
        bounds = getattr(h, "_upper_bounds", None)
        buckets = getattr(h, "_buckets", None)
        total = getattr(h, "_sum", None)
        if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
            super().end_to_end_latency_ms(now, timestamps_ms)
            return
        stamps = sorted(timestamps_ms)
        n = len(stamps)
        # Records stamped after `now` (clock skew) count as 0 s, as observe(max(0, s)) does.
        past = n - _within(stamps, now, 0.0)
        if past:  # exact, then rounded once: epoch seconds minus epoch seconds cancel
            total.inc(float(Fraction(now) * past - Fraction(sum(stamps[:past]), 1000)))
        done = 0  # records at or below the previous bound
        for bound, bucket in zip(bounds, buckets, strict=True):
            at_or_below = _within(stamps, now, bound)
            if at_or_below > done:
                bucket.inc(at_or_below - done)
                done = at_or_below

    def dead_lettered(self, reason: str, source_topic: str, count: int) -> None:
        L = self._label
        r = getattr(reason, "value", reason)
        self._child("streamproc_dead_letters_total", L("topic", source_topic), L("reason", r)).inc(count)

    def transaction(self, outcome: str) -> None:
        self._child("streamproc_transactions_total", outcome if outcome in TX_OUTCOMES else OTHER).inc()

    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        L = self._label
        p = L("provider", provider)
        op = operation if operation in KMS_OPERATIONS else OTHER
        self._child("streamproc_kms_calls_total", p, op, KMS_OUTCOMES.get(outcome, "error")).inc()
        self._child("streamproc_kms_call_duration_seconds", p, op).observe(seconds)

    def dek_cache(self, hits: int, misses: int) -> None:
        # The cache keeps cumulative counters; a smaller value means a new cache instance.
        dh = hits - self._last_hits if hits >= self._last_hits else hits
        dm = misses - self._last_misses if misses >= self._last_misses else misses
        self._last_hits, self._last_misses = hits, misses
        if dh:
            self._child("streamproc_dek_cache_hits_total").inc(dh)
        if dm:
            self._child("streamproc_dek_cache_misses_total").inc(dm)
        if self.detector is not None:
            self.detector.tick()

    def consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        L = self._label
        for (topic, partition), lag in lags.items():
            key = (L("topic", topic), L("partition", partition))
            self._child("streamproc_consumer_lag", *key).set(max(0, lag))
            self._lag_keys.add(key)
        self.heartbeat()

    def assignment(self, partitions: Sequence[tuple[str, int]]) -> None:
        L = self._label
        owned = frozenset(partitions)
        keep = {(L("topic", t), L("partition", p)) for t, p in owned}
        gauge = self._m["streamproc_consumer_lag"]
        for key in self._lag_keys - keep:
            # Another worker owns it now; a stale value here would double-count the lag.
            if self.multiprocess:
                self._child("streamproc_consumer_lag", *key).set(0)
            else:
                self._children.pop(("streamproc_consumer_lag", key), None)
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)
        self._lag_keys &= keep
        self._child("streamproc_assigned_partitions").set(len(owned))
        if self.detector is not None and self._assigned is not None and owned != self._assigned:
            self.detector.rebase()
        self._assigned = owned
        with self._lock:
            self._partitions = len(owned)
        self._publish_ready()

    def ready(self, ready: bool, reason: str = "") -> None:
        with self._lock:
            self._ready = bool(ready)
            self._ready_reason = "" if ready else (reason or "not ready")[:200]
        self._publish_ready()

    def retrying(self, dependency: str, attempt: int) -> None:
        dep = dependency if dependency in DEPENDENCIES else OTHER
        self._child("streamproc_retries_total", dep).inc()
        if dep != OTHER:
            self._outage_since.setdefault(dep, time.monotonic())
            self._refresh_outages()
        log.warning("retrying %s", dependency, extra={"dependency": dependency, "attempt": attempt})
        self.heartbeat()

    def insecure_transport(self, component: str) -> None:
        self._child("streamproc_insecure_transport", component if component in INSECURE_COMPONENTS else OTHER).set(1)

    def retention_drift(self, topic: str, drifted: bool) -> None:
        self._child("streamproc_retention_drift", self._label("topic", topic)).set(1 if drifted else 0)

    def state_topic_drift(self, topic: str, drifted: bool) -> None:
        self._child("streamproc_state_topic_drift", self._label("topic", topic)).set(1 if drifted else 0)

    def dependency_restored(self, dependency: str) -> None:
        if self._outage_since.pop(dependency, None) is not None:
            self._child("streamproc_dependency_outage_seconds", dependency).set(0)

    def _refresh_outages(self) -> None:
        now = time.monotonic()
        for dep, since in list(self._outage_since.items()):
            self._child("streamproc_dependency_outage_seconds", dep).set(round(now - since, 3))

    # -- beyond the interface ---------------------------------------------------------------
    def tick(self) -> None:
        """Close elapsed anomaly intervals and refresh liveness; call when idle."""
        if self.detector is not None:
            self.detector.tick()
        self._refresh_outages()
        self.heartbeat()

    def heartbeat(self) -> None:
        """The processing loop is alive (``/healthz`` with a liveness timeout uses it)."""
        self._last_beat = time.monotonic()
        if self.multiprocess and self._last_beat - self._last_state_write >= 1.0:
            self._write_state()

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): the last ``ready()`` report, and partitions owned if reported."""
        with self._lock:
            if not self._ready:
                return False, self._ready_reason
            if self._partitions == 0:
                return False, "no partitions assigned"
            return True, ""

    def liveness(self, timeout: float | None = None) -> tuple[bool, str]:
        """(alive, reason): not shut down, and a heartbeat within ``timeout`` seconds if given."""
        if not self._alive:
            return False, "shutting down"
        if timeout is not None:
            age = time.monotonic() - self._last_beat
            if age > timeout:
                return False, f"no heartbeat for {age:.0f}s"
        return True, ""

    def close(self) -> None:
        """Mark this process not alive (``/healthz`` turns 503) and unready."""
        self._alive = False
        self.ready(False, "shutting down")

    def _publish_ready(self) -> None:
        ok, _ = self.readiness()
        self._child("streamproc_ready").set(1 if ok else 0)
        self._write_state(force=True)

    def _write_state(self, force: bool = False) -> None:
        """Publish readiness for the supervisor's aggregated ``/readyz`` (multiprocess only)."""
        if not self.multiprocess:
            return
        now = time.monotonic()
        if not force and now - self._last_state_write < 1.0:
            return
        self._last_state_write = now
        with self._lock:
            state = {
                "pid": os.getpid(),
                "worker": self.worker,
                "ready": self._ready,
                "reason": self._ready_reason,
                "partitions": self._partitions,
                "alive": self._alive,
                "heartbeat": time.time() - (now - self._last_beat),
            }
        path = worker_state_path(self.multiprocess_dir, os.getpid())
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except OSError:  # the supervisor may be tearing the directory down
            pass


__all__ = [
    "KMS_OUTCOMES",
    "METRICS",
    "METRICS_BY_NAME",
    "OTHER",
    "AnomalyConfig",
    "AnomalyKind",
    "KnownLabels",
    "MetricSpec",
    "Metrics",
    "exported_series",
    "worker_state_path",
]
