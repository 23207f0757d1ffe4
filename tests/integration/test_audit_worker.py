"""The processor's audit trail, end to end on a real broker.

A worker runs with ``audit: {file, hmac_key_file, kafka_topic, dead_letter_burst}``; it
meets records under a revoked KEK version among good records, is stopped with SIGTERM,
then restarted and stopped again.  The file must pass ``streamproc audit verify`` (with
the HMAC key) and hold exactly the expected events; the Kafka audit topic must carry the
identical lines and verify per stream.  Also: an audit file that cannot be opened stops
the worker before it consumes anything (exit 1, clear message), and a write failure in
the middle of a run is fatal and commits nothing of the batch it belongs to.

The last section checks the two worker fixes that travel with this work: fatal log lines
are value-free, and ``--workers N`` removes the metrics directory it created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc import __version__
from streamproc.audit import (
    FileSink,
    Head,
    MemorySink,
    head_file_for,
    is_head_record,
    load_hmac_key,
    verify_records,
    write_hmac_key,
)
from streamproc.errors import Reason
from streamproc.policy.model import load_policy
from streamproc.runtime.dlq import H_DLQ_REASON
from streamproc.runtime.topics import apply_topics
from tests.integration.conftest import (
    REPO,
    WorkerProcess,
    Workspace,
    committed_offsets,
    make_workspace,
    produce_events,
    produce_raw,
    read_topics,
)

pytestmark = pytest.mark.integration

GOOD = 30
REVOKED = 4


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=60,
        check=False,
    )


def audit_workspace(root: Path, bootstrap: str, suffix: str, **audit: Any) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    write_hmac_key(root / "audit.key")
    spec = {
        "file": "./audit/processor.jsonl",
        "fsync": "always",
        "hmac_key_file": "./audit.key",
        "kafka_topic": f"streamproc.audit-{suffix}",
        "dead_letter_burst": {"threshold": 3, "window_seconds": 600},
        **audit,
    }
    ws = make_workspace(
        root,
        bootstrap,
        suffix,
        sources=("orders", "logins"),
        partitions=2,
        extra={
            "audit": {k: v for k, v in spec.items() if v is not None},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        },
    )
    apply_topics(ws.load_config())  # the audit topic is part of all_topics()
    return ws


def revoked_orders(ws: Workspace, n: int) -> list[bytes]:
    """Seal ``n`` orders under orders-kek v1, then rotate and revoke v1 with the CLI."""
    from streamproc.client.generator import EventGenerator

    sealer = ws.sealer("orders")
    values = sealer.seal_many(list(EventGenerator(99).events("order", n)))
    for args in (("rotate", "orders-kek"), ("revoke", "orders-kek", "1")):
        r = cli("keys", args[0], "--config", str(ws.config_path), *args[1:])
        assert r.returncode == 0, r.stderr
    return values


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def ws(tmp_path: Path, kafka_bootstrap: str, unique: str) -> Workspace:
    return audit_workspace(tmp_path / "ws", kafka_bootstrap, unique)


def test_worker_audit_trail_verifies_in_file_and_topic(
    ws: Workspace, workers: list[WorkerProcess]
) -> None:
    revoked = revoked_orders(ws, REVOKED)
    good = produce_events(ws, "orders", GOOD, seed=3)  # sealed under v2 now
    logins = produce_events(ws, "logins", GOOD, seed=4)
    bad = produce_raw(ws.bootstrap, ws.topic("orders"), [(b"k", v, None) for v in revoked])

    w = WorkerProcess(ws)
    workers.append(w)
    dest, dlq = ws.dest("orders", "analytics"), ws.dlq("orders")
    out = read_topics(
        ws.bootstrap,
        [dest, ws.dest("logins", "analytics"), dlq],
        until=lambda r: (
            len(r[dest]) >= GOOD
            and len(r[ws.dest("logins", "analytics")]) >= GOOD
            and len(r[dlq]) >= REVOKED
        ),
        timeout=60,
    )
    assert w.alive(), w.log()[-3000:]
    assert len(out[dest]) == len(good.records) == GOOD
    assert len(out[ws.dest("logins", "analytics")]) == len(logins.records)
    assert {r.header(H_DLQ_REASON) for r in out[dlq]} == {Reason.KEY_REVOKED.value}
    assert len(out[dlq]) == len(bad.records)
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]

    config = ws.load_config()
    assert config.audit is not None and config.audit.file is not None
    file = config.audit.file
    key_file = str(config.audit.hmac_key_file)
    r = cli("audit", "verify", str(file), "--hmac-key-file", key_file)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: ")

    evs = events(file)
    types = [e["type"] for e in evs]
    policy = load_policy(ws.policy)
    assert types[:3] == ["chain_started", "policy_loaded", "processor_started"]
    assert evs[0]["attrs"]["integrity"] == "hmac-sha256"  # MACs required from the genesis
    assert types[-1] == "processor_stopped"
    loaded, started, stopped = evs[1], evs[2], evs[-1]
    assert loaded["attrs"]["policy_version"] == policy.version
    assert loaded["attrs"]["policy_name"] == policy.name == "acme-privacy"
    assert loaded["attrs"]["source"] == "policy.yaml"
    assert loaded["attrs"]["audiences"] == list(policy.audiences)
    assert started["attrs"]["processor_version"] == __version__
    assert started["attrs"]["policy_version"] == policy.version
    assert stopped["attrs"]["count"] == 2 * GOOD + REVOKED  # records committed
    seen = [e for e in evs if e["type"] == "key_revocation_seen"]
    assert len(seen) == 1, seen  # deduplicated per key version
    assert seen[0]["attrs"] == {
        "kms": "local",
        "key_id": "orders-kek",
        "version": 1,
        "topic": ws.topic("orders"),
        "partition": seen[0]["attrs"]["partition"],
    }
    burst = [e for e in evs if e["type"] == "dead_letter_burst"]
    assert len(burst) == 1 and burst[0]["attrs"]["reason"] == "key_revoked"
    assert burst[0]["attrs"]["topic"] == ws.topic("orders")
    anomalies = [e for e in evs if e["type"] == "anomaly"]
    assert any(a["attrs"]["kind"] == "revoked_key" for a in anomalies), anomalies
    stream = evs[0]["stream"]
    assert stream.startswith(f"processor:{ws.group_id}-") and stream.endswith("-0")
    assert all(e["stream"] == stream and e["actor"] == stream for e in evs)
    assert all("mac" in e for e in evs)
    # the signed head was exported on shutdown: beside the file, and in the log
    head = Head.from_json(head_file_for(file).read_bytes())
    assert head.seq == evs[-1]["seq"] and head.signed_by(load_hmac_key(key_file))
    assert f"audit head {head}" in w.log()
    # identifiers only: no record value, key or token made it into the trail
    text = file.read_text()
    for v in [*good.records.values(), *logins.records.values()]:
        assert v["customer_id"] not in text and v.get("email", "@@") not in text

    # The key commands wrote key_rotated / key_revoked to the tools' chain first.
    tools = file.with_name(f"{file.stem}-tools{file.suffix}")
    r = cli("audit", "verify", str(tools), "--hmac-key-file", key_file, "--require-hmac")
    assert r.returncode == 0, r.stdout + r.stderr
    ops = [e for e in events(tools) if e["type"] in ("key_rotated", "key_revoked")]
    assert [(e["type"], e["attrs"]["version"], e["attrs"]["outcome"]) for e in ops] == [
        ("key_rotated", 2, "success"),
        ("key_revoked", 1, "success"),
    ]
    assert ops[0]["attrs"]["previous_version"] == 1 and ops[0]["attrs"]["key_id"] == "orders-kek"
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout
    assert {(e["actor"], e["attrs"]["actor_source"]) for e in ops} == {(user.strip(), "os")}

    # A restart continues the same chain, in the file and on the topic.
    w2 = WorkerProcess(ws, name="worker2")
    workers.append(w2)
    w2.wait_assigned()
    w2.terminate()
    assert w2.wait(30) == 0, w2.log()[-3000:]
    again = events(file)
    assert again[: len(evs)] == evs
    assert [e["type"] for e in again[len(evs) :]] == [
        "policy_loaded",
        "processor_started",
        "processor_stopped",
    ]
    assert again[len(evs)]["seq"] == len(evs)
    r = cli(
        "audit",
        "verify",
        str(file),
        "--hmac-key-file",
        key_file,
        "--require-hmac",
        "--expect-head",
        str(head),
    )
    assert r.returncode == 0, r.stdout + r.stderr

    # The Kafka audit topic: the identical lines, one chain per stream, verifying.
    topic = config.audit.kafka_topic
    assert topic is not None
    recs = read_topics(ws.bootstrap, [topic], until=lambda r: len(r[topic]) >= len(again))[topic]
    results = verify_records([(r.key, r.value) for r in recs], hmac_key=load_hmac_key(key_file))
    assert set(results) == {stream, "tools"}  # the key commands' chain goes there too
    assert results[stream].ok, results[stream].report()
    assert results["tools"].ok and results["tools"].count == len(events(tools))
    assert results[stream].count == len(again)
    lines = file.read_bytes().splitlines()
    proc = [r.value for r in recs if r.value is not None and r.key == stream.encode()]
    assert sorted(v for v in proc if not is_head_record(v)) == sorted(lines)
    # the heads on the topic are signed and name the file's final event
    topic_heads = [Head.from_json(v) for v in proc if is_head_record(v)]
    assert topic_heads[-1].seq == again[-1]["seq"] and topic_heads[-1].signed_by(
        load_hmac_key(key_file)
    )

    # `audit head --config` reads the same heads back from the topic, for --expect-head
    r = cli("audit", "head", "--config", str(ws.config_path), "--hmac-key-file", key_file)
    assert r.returncode == 0, r.stdout + r.stderr
    printed = {Head.parse(x).stream: x for x in r.stdout.splitlines()}
    assert set(printed) == {stream, "tools"} and Head.parse(printed[stream]) == topic_heads[-1]
    r = cli("audit", "verify", str(file), "--hmac-key-file", key_file, "--require-hmac",
            "--expect-head", printed[stream])  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr

    # Another --instance on the same file: the error names the real cause.
    w4 = WorkerProcess(ws, "--instance", "someone-else", name="worker4")
    workers.append(w4)
    assert w4.wait(60) == 1
    log4 = w4.log()
    assert "another writer" in log4 and "--instance" in log4, log4[-2000:]
    assert "does not verify" not in log4

    # An emptied file is never silently restarted: the next worker refuses to write.
    file.write_bytes(b"")
    w3 = WorkerProcess(ws, name="worker3")
    workers.append(w3)
    assert w3.wait(60) == 1
    log3 = w3.log()
    assert str(file) in log3 and f"seq {again[-1]['seq'] + 1}" in log3, log3[-2000:]
    assert file.read_bytes() == b""
    # ...even when the head beside it is deleted too: the topic's copy of the head decides
    head_file_for(file).unlink()
    file.unlink()
    w5 = WorkerProcess(ws, name="worker5")
    workers.append(w5)
    assert w5.wait(60) == 1
    log5 = w5.log()
    assert "the audit topic" in log5 and f"seq {again[-1]['seq'] + 1}" in log5, log5[-2000:]
    assert file.read_bytes() == b""


def test_audit_file_in_use_stops_the_worker_before_it_consumes(
    ws: Workspace, workers: list[WorkerProcess]
) -> None:
    produce_events(ws, "orders", 5, seed=8)
    config = ws.load_config()
    assert config.audit is not None and config.audit.file is not None
    holder = FileSink(config.audit.file)  # another writer holds the lock
    try:
        w = WorkerProcess(ws)
        workers.append(w)
        assert w.wait(60) == 1
    finally:
        holder.close()
    log = w.log()
    assert "audit log unavailable" in log and "in use by another writer" in log, log[-2000:]
    assert "partitions assigned" not in log
    assert committed_offsets(ws.bootstrap, ws.group_id, ws.topic("orders"), 2) == {
        0: -1001,
        1: -1001,
    }


class _FailAfter(MemorySink):
    """Accepts ``n`` events, then fails like a full disk."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def write(self, line: bytes) -> None:
        from streamproc.audit import AuditSinkError

        if len(self.lines) >= self.n:
            raise AuditSinkError("cannot append to audit file x: No space left on device")
        super().write(line)


def test_audit_write_failure_is_fatal_and_commits_nothing(
    ws: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process worker whose audit sink dies after the start events: the first batch
    with a revoked record stops the worker with exit 1 before its transaction commits."""
    from streamproc.audit import AuditLog
    from streamproc.runtime.factory import WorkerAudit, build_pipeline
    from streamproc.runtime.worker import EXIT_FATAL, Worker

    revoked = revoked_orders(ws, 1)
    produce_raw(ws.bootstrap, ws.topic("orders"), [(b"k", revoked[0], None)])
    config = ws.load_config()
    sink = _FailAfter(3)
    audit = WorkerAudit(AuditLog([sink], stream="processor:test"), kms="local", instance="t")
    worker = Worker(config, build_pipeline(config), instance=f"t{ws.suffix}", audit=audit)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        worker.stop()
        t.join(30)
        pytest.fail("worker did not stop on the audit failure")
    assert result == [EXIT_FATAL]
    assert [json.loads(x)["type"] for x in sink.lines] == [
        "chain_started",
        "policy_loaded",
        "processor_started",
    ]
    assert worker.records_committed == 0
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(
        m.startswith("fatal AuditFailed: audit log: cannot write key_revocation_seen") for m in msgs
    ), msgs
    assert committed_offsets(ws.bootstrap, ws.group_id, ws.topic("orders"), 2) == {
        0: -1001,
        1: -1001,
    }


# -- the two worker fixes ------------------------------------------------------------------------


def test_fatal_descriptions_are_value_free() -> None:
    from confluent_kafka import KafkaError, KafkaException

    from streamproc.runtime.checkpoint import describe as _describe

    secret = "4111111111111111"
    assert _describe(ValueError(f"invalid value {secret!r}")) == "ValueError"
    exc = KafkaException(KafkaError(KafkaError._INVALID_ARG, f"bad value {secret}"))
    assert _describe(exc) == "_INVALID_ARG"


def test_supervisor_removes_the_metrics_directory_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamproc.runtime.app as app
    from streamproc.observability.server import ENV
    from streamproc.runtime.app import run_supervised

    ws_cfg = make_workspace(tmp_path / "cfg", "127.0.0.1:1", "x", sources=("orders",))
    cfg = yaml.safe_load(ws_cfg.config_path.read_text())
    cfg["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    ws_cfg.config_path.write_text(yaml.safe_dump(cfg))
    seen: dict[str, str] = {}

    class FakeSupervisor:
        def __init__(self, *a: Any, **kw: Any) -> None:
            pass

        def run(self) -> int:
            seen["dir"] = os.environ[ENV]
            assert Path(seen["dir"]).is_dir()
            return 0

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(app, "Supervisor", FakeSupervisor)
    # setup_multiprocess() switches prometheus_client to mmap values process-wide (right
    # for a supervisor, which exits afterwards); restore it for the tests that follow
    from prometheus_client import values

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    assert run_supervised(ws_cfg.config_path, 2) == 0
    assert not Path(seen["dir"]).exists()  # created by us: removed
    assert ENV not in os.environ

    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv(ENV, str(mine))
    assert run_supervised(ws_cfg.config_path, 2) == 0
    assert mine.is_dir()  # chosen by the deployment: kept (emptied at the next start)
