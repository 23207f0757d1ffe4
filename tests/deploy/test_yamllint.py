"""yamllint over every deployment YAML file, with the repository's .yamllint."""

from __future__ import annotations

import subprocess
import sys

from tests.deploy.conftest import ROOT

TARGETS = ["docker-compose.yml", "k8s", "deploy", ".yamllint"]


def test_yamllint() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(ROOT / ".yamllint"), "-f", "parsable", *TARGETS],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    errors = [ln for ln in proc.stdout.splitlines() if "[error]" in ln]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr


def test_yamllint_config_is_the_documented_one() -> None:
    """Relaxed line length, optional document start: and nothing switched off silently."""
    import yaml

    conf = yaml.safe_load((ROOT / ".yamllint").read_text())
    assert conf["extends"] == "default"
    assert conf["rules"]["document-start"] == "disable"
    assert conf["rules"]["line-length"]["max"] >= 120
    disabled = {k for k, v in conf["rules"].items() if v == "disable"}
    assert disabled <= {"document-start", "comments-indentation"}
