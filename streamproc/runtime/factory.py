"""Build the runtime's collaborators (KMS, schema source, policy, pipeline, audit trail)
from a Config.

Kept apart from the worker so the worker receives collaborators rather than reaching for
them: tests hand it a pipeline over a test-double KMS, production hands it this.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from streamproc import __version__
from streamproc.audit import (
    ATTRIBUTE_RULES,
    AuditError,
    AuditLog,
    ConsentWithheld,
    DeadLetterBurstDetector,
    open_log,
)
from streamproc.config import Config
from streamproc.crypto.envelope import Opener
from streamproc.crypto.kms import KmsProvider
from streamproc.crypto.kms.instrumented import instrumented
from streamproc.crypto.pseudonym import PseudonymKeys, SecretSource
from streamproc.errors import ConfigError, Reason
from streamproc.observability import Observer
from streamproc.pipeline.core import Destination, Pipeline, Quarantined, Route
from streamproc.policy.model import Policy
from streamproc.runtime.checkpoint import FatalWorkerError
from streamproc.schema.registry import SchemaSource, build_schema_source

_log = logging.getLogger("streamproc.audit")


class AuditFailed(FatalWorkerError):
    """An audit event could not be written (``audit:`` configured): stop, exit 1."""


def routes_from_config(config: Config) -> list[Route]:
    """The pipeline's routes, straight from the validated ``pipelines:`` (nothing to re-check)."""
    return [
        Route(
            p.sources,
            tuple(Destination(d.topic, d.audience, d.kek) for d in p.destinations),
            p.source_keks,
        )
        for p in config.pipelines
    ]


def build_kms(config: Config) -> KmsProvider:
    """The provider named by ``kms:`` (the factory validates provider settings)."""
    from streamproc.crypto.kms.factory import build_kms as _build

    return _build(dict(config.kms), base_dir=config.base_dir)


def build_schemas(config: Config) -> SchemaSource:
    return build_schema_source(dict(config.schemas))


def build_secret_source(config: Config, kms: KmsProvider) -> SecretSource:
    """Where the pseudonym master comes from (``pseudonym_secrets:``).

    ``wrapped_file``: a :class:`~streamproc.crypto.wrapped_secrets.WrappedSecretFile`
    unwrapped with ``kms`` under the pinned KEK.  ``kms`` (default): the provider itself,
    which must have a secret store (local keyring, Vault/OpenBao KV v2; not AWS KMS).
    """
    ps = config.pseudonym_secrets
    if ps.provider == "wrapped_file":
        from streamproc.crypto.wrapped_secrets import WrappedSecretFile

        assert ps.path is not None and ps.kek is not None
        if not ps.path.is_file():
            raise ConfigError(
                f"pseudonym_secrets.path: {ps.path} does not exist "
                f"(create it with: streamproc secrets create --file {ps.path} --kek {ps.kek})"
            )
        return WrappedSecretFile(ps.path, kms, kek=ps.kek)
    if not callable(getattr(kms, "get_secret", None)):
        raise ConfigError(
            f"pseudonym_secrets: kms provider {getattr(kms, 'name', 'unknown')!r} holds no "
            "pseudonym secrets; use {provider: wrapped_file, path: ..., kek: ...} (docs/keys.md)"
        )
    return cast(SecretSource, kms)


def build_pipeline(
    config: Config,
    *,
    kms: KmsProvider | None = None,
    schemas: SchemaSource | None = None,
    observer: Observer | None = None,
    policy: Policy | None = None,
) -> Pipeline:
    """A :class:`Pipeline` for the config's routes, instrumented for ``observer``.

    ``policy`` defaults to the one the config parsed when it was loaded
    (:meth:`~streamproc.config.Config.load_policy`): the file is not parsed again.  May
    raise :class:`~streamproc.errors.TransientError` (the pseudonym secret is fetched from
    the KMS here); callers retry.
    """
    observer = observer or Observer()
    kms = kms or build_kms(config)
    schemas = schemas or build_schemas(config)
    policy = policy if policy is not None else config.load_policy()
    keys = (
        PseudonymKeys(build_secret_source(config, kms), policy.pseudonym_key)
        if policy.pseudonym_key
        else None
    )
    from streamproc.crypto.kms.factory import revocation_check_interval

    sweep = revocation_check_interval(config.kms)
    # Every data-path KMS call (the opener's unwraps, the sealers' data keys) goes through
    # one instrumented provider: the only place KMS calls are measured.
    measured = instrumented(kms, observer)
    opener = Opener.for_kms(measured, revocation_check_interval=sweep)
    return Pipeline(
        routes=routes_from_config(config),
        policy=policy,
        opener=opener,
        kms=measured,
        schemas=schemas,
        keys=keys,
        # The worker lowers this to the limit it derives from the producer and topics.
        max_record_bytes=config.max_record_bytes or 1 << 20,
        reserved_keks=[
            k for k in (config.pseudonym_secrets.kek, config.dead_letter_kek, *config.subject_key_keks().values()) if k
        ],
        revocation_check_interval=sweep,
        budget_topic=config.budget_changelog_topic,
        hold_topic=config.risk_hold_topic,
    )


# -- the processor's audit trail -------------------------------------------------------------
_STREAM_BAD = re.compile(r"[^A-Za-z0-9_.:/@+=\-]")


def _audit_safe(key: str, value: Any) -> Any:
    """``value`` if the audit guard accepts it for ``key``, else a digest (ids) or nothing.

    Identifiers here come from configuration and KMS key ids; one that does not look like
    an identifier (a topic with a long digit run, say) is replaced by a stable digest
    instead of failing the event -- and with it, the processor.
    """
    if value is None or ATTRIBUTE_RULES[key](value):
        return value
    if isinstance(value, str) and key in ("key_id", "topic", "policy_name", "instance", "source"):
        digest = base64.b32encode(hashlib.sha256(value.encode()).digest())[:20].decode().lower()
        return f"h-{digest}"
    return None


class WorkerAudit:
    """What the worker reports to the audit trail, as events; every failure is fatal.

    * :meth:`started`: ``policy_loaded`` and ``processor_started``;
    * :meth:`after_batch`: ``key_revocation_seen`` for each revoked key version met
      (deduplicated per version by :class:`~streamproc.audit.AuditLog`) and
      ``dead_letter_burst`` through a :class:`~streamproc.audit.DeadLetterBurstDetector`;
    * :meth:`withheld`: ``consent_withheld`` counts per (audience, reason) of a batch;
    * :meth:`anomaly`: an ``anomaly`` event per finding of the in-process detector;
    * :meth:`stopped`: ``processor_stopped``, then the sinks are closed (flushed, fsynced).

    A write failure raises :class:`AuditFailed`: a processor whose audit trail is broken
    stops rather than carrying on unaudited.
    """

    def __init__(
        self,
        log: AuditLog,
        *,
        kms: str,
        instance: str,
        burst_threshold: int = 100,
        burst_window_seconds: int = 60,
    ) -> None:
        self.log = log
        self.kms = _audit_safe("kms", kms) or "unknown"
        self.instance = _audit_safe("instance", instance)
        self.burst = DeadLetterBurstDetector(
            log, threshold=burst_threshold, window_seconds=burst_window_seconds
        )
        self._closed = False

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except AuditError as exc:
            raise AuditFailed(f"audit log: cannot write {what} ({exc})") from None

    def started(self, policy: Policy, policy_file: str | Path | None = None) -> None:
        name = _audit_safe("policy_name", policy.name)
        source = _audit_safe("source", Path(policy_file).name) if policy_file else None
        audiences = [a for a in policy.audiences if ATTRIBUTE_RULES["audience"](a)]
        self._call(
            "policy_loaded",
            lambda: self.log.policy_loaded(
                policy.version, policy_name=name, source=source, audiences=audiences
            ),
        )
        self._call(
            "processor_started",
            lambda: self.log.processor_started(
                processor_version=__version__,
                policy_version=policy.version,
                instance=self.instance,
                policy_name=name,
            ),
        )

    def after_batch(self, quarantined: Iterable[Quarantined]) -> None:
        """Report a processed batch's dead letters (called before it is committed)."""
        seen: set[tuple[str, int]] = set()
        dead_letters: dict[tuple[str, str], int] = {}
        for q in quarantined:
            k = (q.reason.value, q.record.topic)
            dead_letters[k] = dead_letters.get(k, 0) + 1
            kek_id, kek_version = q.kek_id, q.kek_version
            if q.reason is not Reason.KEY_REVOKED or kek_id is None or kek_version is None:
                continue
            if (kek_id, kek_version) in seen:
                continue
            seen.add((kek_id, kek_version))
            key_id = _audit_safe("key_id", kek_id)
            topic = _audit_safe("topic", q.record.topic)
            self._call(
                "key_revocation_seen",
                functools.partial(
                    self.log.key_revocation_seen,
                    self.kms,
                    key_id,
                    kek_version,
                    topic=topic,
                    partition=q.record.partition,
                ),
            )
        for (reason, topic), n in dead_letters.items():
            safe_topic = _audit_safe("topic", topic)
            if safe_topic is None:
                continue
            self._call(
                "dead_letter_burst", functools.partial(self.burst.observe, reason, safe_topic, n)
            )

    def withheld(self, counts: Mapping[tuple[str, str], int], policy: Policy) -> None:
        """One ``consent_withheld`` event per (audience, reason) of a batch: counts only
        (called before the batch is committed, like :meth:`after_batch`)."""
        for (audience, reason), n in sorted(counts.items()):
            purpose = policy.audiences[audience].purpose if audience in policy.audiences else None
            event = ConsentWithheld(
                audience=_audit_safe("audience", audience),
                purpose=_audit_safe("purpose", purpose),
                reason=_audit_safe("reason", reason),
                count=n,
                policy_version=policy.version,
            )
            self._call("consent_withheld", functools.partial(self.log.emit, event))

    def anomaly(self, a: Any) -> None:
        """An :class:`~streamproc.observability.anomaly.Anomaly` of the in-process detector."""
        labels: Mapping[str, str] = getattr(a, "labels", {}) or {}
        kind = getattr(getattr(a, "kind", None), "value", None) or str(getattr(a, "kind", ""))
        attrs = {
            "reason": _audit_safe("reason", labels.get("reason")),
            "topic": _audit_safe("topic", labels.get("topic") or labels.get("destination")),
            "key_id": _audit_safe("key_id", labels.get("kek_id")),
            "audience": _audit_safe("audience", labels.get("audience")),
            "count": _audit_safe("count", int(getattr(a, "observed", 0) or 0)),
            "kms": self.kms
            if labels.get("kek_id") or kind in ("revoked_key", "unknown_key")
            else None,
        }
        self._call(
            "anomaly", lambda: self.log.anomaly(_audit_safe("kind", kind) or "other", **attrs)
        )

    def tick(self) -> None:
        """Export the signed head if it changed and is due (called from the worker loop).

        The head goes to ``<file>.head`` and the audit topic, outside the event log, so a
        truncated or emptied file is detected (``streamproc audit verify --expect-head``)
        and refused by the next writer.
        """
        self._call("the chain head", self.log.maybe_export_head)

    def stopped(self, records: int) -> None:
        """``processor_stopped`` and close; raises :class:`AuditFailed` if either fails.

        Closing exports the final signed head; it is also logged, so a copy leaves the
        host with the logs.
        """
        self._call(
            "processor_stopped",
            lambda: self.log.processor_stopped(
                reason="shutdown",
                processor_version=__version__,
                instance=self.instance,
                count=max(0, int(records)),
            ),
        )
        self._closed = True
        self._call("the final flush", self.log.close)
        head = self.log.signed_head
        if head is not None:
            _log.info("audit head %s", head)

    def abandon(self) -> None:
        """Close without an event (fatal paths); errors are swallowed, the exit is non-zero."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # already failing; the log line says why
            self.log.close()


def audit_stream_id(config: Config, instance: str, index: int, *, run: str = "") -> str:
    """``processor:<group_id>-<instance>-<index>[:<run>]``, like the transactional.id."""
    s = f"processor:{config.group_id}-{instance}-{index}" + (f":{run}" if run else "")
    return _STREAM_BAD.sub("_", s)[:200]


def audit_file_for(path: Path, index: int) -> Path:
    """Worker 0 writes ``path``; worker N of ``--workers`` writes ``<stem>-N<suffix>``.

    One file per writer: a file sink holds an exclusive lock, and each worker is its own
    chain (its own stream id).
    """
    return path if index == 0 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def build_audit(
    config: Config,
    *,
    index: int,
    instance: str,
    kms_name: str,
    producer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> WorkerAudit | None:
    """The worker's audit trail from ``audit:``, or ``None`` when it is not configured.

    Raises :class:`~streamproc.errors.ConfigError` for a bad HMAC key file,
    :class:`~streamproc.audit.AuditError` when a sink cannot be opened (file locked by
    another writer, an existing file that does not verify) and ``OSError`` when the file
    cannot be created.  With only ``kafka_topic`` (a sink that cannot read back), every run
    starts a new chain whose stream id ends with the start time; with ``file`` the chain
    continues across restarts, in the file and on the topic.
    """
    ac = config.audit
    if ac is None:
        return None
    log = open_log(
        config,
        stream=audit_stream_id(config, instance, index),
        actor=audit_stream_id(config, instance, index),
        file=audit_file_for(ac.file, index) if ac.file is not None else None,
        producer_factory=producer_factory,
        client_id=f"streamproc-{config.group_id}-{index}-audit",
    )
    return WorkerAudit(
        log,
        kms=kms_name,
        instance=instance,
        burst_threshold=ac.burst_threshold,
        burst_window_seconds=ac.burst_window_seconds,
    )
