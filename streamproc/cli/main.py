"""Entry point of the ``streamproc`` command.

Each command lives in its own module under :mod:`streamproc.cli`; this module only
assembles the group, so commands can be found and changed independently.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from streamproc import __version__

#: (module, attribute) of every top-level command, in help order.
_COMMANDS = [
    ("streamproc.cli.demo", "demo"),
    ("streamproc.cli.run", "run"),
    ("streamproc.cli.produce", "produce"),
    ("streamproc.cli.consume", "consume"),
    ("streamproc.cli.topics", "topics"),
    ("streamproc.cli.acls", "acls"),
    ("streamproc.cli.keys", "keys"),
    ("streamproc.cli.secrets", "secrets"),
    ("streamproc.cli.policy", "policy"),
    ("streamproc.cli.reidentify", "reidentify"),
    ("streamproc.cli.audit", "audit"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streamproc")
def cli() -> None:
    """streamproc: a streaming privacy processor for Kafka.

    Consumes envelope-encrypted topics, applies a per-audience privacy policy to the
    annotated fields of each Avro record, and re-encrypts the result for each audience.
    """


def _register() -> None:
    for module, attr in _COMMANDS:
        if importlib.util.find_spec(module) is None:
            continue  # an optional command group that is not part of this build
        cli.add_command(getattr(importlib.import_module(module), attr))


_register()


def main() -> None:
    try:
        cli(prog_name="streamproc")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
