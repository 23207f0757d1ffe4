"""What a compiled plan does to every field: the source of lineage events and the data map.

:func:`field_treatments` walks a :class:`~streamproc.pipeline.plan.Plan` tree alongside its
input schema and yields, for every leaf field (dotted path through records, as in
``streamproc policy check --show``), what the audience gets: nothing (``drop``), the value
itself (``keep``), or the value after one or more operators with their parameters.  Because
it reads the same tree the byte-level code is generated from, the lineage and the data map
cannot describe a transformation the processor does not do.

A field whose type holds records (``address.city``) is described by its leaves; the
container itself gets a row of its own only when an operator applies to the container's
own values (the string branch of a union, transformed map keys).  Parameters are policy
parameters (normalization, ``keep_last``, a CIDR prefix, a redaction constant): no key
material is in a plan's parameters, only key *names* and pseudonym domains.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamproc.operators.base import value_kind
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
from streamproc.schema.annotations import merge_tags, records_in
from streamproc.schema.avro import Array, AvroType, Map, Record, Union

#: Operators that keep the value as it is (everything else is a privacy transformation).
IDENTITY_OPS = frozenset({"keep"})


@dataclass(frozen=True)
class OpUse:
    """One operator applied to a field's values, with the rule's parameters."""

    op: str
    params: Mapping[str, Any]
    props: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The output field properties the operator declares (e.g. the calibrated noise of ``dp_noise``)."""
    domain: str = field(default="", compare=False)
    """The pseudonym domain of a keyed operator (``token``, ``encrypt_deterministic``)."""
    kind: str = field(default="", compare=False)
    """The value kind the operator reads (``long``, ``double``, ``date``, ...)."""

    def describe(self) -> str:
        """``mask(keep_last=4)``: the operator and its parameters, in a stable order."""
        if not self.params:
            return self.op
        args = ", ".join(f"{k}={_show(v)}" for k, v in sorted(self.params.items()))
        return f"{self.op}({args})"


@dataclass(frozen=True)
class FieldTreatment:
    """What one audience gets of one input field."""

    path: str
    """Dotted path in the input schema (``address.city``)."""
    tags: tuple[str, ...]
    """The field's tags, its own plus those of the tagged containers around it."""
    dropped: bool
    ops: tuple[OpUse, ...]
    """Operators applied (empty and not ``dropped``: the value is kept as it is)."""

    @property
    def output_field(self) -> str | None:
        """The output field the value goes to (same path; None when dropped)."""
        return None if self.dropped else self.path

    @property
    def operation(self) -> str:
        if self.dropped:
            return "drop"
        if not self.ops:
            return "keep"
        return " + ".join(u.describe() for u in self.ops)


def _show(v: Any) -> str:
    """JSON (strings quoted): ``until=" "`` stays readable and unambiguous."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


def field_treatments(schema: Record, plan: Plan) -> list[FieldTreatment]:
    """Every leaf field of ``schema`` with what ``plan`` does to it, in schema order."""
    return list(_walk(schema, plan.root, "", (), frozenset()))


def _child_nodes(r: Record, node: Node) -> list[Node]:
    """The plan node of each field of ``r``: a record node's own, else the parent's treatment."""
    if isinstance(node, RecordNode):
        by_name = {f.name: n for f, n in node.fields}
        return [by_name[f.name] for f in r.fields]
    if isinstance(node, Keep):
        return [Keep(f.type) for f in r.fields]
    if isinstance(node, Drop):
        return [Drop(f.type) for f in r.fields]
    return [node for _ in r.fields]  # a whole-value operator covers everything inside


def _walk(
    r: Record, node: Node, prefix: str, inherited: tuple[str, ...], seen: frozenset[tuple[str, tuple[str, ...]]]
) -> Iterator[FieldTreatment]:
    key = (r.fullname, inherited)
    if key in seen:
        return  # a recursive schema: its fields were described one level up
    seen = seen | {key}
    for f, child in zip(r.fields, _child_nodes(r, node), strict=True):
        path = f"{prefix}{f.name}"
        tags = merge_tags(inherited, f.tags)
        own = tuple(_applies(child))
        nested = list(_records(f.type, child))
        if nested:
            if own:
                yield FieldTreatment(path, tags, False, own)
            for rec, rnode in nested:
                yield from _walk(rec, rnode, path + ".", tags, seen)
        else:
            yield FieldTreatment(path, tags, isinstance(child, Drop), own)


def _applies(n: Node) -> Iterator[OpUse]:
    """The operators applied to a value's own parts (not inside nested records), once each."""
    seen: set[tuple[str, str]] = set()
    for a in _apply_nodes(n):
        use = OpUse(a.op, dict(a.params or {}), dict(a.props), a.domain, value_kind(a.t))
        k = (use.op, json.dumps(use.params, sort_keys=True, default=str))
        if k not in seen:
            seen.add(k)
            yield use


def _apply_nodes(n: Node) -> Iterator[Apply]:
    if isinstance(n, Apply):
        yield n
    elif isinstance(n, ArrayNode):
        yield from _apply_nodes(n.items)
    elif isinstance(n, MapNode):
        yield from _apply_nodes(n.keys)
        yield from _apply_nodes(n.values)
    elif isinstance(n, UnionNode):
        for b in n.branches:
            yield from _apply_nodes(b)


def _records(t: AvroType, n: Node) -> Iterator[tuple[Record, Node]]:
    """The records inside a value of type ``t`` with their plan nodes."""
    if isinstance(t, Record):
        yield t, n
    elif isinstance(n, (Keep, Drop, Apply)):
        for r in records_in(t):
            yield r, n
    elif isinstance(n, ArrayNode) and isinstance(t, Array):
        yield from _records(t.items, n.items)
    elif isinstance(n, MapNode) and isinstance(t, Map):
        yield from _records(t.values, n.values)
    elif isinstance(n, UnionNode) and isinstance(t, Union):
        for bt, bn in zip(t.branches, n.branches, strict=True):
            yield from _records(bt, bn)


__all__ = ["IDENTITY_OPS", "FieldTreatment", "OpUse", "field_treatments"]
