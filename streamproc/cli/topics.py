"""``streamproc topics apply|check --config FILE``: create the config's topics, check their retention.

``apply`` is idempotent, sets the policy's ``retention.ms`` and realigns the compaction
settings of the state topics; ``check`` reads the live topic configs and exits 1 when a
governed topic's retention or a state topic's settings drifted from what ``apply`` would
set (see :mod:`streamproc.runtime.retention` and :mod:`streamproc.runtime.state_topics`).
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
    """Compare the live retention of every governed topic with the policy, and the
    compaction settings of the state topics with what apply sets; exit 1 on drift."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streamproc.config import load_config
    from streamproc.policy.model import format_duration_ms
    from streamproc.runtime.retention import describe_retention, expected_retention, live_drift
    from streamproc.runtime.state_topics import (
        config_drift,
        describe_state_configs,
        expected_state_configs,
    )

    try:
        config = load_config(config_path, check_policy=False)
        policy = config.load_policy()
        conf = admin_client_config(config.admin_config(), admin_config)
        expected = expected_retention(config, policy)
        state = expected_state_configs(config)
    except (ConfigError, PolicyError) as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    try:
        admin = AdminClient(conf)
        live = describe_retention(admin, expected, timeout)
        live_state = describe_state_configs(admin, state, timeout)
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
    # State topics: only the names of the drifted settings (the expected values are in
    # docs/governance.md and the config; live values are not echoed).
    state_drift = config_drift(state, live_state)
    for topic, names in state_drift.items():
        role = state[topic].role
        if names is None:
            click.echo(f"ok       {topic}  {role}: {', '.join(sorted(state[topic].settings))}")
        else:
            click.echo(f"DRIFT    {topic}  {role}: {', '.join(names)} differ from what apply sets")
    failed = False
    if any(d is not None for d in drift.values()):
        click.echo("streamproc: retention drift; `streamproc topics apply` sets the policy's values", err=True)
        failed = True
    if any(n is not None for n in state_drift.values()):
        click.echo("streamproc: state topic drift; `streamproc topics apply` realigns the settings", err=True)
        failed = True
    if failed:
        sys.exit(1)
