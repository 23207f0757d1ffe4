"""Crash safety: SIGKILL the worker mid-stream three times, restart it, lose nothing.

Every source offset must be accounted for in every destination (via the provenance
headers).  On real Kafka read_committed hides the aborted transactions of the killed
instances, so there must be no duplicates either.  Tansu shows aborted records to
read_committed consumers, so there we assert zero loss and *report* the duplicates.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.conftest import Ticker, Watermarks, WorkerProcess, read_topics, wait_for

pytestmark = pytest.mark.integration

TOTAL = 2400
RATE = 200.0
KILLS = 3


BATCH = 50


def account(
    ws: Any, produced: set[tuple[int, int]], out: dict[str, list[Any]], source: str
) -> tuple[int, int]:
    """(missing, duplicates) summed over destinations; a DLQ record also accounts for an offset.

    Duplicates can only come from the killed instances' open transactions (aborted by the
    next instance's init_transactions), so even where they are visible (Tansu) there are at
    most one batch per kill per destination.
    """
    missing = dups = 0
    dlq = {r.source[1:] for r in out.get(ws.dlq(source), [])}
    for t in ws.destinations():
        seen = Counter(r.source[1:] for r in out[t])
        assert all(r.source[0] == ws.topic(source) for r in out[t])
        missing += len(produced - set(seen) - dlq)
        d = sum(n - 1 for n in seen.values())
        assert d <= KILLS * BATCH, (
            f"{t}: {d} duplicates is more than the killed transactions could hold"
        )
        dups += d
        assert set(seen) <= produced, "an output names a source offset that was never produced"
    return missing, dups


def run_crash_scenario(
    ws: Any, workers: list[WorkerProcess], request: Any
) -> tuple[int, int, dict[str, list[Any]]]:
    """Produce at a steady rate, SIGKILL the worker KILLS times mid-stream, restart it.

    Returns (missing, duplicates, records read) once every source offset is accounted
    for (or the wait times out).  The final worker is left running for the caller.
    """
    rng = random.Random(1234)
    ticker = Ticker(ws, "orders", total=TOTAL, rate=RATE).start()
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    request.addfinalizer(progress.close)
    kills = 0
    while kills < KILLS:
        w = WorkerProcess(ws, name=f"run{kills}")
        workers.append(w)
        start = progress.total()
        # Kill only once this instance has written some batches, at a random point after
        # that: mid-stream, with transactions coming and going.
        wait_for(
            lambda s=start, w=w: progress.total() >= s + 100 or not w.alive(),
            60,
            interval=0.05,
            what="progress",
        )
        time.sleep(rng.uniform(0.0, 0.05))
        assert w.alive(), w.log()[-3000:]
        w.kill()
        kills += 1
        print(f"[crash] kill {kills}: destination end offsets {start} -> {progress.total()}")
    final = WorkerProcess(ws, name="final")
    workers.append(final)
    produced = set(ticker.join(timeout=60).records)
    dests = ws.destinations()
    out = read_topics(
        ws.bootstrap,
        [*dests, ws.dlq("orders")],
        until=lambda r: all({x.source[1:] for x in r[t]} >= produced for t in dests),
        timeout=90,
        idle=2.0,
    )
    missing, dups = account(ws, produced, out, "orders")
    print(
        f"\n[crash] kills={KILLS} produced={len(produced)} "
        f"outputs/destination={[len(out[t]) for t in dests]} missing={missing} duplicates={dups}"
    )
    assert missing == 0, final.log()[-3000:]
    assert not out[ws.dlq("orders")]
    return missing, dups, out


@pytest.mark.tansu_smoke
def test_sigkill_three_times_loses_nothing(
    workspace_factory: Any, workers: list[WorkerProcess], broker_is_tansu: bool, request: Any
) -> None:
    ws = workspace_factory(sources=("orders",), batch={"max_records": BATCH, "max_wait_ms": 50})
    _, dups, _ = run_crash_scenario(ws, workers, request)
    print(f"[crash] broker={'tansu' if broker_is_tansu else 'kafka'} duplicates={dups}")
    if not broker_is_tansu:
        assert dups == 0, "read_committed must hide the killed instances' aborted transactions"
    final = workers[-1]
    final.terminate()
    assert final.wait(30) == 0
