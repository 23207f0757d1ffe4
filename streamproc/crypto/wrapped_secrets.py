"""Pseudonym master secrets wrapped under a KEK of any KMS: the *wrapped secret file*.

Why
---
Tokens, deterministic ciphertexts and date shifts derive from a pseudonym master secret
that the processor must hold in memory (:mod:`streamproc.crypto.pseudonym`).  The local
keyring and Vault/OpenBao (KV v2) can store such a secret; AWS KMS cannot -- it never
releases key material.  This module fills that gap for every provider: a small JSON file
holds each version of the secret *wrapped* under a KEK, and only a principal allowed to
unwrap under that KEK can recover it.  The file itself is not secret (a Kubernetes
ConfigMap is fine); the KEK's access policy is what protects the master.

Format (``streamproc-wrapped-secrets/1``)::

    {"format": "streamproc-wrapped-secrets/1",
     "secrets": {
       "pseudonym-master": {
         "primary": 2,
         "versions": {
           "1": {"kms": "aws", "kek": "arn:aws:kms:...:key/...", "kek_version": 1,
                 "wrapped": "<base64>", "created": "2025-03-01T10:00:00Z"},
           "2": {..., "sealed": "<base64 nonce+ciphertext>"}}}}}

Two ways a version is wrapped:

* **generated** (``create`` / ``rotate``): the KMS generates a 256-bit data key under the
  KEK; its *plaintext is the secret* and the KMS's own wrapped form is stored.  The secret
  never exists outside the KMS and the processor's memory.
* **imported** (``import``, to move an existing master -- say from the local keyring to
  AWS -- without breaking joins): a fresh data key encrypts the given secret with
  AES-256-GCM; the wrapped data key and ``sealed`` = nonce || ciphertext are stored.

Both bind the *wrap context* ``{"secret": <id>, "version": "<n>"}`` (the KMS encryption
context / associated data, and the AES-GCM AAD of an imported secret): a wrapped blob
moved to another id or relabelled as another version fails authentication instead of
silently becoming a different master.  On AWS the processor's role can therefore be
limited to ``kms:Decrypt`` on the secret KEK with the condition
``kms:EncryptionContext:secret = pseudonym-master``.

Pinning the KEK
---------------
Whoever can both write this file and *generate* data keys under a KEK the processor can
unwrap could plant a master of their choosing -- and then compute every token.  Producers
can generate data keys under source KEKs, which the processor unwraps.  So a reader built
with ``kek=`` (the ``pseudonym_secrets.kek`` setting) refuses versions wrapped under any
other KEK, and the KEK must be a dedicated one: not a source or destination KEK, with
``GenerateDataKey`` granted only to the key custodian and ``Decrypt`` to the processor.

:class:`WrappedSecretFile` implements ``get_secret(key_id, version=None) -> (version,
bytes)``, the secret-source interface of :class:`~streamproc.crypto.pseudonym.PseudonymKeys`.
Errors name ids, versions and KEK ids, never material or wrapped blobs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streamproc.crypto.kms import KmsProvider
from streamproc.errors import ConfigError, KeyNotFound, UnwrapFailed

FORMAT = "streamproc-wrapped-secrets/1"
MIN_SECRET_BYTES = 32
_NONCE = 12
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/+=@-]{0,199}")


def wrap_context(secret_id: str, version: int) -> dict[str, str]:
    """The context bound to every wrapped version (KMS context and AES-GCM AAD)."""
    return {"secret": secret_id, "version": str(version)}


def _aad(secret_id: str, version: int) -> bytes:
    return json.dumps(
        wrap_context(secret_id, version), sort_keys=True, separators=(",", ":")
    ).encode()


@dataclasses.dataclass(frozen=True, slots=True)
class SecretInfo:
    """What ``streamproc secrets list`` shows: ids, versions and KEKs, never material."""

    secret_id: str
    primary: int
    versions: tuple[int, ...]
    keks: tuple[str, ...]
    kms: tuple[str, ...]
    imported: tuple[int, ...] = ()


class WrappedSecretFile:
    """Versioned secrets in a JSON file, each version wrapped under a KEK of ``kms``.

    ``kek`` pins the KEK: versions wrapped under another KEK are refused when read (see
    the module docs for why).  Unwrapped secrets are cached in memory per (id, version);
    the file is re-read when its modification time changes, so a rotation written by
    ``streamproc secrets rotate`` is visible to lookups of versions not seen before
    (the primary version a pipeline uses is fixed when the pipeline is built).
    """

    name = "wrapped_file"

    def __init__(
        self, path: str | os.PathLike[str], kms: KmsProvider, *, kek: str | None = None
    ) -> None:
        self.path = Path(path)
        self.kms = kms
        self.kek = kek
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"format": FORMAT, "secrets": {}}
        self._mtime: int | None = None
        self._plain: dict[tuple[str, int], bytes] = {}
        if self.path.exists():
            self._load()

    def __repr__(self) -> str:
        return f"WrappedSecretFile({str(self.path)!r}, kms={getattr(self.kms, 'name', '?')!r})"

    # -- file handling ---------------------------------------------------------------------
    def _load(self) -> None:
        try:
            st = self.path.stat()
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"wrapped secret file {self.path} does not exist "
                "(create it with: streamproc secrets create)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"wrapped secret file {self.path} is not readable JSON ({type(exc).__name__})"
            ) from None
        _check_file(self.path, raw)
        self._data = raw
        self._mtime = st.st_mtime_ns

    def _maybe_reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._mtime is None:
                raise ConfigError(
                    f"wrapped secret file {self.path} does not exist "
                    "(create it with: streamproc secrets create)"
                ) from None
            return  # keep serving what was read; the file may be being replaced
        if mtime != self._mtime:
            self._load()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".wrapped-secrets-", dir=str(self.path.parent))
        try:
            os.fchmod(fd, 0o600)  # not secret, but nobody else needs to read it
            with os.fdopen(fd, "w") as fh:
                json.dump(self._data, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._mtime = self.path.stat().st_mtime_ns

    # -- administration (streamproc secrets ...) -------------------------------------------
    def create(self, secret_id: str, kek: str) -> int:
        """Add ``secret_id`` with a generated version 1 (refuses an existing id)."""
        _check_id(secret_id)
        with self._lock:
            if self.path.exists():
                self._load()
            if secret_id in self._data["secrets"]:
                raise ConfigError(f"secret {secret_id!r} already exists in {self.path}; use rotate")
            entry = {"primary": 1, "versions": {"1": self._generate(secret_id, 1, kek)}}
            self._data["secrets"][secret_id] = entry
            self._save()
        return 1

    def rotate(self, secret_id: str, kek: str | None = None) -> int:
        """Add a generated version and make it primary; ``kek`` defaults to the primary's."""
        with self._lock:
            self._load()
            entry = self._entry(secret_id)
            new = max(int(v) for v in entry["versions"]) + 1
            kek = kek or entry["versions"][str(entry["primary"])]["kek"]
            assert kek is not None
            entry["versions"][str(new)] = self._generate(secret_id, new, kek)
            entry["primary"] = new
            self._save()
        return new

    def import_version(
        self, secret_id: str, version: int, material: bytes, kek: str, *, primary: bool = False
    ) -> None:
        """Store existing ``material`` as ``version`` (kept: tokens carry the version)."""
        _check_id(secret_id)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError("secret versions are positive integers")
        if len(material) < MIN_SECRET_BYTES:
            raise ConfigError(f"secret {secret_id!r} v{version} is shorter than 32 bytes")
        with self._lock:
            if self.path.exists():
                self._load()
            entry = self._data["secrets"].setdefault(
                secret_id, {"primary": version, "versions": {}}
            )
            if str(version) in entry["versions"]:
                raise ConfigError(f"secret {secret_id!r} already has a version {version}")
            ctx = wrap_context(secret_id, version)
            dk = self.kms.generate_data_key(kek, ctx)
            nonce = os.urandom(_NONCE)
            sealed = nonce + AESGCM(dk.plaintext).encrypt(nonce, material, _aad(secret_id, version))
            entry["versions"][str(version)] = {
                **self._meta(dk.kek_id, dk.kek_version, dk.wrapped),
                "sealed": _b64(sealed),
            }
            if primary or int(entry["primary"]) < version:
                entry["primary"] = version
            self._save()

    def _generate(self, secret_id: str, version: int, kek: str) -> dict[str, Any]:
        dk = self.kms.generate_data_key(kek, wrap_context(secret_id, version))
        if len(dk.plaintext) < MIN_SECRET_BYTES:
            raise ConfigError(f"KEK {kek!r} produced a data key shorter than 32 bytes")
        return self._meta(dk.kek_id, dk.kek_version, dk.wrapped)

    def _meta(self, kek_id: str, kek_version: int, wrapped: bytes) -> dict[str, Any]:
        return {
            "kms": getattr(self.kms, "name", "unknown"),
            "kek": kek_id,
            "kek_version": kek_version,
            "wrapped": _b64(wrapped),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def list_secrets(self) -> list[SecretInfo]:
        with self._lock:
            self._maybe_reload()
            out = []
            for sid, e in sorted(self._data["secrets"].items()):
                vs = e["versions"]
                out.append(
                    SecretInfo(
                        sid,
                        int(e["primary"]),
                        tuple(sorted(int(v) for v in vs)),
                        tuple(sorted({m["kek"] for m in vs.values()})),
                        tuple(sorted({m["kms"] for m in vs.values()})),
                        tuple(sorted(int(v) for v, m in vs.items() if "sealed" in m)),
                    )
                )
            return out

    # -- secret source -----------------------------------------------------------------------
    def _entry(self, secret_id: str) -> Any:
        entry = self._data["secrets"].get(secret_id)
        if entry is None:
            raise KeyNotFound(f"secret {secret_id!r} not found in {self.path.name}")
        return entry

    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        """``(version, material)``; the primary version when none is given.

        Unwraps through the KMS on first use of a version (``KmsUnavailable`` propagates
        for the caller to retry; ``KeyRevoked`` if the KEK was disabled or revoked).
        """
        with self._lock:
            self._maybe_reload()
            entry = self._entry(key_id)
            ver = int(entry["primary"]) if version is None else int(version)
            cached = self._plain.get((key_id, ver))
            if cached is not None:
                return ver, cached
            meta = entry["versions"].get(str(ver))
            if meta is None:
                raise KeyNotFound(f"secret {key_id!r} has no version {ver}")
            meta = dict(meta)
        material = self._unwrap(key_id, ver, meta)
        with self._lock:
            self._plain[(key_id, ver)] = material
        return ver, material

    def _unwrap(self, secret_id: str, version: int, meta: Mapping[str, Any]) -> bytes:
        provider = getattr(self.kms, "name", "unknown")
        if meta["kms"] != provider:
            raise ConfigError(
                f"secret {secret_id!r} v{version} in {self.path} is wrapped by KMS "
                f"{meta['kms']!r}, but the configured KMS is {provider!r}"
            )
        if self.kek is not None and meta["kek"] != self.kek:
            raise ConfigError(
                f"secret {secret_id!r} v{version} in {self.path} is wrapped under KEK "
                f"{meta['kek']!r}, not the pinned KEK {self.kek!r} (pseudonym_secrets.kek); "
                "refusing it"
            )
        ctx = wrap_context(secret_id, version)
        wrapped = _unb64(meta["wrapped"])
        key = self.kms.unwrap(meta["kek"], int(meta["kek_version"]), wrapped, ctx)
        if "sealed" not in meta:
            if len(key) < MIN_SECRET_BYTES:
                raise UnwrapFailed(f"secret {secret_id!r} v{version} unwrapped to a short key")
            return key
        sealed = _unb64(meta["sealed"])
        try:
            return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(secret_id, version))
        except (InvalidTag, ValueError):
            raise UnwrapFailed(
                f"secret {secret_id!r} v{version} failed authentication (file edited?)"
            ) from None


# -- validation helpers -------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def _check_id(secret_id: str) -> None:
    if not isinstance(secret_id, str) or not _ID_RE.fullmatch(secret_id):
        raise ConfigError(
            "secret ids are 1-200 letters, digits and _.:/+=@- (starting with a letter or digit)"
        )


def _check_file(path: Path, raw: Any) -> None:
    """Structure checks, so damage shows as ConfigError at start-up, not mid-stream."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"wrapped secret file {path}: {what}")

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} file")
    secrets = raw.get("secrets")
    if not isinstance(secrets, dict):
        raise bad("'secrets' must be a mapping")
    for sid, entry in secrets.items():
        if not isinstance(sid, str) or not _ID_RE.fullmatch(sid):
            raise bad("a secret id is not an identifier")
        if not isinstance(entry, dict) or not isinstance(entry.get("versions"), dict):
            raise bad(f"secret {sid!r} is malformed")
        versions = entry["versions"]
        if not versions or str(entry.get("primary")) not in versions:
            raise bad(f"secret {sid!r} has no primary version among its versions")
        for v, meta in versions.items():
            where = f"secret {sid!r} version {v}"
            if not (isinstance(v, str) and v.isdigit() and int(v) >= 1):
                raise bad(f"{where}: versions are positive integers")
            if not isinstance(meta, dict):
                raise bad(f"{where} is malformed")
            for k in ("kms", "kek", "wrapped"):
                if not isinstance(meta.get(k), str) or not meta[k]:
                    raise bad(f"{where}: missing {k!r}")
            kv = meta.get("kek_version")
            if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1:
                raise bad(f"{where}: kek_version must be a positive integer")
            for k in ("wrapped", "sealed"):
                if k in meta:
                    try:
                        _unb64(meta[k])
                    except (binascii.Error, ValueError, AttributeError):
                        raise bad(f"{where}: {k!r} is not base64") from None


def load_keyring_secret_versions(ring: Any, secret_id: str) -> list[tuple[int, bytes]]:
    """Every unrevoked version of a local keyring ``secret`` (for ``secrets import``)."""
    info = next((k for k in ring.list_keys() if k.kek_id == secret_id), None)
    if info is None or info.kind != "secret":
        raise KeyNotFound(f"keyring has no secret {secret_id!r}")
    out = []
    for v in info.versions:
        if v in info.revoked_versions:
            continue
        out.append(ring.get_secret(secret_id, v))
    return out


__all__ = [
    "FORMAT",
    "MIN_SECRET_BYTES",
    "SecretInfo",
    "WrappedSecretFile",
    "load_keyring_secret_versions",
    "wrap_context",
]
