"""Differential-privacy operators (``dp_noise``, ``randomized_response``) through real plans.

OpenDP samples from the operating system's CSPRNG and offers no seed, so nothing here is
byte-for-byte reproducible.  The statistical tests therefore use fixed, very small
significance levels (``ALPHA = 1e-6`` per test: a correct implementation fails about once
in a million runs) with sample sizes large enough that a wrong scale (a factor of 1.25 or
more), a wrong distribution family or a wrong keep probability is caught with near
certainty.  Expected values come from the textbook mechanisms computed here with scipy
(Laplace b = (hi - lo) / epsilon, discrete Laplace, Balle & Wang's exact Gaussian privacy
profile, e^eps / (e^eps + k - 1)), never from the operator's own calibration.

The oracle comparison with the reference interpreter cannot be byte-for-byte for these
operators: both run the same plan, and the check is structural (same fields, kept values
equal, noised values of the field's type and within 60 scales of the clamped input,
randomized responses among the symbols).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from streamproc.errors import PolicyError
from streamproc.operators.dp import DP_PROP
from streamproc.pipeline.codegen import TransformFailed, compile_plan
from streamproc.pipeline.plan import Plan, build_plan
from streamproc.pipeline.reference import run_reference
from streamproc.policy.model import parse_policy
from streamproc.schema import avro
from streamproc.schema.avro import Record

ALPHA = 1e-6

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Measurement",
    "namespace": "test.dp",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "age", "type": "int", "confluent:tags": ["AGE"]},
        {"name": "amount", "type": "double", "confluent:tags": ["AMOUNT"]},
        {"name": "score", "type": ["null", "float"], "confluent:tags": ["SCORE"]},
        {"name": "visits", "type": "long", "confluent:tags": ["VISITS"]},
        {"name": "smoker", "type": "boolean", "confluent:tags": ["SMOKER"]},
        {"name": "grade", "type": {"type": "enum", "name": "Grade", "symbols": ["A", "B", "C", "D"]},
         "confluent:tags": ["GRADE"]},
    ],
}
NODE = avro.parse(SCHEMA)
assert isinstance(NODE, Record)
PARSED = fastavro.parse_schema(SCHEMA)


def plan_for(tags: dict[str, Any]) -> Plan:
    doc = {"audiences": {"a": {"untagged": "keep", "record_key": "keep", "tags": tags}}}
    return build_plan(NODE, parse_policy(doc).audience("a"), None)


def encode(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED, record)
    return buf.getvalue()


def decoder(plan: Plan) -> Any:
    parsed = fastavro.parse_schema(plan.out_schema)
    return lambda b: fastavro.schemaless_reader(io.BytesIO(b), parsed, None)


def record(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "r1", "age": 40, "amount": 50.0, "score": 0.5, "visits": 7,
                            "smoker": True, "grade": "B"}
    base.update(over)
    return base


def draws(plan: Plan, field: str, n: int, **over: Any) -> list[Any]:
    """``n`` outputs of ``field`` for one input record, through the generated code."""
    fn, _ = compile_plan(plan, NODE)
    dec = decoder(plan)
    data = encode(record(**over))
    return [dec(b"".join(fn(data)))[field] for _ in range(n)]


LAPLACE = {"op": "dp_noise", "mechanism": "laplace", "epsilon": 1.0, "bounds": [0, 100]}


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"op": "dp_noise", "epsilon": 1, "bounds": [0, 1]}, "needs 'mechanism'"),
        ({"op": "dp_noise", "mechanism": "cauchy", "epsilon": 1, "bounds": [0, 1]}, "needs 'mechanism'"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": 0, "bounds": [0, 1]}, "epsilon"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": -1, "bounds": [0, 1]}, "epsilon"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": float("nan"), "bounds": [0, 1]}, "epsilon"),
        ({"op": "dp_noise", "mechanism": "laplace", "bounds": [0, 1]}, "epsilon"),
        ({"op": "dp_noise", "mechanism": "gaussian", "epsilon": 1, "bounds": [0, 1]}, "delta"),
        ({"op": "dp_noise", "mechanism": "gaussian", "epsilon": 1, "delta": 0.5, "bounds": [0, 1]}, "delta"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": 1, "delta": 1e-6, "bounds": [0, 1]}, "gaussian only"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": 1}, "bounds"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": 1, "bounds": [1, 1]}, "bounds"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": 1, "bounds": [0, float("inf")]}, "bounds"),
        ({"op": "dp_noise", "mechanism": "laplace", "epsilon": 1, "bounds": [0, 1], "seed": 3}, "unknown parameter"),
        ({"op": "randomized_response"}, "epsilon"),
        ({"op": "randomized_response", "epsilon": True}, "epsilon"),
    ],
)
def test_parameters_are_validated_when_the_policy_loads(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy({"audiences": {"a": {"record_key": "keep", "tags": {"AGE": spec}}}})


@pytest.mark.parametrize(
    ("tag", "spec", "message"),
    [
        ("AGE", {**LAPLACE, "bounds": [0, 99.5]}, "must be integers"),
        ("AGE", {**LAPLACE, "bounds": [0, 2**31]}, "range of int"),
        ("AMOUNT", {**LAPLACE, "mechanism": "geometric"}, "int and long"),
        ("SMOKER", LAPLACE, "does not apply to Avro type 'boolean'"),
        ("AMOUNT", {"op": "randomized_response", "epsilon": 1}, "does not apply to Avro type 'double'"),
    ],
)
def test_inapplicable_types_are_refused_when_the_plan_compiles(tag: str, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        plan_for({tag: spec})


# -- output schema ------------------------------------------------------------------------


def test_output_schema_records_mechanism_epsilon_delta_bounds() -> None:
    plan = plan_for({
        "AGE": {"op": "dp_noise", "mechanism": "geometric", "epsilon": 0.5, "bounds": [0, 120]},
        "AMOUNT": {"op": "dp_noise", "mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6, "bounds": [0, 100]},
        "GRADE": {"op": "randomized_response", "epsilon": 2.0},
    })
    fields = {f["name"]: f for f in plan.out_schema["fields"]}
    age = fields["age"]
    assert age["type"] == "int" and age["streamproc.transform"] == "dp_noise"
    assert age[DP_PROP]["mechanism"] == "geometric" and age[DP_PROP]["epsilon"] == 0.5
    assert age[DP_PROP]["bounds"] == [0, 120] and "delta" not in age[DP_PROP]
    # discrete Laplace at sensitivity 120 and epsilon 0.5: scale 240
    assert age[DP_PROP]["scale"] == pytest.approx(240, rel=1e-6)
    amount = fields["amount"][DP_PROP]
    assert (amount["mechanism"], amount["epsilon"], amount["delta"]) == ("gaussian", 1.0, 1e-6)
    grade = fields["grade"]
    assert grade["type"]["symbols"] == ["A", "B", "C", "D"]
    assert grade[DP_PROP]["mechanism"] == "randomized_response"
    assert grade[DP_PROP]["keep_probability"] == pytest.approx(math.e**2 / (math.e**2 + 3))
    assert "visits" not in fields and DP_PROP not in fields["id"]  # VISITS has no rule: dropped
    json.dumps(plan.out_schema)
    fastavro.parse_schema(plan.out_schema)


# -- distributions --------------------------------------------------------------------------


def test_laplace_on_a_double_has_scale_sensitivity_over_epsilon() -> None:
    out = draws(plan_for({"AMOUNT": LAPLACE}), "amount", 20_000, amount=50.0)
    assert all(isinstance(v, float) for v in out)
    # b = (hi - lo) / epsilon = 100: the textbook Laplace mechanism
    assert stats.kstest(out, stats.laplace(loc=50.0, scale=100.0).cdf).pvalue > ALPHA
    # power: a scale 25 % off is rejected on the same sample size
    assert stats.kstest(out, stats.laplace(loc=50.0, scale=125.0).cdf).pvalue < ALPHA


def test_discrete_laplace_on_an_int_stays_integer_with_the_geometric_law() -> None:
    eps, lo, hi = 1.0, 0, 20
    for mech in ("laplace", "geometric"):
        plan = plan_for({"AGE": {"op": "dp_noise", "mechanism": mech, "epsilon": eps, "bounds": [lo, hi]}})
        out = draws(plan, "age", 20_000, age=10)
        assert all(type(v) is int for v in out)
        a = eps / (hi - lo)  # P(z) proportional to exp(-a |z|)
        noise = [v - 10 for v in out]
        var = 2 * math.exp(-a) / (1 - math.exp(-a)) ** 2
        # sample variance of a Laplace-like law: its own variance over n is about
        # (mu4 - var^2)/n; mu4 ~ 6 var^2 for Laplace, so sd(var_hat) ~ sqrt(5/n) var
        sd = math.sqrt(5 / len(noise)) * var
        assert abs(float(stats.tvar(noise)) - var) < 5 * sd, mech
        # goodness of fit against scipy's discrete Laplace (chi-square over central bins)
        edges = list(range(-60, 61, 10))
        observed = [sum(1 for z in noise if e <= z < e + 10) for e in edges[:-1]]
        law = stats.dlaplace(a)
        expected = [len(noise) * (law.cdf(e + 9) - law.cdf(e - 1)) for e in edges[:-1]]
        rest_o, rest_e = len(noise) - sum(observed), len(noise) - sum(expected)
        assert stats.chisquare([*observed, rest_o], [*expected, rest_e]).pvalue > ALPHA, mech


def _gaussian_delta(eps: float, sigma: float, sens: float) -> float:
    """The exact privacy profile of the Gaussian mechanism (Balle & Wang 2018, Thm 8)."""
    a = sens / (2 * sigma)
    b = eps * sigma / sens
    return float(stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b))


def test_gaussian_scale_meets_epsilon_delta_and_samples_are_normal() -> None:
    eps, delta, sens = 1.0, 1e-6, 100.0
    plan = plan_for({"AMOUNT": {"op": "dp_noise", "mechanism": "gaussian", "epsilon": eps, "delta": delta,
                                "bounds": [0, sens]}})
    sigma = next(f for f in plan.out_schema["fields"] if f["name"] == "amount")[DP_PROP]["scale"]
    # the declared scale is private enough (exact profile), and not wastefully large: at
    # most the classical sigma = sens * sqrt(2 ln(1.25/delta)) / eps (Dwork & Roth, Thm A.1)
    assert _gaussian_delta(eps, sigma, sens) <= delta
    assert sigma <= sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    out = draws(plan, "amount", 20_000, amount=30.0)
    assert stats.kstest(out, stats.norm(loc=30.0, scale=sigma).cdf).pvalue > ALPHA
    # and the integer form (discrete Gaussian) on a long: integers, same spread
    lplan = plan_for({"VISITS": {"op": "dp_noise", "mechanism": "gaussian", "epsilon": eps, "delta": delta,
                                 "bounds": [0, 100]}})
    lout = draws(lplan, "visits", 20_000, visits=30)
    assert all(type(v) is int for v in lout)
    sd = math.sqrt(float(stats.tvar(lout)))
    # sd of the sample sd ~ sigma / sqrt(2n)
    assert abs(sd - sigma) < 5 * sigma / math.sqrt(2 * len(lout))


def test_values_are_clamped_to_the_bounds_before_noise() -> None:
    plan = plan_for({"AMOUNT": LAPLACE, "AGE": {"op": "dp_noise", "mechanism": "geometric", "epsilon": 1.0,
                                                  "bounds": [18, 30]}})
    n = 20_000
    high = draws(plan, "amount", n, amount=1e12)
    low = draws(plan, "amount", n, amount=-1e12)
    se = math.sqrt(2) * 100 / math.sqrt(n)  # Laplace(b=100) mean's standard error
    assert abs(sum(high) / n - 100) < 6 * se
    assert abs(sum(low) / n - 0) < 6 * se
    ages = draws(plan, "age", n, age=95)
    a = 1.0 / 12
    se_i = math.sqrt(2 * math.exp(-a) / (1 - math.exp(-a)) ** 2 / n)
    assert abs(sum(ages) / n - 30) < 6 * se_i


def test_a_nan_fails_the_record_instead_of_passing_through() -> None:
    plan = plan_for({"AMOUNT": LAPLACE})
    fn, _ = compile_plan(plan, NODE)
    with pytest.raises(TransformFailed) as info:
        fn(encode(record(amount=float("nan"))))
    assert info.value.args[0] == "amount"


def test_int_noise_stays_within_the_type_range() -> None:
    plan = plan_for({"AGE": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.01,
                             "bounds": [2**31 - 1000, 2**31 - 1]}})
    out = draws(plan, "age", 2000, age=2**31 - 1)
    assert all(type(v) is int and v <= 2**31 - 1 for v in out)
    assert out.count(2**31 - 1) > 500  # about half the draws were above the range


def test_randomized_response_frequencies_match_the_keep_probability() -> None:
    eps = 1.0
    n = 20_000
    out = draws(plan_for({"GRADE": {"op": "randomized_response", "epsilon": eps}}), "grade", n, grade="B")
    counts = Counter(out)
    assert set(counts) <= {"A", "B", "C", "D"}
    k = 4
    keep = math.exp(eps) / (math.exp(eps) + k - 1)
    assert stats.binomtest(counts["B"], n, keep).pvalue > ALPHA
    # the other symbols are uniform among themselves
    others = [counts[s] for s in ("A", "C", "D")]
    assert stats.chisquare(others).pvalue > ALPHA
    bools = draws(plan_for({"SMOKER": {"op": "randomized_response", "epsilon": eps}}), "smoker", n, smoker=False)
    assert all(type(v) is bool for v in bools)
    assert stats.binomtest(bools.count(False), n, math.exp(eps) / (math.exp(eps) + 1)).pvalue > ALPHA
    # pooled draws are shifted by the input: a True input is kept as often as a False one
    trues = draws(plan_for({"SMOKER": {"op": "randomized_response", "epsilon": eps}}), "smoker", n, smoker=True)
    assert stats.binomtest(trues.count(True), n, math.exp(eps) / (math.exp(eps) + 1)).pvalue > ALPHA
    # power: a keep probability off by 0.03 is rejected
    assert stats.binomtest(bools.count(False), n, math.exp(eps) / (math.exp(eps) + 1) + 0.03).pvalue < ALPHA


def test_mean_of_100k_noised_values_is_within_the_predicted_error() -> None:
    """The analyst's view: 100 000 amounts uniform in [0, 100], each noised with
    Laplace(b = 100) (epsilon 1): the noised mean's error has standard deviation
    sqrt(2) * b / sqrt(n) = 0.447; 5 of those bound it (false alarm 6e-7)."""
    plan = plan_for({"AMOUNT": LAPLACE})
    fn, _ = compile_plan(plan, NODE)
    dec = decoder(plan)
    n = 100_000
    true = [(i * 7919) % 10_001 / 100.0 for i in range(n)]  # spread over [0, 100]
    noised = [dec(b"".join(fn(encode(record(amount=v)))))["amount"] for v in true]
    err = abs(sum(noised) / n - sum(true) / n)
    assert err < 5 * math.sqrt(2) * 100 / math.sqrt(n)


# -- generated code vs the reference interpreter -------------------------------------------


DP_RULES = {
    "AGE": {"op": "dp_noise", "mechanism": "geometric", "epsilon": 1.0, "bounds": [0, 120]},
    "AMOUNT": {"op": "dp_noise", "mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5, "bounds": [-50, 50]},
    "SCORE": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 2.0, "bounds": [0, 1]},
    "VISITS": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.5, "bounds": [0, 1000]},
    "SMOKER": {"op": "randomized_response", "epsilon": 1.0},
    "GRADE": {"op": "randomized_response", "epsilon": 1.0},
}
DP_PLAN = plan_for(DP_RULES)
DP_FN, _ = compile_plan(DP_PLAN, NODE)
DP_DEC = decoder(DP_PLAN)
SCALES = {f["name"]: f[DP_PROP].get("scale") for f in DP_PLAN.out_schema["fields"] if DP_PROP in f}

records = st.fixed_dictionaries({
    "id": st.text(max_size=5),
    "age": st.integers(-(2**31), 2**31 - 1),
    "amount": st.floats(allow_nan=False, width=64),
    "score": st.none() | st.floats(allow_nan=False, width=32),
    "visits": st.integers(-(2**63), 2**63 - 1),
    "smoker": st.booleans(),
    "grade": st.sampled_from(["A", "B", "C", "D"]),
})


@settings(max_examples=150, deadline=None)
@given(rec=records)
def test_generated_code_and_reference_agree_on_structure(rec: dict[str, Any]) -> None:
    data = encode(rec)
    outs = [DP_DEC(b"".join(DP_FN(data))), DP_DEC(run_reference(DP_PLAN, SCHEMA, data))]
    bounds = {t.lower(): spec["bounds"] for t, spec in DP_RULES.items() if "bounds" in spec}
    for out in outs:
        assert set(out) == set(rec) and out["id"] == rec["id"]
        assert type(out["age"]) is int and type(out["visits"]) is int
        assert type(out["smoker"]) is bool and out["grade"] in ("A", "B", "C", "D")
        assert (out["score"] is None) == (rec["score"] is None)
        for name in ("age", "amount", "score", "visits"):
            if out[name] is None:
                continue
            lo, hi = bounds[name]
            clamped = min(max(rec[name], lo), hi)
            # Laplace tails: P(|z| > 60 b) = e^-60; discrete Gaussian at 60 sigma: never
            assert abs(out[name] - clamped) <= 60 * SCALES[name] + 1e-6 * abs(hi)


def test_float_outputs_lie_on_the_mechanism_grid() -> None:
    """The defence against the floating-point attack on textbook Laplace (Mironov 2012):
    every output is clamp(x) rounded to the grid 2^k plus a multiple of 2^k, so outputs are
    multiples of 2^k whatever x was (naive ``x + laplace()`` outputs are not), and the grid
    is far below the noise scale (rounding the input costs nothing visible)."""
    from streamproc.operators.dp import calibrate
    from streamproc.schema.avro import Primitive

    cal = calibrate(LAPLACE, Primitive("double"))
    assert cal.k is not None and 2.0**cal.k <= cal.scale * 2.0**-20
    for x in (50.0, 0.1, 33.333333333333336, 99.99999999999999):
        out = draws(plan_for({"AMOUNT": LAPLACE}), "amount", 500, amount=x)
        assert all((v / 2.0**cal.k).is_integer() for v in out)
        assert len(set(out)) > 490  # and they are not a handful of repeated values


NESTED: dict[str, Any] = {
    "type": "record", "name": "Nested", "namespace": "test.dp", "fields": [
        {"name": "readings", "type": {"type": "array", "items": "double"}, "confluent:tags": ["READING"]},
        {"name": "counts", "type": {"type": "map", "values": "long"}, "confluent:tags": ["COUNT"],
         "streamproc.key_tags": ["PUBLIC"]},
        {"name": "level", "type": ["null", {"type": "enum", "name": "Level", "symbols": ["LO", "MID", "HI"]}],
         "confluent:tags": ["LEVEL"]},
    ],
}


@settings(max_examples=60, deadline=None)
@given(rec=st.fixed_dictionaries({
    "readings": st.lists(st.floats(allow_nan=False, width=64), max_size=5),
    "counts": st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=4),
    "level": st.none() | st.sampled_from(["LO", "MID", "HI"]),
}))
def test_containers_noise_every_element_in_both_implementations(rec: dict[str, Any]) -> None:
    node = avro.parse(NESTED)
    assert isinstance(node, Record)
    doc = {"audiences": {"a": {"record_key": "keep", "tags": {
        "PUBLIC": "keep",
        "READING": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 1.0, "bounds": [-10, 10]},
        "COUNT": {"op": "dp_noise", "mechanism": "geometric", "epsilon": 1.0, "bounds": [0, 50]},
        "LEVEL": {"op": "randomized_response", "epsilon": 1.0},
    }}}}
    plan = build_plan(node, parse_policy(doc).audience("a"), None)
    fields = {f["name"]: f for f in plan.out_schema["fields"]}
    assert fields["readings"][DP_PROP]["mechanism"] == "laplace"
    assert fields["counts"][DP_PROP]["mechanism"] == "geometric"
    assert fields["level"][DP_PROP]["mechanism"] == "randomized_response"
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(NESTED), rec)
    data = buf.getvalue()
    fn, _ = compile_plan(plan, node)
    parsed = fastavro.parse_schema(plan.out_schema)
    for out_bytes in (b"".join(fn(data)), run_reference(plan, NESTED, data)):
        out = fastavro.schemaless_reader(io.BytesIO(out_bytes), parsed, None)
        assert len(out["readings"]) == len(rec["readings"])
        for v_in, v_out in zip(rec["readings"], out["readings"], strict=True):
            assert abs(v_out - min(max(v_in, -10), 10)) <= 60 * 20
        assert set(out["counts"]) == set(rec["counts"])  # keys kept (PUBLIC), values noised
        assert all(type(v) is int and abs(v - min(max(rec["counts"][key], 0), 50)) <= 60 * 50
                   for key, v in out["counts"].items())
        assert (out["level"] is None) == (rec["level"] is None)
        assert out["level"] in (None, "LO", "MID", "HI")


@pytest.mark.parametrize("eps", [0.1, 2.5])
def test_boolean_flips_come_from_opendp_bitvector_rr_at_the_right_rate(eps: float) -> None:
    """Booleans take the fast path (OpenDP's bit-vector randomized response, checked
    against its privacy map), and the keep rate is e^eps/(e^eps+1) there too."""
    import opendp.prelude as dp

    from streamproc.operators.dp import _bit_flips

    dp.enable_features("contrib")
    q = 1 / (math.exp(eps) + 1)
    assert _bit_flips(dp, q, eps, []) is not None
    assert _bit_flips(dp, q, eps * 0.9, []) is None  # the map says it would exceed: refused
    n = 40_000
    out = draws(plan_for({"SMOKER": {"op": "randomized_response", "epsilon": eps}}), "smoker", n, smoker=True)
    assert stats.binomtest(out.count(True), n, 1 - q).pvalue > ALPHA
