"""CLI errors are one line that names where (line, field), never the value; bad data exits 65.

The values planted here are canaries: if any of them shows up on stdout or stderr, a
library's message (``Invalid isoformat string: '<value>'``) leaked through.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.crypto.kms.local import LocalKeyring

ROOT = Path(__file__).resolve().parents[2]
CANARY = "CANARY-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """Keyring, schemas, policy and a config whose broker is a closed loopback port."""
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    shutil.copy(ROOT / "policy.yaml", tmp_path / "policy.yaml")
    ring = LocalKeyring.create(tmp_path / "keyring.json")
    for kek in ("orders-kek", "analytics-kek"):
        ring.create_key(kek)
    cfg = {
        "kafka": {"bootstrap.servers": f"127.0.0.1:{free_port()}"},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [{"sources": ["orders"], "dead_letter_topic": "orders.dlq", "destinations": [
            {"topic": "orders.analytics", "audience": "analytics", "kek": "analytics-kek"}]}],
    }
    (tmp_path / "streamproc.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def good_order() -> dict[str, Any]:
    return {
        "order_id": "o-1", "customer_id": "c-1", "email": "a@example.com", "card_number": "4111111111111111",
        "ip_address": "192.0.2.1", "birth_date": "1990-01-31", "amount_cents": 100, "currency": "EUR",
        "placed_at": "2024-05-01T12:00:00Z",
        "shipping_address": {"street": "1 Main St", "city": "X", "postcode": "12345", "country": "DE"},
        "items": [{"sku": "s", "quantity": 1, "unit_price_cents": 100}], "coupon_code": None, "phone": None,
    }


def run_produce(ws: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    jsonl = ws / "in.jsonl"
    jsonl.write_text("".join(line + "\n" for line in lines))
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", "produce", "--config", str(ws / "streamproc.yaml"),
         "--topic", "orders", "--schema", str(ws / "schemas" / "order.avsc"), "--kek", "orders-kek",
         "--from-jsonl", str(jsonl)],
        capture_output=True, text=True, timeout=60,
    )


def error_lines(stderr: str) -> list[str]:
    """Our lines on stderr; librdkafka's own log lines (``%3|...|FAIL|``, no broker here) aside."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("%")]


def bad(field: str, value: Any) -> dict[str, Any]:
    rec = good_order()
    if "." in field:
        outer, inner = field.split(".")
        rec[outer] = {**rec[outer], inner: value}
    else:
        rec[field] = value
    return rec


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (bad("birth_date", f"{CANARY}-not-a-date"), "birth_date"),
        (bad("placed_at", f"2024-13-45T{CANARY}"), "placed_at"),
        (bad("email", 12345), "email"),
        (bad("card_number", None), "card_number"),
        (bad("shipping_address.postcode", [CANARY]), "postcode"),
    ],
    ids=["date", "timestamp", "wrong-type", "null", "nested"],
)
def test_bad_value_is_one_line_naming_line_and_field(workspace: Path, record: dict[str, Any], field: str) -> None:
    res = run_produce(workspace, ["", json.dumps(record)])  # line 1 is blank: numbering counts it
    assert res.returncode == 65, res.stderr
    err = error_lines(res.stderr)
    assert len(err) == 1, res.stderr
    assert "line 2" in err[0] and field in err[0], err[0]
    assert "Traceback" not in res.stderr
    out = res.stdout + res.stderr
    assert CANARY not in out and "12345" not in out


@pytest.mark.parametrize("line", [f'{{"email": "{CANARY}"', f'["{CANARY}"]', "\xff\xfe"], ids=["json", "array", "binary"])
def test_bad_json_line_exits_65(workspace: Path, line: str) -> None:
    res = run_produce(workspace, [line])
    assert res.returncode == 65, res.stderr
    err = error_lines(res.stderr)
    assert len(err) == 1 and "line 1" in err[0], res.stderr
    assert CANARY not in res.stderr


def test_unexpected_exception_is_one_line_without_its_message(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The top-level handler: any command's unforeseen exception prints type and place only."""
    from streamproc.cli import main as cli_main
    from streamproc.config import Config

    def boom(self: Config, **extra: Any) -> dict[str, Any]:
        raise ValueError(f"Invalid isoformat string: '{CANARY}'")

    monkeypatch.setattr(Config, "producer_config", boom)
    (workspace / "in.jsonl").write_text(json.dumps(good_order()) + "\n")
    monkeypatch.setattr(sys, "argv", [
        "streamproc", "produce", "--config", str(workspace / "streamproc.yaml"), "--topic", "orders",
        "--schema", str(workspace / "schemas" / "order.avsc"), "--kek", "orders-kek",
        "--from-jsonl", str(workspace / "in.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    assert exit_info.value.code == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError at test_cli_errors.py:" in err
    assert CANARY not in err
