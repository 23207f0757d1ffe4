"""The demo's erasure scene (``streamproc demo``, Kafka mode) on the broker.

Two customers' orders go through a real worker with fraud's e-mail erasable; both fraud
values re-identify; ``streamproc forget`` forgets one customer mid-stream; then that
customer's earlier fraud value fails with ``subject_forgotten`` while the other still
re-identifies, and the forgotten customer's later orders are missing from fraud only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from streamproc import demo as d
from streamproc.cli.demo_erasure import run_erasure_scene

pytestmark = [pytest.mark.integration, pytest.mark.tansu_smoke]


def test_forgotten_customer_no_longer_reversible(tmp_path: Path, kafka_bootstrap: str, unique: str) -> None:
    schemas, policy = d.find_examples()
    ws = d.make_workspace(tmp_path / "demo", schemas, policy)
    console = Console(record=True, width=240, color_system=None)
    r = run_erasure_scene(console, ws, kafka_bootstrap, 7, per_phase=4, suffix=f"-{unique}")
    assert r is not None and r.forgotten != r.kept
    before_f, before_k = r.refs(r.forgotten, "before"), r.refs(r.kept, "before")
    after_f, after_k = r.refs(r.forgotten, "after"), r.refs(r.kept, "after")
    assert len(before_f) == len(before_k) == len(after_f) == len(after_k) == 2
    everything = before_f | before_k | after_f | after_k
    assert set(r.received["analytics"]) == set(r.received["support"]) == everything
    assert set(r.received["fraud"]) == everything - after_f  # withheld as forgotten
    assert all(r.received["fraud"][ref].startswith("ds1_") for ref in r.received["fraud"])
    # Re-identification (the plaintext is the normalized e-mail that was produced).
    emails = {s: {e.strip().lower() for (s2, _, e) in r.sent.values() if s2 == s} for s in (r.forgotten, r.kept)}
    assert r.reid_before[r.forgotten] in emails[r.forgotten] and r.reid_before[r.kept] in emails[r.kept]
    assert r.reid_after[r.forgotten] == "subject_forgotten"
    assert r.reid_after[r.kept] == r.reid_before[r.kept]
    assert "1 key(s) shredded (audiences: fraud)" in r.forget_output and r.forgotten not in r.forget_output
    text = console.export_text()
    rows = {
        tuple(c.strip() for c in line.split("│")[1:3]): [c.strip() for c in line.split("│")[3:6]]
        for line in text.splitlines()
        if line.startswith("│")
    }
    assert rows == {
        (r.forgotten, "before"): ["2/2", "2/2", "ok"],
        (r.forgotten, "after"): ["0/2 withheld", "2/2", "subject_forgotten"],
        (r.kept, "before"): ["2/2", "2/2", "ok"],
        (r.kept, "after"): ["2/2", "2/2", "ok"],
    }


def test_a_custom_policy_skips_the_scene(tmp_path: Path) -> None:
    schemas, policy = d.find_examples()
    ws = d.make_workspace(tmp_path / "demo", schemas, policy)
    raw = yaml.safe_load(ws.policy.read_text())
    raw["audiences"]["fraud"]["tags"]["EMAIL"] = {"op": "token"}  # nothing reversible to forget
    ws.policy.write_text(yaml.safe_dump(raw))
    console = Console(record=True, width=200, color_system=None)
    assert run_erasure_scene(console, ws, "127.0.0.1:1", 7) is None
    assert "erasure scene skipped" in console.export_text()
