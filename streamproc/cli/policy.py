"""``streamproc policy``: lint and explain policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from streamproc.errors import PolicyError, SchemaError
from streamproc.pipeline.lint import check, render_text
from streamproc.policy.model import load_policy
from streamproc.schema.registry import RegisteredSchema, load_document


@click.group()
def policy() -> None:
    """Lint and explain privacy policies."""


@policy.command("check")
@click.option("--policy", "policy_path", default="policy.yaml", show_default=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--schemas", "schema_paths", multiple=True, default=["schemas"], show_default=True,
              type=click.Path(exists=True), help="A directory of .avsc files, or single files (repeatable).")
@click.option("--show", is_flag=True, help="Print the field x audience treatment matrix.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Also check this processor config's topic settings against the policy's retention.")
def check_cmd(policy_path: str, schema_paths: tuple[str, ...], show: bool, as_json: bool, config_path: str | None) -> None:
    """Check that every field is classified and every tag has a rule for every audience.

    With ``--config``, also that no topic of that config would retain longer than the
    policy allows.  Exits 1 with a readable report when not; use it in CI next to your schemas.
    """
    try:
        pol = load_policy(policy_path)
        schemas: list[RegisteredSchema] = []
        for p in schema_paths:
            # Only the schemas authored in the directory: derived output schemas that the
            # processor registers under registered/ are not linted.
            files = [Path(p)] if p.endswith(".avsc") else sorted(Path(p).glob("*.avsc"))
            for f in files:
                # A plain schema or a document with external tags (metadata.tags), which
                # classify fields as much as inline tags do.
                try:
                    rs = load_document(f)
                except SchemaError as exc:
                    raise click.ClickException(str(exc)) from None
                rs.subject = str(f)
                schemas.append(rs)
    except (PolicyError, SchemaError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    report = check(pol, schemas)
    retention: list[str] = []
    if config_path is not None:
        from streamproc.config import load_config
        from streamproc.errors import ConfigError
        from streamproc.runtime.retention import config_violations

        try:
            retention = config_violations(load_config(config_path, check_policy=False), pol)
        except ConfigError as exc:
            raise click.ClickException(f"configuration error: {exc}") from None
    if as_json:
        click.echo(json.dumps({**report.to_json(), "retention": retention}, indent=2))
    else:
        click.echo(render_text(report, show))
        for line in retention:
            click.echo(f"retention: {line}")
    sys.exit(0 if report.ok and not retention else 1)


@policy.command("explain")
@click.option("--policy", "policy_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The policy file (default: the --config's policy, else policy.yaml).")
@click.option("--schema", "schema_paths", multiple=True, type=click.Path(exists=True),
              help="Explain per field of these schemas (.avsc files or directories; repeatable).")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A processor config: its policy, schemas (schemas.directory) and topics per audience.")
@click.option("--audience", default=None, help="Only this audience.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def explain_cmd(
    policy_path: str | None, schema_paths: tuple[str, ...], config_path: str | None, audience: str | None, fmt: str
) -> None:
    """Explain, per audience and per tag (or field), what the audience receives.

    Purpose, legal basis, retention, subject field, privacy budget (with how many records
    per subject fit a window) and re-identification target per audience; per tag, the
    operation in plain words with its parameters: pseudonym domains (own or shared),
    who can reverse a ciphertext and whether forget can shred it, the noise of a DP field
    (sensitivity, scale, expected error) and randomized response's truth probability.
    """
    from streamproc.cli.catalog import _schemas, audience_topics
    from streamproc.config import load_config
    from streamproc.errors import ConfigError
    from streamproc.pipeline.explain import explain, render_text

    topics: dict[str, list[str]] = {}
    try:
        schema_files: list[Path] = []
        if config_path is not None:
            config = load_config(config_path, check_policy=False)
            pol = load_policy(policy_path) if policy_path else config.load_policy()
            topics = audience_topics(config)
            # The config's schema directory unless --schema names others; a registry-only
            # config without --schema is explained per tag.
            if schema_paths or dict(config.schemas).get("directory"):
                schema_files = _schemas(schema_paths, dict(config.schemas))
        else:
            pol = load_policy(policy_path or "policy.yaml")
            for p in schema_paths:
                schema_files += [Path(p)] if p.endswith(".avsc") else sorted(Path(p).glob("*.avsc"))
        schemas = [load_document(f) for f in schema_files]
        doc = explain(pol, schemas, topics, audience)
    except (ConfigError, PolicyError, SchemaError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(doc, indent=2) if fmt == "json" else render_text(doc), nl=fmt == "json")

