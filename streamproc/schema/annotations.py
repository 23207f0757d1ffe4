"""Field classification from schema annotations.

A field is classified by Confluent's ``confluent:tags`` field property (a list of
strings, for example ``["PII", "EMAIL"]``).  streamproc also reads hints of its own:

* ``"streamproc.subject": true`` -- this top-level field identifies the data subject
  (used by ``date_shift`` so that one person's dates move together);
* ``"streamproc.domain": "customer"`` -- the pseudonym domain for this field's tokens,
  overriding the tag, so fields in different schemas that hold the same identifier join.

Walking rules (shared by the policy linter and the plan compiler): a tagged field is a
leaf whatever its type; an untagged field whose type contains a record (directly, in a
nullable union, an array or a map) is a *container* and its record's fields are walked;
any other untagged field is an untagged leaf.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from streamproc.schema.avro import Array, AvroType, Field, Map, Record, Union

SUBJECT_HINT = "streamproc.subject"
DOMAIN_HINT = "streamproc.domain"


@dataclass(frozen=True)
class Leaf:
    path: str
    field: Field
    tags: tuple[str, ...]

    @property
    def type(self) -> AvroType:
        return self.field.type


def records_in(t: AvroType) -> list[Record]:
    """Records reachable from ``t`` through unions, arrays and maps (not through records)."""
    if isinstance(t, Record):
        return [t]
    if isinstance(t, Union):
        return [r for b in t.branches for r in records_in(b)]
    if isinstance(t, Array):
        return records_in(t.items)
    if isinstance(t, Map):
        return records_in(t.values)
    return []


def _suffix(t: AvroType) -> str:
    if isinstance(t, Array):
        return "[]" + _suffix(t.items)
    if isinstance(t, Map):
        return "{}" + _suffix(t.values)
    if isinstance(t, Union):
        nn = t.nullable_of
        return _suffix(nn) if nn is not None else ""
    return ""


def leaves(record: Record, prefix: str = "", _seen: frozenset[str] = frozenset()) -> Iterator[Leaf]:
    """Every classified or untagged leaf of a record, depth first, with dotted paths."""
    if record.fullname in _seen:
        return
    seen = _seen | {record.fullname}
    for f in record.fields:
        path = f"{prefix}{f.name}"
        if f.tags:
            yield Leaf(path, f, f.tags)
            continue
        nested = records_in(f.type)
        if nested:
            for r in nested:
                yield from leaves(r, f"{path}{_suffix(f.type)}.", seen)
        else:
            yield Leaf(path, f, ())


def subject_field(record: Record) -> Field | None:
    for f in record.fields:
        if f.props.get(SUBJECT_HINT) is True:
            return f
    return None
