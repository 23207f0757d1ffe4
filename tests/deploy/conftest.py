"""Shared helpers for the offline deployment checks (docs/deploy.md "Validated how").

Everything here runs without a Docker engine, a cluster or the network: kustomize
renders through ``kubectl kustomize``, schemas are the ones shipped inside Python
packages (kubernetes-validate, check-jsonschema) or in ``tests/deploy/schemas``.
Tests that need a binary that may be absent (kubectl, hadolint) skip with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/prod")

#: Kinds whose schema is not in kubernetes-validate (CRDs): checked against the minimal
#: structural schemas in tests/deploy/schemas/ and by the assertions in test_k8s.py.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.json",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not installed (needed for `kubectl kustomize`)")
    return exe


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize k8s/<overlay>`` as a list of objects (cached per session)."""
    if overlay not in _RENDERED:
        proc = subprocess.run(
            [kubectl(), "kustomize", str(K8S / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"kubectl kustomize k8s/{overlay} failed:\n{proc.stderr}"
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _RENDERED[overlay]


def only(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")
