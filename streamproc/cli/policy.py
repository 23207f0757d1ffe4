"""``streamproc policy``: lint and explain policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from streamproc.errors import PolicyError, SchemaError
from streamproc.policy.check import check, render_text
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
def check_cmd(policy_path: str, schema_paths: tuple[str, ...], show: bool, as_json: bool) -> None:
    """Check that every field is classified and every tag has a rule for every audience.

    Exits 1 with a readable report when not; use it in CI next to your schemas.
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
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(render_text(report, show))
    sys.exit(0 if report.ok else 1)
