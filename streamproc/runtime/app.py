"""The composition root: everything that turns a config file into running workers.

The CLI (``streamproc run``) and the supervisor's child processes both start here; the
modules it wires -- :mod:`~streamproc.runtime.factory` (KMS, schema source, pipeline,
audit trail), :mod:`~streamproc.runtime.worker` (the consume loop),
:mod:`~streamproc.runtime.checkpoint` (the commit protocol),
:mod:`~streamproc.runtime.supervisor` (N processes) and the observability layer -- never
import each other upwards, and none of them imports the CLI.

Exit codes (of :func:`run_single`, :func:`run_supervised` and ``streamproc run``): 0
after a clean drain (SIGTERM/SIGINT), 1 on a fatal runtime error, 78 when the
configuration is invalid or the broker refuses the principal (do not restart: fix it).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from typing import Any

from streamproc.audit import AuditError
from streamproc.config import Config, load_config
from streamproc.errors import ConfigError, KmsError, PolicyError, SchemaError, TransientError
from streamproc.observability import Observer
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.consent import ConsentUnavailable
from streamproc.runtime.erasure import start_key_table
from streamproc.runtime.factory import build_audit, build_kms, build_pipeline, build_schemas
from streamproc.runtime.supervisor import Supervisor
from streamproc.runtime.worker import (
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_OK,
    Worker,
    default_instance,
    dependency_of,
)

log = logging.getLogger("streamproc.runtime.app")


def run_worker(
    config: Config,
    *,
    index: int = 0,
    instance: str = "",
    observer: Observer | None = None,
    install_signals: bool = True,
) -> int:
    """Build the pipeline (retrying transient KMS/registry outages) and run one worker.

    With ``audit:`` configured the audit trail is opened once the pipeline is built; a
    trail that cannot be opened (file locked or not verifying, topic producer failing)
    stops the worker with exit 1 before anything is consumed.
    """
    observer = observer or Observer()
    for component in config.insecure_transport:  # allowed only by an explicit insecure: true
        log.warning(
            "TLS certificate verification is OFF for %s (insecure: true in the config)",
            component,
            extra={"component": component},
        )
        observer.insecure_transport(component)
    stop = threading.Event()
    if install_signals:
        import signal

        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, lambda *_: stop.set())
    kms = build_kms(config)
    schemas = build_schemas(config)
    backoff = Backoff(base=0.5, cap=10.0)
    attempt = 0
    down: set[str] = set()
    while True:
        try:
            pipeline = build_pipeline(config, kms=kms, schemas=schemas, observer=observer)
            for dep in down:
                observer.dependency_restored(dep)
            break
        except TransientError as exc:
            attempt += 1
            dep = dependency_of(exc)
            log.warning("start-up: %s unavailable; retrying", dep, extra={"attempt": attempt})
            observer.retrying(dep, attempt)
            observer.ready(False, dep)
            down.add(dep)
            if stop.wait(backoff.delay(attempt)):
                return EXIT_OK
        except KmsError as exc:  # after TransientError: KmsUnavailable is retried above
            # The pseudonym master cannot be read (unknown, revoked, not unwrappable): a
            # restart will not fix it.  KMS messages name key ids only.
            raise ConfigError(f"pseudonym secret: {exc}") from None
    lineage = _lineage(config, pipeline)  # before the audit trail: a bad transport is exit 78
    try:
        consent = start_consent_table(config, pipeline)  # restored before anything is consumed
    except ConsentUnavailable as exc:
        log.error("fatal: %s", exc)
        return EXIT_FATAL
    try:
        subject_keys = start_key_table(config, pipeline)  # likewise (erasable rules)
    except BaseException as exc:
        # Whatever stops the start here (an unreadable key topic, a bad key record, a
        # broker error, Ctrl-C), the consent table restored above owns a consumer: stop it.
        if consent is not None:
            consent.stop()
        if not isinstance(exc, ConsentUnavailable):
            raise
        log.error("fatal: %s", exc)
        return EXIT_FATAL
    tables = [t for t in (consent, subject_keys) if t is not None]
    instance = instance or default_instance()
    try:
        audit = build_audit(
            config, index=index, instance=instance, kms_name=getattr(kms, "name", "unknown")
        )
    except (AuditError, OSError) as exc:
        what = (
            f"{exc.strerror} ({exc.filename})"
            if isinstance(exc, OSError) and not isinstance(exc, AuditError)
            else str(exc)
        )
        log.error("fatal: audit log unavailable: %s", what)
        for t in tables:
            t.stop()
        return EXIT_FATAL
    # gc.freeze() once the clients exist: the start-up heap (pipeline, plans, schemas,
    # policy, clients) moves out of the collector's reach, so full collections during
    # the run walk only what the run allocates.
    worker = Worker(
        config, pipeline, index=index, instance=instance, observer=observer, audit=audit,
        on_started=gc.freeze,
    )  # fmt: skip
    for t in tables:
        t.on_failure = lambda _exc: worker.stop()  # never process on a stale table
        t.start()
    if install_signals:
        worker.install_signal_handlers()
        if stop.is_set():
            if audit is not None:
                audit.abandon()
            for t in tables:
                t.stop()
            return EXIT_OK
    monitor_stop = start_retention_monitor(config, pipeline.policy, observer)
    if lineage is not None:
        lineage.start()
    code = EXIT_FATAL
    try:
        code = worker.run()
        if any(t.failed is not None for t in tables) and code == EXIT_OK:
            code = EXIT_FATAL
        return code
    finally:
        monitor_stop.set()
        for t in tables:
            t.stop()
        if lineage is not None:
            lineage.finish(code == EXIT_OK)
            lineage.close()


def _lineage(config: Config, pipeline: Any) -> Any:
    """The OpenLineage emitter of ``lineage:``, hooked to the pipeline's plan compilations."""
    if config.lineage is None or not config.lineage.enabled:
        return None
    from streamproc.observability.lineage import LineageEmitter

    try:
        emitter = LineageEmitter.from_config(config, pipeline.policy.version)
    except Exception as exc:  # openlineage-python refuses the transport settings
        # The message may quote transport settings (an HTTP API key): the class only.
        raise ConfigError(f"lineage.transport: refused by openlineage-python ({type(exc).__name__})") from None
    if emitter is not None:
        pipeline.on_compile = emitter.plan_compiled
    return emitter


def start_consent_table(config: Config, pipeline: Any) -> Any:
    """With ``consent:``, the restored :class:`~streamproc.runtime.consent.ConsentTable`,
    installed in the pipeline as its :class:`~streamproc.pipeline.consent.ConsentGate`.

    The table is read to the end of the topic here, before the worker exists, so no record
    is evaluated against a partial table; the caller starts its follower thread.  ``None``
    without ``consent:`` (then the policy declares no purposes: config validation).
    """
    if config.consent is None:
        return None
    from streamproc.pipeline.consent import ConsentGate
    from streamproc.runtime.consent import ConsentTable, KafkaConsentSource

    if pipeline.keys is None:
        raise ConfigError("consent: the policy needs keys.pseudonym (subject tokens derive from it)")
    cc = config.consent
    source = KafkaConsentSource(config.consumer_config(), cc.topic, group_prefix=config.group_id)
    table = ConsentTable(source, topic=cc.topic)
    try:
        table.restore(cc.restore_timeout_seconds)
    except BaseException:
        source.close()
        raise
    pipeline.consent = ConsentGate(pipeline.policy, table.state, pipeline.keys, cc.domain)
    pipeline.reset_plans()  # plans carry their consent check: none may predate the gate
    return table


def start_retention_monitor(config: Config, policy: Any, observer: Observer) -> threading.Event:
    """Run a :class:`~streamproc.runtime.retention.RetentionMonitor` in a daemon thread.

    It reports ``streamproc_retention_drift`` per governed topic (and
    ``streamproc_state_topic_drift`` per state topic) every
    ``topics.retention_check_interval_seconds`` (0 or no governed or state topic: not started).
    Set the returned event to stop it.
    """
    from confluent_kafka.admin import AdminClient

    from streamproc.runtime.retention import RetentionMonitor, expected_retention
    from streamproc.runtime.state_topics import expected_state_configs

    stop = threading.Event()
    interval = config.topics.retention_check_interval_seconds
    expected = expected_retention(config, policy)
    state = expected_state_configs(config)
    if interval <= 0 or not (expected or state):
        return stop
    monitor = RetentionMonitor(
        expected, AdminClient(config.admin_config()), observer.retention_drift, interval=interval,
        state=state, report_state=observer.state_topic_drift,
    )
    threading.Thread(target=monitor.run, args=(stop,), name="retention-monitor", daemon=True).start()
    return stop


def configure_logging(level: str, fmt: str) -> None:
    """The process-wide logging set-up of ``logging:`` (JSON or human, value-free)."""
    from streamproc.observability.logging import configure_logging as _configure

    _configure(level, "human" if fmt in ("text", "human") else fmt)


def build_observer(config: Config, index: int, serve: bool) -> tuple[Observer, Any]:
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
            extra={"port": server.port, "seconds": config.liveness_timeout},
        )
    return metrics, server


def _load(config_path: str | os.PathLike[str]) -> Config | None:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        print(f"streamproc: configuration error: {exc}", file=sys.stderr)
        return None


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
    config = _load(config_path)
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    observer, server = build_observer(config, index, serve_metrics)
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


def run_supervised(config_path: str | os.PathLike[str], workers: int, *, instance: str = "") -> int:
    """Run ``workers`` worker processes under a :class:`Supervisor`; aggregate metrics."""
    config = _load(config_path)
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format)
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
        supervisor = Supervisor(
            config_path, workers, target=run_single, instance=instance, on_child_exit=on_exit
        )
        return supervisor.run()
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


__all__ = ["build_observer", "configure_logging", "run_single", "run_supervised", "run_worker"]
