"""``streamproc dlq inspect`` and ``streamproc dlq replay`` against a real worker and broker:
records dead-lettered for an unknown schema are opened (audited) by incident response,
then -- once the schema is registered -- replayed to their source exactly once, and the
processor turns them into sanitized outputs."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.audit import verify_file
from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.schema.registry import build_schema_source
from tests.integration.conftest import (
    REPO,
    WorkerProcess,
    produce_events,
    produce_raw,
    read_topics,
)

pytestmark = pytest.mark.integration


def dlq_cli(ws: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", "dlq", *args, "--config", str(ws.config_path),
         "--topic", ws.dlq("orders"), "--actor", "INC-77", "--reason", "INC-77 schema missing"],
        capture_output=True, text=True, cwd=str(REPO), timeout=120, check=False,
    )  # fmt: skip


def test_inspect_then_replay_after_the_schema_is_registered(
    workspace_factory: Any, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    ws = workspace_factory(
        sources=("orders",), partitions=1, extra={"audit": {"file": "./audit/processor.jsonl"}}
    )
    tools_log = ws.root / "audit" / "processor-tools.jsonl"  # the operator tools' chain
    # A producer seals logins under a schema the processor's registry does not have yet.
    extra = tmp_path / "producer-schemas"
    extra.mkdir()
    login_schema = json.loads((REPO / "schemas" / "login.avsc").read_text())
    sealer = RecordSealer(
        ws.kms(), "orders-kek", ws.topic("orders"), login_schema, build_schema_source({"directory": str(extra)})
    )
    logins = list(EventGenerator(8).events("login", 3))
    bad = produce_raw(
        ws.bootstrap,
        ws.topic("orders"),
        [(r["customer_id"].encode(), v, r) for r, v in zip(logins, sealer.seal_many(logins), strict=True)],
        headers=[("trace-id", b"t-9")],
    )
    good = produce_events(ws, "orders", 5, seed=81)
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned()
    dest, dlq = ws.dest("orders", "analytics"), ws.dlq("orders")
    out = read_topics(ws.bootstrap, [dest, dlq], until=lambda r: len(r[dest]) >= 5 and len(r[dlq]) >= 3)
    assert len(out[dlq]) == 3 and len(out[dest]) == 5, w.log()[-2000:]

    # -- inspect: the originals, opened with the quarantine KEK, one audit event each
    r = dlq_cli(ws, "inspect")
    assert r.returncode == 0, r.stderr
    shown = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(shown) == 3 and "3 dead letter(s) shown" in r.stderr
    by_offset = {s["source"]["offset"]: s for s in shown}
    for (part, off), rec in bad.records.items():
        s = by_offset[off]
        assert s["reason"] == "unknown_schema" and s["source"]["partition"] == part
        assert base64.b64decode(s["key"]) == rec["customer_id"].encode()
        assert base64.b64decode(s["value"]) == bad.values[(part, off)]
        assert s["headers"] == [["trace-id", base64.b64encode(b"t-9").decode()]]
        assert s["value_envelope"]["kek_id"] == "orders-kek"
    events = [json.loads(x) for x in tools_log.read_text().splitlines()]
    inspected = [e for e in events if e["type"] == "dead_letter_inspected"]
    # The actor is the authenticated identity (here the OS user); --actor is a note beside it.
    assert len(inspected) == 3 and len({e["actor"] for e in inspected}) == 1
    assert {e["attrs"]["reason"] for e in inspected} == {"INC-77 schema missing"}
    assert {e["attrs"]["subject"] for e in inspected} == {f"{dlq}:0:{o}" for o in range(3)}
    # ... and no audit trail, no plaintext: the same command with a config without audit:
    cfg = yaml.safe_load(ws.config_path.read_text())
    del cfg["audit"]
    unaudited = ws.root / "unaudited.yaml"
    unaudited.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", "dlq", "inspect", "--config", str(unaudited),
         "--topic", dlq, "--reason", "curious"],
        capture_output=True, text=True, cwd=str(REPO), timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode != 0 and r.stdout == "" and "audit" in r.stderr

    # -- the fix: register the schema; replay re-produces the three records, once
    shutil.copy(REPO / "schemas" / "login.avsc", ws.schemas / "login.avsc")
    # The worker caches "schema not found" for 10 s (CachingSchemaSource.negative_ttl);
    # docs/runbooks.md says to wait that long before replaying.
    time.sleep(10.5)
    r = dlq_cli(ws, "replay", "--to-offset", "2", "--class", "unknown_schema")
    assert r.returncode == 0, r.stderr
    assert "3 dead letter(s) replayed" in r.stderr
    out = read_topics(ws.bootstrap, [dest, ws.topic("orders")], until=lambda r: len(r[dest]) >= 8, timeout=60)
    assert len(out[dest]) == 8, w.log()[-2000:]
    replayed_src = [m for m in out[ws.topic("orders")] if m.header("streamproc.replay.of")]
    assert sorted((m.key, m.value) for m in replayed_src) == sorted(
        (bad.keys[k], bad.values[k]) for k in bad.records
    )
    assert {m.header("trace-id") for m in replayed_src} == {"t-9"}
    # the processor made sanitized outputs of them
    new = {m.source[2] for m in out[dest]} - {o for _, o in good.records}
    assert new == {m.offset for m in replayed_src}
    # running the same replay again re-produces nothing (the group's offset moved with it)
    r = dlq_cli(ws, "replay", "--to-offset", "2")
    assert r.returncode == 0 and "0 dead letter(s) replayed" in r.stderr, r.stderr
    again = read_topics(ws.bootstrap, [ws.topic("orders")], idle=1.0)[ws.topic("orders")]
    assert len([m for m in again if m.header("streamproc.replay.of")]) == 3
    events = [json.loads(x) for x in tools_log.read_text().splitlines()]
    assert len([e for e in events if e["type"] == "dead_letter_replayed"]) == 3
    assert verify_file(tools_log).ok
    w.terminate()
    assert w.wait(30) == 0
