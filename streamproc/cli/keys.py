"""``streamproc keys``: manage the local keyring (the embedded default KMS).

For Vault/OpenBao and AWS KMS, keys are managed with those systems' own tools
(docs/keys.md); these commands only touch the local keyring file.
"""

from __future__ import annotations

import importlib.util
import json

import click

from streamproc.crypto.kms.local import KINDS, LocalKeyring
from streamproc.errors import ConfigError, KmsError

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


@keys.command("rotate")
@_KEYRING
@click.argument("key_id")
def rotate(keyring_path: str, key_id: str) -> None:
    """Add a new primary version; older versions still decrypt."""
    try:
        v = LocalKeyring(keyring_path).rotate(key_id)
    except (ConfigError, KmsError) as exc:
        _fail(exc)
    click.echo(f"{key_id}: rotated, primary version {v}")


@keys.command("revoke")
@_KEYRING
@click.argument("key_id")
@click.argument("version", type=int)
def revoke(keyring_path: str, key_id: str, version: int) -> None:
    """Revoke VERSION of KEY_ID: records under it go to the dead-letter topic."""
    try:
        LocalKeyring(keyring_path).revoke(key_id, version)
    except (ConfigError, KmsError) as exc:
        _fail(exc)
    click.echo(f"{key_id}: version {version} revoked")


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
