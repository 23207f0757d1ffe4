"""Every operator: parameter validation (precise messages), output types, behaviour.

Operators see raw Avro values (days for ``date``, epoch units for timestamps, symbol
indexes for enums), exactly as the generated code and the reference interpreter pass them.
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import re
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import (
    PseudonymKeys,
    ReidentificationError,
    siv_decrypt,
    version_of,
)
from streamproc.operators import REGISTRY, OpContext, OperatorError, get_operator
from streamproc.operators.base import STRING
from streamproc.pipeline.codegen import compile_plan
from streamproc.pipeline.plan import build_plan
from streamproc.pipeline.reference import run_reference
from streamproc.policy.model import parse_policy
from streamproc.schema import avro
from streamproc.schema.avro import AvroType, Enum, Primitive, Record, Union
from tests.unit.conftest import PSEUDONYM

S = Primitive("string")
INT = Primitive("int")
LONG = Primitive("long")
DOUBLE = Primitive("double")
FLOAT = Primitive("float")
BYTES = Primitive("bytes")
BOOL = Primitive("boolean")
DATE = Primitive("int", {"logicalType": "date"})
TS_MS = Primitive("long", {"logicalType": "timestamp-millis"})
TS_US = Primitive("long", {"logicalType": "timestamp-micros"})
ENUM = Enum("enum", {}, "Color", None, ["RED", "GREEN"])
REC = avro.parse({"type": "record", "name": "R", "fields": [{"name": "a", "type": "string"}]})
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
TOKEN_RE = re.compile(r"^tk(\d+)_[A-Za-z0-9_-]{22}$")


def bind(op: str, params: dict[str, Any], t: AvroType, keys: PseudonymKeys | None = None,
         audience: str = "aud", domain: str = "dom", shared: frozenset[str] = frozenset()) -> Any:
    o = get_operator(op)
    o.validate(params)
    o.output_type(params, t)
    return o.bind(params, t, OpContext(audience, domain, "field", keys, shared))


def days(d: dt.date) -> int:
    return (d - dt.date(1970, 1, 1)).days


def millis(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(milliseconds=1)


def micros(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)


# -- registry and the common contract -----------------------------------------------------


def test_registry_names_every_operator() -> None:
    assert sorted(REGISTRY) == sorted(
        ["keep", "drop", "redact", "mask", "token", "encrypt_deterministic", "generalize", "date_shift",
         "dp_noise", "randomized_response"]
    )
    with pytest.raises(OperatorError, match=r"^unknown operator 'hash'; known: date_shift, dp_noise, drop, "):
        get_operator("hash")


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("token", {"salt": "x"}, "unknown parameter(s) ['salt']; allowed: ['domain', 'normalize']"),
        ("token", {"domain": 7}, "parameter 'domain' must be str"),
        ("token", {"normalize": ["upper"]}, "unknown normalization 'upper' (lower, strip, digits)"),
        ("encrypt_deterministic", {"normalize": "title"}, "unknown normalization 'title' (lower, strip, digits)"),
        ("keep", {"x": 1}, "unknown parameter(s) ['x']; allowed: none"),
        ("drop", {"x": 1}, "unknown parameter(s) ['x']; allowed: none"),
        ("mask", {"keep_last": -1}, "keep_last must be >= 0"),
        ("mask", {"keep_first": "2"}, "parameter 'keep_first' must be int"),
        ("mask", {"keep_last": True}, "parameter 'keep_last' must be int"),
        ("mask", {"char": "**"}, "char must be a single character"),
        ("mask", {"fixed_length": -3}, "fixed_length must be >= 0"),
        ("redact", {"value": [1]}, "parameter 'value' must be str/int/float/bool/NoneType"),
        ("generalize", {}, "generalize needs exactly one of to, bucket, prefix, until, cidr"),
        ("generalize", {"to": "day", "bucket": 5}, "generalize needs exactly one of to, bucket, prefix, until, cidr"),
        ("generalize", {"to": "week"}, "'to' must be hour, day, month or year"),
        ("generalize", {"bucket": 0}, "'bucket' must be > 0"),
        ("generalize", {"bucket": -2.5}, "'bucket' must be > 0"),
        ("generalize", {"prefix": -1}, "'prefix' must be >= 0"),
        ("generalize", {"cidr": 33}, "'cidr' must be 0..32"),
        ("generalize", {"cidr": 24, "cidr6": 129}, "'cidr6' must be 0..128"),
        ("generalize", {"cidr6": 64}, "generalize needs exactly one of to, bucket, prefix, until, cidr"),
        ("date_shift", {"max_days": 0}, "max_days must be 1..3650"),
        ("date_shift", {"max_days": 3651}, "max_days must be 1..3650"),
        ("date_shift", {"max_days": True}, "parameter 'max_days' must be int"),
        ("date_shift", {"subject_field": 3}, "parameter 'subject_field' must be str"),
    ],
)
def test_validate_rejects_bad_params_precisely(op: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(OperatorError) as info:
        get_operator(op).validate(params)
    assert str(info.value) == message


def test_cidr6_without_cidr_is_named() -> None:
    # {"cidr6": 64} alone fails the 'exactly one mode' check first; with a mode it is explicit
    with pytest.raises(OperatorError, match=r"^'cidr6' goes with 'cidr'$"):
        get_operator("generalize").validate({"prefix": 2, "cidr6": 64})


@pytest.mark.parametrize(
    ("op", "params", "t", "out"),
    [
        ("keep", {}, REC, REC),
        ("drop", {}, S, None),
        ("token", {}, LONG, STRING),
        ("token", {}, ENUM, STRING),
        ("token", {}, DATE, STRING),
        ("encrypt_deterministic", {}, BYTES, STRING),
        ("mask", {}, INT, STRING),
        ("generalize", {"to": "month"}, TS_MS, TS_MS),
        ("generalize", {"bucket": 10}, LONG, LONG),
        ("generalize", {"bucket": 0.5}, DOUBLE, DOUBLE),
        ("generalize", {"cidr": 24}, S, S),
        ("date_shift", {}, DATE, DATE),
        ("redact", {"value": "X"}, S, S),
        ("redact", {"value": 3}, DOUBLE, DOUBLE),
    ],
)
def test_output_types(op: str, params: dict[str, Any], t: AvroType, out: AvroType | None) -> None:
    got = get_operator(op).output_type(params, t)
    if out is None:
        assert got is None
    else:
        assert got is not None
        assert avro.to_json(got) == avro.to_json(out)


@pytest.mark.parametrize(
    ("op", "params", "t", "message"),
    [
        ("token", {}, REC, "token does not apply to Avro type 'record' (applies to "),
        ("encrypt_deterministic", {}, Primitive("null"), "encrypt_deterministic does not apply to Avro type 'null'"),
        ("mask", {}, DATE, "mask does not apply to Avro type 'date' (applies to int, long, string)"),
        ("mask", {}, DOUBLE, "mask does not apply to Avro type 'double'"),
        ("generalize", {"to": "year"}, S, "generalize does not apply to Avro type 'string' (applies to date, timestamp-micros, timestamp-millis)"),
        ("generalize", {"to": "hour"}, DATE, "a date cannot be generalized to the hour"),
        ("generalize", {"bucket": 2.5}, INT, "an integer field needs an integer bucket"),
        ("generalize", {"bucket": 5}, S, "generalize does not apply to Avro type 'string'"),
        ("generalize", {"cidr": 24}, LONG, "generalize does not apply to Avro type 'long' (applies to string)"),
        ("date_shift", {}, LONG, "date_shift does not apply to Avro type 'long'"),
        ("redact", {"value": "x"}, INT, "redact constant str does not fit Avro type 'int'"),
        ("redact", {"value": True}, INT, "redact constant bool does not fit Avro type 'int'"),
        ("redact", {"value": 1.5}, LONG, "redact constant float does not fit Avro type 'long'"),
        ("redact", {"value": "RED"}, ENUM, "redact constant str does not fit Avro type 'enum'"),
        ("redact", {}, Union("union", branches=[S, LONG]), "redact to null needs a union with a null branch"),
    ],
)
def test_output_type_rejects_inapplicable_types(op: str, params: dict[str, Any], t: AvroType, message: str) -> None:
    with pytest.raises(OperatorError) as info:
        get_operator(op).output_type(params, t)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("op", ["token", "encrypt_deterministic", "date_shift"])
def test_keyed_operators_refuse_to_bind_without_keys(op: str) -> None:
    t = DATE if op == "date_shift" else S
    with pytest.raises(OperatorError, match=r"needs pseudonym keys \(policy 'keys.pseudonym'\)"):
        get_operator(op).bind({}, t, OpContext("aud", "dom", "f", None))


# -- token ------------------------------------------------------------------------------


def test_token_format_and_determinism(keys: PseudonymKeys) -> None:
    tok = bind("token", {}, S, keys)
    a = tok("alice@example.com")
    assert TOKEN_RE.match(a)
    assert a.startswith(f"tk{keys.primary_version}_")
    assert tok("alice@example.com") == a
    assert bind("token", {}, S, keys)("alice@example.com") == a  # a fresh binding agrees
    assert tok("bob@example.com") != a
    assert "alice" not in a


def test_token_domains_and_audiences_are_unlinkable_unless_shared(keys: PseudonymKeys) -> None:
    v = "cust-0042"
    t_customer = bind("token", {}, S, keys, domain="customer")(v)
    t_other = bind("token", {}, S, keys, domain="orders")(v)
    assert t_customer != t_other
    # tokens are per audience by default: two audiences cannot join on them
    assert bind("token", {}, S, keys, audience="other", domain="customer")(v) != t_customer
    # ... unless the policy shares the domain between them (keys.shared_domains)
    shared = frozenset({"customer"})
    a = bind("token", {}, S, keys, audience="aud", domain="customer", shared=shared)(v)
    b = bind("token", {}, S, keys, audience="other", domain="customer", shared=shared)(v)
    assert a == b and a not in (t_customer, t_other)
    # sharing one domain shares nothing else
    assert bind("token", {}, S, keys, audience="other", domain="orders", shared=shared)(v) != t_other


def test_encrypt_deterministic_refuses_a_shared_domain(keys: PseudonymKeys) -> None:
    with pytest.raises(OperatorError, match="domain 'customer' is shared between audiences"):
        bind("encrypt_deterministic", {}, S, keys, domain="customer", shared=frozenset({"customer"}))


def test_token_joins_across_types_by_canonical_value(keys: PseudonymKeys) -> None:
    s = bind("token", {}, S, keys)
    assert bind("token", {}, LONG, keys)(42) == s("42")
    assert bind("token", {}, DOUBLE, keys)(42.0) == s("42")
    assert bind("token", {}, BYTES, keys)(b"42") == s("42")
    assert bind("token", {}, BOOL, keys)(True) == s("true")
    assert bind("token", {}, ENUM, keys)(1) == s("GREEN")  # enums arrive as symbol indexes


def test_token_normalize(keys: PseudonymKeys) -> None:
    norm = bind("token", {"normalize": ["lower", "strip"]}, S, keys)
    plain = bind("token", {}, S, keys)
    assert norm("  Alice@Example.COM ") == norm("alice@example.com") == plain("alice@example.com")
    assert plain("  Alice@Example.COM ") != plain("alice@example.com")
    digits = bind("token", {"normalize": "digits"}, S, keys)
    assert digits("+44 (0)20-7946 0000") == plain("440207946" + "0000")


#: Known answers for the normalizers, worked out from the Unicode data by hand: case
#: folding (CaseFolding.txt: U+00DF -> "ss", U+0130 -> "i" + U+0307, U+03A3/U+03C2 -> U+03C3,
#: U+212A KELVIN SIGN -> "k") and NFKC (full-width forms U+FF01..U+FF5E -> ASCII,
#: U+00B2 SUPERSCRIPT TWO -> "2", U+FB01 LIGATURE FI -> "fi").
LOWER_VECTORS = [
    ("Alice@Example.COM", "alice@example.com"),
    ("Stra\u00dfe", "strasse"),
    ("STRASSE", "strasse"),
    ("\u0130stanbul", "i\u0307stanbul"),
    ("\u03a3\u03bf\u03c6\u03bf\u03c2", "\u03c3\u03bf\u03c6\u03bf\u03c3"),  # final sigma folds too
    ("\uff21\uff4c\uff49\uff43\uff45\uff20\uff45\uff58\uff0e\uff43\uff4f\uff4d", "alice@ex.com"),
    ("\u212aelvin", "kelvin"),
    ("\ufb01le", "file"),
]
DIGIT_VECTORS = [
    ("+44 (0)20-7946 0000", "440207946" + "0000"),
    ("\uff10\uff11\uff12", "012"),  # full-width digits are ASCII digits after NFKC
    ("x\u00b2", "2"),  # NFKC maps the superscript to "2"
    ("\u0663\u0664", ""),  # ARABIC-INDIC digits: not ASCII digits, not kept
    ("\u096a2", "2"),  # DEVANAGARI FOUR is dropped, the ASCII 2 stays
]


@pytest.mark.parametrize(("raw", "folded"), LOWER_VECTORS)
def test_lower_is_a_caseless_match(raw: str, folded: str) -> None:
    from streamproc.operators.base import normalizer

    norm = normalizer(["lower"])
    assert norm is not None and norm(raw) == folded


@pytest.mark.parametrize(("raw", "digits"), DIGIT_VECTORS)
def test_digits_keeps_ascii_digits_only(raw: str, digits: str) -> None:
    from streamproc.operators.base import normalizer

    norm = normalizer("digits")
    assert norm is not None and norm(raw) == digits


def test_case_variants_tokenize_alike(keys: PseudonymKeys) -> None:
    norm = bind("token", {"normalize": ["lower", "strip"]}, S, keys)
    plain = bind("token", {}, S, keys)
    for raw, folded in LOWER_VECTORS:
        assert norm(raw) == plain(folded)
    assert norm("Stra\u00dfe") == norm("STRASSE")  # str.lower left these two tokens apart


def test_token_changes_with_master_version(keyring: LocalKeyring) -> None:
    k1 = PseudonymKeys(keyring, PSEUDONYM)
    before = bind("token", {}, S, k1)("alice")
    new = keyring.rotate(PSEUDONYM)
    k2 = PseudonymKeys(keyring, PSEUDONYM)
    after = bind("token", {}, S, k2)("alice")
    assert k2.primary_version == new == 2
    assert before.startswith("tk1_") and after.startswith("tk2_")
    assert before[4:] != after[4:]
    assert version_of(before) == 1 and version_of(after) == 2
    # the old version stays derivable, and derives the same key as before
    assert k2.token_key("dom", 1, audience="aud") == k1.token_key("dom", audience="aud")


@settings(max_examples=100, deadline=None)
@given(a=st.text(max_size=30), b=st.text(max_size=30), d1=st.text(min_size=1, max_size=8), d2=st.text(min_size=1, max_size=8))
def test_token_properties(shared_keys: PseudonymKeys, a: str, b: str, d1: str, d2: str) -> None:
    t1 = bind("token", {}, S, shared_keys, domain=d1)
    assert t1(a) == t1(a)
    assert TOKEN_RE.match(t1(a))
    assert (t1(a) == t1(b)) == (a == b)
    if d1 != d2:
        assert bind("token", {}, S, shared_keys, domain=d2)(a) != t1(a)


# -- encrypt_deterministic --------------------------------------------------------------


def test_encrypt_deterministic_is_deterministic_and_reversible_by_the_audience(keys: PseudonymKeys) -> None:
    enc = bind("encrypt_deterministic", {}, S, keys, audience="fraud", domain="EMAIL")
    c = enc("alice@example.com")
    assert c.startswith(f"de{keys.primary_version}_")
    assert enc("alice@example.com") == c
    assert enc("bob@example.com") != c
    assert "alice" not in c
    _, key = keys.siv_key("fraud")
    assert siv_decrypt(key, "EMAIL", c) == b"alice@example.com"
    assert version_of(c) == keys.primary_version


def test_encrypt_deterministic_wrong_audience_or_domain_fails(keys: PseudonymKeys) -> None:
    c = bind("encrypt_deterministic", {}, S, keys, audience="fraud", domain="EMAIL")("alice@example.com")
    _, other = keys.siv_key("analytics")
    with pytest.raises(ReidentificationError) as info:
        siv_decrypt(other, "EMAIL", c)
    assert "alice" not in str(info.value)
    _, key = keys.siv_key("fraud")
    with pytest.raises(ReidentificationError):
        siv_decrypt(key, "PHONE", c)  # domain bound (associated data)
    with pytest.raises(ReidentificationError):
        siv_decrypt(key, "EMAIL", "tk1_" + c[4:])
    with pytest.raises(ReidentificationError):
        siv_decrypt(key, "EMAIL", c[:-2] + ("A" if c[-2] != "A" else "B") + c[-1])
    # another audience's ciphertext of the same value differs
    assert bind("encrypt_deterministic", {}, S, keys, audience="support", domain="EMAIL")("alice@example.com") != c


def test_encrypt_deterministic_normalize_and_types(keys: PseudonymKeys) -> None:
    _, key = keys.siv_key("aud")
    enc = bind("encrypt_deterministic", {"normalize": ["strip", "lower"]}, S, keys)
    assert enc(" ALICE@x.org") == enc("alice@x.org")
    assert siv_decrypt(key, "dom", enc(" ALICE@x.org")) == b"alice@x.org"
    assert siv_decrypt(key, "dom", bind("encrypt_deterministic", {}, LONG, keys)(-42)) == b"-42"
    assert siv_decrypt(key, "dom", bind("encrypt_deterministic", {}, ENUM, keys)(0)) == b"RED"
    assert siv_decrypt(key, "dom", bind("encrypt_deterministic", {}, BYTES, keys)(b"\x00\xff")) == b"\x00\xff"


@settings(max_examples=60, deadline=None)
@given(a=st.text(max_size=40), b=st.text(max_size=40))
def test_encrypt_deterministic_properties(shared_keys: PseudonymKeys, a: str, b: str) -> None:
    enc = bind("encrypt_deterministic", {}, S, shared_keys, audience="fraud")
    assert (enc(a) == enc(b)) == (a == b)
    assert siv_decrypt(shared_keys.siv_key("fraud")[1], "dom", enc(a)) == a.encode()


# -- mask --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "value", "expected"),
    [
        ({"keep_last": 4}, "4000123412341234", "************1234"),
        ({"keep_last": 4}, "1234", "****"),  # too short to reveal anything: fully masked
        ({"keep_last": 4}, "abc", "***"),
        ({"keep_last": 4}, "", ""),
        ({"keep_first": 2, "keep_last": 2}, "abcd", "****"),
        ({"keep_first": 2, "keep_last": 2}, "abcde", "*****"),  # 4 of 5 shown: too many
        ({"keep_first": 2, "keep_last": 2}, "abcdefgh", "ab****gh"),  # exactly half shown
        ({"keep_last": 4}, "12345", "*****"),  # was "*2345": all but one digit
        ({"keep_last": 4}, "1234567", "*******"),
        ({"keep_last": 4}, "12345678", "****5678"),
        ({"keep_first": 1, "preserve": "@."}, "a@b.c", "*****"),  # separators count as shown
        ({"keep_first": 1, "preserve": "@."}, "ab@cd.e", "a*@**.*"),
        ({"keep_first": 2, "preserve": "@."}, "john.doe@example.com", "jo**.***@*******.***"),
        ({"keep_first": 1, "char": "#"}, "secret", "s#####"),
        ({"fixed_length": 3}, "a very long secret", "***"),
        ({"keep_last": 2, "fixed_length": 4}, "+447700900123", "****23"),
        ({}, "x", "*"),
        ({}, "héllo😀", "******"),
    ],
)
def test_mask_strings(params: dict[str, Any], value: str, expected: str) -> None:
    assert bind("mask", params, S)(value) == expected


def test_mask_numbers_become_strings() -> None:
    assert bind("mask", {"keep_last": 4}, LONG)(123456789) == "*****6789"
    assert bind("mask", {"keep_last": 2}, INT)(-12345) == "****45"
    assert bind("mask", {"keep_last": 4}, INT)(42) == "**"


@settings(max_examples=100, deadline=None)
@given(v=st.text(max_size=30), first=st.integers(0, 5), last=st.integers(0, 5))
def test_mask_never_reveals_more_than_asked(v: str, first: int, last: int) -> None:
    out = bind("mask", {"keep_first": first, "keep_last": last}, S)(v)
    assert len(out) == len(v)
    # at least half of the characters are masked, whatever the rule asks
    assert sum(a == b for a, b in zip(out, v, strict=True) if a != "*") * 2 <= len(v)
    if (first + last) * 2 > len(v):
        assert out == "*" * len(v)
    else:
        assert out[:first] == v[:first] and out[len(v) - last :] == v[len(v) - last :]
        assert set(out[first : len(v) - last]) <= {"*"}


# -- redact ------------------------------------------------------------------------------


def test_redact_constant_and_null_output_union() -> None:
    assert bind("redact", {"value": "REDACTED"}, S)("secret") == "REDACTED"
    dbl = bind("redact", {"value": 3}, DOUBLE)(1.25)
    assert dbl == 3.0 and isinstance(dbl, float)
    assert bind("redact", {"value": False}, BOOL)(True) is False
    assert bind("redact", {}, S)("secret") is None
    out = get_operator("redact").output_type({}, S)
    assert avro.to_json(out) == ["null", "string"]  # type: ignore[arg-type]
    nullable = Union("union", branches=[S, Primitive("null")])
    assert get_operator("redact").output_type({}, nullable) is nullable
    rec_out = get_operator("redact").output_type({"value": None}, REC)
    assert isinstance(rec_out, Union) and rec_out.branches[1] is REC


def _run_plan(schema: dict[str, Any], tags: dict[str, Any], record: dict[str, Any], keys: PseudonymKeys) -> tuple[bytes, Any]:
    doc = {"keys": {"pseudonym": PSEUDONYM}, "audiences": {"a": {"untagged": "keep", "tags": tags}}}
    node = avro.parse(schema)
    assert isinstance(node, Record)
    plan = build_plan(node, parse_policy(doc).audience("a"), keys)
    fastavro.parse_schema(plan.out_schema)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    fn, _ = compile_plan(plan, node)
    out = b"".join(fn(buf.getvalue()))
    assert out == run_reference(plan, schema, buf.getvalue())
    return out, plan.out_schema


@pytest.mark.parametrize(
    "ftype",
    [
        {"type": "record", "name": "Addr", "fields": [{"name": "street", "type": "string"}]},
        {"type": "array", "items": "string"},
        {"type": "map", "values": "long"},
        ["null", "string", "long"],
    ],
    ids=["record", "array", "map", "general-union"],
)
def test_redact_to_null_of_complex_types_compiles_and_runs(shared_keys: PseudonymKeys, ftype: Any) -> None:
    schema = {"type": "record", "name": "T", "fields": [
        {"name": "id", "type": "string"},
        {"name": "x", "type": ftype, "confluent:tags": ["PII"]},
    ]}
    value: Any = {"street": "1 Main St"} if isinstance(ftype, dict) and ftype["type"] == "record" else (
        ["a", "b"] if isinstance(ftype, dict) and ftype["type"] == "array" else (
            {"k": 1} if isinstance(ftype, dict) else "s"))
    out, out_schema = _run_plan(schema, {"PII": "redact"}, {"id": "i1", "x": value}, shared_keys)
    decoded = fastavro.schemaless_reader(io.BytesIO(out), fastavro.parse_schema(out_schema), None)
    assert decoded == {"id": "i1", "x": None}
    assert b"Main" not in out


# -- generalize --------------------------------------------------------------------------

LEAP = dt.datetime(2024, 2, 29, 13, 45, 30, 123456, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("day", dt.date(2024, 2, 29)),
        ("month", dt.date(2024, 2, 1)),
        ("year", dt.date(2024, 1, 1)),
    ],
)
def test_generalize_date(to: str, expected: dt.date) -> None:
    assert bind("generalize", {"to": to}, DATE)(days(dt.date(2024, 2, 29))) == days(expected)


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("hour", dt.datetime(2024, 2, 29, 13, tzinfo=dt.UTC)),
        ("day", dt.datetime(2024, 2, 29, tzinfo=dt.UTC)),
        ("month", dt.datetime(2024, 2, 1, tzinfo=dt.UTC)),
        ("year", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
    ],
)
def test_generalize_timestamps(to: str, expected: dt.datetime) -> None:
    assert bind("generalize", {"to": to}, TS_MS)(millis(LEAP)) == millis(expected)
    assert bind("generalize", {"to": to}, TS_US)(micros(LEAP)) == micros(expected)


def test_generalize_before_the_epoch_floors() -> None:
    t = dt.datetime(1969, 12, 31, 23, 30, tzinfo=dt.UTC)
    assert bind("generalize", {"to": "hour"}, TS_MS)(millis(t)) == millis(t.replace(minute=0))
    assert bind("generalize", {"to": "day"}, TS_US)(micros(t)) == micros(t.replace(hour=0, minute=0))
    assert bind("generalize", {"to": "month"}, TS_MS)(millis(t)) == millis(dt.datetime(1969, 12, 1, tzinfo=dt.UTC))
    assert bind("generalize", {"to": "year"}, DATE)(days(dt.date(1955, 7, 4))) == days(dt.date(1955, 1, 1))


@pytest.mark.parametrize(
    ("t", "bucket", "value", "expected"),
    [
        (INT, 10, 37, 30),
        (INT, 10, -37, -40),
        (LONG, 1000, -1, -1000),
        (LONG, 5, 0, 0),
        (INT, 2.0, 7, 6),
        (DOUBLE, 0.5, 3.7, 3.5),
        (DOUBLE, 1, -3.2, -4),
        (FLOAT, 10, 99.9, 90),
    ],
)
def test_generalize_bucket(t: AvroType, bucket: float, value: float, expected: float) -> None:
    assert bind("generalize", {"bucket": bucket}, t)(value) == expected


def test_generalize_prefix_and_until() -> None:
    assert bind("generalize", {"prefix": 3}, S)("SW1A 1AA") == "SW1"
    assert bind("generalize", {"prefix": 0}, S)("SW1A 1AA") == ""
    assert bind("generalize", {"until": " "}, S)("SW1A 1AA") == "SW1A"
    assert bind("generalize", {"until": " "}, S)("NOSPACE") == "NOSPACE"
    assert bind("generalize", {"until": "@"}, S)("alice@example.com") == "alice"


@pytest.mark.parametrize(
    ("params", "ip", "expected"),
    [
        ({"cidr": 24}, "203.0.113.77", "203.0.113.0/24"),
        ({"cidr": 16}, "203.0.113.77", "203.0.0.0/16"),
        ({"cidr": 32}, "203.0.113.77", "203.0.113.77"),  # the whole address: the input, for the guard
        ({"cidr": 0}, "203.0.113.77", "0.0.0.0/0"),
        ({"cidr": 24}, "255.255.255.255", "255.255.255.0/24"),
        ({"cidr": 24}, " 203.0.113.77 ", "203.0.113.0/24"),
        ({"cidr": 24}, "2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::/48"),
        ({"cidr": 24, "cidr6": 64}, "2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd:12::/64"),
        ({"cidr": 24, "cidr6": 128}, "::1", "::1"),
    ],
)
def test_generalize_cidr(params: dict[str, Any], ip: str, expected: str) -> None:
    assert bind("generalize", params, S)(ip) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "not an ip", "256.1.1.1", "1.2.3", "1.2.3.4.5", "1.2.3.-4", "1..2.3", "010.0.0.1",
     "١٢٣.1.1.1", "1.2.3.4/24", "2001:db8::g", "::1::"],
)
def test_generalize_cidr_rejects_invalid_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        bind("generalize", {"cidr": 24}, S)(bad)


def _slow_network(v: str, c4: int, c6: int) -> str:
    """A second implementation: the embedded IPv4 through ipaddress's own properties."""
    ip: Any = ipaddress.ip_address(v.strip())
    if ip.version == 6:
        if ip in ipaddress.ip_network("64:ff9b:1::/48"):
            return v  # no safe cut: the input, which the fail-closed guard refuses
        teredo = ip.teredo
        v4 = ip.ipv4_mapped or ip.sixtofour or (teredo[1] if teredo else None)
        if v4 is None and (ip in ipaddress.ip_network("64:ff9b::/96")
                           or (ip in ipaddress.ip_network("::/96") and ip not in (ipaddress.ip_address("::"),
                                                                                   ipaddress.ip_address("::1")))):
            v4 = ipaddress.IPv4Address(ip.packed[12:])
        if v4 is not None:
            if c4 == 32:
                return v  # the whole embedded address: refused by the guard
            ip = v4
    net = ipaddress.ip_network(f"{ip}/{c4 if ip.version == 4 else c6}", strict=False)
    return v if net.prefixlen == net.max_prefixlen else str(net)  # a full prefix: the input


_quad_part = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "", " 1", "1 ", "٣", "²", "+1", "0x1"]))


@settings(max_examples=300, deadline=None)
@given(
    v=st.one_of(
        st.tuples(_quad_part, _quad_part, _quad_part, _quad_part).map(".".join),
        st.ip_addresses().map(str),
        st.text(max_size=16),
    ),
    c4=st.integers(0, 32),
)
def test_generalize_cidr_fast_path_agrees_with_ipaddress(v: str, c4: int) -> None:
    fast = bind("generalize", {"cidr": c4}, S)
    try:
        expected = _slow_network(v, c4, 48)
    except ValueError:
        with pytest.raises(ValueError):
            fast(v)
        return
    assert fast(v) == expected


# -- date_shift --------------------------------------------------------------------------


def test_date_shift_is_consistent_per_subject_and_bounded(keys: PseudonymKeys) -> None:
    shift = bind("date_shift", {"max_days": 30}, DATE, keys)
    base = days(dt.date(2024, 2, 29))
    offsets = {}
    for i in range(300):
        subj = f"cust-{i}".encode()
        d = shift(base, subj) - base
        assert shift(base + 100, subj) - (base + 100) == d  # one subject, one offset
        assert shift(base, subj) - base == d  # deterministic
        assert 1 <= abs(d) <= 30
        offsets[subj] = d
    assert len(set(offsets.values())) > 30  # both directions, many values
    assert any(v > 0 for v in offsets.values()) and any(v < 0 for v in offsets.values())


def test_date_shift_units_and_max_days(keys: PseudonymKeys) -> None:
    subj = b"cust-1"
    d_days = bind("date_shift", {"max_days": 7}, DATE, keys)(0, subj)
    assert 1 <= abs(d_days) <= 7
    ms = bind("date_shift", {"max_days": 7}, TS_MS, keys)(0, subj)
    us = bind("date_shift", {"max_days": 7}, TS_US, keys)(0, subj)
    assert ms == d_days * 86_400_000
    assert us == d_days * 86_400_000_000
    one = bind("date_shift", {"max_days": 1}, DATE, keys)
    assert {abs(one(0, f"s{i}".encode())) for i in range(50)} == {1}


def test_date_shift_is_keyed(keyring: LocalKeyring, tmp_path: Any) -> None:
    from tests.unit.conftest import new_keyring

    k1 = PseudonymKeys(keyring, PSEUDONYM)
    k2 = PseudonymKeys(new_keyring(tmp_path / "other"), PSEUDONYM)
    subjects = [f"cust-{i}".encode() for i in range(40)]
    a = [bind("date_shift", {}, DATE, k1)(0, s) for s in subjects]
    b = [bind("date_shift", {}, DATE, k2)(0, s) for s in subjects]
    assert a != b
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 10
    # and bound to audience and to the date-shift domain (the rule's ``domain``)
    c = [bind("date_shift", {}, DATE, k1, audience="other")(0, s) for s in subjects]
    d = [bind("date_shift", {"domain": "other"}, DATE, k1)(0, s) for s in subjects]
    assert a != c and a != d
    # a shared date-shift domain moves both audiences' dates alike
    sh = frozenset({"subject"})
    e = [bind("date_shift", {}, DATE, k1, shared=sh)(0, s) for s in subjects]
    f = [bind("date_shift", {}, DATE, k1, audience="other", shared=sh)(0, s) for s in subjects]
    assert e == f and e != a


def test_date_shift_ignores_the_tag_and_field_domain(keys: PseudonymKeys) -> None:
    """Point 9: one subject's dates of different tags move by one shift (the field's
    domain, which defaults to its tag, plays no part), so intervals survive."""
    subjects = [f"cust-{i}".encode() for i in range(40)]
    admit = bind("date_shift", {}, DATE, keys, domain="ADMISSION_DATE")
    leave = bind("date_shift", {}, TS_MS, keys, domain="DISCHARGE_DATE")
    for s in subjects:
        a, b = days(dt.date(2024, 3, 1)), millis(dt.datetime(2024, 3, 6, tzinfo=dt.UTC))
        stay = (leave(b, s) - admit(a, s) * 86_400_000)
        assert stay == 5 * 86_400_000


@settings(max_examples=100, deadline=None)
@given(subject=st.binary(max_size=20), v=st.integers(-700_000, 2_900_000), max_days=st.integers(1, 3650))
def test_date_shift_properties(shared_keys: PseudonymKeys, subject: bytes, v: int, max_days: int) -> None:
    shift = bind("date_shift", {"max_days": max_days}, DATE, shared_keys)
    d = shift(v, subject) - v
    assert d != 0 and abs(d) <= max_days
    assert shift(v + 1, subject) - (v + 1) == d


@pytest.mark.parametrize(
    ("params", "t", "value"),
    [
        ({"bucket": 1000}, LONG, -(2**63) + 807),  # -...775001 floors to -...776000 < -2**63
        ({"bucket": 7}, INT, -(2**31)),
        ({"to": "hour"}, Primitive("long", {"logicalType": "timestamp-millis"}), -(2**63) + 1),
    ],
)
def test_generalize_never_floors_out_of_the_type_range(params: dict[str, Any], t: AvroType, value: int) -> None:
    with pytest.raises(OverflowError):
        bind("generalize", params, t)(value)
