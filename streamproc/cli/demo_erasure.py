"""The demo's erasure scenes: a forgotten subject's values are no longer reversible.

:func:`erasure_scene` runs in memory (``streamproc demo --in-process``);
:func:`run_erasure_scene` runs on the broker (``streamproc demo``): a worker process with
the subject-key topic, ``streamproc forget`` as an operator runs it, and re-identification
through the audited path against what the key topic holds.

Fraud's e-mail rule becomes ``erasable: true`` (subject ``customer_id``) in a copy of the
example policy; the subject-key table is in memory here (a worker reads and writes the
compacted subject-key topic, docs/governance.md).  Two subjects place an order; both
fraud values re-identify through the audited path; one subject is forgotten with the
records ``streamproc forget`` writes (the forgotten marker and a shred record over each of
their keys); then the forgotten subject's value fails with ``subject_forgotten``, the other
still re-identifies, and the forgotten subject's next order is withheld from fraud.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streamproc import demo as d
from streamproc.cli.demo_scene import TP, SceneProcess, outputs, produce_orders

#: The subject-key KEK of the fraud audience in the demo keyring (``erasure.keks``).
FRAUD_SUBJECT_KEK = "fraud-subject-kek"
KEY_TOPIC = "streamproc.subject-keys"


def erasable_policy(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The example policy with fraud's e-mail ``erasable`` (``None`` for a custom policy)."""
    fraud = (raw.get("audiences") or {}).get("fraud")
    if not isinstance(fraud, dict) or not isinstance(fraud.get("tags"), dict) or "EMAIL" not in fraud["tags"]:
        return None
    rule = fraud["tags"]["EMAIL"]
    if not isinstance(rule, dict) or rule.get("op") != "encrypt_deterministic":
        return None
    fraud["subject"] = "customer_id"
    fraud["tags"]["EMAIL"] = {**rule, "erasable": True}
    return raw


def erasure_scene(console: Console, ws: d.Workspace, kms: Any, schemas: Any, seed: int) -> None:
    import yaml

    from streamproc.audit import AuditLog, MemorySink
    from streamproc.client import RecordOpener, RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto import erasure
    from streamproc.crypto.envelope import Opener, Sealer
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
    from streamproc.policy.model import parse_policy
    from streamproc.reid import AudienceKey, Reidentifier, SubjectForgottenError

    raw = erasable_policy(yaml.safe_load(ws.policy.read_text()))
    if raw is None:
        return  # a custom policy: the scene is written for the example one
    policy = parse_policy(raw, str(ws.policy))
    kms.ensure_key(FRAUD_SUBJECT_KEK)
    keys = PseudonymKeys(kms, d.PSEUDONYM_SECRET)
    key_opener = Opener.for_kms(kms)

    def open_key(sealed: bytes) -> bytes:
        return key_opener.open_parts(KEY_TOPIC, sealed)[0]

    table = erasure.SubjectKeyTable(
        keys, topic=KEY_TOPIC, sealers={"fraud": Sealer(kms, FRAUD_SUBJECT_KEK, KEY_TOPIC)}, open_envelope=open_key
    )
    pipeline = Pipeline(
        routes=build_routes(ws.pipelines()), policy=policy,
        opener=Opener.for_kms(kms), kms=kms, schemas=schemas, keys=keys,
    )  # fmt: skip
    pipeline.erasure = table
    topic = "orders"
    schema_file, kek, _ = d.SOURCES[topic]
    sealer = RecordSealer(kms, kek, topic, json.loads((ws.schemas / schema_file).read_text()), schemas)
    opener = RecordOpener(kms, schemas)
    directory = erasure.KeyDirectory()  # what the key topic holds, as `reidentify` reads it
    sink = MemorySink()
    reid = Reidentifier(
        AudienceKey("fraud", keys.primary_version, keys.siv_key("fraud")[1]), AuditLog([sink], stream="demo"),
        policy, subject_keys=lambda aud, kid: directory.resolve(aud, kid, open_key),
    )  # fmt: skip

    def run(offset: int, rec: dict[str, Any]) -> dict[str, Any]:
        result = pipeline.process([InputRecord(topic, 0, offset, rec["customer_id"].encode(), sealer.seal(rec))])
        for w in result.state_writes:  # the batch's key records, as its transaction writes them
            directory.apply(w.key, w.value)
            table.apply(w.key, w.value)
        table.committed(0)
        out = {a: o for a in d.AUDIENCES for o in result.outputs if o.topic == d.dest_topic(topic, a)}
        return {"fraud": opener.decode(d.dest_topic(topic, "fraud"), out["fraud"].value or b"") if "fraud" in out else None,
                "got": sorted(out), "withheld": sorted(result.stats.withheld)}

    def reveal(value: str) -> str:
        try:
            return "re-identified: " + reid.reidentify(value, "EMAIL", actor="demo", field="email", reason="DEMO-1 scene")
        except SubjectForgottenError as exc:
            return f"[red]{exc.reason}[/]: not reversible"

    gen = EventGenerator(seed + 2)
    forgotten, stays = gen.order(), gen.order()
    console.print(
        "[bold]erasure by crypto-shredding[/]: fraud's e-mail is encrypt_deterministic with erasable: true -- "
        "each subject's values under the subject's own key, kept sealed in the subject-key topic"
    )
    values = {}
    for i, rec in enumerate((forgotten, stays)):
        got = run(i, rec)
        values[rec["customer_id"]] = got["fraud"]["email"]
        console.print(f"  subject {rec['customer_id']}: fraud gets email {got['fraud']['email'][:40]}... -> {reveal(got['fraud']['email'])}")
    subject = forgotten["customer_id"]
    token = erasure.subject_tokens(keys, subject.encode(), [keys.primary_version])[keys.primary_version]
    now = int(time.time() * 1000)
    shredded = [r for r in directory.keys.values() if r.token == token]
    written = [(erasure.record_key(token, erasure.MARKER), erasure.marker_value(now))]
    written += [(erasure.record_key(r.token, r.suffix), erasure.shred_value(r.audience or "-", now)) for r in shredded]
    for k, v in written:  # what `streamproc forget` writes, read back by the worker and the tools
        directory.apply(k, v)
        table.apply(k, v)
    console.print(f"  [bold]streamproc forget {subject}[/]: forgotten marker + {len(shredded)} shred record(s) in {KEY_TOPIC}")
    for rec in (forgotten, stays):
        console.print(f"  subject {rec['customer_id']}: the same fraud value as before -> {reveal(values[rec['customer_id']])}")
    again = gen.order()
    again["customer_id"] = subject
    got = run(2, again)
    why = ", ".join(f"{a}: {r}" for a, r in got["withheld"])
    console.print(f"  a new order of {subject}: delivered to {', '.join(got['got'])}; withheld ({why})")
    console.print(
        "[dim]once compaction removes the old key record, nothing the processor ever output for the subject's "
        "erasable fields can be reversed by anyone; tokens are one-way and stay (docs/governance.md)[/]\n"
    )


SOURCE = "erase.orders"


@dataclass
class ErasureSceneResult:
    """What the broker scene saw (for the summary table and the tests)."""

    forgotten: str
    kept: str
    #: Source (topic, partition, offset) -> (subject, phase "before" | "after", e-mail produced).
    sent: dict[TP, tuple[str, str, str]] = field(default_factory=dict)
    #: Audience -> source reference -> the e-mail field as that audience received it.
    received: dict[str, dict[TP, str]] = field(default_factory=dict)
    #: Subject -> outcome of re-identifying one of their fraud values, before / after the forget.
    reid_before: dict[str, str] = field(default_factory=dict)
    reid_after: dict[str, str] = field(default_factory=dict)
    forget_output: str = ""

    def refs(self, subject: str, phase: str) -> set[TP]:
        return {r for r, (s, p, _) in self.sent.items() if s == subject and p == phase}


def _scene_config(ws: d.Workspace, bootstrap: str, policy: Path, suffix: str) -> Path:
    source = SOURCE + suffix
    cfg = {
        "kafka": {"bootstrap.servers": bootstrap},
        "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        "group_id": f"streamproc-demo-erasure{suffix}",
        "processing_guarantee": "exactly_once",
        "batch": {"max_records": 50, "max_wait_ms": 50},
        "schemas": {"directory": str(ws.schemas)},
        "kms": {"provider": "local", "path": str(ws.keyring)},
        "policy": str(policy),
        "pipelines": [{
            "sources": [source],
            "dead_letter_topic": d.dead_letter_topic(source),
            "destinations": [{"topic": d.dest_topic(source, a), "audience": a, "kek": f"{a}-kek"} for a in d.AUDIENCES],
        }],
        "erasure": {"topic": KEY_TOPIC + suffix, "keks": {"fraud": FRAUD_SUBJECT_KEK}},
        "audit": {"file": str(ws.root / f"audit-erasure{suffix}" / "processor.jsonl")},  # forget is audited
        "topics": {"defaults": {"partitions": 1, "replication_factor": 1}},
        "metrics": {"enabled": False},
        "logging": {"level": "INFO", "format": "json"},  # the scene reads when the table applied the forget
    }  # fmt: skip
    path = ws.root / f"streamproc-erasure{suffix}.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML
    return path


def _applied_since(worker: SceneProcess, since: float, count: int) -> bool:
    """The worker's subject-key table applied ``count`` records after ``since`` (epoch s)."""
    import datetime as dt

    n = 0
    for e in worker.log_events("subject-key updates applied"):
        if not isinstance(e.get("count"), int):
            continue
        when = dt.datetime.fromisoformat(str(e.get("ts", "")).replace("Z", "+00:00")).timestamp()
        if when >= since:
            n += e["count"]
    return n >= count


def run_erasure_scene(
    console: Console, ws: d.Workspace, bootstrap: str, seed: int, *, per_phase: int = 4,
    suffix: str = "", timeout: float = 90.0,
) -> ErasureSceneResult | None:  # fmt: skip
    """The scene on the broker at ``bootstrap`` (see the module docstring); ``None`` when
    the workspace's policy is not the example one."""
    import yaml
    from confluent_kafka import Consumer, Producer

    from streamproc.audit import AuditLog, MemorySink
    from streamproc.client import RecordOpener, RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.config import load_config
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.reid import AudienceKey, Reidentifier, SubjectForgottenError
    from streamproc.runtime.erasure import key_opener, read_key_directory
    from streamproc.runtime.topics import apply_topics
    from streamproc.schema.registry import build_schema_source

    raw = erasable_policy(yaml.safe_load(ws.policy.read_text()))
    if raw is None:
        console.print("[dim]erasure scene skipped: it is written for the example policy's fraud audience[/]")
        return None
    source = SOURCE + suffix
    policy_path = ws.root / f"policy-erasure{suffix}.yaml"
    policy_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    kms = LocalKeyring(ws.keyring)
    kms.ensure_key(FRAUD_SUBJECT_KEK)
    config_path = _scene_config(ws, bootstrap, policy_path, suffix)
    config = load_config(config_path)
    apply_topics(config)
    keys = PseudonymKeys(kms, d.PSEUDONYM_SECRET)
    prov_keys = {a: keys.provenance_key(a)[1] for a in d.AUDIENCES}
    schemas = build_schema_source(str(ws.schemas))
    opener = RecordOpener(kms, schemas)
    schema_file, kek, _ = d.SOURCES["orders"]
    sealer = RecordSealer(kms, kek, source, json.loads((ws.schemas / schema_file).read_text()), schemas)
    gen = EventGenerator(seed + 3)
    forgotten = gen.order()["customer_id"]
    kept = next(c for c in (gen.order()["customer_id"] for _ in range(100)) if c != forgotten)
    result = ErasureSceneResult(forgotten, kept, received={a: {} for a in d.AUDIENCES})
    policy = config.load_policy()
    fraud_key = AudienceKey("fraud", keys.primary_version, keys.siv_key("fraud")[1])
    open_key = key_opener(kms, config.erasure.topic if config.erasure else "")

    def reveal(value: str) -> str:
        directory = read_key_directory(config)  # what the key topic holds now
        reid = Reidentifier(fraud_key, AuditLog([MemorySink()], stream="demo"), policy,
                            subject_keys=lambda aud, kid: directory.resolve(aud, kid, open_key))  # fmt: skip
        try:
            return reid.reidentify(value, "EMAIL", actor="demo", field="email", reason="DEMO-1 erasure scene")
        except SubjectForgottenError as exc:
            return exc.reason

    console.print(
        "\n[bold]erasure scene[/]: fraud's e-mail is erasable (each customer's own key, sealed in "
        f"{config.erasure.topic if config.erasure else ''})"
    )
    quiet = {"log.connection.close": False}
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, **quiet})
    dests = {d.dest_topic(source, a): a for a in d.AUDIENCES}
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"demo-erasure-reader-{os.getpid()}{suffix}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "isolation.level": "read_committed", "session.timeout.ms": 6000, **quiet,
    })  # fmt: skip
    log_path = ws.root / f"worker-erasure{suffix}.log"
    worker: SceneProcess | None = None

    def produce(phase: str) -> None:
        def sent(ref: TP, subject: str, rec: dict[str, Any]) -> None:
            result.sent[ref] = (subject, phase, rec["email"])

        produce_orders("erasure", producer, sealer, gen, source, (forgotten, kept), per_phase, sent)

    def complete(phase: str) -> Callable[[], bool]:
        # analytics has no erasable rule: once it has a record, fraud has it or never will
        # (one transaction per batch).
        def check() -> bool:
            for audience, ref, msg in outputs(consumer, dests, prov_keys, source):
                result.received[audience][ref] = str(opener.decode(msg.topic(), msg.value()).get("email"))
            want = {r for r, (_, p, _) in result.sent.items() if p == phase}
            return want <= set(result.received["analytics"])

        return check

    try:
        worker = SceneProcess("erasure", config_path, log_path)
        consumer.subscribe(list(dests))
        produce("before")
        worker.wait("the orders before the forget", complete("before"), timeout)
        for subject in (forgotten, kept):
            value = next(result.received["fraud"][r] for r in sorted(result.refs(subject, "before")))
            result.reid_before[subject] = reveal(value)
        console.print("[green]✓[/] fraud's values of both customers re-identify (audited path, key from the key topic)")
        since = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "streamproc.cli.main", "forget", forgotten, "--config", str(config_path),
             "--reason", "DEMO-1 erasure request"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"erasure scene: streamproc forget failed: {r.stderr.strip()}")
        result.forget_output = r.stdout
        console.print(f"[green]✓[/] streamproc forget {forgotten} --reason ...:")
        for line in r.stdout.strip().splitlines():
            console.print(f"    {line}")
        shredded = int(r.stdout.split(" key(s) shredded")[0].rsplit(" ", 1)[1]) if " key(s) shredded" in r.stdout else 0
        w = worker
        worker.wait("the worker to apply the forget", lambda: _applied_since(w, since, 1 + shredded), timeout)
        produce("after")
        worker.wait("the orders after the forget", complete("after"), timeout)
        for subject in (forgotten, kept):
            value = next(result.received["fraud"][r] for r in sorted(result.refs(subject, "before")))
            result.reid_after[subject] = reveal(value)
    finally:
        consumer.close()
        if worker is not None:
            worker.stop()
    console.print(erasure_table(result))
    console.print(
        "[dim]re-identify: one of the customer's fraud values from before the forget, through the audited "
        "path. Once compaction removes the old key record (docs/governance.md: the bound), no key left "
        "anywhere opens the forgotten customer's values.[/]\n"
    )
    return result


def erasure_table(r: ErasureSceneResult) -> Table:
    """Per customer and phase: orders fraud / analytics received, and re-identification."""
    table = Table(
        title=f"erasure: {r.forgotten} forgotten mid-stream (streamproc forget)", header_style="bold",
        title_justify="left",
    )  # fmt: skip
    for col in ("customer", "phase", "fraud (erasable)", "analytics", "re-identify fraud value"):
        table.add_column(col, no_wrap=True)
    for subject in (r.forgotten, r.kept):
        for phase, reid in (("before", r.reid_before), ("after", r.reid_after)):
            refs = r.refs(subject, phase)
            fraud = len(refs & set(r.received["fraud"]))
            analytics = len(refs & set(r.received["analytics"]))
            outcome = reid.get(subject, "")
            shown = "subject_forgotten" if outcome == "subject_forgotten" else ("ok" if outcome else "")
            table.add_row(
                subject, phase, f"{fraud}/{len(refs)}" + (" withheld" if fraud < len(refs) else ""),
                f"{analytics}/{len(refs)}", shown,
            )  # fmt: skip
    return table


__all__ = ["ErasureSceneResult", "erasable_policy", "erasure_scene", "erasure_table", "run_erasure_scene"]
