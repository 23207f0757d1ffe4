"""Compile a plan tree into a Python function that rewrites Avro binary directly.

Why: decoding a record into a dict and encoding it again costs more than the whole
per-record budget (about 11 us with fastavro for the reference record).  Most fields of a
record are kept unchanged, so the generated function walks the Avro binary, copies runs
of kept fields as single byte slices, and decodes, transforms and re-encodes only the
fields an operator touches.  Dropped fields are skipped.

The generated function for a plan is ``f(buf) -> list[bytes]``; joining the parts gives
the output record's Avro binary.  Variables in the generated code:

* ``pos``   -- read position in ``buf``;
* ``start`` -- start of the current run of bytes to copy verbatim;
* ``out``   -- the output parts.

Guarantees: malformed input raises :class:`BadPayload` (never returns partial output);
an operator failure raises :class:`TransformFailed` naming the field path.  Structure is
validated (lengths, union branches, and that the record ends exactly at the end of the
buffer) so a corrupt length can never shift a sensitive value into a kept run.  Bytes
copied verbatim are not re-validated as UTF-8.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from streamproc.crypto.erasure import SubjectForgotten
from streamproc.errors import Reason, TransientError
from streamproc.operators.base import Ineffective, canonical_bytes
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
from streamproc.schema.avro import Array, AvroType, Enum, Fixed, Map, Primitive, Record, Union


class BadPayload(Exception):
    """The Avro binary does not match its schema."""


#: Exceptions an operator may raise that are not a failure of the record: a forgotten
#: subject (the pipeline withholds the record from that audience) and a transient outage
#: (a KMS call opening a subject key: the runtime retries the batch).  Every other
#: exception of an operator is ``transform_failed``.
PASS_THROUGH = (SubjectForgotten, TransientError)


class TransformFailed(Exception):
    """An operator raised; ``args[0]`` is the field path (never the value).

    ``reason`` is ``transform_failed``, or ``ineffective_transform`` when a guarded
    operator refused to let its input through (``on_failure: quarantine``).
    """

    def __init__(self, path: str, reason: Reason = Reason.TRANSFORM_FAILED) -> None:
        super().__init__(path)
        self.reason = reason


def _ineffective(path: str) -> TransformFailed:
    return TransformFailed(path, Reason.INEFFECTIVE_TRANSFORM)


# -- runtime helpers used by generated code ------------------------------------------------


def _rlong(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise BadPayload("varint too long")
    if n >> 64:  # beyond Avro's 64-bit long: fastavro would wrap it, Java refuses it
        raise BadPayload("varint out of range")
    return (n >> 1) ^ -(n & 1), pos


def _rlen(buf: bytes, pos: int) -> tuple[int, int]:
    n, pos = _rlong(buf, pos)
    if n < 0:
        raise BadPayload("negative length")
    return n, pos


def _skip_len(buf: bytes, pos: int) -> int:
    n, pos = _rlen(buf, pos)
    return pos + n


def enc_long(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(128)]
_LEN = [bytes((i << 1,)) for i in range(64)]


def enc_str(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    return (_LEN[n] if n < 64 else enc_long(n)) + b


def enc_bytes(b: bytes) -> bytes:
    n = len(b)
    return (_LEN[n] if n < 64 else enc_long(n)) + b


_F = struct.Struct("<f")
_D = struct.Struct("<d")
_SCALAR_KINDS = frozenset({"string", "bytes", "int", "long", "float", "double", "boolean", "null", "fixed", "enum"})


def _only_null(v: Any) -> bytes:
    raise TypeError("this operator output can only be null")


def encoder(t: AvroType) -> Callable[[Any], bytes]:
    """A value -> Avro binary function for an operator's output type."""
    k = t.kind
    if k == "string":
        return enc_str
    if k == "bytes":
        return enc_bytes
    if k in ("int", "long"):
        return enc_long
    if k == "float":
        return _F.pack
    if k == "double":
        return _D.pack
    if k == "boolean":
        return lambda v: b"\x01" if v else b"\x00"
    if k == "null":
        return lambda v: b""
    if isinstance(t, Fixed):
        return bytes
    if isinstance(t, Enum):
        return enc_long
    if isinstance(t, Union):
        null_idx = next((i for i, b in enumerate(t.branches) if b.kind == "null"), None)
        others = [(i, b) for i, b in enumerate(t.branches) if b.kind != "null"]
        if null_idx is None:
            raise TypeError("operators may only output a union with a null branch")
        null_b = enc_long(null_idx)
        if len(others) == 1 and others[0][1].kind in _SCALAR_KINDS:
            idx, inner = others[0]
            pre, enc = enc_long(idx), encoder(inner)
            return lambda v: null_b if v is None else pre + enc(v)
        # ``redact`` to null of a record, array, map or general union: only null is written.
        return lambda v: null_b if v is None else _only_null(v)
    raise TypeError(f"no encoder for {k}")


# -- the generator ---------------------------------------------------------------------------


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.env: dict[str, Any] = {
            "_rlong": _rlong,
            "_rlen": _rlen,
            "_skip_len": _skip_len,
            "_Bad": BadPayload,
            "_TF": TransformFailed,
            "_TFI": _ineffective,
            "_Ineff": Ineffective,
            "_Pass": PASS_THROUGH,
            "_F": _F.unpack_from,
            "_D": _D.unpack_from,
            "enc_long": enc_long,
            "_LEN": _LEN,
        }
        self.counter = 0
        self.skip_funcs: dict[str, str] = {}
        self.rec_funcs: dict[int, str] = {}
        #: True while the pending run is known to be empty (straight-line code only).
        self.run_empty = False

    def var(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, value: Any, prefix: str = "_c") -> str:
        name = self.var(prefix)
        self.env[name] = value
        return name

    # -- skipping (advance pos over a value without looking at it) ---------------------
    def skip(self, t: AvroType, ind: str, out: list[str], stack: tuple[str, ...] = ()) -> None:
        k = t.kind
        if k == "null":
            return
        if k == "boolean":
            # Kept values are copied verbatim, so they are checked here or never.
            out.append(f"{ind}if buf[pos] > 1: raise _Bad('boolean')")
            out.append(f"{ind}pos += 1")
        elif isinstance(t, Enum):
            n_sym = len(t.symbols)
            if n_sym <= 64:  # every valid index is one byte 2*i (zigzag), i < n_sym
                out.append(f"{ind}if buf[pos] >= {2 * n_sym} or buf[pos] & 1: raise _Bad('enum index')")
                out.append(f"{ind}pos += 1")
            else:
                e = self.var("e")
                out.append(f"{ind}{e}, pos = _rlong(buf, pos)")
                out.append(f"{ind}if not 0 <= {e} < {n_sym}: raise _Bad('enum index')")
        elif k in ("int", "long"):
            out.append(f"{ind}while buf[pos] & 128: pos += 1")
            out.append(f"{ind}pos += 1")
        elif k == "float":
            out.append(f"{ind}pos += 4")
        elif k == "double":
            out.append(f"{ind}pos += 8")
        elif isinstance(t, Fixed):
            out.append(f"{ind}pos += {t.size}")
        elif k in ("string", "bytes"):
            b = self.var("b")
            out.append(f"{ind}{b} = buf[pos]")
            out.append(f"{ind}if {b} & 129: pos = _skip_len(buf, pos)")
            out.append(f"{ind}else: pos += 1 + ({b} >> 1)")
        elif isinstance(t, Record):
            if t.fullname in stack or len(stack) > 8:
                fn = self.skip_func(t)
                out.append(f"{ind}pos = {fn}(buf, pos)")
            else:
                for f in t.fields:
                    self.skip(f.type, ind, out, (*stack, t.fullname))
        elif isinstance(t, (Array, Map)):
            inner = t.items if isinstance(t, Array) else t.values
            n, sz = self.var("n"), self.var("sz")
            out.append(f"{ind}while True:")
            self.block_count(n, ind + "    ", out)
            out.append(f"{ind}    if {n} == 0: break")
            # A block with a byte size (negative count) is walked item by item too, and must
            # end exactly where its size says: kept bytes are copied verbatim, and readers
            # that skip by size and readers that read by count must see the same structure.
            out.append(f"{ind}    if {n} < 0:")
            out.append(f"{ind}        {n} = -{n}")
            out.append(f"{ind}        {sz}, pos = _rlen(buf, pos)")
            out.append(f"{ind}        {sz} += pos")
            out.append(f"{ind}    else: {sz} = -1")
            _count_guard(n, _min_width(inner) + isinstance(t, Map), ind + "    ", out)
            body: list[str] = []
            if isinstance(t, Map):
                self.skip(_STRING, ind + "        ", body, stack)
            self.skip(inner, ind + "        ", body, stack)
            if body:  # zero-width items (null): no loop, so a huge count cannot spin
                out.append(f"{ind}    for _ in range({n}):")
                out.extend(body)
            out.append(f"{ind}    if {sz} >= 0 and pos != {sz}: raise _Bad('block size')")
        elif isinstance(t, Union):
            i = self.var("u")
            out.append(f"{ind}{i} = buf[pos]")
            out.append(f"{ind}pos += 1")
            first = True
            for idx, br in enumerate(t.branches):
                body = []
                self.skip(br, ind + "    ", body, stack)
                kw = "if" if first else "elif"
                first = False
                out.append(f"{ind}{kw} {i} == {idx << 1}:")
                out.extend(body or [f"{ind}    pass"])
            out.append(f"{ind}else: raise _Bad('union branch')")
        else:
            raise TypeError(f"cannot skip {k}")

    def block_count(self, n: str, ind: str, out: list[str]) -> None:
        """Read an array/map block count into ``n``: inline when it is one byte (a count
        below 64, the usual case), through ``_rlong`` otherwise -- same value, same errors."""
        b = self.var("b")
        out.append(f"{ind}{b} = buf[pos]")
        out.append(f"{ind}if {b} & 128: {n}, pos = _rlong(buf, pos)")
        out.append(f"{ind}else:")
        out.append(f"{ind}    {n} = ({b} >> 1) ^ -({b} & 1)")
        out.append(f"{ind}    pos += 1")

    def skip_func(self, r: Record) -> str:
        name = self.skip_funcs.get(r.fullname)
        if name is None:
            name = self.var("_skip_")
            self.skip_funcs[r.fullname] = name
            body: list[str] = []
            for f in r.fields:
                self.skip(f.type, "    ", body, (r.fullname,))
            self.lines.append(f"def {name}(buf, pos):")
            self.lines.extend(body)
            self.lines.append("    return pos")
        return name

    # -- decoding a scalar into variable v ------------------------------------------------
    def decode(self, t: AvroType, v: str, ind: str, out: list[str]) -> None:
        k = t.kind
        if k in ("string", "bytes"):
            b, n = self.var("b"), self.var("n")
            out.append(f"{ind}{b} = buf[pos]")
            out.append(f"{ind}if {b} & 129: {n}, pos = _rlen(buf, pos)")
            out.append(f"{ind}else:")
            out.append(f"{ind}    {n} = {b} >> 1")
            out.append(f"{ind}    pos += 1")
            if k == "string":
                out.append(f"{ind}{v} = buf[pos:pos + {n}].decode()")
            else:
                out.append(f"{ind}{v} = buf[pos:pos + {n}]")
            out.append(f"{ind}pos += {n}")
        elif k in ("int", "long", "enum"):
            b = self.var("b")
            out.append(f"{ind}{b} = buf[pos]")
            out.append(f"{ind}if {b} & 128: {v}, pos = _rlong(buf, pos)")
            out.append(f"{ind}else:")
            out.append(f"{ind}    {v} = ({b} >> 1) ^ -({b} & 1)")
            out.append(f"{ind}    pos += 1")
            if isinstance(t, Enum):
                out.append(f"{ind}if not 0 <= {v} < {len(t.symbols)}: raise _Bad('enum index')")
        elif k == "float":
            out.append(f"{ind}{v} = _F(buf, pos)[0]")
            out.append(f"{ind}pos += 4")
        elif k == "double":
            out.append(f"{ind}{v} = _D(buf, pos)[0]")
            out.append(f"{ind}pos += 8")
        elif k == "boolean":
            out.append(f"{ind}{v} = buf[pos]")
            out.append(f"{ind}if {v} > 1: raise _Bad('boolean')")
            out.append(f"{ind}{v} = {v} == 1")
            out.append(f"{ind}pos += 1")
        elif isinstance(t, Fixed):
            out.append(f"{ind}{v} = buf[pos:pos + {t.size}]")
            out.append(f"{ind}pos += {t.size}")
        elif k == "null":
            out.append(f"{ind}{v} = None")
        else:
            raise TypeError(f"cannot decode {k} as a scalar")

    # -- plan nodes -----------------------------------------------------------------------
    def flush(self, ind: str, out: list[str]) -> None:
        """Append the pending run, unless it is statically known to be empty."""
        if not self.run_empty:
            out.append(f"{ind}out.append(buf[start:pos])")

    def node(self, n: Node, ind: str, out: list[str]) -> None:
        """Emit code for one value.  On entry and exit ``start`` marks the pending run."""
        if isinstance(n, Keep):
            self.skip(n.t, ind, out)
            if n.t.kind != "null":
                self.run_empty = False
        elif isinstance(n, Drop):
            self.flush(ind, out)
            self.skip(n.t, ind, out)
            out.append(f"{ind}start = pos")
            self.run_empty = True
        elif isinstance(n, Apply):
            self.flush(ind, out)
            fn = self.const(n.fn, "_op")
            enc = self.const(encoder(n.out), "_enc")
            path = self.const(n.path, "_path")
            v, w = self.var("v"), self.var("w")
            if n.decode:
                self.decode(n.t, v, ind, out)
            else:
                self.skip(n.t, ind, out)
                out.append(f"{ind}{v} = None")
            args = f"{v}, subj" if n.needs_subject else v
            if self.env[enc] is enc_str:
                # String output (token, mask, generalize, ...): enc_str inlined, one call
                # fewer per field.  Same bytes (length prefix, then UTF-8) and the same
                # failures inside the try (a non-str result or a lone surrogate).
                k = self.var("k")
                out.append(f"{ind}try: {w} = {fn}({args}).encode()")
                out.append(f"{ind}except _Pass: raise")
                out.append(f"{ind}except _Ineff: raise _TFI({path}) from None")
                out.append(f"{ind}except Exception: raise _TF({path}) from None")
                out.append(f"{ind}{k} = len({w})")
                out.append(f"{ind}out.append(_LEN[{k}] if {k} < 64 else enc_long({k}))")
                out.append(f"{ind}out.append({w})")
            else:
                out.append(f"{ind}try: {w} = {enc}({fn}({args}))")
                out.append(f"{ind}except _Pass: raise")
                out.append(f"{ind}except _Ineff: raise _TFI({path}) from None")
                out.append(f"{ind}except Exception: raise _TF({path}) from None")
                out.append(f"{ind}out.append({w})")
            out.append(f"{ind}start = pos")
            self.run_empty = True
        elif isinstance(n, RecordNode):
            fn = self.rec_func(n)
            out.append(f"{ind}pos, start = {fn}(buf, pos, start, out, subj)")
            self.run_empty = False
        elif isinstance(n, (ArrayNode, MapNode)):
            inner = n.items if isinstance(n, ArrayNode) else n.values
            c, sz = self.var("n"), self.var("sz")
            self.flush(ind, out)
            seen = None
            if isinstance(n, MapNode) and isinstance(n.keys, Apply):
                seen = self.var("seen")
                out.append(f"{ind}{seen} = set()")  # transformed keys, across blocks
            out.append(f"{ind}while True:")
            self.block_count(c, ind + "    ", out)
            out.append(f"{ind}    if {c} == 0: break")
            out.append(f"{ind}    if {c} < 0:")
            out.append(f"{ind}        {c} = -{c}")
            out.append(f"{ind}        {sz}, pos = _rlen(buf, pos)")
            _count_guard(c, _min_width(inner.t) + isinstance(n, MapNode), ind + "    ", out)
            # enc_long(c) for 0 < c < 64 is the single byte _LEN[c]; no call for small blocks.
            out.append(f"{ind}    out.append(_LEN[{c}] if {c} < 64 else enc_long({c}))")
            out.append(f"{ind}    start = pos")
            out.append(f"{ind}    for _ in range({c}):")
            body: list[str] = []
            self.run_empty = False
            if isinstance(n, MapNode):
                if seen is None:
                    self.skip(_STRING, ind + "        ", body)
                else:
                    self.map_key(n.keys, seen, ind + "        ", body)
            self.node(inner, ind + "        ", body)
            out.extend(body or [f"{ind}        pass"])
            out.append(f"{ind}    out.append(buf[start:pos])")
            out.append(f"{ind}out.append(b'\\x00')")
            out.append(f"{ind}start = pos")
            self.run_empty = True
        elif isinstance(n, UnionNode):
            i = self.var("u")
            identity = all(j == k for j, k in enumerate(n.index_map))
            if not identity:
                self.flush(ind, out)
            out.append(f"{ind}{i} = buf[pos]")
            out.append(f"{ind}pos += 1")
            if not identity:
                out.append(f"{ind}start = pos")
            for idx, br in enumerate(n.branches):
                kw = "if" if idx == 0 else "elif"
                out.append(f"{ind}{kw} {i} == {idx << 1}:")
                body = []
                if not identity:
                    body.append(f"{ind}    out.append({self.const(enc_long(n.index_map[idx]), '_ub')})")
                self.run_empty = False
                self.node(br, ind + "    ", body)
                out.extend(body or [f"{ind}    pass"])
            out.append(f"{ind}else: raise _Bad('union branch')")
            self.run_empty = False
        else:
            raise TypeError(n)

    def map_key(self, n: Node, seen: str, ind: str, out: list[str]) -> None:
        """A transformed map key: decode, transform, refuse a repeat, write.

        Two keys that transform to one (``mask``, ``generalize``, normalization) would
        merge two entries in every reader; the record fails instead (the reference
        interpreter checks the same, in the same order).
        """
        assert isinstance(n, Apply)
        self.flush(ind, out)
        fn = self.const(n.fn, "_op")
        path = self.const(n.path, "_path")
        v, w, k = self.var("v"), self.var("w"), self.var("k")
        self.decode(n.t, v, ind, out)
        args = f"{v}, subj" if n.needs_subject else v
        out.append(f"{ind}try: {w} = {fn}({args}).encode()")
        out.append(f"{ind}except _Pass: raise")
        out.append(f"{ind}except _Ineff: raise _TFI({path}) from None")
        out.append(f"{ind}except Exception: raise _TF({path}) from None")
        out.append(f"{ind}if {w} in {seen}: raise _TF({path})")
        out.append(f"{ind}{seen}.add({w})")
        out.append(f"{ind}{k} = len({w})")
        out.append(f"{ind}out.append(_LEN[{k}] if {k} < 64 else enc_long({k}))")
        out.append(f"{ind}out.append({w})")
        out.append(f"{ind}start = pos")
        self.run_empty = True

    def rec_func(self, n: RecordNode) -> str:
        name = self.rec_funcs.get(n.uid)
        if name is None:
            name = self.var("_rec_")
            self.rec_funcs[n.uid] = name
            body: list[str] = []
            saved, self.run_empty = self.run_empty, False
            for _, child in n.fields:
                self.node(child, "    ", body)
            self.run_empty = saved
            self.lines.append(f"def {name}(buf, pos, start, out, subj):")
            self.lines.extend(body or ["    pass"])
            self.lines.append("    return pos, start")
        return name

    def subject(self, plan: Plan, root: Record, ind: str, out: list[str], offset: int) -> None:
        """Emit a pre-pass that decodes the subject field into ``subj`` (bytes or None)."""
        assert plan.subject is not None
        out.append(f"{ind}pos = {offset}")
        for f in root.fields:
            if f is plan.subject:
                t = f.type
                v = self.var("sv")
                if isinstance(t, Union):
                    i = self.var("u")
                    out.append(f"{ind}{i} = buf[pos]")
                    out.append(f"{ind}pos += 1")
                    for idx, br in enumerate(t.branches):
                        kw = "if" if idx == 0 else "elif"
                        out.append(f"{ind}{kw} {i} == {idx << 1}:")
                        body: list[str] = []
                        self.decode(br, v, ind + "    ", body)
                        out.extend(body)
                    out.append(f"{ind}else: raise _Bad('union branch')")
                else:
                    self.decode(t, v, ind, out)
                self.env["_canon"] = _canonical
                out.append(f"{ind}subj = _canon({v})")
                break
            self.skip(f.type, ind, out)


_DEPTH_GUARD = """def _plan(buf):
    try:
        return _plan_body(buf)
    except RecursionError:
        raise _Bad('nesting too deep') from None
"""


def _is_recursive(schema: AvroType) -> bool:
    """Whether a record can contain itself (directly or through other records)."""

    def children(t: AvroType) -> list[AvroType]:
        if isinstance(t, Record):
            return [f.type for f in t.fields]
        if isinstance(t, Union):
            return list(t.branches)
        if isinstance(t, Array):
            return [t.items]
        if isinstance(t, Map):
            return [t.values]
        return []

    state: dict[int, int] = {}  # id -> 1 on the current path, 2 done

    def visit(t: AvroType) -> bool:
        s = state.get(id(t))
        if s == 1:
            return True
        if s == 2:
            return False
        state[id(t)] = 1
        if any(visit(c) for c in children(t)):
            return True
        state[id(t)] = 2
        return False

    return visit(schema)


def _min_width(t: AvroType, seen: frozenset[int] = frozenset()) -> int:
    """A lower bound on the encoded size of any value of ``t``, in bytes."""
    if isinstance(t, Fixed):
        return t.size
    k = t.kind
    if k == "null":
        return 0
    if k == "float":
        return 4
    if k == "double":
        return 8
    if isinstance(t, Record):
        if id(t) in seen:
            return 0
        return sum(_min_width(f.type, seen | {id(t)}) for f in t.fields)
    if isinstance(t, Union):
        return 1 + min((_min_width(b, seen) for b in t.branches), default=0)
    return 1  # boolean, int, long, enum, string, bytes, array, map: at least one byte


def _count_guard(n: str, width: int, ind: str, out: list[str]) -> None:
    """Refuse a block count that the remaining bytes cannot hold.  Without it, a corrupt
    count over items that never index ``buf`` (float, double, fixed: ``pos += 4``) loops
    billions of times before the final length check: one small record pins a core."""
    if width == 1:
        out.append(f"{ind}if {n} > len(buf) - pos: raise _Bad('block count')")
    elif width > 1:
        out.append(f"{ind}if {n} * {width} > len(buf) - pos: raise _Bad('block count')")


def _canonical(v: Any) -> bytes | None:
    return None if v is None else canonical_bytes(v)


_STRING = Primitive("string")


class _SubjectOnly:
    """The one attribute of a :class:`Plan` that :meth:`_Gen.subject` reads."""

    def __init__(self, subject: Any) -> None:
        self.subject = subject


def compile_subject(schema: Record, subject: Any, *, offset: int = 0) -> Callable[[bytes], bytes | None]:
    """``f(buf) -> canonical subject bytes or None`` (a null subject): the same pre-pass a
    ``date_shift`` plan runs, alone, for consent evaluation.  It skips the fields before the
    subject and decodes that one value; the caller has already validated the record."""
    g = _Gen()
    body: list[str] = []
    g.subject(_SubjectOnly(subject), schema, "    ", body, offset)  # type: ignore[arg-type]
    src = "\n".join([*g.lines, "def _subject(buf):", *body, "    return subj"]) + "\n"
    env = dict(g.env)
    exec(compile(src, f"<streamproc subject {schema.fullname}>", "exec"), env)
    fn: Callable[[bytes], bytes | None] = env["_subject"]
    return fn


def compile_plan(
    plan: Plan, schema: Record, *, offset: int = 0, prefix: bytes = b""
) -> tuple[Callable[[bytes], list[bytes]], str]:
    """Return the generated function and its source (kept for debugging and tests).

    ``offset`` is where the Avro binary starts in ``buf`` (5 for a Confluent-framed
    payload, so no copy is needed to strip the frame); ``prefix`` becomes the first output
    part (the output frame), so the caller's join yields the framed output directly.
    """
    g = _Gen()
    body: list[str] = []
    if plan.subject is not None:
        g.subject(plan, schema, "    ", body, offset)
        body.append("    if subj is None: raise _TF('<subject>')")
    else:
        body.append("    subj = None")
    body.append(f"    pos = {offset}")
    body.append(f"    start = {offset}")
    body.append(f"    out = [{g.const(prefix, '_prefix')}]" if prefix else "    out = []")
    if isinstance(plan.root, RecordNode):
        # The root record's fields go straight into _plan (no call and no (pos, start)
        # tuple per record); a recursive reference to the root still gets its function.
        g.run_empty = True  # start == pos here
        for _, child in plan.root.fields:
            g.node(child, "    ", body)
    else:
        g.node(plan.root, "    ", body)
    body.append("    if pos != len(buf): raise _Bad('trailing or missing bytes')")
    if not g.run_empty:
        body.append("    out.append(buf[start:pos])")
    body.append("    return out")
    src = "\n".join([*g.lines, "def _plan(buf):", *body]) + "\n"
    if _is_recursive(schema):
        # Valid but deeply nested values of a recursive schema exhaust Python's stack: that
        # is a record this processor cannot handle (quarantined), not a crash of the batch.
        src = src.replace("def _plan(buf):", "def _plan_body(buf):", 1) + _DEPTH_GUARD
    env = dict(g.env)
    exec(compile(src, f"<streamproc plan {schema.fullname}/{plan.audience}>", "exec"), env)
    return env["_plan"], src


def compile_reader(
    schema: Record, names: list[str], *, offset: int = 0
) -> Callable[[bytes], tuple[list[Any], list[int]]]:
    """``f(buf) -> (values, spans)``: the top-level fields ``names`` (in schema order)
    decoded from a record *this processor wrote* (an output plaintext, so no structure
    check), with the byte span of each (``spans[2i]``, ``spans[2i + 1]``).  A null branch
    reads as ``None``.  Fields after the last one named are not walked.

    The risk measurement reads an audience's quasi-identifiers with it, and enforcement
    rewrites a field in place by its span (top-level fields have no enclosing length).
    """
    wanted = set(names)
    g = _Gen()
    body = [f"    pos = {offset}", "    vals = []", "    spans = []"]
    last = max((i for i, f in enumerate(schema.fields) if f.name in wanted), default=-1)
    for f in schema.fields[: last + 1]:
        if f.name not in wanted:
            g.skip(f.type, "    ", body)
            continue
        v = g.var("rv")
        body.append("    spans.append(pos)")
        t = f.type
        if isinstance(t, Union):
            i = g.var("u")
            body.append(f"    {i} = buf[pos]")
            body.append("    pos += 1")
            for idx, br in enumerate(t.branches):
                body.append(f"    {'if' if idx == 0 else 'elif'} {i} == {idx << 1}:")
                inner: list[str] = []
                g.decode(br, v, "        ", inner)
                body.extend(inner)
            body.append("    else: raise _Bad('union branch')")
        else:
            g.decode(t, v, "    ", body)
        body.append(f"    vals.append({v})")
        body.append("    spans.append(pos)")
    body.append("    return vals, spans")
    src = "\n".join([*g.lines, "def _read(buf):", *body]) + "\n"
    env = dict(g.env)
    exec(compile(src, f"<streamproc reader {schema.fullname}>", "exec"), env)
    fn: Callable[[bytes], tuple[list[Any], list[int]]] = env["_read"]
    return fn


def compile_key_reader(
    schema: Record, qi: set[str], sensitive: str | None, *, offset: int = 0
) -> Callable[[bytes], tuple[bytes, bytes | None]]:
    """``f(buf) -> (quasi-identifier key, sensitive key)`` from a record this processor
    wrote: the measurement-only form of :func:`compile_reader` (no decoding, no spans).  The
    quasi-identifier key is the encodings of the fields ``qi`` concatenated in schema order,
    the sensitive key the encoding of ``sensitive`` (``None`` without one).  Encodings are
    self-delimiting, so equal keys mean equal encodings of every field: the classes (and
    distinct sensitive values) are those of the values.  The same keys as
    :func:`streamproc.pipeline.native.compile_native_keys`, which replaces this when the
    compiled interpreter is built."""
    wanted = qi | ({sensitive} if sensitive is not None else set())
    g = _Gen()
    body = [f"    pos = {offset}"]
    parts: list[str] = []
    sens = "None"
    last = max((i for i, f in enumerate(schema.fields) if f.name in wanted), default=-1)
    for f in schema.fields[: last + 1]:
        if f.name not in wanted:
            g.skip(f.type, "    ", body)
            continue
        st, v = g.var("st"), g.var("rv")
        body.append(f"    {st} = pos")
        g.skip(f.type, "    ", body)
        body.append(f"    {v} = buf[{st}:pos]")
        if f.name in qi:
            parts.append(v)
        if f.name == sensitive:
            sens = v
    key = "b''" if not parts else parts[0] if len(parts) == 1 else " + ".join(parts)
    body.append(f"    return {key}, {sens}")
    src = "\n".join([*g.lines, "def _read(buf):", *body]) + "\n"
    env = dict(g.env)
    exec(compile(src, f"<streamproc key reader {schema.fullname}>", "exec"), env)
    fn: Callable[[bytes], tuple[bytes, bytes | None]] = env["_read"]
    return fn
