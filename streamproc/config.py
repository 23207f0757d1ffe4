"""The processor configuration: one YAML file, validated up front with precise errors.

A typo in a config file should fail at start-up with a message that names the file, the
key path and what is wrong -- not at the first record, and not as a librdkafka error
about a property nobody remembers setting.  :func:`load_config` therefore reads the
file, interpolates the environment, applies the ``STREAMPROC_*`` overrides, resolves
relative paths and checks every section, raising :class:`~streamproc.errors.ConfigError`
with messages such as ``streamproc.yaml: pipelines[0].destinations[1].audience: 'fraud2'
is not an audience of policy.yaml (have: analytics, fraud, support)``.

Format (every key; see ``docs/configuration.md`` for the prose)::

    kafka:                      # passed through to librdkafka (incl. security.protocol, ssl.*, sasl.*)
      bootstrap.servers: 127.0.0.1:9092
    consumer: {}                # extra consumer-only librdkafka settings
    producer: {}                # extra producer-only librdkafka settings
    group_id: streamproc
    processing_guarantee: exactly_once     # or at_least_once
    batch: {max_records: 2000, max_wait_ms: 100}
    max_record_bytes: 1000000             # optional; default: derived from the producer/topic limits
    schemas: {directory: ./schemas}        # or {url: http://registry:8081, ...confluent client settings}
    kms: {provider: local, path: ./keys/keyring.json}   # vault/aws: see streamproc.crypto.kms.factory
    policy: ./policy.yaml
    pipelines:
      - sources: [orders]
        dead_letter_topic: orders.dlq
        source_keks: [orders-kek]  # optional: the only KEKs that may seal these sources
        destinations:
          - {topic: orders.analytics, audience: analytics, kek: analytics-kek}
          - {topic: orders.fraud, audience: fraud, kek: fraud-kek}
    topics:                      # for `streamproc topics apply`
      defaults: {partitions: 6, replication_factor: 1, config: {retention.ms: "604800000"}}
      overrides: {orders.dlq: {config: {retention.ms: "2592000000"}}}
    metrics: {host: 0.0.0.0, port: 9464, liveness_timeout_seconds: 130}
    dead_letter: {kek: quarantine-kek}     # dead letters are sealed under this KEK
    logging: {level: INFO, format: json}      # format: json or text (alias: human)
    audit:                       # optional: the processor's hash-chained audit trail
      file: ./audit/processor.jsonl          # and/or kafka_topic: streamproc.audit
      fsync: always                          # always | interval | never
      hmac_key_file: ./audit.key             # optional (streamproc audit keygen)
      dead_letter_burst: {threshold: 100, window_seconds: 60}
    pseudonym_secrets: {provider: kms}       # or {provider: wrapped_file, path: ..., kek: ...}

Environment:

* ``${VAR}`` and ``${VAR:-default}`` are interpolated in every string value (keys are
  left alone).  An unset ``${VAR}`` without a default is an error naming the key path,
  so a missing secret is never silently replaced by an empty string.  ``$${`` escapes a
  literal ``${``.  A value that is exactly one ``${VAR}`` whose text is an integer stays a
  string; typed fields (ports, counts) accept numeric strings for that reason.
* ``STREAMPROC_BOOTSTRAP_SERVERS`` replaces ``kafka.bootstrap.servers``;
  ``STREAMPROC_SCHEMA_REGISTRY_URL`` replaces the ``schemas`` section's source with
  ``{url: ...}`` (other registry client settings are kept, ``directory`` is dropped);
  ``STREAMPROC_METRICS_PORT`` replaces ``metrics.port``.  Overrides win over the file
  because deployments inject them per environment.

Relative paths (``schemas.directory``, ``kms.path``, ``kms.ca_cert``/``client_cert``/
``client_key``, ``policy``, ``audit.file``, ``audit.hmac_key_file``,
``pseudonym_secrets.path``, and librdkafka ``*.location`` / ``*.keytab`` settings) are
resolved against the directory of the config file, so the file means the same thing
whichever directory the processor is started from.

The settings the runtime owns (``group.id``, ``enable.auto.commit``, ``isolation.level``,
``transactional.id``, ``enable.idempotence``...) are refused in the librdkafka sections:
they decide the processing guarantee and must not be overridden by accident.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from streamproc import validation
from streamproc.errors import ConfigError, PolicyError

if TYPE_CHECKING:
    from streamproc.policy.model import Policy

GUARANTEES = ("exactly_once", "at_least_once")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text", "human")  # "human" is an alias of "text"

ENV_BOOTSTRAP = "STREAMPROC_BOOTSTRAP_SERVERS"
ENV_REGISTRY = "STREAMPROC_SCHEMA_REGISTRY_URL"
ENV_METRICS_PORT = "STREAMPROC_METRICS_PORT"

TOP_LEVEL = (
    "kafka",
    "consumer",
    "producer",
    "group_id",
    "processing_guarantee",
    "batch",
    "max_record_bytes",
    "schemas",
    "kms",
    "policy",
    "pipelines",
    "topics",
    "metrics",
    "logging",
    "audit",
    "pseudonym_secrets",
    "acls",
    "dead_letter",
    "lineage",
    "consent",
    "erasure",
)

#: The KEK dead letters are sealed under when ``dead_letter.kek`` is not set.
DEFAULT_QUARANTINE_KEK = "quarantine-kek"
#: librdkafka's default ``transaction.timeout.ms`` (the longest a healthy commit may take).
_LIBRDKAFKA_TRANSACTION_TIMEOUT_MS = 60_000

AUDIT_FSYNC = ("always", "interval", "never")
SECRET_PROVIDERS = ("kms", "wrapped_file")

#: librdkafka settings the runtime sets itself; the guarantee depends on them.
RESERVED_KAFKA = {
    "group.id": "set 'group_id' at the top level instead",
    "enable.auto.commit": "the worker commits offsets itself (in the transaction or after a flush)",
    "enable.auto.offset.store": "the worker stores offsets itself",
    "isolation.level": "the worker always reads read_committed",
    "transactional.id": "derived from group_id, the instance and the worker index so zombies are fenced",
    "enable.idempotence": "set by processing_guarantee",
    "on_commit": "not configurable",
}

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PATH_SUFFIXES = (".location", ".keytab")


# --------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DestinationConfig:
    topic: str
    audience: str
    kek: str


@dataclass(frozen=True)
class PipelineConfig:
    sources: tuple[str, ...]
    dead_letter_topic: str
    destinations: tuple[DestinationConfig, ...]
    #: KEKs that may seal these sources; None: any KEK not configured for another role.
    source_keks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TopicSettings:
    partitions: int | None = None
    replication_factor: int | None = None
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicsConfig:
    defaults: TopicSettings = field(default_factory=lambda: TopicSettings(6, 1, {}))
    overrides: Mapping[str, TopicSettings] = field(default_factory=dict)
    #: How often a worker compares live retention with the policy (0: never).
    retention_check_interval_seconds: float = 300.0

    def for_topic(self, topic: str) -> TopicSettings:
        """Defaults overlaid with the topic's override (config maps are merged)."""
        o = self.overrides.get(topic)
        d = self.defaults
        if o is None:
            return TopicSettings(d.partitions or 1, d.replication_factor or 1, dict(d.config))
        return TopicSettings(
            o.partitions or d.partitions or 1,
            o.replication_factor or d.replication_factor or 1,
            {**d.config, **o.config},
        )


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "0.0.0.0"
    port: int = 9464
    enabled: bool = True
    #: ``/healthz`` turns 503 when the processing loop was silent this long; ``None``:
    #: derived (:attr:`Config.liveness_timeout`).
    liveness_timeout_seconds: float | None = None


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "json"


@dataclass(frozen=True)
class AuditConfig:
    """The processor's audit trail (``audit:``); at least one of ``file``/``kafka_topic``."""

    file: Path | None = None
    fsync: str = "always"
    hmac_key_file: Path | None = None
    kafka_topic: str | None = None
    burst_threshold: int = 100
    burst_window_seconds: int = 60


@dataclass(frozen=True)
class LineageConfig:
    """OpenLineage run events (``lineage:``; off without the section), see observability.lineage.

    ``transport`` is handed to openlineage-python's transport factory as it is (``type``:
    console, file, http or kafka, plus that transport's settings).
    """

    transport: Mapping[str, Any]
    enabled: bool = True
    namespace: str = "streamproc"
    job: str | None = None


LINEAGE_TRANSPORTS = ("console", "file", "http", "kafka")


@dataclass(frozen=True)
class ConsentConfig:
    """The consent table (``consent:``): a compacted topic keyed by subject tokens.

    ``domain`` is the consent key domain (the subject's token is derived from the pseudonym
    master with the consent salt and this info); ``restore_timeout_seconds`` bounds how long
    a worker waits to read the topic to its end before it processes anything.
    """

    topic: str
    domain: str = "consent"
    restore_timeout_seconds: int = 120


@dataclass(frozen=True)
class ErasureConfig:
    """The subject-key topic (``erasure:``) of ``erasable`` rules: a compacted topic of
    per-subject data keys, each sealed under its audience's *subject-key KEK*
    (streamproc.crypto.erasure).

    ``keks`` names, per audience with erasable rules, a KEK of its own for its subject
    keys: not a destination KEK (the processor must never be able to unwrap what it sealed
    for an audience, and it must unwrap the subject keys after a restart), not another
    audience's (whoever may re-identify one audience's values could open the other's
    keys).  ``restore_timeout_seconds`` bounds how long a worker waits to read the topic
    to its end before it processes anything (a partial table would create second keys).
    """

    topic: str
    keks: Mapping[str, str] = field(default_factory=dict)
    restore_timeout_seconds: int = 120


@dataclass(frozen=True)
class PseudonymSecretsConfig:
    """Where the pseudonym master comes from (``pseudonym_secrets:``).

    ``kms``: the ``kms:`` provider's own secret store (local keyring ``secret`` keys,
    Vault/OpenBao KV v2).  ``wrapped_file``: a :mod:`streamproc.crypto.wrapped_secrets`
    file at ``path``, unwrapped with the ``kms:`` provider under the pinned ``kek``.
    """

    provider: str = "kms"
    path: Path | None = None
    kek: str | None = None


@dataclass(frozen=True)
class AudienceAcl:
    """The one principal that reads an audience's sanitized topics, and its group prefix."""

    principal: str
    group_prefix: str


@dataclass(frozen=True)
class ProducerAcl:
    """A producer principal and the source topics it (and only it) may write."""

    principal: str
    topics: tuple[str, ...]


@dataclass(frozen=True)
class AclsConfig:
    """Who is who at the broker (``acls:``), for ``streamproc acls plan|apply``.

    Only principals are configured; the ACLs themselves are derived from the pipelines
    (:mod:`streamproc.runtime.acls`), so they cannot drift from what the processor does.
    """

    processor: str
    audiences: Mapping[str, AudienceAcl] = field(default_factory=dict)
    producers: tuple[ProducerAcl, ...] = ()

    def principals(self) -> list[str]:
        """Every principal the config names, processor first."""
        return list(
            dict.fromkeys(
                [
                    self.processor,
                    *(a.principal for a in self.audiences.values()),
                    *(p.principal for p in self.producers),
                ]
            )
        )


@dataclass(frozen=True)
class Config:
    """A validated configuration.  Build librdkafka dicts with the ``*_config`` methods."""

    path: Path
    kafka: Mapping[str, Any]
    consumer: Mapping[str, Any]
    producer: Mapping[str, Any]
    group_id: str
    processing_guarantee: str
    batch_max_records: int
    batch_max_wait_ms: int
    #: ``None``: derived at start-up from the producer's ``message.max.bytes`` and the
    #: destination topics' ``max.message.bytes`` (see streamproc.runtime.limits).
    max_record_bytes: int | None
    schemas: Mapping[str, Any]
    kms: Mapping[str, Any]
    policy: Path
    pipelines: tuple[PipelineConfig, ...]
    topics: TopicsConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    audit: AuditConfig | None = None
    pseudonym_secrets: PseudonymSecretsConfig = field(default_factory=PseudonymSecretsConfig)
    acls: AclsConfig | None = None
    #: Components whose TLS certificate verification is off by an explicit ``insecure:
    #: true`` (``kafka``, ``kms``); the worker warns at start and exports it as a metric.
    insecure_transport: tuple[str, ...] = ()
    #: The quarantine KEK: dead letters (original key, headers and value) are sealed under it.
    dead_letter_kek: str = DEFAULT_QUARANTINE_KEK
    lineage: LineageConfig | None = None
    consent: ConsentConfig | None = None
    erasure: ErasureConfig | None = None
    #: Commit batch N on the committer thread while batch N+1 is consumed and processed
    #: (``batch.overlap_commit``; streamproc.runtime.committer).
    batch_overlap_commit: bool = True
    #: The policy file as parsed when the config was validated (``None`` with
    #: ``check_policy=False``); read it through :meth:`load_policy`.
    parsed_policy: Policy | None = field(default=None, compare=False, repr=False)

    @property
    def liveness_timeout(self) -> float:
        """Seconds of silence after which ``/healthz`` says the loop is stuck.

        ``metrics.liveness_timeout_seconds`` if set, else twice the longest step a healthy
        loop can take: waiting for a batch plus a commit bounded by the producer's
        ``transaction.timeout.ms``.  The loop reports at least once per step (and once per
        retry while it waits out an outage), so only a wedged loop stays silent that long.
        """
        if self.metrics.liveness_timeout_seconds is not None:
            return self.metrics.liveness_timeout_seconds
        return 2.0 * _healthy_step_seconds(self.batch_max_wait_ms, self.producer_config())

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly_once"

    @property
    def source_topics(self) -> list[str]:
        return [s for p in self.pipelines for s in p.sources]

    @property
    def destination_topics(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.pipelines:
            for d in p.destinations:
                seen.setdefault(d.topic, None)
        return list(seen)

    @property
    def dead_letter_topics(self) -> list[str]:
        return list(dict.fromkeys(p.dead_letter_topic for p in self.pipelines))

    def all_topics(self) -> list[str]:
        """Sources, destinations, DLQs, the audit, the consent and the subject-key topic, and
        the budget changelog, in that order, without repeats."""
        audit = [self.audit.kafka_topic] if self.audit and self.audit.kafka_topic else []
        consent = [self.consent.topic] if self.consent is not None else []
        keys = [self.erasure.topic] if self.erasure is not None else []
        budget = [t for t in (self.budget_changelog_topic, self.risk_hold_topic) if t]
        return list(
            dict.fromkeys(
                [*self.source_topics, *self.destination_topics, *self.dead_letter_topics, *audit, *consent, *keys,
                 *budget]
            )
        )

    def subject_key_keks(self) -> dict[str, str]:
        """audience -> the KEK its subject keys are sealed under (``erasure.keks``)."""
        return {} if self.erasure is None else dict(self.erasure.keks)

    @property
    def budget_changelog_topic(self) -> str | None:
        """``<group_id>.budget-changelog``: the compacted changelog of the per-subject
        privacy budgets, when a routed audience has ``budget:`` (else ``None``).  Derived
        from the group id like Kafka Streams' ``<application.id>-<store>-changelog``: one
        consumer group, one budget state; a second group over the same inputs has budgets
        of its own (docs/policy.md)."""
        routed = {d.audience for p in self.pipelines for d in p.destinations}
        policy = self.load_policy()
        if not any(a.budget is not None for a in policy.audiences.values() if a.name in routed):
            return None
        return f"{self.group_id}.budget-changelog"

    @property
    def risk_hold_topic(self) -> str | None:
        """``<group_id>.risk-hold``: the compacted changelog of the records held by
        ``risk.action: hold`` (streamproc.pipeline.hold), when a routed audience holds."""
        routed = {d.audience for p in self.pipelines for d in p.destinations}
        policy = self.load_policy()
        if not any(
            a.risk is not None and a.risk.action == "hold" for a in policy.audiences.values() if a.name in routed
        ):
            return None
        return f"{self.group_id}.risk-hold"

    def dead_letter_topic_for(self, source_topic: str) -> str:
        for p in self.pipelines:
            if source_topic in p.sources:
                return p.dead_letter_topic
        raise KeyError(source_topic)

    def load_policy(self) -> Policy:
        """The policy, parsed once: the one :func:`load_config` parsed to check the
        audiences, or (for a config loaded with ``check_policy=False``) parsed now.

        Pass the result down (``build_pipeline(config, policy=...)``) rather than calling
        this twice.
        """
        if self.parsed_policy is not None:
            return self.parsed_policy
        from streamproc.policy.model import load_policy

        return load_policy(self.policy)

    # -- librdkafka -------------------------------------------------------------------------
    def admin_config(self) -> dict[str, Any]:
        return dict(self.kafka)

    def consumer_config(self, **extra: Any) -> dict[str, Any]:
        """Common settings + ``consumer:`` + runtime-owned settings (which win)."""
        return {**self.kafka, **self.consumer, **extra}

    def producer_config(self, **extra: Any) -> dict[str, Any]:
        return {**self.kafka, **self.producer, **extra}


SUBSCRIBER_TOP_LEVEL = ("kafka", "consumer", "schemas", "kms", "audience", "topics")


@dataclass(frozen=True)
class SubscriberConfig:
    """What a subscriber needs to read its audience's sanitized topics, and nothing more.

    A subscriber has no business holding the processor's policy or pipelines (they say
    what every other audience receives), so ``streamproc consume`` and the SDK examples
    take this minimal file instead: ``kafka`` (+ ``consumer``), ``schemas``, ``kms`` (with
    credentials for the audience's KEK only) and ``audience``; optionally ``topics``, the
    sanitized topics it may read.  Loaded by :func:`load_subscriber_config`.
    """

    path: Path
    kafka: Mapping[str, Any]
    consumer: Mapping[str, Any]
    schemas: Mapping[str, Any]
    kms: Mapping[str, Any]
    audience: str
    topics: tuple[str, ...] = ()
    insecure_transport: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def consumer_config(self, **extra: Any) -> dict[str, Any]:
        """Common settings + ``consumer:`` + the caller's settings (which win)."""
        return {**self.kafka, **self.consumer, **extra}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
class _Ctx:
    """Carries the file name so every error message can start with it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, where: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {what}" if where else f"{self.path}: {what}")

    def at(self, where: str) -> str:
        """``where`` prefixed with the file, for :mod:`streamproc.validation` messages."""
        return f"{self.path}: {where}" if where else str(self.path)


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    check_policy: bool = True,
) -> Config:
    """Read, interpolate, override, resolve and validate a config file.

    ``env`` defaults to ``os.environ`` (injectable for tests).  ``check_policy`` loads the
    policy file so destination audiences are checked now rather than at the first record.
    """
    p = Path(path).expanduser().resolve()
    ctx = _Ctx(Path(path))
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ctx.error("", f"not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.error("", f"the top level must be a mapping, got {_tname(raw)}")
    env = os.environ if env is None else env
    raw = _interpolate(raw, env, ctx, "")
    _apply_overrides(raw, env, ctx)
    return _validate(raw, p, ctx, check_policy)


def parse_config(
    data: Mapping[str, Any] | str,
    *,
    base_dir: str | os.PathLike[str] = ".",
    env: Mapping[str, str] | None = None,
    check_policy: bool = True,
    name: str = "<config>",
) -> Config:
    """Like :func:`load_config` for a mapping or YAML text (tests, embedding)."""
    raw = yaml.safe_load(data) if isinstance(data, str) else dict(data)
    ctx = _Ctx(Path(name))
    if not isinstance(raw, dict):
        raise ctx.error("", f"the top level must be a mapping, got {_tname(raw)}")
    env = os.environ if env is None else env
    raw = _interpolate(raw, env, ctx, "")
    _apply_overrides(raw, env, ctx)
    return _validate(raw, Path(base_dir).resolve() / name, ctx, check_policy)


def load_subscriber_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> SubscriberConfig:
    """Read and validate a subscriber config (:class:`SubscriberConfig`).

    Same conventions as :func:`load_config`: ``${VAR}`` interpolation, the
    ``STREAMPROC_BOOTSTRAP_SERVERS`` / ``STREAMPROC_SCHEMA_REGISTRY_URL`` overrides,
    paths relative to the file, errors naming the file and key.  A processor config is
    refused with a pointer to the subscriber format rather than half-accepted.
    """
    p = Path(path).expanduser().resolve()
    ctx = _Ctx(Path(path))
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError:
        raise ctx.error("", "not valid YAML") from None
    if not isinstance(raw, dict):
        raise ctx.error("", f"the top level must be a mapping, got {_tname(raw)}")
    for k in raw:
        if k not in SUBSCRIBER_TOP_LEVEL:
            hint = (
                " (this looks like a processor config; a subscriber config has only: "
                if k in ("policy", "pipelines")
                else f"{_did_you_mean(str(k), SUBSCRIBER_TOP_LEVEL)} (expected one of: "
            )
            raise ctx.error(str(k), f"unknown subscriber config key{hint}{', '.join(SUBSCRIBER_TOP_LEVEL)})")
    env = os.environ if env is None else env
    raw = _interpolate(raw, env, ctx, "")
    _apply_overrides(raw, env, ctx)
    raw.pop("metrics", None)  # STREAMPROC_METRICS_PORT means nothing to a subscriber
    base = p.parent
    clients = _client_sections(ctx, raw, base, ("consumer",))
    kafka, consumer = clients["kafka"], clients["consumer"]
    insecure = ["kafka"] if clients.insecure else []
    schemas = _schemas_section(ctx, raw, base)
    if schemas.get("ssl.ca.location") is False:
        insecure.append("schema_registry")  # refused above unless schemas.insecure: true
    kms = _kms_section(ctx, raw, base)
    if kms.get("verify") is False:
        insecure.append("kms")
    if "audience" not in raw:
        raise ctx.error("audience", "is required (the audience whose sanitized topics this subscriber reads)")
    audience = _str(ctx, "audience", raw["audience"])
    topics_raw = raw.get("topics", [])
    if isinstance(topics_raw, str):
        topics_raw = [topics_raw]
    if not isinstance(topics_raw, list):
        raise ctx.error("topics", f"must be a list of topic names, got {_tname(topics_raw)}")
    topics = tuple(_str(ctx, f"topics[{i}]", t) for i, t in enumerate(topics_raw))
    return SubscriberConfig(
        path=p,
        kafka=kafka,
        consumer=consumer,
        schemas=schemas,
        kms=kms,
        audience=audience,
        topics=topics,
        insecure_transport=tuple(insecure),
    )


def _interpolate(value: Any, env: Mapping[str, str], ctx: _Ctx, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            var, default = m.group(1), m.group(2)
            got = env.get(var)
            if got is None or (got == "" and default is not None):
                if default is None:
                    raise ctx.error(
                        where,
                        f"environment variable {var} is not set (use ${{{var}:-default}} for a default)",
                    )
                return default
            return got

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, ctx, _join(where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, ctx, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _apply_overrides(raw: dict[str, Any], env: Mapping[str, str], ctx: _Ctx) -> None:
    bootstrap = env.get(ENV_BOOTSTRAP)
    if bootstrap:
        kafka = raw.get("kafka")
        if kafka is None:
            kafka = raw["kafka"] = {}
        if not isinstance(kafka, dict):
            raise ctx.error("kafka", f"must be a mapping, got {_tname(kafka)}")
        kafka["bootstrap.servers"] = bootstrap
    url = env.get(ENV_REGISTRY)
    if url:
        schemas = raw.get("schemas")
        if not isinstance(schemas, dict):
            schemas = {}
        schemas = {k: v for k, v in schemas.items() if k != "directory"}
        schemas["url"] = url
        raw["schemas"] = schemas
    port = env.get(ENV_METRICS_PORT)
    if port:
        metrics = raw.get("metrics")
        if not isinstance(metrics, dict):
            metrics = {}
        metrics["port"] = port
        raw["metrics"] = metrics


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------
def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


_tname = validation.type_name


def _mapping(
    ctx: _Ctx, where: str, v: Any, *, allowed: Sequence[str] | None = None
) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ctx.error(where, f"must be a mapping, got {_tname(v)}")
    for k in v:
        if not isinstance(k, str):
            raise ctx.error(where, f"keys must be strings (got {k!r})")
        if allowed is not None and k not in allowed:
            raise ctx.error(
                _join(where, k),
                f"unknown setting{_did_you_mean(k, allowed)} (expected one of: {', '.join(allowed)})",
            )
    return v


def _did_you_mean(k: str, allowed: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(k, list(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# The checks themselves live in streamproc.validation (shared with the KMS settings); these
# add the file name to the key path, so every message starts with the file.
def _str(ctx: _Ctx, where: str, v: Any) -> str:
    return validation.string(ctx.at(where), v)


def _int(ctx: _Ctx, where: str, v: Any, *, minimum: int, maximum: int | None = None) -> int:
    return validation.integer(ctx.at(where), v, minimum=minimum, maximum=maximum)


def _bool(ctx: _Ctx, where: str, v: Any) -> bool:
    return validation.boolean(ctx.at(where), v)


def _choice(ctx: _Ctx, where: str, v: Any, allowed: Sequence[str]) -> str:
    return validation.choice(ctx.at(where), v, allowed)


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _kafka_section(ctx: _Ctx, where: str, v: Any, base: Path) -> dict[str, Any]:
    m = _mapping(ctx, where, v)
    out: dict[str, Any] = {}
    for k, val in m.items():
        if k in RESERVED_KAFKA:
            raise ctx.error(
                _join(where, k),
                f"is set by streamproc and cannot be configured ({RESERVED_KAFKA[k]})",
            )
        if isinstance(val, dict | list) or val is None:
            raise ctx.error(
                _join(where, k), f"librdkafka settings must be scalars, got {_tname(val)}"
            )
        if isinstance(val, str) and k.endswith(_PATH_SUFFIXES):
            val = _resolve(base, val)
        out[k] = val
    return out


#: librdkafka settings that switch TLS certificate verification off, and the value that does.
_UNVERIFIED = {
    "enable.ssl.certificate.verification": ("false", "0", "f", "no", "off"),
    "ssl.endpoint.identification.algorithm": ("none",),
}


def disables_verification(key: str, value: Any) -> bool:
    """Whether the librdkafka setting ``key: value`` turns certificate checks off."""
    bad = _UNVERIFIED.get(key)
    return bad is not None and str(value).strip().lower() in bad


class _ClientSections(dict[str, dict[str, Any]]):
    """``kafka`` plus the client sections asked for; ``insecure``: verification is off."""

    insecure: bool = False


def _client_sections(
    ctx: _Ctx, raw: Mapping[str, Any], base: Path, clients: Sequence[str]
) -> _ClientSections:
    """The librdkafka sections of a processor or subscriber config, checked the same way.

    ``kafka.bootstrap.servers`` is required, ``kafka.insecure`` is the only switch that
    allows settings disabling certificate verification in any of the sections.
    """
    kafka_raw = dict(_mapping(ctx, "kafka", raw.get("kafka")))
    allowed = _bool(ctx, "kafka.insecure", kafka_raw.pop("insecure", False))
    out = _ClientSections(kafka=_kafka_section(ctx, "kafka", kafka_raw, base))
    if "bootstrap.servers" not in out["kafka"]:
        raise ctx.error("kafka.bootstrap.servers", f"is required (or set {ENV_BOOTSTRAP})")
    _str(ctx, "kafka.bootstrap.servers", out["kafka"]["bootstrap.servers"])
    for name in clients:
        out[name] = _kafka_section(ctx, name, raw.get(name), base)
    out.insecure = _check_verification(ctx, out, allowed)
    return out


def _check_verification(
    ctx: _Ctx,
    sections: Mapping[str, Mapping[str, Any]],
    allowed: bool,
    flag: str = "kafka.insecure: true",
) -> bool:
    """Refuse settings that disable certificate verification unless ``kafka.insecure``.

    An unverified TLS connection is encrypted to whoever answers: a copied snippet or a
    debugging leftover must not silently turn it on in production.  Returns whether
    verification is off (then the worker logs a warning and sets the
    ``streamproc_insecure_transport`` gauge).
    """
    off = False
    for section, m in sections.items():
        if "insecure" in m and section not in ("kafka", ""):
            raise ctx.error(
                f"{section}.insecure", "set kafka.insecure instead (it covers every client)"
            )
        for k, v in m.items():
            if disables_verification(k, v):
                if not allowed:
                    raise ctx.error(
                        _join(section, k),
                        f"disables TLS certificate verification; set {flag} to "
                        "allow it (the worker then logs a warning at start and exports "
                        'streamproc_insecure_transport{component="kafka"} 1)',
                    )
                off = True
    return off


def load_kafka_properties(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A Java-style client properties file (``key=value`` lines, ``#`` comments).

    The format of ``kafka-acls.sh --command-config``, so one file serves both tools.
    ``${VAR}`` reads the environment (a password never needs to be in the file),
    ``*.location`` paths resolve against the file's directory, and settings that disable
    certificate verification need ``insecure=true`` in the same file.
    """
    p = Path(path)
    ctx = _Ctx(p)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ctx.error(f"line {n}", "expected key=value")
        out[key.strip()] = value.strip()
    out = _interpolate(out, os.environ if env is None else env, ctx, "")
    insecure = _bool(ctx, "insecure", out.pop("insecure", "false"))
    conf = _kafka_section(ctx, "", out, p.resolve().parent)
    _check_verification(ctx, {"": conf}, insecure, "insecure=true")
    return conf


def _topic_settings(ctx: _Ctx, where: str, v: Any) -> TopicSettings:
    m = _mapping(ctx, where, v, allowed=("partitions", "replication_factor", "config"))
    parts = (
        _int(ctx, _join(where, "partitions"), m["partitions"], minimum=1)
        if "partitions" in m
        else None
    )
    rf = (
        _int(ctx, _join(where, "replication_factor"), m["replication_factor"], minimum=1)
        if "replication_factor" in m
        else None
    )
    cfg = _mapping(ctx, _join(where, "config"), m.get("config"))
    conf: dict[str, str] = {}
    for k, val in cfg.items():
        if isinstance(val, dict | list) or val is None:
            raise ctx.error(
                _join(_join(where, "config"), k),
                f"topic configs must be scalars, got {_tname(val)}",
            )
        conf[k] = str(val).lower() if isinstance(val, bool) else str(val)
    return TopicSettings(parts, rf, conf)


def _schemas_section(ctx: _Ctx, raw: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``schemas:`` (processor and subscriber configs): a directory or a registry URL."""
    if "schemas" not in raw:
        raise ctx.error(
            "schemas",
            f"is required ({{directory: ./schemas}} or {{url: http://registry:8081}}; or set {ENV_REGISTRY})",
        )
    schemas = dict(_mapping(ctx, "schemas", raw["schemas"]))
    if ("directory" in schemas) == ("url" in schemas):
        raise ctx.error("schemas", "needs exactly one of 'directory' or 'url'")
    if "directory" in schemas:
        if set(schemas) != {"directory"}:
            extra = sorted(set(schemas) - {"directory"})
            raise ctx.error(
                _join("schemas", extra[0]), "only applies to a registry ('url'), not to a directory"
            )
        d = Path(_resolve(base, _str(ctx, "schemas.directory", schemas["directory"])))
        if not d.is_dir():
            raise ctx.error("schemas.directory", f"{d} is not a directory")
        schemas["directory"] = str(d)
    else:
        insecure = _bool(ctx, "schemas.insecure", schemas.pop("insecure", False))
        url = _str(ctx, "schemas.url", schemas["url"])
        if not (url.startswith(("http://", "https://", "mock://"))):
            raise ctx.error("schemas.url", f"must start with http:// or https:// (got {url!r})")
        # confluent-kafka's registry client turns certificate checks off for
        # ssl.ca.location: false -- never by accident (see _check_verification).
        if schemas.get("ssl.ca.location") is False and not insecure:
            raise ctx.error(
                "schemas.ssl.ca.location",
                "false disables TLS certificate verification of the registry; set "
                "schemas.insecure: true to allow it (the worker then logs a warning at start "
                'and exports streamproc_insecure_transport{component="schema_registry"} 1), '
                "or give it the registry's CA bundle",
            )
    return schemas


def _kms_section(ctx: _Ctx, raw: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``kms:`` (processor and subscriber configs), paths resolved, provider checked."""
    if "kms" not in raw:
        raise ctx.error(
            "kms", "is required (for example {provider: local, path: ./keys/keyring.json})"
        )
    kms = dict(_mapping(ctx, "kms", raw["kms"]))
    provider = kms.get("provider")
    if provider is None:
        raise ctx.error("kms.provider", "is required (local, vault or aws)")
    for key in ("path", "ca_cert", "client_cert", "client_key"):
        if isinstance(kms.get(key), str) and (provider == "local" or key != "path"):
            kms[key] = _resolve(base, kms[key])
    return _check_kms(ctx, kms)


def _validate(raw: dict[str, Any], path: Path, ctx: _Ctx, check_policy: bool) -> Config:
    base = path.parent
    for k in raw:
        if k not in TOP_LEVEL:
            raise ctx.error(
                str(k),
                f"unknown top-level key{_did_you_mean(str(k), TOP_LEVEL)} (expected one of: {', '.join(TOP_LEVEL)})",
            )

    clients = _client_sections(ctx, raw, base, ("consumer", "producer"))
    kafka, consumer, producer = clients["kafka"], clients["consumer"], clients["producer"]
    insecure: list[str] = ["kafka"] if clients.insecure else []

    group_id = _str(ctx, "group_id", raw.get("group_id", "streamproc"))
    guarantee = _choice(
        ctx, "processing_guarantee", raw.get("processing_guarantee", "exactly_once"), GUARANTEES
    )

    batch = _mapping(
        ctx, "batch", raw.get("batch"), allowed=("max_records", "max_wait_ms", "overlap_commit")
    )
    max_records = _int(
        ctx, "batch.max_records", batch.get("max_records", 2000), minimum=1, maximum=1_000_000
    )
    max_wait = _int(
        ctx, "batch.max_wait_ms", batch.get("max_wait_ms", 100), minimum=1, maximum=60_000
    )
    overlap = _bool(ctx, "batch.overlap_commit", batch.get("overlap_commit", True))
    max_bytes = (
        _int(ctx, "max_record_bytes", raw["max_record_bytes"], minimum=1024)
        if raw.get("max_record_bytes") is not None
        else None
    )

    schemas = _schemas_section(ctx, raw, base)
    if schemas.get("ssl.ca.location") is False:
        insecure.append("schema_registry")  # refused above unless schemas.insecure: true
    kms = _kms_section(ctx, raw, base)
    provider = kms["provider"]
    if kms.get("verify") is False:
        insecure.append("kms")  # refused by _check_kms unless kms.insecure: true

    if "policy" not in raw:
        raise ctx.error("policy", "is required (path to the policy file)")
    policy = Path(_resolve(base, _str(ctx, "policy", raw["policy"])))
    if not policy.is_file():
        raise ctx.error("policy", f"{policy} does not exist")

    pipelines = _pipelines(ctx, raw.get("pipelines"))
    parsed_policy = _parse_policy(ctx, policy) if check_policy else None
    if parsed_policy is not None:
        _check_audiences(ctx, pipelines, parsed_policy, policy)

    topics_raw = _mapping(
        ctx, "topics", raw.get("topics"),
        allowed=("defaults", "overrides", "retention_check_interval_seconds"),
    )
    retention_interval = float(
        _int(ctx, "topics.retention_check_interval_seconds", topics_raw.get("retention_check_interval_seconds", 300), minimum=0)
    )
    defaults = _topic_settings(ctx, "topics.defaults", topics_raw.get("defaults"))
    defaults = TopicSettings(
        defaults.partitions or 6, defaults.replication_factor or 1, defaults.config
    )
    overrides_raw = _mapping(ctx, "topics.overrides", topics_raw.get("overrides"))
    overrides = {
        t: _topic_settings(ctx, f"topics.overrides.{t}", v) for t, v in overrides_raw.items()
    }

    m = _mapping(
        ctx,
        "metrics",
        raw.get("metrics"),
        allowed=("host", "port", "enabled", "liveness_timeout_seconds"),
    )
    liveness = None
    if m.get("liveness_timeout_seconds") is not None:
        liveness = float(
            _int(ctx, "metrics.liveness_timeout_seconds", m["liveness_timeout_seconds"], minimum=1)
        )
        floor = _healthy_step_seconds(max_wait, {**kafka, **producer})
        if liveness <= floor:
            raise ctx.error(
                "metrics.liveness_timeout_seconds",
                f"{liveness:.0f} is not above the longest healthy step ({floor:.1f}s: "
                "batch.max_wait_ms plus the producer's transaction.timeout.ms); a healthy "
                "worker would be restarted",
            )
    metrics = MetricsConfig(
        host=_str(ctx, "metrics.host", m.get("host", "0.0.0.0")),
        port=_int(ctx, "metrics.port", m.get("port", 9464), minimum=0, maximum=65535),
        enabled=_bool(ctx, "metrics.enabled", m.get("enabled", True)),
        liveness_timeout_seconds=liveness,
    )
    dl = _mapping(ctx, "dead_letter", raw.get("dead_letter"), allowed=("kek",))
    quarantine_kek = _str(ctx, "dead_letter.kek", dl.get("kek", DEFAULT_QUARANTINE_KEK))
    _reserved_kek(
        ctx, "dead_letter.kek", quarantine_kek, pipelines,
        "dead letters need a key of their own (only incident response may open them)",
    )  # fmt: skip
    lg = _mapping(ctx, "logging", raw.get("logging"), allowed=("level", "format"))
    level = lg.get("level", "INFO")
    logging_cfg = LoggingConfig(
        level=_choice(
            ctx, "logging.level", level.upper() if isinstance(level, str) else level, LOG_LEVELS
        ),
        format=_choice(ctx, "logging.format", lg.get("format", "json"), LOG_FORMATS),
    )
    audit = _audit(ctx, raw.get("audit"), base, pipelines)
    secrets = _pseudonym_secrets(
        ctx, raw.get("pseudonym_secrets"), base, pipelines, quarantine_kek
    )
    if parsed_policy is not None:
        _check_secret_source(ctx, str(provider), secrets, parsed_policy, policy)
    consent = _consent(ctx, raw.get("consent"), pipelines)
    acls = _acls(ctx, raw.get("acls"), pipelines, group_id, consent_topic=consent.topic if consent else None)
    if parsed_policy is not None:
        _check_consent(ctx, consent, parsed_policy, policy)
    erasure = _erasure(ctx, raw.get("erasure"), pipelines, consent, {
        "dead_letter.kek": quarantine_kek, "pseudonym_secrets.kek": secrets.kek or "",
    })  # fmt: skip
    if parsed_policy is not None:
        _check_erasure(ctx, erasure, parsed_policy, policy)
    return Config(
        path=path,
        kafka=kafka,
        consumer=consumer,
        producer=producer,
        group_id=group_id,
        processing_guarantee=guarantee,
        batch_max_records=max_records,
        batch_max_wait_ms=max_wait,
        batch_overlap_commit=overlap,
        max_record_bytes=max_bytes,
        schemas=schemas,
        kms=kms,
        policy=policy,
        pipelines=pipelines,
        topics=TopicsConfig(defaults, overrides, retention_interval),
        metrics=metrics,
        logging=logging_cfg,
        audit=audit,
        pseudonym_secrets=secrets,
        acls=acls,
        insecure_transport=tuple(insecure),
        dead_letter_kek=quarantine_kek,
        lineage=_lineage(ctx, raw.get("lineage")),
        consent=consent,
        erasure=erasure,
        parsed_policy=parsed_policy,
    )


def _consent(ctx: _Ctx, v: Any, pipelines: Sequence[PipelineConfig]) -> ConsentConfig | None:
    """``consent:`` -- topic (required), domain, restore_timeout_seconds."""
    if v is None:
        return None
    m = _mapping(ctx, "consent", v, allowed=("topic", "domain", "restore_timeout_seconds"))
    if m.get("topic") is None:
        raise ctx.error("consent.topic", "is required (the compacted consent topic)")
    topic = _str(ctx, "consent.topic", m["topic"])
    for p in pipelines:
        if topic in (*p.sources, *(d.topic for d in p.destinations), p.dead_letter_topic):
            raise ctx.error("consent.topic", f"{topic!r} is also a pipeline topic; the consent table needs its own")
    return ConsentConfig(
        topic=topic,
        domain=_str(ctx, "consent.domain", m.get("domain", "consent")),
        restore_timeout_seconds=_int(
            ctx, "consent.restore_timeout_seconds", m.get("restore_timeout_seconds", 120), minimum=1
        ),
    )


def _erasure(
    ctx: _Ctx, v: Any, pipelines: Sequence[PipelineConfig], consent: ConsentConfig | None,
    reserved: Mapping[str, str],
) -> ErasureConfig | None:  # fmt: skip
    """``erasure:`` -- topic (required), keks (audience -> its subject-key KEK),
    restore_timeout_seconds."""
    if v is None:
        return None
    m = _mapping(ctx, "erasure", v, allowed=("topic", "keks", "restore_timeout_seconds"))
    if m.get("topic") is None:
        raise ctx.error("erasure.topic", "is required (the compacted subject-key topic)")
    topic = _str(ctx, "erasure.topic", m["topic"])
    taken = {t for p in pipelines for t in (*p.sources, *(d.topic for d in p.destinations), p.dead_letter_topic)}
    if consent is not None:
        taken.add(consent.topic)
    if topic in taken:
        raise ctx.error("erasure.topic", f"{topic!r} is also a pipeline or the consent topic; the keys need their own")
    km = _mapping(ctx, "erasure.keks", m.get("keks"))
    audiences = {d.audience for p in pipelines for d in p.destinations}
    keks: dict[str, str] = {}
    for aud, kek_v in km.items():
        where = f"erasure.keks.{aud}"
        if aud not in audiences:
            raise ctx.error(where, f"{aud!r} is not an audience of pipelines[*].destinations")
        kek = _str(ctx, where, kek_v)
        clash = next((a for a, k in keks.items() if k == kek), None)
        if clash is not None:
            raise ctx.error(where, f"{kek!r} is also the subject-key KEK of {clash!r}; each audience needs its own")
        _reserved_kek(
            ctx, where, kek, pipelines,
            "subject keys need a KEK of their own (the processor unwraps it; it must never unwrap an audience's)",
            also={k: x for k, x in reserved.items() if x},
        )  # fmt: skip
        keks[aud] = kek
    return ErasureConfig(
        topic=topic,
        keks=keks,
        restore_timeout_seconds=_int(
            ctx, "erasure.restore_timeout_seconds", m.get("restore_timeout_seconds", 120), minimum=1
        ),
    )


def _check_erasure(ctx: _Ctx, erasure: ErasureConfig | None, policy: Policy, policy_path: Path) -> None:
    """Erasable rules need the subject-key topic (fail closed: without it they would not
    compile and every record of those audiences would be quarantined)."""
    from streamproc.policy.model import erasable

    need = sorted(a.name for a in policy.audiences.values() if any(erasable(r) for r in a.rules))
    if erasure is None and need:
        raise ctx.error(
            "erasure", f"is required: {policy_path.name} has erasable rules, whose keys live in the subject-key topic"
        )
    missing = [a for a in need if erasure is not None and a not in erasure.keks]
    if missing:
        raise ctx.error("erasure.keks", f"names no subject-key KEK for {', '.join(missing)} (audiences with erasable rules)")


def _check_consent(ctx: _Ctx, consent: ConsentConfig | None, policy: Policy, policy_path: Path) -> None:
    """Purposes with a legal basis need the consent table, and the table needs purposes.

    Fail closed: a policy that declares ``purposes:`` run without a consent table would let
    every record flow, consent-basis audiences included.
    """
    if policy.purposes and consent is None:
        raise ctx.error(
            "consent",
            f"is required: {policy_path.name} declares purposes ({', '.join(policy.purposes)}) "
            "whose legal basis is evaluated against the consent table",
        )
    if consent is not None and not policy.purposes:
        raise ctx.error("consent", f"{policy_path.name} declares no purposes: nothing would be evaluated")


def _lineage(ctx: _Ctx, v: Any) -> LineageConfig | None:
    """``lineage:`` -- enabled (default true once present), namespace, job, transport."""
    if v is None:
        return None
    m = _mapping(ctx, "lineage", v, allowed=("enabled", "namespace", "job", "transport"))
    t = dict(_mapping(ctx, "lineage.transport", m.get("transport")))
    kind = _choice(ctx, "lineage.transport.type", t.get("type"), LINEAGE_TRANSPORTS)
    if kind == "http" and not t.get("url"):
        raise ctx.error("lineage.transport.url", "is required for the http transport")
    if kind == "file" and not t.get("log_file_path"):
        raise ctx.error("lineage.transport.log_file_path", "is required for the file transport")
    if kind == "kafka" and (not t.get("topic") or not isinstance(t.get("config"), dict)):
        raise ctx.error("lineage.transport", "the kafka transport needs 'topic' and 'config' (producer settings)")
    return LineageConfig(
        transport=t,
        enabled=_bool(ctx, "lineage.enabled", m.get("enabled", True)),
        namespace=_str(ctx, "lineage.namespace", m.get("namespace", "streamproc")),
        job=_str(ctx, "lineage.job", m["job"]) if m.get("job") is not None else None,
    )


def _healthy_step_seconds(batch_max_wait_ms: int, producer: Mapping[str, Any]) -> float:
    """The longest one healthy loop step may take: a batch wait plus a bounded commit."""
    raw = producer.get("transaction.timeout.ms", _LIBRDKAFKA_TRANSACTION_TIMEOUT_MS)
    try:
        txn_ms = int(raw)
    except (TypeError, ValueError):
        txn_ms = _LIBRDKAFKA_TRANSACTION_TIMEOUT_MS  # librdkafka refuses it at start-up
    return (batch_max_wait_ms + txn_ms) / 1000.0


def _audit(
    ctx: _Ctx, v: Any, base: Path, pipelines: Sequence[PipelineConfig]
) -> AuditConfig | None:
    if v is None:
        return None
    m = _mapping(
        ctx,
        "audit",
        v,
        allowed=("file", "fsync", "hmac_key_file", "kafka_topic", "dead_letter_burst"),
    )
    if "file" not in m and "kafka_topic" not in m:
        raise ctx.error("audit", "needs 'file' and/or 'kafka_topic' (where the events go)")
    file = Path(_resolve(base, _str(ctx, "audit.file", m["file"]))) if "file" in m else None
    if file is not None and file.is_dir():
        raise ctx.error("audit.file", f"{file} is a directory; name a file")
    fsync = _choice(ctx, "audit.fsync", m.get("fsync", "always"), AUDIT_FSYNC)
    if "fsync" in m and file is None:
        raise ctx.error("audit.fsync", "only applies to 'file'")
    key = None
    if "hmac_key_file" in m:
        key = Path(_resolve(base, _str(ctx, "audit.hmac_key_file", m["hmac_key_file"])))
        if not key.is_file():
            raise ctx.error(
                "audit.hmac_key_file",
                f"{key} does not exist (create one with: streamproc audit keygen --out {key})",
            )
    topic = _str(ctx, "audit.kafka_topic", m["kafka_topic"]) if "kafka_topic" in m else None
    if topic is not None:
        for i, p in enumerate(pipelines):
            roles = [
                (p.sources, "a source"),
                ([d.topic for d in p.destinations], "a destination"),
                ([p.dead_letter_topic], "a dead-letter topic"),
            ]
            for topics, role in roles:
                if topic in topics:
                    raise ctx.error(
                        "audit.kafka_topic", f"{topic!r} is also {role} topic of pipelines[{i}]"
                    )
    burst = _mapping(
        ctx,
        "audit.dead_letter_burst",
        m.get("dead_letter_burst"),
        allowed=("threshold", "window_seconds"),
    )
    return AuditConfig(
        file=file,
        fsync=fsync,
        hmac_key_file=key,
        kafka_topic=topic,
        burst_threshold=_int(
            ctx, "audit.dead_letter_burst.threshold", burst.get("threshold", 100), minimum=1
        ),
        burst_window_seconds=_int(
            ctx,
            "audit.dead_letter_burst.window_seconds",
            burst.get("window_seconds", 60),
            minimum=1,
            maximum=86_400,
        ),
    )


_PRINCIPAL = re.compile(r"[A-Za-z][A-Za-z0-9]*:\S+")


def _principal(ctx: _Ctx, where: str, v: Any) -> str:
    s = _str(ctx, where, v)
    if not _PRINCIPAL.fullmatch(s):
        raise ctx.error(where, f"must be a Kafka principal such as 'User:streamproc', got {s!r}")
    if s.split(":", 1)[1] == "*":
        raise ctx.error(where, f"{s!r} is every user; name one principal")
    return s


def _acls(
    ctx: _Ctx,
    v: Any,
    pipelines: Sequence[PipelineConfig],
    group_id: str,
    *,
    consent_topic: str | None = None,
) -> AclsConfig | None:
    """``acls:``: principals only, checked so the derived ACLs keep roles apart.

    A principal with two roles would get the union of their rights -- a producer that can
    read sanitized data, one subscriber that links two audiences, a processor that is
    also an audience -- so every principal has exactly one role.  A group prefix that
    covers the processor's group (or another audience's prefix) would let a subscriber
    commit offsets for it, so prefixes must be disjoint from both.
    """
    if v is None:
        return None
    m = _mapping(ctx, "acls", v, allowed=("processor", "audiences", "producers"))
    if "processor" not in m:
        raise ctx.error("acls.processor", "is required (the principal the worker authenticates as)")
    processor = _principal(ctx, "acls.processor", m["processor"])
    roles: dict[str, str] = {processor: "acls.processor"}

    def claim(where: str, principal: str) -> None:
        if principal in roles:
            raise ctx.error(
                where,
                f"{principal!r} already has a role ({roles[principal]}); one role per principal",
            )
        roles[principal] = where

    served = {d.audience for p in pipelines for d in p.destinations}
    audiences: dict[str, AudienceAcl] = {}
    for name, a in _mapping(ctx, "acls.audiences", m.get("audiences")).items():
        where = f"acls.audiences.{name}"
        if name not in served:
            raise ctx.error(
                where,
                f"{name!r} is not the audience of any destination (have: {', '.join(sorted(served))})",
            )
        am = _mapping(ctx, where, a, allowed=("principal", "group_prefix"))
        for key in ("principal", "group_prefix"):
            if key not in am:
                raise ctx.error(f"{where}.{key}", "is required")
        principal = _principal(ctx, f"{where}.principal", am["principal"])
        claim(f"{where}.principal", principal)
        prefix = _str(ctx, f"{where}.group_prefix", am["group_prefix"])
        if group_id.startswith(prefix) or prefix.startswith(f"{group_id}-"):
            raise ctx.error(
                f"{where}.group_prefix",
                f"{prefix!r} overlaps the processor's group {group_id!r} or its transactional "
                "ids; a subscriber could commit the processor's offsets",
            )
        for other, o in audiences.items():
            if prefix.startswith(o.group_prefix) or o.group_prefix.startswith(prefix):
                raise ctx.error(
                    f"{where}.group_prefix",
                    f"{prefix!r} overlaps the group prefix of audience {other!r}",
                )
        audiences[name] = AudienceAcl(principal, prefix)

    sources = {s for p in pipelines for s in p.sources}
    producers_raw = m.get("producers")
    if producers_raw is None:
        producers_raw = []
    if not isinstance(producers_raw, list):
        raise ctx.error(
            "acls.producers",
            f"must be a list of {{principal, topics}}, got {_tname(producers_raw)}",
        )
    producers = []
    for i, pr in enumerate(producers_raw):
        where = f"acls.producers[{i}]"
        pm = _mapping(ctx, where, pr, allowed=("principal", "topics"))
        for key in ("principal", "topics"):
            if key not in pm:
                raise ctx.error(f"{where}.{key}", "is required")
        principal = _principal(ctx, f"{where}.principal", pm["principal"])
        claim(f"{where}.principal", principal)
        topics = pm["topics"]
        if isinstance(topics, str):
            topics = [topics]
        if not isinstance(topics, list) or not topics:
            raise ctx.error(f"{where}.topics", "must be a non-empty list of source topics")
        names = tuple(_str(ctx, f"{where}.topics[{j}]", t) for j, t in enumerate(topics))
        for j, t in enumerate(names):
            if t not in sources and t != consent_topic:  # consent-collecting apps write the consent topic
                raise ctx.error(
                    f"{where}.topics[{j}]",
                    f"{t!r} is not a source topic (producers write only sources: "
                    f"{', '.join(sorted(sources))})",
                )
        producers.append(ProducerAcl(principal, tuple(dict.fromkeys(names))))
    return AclsConfig(processor, audiences, tuple(producers))


def _pseudonym_secrets(
    ctx: _Ctx, v: Any, base: Path, pipelines: Sequence[PipelineConfig], quarantine_kek: str
) -> PseudonymSecretsConfig:
    if v is None:
        return PseudonymSecretsConfig()
    m = _mapping(ctx, "pseudonym_secrets", v, allowed=("provider", "path", "kek"))
    provider = _choice(
        ctx, "pseudonym_secrets.provider", m.get("provider", "kms"), SECRET_PROVIDERS
    )
    if provider == "kms":
        for k in ("path", "kek"):
            if k in m:
                raise ctx.error(f"pseudonym_secrets.{k}", "only applies to provider 'wrapped_file'")
        return PseudonymSecretsConfig()
    for k in ("path", "kek"):
        if k not in m:
            what = (
                "the wrapped secret file (create it with: streamproc secrets create)"
                if k == "path"
                else "the KEK that wraps the secret, pinned so that no other KEK's blob is accepted"
            )
            raise ctx.error(f"pseudonym_secrets.{k}", f"is required for 'wrapped_file': {what}")
    path = Path(_resolve(base, _str(ctx, "pseudonym_secrets.path", m["path"])))
    kek = _str(ctx, "pseudonym_secrets.kek", m["kek"])
    _reserved_kek(
        ctx, "pseudonym_secrets.kek", kek, pipelines,
        "use a dedicated KEK for the pseudonym master", also={"dead_letter.kek": quarantine_kek},
    )  # fmt: skip
    return PseudonymSecretsConfig("wrapped_file", path, kek)


def _reserved_kek(
    ctx: _Ctx, section: str, kek: str, pipelines: Sequence[PipelineConfig], why: str, *,
    also: Mapping[str, str] | None = None,
) -> None:  # fmt: skip
    """Refuse a KEK reserved for one role (``section``) that something else also uses.

    The quarantine KEK and the KEK wrapping the pseudonym master must be theirs alone:
    an audience holding a destination KEK, a producer sealing under a source KEK, or
    (``also``: other reserved settings -> their KEK) incident response holding the
    quarantine KEK could otherwise unwrap dead letters or the pseudonym master.  ``why``
    ends the message; the section named first says which setting to change.
    """
    for other, other_kek in (also or {}).items():
        if other_kek == kek:
            raise ctx.error(section, f"{kek!r} is also {other}; {why}")
    for i, p in enumerate(pipelines):
        for j, d in enumerate(p.destinations):
            if d.kek == kek:
                raise ctx.error(
                    section,
                    f"{kek!r} is also the KEK of pipelines[{i}].destinations[{j}] (an audience "
                    f"KEK); {why}",
                )
        if kek in (p.source_keks or ()):
            raise ctx.error(section, f"{kek!r} is also in pipelines[{i}].source_keks; {why}")


def _parse_policy(ctx: _Ctx, policy_path: Path) -> Policy:
    """The policy file, parsed the one time a config load needs it."""
    from streamproc.policy.model import load_policy

    try:
        return load_policy(policy_path)
    except PolicyError as exc:
        raise ctx.error("policy", str(exc)) from None


def _check_secret_source(
    ctx: _Ctx,
    kms_provider: str,
    secrets: PseudonymSecretsConfig,
    policy: Policy,
    policy_path: Path,
) -> None:
    """AWS KMS holds no secrets: a policy that needs a pseudonym master needs a file."""
    if secrets.provider != "kms" or kms_provider != "aws":
        return
    if policy.pseudonym_key:
        raise ctx.error(
            "pseudonym_secrets",
            f"kms provider 'aws' cannot hold the pseudonym master {policy.pseudonym_key!r} "
            f"(keys.pseudonym of {policy_path.name}); use "
            "{provider: wrapped_file, path: ..., kek: ...} (docs/keys.md)",
        )


def _check_kms(ctx: _Ctx, kms: Mapping[str, Any]) -> dict[str, Any]:
    """The KMS factory's public validation, with the file name added; normalized settings.

    The provider itself is built later (``build_kms``): building a Vault or AWS client
    here would make loading a config file a network operation.
    """
    from streamproc.crypto.kms.factory import validate_kms_settings

    try:
        return validate_kms_settings(kms)
    except ConfigError as exc:
        raise ConfigError(f"{ctx.path}: {exc}") from None


def _pipelines(ctx: _Ctx, v: Any) -> tuple[PipelineConfig, ...]:
    if v is None:
        raise ctx.error(
            "pipelines", "is required (a list of {sources, dead_letter_topic, destinations})"
        )
    if not isinstance(v, list) or not v:
        raise ctx.error("pipelines", f"must be a non-empty list, got {_tname(v)}")
    out = []
    seen_sources: dict[str, str] = {}
    dest_settings: dict[str, tuple[str, str, str]] = {}
    for i, p in enumerate(v):
        where = f"pipelines[{i}]"
        m = _mapping(
            ctx, where, p, allowed=("sources", "dead_letter_topic", "destinations", "source_keks")
        )
        srcs = m.get("sources")
        if isinstance(srcs, str):
            srcs = [srcs]
        if not isinstance(srcs, list) or not srcs:
            raise ctx.error(f"{where}.sources", "must be a non-empty list of topic names")
        sources = tuple(_str(ctx, f"{where}.sources[{j}]", s) for j, s in enumerate(srcs))
        for j, s in enumerate(sources):
            if s in seen_sources:
                raise ctx.error(
                    f"{where}.sources[{j}]", f"topic {s!r} is already a source of {seen_sources[s]}"
                )
            seen_sources[s] = where
        if "dead_letter_topic" not in m:
            raise ctx.error(
                f"{where}.dead_letter_topic", "is required (bad records go there, never dropped)"
            )
        dlq = _str(ctx, f"{where}.dead_letter_topic", m["dead_letter_topic"])
        dests_raw = m.get("destinations")
        if not isinstance(dests_raw, list) or not dests_raw:
            raise ctx.error(
                f"{where}.destinations", "must be a non-empty list of {topic, audience, kek}"
            )
        dests = []
        for j, d in enumerate(dests_raw):
            dw = f"{where}.destinations[{j}]"
            dm = _mapping(ctx, dw, d, allowed=("topic", "audience", "kek"))
            for key in ("topic", "audience", "kek"):
                if key not in dm:
                    raise ctx.error(f"{dw}.{key}", "is required")
            dc = DestinationConfig(
                _str(ctx, f"{dw}.topic", dm["topic"]),
                _str(ctx, f"{dw}.audience", dm["audience"]),
                _str(ctx, f"{dw}.kek", dm["kek"]),
            )
            prev = dest_settings.get(dc.topic)
            if prev is not None and prev[:2] != (dc.audience, dc.kek):
                raise ctx.error(
                    f"{dw}.topic",
                    f"{dc.topic!r} is configured again with a different audience or kek (first at {prev[2]})",
                )
            dest_settings.setdefault(dc.topic, (dc.audience, dc.kek, dw))
            dests.append(dc)
        out.append(PipelineConfig(sources, dlq, tuple(dests), _source_keks(ctx, where, m)))
    # Topic roles must not overlap: a loop would re-process its own output.
    sources_set = set(seen_sources)
    for i, pc in enumerate(out):
        where = f"pipelines[{i}]"
        for j, d in enumerate(pc.destinations):
            if d.topic in sources_set:
                raise ctx.error(
                    f"{where}.destinations[{j}].topic", f"{d.topic!r} is also a source topic"
                )
            if d.topic == pc.dead_letter_topic or d.topic in {q.dead_letter_topic for q in out}:
                raise ctx.error(
                    f"{where}.destinations[{j}].topic", f"{d.topic!r} is also a dead-letter topic"
                )
        if pc.dead_letter_topic in sources_set:
            raise ctx.error(
                f"{where}.dead_letter_topic", f"{pc.dead_letter_topic!r} is also a source topic"
            )
    dest_keks = {d.kek for pc in out for d in pc.destinations}
    for i, pc in enumerate(out):
        for j, k in enumerate(pc.source_keks or ()):
            if k in dest_keks:
                raise ctx.error(
                    f"pipelines[{i}].source_keks[{j}]",
                    f"{k!r} is a destination KEK; a source sealed under an audience's KEK "
                    "must never be accepted as input",
                )
    return tuple(out)


def _source_keks(ctx: _Ctx, where: str, m: Mapping[str, Any]) -> tuple[str, ...] | None:
    """``source_keks``: the KEKs that may seal this pipeline's sources (docs/keys.md)."""
    if "source_keks" not in m or m["source_keks"] is None:
        return None
    v = m["source_keks"]
    if not isinstance(v, list) or not v:
        raise ctx.error(f"{where}.source_keks", "must be a non-empty list of KEK ids")
    return tuple(_str(ctx, f"{where}.source_keks[{j}]", k) for j, k in enumerate(v))


def _check_audiences(
    ctx: _Ctx, pipelines: Sequence[PipelineConfig], policy: Policy, policy_path: Path
) -> None:
    for i, p in enumerate(pipelines):
        for j, d in enumerate(p.destinations):
            if d.audience not in policy.audiences:
                raise ctx.error(
                    f"pipelines[{i}].destinations[{j}].audience",
                    f"{d.audience!r} is not an audience of {policy_path.name} (have: {', '.join(policy.audiences)})",
                )


__all__ = [
    "AclsConfig",
    "AudienceAcl",
    "AuditConfig",
    "Config",
    "DestinationConfig",
    "LineageConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PipelineConfig",
    "ProducerAcl",
    "PseudonymSecretsConfig",
    "SubscriberConfig",
    "TopicSettings",
    "TopicsConfig",
    "disables_verification",
    "load_config",
    "load_kafka_properties",
    "load_subscriber_config",
    "parse_config",
]
