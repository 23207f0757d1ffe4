"""The writer: :class:`AuditLog` builds chained events and writes each to every sink.

Why one writer object
---------------------
The chain is only as good as its sequence: two callers racing on ``seq``/``prev`` would
fork it.  :class:`AuditLog` therefore owns the chain state, checks each event against its
type's allow-list (:mod:`streamproc.audit.events`), builds its canonical line once
(:mod:`streamproc.audit.chain`) and hands the identical bytes to every sink under one
lock.  It knows sinks only through the :class:`AuditSink` protocol.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from streamproc.audit.chain import (
    FORMAT_VERSION,
    GENESIS,
    Anchor,
    Head,
    canonical_json,
    event_hash,
    event_mac,
    format_ts,
)
from streamproc.audit.errors import AuditChainError, AuditSinkError
from streamproc.audit.events import (
    _ACTOR_RE,
    INTEGRITY_HASH,
    INTEGRITY_HMAC,
    Anomaly,
    AudienceKeyExported,
    ChainStarted,
    DeadLetterBurst,
    Event,
    EventType,
    KeyRevocationSeen,
    KeyRevoked,
    KeyRotated,
    PolicyLoaded,
    ProcessorStarted,
    ProcessorStopped,
    Reidentification,
    SourceTopicRead,
    check_actor,
    check_attrs,
)
from streamproc.errors import ConfigError


class AuditSink(Protocol):
    """Where events go.  ``write`` receives the exact canonical line, newline included."""

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        """The last verified event, if the sink can read back; raise if it does not verify."""
        ...

    def write(self, line: bytes) -> None: ...

    def export_head(self, head: Head) -> None:
        """Keep a copy of the chain's signed head outside the event log (see :class:`Head`)."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class AuditLog:
    """Builds chained events and writes each to every sink; thread-safe.

    ``stream`` names the chain (one per writer: ``processor:<instance>``,
    ``reidentify``).  The chain resumes from the sinks that can read back (they must
    agree), else from ``anchor``, else from the genesis.  Every write happens under one
    lock, so concurrent callers get consecutive sequence numbers.

    The log owns its sinks (:meth:`close` closes them, and so does a failed start).
    A sink failure raises :class:`AuditSinkError`: callers that must not proceed without
    an audit trail (re-identification) therefore fail closed.  The chain advances if at
    least one sink accepted the event, so the sinks that missed it show a gap instead of
    a silently different history.

    A new chain starts with a ``chain_started`` event declaring its ``integrity``
    (``hmac-sha256`` with a key): a verifier then refuses events without a MAC.  The
    signed :attr:`signed_head` is exported to every sink's ``export_head`` (the ``.head``
    file, the audit topic) at most every ``head_interval`` seconds when it changed
    (:meth:`maybe_export_head`, also called by the processor's loop) and on :meth:`close`.

    ``context`` attributes (``actor_source``, ``note``) are added to every event: a tool
    resolves who its caller is once and every event says so.
    """

    def __init__(
        self,
        sinks: Sequence[AuditSink],
        *,
        stream: str,
        actor: str = "processor",
        clock: Callable[[], float] = time.time,
        hmac_key: bytes | None = None,
        anchor: Anchor | None = None,
        head_interval: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        if not sinks:
            raise ConfigError("an audit log needs at least one sink")
        if not isinstance(stream, str) or not _ACTOR_RE.fullmatch(stream):
            raise ConfigError(
                "audit stream id must be an identifier (letters, digits and _.:/@+=-)"
            )
        if hmac_key is not None and len(hmac_key) < 32:
            raise ConfigError("audit HMAC key must be at least 32 bytes")
        self.stream = stream
        self.actor = check_actor(actor)
        self.sinks = list(sinks)
        self._clock = clock
        self._hmac_key = hmac_key
        self._lock = threading.RLock()
        self._seen_revocations: set[tuple[str, str, int]] = set()
        self.head_interval = head_interval
        self._monotonic = monotonic
        self._last_export = monotonic()
        self._head_dirty = False
        self.context = dict(context or {})
        try:
            heads = {s.head(stream, hmac_key) for s in self.sinks} - {None}
            if len(heads) > 1:
                raise AuditChainError(
                    f"audit sinks disagree on the chain head: {sorted(map(str, heads))}"
                )
            start = next(iter(heads)) if heads else anchor
            self._seq = 0 if start is None else start.seq + 1
            self._prev = GENESIS if start is None else start.hash
            if start is None:  # a new chain: its genesis says what integrity to expect
                from streamproc import __version__

                self.emit(
                    ChainStarted(
                        integrity=INTEGRITY_HMAC if hmac_key is not None else INTEGRITY_HASH,
                        processor_version=__version__,
                    )
                )
                self.export_head()
        except BaseException:
            for s in self.sinks:  # the log owns its sinks: release file locks on failure
                with contextlib.suppress(Exception):
                    s.close()
            raise

    @property
    def head(self) -> Anchor | None:
        """The last event written (anchor this externally to detect truncation)."""
        with self._lock:
            return (
                None
                if self._seq == 0 and self._prev == GENESIS
                else Anchor(self.stream, self._seq - 1, self._prev)
            )

    @property
    def signed_head(self) -> Head | None:
        """The last event as a :class:`Head`, signed when the log has an audit key."""
        a = self.head
        return None if a is None else Head.make(a.stream, a.seq, a.hash, self._hmac_key)

    def export_head(self) -> Head | None:
        """Give the current signed head to every sink that keeps one; return it.

        Raises :class:`AuditSinkError` when a sink cannot take it (the caller decides
        whether that is fatal: the processor treats it like a failed event).
        """
        with self._lock:
            h = self.signed_head
            if h is None:
                return None
            failed: list[str] = []
            for s in self.sinks:
                try:
                    s.export_head(h)
                except AuditSinkError as exc:
                    failed.append(str(exc))
                except Exception as exc:
                    failed.append(f"{type(s).__name__}: {type(exc).__name__}")
            self._last_export = self._monotonic()
            self._head_dirty = bool(failed)
            if failed:
                raise AuditSinkError("; ".join(failed))
            return h

    def maybe_export_head(self) -> Head | None:
        """Export the head if it changed and ``head_interval`` seconds have passed."""
        with self._lock:
            if not self._head_dirty or self._monotonic() - self._last_export < self.head_interval:
                return None
            return self.export_head()

    def emit(
        self,
        event: Event | EventType | str,
        attrs: Mapping[str, Any] | None = None,
        *,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """Check, chain, and write one event to every sink; return it.

        The public entry point for every event type: ``log.emit(KeyRotated(...))`` with an
        event dataclass (:mod:`streamproc.audit.events`), or ``log.emit(EventType.X,
        {...})`` with the attributes as a mapping (checked against the same allow-list,
        :data:`~streamproc.audit.events.ALLOWED_ATTRIBUTES`).  The log's ``context`` is
        merged in; ``actor`` overrides the log's actor for this event.
        """
        if isinstance(event, Event):
            if attrs is not None:
                raise TypeError("emit(event) takes its attributes from the event itself")
            et, given = event.TYPE, event.attrs()
        else:
            et, given = EventType(event), dict(attrs or {})
        clean = check_attrs(et, {**self.context, **given})
        who = check_actor(actor) if actor is not None else self.actor
        with self._lock:
            ev: dict[str, Any] = {
                "v": FORMAT_VERSION,
                "stream": self.stream,
                "seq": self._seq,
                "ts": format_ts(self._clock()),
                "type": et.value,
                "actor": who,
                "attrs": clean,
                "prev": self._prev,
            }
            if self._hmac_key is not None:
                ev["mac"] = event_mac(self._hmac_key, ev)
            ev["hash"] = event_hash(ev)
            line = canonical_json(ev) + b"\n"
            failed: list[str] = []
            for s in self.sinks:
                try:
                    s.write(line)
                except AuditSinkError as exc:
                    failed.append(str(exc))
                except Exception as exc:  # a sink bug or OS error must not fork the chain
                    failed.append(f"{type(s).__name__}: {type(exc).__name__}: {exc}")
            if len(failed) < len(self.sinks):
                self._seq += 1
                self._prev = ev["hash"]
                self._head_dirty = True
            if failed:
                err = AuditSinkError("; ".join(failed))
                err.accepted = len(self.sinks) - len(failed)
                raise err
            if et is not EventType.CHAIN_STARTED:
                self.maybe_export_head()
        return ev

    # -- shorthands for the moments the worker and tools report --------------------------------
    # Each builds the event's dataclass (the one declaration of its attributes) and emits it.
    def policy_loaded(
        self,
        policy_version: str,
        *,
        policy_name: str | None = None,
        source: str | None = None,
        audiences: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            PolicyLoaded(
                policy_version=policy_version,
                policy_name=policy_name,
                source=source,
                audiences=audiences,
            ),
            actor=actor,
        )

    def key_rotated(
        self,
        kms: str,
        key_id: str,
        version: int,
        *,
        previous_version: int | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            KeyRotated(kms=kms, key_id=key_id, version=version, previous_version=previous_version),
            actor=actor,
        )

    def key_revoked(
        self, kms: str, key_id: str, version: int, *, actor: str | None = None
    ) -> dict[str, Any]:
        return self.emit(KeyRevoked(kms=kms, key_id=key_id, version=version), actor=actor)

    def key_revocation_seen(
        self,
        kms: str,
        key_id: str,
        version: int,
        *,
        topic: str | None = None,
        partition: int | None = None,
        actor: str | None = None,
    ) -> dict[str, Any] | None:
        """The processor met a revoked key version.  Reported once per (kms, key, version)."""
        event = KeyRevocationSeen(
            kms=kms, key_id=key_id, version=version, topic=topic, partition=partition
        )
        k = (kms, key_id, version)
        with self._lock:
            if k in self._seen_revocations:
                return None
            self._seen_revocations.add(k)
        try:
            return self.emit(event, actor=actor)
        except AuditSinkError as exc:
            if not exc.accepted:
                with self._lock:  # recorded nowhere: report it again next time
                    self._seen_revocations.discard(k)
            raise
        except BaseException:
            with self._lock:
                self._seen_revocations.discard(k)
            raise

    def audience_key_exported(
        self, kms: str, key_id: str, audience: str, key_version: int, *, actor: str | None = None
    ) -> dict[str, Any]:
        return self.emit(
            AudienceKeyExported(kms=kms, key_id=key_id, audience=audience, key_version=key_version),
            actor=actor,
        )

    def reidentification(
        self,
        *,
        actor: str,
        audience: str | None,
        outcome: str,
        domain: str | None = None,
        field: str | None = None,
        subject: str | None = None,
        reason: str | None = None,
        policy_version: str | None = None,
        key_version: int | None = None,
        error: str | None = None,
        value_digest: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            Reidentification(
                audience=audience,
                domain=domain,
                field=field,
                subject=subject,
                reason=reason,
                policy_version=policy_version,
                key_version=key_version,
                outcome=outcome,
                error=error,
                value_digest=value_digest,
            ),
            actor=actor,
        )

    def dead_letter_burst(
        self,
        reason: str,
        topic: str,
        count: int,
        window_seconds: int,
        *,
        partition: int | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            DeadLetterBurst(
                reason=reason,
                topic=topic,
                count=count,
                window_seconds=window_seconds,
                partition=partition,
            ),
            actor=actor,
        )

    def anomaly(
        self,
        kind: str,
        *,
        reason: str | None = None,
        topic: str | None = None,
        partition: int | None = None,
        count: int | None = None,
        key_id: str | None = None,
        kms: str | None = None,
        audience: str | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            Anomaly(
                kind=kind,
                reason=reason,
                topic=topic,
                partition=partition,
                count=count,
                key_id=key_id,
                kms=kms,
                audience=audience,
            ),
            actor=actor,
        )

    def processor_started(
        self,
        *,
        processor_version: str,
        policy_version: str | None = None,
        instance: str | None = None,
        policy_name: str | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            ProcessorStarted(
                processor_version=processor_version,
                policy_version=policy_version,
                instance=instance,
                policy_name=policy_name,
            ),
            actor=actor,
        )

    def processor_stopped(
        self,
        *,
        reason: str | None = None,
        processor_version: str | None = None,
        instance: str | None = None,
        count: int | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        return self.emit(
            ProcessorStopped(
                reason=reason, processor_version=processor_version, instance=instance, count=count
            ),
            actor=actor,
        )

    def source_topic_read(
        self,
        *,
        topic: str,
        reason: str,
        outcome: str,
        count: int | None = None,
        error: str | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """An incident-response read of a topic outside the sanitized destinations."""
        return self.emit(
            SourceTopicRead(topic=topic, reason=reason, outcome=outcome, count=count, error=error),
            actor=actor,
        )

    def flush(self) -> None:
        with self._lock:
            for s in self.sinks:
                s.flush()

    def close(self) -> None:
        """Export the final signed head, then flush and close every sink."""
        with self._lock:
            errors = []
            if self._head_dirty:
                try:
                    self.export_head()
                except AuditSinkError as exc:
                    errors.append(str(exc))
            for s in self.sinks:
                try:
                    s.close()
                except AuditSinkError as exc:
                    errors.append(str(exc))
            if errors:
                raise AuditSinkError("; ".join(errors))

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeadLetterBurstDetector:
    """Turns per-batch dead-letter counts into ``dead_letter_burst`` events.

    The worker calls :meth:`observe` after each batch; when a (reason, topic) pair
    reaches ``threshold`` records within a tumbling window of ``window_seconds``, one
    event is emitted for that window.  Bursts are what an auditor needs (a revoked key,
    a producer sending garbage); single bad records are metrics, not audit events.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        threshold: int = 100,
        window_seconds: int = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audit = audit
        self.threshold = threshold
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._window: dict[tuple[str, str], tuple[float, int, bool]] = {}

    def observe(self, reason: str, topic: str, count: int) -> dict[str, Any] | None:
        now = self._clock()
        with self._lock:
            start, n, fired = self._window.get((reason, topic), (now, 0, False))
            if now - start >= self.window_seconds:
                start, n, fired = now, 0, False
            n += count
            fire = n >= self.threshold and not fired
            self._window[(reason, topic)] = (start, n, fired or fire)
        if fire:
            return self.audit.dead_letter_burst(reason, topic, n, self.window_seconds)
        return None
