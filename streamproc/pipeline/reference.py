"""The reference interpreter: the same plan tree, applied to fastavro-decoded dicts.

It is an order of magnitude slower than the generated code and exists to be obviously
right: the property tests run both on generated schemas and records and require
byte-identical output.  ``streamproc explain`` also uses it to show decoded values.
"""

from __future__ import annotations

import io
from typing import Any

import fastavro

from streamproc.errors import Reason
from streamproc.operators.base import Ineffective, canonical_bytes
from streamproc.pipeline.codegen import PASS_THROUGH, TransformFailed
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
from streamproc.schema.avro import Array, AvroType, Enum, Fixed, Map, Record, Union

_PY_KINDS: dict[type, tuple[str, ...]] = {
    str: ("string",), bytes: ("bytes",), bool: ("boolean",), int: ("int", "long"),
    float: ("float", "double"), list: ("array",), dict: ("map",),
}
_INT32 = (-(2**31), 2**31 - 1)
_NAMED = (Record, Enum, Fixed)


def _type_name(t: AvroType) -> str:
    """The name fastavro's tuple notation uses for a union branch."""
    if isinstance(t, _NAMED):
        return f"{t.namespace}.{t.name}" if t.namespace else t.name
    return t.kind


def _branch_index(t: Union, value: Any) -> int:
    """Which union branch ``value`` came from.

    Named types arrive as ``(full name, value)`` (``return_named_type``), so they resolve
    exactly.  Other branches are resolved the way fastavro's writer picks them (first
    branch that fits; ``int`` only within 32 bits; ``double`` preferred over ``float``),
    which is the branch the bytes hold whenever fastavro or a canonical writer made them.
    """
    if value is None:
        return next(i for i, b in enumerate(t.branches) if b.kind == "null")
    if isinstance(value, tuple):
        name = value[0]
        for i, b in enumerate(t.branches):
            if isinstance(b, _NAMED) and name in (_type_name(b), b.name):
                return i
        raise TypeError("cannot resolve union branch")
    kinds = _PY_KINDS.get(type(value), ())
    matches = [i for i, b in enumerate(t.branches) if not isinstance(b, _NAMED) and b.kind in kinds]
    if type(value) is int:
        matches = [i for i in matches if t.branches[i].kind != "int" or _INT32[0] <= value <= _INT32[1]]
    elif type(value) is float:
        matches = [i for i in matches if t.branches[i].kind == "double"] or matches
    if matches:
        return matches[0]
    raise TypeError("cannot resolve union branch")


def _unwrap(value: Any) -> Any:
    return value[1] if isinstance(value, tuple) else value


def _tagged(t: AvroType, value: Any) -> Any:
    """A kept value with every union value in tuple notation (branch named explicitly)."""
    if isinstance(t, Union):
        i = _branch_index(t, value)
        b = t.branches[i]
        return (_type_name(b), _tagged(b, _unwrap(value)))
    if isinstance(t, Record):
        return {f.name: _tagged(f.type, value[f.name]) for f in t.fields}
    if isinstance(t, Array):
        return [_tagged(t.items, v) for v in value]
    if isinstance(t, Map):
        return {k: _tagged(t.values, v) for k, v in value.items()}
    return value


def _apply(n: Node, value: Any, subject: bytes | None) -> Any:
    if isinstance(n, Keep):
        return _tagged(n.t, value)
    if isinstance(n, Apply):
        if isinstance(n.t, Enum) and n.decode:
            value = n.t.symbols.index(value)  # operators see the index, as the binary has
        try:
            if n.needs_subject:
                return n.fn(value, subject)
            result = n.fn(value if n.decode else None)
            out_t = n.out
            if isinstance(out_t, Union) and out_t.nullable_of is not None:
                out_t = out_t.nullable_of  # a budgeted DP field: null when suppressed
            if isinstance(out_t, Enum) and result is not None:
                return out_t.symbols[result]  # an enum output is an index too (randomized_response)
            writer = _PRIMITIVE_WRITERS.get(out_t.kind)
            if writer is not None and result is not None:
                # The generated code encodes inside the operator's try, so a result its type
                # cannot hold (a huge int for a double, a float32 overflow, a lone surrogate)
                # fails the field; the oracle must fail it at the same place, not later.
                fastavro.schemaless_writer(io.BytesIO(), writer, result)
            return result
        except PASS_THROUGH:
            raise
        except Ineffective:
            raise TransformFailed(n.path, Reason.INEFFECTIVE_TRANSFORM) from None
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
        if isinstance(n.keys, Keep):
            return {k: _apply(n.values, v, subject) for k, v in value.items()}
        # Entry by entry, key first, as the generated code does (same first failure); two
        # keys that transform to one fail the record rather than merge two entries.
        entries: dict[str, Any] = {}
        for k, v in value.items():
            nk = _apply(n.keys, k, subject)
            if nk in entries:
                assert isinstance(n.keys, Apply)
                raise TransformFailed(n.keys.path)
            entries[nk] = _apply(n.values, v, subject)
        return entries
    if isinstance(n, UnionNode):
        assert isinstance(n.t, Union)
        assert n.out is not None
        i = _branch_index(n.t, value)
        result = _apply(n.branches[i], _unwrap(value), subject)
        # tuple notation: fastavro writes exactly the output branch the plan maps to
        return (_type_name(n.out.branches[n.index_map[i]]), result)
    raise TypeError(n)


#: Writers of the primitive output types whose encoding can fail for a wrong-sized value.
_PRIMITIVE_WRITERS = {k: fastavro.parse_schema(k) for k in ("int", "long", "float", "double", "string")}


def run_reference(plan: Plan, schema_json: Any, avro_bytes: bytes) -> bytes:
    reader = fastavro.parse_schema(avro.strip_logical(schema_json))
    record: Any = fastavro.schemaless_reader(io.BytesIO(avro_bytes), reader, None, return_named_type=True)
    subject = None
    if plan.subject is not None:
        sv = _unwrap(record[plan.subject.name])
        subject = None if sv is None else canonical_bytes(sv)
        if subject is None:
            raise TransformFailed("<subject>")
    result = _apply(plan.root, record, subject)
    writer = fastavro.parse_schema(avro.strip_logical(plan.out_schema))
    buf = io.BytesIO()
    # Every union value is in tuple notation (kept ones by _tagged, transformed ones as
    # mapped above), so the writer never re-guesses a branch from a Python value.
    fastavro.schemaless_writer(buf, writer, result)
    return buf.getvalue()
