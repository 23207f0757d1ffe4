"""``streamproc catalog --config FILE``: the data map, and the change a policy PR makes to it.

Per source schema and field: its tags and, for every audience, the operation, the output
field, the purpose, the retention and the privacy budget (k, epsilon) where the rule sets
one.  ``--diff OLD_POLICY`` prints what changes from the old policy to the config's policy
over the same schemas (put it in the pull request).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, PolicyError, SchemaError


def _schemas(paths: tuple[str, ...], config_schemas: object) -> list[Path]:
    if not paths:
        directory = config_schemas.get("directory") if isinstance(config_schemas, dict) else None
        if not directory:
            raise click.ClickException(
                "the config reads schemas from a registry; name the source schemas with --schemas DIR"
            )
        paths = (str(directory),)
    files: list[Path] = []
    for p in paths:
        # Only authored schemas: derived output schemas under registered/ are not sources.
        files += [Path(p)] if p.endswith(".avsc") else sorted(Path(p).glob("*.avsc"))
    return files


def audience_topics(config: Any) -> dict[str, list[str]]:
    """audience -> its destination topics in the config, in config order."""
    topics: dict[str, list[str]] = {}
    for p in config.pipelines:
        for d in p.destinations:
            topics.setdefault(d.audience, [])
            if d.topic not in topics[d.audience]:
                topics[d.audience].append(d.topic)
    return topics


@click.command("catalog")
@config_option()
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
@click.option("--diff", "old_policy", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An older policy file: print the data-map changes from it to the config's policy.")
@click.option("--schemas", "schema_paths", multiple=True, type=click.Path(exists=True),
              help="Source schemas (directory of .avsc or files; repeatable). Default: the config's schemas.directory.")
def catalog(config_path: str, fmt: str, old_policy: str | None, schema_paths: tuple[str, ...]) -> None:
    """Print the data map (per schema and field, what every audience gets)."""
    from streamproc.config import load_config
    from streamproc.pipeline.catalog import data_map, diff, render_diff_markdown, render_markdown
    from streamproc.policy.model import load_policy
    from streamproc.schema.registry import load_document

    try:
        config = load_config(config_path, check_policy=False)
        policy = config.load_policy()
        schemas = [load_document(f) for f in _schemas(schema_paths, dict(config.schemas))]
        old = load_policy(old_policy) if old_policy else None
    except (ConfigError, PolicyError, SchemaError) as exc:
        raise click.ClickException(str(exc)) from None
    topics = audience_topics(config)
    new_map = data_map(policy, schemas, topics)
    if old is None:
        click.echo(json.dumps(new_map, indent=2) if fmt == "json" else render_markdown(new_map), nl=fmt == "json")
        return
    changes = diff(data_map(old, schemas, topics), new_map)
    click.echo(json.dumps(changes, indent=2) if fmt == "json" else render_diff_markdown(changes), nl=fmt == "json")
