"""Retention drift against the real broker: apply sets it, an alteration is seen as drift.

``topics apply`` sets the policy's ``retention.ms`` (read back with describe_configs),
then a topic is altered behind the processor's back: ``streamproc topics check`` exits 1
naming it, the :class:`RetentionMonitor` (real admin client, injected clock) sets
``streamproc_retention_drift{topic}`` to 1 for it and 0 for the others, and the monitor
thread the composition root starts does the same on its own schedule.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from streamproc.observability.metrics import KnownLabels, Metrics
from streamproc.policy.model import load_policy
from streamproc.runtime.app import start_retention_monitor
from streamproc.runtime.retention import RetentionMonitor, describe_retention, expected_retention
from streamproc.runtime.topics import apply_topics
from tests.integration.conftest import make_workspace, wait_for

pytestmark = pytest.mark.integration

DAY = 86_400_000
REPO = Path(__file__).resolve().parents[2]


def _governed_workspace(tmp_path: Path, bootstrap: str, unique: str) -> Any:
    ws = make_workspace(tmp_path, bootstrap, unique, sources=("orders",), partitions=1)
    pol = yaml.safe_load(ws.policy.read_text())
    pol["audiences"]["analytics"]["retention"] = "30d"
    pol["audiences"]["fraud"]["retention"] = "2d"
    pol["dead_letter"] = {"retention": "7d"}
    ws.policy.write_text(yaml.safe_dump(pol, sort_keys=False))
    return ws


def _alter(bootstrap: str, topic: str, ms: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[ConfigEntry("retention.ms", str(ms), incremental_operation=AlterConfigOpType.SET)],
    )
    for f in admin.incremental_alter_configs([res]).values():
        f.result(30)


def _cli(ws: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", *args, "--config", str(ws.config_path)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )


def _gauge(m: Metrics, topic: str) -> float | None:
    return m.registry.get_sample_value("streamproc_retention_drift", {"topic": topic})


def test_apply_sets_policy_retention_and_drift_is_reported(tmp_path: Path, kafka_bootstrap: str, unique: str) -> None:
    ws = _governed_workspace(tmp_path, kafka_bootstrap, unique)
    config = ws.load_config()
    policy = load_policy(config.policy)
    dlq = ws.dlq("orders")
    analytics, fraud, support = (ws.dest("orders", a) for a in ("analytics", "fraud", "support"))
    apply_topics(config, policy=policy)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    live = describe_retention(admin, [analytics, fraud, dlq])
    assert live[analytics].retention_ms == 30 * DAY
    assert live[fraud].retention_ms == 2 * DAY
    assert live[dlq].retention_ms == 7 * DAY

    ok = _cli(ws, "topics", "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok       {analytics}  retention.ms={30 * DAY}" in ok.stdout

    # Someone raises the analytics retention to 90 days behind the policy's back.
    _alter(kafka_bootstrap, analytics, 90 * DAY)
    bad = _cli(ws, "topics", "check")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    line = next(ln for ln in bad.stdout.splitlines() if analytics in ln)
    assert line.startswith("DRIFT") and "EXCEEDS POLICY" in line and str(90 * DAY) in line
    assert f"ok       {fraud}" in bad.stdout

    # The worker's monitor, on an injected clock: checks at 0, not again before the interval.
    metrics = Metrics(known=KnownLabels.from_config(config), process_metrics=False)
    now = [0.0]
    mon = RetentionMonitor(expected_retention(config, policy), admin, metrics.retention_drift, interval=60, clock=lambda: now[0])
    assert mon.maybe_check() is not None
    assert _gauge(metrics, analytics) == 1
    assert _gauge(metrics, fraud) == 0 and _gauge(metrics, dlq) == 0
    assert support not in mon.expected  # the policy states no retention for support

    apply_topics(config, policy=policy)  # puts the policy's value back
    now[0] = 30.0
    assert mon.maybe_check() is None  # not due yet: the gauge still shows the drift
    assert _gauge(metrics, analytics) == 1
    now[0] = 61.0
    assert mon.maybe_check() is not None
    assert _gauge(metrics, analytics) == 0
    assert _cli(ws, "topics", "check").returncode == 0


def test_composition_root_runs_the_monitor(tmp_path: Path, kafka_bootstrap: str, unique: str) -> None:
    ws = _governed_workspace(tmp_path, kafka_bootstrap, unique)
    raw = yaml.safe_load(ws.config_path.read_text())
    raw["topics"]["retention_check_interval_seconds"] = 1
    ws.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = ws.load_config()
    policy = load_policy(config.policy)
    apply_topics(config, policy=policy)
    dlq = ws.dlq("orders")
    _alter(kafka_bootstrap, dlq, -1)  # dead letters kept forever
    metrics = Metrics(known=KnownLabels.from_config(config), process_metrics=False)
    stop = start_retention_monitor(config, policy, metrics)
    try:
        wait_for(lambda: _gauge(metrics, dlq) == 1, 30, what="drift gauge on the dead-letter topic")
        assert _gauge(metrics, ws.dest("orders", "analytics")) == 0
        apply_topics(config, policy=policy)
        wait_for(lambda: _gauge(metrics, dlq) == 0, 30, what="drift gauge back to 0")
    finally:
        stop.set()
