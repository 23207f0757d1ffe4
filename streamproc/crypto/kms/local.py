"""The local keyring: the embedded default KMS, a JSON file of versioned keys.

The file holds two kinds of key:

* ``kek`` -- key-encryption keys that wrap data keys (AES-256-GCM, AAD = the wrap context);
* ``secret`` -- versioned 256-bit secrets, such as the pseudonym master key from which
  token, deterministic-encryption and date-shift keys are derived.

Key material lives in the file in the clear, so the file is refused unless its mode is
0600 or stricter, and it is always rewritten atomically with that mode.  It suits
development, CI and single-host deployments; production deployments put KEKs in Vault,
OpenBao or AWS KMS.

Revocation marks a version unusable for unwrapping; the primary version cannot be
revoked without rotating first, so producers never seal under a revoked key.  The file is
re-read when its modification time changes, so a running processor sees a revocation
made by ``streamproc keys revoke`` without a restart.

The same check (every ``reload_interval`` seconds) fails closed: if the file was deleted,
is no longer a regular file, got a group/world permission bit, or no longer parses, the
keyring forgets every key it holds and each data-path call raises
:class:`KeyringUnavailable` (a :class:`~streamproc.errors.KmsUnavailable`: the processor
pauses, dead-letters nothing and seals nothing), while :meth:`LocalKeyring.is_revoked`
answers ``True`` for every key so that data keys cached elsewhere are evicted at the next
revocation sweep.  Restoring the file (``chmod 600``) ends it at the next check.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streamproc.crypto.kms import DataKey, KeyInfo, context_aad
from streamproc.errors import ConfigError, KeyNotFound, KeyRevoked, KmsUnavailable, UnwrapFailed

log = logging.getLogger(__name__)

FORMAT = "streamproc-keyring/1"
KINDS = ("kek", "secret")
_NONCE = 12


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


class KeyringUnavailable(KmsUnavailable):
    """The keyring file was deleted, loosened or damaged while running: serve no key.

    Transient on purpose: nothing about a record is wrong, and the processor resumes by
    itself once the file is restored.  The message names the file and its mode only.
    """


class LocalKeyring:
    """A :class:`~streamproc.crypto.kms.KmsProvider` and secret source backed by a file."""

    name = "local"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        reload_interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._reload_interval = reload_interval
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._aead: dict[tuple[str, int], AESGCM] = {}
        #: Why the keyring is failing closed (None while the file is fine).
        self._failed: str | None = None
        self._load()

    # -- creation -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Create an empty keyring file with mode 0600 (refuses to overwrite)."""
        p = Path(path)
        if p.exists():
            raise ConfigError(f"keyring {p} already exists")
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(p, {"format": FORMAT, "keys": {}})
        return cls(p)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        p = Path(path)
        return cls(p) if p.exists() else cls.create(p)

    # -- file handling ------------------------------------------------------------------
    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ConfigError(f"keyring {self.path} does not exist") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"keyring {self.path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must be 0600 or stricter (chmod 600)"
            )
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"keyring {self.path} is not readable JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("keys"), dict):
            raise ConfigError(f"keyring {self.path} is not a {FORMAT} file")
        for kid, entry in data["keys"].items():
            _check_entry(self.path, kid, entry)
        self._data = data
        self._mtime = st.st_mtime_ns
        self._aead.clear()

    def _maybe_reload(self) -> None:
        """Re-check the file every ``reload_interval``; raise :class:`KeyringUnavailable`
        while it is missing, loosened or damaged (see the module docstring)."""
        now = self._clock()
        if now - self._checked < self._reload_interval:
            if self._failed is not None:
                raise KeyringUnavailable(self._failed)
            return
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._fail(f"keyring {self.path} was deleted")
        except OSError as exc:
            self._fail(f"keyring {self.path} cannot be read ({exc.strerror})")
        if not stat.S_ISREG(st.st_mode):
            self._fail(f"keyring {self.path} is no longer a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self._fail(
                f"keyring {self.path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must be 0600 or stricter (chmod 600)"
            )
        if st.st_mtime_ns != self._mtime or self._failed is not None:
            try:
                self._load()
            except ConfigError as exc:
                self._fail(str(exc))
        if self._failed is not None:
            log.warning("keyring %s is usable again", self.path)
            self._failed = None

    def _fail(self, why: str) -> NoReturn:
        """Forget every key and raise; logged once per failure, not per call."""
        if self._failed is None:
            log.error("%s; serving no keys until it is fixed", why)
        self._failed = why
        self._data = {"format": FORMAT, "keys": {}}
        self._mtime = None
        self._aead.clear()
        raise KeyringUnavailable(why)

    def _save(self) -> None:
        _atomic_write(self.path, self._data)
        self._mtime = self.path.stat().st_mtime_ns
        self._aead.clear()
        self._failed = None  # just loaded and rewritten with mode 0600

    def _key(self, key_id: str, kind: str | None = None) -> dict[str, Any]:
        entry = self._data["keys"].get(key_id)
        if entry is None or (kind is not None and entry["kind"] != kind):
            raise KeyNotFound(f"key {key_id!r} not found in keyring")
        return entry

    # -- administration (streamproc keys ...) --------------------------------------------
    def create_key(self, key_id: str, kind: str = "kek") -> int:
        if kind not in KINDS:
            raise ConfigError(f"unknown key kind {kind!r}; expected one of {KINDS}")
        with self._lock:
            self._load()
            if key_id in self._data["keys"]:
                raise ConfigError(f"key {key_id!r} already exists")
            self._data["keys"][key_id] = {"kind": kind, "primary": 1, "versions": {"1": _new_version(self._clock())}}
            self._save()
        return 1

    def ensure_key(self, key_id: str, kind: str = "kek") -> None:
        """Create the key if it does not exist (idempotent; used by the demo)."""
        with self._lock:
            exists = key_id in self._data["keys"]
        if not exists:
            self.create_key(key_id, kind)

    def rotate(self, key_id: str) -> int:
        """Add a new version and make it primary; older versions still unwrap."""
        with self._lock:
            self._load()
            entry = self._key(key_id)
            new = max(int(v) for v in entry["versions"]) + 1
            entry["versions"][str(new)] = _new_version(self._clock())
            entry["primary"] = new
            self._save()
        return new

    def revoke(self, key_id: str, version: int) -> None:
        with self._lock:
            self._load()
            entry = self._key(key_id)
            v = entry["versions"].get(str(version))
            if v is None:
                raise KeyNotFound(f"key {key_id!r} has no version {version}")
            if entry["primary"] == version:
                raise ConfigError(
                    f"version {version} is the primary version of {key_id!r}; rotate before revoking it"
                )
            v["revoked"] = True
            v["revoked_at"] = self._clock()
            self._save()

    def list_keys(self) -> list[KeyInfo]:
        with self._lock:
            self._maybe_reload()
            out = []
            for kid, e in sorted(self._data["keys"].items()):
                versions = tuple(sorted(int(v) for v in e["versions"]))
                revoked = tuple(sorted(int(v) for v, m in e["versions"].items() if m.get("revoked")))
                out.append(KeyInfo(kid, versions, int(e["primary"]), revoked, e["kind"]))
            return out

    # -- KmsProvider ----------------------------------------------------------------------
    def _aead_for(self, kek_id: str, version: int | None) -> tuple[int, AESGCM]:
        entry = self._key(kek_id, "kek")
        ver = int(entry["primary"]) if version is None else version
        cached = self._aead.get((kek_id, ver))
        meta = entry["versions"].get(str(ver))
        if meta is None:
            raise KeyNotFound(f"key {kek_id!r} has no version {ver}")
        if meta.get("revoked"):
            raise KeyRevoked(f"key {kek_id!r} version {ver} is revoked")
        if cached is None:
            cached = AESGCM(_unb64(meta["material"]))
            self._aead[(kek_id, ver)] = cached
        return ver, cached

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        with self._lock:
            self._maybe_reload()
            ver, aead = self._aead_for(kek_id, None)
        dek = AESGCM.generate_key(256)
        nonce = os.urandom(_NONCE)
        wrapped = nonce + aead.encrypt(nonce, dek, context_aad(kek_id, ver, context))
        return DataKey(kek_id, ver, dek, wrapped)

    def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        with self._lock:
            self._maybe_reload()
            _, aead = self._aead_for(kek_id, kek_version)
        if len(wrapped) != _NONCE + 32 + 16:
            raise UnwrapFailed(f"wrapped key for {kek_id!r} v{kek_version} has the wrong length")
        try:
            return aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], context_aad(kek_id, kek_version, context))
        except InvalidTag:
            raise UnwrapFailed(f"wrapped key for {kek_id!r} v{kek_version} failed authentication") from None

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        """True for revoked or unknown versions, and for every key while failing closed."""
        with self._lock:
            try:
                self._maybe_reload()
            except KeyringUnavailable:
                return True
            entry = self._data["keys"].get(kek_id)
            if entry is None:
                return True
            meta = entry["versions"].get(str(kek_version))
            return meta is None or bool(meta.get("revoked"))

    # -- secrets (pseudonym master keys) ----------------------------------------------------
    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        """Return ``(version, material)`` of a ``secret`` key; primary when no version given."""
        with self._lock:
            self._maybe_reload()
            entry = self._key(key_id, "secret")
            ver = int(entry["primary"]) if version is None else version
            meta = entry["versions"].get(str(ver))
            if meta is None:
                raise KeyNotFound(f"secret {key_id!r} has no version {ver}")
            if meta.get("revoked"):
                raise KeyRevoked(f"secret {key_id!r} version {ver} is revoked")
            return ver, _unb64(meta["material"])


def _check_entry(path: Path, kid: str, entry: Any) -> None:
    """Validate one key entry so damage surfaces as ConfigError at load, not at first use."""
    bad = ConfigError(f"keyring {path}: key {kid!r} is malformed")
    if not isinstance(entry, dict) or entry.get("kind") not in KINDS or not isinstance(entry.get("versions"), dict):
        raise bad
    versions = entry["versions"]
    if not versions or str(entry.get("primary")) not in versions:
        raise bad
    for v, meta in versions.items():
        if not v.isdigit() or not isinstance(meta, dict):
            raise bad
        try:
            material = _unb64(meta["material"])
        except (KeyError, TypeError, ValueError):
            raise bad from None
        if len(material) != 32:
            raise bad


def _new_version(now: float) -> dict[str, Any]:
    return {"material": _b64(os.urandom(32)), "created": now, "revoked": False}


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
