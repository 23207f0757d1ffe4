"""HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``, for one worker or a group.

Why a small stdlib server rather than ``prometheus_client.start_http_server``: the health
endpoints must answer from the same port (Kubernetes probes and docker-compose health
checks point at the metrics port), readiness must return a short JSON reason, and the
multiprocess supervisor needs to serve an *aggregate* of its workers.

Single process (``--workers 1``)::

    metrics = Metrics(allowed_destinations=[...])
    server = start_server(metrics, host, port)      # a daemon thread
    ...
    server.stop()

Several worker processes (``--workers N``)::

    # supervisor, before spawning any worker:
    setup_multiprocess()                             # creates/cleans PROMETHEUS_MULTIPROC_DIR
    server = start_aggregate_server(host, port, expected_workers=N)
    # each worker process (inherits the env var) just builds Metrics() as usual
    # supervisor, whenever a worker exits:
    mark_worker_dead(pid)

Aggregation.  Counters and histograms are summed over all workers, dead ones included
(their counts happened).  Gauges combine as their :data:`~.metrics.METRICS` entry says.
Readiness: every worker publishes its state to a small JSON file beside the metric files;
the aggregate ``/readyz`` is 200 iff at least ``expected_workers`` workers are alive,
every live worker has reported ``ready(True)``, and at least one of them owns partitions
(a worker left without partitions because N exceeds the partition count does not hold the
group back).  ``/healthz`` is 200 while the supervisor serves, and, with a
``liveness_timeout``, while every live worker has shown a heartbeat within it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from streamproc.observability.metrics import Metrics, worker_state_path

ENV = "PROMETHEUS_MULTIPROC_DIR"
_DEPENDENCIES = frozenset({"broker", "kms", "schema_registry"})
DEFAULT_PORT = 9464


class HealthSource(Protocol):
    def readiness(self) -> tuple[bool, str]: ...

    def liveness(self, timeout: float | None = None) -> tuple[bool, str]: ...


# -- multiprocess setup -----------------------------------------------------------------------
def setup_multiprocess(path: str | os.PathLike[str] | None = None) -> str:
    """Prepare ``PROMETHEUS_MULTIPROC_DIR`` for a fresh group of workers; returns its path.

    Call it in the supervisor *before* spawning workers (they inherit the variable).  The
    directory is emptied: files left by a previous run would add its counts to this one.
    Also switches prometheus_client to mmap values in this process, so that workers
    started with ``fork`` -- which inherit already-imported modules -- use them too.
    """
    p = str(path or os.environ.get(ENV) or tempfile.mkdtemp(prefix="streamproc-metrics-"))
    os.makedirs(p, exist_ok=True)
    for f in glob.glob(os.path.join(p, "*.db")) + glob.glob(os.path.join(p, "streamproc_worker_*.json")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)
    os.environ[ENV] = p
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    return p


def mark_worker_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """The supervisor saw worker ``pid`` exit: drop its live gauges and readiness state."""
    p = str(path or os.environ.get(ENV, ""))
    if not p:
        return
    mark_process_dead(pid, p)
    with contextlib.suppress(FileNotFoundError):
        os.remove(worker_state_path(p, pid))


def teardown_multiprocess(path: str | os.PathLike[str] | None = None) -> None:
    """Remove the directory (supervisor exit); a later run starts from zero anyway."""
    p = str(path or os.environ.get(ENV, ""))
    if p:
        shutil.rmtree(p, ignore_errors=True)


def multiprocess_registry(path: str | os.PathLike[str] | None = None) -> CollectorRegistry:
    """A registry whose collect() merges every worker's files (for a custom server)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path) if path else None)
    return registry


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AggregateHealth:
    """Readiness and liveness of a worker group, from the workers' state files."""

    def __init__(self, path: str, expected_workers: int | None = None) -> None:
        self.path = path
        self.expected_workers = expected_workers
        self.alive = True

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted(glob.glob(os.path.join(self.path, "streamproc_worker_*.json"))):
            try:
                with open(f, encoding="utf-8") as fh:
                    st = json.load(fh)
            except (OSError, ValueError):
                continue  # being replaced or removed right now
            if isinstance(st, dict) and st.get("alive", True) and _pid_alive(int(st.get("pid", -1))):
                out.append(st)
        return out

    def readiness(self) -> tuple[bool, str]:
        ws = self.workers()
        if not ws:
            return False, "no live workers"
        if self.expected_workers and len(ws) < self.expected_workers:
            return False, f"{len(ws)}/{self.expected_workers} workers running"
        # A worker without partitions (N exceeds the partition count) is idle, not broken.
        busy = [w for w in ws if w.get("partitions") != 0]
        if not busy:
            # Workers the group dropped during an outage report the dependency, which is
            # what an operator needs, rather than the symptom (no partitions).
            for w in ws:
                reason = w.get("reason") or ""
                if not w.get("ready") and reason in _DEPENDENCIES:
                    return False, f"worker {w.get('worker', w.get('pid'))}: {reason}"
            return False, "no partitions assigned"
        for w in busy:
            if not w.get("ready"):
                return False, f"worker {w.get('worker', w.get('pid'))}: {w.get('reason') or 'not ready'}"
        return True, ""

    def liveness(self, timeout: float | None = None) -> tuple[bool, str]:
        if not self.alive:
            return False, "shutting down"
        if timeout is not None:
            now = time.time()
            for w in self.workers():
                age = now - float(w.get("heartbeat", now))
                if age > timeout:
                    return False, f"worker {w.get('worker', w.get('pid'))}: no heartbeat for {age:.0f}s"
        return True, ""

    def details(self) -> list[dict[str, Any]]:
        keys = ("worker", "pid", "ready", "partitions", "reason")
        return [{k: w.get(k) for k in keys} for w in self.workers()]


# -- the server -------------------------------------------------------------------------------
class ObservabilityServer:
    """A threaded HTTP server; ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthSource,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        *,
        liveness_timeout: float | None = None,
    ) -> None:
        self.registry = registry
        self.health = health
        self.liveness_timeout = liveness_timeout
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ObservabilityServer:
        # A short poll interval keeps stop() quick; the loop itself is idle otherwise.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="streamproc-metrics", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ObservabilityServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- responses ----------------------------------------------------------------------
    def metrics_body(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def health_body(self, which: str) -> tuple[int, bytes]:
        if which == "healthz":
            ok, reason = self.health.liveness(self.liveness_timeout)
            body: dict[str, Any] = {"status": "alive" if ok else "dead"}
        else:
            ok, reason = self.health.readiness()
            body = {"status": "ready" if ok else "not ready"}
        if reason:
            body["reason"] = reason
        details: Callable[[], Any] | None = getattr(self.health, "details", None)
        if details is not None:
            body["workers"] = details()
        return (200 if ok else 503), json.dumps(body).encode()


def _make_handler(server: ObservabilityServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if path == "/metrics":
                    body, ctype = server.metrics_body(self.headers.get("Accept"))
                    self._send(200, body, ctype)
                elif path in ("/healthz", "/readyz"):
                    code, body = server.health_body(path[1:])
                    self._send(code, body, "application/json")
                else:
                    self._send(404, b'{"status": "not found"}', "application/json")
            except Exception as exc:  # never let a scrape kill the thread; no details out
                self._send(500, json.dumps({"status": "error", "reason": type(exc).__name__}).encode(), "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # access logs of probes every few seconds are noise

    return Handler


def start_server(
    metrics: Metrics,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    *,
    liveness_timeout: float | None = None,
) -> ObservabilityServer:
    """Serve one worker's metrics and health (the ``--workers 1`` case)."""
    return ObservabilityServer(metrics.registry, metrics, host, port, liveness_timeout=liveness_timeout).start()


def start_aggregate_server(
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    *,
    path: str | os.PathLike[str] | None = None,
    expected_workers: int | None = None,
    liveness_timeout: float | None = None,
) -> ObservabilityServer:
    """Serve the merged metrics and health of all workers (the supervisor's side)."""
    p = str(path or os.environ.get(ENV, ""))
    if not p or not os.path.isdir(p):
        raise ValueError("call setup_multiprocess() before start_aggregate_server()")
    health = AggregateHealth(p, expected_workers)
    return ObservabilityServer(multiprocess_registry(p), health, host, port, liveness_timeout=liveness_timeout).start()


__all__ = [
    "DEFAULT_PORT",
    "AggregateHealth",
    "ObservabilityServer",
    "mark_worker_dead",
    "multiprocess_registry",
    "setup_multiprocess",
    "start_aggregate_server",
    "start_server",
    "teardown_multiprocess",
]
