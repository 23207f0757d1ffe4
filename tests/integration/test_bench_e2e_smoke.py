"""The end-to-end benchmark keeps working (benchmarks/bench_e2e.py, docs/benchmarks.md).

Runs every case of the script on a few hundred records against the test broker: the
worker subprocess (exactly-once, at-least-once, two audiences) and the raw copy loops.
No timing assertions: only that every case finishes, its clocks are consistent and each
destination holds every record with nothing dead-lettered (the script checks that by
reading the topics back, and raises otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_e2e.py"
N = 300


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load()


def test_every_case_runs(bench: ModuleType, kafka_bootstrap: str, tmp_path: Path) -> None:
    cases = list(bench.CASES)
    bench.BASELINE = bench.REPO  # the base-* cases run "another" tree: this one
    lines: list[str] = []
    results, meta = bench.run_bench(
        N,
        1,
        cases,
        distinct=50,
        bootstrap=kafka_bootstrap,
        timeout=120.0,
        root=tmp_path,
        progress=lines.append,
    )
    assert list(results) == cases
    assert meta["records"] == N and meta["broker"].startswith("external")
    assert any(f"produced {N:,} sealed records" in line for line in lines)
    for name, res in results.items():
        (run,) = res.runs
        assert run.case == name and run.records == N
        assert run.outputs_min >= N and run.dead_letters == 0
        assert 0 < run.assigned_to_done <= run.launch_to_done
        assert run.launch_to_assigned > 0
        assert run.steady_rate >= run.raw_rate > 0
        if bench.CASES[name].kind == "raw":
            # the copy loop's last log line: batches and per-phase times
            assert run.batches and run.batches >= 1
            assert run.phases_ms and set(run.phases_ms) >= {"produce", "commit"}
    text = bench.report(results, meta)
    for name in cases:
        assert name in text
    assert "ratio streamproc-eos / raw-eos" in text
    # the worker was configured as the case says
    configs = sorted((tmp_path / "ws").glob("streamproc-*.yaml"))
    assert len(configs) == len(cases)


def test_cli_writes_json(bench: ModuleType, kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    rc = bench.main(
        [
            "--records", "200", "--repeat", "1", "--distinct", "20",
            "--cases", "raw-alo,streamproc-alo", "--no-metrics",
            "--bootstrap", kafka_bootstrap, "--json", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["records"] == 200 and data["metrics"] is False
    assert set(data["results"]) == {"raw-alo", "streamproc-alo"}
    for r in data["results"].values():
        assert r["median_steady_records_per_s"] > 0
        assert r["runs"][0]["outputs_min"] >= 200
    assert "streamproc-alo/raw-alo" in data["ratios"]


def test_cases_and_ratios_are_consistent(bench: ModuleType) -> None:
    for a, b in bench.RATIOS:
        assert a in bench.CASES and b in bench.CASES
    assert set(bench.DEFAULT_CASES) <= set(bench.CASES)
    with pytest.raises(SystemExit):
        bench.main(["--cases", "no-such-case"])


def test_own_kafka_broker_over_sasl_ssl(bench: ModuleType, tmp_path: Path) -> None:
    """``--broker kafka --security sasl_ssl``: the script starts Apache Kafka with SCRAM over
    TLS and every client it builds (its own, the worker's, the copy loop's) authenticates;
    the outputs are read back and checked by the script itself."""
    from streamproc.devkafka import kafka_available

    ok, reason = kafka_available()
    if not ok:
        pytest.skip(reason)
    results, meta = bench.run_bench(
        200,
        1,
        ["streamproc-eos", "raw-eos"],
        distinct=20,
        broker_kind="kafka",
        security="sasl_ssl",
        timeout=120.0,
        root=tmp_path,
        progress=lambda _s: None,
    )
    assert meta["broker"] == "local Apache Kafka (KafkaBroker, SASL_SSL)"
    for res in results.values():
        (run,) = res.runs
        assert run.outputs_min >= 200 and run.dead_letters == 0
    cfg = next((tmp_path / "ws").glob("streamproc-streamproc-eos-*.yaml")).read_text()
    assert "SASL_SSL" in cfg and "SCRAM-SHA-512" in cfg
    assert not bench.CLIENT_SECURITY, "the security settings do not outlive the run"
