"""Offline checks of docker-compose.yml (no Docker engine here: `docker compose up` itself
cannot run, see docs/deploy.md "Validated how").

* the file validates against the Compose Specification JSON Schema that check-jsonschema
  vendors (``--builtin-schema vendor.compose-spec``);
* the wiring is asserted: images pinned, start order through health/completion
  conditions, the processor's read-only hardening, the keys the init service creates
  versus the keys the config and the producer use, and every path the config, Prometheus
  and Grafana name being mounted from a file that exists in the repository.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.conftest import ROOT, compose, load_yaml

OUR_IMAGE = re.compile(r"^streamproc:(?P<tag>[A-Za-z0-9_.-]+)$")
#: A compose variable reference that fails when unset: ``${NAME:?message}``.
ENV_REF = re.compile(r"\$\{[A-Z0-9_]+:\?[^}]*\}")
#: What every client of the compose Kafka uses: the settings the integration suite proves
#: on real Kafka (tests/integration/test_kafka_security.py, streamproc.devkafka).
PROVEN_CLIENT = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanisms": "SCRAM-SHA-512",
    "ssl.endpoint.identification.algorithm": "https",
}
DUMMY_ENV = {"KAFKA_SASL_USERNAME": "streamproc", "KAFKA_SASL_PASSWORD": "x", "KAFKA_ADMIN_PASSWORD": "x"}


def services() -> dict[str, Any]:
    return compose()["services"]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read_only) for the short volume syntax used here."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        source, target = parts[0], parts[1]
        out[target] = (source, len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path comes from (None: a named volume or not mounted)."""
    for target, (source, _) in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if not source.startswith((".", "/")):
                return None
            return ROOT / source / posixpath.relpath(container_path, target)
    return None


def covered(service: dict[str, Any], container_path: str) -> bool:
    return any(container_path == t or container_path.startswith(t.rstrip("/") + "/") for t in mounts(service))


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def config_of(service: dict[str, Any]) -> tuple[str, Path]:
    args = command(service)
    path = args[args.index("--config") + 1] if "--config" in args else "/etc/streamproc/streamproc.yaml"
    host = host_path(service, path)
    assert host is not None and host.is_file(), f"{path} is not mounted from a repository file"
    return path, host


# ----------------------------------------------------------------------------------------
def test_compose_matches_the_compose_spec() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_stack_has_every_service() -> None:
    assert set(services()) == {
        "kafka-tls", "kafka", "schema-registry", "streamproc-init", "streamproc", "producer", "prometheus", "grafana",
    }


def test_images_are_pinned_and_ours_is_built_never_pulled() -> None:
    for name, svc in services().items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: pin a tag ({image})"
        if OUR_IMAGE.match(image):
            assert svc["build"]["context"] == "." and svc["build"]["dockerfile"] == "Dockerfile", name
        else:
            assert "build" not in svc, name
    assert services()["kafka"]["image"].startswith("apache/kafka:")
    assert services()["schema-registry"]["image"].startswith("confluentinc/cp-schema-registry:")
    assert services()["prometheus"]["image"].startswith("prom/prometheus:")
    assert services()["grafana"]["image"].startswith("grafana/grafana:")
    ours = {svc["image"] for svc in services().values() if OUR_IMAGE.match(svc["image"])}
    assert len(ours) == 1, "every streamproc service must use the same local image"


def test_kafka_is_a_single_kraft_node_that_supports_transactions() -> None:
    env = services()["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"]) == "1"
    assert str(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == "1"
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"


def test_start_order_uses_health_and_completion_conditions() -> None:
    svcs = services()
    for name, svc in svcs.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in svcs, f"{name} depends on unknown {dep}"
            condition = cond["condition"]
            if condition == "service_healthy":
                hc = svcs[dep].get("healthcheck", {})
                assert hc.get("test") and not hc.get("disable"), f"{dep} has no health check for {name} to wait on"
            elif condition == "service_completed_successfully":
                assert svcs[dep].get("restart", "no") == "no", f"{dep} must be a one-shot service"
    proc = svcs["streamproc"]["depends_on"]
    assert proc["kafka"]["condition"] == "service_healthy"
    assert proc["schema-registry"]["condition"] == "service_healthy"
    assert proc["streamproc-init"]["condition"] == "service_completed_successfully"
    assert svcs["producer"]["depends_on"]["streamproc-init"]["condition"] == "service_completed_successfully"
    assert svcs["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["streamproc-init", "streamproc", "producer"])
def test_our_containers_are_hardened(name: str) -> None:
    svc = services()[name]
    assert svc["user"] == "10001:10001"
    assert svc["read_only"] is True
    assert "/tmp" in svc["tmpfs"]
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    for target, (source, read_only) in mounts(svc).items():
        if target != "/var/run/streamproc/keys" or name != "streamproc-init":
            assert read_only, f"{name}: {target} should be mounted :ro"
        else:
            assert source == "keys" and not read_only, "the init service writes the keyring"
    for value in (svc.get("environment") or {}).values():
        if ENV_REF.fullmatch(str(value)):
            continue  # a reference to the operator's environment (.env), not a value
        assert not re.search(r"(?i)token|password|secret", str(value)), "no secrets in compose"


def test_processor_health_check_hits_healthz_without_curl() -> None:
    svc = services()["streamproc"]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    assert "/healthz" in " ".join(test) and "curl" not in " ".join(test)
    config = load_yaml(config_of(svc)[1])
    assert f":{config['metrics']['port']}/healthz" in " ".join(test)
    assert svc["init"] is True, "python as PID 1 needs an init to reap and forward signals"
    # A stable instance name for transactional.id across container re-creation.
    assert svc["hostname"] == "streamproc"
    assert command(svc)[:1] == ["run"]


def test_config_is_valid_and_every_path_it_names_is_mounted(tmp_path: Path) -> None:
    config_mod = pytest.importorskip("streamproc.config")
    for name in ("streamproc", "producer", "streamproc-init"):
        svc = services()[name]
        _, host = config_of(svc)
        assert host == ROOT / "deploy" / "compose" / "streamproc.yaml"
        raw = load_yaml(host)
        policy = host_path(svc, raw["policy"])
        assert policy is not None and policy.is_file(), f"{name}: policy {raw['policy']} not mounted"
        assert policy.resolve() == (ROOT / "policy.yaml").resolve()
        assert covered(svc, raw["kms"]["path"]), f"{name}: keyring directory not mounted"
        # Validate with the processor's own loader, paths mapped to the repository.
        raw["policy"] = str(policy)
        raw["kms"]["path"] = str(tmp_path / "keyring.json")
        cfg = config_mod.parse_config(raw, base_dir=tmp_path, env=DUMMY_ENV)
        assert cfg.schemas == {"url": "http://schema-registry:8081"}
        assert cfg.processing_guarantee == "exactly_once"
    assert urlparse(load_yaml(ROOT / "deploy/compose/streamproc.yaml")["schemas"]["url"]).hostname in services()
    bootstrap = load_yaml(ROOT / "deploy/compose/streamproc.yaml")["kafka"]["bootstrap.servers"]
    assert bootstrap.split(":")[0] in services()


def _init_script() -> str:
    svc = services()["streamproc-init"]
    assert svc["entrypoint"][:2] == ["/bin/sh", "-ec"]
    return "\n".join(command(svc))


def test_init_creates_every_key_the_config_policy_and_producer_use() -> None:
    script = _init_script()
    created: dict[str, set[str]] = {"kek": set(), "secret": set()}
    for line in script.splitlines():
        args = shlex.split(line)
        if args[:3] == ["streamproc", "keys", "create"]:
            assert "--if-missing" in args, "the init service must be idempotent"
            kind = args[args.index("--kind") + 1]
            created[kind] |= {a for a in args[3:] if not a.startswith("-") and a != kind}
    config = load_yaml(ROOT / "deploy" / "compose" / "streamproc.yaml")
    policy = load_yaml(ROOT / "policy.yaml")
    producer = command(services()["producer"])
    needed_keks = {d["kek"] for p in config["pipelines"] for d in p["destinations"]}
    needed_keks.add(producer[producer.index("--kek") + 1])
    assert needed_keks <= created["kek"]
    assert set(policy.get("keys", {}).values()) <= created["secret"]
    assert "streamproc topics apply --config /etc/streamproc/streamproc.yaml" in script


def test_producer_feeds_a_source_topic_with_a_mounted_schema() -> None:
    svc = services()["producer"]
    args = command(svc)
    assert args[0] == "produce"
    config = load_yaml(config_of(svc)[1])
    sources = {t for p in config["pipelines"] for t in p["sources"]}
    assert args[args.index("--topic") + 1] in sources
    schema = host_path(svc, args[args.index("--schema") + 1])
    assert schema is not None and schema.is_file()
    assert args[args.index("--generate") + 1] == "order"
    assert float(args[args.index("--rate") + 1]) == 50


def test_published_ports_are_loopback_only() -> None:
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on 127.0.0.1 only ({port})"


# ----------------------------------------------------------------------------------------
# Prometheus and Grafana files (written alongside; read as they are at run time)
# ----------------------------------------------------------------------------------------
def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not in the tree yet")
    return path


def test_prometheus_loads_the_repository_config_and_rules() -> None:
    svc = services()["prometheus"]
    config_arg = next(a for a in svc["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    host = host_path(svc, config_path)
    assert host == ROOT / "deploy" / "prometheus" / "prometheus.yml"
    prom = load_yaml(_need(host))
    for rule_file in prom.get("rule_files", []):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(config_path), rule_file))
        src = host_path(svc, target)
        assert src is not None and src.is_file(), f"rule file {rule_file} is not mounted from the repository"
    assert host_path(svc, "/etc/prometheus/rules.yml") == ROOT / "deploy" / "prometheus" / "rules.yml"
    targets = {t for job in prom.get("scrape_configs", []) for sc in job.get("static_configs", [])
               for t in sc.get("targets", [])}
    config = load_yaml(ROOT / "deploy" / "compose" / "streamproc.yaml")
    assert f"streamproc:{config['metrics']['port']}" in targets
    # The rules select job="streamproc"; the compose scrape job must carry that name.
    jobs = {job["job_name"] for job in prom["scrape_configs"]
            if any(f"streamproc:{config['metrics']['port']}" in sc.get("targets", []) for sc in job.get("static_configs", []))}
    assert jobs == {"streamproc"}


def test_grafana_is_provisioned_from_the_repository() -> None:
    svc = services()["grafana"]
    prov = host_path(svc, "/etc/grafana/provisioning/datasources")
    assert prov == ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
    for f in sorted(_need(prov).glob("*.y*ml")):
        for ds in load_yaml(f).get("datasources", []):
            if ds.get("type") == "prometheus":
                host = urlparse(ds["url"]).hostname
                assert host in services(), f"datasource {ds['name']} points at {host}, not a compose service"
    dash_prov = _need(ROOT / "deploy" / "grafana" / "provisioning" / "dashboards")
    for f in sorted(dash_prov.glob("*.y*ml")):
        for provider in load_yaml(f).get("providers", []):
            path = provider["options"]["path"]
            src = host_path(svc, path)
            assert src == ROOT / "deploy" / "grafana" / "dashboards", f"dashboards path {path} is not the mounted dashboards"
            assert list(src.glob("*.json")), "no dashboard JSON to provision"


def test_compose_yaml_has_no_duplicate_keys() -> None:
    """PyYAML silently keeps the last of duplicate keys; compose would reject them."""

    class Strict(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [k.value if k.tag == "tag:yaml.org,2002:merge" else loader.construct_object(k) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"duplicate keys {dupes} at line {node.start_mark.line + 1}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct)
    yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=Strict)


# ----------------------------------------------------------------------------------------
# Kafka security: the settings the integration suite proves, and the ACL bootstrap
# ----------------------------------------------------------------------------------------
def _kafka_script() -> str:
    svc = services()["kafka"]
    assert svc["entrypoint"][:2] == ["/bin/sh", "-ec"]
    return "\n".join(command(svc)).replace("$$", "$")


def test_broker_runs_sasl_ssl_scram_with_the_standard_authorizer_and_no_default_allow() -> None:
    script = _kafka_script()
    env = services()["kafka"]["environment"]
    assert set(env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")) == {
        "CLIENT:SASL_SSL", "HOST:SASL_SSL", "CONTROLLER:PLAINTEXT"
    }
    assert "CONTROLLER://127.0.0.1:9093" in env["KAFKA_LISTENERS"], "the controller is loopback-only"
    for line in (
        "sasl.enabled.mechanisms=SCRAM-SHA-512",
        "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
        "ssl.endpoint.identification.algorithm=https",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        "ssl.keystore.location=/var/run/kafka-tls/kafka-keystore.pem",
        "ssl.truststore.location=/var/run/kafka-tls/ca.pem",
    ):
        assert line in script.splitlines() or any(ln.strip() == line for ln in script.splitlines()), line
    assert "kafka-tls" in services()["kafka"]["depends_on"]


def test_every_principal_of_the_config_is_a_scram_user_and_each_service_uses_its_own() -> None:
    config_mod = pytest.importorskip("streamproc.config")
    script = _kafka_script()
    users = set(re.findall(r"\[name=([A-Za-z0-9._-]+),password=", script))
    raw = load_yaml(ROOT / "deploy" / "compose" / "streamproc.yaml")
    raw["policy"] = str(ROOT / "policy.yaml")
    cfg = config_mod.parse_config(raw, base_dir=ROOT, env=DUMMY_ENV)
    assert cfg.acls is not None
    principals = {p.split(":", 1)[1] for p in cfg.acls.principals()}
    assert principals <= users, principals - users
    svcs = services()
    assert f"User:{svcs['streamproc']['environment']['KAFKA_SASL_USERNAME']}" == cfg.acls.processor
    producer = f"User:{svcs['producer']['environment']['KAFKA_SASL_USERNAME']}"
    assert producer in {p.principal for p in cfg.acls.producers}
    topic = command(svcs["producer"])[command(svcs["producer"]).index("--topic") + 1]
    assert topic in next(p.topics for p in cfg.acls.producers if p.principal == producer)
    # the registry talks to Kafka over SASL_SSL too, pinning the same CA
    sr = svcs["schema-registry"]["environment"]
    assert sr["SCHEMA_REGISTRY_KAFKASTORE_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert sr["SCHEMA_REGISTRY_KAFKASTORE_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM"] == "https"


def test_clients_use_the_proven_settings_and_pin_the_cluster_ca() -> None:
    config_mod = pytest.importorskip("streamproc.config")
    kafka = load_yaml(ROOT / "deploy" / "compose" / "streamproc.yaml")["kafka"]
    assert {k: kafka[k] for k in PROVEN_CLIENT} == PROVEN_CLIENT
    admin = config_mod.load_kafka_properties(ROOT / "deploy" / "compose" / "admin.properties", env=DUMMY_ENV)
    assert {k: admin[k] for k in PROVEN_CLIENT} == PROVEN_CLIENT
    ca = "/var/run/streamproc/kafka-tls/ca.pem"
    assert kafka["ssl.ca.location"] == ca and admin["ssl.ca.location"].endswith(ca)
    for name in ("streamproc-init", "streamproc", "producer"):
        assert covered(services()[name], ca), f"{name} does not mount the cluster CA"
        assert mounts(services()[name])["/var/run/streamproc/kafka-tls"] == ("kafka-tls", True)


def test_init_creates_topics_before_acls_both_as_admin() -> None:
    lines = [ln for ln in _init_script().splitlines() if ln.startswith("streamproc ")]
    topics = next(i for i, ln in enumerate(lines) if ln.startswith("streamproc topics apply"))
    acls = next(i for i, ln in enumerate(lines) if ln.startswith("streamproc acls apply"))
    assert topics < acls
    for i in (topics, acls):
        args = shlex.split(lines[i])
        admin = args[args.index("--admin-config") + 1]
        assert host_path(services()["streamproc-init"], admin) == ROOT / "deploy/compose/admin.properties"


def test_kafka_tls_script_makes_a_ca_and_a_broker_key_for_the_service_names(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    svc = services()["kafka-tls"]
    assert svc["cap_add"] == ["CHOWN"] and svc["cap_drop"] == ["ALL"] and svc["read_only"] is True
    script = host_path(svc, svc["entrypoint"][1])
    assert script is not None and script.is_file()
    out = tmp_path / "tls"
    for expected in ("created", "kept"):  # idempotent: a second run keeps the CA
        proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True)
        assert expected in proc.stdout
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    ks = (out / "kafka-keystore.pem").read_bytes()
    assert (out / "kafka-keystore.pem").stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in ks and b"PRIVATE KEY" not in (out / "ca.pem").read_bytes()
    leaf = x509.load_pem_x509_certificates(ks)[0]
    ca.public_key().verify(  # type: ignore[union-attr]
        leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm
    )
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"kafka", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
