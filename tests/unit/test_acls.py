"""ACL derivation (``streamproc acls``), the ``acls:`` section and the insecure-TLS guard.

Expected ACL sets are written out by hand from the rules in docs/configuration.md, not
computed with the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.config import load_config, load_kafka_properties
from streamproc.errors import ConfigError
from streamproc.runtime.acls import Acl, desired_acls, from_binding, plan, render, to_binding

REPO = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    return {
        "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
        "group_id": "sp",
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
            },
            {
                "sources": ["logins", "logins.eu"],
                "dead_letter_topic": "logins.dlq",
                "destinations": [
                    {"topic": "logins.analytics", "audience": "analytics", "kek": "analytics-kek"},
                ],
            },
        ],
        "audit": {"kafka_topic": "sp.audit"},
        "acls": {
            "processor": "User:proc",
            "audiences": {
                "analytics": {"principal": "User:ana", "group_prefix": "analytics."},
                "fraud": {"principal": "User:fra", "group_prefix": "fraud."},
            },
            "producers": [
                {"principal": "User:shop", "topics": ["orders"]},
                {"principal": "User:auth", "topics": ["logins", "logins.eu"]},
            ],
        },
    }


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    return tmp_path


def load(ws: Path, cfg: dict[str, Any]) -> Any:
    p = ws / "streamproc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_config(p, env={})


def error(ws: Path, cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        load(ws, cfg)
    return str(ei.value)


def T(principal: str, name: str, op: str) -> Acl:
    return Acl(principal, "TOPIC", "LITERAL", name, op)


# -- derivation -----------------------------------------------------------------------------------
def test_exactly_once_derivation_is_exactly_the_least_privilege_set(ws: Path) -> None:
    got = desired_acls(load(ws, base()))
    expected = {
        # processor: read sources + its group, write destinations, DLQs, audit, txn ids
        T("User:proc", "orders", "READ"),
        T("User:proc", "logins", "READ"),
        T("User:proc", "logins.eu", "READ"),
        T("User:proc", "orders.analytics", "WRITE"),
        T("User:proc", "orders.fraud", "WRITE"),
        T("User:proc", "logins.analytics", "WRITE"),
        T("User:proc", "orders.dlq", "WRITE"),
        T("User:proc", "logins.dlq", "WRITE"),
        T("User:proc", "sp.audit", "WRITE"),
        Acl("User:proc", "GROUP", "LITERAL", "sp", "READ"),
        Acl("User:proc", "TRANSACTIONAL_ID", "PREFIXED", "sp-", "WRITE"),
        # processor: the configs (max.message.bytes) of every topic it reads or writes
        T("User:proc", "orders", "DESCRIBE_CONFIGS"),
        T("User:proc", "logins", "DESCRIBE_CONFIGS"),
        T("User:proc", "logins.eu", "DESCRIBE_CONFIGS"),
        T("User:proc", "orders.analytics", "DESCRIBE_CONFIGS"),
        T("User:proc", "orders.fraud", "DESCRIBE_CONFIGS"),
        T("User:proc", "logins.analytics", "DESCRIBE_CONFIGS"),
        T("User:proc", "orders.dlq", "DESCRIBE_CONFIGS"),
        T("User:proc", "logins.dlq", "DESCRIBE_CONFIGS"),
        # audiences: their own sanitized topics, their own group prefix
        T("User:ana", "orders.analytics", "READ"),
        T("User:ana", "logins.analytics", "READ"),
        Acl("User:ana", "GROUP", "PREFIXED", "analytics.", "READ"),
        T("User:fra", "orders.fraud", "READ"),
        Acl("User:fra", "GROUP", "PREFIXED", "fraud.", "READ"),
        # producers: write their sources only
        T("User:shop", "orders", "WRITE"),
        T("User:auth", "logins", "WRITE"),
        T("User:auth", "logins.eu", "WRITE"),
    }
    assert set(got) == expected
    assert len(got) == len(expected)  # no duplicates
    assert got == sorted(got)


def test_at_least_once_needs_no_transactional_id_and_no_cluster_right(ws: Path) -> None:
    cfg = base()
    cfg["processing_guarantee"] = "at_least_once"
    del cfg["audit"]
    got = set(desired_acls(load(ws, cfg)))
    assert not any(a.resource_type in ("TRANSACTIONAL_ID", "CLUSTER") for a in got)
    assert T("User:proc", "sp.audit", "WRITE") not in got
    assert Acl("User:proc", "GROUP", "LITERAL", "sp", "READ") in got


def test_retention_monitor_gets_describe_configs_on_governed_topics_only(ws: Path) -> None:
    cfg = base()  # the audit topic is described only when its retention is governed
    cfg["topics"] = {"overrides": {"sp.audit": {"config": {"retention.ms": "86400000"}}}}
    extra = set(desired_acls(load(ws, cfg))) - set(desired_acls(load(ws, base())))
    assert extra == {T("User:proc", "sp.audit", "DESCRIBE_CONFIGS")}
    cfg["topics"]["retention_check_interval_seconds"] = 0  # monitor off: no need
    assert set(desired_acls(load(ws, cfg))) == set(desired_acls(load(ws, base())))
    cfg = base()
    cfg["topics"] = {"defaults": {"config": {"retention.ms": "604800000"}}}
    extra = set(desired_acls(load(ws, cfg))) - set(desired_acls(load(ws, base())))
    assert extra == {T("User:proc", "sp.audit", "DESCRIBE_CONFIGS")}  # the rest: see above


def test_no_one_but_the_processor_writes_sanitized_topics_and_reads_sources(ws: Path) -> None:
    got = desired_acls(load(ws, base()))
    sanitized = {"orders.analytics", "orders.fraud", "logins.analytics"}
    for a in got:
        assert a.permission == "ALLOW" and a.host == "*"
        assert a.operation in ("READ", "WRITE", "DESCRIBE_CONFIGS")
        if a.resource_type == "TOPIC" and a.name in sanitized and a.operation == "WRITE":
            assert a.principal == "User:proc"
        if (
            a.resource_type == "TOPIC"
            and a.name in {"orders", "logins", "logins.eu", "orders.dlq", "logins.dlq"}
            and a.operation == "READ"
        ):
            assert a.principal == "User:proc"
        assert a.name != "*"


def test_acls_section_required_for_derivation(ws: Path) -> None:
    cfg = base()
    del cfg["acls"]
    with pytest.raises(ConfigError, match="acls: is required"):
        desired_acls(load(ws, cfg))


# -- the acls: section ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, where, what",
    [
        (lambda a: a.pop("processor"), "acls.processor", "is required"),
        (lambda a: a.update(processor="proc"), "acls.processor", "Kafka principal"),
        (lambda a: a.update(processor="User:*"), "acls.processor", "every user"),
        (lambda a: a.update(extra=1), "acls.extra", "unknown setting"),
        (
            lambda a: a["audiences"].update(support={"principal": "User:s", "group_prefix": "s."}),
            "acls.audiences.support",
            "not the audience of any destination",
        ),
        (
            lambda a: a["audiences"]["fraud"].update(principal="User:ana"),
            "acls.audiences.fraud.principal",
            "one role per principal",
        ),
        (
            lambda a: a["audiences"]["fraud"].update(principal="User:proc"),
            "acls.audiences.fraud.principal",
            "one role per principal",
        ),
        (
            lambda a: a["producers"][0].update(principal="User:ana"),
            "acls.producers[0].principal",
            "one role per principal",
        ),
        (
            lambda a: a["producers"][0].update(topics=["orders.analytics"]),
            "acls.producers[0].topics[0]",
            "not a source topic",
        ),
        (
            lambda a: a["audiences"]["fraud"].update(group_prefix="analytics.x"),
            "acls.audiences.fraud.group_prefix",
            "overlaps the group prefix of audience 'analytics'",
        ),
        (
            lambda a: a["audiences"]["fraud"].update(group_prefix="s"),
            "acls.audiences.fraud.group_prefix",
            "processor's group",
        ),
        (
            lambda a: a["audiences"]["fraud"].update(group_prefix="sp-x"),
            "acls.audiences.fraud.group_prefix",
            "transactional",
        ),
        (
            lambda a: a["audiences"]["fraud"].pop("group_prefix"),
            "acls.audiences.fraud.group_prefix",
            "is required",
        ),
        (lambda a: a.update(producers={"User:x": ["orders"]}), "acls.producers", "must be a list"),
    ],
)
def test_acls_section_errors(ws: Path, mutate: Any, where: str, what: str) -> None:
    cfg = base()
    mutate(cfg["acls"])
    msg = error(ws, cfg)
    assert f": {where}: " in msg and what in msg, msg


# -- plan -----------------------------------------------------------------------------------------------
def test_plan_against_an_empty_cluster_adds_everything(ws: Path) -> None:
    config = load(ws, base())
    p = plan(config, [])
    assert set(p.add) == set(desired_acls(config)) and not p.present and not p.broader
    assert render(p)[-1].startswith("27 to add, 0 unchanged, 0 broader")


def test_plan_after_apply_adds_nothing(ws: Path) -> None:
    config = load(ws, base())
    p = plan(config, desired_acls(config))
    assert not p.add and len(p.present) == 27 and not p.broader


def test_plan_reports_what_is_broader_than_needed(ws: Path) -> None:
    config = load(ws, base())
    existing = [
        *desired_acls(config),
        Acl("User:ana", "TOPIC", "LITERAL", "orders.fraud", "READ"),  # another audience's topic
        Acl("User:ana", "TOPIC", "LITERAL", "*", "READ"),  # wildcard topic
        Acl("User:proc", "TOPIC", "PREFIXED", "orders", "ALL"),  # prefixed + ALL
        Acl("User:*", "TOPIC", "LITERAL", "orders.dlq", "READ"),  # everyone reads the DLQ
        Acl("User:mallory", "GROUP", "PREFIXED", "analytics", "READ"),  # covers analytics.*
        Acl("User:proc", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE"),
        Acl("User:ana", "TOPIC", "LITERAL", "orders.fraud", "READ", permission="DENY"),  # narrows
        Acl("User:other", "TOPIC", "LITERAL", "payments", "READ"),  # unrelated: not ours
    ]
    p = plan(config, existing)
    assert not p.add
    got = {b.acl: b.reasons for b in p.broader}
    assert set(got) == {
        Acl("User:ana", "TOPIC", "LITERAL", "orders.fraud", "READ"),
        Acl("User:ana", "TOPIC", "LITERAL", "*", "READ"),
        Acl("User:proc", "TOPIC", "PREFIXED", "orders", "ALL"),
        Acl("User:*", "TOPIC", "LITERAL", "orders.dlq", "READ"),
        Acl("User:mallory", "GROUP", "PREFIXED", "analytics", "READ"),
        Acl("User:proc", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE"),
    }
    assert got[Acl("User:ana", "TOPIC", "LITERAL", "*", "READ")] == (
        "wildcard resource '*'",
        "not needed by the config",
    )
    assert "operation ALL" in got[Acl("User:proc", "TOPIC", "PREFIXED", "orders", "ALL")]
    assert got[Acl("User:*", "TOPIC", "LITERAL", "orders.dlq", "READ")] == (
        "wildcard principal (every user)",
    )
    assert got[Acl("User:mallory", "GROUP", "PREFIXED", "analytics", "READ")] == (
        "principal not named in acls:",
        "prefixed pattern not derived from the config",
    )
    text = "\n".join(render(p))
    assert "! User:* ALLOW READ on TOPIC 'orders.dlq'" in text
    assert text.endswith(
        "0 to add, 27 unchanged, 6 broader than needed (review; --prune deletes them)."
    )


def test_plan_warns_about_an_audience_nobody_can_read(ws: Path) -> None:
    cfg = base()
    del cfg["acls"]["audiences"]["fraud"]
    p = plan(load(ws, cfg), [])
    assert p.warnings == (
        "audience 'fraud' has no principal in acls.audiences: nobody can read its topics",
    )


def test_bindings_round_trip_through_confluent_kafka() -> None:
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    a = Acl("User:proc", "TRANSACTIONAL_ID", "PREFIXED", "sp-", "WRITE")
    b = to_binding(a)
    assert b == AclBinding(
        ResourceType.TRANSACTIONAL_ID,
        "sp-",
        ResourcePatternType.PREFIXED,
        "User:proc",
        "*",
        AclOperation.WRITE,
        AclPermissionType.ALLOW,
    )
    assert from_binding(b) == a
    c = Acl("User:proc", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE")
    assert to_binding(c).restype == ResourceType.BROKER and from_binding(to_binding(c)) == c


# -- insecure TLS is never silent -------------------------------------------------------------------
@pytest.mark.parametrize(
    "section, key, value",
    [
        ("kafka", "enable.ssl.certificate.verification", False),
        ("kafka", "enable.ssl.certificate.verification", "false"),
        ("consumer", "enable.ssl.certificate.verification", "0"),
        ("producer", "ssl.endpoint.identification.algorithm", "none"),
        ("kafka", "ssl.endpoint.identification.algorithm", "NONE"),
    ],
)
def test_disabling_kafka_verification_needs_insecure(
    ws: Path, section: str, key: str, value: Any
) -> None:
    cfg = base()
    cfg.setdefault(section, {})[key] = value
    msg = error(ws, cfg)
    assert f": {section}.{key}: disables TLS certificate verification" in msg
    assert "kafka.insecure: true" in msg
    assert load(ws, base()).insecure_transport == ()
    cfg["kafka"]["insecure"] = True
    config = load(ws, cfg)
    assert config.insecure_transport == ("kafka",)
    assert "insecure" not in config.kafka  # never handed to librdkafka


def test_verification_left_on_is_not_insecure(ws: Path) -> None:
    cfg = base()
    cfg["kafka"].update(
        {
            "enable.ssl.certificate.verification": True,
            "ssl.endpoint.identification.algorithm": "https",
        }
    )
    assert load(ws, cfg).insecure_transport == ()
    cfg["consumer"] = {"insecure": True}
    assert "consumer.insecure: set kafka.insecure instead" in error(ws, cfg)


def test_kms_verify_false_needs_insecure(ws: Path) -> None:
    cfg = base()
    cfg["kms"] = {"provider": "vault", "url": "https://127.0.0.1:8200", "verify": False}
    assert "kms.verify: false disables TLS certificate verification" in error(ws, cfg)
    cfg["kms"]["insecure"] = True
    assert load(ws, cfg).insecure_transport == ("kms",)


def test_worker_warns_and_sets_the_gauge(ws: Path, caplog: pytest.LogCaptureFixture) -> None:
    """run_worker reports insecure transport before anything else (then fails on the keyring)."""
    from prometheus_client import generate_latest

    from streamproc.observability.metrics import Metrics
    from streamproc.runtime.app import run_worker

    cfg = base()
    cfg["kafka"].update({"insecure": True, "ssl.endpoint.identification.algorithm": "none"})
    config = load(ws, cfg)
    m = Metrics(anomaly=False)
    before = generate_latest(m.registry).decode()
    assert 'streamproc_insecure_transport{component="kafka"} 0.0' in before
    with caplog.at_level("WARNING", logger="streamproc.runtime.worker"), pytest.raises(ConfigError):
        run_worker(config, observer=m, install_signals=False)  # no keyring in ws: stops there
    text = generate_latest(m.registry).decode()
    assert 'streamproc_insecure_transport{component="kafka"} 1.0' in text
    assert 'streamproc_insecure_transport{component="kms"} 0.0' in text
    assert any("verification is OFF for kafka" in r.getMessage() for r in caplog.records)


def test_admin_properties_file(tmp_path: Path) -> None:
    f = tmp_path / "admin.properties"
    f.write_text(
        "# admin\nsecurity.protocol=SASL_SSL\nsasl.mechanisms = SCRAM-SHA-512\n"
        "sasl.username=admin\nsasl.password=${ADMIN_PW}\nssl.ca.location=ca.pem\n"
    )
    conf = load_kafka_properties(f, env={"ADMIN_PW": "pw=with=equals"})
    assert conf == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "admin",
        "sasl.password": "pw=with=equals",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
    }
    with pytest.raises(ConfigError, match="ADMIN_PW is not set"):
        load_kafka_properties(f, env={})
    f.write_text("enable.ssl.certificate.verification=false\n")
    with pytest.raises(ConfigError, match="set insecure=true"):
        load_kafka_properties(f, env={})
    f.write_text("enable.ssl.certificate.verification=false\ninsecure=true\n")
    assert load_kafka_properties(f, env={}) == {"enable.ssl.certificate.verification": "false"}
    f.write_text("no equals sign\n")
    with pytest.raises(ConfigError, match="line 1: expected key=value"):
        load_kafka_properties(f, env={})


def test_cli_refuses_a_config_without_acls(ws: Path) -> None:
    from streamproc.cli.main import cli

    cfg = base()
    del cfg["acls"]
    p = ws / "streamproc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(cli, ["acls", "plan", "--config", str(p)])
    assert res.exit_code == 1 and "acls: is required" in res.output


def test_registry_verification_off_needs_insecure(ws: Path) -> None:
    cfg = base()
    cfg["schemas"] = {"url": "https://registry.example:8081", "ssl.ca.location": False}
    msg = error(ws, cfg)
    assert ": schemas.ssl.ca.location: false disables TLS certificate verification" in msg
    assert "schemas.insecure: true" in msg
    cfg["schemas"]["insecure"] = True
    config = load(ws, cfg)
    assert config.insecure_transport == ("schema_registry",)
    assert config.schemas == {"url": "https://registry.example:8081", "ssl.ca.location": False}
    cfg["schemas"] = {"url": "https://registry.example:8081", "ssl.ca.location": "/etc/ca.pem"}
    assert load(ws, cfg).insecure_transport == ()


def test_registry_insecure_really_is_what_turns_checks_off() -> None:
    """The setting refused above is the one confluent-kafka's client obeys."""
    import ssl

    from confluent_kafka.schema_registry import SchemaRegistryClient

    off = SchemaRegistryClient({"url": "https://127.0.0.1:1", "ssl.ca.location": False})
    on = SchemaRegistryClient({"url": "https://127.0.0.1:1"})
    assert off._rest_client.verify.verify_mode == ssl.CERT_NONE
    assert on._rest_client.verify.verify_mode == ssl.CERT_REQUIRED
