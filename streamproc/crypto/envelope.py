"""Envelope format v1: AES-256-GCM record values under KMS-wrapped data keys.

Layout (all integers big-endian; see docs/wire-format.md)::

    0      1    version byte, 0x01
    1      1    n = length of the KEK id (1..255)
    2      n    KEK id, UTF-8
    2+n    4    KEK version (u32)
    6+n    2    m = length of the wrapped data key (1..65535)
    8+n    m    wrapped data key (opaque to us; provider-specific)
    8+n+m  4    topic fingerprint: SHA-256(topic)[:4]
    12+n+m 12   GCM nonce (random)
    24+n+m ...  ciphertext || 16-byte GCM tag

The associated data is ``b"streamproc/env/v1\\0" + u16(len(topic)) + topic + header``
where ``header`` is every byte before the nonce.  Relabelling the key id or version,
swapping the wrapped key or moving the ciphertext to another topic therefore fails
authentication.  The fingerprint only lets us *say* ``wrong_topic`` instead of
``tampered``; it is not a security boundary.

Every parse or authentication failure raises :class:`~streamproc.errors.EnvelopeError`
with a reason class and a value-free detail, in the spirit of ``cryptography``'s Fernet.

The KEK id in a header is *producer-supplied text*: anyone who can write to a source
topic chooses it (an e-mail address, a phone number...).  Details therefore never quote
it raw: :func:`kek_label` prints a configured ("known") id escaped and length-capped, and
any other id as ``sha256:`` plus 12 hex digits of its digest -- enough to correlate, with
``printf %s ID | sha256sum``, nothing to read.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streamproc.crypto.dek_cache import DekCache
from streamproc.crypto.kms import DataKey, KmsProvider, kms_error_reason
from streamproc.errors import (
    EnvelopeError,
    KmsError,
    Reason,
    TransientError,
)

VERSION = 0x01
NONCE_LEN = 12
TAG_LEN = 16
_AAD_PREFIX = b"streamproc/env/v1\x00"
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
MIN_LEN = 1 + 1 + 1 + 4 + 2 + 1 + 4 + NONCE_LEN + TAG_LEN

#: Default bounds on data-key reuse.  Random 96-bit nonces stay far below the NIST
#: SP 800-38D limit of 2**32 invocations per key; age bounds the blast radius of a leak.
DEFAULT_MAX_RECORDS_PER_DEK = 1 << 24
DEFAULT_MAX_DEK_AGE_S = 3600.0


#: Longest KEK id shown in clear; longer (configured) ids are cut, with a digest suffix.
KEK_LABEL_MAX = 64


def kek_digest(kek_id: str) -> str:
    """``sha256:`` + the first 12 hex digits of SHA-256 over the id's UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(kek_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def kek_label(kek_id: str, known: Collection[str] = ()) -> str:
    """How a KEK id from an envelope may appear in a log line, error, metric or header.

    Only an id in ``known`` (the KEK ids the configuration names) is shown, quoted,
    escaped to printable ASCII and capped at :data:`KEK_LABEL_MAX` characters; any other
    id is producer-chosen text and is shown as :func:`kek_digest` only.  Escaping also
    keeps a configured id from forging log structure (newlines, ANSI escapes).
    """
    if kek_id not in known:
        return kek_digest(kek_id)
    shown = ascii(kek_id)[1:-1].replace("'", "\\'")
    if len(shown) > KEK_LABEL_MAX:
        shown = shown[: KEK_LABEL_MAX - 15] + "..." + kek_digest(kek_id)[7:]
    return f"'{shown}'"


@lru_cache(maxsize=4096)
def topic_fingerprint(topic: str) -> bytes:
    return hashlib.sha256(topic.encode()).digest()[:4]


@lru_cache(maxsize=4096)
def _topic_aad(topic: str) -> bytes:
    t = topic.encode()
    return _AAD_PREFIX + _U16.pack(len(t)) + t


def build_header(kek_id: str, kek_version: int, wrapped: bytes, topic: str) -> bytes:
    kid = kek_id.encode()
    if not 1 <= len(kid) <= 255:
        raise ValueError("KEK id must be 1..255 bytes")
    if not 1 <= len(wrapped) <= 0xFFFF:
        raise ValueError("wrapped key must be 1..65535 bytes")
    return (
        bytes((VERSION, len(kid)))
        + kid
        + _U32.pack(kek_version)
        + _U16.pack(len(wrapped))
        + wrapped
        + topic_fingerprint(topic)
    )


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    kek_id: str
    kek_version: int
    wrapped: bytes
    fingerprint: bytes
    header_len: int


def parse_header(data: bytes) -> EnvelopeHeader:
    """Parse the cleartext header; raises :class:`EnvelopeError` on any malformation."""
    n = len(data)
    if n == 0:
        raise EnvelopeError(Reason.MALFORMED, "empty value")
    if data[0] != VERSION:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"version byte 0x{data[0]:02x}")
    if n < MIN_LEN:
        raise EnvelopeError(Reason.MALFORMED, f"{n} bytes is shorter than any envelope")
    klen = data[1]
    pos = 2 + klen
    if klen == 0 or pos + 6 > n:
        raise EnvelopeError(Reason.MALFORMED, "bad key id length")
    try:
        kek_id = data[2:pos].decode()
    except UnicodeDecodeError:
        raise EnvelopeError(Reason.MALFORMED, "key id is not UTF-8") from None
    (kver,) = _U32.unpack_from(data, pos)
    (wlen,) = _U16.unpack_from(data, pos + 4)
    pos += 6
    end = pos + wlen
    if wlen == 0 or end + 4 + NONCE_LEN + TAG_LEN > n:
        raise EnvelopeError(Reason.MALFORMED, "bad wrapped key length")
    return EnvelopeHeader(kek_id, kver, data[pos:end], data[end : end + 4], end + 4)


def header_key(data: bytes) -> tuple[str, int] | None:
    """The (KEK id, KEK version) an envelope's header names, or ``None`` if it is none.

    For tools that describe a stored value (``streamproc dlq inspect``) without knowing
    the layout; nothing is authenticated here, and the id is producer-chosen text (show
    it through :func:`kek_label`).
    """
    try:
        h = parse_header(data)
    except EnvelopeError:
        return None
    return h.kek_id, h.kek_version


class Sealer:
    """Seals values for one topic under one KEK, reusing a data key within bounds.

    Thread-safe.  ``clock`` is injectable so tests can drive data-key expiry.
    """

    def __init__(
        self,
        kms: KmsProvider,
        kek_id: str,
        topic: str,
        *,
        max_records: int = DEFAULT_MAX_RECORDS_PER_DEK,
        max_age: float = DEFAULT_MAX_DEK_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_records < 1 or max_age <= 0:
            raise ValueError("data-key reuse bounds must be positive")
        self.kms = kms
        self.kek_id = kek_id
        self.topic = topic
        self.max_records = max_records
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._dek: DataKey | None = None
        self._aead: AESGCM | None = None
        self._prefix = b""
        self._aad = b""
        self._used = 0
        self._born = 0.0
        #: Number of data keys generated so far (one KMS call each).
        self.data_keys_generated = 0

    @property
    def kek_version(self) -> int | None:
        return self._dek.kek_version if self._dek is not None else None

    def _rotate(self, now: float) -> None:
        dek = self.kms.generate_data_key(self.kek_id, {"topic": self.topic})
        self._dek = dek
        self._aead = AESGCM(dek.plaintext)
        self._prefix = build_header(dek.kek_id, dek.kek_version, dek.wrapped, self.topic)
        self._aad = _topic_aad(self.topic) + self._prefix
        self._used = 0
        self._born = now
        self.data_keys_generated += 1

    def rotate(self) -> None:
        """Force a fresh data key (for example after the KEK version was revoked).

        The current data key is dropped first: if the KMS refuses a new one, the sealer
        has no key to fall back to, and every later seal asks the KMS again.
        """
        with self._lock:
            self._dek = None
            self._aead = None
            self._rotate(self._clock())

    def seal(self, plaintext: bytes) -> bytes:
        with self._lock:
            now = self._clock()
            if self._aead is None or self._used >= self.max_records or now - self._born >= self.max_age:
                self._rotate(now)
            self._used += 1
            aead, prefix, aad = self._aead, self._prefix, self._aad
        assert aead is not None
        nonce = os.urandom(NONCE_LEN)
        return prefix + nonce + aead.encrypt(nonce, plaintext, aad)

    def seal_many(self, plaintexts: list[bytes]) -> list[bytes]:
        """Seal a batch with one lock round trip per data key (the pipeline's hot path)."""
        out: list[bytes] = []
        i = 0
        n = len(plaintexts)
        urandom = os.urandom
        while i < n:
            with self._lock:
                now = self._clock()
                if self._aead is None or self._used >= self.max_records or now - self._born >= self.max_age:
                    self._rotate(now)
                take = min(n - i, self.max_records - self._used)
                self._used += take
                aead, prefix, aad = self._aead, self._prefix, self._aad
            assert aead is not None
            enc = aead.encrypt
            for p in plaintexts[i : i + take]:
                nonce = urandom(NONCE_LEN)
                out.append(prefix + nonce + enc(nonce, p, aad))
            i += take
        return out


@dataclass(frozen=True, slots=True)
class Opened:
    plaintext: bytes
    kek_id: str
    kek_version: int


class Opener:
    """Opens envelopes through a :class:`DekCache` (one KMS call per data key)."""

    def __init__(self, cache: DekCache) -> None:
        self.cache = cache
        #: KEK ids the configuration names: shown in clear in details (see kek_label).
        self.known_keks: frozenset[str] = frozenset()
        #: ``admit(topic, kek_id)``: may this KEK seal records of this topic?  Asked before
        #: any KMS call; ``None`` admits every KEK (clients opening their own topics).
        self.admit: Callable[[str, str], bool] | None = None
        #: topic -> {header -> (topic, header, kek id, kek version, wrapped key, AAD, header
        #: length)}, and the entry of the last record opened; see open_parts.
        self._memo: dict[str, dict[bytes, _MemoEntry]] = {}
        self._last: _MemoEntry | None = None

    def configure_keks(
        self, known: Collection[str], admit: Callable[[str, str], bool] | None
    ) -> None:
        """Set the configured KEK ids and the per-topic admission check (see attributes).

        Forgets the header memo: a header admitted before must be checked again.
        """
        self.known_keks = frozenset(known)
        self.admit = admit
        self._memo.clear()
        self._last = None

    def label(self, kek_id: str) -> str:
        """:func:`kek_label` against this opener's configured ids."""
        return kek_label(kek_id, self.known_keks)

    @classmethod
    def for_kms(cls, kms: KmsProvider, **cache_options: float) -> Opener:
        return cls(DekCache(kms, **cache_options))  # type: ignore[arg-type]

    def open(self, topic: str, data: bytes) -> Opened:
        pt, kek_id, kek_version = self.open_parts(topic, data)
        return _new_opened(pt, kek_id, kek_version)

    def open_parts(self, topic: str, data: bytes) -> tuple[bytes, str, int]:
        """:meth:`open` without the result object: ``(plaintext, kek_id, kek_version)``.

        Hot path.  Every record sealed under one data key carries the same header (all the
        bytes before the nonce), so a successfully opened header is memoized per topic as
        ``header -> (topic, header, kek id, version, wrapped key, AAD, header length)``: the
        next record of that data key costs a ``startswith`` against the last header seen
        (or one dict lookup) instead of a parse, a UTF-8 decode and an AAD concatenation.
        The data key itself is still fetched through :class:`DekCache` on every record, so
        TTL, revocation sweeps, ``evict_kek``, LRU order and the hit counters behave exactly
        as without the memo.  Only headers that opened successfully are memoized (forgeries
        never enter), a memo hit means the header is byte-identical to one that parsed and
        matched this topic's fingerprint, and every failure raises the same reason class.
        """
        hit = self._last
        if hit is None or hit[0] != topic or not data.startswith(hit[1]):
            hit = None
            n = len(data)
            if n > 8:
                klen = data[1]
                if n > klen + 8:
                    memo = self._memo.get(topic)
                    if memo is not None:
                        hit = memo.get(data[: klen + 12 + ((data[6 + klen] << 8) | data[7 + klen])])
        if hit is not None:
            _, _, kek_id, kver, wrapped, aad, hl = hit
            if len(data) >= hl + _MIN_BODY:
                aead = self._aead(kek_id, kver, wrapped, topic)
                try:
                    pt = aead.decrypt(data[hl : hl + NONCE_LEN], data[hl + NONCE_LEN :], aad)
                except InvalidTag:
                    raise EnvelopeError(
                        Reason.TAMPERED,
                        f"ciphertext under {self.label(kek_id)} v{kver}",
                        kek_id=kek_id,
                        kek_version=kver,
                    ) from None
                self._last = hit
                return pt, kek_id, kver
        h = parse_header(data)
        if self.admit is not None and not self.admit(topic, h.kek_id):
            raise EnvelopeError(
                Reason.KEK_NOT_ALLOWED,
                f"key {self.label(h.kek_id)} v{h.kek_version} may not seal this source topic",
                kek_id=h.kek_id,
                kek_version=h.kek_version,
            )
        if h.fingerprint != topic_fingerprint(topic):
            raise EnvelopeError(
                Reason.WRONG_TOPIC,
                f"key {self.label(h.kek_id)} v{h.kek_version}; sealed for another topic",
                kek_id=h.kek_id,
                kek_version=h.kek_version,
            )
        aead = self._aead(h.kek_id, h.kek_version, h.wrapped, topic)
        hl = h.header_len
        header = data[:hl]
        aad = _topic_aad(topic) + header
        try:
            pt = aead.decrypt(data[hl : hl + NONCE_LEN], data[hl + NONCE_LEN :], aad)
        except InvalidTag:
            raise EnvelopeError(
                Reason.TAMPERED,
                f"ciphertext under {self.label(h.kek_id)} v{h.kek_version}",
                kek_id=h.kek_id,
                kek_version=h.kek_version,
            ) from None
        memo = self._memo.get(topic)
        if memo is None:
            if len(self._memo) >= _MEMO_TOPICS:
                self._memo.clear()
            memo = self._memo[topic] = {}
        elif len(memo) >= _MEMO_HEADERS:
            memo.clear()  # bounded: one entry per live data key, so this is rare
        memo[header] = self._last = (topic, header, h.kek_id, h.kek_version, h.wrapped, aad, hl)
        return pt, h.kek_id, h.kek_version

    def _aead(self, kek_id: str, kek_version: int, wrapped: bytes, topic: str) -> AESGCM:
        """The data key's AEAD; every KMS failure becomes a reason class or stays transient.

        Transient errors (outages) propagate for the runtime to retry; every other error
        the provider raises -- mapped or not -- is a property of this record's key id or
        wrapped key (both producer-chosen), so it becomes an :class:`EnvelopeError` through
        :func:`~streamproc.crypto.kms.kms_error_reason`.  A record can therefore never
        stop the processor.  The detail names the key by :meth:`label` and the error by
        class; the provider's message (which may quote the key id) is dropped.
        """
        try:
            return self.cache.get(kek_id, kek_version, wrapped, topic)
        except TransientError:
            raise
        except KmsError as exc:
            reason = kms_error_reason(exc) or Reason.KMS_ERROR
            what = f"key {self.label(kek_id)} v{kek_version}"
            if reason is Reason.TAMPERED:
                what = f"wrapped key under {self.label(kek_id)} v{kek_version}"
            elif reason is Reason.KMS_ERROR:
                what += f" ({type(exc).__name__})"
            raise EnvelopeError(reason, what, kek_id=kek_id, kek_version=kek_version) from None


_MemoEntry = tuple[str, bytes, str, int, bytes, bytes, int]
_MIN_BODY = NONCE_LEN + TAG_LEN

#: Bounds of the per-Opener header memo (topics, and headers -- i.e. data keys -- per topic).
_MEMO_TOPICS = 1024
_MEMO_HEADERS = 4096


def fast_dataclass_constructor(cls: type, names: tuple[str, ...]) -> Callable[..., Any]:
    """A positional constructor for a frozen, slotted dataclass that skips its ``__init__``.

    A frozen dataclass's generated ``__init__`` sets each field through
    ``object.__setattr__``; calling the slot descriptors directly builds the same object --
    equal, hashable, still frozen -- in about half the time (hot-path result objects).
    Only for classes without ``__post_init__`` whose fields are exactly ``names``, in order;
    anything else gets the class itself (the normal constructor).
    """
    import dataclasses

    fields = tuple(f.name for f in dataclasses.fields(cls))
    if fields != names or hasattr(cls, "__post_init__") or "__slots__" not in cls.__dict__:
        return cls
    env: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    args = ", ".join(f"a{i}" for i in range(len(names)))
    body = "".join(f"    _s{i}(o, a{i})\n" for i in range(len(names)))
    for i, n in enumerate(names):
        env[f"_s{i}"] = cls.__dict__[n].__set__
    exec(f"def make({args}):\n    o = _new(_cls)\n{body}    return o\n", env)
    make = env["make"]
    make.__qualname__ = make.__name__ = f"new_{cls.__name__}"
    return make


_new_opened = fast_dataclass_constructor(Opened, ("plaintext", "kek_id", "kek_version"))
