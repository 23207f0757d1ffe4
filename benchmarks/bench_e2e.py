"""End-to-end throughput of one worker through a local broker (docs/benchmarks.md).

Usage::

    python benchmarks/bench_e2e.py [--records M] [--repeat R] [--cases NAME,...] [--pin]
                                   [--partitions P] [--batch B] [--no-metrics]
                                   [--producer K=V ...] [--consumer K=V ...]
                                   [--broker tansu|kafka] [--security plaintext|sasl_ssl]
                                   [--bootstrap HOST:PORT] [--json out.json]

On one fresh local broker -- Tansu (:class:`streamproc.devbroker.DevBroker`, the default)
or Apache Kafka (``--broker kafka``: :class:`streamproc.devkafka.KafkaBroker`, from the
jars ``scripts/kafka/fetch.sh`` fetches; ``--security sasl_ssl`` puts every client on
SCRAM-SHA-512 over TLS) -- or ``--bootstrap``:

1. ``M`` sealed reference records (``benchmarks/reference.avsc``, ``--distinct`` seeded
   Faker records from ``bench_core.make_records`` cycled, sealed with
   :class:`streamproc.client.RecordSealer` under ``purchases-kek``) are produced **once,
   before any timing**, into one source topic of ``--partitions`` partitions.  Every run
   then reads the same records with a fresh consumer group (``auto.offset.reset=earliest``)
   and writes to fresh destination and dead-letter topics (deleted after the run), so the
   measured phase is pure consume -> process -> produce -> commit.
2. Cases (interleaved round by round, so outside load hits all of them alike):

   * ``streamproc-eos``   -- ``streamproc run`` (subprocess, one worker),
     ``processing_guarantee: exactly_once``, 1 audience (``a1``), Prometheus metrics
     served as in production (``--no-metrics``: the no-op observer);
   * ``streamproc-alo``   -- the same, ``at_least_once``;
   * ``streamproc-eos-2`` -- exactly-once, 2 audiences (``a1``, ``a2``);
   * ``raw-eos``          -- a plain confluent-kafka consume-to-produce copy loop
     (subprocess): the worker's own consumer and producer settings (built by the
     worker's ``consumer_conf``/``producer_conf`` (streamproc.runtime.kafka_conf): read_committed, transactional
     producer, ``linger.ms`` 5), the same ``consume(batch.max_records, batch.max_wait_ms)``
     batches, one transaction per batch with ``send_offsets_to_transaction``; no crypto,
     no transform, no headers -- each record's key and value copied as they are;
   * ``raw-alo``          -- the same loop without transactions (idempotent producer,
     ``flush()``, then a synchronous offset commit: what ``at_least_once`` does);
   * ``raw-eos-headers``  -- ``raw-eos`` plus 10 headers per copy shaped like the worker's
     provenance headers before 0.2 (isolates what the headers cost the client and the broker);
   * ``raw-eos-prov``     -- ``raw-eos`` plus the one ``streamproc.prov`` header the worker
     writes now (same length, a per-record 22-character reference);
   * ``raw-eos-2``        -- the transactional copy loop writing each record to 2 topics;
   * ``streamproc-eos-serial`` / ``streamproc-eos-2-serial`` -- the worker with
     ``batch.overlap_commit: false`` (commit, then consume the next batch);
   * ``base-eos`` / ``base-eos-2`` -- the worker of another source tree
     (``--baseline DIR``, e.g. a checkout of the commit before a change), same rounds.

3. Clocks, per run: ``launch`` (subprocess started), ``assigned`` (its "partitions
   assigned" log line: start-up, ``init_transactions`` and the group join are over),
   ``first`` (the first output is visible in a destination's high watermark; in the JSON)
   and ``done`` (the group's committed offsets on the source reach ``M``: with
   exactly-once the offsets commit in the same transaction as the outputs, with
   at-least-once after every output is acknowledged, so at ``done`` all outputs exist).
   Two rates: **raw** = ``M / (done - launch)`` (includes Python start-up, pipeline build
   and the group join -- about 3.3 s on Tansu) and **steady** = ``M / (done - assigned)``
   (join excluded).  The ``done`` probe polls committed offsets every 20 ms
   (``OffsetFetch``, no group membership).  Afterwards every destination is read back
   (read_committed) and must hold >= ``M`` records, the dead-letter topic none.

Also recorded per run, over the steady phase: CPU seconds of the worker/copy process (all
threads) and of its main thread, and of the broker (``/proc``), the number of batches,
for the copy loops the mean time per batch of each phase (produce, send_offsets/flush,
commit; for the worker, how long its committer thread took per commit and how long the loop
still waited for it), the load average, and the process's resident set at ``done``
(``VmRSS``, steady state) and its high-water mark (``VmHWM``).  ``--pin`` puts the
worker/copy process on the last CPU and the broker and this harness on the others.  Rates are *input* records/s; the median over
``--repeat`` rounds is reported, and each ratio (e.g. streamproc EOS / raw EOS copy) is the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA_FILE = HERE / "reference.avsc"
POLICY_FILE = HERE / "reference_policy.yaml"
SOURCE_KEK = "purchases-kek"
PSEUDONYM_SECRET = "pseudonym-master"
AUDIENCES = ("a1", "a2")
CLIENT_DEFAULTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
BATCH = {"max_records": 2000, "max_wait_ms": 100}
ASSIGNED_MARK = "partitions assigned"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "streamproc" | "raw"
    guarantee: str  # "exactly_once" | "at_least_once"
    audiences: int
    label: str
    headers: str = ""
    """Raw copy only: ``"ten"`` attaches the 10 provenance headers of 0.1 to every copy,
    ``"prov"`` the one ``streamproc.prov`` header of today's worker."""
    overlap: bool = True
    """Worker only: ``batch.overlap_commit`` (False: commit, then consume the next batch)."""
    baseline: bool = False
    """Worker only: run the source tree given with ``--baseline DIR`` (another checkout,
    e.g. the commit before a change) instead of this one, in the same rounds."""


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "streamproc-eos",
            "streamproc",
            "exactly_once",
            1,
            "streamproc worker, exactly-once, 1 audience",
        ),
        Case(
            "streamproc-alo",
            "streamproc",
            "at_least_once",
            1,
            "streamproc worker, at-least-once, 1 audience",
        ),
        Case("raw-eos", "raw", "exactly_once", 1, "raw copy loop, transactional"),
        Case("raw-alo", "raw", "at_least_once", 1, "raw copy loop, non-transactional"),
        Case(
            "raw-eos-headers",
            "raw",
            "exactly_once",
            1,
            "raw copy loop, transactional, + 10 headers",
            "ten",
        ),
        Case(
            "raw-eos-prov",
            "raw",
            "exactly_once",
            1,
            "raw copy loop, transactional, + 1 provenance header",
            "prov",
        ),
        Case(
            "streamproc-eos-2",
            "streamproc",
            "exactly_once",
            2,
            "streamproc worker, exactly-once, 2 audiences",
        ),
        Case("raw-eos-2", "raw", "exactly_once", 2, "raw copy loop, transactional, 2 topics"),
        Case(
            "base-eos",
            "streamproc",
            "exactly_once",
            1,
            "--baseline tree: worker, exactly-once, 1 audience",
            baseline=True,
        ),
        Case(
            "base-eos-2",
            "streamproc",
            "exactly_once",
            2,
            "--baseline tree: worker, exactly-once, 2 audiences",
            baseline=True,
        ),
        Case(
            "streamproc-eos-serial",
            "streamproc",
            "exactly_once",
            1,
            "streamproc worker, exactly-once, 1 audience, commit not overlapped",
            overlap=False,
        ),
        Case(
            "streamproc-eos-2-serial",
            "streamproc",
            "exactly_once",
            2,
            "streamproc worker, exactly-once, 2 audiences, commit not overlapped",
            overlap=False,
        ),
    )
}
DEFAULT_CASES = (
    "streamproc-eos",
    "streamproc-alo",
    "raw-eos",
    "raw-alo",
    "raw-eos-headers",
    "raw-eos-prov",
    "streamproc-eos-2",
    "raw-eos-2",
)
#: (numerator, denominator) pairs reported as ratios.
RATIOS = (
    ("streamproc-eos", "raw-eos"),
    ("streamproc-eos", "raw-eos-headers"),
    ("raw-eos-headers", "raw-eos"),
    ("raw-eos-prov", "raw-eos"),
    ("streamproc-eos", "raw-eos-prov"),
    ("streamproc-alo", "raw-alo"),
    ("streamproc-eos", "streamproc-alo"),
    ("raw-eos", "raw-alo"),
    ("streamproc-eos-2", "raw-eos-2"),
    ("streamproc-eos-2", "streamproc-eos"),
    ("streamproc-eos-serial", "raw-eos"),
    ("streamproc-eos-2-serial", "raw-eos-2"),
    ("streamproc-eos", "streamproc-eos-serial"),
    ("streamproc-eos-2", "streamproc-eos-2-serial"),
    ("base-eos", "raw-eos"),
    ("base-eos-2", "raw-eos-2"),
    ("streamproc-eos", "base-eos"),
    ("streamproc-eos-2", "base-eos-2"),
)
#: ``--baseline DIR``: the source tree the ``base-*`` cases run.
BASELINE: Path | None = None


# -- workspace and topics --------------------------------------------------------------------------


@dataclass
class Bench:
    """The shared workspace: keyring, schema dir, policy, broker, and the source topic."""

    root: Path
    bootstrap: str
    partitions: int
    records: int
    source: str = ""
    broker_pid: int | None = None
    batch: dict[str, int] = field(default_factory=lambda: dict(BATCH))
    producer: dict[str, Any] = field(default_factory=dict)
    consumer: dict[str, Any] = field(default_factory=dict)
    metrics: bool = True
    """Serve Prometheus metrics as in production (the worker then records per-record
    latency histograms, etc.); False uses the no-op observer."""

    def write_config(self, case: Case, suffix: str) -> Path:
        """A streamproc config for one run: fresh group, destinations and DLQ."""
        auds = AUDIENCES[: case.audiences]
        cfg = {
            "kafka": client_conf(self.bootstrap),
            "consumer": {**CLIENT_DEFAULTS, **self.consumer},
            "producer": dict(self.producer),
            "group_id": f"e2e-{suffix}",
            "processing_guarantee": case.guarantee,
            "batch": {**self.batch, **({} if case.overlap else {"overlap_commit": False})},
            "schemas": {"directory": str(self.root / "schemas")},
            "kms": {"provider": "local", "path": str(self.root / "keys" / "keyring.json")},
            "policy": str(self.root / "policy.yaml"),
            "pipelines": [
                {
                    "sources": [self.source],
                    "dead_letter_topic": f"e2e-{suffix}.dlq",
                    "destinations": [
                        {"topic": f"e2e-{suffix}.{a}", "audience": a, "kek": f"{a}-kek"}
                        for a in auds
                    ],
                }
            ],
            "topics": {"defaults": {"partitions": self.partitions, "replication_factor": 1}},
            "metrics": {"host": "127.0.0.1", "port": free_port()}
            if self.metrics
            else {"enabled": False},
            "logging": {"level": "INFO", "format": "json"},
        }
        path = self.root / f"streamproc-{suffix}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path


#: Security settings of the broker under test (SASL_SSL on ``--broker kafka --security
#: sasl_ssl``), merged into every client this script and its subprocesses build.
CLIENT_SECURITY: dict[str, Any] = {}


def client_conf(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, **CLIENT_SECURITY}


def free_port() -> int:
    from streamproc.devbroker import free_port as fp

    return fp()


def make_bench(root: Path, bootstrap: str, partitions: int, records: int) -> Bench:
    from streamproc.crypto.kms.local import LocalKeyring

    root.mkdir(parents=True, exist_ok=True)
    sdir = root / "schemas"
    sdir.mkdir(exist_ok=True)
    shutil.copy(SCHEMA_FILE, sdir / SCHEMA_FILE.name)
    shutil.copy(POLICY_FILE, root / "policy.yaml")
    ring = LocalKeyring.open_or_create(root / "keys" / "keyring.json")
    ring.ensure_key(SOURCE_KEK)
    for a in AUDIENCES:
        ring.ensure_key(f"{a}-kek")
    ring.ensure_key(PSEUDONYM_SECRET, "secret")
    ring.ensure_key("quarantine-kek")  # dead letters are sealed under it
    return Bench(root, bootstrap, partitions, records)


def create_topics(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client_conf(bootstrap))
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics],
        operation_timeout=30,
        request_timeout=30,
    )
    for f in futures.values():
        f.result(30)


def delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Best effort: keeps the in-memory broker from growing run after run."""
    import contextlib

    from confluent_kafka.admin import AdminClient

    with contextlib.suppress(Exception):  # a broker without DeleteTopics keeps them
        futures = AdminClient(client_conf(bootstrap)).delete_topics(
            list(topics), operation_timeout=30
        )
        for f in futures.values():
            with contextlib.suppress(Exception):
                f.result(30)


def produce_source(bench: Bench, distinct: int, seed: int = 7) -> float:
    """Seal ``distinct`` Faker reference records once and produce ``M`` (cycled) into a
    fresh source topic, round-robin over its partitions.  Returns seconds taken."""
    import importlib.util

    from confluent_kafka import Producer

    from streamproc.client import RecordSealer
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.schema.registry import build_schema_source

    bench_core = sys.modules.get("bench_core")  # the core benchmark's make_records
    if bench_core is None or not hasattr(bench_core, "make_records"):
        spec = importlib.util.spec_from_file_location("bench_core", HERE / "bench_core.py")
        assert spec is not None and spec.loader is not None
        bench_core = importlib.util.module_from_spec(spec)
        sys.modules["bench_core"] = bench_core  # its dataclasses need the module registered
        spec.loader.exec_module(bench_core)

    t0 = time.perf_counter()
    bench.source = f"e2e-src-{uuid.uuid4().hex[:8]}.purchases"
    create_topics(bench.bootstrap, [bench.source], bench.partitions)
    kms = LocalKeyring(bench.root / "keys" / "keyring.json")
    schemas = build_schema_source(str(bench.root / "schemas"))
    schema = json.loads(SCHEMA_FILE.read_text())
    sealer = RecordSealer(kms, SOURCE_KEK, bench.source, schema, schemas)
    originals = bench_core.make_records(distinct, seed)
    values = sealer.seal_many(originals)  # one producer data key, as in production
    keys = [r["order_id"].encode() for r in originals]
    p = Producer(
        {
            **client_conf(bench.bootstrap),
            "enable.idempotence": True,
            "linger.ms": 20,
            "queue.buffering.max.messages": 500_000,
        }
    )
    errors: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    n_parts = bench.partitions
    for i in range(bench.records):
        j = i % distinct
        while True:
            try:
                p.produce(
                    bench.source,
                    key=keys[j],
                    value=values[j],
                    partition=i % n_parts,
                    on_delivery=done,
                )
                break
            except BufferError:
                p.poll(0.05)
        if i % 10_000 == 0:
            p.poll(0)
    if p.flush(120) != 0 or errors:
        raise RuntimeError(f"producing the source records failed: {errors[:3]}")
    return time.perf_counter() - t0


def count_records(bootstrap: str, topics: Sequence[str], timeout: float = 120.0) -> dict[str, int]:
    """Data records per topic, read to the end with a read_committed consumer.

    Read rather than taken from high watermarks: transaction markers take offsets too.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer(
        {
            **client_conf(bootstrap),
            "group.id": f"cnt-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    counts = dict.fromkeys(topics, 0)
    try:
        parts = [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t in topics
            for p in c.list_topics(t, timeout=10).topics[t].partitions
        ]
        c.assign(parts)
        eof: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(10_000, 0.5):
                err = m.error()
                if err is None:
                    counts[str(m.topic())] += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.add((str(m.topic()), int(m.partition() or 0)))
    finally:
        c.close()
    return counts


# -- one run -----------------------------------------------------------------------------------------


@dataclass
class Run:
    case: str
    records: int
    launch_to_done: float
    assigned_to_done: float
    first_to_done: float | None
    launch_to_assigned: float
    outputs_min: int
    dead_letters: int
    proc_cpu: float | None = None
    """CPU seconds of the worker/copy process between ``assigned`` and ``done``."""
    main_cpu: float | None = None
    """The same for its main thread only (the Python loop; the rest is librdkafka's threads)."""
    broker_cpu: float | None = None
    """CPU seconds of the broker between ``assigned`` and ``done`` (local broker only)."""
    batches: int | None = None
    phases_ms: dict[str, float] | None = None
    """Raw copy loops: mean milliseconds per batch of each phase (produce, send_offsets or
    flush, commit), from the loop's last log line."""
    load_avg: float | None = None
    rss_mb: float | None = None
    """Resident set size of the worker/copy process at ``done`` (steady state), MiB."""
    rss_peak_mb: float | None = None
    """Its high-water mark (``VmHWM``: start-up included), MiB."""

    @property
    def raw_rate(self) -> float:
        return self.records / self.launch_to_done

    @property
    def steady_rate(self) -> float:
        return self.records / self.assigned_to_done

    @property
    def cpu_us_per_record(self) -> float | None:
        """CPU microseconds of the worker/copy process (all its threads) per input record."""
        return None if self.proc_cpu is None else self.proc_cpu / self.records * 1e6

    @property
    def main_us_per_record(self) -> float | None:
        """CPU microseconds of its main thread per input record."""
        return None if self.main_cpu is None else self.main_cpu / self.records * 1e6


def cpu_seconds(pid: int | None, thread: int | None = None) -> float | None:
    """utime + stime of a process (all threads), or of one of its threads, from /proc."""
    if pid is None:
        return None
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def rss_mib(pid: int | None) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of a process in MiB, from ``/proc/<pid>/status``."""
    if pid is None:
        return None, None
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None, None
    kb = {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines) if k in ("VmRSS", "VmHWM")}
    rss, hwm = kb.get("VmRSS"), kb.get("VmHWM")
    return (None if rss is None else rss / 1024), (None if hwm is None else hwm / 1024)


def _poll(cond: Callable[[], bool], timeout: float, what: str, interval: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.perf_counter()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def command_for(case: Case, config: Path) -> list[str]:
    if case.kind == "streamproc":
        return [sys.executable, "-m", "streamproc.cli.run", "--config", str(config)]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--copy-loop",
        str(config),
        *([f"--headers={case.headers}"] if case.headers else []),
    ]


def run_case(bench: Bench, case: Case, *, timeout: float = 600.0, pin: int | None = None) -> Run:
    """Run one case on the shared source; returns its clocks and checks its outputs."""
    from confluent_kafka import Consumer, TopicPartition

    suffix = f"{case.name}-{uuid.uuid4().hex[:6]}"
    config = bench.write_config(case, suffix)
    dests = [f"e2e-{suffix}.{a}" for a in AUDIENCES[: case.audiences]]
    dlq = f"e2e-{suffix}.dlq"
    create_topics(bench.bootstrap, [*dests, dlq], bench.partitions)
    group = f"e2e-{suffix}"
    probe = Consumer(
        {**client_conf(bench.bootstrap), "group.id": group, "enable.auto.commit": False}
    )
    src_tps = [TopicPartition(bench.source, p) for p in range(bench.partitions)]
    dst_tps = [TopicPartition(d, p) for d in dests for p in range(bench.partitions)]
    log_path = bench.root / f"{suffix}.log"
    cmd = command_for(case, config)
    if case.baseline and BASELINE is None:
        raise ValueError(f"case {case.name} needs --baseline DIR")
    tree = BASELINE if case.baseline and BASELINE is not None else REPO
    if pin is not None and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", str(pin), *cmd]
    with open(log_path, "wb") as log:
        t_launch = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(tree),
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)},
        )
    first: list[float] = []

    def first_output() -> bool:
        if not first:
            for tp in dst_tps:
                if probe.get_watermark_offsets(tp, timeout=5, cached=False)[1] > 0:
                    first.append(time.perf_counter())
                    break
        return bool(first)

    try:
        t_assigned = _poll(
            lambda: ASSIGNED_MARK.encode() in log_path.read_bytes() or proc.poll() is not None,
            120,
            "partition assignment",
            0.01,
        )
        if proc.poll() is not None:
            raise RuntimeError(
                f"{case.name} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
            )
        cpu0, bcpu0 = cpu_seconds(proc.pid), cpu_seconds(bench.broker_pid)
        mcpu0 = cpu_seconds(proc.pid, proc.pid)  # the main (Python) thread

        def finished() -> bool:
            first_output()
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{case.name} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
                )
            return (
                sum(max(0, tp.offset) for tp in probe.committed(src_tps, timeout=10))
                >= bench.records
            )

        t_done = _poll(finished, timeout, "committed offsets", 0.02)
        cpu1, bcpu1 = cpu_seconds(proc.pid), cpu_seconds(bench.broker_pid)
        mcpu1 = cpu_seconds(proc.pid, proc.pid)
        rss, rss_peak = rss_mib(proc.pid)  # taskset execs: the pid is the Python process
    finally:
        probe.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        if rc != 0:
            print(f"  {case.name}: exit code {rc}; log {log_path}", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    counts = count_records(bench.bootstrap, [*dests, dlq])
    outputs_min, dead = min(counts[d] for d in dests), counts[dlq]
    if outputs_min < bench.records or dead:
        raise RuntimeError(
            f"{case.name}: expected >= {bench.records} records per destination and "
            f"no dead letters, got {counts}"
        )
    delete_topics(bench.bootstrap, [*dests, dlq])
    batches, phases = _last_line(log_path)
    return Run(
        case=case.name,
        records=bench.records,
        launch_to_done=t_done - t_launch,
        assigned_to_done=t_done - t_assigned,
        first_to_done=(t_done - first[0]) if first else None,
        launch_to_assigned=t_assigned - t_launch,
        outputs_min=outputs_min,
        dead_letters=dead,
        proc_cpu=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        main_cpu=None if mcpu0 is None or mcpu1 is None else mcpu1 - mcpu0,
        broker_cpu=None if bcpu0 is None or bcpu1 is None else bcpu1 - bcpu0,
        batches=batches,
        phases_ms=phases,
        load_avg=load,
        rss_mb=rss,
        rss_peak_mb=rss_peak,
    )


def _last_line(log_path: Path) -> tuple[int | None, dict[str, float] | None]:
    """(committed batches, phase times) from the worker's or copy loop's final log line."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        msg = obj.get("message", "") if isinstance(obj, dict) else ""
        if msg.startswith("stopped after "):
            phases = obj.get("ms_per_batch")
            m = re.search(r"commit ([\d.]+) ms/batch, waited ([\d.]+) ms/batch", msg)
            if phases is None and m:  # the worker: its committer thread, and the loop's wait
                phases = {"commit (committer thread)": float(m[1]), "loop waited": float(m[2])}
            try:
                return int(msg.split()[2]), phases
            except (IndexError, ValueError):
                return None, None
    return None, None


# -- the raw copy loop (runs as ``bench_e2e.py --copy-loop CONFIG``) --------------------------------------


def copy_loop(config_path: str, headers: str = "") -> int:
    """Consume -> produce the same bytes -> commit, with the worker's client settings.

    Exactly-once: one transaction per ``consume()`` batch with
    ``send_offsets_to_transaction``; at-least-once: idempotent producer, ``flush()``,
    synchronous ``commit``.  No crypto, no transform; with ``headers="ten"``, every copy gets
    10 headers shaped like the worker's provenance headers of 0.1 (same names, similar
    values, the source offset formatted per record); with ``"prov"`` the one header of
    today's worker (constant prefix plus a per-record 22-character reference); otherwise none.  SIGTERM stops it.  The last log
    line gives the batches and the mean time per batch of each phase.
    """
    import threading

    from confluent_kafka import Consumer, Producer, TopicPartition

    from streamproc.config import load_config
    from streamproc.runtime.kafka_conf import consumer_conf, producer_conf

    config = load_config(config_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def on_error(err: Any) -> None:
        print(json.dumps({"message": f"client error {err.name()}"}), flush=True)

    # The worker's own settings builders, so the comparison stays like for like.
    cconf = consumer_conf(config, error_cb=on_error)
    pconf = producer_conf(config, transactional_id=f"{config.group_id}-copy-0", error_cb=on_error)
    producer = Producer(pconf)
    eos = config.exactly_once
    if eos:
        producer.init_transactions(30)
    consumer = Consumer(cconf)
    dests = config.destination_topics
    max_records, max_wait = config.batch_max_records, config.batch_max_wait_ms / 1000.0
    const = [
        ("streamproc.input.schema_id", b"671888517"),
        ("streamproc.output.schema_id", b"1268439637"),
        ("streamproc.policy.version", b"sha256:2619d2547546b4d2"),
        ("streamproc.audience", b"a1"),
        ("streamproc.kek.id", b"a1-kek"),
        ("streamproc.processor.version", b"0.1.0"),
        ("streamproc.kek.version", b"1"),
    ]
    prov_prefix = b"f=1;a=a1;p=sha256:2619d2547546b4d2;s=1268439637;k=1;r="

    def on_assign(_c: Any, parts: list[Any]) -> None:
        print(json.dumps({"message": ASSIGNED_MARK, "count": len(parts)}), flush=True)

    consumer.subscribe(config.source_topics, on_assign=on_assign)
    batches = records = 0
    t_produce = t_offsets = t_commit = 0.0
    produce = producer.produce
    clock = time.perf_counter
    while not stop.is_set():
        msgs = consumer.consume(max_records, max_wait)
        msgs = [m for m in msgs if m.error() is None]
        if not msgs:
            continue
        t0 = clock()
        last: dict[tuple[str, int], int] = {}
        if eos:
            producer.begin_transaction()
        for m in msgs:
            k, v = m.key(), m.value()
            topic, part, off = cast(str, m.topic()), cast(int, m.partition()), cast(int, m.offset())
            hdrs: Any = None
            if headers == "ten":
                hdrs = [
                    ("streamproc.source.topic", topic.encode()),
                    ("streamproc.source.partition", str(part).encode()),
                    ("streamproc.source.offset", str(off).encode()),
                    *const,
                ]
            elif headers == "prov":
                # The worker's value: constant prefix + a 22-character per-record reference
                # (here the offset, padded: the header's cost, not the AES that makes it).
                hdrs = [("streamproc.prov", prov_prefix + b"%022d" % off)]
            for d in dests:
                while True:
                    try:
                        produce(d, v, k, headers=hdrs)
                        break
                    except BufferError:
                        producer.poll(0.1)
            last[(topic, part)] = off
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]
        t1 = clock()
        if eos:
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            t2 = clock()
            producer.commit_transaction(30)
        else:
            if producer.flush(30) > 0:
                raise RuntimeError("flush timed out")
            t2 = clock()
            consumer.commit(offsets=offsets, asynchronous=False)
        t3 = clock()
        t_produce, t_offsets, t_commit = (
            t_produce + t1 - t0,
            t_offsets + t2 - t1,
            t_commit + t3 - t2,
        )
        batches += 1
        records += len(msgs)
    consumer.close()
    producer.flush(10)
    n = max(1, batches)
    phases = ("produce", "send_offsets", "commit") if eos else ("produce", "flush", "commit")
    print(
        json.dumps(
            {
                "message": f"stopped after {batches} batches",
                "records": records,
                "ms_per_batch": {
                    k: round(v / n * 1e3, 3)
                    for k, v in zip(phases, (t_produce, t_offsets, t_commit), strict=True)
                },
            }
        ),
        flush=True,
    )
    return 0


# -- main ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def paired_ratio(a: Result, b: Result, attr: str) -> tuple[float, float, float]:
    """Median, min, max of per-round ratios a/b (rounds are interleaved)."""
    rs = sorted(getattr(x, attr) / getattr(y, attr) for x, y in zip(a.runs, b.runs, strict=True))
    return statistics.median(rs), rs[0], rs[-1]


def report(results: dict[str, Result], meta: dict[str, Any]) -> str:
    pin = meta.get("pin")
    lines = [
        f"bench_e2e · {meta['records']:,} records/run · {meta['partitions']} partitions · batch "
        f"{meta['batch']['max_records']}/{meta['batch']['max_wait_ms']} ms · median of {meta['repeat']} · "
        f"{meta['broker']} · {meta['cpus']} CPUs{'' if pin is None else f' · worker pinned to CPU {pin}'} · "
        f"metrics {'on' if meta.get('metrics') else 'off'}",
        f"load average (1 min) before {meta['load_before']:.2f}, after {meta['load_after']:.2f}",
        f"{'case':<23} {'steady rec/s':>12} {'raw rec/s':>10} {'join s':>6} {'CPU':>5} {'CPU us/rec':>10} "
        f"{'broker':>6} {'batches':>7} {'RSS MiB':>7} {'peak':>5}  steady runs",
        "-" * 125,
    ]
    for name, res in results.items():
        runs = ", ".join(f"{r.steady_rate:,.0f}" for r in res.runs)
        cpu = [r.proc_cpu / r.assigned_to_done for r in res.runs if r.proc_cpu is not None]
        us = [r.cpu_us_per_record for r in res.runs if r.cpu_us_per_record is not None]
        bcpu = [r.broker_cpu / r.assigned_to_done for r in res.runs if r.broker_cpu is not None]
        bat = [r.batches for r in res.runs if r.batches]
        rss = [r.rss_mb for r in res.runs if r.rss_mb is not None]
        hwm = [r.rss_peak_mb for r in res.runs if r.rss_peak_mb is not None]
        lines.append(
            f"{name:<23} {res.median('steady_rate'):>12,.0f} {res.median('raw_rate'):>10,.0f} "
            f"{res.median('launch_to_assigned'):>6.2f} "
            f"{(f'{statistics.median(cpu):.0%}' if cpu else '-'):>5} "
            f"{(f'{statistics.median(us):.1f}' if us else '-'):>10} "
            f"{(f'{statistics.median(bcpu):.0%}' if bcpu else '-'):>6} "
            f"{(f'{statistics.median(bat):.0f}' if bat else '-'):>7} "
            f"{(f'{statistics.median(rss):.0f}' if rss else '-'):>7} "
            f"{(f'{statistics.median(hwm):.0f}' if hwm else '-'):>5}  {runs}"
        )
    lines.append(
        "steady = M / (assigned -> done), start-up and group join excluded; raw = M / (launch -> done); "
        "join s = launch -> assigned;\nCPU = the process's CPU (all threads) as a share of one core, "
        "and per input record, during the steady phase; broker = the broker's CPU share;\n"
        "RSS MiB = the process's resident set at done (steady state), peak = its high-water mark"
    )
    for name, res in results.items():
        ph = [r.phases_ms for r in res.runs if r.phases_ms]
        if ph:
            keys = list(ph[0])
            parts = ", ".join(f"{k} {statistics.median(p[k] for p in ph):.2f}" for k in keys)
            lines.append(f"{name}: ms per batch: {parts}")
    for a, b in RATIOS:
        if a in results and b in results:
            m, lo, hi = paired_ratio(results[a], results[b], "steady_rate")
            mr, _, _ = paired_ratio(results[a], results[b], "raw_rate")
            lines.append(f"ratio {a} / {b}: steady {m:.2f} ({lo:.2f}-{hi:.2f}), raw {mr:.2f}")
    return "\n".join(lines)


def run_bench(
    records: int,
    repeat: int,
    cases: Sequence[str],
    *,
    partitions: int = 3,
    distinct: int = 2000,
    bootstrap: str | None = None,
    broker_kind: str = "tansu",
    security: str = "plaintext",
    pin: bool = False,
    batch: dict[str, int] | None = None,
    producer: dict[str, Any] | None = None,
    consumer: dict[str, Any] | None = None,
    metrics: bool = True,
    timeout: float = 600.0,
    root: Path | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[dict[str, Result], dict[str, Any]]:
    """Start a broker (unless ``bootstrap``), produce the source, run the cases.

    ``broker_kind``: ``tansu`` (:class:`~streamproc.devbroker.DevBroker`) or ``kafka``
    (Apache Kafka, :class:`~streamproc.devkafka.KafkaBroker`, PLAINTEXT or ``security=
    "sasl_ssl"``: SCRAM-SHA-512 over TLS with hostname verification, every client too).
    """
    from streamproc.devbroker import DevBroker
    from streamproc.devkafka import KafkaBroker

    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-")) if root is None else root
    tmp.mkdir(parents=True, exist_ok=True)
    broker: Any = None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    worker_cpu = cpus[-1] if pin and len(cpus) >= 2 else None
    try:
        broker_pid: int | None = None
        if bootstrap is None:
            if broker_kind == "kafka":
                kafka = KafkaBroker(tmp / "kafka", security=security)  # type: ignore[arg-type]
                broker = kafka.start()
                broker_pid = kafka.pid
                CLIENT_SECURITY.clear()
                CLIENT_SECURITY.update(
                    {k: v for k, v in kafka.client_config().items() if k != "bootstrap.servers"}
                )
            else:
                tansu = DevBroker(log_path=tmp / "tansu.log").start()
                broker = tansu
                broker_pid = tansu._proc.pid if tansu._proc is not None else None
            bootstrap = broker.bootstrap
            if worker_cpu is not None and broker_pid is not None:
                # broker and harness on the other CPUs
                others = [c for c in cpus if c != worker_cpu]
                os.sched_setaffinity(broker_pid, others)
                os.sched_setaffinity(0, others)
        bench = make_bench(tmp / "ws", bootstrap, partitions, records)
        bench.broker_pid = broker_pid
        if batch:
            bench.batch.update(batch)
        bench.producer.update(producer or {})
        bench.consumer.update(consumer or {})
        bench.metrics = metrics
        secs = produce_source(bench, distinct)
        progress(f"  produced {records:,} sealed records into {bench.source} in {secs:.1f} s")
        load_before = os.getloadavg()[0]
        results = {c: Result(c) for c in cases}
        for rep in range(repeat):
            for name in cases:
                run = run_case(bench, CASES[name], timeout=timeout, pin=worker_cpu)
                results[name].runs.append(run)
                progress(
                    f"  round {rep + 1}/{repeat} {name:<17} steady {run.steady_rate:>8,.0f} rec/s "
                    f"({run.assigned_to_done:.2f} s), raw {run.raw_rate:>8,.0f} rec/s "
                    f"({run.launch_to_done:.2f} s), load {run.load_avg:.2f}"
                )
                time.sleep(0.5)
        meta = {
            "records": records,
            "repeat": repeat,
            "partitions": partitions,
            "distinct": distinct,
            "batch": bench.batch,
            "producer": bench.producer,
            "consumer": bench.consumer,
            "metrics": metrics,
            "broker": (
                f"external {bootstrap}"
                if broker is None
                else "local Tansu (DevBroker)"
                if broker_kind == "tansu"
                else f"local Apache Kafka (KafkaBroker, {security.upper()})"
            ),
            "cpus": os.cpu_count(),
            "pin": worker_cpu,
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
        return results, meta
    finally:
        if broker is not None:
            broker.stop()
        CLIENT_SECURITY.clear()
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--copy-loop"]:
        flag = next((a for a in argv[2:] if a.startswith("--headers=")), "")
        return copy_loop(argv[1], headers=flag.partition("=")[2])
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--records", type=int, default=200_000, help="input records per run (default 200000)"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="rounds; medians are reported (default 3)"
    )
    ap.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated subset of {','.join(CASES)}",
    )
    ap.add_argument("--partitions", type=int, default=3, help="partitions per topic (default 3)")
    ap.add_argument(
        "--distinct", type=int, default=2000, help="distinct Faker records, cycled (>= 1000)"
    )
    ap.add_argument(
        "--batch", type=int, default=BATCH["max_records"], help="batch.max_records (default 2000)"
    )
    ap.add_argument(
        "--max-wait-ms",
        type=int,
        default=BATCH["max_wait_ms"],
        help="batch.max_wait_ms (default 100)",
    )
    ap.add_argument(
        "--producer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka producer setting for every case (repeatable)",
    )
    ap.add_argument(
        "--consumer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka consumer setting for every case (repeatable)",
    )
    ap.add_argument(
        "--no-metrics",
        action="store_true",
        help="run the worker without its Prometheus metrics (default: served, as in production)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin the worker/copy process to the last CPU, broker and harness to the others",
    )
    ap.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="local broker to start: Tansu (default) or Apache Kafka (scripts/kafka/fetch.sh)",
    )
    ap.add_argument(
        "--security",
        choices=("plaintext", "sasl_ssl"),
        default="plaintext",
        help="with --broker kafka: SASL_SSL (SCRAM-SHA-512, TLS, hostname verification)",
    )
    ap.add_argument("--bootstrap", help="use this broker instead of starting a local one")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (a checkout of an earlier commit) for the base-* cases",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="per-run timeout, seconds")
    ap.add_argument(
        "--keep", type=Path, help="keep the workspace (configs, logs) in this directory"
    )
    ap.add_argument(
        "--json", dest="json_out", type=Path, help="also write the results as JSON here"
    )
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    global BASELINE
    BASELINE = args.baseline.resolve() if args.baseline else None
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; have {', '.join(CASES)}")

    def kv(items: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for it in items:
            k, _, v = it.partition("=")
            out[k] = int(v) if v.lstrip("-").isdigit() else v
        return out

    results, meta = run_bench(
        args.records,
        args.repeat,
        cases,
        partitions=args.partitions,
        distinct=args.distinct,
        bootstrap=args.bootstrap,
        broker_kind=args.broker,
        security=args.security,
        pin=args.pin,
        batch={"max_records": args.batch, "max_wait_ms": args.max_wait_ms},
        producer=kv(args.producer),
        consumer=kv(args.consumer),
        metrics=not args.no_metrics,
        timeout=args.timeout,
        root=args.keep,
        progress=lambda s: print(s, flush=True),
    )
    print(report(results, meta))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    **meta,
                    "results": {
                        k: {
                            "label": CASES[k].label,
                            "median_steady_records_per_s": r.median("steady_rate"),
                            "median_raw_records_per_s": r.median("raw_rate"),
                            "runs": [
                                {
                                    **asdict(x),
                                    "steady_rate": x.steady_rate,
                                    "raw_rate": x.raw_rate,
                                    "cpu_us_per_record": x.cpu_us_per_record,
                                }
                                for x in r.runs
                            ],
                        }
                        for k, r in results.items()
                    },
                    "ratios": {
                        f"{a}/{b}": dict(
                            zip(
                                ("median", "min", "max"),
                                paired_ratio(results[a], results[b], "steady_rate"),
                                strict=True,
                            )
                        )
                        for a, b in RATIOS
                        if a in results and b in results
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
