"""The processor config: validation messages, env interpolation, overrides, paths."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.config import load_config, parse_config
from streamproc.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    return {
        "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
        "group_id": "g",
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [
            {
                "sources": ["orders"],
                "dead_letter_topic": "orders.dlq",
                "destinations": [
                    {"topic": "orders.analytics", "audience": "analytics", "kek": "analytics-kek"},
                    {"topic": "orders.fraud", "audience": "fraud", "kek": "fraud-kek"},
                ],
            }
        ],
    }


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    return tmp_path


def write(ws: Path, cfg: Any, name: str = "streamproc.yaml") -> Path:
    p = ws / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def error(ws: Path, cfg: Any, env: dict[str, str] | None = None) -> str:
    p = write(ws, cfg)
    with pytest.raises(ConfigError) as ei:
        load_config(p, env=env or {})
    msg = str(ei.value)
    assert msg.startswith(str(p)), msg  # every message names the file first
    return msg


def test_minimal_config_defaults_and_relative_paths(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(ws, base())
    monkeypatch.chdir("/")  # relative paths are anchored at the file, not the cwd
    c = load_config(p, env={})
    assert c.group_id == "g" and c.exactly_once
    assert c.batch_max_records == 2000 and c.batch_max_wait_ms == 100
    assert c.max_record_bytes is None  # derived at start-up from producer and topic limits
    assert c.dead_letter_kek == "quarantine-kek"
    assert Path(c.schemas["directory"]) == ws / "schemas"
    assert Path(c.kms["path"]) == ws / "keys" / "keyring.json"
    assert c.policy == ws / "policy.yaml"
    assert c.source_topics == ["orders"]
    assert c.destination_topics == ["orders.analytics", "orders.fraud"]
    assert c.all_topics() == ["orders", "orders.analytics", "orders.fraud", "orders.dlq"]
    assert c.dead_letter_topic_for("orders") == "orders.dlq"
    assert c.metrics.port == 9464 and c.logging.format == "json"
    assert c.topics.for_topic("x").partitions == 6


def test_example_config_is_valid() -> None:
    c = load_config(REPO / "examples" / "streamproc.yaml", env={})
    assert set(c.source_topics) == {"orders", "logins"}
    assert all(p.dead_letter_topic for p in c.pipelines)
    assert c.topics.for_topic("orders.dlq").config["retention.ms"] == "2592000000"


def test_env_interpolation(ws: Path) -> None:
    cfg = base()
    cfg["kafka"] = {
        "bootstrap.servers": "${BROKERS}",
        "sasl.password": "${SASL_PASSWORD:-dev-secret}",
        "client.id": "sp-${REGION:-eu}-$${literal}",
    }
    cfg["group_id"] = "${GROUP}"
    c = load_config(write(ws, cfg), env={"BROKERS": "b1:9092,b2:9092", "GROUP": "prod"})
    assert c.kafka["bootstrap.servers"] == "b1:9092,b2:9092"
    assert c.kafka["sasl.password"] == "dev-secret"
    assert c.kafka["client.id"] == "sp-eu-${literal}"
    assert c.group_id == "prod"


def test_unset_env_variable_names_the_key(ws: Path) -> None:
    cfg = base()
    cfg["kafka"]["sasl.password"] = "${NOPE}"
    msg = error(ws, cfg)
    assert "kafka.sasl.password" in msg and "NOPE" in msg


def test_env_overrides_win(ws: Path) -> None:
    cfg = base()
    cfg["metrics"] = {"port": 1}
    c = load_config(
        write(ws, cfg),
        env={
            "STREAMPROC_BOOTSTRAP_SERVERS": "k:9093",
            "STREAMPROC_SCHEMA_REGISTRY_URL": "http://registry:8081",
            "STREAMPROC_METRICS_PORT": "9999",
        },
    )
    assert c.kafka["bootstrap.servers"] == "k:9093"
    assert dict(c.schemas) == {"url": "http://registry:8081"}
    assert c.metrics.port == 9999


def test_bootstrap_may_come_from_env_only(ws: Path) -> None:
    cfg = base()
    del cfg["kafka"]
    assert load_config(write(ws, cfg), env={"STREAMPROC_BOOTSTRAP_SERVERS": "x:1"}).kafka == {
        "bootstrap.servers": "x:1"
    }
    assert "kafka.bootstrap.servers" in error(ws, cfg)


def test_ssl_locations_resolve_against_the_file(ws: Path) -> None:
    cfg = base()
    cfg["kafka"].update({"security.protocol": "SSL", "ssl.ca.location": "certs/ca.pem"})
    c = load_config(write(ws, cfg), env={})
    assert c.kafka["ssl.ca.location"] == str(ws / "certs" / "ca.pem")
    assert c.kafka["security.protocol"] == "SSL"


@pytest.mark.parametrize(
    ("mutate", "where", "what"),
    [
        (lambda c: c.update(pipelinez=[]), "pipelinez", "did you mean 'pipelines'"),
        (
            lambda c: c.update(processing_guarantee="twice"),
            "processing_guarantee",
            "exactly_once, at_least_once",
        ),
        (lambda c: c.update(batch={"max_records": 0}), "batch.max_records", "between 1 and"),
        (
            lambda c: c.update(batch={"max_record": 5}),
            "batch.max_record",
            "did you mean 'max_records'",
        ),
        (lambda c: c.update(max_record_bytes="big"), "max_record_bytes", "integer"),
        (lambda c: c["kafka"].update({"group.id": "x"}), "kafka.group.id", "group_id"),
        (
            lambda c: c.update(consumer={"isolation.level": "read_uncommitted"}),
            "consumer.isolation.level",
            "read_committed",
        ),
        (
            lambda c: c.update(producer={"transactional.id": "t"}),
            "producer.transactional.id",
            "worker index",
        ),
        (lambda c: c["kafka"].update({"sasl": {"x": 1}}), "kafka.sasl", "scalars"),
        (
            lambda c: c.update(schemas={"directory": "./nope"}),
            "schemas.directory",
            "not a directory",
        ),
        (
            lambda c: c.update(schemas={"directory": "./schemas", "url": "http://x"}),
            "schemas",
            "exactly one",
        ),
        (lambda c: c.update(schemas={"url": "registry:8081"}), "schemas.url", "http://"),
        (lambda c: c.update(kms={"provider": "hsm"}), "kms.provider", "unknown provider"),
        (lambda c: c.update(kms={"provider": "local", "pth": "x"}), "kms.pth", "unknown setting"),
        (lambda c: c.update(policy="./missing.yaml"), "policy", "does not exist"),
        (lambda c: c.pop("pipelines"), "pipelines", "is required"),
        (
            lambda c: c["pipelines"][0].pop("dead_letter_topic"),
            "pipelines[0].dead_letter_topic",
            "is required",
        ),
        (lambda c: c["pipelines"][0].update(sources=[]), "pipelines[0].sources", "non-empty"),
        (
            lambda c: c["pipelines"][0]["destinations"][1].update(audience="fraud2"),
            "pipelines[0].destinations[1].audience",
            "'fraud2' is not an audience of policy.yaml (have: analytics, fraud, support)",
        ),
        (
            lambda c: c["pipelines"][0]["destinations"][0].pop("kek"),
            "pipelines[0].destinations[0].kek",
            "is required",
        ),
        (
            lambda c: c["pipelines"][0]["destinations"][0].update(topic="orders"),
            "pipelines[0].destinations[0].topic",
            "also a source",
        ),
        (
            lambda c: c["pipelines"].append(dict(c["pipelines"][0])),
            "pipelines[1].sources[0]",
            "already a source of pipelines[0]",
        ),
        (
            lambda c: c["pipelines"][0].update(dead_letter_topic="orders"),
            "pipelines[0].dead_letter_topic",
            "also a source",
        ),
        (
            lambda c: c.update(topics={"defaults": {"partitions": 0}}),
            "topics.defaults.partitions",
            ">= 1",
        ),
        (
            lambda c: c.update(topics={"overrides": {"t": {"config": {"a": [1]}}}}),
            "topics.overrides.t.config.a",
            "scalars",
        ),
        (lambda c: c.update(metrics={"port": 70000}), "metrics.port", "between 0 and 65535"),
        (lambda c: c.update(logging={"level": "LOUD"}), "logging.level", "DEBUG"),
        (lambda c: c.update(logging={"format": "xml"}), "logging.format", "json"),
    ],
)
def test_precise_errors(ws: Path, mutate: Any, where: str, what: str) -> None:
    cfg = base()
    mutate(cfg)
    msg = error(ws, cfg)
    assert f": {where}: " in msg or f": {where} " in msg or msg.split(": ")[1].startswith(where), (
        msg
    )
    assert what in msg, msg


def test_yaml_syntax_error_has_line(ws: Path) -> None:
    msg = error(ws, "kafka: {bootstrap.servers: x\npolicy: [\n")
    assert "not valid YAML at line" in msg


def test_top_level_must_be_mapping(ws: Path) -> None:
    assert "must be a mapping" in error(ws, "- a\n- b\n")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/streamproc.yaml")


def test_producer_and_consumer_sections_merge(ws: Path) -> None:
    cfg = base()
    cfg["consumer"] = {"session.timeout.ms": 6000}
    cfg["producer"] = {"linger.ms": 20}
    c = load_config(write(ws, cfg), env={})
    assert c.consumer_config()["session.timeout.ms"] == 6000
    assert "session.timeout.ms" not in c.producer_config()
    assert c.producer_config(**{"acks": "all"})["linger.ms"] == 20


def test_topic_overrides_merge_with_defaults(ws: Path) -> None:
    cfg = base()
    cfg["topics"] = {
        "defaults": {
            "partitions": 3,
            "replication_factor": 3,
            "config": {"retention.ms": "1", "min.insync.replicas": 2},
        },
        "overrides": {"orders.dlq": {"partitions": 1, "config": {"retention.ms": "2"}}},
    }
    c = load_config(write(ws, cfg), env={})
    dlq = c.topics.for_topic("orders.dlq")
    assert (dlq.partitions, dlq.replication_factor) == (1, 3)
    assert dict(dlq.config) == {"retention.ms": "2", "min.insync.replicas": "2"}


def test_parse_config_from_mapping(ws: Path) -> None:
    c = parse_config(base(), base_dir=ws, env={})
    assert Path(c.schemas["directory"]) == ws / "schemas"


def test_human_log_format_alias(ws: Path) -> None:
    cfg = base()
    cfg["logging"] = {"level": "warning", "format": "human"}
    c = load_config(write(ws, cfg), env={})
    assert c.logging.level == "WARNING" and c.logging.format == "human"


# -- liveness timeout and the quarantine KEK ----------------------------------------------------
def test_liveness_timeout_default_is_derived_from_batch_wait_and_transaction_timeout(
    ws: Path,
) -> None:
    # librdkafka's documented transaction.timeout.ms default is 60000 ms.
    c = load_config(write(ws, base()), env={})
    assert c.liveness_timeout == pytest.approx(2 * (0.1 + 60.0))
    cfg = base()
    cfg["producer"] = {"transaction.timeout.ms": 10_000}
    cfg["batch"] = {"max_wait_ms": 500}
    assert load_config(write(ws, cfg), env={}).liveness_timeout == pytest.approx(21.0)


def test_liveness_timeout_is_configurable_and_validated(ws: Path) -> None:
    cfg = base()
    cfg["metrics"] = {"liveness_timeout_seconds": 300}
    assert load_config(write(ws, cfg), env={}).liveness_timeout == 300.0
    cfg["metrics"] = {"liveness_timeout_seconds": 30}  # below a healthy 60 s commit
    msg = error(ws, cfg)
    assert "metrics.liveness_timeout_seconds" in msg and "longest healthy step" in msg
    cfg["producer"] = {"transaction.timeout.ms": 5000}
    assert load_config(write(ws, cfg), env={}).liveness_timeout == 30.0
    cfg["metrics"] = {"liveness_timeout_seconds": 0}
    assert "metrics.liveness_timeout_seconds" in error(ws, cfg)


def test_dead_letter_kek_must_not_be_an_audience_kek(ws: Path) -> None:
    cfg = base()
    cfg["dead_letter"] = {"kek": "ir-quarantine"}
    assert load_config(write(ws, cfg), env={}).dead_letter_kek == "ir-quarantine"
    cfg["dead_letter"] = {"kek": "fraud-kek"}
    msg = error(ws, cfg)
    assert "dead_letter.kek" in msg and "audience KEK" in msg
    cfg["dead_letter"] = {"keks": "x"}
    assert "dead_letter.keks" in error(ws, cfg)


def test_max_record_bytes_is_optional(ws: Path) -> None:
    cfg = base()
    cfg["max_record_bytes"] = 500_000
    assert load_config(write(ws, cfg), env={}).max_record_bytes == 500_000
    cfg["max_record_bytes"] = 10
    assert "max_record_bytes" in error(ws, cfg)


def test_source_keks_reach_the_routes(ws: Path) -> None:
    from streamproc.runtime.factory import routes_from_config

    cfg = base()
    cfg["pipelines"][0]["source_keks"] = ["orders-kek", "orders-kek-2024"]
    cfg["kms"]["revocation_check_interval"] = 2
    c = load_config(write(ws, cfg), env={})
    assert c.pipelines[0].source_keks == ("orders-kek", "orders-kek-2024")
    (route,) = routes_from_config(c)
    assert route.source_keks == ("orders-kek", "orders-kek-2024")
    assert c.kms["revocation_check_interval"] == 2
    from streamproc.observability.metrics import KnownLabels

    assert {"orders-kek", "orders-kek-2024"} <= KnownLabels.from_config(c).kek_ids  # metric labels
    del cfg["pipelines"][0]["source_keks"]
    (route,) = routes_from_config(load_config(write(ws, cfg), env={}))
    assert route.source_keks is None  # default: any KEK not configured for another role


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (["analytics-kek"], "is a destination KEK"),
        ([], "non-empty list"),
        ("orders-kek", "non-empty list"),
        ([""], "non-empty string"),
    ],
)
def test_source_keks_errors(ws: Path, value: Any, what: str) -> None:
    cfg = base()
    cfg["pipelines"][0]["source_keks"] = value
    msg = error(ws, cfg)
    assert "pipelines[0].source_keks" in msg and what in msg, msg


def test_revocation_check_interval_must_be_positive(ws: Path) -> None:
    cfg = base()
    cfg["kms"]["revocation_check_interval"] = 0
    assert "kms.revocation_check_interval" in error(ws, cfg)
