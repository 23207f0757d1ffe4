"""``streamproc run --config FILE [--workers N]``: run the processor.

With ``--workers 1`` (the default) the worker runs in this process and the process
manager (systemd, Kubernetes) owns restarts.  With ``--workers N`` a supervisor runs N
worker processes in the same consumer group, serves their aggregated metrics and health
on ``metrics.port``, forwards SIGTERM and restarts failed workers (see
:mod:`streamproc.runtime.supervisor`).  Everything is wired by the composition root,
:mod:`streamproc.runtime.app`; this module only parses the command line.

Exit codes: 0 after a clean drain (SIGTERM/SIGINT), 1 on a fatal runtime error, 78 when
the configuration is invalid (do not restart: fix the file).
"""

from __future__ import annotations

import sys

import click

from streamproc.cli.options import config_option


@click.command("run")
@config_option()
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes in the group.",
)
@click.option(
    "--instance",
    envvar="STREAMPROC_INSTANCE",
    default="",
    help="Names this process in transactional.id (<group_id>-<instance>-<index>). "
    "Default: the host name. Must be unique among live processes of the group and "
    "stable across restarts (a StatefulSet pod name is ideal).",
)
def run(config_path: str, workers: int, instance: str) -> None:
    """Run the processor: consume, sanitize per audience, produce (exactly once by default)."""
    from streamproc.runtime.app import run_single, run_supervised

    if workers == 1:
        code = run_single(config_path, instance=instance)
    else:
        code = run_supervised(config_path, workers, instance=instance)
    sys.exit(code)


if __name__ == "__main__":  # python -m streamproc.cli.run (tests, before main.py wires it)
    run()
