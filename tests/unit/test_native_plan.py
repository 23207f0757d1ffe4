"""The compiled plan interpreter (``streamproc._native``) against the generated Python code.

The generated Python function (``compile_plan``) is the oracle, and the reference
interpreter (``run_reference``) the oracle's oracle: on random schemas, records and
policies (the generators of ``test_plan_properties``) the native interpreter must give the
same bytes, or fail with ``TransformFailed`` on the same field with the same reason, or
fail as malformed input exactly when the generated code does -- for valid records, framed
records and corrupted ones.  Then the fail-closed cases one by one (an operator raising,
refusing, returning the wrong type), the fallbacks (recursive schemas, subject-keyed
operators, ``STREAMPROC_NATIVE=0``) and the whole pipeline with and without it.

Every test but the first skips when the extension is not built (no Rust toolchain at
install time); the first fails in CI where cargo exists but the extension is missing, so a
broken build cannot pass silently as skips.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from streamproc.client import RecordOpener, RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.erasure import SubjectForgotten
from streamproc.crypto.pseudonym import PseudonymKeys, make_text_tokenizer
from streamproc.errors import KmsUnavailable, Reason, TransientError
from streamproc.operators.base import Ineffective
from streamproc.pipeline import core, native
from streamproc.pipeline.codegen import TransformFailed, compile_plan
from streamproc.pipeline.core import InputRecord
from streamproc.pipeline.plan import Apply, Plan, build_plan
from streamproc.pipeline.reference import run_reference
from streamproc.schema import avro
from streamproc.schema.avro import Primitive, Record
from tests.unit.conftest import ORDER_SCHEMA, Maker
from tests.unit.test_plan_properties import (
    BAD_PAYLOAD_ERRORS,
    PROPS,
    _audience,
    cases,
    encode,
    make_plan,
    mutate,
)

needs_native = pytest.mark.skipif(not native.available(), reason="streamproc._native is not built (no cargo at install)")


def test_extension_is_built_where_cargo_is() -> None:
    """In CI (``CI`` set) with a Rust toolchain, ``pip install -e .`` must have built it."""
    if not os.environ.get("CI") or shutil.which("cargo") is None:
        pytest.skip("only checked in CI with cargo on PATH")
    assert native.available()


def outcome(fn: Any, data: bytes) -> tuple[Any, ...]:
    """What the pipeline would make of one call: output, transform failure, bad payload."""
    try:
        return ("out", b"".join(fn(data)))
    except TransformFailed as exc:
        return ("transform_failed", exc.args[0], exc.reason)
    except BAD_PAYLOAD_ERRORS:
        return ("bad_payload",)


def both(plan: Plan, node: Record, *, offset: int = 0, prefix: bytes = b"") -> tuple[Any, Any] | None:
    fn_py, src = compile_plan(plan, node, offset=offset, prefix=prefix)
    fn_nat = native.compile_native(plan, node, offset=offset, prefix=prefix, force=True)
    if currently_in_test_context():
        note(src)
        event("native: unsupported plan (Python runs)" if fn_nat is None else "native: compiled")
    return None if fn_nat is None else (fn_py, fn_nat)


@needs_native
@PROPS
@given(data=st.data())
def test_native_matches_generated_code_and_reference(shared_keys: PseudonymKeys, data: st.DataObject) -> None:
    schema, node, record, aud = data.draw(cases(shared_keys))
    plan = make_plan(node, aud, shared_keys)
    fns = both(plan, node)
    if fns is None:
        return
    body = encode(schema, record)
    got = outcome(fns[1], body)
    assert got == outcome(fns[0], body)
    event(f"outcome {got[0]}")
    if got[0] == "out":
        assert got[1] == run_reference(plan, schema, body)
    elif got[0] == "transform_failed":
        with pytest.raises(TransformFailed) as info:
            run_reference(plan, schema, body)
        assert info.value.args[0] == got[1]
    # framed: the frame is skipped and the prefix leads, as for the generated code
    head = data.draw(st.binary(min_size=5, max_size=5))
    prefix = data.draw(st.sampled_from([b"\x00\x00\x00\x00\x07", b"", b"\xff" * 9]))
    fns5 = both(plan, node, offset=5, prefix=prefix)
    assert fns5 is not None
    assert outcome(fns5[1], head + body) == outcome(fns5[0], head + body)
    # a bytearray gives the same result and is not written to
    ba = bytearray(body)
    assert outcome(fns[1], ba) == got
    assert ba == body


@needs_native
@PROPS
@given(data=st.data())
def test_native_matches_generated_code_on_corrupted_input(shared_keys: PseudonymKeys, data: st.DataObject) -> None:
    schema, node, record, aud = data.draw(cases(shared_keys, depth=2))
    plan = make_plan(node, aud, shared_keys)
    fns = both(plan, node)
    if fns is None:
        return
    good = encode(schema, record)
    bad = mutate(data.draw, good)
    if data.draw(st.booleans()):
        bad = mutate(data.draw, bad)  # two corruptions sometimes
    got = outcome(fns[1], bad)
    event(f"corrupt: {got[0]}")
    assert got == outcome(fns[0], bad)


# -- fail closed, case by case ------------------------------------------------------------

SCHEMA = {
    "type": "record",
    "name": "R",
    "fields": [
        {"name": "a", "type": "string", "confluent:tags": ["PII"]},
        {"name": "b", "type": "long"},
        {"name": "m", "type": {"type": "map", "values": "string"}},
    ],
}


def _plan_with_op(shared_keys: PseudonymKeys, op: Any) -> tuple[Plan, Record, Apply]:
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plan = build_plan(node, _audience([("PII", "token")], "keep"), shared_keys)
    apply = plan.root.fields[0][1]  # type: ignore[attr-defined]
    assert isinstance(apply, Apply) and apply.path == "a"
    apply.fn = op
    return plan, node, apply


def _body(a: str = "alice") -> bytes:
    return encode(SCHEMA, {"a": a, "b": 7, "m": {"k": "v"}})


class _Boom(Exception):
    pass


def _raise(exc: BaseException) -> Any:
    def op(v: Any) -> Any:
        raise exc

    return op


@needs_native
@pytest.mark.parametrize(
    ("op", "reason"),
    [
        (_raise(_Boom("secret value alice")), Reason.TRANSFORM_FAILED),
        (_raise(Ineffective()), Reason.INEFFECTIVE_TRANSFORM),
        (lambda v: 42, Reason.TRANSFORM_FAILED),  # not a str for a string output
        (lambda v: "\ud800", Reason.TRANSFORM_FAILED),  # a lone surrogate cannot be UTF-8
        (lambda v: None, Reason.TRANSFORM_FAILED),
    ],
    ids=["raises", "ineffective", "wrong-type", "surrogate", "none"],
)
def test_operator_failure_fails_closed_like_generated_code(shared_keys: PseudonymKeys, op: Any, reason: Reason) -> None:
    plan, node, _ = _plan_with_op(shared_keys, op)
    fns = both(plan, node)
    assert fns is not None
    for fn in fns:
        with pytest.raises(TransformFailed) as info:
            fn(_body())
        assert (info.value.args, info.value.reason) == (("a",), reason)
        # the exception names the field, never the value, and carries no chained cause
        assert "alice" not in repr(info.value) and "alice" not in str(info.value)
        assert info.value.__cause__ is None


@needs_native
def test_operator_sees_the_decoded_value_and_its_output_is_encoded(shared_keys: PseudonymKeys) -> None:
    seen: list[Any] = []

    def op(v: Any) -> str:
        seen.append(v)
        return "é" * 70  # a two-byte length prefix (140 bytes of UTF-8)

    plan, node, _ = _plan_with_op(shared_keys, op)
    fns = both(plan, node)
    assert fns is not None
    outs = [b"".join(fn(_body("bob"))) for fn in fns]
    assert seen == ["bob", "bob"]
    assert outs[0] == outs[1] == encode(SCHEMA, {"a": "é" * 70, "b": 7, "m": {"k": "v"}})


@needs_native
def test_keyboard_interrupt_in_an_operator_propagates(shared_keys: PseudonymKeys) -> None:
    plan, node, _ = _plan_with_op(shared_keys, _raise(KeyboardInterrupt()))
    fns = both(plan, node)
    assert fns is not None
    for fn in fns:
        with pytest.raises(KeyboardInterrupt):
            fn(_body())


@needs_native
@pytest.mark.parametrize(
    "exc",
    [SubjectForgotten(), TransientError("outage"), KmsUnavailable("kms down")],
    ids=["subject-forgotten", "transient", "kms-unavailable"],
)
def test_pass_through_exceptions_propagate_like_generated_code(shared_keys: PseudonymKeys, exc: Exception) -> None:
    """``except _Pass: raise``: a forgotten subject (the pipeline withholds the record) and
    an outage (the runtime retries the batch) are not failures of the record, on either
    path -- the very exception object comes out, not a ``TransformFailed``."""
    assert isinstance(exc, (SubjectForgotten, TransientError))
    plan, node, _ = _plan_with_op(shared_keys, _raise(exc))
    fns = both(plan, node)
    assert fns is not None
    for fn in fns:
        with pytest.raises(type(exc)) as info:
            fn(_body())
        assert info.value is exc


@needs_native
def test_the_interpreter_reraises_the_set_the_plan_is_built_with(
    shared_keys: PseudonymKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass-through set is read from Python when the plan is built, not copied into
    the extension: a class added to it propagates through both paths alike."""
    monkeypatch.setattr(native, "PASS_THROUGH", (_Boom, SubjectForgotten, TransientError))
    plan, node, _ = _plan_with_op(shared_keys, _raise(_Boom("x")))
    fn = native.compile_native(plan, node, force=True)
    assert fn is not None
    with pytest.raises(_Boom):
        fn(_body())


@needs_native
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x0a",  # a length with no bytes after it
        b"\x0aalice\x0e",  # truncated after the transformed field
        b"\x0aalice\x0e\x02\x02k\x02v\x00\x00",  # a trailing byte
        b"\x0aalice\x0e\x01",  # a negative map block count without its byte size
        b"\x0aalice\x0e" + b"\xff" * 10 + b"\x01\x00",  # an eleven-byte block count
        b"\x0aalice\x0e\x7e",  # a block count beyond the remaining bytes
        b"\x0a\xff\xfe\xfd\xfc\xfb\x0e\x00",  # invalid UTF-8 in the transformed string
    ],
)
def test_malformed_input_is_refused_like_generated_code(shared_keys: PseudonymKeys, data: bytes) -> None:
    plan, node, _ = _plan_with_op(shared_keys, lambda v: "x")
    fns = both(plan, node)
    assert fns is not None
    assert outcome(fns[1], data) == outcome(fns[0], data) == ("bad_payload",)


# -- the token operator, computed natively ---------------------------------------------------


@needs_native
@PROPS
@given(text=st.text(), key=st.binary(min_size=1, max_size=100), version=st.integers(1, 99))
def test_native_token_equals_stdlib_hmac(shared_keys: PseudonymKeys, text: str, key: bytes, version: int) -> None:
    """The plain string tokenizer runs in Rust; its tokens are HMAC-SHA256 as the stdlib
    computes it (keys longer than a block included), truncated to 128 bits, base64url."""
    op = make_text_tokenizer(version, key)
    plan, node, _ = _plan_with_op(shared_keys, op)
    spec = native.plan_spec(plan, node)
    assert spec[1][0][6][0] == "token"  # the field's operator is computed natively
    fns = both(plan, node)
    assert fns is not None
    mac = hmac.new(key, text.encode(), hashlib.sha256).digest()[:16]
    expected = f"tk{version}_" + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    want = encode(SCHEMA, {"a": expected, "b": 7, "m": {"k": "v"}})
    body = _body(text)
    assert b"".join(fns[1](body)) == want
    assert b"".join(fns[0](body)) == want


@needs_native
def test_only_the_plain_tokenizer_is_computed_natively(shared_keys: PseudonymKeys) -> None:
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plain = build_plan(node, _audience([("PII", "token")], "keep"), shared_keys)
    assert native.plan_spec(plain, node)[1][0][6][0] == "token"
    normalized = build_plan(node, _audience([("PII", {"op": "token", "normalize": ["lower"]})], "keep"), shared_keys)
    assert native.plan_spec(normalized, node)[1][0][6] is None  # called back in Python
    fns = both(normalized, node)
    assert fns is not None
    assert outcome(fns[1], _body("ÉVE")) == outcome(fns[0], _body("ÉVE")) == outcome(fns[0], _body("éve"))


_MASKS = st.fixed_dictionaries(
    {"op": st.just("mask")},
    optional={
        "keep_first": st.integers(0, 4),
        "keep_last": st.integers(0, 4),
        "char": st.sampled_from(["*", "#", "é", "\U0001f512"]),
        "on_failure": st.sampled_from(["redact", "quarantine"]),
    },
)


@needs_native
@PROPS
@given(rule=_MASKS, text=st.one_of(st.text(max_size=24), st.from_regex(r"[0-9]{12,19}", fullmatch=True)))
def test_native_mask_equals_python(shared_keys: PseudonymKeys, rule: dict[str, Any], text: str) -> None:
    """mask (without preserve / fixed_length) runs in Rust behind its fail-closed guard:
    same output, same floor (at most half shown), same redaction or refusal."""
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plan = build_plan(node, _audience([("PII", rule)], "keep"), shared_keys)
    nat = native.plan_spec(plan, node)[1][0][6]
    assert nat[0] == "guard" and nat[1][0] == "mask" and nat[2] is True
    fns = both(plan, node)
    assert fns is not None
    got = outcome(fns[1], _body(text))
    event(f"mask: {got[0]}")
    assert got == outcome(fns[0], _body(text))


_QUADS = st.tuples(*[st.integers(0, 255)] * 4).map(lambda q: ".".join(map(str, q)))
_NOT_QUITE = st.one_of(
    _QUADS.map(lambda s: " " + s),
    _QUADS.map(lambda s: s.replace(".", ".0", 1)),  # a leading zero
    _QUADS.map(lambda s: s + ".1"),
    st.tuples(*[st.integers(0, 999)] * 4).map(lambda q: ".".join(map(str, q))),
    st.sampled_from(["2001:db8::1", "::ffff:192.0.2.1", "64:ff9b::c000:221", "1.2.3", "1..2.3", "\uff11.2.3.4", ""]),
    st.text(alphabet="0123456789.", max_size=16),
)


@needs_native
@PROPS
@given(cidr=st.sampled_from([0, 1, 8, 16, 24, 31]), ip=st.one_of(_QUADS, _NOT_QUITE), quarantine=st.booleans())
def test_native_generalize_cidr_equals_python(shared_keys: PseudonymKeys, cidr: int, ip: str, quarantine: bool) -> None:
    """Canonical dotted quads are cut in Rust (known answer from ``ipaddress``); every other
    string is handed to the Python operator, so both give the same text or the same failure."""
    rule = {"op": "generalize", "cidr": cidr, "on_failure": "quarantine" if quarantine else "redact"}
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plan = build_plan(node, _audience([("PII", rule)], "keep"), shared_keys)
    nat = native.plan_spec(plan, node)[1][0][6]
    assert nat == ("guard", ("ipv4_cidr", cidr), False, "*", quarantine)
    fns = both(plan, node)
    assert fns is not None
    got = outcome(fns[1], _body(ip))
    event(f"cidr: {got[0]}")
    assert got == outcome(fns[0], _body(ip))
    if ip in _CANONICAL:
        want = str(ipaddress.ip_network(f"{ip}/{cidr}", strict=False))
        assert got == ("out", encode(SCHEMA, {"a": want, "b": 7, "m": {"k": "v"}}))


class _Canonical:
    """Membership: is it a dotted quad as ``str(IPv4Address)`` prints it?"""

    def __contains__(self, s: object) -> bool:
        try:
            return isinstance(s, str) and str(ipaddress.IPv4Address(s)) == s
        except ValueError:
            return False


_CANONICAL = _Canonical()


# -- fallbacks -------------------------------------------------------------------------------


@needs_native
def test_recursive_schema_and_subject_plans_stay_in_python(shared_keys: PseudonymKeys) -> None:
    recursive = avro.parse(
        {"type": "record", "name": "N", "fields": [
            {"name": "v", "type": "string", "confluent:tags": ["PII"]},
            {"name": "next", "type": ["null", "N"], "default": None}]}
    )
    assert isinstance(recursive, Record)
    plan = build_plan(recursive, _audience([("PII", "token")], "keep"), shared_keys)
    assert native.compile_native(plan, recursive, force=True) is None
    with pytest.raises(native.Unsupported):
        native.plan_spec(plan, recursive)
    plan2, node2, _ = _plan_with_op(shared_keys, lambda v: "x")
    plan2.subject = node2.fields[0]
    assert native.compile_native(plan2, node2, force=True) is None
    assert native.compile_native(Plan("a", Apply(Primitive("string")), {}, None, {}), node2, force=True) is not None


@needs_native
def test_parameters_beyond_the_interpreter_keep_the_generated_function(shared_keys: PseudonymKeys) -> None:
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plan = build_plan(node, _audience([("PII", {"op": "mask", "keep_last": 2**70})], "keep"), shared_keys)
    assert native.compile_native(plan, node, force=True) is None
    huge = build_plan(node, _audience([("PII", {"op": "mask", "keep_last": 2**62})], "keep"), shared_keys)
    fns = both(huge, node)
    assert fns is not None  # fits in 64 bits: native, and the floor still masks everything
    assert outcome(fns[1], _body("4111111111111111")) == outcome(fns[0], _body("4111111111111111"))
    assert outcome(fns[1], _body("4111111111111111"))[1] == encode(SCHEMA, {"a": "*" * 16, "b": 7, "m": {"k": "v"}})


def test_streamproc_native_0_disables_it() -> None:
    code = "from streamproc.pipeline import native; print(native.ENABLED)"
    env = {**os.environ, "STREAMPROC_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the whole pipeline ---------------------------------------------------------------------


@needs_native
def test_pipeline_with_and_without_native_gives_the_same_records(make_pipeline: Maker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same outputs (plaintext, keys, headers, order), same quarantines, same statistics."""
    kit_nat = make_pipeline()
    kit_py = make_pipeline()
    sealer = RecordSealer(kit_nat.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit_nat.schemas)
    gen = EventGenerator(11)
    plains = [sealer.encode(gen.order()) for _ in range(40)]
    plains[5] = plains[5][: len(plains[5]) // 2]  # truncated Avro
    plains[9] = plains[9] + b"\x00"  # trailing byte
    plains[13] = plains[13][:5] + b"\x7f" + plains[13][6:]  # a string length shifted
    batch = [InputRecord("orders", 0, i, f"k{i}".encode(), sealer.sealer.seal(p)) for i, p in enumerate(plains)]
    batch.insert(20, InputRecord("orders", 0, 99, b"gone", None))  # a tombstone

    res_nat = kit_nat.pipeline.process(batch)
    with monkeypatch.context() as m:
        m.setattr(core, "compile_native", lambda *a, **k: None)
        res_py = kit_py.pipeline.process(batch)
    # the fraud audience shifts dates keyed by the subject (a subject pre-pass): its plan
    # keeps the generated function; analytics and support run natively
    kinds = {dest: type(c.fn).__name__ for (_, dest), c in kit_nat.pipeline._plans.items() if isinstance(c, core._Compiled)}
    assert kinds == {"sanitized.analytics": "NativePlan", "sanitized.fraud": "function", "sanitized.support": "NativePlan"}
    assert all(type(c.fn).__name__ == "function" for c in kit_py.pipeline._plans.values() if isinstance(c, core._Compiled))

    assert [(q.record.offset, q.reason, q.detail) for q in res_nat.quarantined] == [
        (q.record.offset, q.reason, q.detail) for q in res_py.quarantined
    ]
    assert sorted(q.record.offset for q in res_nat.quarantined) == [5, 9, 13]
    assert res_nat.stats == res_py.stats
    opener = RecordOpener(kit_nat.keyring, kit_nat.schemas)

    def view(o: core.OutputRecord) -> tuple[Any, ...]:
        plain = None if o.value is None else json.dumps(opener.open(o.topic, o.value)[1], sort_keys=True, default=str)
        return (o.topic, o.key, o.headers, o.source, plain)

    assert [view(o) for o in res_nat.outputs] == [view(o) for o in res_py.outputs]
    assert len(res_nat.outputs) == (40 - 3 + 1) * 3
