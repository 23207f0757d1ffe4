"""Entry point of the ``streamproc`` command.

Each command lives in its own module under :mod:`streamproc.cli`; this module only
assembles the group, so commands can be found and changed independently.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import click

from streamproc import __version__
from streamproc.cli.errors import EX_SOFTWARE

#: (module, attribute) of every top-level command, in help order.
_COMMANDS = [
    ("streamproc.cli.demo", "demo"),
    ("streamproc.cli.run", "run"),
    ("streamproc.cli.produce", "produce"),
    ("streamproc.cli.consume", "consume"),
    ("streamproc.cli.dlq", "dlq"),
    ("streamproc.cli.topics", "topics"),
    ("streamproc.cli.acls", "acls"),
    ("streamproc.cli.keys", "keys"),
    ("streamproc.cli.secrets", "secrets"),
    ("streamproc.cli.policy", "policy"),
    ("streamproc.cli.catalog", "catalog"),
    ("streamproc.cli.consent", "consent"),
    ("streamproc.cli.forget", "forget"),
    ("streamproc.cli.risk", "risk"),
    ("streamproc.cli.reidentify", "reidentify"),
    ("streamproc.cli.provenance", "provenance"),
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
    """Run the command; an unexpected exception becomes one line and exit 70.

    Why no traceback: its last line is the exception's message, and messages of the
    libraries underneath (``datetime``, fastavro, json) quote the offending value -- which
    may be the personal data this tool exists to protect.  The line names the exception
    type and the innermost code location instead, enough for a bug report.  Errors the
    commands expect are :class:`click.ClickException` (exit 1, or 65 for bad input data).
    """
    try:
        cli(prog_name="streamproc")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last line of defence
        click.echo(f"streamproc: internal error: {_where(exc)} (message withheld: it may quote data)", err=True)
        sys.exit(EX_SOFTWARE)


def _where(exc: BaseException) -> str:
    """``TypeName at module.py:123`` from the innermost traceback frame (no values)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__name__
    code = tb.tb_frame.f_code
    return f"{type(exc).__name__} at {Path(code.co_filename).name}:{tb.tb_lineno}"


if __name__ == "__main__":
    main()
