"""Per-subject data keys for erasable ``encrypt_deterministic`` (crypto-shredding).

Why per-subject keys
--------------------
A value encrypted under a key that is destroyed is gone, in every copy, without finding
the copies.  Rules marked ``erasable: true`` therefore encrypt under a random AES-SIV key
per (audience, data subject) instead of the audience key derived from the pseudonym
master; ``streamproc forget`` destroys the subject's keys and every value made with them
becomes unreadable, wherever it was copied.  Within one key the encryption stays
deterministic (AES-SIV, RFC 5297), so joins on the value keep working.

Formats (docs/wire-format.md, "Subject-key topic")
--------------------------------------------------
* ciphertext: ``ds1_<key id>_<base64url(SIV tag || ciphertext)>`` -- ``ds`` (deterministic,
  shreddable), format version ``1``, the key id (16 lowercase hex digits, random), AES-SIV
  with associated data ``[domain, key id]``.  Distinguishable from the non-erasable
  ``de<master version>_...`` by its prefix.
* key topic record key: ``<subject token>/<key id>``, where the subject token is a
  ``tk<v>_...`` HMAC of the subject's canonical bytes under
  :meth:`PseudonymKeys.erasure_key <streamproc.crypto.pseudonym.PseudonymKeys.erasure_key>`
  (a processor-own domain, never the raw subject).  A random key id per key means two
  workers creating a key for one subject at once write two records, never one over the
  other.
* key record value (JSON): ``{"v": 1, "audience": A, "key": base64(envelope)}`` where the
  envelope (:mod:`streamproc.crypto.envelope`, sealed for the key topic under the
  audience's KEK through the configured KMS) holds ``"streamproc/erasure-key/v1" NUL
  record key NUL audience NUL key``: the key is never at rest in clear, and a key record
  copied under another record key or audience does not open.
* shred record (``forget``): same record key, ``{"v": 1, "audience": A, "shredded": ms}``
  -- no key material.  It replaces the key record, so compaction deletes the key and keeps
  the fact that it was shredded (re-identification can then say ``subject_forgotten``).
* forgotten marker: ``<subject token>/forgotten`` -> ``{"v": 1, "forgotten": ms}``: no key
  is ever created again for the subject (their later records are withheld from the
  audiences with erasable rules).  A null value (tombstone) lifts the marker.

:class:`SubjectKeyTable` is the worker's in-memory table over that topic (restored and
followed by :mod:`streamproc.runtime.erasure`); :class:`KeyDirectory` is the read-only view
re-identification and ``forget`` build from a full read of the topic.  Both are pure:
records come in as bytes, KMS calls go through the given sealers and opener.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streamproc.crypto.envelope import Sealer
from streamproc.crypto.pseudonym import (
    PseudonymKeys,
    ReidentificationError,
    b64u,
    make_tokenizer,
    unb64u,
)
from streamproc.errors import EnvelopeError, StreamprocError

FORMAT = 1
PREFIX = f"ds{FORMAT}_"
KEY_ID_BYTES = 8
SUBJECT_KEY_BYTES = 64  # AES-SIV with two AES-256 keys, as the audience keys
MARKER = "forgotten"
RECORD_VERSION = 1
_SEALED_PREFIX = b"streamproc/erasure-key/v1\x00"
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_CIPHERTEXT_RE = re.compile(r"ds(\d{1,9})_([0-9a-f]{16})_([A-Za-z0-9_-]+)")
_TOKEN_RE = re.compile(r"tk(\d{1,9})_[A-Za-z0-9_-]{22}")


class SubjectForgotten(StreamprocError):
    """The subject was forgotten: no key exists for them and none may be created.

    Raised by the erasable operator on the hot path; the pipeline withholds the record from
    that audience (reason ``forgotten``).  Carries nothing about the subject.
    """


class KeyRecordError(ValueError):
    """A subject-key topic record that is not in the format above (skipped and logged)."""


class SubjectKeyUnavailable(StreamprocError):
    """A key record exists but does not open (tampered, or sealed under a foreign key)."""


# -- ciphertexts ---------------------------------------------------------------------------------


def new_key_id(rng: Callable[[int], bytes] = os.urandom) -> str:
    return rng(KEY_ID_BYTES).hex()


def encrypt(siv: AESSIV, key_id: str, domain: bytes, plaintext: bytes) -> str:
    """``ds1_<key id>_<base64url(AES-SIV(plaintext, AD=[domain, key id]))>``."""
    return f"{PREFIX}{key_id}_" + b64u(siv.encrypt(plaintext, [domain, key_id.encode()]))


def is_erasable(text: str) -> bool:
    """Whether ``text`` looks like an erasable ciphertext (``ds<format>_<key id>_...``)."""
    return _CIPHERTEXT_RE.fullmatch(text) is not None


def key_id_of(text: str) -> str:
    """The key id an erasable ciphertext names; :class:`ReidentificationError` otherwise."""
    m = _CIPHERTEXT_RE.fullmatch(text)
    if m is None or int(m.group(1)) != FORMAT:
        raise ReidentificationError("value is not an erasable ciphertext (ds1_<key id>_...)")
    return m.group(2)


def decrypt(key: bytes, domain: str, text: str) -> bytes:
    """Reverse a ``ds1_`` value with its subject key; never echoes the input on failure."""
    kid = key_id_of(text)
    body = text[len(PREFIX) + len(kid) + 1 :]
    try:
        return AESSIV(key).decrypt(unb64u(body), [domain.encode(), kid.encode()])
    except (ValueError, InvalidTag, TypeError, binascii.Error):
        raise ReidentificationError("value is not an erasable ciphertext under this key and domain") from None


# -- key topic records ---------------------------------------------------------------------------


def record_key(token: str, suffix: str) -> bytes:
    return f"{token}/{suffix}".encode()


def parse_record_key(key: bytes | None) -> tuple[str, str]:
    """``(subject token, key id or "forgotten")``; :class:`KeyRecordError` otherwise."""
    try:
        text = (key or b"").decode("ascii")
    except UnicodeDecodeError:
        raise KeyRecordError("key record key is not ASCII") from None
    token, sep, suffix = text.partition("/")
    if not sep or _TOKEN_RE.fullmatch(token) is None or not (suffix == MARKER or _KEY_ID_RE.fullmatch(suffix)):
        raise KeyRecordError("key record key is not <subject token>/<key id|forgotten>")
    return token, suffix


def token_version(token: str) -> int:
    return int(token[2 : token.index("_")])


def _sealed_plaintext(rkey: str, audience: str, key: bytes) -> bytes:
    return _SEALED_PREFIX + rkey.encode() + b"\x00" + audience.encode() + b"\x00" + key


def key_value(sealed: bytes, audience: str) -> bytes:
    doc = {"v": RECORD_VERSION, "audience": audience, "key": base64.b64encode(sealed).decode()}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def shred_value(audience: str, at_ms: int) -> bytes:
    doc = {"v": RECORD_VERSION, "audience": audience, "shredded": at_ms}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def marker_value(at_ms: int) -> bytes:
    return json.dumps({"v": RECORD_VERSION, MARKER: at_ms}, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One parsed record of the subject-key topic."""

    token: str
    suffix: str
    """The key id, or :data:`MARKER`."""
    kind: str
    """``key``, ``shred``, ``marker`` or ``tombstone`` (null value)."""
    audience: str | None = None
    sealed: bytes | None = field(default=None, repr=False)


def parse_record(key: bytes | None, value: bytes | None) -> KeyRecord:
    token, suffix = parse_record_key(key)
    if value is None:
        return KeyRecord(token, suffix, "tombstone")
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        raise KeyRecordError("key record value is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != RECORD_VERSION:
        raise KeyRecordError("key record value has an unknown format version")
    if suffix == MARKER:
        if not isinstance(doc.get(MARKER), int):
            raise KeyRecordError("forgotten marker lacks its time")
        return KeyRecord(token, suffix, "marker")
    audience = doc.get("audience")
    if not isinstance(audience, str) or not audience:
        raise KeyRecordError("key record lacks its audience")
    if "shredded" in doc:
        return KeyRecord(token, suffix, "shred", audience)
    try:
        sealed = base64.b64decode(str(doc["key"]), validate=True)
    except (KeyError, binascii.Error, ValueError):
        raise KeyRecordError("key record lacks a base64 key") from None
    return KeyRecord(token, suffix, "key", audience, sealed)


def open_sealed(open_envelope: Callable[[bytes], bytes], rkey: str, audience: str, sealed: bytes) -> bytes:
    """The subject key inside a sealed key record, checked against its record key and audience.

    ``open_envelope`` opens an envelope of the key topic (``Opener.open_parts(topic, v)[0]``);
    its transient errors (KMS outage) propagate, everything else is
    :class:`SubjectKeyUnavailable`.
    """
    # Errors name the key id (random) and never the record key: its first half is the
    # subject's token, a stable identifier of the person.
    kid = rkey.rpartition("/")[2]
    try:
        plain = open_envelope(sealed)
    except EnvelopeError as exc:
        raise SubjectKeyUnavailable(f"subject key {kid} does not open ({exc.reason.value})") from None
    want = _sealed_plaintext(rkey, audience, b"")
    if not plain.startswith(want) or len(plain) != len(want) + SUBJECT_KEY_BYTES:
        raise SubjectKeyUnavailable(f"subject key {kid} was sealed for another record key or audience")
    return plain[len(want) :]


def subject_tokens(keys: PseudonymKeys, subject: bytes, versions: Iterable[int]) -> dict[int, str]:
    """The subject's token under each master version (for ``forget`` and lookups)."""
    out = {}
    for v in sorted(set(versions)):
        ver, k = keys.erasure_key(v)
        out[ver] = make_tokenizer(ver, k)(subject)
    return out


# -- the worker's table ------------------------------------------------------------------------


class _Entry:
    __slots__ = ("audience", "cipher", "key", "kid", "rkey", "sealed", "token")

    def __init__(self, token: str, kid: str, audience: str, sealed: bytes | None, key: bytes | None) -> None:
        self.token, self.kid, self.audience = token, kid, audience
        self.rkey = f"{token}/{kid}"
        self.sealed = sealed
        #: The raw key, only while it is needed: until it is sealed into a key record (a key
        #: this worker created) and its cipher is built; then the AES-SIV object alone holds it.
        self.key = key
        self.cipher: tuple[str, AESSIV, bytes] | None = None


Cipher = tuple[str, AESSIV, bytes]
"""``(ciphertext prefix "ds1_<key id>_", AES-SIV of the key, key id bytes)``."""


class SubjectKeyTable:
    """The worker's subject keys: restored from the key topic, followed, extended per batch.

    Hot path: :meth:`cipher_fn` gives the erasable operator ``subject bytes -> Cipher``.  A
    subject without a key gets a new random one *in memory* (no KMS call on the hot path);
    the pipeline seals it (:meth:`take_writes`) into the batch's state writes, which the
    worker produces in the same transaction as the outputs that used it.  The epoch
    protocol of :mod:`streamproc.pipeline.state` (``begin`` / ``committed`` / ``discard`` /
    ``rollback``) drops the keys of a batch that was not committed: a redo must not use a
    key that was never persisted.

    Keys restored or followed from the topic stay sealed until first used; the first use
    opens them through the KMS (one call per data key, cached), and a KMS outage there
    propagates as :class:`~streamproc.errors.TransientError` (the batch is retried).

    Two keys for one (audience, subject) -- two workers created one at once -- converge:
    the lowest key id wins once both are known.  A forgotten subject's keys are dropped at
    once; any key record of a forgotten subject seen later (a worker that had not yet seen
    the marker) is shredded by this worker's next transaction.
    """

    def __init__(
        self,
        keys: PseudonymKeys,
        *,
        topic: str,
        sealers: Mapping[str, Sealer],
        open_envelope: Callable[[bytes], bytes],
        rng: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.topic = topic
        #: audience -> the sealer of its KEK, for the key topic.
        self.sealers = dict(sealers)
        self._open = open_envelope
        self._rng = rng
        self._clock = clock
        self._lock = threading.RLock()
        self._live: dict[str, _Entry] = {}
        self._chosen: dict[tuple[str, str], _Entry] = {}
        """(audience, token) -> the key in use: the lowest key id of the subject's keys."""
        self._extras: dict[tuple[str, str], list[_Entry]] = {}
        """The subject's other keys, for the rare subject with two (made concurrently)."""
        self._forgotten: set[str] = set()
        self._versions: set[int] = set()
        self._unsent: dict[str, _Entry] = {}
        self._epoch = 0
        self._created: dict[int, list[str]] = {}
        """epoch -> record keys of the keys created in it, until it commits."""
        self._shreds: dict[str, str] = {}
        """Shreds to write (record key -> audience)."""
        self._shreds_taken: dict[int, dict[str, str]] = {}
        self._tokenizers: dict[int, Callable[[bytes], str]] = {}
        self.primary_version = keys.primary_version
        self._tok = self._tokenizer(self.primary_version)
        #: Bumped whenever a key may have gone (forget, shred, rollback, a lower key id):
        #: operators' last-subject caches compare it.
        self.generation = 0
        self.created = 0
        """Keys created by this worker (committed or not)."""

    # -- tokens -----------------------------------------------------------------------------
    def _tokenizer(self, version: int) -> Callable[[bytes], str]:
        tok = self._tokenizers.get(version)
        if tok is None:
            v, k = self.keys.erasure_key(version)
            tok = self._tokenizers[v] = make_tokenizer(v, k)
        return tok

    # -- applying topic records (restore and follow) ------------------------------------------
    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record of the key topic in topic order; :class:`KeyRecordError` if malformed.

        Fail closed on a malformed *value* under a well-formed record key: compaction keeps
        that record in place of the key (or marker) it replaces, so the key is treated as
        gone (never used again) and an unreadable marker as a forget; then the error is
        raised for the caller to count and log.
        """
        try:
            r = parse_record(key, value)
        except KeyRecordError:
            token, suffix = parse_record_key(key)  # a malformed record key names nothing: skipped
            with self._lock:
                if suffix == MARKER:
                    self._forget(token)
                else:
                    self._remove(f"{token}/{suffix}")
            raise
        with self._lock:
            self._versions.add(token_version(r.token))
            rkey = f"{r.token}/{r.suffix}"
            if r.kind == "marker":
                self._forget(r.token)
            elif r.suffix == MARKER:  # a tombstone on the marker: the forget is lifted
                self._forgotten.discard(r.token)
            elif r.kind in ("tombstone", "shred"):
                self._shreds.pop(rkey, None)  # done (by forget or another worker)
                self._remove(rkey)
            elif r.token in self._forgotten:
                assert r.audience is not None
                self._shreds[rkey] = r.audience  # a straggler: created before its worker saw the marker
            elif rkey not in self._live:
                assert r.audience is not None
                self._install(_Entry(r.token, r.suffix, r.audience, r.sealed, None))
            # else: our own key, read back once committed (nothing to do)

    def _forget(self, token: str) -> None:
        self._forgotten.add(token)
        for e in [e for e in self._live.values() if e.token == token]:
            self._shreds[e.rkey] = e.audience
            self._remove(e.rkey)

    def _install(self, e: _Entry) -> None:
        self._live[e.rkey] = e
        sk = (e.audience, e.token)
        cur = self._chosen.get(sk)
        if cur is None:
            self._chosen[sk] = e
        elif e.kid < cur.kid:
            self._chosen[sk] = e
            self._extras.setdefault(sk, []).append(cur)
            self.generation += 1
        else:
            self._extras.setdefault(sk, []).append(e)

    def _remove(self, rkey: str) -> None:
        e = self._live.pop(rkey, None)
        if e is None:
            return
        self._unsent.pop(rkey, None)
        sk = (e.audience, e.token)
        extras = self._extras.get(sk)
        if self._chosen.get(sk) is e:
            if extras:
                nxt = min(extras, key=lambda x: x.kid)
                extras.remove(nxt)
                self._chosen[sk] = nxt
            else:
                del self._chosen[sk]
        elif extras is not None and e in extras:
            extras.remove(e)
        if extras is not None and not extras:
            del self._extras[sk]
        self.generation += 1

    # -- the hot path ---------------------------------------------------------------------------
    def cipher_fn(self, audience: str, cache_size: int = 1 << 16) -> Callable[[bytes], Cipher]:
        """``subject bytes -> Cipher`` for ``audience``; raises :class:`SubjectForgotten`.

        Subjects seen recently are remembered (up to ``cache_size``, then the memo starts
        over), so a returning subject costs one dict lookup instead of its token (an HMAC)
        and the table lookup.  The memo is dropped whenever :attr:`generation` moves (a key
        forgotten, shredded, rolled back or superseded): a forgotten subject is never
        served from it.
        """
        memo: dict[bytes, Cipher] = {}
        seen = [self.generation]

        def cipher(subject: bytes) -> Cipher:
            gen = self.generation
            if seen[0] != gen:
                memo.clear()
                seen[0] = gen
            c = memo.get(subject)
            if c is None:
                c = self._cipher(self.entry(audience, subject))
                if len(memo) >= cache_size:
                    memo.clear()
                memo[subject] = c
            return c

        return cipher

    def entry(self, audience: str, subject: bytes) -> _Entry:
        token = self._tok(subject)
        e = self._chosen.get((audience, token))
        if e is not None:
            return e
        return self._miss(audience, subject, token)

    def _miss(self, audience: str, subject: bytes, token: str) -> _Entry:
        with self._lock:
            e = self._chosen.get((audience, token))
            if e is not None:
                return e
            if token in self._forgotten:
                raise SubjectForgotten("subject forgotten")
            for v in sorted(self._versions - {self.primary_version}, reverse=True):
                t = self._tokenizer(v)(subject)
                if t in self._forgotten:
                    raise SubjectForgotten("subject forgotten")
                e = self._chosen.get((audience, t))
                if e is not None:
                    return e
            kid = new_key_id(self._rng)
            e = _Entry(token, kid, audience, None, self._rng(SUBJECT_KEY_BYTES))
            self._versions.add(self.primary_version)
            self._install(e)
            self._unsent[e.rkey] = e
            self._created.setdefault(self._epoch, []).append(e.rkey)
            self.created += 1
            return e

    def _cipher(self, e: _Entry) -> Cipher:
        c = e.cipher
        if c is None:
            key = e.key
            if key is None:
                assert e.sealed is not None
                key = e.key = open_sealed(self._open, e.rkey, e.audience, e.sealed)
            c = e.cipher = (f"{PREFIX}{e.kid}_", AESSIV(key), e.kid.encode())
            e.sealed = None  # opened: the sealed copy is not needed again
            with self._lock:
                if e.rkey not in self._unsent:  # sealed already (or restored): the cipher holds the key
                    e.key = None
        return c

    # -- the transaction seam (the epoch protocol of streamproc.pipeline.state) ------------
    #: Not partition-affine: every worker needs every subject's key (a subject's records
    #: may arrive on any input partition), so the table is restored from the whole topic at
    #: start and followed (streamproc.runtime.erasure), never per assigned partition.
    partitioned = False

    def begin(self, epoch: int) -> None:
        """Keys created from now on belong to ``epoch`` (one processing attempt)."""
        with self._lock:
            self._epoch = epoch

    def take_writes(self) -> list[tuple[bytes, bytes | None]]:
        """The key records to write in the current transaction: new keys (sealed now, one
        ``seal_many`` per audience) and queued shreds, as ``(key, value)``.

        A KMS failure propagates (the batch is not committed; :meth:`discard` follows);
        nothing is marked sent unless everything sealed.
        """
        with self._lock:
            unsent = list(self._unsent.values())
            shreds = dict(self._shreds)
        out: list[tuple[bytes, bytes | None]] = []
        by_aud: dict[str, list[_Entry]] = {}
        for e in unsent:
            by_aud.setdefault(e.audience, []).append(e)
        for aud, entries in by_aud.items():
            sealer = self.sealers.get(aud)
            if sealer is None:
                raise SubjectKeyUnavailable(f"audience {aud!r} has no KEK for its subject keys")
            plains = []
            for e in entries:
                if e.key is None:  # never: an unsent key keeps its bytes until sealed
                    raise SubjectKeyUnavailable(f"subject key {e.kid} lost its key bytes before it was sealed")
                plains.append(_sealed_plaintext(e.rkey, aud, e.key))
            for e, sealed in zip(entries, sealer.seal_many(plains), strict=True):
                if e.rkey in self._live:  # not forgotten while it was being sealed
                    out.append((e.rkey.encode(), key_value(sealed, aud)))  # the key stays in memory only
        now = int(self._clock() * 1000)
        out.extend((rkey.encode(), shred_value(aud, now)) for rkey, aud in shreds.items())
        with self._lock:
            for e in unsent:
                self._unsent.pop(e.rkey, None)
                if e.cipher is not None:  # sealed and in use: the raw key is not kept beside the cipher
                    e.key = None
            taken = self._shreds_taken.setdefault(self._epoch, {})
            for rkey, aud in shreds.items():
                taken[rkey] = self._shreds.pop(rkey, aud)
        return out

    def committed(self, epoch: int) -> None:
        """The transaction of epochs up to ``epoch`` committed: their keys are durable."""
        with self._lock:
            for e in [e for e in self._created if e <= epoch]:
                del self._created[e]
            for e in [e for e in self._shreds_taken if e <= epoch]:
                del self._shreds_taken[e]

    def discard(self, epoch: int) -> None:
        """``epoch``'s attempt failed before anything was produced: forget its keys."""
        with self._lock:
            self._undo(epoch)

    def rollback(self) -> None:
        """A transaction aborted: drop every key not committed (a redo must not use a key
        that was never persisted) and queue the shreds again."""
        with self._lock:
            for e in sorted(set(self._created) | set(self._shreds_taken), reverse=True):
                self._undo(e)

    def _undo(self, epoch: int) -> None:
        for rkey in self._created.pop(epoch, []):
            self._remove(rkey)
        self._shreds.update(self._shreds_taken.pop(epoch, {}))
        self.generation += 1

    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        """:class:`~streamproc.runtime.state.ChangelogStore` form of :meth:`apply`."""
        self.apply(key, value)

    def drop(self, partition: int) -> None:
        """Nothing: the table is not partition-affine (see :attr:`partitioned`)."""

    # -- introspection ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._live)

    def is_forgotten(self, token: str) -> bool:
        return token in self._forgotten

    @property
    def pending_shreds(self) -> int:
        return len(self._shreds)


def _no_opening(_data: bytes) -> bytes:
    raise SubjectKeyUnavailable("an offline key table opens no key record")


def offline_table(keys: PseudonymKeys) -> SubjectKeyTable:
    """A table for compiling plans without a key topic (``policy check``, the data map):
    erasable rules bind to it; it is never used on a record."""
    return SubjectKeyTable(keys, topic="<offline>", sealers={}, open_envelope=_no_opening)


# -- the read-only view (re-identification, forget) ---------------------------------------------


class KeyDirectory:
    """Every key record of a full read of the topic, indexed by key id and by subject token."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        """key id -> its live key record."""
        self.shredded: dict[str, KeyRecord] = {}
        """key id -> its shred record (or the tombstone seen in the log)."""
        self.forgotten: set[str] = set()
        self.versions: set[int] = set()
        self.rejected = 0

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the topic; a malformed one is counted in :attr:`rejected` and, under
        a well-formed record key, fails closed as :meth:`SubjectKeyTable.apply` does: the
        key it replaces is gone, an unreadable marker forgets its subject."""
        try:
            r = parse_record(key, value)
        except KeyRecordError:
            self.rejected += 1
            try:
                token, suffix = parse_record_key(key)
            except KeyRecordError:
                return
            if suffix == MARKER:
                self.forgotten.add(token)
            else:
                self.keys.pop(suffix, None)
            return
        self.versions.add(token_version(r.token))
        if r.suffix == MARKER:
            (self.forgotten.add if r.kind == "marker" else self.forgotten.discard)(r.token)
        elif r.kind == "key":
            self.keys[r.suffix] = r
            self.shredded.pop(r.suffix, None)
        else:
            self.keys.pop(r.suffix, None)
            self.shredded[r.suffix] = r

    def of_token(self, token: str) -> list[KeyRecord]:
        """The live key records of one subject token."""
        return [r for r in self.keys.values() if r.token == token]

    def resolve(self, audience: str, key_id: str, open_envelope: Callable[[bytes], bytes]) -> bytes:
        """The subject key of ``key_id`` for ``audience``.

        Raises :class:`SubjectForgotten` when the key was shredded (or its subject
        forgotten), :class:`ReidentificationError` when the topic has no such key (or it is
        another audience's), :class:`SubjectKeyUnavailable` when it does not open.
        """
        r = self.keys.get(key_id)
        if r is None or r.token in self.forgotten:
            if key_id in self.shredded or (r is not None and r.token in self.forgotten):
                raise SubjectForgotten("subject forgotten")
            raise ReidentificationError("no subject key with this id in the key topic")
        if r.audience != audience:
            raise ReidentificationError("the subject key of this value belongs to another audience")
        assert r.sealed is not None
        return open_sealed(open_envelope, f"{r.token}/{r.suffix}", audience, r.sealed)


__all__ = [
    "FORMAT",
    "MARKER",
    "PREFIX",
    "Cipher",
    "KeyDirectory",
    "KeyRecord",
    "KeyRecordError",
    "SubjectForgotten",
    "SubjectKeyTable",
    "SubjectKeyUnavailable",
    "decrypt",
    "encrypt",
    "is_erasable",
    "key_id_of",
    "key_value",
    "marker_value",
    "offline_table",
    "open_sealed",
    "parse_record",
    "record_key",
    "shred_value",
    "subject_tokens",
]
