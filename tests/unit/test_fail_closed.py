"""Fail closed: no protected value leaves in the clear through a corner of the plan.

One test group per class of leak that used to exist:

* the keys of a tagged map (copied verbatim while the values were tokenized);
* a reducing operator that reduces nothing (``prefix`` longer than the value, ``until``
  without the separator, IPv6 networks that still hold an embedded IPv4 address);
* a loose tag on a container overriding the strict tags inside it;
* ``mask`` revealing all but one character;

each checked on the generated code *and* the reference interpreter, which must agree.
"""

from __future__ import annotations

import io
import ipaddress
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.client import RecordSealer
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError, Reason
from streamproc.operators import get_operator
from streamproc.operators.base import OpContext
from streamproc.pipeline.codegen import TransformFailed, compile_plan
from streamproc.pipeline.core import InputRecord
from streamproc.pipeline.lint import check
from streamproc.pipeline.plan import Apply, Keep, MapNode, Plan, build_plan
from streamproc.pipeline.reference import run_reference
from streamproc.policy.model import Audience, parse_policy
from streamproc.schema import avro
from streamproc.schema.avro import Primitive, Record
from streamproc.schema.registry import RegisteredSchema
from tests.unit.conftest import ORDER_SCHEMA, Maker

S = Primitive("string")


def audience(tags: dict[str, Any], untagged: str = "drop") -> Audience:
    doc = {"keys": {"pseudonym": "pseudonym-master"}, "audiences": {"a": {"untagged": untagged, "tags": tags}}}
    return parse_policy(doc).audience("a")


def encode(schema: Any, record: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(avro.strip_logical(schema)), record)
    return buf.getvalue()


def run(schema: dict[str, Any], aud: Audience, keys: PseudonymKeys, record: dict[str, Any]) -> tuple[Plan, Any]:
    """Both implementations; they must agree.  Returns the plan and the decoded output,
    or ``("failed", path, reason)`` when both refuse the record."""
    node = avro.parse(schema)
    assert isinstance(node, Record)
    plan = build_plan(node, aud, keys)
    fn, _ = compile_plan(plan, node)
    data = encode(schema, record)
    try:
        gen: Any = b"".join(fn(data))
    except TransformFailed as exc:
        gen = ("failed", exc.args[0], exc.reason)
    try:
        ref: Any = run_reference(plan, schema, data)
    except TransformFailed as exc:
        ref = ("failed", exc.args[0], exc.reason)
    assert gen == ref
    if isinstance(gen, tuple):
        return plan, gen
    out = fastavro.schemaless_reader(io.BytesIO(gen), fastavro.parse_schema(avro.strip_logical(plan.out_schema)), None)
    return plan, out


def record_schema(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": "R", "namespace": "t", "fields": list(fields)}


def lint(schema: dict[str, Any], aud_tags: dict[str, Any]) -> list[tuple[str, str]]:
    doc = {"keys": {"pseudonym": "pseudonym-master"}, "audiences": {"a": {"tags": aud_tags}}}
    rs = RegisteredSchema(1, avro.canonical_json(schema))
    return [(f.level, f.message) for f in check(parse_policy(doc), [rs]).findings]


# -- 1. keys of tagged maps ----------------------------------------------------------------

EMAIL_MAP = record_schema(
    {"name": "by_email", "type": {"type": "map", "values": "string"}, "confluent:tags": ["EMAIL"]},
    {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
)


def test_tagged_map_keys_get_the_operator(shared_keys: PseudonymKeys) -> None:
    aud = audience({"EMAIL": {"op": "token", "normalize": ["lower", "strip"]}})
    rec = {"by_email": {"Ann@Example.com": "bob@example.com", "carl@example.com": "x"}, "email": "ann@example.com"}
    plan, out = run(EMAIL_MAP, aud, shared_keys, rec)
    keys = list(out["by_email"])
    # no key and no value leaves in clear, and a key tokenizes like the same e-mail in a field
    assert not set(keys) & set(rec["by_email"]) and not set(out["by_email"].values()) & set(rec["by_email"].values())
    assert keys[0] == out["email"] and all(k.startswith("tk") for k in keys)
    node = plan.root
    assert isinstance(node, Record) or not isinstance(node, Keep)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"op": "date_shift"}, "map keys"),  # keys are strings: a date operator cannot apply
        ({"op": "redact", "value": "X"}, "every key the same value"),
        ({"op": "generalize", "bucket": 10}, "map keys"),
    ],
)
def test_rules_that_cannot_apply_to_keys_are_refused(shared_keys: PseudonymKeys, rule: Any, message: str) -> None:
    values = {"type": "int", "logicalType": "date"} if rule["op"] == "date_shift" else (
        "long" if rule["op"] == "generalize" else "string")
    schema = record_schema(
        {"name": "subject", "type": "string", "confluent:tags": ["PUBLIC"], "streamproc.subject": True},
        {"name": "m", "type": {"type": "map", "values": values}, "confluent:tags": ["T"]},
    )
    node = avro.parse(schema)
    with pytest.raises(PolicyError, match=message):
        build_plan(node, audience({"PUBLIC": "keep", "T": rule}), shared_keys)
    # and the linter makes it an error (before: no finding at all)
    assert any(level == "error" and "map keys" in msg for level, msg in lint(schema, {"PUBLIC": "keep", "T": rule}))


def test_colliding_transformed_keys_fail_the_record_in_both_implementations(shared_keys: PseudonymKeys) -> None:
    schema = record_schema({"name": "m", "type": {"type": "map", "values": "string"}, "confluent:tags": ["T"]})
    aud = audience({"T": {"op": "generalize", "prefix": 3}})
    _, out = run(schema, aud, shared_keys, {"m": {"abcdef": "123456", "xyzuvw": "7890"}})
    assert out == {"m": {"abc": "123", "xyz": "789"}}
    # two keys with one prefix would merge two entries in every reader: refused instead
    _, failed = run(schema, aud, shared_keys, {"m": {"abcdef": "123456", "abcxyz": "7890"}})
    assert failed == ("failed", "m{}<key>", Reason.TRANSFORM_FAILED)


def test_untagged_map_keys_follow_untagged(shared_keys: PseudonymKeys) -> None:
    schema = record_schema({"name": "m", "type": {"type": "map", "values": {
        "type": "record", "name": "V", "fields": [{"name": "v", "type": "string", "confluent:tags": ["T"]}]}}})
    rec = {"m": {"alice@example.com": {"v": "secret"}}}
    _, out = run(schema, audience({"T": "token"}, untagged="drop"), shared_keys, rec)
    assert out == {}  # unclassified keys cannot be dropped alone: the whole map goes
    _, out = run(schema, audience({"T": "token"}, untagged="keep"), shared_keys, rec)
    assert list(out["m"]) == ["alice@example.com"] and out["m"]["alice@example.com"]["v"] != "secret"
    # the linter: unclassified keys are an error (was a warning), as any unclassified field
    findings = lint(schema, {"T": "token"})
    assert ("error" in {lv for lv, m in findings if "m{}<key>" in m})


def test_key_tags_hint_classifies_keys_apart(shared_keys: PseudonymKeys) -> None:
    schema = record_schema({"name": "geo", "type": {"type": "map", "values": "double"}, "confluent:tags": ["GEO"],
                            "streamproc.key_tags": ["PUBLIC"]})
    _, out = run(schema, audience({"PUBLIC": "keep", "GEO": {"op": "generalize", "bucket": 1}}), shared_keys,
                 {"geo": {"lat": 51.5, "lon": -0.12}})
    assert out == {"geo": {"lat": 51.0, "lon": -1.0}}
    assert not [f for f in lint(schema, {"PUBLIC": "keep", "GEO": {"op": "generalize", "bucket": 1}}) if f[0] == "error"]
    # keys whose tags the audience does not mention: the map goes (minimization)
    _, out = run(schema, audience({"GEO": {"op": "generalize", "bucket": 1}}), shared_keys, {"geo": {"lat": 1.0}})
    assert out == {}


def test_map_key_node_is_in_the_plan(shared_keys: PseudonymKeys) -> None:
    node = avro.parse(EMAIL_MAP)
    plan = build_plan(node, audience({"EMAIL": "token"}), shared_keys)
    m = plan.root.fields[0][1]  # type: ignore[attr-defined]
    assert isinstance(m, MapNode) and isinstance(m.keys, Apply) and m.keys.op == "token"


# -- 2. reducing operators that reduce nothing ------------------------------------------------


def guarded(params: dict[str, Any]) -> Any:
    op = get_operator(params.pop("op"))
    op.validate(params)
    return op.bind_checked(params, S, OpContext("a", "d", "f", None))


@pytest.mark.parametrize(
    ("params", "value", "expected"),
    [
        ({"op": "generalize", "prefix": 4}, "SW1", "*"),  # shorter than the prefix
        ({"op": "generalize", "prefix": 4}, "SW1A", "*"),  # exactly the prefix
        ({"op": "generalize", "prefix": 4}, "SW1A1AA", "SW1A"),
        ({"op": "generalize", "until": " "}, "SW1A1AA", "*"),  # no separator
        ({"op": "generalize", "until": " "}, "SW1A 1AA", "SW1A"),
        ({"op": "generalize", "until": " "}, "", "*"),
        ({"op": "generalize", "cidr": 32}, "203.0.113.7", "*"),  # the /32 is the address
        ({"op": "generalize", "cidr": 24}, "203.0.113.0", "203.0.113.0/24"),  # text coincidence, 24 bits
        ({"op": "generalize", "cidr": 24, "cidr6": 128}, "2001:db8::1", "*"),
        ({"op": "mask", "preserve": "@."}, "@.", "**"),  # separators would be all: masked too
        ({"op": "mask"}, "", "*"),  # nothing to mask
        ({"op": "mask", "char": "#"}, "###", "#"),
    ],
)
def test_output_equal_to_or_containing_the_input_is_suppressed(params: dict[str, Any], value: str, expected: str) -> None:
    assert guarded(dict(params))(value) == expected


#: Known answers, from the RFCs' own examples and worked by hand.
EMBEDDED = [
    ("::ffff:203.0.113.7", "203.0.113.0/24"),  # IPv4-mapped, RFC 4291 2.5.5.2
    ("::203.0.113.7", "203.0.113.0/24"),  # IPv4-compatible, RFC 4291 2.5.5.1
    ("64:ff9b::203.0.113.7", "203.0.113.0/24"),  # NAT64 well-known prefix, RFC 6052
    ("64:ff9b::c000:221", "192.0.2.0/24"),  # RFC 6052 2.4 example: 192.0.2.33
    ("2002:cb00:7107::1", "203.0.113.0/24"),  # 6to4, RFC 3056: 2002:V4ADDR::/48
    ("2002:c000:0221:1:2:3:4:5", "192.0.2.0/24"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.0/24"),  # Teredo, RFC 4380 4: client 192.0.2.45
    ("2001:db8:abcd:12::1", "2001:db8:abcd::/48"),  # no embedding: the /48
]


@pytest.mark.parametrize(("value", "expected"), EMBEDDED)
def test_ipv6_with_embedded_ipv4_generalizes_as_ipv4(value: str, expected: str) -> None:
    assert guarded({"op": "generalize", "cidr": 24})(value) == expected
    # the whole IPv4 address appears nowhere in the output (6to4/Teredo used to keep it)
    out = guarded({"op": "generalize", "cidr": 24})(value)
    ip = ipaddress.ip_address(value)
    assert ip.exploded not in out and str(ip) not in out


def test_cidr_32_of_an_embedded_ipv4_is_suppressed() -> None:
    assert guarded({"op": "generalize", "cidr": 32})("2002:cb00:7107::1") == "*"
    assert guarded({"op": "generalize", "cidr": 32})("::ffff:203.0.113.7") == "*"


def test_local_use_nat64_cannot_be_cut_safely() -> None:
    assert guarded({"op": "generalize", "cidr": 24})("64:ff9b:1:cb00:7107::1") == "*"
    with pytest.raises(TransformFailed):
        run_one_quarantine("64:ff9b:1:cb00:7107::1")


def run_one_quarantine(value: str) -> None:
    schema = record_schema({"name": "ip", "type": "string", "confluent:tags": ["IP"]})
    node = avro.parse(schema)
    plan = build_plan(node, audience({"IP": {"op": "generalize", "cidr": 24, "on_failure": "quarantine"}}), None)
    fn, _ = compile_plan(plan, node)  # type: ignore[arg-type]
    fn(encode(schema, {"ip": value}))


def test_on_failure_quarantine_is_its_own_reason_class(make_pipeline: Maker) -> None:
    import yaml

    from tests.unit.conftest import POLICY_FILE

    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["audiences"]["analytics"]["tags"]["POSTCODE"] = {"op": "generalize", "until": " ", "on_failure": "quarantine"}
    kit = make_pipeline(policy_obj=parse_policy(raw))
    from streamproc.client.generator import EventGenerator

    gen = EventGenerator(5)
    good, bad = gen.order(), gen.order()
    good["shipping_address"]["postcode"] = "SW1A 1AA"
    bad["shipping_address"]["postcode"] = "SW1A1AA"
    sealer = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    res = kit.pipeline.process([InputRecord("orders", 0, i, b"k", v) for i, v in enumerate(sealer.seal_many([good, bad]))])
    assert [q.reason for q in res.quarantined] == [Reason.INEFFECTIVE_TRANSFORM]
    assert res.quarantined[0].detail == "field shipping_address.postcode"
    assert {o.source.offset for o in res.outputs} == {0}


def test_shipped_policy_never_passes_an_unseparated_postcode(make_pipeline: Maker) -> None:
    """The issue's reproduction: ``SW1A1AA`` left the analytics audience in full."""
    from streamproc.client import RecordOpener
    from streamproc.client.generator import EventGenerator

    kit = make_pipeline()
    rec = EventGenerator(6).order()
    rec["shipping_address"]["postcode"] = "SW1A1AA"
    rec["ip_address"] = "2002:cb00:7107::99"
    sealer = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    res = kit.pipeline.process([InputRecord("orders", 0, 0, b"k", sealer.seal_many([rec])[0])])
    assert not res.quarantined
    opener = RecordOpener(kit.keyring, kit.schemas)
    out = {o.topic: opener.decode(o.topic, o.value) for o in res.outputs if o.value}
    analytics = next(v for t, v in out.items() if "analytics" in t)
    assert analytics["shipping_address"]["postcode"] == "*"
    assert analytics["ip_address"] == "203.0.113.0/24"


# -- 3. container tags never loosen inner tags ------------------------------------------------

CONTAINER = record_schema(
    {"name": "contact", "confluent:tags": ["PUBLIC"], "type": {"type": "record", "name": "Contact", "fields": [
        {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
        {"name": "city", "type": "string"},
        {"name": "notes", "type": {"type": "map", "values": "string"}},
    ]}},
)
CONTACT = {"contact": {"email": "ann@example.com", "city": "Leeds", "notes": {"k": "v"}}}


def test_keep_on_a_container_does_not_override_inner_tags(shared_keys: PseudonymKeys) -> None:
    _, out = run(CONTAINER, audience({"PUBLIC": "keep", "EMAIL": "token"}), shared_keys, CONTACT)
    c = out["contact"]
    assert c["email"].startswith("tk") and "ann@example.com" not in c["email"]
    # untagged parts inherit the container's tag (PUBLIC: keep), map keys included
    assert c["city"] == "Leeds" and c["notes"] == {"k": "v"}
    # the linter sees the inner tag as used and reports the inner field's treatment
    findings = lint(CONTAINER, {"PUBLIC": "keep", "EMAIL": "token"})
    assert not [m for _, m in findings if "EMAIL" in m and "no schema uses it" in m]
    assert not [m for _, m in findings if "different rules" in m]  # inheriting is not a conflict
    doc = {"keys": {"pseudonym": "k"}, "audiences": {"a": {"tags": {"PUBLIC": "keep", "EMAIL": "token"}}}}
    matrix = check(parse_policy(doc), [RegisteredSchema(1, avro.canonical_json(CONTAINER))]).matrix["t.R"]
    assert matrix["contact.email"]["a"] == "token" and matrix["contact.city"]["a"] == "keep"
    assert matrix["contact.notes{}<key>"]["a"] == "keep"


@pytest.mark.parametrize(
    ("container_rule", "expected"),
    [("drop", {}), ("redact", {"contact": None})],
)
def test_strict_rule_on_a_container_hides_everything_inside(shared_keys: PseudonymKeys, container_rule: str,
                                                            expected: dict[str, Any]) -> None:
    _, out = run(CONTAINER, audience({"PUBLIC": container_rule, "EMAIL": "keep"}), shared_keys, CONTACT)
    assert out == expected


def test_container_rule_stricter_than_inner_rule_applies_inside(shared_keys: PseudonymKeys) -> None:
    schema = record_schema(
        {"name": "ids", "confluent:tags": ["CUSTOMER_ID"], "type": {"type": "map", "values": {
            "type": "record", "name": "Acct", "fields": [{"name": "label", "type": "string", "confluent:tags": ["PUBLIC"]}]}}},
    )
    rec = {"ids": {"cust-1": {"label": "gold"}}}
    _, out = run(schema, audience({"PUBLIC": "keep", "CUSTOMER_ID": "token"}), shared_keys, rec)
    [(k, v)] = out["ids"].items()
    assert k.startswith("tk") and k != "cust-1"  # the keys get the container's rule
    assert v["label"].startswith("tk")  # strictest of PUBLIC (inner) and CUSTOMER_ID (container)


# -- 4. mask floor ----------------------------------------------------------------------------------


def test_mask_through_the_pipeline_never_shows_more_than_half(shared_keys: PseudonymKeys) -> None:
    schema = record_schema({"name": "card", "type": "string", "confluent:tags": ["CARD"]})
    aud = audience({"CARD": {"op": "mask", "keep_last": 4}})
    for value, expected in [("12345", "*****"), ("4000123412341234", "************1234"), ("12345678", "****5678")]:
        _, out = run(schema, aud, shared_keys, {"card": value})
        assert out == {"card": expected}


# -- 5. Confluent external tags (schema metadata.tags) ------------------------------------------

UNTAGGED_ORDER = {"type": "record", "name": "Order", "namespace": "com.acme", "fields": [
    {"name": "id", "type": "string", "confluent:tags": ["PUBLIC"]},
    {"name": "email", "type": "string"},
    {"name": "contact", "type": {"type": "record", "name": "Contact", "fields": [
        {"name": "ssn", "type": "string", "confluent:tags": ["PUBLIC"]}]}},
]}
EXTERNAL = {"Order.email": ["PII", "EMAIL"], "**.ssn": ["SSN"]}


def _tags_of(rs: RegisteredSchema) -> dict[str, tuple[str, ...]]:
    from streamproc.schema.annotations import leaves

    node = rs.node
    assert isinstance(node, Record)
    return {leaf.path: leaf.tags for leaf in leaves(node)}


def test_directory_source_reads_metadata_tags(tmp_path: Any, shared_keys: PseudonymKeys) -> None:
    import json

    from streamproc.schema.registry import DirectorySchemaSource, content_id

    doc = {"schema": json.dumps(UNTAGGED_ORDER), "schemaType": "AVRO", "metadata": {"tags": EXTERNAL}}
    (tmp_path / "order.avsc").write_text(json.dumps(doc))
    src = DirectorySchemaSource(tmp_path)
    # a producer that registers the bare schema gets the id under which the tags are known
    sid = src.register("orders-value", UNTAGGED_ORDER)
    assert sid == content_id(UNTAGGED_ORDER) == src.id_for_file(tmp_path / "order.avsc")
    rs = src.get(sid)
    tags = _tags_of(rs)
    assert set(tags["email"]) == {"PII", "EMAIL"}  # was: untagged
    assert set(tags["contact.ssn"]) == {"PUBLIC", "SSN"}  # merged with the inline tags
    plan = build_plan(rs.node, audience({"PUBLIC": "keep", "EMAIL": "token", "SSN": "drop"}), shared_keys)
    ops = {f.name: n for f, n in plan.root.fields}  # type: ignore[attr-defined]
    assert isinstance(ops["email"], Apply) and ops["email"].op == "token"
    # the bare copy the producer registered does not hide the document's tags on rescan
    src.rescan()
    assert set(_tags_of(src.get(sid))["email"]) == {"PII", "EMAIL"}


def test_confluent_source_reads_metadata_tags() -> None:
    import json

    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.schema_registry_client import Metadata, MetadataTags

    from streamproc.schema.registry import ConfluentSchemaSource

    client = SchemaRegistryClient.new_client({"url": "mock://external-tags"})
    sid = client.register_schema("orders-value", Schema(json.dumps(UNTAGGED_ORDER), "AVRO", metadata=Metadata(
        tags=MetadataTags(tags=EXTERNAL), properties=None, sensitive=None)))
    rs = ConfluentSchemaSource("mock://unused", client=client).get(sid)
    assert set(_tags_of(rs)["email"]) == {"PII", "EMAIL"}
    # and streamproc's own registration keeps them (a document with metadata round-trips)
    src = ConfluentSchemaSource("mock://unused", client=client)
    sid2 = src.register("copy-value", {"schema": UNTAGGED_ORDER, "metadata": {"tags": EXTERNAL}})
    assert set(_tags_of(src.get(sid2))["email"]) == {"PII", "EMAIL"}


def test_linter_counts_external_tags_and_warns_about_patterns_that_match_nothing(tmp_path: Any) -> None:
    import json

    from streamproc.schema.registry import load_document

    doc = {"schema": UNTAGGED_ORDER, "metadata": {"tags": {**EXTERNAL, "Order.emial": ["EMAIL"]}}}
    (tmp_path / "o.avsc").write_text(json.dumps(doc))
    rs = load_document(tmp_path / "o.avsc")
    pol = parse_policy({"keys": {"pseudonym": "k"}, "audiences": {"a": {"tags": {
        "PUBLIC": "keep", "EMAIL": "token", "SSN": "drop", "PII": "drop"}}}})
    findings = check(pol, [rs]).findings
    assert not [f for f in findings if f.level == "error"], findings  # email is classified
    assert any(f.level == "warning" and "'Order.emial'" in f.message for f in findings)


@pytest.mark.parametrize("bad", [{"tags": {"Order.email": "EMAIL"}}, {"tags": ["EMAIL"]}, {"tags": {"x": [1]}}])
def test_malformed_metadata_tags_are_refused_not_ignored(tmp_path: Any, bad: Any) -> None:
    import json

    from streamproc.errors import SchemaError
    from streamproc.schema.registry import load_document

    (tmp_path / "o.avsc").write_text(json.dumps({"schema": UNTAGGED_ORDER, "metadata": bad}))
    with pytest.raises(SchemaError):
        load_document(tmp_path / "o.avsc")


_NAME = st.text("ab.", min_size=1, max_size=8)
_PATTERN = st.lists(st.sampled_from(["a", "b", ".", "*", "**", "?", "**.*"]), min_size=1, max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(name=_NAME, pattern=_PATTERN)
def test_wildcards_match_like_confluents_own_matcher(name: str, pattern: str) -> None:
    """A second implementation: confluent-kafka's serializers decide which fields a
    metadata tag reaches, so ours must agree with theirs."""
    from confluent_kafka.schema_registry.wildcard_matcher import wildcard_match as confluent_match

    from streamproc.schema.annotations import wildcard_match

    assert wildcard_match(name, pattern) == confluent_match(name, pattern)


def test_policy_check_cli_reads_documents(tmp_path: Any) -> None:
    import json

    from click.testing import CliRunner

    from streamproc.cli.main import cli

    (tmp_path / "o.avsc").write_text(json.dumps({"schema": UNTAGGED_ORDER, "metadata": {"tags": EXTERNAL}}))
    pol = tmp_path / "p.yaml"
    pol.write_text("keys: {pseudonym: k}\naudiences:\n  a:\n    tags: {PUBLIC: keep, EMAIL: token, SSN: drop}\n")
    res = CliRunner().invoke(cli, ["policy", "check", "--schemas", str(tmp_path), "--policy", str(pol)])
    assert res.exit_code == 0, res.output  # before: 'email' neither classified nor public
    (tmp_path / "o.avsc").write_text(json.dumps(UNTAGGED_ORDER))
    res = CliRunner().invoke(cli, ["policy", "check", "--schemas", str(tmp_path), "--policy", str(pol)])
    assert res.exit_code == 1 and "'email' is neither classified" in res.output


def test_defaults_on_failure_applies_to_rules_that_do_not_set_it(shared_keys: PseudonymKeys) -> None:
    doc: dict[str, Any] = {"keys": {"pseudonym": "k"}, "defaults": {"on_failure": "quarantine"}, "audiences": {"a": {
        "tags": {"PC": {"op": "generalize", "until": " "}, "PC2": {"op": "generalize", "until": " ", "on_failure": "redact"},
                 "N": {"op": "generalize", "bucket": 10}}}}}
    aud = parse_policy(doc).audience("a")
    schema = record_schema({"name": "pc", "type": "string", "confluent:tags": ["PC"]},
                           {"name": "pc2", "type": "string", "confluent:tags": ["PC2"]},
                           {"name": "n", "type": "long", "confluent:tags": ["N"]})
    _, out = run(schema, aud, shared_keys, {"pc": "SW1A 1AA", "pc2": "EC1", "n": 42})
    assert out == {"pc": "SW1A", "pc2": "*", "n": 40}  # the rule's own redact wins over the default
    _, failed = run(schema, aud, shared_keys, {"pc": "SW1A1AA", "pc2": "EC1", "n": 42})
    assert failed == ("failed", "pc", Reason.INEFFECTIVE_TRANSFORM)
    doc["defaults"]["on_failure"] = "pass"
    with pytest.raises(PolicyError, match="on_failure must be redact or quarantine"):
        parse_policy(doc)
