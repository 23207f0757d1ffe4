"""Offline checks of the Kubernetes manifests (k8s/).

What runs where:

* ``kubectl kustomize`` renders base, dev and prod (integration: needs the kubectl binary;
  skipped when it is missing);
* ``kubernetes-validate --strict`` validates every rendered object of a core kind against
  the Kubernetes 1.30 OpenAPI schemas it ships;
* CRDs (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) are not in
  kubernetes-validate: they are validated against the minimal structural schemas in
  ``tests/deploy/schemas`` and by the assertions below;
* the rest are plain assertions on the rendered objects: Pod Security "restricted",
  probes, resources, network policy, secrets, autoscaling bounds, config loading.
"""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import (
    CRD_KINDS,
    K8S,
    OVERLAYS,
    ROOT,
    load_yaml,
    of_kind,
    only,
    render,
)

K8S_VERSION = "1.30.0"
UID = 10001
METRICS_PORT = 9464

needs_kubectl = pytest.mark.integration


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        spec = o.get("spec", {})
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", spec["template"]["spec"]
        elif o["kind"] == "CronJob":
            yield f"CronJob/{o['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield f"Pod/{o['metadata']['name']}", spec


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standard "restricted" (latest) checks, as the admission plugin runs them."""
    out: list[str] = []
    psc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"pod: {flag} must not be true")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: type {sorted(kinds)} not allowed")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    for sysctl in psc.get("sysctls", []):
        out.append(f"pod: sysctl {sysctl.get('name')} (none are needed)")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    for c in all_containers(pod):
        name = c["name"]
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (got {seccomp})")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        if sc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
            out.append(f"{name}: seLinuxOptions.type")
    return out


def rendered_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("streamproc-config"))
    return yaml.safe_load(cm["data"]["streamproc.yaml"])


def processor(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, main container) of the processor Deployment."""
    pod = only(objs, "Deployment", "streamproc")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "streamproc")


def source_partitions(config: dict[str, Any]) -> int:
    """The smallest partition count among source topics, as `topics apply` creates them."""
    topics = config.get("topics", {})
    default = topics.get("defaults", {}).get("partitions", 6)
    overrides = topics.get("overrides", {}) or {}
    sources = [t for p in config["pipelines"] for t in p["sources"]]
    return min((overrides.get(t, {}) or {}).get("partitions", default) for t in sources)


# ----------------------------------------------------------------------------------------
# rendering and schema validation
# ----------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders(overlay: str) -> None:
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "Deployment", "Service", "ConfigMap", "NetworkPolicy",
            "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= kinds
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"streamproc"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(overlay: str, tmp_path: Path) -> None:
    """Every core object against the Kubernetes 1.30 schemas, unknown fields rejected."""
    files = []
    for i, obj in enumerate(render(overlay)):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        f = tmp_path / f"{i:02d}-{obj['kind']}-{obj['metadata']['name']}.yaml"
        f.write_text(yaml.safe_dump(obj))
        files.append(str(f))
    assert files
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", K8S_VERSION, *files],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_crds_match_structural_schemas(overlay: str) -> None:
    objs = render(overlay)
    seen = set()
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key not in CRD_KINDS:
            continue
        seen.add(obj["kind"])
        schema = json.loads((Path(__file__).parent / "schemas" / CRD_KINDS[key]).read_text())
        jsonschema.Draft202012Validator(schema).validate(obj)
    assert {"ServiceMonitor", "PrometheusRule"} <= seen
    # Every other object must be of a built-in API group, i.e. covered by kubernetes-validate.
    def group(api_version: str) -> str:
        return api_version.split("/")[0] if "/" in api_version else ""

    unknown = {
        (o["apiVersion"], o["kind"]) for o in objs
        if (o["apiVersion"], o["kind"]) not in CRD_KINDS
        and group(o["apiVersion"]) not in ("", "apps", "batch", "policy", "autoscaling")
        and not group(o["apiVersion"]).endswith(".k8s.io")
    }
    assert not unknown, f"CRD kinds without a structural schema in tests/deploy/schemas: {unknown}"


def test_structural_schema_rejects_a_numeric_keda_metadata_value() -> None:
    """The schemas are not vacuous: KEDA's map[string]string metadata is enforced."""
    schema = json.loads((Path(__file__).parent / "schemas" / "scaledobject.json").read_text())
    obj = load_yaml(K8S / "base" / "scaledobject.yaml")
    jsonschema.Draft202012Validator(schema).validate(obj)
    obj["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 20000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(obj)


# ----------------------------------------------------------------------------------------
# Pod Security "restricted", probes, resources, volumes
# ----------------------------------------------------------------------------------------
def test_restricted_checker_catches_violations() -> None:
    bad = {
        "hostNetwork": True,
        "securityContext": {},
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "securityContext": {"privileged": True}, "ports": [{"containerPort": 1, "hostPort": 1}]}],
    }
    problems = "\n".join(restricted_violations(bad))
    for needle in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "drop ALL",
                   "runAsNonRoot", "seccompProfile", "hostPort"):
        assert needle in problems


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_profile(overlay: str) -> None:
    objs = render(overlay)
    templates = list(pod_templates(objs))
    assert templates
    for where, pod in templates:
        assert restricted_violations(pod) == [], where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == UID and psc["runAsGroup"] == UID and psc["fsGroup"] == UID
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in all_containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted(overlay: str) -> None:
    ns = only(render(overlay), "Namespace")
    assert ns["metadata"]["name"] == "streamproc"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dedicated_service_account_without_token(overlay: str) -> None:
    objs = render(overlay)
    pod, _ = processor(objs)
    sa = only(objs, "ServiceAccount", pod["serviceAccountName"])
    assert sa["metadata"]["name"] == "streamproc"
    assert sa["automountServiceAccountToken"] is False
    assert not of_kind(objs, "RoleBinding") and not of_kind(objs, "ClusterRoleBinding")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_resources_and_drain(overlay: str) -> None:
    objs = render(overlay)
    pod, main = processor(objs)
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in main["ports"]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    for c in all_containers(pod):
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), f"{c['name']}: {part}"
    # A per-pod instance identity for the transactional.id (replicas must not share one).
    env = {e["name"]: e for e in main.get("env", [])}
    assert env["STREAMPROC_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The supervisor gives workers 60 s to drain; the pod must wait longer than that.
    assert pod["terminationGracePeriodSeconds"] >= 60
    # The metrics port must be the one the config serves on.
    assert rendered_config(objs)["metrics"]["port"] == METRICS_PORT
    svc = only(objs, "Service", "streamproc-metrics")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]
    labels = only(objs, "Deployment", "streamproc")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes_and_config_paths_are_mounted(overlay: str) -> None:
    """Read-only root: /tmp is an emptyDir; every path the config names is mounted."""
    objs = render(overlay)
    pod, main = processor(objs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in all_containers(pod):
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']}: mount of unknown volume {m['name']}"
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for path, m in mounts.items():
        if path != "/tmp":
            assert m.get("readOnly") is True, f"{path} should be mounted read-only"

    config_path = main["args"][main["args"].index("--config") + 1]
    config = rendered_config(objs)
    base = posixpath.dirname(config_path)

    def covered(path: str) -> bool:
        path = posixpath.normpath(posixpath.join(base, path))
        return any(path == mp or path.startswith(mp.rstrip("/") + "/") for mp in mounts)

    assert covered(config_path)
    assert covered(config["policy"])
    if "directory" in config["schemas"]:
        assert covered(config["schemas"]["directory"])
    if config["kms"]["provider"] == "local":
        assert covered(config["kms"]["path"])


# ----------------------------------------------------------------------------------------
# secrets and KMS wiring
# ----------------------------------------------------------------------------------------
def test_no_secret_values_in_git() -> None:
    """No Secret object anywhere under k8s/ (only references to Secrets created out of band)."""
    for f in sorted(K8S.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                pytest.fail(f"{f.relative_to(ROOT)}: Secret objects do not belong in git")
    kust = [load_yaml(f) for f in K8S.rglob("kustomization.yaml")]
    assert not any(k.get("secretGenerator") for k in kust), "secretGenerator would need the values in git"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_output_has_no_secret_objects(overlay: str) -> None:
    assert not of_kind(render(overlay), "Secret")


def _secret_refs(pod: dict[str, Any]) -> set[tuple[str, str]]:
    refs = set()
    for v in pod.get("volumes", []):
        if "secret" in v:
            refs.add(("volume", v["secret"]["secretName"]))
    for c in all_containers(pod):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((e["name"], ref["name"]))
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                refs.add(("envFrom", src["secretRef"]["name"]))
    return refs


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "overlays/dev"])
def test_local_keyring_comes_from_the_streamproc_keys_secret(overlay: str) -> None:
    objs = render(overlay)
    pod, _ = processor(objs)
    assert rendered_config(objs)["kms"]["provider"] == "local"
    assert ("volume", "streamproc-keys") in _secret_refs(pod)
    # Copied 0600 into a memory emptyDir by the keyring init container (see deployment.yaml).
    init = {c["name"]: c for c in pod["initContainers"]}["keyring"]
    assert init["command"][:3] == ["install", "-m", "0600"]
    keys = {v["name"]: v for v in pod["volumes"]}["keys"]
    assert keys["emptyDir"]["medium"] == "Memory"


@needs_kubectl
def test_prod_uses_vault_with_a_token_from_a_secret() -> None:
    objs = render("overlays/prod")
    pod, main = processor(objs)
    config = rendered_config(objs)
    assert config["kms"]["provider"] == "vault"
    assert "token" not in config["kms"], "the token comes from VAULT_TOKEN, never from the file"
    refs = _secret_refs(pod)
    assert ("VAULT_TOKEN", "streamproc-vault") in refs
    assert not any(name == "streamproc-keys" for _, name in refs), "prod has no local keyring"
    assert "keyring" not in {c["name"] for c in pod.get("initContainers", [])}
    # Every ${VAR} in the config is provided by the container's environment.
    env = {e["name"] for e in main.get("env", [])}
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", json.dumps(config)))
    assert wanted <= env, f"config needs {wanted - env} in the environment"


# ----------------------------------------------------------------------------------------
# network policy
# ----------------------------------------------------------------------------------------
def _applies_to(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    sel = policy["spec"]["podSelector"]
    return sel.get("matchLabels", {}).items() <= labels.items() and not sel.get("matchExpressions")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_default_deny(overlay: str) -> None:
    objs = render(overlay)
    deny = [p for p in of_kind(objs, "NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1
    spec = deny[0]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert not spec.get("ingress") and not spec.get("egress")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_allows_only_what_the_processor_needs(overlay: str) -> None:
    objs = render(overlay)
    labels = only(objs, "Deployment", "streamproc")["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind(objs, "NetworkPolicy") if _applies_to(p, labels) and p["spec"]["podSelector"]]
    egress = [r for p in policies for r in p["spec"].get("egress", [])]
    ingress = [r for p in policies for r in p["spec"].get("ingress", [])]

    allowed_ports = {("UDP", 53), ("TCP", 53), ("TCP", 9092), ("TCP", 9093), ("TCP", 8081), ("TCP", 8200), ("TCP", 443)}
    for rule in egress:
        assert rule.get("to"), f"egress rule without 'to' allows every destination: {rule}"
        assert rule.get("ports"), f"egress rule without 'ports' allows every port: {rule}"
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0"), rule
        for port in rule["ports"]:
            assert (port.get("protocol", "TCP"), port["port"]) in allowed_ports, port
    dns = [r for r in egress if {"port": 53, "protocol": "UDP"} in r["ports"]]
    assert dns and all(
        peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
        and peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kube-system"}
        for r in dns for peer in r["to"]
    )
    assert {"port": 53, "protocol": "TCP"} in dns[0]["ports"]
    egress_ports = {p["port"] for r in egress for p in r["ports"]}
    assert {9092, 8081} <= egress_ports, "Kafka and the Schema Registry must be reachable"

    assert len(ingress) == 1
    (rule,) = ingress
    assert rule["ports"] == [{"protocol": "TCP", "port": METRICS_PORT}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


@needs_kubectl
def test_prod_allows_egress_to_the_kms_and_dev_does_not() -> None:
    def ports(overlay: str) -> set[int]:
        return {p["port"] for pol in of_kind(render(overlay), "NetworkPolicy")
                for r in pol["spec"].get("egress", []) for p in r["ports"]}

    assert 8200 in ports("overlays/prod")
    assert 8200 not in ports("overlays/dev")


# ----------------------------------------------------------------------------------------
# monitoring
# ----------------------------------------------------------------------------------------
def _gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_prometheusrule.py"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_prometheusrule_is_in_sync_with_rules_yml() -> None:
    """k8s/base/prometheusrule.yaml is generated; editing rules.yml without regenerating fails."""
    rules = ROOT / "deploy" / "prometheus" / "rules.yml"
    assert rules.exists(), "deploy/prometheus/rules.yml is the source of k8s/base/prometheusrule.yaml"
    proc = _gen("--check")
    assert proc.returncode == 0, proc.stderr
    generated = load_yaml(K8S / "base" / "prometheusrule.yaml")
    assert generated["spec"]["groups"] == load_yaml(rules)["groups"]


def test_gen_prometheusrule_detects_drift_and_rejects_bad_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    out = tmp_path / "prometheusrule.yaml"
    rules.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          up == 0\n        for: 5m\n")
    assert _gen("--rules", str(rules), "--out", str(out)).returncode == 0
    assert _gen("--rules", str(rules), "--out", str(out), "--check").returncode == 0
    doc = load_yaml(out)
    assert doc["kind"] == "PrometheusRule" and doc["spec"]["groups"][0]["rules"][0]["expr"] == "up == 0\n"
    rules.write_text(rules.read_text().replace("5m", "10m"))
    drift = _gen("--rules", str(rules), "--out", str(out), "--check")
    assert drift.returncode == 1 and "out of date" in drift.stderr
    rules.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        record: b\n        expr: up\n")
    bad = _gen("--rules", str(rules), "--out", str(out))
    assert bad.returncode == 2 and "exactly one of 'alert' or 'record'" in bad.stderr


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_metrics_service(overlay: str) -> None:
    objs = render(overlay)
    sm = only(objs, "ServiceMonitor")
    svc = only(objs, "Service", "streamproc-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    rule = only(objs, "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(K8S / "base" / "prometheusrule.yaml")["spec"]["groups"]
    # The job label the operator gives the targets is the one the rules select on.
    job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
    exprs = [str(r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]
    jobs_in_rules = {j for e in exprs for j in re.findall(r'job\s*=~?\s*"([^"]+)"', e)}
    assert jobs_in_rules <= {job}, f"rules select job(s) {jobs_in_rules}, the ServiceMonitor yields {job!r}"


# ----------------------------------------------------------------------------------------
# availability and autoscaling
# ----------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_and_rollout(overlay: str) -> None:
    objs = render(overlay)
    pdb = only(objs, "PodDisruptionBudget")
    dep = only(objs, "Deployment", "streamproc")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert pdb["spec"].get("maxUnavailable") == 1
    # Never more consumers than replicas during a rollout (see deployment.yaml).
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "overlays/prod"])
def test_keda_scales_on_consumer_lag_within_the_partition_count(overlay: str) -> None:
    objs = render(overlay)
    so = only(objs, "ScaledObject")
    config = rendered_config(objs)
    assert so["spec"]["scaleTargetRef"]["name"] == "streamproc"
    assert not of_kind(objs, "HorizontalPodAutoscaler"), "KEDA owns the HPA; two autoscalers would fight"
    sources = {t for p in config["pipelines"] for t in p["sources"]}
    triggers = so["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"kafka"}
    assert {t["metadata"]["topic"] for t in triggers} == sources
    for t in triggers:
        md = t["metadata"]
        assert md["consumerGroup"] == config.get("group_id", "streamproc")
        assert md["bootstrapServers"] == config["kafka"]["bootstrap.servers"]
        assert int(md["lagThreshold"]) > 0
        if config["kafka"].get("security.protocol", "PLAINTEXT") != "PLAINTEXT":
            auth = only(objs, "TriggerAuthentication", t["authenticationRef"]["name"])
            assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"sasl", "username", "password"}
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= source_partitions(config)


@needs_kubectl
def test_dev_falls_back_to_a_cpu_hpa_within_the_partition_count() -> None:
    objs = render("overlays/dev")
    assert not of_kind(objs, "ScaledObject")
    hpa = only(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "streamproc"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["maxReplicas"] <= source_partitions(rendered_config(objs))
    assert only(objs, "Deployment", "streamproc")["spec"]["replicas"] == 1


@needs_kubectl
def test_prod_is_bigger_than_dev() -> None:
    dev, prod = render("overlays/dev"), render("overlays/prod")
    assert only(prod, "Deployment", "streamproc")["spec"]["replicas"] > only(dev, "Deployment", "streamproc")["spec"]["replicas"]

    def cpu(objs: list[dict[str, Any]]) -> float:
        q = processor(objs)[1]["resources"]["requests"]["cpu"]
        return float(q[:-1]) / 1000 if q.endswith("m") else float(q)

    assert cpu(prod) > cpu(dev)


# ----------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    for where, pod in pod_templates(render(overlay)):
        for c in all_containers(pod):
            image = c["image"]
            assert "/" in image, f"{where}/{c['name']}: the image placeholder was not replaced ({image})"
            assert not image.endswith(":latest") and (":" in image.rsplit("/", 1)[-1] or "@sha256:" in image), image
            if overlay == "overlays/prod":
                assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", image), f"prod pins by digest: {image}"


# ----------------------------------------------------------------------------------------
# configuration: the copies, and the files themselves
# ----------------------------------------------------------------------------------------
def test_policy_and_schemas_copies_match_the_repository() -> None:
    """kustomize reads only inside k8s/base, so these are copies; they must not drift.

    Fix: cp policy.yaml k8s/base/policy.yaml && cp schemas/*.avsc k8s/base/schemas/
    """
    assert (K8S / "base" / "policy.yaml").read_bytes() == (ROOT / "policy.yaml").read_bytes()
    repo = {p.name: p.read_bytes() for p in (ROOT / "schemas").glob("*.avsc")}
    copy = {p.name: p.read_bytes() for p in (K8S / "base" / "schemas").glob("*.avsc")}
    assert copy == repo
    gen = load_yaml(K8S / "base" / "kustomization.yaml")["configMapGenerator"]
    files = {f for g in gen if g["name"] == "streamproc-schemas" for f in g["files"]}
    assert files == {f"schemas/{n}" for n in repo}


def _mount_config(objs: list[dict[str, Any]], root: Path) -> Path:
    """Lay the rendered ConfigMaps out as the pod sees them under ``root``."""
    etc = root / "etc" / "streamproc"
    (etc / "schemas").mkdir(parents=True)
    for cm in of_kind(objs, "ConfigMap"):
        name = cm["metadata"]["name"]
        target = etc if name.startswith("streamproc-config") else etc / "schemas"
        for key, value in cm["data"].items():
            (target / key).write_text(value)
    return etc / "streamproc.yaml"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_config_loads_with_streamproc(overlay: str, tmp_path: Path) -> None:
    """The config in the ConfigMap is one the processor accepts (format, audiences, KMS)."""
    config_mod = pytest.importorskip("streamproc.config")
    path = _mount_config(render(overlay), tmp_path)
    env = {"VAULT_TOKEN": "placeholder", "KAFKA_SASL_PASSWORD": "placeholder"}
    cfg = config_mod.load_config(path, env=env)
    assert cfg.metrics.port == METRICS_PORT
    assert cfg.processing_guarantee == "exactly_once"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_check_init_container_passes_on_the_shipped_files(overlay: str, tmp_path: Path) -> None:
    objs = render(overlay)
    pod, _ = processor(objs)
    init = {c["name"]: c for c in pod["initContainers"]}["policy-check"]
    path = _mount_config(objs, tmp_path)
    args = [a.replace("/etc/streamproc", str(path.parent)) for a in init["args"]]
    proc = subprocess.run([sys.executable, "-m", "streamproc.cli.main", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prod_config_differs_from_base_only_where_documented() -> None:
    base = load_yaml(K8S / "base" / "streamproc.yaml")
    prod = load_yaml(K8S / "overlays" / "prod" / "streamproc.yaml")
    differing = {k for k in base.keys() | prod.keys() if base.get(k) != prod.get(k)}
    assert differing <= {"kafka", "kms", "topics", "pipelines", "acls"}
    # Pipelines differ only in KEK names (Vault naming convention of deploy/vault/*.hcl).
    strip = [{**p, "destinations": [{k: v for k, v in d.items() if k != "kek"} for d in p["destinations"]]}
             for p in base["pipelines"]]
    assert strip == [{**p, "destinations": [{k: v for k, v in d.items() if k != "kek"} for d in p["destinations"]]}
                     for p in prod["pipelines"]]
    assert all(d["kek"].startswith("streamproc-dst-") for p in prod["pipelines"] for d in p["destinations"])


# ----------------------------------------------------------------------------------------
# Kafka security in prod: the proven client settings, the pinned CA, the ACL Job
# ----------------------------------------------------------------------------------------
#: The client settings the integration suite proves on real Kafka
#: (tests/integration/test_kafka_security.py); compose uses the same (test_compose.py).
PROVEN_CLIENT = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanisms": "SCRAM-SHA-512",
    "ssl.endpoint.identification.algorithm": "https",
}


def _mounted_from(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that provides ``path`` in ``container``."""
    for m in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return next(v for v in pod["volumes"] if v["name"] == m["name"])
    raise AssertionError(f"{path} is not mounted in {container['name']}")


@needs_kubectl
def test_prod_kafka_uses_the_proven_settings_and_pins_the_cluster_ca() -> None:
    objs = render("overlays/prod")
    config = rendered_config(objs)
    kafka = config["kafka"]
    assert {k: kafka[k] for k in PROVEN_CLIENT} == PROVEN_CLIENT
    assert config["acls"]["processor"] == f"User:{kafka['sasl.username']}"
    pod, main = processor(objs)
    job = only(objs, "Job", "streamproc-acls")["spec"]["template"]["spec"]
    for p, c in ((pod, main), (job, job["containers"][0])):
        vol = _mounted_from(p, c, kafka["ssl.ca.location"])
        assert vol["configMap"]["name"] == "streamproc-kafka-ca", "the CA is public: a ConfigMap"


@needs_kubectl
def test_prod_acls_job_applies_topics_then_acls_as_admin(tmp_path: Path) -> None:
    from streamproc.config import load_kafka_properties

    objs = render("overlays/prod")
    job = only(objs, "Job", "streamproc-acls")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    lines = [ln for ln in c["args"][0].splitlines() if ln.strip()]
    assert [ln.split()[:3] for ln in lines] == [["streamproc", "topics", "apply"], ["streamproc", "acls", "apply"]]
    for ln in lines:
        args = ln.split()
        admin_path = args[args.index("--admin-config") + 1]
        vol = _mounted_from(pod, c, admin_path)
        cm = next(o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"] == vol["configMap"]["name"])
        f = tmp_path / "admin.properties"
        f.write_text(cm["data"][posixpath.basename(admin_path)])
        admin = load_kafka_properties(f, env={"KAFKA_ADMIN_PASSWORD": "x"})
        assert {k: admin[k] for k in PROVEN_CLIENT} == PROVEN_CLIENT
        assert admin["sasl.username"] != rendered_config(objs)["kafka"]["sasl.username"], "admin != processor"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]}
    assert env["KAFKA_ADMIN_PASSWORD"] == "streamproc-kafka-admin"
    assert pod["restartPolicy"] == "Never" and job["spec"]["ttlSecondsAfterFinished"] > 0
    # its own egress: DNS and Kafka only
    labels = job["spec"]["template"]["metadata"]["labels"]
    ports = {p["port"] for pol in of_kind(objs, "NetworkPolicy") if pol["spec"]["podSelector"]
             and _applies_to(pol, labels) for r in pol["spec"].get("egress", []) for p in r["ports"]}
    assert ports == {53, 9093}
