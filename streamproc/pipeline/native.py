"""The compiled plan interpreter (optional Rust extension ``streamproc._native``).

Why: the generated plan function (:mod:`streamproc.pipeline.codegen`) is the largest piece
of ``Pipeline.process``, and most of it is CPython bytecode stepping over the Avro bytes of
fields that are only copied.  The extension (crate ``native/``, built by ``pip install -e .``
when cargo is there) runs the same walk in Rust: kept runs are copied with one ``memcpy``,
transformed fields are decoded and handed to the *same* Python operator callables the
generated code would call, and their results are encoded the same way.  A few operators
are also computed in Rust, each only in the exact bound form that declares it with a
``native_op`` attribute (the plain string tokenizer, ``mask`` without ``preserve`` or
``fixed_length``, ``generalize: {cidr}`` on canonical dotted quads, and the fail-closed
guard around them): on the reference record they were most of what remained of the plan
function once the walk was compiled.  Every other operator keeps its one implementation,
in Python, called back from the walk.

The generated Python function stays the reference the interpreter is checked against
(``tests/unit/test_native_plan.py``: byte-identical output, the same ``TransformFailed``
path and reason, the same malformed-input outcome, on random schemas, records, policies and
corruptions), and it is what runs when:

* the extension is not built (no Rust toolchain at install time: the build is optional);
* ``STREAMPROC_NATIVE=0`` is set (read once, at import);
* the plan needs what the interpreter does not do: recursive schemas (the generated code
  turns deep nesting into ``bad_payload``) and subject-keyed operators (``date_shift``'s
  subject pre-pass).

The walk reproduces the generated code statement for statement, its lax corners included
(a slice past the end is clamped; ``pos += 4`` past the end is only caught by the final
length check), so an operator sees exactly the value it would see in Python, and a record
fails closed at the same point with the same reason class.

The extension also holds ``RiskCounts``, the counters of a re-identification risk window
over bytes keys (:func:`risk_counts`, ``native/src/risk.rs``): risk measurement uses them
instead of its Python counters when the extension is built (``STREAMPROC_NATIVE=0`` too
turns them off).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from streamproc.operators.base import Ineffective
from streamproc.pipeline.codegen import (
    PASS_THROUGH,
    BadPayload,
    TransformFailed,
    _ineffective,
    _min_width,
    enc_str,
    encoder,
)
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
from streamproc.schema.avro import Array, AvroType, Enum, Fixed, Map, Record, Union

try:
    from streamproc._native import NativePlan
except ImportError:  # not built: the generated Python function runs instead
    NativePlan = None  # type: ignore[assignment,misc]

try:
    from streamproc._native import KeyReader, RiskCounts
except ImportError:  # not built, or built from a crate without them
    KeyReader = RiskCounts = None  # type: ignore[assignment,misc]

#: Whether plans run natively when they can (the extension is built and not disabled).
ENABLED = NativePlan is not None and os.environ.get("STREAMPROC_NATIVE", "1") != "0"


#: Whether operators that describe themselves (``native_op``) are computed natively too;
#: off, every operator is called back in Python (the benchmark measures both).
NATIVE_OPS = True


class Unsupported(Exception):
    """The interpreter does not handle this plan; the generated Python function runs."""


def available() -> bool:
    """Is the extension built and importable (whatever ``STREAMPROC_NATIVE`` says)?"""
    return NativePlan is not None


def _ty(t: AvroType, stack: tuple[int, ...] = ()) -> tuple[Any, ...]:
    """A value to skip, as ``codegen._Gen.skip`` walks it."""
    k = t.kind
    if isinstance(t, Fixed):
        return ("fixed", t.size)
    if isinstance(t, Enum):
        return ("enum", len(t.symbols))
    if k in ("int", "long"):
        return ("long",)
    if k in ("string", "bytes"):
        return ("string",)
    if k in ("null", "boolean", "float", "double"):
        return (k,)
    if isinstance(t, Record):
        if id(t) in stack:
            raise Unsupported("recursive schema")
        return ("record", [_ty(f.type, (*stack, id(t))) for f in t.fields])
    if isinstance(t, Array):
        return ("array", _ty(t.items, stack), _min_width(t.items))
    if isinstance(t, Map):
        return ("map", _ty(t.values, stack), _min_width(t.values) + 1)
    if isinstance(t, Union):
        return ("union", [_ty(b, stack) for b in t.branches])
    raise Unsupported(f"type {k}")


def _dec(t: AvroType) -> tuple[Any, ...]:
    """An operator input, as ``codegen._Gen.decode`` reads it."""
    k = t.kind
    if isinstance(t, Enum):
        return ("enum", len(t.symbols))
    if isinstance(t, Fixed):
        return ("fixed", t.size)
    if k in ("int", "long"):
        return ("long",)
    if k in ("string", "bytes", "float", "double", "boolean", "null"):
        return (k,)
    raise Unsupported(f"decode {k}")


def _apply(n: Apply) -> tuple[Any, ...]:
    if n.needs_subject:
        raise Unsupported("subject-keyed operator")
    enc = encoder(n.out)
    # A bound operator that says how to compute it natively (``native_op``: the plain string
    # tokenizer, mask without preserve/fixed_length, IPv4 cidr generalization, and those
    # behind the fail-closed guard) runs in Rust; any other runs as the Python callable,
    # called back with the decoded value.
    nat = getattr(n.fn, "native_op", None)
    if not (nat is not None and NATIVE_OPS and n.decode and n.t.kind == "string" and enc is enc_str):
        nat = None
    # None: string output, encoded inline like the generated code (``fn(v).encode()``).
    return ("apply", _dec(n.t) if n.decode else None, _ty(n.t), n.fn, None if enc is enc_str else enc, n.path, nat)


def _node(n: Node, stack: tuple[int, ...] = ()) -> tuple[Any, ...]:
    if isinstance(n, Keep):
        return ("keep", _ty(n.t))
    if isinstance(n, Drop):
        return ("drop", _ty(n.t))
    if isinstance(n, Apply):
        return _apply(n)
    if isinstance(n, RecordNode):
        if id(n) in stack:
            raise Unsupported("recursive plan")
        return ("record", [_node(c, (*stack, id(n))) for _, c in n.fields])
    if isinstance(n, ArrayNode):
        return ("array", _node(n.items, stack), _min_width(n.items.t))
    if isinstance(n, MapNode):
        if isinstance(n.keys, Apply):
            keys: tuple[Any, ...] | None = _apply(n.keys)
        elif isinstance(n.keys, Keep):
            keys = None
        else:
            raise Unsupported("map keys")
        return ("map", keys, _node(n.values, stack), _min_width(n.values.t) + 1)
    if isinstance(n, UnionNode):
        identity = all(j == k for j, k in enumerate(n.index_map))
        return ("union", None if identity else list(n.index_map), [_node(b, stack) for b in n.branches])
    raise Unsupported(type(n).__name__)


def plan_spec(plan: Plan, schema: AvroType) -> tuple[Any, ...]:
    """The interpreter's input: the plan tree as nested tuples (raises :class:`Unsupported`)."""
    if plan.subject is not None:
        raise Unsupported("subject pre-pass")
    _ty(schema)  # a recursive schema is refused even where the plan does not recurse
    return _node(plan.root)


def compile_native(
    plan: Plan, schema: AvroType, *, offset: int = 0, prefix: bytes = b"", force: bool = False
) -> Callable[[bytes], list[bytes]] | None:
    """The compiled interpreter for ``plan`` (the contract of ``compile_plan(...)[0]``), or
    ``None`` when the generated Python function must run (see the module docstring).

    ``force`` ignores ``STREAMPROC_NATIVE=0`` (the differential tests compare both paths).
    """
    if NativePlan is None or not (ENABLED or force):
        return None
    try:
        spec = plan_spec(plan, schema)
    except Unsupported:
        return None
    try:
        fn: Callable[[bytes], list[bytes]] = NativePlan(
            spec, offset, prefix, BadPayload, TransformFailed, _ineffective, Ineffective, PASS_THROUGH
        )
    except (ValueError, TypeError, OverflowError):
        # A parameter the interpreter cannot hold (a mask length beyond 64 bits, say): the
        # generated function handles it as before.
        return None
    return fn


def compile_native_keys(
    schema: AvroType, qi: set[str], sensitive: str | None, *, offset: int = 0
) -> Callable[[list[bytes]], tuple[list[bytes], list[bytes]]] | None:
    """``f(plains) -> (class keys, sensitive keys)`` for a batch of records this processor
    wrote: per record, the encodings of the top-level fields ``qi`` concatenated in schema
    order, and the encoding of ``sensitive`` (the second list is empty without one).  The
    keys of :func:`streamproc.pipeline.codegen.compile_key_reader`, read in one walk per
    record by the interpreter; ``None`` when it is not built (or predates this), disabled,
    or cannot walk the schema (recursive): the generated reader runs instead.

    Why: risk measurement reads each output's quasi-identifiers back; this is about ten
    times faster than the generated reader, and nothing is decoded or built per record but
    the two keys.
    """
    if NativePlan is None or KeyReader is None or not ENABLED or not isinstance(schema, Record):
        return None
    wanted = qi | ({sensitive} if sensitive is not None else set())
    try:
        spec = ("record", [("keep" if f.name in wanted else "drop", _ty(f.type)) for f in schema.fields])
    except Unsupported:
        return None
    plan = NativePlan(spec, offset, b"", BadPayload, TransformFailed, _ineffective, Ineffective, PASS_THROUGH)
    slots = [(1 if f.name in qi else 0) | (2 if f.name == sensitive else 0) for f in schema.fields]
    fn: Callable[[list[bytes]], tuple[list[bytes], list[bytes]]] = KeyReader(plan, slots).read
    return fn


def risk_counts(k: int, l: int | None) -> Any:  # noqa: E741 -- the name the literature uses
    """The compiled counters of a risk window whose keys are bytes (the ``counts`` of
    :class:`~streamproc.privacy.risk.RiskWindow`), or ``None`` when the extension is not
    built, is disabled, or predates them: the window then keeps its counters in Python."""
    if RiskCounts is None or not ENABLED:
        return None
    return RiskCounts(k, l or 0)
