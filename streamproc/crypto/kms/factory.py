"""Build a :class:`~streamproc.crypto.kms.KmsProvider` from a configuration mapping.

Examples (the ``kms:`` section of a pipeline config)::

    {"provider": "local", "path": "keys/keyring.json"}
    {"provider": "vault", "url": "https://bao.internal:8200", "mount": "transit"}
    {"provider": "aws", "region": "eu-west-1"}

Every mistake raises :class:`~streamproc.errors.ConfigError` naming the offending key
(``kms.mount``, ``kms.provider``...), so a typo fails at start-up rather than at the first
record.

Secrets come from the environment, which *overrides* the file: ``VAULT_TOKEN`` (or
``BAO_TOKEN``) beats ``token``, so a config file checked into git can carry a placeholder
while the real token is injected by the deployment.  ``VAULT_ADDR``/``BAO_ADDR`` and
``VAULT_NAMESPACE`` are fallbacks for ``url`` and ``namespace``.  AWS credentials are
*refused* in the file altogether: they come from the standard chain (``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, a ``profile``, web identity, instance
role); ``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL_KMS``/``AWS_ENDPOINT_URL``
are fallbacks for ``region`` and ``endpoint_url``.

``hvac`` and ``boto3`` are optional extras (``streamproc[vault]``, ``streamproc[aws]``):
their modules are imported only when that provider is asked for, so the base install and
the local keyring work without them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from streamproc import validation
from streamproc.crypto.kms import KmsProvider
from streamproc.errors import ConfigError

log = logging.getLogger("streamproc.crypto.kms.factory")

PROVIDERS = ("local", "vault", "aws")

_Check = Callable[[str, Any], Any]


# One set of value checks for every configuration value (streamproc.validation). KMS settings
# are strict: no numbers or booleans written as text.
_str: _Check = validation.string
_number: _Check = validation.positive_number


def _int(key: str, value: Any) -> int:
    return validation.integer(key, value, minimum=1, text=False)


def _bool(key: str, value: Any) -> bool:
    return validation.boolean(key, value, text=False)


def _choice(*allowed: str) -> _Check:
    return functools.partial(validation.choice, allowed=allowed)


_SCHEMAS: dict[str, dict[str, _Check]] = {
    "local": {"path": _str, "reload_interval": _number},
    "vault": {
        "url": _str,
        "token": _str,
        "mount": _str,
        "kv_mount": _str,
        "kv_prefix": _str,
        "namespace": _str,
        "timeout": _number,
        "verify": _bool,
        "insecure": _bool,
        "ca_cert": _str,
        "client_cert": _str,
        "client_key": _str,
        "context_binding": _choice("associated_data", "derived"),
        "revocation_cache_ttl": _number,
    },
    "aws": {
        "region": _str,
        "endpoint_url": _str,
        "profile": _str,
        "connect_timeout": _number,
        "read_timeout": _number,
        "max_attempts": _int,
        "check_key_state": _bool,
        "state_cache_ttl": _number,
    },
}

#: Settings every provider accepts; they configure the processor around the provider.
#: ``revocation_check_interval``: seconds between revocation sweeps (cached data keys
#: of revoked source versions are evicted; sealers move off revoked destination
#: versions), default :data:`DEFAULT_REVOCATION_CHECK_INTERVAL`.
_COMMON: dict[str, _Check] = {"revocation_check_interval": _number}
DEFAULT_REVOCATION_CHECK_INTERVAL = 5.0


def revocation_check_interval(spec: Mapping[str, Any]) -> float:
    """The ``kms.revocation_check_interval`` of a (validated) spec, or the default."""
    v = spec.get("revocation_check_interval")
    return DEFAULT_REVOCATION_CHECK_INTERVAL if v is None else _number("kms.revocation_check_interval", v)


_AWS_SECRET_KEYS = frozenset(
    {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "credentials",
    }
)


def validate_kms_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``kms:`` section once and return it normalized (``provider`` included).

    The one validation of KMS settings: :func:`streamproc.config.load_config` calls it
    (adding the file name to the message) and :func:`build_kms` calls it for specs that do
    not come from a config file.  Every mistake raises
    :class:`~streamproc.errors.ConfigError` naming the key (``kms.mount``); nothing here
    touches the network, so loading a config never contacts a KMS.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"kms: expected a mapping, got {validation.type_name(spec)}")
    provider = spec.get("provider")
    if provider is None:
        raise ConfigError(f"kms.provider: missing (one of: {', '.join(PROVIDERS)})")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"kms.provider: unknown provider {provider!r} (one of: {', '.join(PROVIDERS)})"
        )
    common = {
        k: _COMMON[k](f"kms.{k}", v) for k, v in spec.items() if isinstance(k, str) and k in _COMMON
    }
    return {"provider": provider, **common, **_validated(provider, spec)}


def _validated(provider: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The provider's own settings (without ``provider`` and the common settings)."""
    schema = _SCHEMAS[provider]
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "provider":
            continue
        if not isinstance(key, str):
            raise ConfigError(f"kms: keys must be strings (got {key!r})")
        if provider == "aws" and key in _AWS_SECRET_KEYS:
            raise ConfigError(
                f"kms.{key}: AWS credentials do not belong in the configuration; use "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or a role"
            )
        if key in _COMMON:
            _COMMON[key](f"kms.{key}", value)  # validated here, used by the runtime
            continue
        if key not in schema:
            raise ConfigError(
                f"kms.{key}: unknown setting for provider {provider!r} "
                f"(expected one of: {', '.join(sorted({*schema, *_COMMON}))})"
            )
        out[key] = schema[key](f"kms.{key}", value)
    if out.get("verify") is False and not out.get("insecure", False):
        # An unverified TLS connection hands the token and every data key to whoever
        # answers: never by accident (a copied snippet, a debugging leftover).
        raise ConfigError(
            "kms.verify: false disables TLS certificate verification; set kms.insecure: true "
            "to allow it (the worker then logs a warning at start and exports "
            'streamproc_insecure_transport{component="kms"} 1), or give kms.ca_cert the '
            "server's CA bundle"
        )
    return out


def _missing_extra(provider: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"kms.provider: {provider!r} needs the optional dependency {exc.name or 'package'!r}; "
        f"install it with: pip install 'streamproc[{provider}]'"
    )


def build_kms(
    spec: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> KmsProvider:
    """Construct the provider described by ``spec``.

    ``env`` defaults to ``os.environ`` (injectable for tests); ``base_dir`` anchors a
    relative local keyring ``path`` (normally the directory of the config file).
    """
    env = os.environ if env is None else env
    settings = validate_kms_settings(spec)
    provider = settings["provider"]
    opts = {k: v for k, v in settings.items() if k != "provider" and k not in _COMMON}
    if provider == "local":
        return _build_local(opts, base_dir)
    if provider == "vault":
        return _build_vault(opts, env)
    return _build_aws(opts, env)


def _build_local(opts: dict[str, Any], base_dir: str | os.PathLike[str] | None) -> KmsProvider:
    from streamproc.crypto.kms.local import LocalKeyring

    if "path" not in opts:
        raise ConfigError("kms.path: required for provider 'local'")
    path = Path(opts.pop("path")).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return LocalKeyring(path, **opts)


def _build_vault(opts: dict[str, Any], env: Mapping[str, str]) -> KmsProvider:
    try:
        from streamproc.crypto.kms.vault import VaultTransitKms
    except ImportError as exc:
        raise _missing_extra("vault", exc) from None

    file_token = opts.pop("token", None)
    token = env.get("VAULT_TOKEN") or env.get("BAO_TOKEN") or file_token
    url = opts.pop("url", None) or env.get("VAULT_ADDR") or env.get("BAO_ADDR")
    if not url:
        raise ConfigError("kms.url: required for provider 'vault' (or set VAULT_ADDR/BAO_ADDR)")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"kms.url: must start with http:// or https:// (got {url!r})")
    if not token:
        raise ConfigError("kms.token: required for provider 'vault' (set VAULT_TOKEN or BAO_TOKEN)")
    namespace = opts.pop("namespace", None) or env.get("VAULT_NAMESPACE") or None
    verify: bool | str = opts.pop("verify", True)
    if opts.pop("insecure", False) and verify is False:
        log.warning("kms: TLS certificate verification is OFF for %s (kms.insecure: true)", url)
    ca_cert = opts.pop("ca_cert", None)
    if ca_cert is not None:
        if verify is False:
            raise ConfigError("kms.ca_cert: conflicts with verify: false")
        verify = ca_cert
    cert, key = opts.pop("client_cert", None), opts.pop("client_key", None)
    if (cert is None) != (key is None):
        missing = "client_key" if key is None else "client_cert"
        raise ConfigError(f"kms.{missing}: client_cert and client_key go together")
    return VaultTransitKms(
        url,
        token,
        namespace=namespace,
        verify=verify,
        client_cert=(cert, key) if cert is not None and key is not None else None,
        **opts,
    )


def _build_aws(opts: dict[str, Any], env: Mapping[str, str]) -> KmsProvider:
    try:
        from streamproc.crypto.kms.aws import AwsKms
    except ImportError as exc:
        raise _missing_extra("aws", exc) from None

    region = opts.pop("region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region:
        raise ConfigError("kms.region: required for provider 'aws' (or set AWS_REGION)")
    endpoint = (
        opts.pop("endpoint_url", None)
        or env.get("AWS_ENDPOINT_URL_KMS")
        or env.get("AWS_ENDPOINT_URL")
    )
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            f"kms.endpoint_url: must start with http:// or https:// (got {endpoint!r})"
        )
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    credentials: dict[str, str] | None = None
    if key_id or secret:
        if not (key_id and secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
            raise ConfigError(
                f"kms: environment has only half of the AWS key pair ({missing} is unset)"
            )
        credentials = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
        if env.get("AWS_SESSION_TOKEN"):
            credentials["aws_session_token"] = env["AWS_SESSION_TOKEN"]
        if "profile" in opts:
            raise ConfigError("kms.profile: conflicts with AWS_ACCESS_KEY_ID in the environment")
    return AwsKms(region, endpoint, credentials=credentials, **opts)
