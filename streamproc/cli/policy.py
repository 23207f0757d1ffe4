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
