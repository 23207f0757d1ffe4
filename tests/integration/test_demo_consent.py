"""The demo's consent scene (``streamproc demo``, Kafka mode) on the broker.

A customer withdraws consent for analytics' purpose mid-stream through the application
call; the scene's worker applies it, and the customer's later orders are missing from
analytics while they still reach fraud (legitimate interest) and support (contract); the
other customer is untouched and the withheld counter says how many were held back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from streamproc import demo as d
from streamproc.cli.demo_consent import run_consent_scene

pytestmark = [pytest.mark.integration, pytest.mark.tansu_smoke]


def test_withdrawn_subject_missing_from_analytics_only(tmp_path: Path, kafka_bootstrap: str, unique: str) -> None:
    schemas, policy = d.find_examples()
    ws = d.make_workspace(tmp_path / "demo", schemas, policy)
    console = Console(record=True, width=240, color_system=None)
    r = run_consent_scene(console, ws, kafka_bootstrap, 7, per_phase=6, suffix=f"-{unique}")
    assert r is not None and r.withdrawn != r.kept
    before_w, before_k = r.refs(r.withdrawn, "before"), r.refs(r.kept, "before")
    after_w, after_k = r.refs(r.withdrawn, "after"), r.refs(r.kept, "after")
    assert len(before_w) == len(before_k) == len(after_w) == len(after_k) == 3
    everything = before_w | before_k | after_w | after_k
    # opt-out bases: every order of both customers, before and after
    assert r.received["fraud"] == r.received["support"] == everything
    # consent basis: the withdrawn customer's orders after the withdrawal are missing
    assert r.received["analytics"] == before_w | before_k | after_k
    assert not after_w & r.received["analytics"]
    assert r.withheld_metric == len(after_w)
    text = console.export_text()
    assert f"{r.withdrawn} withdrew 'marketing' mid-stream" in text
    rows = {
        tuple(c.strip() for c in line.split("│")[1:3]): [c.strip() for c in line.split("│")[3:6]]
        for line in text.splitlines()
        if line.startswith("│")
    }
    assert rows == {
        (r.withdrawn, "before"): ["3/3", "3/3", "3/3"],
        (r.kept, "before"): ["3/3", "3/3", "3/3"],
        (r.withdrawn, "after"): ["0/3 withheld", "3/3", "3/3"],
        (r.kept, "after"): ["3/3", "3/3", "3/3"],
    }


def test_a_custom_policy_skips_the_scene(tmp_path: Path) -> None:
    schemas, policy = d.find_examples()
    ws = d.make_workspace(tmp_path / "demo", schemas, policy)
    ws.policy.write_text(ws.policy.read_text() + "\npurposes:\n  marketing: {basis: consent}\n")
    console = Console(record=True, width=200, color_system=None)
    assert run_consent_scene(console, ws, "127.0.0.1:1", 7) is None
    assert "consent scene skipped" in console.export_text()
