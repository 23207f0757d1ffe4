"""A small, typed model of Avro schemas.

fastavro parses schemas for (de)serialization; streamproc also needs to *walk* them --
to read field annotations, compile byte-level plans and derive output schemas -- with
named types resolved once.  This module turns schema JSON into immutable nodes and back.

Named types (record, enum, fixed) are resolved by full name; a reference to a name seen
earlier becomes the same node object, so recursive schemas are graphs, not infinite trees.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamproc.errors import SchemaError

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


@dataclass(eq=False)
class AvroType:
    """Base node.  ``props`` keeps extra attributes (``logicalType`` and friends)."""

    kind: str
    props: dict[str, Any] = field(default_factory=dict)

    @property
    def logical(self) -> str | None:
        lt = self.props.get("logicalType")
        return lt if isinstance(lt, str) else None


@dataclass(eq=False)
class Primitive(AvroType):
    pass


@dataclass(eq=False)
class Field:
    name: str
    type: AvroType
    props: dict[str, Any] = field(default_factory=dict)
    """Every attribute except ``name`` and ``type``: ``default``, ``doc``, tags, hints."""

    @property
    def tags(self) -> tuple[str, ...]:
        tags = self.props.get("confluent:tags") or ()
        return tuple(str(t) for t in tags)


@dataclass(eq=False)
class Record(AvroType):
    name: str = ""
    namespace: str | None = None
    fields: list[Field] = field(default_factory=list)

    @property
    def fullname(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name


@dataclass(eq=False)
class Enum(AvroType):
    name: str = ""
    namespace: str | None = None
    symbols: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Fixed(AvroType):
    name: str = ""
    namespace: str | None = None
    size: int = 0


@dataclass(eq=False)
class Array(AvroType):
    items: AvroType = field(default_factory=lambda: Primitive("null"))


@dataclass(eq=False)
class Map(AvroType):
    values: AvroType = field(default_factory=lambda: Primitive("null"))


@dataclass(eq=False)
class Union(AvroType):
    branches: list[AvroType] = field(default_factory=list)

    @property
    def nullable_of(self) -> AvroType | None:
        """For ``["null", T]`` (either order) return T, else None."""
        if len(self.branches) == 2:
            kinds = [b.kind for b in self.branches]
            if kinds.count("null") == 1:
                return self.branches[1 - kinds.index("null")]
        return None


def _split(name: str, namespace: str | None) -> tuple[str, str | None]:
    if "." in name:
        ns, _, short = name.rpartition(".")
        return short, ns
    return name, namespace


def parse(schema: Any) -> AvroType:
    """Parse schema JSON (a str or the decoded object) into a node graph."""
    if isinstance(schema, (str, bytes)) and not (isinstance(schema, str) and schema in PRIMITIVES):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SchemaError(f"schema is not JSON ({type(exc).__name__})") from None
    return _Parser().node(schema, None)


class _Parser:
    def __init__(self) -> None:
        self.named: dict[str, AvroType] = {}

    def node(self, s: Any, ns: str | None) -> AvroType:
        if isinstance(s, str):
            if s in PRIMITIVES:
                return Primitive(s)
            full = s if "." in s or ns is None else f"{ns}.{s}"
            if full in self.named:
                return self.named[full]
            if s in self.named:
                return self.named[s]
            raise SchemaError(f"unknown type name {s!r}")
        if isinstance(s, list):
            return Union("union", branches=[self.node(b, ns) for b in s])
        if not isinstance(s, Mapping) or "type" not in s:
            raise SchemaError("schema node must be a name, a list or an object with 'type'")
        t = s["type"]
        props = {k: v for k, v in s.items() if k not in ("type", "name", "namespace", "fields", "symbols", "items", "values", "size")}
        if isinstance(t, str) and t in PRIMITIVES:  # t may be a dict or list (a wrapped type)
            return Primitive(t, props)
        if t == "record" or t == "error":
            name, rns = _split(str(s["name"]), s.get("namespace", ns))
            rec = Record("record", props, name, rns, [])
            self.named[rec.fullname] = rec
            seen = set()
            for f in s.get("fields", []):
                fname = f.get("name")
                if not isinstance(fname, str) or fname in seen:
                    raise SchemaError(f"record {rec.fullname}: bad or duplicate field name {fname!r}")
                seen.add(fname)
                fprops = {k: v for k, v in f.items() if k not in ("name", "type")}
                rec.fields.append(Field(fname, self.node(f["type"], rns), fprops))
            return rec
        if t == "enum":
            name, ens = _split(str(s["name"]), s.get("namespace", ns))
            e = Enum("enum", props, name, ens, list(s["symbols"]))
            self.named[f"{ens}.{name}" if ens else name] = e
            return e
        if t == "fixed":
            name, fns = _split(str(s["name"]), s.get("namespace", ns))
            fx = Fixed("fixed", props, name, fns, int(s["size"]))
            self.named[f"{fns}.{name}" if fns else name] = fx
            return fx
        if t == "array":
            return Array("array", props, self.node(s["items"], ns))
        if t == "map":
            return Map("map", props, self.node(s["values"], ns))
        if isinstance(t, (Mapping, list)) or (isinstance(t, str) and t not in PRIMITIVES):
            # {"type": {"type": "record", ...}} or {"type": "SomeName"}: a wrapped type.
            inner = self.node(t, ns)
            if props and isinstance(inner, Primitive):
                return Primitive(inner.kind, {**inner.props, **props})
            return inner
        raise SchemaError(f"unsupported Avro type {t!r}")


def to_json(node: AvroType) -> Any:
    """Serialize a node graph back to schema JSON, defining each named type once."""
    return _Writer().json(node)


class _Writer:
    def __init__(self, check: bool = True) -> None:
        self.defined: dict[str, AvroType] = {}
        self.check = check

    def json(self, n: AvroType) -> Any:
        if isinstance(n, Primitive):
            return {"type": n.kind, **n.props} if n.props else n.kind
        if isinstance(n, Union):
            return [self.json(b) for b in n.branches]
        if isinstance(n, Array):
            return {"type": "array", "items": self.json(n.items), **n.props}
        if isinstance(n, Map):
            return {"type": "map", "values": self.json(n.values), **n.props}
        if isinstance(n, (Record, Enum, Fixed)):
            full = f"{n.namespace}.{n.name}" if n.namespace else n.name
            prev = self.defined.get(full)
            if prev is not None:
                # A later use becomes a reference to the first definition, which is only
                # right if both nodes define the same type (derived schemas can hold an
                # original and a transformed record under one name).
                if self.check and prev is not n and _standalone(prev) != _standalone(n):
                    raise SchemaError(f"two different definitions of named type {full!r}")
                return full
            self.defined[full] = n
            out: dict[str, Any] = {"type": n.kind, "name": n.name}
            if n.namespace:
                out["namespace"] = n.namespace
            if isinstance(n, Record):
                out["fields"] = [{"name": f.name, "type": self.json(f.type), **f.props} for f in n.fields]
            elif isinstance(n, Enum):
                out["symbols"] = list(n.symbols)
            else:
                out["size"] = n.size
            out.update(n.props)
            return out
        raise SchemaError(f"cannot serialize node kind {n.kind}")


def _standalone(n: AvroType) -> str:
    return canonical_json(_Writer(check=False).json(n))


def canonical_json(schema: Any) -> str:
    """Stable JSON text (sorted keys, no spaces) used for hashing and registration."""
    if isinstance(schema, str):
        with contextlib.suppress(ValueError):
            schema = json.loads(schema)
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def strip_logical(schema: Any) -> Any:
    """Schema JSON with every ``logicalType`` removed, so fastavro yields raw primitives.

    Operators work on raw Avro values (days since epoch, epoch millis) so that the
    compiled byte-level plan and the reference interpreter share one implementation.
    """
    if isinstance(schema, list):
        return [strip_logical(s) for s in schema]
    if isinstance(schema, dict):
        return {k: strip_logical(v) for k, v in schema.items() if k != "logicalType"}
    return schema
