"""The dead-letter record format: the original record, sealed under the quarantine KEK.

A dead letter must keep the original recoverable (to find the producer's bug, to replay
the record once the cause is fixed) without holding anything sensitive in the clear:
producers put customer ids in record keys and trace data in headers, and a value that is
not an envelope may be plaintext.  So the original key, headers and value travel *inside*
an envelope (docs/wire-format.md, the same format as every other sealed value) under a
dedicated quarantine KEK (config ``dead_letter.kek``) that only the incident-response role
can unwrap; the processor can only seal under it.  A value that was an envelope stays
sealed under its own source KEK in there too.

The dead-letter record:

* **key**: a token of the original key (HMAC-SHA256 under a key derived from the pseudonym
  master with HKDF info ``dead_letter\\0streamproc/dlq/record_key``, outside every
  audience's and shared domain's namespace), so dead letters of one original key land
  in one DLQ partition, in order, and nobody can read the key back from it.  No
  ``keys.pseudonym`` in the policy: no key (``None``).
* **value**: ``seal(quarantine KEK, DLQ topic, payload)``; the payload layout is
  :func:`encode_payload`.
* **headers** (clear, UTF-8 text, nothing from the record itself):

  ========================================  ==========================================
  ``streamproc.dlq.reason``                 the :class:`~streamproc.errors.Reason` value
  ``streamproc.dlq.detail``                 the value-free detail (key ids as configured
                                            id or digest, schema ids, sizes), printable
                                            ASCII, at most 256 characters
  ``streamproc.dlq.format``                 ``sealed-v1``
  ``streamproc.source.topic``               source topic
  ``streamproc.source.partition``           source partition
  ``streamproc.source.offset``              source offset
  ``streamproc.source.timestamp``           source record timestamp (ms), if it had one
  ``streamproc.processor.version``          the processor version that quarantined it
  ========================================  ==========================================

The detail is value-free by contract (the pipeline names key ids only as a configured id
or a digest); the header copy is escaped to printable ASCII and capped besides, so on-call
can triage with kcat without the incident-response key.  The sealed payload has it too.

Size: a dead letter never exceeds the worker's record limit
(:mod:`streamproc.runtime.limits`), or the DLQ itself would be the poison pill.  If the
whole original does not fit, the value is **truncated** (the payload keeps its length and
SHA-256); if even the key and headers do not fit, the payload is a **reference** (source
coordinates, lengths and digests only; the original stays in the source topic until its
retention ends).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streamproc import __version__
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms import KmsProvider
from streamproc.errors import KmsError, SealingUnavailable, StreamprocError
from streamproc.pipeline.core import (
    H_PROCESSOR,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    BatchResult,
    Pipeline,
    Quarantined,
)
from streamproc.runtime.checkpoint import InvariantViolation
from streamproc.runtime.limits import RecordLimit, record_size

H_DLQ_REASON = "streamproc.dlq.reason"
H_DLQ_DETAIL = "streamproc.dlq.detail"
H_DLQ_FORMAT = "streamproc.dlq.format"
H_SOURCE_TIMESTAMP = "streamproc.source.timestamp"
FORMAT = "sealed-v1"
#: The pseudonym domain of dead-letter keys (never an audience's domain: unlinkable).
KEY_TOKEN_DOMAIN = "streamproc/dlq/record_key"
#: Longest ``streamproc.dlq.detail`` value; details are short by contract.
MAX_DETAIL = 256

_MAGIC = b"SPDL\x01"
_F_KEY = 1
_F_VALUE = 2
_F_TRUNCATED = 4
_F_REFERENCE = 8
_FIXED = struct.Struct(">BiqqiiI32s32s")
_I32 = struct.Struct(">i")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_VERSION = __version__.encode()
_FORMAT_B = FORMAT.encode()


class DeadLetterError(StreamprocError):
    """A dead letter that cannot be opened or does not verify (names no content)."""


@dataclass(frozen=True)
class DeadLetter:
    """A quarantined record as sealed in the DLQ (``key``/``headers``/``value`` are the
    original's; ``value`` is a prefix when ``truncated``; all three are empty when
    ``reference``)."""

    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    value: bytes | None
    key_length: int  # -1: no key
    value_length: int  # -1: no value
    key_sha256: bytes
    value_sha256: bytes
    header_count: int
    truncated: bool = False
    reference: bool = False
    #: Where the dead letter itself is (set when read from the DLQ).
    dlq: tuple[str, int, int] | None = field(default=None, compare=False)

    @property
    def complete(self) -> bool:
        """The original key, headers and value are all here (it can be replayed)."""
        return not (self.truncated or self.reference)


def _digest(b: bytes | None) -> bytes:
    return hashlib.sha256(b).digest() if b is not None else bytes(32)


def _str16(s: str) -> bytes:
    b = s.encode("utf-8", "replace")[:65535]
    return _U16.pack(len(b)) + b


def _blob(b: bytes | None) -> bytes:
    return _I32.pack(-1) if b is None else _I32.pack(len(b)) + b


def from_quarantined(q: Quarantined) -> DeadLetter:
    rec = q.record
    return DeadLetter(
        reason=q.reason.value,
        detail=q.detail[:MAX_DETAIL],
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp_ms,
        key=rec.key,
        headers=tuple(rec.headers),
        value=rec.value,
        key_length=-1 if rec.key is None else len(rec.key),
        value_length=-1 if rec.value is None else len(rec.value),
        key_sha256=_digest(rec.key),
        value_sha256=_digest(rec.value),
        header_count=len(rec.headers),
    )


def encode_payload(d: DeadLetter) -> bytes:
    """``SPDL 01`` + fixed fields + reason, detail, topic + (unless a reference) key,
    headers, value.  Integers big-endian; ``-1`` lengths mean ``None``."""
    flags = (
        (_F_KEY if d.key is not None else 0)
        | (_F_VALUE if d.value is not None else 0)
        | (_F_TRUNCATED if d.truncated else 0)
        | (_F_REFERENCE if d.reference else 0)
    )
    parts = [
        _MAGIC,
        _FIXED.pack(
            flags,
            d.partition,
            d.offset,
            -1 if d.timestamp_ms is None else d.timestamp_ms,
            d.key_length,
            d.value_length,
            d.header_count,
            d.key_sha256,
            d.value_sha256,
        ),
        _str16(d.reason),
        _str16(d.detail),
        _str16(d.topic),
    ]
    if not d.reference:
        parts.append(_blob(d.key))
        parts.append(_U32.pack(len(d.headers)))
        for name, v in d.headers:
            parts.append(_str16(name))
            parts.append(_blob(v))
        parts.append(_blob(d.value))
    return b"".join(parts)


def decode_payload(data: bytes) -> DeadLetter:
    """The inverse of :func:`encode_payload`; :class:`DeadLetterError` if malformed."""
    try:
        if not data.startswith(_MAGIC):
            raise DeadLetterError("not a sealed-v1 dead letter payload")
        pos = len(_MAGIC)
        flags, part, off, ts, klen, vlen, hcount, ksha, vsha = _FIXED.unpack_from(data, pos)
        pos += _FIXED.size

        def s16() -> str:
            nonlocal pos
            (n,) = _U16.unpack_from(data, pos)
            pos += 2
            out = data[pos : pos + n]
            if len(out) != n:
                raise DeadLetterError("truncated payload")
            pos += n
            return out.decode("utf-8", "replace")

        def blob() -> bytes | None:
            nonlocal pos
            (n,) = _I32.unpack_from(data, pos)
            pos += 4
            if n < 0:
                return None
            out = data[pos : pos + n]
            if len(out) != n:
                raise DeadLetterError("truncated payload")
            pos += n
            return bytes(out)

        reason, detail, topic = s16(), s16(), s16()
        key: bytes | None = None
        value: bytes | None = None
        headers: list[tuple[str, bytes | None]] = []
        if not flags & _F_REFERENCE:
            key = blob()
            (n,) = _U32.unpack_from(data, pos)
            pos += 4
            for _ in range(n):
                name = s16()
                headers.append((name, blob()))
            value = blob()
        if pos != len(data):
            raise DeadLetterError("trailing bytes after the payload")
    except struct.error:
        raise DeadLetterError("truncated payload") from None
    return DeadLetter(
        reason=reason,
        detail=detail,
        topic=topic,
        partition=part,
        offset=off,
        timestamp_ms=None if ts < 0 else ts,
        key=key,
        headers=tuple(headers),
        value=value,
        key_length=klen,
        value_length=vlen,
        key_sha256=ksha,
        value_sha256=vsha,
        header_count=hcount,
        truncated=bool(flags & _F_TRUNCATED),
        reference=bool(flags & _F_REFERENCE),
    )


def _header_text(detail: str) -> bytes:
    """The detail as printable ASCII, capped: defence in depth for a header consumers
    print.  Details are value-free by contract (KEK ids from envelopes appear only as a
    configured, escaped id or a digest); this only guarantees no control character, no
    non-ASCII text and no unbounded length can ride along."""
    out = []
    for c in detail[:MAX_DETAIL]:
        if " " <= c <= "~":
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return "".join(out)[:MAX_DETAIL].encode("ascii")


def clear_headers(d: DeadLetter) -> list[tuple[str, bytes | None]]:
    """The non-sensitive metadata a dead letter carries in the clear."""
    out: list[tuple[str, bytes | None]] = [
        (H_DLQ_REASON, d.reason.encode()),
        (H_DLQ_DETAIL, _header_text(d.detail)),
        (H_DLQ_FORMAT, _FORMAT_B),
        (H_SOURCE_TOPIC, d.topic.encode()),
        (H_SOURCE_PARTITION, str(d.partition).encode()),
        (H_SOURCE_OFFSET, str(d.offset).encode()),
    ]
    if d.timestamp_ms is not None:
        out.append((H_SOURCE_TIMESTAMP, str(d.timestamp_ms).encode()))
    out.append((H_PROCESSOR, _VERSION))
    return out


def dead_letter_headers(q: Quarantined) -> list[tuple[str, bytes | None]]:
    """The clear headers of ``q``'s dead letter (no original header is among them)."""
    return clear_headers(from_quarantined(q))


class DeadLetterWriter:
    """Builds sealed dead letters that fit the record limit.

    ``key_token``: original key -> DLQ key (see the module doc); ``None`` -> unkeyed.
    """

    def __init__(
        self,
        kms: KmsProvider,
        kek_id: str,
        *,
        key_token: Callable[[bytes], bytes] | None,
        limit: RecordLimit | None = None,
        sealer_factory: Callable[[KmsProvider, str, str], Sealer] | None = None,
    ) -> None:
        self.kms = kms
        self.kek_id = kek_id
        self.key_token = key_token
        self.limit = limit
        self._make = sealer_factory or (lambda k, kek, topic: Sealer(k, kek, topic))
        self._sealers: dict[str, Sealer] = {}
        #: Dead letters written truncated / as references (tests, the final log line).
        self.truncated = 0
        self.references = 0

    def _sealer(self, topic: str) -> Sealer:
        s = self._sealers.get(topic)
        if s is None:
            s = self._sealers[topic] = self._make(self.kms, self.kek_id, topic)
        return s

    def check(self, topics: Iterable[str]) -> None:
        """Generate a data key per DLQ topic now: a missing or forbidden quarantine KEK
        is a start-up error, not a surprise at the first bad record.  KMS errors
        propagate (the caller classifies them)."""
        for t in topics:
            self._sealer(t).rotate()

    def build(
        self, q: Quarantined, dlq_topic: str
    ) -> tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]:
        """``(key, sealed value, clear headers)`` of ``q``'s dead letter in ``dlq_topic``."""
        d = from_quarantined(q)
        key = None
        if d.key is not None and self.key_token is not None:
            key = self.key_token(d.key)
        headers = clear_headers(d)
        sealer = self._sealer(dlq_topic)
        value = sealer.seal(encode_payload(d))
        limit = self.limit
        if limit is None or limit.fits(key, value, headers):
            return key, value, headers
        # Too large: keep as much of the value as fits (AES-GCM adds a fixed overhead, so
        # shrinking the plaintext by the excess shrinks the record by exactly as much).
        excess = record_size(key, value, headers) - limit.max_bytes
        keep = (len(d.value) if d.value else 0) - excess
        if keep >= 0 and d.value is not None:
            t = dataclasses.replace(d, value=d.value[:keep], truncated=True)
            value = sealer.seal(encode_payload(t))
            if limit.fits(key, value, headers):
                self.truncated += 1
                return key, value, headers
        r = dataclasses.replace(d, key=None, headers=(), value=None, reference=True)
        value = sealer.seal(encode_payload(r))
        self.references += 1
        return key, value, headers


    def seal_batch(
        self, quarantined: Sequence[Quarantined], dlq_for: Mapping[str, str]
    ) -> list[OutDeadLetter]:
        """One sealed dead letter per quarantined record, in order (``dlq_for``: source
        topic -> its dead-letter topic).

        Every KMS error of the quarantine KEK is :class:`SealingUnavailable` (transient):
        the KEK is configuration, never a record's fault, so the batch waits, it does not
        exit and it does not go anywhere unsealed.
        """
        out = []
        for q in quarantined:
            dlq = dlq_for.get(q.record.topic)
            if dlq is None:
                raise InvariantViolation(
                    f"quarantined record of {q.record.topic!r} has no dead-letter topic"
                )
            try:
                key, value, headers = self.build(q, dlq)
            except SealingUnavailable:
                raise
            except KmsError as exc:
                raise SealingUnavailable(
                    f"dead letters for {dlq!r} under {self.kek_id!r}: {type(exc).__name__}"
                ) from None
            out.append(OutDeadLetter(dlq, key, value, headers))
        return out


class OutDeadLetter(NamedTuple):
    """A sealed dead letter on its way to the dead-letter topic (an ``OutRecord``)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def dlq_key_token(pipeline: Pipeline) -> Callable[[bytes], bytes] | None:
    """original key -> DLQ key: a token in a domain of its own, or ``None`` (no keys)."""
    keys = getattr(pipeline, "keys", None)
    if keys is None:
        return None
    from streamproc.crypto.pseudonym import TOKEN_SALT, hkdf, make_tokenizer

    # HKDF info "dead_letter\0<domain>": outside the "audience\0..." and "shared\0..."
    # namespaces of every audience's token keys, so DLQ keys never join with any output.
    version, master = keys.master()
    tok = make_tokenizer(version, hkdf(master, TOKEN_SALT, f"dead_letter\x00{KEY_TOKEN_DOMAIN}"))
    return lambda k: tok(k).encode()

def produce_order(result: BatchResult, dead: Sequence[OutDeadLetter]) -> list[Any]:
    """A batch's records in produce order: outputs, then one dead letter per quarantined
    record (``dead``: sealed before the transaction, within the record limit)."""
    if not result.quarantined:
        return result.outputs
    if len(dead) != len(result.quarantined):
        raise InvariantViolation("dead letters were not sealed for this batch")
    return [*result.outputs, *dead]


class DeadLetterReader:
    """Opens dead letters with a KMS that may unwrap under the quarantine KEK."""

    def __init__(self, kms: KmsProvider) -> None:
        self.opener = Opener.for_kms(kms)

    def open(
        self,
        dlq_topic: str,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        *,
        where: tuple[str, int, int] | None = None,
    ) -> DeadLetter:
        """Open, decode and check the clear headers against the sealed copy."""
        if value is None:
            raise DeadLetterError("dead letter without a value")
        try:
            plain, _kek, _ver = self.opener.open_parts(dlq_topic, value)
        except StreamprocError as exc:
            reason = getattr(getattr(exc, "reason", None), "value", type(exc).__name__)
            raise DeadLetterError(f"cannot open the dead letter ({reason})") from None
        d = decode_payload(plain)
        clear = {k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in headers}
        expect = {
            H_DLQ_REASON: d.reason,
            H_SOURCE_TOPIC: d.topic,
            H_SOURCE_PARTITION: str(d.partition),
            H_SOURCE_OFFSET: str(d.offset),
        }
        for name, v in expect.items():
            if clear.get(name) != v:
                raise DeadLetterError(f"clear header {name} does not match the sealed dead letter")
        if d.complete and (_digest(d.value) != d.value_sha256 or _digest(d.key) != d.key_sha256):
            raise DeadLetterError("sealed dead letter digests do not match its content")
        return dataclasses.replace(d, dlq=where)


__all__ = [
    "FORMAT",
    "H_DLQ_DETAIL",
    "H_DLQ_FORMAT",
    "H_DLQ_REASON",
    "H_SOURCE_TIMESTAMP",
    "KEY_TOKEN_DOMAIN",
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterReader",
    "DeadLetterWriter",
    "clear_headers",
    "dead_letter_headers",
    "decode_payload",
    "encode_payload",
    "from_quarantined",
    "produce_order",
]
