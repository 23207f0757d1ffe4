"""A tamper-evident, append-only audit trail of security-relevant events.

Why a hash chain
----------------
An audit log is only useful if a reader can tell whether it was edited.  Every event
carries its position (``seq``) and ``prev``, the hash of the event before it, and
``hash`` = SHA-256 over the canonical JSON of the event without ``hash``.  Changing, deleting, inserting or reordering an event therefore breaks either
the event's own hash or the next event's ``prev`` link, and :func:`verify` says where.

Threat model (also in ``docs/keys.md``):

* **Plain hash chain** detects modification, deletion, insertion and reordering by anyone
  who does *not* rewrite the whole tail after the change: the chain has no secret, so an
  attacker with write access who recomputes every hash from the edit onward produces a
  valid-looking chain.  Deleting events *at the end* of the log is likewise invisible from
  the log alone.  Both are caught by comparing the head hash with a copy kept elsewhere
  ("anchoring": ship :attr:`VerifyResult.head` to a ticket, a WORM bucket, a second
  Kafka cluster, periodically) -- :func:`verify` takes ``expected_head``.
* **HMAC variant**: with an audit key, each event also carries ``mac`` = HMAC-SHA256
  over the canonical JSON of the event without ``hash`` and ``mac`` (``hash`` then
  covers ``mac``).  An attacker who can rewrite the whole file but does not
  hold the key cannot produce valid MACs, so even a fully recomputed chain is detected.
  The genesis event (``chain_started``) declares ``integrity: hmac-sha256``, so stripped
  MACs are a break even for a verifier without the key; ``require_hmac`` also refuses a
  rewritten genesis.
* **Signed heads** (:class:`Head`): a MAC cannot vouch for events that are absent, so tail
  truncation and emptied files are caught by comparing with a signed head exported
  outside the log (``<file>.head``, the audit topic, the shutdown log line, an operator's
  copy); writers refuse to continue a file that no longer reaches its exported head.
* Neither variant *prevents* writing; they make changes evident.  Keep audit files on an
  append-only medium (``chattr +a``, object lock) and ship them off-host.

What may go into an event
-------------------------
Events describe *who did what to which key or field, when, under which policy*.  They
must never carry record data, because the audit log is read by more people, and kept
longer, than the data it describes.  :func:`check_attrs` therefore rejects attribute
keys outside a per-type allow-list and values that do not look like identifiers (an
e-mail address, a long run of digits, free text with spaces outside ``reason``).  The
guard is a seat belt against programming mistakes, not a DLP engine: callers pass
identifiers (topic names, key ids, versions, field paths, tokens) and nothing else.

The API for commands that must be audited
-----------------------------------------
``log = open_tool_log(config, note=...)`` opens the configured trail (``audit:`` of a
:class:`streamproc.config.Config`; the tools' chain beside ``audit.file`` and the audit
topic) with the caller's authenticated identity as actor (:mod:`streamproc.identity`).
``log.emit(EventType.X, {...})`` writes one event (attributes allow-listed per type in
:data:`ALLOWED_ATTRIBUTES`); ``run_audited(log, EventType.X, attrs, action)`` writes the
event and only then acts; ``log.close()`` exports the signed head.  Every step raises
:class:`AuditError` (or :class:`~streamproc.errors.StreamprocError`) on failure: the
caller must then do nothing.  A new event type is a new :class:`EventType` member plus its
``ALLOWED_ATTRIBUTES`` entry.  :func:`open_log` is the lower level (any stream, any file).

Sinks
-----
:class:`FileSink` (JSON lines, ``O_APPEND``, configurable fsync, resumes and verifies the
chain on restart, one writer at a time through ``flock``) and :class:`KafkaSink`
(a producer-like object, key = stream id) can be used together; :class:`AuditLog` builds
each event once and writes the identical line to every sink, so the chain read back
from the topic verifies exactly like the file (:func:`verify_records`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import hmac as _hmac
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from streamproc.errors import ConfigError, StreamprocError

FORMAT_VERSION = 1
GENESIS = "0" * 64
"""``prev`` of the first event of a chain."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_EVENT_KEYS = frozenset(
    {"v", "stream", "seq", "ts", "type", "actor", "attrs", "prev", "hash", "mac"}
)


class AuditError(StreamprocError):
    """Base class for audit failures."""


class AuditAttributeError(AuditError, ValueError):
    """An event attribute is not allowed.  Names the key, never echoes the value."""


class AuditChainError(AuditError):
    """An existing audit file does not verify; appending to it would hide the break."""


class AuditSinkError(AuditError):
    """A sink could not durably accept an event.

    ``accepted`` (set by :meth:`AuditLog.emit`) is how many sinks did take it: when it is
    non-zero the event is part of the chain and must not be emitted again.
    """

    accepted: int = 0


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
    DEAD_LETTER_INSPECTED = "dead_letter_inspected"
    DEAD_LETTER_REPLAYED = "dead_letter_replayed"


# -- attribute guard ----------------------------------------------------------------------

_IDENT_RE = re.compile(r"[A-Za-z0-9_.:/+=#\-\[\]{}]{1,200}")
_ACTOR_RE = re.compile(r"[A-Za-z0-9_.:/@+=\-]{1,200}")
_CARD_RE = re.compile(r"\d{13,}")
_HASH_RE = re.compile(r"(sha256:)?[0-9a-f]{8,64}")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[\]|\{\}|\.[A-Za-z_][A-Za-z0-9_]*)*")
_SUBJECT_RE = re.compile(
    r"(?:tk|de)\d{1,9}_[A-Za-z0-9_-]{16,}"  # a token or deterministic ciphertext
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
    "reason": _text,
    "source": _ident,
    "subject": _subject,
    "topic": _ident,
    "value_digest": _hash,
    "version": _count,
    "window_seconds": _count,
}

_COMMON = frozenset({"policy_version", "actor_source", "note"})
#: Which keys each event type may carry (in addition to ``policy_version``, ``actor_source``
#: and ``note``: who the actor is according to whom, and the caller's free-text remark).
ALLOWED_ATTRIBUTES: Mapping[EventType, frozenset[str]] = {
    EventType.POLICY_LOADED: frozenset({"policy_name", "source", "audiences"}),
    EventType.KEY_ROTATED: frozenset(
        {"kms", "key_id", "kind", "version", "previous_version", "outcome", "error"}
    ),
    EventType.KEY_REVOKED: frozenset({"kms", "key_id", "kind", "version", "outcome", "error"}),
    EventType.KEY_REVOCATION_SEEN: frozenset({"kms", "key_id", "version", "topic", "partition"}),
    EventType.AUDIENCE_KEY_EXPORTED: frozenset(
        {"kms", "key_id", "audience", "key_version", "outcome", "error"}
    ),
    EventType.REIDENTIFICATION: frozenset(
        {
            "audience",
            "domain",
            "field",
            "subject",
            "key_version",
            "reason",
            "outcome",
            "error",
            "value_digest",
            "count",
        }
    ),
    EventType.DEAD_LETTER_BURST: frozenset(
        {"reason", "topic", "partition", "count", "window_seconds"}
    ),
    EventType.ANOMALY: frozenset(
        {"kind", "reason", "topic", "partition", "count", "key_id", "kms", "audience"}
    ),
    EventType.PROCESSOR_STARTED: frozenset({"processor_version", "instance", "policy_name"}),
    EventType.PROCESSOR_STOPPED: frozenset({"processor_version", "instance", "reason", "count"}),
    EventType.CHAIN_STARTED: frozenset({"integrity", "processor_version"}),
    EventType.SECRET_CREATED: frozenset({"kms", "key_id", "version", "outcome", "error"}),
    EventType.SECRET_IMPORTED: frozenset(
        {"kms", "key_id", "version", "count", "outcome", "error"}
    ),
    EventType.SOURCE_TOPIC_READ: frozenset({"topic", "reason", "outcome", "count", "error"}),
    EventType.PROVENANCE_RESOLVED: frozenset({"audiences", "reason", "outcome", "count", "error"}),
    # streamproc dlq inspect / replay: one event per dead letter opened or re-produced,
    # written before anything is shown or produced (subject: DLQ topic:partition:offset).
    EventType.DEAD_LETTER_INSPECTED: frozenset(
        {"subject", "topic", "partition", "reason", "outcome", "error", "key_id", "count"}
    ),
    EventType.DEAD_LETTER_REPLAYED: frozenset(
        {"subject", "topic", "partition", "reason", "outcome", "error", "key_id", "count"}
    ),
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


# -- events -------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per event, in any language."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def event_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of the event without ``hash``.

    ``mac``, when present, is covered, so an edited MAC is caught even without the key.
    """
    return hashlib.sha256(
        canonical_json({k: v for k, v in event.items() if k != "hash"})
    ).hexdigest()


def event_mac(key: bytes, event: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) over the canonical JSON of the event without ``hash`` and ``mac``."""
    body = canonical_json({k: v for k, v in event.items() if k not in ("hash", "mac")})
    return _hmac.new(key, body, hashlib.sha256).hexdigest()


def format_ts(t: float) -> str:
    """RFC 3339 UTC with microseconds: a string, so every language hashes the same bytes."""
    return (
        datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Anchor:
    """A verified point in a chain: the next event must have ``seq + 1`` and ``prev == hash``."""

    stream: str
    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str, stream: str = "") -> Anchor:
        """``SEQ:HASH`` as printed by ``streamproc audit verify``."""
        seq, _, h = text.partition(":")
        if not seq.isdigit() or not _HEX64.fullmatch(h):
            raise ValueError("an anchor is SEQ:HASH (a sequence number and a 64-hex-digit hash)")
        return cls(stream, int(seq), h)


HEAD_FORMAT = "streamproc-audit-head/1"


def head_mac(key: bytes, stream: str, seq: int, hash_: str) -> str:
    """HMAC-SHA256 (hex) of a chain head: the chain id, its last sequence and hash.

    Domain-separated by :data:`HEAD_FORMAT`, so an event MAC can never pass for a head
    signature or the reverse.
    """
    body = canonical_json({"format": HEAD_FORMAT, "stream": stream, "seq": seq, "hash": hash_})
    return _hmac.new(key, body, hashlib.sha256).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Head:
    """A chain's last event, signed with the audit key, to be kept *outside* the log.

    Why: a hash chain (even with MACs) cannot tell that events were cut from its end, or
    that the whole file was emptied -- the remaining prefix is a valid chain.  A head
    exported elsewhere (the audit topic, a ``.head`` file, the shutdown log line, a
    ticket) says how far the chain had got; :func:`verify` with ``expect_head`` then fails
    when the chain no longer reaches it.  The signature stops someone who can write the
    head's copy from lowering it (unsigned heads exist only for chains without a key).

    Text form (``streamproc audit head`` prints it, ``--expect-head`` reads it):
    ``STREAM@SEQ:HASH[:MAC]``.
    """

    stream: str
    seq: int
    hash: str
    mac: str | None = None

    def __str__(self) -> str:
        return f"{self.stream}@{self.seq}:{self.hash}" + (f":{self.mac}" if self.mac else "")

    @classmethod
    def make(cls, stream: str, seq: int, hash_: str, key: bytes | None) -> Head:
        return cls(stream, seq, hash_, head_mac(key, stream, seq, hash_) if key else None)

    @classmethod
    def parse(cls, text: str) -> Head:
        stream, at, rest = text.strip().rpartition("@")
        parts = rest.split(":")
        if (
            not at
            or not _ACTOR_RE.fullmatch(stream)
            or len(parts) not in (2, 3)
            or not parts[0].isdigit()
            or not all(_HEX64.fullmatch(p) for p in parts[1:])
        ):
            raise ValueError(
                "a head is STREAM@SEQ:HASH[:MAC] (as printed by `streamproc audit head`)"
            )
        return cls(stream, int(parts[0]), parts[1], parts[2] if len(parts) == 3 else None)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "stream": self.stream,
            "seq": self.seq,
            "hash": self.hash,
        }
        if self.mac:
            doc["mac"] = self.mac
        return canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes | str) -> Head:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
                raise ValueError
            return cls.parse(
                f"{doc['stream']}@{doc['seq']}:{doc['hash']}"
                + (f":{doc['mac']}" if doc.get("mac") else "")
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError):
            raise ValueError(f"not a {HEAD_FORMAT} record") from None

    def signed_by(self, key: bytes) -> bool:
        return self.mac is not None and _hmac.compare_digest(
            self.mac, head_mac(key, self.stream, self.seq, self.hash)
        )

    @property
    def anchor(self) -> Anchor:
        return Anchor(self.stream, self.seq, self.hash)


def is_head_record(data: bytes | str) -> bool:
    """Whether a line/record value is an exported head rather than an event."""
    raw = data.encode() if isinstance(data, str) else data
    return raw.startswith(b'{"format":"' + HEAD_FORMAT.encode())


# -- verification -------------------------------------------------------------------------


class BreakKind(enum.StrEnum):
    TRUNCATED_JSON = "truncated_json"
    """The line is not valid JSON (a torn write, or edited bytes)."""
    MALFORMED = "malformed_event"
    """Valid JSON but not an audit event (missing or mistyped fields)."""
    NOT_CANONICAL = "not_canonical"
    """Parses, but its bytes are not the canonical encoding: the line was edited."""
    HASH_MISMATCH = "hash_mismatch"
    """The stored hash does not match the event's content: the event was modified."""
    HMAC_MISMATCH = "hmac_mismatch"
    """The MAC is missing or wrong: written by someone without the audit key."""
    PREV_MISMATCH = "prev_mismatch"
    """``prev`` is not the hash of the preceding event: a link was cut."""
    SEQUENCE_GAP = "sequence_gap"
    """``seq`` jumps forward: events are missing (deleted) or reordered."""
    SEQUENCE_REGRESSION = "sequence_regression"
    """``seq`` repeats or goes back: events were inserted, duplicated or reordered."""
    STREAM_MISMATCH = "stream_mismatch"
    """The event belongs to another stream (or another Kafka key)."""
    HEAD_MISMATCH = "head_mismatch"
    """The chain does not reach (or contradicts) an exported head: the tail was truncated."""
    MISSING_GENESIS = "missing_genesis"
    """The chain does not start with its ``chain_started`` declaration (emptied, cut or forged)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Break:
    """One integrity failure, located by position (``index``, ``line``) and claimed ``seq``."""

    index: int
    """0-based position in the verified sequence."""
    kind: BreakKind
    detail: str
    seq: int | None = None
    line: int | None = None
    """1-based line number (files) or the caller's position label."""
    where: str = ""
    """Optional location label (a file name, a Kafka record key)."""
    unit: str = "line"
    """What ``line`` counts: ``line`` in a file, ``record`` under a Kafka key."""

    def __str__(self) -> str:
        loc = f"{self.unit} {self.line}" if self.line is not None else f"event #{self.index}"
        if self.where:
            loc = f"{self.where} {loc}"
        s = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{loc}{s}: {self.kind.value}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found.  Truthy when the chain is intact."""

    count: int
    head: str | None
    head_seq: int | None
    stream: str | None
    breaks: tuple[Break, ...]
    hmac_checked: bool
    macs_present: bool

    @property
    def ok(self) -> bool:
        return not self.breaks

    def __bool__(self) -> bool:
        return self.ok

    @property
    def anchor(self) -> Anchor | None:
        if self.head is None or self.head_seq is None:
            return None
        return Anchor(self.stream or "", self.head_seq, self.head)

    def report(self) -> str:
        if self.ok:
            return f"OK: {self.count} events, head {self.head or GENESIS}"
        lines = [f"BROKEN: {len(self.breaks)} problem(s) in {self.count} events"]
        lines += [f"  {b}" for b in self.breaks]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One input to :func:`verify`: a raw line or a parsed event, with its location."""

    data: bytes | str | Mapping[str, Any]
    line: int | None = None
    where: str = ""
    unit: str = "line"


def _malformed(ev: Any) -> str | None:
    if not isinstance(ev, dict):
        return "not a JSON object"
    extra = set(ev) - _EVENT_KEYS
    if extra:
        return f"unknown field(s) {sorted(extra)}"
    checks = (
        ("v", lambda x: x == FORMAT_VERSION),
        ("stream", lambda x: isinstance(x, str)),
        ("seq", _count),
        ("ts", lambda x: isinstance(x, str)),
        ("type", lambda x: x in EventType.__members__.values()),
        ("actor", lambda x: isinstance(x, str)),
        ("attrs", lambda x: isinstance(x, dict)),
        ("prev", lambda x: isinstance(x, str) and bool(_HEX64.fullmatch(x))),
        ("hash", lambda x: isinstance(x, str) and bool(_HEX64.fullmatch(x))),
    )
    for name, ok in checks:
        if name not in ev:
            return f"missing field {name!r}"
        if not ok(ev[name]):
            return f"field {name!r} has the wrong type or value"
    if "mac" in ev and not (isinstance(ev["mac"], str) and _HEX64.fullmatch(ev["mac"])):
        return "field 'mac' is not 64 hex digits"
    return None


class _Locator:
    """Appends breaks for one position (avoids closures over loop variables)."""

    __slots__ = ("breaks", "index", "item", "line")

    def __init__(self, breaks: list[Break], index: int, line: int | None, item: Item) -> None:
        self.breaks, self.index, self.line, self.item = breaks, index, line, item

    def __call__(self, kind: BreakKind, detail: str, seq: int | None = None) -> None:
        self.breaks.append(
            Break(self.index, kind, detail, seq, self.line, self.item.where, self.item.unit)
        )


def verify(
    events: Iterable[Item | bytes | str | Mapping[str, Any]],
    *,
    hmac_key: bytes | None = None,
    anchor: Anchor | None = None,
    from_genesis: bool = True,
    expected_head: str | None = None,
    stream: str | None = None,
    require_hmac: bool = False,
    expect_head: Head | Sequence[Head] | None = None,
) -> VerifyResult:
    """Check a chain and locate every break.

    ``events`` are raw lines (``bytes``/``str``, as in the file or a Kafka value), parsed
    events, or :class:`Item` objects carrying a location.  Raw lines must also be the
    canonical encoding, so any edited byte is detected even if it leaves the meaning
    intact.

    The chain must start at the genesis (``seq`` 0, ``prev`` = :data:`GENESIS`), or right
    after ``anchor``; with ``from_genesis=False`` and no anchor, the first event is trusted
    as the start (a topic whose oldest events were removed by retention).  With
    ``hmac_key``, every event must carry a valid ``mac``.  ``expected_head`` (from an
    external anchor) detects a truncated tail.  ``stream`` requires every event to belong
    to that stream.

    A chain verified from the genesis must start with its ``chain_started`` event; an
    empty input is therefore a break, not an empty success (an emptied file).  When that
    genesis declares ``integrity: hmac-sha256``, every event must carry a ``mac`` even
    when no key is given (stripped MACs are a break).  ``require_hmac`` (which needs
    ``hmac_key``) additionally refuses a chain that declares no MACs -- the only defence
    against someone who rewrites the genesis too.

    ``expect_head`` (one or several :class:`Head`, exported earlier outside the log)
    detects truncation: the chain must contain each head's ``seq`` with that ``hash``; it
    may have grown since.  With ``hmac_key`` a head must carry a valid signature.

    After a break the verifier resynchronizes on the event's stored ``seq`` and ``hash``,
    so one tampered event yields one located break rather than a cascade.
    """
    if require_hmac and hmac_key is None:
        raise ValueError("require_hmac needs the audit HMAC key")
    heads: list[Head] = (
        [] if expect_head is None else [expect_head] if isinstance(expect_head, Head) else list(expect_head)
    )
    check_genesis = anchor is None and from_genesis
    integrity: str | None = None
    hashes_at: dict[int, str] = {}
    breaks: list[Break] = []
    if anchor is not None:
        exp_seq: int | None = anchor.seq + 1
        exp_prev: str | None = anchor.hash
        stream = stream or anchor.stream or None
    elif from_genesis:
        exp_seq, exp_prev = 0, GENESIS
    else:
        exp_seq, exp_prev = None, None
    count = 0
    head: str | None = anchor.hash if anchor is not None else None
    head_seq: int | None = anchor.seq if anchor is not None else None
    macs_present = False
    seen_stream: str | None = None

    for index, raw in enumerate(events):
        item = raw if isinstance(raw, Item) else Item(raw)
        line = (
            item.line
            if item.line is not None
            else (index + 1 if not isinstance(item.data, Mapping) else None)
        )
        brk = _Locator(breaks, index, line, item)
        count += 1
        data = item.data
        if isinstance(data, Mapping):
            ev: Any = dict(data)
            raw_bytes: bytes | None = None
        else:
            raw_bytes = (
                data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
            )
            raw_bytes = raw_bytes.removesuffix(b"\n")
            try:
                ev = json.loads(raw_bytes.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                brk(
                    BreakKind.TRUNCATED_JSON,
                    "line is not valid JSON (a torn write or edited bytes)",
                )
                exp_seq = None if exp_seq is None else exp_seq + 1
                exp_prev = None
                continue
        problem = _malformed(ev)
        if problem is not None:
            seq_guess = ev.get("seq") if isinstance(ev, dict) and _count(ev.get("seq")) else None
            brk(BreakKind.MALFORMED, problem, seq_guess)
            exp_seq = (
                (seq_guess + 1)
                if seq_guess is not None
                else (None if exp_seq is None else exp_seq + 1)
            )
            exp_prev = (
                ev["hash"] if isinstance(ev, dict) and isinstance(ev.get("hash"), str) else None
            )
            continue
        seq: int = ev["seq"]
        if raw_bytes is not None and raw_bytes != canonical_json(ev):
            brk(
                BreakKind.NOT_CANONICAL,
                "bytes differ from the canonical encoding of the event (line edited)",
                seq,
            )
        if event_hash(ev) != ev["hash"]:
            brk(
                BreakKind.HASH_MISMATCH,
                "stored hash does not match the event's content (event modified)",
                seq,
            )
        if check_genesis and index == 0:
            if ev["type"] != EventType.CHAIN_STARTED.value or seq != 0:
                brk(
                    BreakKind.MISSING_GENESIS,
                    "the chain does not start with its chain_started event (events removed "
                    "from the start, or a chain written without one)",
                    seq,
                )
            else:
                integrity = ev["attrs"].get("integrity")
                if require_hmac and integrity != INTEGRITY_HMAC:
                    brk(
                        BreakKind.HMAC_MISMATCH,
                        f"the genesis declares integrity {integrity!r}, but MACs are required",
                        seq,
                    )
        elif ev["type"] == EventType.CHAIN_STARTED.value:
            brk(
                BreakKind.SEQUENCE_REGRESSION,
                "a second chain_started event: a new chain was started inside this one",
                seq,
            )
        if "mac" in ev:
            macs_present = True
        if "mac" not in ev and (integrity == INTEGRITY_HMAC or require_hmac) and hmac_key is None:
            brk(BreakKind.HMAC_MISMATCH, "event has no MAC but the chain requires MACs", seq)
        if hmac_key is not None:
            if "mac" not in ev:
                brk(BreakKind.HMAC_MISMATCH, "event has no MAC but an audit key was given", seq)
            elif not _hmac.compare_digest(ev["mac"], event_mac(hmac_key, ev)):
                brk(
                    BreakKind.HMAC_MISMATCH,
                    "MAC does not verify under the audit key (forged or modified)",
                    seq,
                )
        want_stream = stream or seen_stream
        if want_stream is not None and ev["stream"] != want_stream:
            brk(
                BreakKind.STREAM_MISMATCH,
                f"event belongs to stream {ev['stream']!r}, expected {want_stream!r}",
                seq,
            )
        seen_stream = seen_stream or ev["stream"]
        if exp_seq is not None:
            if seq > exp_seq:
                brk(
                    BreakKind.SEQUENCE_GAP,
                    f"expected seq {exp_seq}, found {seq}: {seq - exp_seq} event(s) missing or moved before this one",
                    seq,
                )
            elif seq < exp_seq:
                brk(
                    BreakKind.SEQUENCE_REGRESSION,
                    f"expected seq {exp_seq}, found {seq}: an event was inserted, duplicated or moved here",
                    seq,
                )
        if exp_prev is not None and ev["prev"] != exp_prev:
            what = (
                "the genesis"
                if exp_prev == GENESIS
                else f"the hash of the preceding event ({exp_prev[:12]}...)"
            )
            brk(
                BreakKind.PREV_MISMATCH,
                f"prev is not {what}: the link to the preceding event is cut",
                seq,
            )
        exp_seq, exp_prev = seq + 1, ev["hash"]
        head, head_seq = ev["hash"], seq
        hashes_at.setdefault(seq, ev["hash"])

    if check_genesis and count == 0:
        breaks.append(
            Break(
                0,
                BreakKind.MISSING_GENESIS,
                "no events: a chain starts with its chain_started event (the log was emptied)",
            )
        )
    for h in heads:
        where = head_seq if head_seq is not None else -1
        if hmac_key is not None and not h.signed_by(hmac_key):
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"the expected head for seq {h.seq} is not signed by the audit key",
                    h.seq,
                )
            )
        elif require_hmac and h.mac is None:
            breaks.append(
                Break(count, BreakKind.HEAD_MISMATCH, "the expected head is unsigned", h.seq)
            )
        want = stream or seen_stream
        if want is not None and h.stream != want:
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"the expected head belongs to stream {h.stream!r}, not {want!r}",
                    h.seq,
                )
            )
        elif h.seq not in hashes_at:
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"the chain ends at seq {where}, but an exported head shows it reached seq "
                    f"{h.seq}: events were removed from the end (expected next seq {h.seq + 1})",
                    h.seq,
                )
            )
        elif hashes_at[h.seq] != h.hash:
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"event seq {h.seq} is not the one the exported head names (rewritten)",
                    h.seq,
                )
            )

    if expected_head is not None and head != expected_head:
        breaks.append(
            Break(
                count,
                BreakKind.HEAD_MISMATCH,
                f"chain ends at {head or GENESIS}, not at the anchored head {expected_head} "
                "(events removed from, or added to, the end)",
                head_seq,
            )
        )
    return VerifyResult(
        count,
        head,
        head_seq,
        seen_stream or stream,
        tuple(breaks),
        hmac_key is not None,
        macs_present,
    )


def read_lines(path: str | os.PathLike[str]) -> list[Item]:
    """The lines of an audit file as :class:`Item` objects with 1-based line numbers.

    A final line without a newline is kept (it is what a torn write leaves behind).
    """
    data = Path(path).read_bytes()
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return [Item(p, i + 1, str(path)) for i, p in enumerate(parts)]


def verify_file(path: str | os.PathLike[str], **kwargs: Any) -> VerifyResult:
    """:func:`verify` over a JSON-lines audit file; breaks carry line numbers."""
    return verify(read_lines(path), **kwargs)


def verify_files(paths: Sequence[str | os.PathLike[str]], **kwargs: Any) -> VerifyResult:
    """Verify rotated files as one chain, in the given order."""
    items: list[Item] = []
    for p in paths:
        items.extend(read_lines(p))
    return verify(items, **kwargs)


def verify_records(
    records: Iterable[tuple[bytes | str | None, bytes | str]],
    **kwargs: Any,
) -> dict[str, VerifyResult]:
    """Verify chains read back from a Kafka audit topic, one per stream (record key).

    ``records`` are ``(key, value)`` pairs in partition order (a consumer's
    ``msg.key(), msg.value()``; all events of a stream share a key, hence a partition, so
    per-key order is the write order).  An event whose ``stream`` field differs from its
    key is reported as a ``stream_mismatch``.  Pass ``from_genesis=False`` when retention
    may have removed the oldest events.
    """
    groups: dict[str, list[Item]] = {}
    heads: dict[str, list[Head]] = {}
    for key, value in records:
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else (key or "")
        g = groups.setdefault(k, [])
        if is_head_record(value):  # an exported head: the chain must reach it
            try:
                heads.setdefault(k, []).append(Head.from_json(value))
                continue
            except ValueError:
                pass  # not a valid head: verify it as an event (and report it)
        g.append(Item(value, len(g) + 1, f"key {k}", "record"))
    return {
        k: verify(items, stream=k or None, expect_head=heads.get(k), **kwargs)
        for k, items in groups.items()
    }


def _first_stream(item: Item) -> str | None:
    try:
        ev = json.loads(item.data)  # type: ignore[arg-type]
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    st = ev.get("stream") if isinstance(ev, dict) else None
    return st if isinstance(st, str) else None


# -- sinks --------------------------------------------------------------------------------


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


def head_file_for(path: str | os.PathLike[str]) -> Path:
    """Where a :class:`FileSink` keeps its exported head: ``<file>.head``, beside the log."""
    p = Path(path)
    return p.with_name(p.name + ".head")


class Fsync(enum.StrEnum):
    ALWAYS = "always"
    """fsync after every event (default: audit events are rare and must survive a crash)."""
    INTERVAL = "interval"
    """fsync at most every ``fsync_interval`` seconds, and on flush/close."""
    NEVER = "never"
    """Leave it to the OS (tests, or a file on a filesystem that is itself replicated)."""


class FileSink:
    """JSON lines in a file opened ``O_APPEND`` with mode 0600, one writer at a time.

    On open, the existing content is verified from the genesis (or from ``start``, for a
    file that continues a rotated one); a file that does not verify is refused with
    :class:`AuditChainError`, because appending to it would bury the break under valid
    events.  An exclusive ``flock`` keeps two processes from interleaving two chains.
    Each event is written with a single ``write(2)``, which ``O_APPEND`` makes atomic with
    respect to other appenders.

    The sink also keeps the chain's last exported signed head in ``<file>.head``
    (:meth:`export_head`, atomically replaced).  On open, a file that no longer reaches
    that head -- emptied, deleted or cut short -- is refused: a writer never silently
    restarts a chain.  ``wait`` is how long to wait for another writer's lock (short-lived
    tools share one file) before giving up.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: Fsync | str = Fsync.ALWAYS,
        fsync_interval: float = 1.0,
        start: Anchor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: float = 0.0,
        known_head: Head | None = None,
    ) -> None:
        self.path = Path(path)
        self.head_path = head_file_for(self.path)
        self.known_head = known_head
        """A head exported elsewhere (the audit topic), used when ``<file>.head`` is gone."""
        self.start_path = self.path.with_name(self.path.name + ".start")
        try:
            self.fsync = Fsync(fsync)
        except ValueError:
            raise ConfigError(
                f"audit fsync must be one of {[f.value for f in Fsync]}, not {fsync!r}"
            ) from None
        self.fsync_interval = fsync_interval
        self.start = start
        self._clock = clock
        self._last_sync = clock()
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                busy = exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
                if busy and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(self._fd)
                if busy:
                    raise AuditSinkError(
                        f"audit file {self.path} is in use by another writer"
                    ) from None
                raise

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        """Verify the file and return its last event.

        Without ``start``, a file whose first event is not ``seq`` 0 (a sink added to a
        running chain, or a rotated file) is verified from its first event on: this check
        only guards against appending to a broken chain; ``streamproc audit verify``
        checks the start against the genesis or an ``--anchor``.
        """
        if self.start is None:
            rotated = self._read_start(stream, hmac_key)
            if rotated is not None:  # `streamproc audit rotate`: continue after the old file
                self.start = rotated.anchor
        exported = self._exported_head(stream, hmac_key)
        items = read_lines(self.path)
        if not items:
            if exported is not None and (self.start is None or exported.seq > self.start.seq):
                raise AuditChainError(
                    f"audit file {self.path} is empty, but its exported head "
                    f"({self._head_source()}) shows chain {exported.stream!r} reached seq "
                    f"{exported.seq}: refusing to start a new chain; the next event must be "
                    f"seq {exported.seq + 1}. Restore the file from a copy (to continue the "
                    "chain in a new file deliberately, use `streamproc audit rotate`)"
                )
            return self.start
        owner = _first_stream(items[0])
        if owner is not None and owner != stream:
            raise AuditChainError(
                f"audit file {self.path} holds the chain of another writer ({owner!r}), not "
                f"{stream!r}: a different --instance (or group id) on the same audit.file. "
                "Give each instance its own audit file, or run with the same --instance"
            )
        from_genesis = True
        if self.start is None:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                from_genesis = json.loads(items[0].data)["seq"] == 0  # type: ignore[arg-type]
        result = verify(
            items, hmac_key=hmac_key, anchor=self.start, stream=stream, from_genesis=from_genesis
        )
        if not result.ok:
            legacy = any(
                b.kind is BreakKind.MISSING_GENESIS and b.index == 0 and b.seq == 0
                for b in result.breaks
            )
            hint = (
                "\n(a file written before chains began with chain_started: verify it with "
                "the version that wrote it, move it aside and start a new file)"
                if legacy
                else ""
            )
            raise AuditChainError(
                f"audit file {self.path} does not verify; refusing to append "
                f"(run: streamproc audit verify {self.path})\n{result.report()}{hint}"
            )
        if exported is not None:
            reach = verify(
                items,
                anchor=self.start,
                stream=stream,
                from_genesis=from_genesis,
                expect_head=exported,
            )
            if not reach.ok:
                raise AuditChainError(
                    f"audit file {self.path} ends at seq {result.head_seq}, but its exported "
                    f"head ({self._head_source()}) shows the chain reached seq {exported.seq}: "
                    f"events were removed; refusing to append (the next event must be seq "
                    f"{exported.seq + 1}). Restore the file from a copy"
                )
        return result.anchor

    def _read_start(self, stream: str, hmac_key: bytes | None) -> Head | None:
        """The head ``<file>.start`` says this file continues (written by ``audit rotate``)."""
        try:
            h = Head.from_json(self.start_path.read_bytes().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise AuditChainError(f"{self.start_path} is not an exported audit head") from None
        if hmac_key is not None and not h.signed_by(hmac_key):
            raise AuditChainError(f"{self.start_path} is not signed by the audit key")
        if h.stream != stream:
            raise AuditChainError(
                f"{self.start_path} continues the chain of another writer ({h.stream!r}), "
                f"not {stream!r}"
            )
        return h

    def _exported_head(self, stream: str, hmac_key: bytes | None) -> Head | None:
        try:
            data = self.head_path.read_bytes()
        except FileNotFoundError:
            if self.start_path.exists():  # rotated deliberately: the .start head rules
                return None
            h = self.known_head
            if h is not None and hmac_key is not None and not h.signed_by(hmac_key):
                raise AuditChainError(
                    f"the exported head of {stream!r} on the audit topic is not signed by "
                    "the audit key: refusing to trust it or the file"
                ) from None
            return h if h is not None and h.stream == stream else None
        except OSError as exc:
            raise AuditChainError(f"cannot read {self.head_path} ({exc.strerror})") from None
        try:
            h = Head.from_json(data.strip())
        except ValueError:
            raise AuditChainError(f"{self.head_path} is not an exported audit head") from None
        if hmac_key is not None and not h.signed_by(hmac_key):
            raise AuditChainError(
                f"{self.head_path} is not signed by the audit key: refusing to trust the file"
            )
        if h.stream != stream:
            raise AuditChainError(
                f"audit file {self.path} holds the chain of another writer ({h.stream!r}), "
                f"not {stream!r} (per {self.head_path.name}): a different --instance (or "
                "group id) on the same audit.file. Give each instance its own audit file, "
                "or run with the same --instance"
            )
        return h

    def _head_source(self) -> str:
        return str(self.head_path) if self.head_path.exists() else "the audit topic"

    def export_head(self, head: Head) -> None:
        """Atomically replace ``<file>.head`` (write, fsync, rename) with ``head``.

        The log is synced first, so after a crash the head on disk never claims events the
        log lost (which would make the next writer refuse a file that was not tampered with).
        """
        self._sync()
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, head.to_json() + b"\n")
                if self.fsync is not Fsync.NEVER:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.head_path)
        except OSError as exc:
            raise AuditSinkError(
                f"cannot write the audit head {self.head_path}: {exc.strerror}"
            ) from None

    def write(self, line: bytes) -> None:
        try:
            n = os.write(self._fd, line)
        except OSError as exc:
            raise AuditSinkError(
                f"cannot append to audit file {self.path}: {exc.strerror}"
            ) from None
        if n != len(line):
            raise AuditSinkError(
                f"short write to audit file {self.path} ({n} of {len(line)} bytes)"
            )
        self._dirty = True
        now = self._clock()
        if self.fsync is Fsync.ALWAYS or (
            self.fsync is Fsync.INTERVAL and now - self._last_sync >= self.fsync_interval
        ):
            self._sync(now)

    def _sync(self, now: float | None = None) -> None:
        if self._dirty and self.fsync is not Fsync.NEVER:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditSinkError(
                    f"cannot fsync audit file {self.path}: {exc.strerror}"
                ) from None
        self._dirty = False
        self._last_sync = self._clock() if now is None else now

    def flush(self) -> None:
        self._sync()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self._sync()
            finally:
                os.close(self._fd)  # releases the flock
                self._fd = -1


class ProducerLike(Protocol):
    def produce(self, topic: str, key: bytes | None = ..., value: bytes | None = ...) -> Any: ...

    def flush(self) -> Any: ...


class KafkaSink:
    """Events to a Kafka audit topic, record key = stream id.

    Give it its own idempotent, *non-transactional* producer (``acks=all``,
    ``enable.idempotence=true``): an aborted processing transaction must not take audit
    events with it.  With ``flush_each`` (default) every event is flushed before
    :meth:`AuditLog.emit` returns, so "audited before returned" holds for Kafka too.
    The sink cannot read back, so on restart the chain is resumed from another sink
    (a :class:`FileSink`) or an explicit ``anchor`` given to :class:`AuditLog`.
    """

    def __init__(self, producer: ProducerLike, topic: str, *, flush_each: bool = True) -> None:
        self.producer = producer
        self.topic = topic
        self.flush_each = flush_each
        self._key: bytes | None = None

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        self._key = stream.encode()
        return None

    def export_head(self, head: Head) -> None:
        """A head record on the topic, keyed like the stream's events (same partition)."""
        self.write(head.to_json())

    def write(self, line: bytes) -> None:
        try:
            self.producer.produce(self.topic, key=self._key, value=line.rstrip(b"\n"))
        except Exception as exc:  # confluent_kafka raises BufferError/KafkaException
            raise AuditSinkError(
                f"cannot produce to audit topic {self.topic!r}: {type(exc).__name__}"
            ) from None
        if self.flush_each:
            self.flush()

    def flush(self) -> None:
        left = self.producer.flush()
        if isinstance(left, int) and left > 0:
            raise AuditSinkError(f"{left} audit event(s) not delivered to topic {self.topic!r}")

    def close(self) -> None:
        self.flush()


class MemorySink:
    """Keeps lines in memory (tests, and a ring buffer for a status endpoint)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.heads: list[Head] = []

    def export_head(self, head: Head) -> None:
        self.heads.append(head)

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        if not self.lines:
            return None
        r = verify(self.lines, hmac_key=hmac_key, stream=stream)
        if not r.ok:
            raise AuditChainError(r.report())
        return r.anchor

    def write(self, line: bytes) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.lines]


# -- the log ------------------------------------------------------------------------------


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
                    EventType.CHAIN_STARTED,
                    {
                        "integrity": INTEGRITY_HMAC if hmac_key is not None else INTEGRITY_HASH,
                        "processor_version": __version__,
                    },
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
        event_type: EventType | str,
        attrs: Mapping[str, Any] | None = None,
        *,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """Check, chain, and write one event to every sink; return it.

        The public entry point for every event type (the helpers below only name the
        attributes): ``log.emit(EventType.X, {...}, actor=...)``.  Attributes are checked
        against :data:`ALLOWED_ATTRIBUTES` first; the log's ``context`` is merged in.
        """
        et = EventType(event_type)
        clean = check_attrs(et, {**self.context, **(attrs or {})})
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

    # -- one method per event type (the moments the worker and tools must report) -----------
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
            EventType.POLICY_LOADED,
            {
                "policy_version": policy_version,
                "policy_name": policy_name,
                "source": source,
                "audiences": list(audiences) if audiences is not None else None,
            },
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
            EventType.KEY_ROTATED,
            {
                "kms": kms,
                "key_id": key_id,
                "version": version,
                "previous_version": previous_version,
            },
            actor=actor,
        )

    def key_revoked(
        self, kms: str, key_id: str, version: int, *, actor: str | None = None
    ) -> dict[str, Any]:
        return self.emit(
            EventType.KEY_REVOKED, {"kms": kms, "key_id": key_id, "version": version}, actor=actor
        )

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
        k = (kms, key_id, version)
        with self._lock:
            if k in self._seen_revocations:
                return None
            self._seen_revocations.add(k)
        try:
            return self.emit(
                EventType.KEY_REVOCATION_SEEN,
                {
                    "kms": kms,
                    "key_id": key_id,
                    "version": version,
                    "topic": topic,
                    "partition": partition,
                },
                actor=actor,
            )
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
            EventType.AUDIENCE_KEY_EXPORTED,
            {"kms": kms, "key_id": key_id, "audience": audience, "key_version": key_version},
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
            EventType.REIDENTIFICATION,
            {
                "audience": audience,
                "domain": domain,
                "field": field,
                "subject": subject,
                "reason": reason,
                "policy_version": policy_version,
                "key_version": key_version,
                "outcome": outcome,
                "error": error,
                "value_digest": value_digest,
            },
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
            EventType.DEAD_LETTER_BURST,
            {
                "reason": reason,
                "topic": topic,
                "count": count,
                "window_seconds": window_seconds,
                "partition": partition,
            },
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
            EventType.ANOMALY,
            {
                "kind": kind,
                "reason": reason,
                "topic": topic,
                "partition": partition,
                "count": count,
                "key_id": key_id,
                "kms": kms,
                "audience": audience,
            },
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
            EventType.PROCESSOR_STARTED,
            {
                "processor_version": processor_version,
                "policy_version": policy_version,
                "instance": instance,
                "policy_name": policy_name,
            },
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
            EventType.PROCESSOR_STOPPED,
            {
                "reason": reason,
                "processor_version": processor_version,
                "instance": instance,
                "count": count,
            },
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
            EventType.SOURCE_TOPIC_READ,
            {"topic": topic, "reason": reason, "outcome": outcome, "count": count, "error": error},
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


# -- keys and reading ----------------------------------------------------------------------


def load_hmac_key(path: str | os.PathLike[str]) -> bytes:
    """Read an audit HMAC key file: base64 of at least 32 random bytes, mode 0600 or stricter."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read audit key file {p} ({exc.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"audit key file {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 or stricter"
        )
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"audit key file {p} is not base64") from None
    if len(key) < 32:
        raise ConfigError(f"audit key in {p} is shorter than 32 bytes")
    return key


def write_hmac_key(path: str | os.PathLike[str]) -> None:
    """Create a new random audit HMAC key file (mode 0600; refuses to overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")


def iter_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any] | None]:
    """Parsed events of a file (``None`` for an unparsable line); for display, not trust."""
    for item in read_lines(path):
        assert isinstance(item.data, bytes)
        try:
            ev = json.loads(item.data)
        except (UnicodeDecodeError, ValueError):
            yield None
            continue
        yield ev if isinstance(ev, dict) else None


# -- opening the configured trail (the public API for tools) ------------------------------------


class AuditUnavailable(AuditError):
    """No audit trail is configured, or it cannot be opened: the caller must not proceed."""


class _AuditProducer:
    """A dedicated idempotent, non-transactional producer for :class:`KafkaSink`.

    Adds what ``KafkaSink`` cannot see through a bare ``Producer``: delivery failures
    (reported to a callback, not by ``flush()``) and a bounded ``flush`` (a broker outage
    must fail the audit write, not hang the caller).
    """

    def __init__(self, producer: Any, timeout: float = 30.0) -> None:
        self._p = producer
        self._timeout = timeout
        self._errors: list[str] = []

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        self._p.produce(topic, key=key, value=value, on_delivery=self._done)

    def _done(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err.name()))

    def flush(self) -> int:
        left = int(self._p.flush(self._timeout))
        if self._errors:
            first, self._errors = self._errors[0], []
            raise AuditSinkError(f"audit event not delivered ({first})")
        return left


def read_topic_heads(
    consumer_conf: Mapping[str, Any],
    topic: str,
    *,
    timeout: float = 30.0,
    consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Head]:
    """The latest exported :class:`Head` of every stream on an audit topic.

    Reads every partition from its low to its high watermark (no consumer group, nothing
    committed).  A topic that does not exist yet has no heads.  Raises
    :class:`AuditUnavailable` when the topic cannot be read to its end within
    ``timeout``: a writer that cannot learn how far its chain had got must not start.
    """
    from confluent_kafka import KafkaError, TopicPartition

    if consumer_factory is None:
        from confluent_kafka import Consumer

        consumer_factory = Consumer
    c = consumer_factory(
        {
            **consumer_conf,
            "group.id": f"streamproc-audit-heads-{os.urandom(4).hex()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
        }
    )
    heads: dict[str, Head] = {}
    deadline = time.monotonic() + timeout
    try:
        md = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or (
            md.error is not None and md.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            return heads
        if md.error is not None:
            raise AuditUnavailable(f"cannot read audit topic {topic!r} ({md.error.name()})")
        todo: dict[int, int] = {}
        assign = []
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                todo[p] = high
                assign.append(TopicPartition(topic, p, low))
        c.assign(assign)
        while todo:
            if time.monotonic() > deadline:
                raise AuditUnavailable(
                    f"cannot read audit topic {topic!r} to its end within {timeout:.0f} s"
                )
            for m in c.consume(1000, 0.5):
                if m.error() is not None:
                    continue
                v, k = m.value(), m.key()
                if v is not None and is_head_record(v):
                    with contextlib.suppress(ValueError):
                        h = Head.from_json(v)
                        if k is not None and h.stream == k.decode("utf-8", "replace"):
                            old = heads.get(h.stream)
                            if old is None or h.seq >= old.seq:
                                heads[h.stream] = h
                part, off = m.partition(), m.offset()
                if part is not None and off is not None and off + 1 >= todo.get(part, 0):
                    todo.pop(part, None)
    except AuditUnavailable:
        raise
    except Exception as exc:  # KafkaException and friends: name the class only
        raise AuditUnavailable(
            f"cannot read audit topic {topic!r} ({type(exc).__name__})"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            c.close()
    return heads


TOOLS_STREAM = "tools"
"""The chain of the command-line tools (re-identification, key and secret commands, ...)."""


def tool_audit_file(path: str | os.PathLike[str]) -> Path:
    """``<stem>-tools<suffix>`` beside ``audit.file``: the tools' own chain and lock.

    The processor holds its file's lock while it runs, so tools cannot append there; one
    shared tools file keeps every operator action in one verifiable chain.
    """
    p = Path(path)
    return p.with_name(f"{p.stem}-{TOOLS_STREAM}{p.suffix}")


def open_log(
    config: Any,
    *,
    stream: str,
    actor: str,
    file: str | os.PathLike[str] | None = None,
    wait: float = 0.0,
    context: Mapping[str, Any] | None = None,
    producer_factory: Callable[[dict[str, Any]], Any] | None = None,
    head_interval: float = 30.0,
    client_id: str | None = None,
    consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> AuditLog:
    """The audit trail of ``config.audit`` (a :class:`streamproc.config.Config`).

    Sinks: ``file`` (default ``audit.file``) and/or ``audit.kafka_topic`` (its own
    idempotent, non-transactional producer).  With only a topic (a sink that cannot read
    back) the stream id gets the start time appended: each run is its own chain.  With
    both, and no ``<file>.head`` beside the file, the latest head exported to the topic
    (:func:`read_topic_heads`) is what the file must reach.  Raises
    :class:`AuditUnavailable` when ``audit:`` is missing, :class:`AuditError` when a sink
    cannot be opened (locked, not verifying, cut short) and
    :class:`~streamproc.errors.ConfigError` for a bad key file -- callers fail closed.
    """
    ac = getattr(config, "audit", None)
    if ac is None:
        raise AuditUnavailable(
            f"{getattr(config, 'path', 'the config')} has no audit: section; this action is "
            "only allowed with an audit trail (docs/keys.md, section 7)"
        )
    key = load_hmac_key(ac.hmac_key_file) if ac.hmac_key_file is not None else None
    path = Path(file) if file is not None else ac.file
    if path is None:
        stream = f"{stream}:{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    sinks: list[AuditSink] = []
    known: Head | None = None
    if (
        path is not None
        and ac.kafka_topic is not None
        and not head_file_for(path).exists()
        and not path.with_name(path.name + ".start").exists()
    ):
        # No head beside the file (first start, or deleted with the file): the topic's copy
        # decides whether this file may start or continue a chain.
        consumer_conf = getattr(config, "consumer_config", config.producer_config)()
        known = read_topic_heads(
            {k: v for k, v in consumer_conf.items() if not callable(v)},
            ac.kafka_topic,
            consumer_factory=consumer_factory,
        ).get(stream)
    try:
        if path is not None:
            try:
                sinks.append(
                    FileSink(path, fsync=ac.fsync, wait=wait, known_head=known)
                )
            except OSError as exc:
                raise AuditUnavailable(
                    f"cannot open audit file {path} ({exc.strerror})"
                ) from None
        if ac.kafka_topic is not None:
            if producer_factory is None:
                from confluent_kafka import Producer

                producer_factory = Producer
            conf = {
                "message.timeout.ms": 30_000,  # bounded: an outage fails the write
                **config.producer_config(),
                "client.id": client_id
                or f"streamproc-{getattr(config, 'group_id', 'tools')}-audit",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
            }
            sinks.append(KafkaSink(_AuditProducer(producer_factory(conf)), ac.kafka_topic))
        return AuditLog(
            sinks,
            stream=stream,
            actor=actor,
            hmac_key=key,
            context=context,
            head_interval=head_interval,
        )
    except BaseException:
        for s in sinks:  # AuditLog closes them itself only once it owns them
            with contextlib.suppress(Exception):
                s.close()
        raise


def open_tool_log(
    config: Any,
    *,
    note: str | None = None,
    producer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> AuditLog:
    """The audit trail for an operator command: ``log = open_tool_log(config)``.

    The actor is the caller's authenticated identity (:func:`streamproc.identity.resolve_actor`:
    the Vault/OpenBao token, the AWS caller, else the OS user), recorded on every event
    with ``actor_source``; ``note`` (a command's ``--actor`` text) is recorded beside it,
    never instead of it.  Events go to the tools' chain (:func:`tool_audit_file`, stream
    ``tools``; waits up to 30 s for another tool's lock) and the audit topic.  Emit with
    ``log.emit(EventType.X, {...})`` *before* acting, and ``log.close()`` after (exports the
    signed head).  Any failure raises: nothing may happen unaudited.
    """
    from streamproc.identity import resolve_actor

    who = resolve_actor(config)
    ac = getattr(config, "audit", None)
    file = tool_audit_file(ac.file) if ac is not None and ac.file is not None else None
    if note is not None and not ATTRIBUTE_RULES["note"](note):
        raise AuditAttributeError(
            "the note must be short printable text without personal data (no e-mail "
            "addresses or long digit runs)"
        )
    # With a file the tools share one chain; with only a topic each run is its own chain,
    # named by a random run id as well as the start time, so two runs cannot collide.
    stream = TOOLS_STREAM if file is not None else f"{TOOLS_STREAM}-{os.urandom(4).hex()}"
    return open_log(
        config,
        stream=stream,
        actor=who.principal,
        file=file,
        wait=30.0,
        context={"actor_source": who.source, "note": note},
        producer_factory=producer_factory,
    )


def run_audited(
    log: AuditLog,
    event_type: EventType | str,
    attrs: Mapping[str, Any],
    action: Callable[[], Any],
) -> Any:
    """Write the event (``outcome: success``) *then* run ``action``; return its result.

    Fail closed: when the event cannot be written the action does not run.  When the
    action fails after its event was written, a second event of the same type with
    ``outcome: failed`` and ``error`` (the exception class) follows, and the exception
    propagates.  Used by the key and secret commands; any operator action fits.
    """
    log.emit(event_type, {**attrs, "outcome": "success"})
    try:
        return action()
    except BaseException as exc:
        with contextlib.suppress(AuditError):
            log.emit(event_type, {**attrs, "outcome": "failed", "error": type(exc).__name__})
        raise


def rotate_file(
    path: str | os.PathLike[str],
    *,
    hmac_key: bytes | None = None,
    new_hmac_key: bytes | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[Path, Head]:
    """Move a verified audit file aside so its chain continues in a fresh file.

    The deliberate counterpart of the writers' refusal to restart a chain: the file (and
    its ``.head``/``.start``) become ``<stem>.<UTC time><suffix>``, and ``<file>.start``
    holds the signed head the next writer continues from (seq + 1, same stream).  Holds
    the file's lock throughout, so it fails while a writer runs.  ``new_hmac_key`` signs
    the start head for a rotated audit key (the old file keeps verifying with the old one).
    Returns the moved file and the start head.
    """
    p = Path(path)
    items = read_lines(p) if p.exists() else []
    stream = _first_stream(items[0]) if items else None
    if stream is None:
        raise AuditChainError(f"{p} holds no events: nothing to rotate")
    sink = FileSink(p, fsync=Fsync.ALWAYS)
    try:
        anchor = sink.head(stream, hmac_key)  # verifies, also against its exported head
        if anchor is None:
            raise AuditChainError(f"{p} holds no events: nothing to rotate")
        head = Head.make(stream, anchor.seq, anchor.hash, new_hmac_key or hmac_key)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
        old = p.with_name(f"{p.stem}.{stamp}{p.suffix}")
        if old.exists():
            raise AuditChainError(f"{old} already exists; try again in a second")
        for src, dst in (
            (sink.head_path, head_file_for(old)),
            (sink.start_path, old.with_name(old.name + ".start")),
        ):
            if src.exists():
                os.replace(src, dst)
        os.replace(p, old)
        tmp = sink.start_path.with_name(sink.start_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, head.to_json() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, sink.start_path)
    finally:
        sink.close()
    return old, head
