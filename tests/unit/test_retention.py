"""Retention as policy: parsing, the config check and drift computation (pure parts).

The broker side (describe/alter, the monitor's gauge, ``topics check``) is proven in
tests/integration/test_retention.py.  Expected milliseconds are written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.config import parse_config
from streamproc.errors import PolicyError
from streamproc.policy.model import format_duration_ms, parse_duration_ms, parse_policy
from streamproc.runtime.retention import (
    LiveRetention,
    config_violations,
    expected_retention,
    live_drift,
)

DAY = 86_400_000

POLICY: dict[str, Any] = {
    "dead_letter": {"retention": "7d"},
    "defaults": {"record_key": "keep"},
    "audiences": {
        "analytics": {"retention": "30d", "purpose": "product analytics", "tags": {"PUBLIC": "keep"}},
        "fraud": {"retention": "12h", "tags": {"PUBLIC": "keep"}},
        "support": {"tags": {"PUBLIC": "keep"}},
    },
}


@pytest.mark.parametrize(
    ("text", "ms"),
    [("30d", 2_592_000_000), ("12h", 43_200_000), ("90m", 5_400_000), ("2w", 1_209_600_000), ("1500ms", 1500), ("45s", 45_000)],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text, "x") == ms
    assert parse_duration_ms(format_duration_ms(ms), "x") == ms


@pytest.mark.parametrize("bad", ["30", "forever", "-1d", "0d", "1y", 30, "1.5d"])
def test_bad_durations_are_refused(bad: Any) -> None:
    with pytest.raises(PolicyError, match="positive duration"):
        parse_duration_ms(bad, "audience 'a': retention")


def test_policy_carries_retention_and_purpose() -> None:
    p = parse_policy(POLICY)
    assert p.audiences["analytics"].retention_ms == 30 * DAY
    assert p.audiences["analytics"].purpose == "product analytics"
    assert p.audiences["fraud"].retention_ms == 12 * 3_600_000
    assert p.audiences["support"].retention_ms is None
    assert p.dead_letter_retention_ms == 7 * DAY
    with pytest.raises(PolicyError, match="dead_letter"):
        parse_policy({**POLICY, "dead_letter": {"retention": "7d", "kek": "x"}})
    # Retention is meaning: the policy version changes with it.
    other = json.loads(json.dumps(POLICY))
    other["audiences"]["analytics"]["retention"] = "31d"
    assert parse_policy(other).version != p.version


def _config(tmp_path: Path, topics: dict[str, Any] | None = None) -> Any:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    raw = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "schemas": {"directory": str(tmp_path)},
        "kms": {"provider": "local", "path": str(tmp_path / "ring.json")},
        "policy": str(tmp_path / "policy.yaml"),
        "pipelines": [
            {
                "sources": ["orders"],
                "dead_letter_topic": "orders.dlq",
                "destinations": [
                    {"topic": f"orders.{a}", "audience": a, "kek": f"{a}-kek"} for a in ("analytics", "fraud", "support")
                ],
            }
        ],
        "topics": topics or {},
    }
    return parse_config(raw, base_dir=tmp_path, env={})


def test_expected_retention_per_topic(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"overrides": {"orders.fraud": {"config": {"retention.ms": 3_600_000}}}})
    exp = expected_retention(cfg, parse_policy(POLICY))
    assert {t: r.desired_ms for t, r in exp.items()} == {
        "orders.analytics": 2_592_000_000,
        "orders.fraud": 3_600_000,  # the config's shorter value stands
        "orders.dlq": 604_800_000,
    }
    assert exp["orders.analytics"].audience == "analytics"
    assert exp["orders.dlq"].role == "dead_letter"
    assert config_violations(cfg, parse_policy(POLICY)) == []


@pytest.mark.parametrize(
    ("topics", "needle"),
    [
        ({"overrides": {"orders.analytics": {"config": {"retention.ms": 31 * DAY}}}}, "orders.analytics"),
        ({"overrides": {"orders.fraud": {"config": {"retention.ms": -1}}}}, "infinite"),
        ({"defaults": {"config": {"retention.ms": 8 * DAY}}}, "orders.dlq"),
        ({"overrides": {"orders.dlq": {"config": {"cleanup.policy": "compact"}}}}, "cleanup.policy=compact"),
    ],
)
def test_config_that_retains_longer_than_the_policy_is_a_violation(tmp_path: Path, topics: dict[str, Any], needle: str) -> None:
    problems = config_violations(_config(tmp_path, topics), parse_policy(POLICY))
    assert problems and any(needle in p for p in problems), problems


def test_compact_and_delete_is_fine(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"overrides": {"orders.dlq": {"config": {"cleanup.policy": "compact,delete"}}}})
    assert config_violations(cfg, parse_policy(POLICY)) == []


def test_live_drift(tmp_path: Path) -> None:
    exp = expected_retention(_config(tmp_path), parse_policy(POLICY))
    live = {
        "orders.analytics": LiveRetention("orders.analytics", 2_592_000_000, "delete"),  # matches
        "orders.fraud": LiveRetention("orders.fraud", 3_600_000, "delete"),  # shorter: drift, not exceeding
        "orders.dlq": LiveRetention("orders.dlq", -1, "delete"),  # infinite
    }
    d = live_drift(exp, live)
    assert d["orders.analytics"] is None
    assert d["orders.fraud"] is not None and not d["orders.fraud"].exceeds_policy
    assert d["orders.dlq"] is not None and d["orders.dlq"].exceeds_policy
    compacted = live_drift(exp, {**live, "orders.analytics": LiveRetention("orders.analytics", 2_592_000_000, "compact")})
    assert compacted["orders.analytics"] is not None and compacted["orders.analytics"].exceeds_policy
    unreadable = live_drift(exp, {**live, "orders.analytics": LiveRetention("orders.analytics", None, None, "UNKNOWN_TOPIC_OR_PART")})
    assert unreadable["orders.analytics"] is not None


def test_policy_check_cli_fails_on_a_config_that_retains_too_long(tmp_path: Path) -> None:
    from streamproc.cli.main import cli

    cfg = _config(tmp_path, {"overrides": {"orders.analytics": {"config": {"retention.ms": 31 * DAY}}}})
    cfg_path = tmp_path / "streamproc.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap.servers": "127.0.0.1:1"},
                "schemas": {"directory": str(tmp_path)},
                "kms": {"provider": "local", "path": str(tmp_path / "ring.json")},
                "policy": str(cfg.policy),
                "pipelines": [dict(sources=["orders"], dead_letter_topic="orders.dlq", destinations=[{"topic": "orders.analytics", "audience": "analytics", "kek": "a-kek"}])],
                "topics": {"overrides": {"orders.analytics": {"config": {"retention.ms": 31 * DAY}}}},
            }
        )
    )
    schemas = tmp_path / "s"
    schemas.mkdir()
    (schemas / "t.avsc").write_text(json.dumps({"type": "record", "name": "T", "fields": [{"name": "a", "type": "string", "confluent:tags": ["PUBLIC"]}]}))
    runner = CliRunner()
    ok = runner.invoke(cli, ["policy", "check", "--policy", str(cfg.policy), "--schemas", str(schemas)])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["policy", "check", "--policy", str(cfg.policy), "--schemas", str(schemas), "--config", str(cfg_path)])
    assert bad.exit_code == 1
    assert "retention: topic 'orders.analytics'" in bad.output and "exceeds the policy's 30d" in bad.output
