"""Every ```python block of README.md and docs/*.md runs, against a real broker and keys.

A snippet that never ran rots: the confluent-kafka example once used an ``opener`` it
never built, lacked its imports and had no ``auto.offset.reset``.  Here the python blocks
of each page run in order, in one fresh interpreter (later blocks may use names the
earlier ones defined, as a reader would), with the working directory set to a workspace
that holds what the pages assume:

* ``keys/keyring.json`` (every KEK of the example deployment and ``pseudonym-master``),
  ``schemas/``, ``policy.yaml`` and ``streamproc.yaml`` (the processor config, metrics on
  127.0.0.1 and a free port);
* the broker: ``127.0.0.1:9092`` in a snippet means the test's broker, and the page's
  topic names ``orders`` / ``orders.analytics`` map to this test's own topics, which the
  test creates (``orders.analytics`` with one sanitized record, so a subscriber snippet
  has something to read).

A block may be excluded only if it cannot run at all (pseudo-code): put the line
``<!-- snippet: illustration -->`` right before its fence (docs/testing.md).  No block
uses that today.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import AUDIENCES, REPO

pytestmark = pytest.mark.integration

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
ILLUSTRATION = "<!-- snippet: illustration -->"
KEKS = ("orders-kek", "logins-kek", *(f"{a}-kek" for a in AUDIENCES))


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    lang: str
    code: str
    illustration: bool


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        out.append(
            Snippet(
                page,
                text[: m.start()].count("\n") + 1,
                m.group("lang").lower(),
                m.group("body"),
                bool(before) and before[-1].strip() == ILLUSTRATION,
            )
        )
    return out


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(s.lang in ("python", "py") for s in snippets(p))]


def test_the_extractor_finds_the_known_blocks() -> None:
    """The fence regex itself: a page with python blocks is found, and blocks are whole."""
    found = {p.name: [s for s in snippets(p) if s.lang == "python"] for p in python_pages()}
    assert {"integrations.md", "metrics.md", "wire-format.md"} <= set(found)
    wire = found["wire-format.md"]
    assert any(b.code.rstrip().endswith('"8aa3a02680700e772f6838d1de1e00b8a0a3aea367bed2975a5b97")') for b in wire)
    assert any(b.code.rstrip().endswith("assert schema_id == 287887939") for b in wire)
    assert not any(s.illustration for blocks in found.values() for s in blocks)


def workspace(root: Path, bootstrap: str) -> None:
    from streamproc.crypto.kms.local import LocalKeyring

    shutil.copytree(REPO / "schemas", root / "schemas")
    shutil.copy(REPO / "policy.yaml", root / "policy.yaml")
    ring = LocalKeyring.create(root / "keys" / "keyring.json")
    for kek in KEKS:
        ring.create_key(kek)
    ring.create_key("pseudonym-master", "secret")
    cfg = yaml.safe_load((REPO / "examples" / "streamproc.yaml").read_text())
    cfg["kafka"] = {"bootstrap.servers": bootstrap}
    cfg.update(schemas={"directory": "./schemas"}, kms={"provider": "local", "path": "./keys/keyring.json"},
               policy="./policy.yaml", metrics={"host": "127.0.0.1", "port": 0})
    (root / "streamproc.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def fill_analytics(root: Path, bootstrap: str, topic: str) -> None:
    """One order sealed for ``topic`` under analytics-kek, as the processor would write it."""
    import json

    from confluent_kafka import Producer

    from streamproc.client import RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.provenance import H_PROVENANCE, header_prefix
    from streamproc.schema.registry import build_schema_source

    schemas = build_schema_source(str(root / "schemas"))
    kms = LocalKeyring(root / "keys" / "keyring.json")
    sealer = RecordSealer(kms, "analytics-kek", topic, json.loads((root / "schemas" / "order.avsc").read_text()), schemas)
    order = EventGenerator(5).order()
    order["customer_id"] = "tk1_" + "A" * 43  # what a token looks like; the snippet prints it
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, key=order["customer_id"].encode(), value=sealer.seal(order), headers=[(H_PROVENANCE, header_prefix("analytics", "sha256:0", None, None))])
    assert p.flush(30) == 0


def mapped(code: str, bootstrap: str, suffix: str) -> str:
    code = code.replace("127.0.0.1:9092", bootstrap)
    for name in ("orders.analytics", "orders"):
        # str literals only: b"orders" in the wire-format vector is data, not a topic.
        code = re.sub(rf'(?<![A-Za-z0-9_])"{re.escape(name)}"', f'"{name}-{suffix}"', code)
    return code


def create_topics(bootstrap: str, names: list[str]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(n, 1, 1) for n in names]).values():
        fut.result(30)


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.name)
def test_every_python_block_runs(page: Path, tmp_path: Path, kafka_bootstrap: str) -> None:
    blocks = [s for s in snippets(page) if s.lang in ("python", "py") and not s.illustration]
    suffix = uuid.uuid4().hex[:8]
    workspace(tmp_path, kafka_bootstrap)
    create_topics(kafka_bootstrap, [f"orders-{suffix}", f"orders.analytics-{suffix}"])
    fill_analytics(tmp_path, kafka_bootstrap, f"orders.analytics-{suffix}")
    # One program, each block prefixed by a marker so a failure names its line in the page.
    program = "\n".join(
        f"# --- {page.name}:{b.line}\nprint('--- block {page.name}:{b.line}', flush=True)\n"
        + mapped(b.code, kafka_bootstrap, suffix)
        for b in blocks
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    res = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    ran = re.findall(r"^--- block (\S+)$", res.stdout, re.M)
    assert res.returncode == 0, f"{ran[-1] if ran else page.name} failed:\n{res.stderr[-3000:]}"
    assert ran == [f"{page.name}:{b.line}" for b in blocks]
    check = PAGE_CHECKS.get(page.name)
    if check is not None:
        check(res.stdout)


def _integrations(stdout: str) -> None:
    # The confluent-kafka subscriber printed the sanitized record's customer token.
    assert re.search(r"^tk1_A{43}$", stdout, re.M), stdout[-2000:]


def _metrics(stdout: str) -> None:
    assert re.search(r"^http://127\.0\.0\.1:\d+$", stdout, re.M), stdout[-2000:]


PAGE_CHECKS: dict[str, Any] = {"integrations.md": _integrations, "metrics.md": _metrics}
