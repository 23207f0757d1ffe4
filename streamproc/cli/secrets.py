"""``streamproc secrets``: pseudonym master secrets in a KMS-wrapped file (any KMS).

For deployments whose KMS has no secret store (AWS KMS), or that want the master under a
KEK rather than in a secret store::

    streamproc secrets create --kms-config streamproc.yaml --file keys/pseudonym.json \\
        --kek alias/streamproc-pseudonym
    streamproc secrets rotate --kms-config streamproc.yaml --file keys/pseudonym.json
    streamproc secrets list --file keys/pseudonym.json
    streamproc secrets import --kms-config streamproc.yaml --file keys/pseudonym.json \\
        --kek alias/streamproc-pseudonym --from-keyring keys/keyring.json

The KMS is the ``kms:`` section of ``--kms-config`` (credentials from the environment, as
for the processor); ``--file``, ``--kek`` and ``--id`` default to the config's
``pseudonym_secrets`` section and its policy's ``keys.pseudonym``.  The processor reads
the file with ``pseudonym_secrets: {provider: wrapped_file, path: ..., kek: ...}``
(docs/keys.md).  Run these as the key custodian: ``create``/``rotate``/``import`` need
*generate data key* on the KEK, which the processor must not have.

``create``, ``rotate`` and ``import`` change what every token and ciphertext derives from,
so they are audited like re-identification: ``secret_created``, ``key_rotated`` (``kind:
secret``) and ``secret_imported`` go to the config's ``audit:`` trail (the tools' chain)
with the caller's authenticated identity *before* the file changes; without a writable
trail nothing changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import click

from streamproc.errors import ConfigError, KmsError, PolicyError

_FILE = click.option(
    "--file",
    "file_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Wrapped secret file (default: pseudonym_secrets.path of --kms-config).",
)
_CONFIG = click.option(
    "--kms-config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Processor config whose kms: section names the KMS (and whose "
    "pseudonym_secrets / policy give the defaults).",
)
_ID = click.option(
    "--id",
    "secret_id",
    help="Secret id (default: keys.pseudonym of the config's policy).",
)


_NOTE = click.option(
    "--actor", "note", help="Free-text note beside the authenticated actor (audited)."
)


def _fail(exc: Exception) -> NoReturn:
    raise click.ClickException(str(exc))


def _audit_log(ctx: _Ctx, note: str | None) -> Any:
    """The config's audit trail, or a click error: no change happens unaudited."""
    from streamproc.audit import AuditError, open_tool_log
    from streamproc.errors import StreamprocError

    try:
        return open_tool_log(ctx.config, note=note)
    except (AuditError, StreamprocError) as exc:
        raise click.ClickException(f"audit log unavailable, refusing to continue: {exc}") from None


def _audited(
    ctx: _Ctx, note: str | None, event: str, attrs: dict[str, Any], action: Any
) -> Any:
    """Run ``action`` after its event is written (:func:`streamproc.audit.run_audited`)."""
    from streamproc.audit import AuditError, run_audited

    log = _audit_log(ctx, note)
    try:
        return run_audited(log, event, {"kms": _kms_name(ctx), **attrs}, action)
    except AuditError as exc:
        _fail(exc)
    finally:
        try:
            log.close()
        except AuditError as exc:
            click.echo(f"warning: closing the audit log: {exc}", err=True)


def _kms_name(ctx: _Ctx) -> str:
    spec = getattr(ctx.config, "kms", None) or {}
    return str(spec.get("provider", "unknown"))


class _Ctx:
    """What the options resolve to: file, KEK, secret id and (lazily) the KMS."""

    def __init__(
        self,
        config_path: Path | None,
        file_path: Path | None,
        kek: str | None,
        secret_id: str | None,
        *,
        need_kms: bool = True,
    ) -> None:
        self.config: Any = None
        if config_path is not None:
            from streamproc.config import load_config

            self.config = load_config(config_path, check_policy=False)
        elif need_kms:
            raise click.UsageError("--kms-config is required (its kms: section names the KMS)")
        ps = self.config.pseudonym_secrets if self.config is not None else None
        wrapped = ps is not None and ps.provider == "wrapped_file"
        file = file_path or (ps.path if wrapped and ps is not None else None)
        if file is None:
            raise click.UsageError("--file is required (or set pseudonym_secrets.path)")
        self.file = Path(file)
        self.kek = kek or (ps.kek if wrapped and ps is not None else None)
        self.secret_id = secret_id
        if self.secret_id is None and self.config is not None:
            self.secret_id = self.config.load_policy().pseudonym_key
        self._kms: Any = None

    @property
    def kms(self) -> Any:
        if self._kms is None:
            from streamproc.runtime.factory import build_kms

            self._kms = build_kms(self.config)
        return self._kms

    def store(self) -> Any:
        from streamproc.crypto.wrapped_secrets import WrappedSecretFile

        kms = self.kms if self.config is not None else _NoKms()
        return WrappedSecretFile(self.file, kms)

    def need_id(self) -> str:
        if not self.secret_id:
            raise click.UsageError("--id is required (the policy names no keys.pseudonym)")
        return self.secret_id

    def need_kek(self) -> str:
        if not self.kek:
            raise click.UsageError("--kek is required (or set pseudonym_secrets.kek)")
        return self.kek


class _NoKms:
    """Stands in for the KMS where none is needed (``list`` never unwraps)."""

    name = "none"

    def __getattr__(self, item: str) -> Any:
        raise click.UsageError("--kms-config is required for this command")


@click.group("secrets")
def secrets() -> None:
    """Pseudonym master secrets wrapped under a KEK of any KMS (a wrapped secret file)."""


@secrets.command("create")
@_CONFIG
@_FILE
@click.option("--kek", help="KEK that wraps the secret (default: pseudonym_secrets.kek).")
@_ID
@_NOTE
def create(
    config_path: Path | None,
    file_path: Path | None,
    kek: str | None,
    secret_id: str | None,
    note: str | None,
) -> None:
    """Create the secret with a version 1 generated by the KMS under --kek (audited)."""
    try:
        ctx = _Ctx(config_path, file_path, kek, secret_id)
        sid, k = ctx.need_id(), ctx.need_kek()
        store = ctx.store()
        v = _audited(
            ctx, note, "secret_created", {"key_id": sid, "version": 1},
            lambda: store.create(sid, k),
        )  # fmt: skip
    except (ConfigError, KmsError, PolicyError) as exc:
        _fail(exc)
    click.echo(f"{sid}: created version {v} under {k} in {ctx.file}")


@secrets.command("rotate")
@_CONFIG
@_FILE
@click.option("--kek", help="KEK for the new version (default: the current primary's KEK).")
@_ID
@_NOTE
def rotate(
    config_path: Path | None,
    file_path: Path | None,
    kek: str | None,
    secret_id: str | None,
    note: str | None,
) -> None:
    """Add a new primary version (joins break: docs/keys.md section 4.2; audited)."""
    try:
        ctx = _Ctx(config_path, file_path, kek, secret_id)
        sid = ctx.need_id()
        store = ctx.store()
        info = next((i for i in store.list_secrets() if i.secret_id == sid), None)
        if info is None:
            raise ConfigError(f"{ctx.file} has no secret {sid!r}")
        attrs = {
            "key_id": sid,
            "kind": "secret",
            "version": max(info.versions) + 1,
            "previous_version": info.primary,
        }
        v = _audited(ctx, note, "key_rotated", attrs, lambda: store.rotate(sid, kek))
    except (ConfigError, KmsError, PolicyError) as exc:
        _fail(exc)
    click.echo(f"{sid}: rotated, primary version {v} (restart the processors to use it)")


@secrets.command("import")
@_CONFIG
@_FILE
@click.option("--kek", help="KEK that wraps the secret (default: pseudonym_secrets.kek).")
@_ID
@click.option(
    "--from-keyring",
    "keyring_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Local keyring holding the secret now; every unrevoked version is imported "
    "with its version number, so existing tokens keep joining.",
)
@_NOTE
def import_(
    config_path: Path | None,
    file_path: Path | None,
    kek: str | None,
    secret_id: str | None,
    keyring_path: Path,
    note: str | None,
) -> None:
    """Move an existing master (all unrevoked versions) from a local keyring into the file."""
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.wrapped_secrets import load_keyring_secret_versions

    try:
        ctx = _Ctx(config_path, file_path, kek, secret_id)
        sid, k = ctx.need_id(), ctx.need_kek()
        ring = LocalKeyring(keyring_path)
        primary = next(i.primary_version for i in ring.list_keys() if i.kek_id == sid)
        store = ctx.store()
        versions = load_keyring_secret_versions(ring, sid)

        def do_import() -> None:
            for v, material in versions:
                store.import_version(sid, v, material, k, primary=v == primary)

        _audited(
            ctx, note, "secret_imported",
            {"key_id": sid, "version": primary, "count": len(versions)}, do_import,
        )  # fmt: skip
    except StopIteration:
        raise click.ClickException(f"keyring has no secret {secret_id!r}") from None
    except (ConfigError, KmsError, PolicyError) as exc:
        _fail(exc)
    click.echo(f"{sid}: imported version(s) {', '.join(str(v) for v, _ in versions)} under {k}")


@secrets.command("list")
@_CONFIG
@_FILE
def list_(config_path: Path | None, file_path: Path | None) -> None:
    """List secrets, versions and KEKs (never material; no KMS call)."""
    try:
        ctx = _Ctx(config_path, file_path, None, None, need_kms=False)
        from streamproc.crypto.wrapped_secrets import WrappedSecretFile

        if not ctx.file.exists():
            raise ConfigError(f"{ctx.file} does not exist")
        infos = WrappedSecretFile(ctx.file, _NoKms()).list_secrets()
    except (ConfigError, KmsError, PolicyError) as exc:
        _fail(exc)
    if not infos:
        click.echo("(no secrets)")
    for i in infos:
        imported = f"  imported: {','.join(map(str, i.imported))}" if i.imported else ""
        click.echo(
            f"{i.secret_id:30} primary v{i.primary}  versions: {','.join(map(str, i.versions))}"
            f"  kms: {','.join(i.kms)}  kek: {','.join(i.keks)}{imported}"
        )


__all__ = ["secrets"]

if __name__ == "__main__":  # python -m streamproc.cli.secrets (until main.py registers it)
    secrets()
