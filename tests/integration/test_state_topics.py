"""State-topic configs against the real broker: drift is reported, ``topics apply`` realigns it.

The subject-key topic and the budget changelog are created *before* ``topics apply``
with the wrong settings (deleting by age, compacted an hour late): ``streamproc topics
check`` exits 1 naming the drifted settings (names only: the live values are not
echoed), the :class:`RetentionMonitor` sets ``streamproc_state_topic_drift`` to 1,
``apply_topics`` sets them back with incremental alter configs (an unrelated config of
the topic stays), after which check exits 0 and the gauge reads 0.

Expected values are written out here from docs/governance.md, not imported from the code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streamproc.observability.metrics import KnownLabels, Metrics
from streamproc.policy.model import load_policy
from streamproc.runtime.retention import RetentionMonitor, expected_retention
from streamproc.runtime.state_topics import expected_state_configs
from streamproc.runtime.topics import apply_topics
from tests.integration.conftest import make_workspace

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUBJECT_KEK = "fraud-subject-kek"
#: A distinctive wrong value: it must not appear in check's output.
ODD_LAG = "987654321"


def _workspace(tmp_path: Path, bootstrap: str, unique: str) -> tuple[Any, str, str]:
    from streamproc.crypto.kms.local import LocalKeyring

    key_topic = f"subject-keys-{unique}"
    ws = make_workspace(
        tmp_path, bootstrap, unique, sources=("orders",), partitions=1,
        extra={
            "erasure": {"topic": key_topic, "keks": {"fraud": SUBJECT_KEK}},
            "topics": {
                "defaults": {"partitions": 1, "replication_factor": 1},
                # An override of one bound: apply and check use it instead of the default.
                "overrides": {key_topic: {"config": {"segment.ms": "600000"}}},
            },
        },
    )  # fmt: skip
    LocalKeyring(ws.keyring_path).create_key(SUBJECT_KEK)
    pol = yaml.safe_load(ws.policy.read_text())
    pol["audiences"]["fraud"]["subject"] = "customer_id"
    pol["audiences"]["fraud"]["tags"]["EMAIL"] = {"op": "encrypt_deterministic", "erasable": True}
    analytics = pol["audiences"]["analytics"]
    analytics["tags"]["AMOUNT"] = {"op": "dp_noise", "mechanism": "geometric", "epsilon": 0.5, "bounds": [0, 1000]}
    analytics["budget"] = {"epsilon": 4.0, "window": "1d"}
    ws.policy.write_text(yaml.safe_dump(pol, sort_keys=False))
    changelog = f"{ws.group_id}.budget-changelog"
    return ws, key_topic, changelog


def _configs(admin: AdminClient, topic: str, names: list[str]) -> dict[str, str]:
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([res])[res].result(30)
    return {n: entries[n].value for n in names}


def _cli(ws: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", *args, "--config", str(ws.config_path)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )


def test_state_topic_drift_is_reported_and_realigned(tmp_path: Path, kafka_bootstrap: str, unique: str) -> None:
    ws, key_topic, changelog = _workspace(tmp_path, kafka_bootstrap, unique)
    config = ws.load_config()
    assert config.budget_changelog_topic == changelog
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # Someone created the state topics by hand, deleting by age and compacting late.
    wrong_keys = {
        "cleanup.policy": "delete", "max.compaction.lag.ms": ODD_LAG,
        "retention.bytes": "1073741824",  # not a state-topic setting: apply must leave it
    }
    futures = admin.create_topics([
        NewTopic(key_topic, num_partitions=1, replication_factor=1, config=wrong_keys),
        NewTopic(changelog, num_partitions=1, replication_factor=1, config={"cleanup.policy": "compact,delete"}),
    ])  # fmt: skip
    for f in futures.values():
        f.result(30)

    bad = _cli(ws, "topics", "check")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    key_line = next(ln for ln in bad.stdout.splitlines() if key_topic in ln)
    assert key_line.startswith("DRIFT") and "subject_keys" in key_line
    for name in ("cleanup.policy", "segment.ms", "min.cleanable.dirty.ratio", "max.compaction.lag.ms"):
        assert name in key_line
    cl_line = next(ln for ln in bad.stdout.splitlines() if changelog in ln)
    assert cl_line.startswith("DRIFT") and "cleanup.policy" in cl_line
    assert ODD_LAG not in bad.stdout + bad.stderr  # names, not live values
    assert "state topic drift" in bad.stderr

    # The worker's periodic check sees the same drift.
    policy = load_policy(config.policy)
    metrics = Metrics(known=KnownLabels.from_config(config), process_metrics=False)
    now = [0.0]
    mon = RetentionMonitor(
        expected_retention(config, policy), admin, metrics.retention_drift, interval=60, clock=lambda: now[0],
        state=expected_state_configs(config), report_state=metrics.state_topic_drift,
    )
    mon.check()

    def gauge(topic: str) -> float | None:
        return metrics.registry.get_sample_value("streamproc_state_topic_drift", {"topic": topic})

    assert gauge(key_topic) == 1 and gauge(changelog) == 1

    results = {r.topic: r for r in apply_topics(config, admin=admin, policy=policy)}
    assert results[key_topic].status == "exists" and "realigned" in results[key_topic].note
    assert results[changelog].status == "exists" and "cleanup.policy realigned" in results[changelog].note
    key_names = ["cleanup.policy", "segment.ms", "min.cleanable.dirty.ratio", "max.compaction.lag.ms",
                 "delete.retention.ms", "retention.bytes"]  # fmt: skip
    assert _configs(admin, key_topic, key_names) == {
        "cleanup.policy": "compact",
        "segment.ms": "600000",  # the override, 10 minutes
        "min.cleanable.dirty.ratio": "0.01",
        "max.compaction.lag.ms": str(60 * 60 * 1000),
        "delete.retention.ms": str(24 * 60 * 60 * 1000),
        "retention.bytes": "1073741824",  # incremental: the unrelated config stayed
    }
    assert _configs(admin, changelog, ["cleanup.policy"]) == {"cleanup.policy": "compact"}

    ok = _cli(ws, "topics", "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok       {key_topic}  subject_keys:" in ok.stdout
    now[0] = 61.0
    assert mon.maybe_check() is not None
    assert gauge(key_topic) == 0 and gauge(changelog) == 0
    # Idempotent: a second apply has nothing to realign.
    again = {r.topic: r for r in apply_topics(config, admin=admin, policy=policy)}
    assert "realigned" not in again[key_topic].note and "realigned" not in again[changelog].note
