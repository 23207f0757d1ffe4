"""``streamproc consume`` on a real broker: to the end without ``--max``, ``--follow``,
the subscriber config, and the refusal to open source topics unless audited.

Sanitized topics are filled directly (sealed under the audience's KEK with the
``streamproc.prov`` header naming the audience, through a transactional producer like the processor's,
so the end of each partition is a commit marker) -- the worker is not needed to test
the reader.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.audit import read_lines, verify
from streamproc.cli.consume import consume
from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.provenance import H_PROVENANCE, header_prefix
from tests.integration.conftest import produce_events

pytestmark = pytest.mark.integration


def fill_sanitized(ws: Any, topic: str, audience: str, n: int, *, seed: int = 3) -> list[dict[str, Any]]:
    """``n`` orders sealed for ``topic`` under the audience's KEK, in one transaction."""
    from confluent_kafka import Producer

    sealer = RecordSealer(ws.kms(), f"{audience}-kek", topic, ws.schema_json("orders"), ws.schema_source())
    recs = list(EventGenerator(seed).events("order", n, False))
    p = Producer({"bootstrap.servers": ws.bootstrap, "transactional.id": f"fill-{uuid.uuid4().hex[:8]}"})
    p.init_transactions(30)
    p.begin_transaction()
    for r, v in zip(recs, sealer.seal_many(recs), strict=True):
        p.produce(topic, key=r["customer_id"].encode(), value=v, headers=[(H_PROVENANCE, header_prefix(audience, "sha256:0", None, None))])
        p.poll(0)
    p.commit_transaction(30)
    return recs


def subscriber_config(ws: Any, **extra: Any) -> Path:
    path = ws.root / "subscriber.yaml"
    cfg = {
        "kafka": {"bootstrap.servers": ws.bootstrap},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "audience": "analytics",
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]


def test_without_max_reads_to_the_end_of_every_partition(workspace_factory: Any) -> None:
    """1,200 records over 3 partitions: all of them (not 500), exit 0, and the count on stderr."""
    ws = workspace_factory(sources=("orders",), partitions=3)
    dest = ws.dest("orders", "analytics")
    sent = fill_sanitized(ws, dest, "analytics", 1200)
    res = CliRunner().invoke(consume, ["--config", str(ws.config_path), "--topic", dest])
    assert res.exit_code == 0, res.output
    got = records(res.stdout)
    assert len(got) == 1200 and all("error" not in r for r in got)
    assert sorted(r["value"]["order_id"] for r in got) == sorted(r["order_id"] for r in sent)
    assert "1200 records from" in res.stderr and "to the end of every partition" in res.stderr


def test_max_and_from_end(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    dest = ws.dest("orders", "analytics")
    fill_sanitized(ws, dest, "analytics", 20)
    res = CliRunner().invoke(consume, ["--config", str(ws.config_path), "--topic", dest, "--max", "7"])
    assert res.exit_code == 0, res.output
    assert [r["offset"] for r in records(res.stdout)] == list(range(7))
    assert "stopped at --max 7" in res.stderr
    res = CliRunner().invoke(consume, ["--config", str(ws.config_path), "--topic", dest, "--from-end"])
    assert res.exit_code == 0 and records(res.stdout) == []


def test_follow_prints_records_produced_later(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    dest = ws.dest("orders", "analytics")
    fill_sanitized(ws, dest, "analytics", 5, seed=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamproc.cli.main", "consume", "--config", str(ws.config_path),
         "--topic", dest, "--follow", "--max", "12", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(5)]  # the old ones, then waits
        assert [r["offset"] for r in first] == list(range(5))
        later = fill_sanitized(ws, dest, "analytics", 7, seed=2)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = records(out)
    assert proc.returncode == 0, err
    assert [r["value"]["order_id"] for r in rest] == [r["order_id"] for r in later]
    assert "12 records from" in err


def test_source_topic_is_refused_without_incident_response(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    produce_events(ws, "orders", 3, canary=True)
    for topic in (ws.topic("orders"), ws.dlq("orders")):
        res = CliRunner().invoke(consume, ["--config", str(ws.config_path), "--topic", topic])
        assert res.exit_code == 1, res.output
        assert "--incident-response" in res.output and records(res.stdout) == []
    assert "source topic" in CliRunner().invoke(
        consume, ["--config", str(ws.config_path), "--topic", ws.topic("orders")]).output
    # --reason alone, or the flag without a reason, is a usage error.
    res = CliRunner().invoke(consume, ["--config", str(ws.config_path), "--topic", ws.topic("orders"),
                                       "--incident-response"])
    assert res.exit_code == 2 and "--reason" in res.output


def test_incident_response_read_is_audited(workspace_factory: Any, tmp_path: Path) -> None:
    audit_file = tmp_path / "audit" / "processor.jsonl"
    ws = workspace_factory(sources=("orders",), partitions=1, extra={"audit": {"file": str(audit_file)}})
    produce_events(ws, "orders", 4)
    args = ["--config", str(ws.config_path), "--topic", ws.topic("orders"), "--incident-response",
            "--reason", "INC-4711"]
    res = CliRunner().invoke(consume, args)
    assert res.exit_code == 0, res.output
    assert len(records(res.stdout)) == 4 and all("value" in r for r in records(res.stdout))
    trail = audit_file.with_name("processor-tools.jsonl")  # the operator tools' chain
    assert verify(read_lines(trail)).ok
    events = [json.loads(line) for line in trail.read_text().splitlines()]
    reads = [e for e in events if e.get("type") == "source_topic_read"]
    assert len(reads) == 2
    assert all(e["attrs"]["topic"] == ws.topic("orders") and e["attrs"]["reason"] == "INC-4711" for e in reads)
    assert "count" not in reads[0]["attrs"] and reads[1]["attrs"]["count"] == 4
    assert reads[0]["actor"] == pwd.getpwuid(os.getuid()).pw_name  # who ran it, not who typed


def test_incident_response_without_an_audit_trail_is_refused(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    produce_events(ws, "orders", 2, canary=True)
    res = CliRunner().invoke(consume, ["--config", str(ws.config_path), "--topic", ws.topic("orders"),
                                       "--incident-response", "--reason", "INC-1"])
    assert res.exit_code == 1 and "audit" in res.output
    assert records(res.stdout) == []


def test_subscriber_config_reads_its_audience_and_refuses_the_rest(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    dest = ws.dest("orders", "analytics")
    fill_sanitized(ws, dest, "analytics", 6)
    produce_events(ws, "orders", 3, canary=True)
    sub = subscriber_config(ws)
    res = CliRunner().invoke(consume, ["--config", str(sub), "--topic", dest])
    assert res.exit_code == 0, res.output
    assert len(records(res.stdout)) == 6
    # A source topic: its records carry no audience header and are never opened.
    res = CliRunner().invoke(consume, ["--config", str(sub), "--topic", ws.topic("orders")])
    assert res.exit_code == 1 and records(res.stdout) == []
    assert "not a sanitized record" in res.output and "CANARY" not in res.output
    # With topics: listed, anything else is refused before connecting.
    sub = subscriber_config(ws, topics=[dest])
    res = CliRunner().invoke(consume, ["--config", str(sub), "--topic", ws.dest("orders", "fraud")])
    assert res.exit_code == 1 and "not one of the subscriber config's topics" in res.output
    res = CliRunner().invoke(consume, ["--config", str(sub), "--topic", ws.topic("orders"),
                                       "--incident-response", "--reason", "INC-2"])
    assert res.exit_code == 1 and "processor config" in res.output

