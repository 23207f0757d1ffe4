"""``streamproc catalog``: the data map and its diff, against outputs written by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.cli.main import cli
from streamproc.policy.model import load_policy

SCHEMA = {
    "type": "record",
    "name": "Signup",
    "namespace": "t",
    "fields": [
        {"name": "id", "type": "string", "confluent:tags": ["PUBLIC"]},
        {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
        {"name": "card", "type": "string", "confluent:tags": ["CARD"]},
        {
            "name": "home",
            "type": {
                "type": "record",
                "name": "Addr",
                "fields": [
                    {"name": "city", "type": "string", "confluent:tags": ["PUBLIC"]},
                    {"name": "street", "type": "string", "confluent:tags": ["STREET"]},
                ],
            },
        },
    ],
}

POLICY: dict[str, Any] = {
    "name": "t-policy",
    "keys": {"pseudonym": "pm"},
    "dead_letter": {"retention": "7d"},
    "audiences": {
        "analytics": {
            "purpose": "product analytics",
            "retention": "30d",
            "tags": {"PUBLIC": "keep", "EMAIL": "token", "CARD": "drop", "STREET": "drop"},
        },
        "support": {
            "tags": {
                "PUBLIC": "keep",
                "EMAIL": {"op": "mask", "keep_first": 2},
                "CARD": {"op": "mask", "keep_last": 4},
                "STREET": "keep",
            },
        },
    },
}

EXPECTED_MD = """\
# Data map: t-policy (VERSION)

## Audiences

| audience | purpose | retention | topics | budget | risk |
|---|---|---|---|---|---|
| analytics | product analytics | 30d | signups.analytics | - | - |
| support | - | - | signups.support | - | - |

Dead-letter topics: retention 7d.

## t.Signup

| field | tags | audience | operation | output field | purpose | retention | k | epsilon |
|---|---|---|---|---|---|---|---|---|
| id | PUBLIC | analytics | keep | id | product analytics | 30d | - | - |
| id | PUBLIC | support | keep | id | - | - | - | - |
| email | EMAIL | analytics | token | email | product analytics | 30d | - | - |
| email | EMAIL | support | mask(keep_first=2) | email | - | - | - | - |
| card | CARD | analytics | drop | - | product analytics | 30d | - | - |
| card | CARD | support | mask(keep_last=4) | card | - | - | - | - |
| home.city | PUBLIC | analytics | keep | home.city | product analytics | 30d | - | - |
| home.city | PUBLIC | support | keep | home.city | - | - | - | - |
| home.street | STREET | analytics | drop | - | product analytics | 30d | - | - |
| home.street | STREET | support | keep | home.street | - | - | - | - |
"""


def _workspace(tmp_path: Path, policy: dict[str, Any]) -> Path:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "signup.avsc").write_text(json.dumps(SCHEMA))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    cfg = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./ring.json"},
        "policy": "./policy.yaml",
        "pipelines": [
            {
                "sources": ["signups"],
                "dead_letter_topic": "signups.dlq",
                "destinations": [
                    {"topic": "signups.analytics", "audience": "analytics", "kek": "a-kek"},
                    {"topic": "signups.support", "audience": "support", "kek": "s-kek"},
                ],
            }
        ],
    }
    path = tmp_path / "streamproc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_markdown_data_map(tmp_path: Path) -> None:
    cfg = _workspace(tmp_path, POLICY)
    r = CliRunner().invoke(cli, ["catalog", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    version = load_policy(tmp_path / "policy.yaml").version
    assert r.output == EXPECTED_MD.replace("VERSION", version)


def test_json_data_map(tmp_path: Path) -> None:
    cfg = _workspace(tmp_path, POLICY)
    r = CliRunner().invoke(cli, ["catalog", "--config", str(cfg), "--format", "json"])
    assert r.exit_code == 0, r.output
    dm = json.loads(r.output)
    assert dm["audiences"]["analytics"] == {
        "purpose": "product analytics", "retention": "30d", "topics": ["signups.analytics"], "budget": None, "risk": None,
    }
    assert dm["dead_letter"] == {"retention": "7d"}
    fields = dm["schemas"]["t.Signup"]["fields"]
    assert list(fields) == ["id", "email", "card", "home.city", "home.street"]
    assert fields["card"] == {
        "tags": ["CARD"],
        "audiences": {
            "analytics": {"operation": "drop", "output_field": None, "purpose": "product analytics", "retention": "30d"},
            "support": {"operation": "mask(keep_last=4)", "output_field": "card", "purpose": None, "retention": None},
        },
    }


def test_diff_shows_what_a_policy_change_does(tmp_path: Path) -> None:
    new = json.loads(json.dumps(POLICY))
    new["audiences"]["analytics"]["retention"] = "14d"
    new["audiences"]["support"]["tags"]["CARD"] = "drop"
    new["audiences"]["support"]["purpose"] = "customer care"
    cfg = _workspace(tmp_path, new)
    old = tmp_path / "old-policy.yaml"
    old.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    r = CliRunner().invoke(cli, ["catalog", "--config", str(cfg), "--diff", str(old)])
    assert r.exit_code == 0, r.output
    assert r.output == (
        "| schema | field | audience | attribute | before | after |\n"
        "|---|---|---|---|---|---|\n"
        "| - | - | analytics | retention | 30d | 14d |\n"
        "| - | - | support | purpose | - | customer care |\n"
        "| t.Signup | card | support | operation | mask(keep_last=4) | drop |\n"
        "| t.Signup | card | support | output_field | card | - |\n"
    )
    j = CliRunner().invoke(cli, ["catalog", "--config", str(cfg), "--diff", str(old), "--format", "json"])
    assert json.loads(j.output)[2] == {
        "schema": "t.Signup", "field": "card", "audience": "support",
        "attribute": "operation", "before": "mask(keep_last=4)", "after": "drop",
    }
    same = CliRunner().invoke(cli, ["catalog", "--config", str(cfg), "--diff", str(tmp_path / "policy.yaml")])
    assert same.output == "No change to the data map.\n"


@pytest.mark.parametrize("fmt", ["markdown", "json"])
def test_registry_config_needs_schemas(tmp_path: Path, fmt: str) -> None:
    cfg = _workspace(tmp_path, POLICY)
    raw = yaml.safe_load(cfg.read_text())
    raw["schemas"] = {"url": "http://127.0.0.1:1"}
    cfg.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(cli, ["catalog", "--config", str(cfg), "--format", fmt])
    assert r.exit_code == 1 and "--schemas" in r.output
    ok = CliRunner().invoke(cli, ["catalog", "--config", str(cfg), "--format", fmt, "--schemas", str(tmp_path / "schemas")])
    assert ok.exit_code == 0, ok.output


def test_privacy_budget_columns(tmp_path: Path) -> None:
    """epsilon of a dp_noise rule gets its own column (k likewise, where a rule sets one)."""
    from streamproc.pipeline.catalog import data_map, render_markdown
    from streamproc.policy.model import parse_policy
    from streamproc.schema.registry import RegisteredSchema

    schema = {"type": "record", "name": "Pay", "fields": [{"name": "amount", "type": "long", "confluent:tags": ["AMOUNT"]}]}
    pol = parse_policy(
        {
            "defaults": {"record_key": "drop"},
            "audiences": {"research": {"tags": {"AMOUNT": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.5, "bounds": [0, 1000]}}}},
        }
    )
    dm = data_map(pol, [RegisteredSchema(1, json.dumps(schema), "pay")])
    assert dm["schemas"]["Pay"]["fields"]["amount"]["audiences"]["research"] == {
        "operation": 'dp_noise(bounds=[0,1000], epsilon=0.5, mechanism="laplace")',
        "output_field": "amount",
        "purpose": None,
        "retention": None,
        "epsilon": 0.5,
    }
    assert '| amount | AMOUNT | research | dp_noise(bounds=[0,1000], epsilon=0.5, mechanism="laplace") | amount | - | - | - | 0.5 |' in render_markdown(dm)


def test_audience_budget_and_risk_are_shown_with_the_noised_field(tmp_path: Path) -> None:
    """budget/risk: the map shows the targets, and the budgeted field as noised."""
    from streamproc.pipeline.catalog import data_map, render_markdown
    from streamproc.policy.model import parse_policy
    from streamproc.schema.registry import RegisteredSchema

    schema = {"type": "record", "name": "Pay", "fields": [{"name": "amount", "type": "long", "confluent:tags": ["AMOUNT"]}]}
    pol = parse_policy(
        {
            "defaults": {"record_key": "drop"},
            "audiences": {
                "research": {
                    "budget": {"epsilon": 2.0, "window": "1d"},
                    "risk": {"quasi_identifiers": ["AMOUNT"], "k": 5, "window": "1h"},
                    "tags": {"AMOUNT": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.5, "bounds": [0, 1000]}},
                }
            },
        }
    )
    dm = data_map(pol, [RegisteredSchema(1, json.dumps(schema), "pay")])
    aud = dm["audiences"]["research"]
    assert aud["budget"] == {"epsilon": 2.0, "window": "1d", "delta": 0.0}
    assert aud["risk"] == {"k": 5, "l": None, "quasi_identifiers": ["AMOUNT"]}
    cell = dm["schemas"]["Pay"]["fields"]["amount"]["audiences"]["research"]
    assert cell["operation"].startswith("dp_noise(") and cell["epsilon"] == 0.5
    assert "| research | - | - | - | epsilon 2.0 per 1d | k 5 over AMOUNT |" in render_markdown(dm)
