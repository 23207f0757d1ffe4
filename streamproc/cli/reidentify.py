"""``streamproc reidentify`` and ``streamproc keys export-audience``: the audited path only.

Two commands, two roles, on purpose: the key custodian (who may read the pseudonym
master) exports one audience's key; the investigator (who may not) reverses values with
that file.  Both take the processor config (``--config``), and nothing in it is optional:

* the **policy** is the config's, applied to the processor's source schemas (the
  ``schemas:`` directory, or the registry's ``<source>-value`` subjects): the field must
  be one the key's audience encrypts deterministically, in the requested domain, or the
  request is denied;
* the **audit trail** is the config's ``audit:`` section (the tools' chain beside
  ``audit.file``, and ``audit.kafka_topic``).  Every attempt -- value revealed, request
  denied (a key file others can read, a reason with personal data), decryption failed,
  key exported or refused -- is written *before* anything is printed or written; if the
  event cannot be written, nothing is revealed or exported;
* the **actor** is the caller's authenticated identity (:mod:`streamproc.identity`:
  Vault/OpenBao token, AWS caller, else the OS user), recorded with its source.
  ``--actor`` only adds a free-text note beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from streamproc.audit import AuditError, AuditLog, open_tool_log
from streamproc.cli.options import config_option
from streamproc.crypto.pseudonym import PseudonymKeys, ReidentificationError
from streamproc.errors import ConfigError, StreamprocError
from streamproc.reid import (
    AudienceKey,
    ExportRefused,
    Reidentifier,
    audit_refusal,
    export_audience_key_audited,
    reidentifiable_fields,
)

_NOTE = click.option(
    "--actor",
    "note",
    envvar="STREAMPROC_ACTOR",
    help="Free-text note recorded beside the authenticated actor (e.g. your ticket "
    "handle); it never replaces the identity.",
)


def _load(config_path: str) -> tuple[Any, Any]:
    """The config and its policy; errors here happen before anything could be revealed."""
    from streamproc.config import load_config

    try:
        config = load_config(config_path)
        return config, config.load_policy()
    except StreamprocError as exc:
        raise click.ClickException(str(exc)) from None


def source_schemas(config: Any, audience: str, registry_client: Any = None) -> list[Any]:
    """The schemas the processor reads for ``audience``: what ``--field`` is checked against.

    ``schemas: {directory}``: every top-level ``.avsc`` there (as ``policy check`` reads
    them).  A registry: the latest ``<topic>-value`` schema of every source topic of a
    pipeline with a destination for ``audience`` (a subject that does not exist is skipped;
    an unreachable registry raises, and the caller refuses).
    """
    from streamproc.schema import avro
    from streamproc.schema.annotations import metadata_tags
    from streamproc.schema.registry import (
        ConfluentSchemaSource,
        RegisteredSchema,
        SchemaRegistryUnavailable,
        load_document,
    )

    spec = dict(config.schemas)
    if "directory" in spec:
        return [load_document(f) for f in sorted(Path(spec["directory"]).glob("*.avsc"))]
    source = ConfluentSchemaSource(
        {k: v for k, v in spec.items() if k != "type"}, client=registry_client
    )
    topics = sorted(
        {
            t
            for p in config.pipelines
            if any(d.audience == audience for d in p.destinations)
            for t in p.sources
        }
    )
    out: list[Any] = []
    for topic in topics:
        subject = f"{topic}-value"
        try:
            v = source.client.get_latest_version(subject)
        except Exception as exc:
            if getattr(exc, "http_status_code", None) == 404:
                continue
            raise SchemaRegistryUnavailable(
                f"registry: cannot read subject {subject!r} ({type(exc).__name__})"
            ) from None
        tags = metadata_tags(getattr(v.schema, "metadata", None))
        out.append(
            RegisteredSchema(v.schema_id, avro.canonical_json(v.schema.schema_str), subject, tags)
        )
    return out


def _open_audit(config: Any, note: str | None) -> AuditLog:
    try:
        return open_tool_log(config, note=note)
    except (AuditError, StreamprocError) as exc:
        raise click.ClickException(f"audit log unavailable, refusing to continue: {exc}") from None


def _close(log: AuditLog) -> None:
    try:
        log.close()
    except AuditError as exc:
        click.echo(f"warning: closing the audit log: {exc}", err=True)


def _subject_keys(config: Any) -> Any:
    """``(audience, key id) -> subject key`` for erasable values, or ``None`` without
    ``erasure:``.  The key topic is read once, on the first erasable value; the keys are
    unwrapped through the config's KMS (the caller needs unwrap on the audience's KEK)."""
    if config.erasure is None:
        return None
    from streamproc.runtime.erasure import key_opener, read_key_directory
    from streamproc.runtime.factory import build_kms

    state: dict[str, Any] = {}

    def resolve(audience: str, key_id: str) -> bytes:
        if "dir" not in state:
            state["dir"] = read_key_directory(config)
            state["open"] = key_opener(build_kms(config), config.erasure.topic)
        return state["dir"].resolve(audience, key_id, state["open"])

    return resolve


def _values(values: tuple[str, ...]) -> list[str]:
    if values:
        return list(values)
    if sys.stdin is None:
        return []
    return [line.strip() for line in sys.stdin if line.strip()]


@click.command("reidentify")
@config_option("Processor config: its policy, KMS identity and audit: section apply.")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audience key exported with `streamproc keys export-audience` (mode 0600).",
)
@click.option(
    "--domain",
    required=True,
    help="Pseudonym domain of the field (the rule's `domain`, else the field's "
    "`streamproc.domain` hint, else the tag name).",
)
@click.option(
    "--field", "field_path", required=True, help="Field path, e.g. customer.email (audited)."
)
@_NOTE
@click.option(
    "--reason", required=True, help="Justification, e.g. a ticket id (audited; no personal data)."
)
@click.option(
    "--subject", help="Token or topic:partition:offset reference of the data subject (audited)."
)
@click.argument("values", nargs=-1)
def reidentify(
    config_path: str,
    key_file: Path,
    domain: str,
    field_path: str,
    note: str | None,
    reason: str,
    subject: str | None,
    values: tuple[str, ...],
) -> None:
    """Print the plaintext of each deterministic ciphertext VALUE (or stdin lines), one per line.

    Stops at the first value that cannot be re-identified (exit 1); every attempt,
    successful or not, is in the audit trail first.
    """
    config, policy = _load(config_path)
    log = _open_audit(config, note)
    try:
        try:
            key = AudienceKey.load(key_file)
        except ConfigError as exc:  # e.g. a key file others can read: refused, and audited
            audit_refusal(
                log,
                error="key_file_refused",
                domain=domain,
                field=field_path,
                subject=subject,
                reason=reason,
                policy_version=policy.version,
            )
            raise click.ClickException(str(exc)) from None
        try:
            fields = reidentifiable_fields(policy, key.audience, source_schemas(config, key.audience))
        except StreamprocError as exc:  # no schemas, no field check: refuse, audited
            audit_refusal(
                log,
                error="schemas_unavailable",
                audience=key.audience,
                domain=domain,
                field=field_path,
                subject=subject,
                reason=reason,
                policy_version=policy.version,
            )
            raise click.ClickException(str(exc)) from None
        reid = Reidentifier(key, log, policy, fields, subject_keys=_subject_keys(config))
        for i, value in enumerate(_values(values), 1):
            try:
                plain = reid.reidentify(
                    value, domain, field=field_path, subject=subject, reason=reason
                )
            except ReidentificationError as exc:
                click.echo(f"value #{i}: {exc}", err=True)
                raise SystemExit(1) from None
            click.echo(plain)
    except (StreamprocError, AuditError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        _close(log)


@click.command("export-audience")
@config_option("Processor config: its KMS and pseudonym_secrets, policy and audit: section.")
@click.option(
    "--secret",
    "secret_id",
    help="Id of the pseudonym master secret (default: the policy's keys.pseudonym).",
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
@_NOTE
def export_audience(
    config_path: str,
    secret_id: str | None,
    audience: str,
    version: int | None,
    out: Path,
    note: str | None,
) -> None:
    """Export AUDIENCE's re-identification key for one master version into a 0600 file.

    The file reverses every encrypt_deterministic value of that audience and version,
    offline and without further audit: prefer a short-lived export, destroy it after use
    (docs/keys.md, "What an exported key allows").
    """
    from streamproc.runtime.factory import build_kms, build_secret_source

    config, policy = _load(config_path)
    sid = secret_id or policy.pseudonym_key or "pseudonym-master"
    log = _open_audit(config, note)
    try:
        kms = build_kms(config)

        def keys() -> PseudonymKeys:
            return PseudonymKeys(build_secret_source(config, kms), sid)

        exported = export_audience_key_audited(
            keys,
            audience,
            out,
            audit=log,
            policy=policy,
            kms=getattr(kms, "name", "unknown"),
            secret_id=sid,
            version=version,
        )
    except (StreamprocError, AuditError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        _close(log)
    click.echo(f"wrote {out}: audience {audience!r}, master version {exported.master_version}")


__all__ = ["ExportRefused", "export_audience", "reidentify"]
