"""The heap built at start-up is frozen out of the garbage collector once the worker's
clients exist: ``gc.freeze()`` runs exactly once, from the worker's ``on_started`` hook,
after the producer and the consumer were built (the composition root passes it)."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from streamproc.runtime import app
from streamproc.runtime.factory import build_pipeline
from streamproc.runtime.worker import Worker
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def test_on_started_runs_once_after_the_clients_exist(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    config = ws.load_config()
    seen: list[tuple[bool, bool]] = []
    worker: Worker | None = None

    def started() -> None:
        assert worker is not None
        seen.append((worker.producer is not None, worker.consumer is not None))

    worker = Worker(config, build_pipeline(config), instance="gc", on_started=started)
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: bool(seen), 60, what="the worker to start")
    finally:
        worker.stop()
        t.join(30)
    assert seen == [(True, True)]


def test_the_composition_root_freezes_the_heap_after_start_up(
    workspace_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    config = ws.load_config()
    hooks: list[Any] = []

    class Recording(Worker):
        def run(self) -> int:
            hooks.append(self._on_started)
            return 0

    monkeypatch.setattr(app, "Worker", Recording)
    assert app.run_worker(config, install_signals=False) == 0
    assert hooks == [gc.freeze]
