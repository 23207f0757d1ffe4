"""Configuration typed end to end: validated once, policy parsed once, routes from the types.

* the policy file is parsed once between ``load_config`` and a built ``Pipeline`` (it was
  parsed two or three times: the audience check, the secret-source check, the factory);
* routes come straight from the typed ``pipelines:`` (no dict round trip);
* KMS settings are checked by one public function (:func:`validate_kms_settings`), the
  one ``load_config`` calls, and the config keeps its normalized result;
* one set of value checks (:mod:`streamproc.validation`) judges config and KMS values.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc import validation
from streamproc.config import load_config
from streamproc.crypto.kms.factory import validate_kms_settings
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import ConfigError
from streamproc.pipeline.core import Destination, Route

REPO = Path(__file__).resolve().parents[2]


def _workspace(tmp_path: Path, kms: dict[str, Any] | None = None) -> Path:
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    ring = LocalKeyring.create(tmp_path / "keys" / "keyring.json")
    for k in ("orders-kek", "analytics-kek", "fraud-kek"):
        ring.create_key(k)
    ring.create_key("pseudonym-master", "secret")
    cfg = {
        "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
        "schemas": {"directory": "./schemas"},
        "kms": kms or {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [
            {
                "sources": ["orders"],
                "dead_letter_topic": "orders.dlq",
                "source_keks": ["orders-kek"],
                "destinations": [
                    {"topic": "orders.analytics", "audience": "analytics", "kek": "analytics-kek"},
                    {"topic": "orders.fraud", "audience": "fraud", "kek": "fraud-kek"},
                ],
            }
        ],
    }
    p = tmp_path / "streamproc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_policy_is_parsed_once_from_config_to_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamproc.policy.model as model
    from streamproc.runtime.factory import build_pipeline

    calls: list[Path] = []
    real = model.load_policy

    def counting(path: Any) -> Any:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(model, "load_policy", counting)
    config = load_config(_workspace(tmp_path), env={})
    pipeline = build_pipeline(config)
    assert calls == [tmp_path / "policy.yaml"]
    assert pipeline.policy is config.load_policy()  # the one parsed object, passed down
    assert len(calls) == 1


def test_a_config_loaded_without_the_policy_check_parses_it_on_demand(tmp_path: Path) -> None:
    config = load_config(_workspace(tmp_path), env={}, check_policy=False)
    assert config.parsed_policy is None
    assert set(config.load_policy().audiences) >= {"analytics", "fraud"}


def test_routes_come_from_the_typed_pipelines(tmp_path: Path) -> None:
    from streamproc.runtime.factory import routes_from_config

    config = load_config(_workspace(tmp_path), env={})
    assert not hasattr(config, "routes_spec")  # the dict round trip is gone
    assert routes_from_config(config) == [
        Route(
            ("orders",),
            (
                Destination("orders.analytics", "analytics", "analytics-kek"),
                Destination("orders.fraud", "fraud", "fraud-kek"),
            ),
            ("orders-kek",),
        )
    ]


def test_kms_settings_are_validated_by_one_public_function(tmp_path: Path) -> None:
    vault = {"provider": "vault", "url": "https://bao.example:8200", "timeout": 10}
    assert validate_kms_settings({**vault, "revocation_check_interval": 2}) == {
        "provider": "vault",
        "url": "https://bao.example:8200",
        "timeout": 10.0,
        "revocation_check_interval": 2.0,
    }
    for bad, key in [
        ({**vault, "timeout": "10"}, "kms.timeout"),  # KMS numbers are never text
        ({**vault, "verify": "false"}, "kms.verify"),
        ({**vault, "mount_point": "transit"}, "kms.mount_point"),
        ({"provider": "hsm"}, "kms.provider"),
        ({"url": "x"}, "kms.provider"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate_kms_settings(bad)
        assert str(err.value).startswith(key), err.value
    # load_config calls the same function, names the file, and keeps the normalized form
    p = _workspace(tmp_path, {**vault, "timeout": "10"})
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    assert str(err.value).startswith(f"{p}: kms.timeout: must be a positive number")
    p.write_text(p.read_text().replace("timeout: '10'", "timeout: 10"))
    assert load_config(p, env={}, check_policy=False).kms["timeout"] == 10.0


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: validation.string("a.b", v), "  ", "a.b: must be a non-empty string, got a string"),
        (lambda v: validation.integer("a.b", v, minimum=1), "s3cr3t", "a.b: must be an integer, got a string"),
        (lambda v: validation.integer("a.b", v, minimum=1, maximum=9), 10, "a.b: must be between 1 and 9, got 10"),
        (lambda v: validation.integer("a.b", v, minimum=1, text=False), "5", "a.b: must be an integer, got a string"),
        (lambda v: validation.boolean("a.b", v), "yes", "a.b: must be true or false, got a string"),
        (lambda v: validation.boolean("a.b", v, text=False), "true", "a.b: must be true or false, got a string"),
        (lambda v: validation.positive_number("a.b", v), True, "a.b: must be a positive number, got a boolean"),
        (lambda v: validation.choice("a.b", v, ("x", "y")), "z", "a.b: must be one of x, y, got 'z'"),
    ],
)
def test_one_set_of_value_checks(check: Any, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(value)
    assert str(err.value) == message


def test_value_checks_accept_what_they_should() -> None:
    assert validation.integer("k", " 42 ", minimum=0) == 42  # ${VAR} interpolation gives text
    assert validation.boolean("k", "False") is False
    assert validation.positive_number("k", 3) == 3.0
    assert validation.choice("k", "y", ("x", "y")) == "y"


def test_config_and_kms_share_the_checks() -> None:
    """Neither the config nor the KMS factory keeps a private copy of the value checks."""
    import ast

    for path in (REPO / "streamproc" / "config.py", REPO / "streamproc" / "crypto" / "kms" / "factory.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in {"_tname", "_number"}:
                pytest.fail(f"{path}: {node.name} duplicates streamproc.validation")
            if isinstance(node, ast.FunctionDef) and node.name in {"_str", "_int", "_bool", "_choice"}:
                body = [n for n in node.body if not isinstance(n, ast.Expr)]
                calls = {
                    n.func.attr
                    for n in ast.walk(node)
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in ("validation", "functools")
                }
                assert len(body) == 1 and calls, f"{path}: {node.name} must delegate to streamproc.validation"
