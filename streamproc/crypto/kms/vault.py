"""HashiCorp Vault / OpenBao transit as a :class:`~streamproc.crypto.kms.KmsProvider`.

KEKs are transit keys (type ``aes256-gcm96``).  Data keys come from the transit
``datakey/plaintext/<name>`` endpoint, which returns the plaintext data key together with
its ciphertext (``vault:v3:...``).  The ciphertext string, ASCII-encoded, is what we store
as ``wrapped``; the number in its ``vault:vN:`` prefix is the KEK version.  Unwrapping is
``decrypt/<name>``.  So the processor's token needs ``update`` on ``transit/decrypt/<src>``
and on ``transit/datakey/plaintext/<dest>`` and nothing else on the data path (see
``deploy/vault/*.hcl``).

Binding the wrap context
------------------------
A data key wrapped for one topic must not unwrap for another.  Two transit mechanisms can
bind the context, selected by ``context_binding``:

``"associated_data"`` (default)
    The canonical context (:func:`canonical_context`: compact, key-sorted JSON such as
    ``{"topic":"orders"}``, UTF-8) is sent base64-encoded as ``associated_data``, the AEAD
    additional data of the transit ciphertext.  Works with ordinary keys.  Transit gained
    this parameter in Vault 1.13 (hashicorp/vault#17638); every OpenBao release has it
    (verified against OpenBao 2.7: a wrong value fails with "message authentication
    failed").  Older servers *silently ignore* unknown parameters, which would leave the
    key unbound, so the provider refuses servers older than 1.13 (the version is read once
    from the unauthenticated ``sys/seal-status``) and fails closed if a response carries
    the server's "ignored these unrecognized parameters" warning for it.

``"derived"``
    For older servers: keys created with ``derived=true`` and the same canonical bytes
    sent as the derivation ``context``.  Transit silently ignores ``context`` on keys that
    are *not* derived (verified), so in this mode the provider reads the key's config
    (``read`` on ``transit/keys/<name>``) and refuses keys that are not derived.

The KEK version is not part of the bound data: it is already bound by the ciphertext
itself (the ``vault:vN:`` prefix selects the key version, so relabelling it fails
authentication), and it is not known before ``datakey`` chooses the latest version.

Error mapping
-------------
==============================================  ==========================================
server says                                     raised
==============================================  ==========================================
"encryption key not found", HTTP 404            :class:`~streamproc.errors.KeyNotFound`
(hard-deleted keys look exactly like unknown ones, so they land here too)
"version is too new"                            :class:`~streamproc.errors.KeyNotFound`
HTTP 403 "permission denied"                    :class:`~streamproc.errors.KeyAccessDenied`
below ``min_decryption_version`` ("too old")    :class:`~streamproc.errors.KeyRevoked`
key soft-deleted (OpenBao)                      :class:`~streamproc.errors.KeyRevoked`
any other 400 on decrypt (bad ciphertext,       :class:`~streamproc.errors.UnwrapFailed`
authentication failure, wrong context)
connection error, timeout, 412, 429, 5xx        :class:`~streamproc.errors.KmsUnavailable`
403 with a token that is itself rejected        :class:`~streamproc.errors.KmsUnavailable`
a derived key without a context (or the         :class:`~streamproc.errors.ConfigError`
reverse), a server too old for associated_data
anything else (other 400s outside decrypt,      :class:`~streamproc.errors.KmsError`
``UnsupportedOperation``, a 200 without data)
==============================================  ==========================================

On the data path the processor turns the last two rows into a dead letter with reason
``kms_error`` when they happen while unwrapping a record's key (the key id came from the
record), and into a pause (``SealingUnavailable``) when they happen while sealing; they
never stop it (docs/keys.md, "KMS errors").

The last row matters operationally: Vault answers "permission denied" both for a policy
that lacks a capability and for an expired or revoked token.  The first is a property of
the key (the record goes to the dead-letter topic as ``unknown_key``); the second is an
outage of our credentials, and dead-lettering every record until someone renews the token
would lose data.  So on a 403 the provider asks ``auth/token/lookup-self`` (allowed by the
``default`` policy) whether the token is still valid.

Revocation
----------
Vault "revokes" a KEK version by raising ``min_decryption_version``; OpenBao can also
soft-delete a whole key.  :meth:`VaultTransitKms.is_revoked` reads the key's config
(cached for ``revocation_cache_ttl`` seconds) and reports a version revoked if it is below
``min_decryption_version``, above ``latest_version``, trimmed away, if the key is
soft-deleted, or if the key no longer exists.

Pseudonym master secrets
------------------------
Transit never releases key material, but pseudonymisation needs a secret we hold in
memory.  :meth:`VaultTransitKms.get_secret` therefore reads it from the KV version 2
engine: mount ``kv_mount`` (default ``secret``), path ``<kv_prefix>/<key_id>`` (default
prefix ``streamproc``), field ``material`` holding at least 32 bytes, base64-encoded.  The
KV version number is the secret version; deleting or destroying a KV version revokes it.
Create one with::

    bao kv put -mount=secret streamproc/pseudonym-master material="$(head -c32 /dev/urandom | base64)"

Messages name mounts, key ids and versions; never key material, ciphertexts or tokens.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NoReturn

import hvac
import hvac.exceptions as hvac_exc
import requests

from streamproc.crypto.kms import DataKey
from streamproc.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyNotFound,
    KeyRevoked,
    KmsError,
    KmsUnavailable,
    UnwrapFailed,
)

log = logging.getLogger(__name__)

ContextBinding = Literal["associated_data", "derived"]
CONTEXT_BINDINGS: tuple[str, ...] = ("associated_data", "derived")

#: First Vault release whose transit honours ``associated_data`` (OpenBao 2.x is newer).
MIN_AD_SERVER_VERSION = (1, 13, 0)
DATA_KEY_BYTES = 32
MIN_SECRET_BYTES = 32

# Transit's own key-name grammar (builtin/logical/transit path patterns).  Key ids come
# from envelope headers, i.e. from untrusted input, and hvac does not escape "/" in path
# parameters, so anything else is refused before it can reach a URL.
_NAME_RE = re.compile(r"\w(?:[\w.-]*\w)?", re.ASCII)
_CIPHERTEXT_RE = re.compile(r"vault:v([1-9][0-9]{0,9}):", re.ASCII)
_SERVER_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")

_TRANSIENT = (
    hvac_exc.RateLimitExceeded,
    hvac_exc.InternalServerError,
    hvac_exc.VaultNotInitialized,
    hvac_exc.BadGateway,
    hvac_exc.VaultDown,
    hvac_exc.PreconditionFailed,  # 412: a performance standby has not caught up yet
    hvac_exc.UnexpectedError,  # 472/473/504 and friends: standbys and gateways
)


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The bytes bound to a wrapped key: compact JSON with sorted keys, UTF-8.

    JSON rather than ``key=value`` joining so that no choice of keys or values can make
    two different contexts encode the same way, and so that producers in other languages
    can reproduce it exactly (``{"topic":"orders"}``).
    """
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("wrap context keys and values must be strings")
    return json.dumps(
        dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ciphertext_version(ciphertext: str) -> int | None:
    """KEK version from a transit ciphertext's ``vault:vN:`` prefix, or ``None``."""
    m = _CIPHERTEXT_RE.match(ciphertext)
    return int(m.group(1)) if m else None


def _errors_text(exc: hvac_exc.VaultError) -> str:
    errs = exc.errors if isinstance(exc.errors, list) else []
    if not errs and isinstance(exc.json, Mapping):
        errs = exc.json.get("errors") or []
    return "; ".join(str(e) for e in errs).lower()


class VaultTransitKms:
    """KEKs in a Vault or OpenBao transit engine; pseudonym secrets in KV v2.

    Thread-safe: hvac's ``requests`` session is shared, and the small caches are locked.
    """

    name = "vault"

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        mount: str = "transit",
        kv_mount: str = "secret",
        kv_prefix: str = "streamproc",
        namespace: str | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
        client_cert: tuple[str, str] | None = None,
        context_binding: ContextBinding = "associated_data",
        revocation_cache_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        client: hvac.Client | None = None,
    ) -> None:
        """Connect lazily: nothing is sent to the server until the first operation.

        ``url`` defaults to ``VAULT_ADDR`` / ``BAO_ADDR`` and ``token`` to ``VAULT_TOKEN`` /
        ``BAO_TOKEN``.  ``verify`` is ``True``, ``False`` or the path of a CA bundle;
        ``client_cert`` is ``(cert_path, key_path)`` for TLS client authentication.
        """
        url = url or os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
        token = token or os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
        if client is None and not url:
            raise ConfigError("vault: no server url (set url, VAULT_ADDR or BAO_ADDR)")
        if client is None and not token:
            raise ConfigError("vault: no token (set token, VAULT_TOKEN or BAO_TOKEN)")
        if context_binding not in CONTEXT_BINDINGS:
            raise ConfigError(
                f"vault: context_binding must be one of {CONTEXT_BINDINGS}, not {context_binding!r}"
            )
        if timeout <= 0:
            raise ConfigError("vault: timeout must be positive")
        self.mount = self._check_mount(mount, "mount")
        self.kv_mount = self._check_mount(kv_mount, "kv_mount")
        self.kv_prefix = self._check_mount(kv_prefix, "kv_prefix")
        self.context_binding: ContextBinding = context_binding
        self.revocation_cache_ttl = revocation_cache_ttl
        self._clock = clock
        self.client = client or hvac.Client(
            url=url,
            token=token,
            namespace=namespace,
            timeout=timeout,
            verify=verify,
            cert=client_cert,
        )
        self._lock = threading.Lock()
        self._configs: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._server_checked = context_binding != "associated_data"

    @staticmethod
    def _check_mount(value: str, what: str) -> str:
        v = value.strip("/")
        if not v or any(not _NAME_RE.fullmatch(part) for part in v.split("/")):
            raise ConfigError(f"vault: {what} {value!r} is not a valid path")
        return v

    def __repr__(self) -> str:  # never show the token
        return f"VaultTransitKms(url={self.client.url!r}, mount={self.mount!r})"

    def close(self) -> None:
        self.client.adapter.close()

    # -- transport ------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One HTTP call; transport failures become :class:`KmsUnavailable` here."""
        try:
            return self.client.adapter.request(method, path, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise KmsUnavailable(
                f"vault: {method} {path.split('?')[0]} failed: {type(exc).__name__}"
            ) from None

    def _token_rejected(self) -> bool:
        """True if the server no longer accepts our token at all (expired, revoked)."""
        try:
            self._request("GET", "/v1/auth/token/lookup-self")
        except (hvac_exc.Forbidden, hvac_exc.Unauthorized):
            return True
        except (hvac_exc.VaultError, KmsError):
            return False
        return False

    def _raise_mapped(self, exc: hvac_exc.VaultError, op: str, what: str) -> NoReturn:
        """Translate an hvac error into streamproc's typed errors (see the module table)."""
        text = _errors_text(exc)
        if isinstance(exc, hvac_exc.Forbidden | hvac_exc.Unauthorized):
            if self._token_rejected():
                raise KmsUnavailable(
                    f"vault: token rejected during {op} on {what} (expired or revoked?)"
                ) from None
            raise KeyAccessDenied(f"vault: permission denied for {op} on {what}") from None
        if isinstance(exc, _TRANSIENT):
            raise KmsUnavailable(
                f"vault: server unavailable during {op} on {what} ({type(exc).__name__})"
            ) from None
        if isinstance(exc, hvac_exc.InvalidPath):
            raise KeyNotFound(f"vault: {what} not found (no such key or mount)") from None
        if isinstance(exc, hvac_exc.InvalidRequest):
            if "soft-deleted" in text or "soft deleted" in text:
                raise KeyRevoked(f"vault: {what} is soft-deleted") from None
            if "too old" in text or "disallowed by policy" in text:
                raise KeyRevoked(
                    f"vault: {what} is below the key's min_decryption_version"
                ) from None
            if "too new" in text:
                raise KeyNotFound(f"vault: {what} does not exist yet") from None
            if "not found" in text:
                raise KeyNotFound(f"vault: {what} not found") from None
            if "missing 'context'" in text or "key derivation" in text:
                raise ConfigError(
                    f"vault: {what} is a derived key but context_binding is "
                    f"{self.context_binding!r}; use context_binding='derived' or a non-derived key"
                ) from None
            if op == "decrypt":
                raise UnwrapFailed(
                    f"vault: wrapped key under {what} was refused as invalid or inauthentic"
                ) from None
        raise KmsError(
            f"vault: {op} on {what} failed ({type(exc).__name__}: {text[:200]})"
        ) from None

    # -- context binding --------------------------------------------------------------------
    def _ensure_server_supports_ad(self) -> None:
        """Refuse servers too old to honour ``associated_data`` (they would ignore it)."""
        if self._server_checked:
            return
        try:
            status = self._request("GET", "/v1/sys/seal-status")
        except hvac_exc.VaultError as exc:
            if isinstance(exc, _TRANSIENT):
                raise KmsUnavailable("vault: sys/seal-status unavailable") from None
            status = None
        version = status.get("version") if isinstance(status, Mapping) else None
        m = _SERVER_VERSION_RE.match(version) if isinstance(version, str) else None
        if m is None:
            log.warning(
                "vault: cannot tell the server version; relying on its unrecognized-parameter "
                "warnings to detect missing associated_data support"
            )
        elif tuple(int(g) for g in m.groups()) < MIN_AD_SERVER_VERSION:
            raise ConfigError(
                f"vault: server version {version} predates transit associated_data "
                f"(needs {'.'.join(map(str, MIN_AD_SERVER_VERSION))}+); use context_binding='derived'"
            )
        self._server_checked = True

    def _binding(self, kek_id: str, context: Mapping[str, str]) -> dict[str, str]:
        encoded = _b64(canonical_context(context))
        if self.context_binding == "associated_data":
            self._ensure_server_supports_ad()
            return {"associated_data": encoded}
        cfg = self._key_config(kek_id)
        if cfg is None:
            raise KeyNotFound(f"vault: transit key {kek_id!r} not found")
        if not cfg.get("derived"):
            raise ConfigError(
                f"vault: transit key {kek_id!r} is not a derived key, so a derivation context "
                "would be silently ignored; recreate it with derived=true or use "
                "context_binding='associated_data'"
            )
        return {"context": encoded}

    def _check_warnings(self, resp: Mapping[str, Any], kek_id: str) -> None:
        # "Endpoint ignored these unrecognized parameters: [associated_data]"
        for w in resp.get("warnings") or ():
            if "associated_data" in str(w):
                raise ConfigError(
                    f"vault: the server ignored the context binding for {kek_id!r}; it does not "
                    "support it, so wrapped keys would not be bound to their topic"
                )

    # -- KmsProvider ----------------------------------------------------------------------
    @staticmethod
    def _check_name(kek_id: str) -> None:
        if not isinstance(kek_id, str) or not _NAME_RE.fullmatch(kek_id):
            raise KeyNotFound(f"vault: {kek_id!r} is not a valid transit key name")

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        """A fresh 256-bit data key from ``datakey/plaintext`` under the latest version."""
        self._check_name(kek_id)
        what = f"transit key {kek_id!r}"
        body: dict[str, Any] = {"bits": DATA_KEY_BYTES * 8, **self._binding(kek_id, context)}
        try:
            resp = self._request("POST", f"/v1/{self.mount}/datakey/plaintext/{kek_id}", json=body)
        except hvac_exc.VaultError as exc:
            self._raise_mapped(exc, "datakey", what)
        if not isinstance(resp, Mapping) or not isinstance(resp.get("data"), Mapping):
            raise KmsError(f"vault: unexpected datakey response for {what}")
        self._check_warnings(resp, kek_id)
        data = resp["data"]
        ciphertext = data.get("ciphertext")
        version = ciphertext_version(ciphertext) if isinstance(ciphertext, str) else None
        if version is None:
            raise KmsError(f"vault: datakey for {what} returned no transit ciphertext")
        if "key_version" in data and data["key_version"] != version:
            raise KmsError(f"vault: datakey for {what} reported inconsistent key versions")
        try:
            plaintext = base64.b64decode(data.get("plaintext") or "", validate=True)
        except (binascii.Error, ValueError):
            raise KmsError(f"vault: datakey for {what} returned an undecodable key") from None
        if len(plaintext) != DATA_KEY_BYTES:
            raise KmsError(f"vault: datakey for {what} returned a key of the wrong size")
        return DataKey(kek_id, version, plaintext, ciphertext.encode("ascii"))

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        """Decrypt a wrapped data key with transit ``decrypt`` and the same bound context."""
        self._check_name(kek_id)
        what = f"transit key {kek_id!r} v{kek_version}"
        try:
            ciphertext = wrapped.decode("ascii")
        except UnicodeDecodeError:
            raise UnwrapFailed(
                f"vault: wrapped key under {what} is not a transit ciphertext"
            ) from None
        version = ciphertext_version(ciphertext)
        if version is None:
            raise UnwrapFailed(f"vault: wrapped key under {what} is not a transit ciphertext")
        if version != kek_version:
            raise UnwrapFailed(
                f"vault: wrapped key is labelled {kek_id!r} v{kek_version} but was wrapped under v{version}"
            )
        body = {"ciphertext": ciphertext, **self._binding(kek_id, context)}
        try:
            resp = self._request("POST", f"/v1/{self.mount}/decrypt/{kek_id}", json=body)
        except hvac_exc.VaultError as exc:
            self._raise_mapped(exc, "decrypt", what)
        if not isinstance(resp, Mapping) or not isinstance(resp.get("data"), Mapping):
            raise KmsError(f"vault: unexpected decrypt response for {what}")
        self._check_warnings(resp, kek_id)
        try:
            plaintext = base64.b64decode(resp["data"].get("plaintext") or "", validate=True)
        except (binascii.Error, ValueError):
            raise UnwrapFailed(
                f"vault: wrapped key under {what} did not decrypt to a data key"
            ) from None
        if len(plaintext) != DATA_KEY_BYTES:
            raise UnwrapFailed(
                f"vault: wrapped key under {what} did not decrypt to a 256-bit data key"
            )
        return plaintext

    def _key_config(self, kek_id: str) -> dict[str, Any] | None:
        """The key's public config (``None`` if it does not exist), cached briefly.

        Only the fields revocation needs are kept; the endpoint never returns material.
        """
        now = self._clock()
        with self._lock:
            hit = self._configs.get(kek_id)
            if hit is not None and hit[0] > now:
                return hit[1]
        cfg: dict[str, Any] | None
        try:
            resp = self._request("GET", f"/v1/{self.mount}/keys/{kek_id}")
        except hvac_exc.InvalidPath:
            cfg = None
        except hvac_exc.VaultError as exc:
            self._raise_mapped(exc, "read", f"transit key {kek_id!r}")
        else:
            data = resp.get("data") if isinstance(resp, Mapping) else None
            if not isinstance(data, Mapping):
                cfg = None
            else:
                cfg = {
                    "derived": bool(data.get("derived")),
                    "soft_deleted": bool(data.get("soft_deleted")),
                    "min_decryption_version": int(data.get("min_decryption_version") or 1),
                    "latest_version": int(data.get("latest_version") or 0),
                    "versions": frozenset(int(v) for v in (data.get("keys") or {})),
                }
        with self._lock:
            if len(self._configs) > 10_000:
                self._configs.clear()
            self._configs[kek_id] = (now + self.revocation_cache_ttl, cfg)
        return cfg

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        """Whether a version may no longer unwrap (missing keys count as revoked).

        Needs ``read`` on ``transit/keys/<name>``; raises :class:`KeyAccessDenied` without it
        (the data-key cache treats that as "not known to be revoked").
        """
        self._check_name(kek_id)
        cfg = self._key_config(kek_id)
        if cfg is None or cfg["soft_deleted"]:
            return True
        return (
            kek_version < cfg["min_decryption_version"]
            or kek_version > cfg["latest_version"]
            or kek_version not in cfg["versions"]
        )

    # -- pseudonym master secrets ------------------------------------------------------------
    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        """``(version, material)`` of a KV v2 secret; the latest version when none given."""
        if not isinstance(key_id, str) or not _NAME_RE.fullmatch(key_id):
            raise KeyNotFound(f"vault: {key_id!r} is not a valid secret name")
        path = f"{self.kv_mount}/{self.kv_prefix}/{key_id}"
        what = f"secret {path!r}" + (f" v{version}" if version is not None else "")
        params = {"version": int(version)} if version is not None else None
        try:
            resp = self._request(
                "GET", f"/v1/{self.kv_mount}/data/{self.kv_prefix}/{key_id}", params=params
            )
        except hvac_exc.InvalidPath as exc:
            # KV v2 answers 404 both for "never existed" and for deleted/destroyed versions;
            # only the latter carry version metadata.
            meta = (
                ((exc.json or {}).get("data") or {}).get("metadata")
                if isinstance(exc.json, Mapping)
                else None
            )
            if isinstance(meta, Mapping) and (meta.get("destroyed") or meta.get("deletion_time")):
                raise KeyRevoked(f"vault: {what} is deleted or destroyed") from None
            raise KeyNotFound(f"vault: {what} not found") from None
        except hvac_exc.VaultError as exc:
            self._raise_mapped(exc, "read", what)
        data = resp.get("data") if isinstance(resp, Mapping) else None
        if not isinstance(data, Mapping) or not isinstance(data.get("metadata"), Mapping):
            raise KmsError(
                f"vault: unexpected KV v2 response for {what} (is {self.kv_mount!r} a KV v2 mount?)"
            )
        meta = data["metadata"]
        if meta.get("destroyed") or meta.get("deletion_time"):
            raise KeyRevoked(f"vault: {what} is deleted or destroyed")
        fields = data.get("data")
        encoded = fields.get("material") if isinstance(fields, Mapping) else None
        if not isinstance(encoded, str):
            raise ConfigError(f"vault: {what} has no string field 'material'")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"vault: field 'material' of {what} is not base64") from None
        if len(material) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"vault: field 'material' of {what} is shorter than {MIN_SECRET_BYTES} bytes"
            )
        return int(meta["version"]), material
