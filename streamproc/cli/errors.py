"""Exit codes and error types shared by the commands (``sysexits.h`` numbering).

Scripts around ``streamproc`` need to tell "your input is wrong" (fix the data, retry is
pointless) from "something failed" (retry may help) without parsing messages, so bad
input data exits with ``EX_DATAERR`` (65) and an unexpected exception with
``EX_SOFTWARE`` (70).  Messages name where (file, line, field) and never the value: a
bad value is often the very personal data the processor exists to protect.
"""

from __future__ import annotations

import click

EX_DATAERR = 65
"""Input data was incorrect (a JSON line, a field value)."""
EX_SOFTWARE = 70
"""An internal error: a bug, reported without its message (which may quote data)."""


class DataError(click.ClickException):
    """Bad input data: one line on stderr, exit 65."""

    exit_code = EX_DATAERR


__all__ = ["EX_DATAERR", "EX_SOFTWARE", "DataError"]
