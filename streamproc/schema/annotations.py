"""Field classification from schema annotations.

A field is classified by Confluent's ``confluent:tags`` field property (a list of
strings, for example ``["PII", "EMAIL"]``), and by Confluent's *external* tags: the
schema's ``metadata.tags`` (data contracts), a map from field-path patterns to tags such
as ``{"Order.email": ["PII", "EMAIL"], "**.ssn": ["PII"]}``.  External tags are merged
into the inline ones (:func:`apply_external_tags`) before anything else reads the schema,
so a field tagged only through the registry is never taken for untagged.  streamproc also
reads hints of its own:

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

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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


# -- external tags (Confluent data contracts: schema metadata.tags) ----------------------


@lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    """Confluent's wildcard syntax over dot-separated names, as its serializers use it:
    ``?`` one character and ``*`` any characters within a name, ``**`` any characters
    across names (``**.*`` is ``**``), ``\\`` escapes; everything else is literal."""
    src = pattern.replace("**.*", "**")
    out: list[str] = []
    i = 0
    while i < len(src):
        c = src[i]
        i += 1
        if c == "*":
            if i < len(src) and src[i] == "*":
                out.append(".*")
                i += 1
            else:
                out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "\\" and i < len(src):
            out.append(re.escape(src[i]))
            i += 1
        else:
            out.append(re.escape(c))
    return re.compile("".join(out))


def wildcard_match(text: str, pattern: str) -> bool:
    """Whether a field's full name (``ns.Record.field``) matches a metadata tag pattern."""
    return _wildcard_regex(pattern).fullmatch(text) is not None


def apply_external_tags(schema: Any, tags: Mapping[str, Sequence[str]]) -> tuple[Any, list[str]]:
    """Merge ``metadata.tags`` into the schema's inline ``confluent:tags``.

    A field matches a pattern by its record's full name (``com.acme.Order.email``, the form
    of Confluent's inline-tag index) or by its record's name as written (``Order.email``,
    the form its field-level rule executors match).  Returns a new schema JSON (the input
    is not modified) and the patterns that matched no field: a pattern that classifies
    nothing is worth a warning, since the field it meant is then governed by something else.
    """
    if not tags:
        return schema, []
    out = copy.deepcopy(schema)
    used: set[str] = set()
    items = [(p, [str(t) for t in ts]) for p, ts in tags.items()]

    def walk(t: Any, ns: str | None) -> None:
        if isinstance(t, list):
            for b in t:
                walk(b, ns)
            return
        if not isinstance(t, dict):
            return
        kind = t.get("type")
        if kind == "array":
            walk(t.get("items"), ns)
        elif kind == "map":
            walk(t.get("values"), ns)
        elif kind == "record":
            name = str(t.get("name", ""))
            rec_ns: str | None
            if "." in name:
                full, rec_ns = name, name.rpartition(".")[0]
            else:
                rec_ns = str(t.get("namespace", ns) or "") or None
                full = f"{rec_ns}.{name}" if rec_ns else name
            for f in t.get("fields", []):
                if not isinstance(f, dict):
                    continue
                candidates = {f"{full}.{f.get('name')}", f"{name}.{f.get('name')}"}
                extra: list[str] = []
                for pattern, ts in items:
                    if any(wildcard_match(c, pattern) for c in candidates):
                        used.add(pattern)
                        extra.extend(ts)
                if extra:
                    inline = [str(x) for x in f.get("confluent:tags") or []]
                    f["confluent:tags"] = inline + sorted(set(extra) - set(inline))
                walk(f.get("type"), rec_ns)
        elif isinstance(kind, (dict, list)):
            walk(kind, ns)

    walk(out, None)
    return out, [p for p, _ in items if p not in used]


def split_document(obj: Any) -> tuple[Any, dict[str, list[str]]]:
    """A schema file's Avro schema and its external tags.

    A file is either a plain Avro schema, or a document in the shape of Confluent's
    register request: ``{"schema": <Avro schema, as JSON or as a JSON string>,
    "schemaType": "AVRO", "metadata": {"tags": {<pattern>: [<tag>, ...]}}}``.
    """
    import json

    if not (isinstance(obj, dict) and "schema" in obj and "type" not in obj):
        return obj, {}
    schema = obj["schema"]
    if isinstance(schema, str):
        schema = json.loads(schema)
    if obj.get("schemaType", "AVRO") != "AVRO":
        raise ValueError(f"schemaType {obj.get('schemaType')!r} is not AVRO")
    return schema, metadata_tags(obj.get("metadata"))


def metadata_tags(metadata: Any) -> dict[str, list[str]]:
    """``metadata.tags`` as a plain mapping (from JSON or from confluent-kafka's objects);
    anything malformed is an error, never silently empty."""
    if metadata is None:
        return {}
    tags = metadata.get("tags") if isinstance(metadata, Mapping) else getattr(metadata, "tags", None)
    if tags is not None and not isinstance(tags, Mapping):
        tags = getattr(tags, "tags", tags)  # confluent-kafka's MetadataTags wrapper
    if tags is None:
        return {}
    if not isinstance(tags, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v)
        for k, v in tags.items()
    ):
        raise ValueError("metadata.tags must map field-path patterns to lists of tag names")
    return {k: sorted(set(v)) if isinstance(v, set) else list(v) for k, v in tags.items()}
