"""The trade-off table of docs/policy.md is what ``scripts/risk_tradeoff.py`` computes with
the real pipeline, and its measured and suppress columns agree with a count over the
inputs done here independently (Counter over the tuples the rules give)."""

from __future__ import annotations

import datetime as dt
import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def script() -> Any:
    spec = importlib.util.spec_from_file_location("risk_tradeoff", ROOT / "scripts" / "risk_tradeoff.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_table_is_the_computed_one_and_agrees_with_an_independent_count() -> None:
    mod = script()
    rows = mod.tradeoff()
    assert mod.markdown(rows) in (ROOT / "docs" / "policy.md").read_text()
    records = mod.visits(5000, 1)
    base = [(r["postcode"].split(" ")[0],
             (dt.date(1970, 1, 1) + dt.timedelta(days=r["birth_date"])).year, r["gender"]) for r in records]
    sizes = Counter(base)
    for row in rows:
        k = row["k"]
        assert row["measured"]["below_k"] == pytest.approx(sum(c for c in sizes.values() if c < k) / len(base))
        assert row["measured"]["unique"] == pytest.approx(sum(1 for c in sizes.values() if c == 1) / len(base))
        seen: Counter[tuple[Any, ...]] = Counter()
        suppressed = 0
        for t in base:  # streaming: released once k records of the window share the tuple
            seen[t] += 1
            suppressed += seen[t] < k
        assert row["suppress"]["suppressed"] == pytest.approx(suppressed / len(base))
        assert row["generalize_more"]["suppressed"] <= row["suppress"]["suppressed"]
