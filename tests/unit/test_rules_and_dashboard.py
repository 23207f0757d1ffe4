"""Rules, rule tests, scrape config and dashboard only name metrics the processor exports.

A renamed metric otherwise breaks alerting silently: PromQL on a series that does not
exist is simply empty, and an empty alert expression never fires.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.observability.metrics import METRICS, exported_series

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"

RAW_RE = re.compile(r"(?<![A-Za-z0-9_:])streamproc_[a-z0-9_]+(?![A-Za-z0-9_:])")
RECORDED_RE = re.compile(r"(?<![A-Za-z0-9_:])([a-z_]+):(streamproc_[a-z0-9_]+):([a-z0-9_]+)")
NON_STREAMPROC_OK = {"up"}
EXPORTED = exported_series()


@functools.cache
def rules() -> dict[str, Any]:
    return yaml.safe_load((PROM / "rules.yml").read_text())


def rule_tests() -> dict[str, Any]:
    return yaml.safe_load((PROM / "rules_test.yml").read_text())


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "streamproc.json").read_text())


def all_rules() -> Iterator[dict[str, Any]]:
    for g in rules()["groups"]:
        yield from g["rules"]


def alerts() -> list[dict[str, Any]]:
    return [r for r in all_rules() if "alert" in r]


@functools.cache
def recorded_names() -> frozenset[str]:
    return frozenset(r["record"] for r in all_rules() if "record" in r)


def metric_stem_exported(stem: str) -> bool:
    """The metric part of a recorded name is an exported name without ``_total``."""
    names = {m.name for m in METRICS}
    return stem in names or f"{stem}_total" in names


def check_expr(expr: str, where: str) -> list[str]:
    """Every metric an expression names exists; returns the problems found."""
    problems = []
    exported = EXPORTED
    recorded = recorded_names()
    without_recorded = RECORDED_RE.sub(" ", expr)
    for name in RAW_RE.findall(without_recorded):
        if name not in exported:
            problems.append(f"{where}: {name} is not exported")
    for m in RECORDED_RE.finditer(expr):
        full, stem = m.group(0), m.group(2)
        if full not in recorded:
            problems.append(f"{where}: recorded series {full} is not defined in rules.yml")
        if not metric_stem_exported(stem):
            problems.append(f"{where}: {full} names {stem}, which is not exported")
    return problems


def panel_targets(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for p in panels:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
        yield from panel_targets(p.get("panels", []))


# -- the extraction itself -------------------------------------------------------------------
def test_extraction_regexes() -> None:
    expr = 'sum(rate(streamproc_decryptions_total{job="x"}[5m])) / topic_kek_id:streamproc_decryptions:rate5m_zscore1d'
    assert RAW_RE.findall(RECORDED_RE.sub(" ", expr)) == ["streamproc_decryptions_total"]
    assert [m.group(2) for m in RECORDED_RE.finditer(expr)] == ["streamproc_decryptions"]
    assert check_expr("rate(streamproc_nope_total[5m])", "t") == ["t: streamproc_nope_total is not exported"]
    assert check_expr("a:streamproc_nope:rate5m", "t")
    assert check_expr("histogram_quantile(0.9, rate(streamproc_batch_size_bucket[5m]))", "t") == []


# -- rules.yml --------------------------------------------------------------------------------
def test_rule_expressions_name_exported_metrics() -> None:
    problems = []
    for r in all_rules():
        problems += check_expr(r["expr"], str(r.get("record") or r.get("alert")))
    assert problems == []


def test_recorded_names_follow_level_metric_ops() -> None:
    for name in recorded_names():
        m = RECORDED_RE.fullmatch(name)
        assert m is not None, name
        assert metric_stem_exported(m.group(2)), name


def test_every_alert_is_documented_and_labelled() -> None:
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {h[3:].strip().lower() for h in runbooks.splitlines() if h.startswith("## ")}
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for a in alerts():
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        ann = a["annotations"]
        assert ann["summary"] and ann["description"], a["alert"]
        url = ann["runbook_url"]
        assert url == f"docs/runbooks.md#{a['alert'].lower()}", a["alert"]
        assert a["alert"].lower() in anchors, f"{a['alert']} has no section in docs/runbooks.md"
    required = {"StreamprocDecryptionRateAnomalous", "StreamprocEgressAnomalous", "StreamprocAnomalyDetected",
                "StreamprocDeadLetterGrowth", "StreamprocKmsErrors", "StreamprocConsumerLagHigh",
                "StreamprocWorkerDown", "StreamprocAbsent"}
    assert required <= set(names)


# -- rules_test.yml ---------------------------------------------------------------------------
def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in rule_tests()["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they stay quiet"
    assert (fires | quiet) <= names, "tests for alerts that do not exist"


def test_rule_test_series_are_exported_metrics() -> None:
    problems = []
    for t in rule_tests()["tests"]:
        for s in t["input_series"]:
            name = s["series"].split("{", 1)[0]
            if name not in NON_STREAMPROC_OK and name not in exported_series():
                problems.append(f"{t['name']}: input series {name} is not exported")
        for case in t.get("promql_expr_test", []):
            problems += check_expr(case["expr"], t["name"])
    assert problems == []


# -- prometheus.yml -------------------------------------------------------------------------------
def test_scrape_config_targets_the_processor_and_loads_the_rules() -> None:
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert "rules.yml" in conf["rule_files"]
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "streamproc")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["streamproc:9464"]
    # The alerting rules find targets by this job name.
    assert 'up{job="streamproc"}' in (PROM / "rules.yml").read_text()


# -- Grafana ---------------------------------------------------------------------------------------
def test_dashboard_queries_name_exported_metrics() -> None:
    problems = []
    targets = list(panel_targets(dashboard()["panels"]))
    assert len(targets) >= 20
    for title, expr in targets:
        problems += check_expr(expr, title)
    assert problems == []


def test_dashboard_covers_the_required_panels() -> None:
    exprs = " ".join(e for _, e in panel_targets(dashboard()["panels"]))
    for metric in ("streamproc_decryptions_total", "streamproc_egress_records_total", "streamproc_egress_bytes_total",
                   "streamproc_anomalies_total", "streamproc_dead_letters_total", "streamproc_kms_calls_total",
                   "streamproc_kms_call_duration_seconds_bucket", "streamproc_end_to_end_latency_seconds_bucket",
                   "streamproc_consumer_lag", "streamproc_transactions_total", "streamproc_dek_cache_hits_total"):
        assert metric in exprs, metric


#: A vector selector: a metric name, optionally followed by its label matchers.
SELECTOR_RE = re.compile(r"(?<![A-Za-z0-9_:])(streamproc_[a-z0-9_]+|up)(\{[^}]*\})?(?![A-Za-z0-9_:(])")


def test_every_dashboard_query_follows_the_job_variable() -> None:
    """A panel that ignores $job mixes every deployment into one line (the z-score panel did).

    Recorded series are summed over ``job`` by the rules, so panels compute from raw series.
    """
    problems = []
    for title, expr in panel_targets(dashboard()["panels"]):
        if RECORDED_RE.search(expr):
            problems.append(f"{title}: uses a recorded series, which has no job label: {expr}")
        for m in SELECTOR_RE.finditer(expr):
            if 'job=~"$job"' not in (m.group(2) or ""):
                problems.append(f"{title}: {m.group(0)} does not filter on job=~\"$job\"")
    assert problems == []


def panel(title: str) -> dict[str, Any]:
    return next(p for p in dashboard()["panels"] if p["title"] == title)


def test_ready_live_panel_shows_both() -> None:
    exprs = [t["expr"] for t in panel("Workers ready / live")["targets"]]
    assert any("streamproc_ready{" in e for e in exprs) and any("streamproc_workers{" in e for e in exprs)


def test_decryption_zscore_panel_plots_decryptions_only() -> None:
    p = panel("Decryption rate z-score (vs. last day)")
    exprs = " ".join(t["expr"] for t in p["targets"])
    assert "egress" not in exprs
    assert set(SELECTOR_RE.findall(exprs)) == {("streamproc_decryptions_total", '{job=~"$job"}')}
    # The same formula as the recorded z-score the alert reads (rules.yml), term by term.
    rule = next(r["expr"] for r in all_rules() if r.get("record") == "topic_kek_id:streamproc_decryptions:rate5m_zscore1d")
    for term in ("avg_over_time", "stddev_over_time", "0.1 *", "+ 0.1"):
        assert term in rule and term in exprs, term


def test_dashboard_json_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    var_names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job"} <= var_names
    for p in d["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prom = ds["datasources"][0]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "streamproc.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert path == "/var/lib/grafana/dashboards"
    compose = ROOT / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("docker-compose.yml not written yet")
    text = compose.read_text()
    assert f"./deploy/grafana/dashboards:{path}" in text
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in text
    assert "./deploy/prometheus/rules.yml:/etc/prometheus/rules.yml" in text
