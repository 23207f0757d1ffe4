"""``streamproc reidentify`` and ``streamproc keys export-audience``.

Two commands, two roles, on purpose: the key custodian (who may read the pseudonym
master) exports one audience's key; the investigator (who may not) reverses values with
that file.  Every reversal is written to the audit file before the value is printed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from streamproc.audit import AuditError, AuditLog, FileSink, load_hmac_key
from streamproc.crypto.pseudonym import PseudonymKeys, ReidentificationError
from streamproc.errors import StreamprocError
from streamproc.policy.model import load_policy
from streamproc.reid import AudienceKey, Reidentifier, export_audience_key, write_audience_key

DEFAULT_AUDIT_FILE = "streamproc-reidentify-audit.jsonl"


def _open_audit(audit_file: Path, hmac_key_file: Path | None, stream: str, actor: str) -> AuditLog:
    try:
        key = load_hmac_key(hmac_key_file) if hmac_key_file else None
        return AuditLog([FileSink(audit_file)], stream=stream, actor=actor, hmac_key=key)
    except (AuditError, StreamprocError) as exc:
        raise click.ClickException(f"audit log unavailable, refusing to continue: {exc}") from None


def _values(values: tuple[str, ...]) -> list[str]:
    if values:
        return list(values)
    if sys.stdin is None:
        return []
    return [line.strip() for line in sys.stdin if line.strip()]


@click.command("reidentify")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audience key exported with `streamproc keys export-audience` (mode 0600).",
)
@click.option(
    "--domain",
    required=True,
    help="Pseudonym domain of the field (rule `domain`, "
    "field hint `streamproc.domain`, else the tag name).",
)
@click.option(
    "--field", "field_path", required=True, help="Field path, e.g. customer.email (audited)."
)
@click.option("--actor", required=True, envvar="STREAMPROC_ACTOR", help="Who is asking (audited).")
@click.option(
    "--reason", required=True, help="Justification, e.g. a ticket id (audited; no personal data)."
)
@click.option(
    "--subject", help="Token or topic:partition:offset reference of the data subject (audited)."
)
@click.option(
    "--audit-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="STREAMPROC_AUDIT_FILE",
    default=DEFAULT_AUDIT_FILE,
    show_default=True,
    help="Hash-chained audit file to append to.",
)
@click.option(
    "--audit-hmac-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audit HMAC key: MAC every event.",
)
@click.option(
    "--audit-stream", default="reidentify", show_default=True, help="Chain id in the audit file."
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Policy the data was produced under: audited by version; the audience must use "
    "encrypt_deterministic in it.",
)
@click.argument("values", nargs=-1)
def reidentify(
    key_file: Path,
    domain: str,
    field_path: str,
    actor: str,
    reason: str,
    subject: str | None,
    audit_file: Path,
    audit_hmac_key_file: Path | None,
    audit_stream: str,
    policy_file: Path | None,
    values: tuple[str, ...],
) -> None:
    """Print the plaintext of each deterministic ciphertext VALUE (or stdin lines), one per line.

    Stops at the first value that cannot be re-identified (exit 1); every attempt,
    successful or not, is in the audit file.
    """
    try:
        key = AudienceKey.load(key_file)
        policy: Any = load_policy(policy_file) if policy_file else None
    except StreamprocError as exc:
        raise click.ClickException(str(exc)) from None
    log = _open_audit(audit_file, audit_hmac_key_file, audit_stream, "reidentify")
    try:
        reid = Reidentifier(key, log, policy)
        for i, value in enumerate(_values(values), 1):
            try:
                plain = reid.reidentify(
                    value, domain, actor=actor, field=field_path, subject=subject, reason=reason
                )
            except ReidentificationError as exc:
                click.echo(f"value #{i}: {exc}", err=True)
                raise SystemExit(1) from None
            click.echo(plain)
    except StreamprocError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        try:
            log.close()
        except AuditError as exc:
            click.echo(f"warning: closing the audit log: {exc}", err=True)


def _secret_source(keyring: Path | None, kms_config: Path | None) -> Any:
    if (keyring is None) == (kms_config is None):
        raise click.UsageError("give exactly one of --keyring or --kms-config")
    if keyring is not None:
        from streamproc.crypto.kms.local import LocalKeyring

        return LocalKeyring(keyring)
    from streamproc.crypto.kms.factory import build_kms

    assert kms_config is not None
    try:
        raw = yaml.safe_load(kms_config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise click.UsageError(f"{kms_config}: cannot read YAML ({type(exc).__name__})") from None
    spec = raw.get("kms", raw) if isinstance(raw, dict) else raw
    kms = build_kms(spec, base_dir=kms_config.parent)
    wrapped = raw.get("pseudonym_secrets") if isinstance(raw, dict) else None
    if isinstance(wrapped, dict) and wrapped.get("provider") == "wrapped_file":
        # The same source the worker uses: the master wrapped under a pinned KEK.
        from streamproc.crypto.wrapped_secrets import WrappedSecretFile

        if not wrapped.get("path") or not wrapped.get("kek"):
            raise click.UsageError("pseudonym_secrets: wrapped_file needs 'path' and 'kek'")
        return WrappedSecretFile(kms_config.parent / str(wrapped["path"]), kms, kek=str(wrapped["kek"]))
    if not hasattr(kms, "get_secret"):
        raise click.UsageError(
            f"KMS provider {getattr(kms, 'name', '?')!r} does not hold pseudonym secrets"
        )
    return kms


@click.command("export-audience")
@click.option(
    "--keyring",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Local keyring holding the pseudonym master.",
)
@click.option(
    "--kms-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML with a `kms:` mapping (Vault/OpenBao KV, or with `pseudonym_secrets:` "
    "{provider: wrapped_file, path, kek} for a wrapped secret file on any KMS).",
)
@click.option(
    "--secret",
    "secret_id",
    default="pseudonym-master",
    show_default=True,
    help="Id of the pseudonym master secret.",
)
@click.option("--audience", required=True, help="Audience whose re-identification key to export.")
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    help="Master version (default: the primary); one key per version.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key file to create (mode 0600; never overwritten).",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Refuse unless the audience exists in this policy.",
)
@click.option(
    "--actor",
    envvar="STREAMPROC_ACTOR",
    default=lambda: os.environ.get("USER", "unknown"),
    help="Who exports (audited).",
)
@click.option(
    "--audit-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Record the export in this audit file.",
)
@click.option("--audit-hmac-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--audit-stream", default="keys", show_default=True)
def export_audience(
    keyring: Path | None,
    kms_config: Path | None,
    secret_id: str,
    audience: str,
    version: int | None,
    out: Path,
    policy_file: Path | None,
    actor: str,
    audit_file: Path | None,
    audit_hmac_key_file: Path | None,
    audit_stream: str,
) -> None:
    """Export AUDIENCE's re-identification key for one master version into a 0600 file."""
    try:
        if policy_file is not None:
            load_policy(policy_file).audience(audience)
        source = _secret_source(keyring, kms_config)
        keys = PseudonymKeys(source, secret_id)
        blob = export_audience_key(keys, audience, version)
        exported = AudienceKey.from_bytes(blob)
        log = (
            _open_audit(audit_file, audit_hmac_key_file, audit_stream, actor)
            if audit_file
            else None
        )
        try:
            if log is not None:  # audited before the file exists
                log.audience_key_exported(
                    getattr(source, "name", "local"), secret_id, audience, exported.master_version
                )
            write_audience_key(out, blob)
        finally:
            if log is not None:
                log.close()
    except (StreamprocError, AuditError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out}: audience {audience!r}, master version {exported.master_version}")
