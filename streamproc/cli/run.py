"""``streamproc run --config FILE [--workers N]``: run the processor.

With ``--workers 1`` (the default) the worker runs in this process and the process
manager (systemd, Kubernetes) owns restarts.  With ``--workers N`` a supervisor runs N
worker processes in the same consumer group, serves their aggregated metrics and health
on ``metrics.port``, forwards SIGTERM and restarts failed workers (see
:mod:`streamproc.runtime.supervisor`).

Exit codes: 0 after a clean drain (SIGTERM/SIGINT), 1 on a fatal runtime error, 78 when
the configuration is invalid (do not restart: fix the file).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from streamproc.cli.options import config_option
from streamproc.config import Config
from streamproc.errors import ConfigError, PolicyError, SchemaError
from streamproc.observability import Observer

log = logging.getLogger("streamproc.cli.run")


def _configure_logging(level: str, fmt: str) -> None:
    try:
        from streamproc.observability.logging import configure_logging
    except ImportError:  # pragma: no cover - observability is part of the package
        logging.basicConfig(level=level)
        return
    configure_logging(level, "human" if fmt in ("text", "human") else fmt)


def run_single(
    config_path: str | os.PathLike[str],
    *,
    index: int = 0,
    instance: str = "",
    serve_metrics: bool = True,
) -> int:
    """Run one worker in this process; returns its exit code.

    Also the entry point of every supervised child (``serve_metrics=False``: the
    supervisor serves the aggregate).
    """
    from streamproc.config import load_config
    from streamproc.runtime.worker import EXIT_CONFIG, run_worker

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"streamproc: configuration error: {exc}", err=True)
        return EXIT_CONFIG
    _configure_logging(config.logging.level, config.logging.format)
    observer, server = _observer(config, index, serve_metrics)
    try:
        return run_worker(config, index=index, instance=instance, observer=observer)
    except (ConfigError, PolicyError, SchemaError) as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    finally:
        close = getattr(observer, "close", None)
        if close is not None:
            close()
        if server is not None:
            server.stop()


def _observer(config: Config, index: int, serve: bool) -> tuple[Observer, Any]:
    """Prometheus metrics (and their HTTP server when ``serve``), or the no-op Observer."""
    if not config.metrics.enabled:
        return Observer(), None
    from streamproc.observability.metrics import KnownLabels, Metrics

    metrics = Metrics(
        allowed_destinations=config.destination_topics,
        worker=index,
        known=KnownLabels.from_config(config),
    )
    server = None
    if serve:
        from streamproc.observability.server import start_server

        # /healthz turns 503 when the loop has been silent longer than the liveness timeout
        # (a wedged KMS call, a hung commit): without it a stuck worker looks alive forever.
        server = start_server(
            metrics,
            config.metrics.host,
            config.metrics.port,
            liveness_timeout=config.liveness_timeout,
        )
        log.info(
            "metrics at %s/metrics",
            server.url,
            extra={"port": server.port, "liveness_timeout_s": config.liveness_timeout},
        )
    return metrics, server


def run_supervised(config_path: str | os.PathLike[str], workers: int, *, instance: str = "") -> int:
    from streamproc.config import load_config
    from streamproc.runtime.supervisor import Supervisor
    from streamproc.runtime.worker import EXIT_CONFIG

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"streamproc: configuration error: {exc}", err=True)
        return EXIT_CONFIG
    _configure_logging(config.logging.level, config.logging.format)
    server = None
    on_exit = None
    mp_dir: str | None = None
    try:
        if config.metrics.enabled:
            from streamproc.observability.server import (
                ENV,
                mark_worker_dead,
                setup_multiprocess,
                start_aggregate_server,
            )

            # A directory the deployment chose (PROMETHEUS_MULTIPROC_DIR) is only emptied
            # at the next start; one we created is removed on the way out.
            ours = not os.environ.get(ENV)
            path = setup_multiprocess()
            mp_dir = path if ours else None
            server = start_aggregate_server(
                config.metrics.host,
                config.metrics.port,
                expected_workers=workers,
                liveness_timeout=config.liveness_timeout,
            )
            on_exit = mark_worker_dead
            log.info(
                "aggregate metrics at %s/metrics",
                server.url,
                extra={"port": server.port, "workers": workers},
            )
        return Supervisor(config_path, workers, instance=instance, on_child_exit=on_exit).run()
    finally:
        # Supervisor.run() returns only after every child was joined (or killed), so
        # nothing writes to the directory any more.
        if server is not None:
            server.stop()
        if mp_dir is not None:
            from streamproc.observability.server import ENV, teardown_multiprocess

            teardown_multiprocess(mp_dir)
            if os.environ.get(ENV) == mp_dir:
                del os.environ[ENV]


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
    if workers == 1:
        code = run_single(config_path, instance=instance)
    else:
        code = run_supervised(config_path, workers, instance=instance)
    sys.exit(code)


if __name__ == "__main__":  # python -m streamproc.cli.run (tests, before main.py wires it)
    run()
