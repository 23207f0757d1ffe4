"""Error types shared by every layer.

Every error that can be raised while handling a record carries a :class:`Reason`, a
value from a small closed set.  The reason class is what goes into dead-letter headers,
metric labels and log lines; the message may name keys, topics, offsets and schema ids
but never a record value or key material.  Constructors therefore take identifiers only.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Why a record could not be processed (bounded set: safe as a metric label)."""

    MALFORMED = "malformed_envelope"
    """Too short, or a length field points outside the buffer."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """Leading version byte is not one this build can open."""
    UNKNOWN_KEY = "unknown_key"
    """The KEK (or its version) named by the envelope is unknown to the KMS."""
    KEY_REVOKED = "key_revoked"
    """The KEK version was revoked or disabled."""
    TAMPERED = "tampered"
    """Authentication failed: bytes were modified or the wrapped key does not match."""
    WRONG_TOPIC = "wrong_topic"
    """The envelope was sealed for another topic."""
    OVERSIZED = "oversized"
    """The record is larger than the configured limit."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """The schema id in the framed payload is not known to the schema source."""
    BAD_PAYLOAD = "bad_payload"
    """The plaintext is not Confluent-framed Avro that matches its schema."""
    TRANSFORM_FAILED = "transform_failed"
    """An operator could not transform a value (for example a malformed date)."""
    INEFFECTIVE_TRANSFORM = "ineffective_transform"
    """An operator's output would have equalled or contained its input (``generalize``
    ``prefix`` of a short string, ``mask`` of separators only) under ``on_failure: quarantine``."""
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    """The policy cannot be applied to this schema (an operator does not fit a field type)."""
    NO_ROUTE = "no_route"
    """The pipeline has no destination for the record's topic."""
    KEK_NOT_ALLOWED = "kek_not_allowed"
    """The envelope names a KEK that may not seal this source topic (``source_keks``).

    Checked before any KMS call: a record sealed under a destination audience's KEK (or
    any KEK outside the pipeline's allow-list) is never opened."""
    KMS_ERROR = "kms_error"
    """The KMS refused to unwrap the record's data key for a reason outside the other
    classes (an error the provider does not map).  Never transient: those are retried."""


class StreamprocError(Exception):
    """Base class for every error streamproc raises on purpose."""


class RecordError(StreamprocError):
    """A single record cannot be processed; it belongs in the dead-letter topic.

    ``detail`` is a short, value-free description (key ids, schema ids, field paths).
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class EnvelopeError(RecordError):
    """The envelope could not be opened.  Opaque on purpose: it says why, never what.

    ``kek_id`` and ``kek_version`` name the key the envelope's header claims, when the
    header parsed (``None`` for a malformed or unsupported header), so that callers -- the
    audit trail's ``key_revocation_seen``, say -- never re-parse the record's bytes: the
    envelope layout is known to ``streamproc.crypto.envelope`` alone.  They are attributes
    only, never part of the message: the KEK id is producer-chosen text, and code that
    shows it goes through ``envelope.kek_label`` (a configured id, or a digest).
    """

    def __init__(
        self,
        reason: Reason,
        detail: str = "",
        *,
        kek_id: str | None = None,
        kek_version: int | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.kek_id = kek_id
        self.kek_version = kek_version


class TransientError(StreamprocError):
    """A dependency (KMS, schema registry, broker) is briefly unavailable.

    Never a property of a record: the runtime pauses, backs off and retries the whole
    batch, and sends nothing to the dead-letter topic for it.
    """


class KmsError(StreamprocError):
    """Base class for KMS failures."""


class KeyNotFound(KmsError):
    """The KMS does not know the key (or the key version)."""

    reason = Reason.UNKNOWN_KEY


class KeyRevoked(KmsError):
    """The key version exists but may no longer be used to decrypt."""

    reason = Reason.KEY_REVOKED


class KeyAccessDenied(KeyNotFound):
    """The caller's credentials do not allow this operation on this key.

    A subclass of :class:`KeyNotFound` on purpose: for a record, a key we may not use is
    a key we do not have (reason ``unknown_key``); the message says which.
    """


class UnwrapFailed(KmsError):
    """The KMS refused the wrapped data key as inauthentic."""

    reason = Reason.TAMPERED


class KmsUnavailable(KmsError, TransientError):
    """A transient KMS outage.  Not a bad record: the caller must pause and retry."""


class SealingUnavailable(KmsUnavailable):
    """A destination KEK cannot seal right now (revoked, disabled, denied, unknown...).

    Not a property of any record, so never a dead letter; and not a reason to exit
    either (a restart would meet the same key): the runtime pauses and retries until the
    key is usable again.  ``detail`` names the destination topic, the configured KEK id
    and the provider's error class, never a message the provider wrote.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class SchemaError(StreamprocError):
    """A schema is invalid, unsupported or cannot be resolved."""


class SchemaNotFound(SchemaError):
    """The schema id is unknown to the schema source (a record-level failure)."""


class SchemaRegistryUnavailable(TransientError):
    """The schema registry could not be reached; retry, never dead-letter."""


class PolicyError(StreamprocError):
    """A policy file is invalid.  The message names file, audience and tag, never values."""


class ConfigError(StreamprocError):
    """The processor configuration is invalid."""
