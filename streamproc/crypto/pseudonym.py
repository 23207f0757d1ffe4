"""Keys derived from the pseudonym master secret, and the formats they produce.

One versioned master secret (a ``secret`` key in the KMS or keyring) yields, through
HKDF-SHA256 with distinct salts and infos, every key the operators need:

* token keys, one per *pseudonym domain*: ``HKDF(master, salt="streamproc/token/v1",
  info=domain)``.  Tokens are deterministic within a domain and unlinkable across domains.
* deterministic-encryption keys, one per *audience*: ``HKDF(master,
  salt="streamproc/siv/v1", info=audience)``, 64 bytes for AES-SIV (RFC 5297) with the
  domain as associated data.  Whoever holds an audience's key can reverse that audience's
  ciphertexts and no other's.
* date-shift keys, one per (audience, domain).

Output formats embed the master version so keys can rotate: ``tk<v>_<22 base64url>``
for tokens (128-bit truncated HMAC-SHA256) and ``de<v>_<base64url>`` for deterministic
ciphertexts.
"""

from __future__ import annotations

import base64
import hmac
import threading
from hashlib import sha256
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streamproc.errors import StreamprocError

TOKEN_SALT = b"streamproc/token/v1"
SIV_SALT = b"streamproc/siv/v1"
SHIFT_SALT = b"streamproc/dateshift/v1"
TOKEN_BYTES = 16


class SecretSource(Protocol):
    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]: ...


def hkdf(master: bytes, salt: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info.encode()).derive(master)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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

    def token_key(self, domain: str, version: int | None = None) -> tuple[int, bytes]:
        v, m = self.master(version)
        return v, hkdf(m, TOKEN_SALT, domain)

    def siv_key(self, audience: str, version: int | None = None) -> tuple[int, bytes]:
        v, m = self.master(version)
        return v, hkdf(m, SIV_SALT, audience, 64)

    def shift_key(self, audience: str, domain: str, version: int | None = None) -> tuple[int, bytes]:
        v, m = self.master(version)
        return v, hkdf(m, SHIFT_SALT, f"{audience}\x00{domain}")


def make_tokenizer(version: int, key: bytes) -> TokenFn:
    """Return ``f(canonical_bytes) -> token``; the HMAC key schedule is computed once."""
    prefix = f"tk{version}_"
    base = hmac.new(key, digestmod=sha256)

    def token(data: bytes) -> str:
        h = base.copy()
        h.update(data)
        return prefix + base64.urlsafe_b64encode(h.digest()[:TOKEN_BYTES])[:22].decode()

    return token


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
