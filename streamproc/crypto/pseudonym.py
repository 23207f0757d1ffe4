"""Keys derived from the pseudonym master secret, and the formats they produce.

One versioned master secret (a ``secret`` key in the KMS or keyring) yields, through
HKDF-SHA256 (RFC 5869) with distinct salts and infos, every key the operators need.  The
*scope* of a key (:func:`scope_info`) is the audience and the pseudonym domain: two
audiences never share a key unless the policy names the domain as shared between them
(``keys.shared_domains``), so their outputs cannot be joined on tokens by default.

* token keys, one per (audience, domain): ``HKDF(master, salt="streamproc/token/v2",
  info=scope_info(domain, audience))``.  Tokens are deterministic within one audience's
  domain and unlinkable across domains and across audiences.  The record-key token is a
  token of the ``record_key`` domain (or the rule's ``domain``), so it is per audience too.
* deterministic-encryption keys, one per *audience*: ``HKDF(master,
  salt="streamproc/siv/v1", info=audience)``, 64 bytes for AES-SIV (RFC 5297) with the
  domain as associated data.  Whoever holds an audience's key can reverse that audience's
  ciphertexts and no other's.  (Unchanged since v1: old ciphertexts stay reversible.)
* date-shift keys, one per (audience, date-shift domain), salt ``streamproc/dateshift/v2``.
* provenance keys, one per audience (:data:`PROVENANCE_SALT`): the reference that
  replaces the source topic/partition/offset headers (see :mod:`streamproc.provenance`).
* consent keys, one per consent domain (:data:`CONSENT_SALT`, info = the domain): the
  subject's token keying the consent topic.  Not an audience's key: the consent table is
  the processor's own, and its own salt keeps it unequal to every audience's tokens, even
  in a policy-shared domain of the same name.
* the erasure key (:data:`ERASURE_SALT`, info :data:`ERASURE_INFO`): the subject's token
  keying the subject-key topic of erasable ``encrypt_deterministic`` rules
  (:mod:`streamproc.crypto.erasure`).  Processor-own like the consent key, and unequal to
  it: a consent record and a key record of one subject do not share a key.

Output formats embed the master version so keys can rotate: ``tk<v>_<22 base64url>``
for tokens (128-bit truncated HMAC-SHA256) and ``de<v>_<base64url>`` for deterministic
ciphertexts.  The known-answer vectors of docs/keys.md pin every derivation.

Salt history: ``streamproc/token/v1`` (info = domain alone, shared by every audience) and
``streamproc/dateshift/v1`` (domain defaulted to the tag) were replaced by the v2 salts;
tokens are one-way, so no stored value needs the v1 keys to be resolved.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable
from hashlib import sha256
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streamproc.errors import StreamprocError

TOKEN_SALT = b"streamproc/token/v2"
SIV_SALT = b"streamproc/siv/v1"
SHIFT_SALT = b"streamproc/dateshift/v2"
PROVENANCE_SALT = b"streamproc/provenance/v1"
CONSENT_SALT = b"streamproc/consent/v1"
ERASURE_SALT = b"streamproc/erasure/v1"
ERASURE_INFO = "subject-keys"
BUDGET_SALT = b"streamproc/budget/v1"
HOLD_SALT = b"streamproc/risk-hold/v1"
TOKEN_BYTES = 16


def scope_info(domain: str, audience: str | None) -> str:
    """The HKDF info of a per-scope key: the audience and the domain.

    ``audience`` is ``None`` for a domain the policy shares across named audiences (the
    only way two audiences get equal tokens).  Audience names never contain NUL, so the
    encoding is unambiguous for any domain text.
    """
    if audience is None:
        return f"shared\x00{domain}"
    return f"audience\x00{audience}\x00{domain}"


class SecretSource(Protocol):
    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]: ...


def hkdf(master: bytes, salt: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info.encode()).derive(master)


def b64u(data: bytes) -> str:
    # Same text as base64.urlsafe_b64encode(data).rstrip(b"=").decode(), without its
    # Python-level wrapper (binascii + translate is about twice as fast).
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_B64_TO_URLSAFE).decode()


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ReidentificationError(StreamprocError):
    """A deterministic ciphertext could not be reversed (wrong key, audience or domain)."""


class PseudonymKeys:
    """Derives and caches operator keys from one versioned master secret.

    Derivation happens when a plan is compiled, never per record.
    """

    def __init__(self, source: SecretSource, secret_id: str) -> None:
        self.source = source
        self.secret_id = secret_id
        self._lock = threading.Lock()
        self._masters: dict[int, bytes] = {}
        self.primary_version, master = source.get_secret(secret_id)
        self._masters[self.primary_version] = master

    def master(self, version: int | None = None) -> tuple[int, bytes]:
        v = self.primary_version if version is None else version
        with self._lock:
            m = self._masters.get(v)
        if m is None:
            v, m = self.source.get_secret(self.secret_id, v)
            with self._lock:
                self._masters[v] = m
        return v, m

    def token_key(self, domain: str, version: int | None = None, *, audience: str | None) -> tuple[int, bytes]:
        """The token key of ``domain`` for ``audience`` (``None``: a policy-shared domain).

        ``audience`` has no default: every caller states whose key it derives, so no code
        path falls back to a key that several audiences share.
        """
        v, m = self.master(version)
        return v, hkdf(m, TOKEN_SALT, scope_info(domain, audience))

    def siv_key(self, audience: str, version: int | None = None) -> tuple[int, bytes]:
        v, m = self.master(version)
        return v, hkdf(m, SIV_SALT, audience, 64)

    def shift_key(self, domain: str, version: int | None = None, *, audience: str | None) -> tuple[int, bytes]:
        """The date-shift key of ``domain`` for ``audience`` (``None``: a shared domain)."""
        v, m = self.master(version)
        return v, hkdf(m, SHIFT_SALT, scope_info(domain, audience))

    def consent_key(self, domain: str, version: int | None = None) -> tuple[int, bytes]:
        """The token key of the consent topic's subject keys (one per consent domain)."""
        v, m = self.master(version)
        return v, hkdf(m, CONSENT_SALT, domain)

    def erasure_key(self, version: int | None = None) -> tuple[int, bytes]:
        """The token key of the subject-key topic's subject tokens (processor-own)."""
        v, m = self.master(version)
        return v, hkdf(m, ERASURE_SALT, ERASURE_INFO)

    def budget_key(self, audience: str, version: int | None = None) -> tuple[int, bytes]:
        """The key of an audience's budget subject tokens (the budget changelog's keys):
        per audience, so two audiences' changelog keys for one subject are unlinkable."""
        v, m = self.master(version)
        return v, hkdf(m, BUDGET_SALT, audience)

    def hold_key(self, audience: str, version: int | None = None) -> tuple[int, bytes]:
        """The key of an audience's held-class digests (the risk-hold changelog's keys): a
        class's quasi-identifiers are never written, and two audiences' digests differ."""
        v, m = self.master(version)
        return v, hkdf(m, HOLD_SALT, audience)

    def provenance_key(self, audience: str, version: int | None = None) -> tuple[int, bytes]:
        """The AES-256 key of an audience's provenance references (never shared)."""
        v, m = self.master(version)
        return v, hkdf(m, PROVENANCE_SALT, audience)


def _hmac_states(key: bytes) -> tuple[Any, Any]:
    """RFC 2104 key schedule: SHA-256 states after absorbing ``key ^ ipad`` / ``key ^ opad``."""
    if len(key) > _SHA256_BLOCK:
        key = sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\0")
    return sha256(key.translate(_IPAD)), sha256(key.translate(_OPAD))


def hmac_sha256_fn(key: bytes) -> Callable[[bytes], bytes]:
    """Return ``f(data) -> HMAC-SHA256(key, data)`` with the key schedule computed once.

    RFC 2104 by hand: the inner and outer SHA-256 states, after absorbing the padded key,
    are kept and copied per call.  Same bytes as :func:`hmac.new` (the RFC 4231 vectors pin
    them), but ~40% cheaper per call than ``hmac.HMAC.copy()`` (no Python-level HMAC
    object per call, two C-level ``copy/update/digest`` sequences).
    """
    inner, outer = _hmac_states(key)

    def mac(data: bytes) -> bytes:
        h = inner.copy()
        h.update(data)
        o = outer.copy()
        o.update(h.digest())
        return o.digest()

    return mac


_SHA256_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_B64_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def make_tokenizer(version: int, key: bytes) -> TokenFn:
    """Return ``f(canonical_bytes) -> token``; the HMAC key schedule is computed once."""
    prefix = f"tk{version}_"
    inner, outer = _hmac_states(key)
    b2a = binascii.b2a_base64
    table = _B64_TO_URLSAFE

    def token(data: bytes) -> str:
        # HMAC-SHA256 inlined (see hmac_sha256_fn).  base64url of the first 16 MAC bytes is
        # 22 characters plus "==" padding; translate turns standard base64 into base64url
        # (cheaper than base64.urlsafe_b64encode, a Python wrapper around the same call).
        h = inner.copy()
        h.update(data)
        o = outer.copy()
        o.update(h.digest())
        return prefix + b2a(o.digest()[:TOKEN_BYTES], newline=False)[:22].translate(table).decode()

    return token


def make_text_tokenizer(
    version: int, key: bytes, normalize: Callable[[str], str] | None = None
) -> Callable[[str], str]:
    """``f(text) -> token``, equal to ``make_tokenizer(version, key)(normalize(text).encode())``
    in one call (the token operator on string fields, the common case)."""
    prefix = f"tk{version}_"
    inner, outer = _hmac_states(key)
    b2a = binascii.b2a_base64
    table = _B64_TO_URLSAFE

    def token(text: str) -> str:
        h = inner.copy()
        h.update(text.encode())
        o = outer.copy()
        o.update(h.digest())
        return prefix + b2a(o.digest()[:TOKEN_BYTES], newline=False)[:22].translate(table).decode()

    if normalize is None:
        # What the compiled plan interpreter (streamproc.pipeline.native) needs to compute
        # this very function itself: same key, same prefix, same 128-bit truncation.  Only
        # this unwrapped, non-normalizing function carries it.
        setattr(token, "native_op", ("token", prefix, key))  # noqa: B010 (a function attribute)
        return token
    return lambda text: token(normalize(text))


class TokenFn(Protocol):
    def __call__(self, data: bytes, /) -> str: ...


def siv_encrypt(siv: AESSIV, version: int, domain: bytes, plaintext: bytes) -> str:
    return f"de{version}_" + b64u(siv.encrypt(plaintext, [domain]))


def siv_decrypt(key: bytes, domain: str, text: str) -> bytes:
    """Reverse a ``de<v>_...`` value with the audience key of version ``v``.

    Raises :class:`ReidentificationError` (without echoing the input) on any failure.
    """
    try:
        head, _, body = text.partition("_")
        if not head.startswith("de") or not body:
            raise ValueError
        return AESSIV(key).decrypt(unb64u(body), [domain.encode()])
    except (ValueError, InvalidTag, TypeError):
        raise ReidentificationError("value is not a deterministic ciphertext under this key and domain") from None


def version_of(text: str) -> int:
    """The master version embedded in a token or deterministic ciphertext."""
    head = text.partition("_")[0]
    try:
        return int(head[2:])
    except ValueError:
        raise ReidentificationError("value carries no key version") from None
