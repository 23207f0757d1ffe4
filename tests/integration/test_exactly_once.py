"""Exactly-once, proven on real Apache Kafka with read_committed readers.

Each scenario streams sealed orders at a steady rate (plus a few records that must be
dead-lettered), breaks something mid-stream, and then reads every destination and the
dead-letter topic from the beginning with ``isolation.level=read_committed``.  Each
output names its source offset (provenance headers), so the check is exact, per topic:

* every good source offset appears in every audience topic exactly once (0 lost, 0
  duplicates), and no bad one does;
* every bad source offset appears in the dead-letter topic exactly once, no good one;
* records the broken instances wrote in transactions that were later aborted are present
  in the log (a read_uncommitted reader counts them; printed) but invisible to the
  read_committed reader.

Scenarios: the worker SIGKILLed 10 times (one worker; and ``--workers 2`` with children
and whole supervisors killed), the broker itself killed with SIGKILL and restarted on the
same log directory, and a zombie -- a paused worker whose successor took over its
``transactional.id`` -- that must not be able to commit when it wakes up.  Consumer-group
rebalances happen in all of them (every kill and restart is one); the join/leave case is
``test_worker_rebalance.py``, which asserts zero duplicates on Kafka too.

Tansu shows aborted transactions to read_committed readers, so these run only when the
session's broker is real Kafka (the default: ``STREAMPROC_TEST_BROKER=kafka``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streamproc.pipeline.core import H_SOURCE_OFFSET, H_SOURCE_PARTITION, H_SOURCE_TOPIC
from tests.integration.conftest import (
    Broker,
    Ticker,
    Watermarks,
    WorkerProcess,
    make_workspace,
    produce_raw,
    read_topics,
    wait_for,
)

pytestmark = pytest.mark.integration

KILLS = 10
BATCH = 20  # small transactions: many commit points to die between
RATE = 120.0  # orders per second while the scenario runs
#: Values the worker must dead-letter (not an envelope at all, an empty value, and a
#: truncated envelope header), produced mid-stream between kills.
BAD_VALUES = (b"\x00\x01not-an-envelope", b"", b"SPE")


@pytest.fixture
def real_kafka(kafka_broker: Broker) -> Broker:
    if kafka_broker.kind == "tansu":
        pytest.skip("Tansu shows aborted transactions to read_committed readers")
    return kafka_broker


def _produce_bad(ws: Any, tag: int) -> set[tuple[int, int]]:
    items = [(f"bad-{tag}-{i}".encode(), v, None) for i, v in enumerate(BAD_VALUES)]
    return set(produce_raw(ws.bootstrap, ws.topic("orders"), items).records)


def _count_aborted(bootstrap: str, topics: list[str], committed: int) -> int:
    """Records in ``topics`` that a read_uncommitted reader sees beyond the committed ones:
    what the killed/fenced instances wrote in transactions that were then aborted."""
    out = read_topics(bootstrap, topics, isolation="read_uncommitted", timeout=60, idle=1.5)
    return sum(len(v) for v in out.values()) - committed


def _dlq_source(r: Any) -> tuple[int, int]:
    """A dead letter's source (partition, offset): clear headers, unlike audience outputs."""
    p, o = r.header(H_SOURCE_PARTITION), r.header(H_SOURCE_OFFSET)
    assert p is not None and o is not None, "dead letter without its source coordinates"
    return int(p), int(o)


def assert_exact(
    ws: Any,
    good: set[tuple[int, int]],
    bad: set[tuple[int, int]],
    worker_log: str,
    label: str,
) -> None:
    """Read everything back (read_committed) and assert exactly-once, per topic."""
    dests = ws.destinations()
    dlq = ws.dlq("orders")

    def complete(r: dict[str, list[Any]]) -> bool:
        return (
            all({x.source[1:] for x in r[t]} >= good for t in dests)
            and set(map(_dlq_source, r[dlq])) >= bad
        )

    out = read_topics(ws.bootstrap, [*dests, dlq], until=complete, timeout=120, idle=2.0)
    committed = 0
    for t in dests:
        seen = Counter(r.source[1:] for r in out[t])
        assert all(r.source[0] == ws.topic("orders") for r in out[t])
        missing = good - set(seen)
        dups = {o: n for o, n in seen.items() if n > 1}
        assert not missing, f"{t}: {len(missing)} lost, e.g. {sorted(missing)[:5]}\n{worker_log}"
        assert not dups, f"{t}: {len(dups)} duplicated source offsets, e.g. {list(dups)[:5]}"
        assert set(seen) == good, f"{t}: outputs for offsets never produced or dead-lettered"
        committed += len(out[t])
    assert all(r.header(H_SOURCE_TOPIC) == ws.topic("orders") for r in out[dlq])
    dead = Counter(map(_dlq_source, out[dlq]))
    assert set(dead) == bad, f"DLQ: {sorted(set(dead) ^ bad)[:10]}"
    assert all(n == 1 for n in dead.values()), "a bad record was dead-lettered twice"
    aborted = _count_aborted(ws.bootstrap, dests, committed)
    assert aborted >= 0
    print(
        f"\n[eos] {label}: good={len(good)} bad={len(bad)} destinations={len(dests)} "
        f"lost=0 duplicates=0 dlq_exact=True aborted_records_hidden={aborted}"
    )


def _wait_progress(progress: Watermarks, start: int, w: WorkerProcess, n: int = 2 * BATCH) -> None:
    try:
        wait_for(
            lambda: progress.total() >= start + n or not w.alive(),
            120,
            interval=0.05,
            what="worker progress",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker log tail:\n{w.log()[-4000:]}") from None
    assert w.alive(), w.log()[-3000:]


def _workspace(root: Path, bootstrap: str, suffix: str) -> Any:
    from streamproc.runtime.topics import apply_topics

    ws = make_workspace(
        root,
        bootstrap,
        suffix,
        sources=("orders",),
        batch={"max_records": BATCH, "max_wait_ms": 50},
    )
    apply_topics(ws.load_config())
    return ws


def test_sigkill_one_worker_ten_times(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess], request: Any
) -> None:
    ws = _workspace(tmp_path / "ws", real_kafka.bootstrap, unique)
    rng = random.Random(11)
    ticker = Ticker(ws, "orders", total=10**7, rate=RATE).start()
    request.addfinalizer(ticker.stop)
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    request.addfinalizer(progress.close)
    bad: set[tuple[int, int]] = set()
    for k in range(KILLS):
        w = WorkerProcess(ws, name=f"run{k}")
        workers.append(w)
        _wait_progress(progress, progress.total(), w)
        if k % 3 == 1:
            bad |= _produce_bad(ws, k)
        time.sleep(rng.uniform(0.0, 0.1))  # a random point mid-stream, transactions in flight
        assert w.alive(), w.log()[-3000:]
        w.kill()
    final = WorkerProcess(ws, name="final")
    workers.append(final)
    ticker.stop()
    good = set(ticker.join(timeout=60).records)
    assert_exact(ws, good, bad, final.log()[-3000:], f"1 worker, {KILLS} SIGKILLs")
    final.terminate()
    assert final.wait(30) == 0, final.log()[-3000:]


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc; the supervisor's worker processes)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after the ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _kill_supervisor_tree(sup: WorkerProcess) -> None:
    """SIGKILL the supervisor and its workers at once, like a lost machine."""
    os.kill(sup.pid, signal.SIGSTOP)  # no more restarts while we collect its children
    kids = _children(sup.pid)
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
    sup.kill()


def test_sigkill_ten_times_with_two_workers(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess], request: Any
) -> None:
    """``--workers 2``: kill single worker processes (the supervisor restarts them: a
    rebalance each time) and whole supervisors with their workers, 10 kills in all."""
    ws = _workspace(tmp_path / "ws", real_kafka.bootstrap, unique)
    rng = random.Random(22)
    ticker = Ticker(ws, "orders", total=10**7, rate=RATE).start()
    request.addfinalizer(ticker.stop)
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    request.addfinalizer(progress.close)
    bad: set[tuple[int, int]] = set()
    sup = WorkerProcess(ws, "--workers", "2", name="sup0")
    workers.append(sup)
    for k in range(KILLS):
        _wait_progress(progress, progress.total(), sup)
        if k % 3 == 1:
            bad |= _produce_bad(ws, k)
        time.sleep(rng.uniform(0.0, 0.1))
        if k % 2 == 0:
            kids = _children(sup.pid)
            assert kids, sup.log()[-3000:]
            os.kill(kids[(k // 2) % len(kids)], signal.SIGKILL)
        else:
            _kill_supervisor_tree(sup)
            sup = WorkerProcess(ws, "--workers", "2", name=f"sup{k}")
            workers.append(sup)
    ticker.stop()
    good = set(ticker.join(timeout=60).records)
    assert_exact(ws, good, bad, sup.log()[-3000:], f"--workers 2, {KILLS} SIGKILLs")
    assert sup.alive(), sup.log()[-3000:]
    sup.terminate()
    assert sup.wait(60) == 0, sup.log()[-3000:]


#: No progress for this long after the broker is back = hung (see the broker test).
#: Long enough for the worker's watchdog to end a call stuck since the broker went away
#: (its 30 s timeout + 30 s grace), short enough to keep the test bounded otherwise.
HUNG_AFTER = 75.0


def test_broker_sigkill_and_restart_mid_stream(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess], request: Any
) -> None:
    """kill -9 the broker twice mid-stream and restart it on the same log directory.

    The worker reconnects by itself, except when librdkafka's
    ``send_offsets_to_transaction`` hangs on a group coordinator that went away and came
    back (confluentinc/librdkafka#5511: the call ignores its timeout).  Deployed, the
    worker's watchdog turns such a call into a fatal exit naming it (``TransactionStuck``,
    60 s after the call began; the liveness probe, ``metrics.liveness_timeout_seconds``,
    backs it up).  Here a worker that exits is started again the same way, as a Deployment
    would, and must have logged why; one without progress for ``HUNG_AFTER`` s after the
    broker is back is SIGKILLed and restarted (the liveness probe's part), and counted.
    Either way the outputs must stay exact.
    """
    from streamproc.devkafka import KafkaBroker, kafka_available

    ok, reason = kafka_available()
    if not ok:
        pytest.skip(f"this test kills a broker of its own: {reason}")
    broker = KafkaBroker(tmp_path / "kafka")  # its own broker: the session's stays up
    request.addfinalizer(broker.cleanup)
    try:
        broker.start()
    except BaseException:
        print(broker.log_tail())
        raise
    ws = _workspace(tmp_path / "ws", broker.bootstrap, unique)
    ticker = Ticker(ws, "orders", total=10**7, rate=RATE)
    ticker.flush_timeout = 120.0
    ticker.start()
    request.addfinalizer(ticker.stop)
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    request.addfinalizer(progress.close)
    w = WorkerProcess(ws, name="w0")
    workers.append(w)
    bad: set[tuple[int, int]] = set()
    hung = exited = stuck = 0
    for k in range(2):
        _wait_progress(progress, progress.total(), w)
        bad |= _produce_bad(ws, k)
        broker.kill()
        time.sleep(0.5)
        try:
            broker.start()
        except BaseException:
            print(broker.log_tail())
            raise
        start = progress.total()
        deadline = time.monotonic() + HUNG_AFTER
        while progress.total() < start + 2 * BATCH and time.monotonic() < deadline:
            if not w.alive():
                break
            time.sleep(0.1)
        if progress.total() < start + 2 * BATCH:
            if w.alive():
                hung += 1
                w.kill()
            else:
                exited += 1
                assert w.proc.returncode == 1, w.log()[-3000:]  # exit 1: fatal, restart it
                assert '"message": "fatal ' in w.log(), w.log()[-3000:]  # a named reason
                stuck += "fatal TransactionStuck" in w.log()
            w = WorkerProcess(ws, name=f"w{k + 1}")
            workers.append(w)
            _wait_progress(progress, progress.total(), w)
    ticker.stop()
    good = set(ticker.join(timeout=150).records)
    assert_exact(
        ws,
        good,
        bad,
        w.log()[-3000:],
        f"2 broker kill -9/restarts (worker hung {hung}x and restarted, exited {exited}x, "
        f"{stuck}x of them by the watchdog)",
    )
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]


def test_paused_fenced_zombie_cannot_commit(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess], request: Any
) -> None:
    """SIGSTOP a worker mid-stream, start its successor with the same transactional.id (same
    group, instance and index), let the successor take over, then SIGCONT the zombie: its
    producer is fenced, it cannot commit, it stops, and the outputs stay exact."""
    ws = _workspace(tmp_path / "ws", real_kafka.bootstrap, unique)
    ticker = Ticker(ws, "orders", total=10**7, rate=RATE).start()
    request.addfinalizer(ticker.stop)
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    request.addfinalizer(progress.close)
    env_instance = {"STREAMPROC_INSTANCE": f"zombie-{unique}"}
    old = {k: os.environ.get(k) for k in env_instance}
    os.environ.update(env_instance)  # both instances get the same transactional.id
    try:
        zombie = WorkerProcess(ws, name="zombie")
        workers.append(zombie)
        _wait_progress(progress, progress.total(), zombie)
        os.kill(zombie.pid, signal.SIGSTOP)
        successor = WorkerProcess(ws, name="successor")
        workers.append(successor)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        # The successor fences the zombie (init_transactions), gets its partitions once the
        # zombie's session expires, and makes progress.
        _wait_progress(progress, progress.total(), successor, n=4 * BATCH)
        bad = _produce_bad(ws, 0)
        _wait_progress(progress, progress.total(), successor)
    finally:
        os.kill(zombie.pid, signal.SIGCONT)
    # Awake, the zombie tries to go on with its transaction and is told it is fenced.
    rc = zombie.wait(90)
    assert rc != 0, zombie.log()[-3000:]
    zlog = zombie.log()
    assert (
        "fenced" in zlog.lower() or "PRODUCER_FENCED" in zlog or "INVALID_PRODUCER_EPOCH" in zlog
    ), zlog[-3000:]
    _wait_progress(progress, progress.total(), successor)
    ticker.stop()
    good = set(ticker.join(timeout=60).records)
    assert_exact(ws, good, bad, successor.log()[-3000:], "paused zombie fenced by its successor")
    assert successor.alive(), successor.log()[-3000:]
    successor.terminate()
    assert successor.wait(30) == 0, successor.log()[-3000:]
