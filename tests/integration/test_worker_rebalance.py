"""Rebalances lose nothing: a second worker joins mid-stream, then the first leaves.

Also covers ``--workers N``: the supervisor runs N processes in one group, restarts a
child that dies, and a SIGTERM to it drains them all and exits 0.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import pytest

from tests.integration.conftest import Ticker, Watermarks, WorkerProcess, read_topics, wait_for

pytestmark = pytest.mark.integration


def _assignments(w: WorkerProcess) -> list[list[str]]:
    return [
        e.get("partitions", []) for e in w.log_events() if e.get("message") == "partitions assigned"
    ]


def test_second_worker_joins_then_first_leaves(
    workspace_factory: Any, workers: list[WorkerProcess], broker_is_tansu: bool, request: Any
) -> None:
    ws = workspace_factory(sources=("orders",), batch={"max_records": 50, "max_wait_ms": 50})
    ticker = Ticker(ws, "orders", total=2400, rate=150).start()
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    request.addfinalizer(progress.close)
    w1 = WorkerProcess(ws, "--instance", "w1", name="w1")
    workers.append(w1)
    wait_for(lambda: progress.total() >= 100 or not w1.alive(), 40, what="w1 progress")
    w2 = WorkerProcess(ws, "--instance", "w2", name="w2")
    workers.append(w2)
    # Both members must end up sharing the partitions (a second assignment for w1).
    wait_for(
        lambda: len(_assignments(w1)) >= 2 and len(_assignments(w2)) >= 1,
        60,
        what="rebalance to two workers",
    )
    shared = (_assignments(w1)[-1], _assignments(w2)[-1])
    assert shared[0] and shared[1] and not set(shared[0]) & set(shared[1]), shared
    before = progress.total()
    wait_for(lambda: progress.total() >= before + 100, 40, what="progress with two workers")
    w1.terminate()
    assert w1.wait(30) == 0, w1.log()[-3000:]
    wait_for(
        lambda: len(_assignments(w2)) >= 2 and len(_assignments(w2)[-1]) == 3,
        60,
        what="w2 takes over",
    )
    produced = set(ticker.join(timeout=60).records)
    dests = ws.destinations()
    out = read_topics(
        ws.bootstrap,
        [*dests, ws.dlq("orders")],
        until=lambda r: all({x.source[1:] for x in r[t]} >= produced for t in dests),
        timeout=90,
        idle=2.0,
    )
    dups = 0
    for t in dests:
        seen = Counter(r.source[1:] for r in out[t])
        assert set(seen) == produced, f"{t}: {len(produced - set(seen))} source offsets missing"
        dups += sum(n - 1 for n in seen.values())
    print(
        f"\n[rebalance] broker={'tansu' if broker_is_tansu else 'kafka'} produced={len(produced)} duplicates={dups}"
    )
    if not broker_is_tansu:
        assert dups == 0
    assert not out[ws.dlq("orders")]
    w2.terminate()
    assert w2.wait(30) == 0


def test_supervisor_runs_n_workers_and_drains_on_sigterm(
    workspace_factory: Any, workers: list[WorkerProcess]
) -> None:
    from tests.integration.conftest import produce_events

    ws = workspace_factory(sources=("orders",))
    produced = produce_events(ws, "orders", 300, seed=9)
    sup = WorkerProcess(ws, "--workers", "2", name="supervisor")
    workers.append(sup)
    dests = ws.destinations()
    out = read_topics(
        ws.bootstrap, dests, until=lambda r: all(len(r[t]) >= 300 for t in dests), timeout=60
    )
    assert all({x.source[1:] for x in out[t]} == set(produced.records) for t in dests), sup.log()[
        -3000:
    ]
    started = [e for e in sup.log_events() if e.get("message", "").startswith("worker started (")]
    assert {e.get("worker") for e in started} == {0, 1}

    # A child that dies is restarted with the same index; nothing is lost meanwhile.
    def children() -> list[dict[str, Any]]:
        return [
            e
            for e in sup.log_events()
            if e.get("logger") == "streamproc.runtime.supervisor"
            and e.get("message") == "worker started"
        ]

    victim = next(e["pid"] for e in children() if e.get("worker") == 0)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children()) >= 3, 30, what="the supervisor restarting worker 0")
    assert any(e.get("message") == "worker exited; restarting" for e in sup.log_events())
    more = produce_events(ws, "orders", 100, seed=10)
    expected = set(produced.records) | set(more.records)
    out = read_topics(
        ws.bootstrap,
        dests,
        until=lambda r: all({x.source[1:] for x in r[t]} >= expected for t in dests),
        timeout=60,
    )
    assert all({x.source[1:] for x in out[t]} == expected for t in dests), sup.log()[-3000:]
    sup.terminate()
    assert sup.wait(60) == 0, sup.log()[-3000:]
    assert sum(1 for e in sup.log_events() if e.get("message", "").startswith("stopped after")) == 2
