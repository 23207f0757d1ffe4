"""Options shared by several commands, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def config_option(help: str = "Processor config (YAML).") -> Callable[[Any], Any]:
    """``--config FILE`` (required), passed to the command as ``config_path``."""
    return click.option(
        "--config", "config_path", required=True, type=click.Path(dir_okay=False), help=help
    )
