"""The demo's statistical-privacy additions: a noised amount and the risk gauge for analytics.

``streamproc demo --in-process`` prints analytics' risk window after its batches; the
figures are recomputed here from the same generated events (birth years counted with
``collections.Counter``; logins carry no birth date, so they form one class).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path

import yaml
from click.testing import CliRunner

from streamproc import demo as d
from streamproc.cli.main import cli
from streamproc.client.generator import EventGenerator


def test_workspace_gets_a_noised_amount_and_a_risk_target(tmp_path: Path) -> None:
    schemas, policy = d.find_examples()
    ws = d.make_workspace(tmp_path, schemas, policy)
    fields = {f["name"]: f for f in json.loads((ws.schemas / "order.avsc").read_text())["fields"]}
    assert "AMOUNT" in fields["amount_cents"]["confluent:tags"]
    raw = yaml.safe_load(ws.policy.read_text())
    assert raw["audiences"]["analytics"]["tags"]["AMOUNT"]["op"] == "dp_noise"
    assert raw["audiences"]["analytics"]["risk"]["k"] == 5
    assert all(raw["audiences"][a]["tags"]["AMOUNT"] == "keep" for a in ("fraud", "support"))
    # the repository's own files are untouched, and a second call changes nothing
    repo = {f["name"]: f for f in json.loads((schemas / "order.avsc").read_text())["fields"]}
    assert "AMOUNT" not in repo["amount_cents"]["confluent:tags"]
    assert not d.add_statistical_privacy(ws.schemas / "order.avsc", ws.policy)


def test_in_process_demo_prints_the_risk_gauge_as_counted_independently() -> None:
    n = 80
    result = CliRunner().invoke(cli, ["demo", "--in-process", "--events", str(n), "--seed", "7"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    m = re.search(r"risk \(analytics\): (\d+) records in the window, k = (\d+) \(target 5\), (\d+)% of records in "
                  r"classes below k, (\d+)% unique", text)
    assert m is not None, text
    gen = EventGenerator(7)
    orders = list(gen.events("order", n))
    years = Counter((dt.date(1970, 1, 1) + dt.timedelta(days=o["birth_date"])).year for o in orders)
    sizes = [*years.values(), n]  # the logins: one class without a birth date
    total = 2 * n
    assert int(m.group(1)) == total
    assert int(m.group(2)) == min(sizes)
    assert int(m.group(3)) == round(100 * sum(c for c in sizes if c < 5) / total)
    assert int(m.group(4)) == round(100 * sum(1 for c in sizes if c == 1) / total)
    assert "amount_cents is noised (dp_noise, laplace, epsilon 1" in text
