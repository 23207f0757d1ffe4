"""The Kafka half of ``streamproc demo``: real broker, real worker process, real topics.

Steps (each shows progress):

1. start Tansu on a free loopback port;
2. write the processor config into the workspace and create the topics;
3. start ``streamproc run`` as a separate process (so it is exactly what operators run);
4. produce envelope-encrypted fake events to ``orders`` and ``logins``;
5. consume every sanitized topic with the subscriber SDK until all outputs exist;
6. show, per source, the producer's record beside what each audience received, matched
   through the provenance headers; show dead letters and a few live metrics;
6b. the consent scene (:mod:`streamproc.cli.demo_consent`): a customer withdraws consent
   mid-stream and their later orders are missing from analytics only;
6c. the erasure scene (:mod:`streamproc.cli.demo_erasure`): a customer is forgotten
   mid-stream (``streamproc forget``) and their fraud values no longer re-identify;
7. SIGTERM the worker (it drains and commits) and stop the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from streamproc import demo as d
from streamproc.devbroker import DevBroker, free_port


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


#: The sample names the demo sums up after its run.  A name that is not exported would
#: silently vanish from the summary (``if k in m``), so a unit test checks them against a
#: real exposition.
SUMMARY_METRICS = (
    "streamproc_records_consumed_total",
    "streamproc_decryptions_total",
    "streamproc_egress_records_total",
    "streamproc_dead_letters_total",
    "streamproc_transactions_total",
    "streamproc_kms_calls_total",
    "streamproc_anomalies_total",
)


#: Sum each metric family over its labels (enough for a short summary).
_scrape = d.scrape_metrics


def run_kafka_demo(console: Console, ws: d.Workspace, events: int, show_n: int, seed: int, keep_running: bool) -> None:
    from confluent_kafka import Consumer, Producer

    from streamproc.client import RecordOpener, RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.config import load_config
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.provenance import from_headers, resolve_reference
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.runtime.topics import apply_topics
    from streamproc.schema.registry import build_schema_source

    worker: subprocess.Popen[bytes] | None = None
    broker = DevBroker(log_path=ws.root / "broker.log")
    try:
        with console.status("starting the local Kafka-compatible broker (Tansu)…"):
            broker.start()
        console.print(f"[green]✓[/] broker on {broker.bootstrap} (log {broker.log_path})")
        metrics_port = free_port()
        config_path = ws.write_config(broker.bootstrap, metrics_port)
        config = load_config(config_path)
        with console.status("creating topics…"):
            created = apply_topics(config)
        console.print(f"[green]✓[/] {len(created)} topics: {', '.join(sorted(t.topic for t in created))}")

        log_file = open(ws.root / "worker.log", "wb")  # noqa: SIM115 - owned by the child
        worker = subprocess.Popen(
            [sys.executable, "-m", "streamproc.cli.main", "run", "--config", str(config_path)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log_file.close()
        console.print(f"[green]✓[/] processor started (pid {worker.pid}, log {ws.root / 'worker.log'}); "
                      f"metrics on http://127.0.0.1:{metrics_port}/metrics")

        kms = LocalKeyring(ws.keyring)
        pkeys = PseudonymKeys(kms, d.PSEUDONYM_SECRET)
        prov_keys = {a: pkeys.provenance_key(a)[1] for a in d.AUDIENCES}
        schemas = build_schema_source(str(ws.schemas))
        gen = EventGenerator(seed)
        quiet = {"log.connection.close": False}  # the broker stops before our clients are collected
        producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 5, **quiet})
        sent: dict[tuple[str, int, int], bytes] = {}
        with _progress(console) as prog:
            for topic, (schema_file, kek, kind) in d.SOURCES.items():
                sealer = RecordSealer(kms, kek, topic, json.loads((ws.schemas / schema_file).read_text()), schemas)
                task = prog.add_task(f"producing sealed {topic}", total=events)
                for rec in gen.events(kind, events):
                    sealed = sealer.seal(rec)

                    def on_delivery(err: Any, msg: Any, sealed: bytes = sealed, task: Any = task) -> None:
                        if err is None:
                            sent[(msg.topic(), msg.partition(), msg.offset())] = sealed
                            prog.advance(task)

                    producer.produce(topic, sealed, rec["customer_id"].encode(), on_delivery=on_delivery)
                    producer.poll(0)
                producer.flush(30)
            # Two bad records, to show that bad input is never lost and never crashes anything.
            tampered = bytearray(sent[min(r for r in sent if r[0] == "orders")])
            tampered[-1] ^= 0x01
            producer.produce("orders", bytes(tampered), b"bad-1")
            producer.produce("orders", b"not an envelope at all", b"bad-2")
            producer.flush(30)
            if len(sent) != events * len(d.SOURCES):
                raise RuntimeError(f"only {len(sent)} of {events * len(d.SOURCES)} events were acknowledged")

            # Consume every sanitized topic until each source record has all its outputs.
            opener = RecordOpener(kms, schemas)
            dests = [dst["topic"] for p in ws.pipelines() for dst in p["destinations"]]
            dlqs = [p["dead_letter_topic"] for p in ws.pipelines()]
            consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"demo-reader-{os.getpid()}",
                                 "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                 "isolation.level": "read_committed", "session.timeout.ms": 6000, **quiet})
            consumer.subscribe(dests + dlqs)
            expected = len(sent) * len(d.AUDIENCES)
            task = prog.add_task("processor sanitizing → subscribers reading", total=expected)
            received: dict[tuple[str, int, int], dict[str, Any]] = {}
            seen: set[tuple[str, int, int]] = set()
            dead: dict[str, int] = {}
            deadline = time.monotonic() + 120
            while (len(seen) < expected or sum(dead.values()) < 2) and time.monotonic() < deadline:
                if worker.poll() is not None:
                    raise RuntimeError(f"the processor exited with {worker.returncode}; see {ws.root / 'worker.log'}")
                for msg in consumer.consume(500, 0.5):
                    mtopic, value = msg.topic(), msg.value()
                    if msg.error() or mtopic is None or value is None:
                        continue
                    h: dict[str, bytes] = {}
                    for pair in msg.headers() or []:
                        h[str(pair[0])] = pair[1] if isinstance(pair[1], bytes) else b""
                    if mtopic in dlqs:
                        reason = h.get("streamproc.dlq.reason", b"?").decode()
                        dead[reason] = dead.get(reason, 0) + 1
                        continue
                    src, audience = mtopic.rsplit(".", 1)
                    # Lineage through the audience-keyed reference (the demo holds the master).
                    prov = from_headers(list(h.items()))
                    assert prov.ref is not None
                    ref = resolve_reference(prov_keys[audience], prov.ref, [src])
                    out_ref = (mtopic, ref[1], ref[2])
                    if out_ref in seen:
                        continue  # a duplicate would be visible here; none is expected
                    seen.add(out_ref)
                    received.setdefault(ref, {})[audience] = opener.decode(mtopic, value)
                    prog.advance(task)
            consumer.close()
        if len(seen) < expected:
            raise RuntimeError(f"timed out: {len(seen)} of {expected} sanitized records arrived")

        console.print(f"[green]✓[/] {len(sent)} sealed events → {len(seen)} sanitized records for "
                      f"{len(d.AUDIENCES)} audiences")
        console.print(f"[green]✓[/] dead-letter topics hold the 2 bad records with their original bytes: "
                      f"{', '.join(f'{k}={v}' for k, v in sorted(dead.items()))}\n")
        for topic in d.SOURCES:
            refs = sorted(r for r in sent if r[0] == topic)[:show_n]
            for ref in refs:
                # "Before" is the sealed source record opened with the source key.
                before = opener.decode(topic, sent[ref])
                afters = {a: received[ref][a] for a in d.AUDIENCES}
                d.show(console, f"{topic} partition {ref[1]} offset {ref[2]}", before, afters)

        m = _scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        if m:
            summary = ", ".join(f"{k.removeprefix('streamproc_')}={m[k]:g}" for k in SUMMARY_METRICS if k in m)
            console.print(f"metrics (http://127.0.0.1:{metrics_port}/metrics): {summary}")
        for audience, gauges in d.scrape_risk(f"http://127.0.0.1:{metrics_port}/metrics").items():
            console.print(d.risk_line(audience, gauges))
        from streamproc.cli.demo_consent import run_consent_scene

        run_consent_scene(console, ws, broker.bootstrap, seed)  # a withdrawal mid-stream
        from streamproc.cli.demo_erasure import run_erasure_scene

        run_erasure_scene(console, ws, broker.bootstrap, seed)  # a subject forgotten mid-stream
        if keep_running:
            console.print("[bold]running[/]: broker, processor and metrics stay up; Ctrl-C to stop.")
            try:
                while worker.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        if worker is not None and worker.poll() is None:
            with console.status("stopping the processor (SIGTERM: drain and commit)…"):
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            console.print(f"[green]✓[/] processor stopped (exit {worker.returncode})")
        broker.stop()
        console.print("[green]✓[/] broker stopped")
