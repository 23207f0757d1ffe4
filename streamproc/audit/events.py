"""Audit event types: one frozen dataclass per type, whose fields are its allowed attributes.

Why dataclasses
---------------
An event type used to be declared three or four times: an enum member, an entry in an
allow-list table, a helper method naming the same keys again, and the docs.  Now the enum
member says what the type is called on the wire, and its dataclass (below) *is* the
allow-list: :data:`ALLOWED_ATTRIBUTES` is derived from the dataclasses' fields, so adding
an attribute is one line and the guard cannot drift from the typed constructor.  Every
event also accepts the common attributes of :class:`Event` (``policy_version``,
``actor_source``, ``note``).

Constructing an event checks it (:func:`check_attrs`), so a bad value is refused where it
is made, not where it is written: ``log.emit(KeyRotated(kms="local", key_id="kek",
version=2))``.  ``log.emit(EventType.KEY_ROTATED, {...})`` checks the same allow-list for
callers that build attributes as a mapping (:func:`~streamproc.audit.run_audited`).

What may go into an event
-------------------------
Events describe *who did what to which key or field, when, under which policy*.  They
must never carry record data, because the audit log is read by more people, and kept
longer, than the data it describes.  :func:`check_attrs` therefore rejects attribute
keys outside a per-type allow-list and values that do not look like identifiers (an
e-mail address, a long run of digits, free text with spaces outside ``reason``).  The
guard is a seat belt against programming mistakes, not a DLP engine: callers pass
identifiers (topic names, key ids, versions, field paths, tokens) and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from streamproc.audit.errors import AuditAttributeError


class EventType(enum.StrEnum):
    """The closed set of audit event types."""

    POLICY_LOADED = "policy_loaded"
    KEY_ROTATED = "key_rotated"
    KEY_REVOKED = "key_revoked"
    KEY_REVOCATION_SEEN = "key_revocation_seen"
    AUDIENCE_KEY_EXPORTED = "audience_key_exported"
    REIDENTIFICATION = "reidentification"
    DEAD_LETTER_BURST = "dead_letter_burst"
    ANOMALY = "anomaly"
    PROCESSOR_STARTED = "processor_started"
    PROCESSOR_STOPPED = "processor_stopped"
    CHAIN_STARTED = "chain_started"
    """The genesis (``seq`` 0) of every chain: declares its ``integrity`` (MACs or not)."""
    SECRET_CREATED = "secret_created"
    SECRET_IMPORTED = "secret_imported"
    SOURCE_TOPIC_READ = "source_topic_read"
    """``streamproc consume --incident-response``: someone read plaintext outside the pipeline."""
    PROVENANCE_RESOLVED = "provenance_resolved"
    """``streamproc provenance resolve``: audience-keyed references turned into source offsets."""
    CONSENT_WITHHELD = "consent_withheld"
    """A batch withheld records from an audience for lack of consent or an objection (counts)."""
    DEAD_LETTER_INSPECTED = "dead_letter_inspected"
    """``streamproc dlq inspect``: a dead letter opened with the quarantine KEK."""
    DEAD_LETTER_REPLAYED = "dead_letter_replayed"
    """``streamproc dlq replay``: a dead letter re-produced to its source topic."""
    SUBJECT_FORGOTTEN = "subject_forgotten"
    """``streamproc forget``: a subject's keys shredded, a forgotten marker, consent withdrawn."""


# -- attribute guard ----------------------------------------------------------------------

_IDENT_RE = re.compile(r"[A-Za-z0-9_.:/+=#\-\[\]{}]{1,200}")
_ACTOR_RE = re.compile(r"[A-Za-z0-9_.:/@+=\-]{1,200}")
_CARD_RE = re.compile(r"\d{13,}")
_HASH_RE = re.compile(r"(sha256:)?[0-9a-f]{8,64}")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[\]|\{\}|\.[A-Za-z_][A-Za-z0-9_]*)*")
_SUBJECT_RE = re.compile(
    r"(?:tk|de|ds)\d{1,9}_[A-Za-z0-9_-]{16,}"  # a token or deterministic (erasable) ciphertext
    r"|[A-Za-z0-9._-]{1,249}[:/]\d{1,10}[:/@]\d{1,20}"  # topic:partition:offset
)
_TEXT_RE = re.compile(r"[\x20-\x7e]{1,200}")
_EMAIL_RE = re.compile(r"[^\s@]+@[^\s@]+\.[A-Za-z]{2,}")
_DIGITS_RE = re.compile(r"\d(?:[ .\-/]?\d){8,}")  # 9+ digits, maybe separated: phone, SSN, card


def _ident(v: Any) -> bool:
    return isinstance(v, str) and bool(_IDENT_RE.fullmatch(v)) and not _CARD_RE.search(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _hash(v: Any) -> bool:
    return isinstance(v, str) and bool(_HASH_RE.fullmatch(v))


def _field(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 200 and bool(_FIELD_RE.fullmatch(v))


def _subject(v: Any) -> bool:
    return isinstance(v, str) and bool(_SUBJECT_RE.fullmatch(v))


def _text(v: Any) -> bool:
    """Short operator-written justification (``reason``): printable, no PII shapes."""
    return (
        isinstance(v, str)
        and bool(_TEXT_RE.fullmatch(v))
        and not _EMAIL_RE.search(v)
        and not _DIGITS_RE.search(v)
    )


def _ident_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 100 and all(_ident(x) for x in v)


def _outcome(v: Any) -> bool:
    return v in ("success", "denied", "failed")


def _integrity(v: Any) -> bool:
    return v in (INTEGRITY_HMAC, INTEGRITY_HASH)


def _actor_source(v: Any) -> bool:
    return v in ACTOR_SOURCES


INTEGRITY_HMAC = "hmac-sha256"
"""Genesis ``integrity``: every event of the chain carries a ``mac``; one without is a break."""
INTEGRITY_HASH = "sha256"
"""Genesis ``integrity``: a plain hash chain (no audit key configured)."""
ACTOR_SOURCES = ("vault", "aws", "os", "config")
"""Where an event's ``actor`` comes from: an authenticated KMS identity (Vault/OpenBao
token lookup, AWS STS), the operating-system user, or the configuration (processors)."""


#: Every attribute key an event may carry, and the shape its value must have.
ATTRIBUTE_RULES: Mapping[str, Callable[[Any], bool]] = {
    "audience": _ident,
    "audiences": _ident_list,
    "count": _count,
    "domain": _ident,
    "error": _ident,
    "field": _field,
    "instance": _ident,
    "key_id": _ident,
    "key_version": _count,
    "kind": _ident,
    "kms": _ident,
    "outcome": _outcome,
    "partition": _count,
    "policy_name": _ident,
    "policy_version": _hash,
    "previous_version": _count,
    "actor_source": _actor_source,
    "integrity": _integrity,
    "note": _text,
    "processor_version": _ident,
    "purpose": _ident,
    "purposes": _ident_list,
    "reason": _text,
    "source": _ident,
    "subject": _subject,
    "topic": _ident,
    "value_digest": _hash,
    "version": _count,
    "window_seconds": _count,
}


# -- one dataclass per event type ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """The attributes every event type may carry, and the conversion to ``attrs``.

    ``policy_version`` is the policy in force, ``actor_source`` says who vouches for the
    actor (:data:`ACTOR_SOURCES`) and ``note`` is the caller's short remark.  A ``None``
    field is absent from the written event.  Subclasses set :attr:`TYPE`.
    """

    TYPE: ClassVar[EventType]

    policy_version: str | None = None
    actor_source: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        check_attrs(self.TYPE, self.attrs())

    def attrs(self) -> dict[str, Any]:
        """The event's attributes as written (``None`` dropped, sequences as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChainStarted(Event):
    """The genesis (``seq`` 0) of every chain: declares its ``integrity`` (MACs or not)."""

    TYPE: ClassVar[EventType] = EventType.CHAIN_STARTED
    integrity: str | None = None
    processor_version: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PolicyLoaded(Event):
    """A policy was loaded or reloaded (``policy_version`` is its content hash)."""

    TYPE: ClassVar[EventType] = EventType.POLICY_LOADED
    policy_name: str | None = None
    source: str | None = None
    audiences: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KeyRotated(Event):
    """``keys rotate`` / ``secrets rotate`` (``kind: secret``), written before the change."""

    TYPE: ClassVar[EventType] = EventType.KEY_ROTATED
    kms: str | None = None
    key_id: str | None = None
    kind: str | None = None
    version: int | None = None
    previous_version: int | None = None
    outcome: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KeyRevoked(Event):
    """``keys revoke``, written before the change."""

    TYPE: ClassVar[EventType] = EventType.KEY_REVOKED
    kms: str | None = None
    key_id: str | None = None
    kind: str | None = None
    version: int | None = None
    outcome: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KeyRevocationSeen(Event):
    """The processor first met a revoked key version (once per KMS, key and version)."""

    TYPE: ClassVar[EventType] = EventType.KEY_REVOCATION_SEEN
    kms: str | None = None
    key_id: str | None = None
    version: int | None = None
    topic: str | None = None
    partition: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AudienceKeyExported(Event):
    """Someone exported an audience's re-identification key."""

    TYPE: ClassVar[EventType] = EventType.AUDIENCE_KEY_EXPORTED
    kms: str | None = None
    key_id: str | None = None
    audience: str | None = None
    key_version: int | None = None
    outcome: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Reidentification(Event):
    """One re-identification attempt, whatever its outcome."""

    TYPE: ClassVar[EventType] = EventType.REIDENTIFICATION
    audience: str | None = None
    domain: str | None = None
    field: str | None = None
    subject: str | None = None
    key_version: int | None = None
    reason: str | None = None
    outcome: str | None = None
    error: str | None = None
    value_digest: str | None = None
    count: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterBurst(Event):
    """A (reason, topic) crossed a threshold of dead letters within a window."""

    TYPE: ClassVar[EventType] = EventType.DEAD_LETTER_BURST
    reason: str | None = None
    topic: str | None = None
    partition: int | None = None
    count: int | None = None
    window_seconds: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Anomaly(Event):
    """A finding of the in-process anomaly detector."""

    TYPE: ClassVar[EventType] = EventType.ANOMALY
    kind: str | None = None
    reason: str | None = None
    topic: str | None = None
    partition: int | None = None
    count: int | None = None
    key_id: str | None = None
    kms: str | None = None
    audience: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorStarted(Event):
    """A worker starts, before it consumes anything."""

    TYPE: ClassVar[EventType] = EventType.PROCESSOR_STARTED
    processor_version: str | None = None
    instance: str | None = None
    policy_name: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorStopped(Event):
    """A worker stops cleanly (``count``: records processed)."""

    TYPE: ClassVar[EventType] = EventType.PROCESSOR_STOPPED
    processor_version: str | None = None
    instance: str | None = None
    reason: str | None = None
    count: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SecretCreated(Event):
    """``secrets create``."""

    TYPE: ClassVar[EventType] = EventType.SECRET_CREATED
    kms: str | None = None
    key_id: str | None = None
    version: int | None = None
    outcome: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SecretImported(Event):
    """``secrets import`` (``count``: versions imported)."""

    TYPE: ClassVar[EventType] = EventType.SECRET_IMPORTED
    kms: str | None = None
    key_id: str | None = None
    version: int | None = None
    count: int | None = None
    outcome: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceTopicRead(Event):
    """``consume --incident-response``: someone read plaintext outside the pipeline."""

    TYPE: ClassVar[EventType] = EventType.SOURCE_TOPIC_READ
    topic: str | None = None
    reason: str | None = None
    outcome: str | None = None
    count: int | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProvenanceResolved(Event):
    """``provenance resolve``: audience-keyed references turned into source offsets."""

    TYPE: ClassVar[EventType] = EventType.PROVENANCE_RESOLVED
    audiences: Sequence[str] | None = None
    reason: str | None = None
    outcome: str | None = None
    count: int | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsentWithheld(Event):
    """Records of one batch withheld from an audience, per reason class: counts only.

    Aggregate on purpose: which subject was withheld is personal data (it says the subject
    withdrew or objected); the consent topic itself is the record of that.
    """

    TYPE: ClassVar[EventType] = EventType.CONSENT_WITHHELD
    audience: str | None = None
    purpose: str | None = None
    reason: str | None = None
    count: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterInspected(Event):
    """``dlq inspect``: one dead letter opened (``subject``: DLQ topic:partition:offset),
    written before it is shown."""

    TYPE: ClassVar[EventType] = EventType.DEAD_LETTER_INSPECTED
    subject: str | None = None
    topic: str | None = None
    partition: int | None = None
    key_id: str | None = None
    reason: str | None = None
    outcome: str | None = None
    count: int | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterReplayed(Event):
    """``dlq replay``: one dead letter re-produced to its source ``topic``/``partition``,
    written before the transaction (``outcome: failed`` if it then aborted)."""

    TYPE: ClassVar[EventType] = EventType.DEAD_LETTER_REPLAYED
    subject: str | None = None
    topic: str | None = None
    partition: int | None = None
    key_id: str | None = None
    reason: str | None = None
    outcome: str | None = None
    count: int | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubjectForgottenEvent(Event):
    """``streamproc forget``: one subject forgotten, written before the writes (``outcome:
    failed`` follows if they then fail).

    ``subject`` is the subject's token in the subject-key domain (never the identifier);
    ``count`` the key records shredded, ``audiences`` whose keys they were, ``purposes``
    whose consent was withdrawn, ``topic`` the subject-key topic.
    """

    TYPE: ClassVar[EventType] = EventType.SUBJECT_FORGOTTEN
    subject: str | None = None
    topic: str | None = None
    audiences: Sequence[str] | None = None
    purposes: Sequence[str] | None = None
    count: int | None = None
    reason: str | None = None
    outcome: str | None = None
    error: str | None = None


#: The dataclass of every event type (a test checks that each :class:`EventType` has one).
EVENTS: Mapping[EventType, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        ChainStarted,
        PolicyLoaded,
        KeyRotated,
        KeyRevoked,
        KeyRevocationSeen,
        AudienceKeyExported,
        Reidentification,
        DeadLetterBurst,
        Anomaly,
        ProcessorStarted,
        ProcessorStopped,
        SecretCreated,
        SecretImported,
        SourceTopicRead,
        ProvenanceResolved,
        ConsentWithheld,
        DeadLetterInspected,
        DeadLetterReplayed,
        SubjectForgottenEvent,
    )
}

_COMMON = frozenset(f.name for f in dataclasses.fields(Event))
COMMON_ATTRIBUTES = _COMMON
"""Attributes every event type may carry (the fields of :class:`Event`)."""

#: Which keys each event type may carry in addition to :data:`COMMON_ATTRIBUTES`: derived
#: from the fields of its dataclass, never declared a second time.
ALLOWED_ATTRIBUTES: Mapping[EventType, frozenset[str]] = {
    et: frozenset(f.name for f in dataclasses.fields(cls)) - _COMMON for et, cls in EVENTS.items()
}


def check_actor(actor: Any) -> str:
    """Actors are principals (``alice@corp``, ``processor:worker-1``), never free text."""
    if not isinstance(actor, str) or not _ACTOR_RE.fullmatch(actor):
        raise AuditAttributeError(
            "actor must be an identifier (letters, digits and _.:/@+=-, at most 200)"
        )
    return actor


def check_attrs(event_type: EventType | str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``attrs`` without ``None`` values, or raise :class:`AuditAttributeError`.

    Keys must be allowed for the event type; each value must match the key's shape
    (identifier, count, hash, field path, token or record reference, short justification).
    The error names the key but never repeats the value, which is exactly what must not
    leak.
    """
    try:
        et = EventType(event_type)
    except ValueError:
        raise AuditAttributeError(f"unknown audit event type {event_type!r}") from None
    allowed = ALLOWED_ATTRIBUTES[et] | _COMMON
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if k not in allowed:
            raise AuditAttributeError(
                f"attribute {k!r} is not allowed on {et.value} events (allowed: {sorted(allowed)})"
            )
        if not ATTRIBUTE_RULES[k](v):
            raise AuditAttributeError(
                f"attribute {k!r} of a {et.value} event does not look like an identifier; "
                "audit events carry identifiers only, never record data"
            )
        out[k] = v
    return out
