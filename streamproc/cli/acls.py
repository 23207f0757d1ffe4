"""``streamproc acls plan|apply --config FILE``: least-privilege ACLs from the config.

The ACLs are derived from the pipelines and the ``acls:`` principals
(:mod:`streamproc.runtime.acls`).  Changing ACLs needs cluster rights the processor must
not have, so the admin connection takes its own credentials from ``--admin-config``: a
Java-style client properties file (the ``--command-config`` of ``kafka-acls.sh``),
whose settings replace those of the config's ``kafka:`` section (only
``bootstrap.servers`` is inherited).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from streamproc.cli.options import admin_client_config, admin_config_option, config_option
from streamproc.errors import ConfigError


@click.group("acls")
def acls() -> None:
    """Derive, show and apply the least-privilege Kafka ACLs of a config."""


def _timeout_option(f: Any) -> Any:
    return click.option(
        "--timeout",
        type=float,
        default=30.0,
        show_default=True,
        help="Seconds to wait for the cluster.",
    )(f)


def _load(config_path: str, admin_config: str | None) -> tuple[Any, dict[str, Any]]:
    from streamproc.config import load_config

    try:
        config = load_config(config_path, check_policy=True)
        conf = admin_client_config(config.admin_config(), admin_config)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if config.acls is None:
        raise click.ClickException(
            f"configuration error: {config_path}: acls: is required (name the processor, "
            "audience and producer principals; see docs/configuration.md)"
        )
    return config, conf


def _fail(what: str, exc: BaseException) -> None:
    from confluent_kafka import KafkaError

    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    name = err.name() if err is not None else type(exc).__name__
    click.echo(f"streamproc: {what} failed: {name}", err=True)
    sys.exit(1)


@acls.command("plan")
@config_option()
@admin_config_option()
@_timeout_option
def plan_cmd(config_path: str, admin_config: str | None, timeout: float) -> None:
    """Show the ACLs to add and the existing ones that grant more than needed."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streamproc.runtime import acls as rt

    config, conf = _load(config_path, admin_config)
    try:
        existing = rt.describe(AdminClient(conf), timeout=timeout)
    except KafkaException as exc:
        _fail("describing ACLs", exc)
    for line in rt.render(rt.plan(config, existing)):
        click.echo(line)


@acls.command("apply")
@config_option()
@admin_config_option()
@_timeout_option
@click.option(
    "--prune",
    is_flag=True,
    help="Also delete the existing ACLs the plan reports as broader than needed.",
)
def apply_cmd(config_path: str, admin_config: str | None, timeout: float, prune: bool) -> None:
    """Create the missing ACLs (idempotent: a second run adds nothing)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streamproc.runtime import acls as rt

    config, conf = _load(config_path, admin_config)
    try:
        p = rt.apply(config, AdminClient(conf), prune=prune, timeout=timeout)
    except KafkaException as exc:
        _fail("applying ACLs", exc)
    for line in rt.render(p, applied=True, pruned=prune):
        click.echo(line)
