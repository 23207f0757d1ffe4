"""Key lifecycle commands are audited like re-identification (``keys rotate|revoke``).

The event is written to the config's audit trail (the tools' chain) before the keyring
changes, with the authenticated actor; without a writable trail nothing changes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.audit import load_hmac_key, verify_file, write_hmac_key
from streamproc.cli.keys import keys as keys_cli
from streamproc.crypto.kms.local import LocalKeyring


def os_user() -> str:
    return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "policy.yaml").write_text(
        "keys: {pseudonym: pseudonym-master}\n"
        "audiences:\n  fraud:\n    tags:\n      EMAIL: {op: encrypt_deterministic}\n"
    )
    ring = LocalKeyring.create(tmp_path / "keys" / "keyring.json")
    ring.create_key("orders-kek", "kek")
    write_hmac_key(tmp_path / "audit.key")
    return tmp_path


def config(ws: Path, audit: bool = True) -> str:
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap.servers": "127.0.0.1:9"},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [
            {
                "sources": ["orders"],
                "dead_letter_topic": "orders.dlq",
                "destinations": [{"topic": "orders.fraud", "audience": "fraud", "kek": "f-kek"}],
            }
        ],
    }
    if audit:
        cfg["audit"] = {"file": "./audit/processor.jsonl", "hmac_key_file": "./audit.key"}
    p = ws / ("streamproc.yaml" if audit else "bare.yaml")
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def tool_events(ws: Path) -> list[dict[str, Any]]:
    path = ws / "audit" / "processor-tools.jsonl"
    r = verify_file(path, hmac_key=load_hmac_key(ws / "audit.key"), require_hmac=True)
    assert r.ok, r.report()
    return [json.loads(x) for x in path.read_text().splitlines()][1:]


def versions(ws: Path) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    (info,) = LocalKeyring(ws / "keys" / "keyring.json").list_keys()
    return info.primary_version, tuple(info.versions), tuple(info.revoked_versions)


def test_rotate_and_revoke_write_events_first(ws: Path) -> None:
    run = CliRunner().invoke
    cfg = config(ws)
    r = run(keys_cli, ["rotate", "--config", cfg, "orders-kek", "--actor", "CHG-12"])
    assert r.exit_code == 0 and "primary version 2" in r.output, r.output
    r = run(keys_cli, ["revoke", "--config", cfg, "orders-kek", "1"])
    assert r.exit_code == 0, r.output
    assert versions(ws) == (2, (1, 2), (1,))
    rotated, revoked = tool_events(ws)
    assert (rotated["type"], rotated["attrs"]) == (
        "key_rotated",
        {
            "kms": "local",
            "key_id": "orders-kek",
            "kind": "kek",
            "version": 2,
            "previous_version": 1,
            "outcome": "success",
            "actor_source": "os",
            "note": "CHG-12",
        },
    )
    assert (revoked["type"], revoked["attrs"]["version"], revoked["attrs"]["outcome"]) == (
        "key_revoked",
        1,
        "success",
    )
    assert rotated["actor"] == revoked["actor"] == os_user()


def test_unknown_keys_are_denied_and_audited(ws: Path) -> None:
    run = CliRunner().invoke
    cfg = config(ws)
    assert run(keys_cli, ["rotate", "--config", cfg, "nope"]).exit_code == 1
    assert run(keys_cli, ["revoke", "--config", cfg, "orders-kek", "7"]).exit_code == 1
    assert [(e["type"], e["attrs"]["outcome"], e["attrs"]["error"]) for e in tool_events(ws)] == [
        ("key_rotated", "denied", "KeyNotFound"),
        ("key_revoked", "denied", "KeyNotFound"),
    ]
    assert versions(ws) == (1, (1,), ())


def test_nothing_changes_without_a_writable_audit_trail(ws: Path) -> None:
    run = CliRunner().invoke
    r = run(keys_cli, ["rotate", "--config", config(ws, audit=False), "orders-kek"])
    assert r.exit_code == 1 and "no audit: section" in r.output
    assert versions(ws) == (1, (1,), ())
    cfg = config(ws)
    assert run(keys_cli, ["rotate", "--config", cfg, "orders-kek"]).exit_code == 0
    tools = ws / "audit" / "processor-tools.jsonl"
    tools.write_text("")  # emptied: its exported head says otherwise
    r = run(keys_cli, ["revoke", "--config", cfg, "orders-kek", "1"])
    assert r.exit_code == 1 and "audit log unavailable" in r.output and str(tools) in r.output
    assert versions(ws) == (2, (1, 2), ())  # not revoked
    # and without --config the command does not run at all
    r = run(keys_cli, ["revoke", "--keyring", str(ws / "keys" / "keyring.json"), "orders-kek", "1"])
    assert r.exit_code == 2 and "--config" in r.output
