"""Options shared by several commands, declared once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import click


def config_option(help: str = "Processor config (YAML).") -> Callable[[Any], Any]:
    """``--config FILE`` (required), passed to the command as ``config_path``."""
    return click.option(
        "--config", "config_path", required=True, type=click.Path(dir_okay=False), help=help
    )


def admin_config_option() -> Callable[[Any], Any]:
    """``--admin-config FILE``: client properties of a principal with admin rights.

    Creating topics and ACLs needs rights the processor must not hold, so these commands
    take their credentials from a separate file (``key=value`` lines, the
    ``--command-config`` format of the Kafka tools) that replaces the config's ``kafka:``
    settings; see :func:`streamproc.config.load_kafka_properties`.
    """
    return click.option(
        "--admin-config",
        "admin_config",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Client properties (key=value; ${VAR} reads the environment) of a principal "
        "allowed to do this; they replace the config's kafka: settings.",
    )


def admin_client_config(kafka: Mapping[str, Any], admin_config: str | None) -> dict[str, Any]:
    """The admin client's librdkafka settings: the config's ``kafka:`` or, with
    ``--admin-config``, that file's settings (only ``bootstrap.servers`` is inherited)."""
    from streamproc.config import load_kafka_properties

    if admin_config is None:
        return dict(kafka)
    props = load_kafka_properties(admin_config)
    return {"bootstrap.servers": kafka["bootstrap.servers"], **props}
