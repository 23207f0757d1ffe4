"""``streamproc keys``: manage the local keyring (the embedded default KMS).

For Vault/OpenBao and AWS KMS, keys are managed with those systems' own tools
(docs/keys.md); these commands only touch the local keyring file.

``rotate`` and ``revoke`` change what can be decrypted, so they are audited like
re-identification: they take the processor config (``--config``), write ``key_rotated`` /
``key_revoked`` to its ``audit:`` trail (the tools' chain) with the caller's authenticated
identity *before* changing the keyring, and refuse to act when the event cannot be
written.  A change that then fails is followed by an ``outcome: failed`` event.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import click

from streamproc.crypto.kms.local import KINDS, LocalKeyring
from streamproc.errors import ConfigError, KmsError, StreamprocError

_KEYRING = click.option(
    "--keyring",
    "keyring_path",
    envvar="STREAMPROC_KEYRING",
    default="keys/keyring.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Keyring file (mode 0600). Env: STREAMPROC_KEYRING.",
)


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


@click.group()
def keys() -> None:
    """Create, rotate, revoke and list keys in the local keyring."""


@keys.command("create")
@_KEYRING
@click.option("--kind", type=click.Choice(KINDS), default="kek", show_default=True,
              help="kek: wraps data keys; secret: pseudonym master secret.")
@click.option("--if-missing", is_flag=True, help="Succeed quietly if the key exists.")
@click.argument("key_ids", nargs=-1, required=True)
def create(keyring_path: str, kind: str, if_missing: bool, key_ids: tuple[str, ...]) -> None:
    """Create KEY_IDS (the keyring file is created if needed, mode 0600)."""
    try:
        ring = LocalKeyring.open_or_create(keyring_path)
        existing = {k.kek_id for k in ring.list_keys()}
        for kid in key_ids:
            if kid in existing and if_missing:
                click.echo(f"{kid}: exists")
                continue
            ring.create_key(kid, kind)
            click.echo(f"{kid}: created ({kind}, version 1)")
    except (ConfigError, KmsError) as exc:
        _fail(exc)


def _audited_keyring(config_path: str, keyring_path: str | None, note: str | None) -> Any:
    """The config's audit trail and the keyring to change (``--keyring``, else the config's
    local ``kms.path``); raises ``click`` errors before anything changes."""
    from streamproc.audit import AuditError, open_tool_log
    from streamproc.config import load_config

    try:
        config = load_config(config_path, check_policy=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if keyring_path is None:
        if config.kms.get("provider") != "local" or not config.kms.get("path"):
            raise click.UsageError(
                "--keyring is required: the config's kms: is not a local keyring (for "
                "Vault/OpenBao and AWS, rotate and revoke with their own tools)"
            )
        keyring_path = str(config.kms["path"])
    try:
        log = open_tool_log(config, note=note)
    except (AuditError, StreamprocError) as exc:
        raise click.ClickException(f"audit log unavailable, refusing to continue: {exc}") from None
    return log, keyring_path


_AUDIT_CONFIG = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Processor config: the change is written to its audit: trail first (fail closed).",
)
_KEYRING_OPT = click.option(
    "--keyring",
    "keyring_path",
    envvar="STREAMPROC_KEYRING",
    type=click.Path(dir_okay=False),
    help="Keyring file (default: the config's local kms.path). Env: STREAMPROC_KEYRING.",
)
_NOTE = click.option(
    "--actor", "note", help="Free-text note beside the authenticated actor (audited)."
)


def _key_info(ring: LocalKeyring, key_id: str) -> Any:
    for i in ring.list_keys():
        if i.kek_id == key_id:
            return i
    return None


@keys.command("rotate")
@_AUDIT_CONFIG
@_KEYRING_OPT
@_NOTE
@click.argument("key_id")
def rotate(config_path: str, keyring_path: str | None, note: str | None, key_id: str) -> None:
    """Add a new primary version; older versions still decrypt (audited: key_rotated)."""
    from streamproc.audit import AuditError, EventType, run_audited

    log, path = _audited_keyring(config_path, keyring_path, note)
    try:
        ring = LocalKeyring(path)
        info = _key_info(ring, key_id)
        base = {"kms": "local", "key_id": key_id, "kind": getattr(info, "kind", None)}
        if info is None:
            log.emit(
                EventType.KEY_ROTATED, {**base, "outcome": "denied", "error": "KeyNotFound"}
            )
            raise KmsError(f"no key {key_id!r} in {path}")
        nxt = max(info.versions) + 1
        attrs = {**base, "version": nxt, "previous_version": info.primary_version}
        v = run_audited(log, EventType.KEY_ROTATED, attrs, lambda: ring.rotate(key_id))
    except (ConfigError, KmsError, AuditError) as exc:
        _fail(exc)
    finally:
        _close(log)
    click.echo(f"{key_id}: rotated, primary version {v}")


@keys.command("revoke")
@_AUDIT_CONFIG
@_KEYRING_OPT
@_NOTE
@click.argument("key_id")
@click.argument("version", type=int)
def revoke(
    config_path: str, keyring_path: str | None, note: str | None, key_id: str, version: int
) -> None:
    """Revoke VERSION of KEY_ID: records under it go to the dead-letter topic (audited)."""
    from streamproc.audit import AuditError, EventType, run_audited

    log, path = _audited_keyring(config_path, keyring_path, note)
    try:
        ring = LocalKeyring(path)
        info = _key_info(ring, key_id)
        attrs = {
            "kms": "local",
            "key_id": key_id,
            "kind": getattr(info, "kind", None),
            "version": version if version >= 0 else None,
        }
        if info is None or version not in info.versions:
            log.emit(
                EventType.KEY_REVOKED, {**attrs, "outcome": "denied", "error": "KeyNotFound"}
            )
            raise KmsError(f"no version {version} of key {key_id!r} in {path}")
        run_audited(log, EventType.KEY_REVOKED, attrs, lambda: ring.revoke(key_id, version))
    except (ConfigError, KmsError, AuditError) as exc:
        _fail(exc)
    finally:
        _close(log)
    click.echo(f"{key_id}: version {version} revoked")


def _close(log: Any) -> None:
    from streamproc.audit import AuditError

    try:
        log.close()
    except AuditError as exc:
        click.echo(f"warning: closing the audit log: {exc}", err=True)


@keys.command("list")
@_KEYRING
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(keyring_path: str, as_json: bool) -> None:
    """List keys and versions (never key material)."""
    try:
        infos = LocalKeyring(keyring_path).list_keys()
    except (ConfigError, KmsError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([
            {"id": i.kek_id, "kind": i.kind, "versions": list(i.versions), "primary": i.primary_version,
             "revoked": list(i.revoked_versions)} for i in infos
        ], indent=2))
        return
    if not infos:
        click.echo("(no keys)")
    for i in infos:
        revoked = f"  revoked: {','.join(map(str, i.revoked_versions))}" if i.revoked_versions else ""
        click.echo(f"{i.kek_id:30} {i.kind:7} primary v{i.primary_version}  versions: {','.join(map(str, i.versions))}{revoked}")


if importlib.util.find_spec("streamproc.cli.reidentify") is not None:
    _reid = importlib.import_module("streamproc.cli.reidentify")
    if hasattr(_reid, "export_audience"):
        keys.add_command(_reid.export_audience, "export-audience")
