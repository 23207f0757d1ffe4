"""Minimization and schema-hygiene rules of the plan builder.

* untagged scalar data inside an untagged container (the string branch of
  ``["null", "string", Record]``) obeys ``untagged``: under ``drop`` it becomes null, or the
  whole field goes when the union has no null branch;
* a transformed field never carries its (possibly plaintext) default into the output schema;
* ``redact`` with a constant on a nullable field redacts the value and keeps null as null;
* a registry that refuses the derived output schema quarantines the record as
  ``unsupported_schema`` instead of crashing the batch.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import Reason, SchemaError
from streamproc.pipeline.codegen import compile_plan
from streamproc.pipeline.plan import build_plan
from streamproc.pipeline.reference import run_reference
from streamproc.policy.model import parse_policy
from streamproc.schema import avro

ORDER_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "order.avsc").read_text())

CONTACT = {"type": "record", "name": "Contact", "fields": [
    {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
    {"name": "city", "type": "string", "confluent:tags": ["PUBLIC"]},
]}


def _schema(contact_type: Any, email_default: bool = False) -> dict[str, Any]:
    email: dict[str, Any] = {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]}
    if email_default:
        email["default"] = "ceo@acme.example"
    return {"type": "record", "name": "Top", "namespace": "t", "fields": [
        {"name": "id", "type": "string", "confluent:tags": ["PUBLIC"]},
        email,
        {"name": "contact", "type": contact_type},
    ]}


def _policy(untagged: str, email_rule: Any = "token") -> Any:
    raw = {"keys": {"pseudonym": "pseudonym-master"}, "audiences": {"a": {
        "untagged": untagged, "tags": {"PUBLIC": "keep", "EMAIL": email_rule}}}}
    return parse_policy(raw).audience("a")


def _run(schema: dict[str, Any], audience: Any, keys: PseudonymKeys, record: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    node = avro.parse(schema)
    plan = build_plan(node, audience, keys)
    fn, _ = compile_plan(plan, node)  # type: ignore[arg-type]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    out = b"".join(fn(buf.getvalue()))
    assert out == run_reference(plan, schema, buf.getvalue())
    decoded = fastavro.schemaless_reader(io.BytesIO(out), fastavro.parse_schema(plan.out_schema), None)
    return decoded, plan.out_schema


@pytest.mark.parametrize("untagged", ["drop", "keep"])
def test_untagged_string_branch_of_a_container_union_obeys_untagged(untagged: str, keys: PseudonymKeys) -> None:
    schema = _schema(["null", "string", CONTACT])
    rec = {"id": "1", "email": "x@y.z", "contact": "jane.doe@example.com"}
    out, _ = _run(schema, _policy(untagged), keys, rec)
    assert out["contact"] == (None if untagged == "drop" else "jane.doe@example.com")
    # the record branch is still walked field by field
    rec2 = {"id": "1", "email": "x@y.z", "contact": {"email": "jane@example.com", "city": "Leeds"}}
    out2, _ = _run(schema, _policy(untagged), keys, rec2)
    assert out2["contact"]["city"] == "Leeds" and out2["contact"]["email"].startswith("tk1_")


def test_untagged_union_without_null_is_dropped_whole_under_drop(keys: PseudonymKeys) -> None:
    schema = _schema(["string", CONTACT])
    out, out_schema = _run(schema, _policy("drop"), keys, {"id": "1", "email": "x@y.z", "contact": "jane@example.com"})
    assert "contact" not in out
    assert "contact" not in {f["name"] for f in out_schema["fields"]}


def test_transformed_field_loses_its_plaintext_default(keys: PseudonymKeys) -> None:
    schema = _schema(["null", CONTACT], email_default=True)
    for rule in ("token", {"op": "mask", "keep_last": 2}, {"op": "generalize", "prefix": 1}):
        _, out_schema = _run(schema, _policy("drop", rule), keys, {"id": "1", "email": "a@b.c", "contact": None})
        email = next(f for f in out_schema["fields"] if f["name"] == "email")
        assert "default" not in email, rule
        assert "ceo@acme.example" not in str(out_schema)


def test_redact_constant_on_a_nullable_field_keeps_null(keys: PseudonymKeys) -> None:
    schema = {"type": "record", "name": "P", "fields": [
        {"name": "phone", "type": ["null", "string"], "default": None, "confluent:tags": ["PHONE"]},
        {"name": "phones", "type": {"type": "array", "items": "string"}, "confluent:tags": ["PHONE"]},
    ]}
    raw = {"audiences": {"a": {"record_key": "drop", "tags": {"PHONE": {"op": "redact", "value": "[hidden]"}}}}}
    aud = parse_policy(raw).audience("a")
    out, out_schema = _run(schema, aud, keys, {"phone": "+44 20 7946 0000", "phones": ["1", "2"]})
    assert out == {"phone": "[hidden]", "phones": ["[hidden]", "[hidden]"]}
    out, _ = _run(schema, aud, keys, {"phone": None, "phones": []})
    assert out == {"phone": None, "phones": []}
    assert out_schema["fields"][0]["type"] == ["null", "string"]


def test_a_refused_output_schema_quarantines_as_unsupported_schema(make_pipeline: Any, keyring: Any) -> None:
    from streamproc.client import RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.pipeline.core import InputRecord

    kit = make_pipeline()
    sealer = RecordSealer(keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)

    def refuse(subject: str, schema: Any) -> int:
        raise SchemaError(f"registry refused a schema for subject {subject!r}: HTTP 409")

    kit.schemas.register = refuse  # type: ignore[method-assign]
    value = sealer.seal(EventGenerator(3).order())
    result = kit.pipeline.process([InputRecord("orders", 0, 0, b"k", value)])
    assert not result.outputs
    assert [q.reason for q in result.quarantined] == [Reason.UNSUPPORTED_SCHEMA]
    assert "HTTP 409" in result.quarantined[0].detail
    # cached as a property of the schema: the next record fails the same way, no crash
    again = kit.pipeline.process([InputRecord("orders", 0, 1, b"k", value)])
    assert [q.reason for q in again.quarantined] == [Reason.UNSUPPORTED_SCHEMA]
