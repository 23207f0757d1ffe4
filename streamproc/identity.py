"""Who is calling: the actor recorded on operator audit events.

Why not ``--actor``
-------------------
An audit event is evidence only if its ``actor`` is not whatever the caller typed.  The
strongest identity a command has is the credential it already uses for the KMS: a
Vault/OpenBao token (``auth/token/lookup-self`` names its display name and entity) or
AWS credentials (STS ``GetCallerIdentity`` names the ARN).  Without such a credential
(the local keyring) the operating-system user the process runs as is the best available
(``pwd.getpwuid(os.getuid())``, not ``$USER``, which the caller sets).  The event records
where the identity came from (``actor_source``: ``vault``, ``aws`` or ``os``), so an
auditor knows how much to trust it.  A command's ``--actor`` text is kept only as a
``note`` beside it.

When the KMS is Vault or AWS and the identity lookup fails, the command fails closed: a
credential that cannot say who it belongs to must not reveal or rotate anything.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
from typing import Any

from streamproc.errors import ConfigError, StreamprocError

_BAD = re.compile(r"[^A-Za-z0-9_.:/@+=\-]")


class IdentityError(StreamprocError):
    """The caller's identity could not be established; nothing may proceed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Actor:
    """An audit actor: ``principal`` (an identifier) and where it was established."""

    principal: str
    source: str
    """``vault``, ``aws`` or ``os``."""


def _clean(text: str) -> str:
    """Map to the audit actor alphabet (``[A-Za-z0-9_.:/@+=-]``, at most 200 characters)."""
    return _BAD.sub("_", text)[:200] or "unknown"


def os_actor() -> Actor:
    """The user the process runs as (real uid), never ``$USER``."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers): the number is the name
        name = f"uid-{uid}"
    return Actor(_clean(name), "os")


def vault_actor(client: Any) -> Actor:
    """``auth/token/lookup-self`` of an ``hvac.Client``: display name and entity id."""
    try:
        data = client.auth.token.lookup_self()["data"]
    except Exception as exc:  # hvac raises many types; the message may quote the server
        raise IdentityError(
            f"vault: cannot look up the token's identity ({type(exc).__name__}); "
            "the token needs the default policy's auth/token/lookup-self"
        ) from None
    name = str(data.get("display_name") or "")
    entity = str(data.get("entity_id") or "")
    if not name and not entity:
        raise IdentityError("vault: the token has neither a display name nor an entity")
    principal = name or "token"
    if entity:
        principal = f"{principal}@entity:{entity}"
    return Actor(_clean(principal), "vault")


def aws_actor(sts_client: Any) -> Actor:
    """STS ``GetCallerIdentity``: the caller's ARN."""
    try:
        arn = sts_client.get_caller_identity()["Arn"]
    except Exception as exc:  # botocore errors; never echo their text
        raise IdentityError(
            f"aws: cannot establish the caller identity ({type(exc).__name__})"
        ) from None
    if not isinstance(arn, str) or not arn:
        raise IdentityError("aws: GetCallerIdentity returned no ARN")
    return Actor(_clean(arn), "aws")


def resolve_actor(config: Any) -> Actor:
    """The actor for a command run against ``config`` (a :class:`streamproc.config.Config`).

    The ``kms:`` provider decides: ``vault`` -> the token's identity, ``aws`` -> the STS
    caller, anything else -> the OS user.  Raises :class:`IdentityError` when the KMS
    identity cannot be established.
    """
    spec = dict(getattr(config, "kms", None) or {})
    provider = spec.get("provider", "local")
    if provider == "vault":
        from streamproc.crypto.kms.factory import build_kms

        try:
            kms = build_kms(spec, base_dir=getattr(config, "base_dir", None))
        except ConfigError as exc:
            raise IdentityError(f"vault: {exc}") from None
        return vault_actor(kms.client)  # type: ignore[attr-defined]
    if provider == "aws":
        import boto3

        try:
            session = boto3.session.Session(profile_name=spec.get("profile"))
            sts = session.client(
                "sts",
                region_name=spec.get("region")
                or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION"),
                endpoint_url=spec.get("endpoint_url"),
            )
        except Exception as exc:
            raise IdentityError(f"aws: cannot create an STS client ({type(exc).__name__})") from None
        return aws_actor(sts)
    return os_actor()
