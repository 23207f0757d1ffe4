"""The output schema says what docs/annotations.md and docs/policy.md promise.

* a field redacted to null is ``["null", T]`` **with** ``default: null`` -- nested or not,
  whether or not the input had a default (checked by Avro schema resolution: a reader
  with the output schema fills the field from the default when the writer lacks it);
* ``streamproc.transform`` names the operators applied to the field's own values: an
  untagged container record does not carry the operators of its children.
"""

from __future__ import annotations

import io
from typing import Any

import fastavro

from streamproc.pipeline.plan import build_plan
from streamproc.policy.model import parse_policy
from streamproc.schema import avro

CONTACT = {"type": "record", "name": "Contact", "fields": [
    {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
    {"name": "phone", "type": "string", "confluent:tags": ["PHONE"]},
    {"name": "city", "type": "string", "confluent:tags": ["PUBLIC"]},
]}
SCHEMA = {"type": "record", "name": "Top", "namespace": "t", "fields": [
    {"name": "id", "type": "string", "confluent:tags": ["PUBLIC"]},
    {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
    {"name": "contact", "type": CONTACT},
    {"name": "aliases", "type": {"type": "array", "items": "string"}, "confluent:tags": ["EMAIL_LIST"]},
]}


def out_schema() -> dict[str, Any]:
    audience = parse_policy({"audiences": {"a": {
        "untagged": "drop", "record_key": "keep",
        "tags": {"PUBLIC": "keep", "EMAIL": "redact", "PHONE": {"op": "mask", "keep_last": 2},
                 "EMAIL_LIST": "redact"},
    }}}).audience("a")
    out: dict[str, Any] = build_plan(avro.parse(SCHEMA), audience, None).out_schema
    return out


def field(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in record["fields"] if f["name"] == name)


def test_redacted_to_null_fields_default_to_null_at_any_depth() -> None:
    out = out_schema()
    contact = field(out, "contact")["type"]
    for f in (field(out, "email"), field(contact, "email")):
        assert f["type"] == ["null", "string"]
        assert "default" in f and f["default"] is None
    # Schema resolution: records written without the redacted fields read back as null.
    writer = {"type": "record", "name": "Top", "namespace": "t", "fields": [
        {"name": "id", "type": "string"},
        {"name": "contact", "type": {"type": "record", "name": "Contact", "fields": [
            {"name": "phone", "type": "string"}, {"name": "city", "type": "string"}]}},
        {"name": "aliases", "type": ["null", {"type": "array", "items": "string"}]},
    ]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer),
                               {"id": "1", "contact": {"phone": "**12", "city": "X"}, "aliases": None})
    buf.seek(0)
    got = fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(out))
    assert got["email"] is None and got["contact"]["email"] is None  # type: ignore[index]


def test_transform_property_is_on_transformed_fields_not_on_their_container() -> None:
    out = out_schema()
    contact = field(out, "contact")
    assert "streamproc.transform" not in contact  # untagged container: its children say it
    assert field(contact["type"], "email")["streamproc.transform"] == "redact"
    assert field(contact["type"], "phone")["streamproc.transform"] == "mask"
    assert field(out, "aliases")["streamproc.transform"] == "redact"  # an array's own values
    assert "streamproc.transform" not in field(out, "id")
