"""The keys risk measurement reads from an output plaintext: the class key (the
quasi-identifiers' encodings) and the sensitive key (the sensitive field's encoding).

The window compares keys, never decoded values, so a key must identify the values exactly:
two records have equal keys iff their fields decode to equal values.  Checked here against
an independent path (fastavro decodes the same bytes, equality of the decoded values), for
the generated reader and for the compiled interpreter's reader (which must also give the
very same bytes: a worker's plans may mix both when the interpreter refuses one schema).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.pipeline import native
from streamproc.pipeline.codegen import BadPayload, compile_key_reader
from streamproc.schema import avro
from streamproc.schema.avro import Record

SCHEMA: dict[str, Any] = {
    "type": "record", "name": "Out", "fields": [
        {"name": "id", "type": "string"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "zip", "type": ["null", "string"]},
        {"name": "age", "type": "long"},
        {"name": "nested", "type": {"type": "record", "name": "N", "fields": [
            {"name": "a", "type": "int"}, {"name": "b", "type": ["null", "double"]}]}},
        {"name": "gender", "type": {"type": "enum", "name": "G", "symbols": ["F", "M", "X"]}},
        {"name": "score", "type": "double"},
        {"name": "flag", "type": "boolean"},
        {"name": "diagnosis", "type": ["null", "string", "long"]},
        {"name": "tail", "type": {"type": "map", "values": "long"}},
    ],
}
PARSED = fastavro.parse_schema(SCHEMA)
HEADER = b"\x00" + struct.pack(">I", 7)
#: (quasi-identifier fields, sensitive field) combinations: scattered, adjacent, one, none
#: before the sensitive one, the sensitive one also a quasi-identifier.
CASES = [
    ({"zip", "age", "gender"}, "diagnosis"),
    ({"gender", "score", "flag"}, "zip"),
    ({"nested"}, None),
    ({"age"}, "age"),
    ({"tail", "id"}, "flag"),
]

_text = st.sampled_from(["", "a", "b", "ab", "é", "x" * 70])
RECORD = st.fixed_dictionaries({
    "id": _text,
    "tags": st.lists(_text, max_size=3),
    "zip": st.one_of(st.none(), _text),
    "age": st.sampled_from([0, 1, -1, 63, 64, -65, 2**40, -(2**63)]),
    "nested": st.fixed_dictionaries({"a": st.integers(-3, 3), "b": st.one_of(st.none(), st.sampled_from([0.5, 2.0]))}),
    "gender": st.sampled_from(["F", "M", "X"]),
    "score": st.sampled_from([0.25, 1.5, 1e300]),
    "flag": st.booleans(),
    # a string "1" and a long 1 are different values (different branches)
    "diagnosis": st.one_of(st.none(), st.sampled_from(["1", "flu", ""]), st.sampled_from([1, 0, 300])),
    # one entry at most: a map's entries in another order are another encoding of an equal
    # map (two classes: more risk shown, never less); not what this checks
    "tail": st.dictionaries(st.sampled_from(["k", "l"]), st.integers(-2, 2), max_size=1),
})


def encode(rec: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED, rec)
    return HEADER + buf.getvalue()


def decoded(plain: bytes) -> dict[str, Any]:
    return fastavro.schemaless_reader(io.BytesIO(plain[len(HEADER):]), PARSED)  # type: ignore[arg-type,return-value]


def comparable(v: Any) -> Any:
    """A decoded value as something hashable, with its Python type, so that values of
    different union branches (the string "1" and the long 1) never compare equal."""
    if isinstance(v, dict):
        return tuple(sorted((k, comparable(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(comparable(x) for x in v)
    return (type(v).__name__, v)


def readers(qi: set[str], sens: str | None) -> list[Any]:
    """The generated reader, and the compiled interpreter's (when built) as the same shape."""
    schema = avro.parse(SCHEMA)
    assert isinstance(schema, Record)
    out: list[Any] = [compile_key_reader(schema, qi, sens, offset=len(HEADER))]
    if native.available():
        saved = native.ENABLED
        native.ENABLED = True
        try:
            batch = native.compile_native_keys(schema, qi, sens, offset=len(HEADER))
        finally:
            native.ENABLED = saved
        if batch is not None:  # None: an extension built before the key reader existed

            def one(b: bytes) -> tuple[bytes, bytes | None]:
                qs, ss = batch([b])
                return qs[0], ss[0] if ss else None

            out.append(one)
    return out


@pytest.mark.parametrize(("qi", "sens"), CASES)
@settings(max_examples=40, deadline=None)
@given(records=st.lists(RECORD, min_size=2, max_size=12))
def test_keys_are_equal_exactly_when_the_decoded_values_are(
    qi: set[str], sens: str | None, records: list[dict[str, Any]]
) -> None:
    plains = [encode(r) for r in records]
    values = [decoded(p) for p in plains]
    qv = [tuple(comparable(v[f]) for f in sorted(qi)) for v in values]
    sv = [None if sens is None else comparable(v[sens]) for v in values]
    keys_of = []
    for read in readers(qi, sens):
        keys = [read(p) for p in plains]
        keys_of.append(keys)
        for i in range(len(plains)):
            assert isinstance(keys[i][0], bytes)
            assert (keys[i][1] is None) == (sens is None)
            for j in range(len(plains)):
                assert (keys[i][0] == keys[j][0]) == (qv[i] == qv[j])
                assert (keys[i][1] == keys[j][1]) == (sv[i] == sv[j])
    # the interpreter's keys are the generated reader's, byte for byte
    assert all(k == keys_of[0] for k in keys_of)


@pytest.mark.skipif(native.KeyReader is None, reason="streamproc._native (with KeyReader) is not built")
@settings(max_examples=30, deadline=None)
@given(records=st.lists(RECORD, max_size=12), cut=st.integers(0, 40))
def test_the_interpreters_batch_reader_reads_every_record_and_refuses_a_malformed_one(
    records: list[dict[str, Any]], cut: int
) -> None:
    """A batch through the interpreter's reader: the generated reader's keys record by
    record, in order; a truncated record raises BadPayload (never keys of a partial walk)."""
    schema = avro.parse(SCHEMA)
    assert isinstance(schema, Record)
    qi, sens = CASES[0]
    saved = native.ENABLED
    native.ENABLED = True
    try:
        batch = native.compile_native_keys(schema, qi, sens, offset=len(HEADER))
    finally:
        native.ENABLED = saved
    assert batch is not None
    slow = compile_key_reader(schema, qi, sens, offset=len(HEADER))
    plains = [encode(r) for r in records]
    qs, ss = batch(plains)
    assert list(zip(qs, ss, strict=True)) == [slow(p) for p in plains]
    if plains and cut < len(plains[0]) - len(HEADER):
        with pytest.raises(BadPayload):
            batch([plains[0][: len(plains[0]) - 1 - cut]])
