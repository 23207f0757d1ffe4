"""Field classification from schema annotations.

A field is classified by Confluent's ``confluent:tags`` field property (a list of
strings, for example ``["PII", "EMAIL"]``).  streamproc also reads hints of its own:

* ``"streamproc.subject": true`` -- this top-level field identifies the data subject
  (used by ``date_shift`` so that one person's dates move together);
* ``"streamproc.domain": "customer"`` -- the pseudonym domain for this field's tokens,
  overriding the tag, so fields in different schemas that hold the same identifier join.

* ``"streamproc.key_tags": ["PUBLIC"]`` -- tags for the *keys* of the maps in this
  field's type, when they are classified apart from the values (coordinate names, say).
  Without it, keys get the field's own tags: keys are data too.

Walking rules (shared by the policy linter and the plan compiler): a field whose type
contains a record (directly, in a nullable union, an array or a map) is a *container*
and its record's fields are walked, whether it is tagged or not; its tags are inherited
by everything inside it (a field's tags are its own plus its containers').  Any other
field is a leaf.  The keys of a map are a leaf too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from streamproc.schema.avro import Array, AvroType, Field, Map, Primitive, Record, Union

SUBJECT_HINT = "streamproc.subject"
DOMAIN_HINT = "streamproc.domain"
KEY_TAGS_HINT = "streamproc.key_tags"
_STRING = Primitive("string")


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


def maps_in(t: AvroType) -> bool:
    """Whether a map is reachable from ``t`` through unions, arrays and maps."""
    if isinstance(t, Map):
        return True
    if isinstance(t, Union):
        return any(maps_in(b) for b in t.branches)
    if isinstance(t, Array):
        return maps_in(t.items)
    return False


def _suffix(t: AvroType) -> str:
    if isinstance(t, Array):
        return "[]" + _suffix(t.items)
    if isinstance(t, Map):
        return "{}" + _suffix(t.values)
    if isinstance(t, Union):
        nn = t.nullable_of
        return _suffix(nn) if nn is not None else ""
    return ""


def leaves(
    record: Record, prefix: str = "", _seen: frozenset[tuple[str, tuple[str, ...]]] = frozenset(),
    inherited: tuple[str, ...] = (),
) -> Iterator[Leaf]:
    """Every classified or untagged leaf of a record, depth first, with dotted paths.

    ``inherited``: tags of the tagged containers around ``record``; a leaf's tags are its
    own plus those (a tag applies to everything inside the value it is on).  The keys of a
    map are a leaf of their own (path ``<field>{}<key>``): tagged by the field's
    ``streamproc.key_tags`` hint if present, else by the field's tags.
    """
    key = (record.fullname, inherited)
    if key in _seen:
        return
    seen = _seen | {key}
    for f in record.fields:
        path = f"{prefix}{f.name}"
        tags = merge_tags(inherited, f.tags)
        hint = f.props.get(KEY_TAGS_HINT)
        nested = records_in(f.type)
        if (tags or nested or hint is not None) and maps_in(f.type):
            ktags = merge_tags(inherited, tuple(str(x) for x in hint)) if hint is not None else tags
            yield Leaf(f"{path}{{}}<key>", Field("<key>", _STRING, {}), ktags)
        if nested:
            for r in nested:
                yield from leaves(r, f"{path}{_suffix(f.type)}.", seen, tags)
        else:
            yield Leaf(path, f, tags)


def merge_tags(inherited: tuple[str, ...], own: tuple[str, ...]) -> tuple[str, ...]:
    """The union of two tag sets, sorted (a stable key; rule lookup ignores order)."""
    if not inherited:
        return own
    return tuple(sorted(set(inherited) | set(own)))


def subject_field(record: Record) -> Field | None:
    for f in record.fields:
        if f.props.get(SUBJECT_HINT) is True:
            return f
    return None
