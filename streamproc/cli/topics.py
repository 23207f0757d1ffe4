"""``streamproc topics apply --config FILE``: create the config's topics (idempotent)."""

from __future__ import annotations

import sys

import click

from streamproc.cli.options import admin_client_config, admin_config_option, config_option
from streamproc.errors import ConfigError


@click.group("topics")
def topics() -> None:
    """Manage the Kafka topics a config needs."""


@topics.command("apply")
@config_option()
@admin_config_option()
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the cluster.",
)
def apply(config_path: str, admin_config: str | None, timeout: float) -> None:
    """Create source, destination and dead-letter topics; report those that exist."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streamproc.config import load_config
    from streamproc.runtime.topics import apply_topics

    try:
        config = load_config(config_path, check_policy=False)
        conf = admin_client_config(config.admin_config(), admin_config)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    try:
        results = apply_topics(config, admin=AdminClient(conf), timeout=timeout)
    except KafkaException as exc:
        click.echo(f"streamproc: topic creation failed: {exc}", err=True)
        sys.exit(1)
    for r in results:
        note = f"  ({r.note})" if r.note else ""
        click.echo(
            f"{r.status:8} {r.topic}  partitions={r.partitions} replication={r.replication_factor}{note}"
        )
