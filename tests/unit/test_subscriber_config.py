"""The subscriber config: minimal (kafka, kms, schemas, audience[, topics]), validated like
the processor's, and the shipped example loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamproc.config import load_subscriber_config
from streamproc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, cfg: dict[str, object]) -> Path:
    (tmp_path / "schemas").mkdir(exist_ok=True)
    p = tmp_path / "sub.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


BASE = {
    "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
    "schemas": {"directory": "./schemas"},
    "kms": {"provider": "local", "path": "./keyring.json"},
    "audience": "analytics",
}


def test_the_shipped_example_loads() -> None:
    sc = load_subscriber_config(ROOT / "examples" / "subscriber.yaml", env={})
    assert sc.audience == "analytics"
    assert sc.topics == ("orders.analytics", "logins.analytics")
    assert sc.kafka["bootstrap.servers"] == "127.0.0.1:9092"
    assert Path(sc.schemas["directory"]).resolve() == (ROOT / "schemas").resolve()
    assert Path(sc.kms["path"]).resolve() == (ROOT / "keys" / "keyring.json").resolve()
    assert sc.consumer_config(**{"group.id": "g"})["session.timeout.ms"] == 6000


def test_minimal_and_relative_paths(tmp_path: Path) -> None:
    sc = load_subscriber_config(write(tmp_path, BASE), env={"STREAMPROC_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert sc.topics == () and sc.audience == "analytics"
    assert sc.kms["path"] == str(tmp_path.resolve() / "keyring.json")
    assert sc.kafka["bootstrap.servers"] == "127.0.0.1:1"  # the override applies


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"audience": None}, "audience: is required"),
        ({"policy": "./policy.yaml"}, "looks like a processor config"),
        ({"pipelines": []}, "looks like a processor config"),
        ({"audeince": "x"}, "did you mean 'audience'"),
        ({"topics": {"a": 1}}, "topics: must be a list"),
        ({"kms": None}, "kms: is required"),
        ({"schemas": {"directory": "./nope"}}, "schemas.directory"),
        ({"kafka": {"bootstrap.servers": "x", "enable.ssl.certificate.verification": "false"}}, "insecure"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, change: dict[str, object], message: str) -> None:
    cfg = {**BASE, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError) as exc:
        load_subscriber_config(write(tmp_path, cfg), env={})
    assert message in str(exc.value) and "sub.yaml" in str(exc.value)
