"""Schema model, annotations, schema sources and Confluent framing."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import fastavro
import pytest

from streamproc.errors import (
    Reason,
    RecordError,
    SchemaError,
    SchemaNotFound,
    SchemaRegistryUnavailable,
)
from streamproc.schema import avro
from streamproc.schema.annotations import leaves, records_in, subject_field
from streamproc.schema.avro import Array, Enum, Fixed, Map, Primitive, Record, Union
from streamproc.schema.framing import HEADER_LEN, frame, frame_prefix, unframe
from streamproc.schema.registry import (
    CachingSchemaSource,
    ConfluentSchemaSource,
    DirectorySchemaSource,
    RegisteredSchema,
    build_schema_source,
    content_id,
)
from tests.unit.conftest import LOGIN_SCHEMA, ORDER_SCHEMA

LIST = {
    "type": "record", "name": "Node", "namespace": "ll",
    "fields": [
        {"name": "value", "type": "long"},
        {"name": "next", "type": ["null", "Node"], "default": None},
    ],
}

REUSE = {
    "type": "record", "name": "Person", "namespace": "p",
    "fields": [
        {"name": "home", "type": {"type": "record", "name": "Address",
                                  "fields": [{"name": "city", "type": "string", "confluent:tags": ["PUBLIC"]}]}},
        {"name": "work", "type": ["null", "Address"]},
        {"name": "others", "type": {"type": "array", "items": "p.Address"}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "namespace": "q", "symbols": ["A", "B"]}},
        {"name": "kind2", "type": "q.Kind"},
        {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "hash2", "type": ["null", "Hash"]},
    ],
}


def fastavro_form(schema: Any) -> Any:
    return fastavro.parse_schema(copy.deepcopy(schema), _write_hint=False)


# -- avro model ------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [ORDER_SCHEMA, LOGIN_SCHEMA, LIST, REUSE], ids=["order", "login", "list", "reuse"])
def test_parse_to_json_round_trip(schema: dict[str, Any]) -> None:
    node = avro.parse(schema)
    out = avro.to_json(node)
    # the same schema for fastavro (names resolved), annotations and all
    assert fastavro_form(out) == fastavro_form(schema)
    # and a fixed point: serializing the re-parsed form changes nothing
    assert avro.canonical_json(avro.to_json(avro.parse(out))) == avro.canonical_json(out)
    # text input works too
    assert avro.canonical_json(avro.to_json(avro.parse(json.dumps(schema)))) == avro.canonical_json(out)


def test_example_schema_annotations_survive() -> None:
    node = avro.parse(ORDER_SCHEMA)
    assert isinstance(node, Record)
    assert node.fullname == "com.acme.shop.OrderPlaced"
    f = {x.name: x for x in node.fields}
    assert f["card_number"].tags == ("PII", "PCI", "CARD_NUMBER")
    assert f["customer_id"].props["streamproc.subject"] is True
    assert f["birth_date"].type.logical == "date"
    assert f["placed_at"].type.logical == "timestamp-millis"
    assert f["phone"].props["default"] is None
    addr = f["shipping_address"].type
    assert isinstance(addr, Record) and addr.fullname == "com.acme.shop.Address"  # namespace inherited
    assert node.props["doc"].startswith("A customer placed an order")


def test_named_types_are_shared_nodes_and_defined_once() -> None:
    node = avro.parse(REUSE)
    assert isinstance(node, Record)
    f = {x.name: x.type for x in node.fields}
    home = f["home"]
    assert isinstance(f["work"], Union) and f["work"].branches[1] is home
    assert isinstance(f["others"], Array) and f["others"].items is home
    assert f["kind2"] is f["kind"] and isinstance(f["kind"], Enum)
    assert f["kind"].namespace == "q" and f["kind"].symbols == ["A", "B"]
    assert isinstance(f["hash"], Fixed) and f["hash"].size == 4 and f["hash"].namespace == "p"
    assert isinstance(f["hash2"], Union) and f["hash2"].branches[1] is f["hash"]
    out = avro.to_json(node)
    text = json.dumps(out)
    assert text.count('"fields"') == 2  # Person and Address, once each
    assert text.count('"symbols"') == 1 and text.count('"size"') == 1
    assert out["fields"][1]["type"] == ["null", "p.Address"]
    assert out["fields"][4]["type"] == "q.Kind"


def test_recursive_schema_is_a_graph() -> None:
    node = avro.parse(LIST)
    assert isinstance(node, Record)
    nxt = node.fields[1].type
    assert isinstance(nxt, Union) and nxt.branches[1] is node
    assert nxt.nullable_of is node
    assert avro.to_json(node)["fields"][1]["type"] == ["null", "ll.Node"]


def test_two_different_definitions_of_one_name_are_refused() -> None:
    a = Record("record", {}, "R", "n", [avro.Field("x", Primitive("int"))])
    b = Record("record", {}, "R", "n", [avro.Field("y", Primitive("string"))])
    same = Record("record", {}, "R", "n", [avro.Field("x", Primitive("int"))])
    outer = Record("record", {}, "Outer", "n", [avro.Field("a", a), avro.Field("b", b)])
    with pytest.raises(SchemaError, match=r"two different definitions of named type 'n.R'"):
        avro.to_json(outer)
    # an equal definition under the same name is just a reference
    ok = Record("record", {}, "Outer", "n", [avro.Field("a", a), avro.Field("b", same)])
    assert avro.to_json(ok)["fields"][1]["type"] == "n.R"


def test_wrapped_types_and_props() -> None:
    t = avro.parse({"type": {"type": "long", "logicalType": "timestamp-micros"}})
    assert isinstance(t, Primitive) and t.kind == "long" and t.logical == "timestamp-micros"
    assert avro.parse("string").kind == "string"
    u = avro.parse(["string", "null"])
    assert isinstance(u, Union) and u.nullable_of is not None and u.nullable_of.kind == "string"
    assert avro.parse(["string", "long"]).nullable_of is None  # type: ignore[union-attr]
    m = avro.parse({"type": "map", "values": {"type": "int", "logicalType": "date"}})
    assert isinstance(m, Map) and m.values.logical == "date"


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("{not json", "schema is not JSON"),
        ({"type": "record", "name": "R", "fields": [{"name": "a", "type": "Missing"}]}, "unknown type name 'Missing'"),
        ({"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}, {"name": "a", "type": "int"}]},
         "record R: bad or duplicate field name 'a'"),
        ({"type": "record", "name": "R", "fields": [{"type": "int"}]}, "record R: bad or duplicate field name None"),
        ({"name": "x"}, "schema node must be a name, a list or an object with 'type'"),
        (42, "schema node must be a name, a list or an object with 'type'"),
    ],
)
def test_parse_errors(schema: Any, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        avro.parse(schema)
    assert str(info.value).startswith(message)


def test_strip_logical_and_canonical_json() -> None:
    stripped = avro.strip_logical(ORDER_SCHEMA)
    assert "logicalType" not in json.dumps(stripped)
    assert "logicalType" in json.dumps(ORDER_SCHEMA)  # the input is not modified
    assert avro.canonical_json('{"b": 1, "a": [1, 2]}') == '{"a":[1,2],"b":1}'
    assert avro.canonical_json({"b": 1, "a": 2}) == avro.canonical_json({"a": 2, "b": 1})


# -- annotations -----------------------------------------------------------------------------


def _leaves(schema: Any) -> list[tuple[str, tuple[str, ...]]]:
    node = avro.parse(schema)
    assert isinstance(node, Record)
    return [(lf.path, lf.tags) for lf in leaves(node)]


def test_leaves_of_the_example_schemas() -> None:
    order = dict(_leaves(ORDER_SCHEMA))
    assert order["shipping_address.street"] == ("PII", "STREET")
    assert order["items[].sku"] == ("PUBLIC",)
    assert order["phone"] == ("PII", "PHONE")
    assert "shipping_address" not in order and "items" not in order  # containers are walked
    login = dict(_leaves(LOGIN_SCHEMA))
    assert login["device.device_id"] == ("PII", "DEVICE_ID")
    assert login["device.geo"] == ("PII", "GEO")  # a tagged map is a leaf
    assert login["recovery_emails"] == ("PII", "EMAIL")  # a tagged array is a leaf


def test_leaves_paths_through_arrays_maps_and_unions() -> None:
    schema = {
        "type": "record", "name": "Top",
        "fields": [
            {"name": "plain", "type": "string"},
            {"name": "tagged_rec", "type": {"type": "record", "name": "Secret", "fields": [{"name": "x", "type": "int"}]},
             "confluent:tags": ["PII"]},
            {"name": "m", "type": {"type": "map", "values": {"type": "record", "name": "V", "fields": [
                {"name": "v", "type": "string", "confluent:tags": ["T"]}]}}},
            {"name": "aa", "type": {"type": "array", "items": {"type": "array", "items": ["null", {
                "type": "record", "name": "W", "fields": [{"name": "w", "type": "long"}]}]}}},
            {"name": "u", "type": ["null", "V", {"type": "record", "name": "X", "fields": [
                {"name": "x1", "type": "string", "confluent:tags": ["A", "B"]}]}]},
            {"name": "opt", "type": ["null", "V"]},
            {"name": "self", "type": ["null", "Top"]},
        ],
    }
    assert _leaves(schema) == [
        ("plain", ()),
        ("tagged_rec.x", ("PII",)),  # a tagged container is walked; its tag is inherited
        ("m{}<key>", ()),  # the keys of an untagged map: an unclassified leaf of their own
        ("m{}.v", ("T",)),
        ("aa[][].w", ()),
        ("u.v", ("T",)),
        ("u.x1", ("A", "B")),
        ("opt.v", ("T",)),
    ]  # the recursive reference to Top is not walked again


def test_records_in_and_subject_field() -> None:
    node = avro.parse(LOGIN_SCHEMA)
    assert isinstance(node, Record)
    f = {x.name: x for x in node.fields}
    assert [r.name for r in records_in(f["device"].type)] == ["Device"]
    assert records_in(f["recovery_emails"].type) == []
    subj = subject_field(node)
    assert subj is not None and subj.name == "customer_id"
    assert subject_field(avro.parse(LIST)) is None  # type: ignore[arg-type]


# -- DirectorySchemaSource -------------------------------------------------------------------


def test_directory_ids_are_content_derived_and_stable(schema_dir: Path, tmp_path: Path) -> None:
    src = DirectorySchemaSource(schema_dir)
    oid = src.id_for_file(schema_dir / "order.avsc")
    assert oid == content_id(ORDER_SCHEMA) and 0 < oid < 2**31
    rs = src.get(oid)
    assert rs.schema_id == oid and rs.json == ORDER_SCHEMA and rs.subject == "order"
    assert rs.name == "com.acme.shop.OrderPlaced"
    assert isinstance(rs.node, Record)
    assert rs.fastavro_raw is rs.fastavro_raw  # parsed once
    # another directory holding the same content (reformatted) agrees on the id
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.avsc").write_text(json.dumps(ORDER_SCHEMA, indent=7))
    assert DirectorySchemaSource(other).id_for_file(other / "x.avsc") == oid
    assert {s.schema_id for s in DirectorySchemaSource(other).schemas()} == {oid}
    # annotations are content: retagging a field changes the id
    changed = copy.deepcopy(ORDER_SCHEMA)
    changed["fields"][2]["confluent:tags"] = ["PUBLIC"]
    assert content_id(changed) != oid


def test_directory_register_writes_once_and_is_idempotent(schema_dir: Path) -> None:
    src = DirectorySchemaSource(schema_dir)
    out = {"type": "record", "name": "Out", "fields": [{"name": "a", "type": "string"}]}
    sid = src.register("sanitized.fraud-value", out)
    assert sid == content_id(out)
    target = schema_dir / "registered" / f"sanitized.fraud-value-{sid}.avsc"
    assert json.loads(target.read_text()) == out
    mtime = target.stat().st_mtime_ns
    assert src.register("sanitized.fraud-value", json.dumps(out)) == sid
    assert target.stat().st_mtime_ns == mtime
    assert len(list((schema_dir / "registered").iterdir())) == 1
    assert src.get(sid).json == out
    # a fresh source over the directory finds it (the file is the registration)
    assert DirectorySchemaSource(schema_dir).get(sid).json == out
    # unsafe subject characters do not escape the directory
    sid2 = src.register("../evil/../x", {"type": "record", "name": "E", "fields": []})
    assert (schema_dir / "registered" / f".._evil_.._x-{sid2}.avsc").exists()


def test_directory_register_refuses_invalid_schemas(schema_dir: Path) -> None:
    src = DirectorySchemaSource(schema_dir)
    with pytest.raises(Exception):  # noqa: B017 - fastavro's SchemaParseException
        src.register("bad", {"type": "record", "name": "B", "fields": [{"name": "a", "type": "nope"}]})
    assert not (schema_dir / "registered").exists()


def test_directory_rescan_picks_up_new_and_changed_files(schema_dir: Path) -> None:
    src = DirectorySchemaSource(schema_dir)
    new = {"type": "record", "name": "New", "fields": [{"name": "a", "type": "int"}]}
    sid = content_id(new)
    with pytest.raises(SchemaNotFound):
        src.get(sid)
    (schema_dir / "sub").mkdir()
    (schema_dir / "sub" / "new.avsc").write_text(json.dumps(new))
    assert src.get(sid).json == new  # a miss rescans
    # a changed file is re-read (mtime changes)
    p = schema_dir / "sub" / "new.avsc"
    newer = {**new, "doc": "v2"}
    p.write_text(json.dumps(newer))
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert src.get(content_id(newer)).json == newer


def test_directory_unknown_id_and_bad_files(schema_dir: Path, tmp_path: Path) -> None:
    src = DirectorySchemaSource(schema_dir)
    with pytest.raises(SchemaNotFound) as info:
        src.get(12345)
    assert str(info.value) == f"schema id 12345 not found in {schema_dir}"
    (schema_dir / "broken.avsc").write_text("{oops")
    with pytest.raises(SchemaError, match=r"broken.avsc: invalid Avro schema"):
        src.rescan()
    with pytest.raises(SchemaError, match=r"does not exist"):
        DirectorySchemaSource(tmp_path / "missing")


# -- CachingSchemaSource ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class CountingSource:
    def __init__(self, known: dict[int, Any]) -> None:
        self.known = known
        self.gets: list[int] = []
        self.registers: list[str] = []

    def get(self, schema_id: int) -> RegisteredSchema:
        self.gets.append(schema_id)
        if schema_id not in self.known:
            raise SchemaNotFound(f"schema id {schema_id} not found")
        return RegisteredSchema(schema_id, json.dumps(self.known[schema_id]))

    def register(self, subject: str, schema: Any) -> int:
        self.registers.append(subject)
        return 77


def test_caching_source_caches_hits_forever_and_misses_briefly() -> None:
    clock = FakeClock()
    inner = CountingSource({1: LIST})
    src = CachingSchemaSource(inner, negative_ttl=10.0, clock=clock)
    assert src.get(1) is src.get(1)
    assert inner.gets == [1] and src.hits == 1 and src.misses == 1
    clock.t += 1e6
    src.get(1)
    assert inner.gets == [1]  # ids are immutable
    for _ in range(5):
        with pytest.raises(SchemaNotFound):
            src.get(9)
    assert inner.gets == [1, 9]  # negative cache: one lookup for five records
    clock.t += 9.9
    with pytest.raises(SchemaNotFound, match=r"\(cached\)"):
        src.get(9)
    assert inner.gets == [1, 9]
    clock.t += 0.2
    with pytest.raises(SchemaNotFound):
        src.get(9)
    assert inner.gets == [1, 9, 9]  # expired: asked again
    inner.known[9] = LIST  # registered meanwhile
    clock.t += 11
    assert src.get(9).schema_id == 9


def test_caching_source_memoizes_registration() -> None:
    inner = CountingSource({})
    src = CachingSchemaSource(inner)
    assert src.register("a-value", LIST) == 77
    assert src.register("a-value", json.loads(json.dumps(LIST))) == 77
    assert src.register("b-value", LIST) == 77
    assert inner.registers == ["a-value", "b-value"]


def test_build_schema_source(schema_dir: Path) -> None:
    assert isinstance(build_schema_source(str(schema_dir)).inner, DirectorySchemaSource)
    assert isinstance(build_schema_source({"directory": str(schema_dir)}).inner, DirectorySchemaSource)
    s = build_schema_source("mock://build-test")
    assert isinstance(s.inner, ConfluentSchemaSource)
    with pytest.raises(SchemaError, match=r"needs 'directory' or 'url'"):
        build_schema_source({"path": "x"})


# -- ConfluentSchemaSource -------------------------------------------------------------------


def test_confluent_source_against_mock_registry() -> None:
    src = ConfluentSchemaSource(f"mock://schema-test-{time.monotonic_ns()}")
    sid = src.register("orders-value", ORDER_SCHEMA)
    again = src.register("orders-value", json.dumps(ORDER_SCHEMA))
    assert again == sid
    rs = src.get(sid)
    assert rs.schema_id == sid
    assert fastavro_form(rs.json) == fastavro_form(ORDER_SCHEMA)
    assert rs.node.fields[3].tags == ("PII", "PCI", "CARD_NUMBER")  # type: ignore[attr-defined]
    with pytest.raises(SchemaNotFound, match=r"^schema id 424242 not found in the registry$"):
        src.get(424242)


class _Err(Exception):
    pass


class FailingClient:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get_schema(self, schema_id: int) -> Any:
        raise self.exc

    def register_schema(self, subject: str, schema: Any) -> int:
        raise self.exc


def _registry_error(status: int, code: int) -> Exception:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    return SchemaRegistryError(status, code, "boom")


def test_confluent_source_maps_registry_errors() -> None:
    with pytest.raises(SchemaNotFound):
        ConfluentSchemaSource({}, client=FailingClient(_registry_error(404, 40403))).get(1)
    with pytest.raises(SchemaError) as info:
        ConfluentSchemaSource({}, client=FailingClient(_registry_error(422, 42201))).get(1)
    assert not isinstance(info.value, SchemaNotFound)
    assert "HTTP 422" in str(info.value)
    # Expired or missing credentials, timeouts and throttling are "not now", not "never":
    # the worker must pause, not dead-letter every record.
    for status in (401, 403, 408, 429):
        with pytest.raises(SchemaRegistryUnavailable, match=f"HTTP {status}"):
            ConfluentSchemaSource({}, client=FailingClient(_registry_error(status, status))).get(1)
    with pytest.raises(SchemaRegistryUnavailable, match=r"HTTP 503"):
        ConfluentSchemaSource({}, client=FailingClient(_registry_error(503, 50301))).get(1)
    with pytest.raises(SchemaRegistryUnavailable, match=r"unreachable \(ConnectionRefusedError\)"):
        ConfluentSchemaSource({}, client=FailingClient(ConnectionRefusedError())).get(1)
    with pytest.raises(_Err):  # an unexpected error is not swallowed
        ConfluentSchemaSource({}, client=FailingClient(_Err())).get(1)


def test_confluent_source_maps_register_errors() -> None:
    schema = {"type": "record", "name": "R", "fields": []}
    with pytest.raises(SchemaError, match="HTTP 409") as info:  # incompatible output schema
        ConfluentSchemaSource({}, client=FailingClient(_registry_error(409, 409))).register("t-value", schema)
    assert not isinstance(info.value, SchemaRegistryUnavailable)
    for status in (401, 429, 503):
        with pytest.raises(SchemaRegistryUnavailable, match=f"HTTP {status}"):
            ConfluentSchemaSource({}, client=FailingClient(_registry_error(status, status))).register("t-value", schema)
    with pytest.raises(SchemaRegistryUnavailable, match="unreachable"):
        ConfluentSchemaSource({}, client=FailingClient(ConnectionRefusedError())).register("t-value", schema)


def test_confluent_source_refuses_non_avro() -> None:
    class ProtoClient:
        def get_schema(self, schema_id: int) -> Any:
            from confluent_kafka.schema_registry import Schema

            return Schema('syntax = "proto3";', "PROTOBUF")

    with pytest.raises(SchemaNotFound, match=r"is PROTOBUF, not Avro"):
        ConfluentSchemaSource({}, client=ProtoClient()).get(5)


# -- framing ---------------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    framed = frame(0x01020304, b"avro")
    assert framed == b"\x00\x01\x02\x03\x04avro"
    assert frame_prefix(0x01020304) == framed[:HEADER_LEN]
    assert unframe(framed) == (0x01020304, b"avro")
    assert unframe(frame(7, b"")) == (7, b"")
    assert unframe(frame(2**32 - 1, b"x"))[0] == 2**32 - 1


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00\x01", b"\x01\x00\x00\x00\x01avro", b"{\"json\": 1}"])
def test_unframe_errors(data: bytes) -> None:
    with pytest.raises(RecordError) as info:
        unframe(data)
    assert info.value.reason is Reason.BAD_PAYLOAD
    assert info.value.detail == "payload is not Confluent-framed (magic byte 0 + schema id)"
