"""``streamproc topics apply|check --config FILE``: create the config's topics, check their retention.

``apply`` is idempotent and sets the policy's ``retention.ms``; ``check`` reads the live
topic configs and exits 1 when a governed topic's retention drifted from what ``apply``
would set (see :mod:`streamproc.runtime.retention`).
"""

from __future__ import annotations

import sys

import click

from streamproc.cli.options import admin_client_config, admin_config_option, config_option
from streamproc.errors import ConfigError, PolicyError


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
    except (ConfigError, PolicyError) as exc:
        raise click.ClickException(f"retention: {exc}") from None
    except KafkaException as exc:
        click.echo(f"streamproc: topic creation failed: {exc}", err=True)
        sys.exit(1)
    for r in results:
        note = f"  ({r.note})" if r.note else ""
        click.echo(
            f"{r.status:8} {r.topic}  partitions={r.partitions} replication={r.replication_factor}{note}"
        )


@topics.command("check")
@config_option()
@admin_config_option()
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the cluster.")
def check(config_path: str, admin_config: str | None, timeout: float) -> None:
    """Compare the live retention of every governed topic with the policy; exit 1 on drift."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streamproc.config import load_config
    from streamproc.policy.model import format_duration_ms
    from streamproc.runtime.retention import describe_retention, expected_retention, live_drift

    try:
        config = load_config(config_path, check_policy=False)
        policy = config.load_policy()
        conf = admin_client_config(config.admin_config(), admin_config)
        expected = expected_retention(config, policy)
    except (ConfigError, PolicyError) as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    try:
        live = describe_retention(AdminClient(conf), expected, timeout)
    except KafkaException as exc:
        click.echo(f"streamproc: describe_configs failed: {exc}", err=True)
        sys.exit(1)
    drift = live_drift(expected, live)
    for topic, want in expected.items():
        d = drift[topic]
        limit = format_duration_ms(want.policy_ms)
        if d is None:
            click.echo(f"ok       {topic}  retention.ms={want.desired_ms} (policy {limit})")
        else:
            flag = "  EXCEEDS POLICY" if d.exceeds_policy else ""
            click.echo(f"DRIFT    {topic}  {d.detail} (policy {limit}){flag}")
    if any(d is not None for d in drift.values()):
        click.echo("streamproc: retention drift; `streamproc topics apply` sets the policy's values", err=True)
        sys.exit(1)
