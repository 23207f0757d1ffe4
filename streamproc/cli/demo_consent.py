"""The consent scene of ``streamproc demo`` (Kafka mode): a subject withdraws mid-stream.

Everything is the real thing: the consent policy (three purposes, one per legal basis),
the compacted consent topic, the application's call that writes to it
(:class:`~streamproc.client.consent.ConsentWriter`, what ``streamproc consent withdraw``
runs), and a worker process that restores the consent table and follows it.

1. The scene's own policy, config and topics (``shop.orders`` -> one topic per audience);
   analytics serves ``marketing`` (basis ``consent``), fraud ``fraud_prevention``
   (``legitimate_interest``), support ``service`` (``contract``).
2. Two customers grant ``marketing``; the worker starts (and restores the table).
3. Orders of both stream in; every one reaches all three audiences.
4. One customer withdraws.  The worker logs the consent-topic offset it applied; orders
   produced after that are evaluated after it (docs/governance.md, the ordering bound).
5. More orders of both: the withdrawn customer's are missing from analytics and still
   reach fraud and support; the other customer's reach all three.

Outputs are matched to their source record through the provenance reference (the demo
holds the pseudonym master), so the scene does not depend on which fields a policy keeps.
Kept apart from ``demo_kafka`` so that each scene of the demo is a function of its own.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streamproc import demo as d
from streamproc.cli.demo_scene import TP, SceneProcess, outputs, produce_orders

#: Purpose of each audience and the legal basis of each purpose (the in-process scene's).
AUDIENCE_PURPOSE = {"analytics": "marketing", "fraud": "fraud_prevention", "support": "service"}
PURPOSES = {
    "marketing": {"basis": "consent"},
    "fraud_prevention": {"basis": "legitimate_interest"},
    "service": {"basis": "contract"},
}
SOURCE = "shop.orders"
CONSENT_TOPIC = "shop.consent"

@dataclass
class ConsentSceneResult:
    """What the scene saw: per phase, which source records each audience received."""

    withdrawn: str
    kept: str
    #: Source (topic, partition, offset) -> (subject, phase: "before" | "after").
    sent: dict[TP, tuple[str, str]] = field(default_factory=dict)
    #: Audience -> source references it received.
    received: dict[str, set[TP]] = field(default_factory=dict)
    #: Consent-topic (partition, offset) of the withdrawal.
    withdrawal: tuple[int, int] = (-1, -1)
    #: ``streamproc_consent_withheld_total`` scraped at the end (None: not scraped).
    withheld_metric: float | None = None

    def refs(self, subject: str, phase: str) -> set[TP]:
        return {r for r, (s, p) in self.sent.items() if s == subject and p == phase}


def consent_policy(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The example policy with the scene's purposes, or ``None`` for a policy whose
    audiences are not the example's (the scene is written for the example one)."""
    if set(raw.get("audiences") or {}) != set(AUDIENCE_PURPOSE) or "purposes" in raw:
        return None
    out = copy.deepcopy(raw)
    out["purposes"] = PURPOSES
    for a, p in AUDIENCE_PURPOSE.items():
        out["audiences"][a]["purpose"] = p
    return out


def _write_config(ws: d.Workspace, bootstrap: str, policy: Path, metrics_port: int, suffix: str) -> Path:
    source = SOURCE + suffix
    cfg = {
        "kafka": {"bootstrap.servers": bootstrap},
        "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        "group_id": f"streamproc-demo-consent{suffix}",
        "processing_guarantee": "exactly_once",
        "batch": {"max_records": 50, "max_wait_ms": 50},
        "schemas": {"directory": str(ws.schemas)},
        "kms": {"provider": "local", "path": str(ws.keyring)},
        "policy": str(policy),
        "pipelines": [
            {
                "sources": [source],
                "dead_letter_topic": d.dead_letter_topic(source),
                "destinations": [
                    {"topic": d.dest_topic(source, a), "audience": a, "kek": f"{a}-kek"}
                    for a in d.AUDIENCES
                ],
            }
        ],
        "consent": {"topic": CONSENT_TOPIC + suffix},
        "topics": {"defaults": {"partitions": 1, "replication_factor": 1}},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logging": {"level": "INFO", "format": "json"},  # the scene reads the applied offset
    }
    path = ws.root / f"streamproc-consent{suffix}.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML
    return path


def _applied(worker: SceneProcess, consent_topic: str, partition: int, offset: int) -> bool:
    """The worker logged that its consent table applied ``offset`` (or later)."""
    return any(
        e.get("topic") == consent_topic
        and e.get("partition") == partition
        and isinstance(e.get("offset"), int)
        and e["offset"] >= offset
        for e in worker.log_events("consent updates applied")
    )


def run_consent_scene(
    console: Console, ws: d.Workspace, bootstrap: str, seed: int, *, per_phase: int = 6,
    suffix: str = "", timeout: float = 90.0,
) -> ConsentSceneResult | None:  # fmt: skip
    """Run the scene on the broker at ``bootstrap`` (see the module docstring); ``None``
    when the workspace's policy is not the example one."""
    import yaml
    from confluent_kafka import Consumer, Producer

    from streamproc.client import RecordSealer
    from streamproc.client.consent import ConsentWriter
    from streamproc.client.generator import EventGenerator
    from streamproc.config import load_config
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.devbroker import free_port
    from streamproc.runtime.topics import apply_topics
    from streamproc.schema.registry import build_schema_source

    raw = consent_policy(yaml.safe_load(ws.policy.read_text()))
    if raw is None:
        console.print("[dim]consent scene skipped: it is written for the example policy's audiences[/]")
        return None
    source, consent_topic = SOURCE + suffix, CONSENT_TOPIC + suffix
    policy_path = ws.root / f"policy-consent{suffix}.yaml"
    policy_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    metrics_port = free_port()
    config_path = _write_config(ws, bootstrap, policy_path, metrics_port, suffix)
    apply_topics(load_config(config_path))

    kms = LocalKeyring(ws.keyring)
    keys = PseudonymKeys(kms, d.PSEUDONYM_SECRET)
    prov_keys = {a: keys.provenance_key(a)[1] for a in d.AUDIENCES}
    schemas = build_schema_source(str(ws.schemas))
    schema_file, kek, _ = d.SOURCES["orders"]
    sealer = RecordSealer(kms, kek, source, json.loads((ws.schemas / schema_file).read_text()), schemas)
    gen = EventGenerator(seed + 2)
    withdrawn = gen.order()["customer_id"]
    kept = next(c for c in (gen.order()["customer_id"] for _ in range(100)) if c != withdrawn)
    result = ConsentSceneResult(withdrawn, kept, received={a: set() for a in d.AUDIENCES})

    console.print(
        "\n[bold]consent scene[/]: analytics serves 'marketing' (basis consent), fraud "
        "'fraud_prevention' (legitimate_interest), support 'service' (contract)"
    )
    quiet = {"log.connection.close": False}
    writer = ConsentWriter({"bootstrap.servers": bootstrap, **quiet}, consent_topic, keys, purposes=PURPOSES)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, **quiet})
    dests = {d.dest_topic(source, a): a for a in d.AUDIENCES}
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"demo-consent-reader-{os.getpid()}{suffix}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "isolation.level": "read_committed", "session.timeout.ms": 6000, **quiet,
    })  # fmt: skip
    log_path = ws.root / f"worker-consent{suffix}.log"
    worker: SceneProcess | None = None

    def sent(ref: TP, subject: str, _rec: dict[str, Any], phase: str) -> None:
        result.sent[ref] = (subject, phase)

    def produce(phase: str) -> None:
        produce_orders("consent", producer, sealer, gen, source, (withdrawn, kept), per_phase,
                       lambda ref, subject, rec: sent(ref, subject, rec, phase))  # fmt: skip

    def complete(phase: str) -> Callable[[], bool]:
        # fraud and support (opt-out bases) get every record; analytics is in the same
        # transaction, so once they have a record, analytics has it or never will.
        def check() -> bool:
            for audience, ref, _msg in outputs(consumer, dests, prov_keys, source):
                result.received[audience].add(ref)
            want = {r for r, (_, p) in result.sent.items() if p == phase}
            return want <= result.received["fraud"] and want <= result.received["support"]

        return check

    try:
        for subject in (withdrawn, kept):
            writer.grant(subject, "marketing")
        console.print(f"[green]✓[/] {withdrawn} and {kept} granted 'marketing' (ConsentWriter.grant → {consent_topic})")
        worker = SceneProcess("consent", config_path, log_path)
        consumer.subscribe(list(dests))
        produce("before")
        worker.wait("the orders before the withdrawal", complete("before"), timeout)
        result.withdrawal = writer.withdraw(withdrawn, "marketing")
        console.print(
            f"[green]✓[/] {withdrawn} withdrew 'marketing' mid-stream (ConsentWriter.withdraw, as "
            f"`streamproc consent withdraw --subject {withdrawn} --purpose marketing` does)"
        )
        part, off = result.withdrawal
        w = worker
        worker.wait("the worker to apply the withdrawal", lambda: _applied(w, consent_topic, part, off), timeout)
        produce("after")
        worker.wait("the orders after the withdrawal", complete("after"), timeout)
        result.withheld_metric = _withheld_metric(metrics_port)
    finally:
        consumer.close()
        writer.close()
        if worker is not None:
            worker.stop()
    console.print(consent_table(result))
    console.print(
        "[dim]before / after: produced before the withdrawal / after the worker applied it. "
        "withheld: no output for that audience, no dead letter; counted per audience and reason"
        + (f" (streamproc_consent_withheld_total = {result.withheld_metric:g})" if result.withheld_metric is not None else "")
        + "[/]\n"
    )
    return result


def _withheld_metric(port: int) -> float | None:
    m = d.scrape_metrics(f"http://127.0.0.1:{port}/metrics")
    return m.get("streamproc_consent_withheld_total")


def consent_table(r: ConsentSceneResult) -> Table:
    """Per customer and phase: how many of their orders each audience received."""
    table = Table(
        title=f"orders received per audience ({r.withdrawn} withdrew 'marketing' mid-stream)",
        header_style="bold", title_justify="left",
    )  # fmt: skip
    table.add_column("customer", no_wrap=True)
    table.add_column("orders", no_wrap=True)
    for a in d.AUDIENCES:
        table.add_column(a, no_wrap=True)
    for phase in ("before", "after"):
        for subject in (r.withdrawn, r.kept):
            refs = r.refs(subject, phase)
            cells = []
            for a in d.AUDIENCES:
                n = len(refs & r.received[a])
                style = "green" if n == len(refs) else "red"
                cells.append(f"[{style}]{n}/{len(refs)}" + (" withheld" if n == 0 and refs else "") + "[/]")
            table.add_row(subject, phase, *cells)
    return table
