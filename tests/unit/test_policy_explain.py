"""``streamproc policy explain``: per audience and per tag/field, what the audience receives.

The numbers are checked against independent computations: the Laplace scale against the
textbook ``sensitivity / epsilon``, the Gaussian sigma against OpenDP's own privacy map
(within epsilon at sigma, not at 0.99 sigma), expected absolute errors and standard
deviations against scipy's distributions, the randomized-response probabilities against
``e^E / (e^E + k - 1)`` worked by hand, and the records per budget window against a direct
loop over the composition theorems (basic; zCDP of Bun & Steinke with
``rho = Delta^2 / (2 sigma^2)`` and ``epsilon^2 / 2`` for pure releases).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from scipy import stats

from streamproc.cli.main import cli
from streamproc.pipeline.explain import explain, render_text
from streamproc.policy.model import parse_policy
from streamproc.schema.registry import load_document

SCHEMA = {
    "type": "record", "name": "Visit", "namespace": "t",
    "fields": [
        {"name": "id", "type": "string", "confluent:tags": ["PUBLIC"]},
        {"name": "customer_id", "type": "string", "confluent:tags": ["CUSTOMER_ID"], "streamproc.subject": True},
        {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
        {"name": "age", "type": "int", "confluent:tags": ["AGE"]},
        {"name": "income", "type": "double", "confluent:tags": ["INCOME"]},
        {"name": "heart_rate", "type": "double", "confluent:tags": ["HEART_RATE"]},
        {"name": "smoker", "type": "boolean", "confluent:tags": ["SMOKER"]},
        {"name": "blood", "type": {"type": "enum", "name": "Blood", "symbols": ["A", "B", "AB", "O"]},
         "confluent:tags": ["BLOOD"]},
        {"name": "postcode", "type": "string", "confluent:tags": ["POSTCODE"]},
        {"name": "visited", "type": {"type": "int", "logicalType": "date"}, "confluent:tags": ["VISIT_DATE"]},
        {"name": "note", "type": "string"},
    ],
}  # fmt: skip

LN3 = math.log(3)
RAW: dict[str, Any] = {
    "name": "clinic",
    "keys": {"pseudonym": "pm", "shared_domains": {"customer": ["research", "care"]}},
    "purposes": {"research": {"basis": "consent"}, "care": {"basis": "contract"}},
    "dead_letter": {"retention": "7d"},
    "audiences": {
        "research": {
            "purpose": "research",
            "retention": "30d",
            "subject": "customer_id",
            "untagged": "drop",
            "budget": {"epsilon": 20.0, "delta": 1.0e-6, "window": "1d"},
            "risk": {"quasi_identifiers": ["POSTCODE"], "k": 5, "window": "1h", "action": "generalize_more",
                     "ladder": {"POSTCODE": [{"op": "generalize", "prefix": 1}]}},
            "tags": {
                "PUBLIC": "keep",
                "CUSTOMER_ID": {"op": "token", "domain": "customer"},
                "EMAIL": {"op": "token"},
                "AGE": {"op": "dp_noise", "mechanism": "geometric", "epsilon": 0.25, "bounds": [0, 100]},
                "INCOME": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.5, "bounds": [0, 200000]},
                "HEART_RATE": {"op": "dp_noise", "mechanism": "gaussian", "epsilon": 0.5, "delta": 1.0e-6,
                               "bounds": [30, 220]},
                "SMOKER": {"op": "randomized_response", "epsilon": LN3},
                "BLOOD": {"op": "randomized_response", "epsilon": 0.5},
                "POSTCODE": {"op": "generalize", "prefix": 2},
                "VISIT_DATE": {"op": "generalize", "to": "month"},
            },
        },
        "care": {
            "purpose": "care",
            "subject": "customer_id",
            "untagged": "keep",
            "budget": {"epsilon": 2.0, "window": "7d"},
            "tags": {
                "PUBLIC": "keep",
                "CUSTOMER_ID": {"op": "token", "domain": "customer"},
                "EMAIL": {"op": "encrypt_deterministic", "erasable": True},
                "AGE": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.3, "bounds": [0, 120]},
                "INCOME": "drop", "HEART_RATE": "redact", "SMOKER": "keep", "BLOOD": "keep",
                "POSTCODE": {"op": "mask", "keep_first": 2},
                "VISIT_DATE": {"op": "date_shift", "max_days": 10},
            },
        },
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("explain")
    (d / "visit.avsc").write_text(json.dumps(SCHEMA))
    return explain(parse_policy(RAW), [load_document(d / "visit.avsc")])


def _field(doc: dict[str, Any], path: str, audience: str) -> dict[str, Any]:
    out: dict[str, Any] = doc["schemas"]["t.Visit"]["fields"][path]["audiences"][audience]
    return out


def _gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    """OpenDP's own (epsilon, delta) for a float Gaussian of ``sigma`` (its privacy map)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    m = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), sigma)
    return float(dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(m), delta).map(sensitivity)[0])


def test_laplace_and_geometric_numbers(doc: dict[str, Any]) -> None:
    income = _field(doc, "income", "research")
    assert income["sensitivity"] == 200000 and not income["integer"]
    b = 200000 / 0.5  # textbook Laplace scale: sensitivity / epsilon
    assert income["scale"] == pytest.approx(b, rel=1e-3)
    lap = stats.laplace(scale=income["scale"])
    # E|Z| scales with the scale: integrate the standard Laplace (quad is exact there).
    assert income["expected_abs_error"] == pytest.approx(income["scale"] * stats.laplace().expect(abs), rel=1e-6)
    assert income["std_dev"] == pytest.approx(lap.std(), rel=1e-9)

    age = _field(doc, "age", "research")
    assert age["sensitivity"] == 100 and age["integer"]
    assert age["scale"] == pytest.approx(100 / 0.25, rel=1e-3)
    dl = stats.dlaplace(1 / age["scale"])  # P(k) ~ exp(-|k| / scale)
    k = np.arange(-40000, 40001)  # 100 scales either way: the tail beyond is below 1e-40
    assert age["expected_abs_error"] == pytest.approx(float(np.sum(np.abs(k) * dl.pmf(k))), rel=1e-9)
    assert age["std_dev"] == pytest.approx(dl.std(), rel=1e-6)
    assert f"expected absolute error {age['expected_abs_error']:.6g}" in age["text"]
    assert "clamped to [0, 100] (sensitivity 100)" in age["text"] and "integers stay integers" in age["text"]


def test_gaussian_sigma_is_the_smallest_within_epsilon_by_opendp(doc: dict[str, Any]) -> None:
    hr = _field(doc, "heart_rate", "research")
    sigma = hr["scale"]
    assert hr["sensitivity"] == 190
    assert _gaussian_epsilon(sigma, 190.0, 1e-6) <= 0.5 * (1 + 1e-9)
    assert _gaussian_epsilon(sigma * 0.99, 190.0, 1e-6) > 0.5
    assert hr["rho"] == pytest.approx(190**2 / (2 * sigma**2), rel=1e-6)  # Bun & Steinke, Prop. 1.6
    assert hr["expected_abs_error"] == pytest.approx(sigma * stats.norm().expect(abs), rel=1e-6)
    assert hr["std_dev"] == pytest.approx(sigma)


def test_randomized_response_probabilities(doc: dict[str, Any]) -> None:
    smoker = _field(doc, "smoker", "research")
    assert smoker["values"] == 2
    assert smoker["keep_probability"] == pytest.approx(0.75)  # e^ln3 / (e^ln3 + 1) = 3/4
    assert "reported with probability 0.75, each other value with 0.25" in smoker["text"]
    blood = _field(doc, "blood", "research")
    e = 1.6487212707001282  # e^0.5
    assert blood["values"] == 4
    assert blood["keep_probability"] == pytest.approx(e / (e + 3))
    assert blood["other_probability"] == pytest.approx(1 / (e + 3))
    # Policy-level, with no schema: a boolean's probability is stated, enums by formula.
    assert doc["audiences"]["research"]["tags"]["SMOKER"]["keep_probability_boolean"] == pytest.approx(0.75)


def _rho(eps: float) -> float:
    return eps * eps / 2


def test_records_per_budget_window(doc: dict[str, Any]) -> None:
    sigma = _field(doc, "heart_rate", "research")["scale"]
    eps = [0.25, 0.5, 0.5, LN3, 0.5]
    rho = _rho(0.25) + _rho(0.5) + 190**2 / (2 * sigma**2) + _rho(LN3) + _rho(0.5)
    delta = 1e-6

    def fits(n: int) -> bool:
        basic = n * sum(eps) <= 20.0 and n * 1e-6 <= delta
        zcdp = n * rho + 2 * math.sqrt(n * rho * math.log(1 / delta)) <= 20.0
        return basic or zcdp

    want = 0
    while fits(want + 1):
        want += 1
    research = doc["schemas"]["t.Visit"]["audiences"]["research"]
    assert research["record_cost"]["epsilon"] == pytest.approx(sum(eps))
    assert research["releases_per_window"] == want
    assert want >= 2  # zCDP beats basic composition (1 by the deltas) here
    care = doc["schemas"]["t.Visit"]["audiences"]["care"]
    assert care["releases_per_window"] == 6  # floor(2.0 / 0.3), pure epsilon, no delta
    # Per tag, as if it were the record's only DP field.
    assert doc["audiences"]["care"]["tags"]["AGE"]["releases_per_window_alone"] == 6
    text = render_text(doc)
    assert f"one record's DP fields cost epsilon {sum(eps):.6g}: {want} records per subject per 1d fit the budget" in text


def test_pseudonyms_ciphertexts_and_forget(doc: dict[str, Any]) -> None:
    cid = _field(doc, "customer_id", "research")
    assert cid["op"] == "token" and cid["domain"] == "customer" and cid["shared"]
    assert "equal values give equal outputs for care too" in cid["text"]
    email = _field(doc, "email", "research")
    assert email["domain"] == "EMAIL" and not email["shared"] and "unlinkable" in email["text"]
    enc = _field(doc, "email", "care")
    assert enc["op"] == "encrypt_deterministic" and enc["erasable"]
    assert "forget" in enc["text"] and "'customer_id'" in enc["text"] and "withheld" in enc["text"]
    assert "1 to 10 days" in _field(doc, "visited", "care")["text"]
    assert "truncated to the month" in _field(doc, "visited", "research")["text"]
    assert _field(doc, "income", "care")["text"].startswith("nothing: the field is removed")
    assert _field(doc, "heart_rate", "care")["text"].startswith("null")


def test_untagged_fields_follow_the_audience(doc: dict[str, Any]) -> None:
    assert _field(doc, "note", "research")["text"] == (
        "unclassified field (untagged: drop): nothing: the field is removed from the audience's schema"
    )
    assert _field(doc, "note", "care")["text"] == "unclassified field (untagged: keep): the value as it is"


def test_audience_header(doc: dict[str, Any]) -> None:
    text = render_text(doc)
    assert "  purpose: research (legal basis consent; opt-in: withheld unless the subject granted it)" in text
    assert "  purpose: care (legal basis contract; opt-out: received until the subject objects)" in text
    assert "  retention: 30d" in text
    assert "  privacy budget: epsilon 20, delta 1e-06 per subject per 1d; beyond it the subject's DP fields are null" in text
    assert "  re-identification risk: k 5 over POSTCODE within 1h; enforced by generalize_more" in text
    assert "    POSTCODE level 1: generalized: strings cut to their first 1 characters" in text
    assert "Dead letters are kept at most 7d." in text


def test_cli_text_json_and_audience_filter(tmp_path: Path) -> None:
    (tmp_path / "visit.avsc").write_text(json.dumps(SCHEMA))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(RAW, sort_keys=False))
    r = CliRunner().invoke(cli, ["policy", "explain", "--policy", str(tmp_path / "policy.yaml"),
                                 "--schema", str(tmp_path / "visit.avsc"), "--audience", "care"])
    assert r.exit_code == 0, r.output
    assert "Audience care" in r.output and "Audience research" not in r.output
    assert "    care: a pseudonym (keyed HMAC-SHA256 token) in the shared domain 'customer'" in r.output
    j = CliRunner().invoke(cli, ["policy", "explain", "--policy", str(tmp_path / "policy.yaml"), "--format", "json"])
    assert j.exit_code == 0, j.output
    data = json.loads(j.output)
    assert set(data["audiences"]) == {"research", "care"} and data["schemas"] == {}
    assert data["audiences"]["research"]["tags"]["INCOME"]["sensitivity"] == 200000
    bad = CliRunner().invoke(cli, ["policy", "explain", "--policy", str(tmp_path / "policy.yaml"), "--audience", "nope"])
    assert bad.exit_code == 1 and "no audience 'nope'" in bad.output


def test_cli_with_config_names_topics_and_uses_its_schemas(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "visit.avsc").write_text(json.dumps(SCHEMA))
    raw = json.loads(json.dumps(RAW))
    raw["audiences"]["care"]["tags"]["EMAIL"] = {"op": "encrypt_deterministic"}  # no erasure section needed
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./ring.json"},
        "policy": "./policy.yaml",
        "pipelines": [{
            "sources": ["visits"], "dead_letter_topic": "visits.dlq",
            "destinations": [{"topic": "visits.research", "audience": "research", "kek": "r-kek"},
                             {"topic": "visits.care", "audience": "care", "kek": "c-kek"}],
        }],
    }  # fmt: skip
    (tmp_path / "streamproc.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(cli, ["policy", "explain", "--config", str(tmp_path / "streamproc.yaml")])
    assert r.exit_code == 0, r.output
    assert "  retention: 30d; topics visits.research" in r.output
    assert "Schema t.Visit" in r.output
    assert "a deterministic ciphertext (AES-SIV)" in r.output and "not erasable" in r.output


def test_tag_level_numbers_without_a_schema() -> None:
    """Without schemas the tag's rule is explained as it would apply: the Laplace scale is
    still sensitivity / epsilon, and its error that of the continuous distribution."""
    doc = explain(parse_policy(RAW))
    income = doc["audiences"]["research"]["tags"]["INCOME"]
    assert income["scale"] == pytest.approx(200000 / 0.5, rel=1e-3) and not income["integer"]
    assert income["std_dev"] == pytest.approx(income["scale"] * math.sqrt(2))
    age = doc["audiences"]["research"]["tags"]["AGE"]  # geometric: integers only
    assert age["integer"] and age["std_dev"] == pytest.approx(stats.dlaplace(1 / age["scale"]).std())
    # alone, AGE's 0.25 fits floor(20 / 0.25) = 80 times by basic composition; its zCDP cost
    # 0.25^2/2 allows more: the largest n with n rho + 2 sqrt(n rho ln 1e6) <= 20.
    rho = 0.25**2 / 2
    n = max(m for m in range(1, 10_000) if m * rho + 2 * math.sqrt(m * rho * math.log(1e6)) <= 20)
    assert age["releases_per_window_alone"] == max(80, n)
    assert doc["schemas"] == {}
    assert doc["audiences"]["research"]["subject"] == "customer_id"


DOC_POLICY = """\
name: clinic
keys: {pseudonym: pseudonym-master}
purposes:
  research: {basis: consent}
audiences:
  research:
    purpose: research
    retention: 30d
    subject: customer_id
    budget: {epsilon: 4.0, window: 1d}
    tags:
      CUSTOMER_ID: token
      AGE:    {op: dp_noise, mechanism: geometric, epsilon: 1.0, bounds: [0, 100]}
      INCOME: {op: dp_noise, mechanism: laplace, epsilon: 1.0, bounds: [0, 200000]}
"""

DOC_SCHEMA = {
    "type": "record", "name": "Visit", "namespace": "clinic",
    "fields": [
        {"name": "customer_id", "type": "string", "confluent:tags": ["CUSTOMER_ID"]},
        {"name": "age", "type": "int", "confluent:tags": ["AGE"]},
        {"name": "income", "type": "double", "confluent:tags": ["INCOME"]},
        {"name": "note", "type": "string"},
    ],
}  # fmt: skip


def test_docs_excerpt_is_what_the_command_prints(tmp_path: Path) -> None:
    """docs/policy.md's example output (the worked budget example) stays true."""
    (tmp_path / "policy.yaml").write_text(DOC_POLICY)
    (tmp_path / "visit.avsc").write_text(json.dumps(DOC_SCHEMA))
    r = CliRunner().invoke(cli, ["policy", "explain", "--policy", str(tmp_path / "policy.yaml"),
                                 "--schema", str(tmp_path / "visit.avsc")])
    assert r.exit_code == 0, r.output
    page = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    section = page[page.index("## Explaining: `streamproc policy explain`"):]
    start = section.index("```\nAudience research")
    block = section[start + 4: section.index("```", start + 4)]
    lines = [ln for ln in block.splitlines() if ln.strip() != "..."]
    assert len(lines) > 8
    for ln in lines:
        assert ln in r.output.splitlines(), ln
