"""Policy syntax of the statistical-privacy settings: ``budget:`` and ``risk:`` per audience."""

from __future__ import annotations

from typing import Any

import pytest

from streamproc.errors import PolicyError
from streamproc.pipeline.plan import build_plan
from streamproc.policy.model import parse_policy
from streamproc.privacy.budget import Budget
from streamproc.privacy.risk import RiskTarget
from streamproc.schema import avro

NOISE = {"op": "dp_noise", "mechanism": "laplace", "epsilon": 1.0, "bounds": [0, 100]}
GAUSS = {"op": "dp_noise", "mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6, "bounds": [0, 100]}


def policy(**audience: Any) -> dict[str, Any]:
    return {"audiences": {"a": {"record_key": "keep", "tags": {"AMOUNT": NOISE}, **audience}}}


def test_budget_and_risk_parse() -> None:
    aud = parse_policy(policy(
        budget={"epsilon": 4.0, "window": "1d", "delta": 1e-6},
        risk={"quasi_identifiers": ["POSTCODE", "BIRTH_DATE", "GENDER"], "k": 5, "window": "1h",
              "l": 2, "sensitive": "DIAGNOSIS"},
    )).audience("a")
    assert aud.budget == Budget(epsilon=4.0, window_s=86_400.0, delta=1e-6)
    assert aud.risk == RiskTarget(("POSTCODE", "BIRTH_DATE", "GENDER"), 5, 3600.0, 2, "DIAGNOSIS")
    plain = parse_policy(policy()).audience("a")
    assert plain.budget is None and plain.risk is None
    # the settings are part of the policy's meaning: the version changes with them
    assert parse_policy(policy(budget={"epsilon": 4.0, "window": "1d"})).version != parse_policy(policy()).version


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        ({"budget": {"epsilon": 4.0}}, "'window' is required"),
        ({"budget": {"window": "1d"}}, "a mapping with 'epsilon'"),
        ({"budget": {"epsilon": 4.0, "window": "1d", "per": "x"}}, "a mapping with 'epsilon'"),
        ({"budget": {"epsilon": 0, "window": "1d"}}, "epsilon must be a positive"),
        ({"budget": {"epsilon": "4", "window": "1d"}}, "numbers"),
        ({"budget": {"epsilon": 4.0, "window": "forever"}}, "positive duration"),
        ({"budget": {"epsilon": 0.5, "window": "1d"}}, "more than the whole budget"),
        ({"budget": {"epsilon": 4.0, "window": "1d"}, "tags": {"AMOUNT": "drop"}}, "no dp_noise or randomized"),
        ({"budget": {"epsilon": 4.0, "window": "1d"}, "tags": {"AMOUNT": GAUSS}}, "need a budget 'delta'"),
        ({"risk": {"quasi_identifiers": [], "k": 5, "window": "1h"}}, "list of distinct tag names"),
        ({"risk": {"quasi_identifiers": ["A", "A"], "k": 5, "window": "1h"}}, "list of distinct tag names"),
        ({"risk": {"quasi_identifiers": ["A"], "k": 1, "window": "1h"}}, "k must be at least 2"),
        ({"risk": {"quasi_identifiers": ["A"], "k": True, "window": "1h"}}, "'k' is an integer"),
        ({"risk": {"quasi_identifiers": ["A"], "k": 5}}, "'window' is required"),
        ({"risk": {"quasi_identifiers": ["A"], "k": 5, "window": "1h", "l": 2}}, "l and sensitive go together"),
        ({"risk": {"quasi_identifiers": ["A"], "k": 5, "window": "1h", "l": 2, "sensitive": "A"}},
         "cannot also be a quasi-identifier"),
        ({"risk": {"quasi_identifiers": ["A"], "k": 5, "window": "1h", "action": "hold"}}, "action hold needs"),
    ],
)
def test_bad_settings_are_policy_errors_naming_the_audience(audience: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        parse_policy(policy(**audience))
    assert "audience 'a'" in str(info.value)


def test_a_budget_makes_dp_fields_nullable_and_a_risk_target_changes_nothing() -> None:
    """A budgeted audience's DP fields can be suppressed (null) once a subject's budget is
    spent, so its plans make them nullable (tests/unit/test_budget_pipeline.py runs them).
    A risk target compiles: it is measured by ``streamproc risk`` (tests/unit/test_cli_risk.py),
    and changes no output."""
    schema = avro.parse({"type": "record", "name": "R", "fields": [
        {"name": "amount", "type": "double", "confluent:tags": ["AMOUNT"]}]})
    aud = parse_policy(policy(budget={"epsilon": 4.0, "window": "1d"})).audience("a")
    budgeted = build_plan(schema, aud, None)
    assert budgeted.out_schema["fields"][0]["type"] == ["null", "double"]
    assert budgeted.dp_cost is not None and budgeted.dp_cost.epsilon == NOISE["epsilon"]
    plain = build_plan(schema, parse_policy(policy()).audience("a"), None)
    assert plain.out_schema["fields"][0]["type"] == "double" and plain.dp_cost is None
    with_risk = parse_policy(policy(risk={"quasi_identifiers": ["POSTCODE"], "k": 5, "window": "1h"})).audience("a")
    assert build_plan(schema, with_risk, None).out_schema == plain.out_schema
