"""Faust comparison: the same sanitize-and-re-encrypt work in a Faust agent and in the worker.

Usage::

    python benchmarks/bench_faust.py [--records M] [--repeat R] [--partitions P]
                                     [--bootstrap HOST:PORT] [--only NAME ...] [--json out.json]

On one broker (a fresh local Tansu unless ``--bootstrap`` is given), for each variant and
repetition: fresh topics, the same ``M`` sealed orders (``schemas/order.avsc``, seeded
Faker data cycled from ``--distinct`` originals, sealed under ``orders-kek``) produced up
front into the source topic, then one consumer process turns each into three sanitized,
re-sealed records (``policy.yaml``: analytics, fraud, support) on three destination
topics.  Variants:

* ``streamproc-eos`` -- ``streamproc run`` (subprocess, librdkafka, one worker),
  ``processing_guarantee: exactly_once`` (the default: one transaction per batch);
* ``streamproc-alo`` -- the same worker, ``at_least_once`` (idempotent producer, flush,
  then commit);
* ``faust-batch``    -- a Faust agent (aiokafka) that takes events in batches of
  ``batch.max_records`` within ``batch.max_wait_ms`` (``stream.take_events``, the worker's
  batch settings) and runs ``Pipeline.process`` on each batch;
* ``faust-event``    -- the idiomatic per-event agent (``async for event in
  stream.events()``), ``Pipeline.process([record])`` per record.

The Faust agents build their pipeline with ``streamproc.runtime.factory.build_pipeline``
from the very config file the worker runs, so the privacy work is identical (same policy,
plans, keys, data-key caches, provenance headers, dead letters); both Faust variants are
at-least-once (Faust's default guarantee).  The clock starts when the consumer owns its
partitions (worker: the ``partitions assigned`` log line; Faust: the first event reaches
the agent) and stops when every input is done (worker: the group's committed offsets
reach ``M``; Faust: ``M`` records processed and every send acknowledged).  Start-up and
group join (about 3 s on Tansu) are not measured.  Each run checks that every destination
holds at least ``M`` records and the dead-letter topic none.  Rates are *input* records/s,
median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

from streamproc import demo
from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.devbroker import DevBroker
from streamproc.schema.registry import build_schema_source

REPO = Path(__file__).resolve().parents[1]
AUDIENCES = demo.AUDIENCES
VARIANTS = ("streamproc-eos", "streamproc-alo", "faust-batch", "faust-event")
BATCH = {"max_records": 2000, "max_wait_ms": 100}
CLIENT_DEFAULTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


@dataclass
class Run:
    variant: str
    records: int
    seconds: float
    outputs_min: int
    dead_letters: int
    pipeline_seconds: float | None = None
    """Faust runs: time inside ``Pipeline.process`` (the rest is Faust + aiokafka)."""
    load_avg: float | None = None
    """1-minute load average when the run ended: other work on the machine skews rates."""

    @property
    def rate(self) -> float:
        return self.records / self.seconds


@dataclass
class Result:
    variant: str
    runs: list[Run] = field(default_factory=list)

    @property
    def median_rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)


# -- set-up ------------------------------------------------------------------------------------


@dataclass
class Setup:
    """A workspace + config + topics for one run; topic names are unique per run."""

    root: Path
    bootstrap: str
    suffix: str
    guarantee: str
    partitions: int

    @property
    def source(self) -> str:
        return f"bench-{self.suffix}.orders"

    def dest(self, audience: str) -> str:
        return f"bench-{self.suffix}.orders.{audience}"

    @property
    def dlq(self) -> str:
        return f"bench-{self.suffix}.orders.dlq"

    @property
    def group_id(self) -> str:
        return f"bench-{self.suffix}"

    @property
    def config_path(self) -> Path:
        return self.root / "streamproc.yaml"

    def write(self) -> Path:
        cfg = {
            "kafka": {"bootstrap.servers": self.bootstrap},
            "consumer": dict(CLIENT_DEFAULTS),
            "group_id": self.group_id,
            "processing_guarantee": self.guarantee,
            "batch": BATCH,
            "schemas": {"directory": "./schemas"},
            "kms": {"provider": "local", "path": "./keys/keyring.json"},
            "policy": "./policy.yaml",
            "pipelines": [{
                "sources": [self.source],
                "dead_letter_topic": self.dlq,
                "destinations": [{"topic": self.dest(a), "audience": a, "kek": f"{a}-kek"} for a in AUDIENCES],
            }],
            "topics": {"defaults": {"partitions": self.partitions, "replication_factor": 1}},
            "metrics": {"enabled": False},
            "logging": {"level": "INFO", "format": "json"},
        }
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return self.config_path


def make_root(base: Path) -> Path:
    schemas, policy = demo.find_examples()
    return demo.make_workspace(base, schemas, policy).root


def produce_sealed(setup: Setup, originals: Sequence[dict[str, Any]], n: int) -> None:
    """``n`` sealed orders (originals cycled) into the run's source topic, round-robin."""
    from confluent_kafka import Producer

    kms = LocalKeyring(setup.root / "keys" / "keyring.json")
    schemas = build_schema_source(str(setup.root / "schemas"))
    schema = json.loads((setup.root / "schemas" / "order.avsc").read_text())
    sealer = RecordSealer(kms, "orders-kek", setup.source, schema, schemas)
    records = [originals[i % len(originals)] for i in range(n)]
    values = sealer.seal_many(records)
    p = Producer({"bootstrap.servers": setup.bootstrap, "linger.ms": 20, "enable.idempotence": True})
    errors: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for i, (rec, value) in enumerate(zip(records, values, strict=True)):
        while True:
            try:
                p.produce(setup.source, key=rec["customer_id"].encode(), value=value,
                          partition=i % setup.partitions, on_delivery=done)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(60) != 0 or errors:
        raise RuntimeError(f"producing the input failed: {errors[:3]}")


def count_records(bootstrap: str, topics: Sequence[str], timeout: float = 60.0) -> dict[str, int]:
    """Data records per topic, read to the end (read_committed: no transaction markers).

    Counted by reading rather than from high watermarks: on Tansu, ``ListOffsets(latest)``
    was seen to lag the records a consumer can already read (2003 reported, 3000 read).
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"cnt-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": True})
    counts = dict.fromkeys(topics, 0)
    try:
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in c.list_topics(t, timeout=10).topics[t].partitions]
        c.assign(parts)
        eof: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(5000, 0.5):
                err, topic, partition = m.error(), str(m.topic()), int(m.partition() or 0)
                if err is None:
                    counts[topic] += 1
                elif err.code() == -191:  # _PARTITION_EOF
                    eof.add((topic, partition))
    finally:
        c.close()
    return counts


def check_outputs(setup: Setup, n: int) -> tuple[int, int]:
    counts = count_records(setup.bootstrap, [*(setup.dest(a) for a in AUDIENCES), setup.dlq])
    outputs_min = min(counts[setup.dest(a)] for a in AUDIENCES)
    dead = counts[setup.dlq]
    if outputs_min < n or dead:
        raise RuntimeError(f"{setup.suffix}: expected >= {n} records per destination and no dead letters, got {counts}")
    return outputs_min, dead


# -- the streamproc worker ------------------------------------------------------------------------


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.perf_counter()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_worker(setup: Setup, n: int, timeout: float) -> float:
    """Seconds from partition assignment to committed offsets covering all ``n`` inputs."""
    from confluent_kafka import Consumer, TopicPartition

    log_path = setup.root / f"worker-{setup.suffix}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamproc.cli.run", "--config", str(setup.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    probe = Consumer({"bootstrap.servers": setup.bootstrap, "group.id": setup.group_id, "enable.auto.commit": False})
    tps = [TopicPartition(setup.source, p) for p in range(setup.partitions)]
    try:
        t0 = wait_for(lambda: b"partitions assigned" in log_path.read_bytes() or proc.poll() is not None, 60, "assignment")
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}")
        t1 = wait_for(
            lambda: sum(max(0, tp.offset) for tp in probe.committed(tps, timeout=10)) >= n,
            timeout, "committed offsets", interval=0.02,
        )
        return t1 - t0
    finally:
        probe.close()
        proc.terminate()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        if rc != 0:
            print(f"  worker exit code {rc}; log {log_path}", file=sys.stderr)


# -- the Faust agent ------------------------------------------------------------------------------


def run_faust(setup: Setup, n: int, timeout: float, batched: bool) -> tuple[float, float]:
    """(seconds from the first event to ``n`` inputs processed and all outputs
    acknowledged, of which seconds inside ``Pipeline.process``)."""
    import faust

    from streamproc.config import load_config
    from streamproc.integrations.faust import TANSU_APP_SETTINGS
    from streamproc.pipeline.core import InputRecord, Pipeline
    from streamproc.runtime.dlq import dead_letter_headers
    from streamproc.runtime.factory import build_pipeline

    config = load_config(setup.config_path)
    pipeline: Pipeline = build_pipeline(config)
    app = faust.App(
        f"bench-faust-{setup.suffix}", broker=f"kafka://{setup.bootstrap}", store="memory://",
        web_enabled=False, **TANSU_APP_SETTINGS,
    )
    source = app.topic(setup.source, key_serializer="raw", value_serializer="raw")
    outs = {t: app.topic(t, key_serializer="raw", value_serializer="raw") for t in [*(setup.dest(a) for a in AUDIENCES), setup.dlq]}
    state: dict[str, Any] = {"processed": 0, "t0": None, "pending": [], "in_pipeline": 0.0}
    done = asyncio.Event()

    def to_input(event: Any) -> InputRecord:
        m = event.message
        ts = int(m.timestamp * 1000) if m.timestamp else None
        return InputRecord(m.topic, m.partition, m.offset, m.key, m.value, ts, tuple(m.headers or ()))

    async def handle(batch: list[InputRecord]) -> None:
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        t = time.perf_counter()
        result = pipeline.process(batch)
        state["in_pipeline"] += time.perf_counter() - t
        pending = state["pending"]
        for out in result.outputs:
            pending.append(await outs[out.topic].send(key=out.key, value=out.value, headers=out.headers))
        for q in result.quarantined:
            headers = cast(list[tuple[str, bytes]], dead_letter_headers(q))  # None values are valid on the wire
            pending.append(await outs[setup.dlq].send(key=q.record.key, value=q.record.value, headers=headers))
        state["processed"] += len(batch)
        if state["processed"] >= n:
            done.set()

    if batched:
        @app.agent(source, name="sanitize_batched")
        async def sanitize_batched(stream: Any) -> None:
            async for events in stream.take_events(BATCH["max_records"], within=BATCH["max_wait_ms"] / 1000):
                await handle([to_input(e) for e in events])
    else:
        @app.agent(source, name="sanitize")
        async def sanitize(stream: Any) -> None:
            async for event in stream.events():
                await handle([to_input(event)])

    async def main() -> tuple[float, float]:
        await app.start()
        try:
            await asyncio.wait_for(done.wait(), timeout)
            await asyncio.gather(*state["pending"])  # every output acknowledged by the broker
            return time.perf_counter() - state["t0"], state["in_pipeline"]
        finally:
            await app.stop()

    return asyncio.run(main())


# -- main -------------------------------------------------------------------------------------------


def run_variant(variant: str, base: Path, bootstrap: str, originals: Sequence[dict[str, Any]], args: argparse.Namespace) -> Run:
    from streamproc.config import load_config
    from streamproc.runtime.topics import apply_topics

    guarantee = "at_least_once" if variant == "streamproc-alo" else "exactly_once"
    suffix = f"{variant}-{uuid.uuid4().hex[:6]}"
    setup = Setup(base, bootstrap, suffix, guarantee, args.partitions)
    setup.write()
    apply_topics(load_config(setup.config_path))
    produce_sealed(setup, originals, args.records)
    in_pipeline = None
    if variant.startswith("streamproc"):
        seconds = run_worker(setup, args.records, args.timeout)
    else:
        seconds, in_pipeline = run_faust(setup, args.records, args.timeout, batched=variant == "faust-batch")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    outputs_min, dead = check_outputs(setup, args.records)
    return Run(variant, args.records, seconds, outputs_min, dead, in_pipeline, load)


def report(results: dict[str, Result], args: argparse.Namespace, bootstrap_kind: str) -> str:
    lines = [
        f"Faust comparison: {args.records} sealed orders -> 3 audiences, {args.partitions} partitions, "
        f"median of {args.repeat}, broker {bootstrap_kind}",
        f"{'variant':<16} {'guarantee':<15} {'records/s':>10}  {'in Pipeline.process':<20} runs (records/s)",
    ]
    guarantee = {"streamproc-eos": "exactly_once", "streamproc-alo": "at_least_once",
                 "faust-batch": "at_least_once", "faust-event": "at_least_once"}
    for name, res in results.items():
        runs = ", ".join(f"{r.rate:,.0f}" for r in res.runs)
        shares = [r.pipeline_seconds / r.seconds for r in res.runs if r.pipeline_seconds is not None]
        share = f"{statistics.median(shares):.0%} of wall time" if shares else "-"
        lines.append(f"{name:<16} {guarantee[name]:<15} {res.median_rate:>10,.0f}  {share:<20} {runs}")
    pairs = [("streamproc-alo", "faust-batch"), ("streamproc-alo", "faust-event"),
             ("streamproc-eos", "faust-batch"), ("streamproc-eos", "faust-event")]
    for a, b in pairs:
        if a in results and b in results:
            # Runs are interleaved, so repetition i of a and of b saw similar machine load.
            paired = sorted(x.rate / y.rate for x, y in zip(results[a].runs, results[b].runs, strict=True))
            lines.append(
                f"ratio {a} / {b}: {results[a].median_rate / results[b].median_rate:.1f}x of medians; "
                f"paired per repetition {statistics.median(paired):.1f}x (range {paired[0]:.1f}-{paired[-1]:.1f}x)"
            )
    loads = [r.load_avg for res in results.values() for r in res.runs if r.load_avg is not None]
    if loads:
        lines.append(f"1-min load average at run ends: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20000, help="input records per run (default 20000)")
    ap.add_argument("--distinct", type=int, default=1000, help="distinct generated orders, cycled (default 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported (default 3)")
    ap.add_argument("--partitions", type=int, default=3, help="partitions per topic (default 3)")
    ap.add_argument("--bootstrap", help="use this broker instead of starting a local Tansu")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, help="run only these variants")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-run processing timeout, seconds")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    gen = EventGenerator(7)
    originals = [gen.order() for _ in range(args.distinct)]
    variants = args.only or list(VARIANTS)
    results: dict[str, Result] = {v: Result(v) for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-faust-") as tmp:
        broker = None if args.bootstrap else DevBroker().start()
        bootstrap = args.bootstrap or broker.bootstrap  # type: ignore[union-attr]
        try:
            base = make_root(Path(tmp) / "ws")
            for rep in range(args.repeat):
                for v in variants:  # interleaved, so drift over time hits every variant alike
                    run = run_variant(v, base, bootstrap, originals, args)
                    results[v].runs.append(run)
                    print(f"  run {rep + 1}/{args.repeat} {v:<15} {run.rate:>10,.0f} records/s ({run.seconds:.2f} s)", flush=True)
                    time.sleep(1.0)  # let the previous run's processes and sockets wind down
        finally:
            if broker is not None:
                broker.stop()
    text = report(results, args, "external" if args.bootstrap else "local Tansu (DevBroker)")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({
            "records": args.records, "partitions": args.partitions, "repeat": args.repeat,
            "batch": BATCH, "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "results": {k: {"median_records_per_s": r.median_rate, "runs": [asdict(x) for x in r.runs]} for k, r in results.items()},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
