"""A tamper-evident, append-only audit trail of security-relevant events.

Every event carries its position (``seq``), ``prev`` (the hash of the event before it) and
``hash`` (SHA-256 over its canonical JSON), and with an audit key a ``mac``: changing,
deleting, inserting or reordering an event breaks a hash or a link, and :func:`verify`
says where.  A signed :class:`Head` exported outside the log catches a truncated tail or
an emptied file.  Neither variant *prevents* writing; they make changes evident (threat
model in ``docs/keys.md``).  Events carry identifiers only, never record data.

The package, bottom up (each module imports only the ones above it):

* :mod:`~streamproc.audit.errors` -- :class:`AuditError` and its subclasses;
* :mod:`~streamproc.audit.events` -- :class:`EventType`, one frozen dataclass per type
  whose fields are its allowed attributes, and the attribute guard (:func:`check_attrs`);
* :mod:`~streamproc.audit.chain` -- canonical bytes, event hash and MAC, :class:`Anchor`,
  signed :class:`Head`, audit key files;
* :mod:`~streamproc.audit.verify` -- :func:`verify` and its file/record variants;
* :mod:`~streamproc.audit.sinks` -- :class:`FileSink`, :class:`KafkaSink`,
  :class:`MemorySink`, reading heads back from a topic, :func:`rotate_file`;
* :mod:`~streamproc.audit.log` -- :class:`AuditLog`, the one writer of a chain;
* :mod:`~streamproc.audit.trail` -- opening the configured trail (:func:`open_tool_log`,
  :func:`open_log`, :func:`run_audited`).

The API for commands that must be audited: ``log = open_tool_log(config, note=...)``, then
``log.emit(KeyRotated(...))`` (or ``log.emit(EventType.X, {...})``) *before* acting, and
``log.close()`` after; every step raises on failure and the caller must then do nothing.
A new event type is a new :class:`EventType` member plus its dataclass in
:mod:`~streamproc.audit.events` (listed in :data:`EVENTS`).

This module re-exports the public API, so ``from streamproc.audit import X`` is the import
to use.
"""

from __future__ import annotations

from streamproc.audit.chain import (
    FORMAT_VERSION,
    GENESIS,
    HEAD_FORMAT,
    Anchor,
    Head,
    canonical_json,
    event_hash,
    event_mac,
    format_ts,
    head_mac,
    is_head_record,
    load_hmac_key,
    write_hmac_key,
)
from streamproc.audit.errors import (
    AuditAttributeError,
    AuditChainError,
    AuditError,
    AuditSinkError,
    AuditUnavailable,
)
from streamproc.audit.events import (
    ACTOR_SOURCES,
    ALLOWED_ATTRIBUTES,
    ATTRIBUTE_RULES,
    COMMON_ATTRIBUTES,
    EVENTS,
    INTEGRITY_HASH,
    INTEGRITY_HMAC,
    Anomaly,
    AudienceKeyExported,
    ChainStarted,
    ConsentWithheld,
    DeadLetterBurst,
    Event,
    EventType,
    KeyRevocationSeen,
    KeyRevoked,
    KeyRotated,
    PolicyLoaded,
    ProcessorStarted,
    ProcessorStopped,
    ProvenanceResolved,
    Reidentification,
    SecretCreated,
    SecretImported,
    SourceTopicRead,
    SubjectForgottenEvent,
    check_actor,
    check_attrs,
)
from streamproc.audit.log import AuditLog, AuditSink, DeadLetterBurstDetector
from streamproc.audit.sinks import (
    FileSink,
    Fsync,
    KafkaSink,
    MemorySink,
    ProducerLike,
    head_file_for,
    read_topic_heads,
    rotate_file,
)
from streamproc.audit.trail import (
    TOOLS_STREAM,
    open_log,
    open_tool_log,
    run_audited,
    tool_audit_file,
)
from streamproc.audit.verify import (
    Break,
    BreakKind,
    Item,
    VerifyResult,
    iter_events,
    read_lines,
    verify,
    verify_file,
    verify_files,
    verify_records,
)

__all__ = [
    "ACTOR_SOURCES",
    "ALLOWED_ATTRIBUTES",
    "ATTRIBUTE_RULES",
    "COMMON_ATTRIBUTES",
    "EVENTS",
    "FORMAT_VERSION",
    "GENESIS",
    "HEAD_FORMAT",
    "INTEGRITY_HASH",
    "INTEGRITY_HMAC",
    "TOOLS_STREAM",
    "Anchor",
    "Anomaly",
    "AudienceKeyExported",
    "AuditAttributeError",
    "AuditChainError",
    "AuditError",
    "AuditLog",
    "AuditSink",
    "AuditSinkError",
    "AuditUnavailable",
    "Break",
    "BreakKind",
    "ChainStarted",
    "ConsentWithheld",
    "DeadLetterBurst",
    "DeadLetterBurstDetector",
    "Event",
    "EventType",
    "FileSink",
    "Fsync",
    "Head",
    "Item",
    "KafkaSink",
    "KeyRevocationSeen",
    "KeyRevoked",
    "KeyRotated",
    "MemorySink",
    "PolicyLoaded",
    "ProcessorStarted",
    "ProcessorStopped",
    "ProducerLike",
    "ProvenanceResolved",
    "Reidentification",
    "SecretCreated",
    "SecretImported",
    "SourceTopicRead",
    "SubjectForgottenEvent",
    "VerifyResult",
    "canonical_json",
    "check_actor",
    "check_attrs",
    "event_hash",
    "event_mac",
    "format_ts",
    "head_file_for",
    "head_mac",
    "is_head_record",
    "iter_events",
    "load_hmac_key",
    "open_log",
    "open_tool_log",
    "read_lines",
    "read_topic_heads",
    "rotate_file",
    "run_audited",
    "tool_audit_file",
    "verify",
    "verify_file",
    "verify_files",
    "verify_records",
    "write_hmac_key",
]
