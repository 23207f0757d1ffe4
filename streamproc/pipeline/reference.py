"""The reference interpreter: the same plan tree, applied to fastavro-decoded dicts.

It is an order of magnitude slower than the generated code and exists to be obviously
right: the property tests run both on generated schemas and records and require
byte-identical output.  ``streamproc explain`` also uses it to show decoded values.
"""

from __future__ import annotations

import io
from typing import Any

import fastavro

from streamproc.operators.base import canonical_bytes
from streamproc.pipeline.codegen import TransformFailed
from streamproc.pipeline.plan import (
    Apply,
    ArrayNode,
    Drop,
    Keep,
    MapNode,
    Node,
    Plan,
    RecordNode,
    UnionNode,
)
from streamproc.schema import avro
from streamproc.schema.avro import Enum, Record, Union


def _branch_index(t: Union, value: Any) -> int:
    """Which union branch fastavro chose for ``value`` (decoded with return_record_name)."""
    if value is None:
        return next(i for i, b in enumerate(t.branches) if b.kind == "null")
    if isinstance(value, tuple):  # (record name, dict) from return_record_name
        name = value[0]
        for i, b in enumerate(t.branches):
            if isinstance(b, Record) and name in (b.fullname, b.name):
                return i
    candidates = [i for i, b in enumerate(t.branches) if b.kind != "null"]
    if len(candidates) == 1:
        return candidates[0]
    py = {str: ("string", "enum"), bytes: ("bytes", "fixed"), bool: ("boolean",), int: ("int", "long"),
          float: ("float", "double"), list: ("array",), dict: ("map", "record")}
    kinds = py.get(type(value), ())
    for i in candidates:
        if t.branches[i].kind in kinds:
            return i
    raise TypeError("cannot resolve union branch")


def _unwrap(value: Any) -> Any:
    return value[1] if isinstance(value, tuple) else value


def _apply(n: Node, value: Any, subject: bytes | None) -> Any:
    if isinstance(n, Keep):
        return value
    if isinstance(n, Apply):
        if isinstance(n.t, Enum) and n.decode:
            value = n.t.symbols.index(value)  # operators see the index, as the binary has
        try:
            if n.needs_subject:
                return n.fn(value, subject)
            return n.fn(value if n.decode else None)
        except Exception:
            raise TransformFailed(n.path) from None
    if isinstance(n, RecordNode):
        value = _unwrap(value)
        out = {}
        for f, child in n.fields:
            if isinstance(child, Drop):
                continue
            out[f.name] = _apply(child, value[f.name], subject)
        return out
    if isinstance(n, ArrayNode):
        return [_apply(n.items, v, subject) for v in value]
    if isinstance(n, MapNode):
        return {k: _apply(n.values, v, subject) for k, v in value.items()}
    if isinstance(n, UnionNode):
        assert isinstance(n.t, Union)
        i = _branch_index(n.t, value)
        return _apply(n.branches[i], _unwrap(value), subject)
    raise TypeError(n)


def run_reference(plan: Plan, schema_json: Any, avro_bytes: bytes) -> bytes:
    reader = fastavro.parse_schema(avro.strip_logical(schema_json))
    record: Any = fastavro.schemaless_reader(io.BytesIO(avro_bytes), reader, None, return_record_name=True)
    subject = None
    if plan.subject is not None:
        sv = _unwrap(record[plan.subject.name])
        subject = None if sv is None else canonical_bytes(sv)
        if subject is None:
            raise TransformFailed("<subject>")
    result = _apply(plan.root, record, subject)
    writer = fastavro.parse_schema(avro.strip_logical(plan.out_schema))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, _strip_names(result))
    return buf.getvalue()


def _strip_names(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return _strip_names(v[1])
    if isinstance(v, dict):
        return {k: _strip_names(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_strip_names(x) for x in v]
    return v
