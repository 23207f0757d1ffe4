"""``streamproc run --workers N``: N worker processes in one consumer group.

Why processes: the pipeline is CPU-bound Python, so threads would share one core through
the GIL.  Why ``spawn``: librdkafka starts background threads, and forking a process
that has threads (or might later) is unsafe; every child starts a fresh interpreter and
loads the config itself.

Each child is a full :class:`~streamproc.runtime.worker.Worker` with its own index, so
its ``transactional.id`` (``<group_id>-<instance>-<index>``) is stable: a restarted child
fences the instance it replaces.

Policy:

* SIGTERM/SIGINT to the supervisor are forwarded (as SIGTERM) to every child; the
  supervisor waits for them to drain (``stop_timeout``, then SIGKILL -- safe, see the
  worker docs) and exits 0 if every child exited 0, else 1.
* A child that exits while no stop was requested is restarted after a backoff
  (1 s, doubling, capped at 30 s), with the same index.
* A child that exits with 78 (EX_CONFIG: the config is wrong) is not restarted: the
  supervisor stops the others and exits 78.  So does a crash loop: more than
  ``max_restarts`` restarts of any one index within ``restart_window`` seconds stops
  everything with exit 1, because restarting forever hides a persistent fault from the
  orchestrator that could otherwise alert on it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from streamproc.runtime.worker import EXIT_CONFIG, EXIT_FATAL, EXIT_OK

log = logging.getLogger("streamproc.runtime.supervisor")


#: What a child runs: ``child_main(config_path, index=..., instance=..., serve_metrics=False)``
#: returning an exit code.  A module-level function (``spawn`` pickles it by name); the
#: composition root (:func:`streamproc.runtime.app.run_supervised`) passes
#: :func:`streamproc.runtime.app.run_single`, so this module imports nothing above it.
ChildMain = Callable[..., int]


def _child_main(target: ChildMain, config_path: str, index: int, instance: str) -> None:
    """Entry point of a worker process (module level so ``spawn`` can import it)."""
    import sys

    sys.exit(target(config_path, index=index, instance=instance, serve_metrics=False))


class Supervisor:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        workers: int,
        *,
        target: ChildMain,
        instance: str = "",
        max_restarts: int = 5,
        restart_window: float = 60.0,
        stop_timeout: float = 60.0,
        on_child_exit: Callable[[int], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.config_path = str(Path(config_path))
        self.target = target
        self.workers = workers
        self.instance = instance
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.stop_timeout = stop_timeout
        self.on_child_exit = on_child_exit
        self._ctx = mp.get_context("spawn")
        self._children: dict[int, BaseProcess] = {}
        self._restarts: dict[int, deque[float]] = {i: deque() for i in range(workers)}
        self._pending: dict[int, float] = {}  # index -> monotonic time to restart at
        self._stop = threading.Event()

    def _spawn(self, index: int) -> None:
        p = self._ctx.Process(
            target=_child_main,
            args=(self.target, self.config_path, index, self.instance),
            name=f"streamproc-worker-{index}",
        )
        p.start()
        self._children[index] = p
        log.info("worker started", extra={"worker": index, "pid": p.pid})

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: self.stop())
        for i in range(self.workers):
            self._spawn(i)
        code = EXIT_OK
        while not self._stop.is_set():
            self._stop.wait(0.2)
            now = time.monotonic()
            for i, p in list(self._children.items()):
                if p.is_alive() or self._stop.is_set():
                    continue
                rc = p.exitcode
                del self._children[i]
                self._exited(p)
                if rc == EXIT_CONFIG:
                    log.error(
                        "worker exited with a configuration error; stopping", extra={"worker": i}
                    )
                    code = EXIT_CONFIG
                    self._stop.set()
                    break
                hist = self._restarts[i]
                while hist and now - hist[0] > self.restart_window:
                    hist.popleft()
                if len(hist) >= self.max_restarts:
                    log.error(
                        "worker keeps failing; stopping",
                        extra={"worker": i, "exit_code": rc, "count": len(hist)},
                    )
                    code = EXIT_FATAL
                    self._stop.set()
                    break
                delay = min(30.0, 1.0 * 2 ** len(hist))
                hist.append(now)
                self._pending[i] = now + delay
                log.warning(
                    "worker exited; restarting",
                    extra={"worker": i, "exit_code": rc, "seconds": delay},
                )
            for i, at in list(self._pending.items()):
                if now >= at and not self._stop.is_set():
                    del self._pending[i]
                    self._spawn(i)
        return max(code, self._shutdown())

    def _exited(self, p: BaseProcess) -> None:
        if self.on_child_exit is not None and p.pid is not None:
            self.on_child_exit(p.pid)

    def _shutdown(self) -> int:
        for p in self._children.values():
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        worst = EXIT_OK
        for i, p in self._children.items():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker did not stop in time; killing", extra={"worker": i})
                p.kill()
                p.join(5)
                worst = EXIT_FATAL
            elif p.exitcode != EXIT_OK:
                worst = max(worst, EXIT_FATAL)
            self._exited(p)
        log.info("all workers stopped", extra={"exit_code": worst})
        return worst


__all__ = ["Supervisor"]
