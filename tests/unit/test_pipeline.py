"""Pipeline.process end to end (no Kafka): fan-out, provenance, quarantine, economy."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import io
import re
import struct
from typing import Any

import fastavro
import pytest

from streamproc.client import RecordOpener, RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto import envelope, provenance
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.provenance import H_PROVENANCE
from streamproc.crypto.pseudonym import make_tokenizer, siv_decrypt
from streamproc.errors import PolicyError, Reason
from streamproc.pipeline import core
from streamproc.pipeline.core import (
    BatchResult,
    Destination,
    InputRecord,
    Route,
    build_routes,
)
from streamproc.policy.model import parse_policy
from streamproc.schema.framing import frame
from tests.unit.conftest import (
    DESTINATIONS,
    LOGIN_SCHEMA,
    ORDER_SCHEMA,
    POLICY_FILE,
    Maker,
    PipelineKit,
    new_keyring,
)

TWO = (DESTINATIONS[0], DESTINATIONS[1])  # analytics + fraud
TOKEN_RE = re.compile(r"^tk1_[A-Za-z0-9_-]{22}$")


def sealers(kit: PipelineKit) -> tuple[RecordSealer, RecordSealer]:
    return (
        RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas),
        RecordSealer(kit.keyring, "logins-kek", "logins", LOGIN_SCHEMA, kit.schemas),
    )


def order(seed: int = 1, **over: Any) -> dict[str, Any]:
    rec = EventGenerator(seed).order()
    rec.update(over)
    return rec


def login(seed: int = 1, **over: Any) -> dict[str, Any]:
    rec = EventGenerator(seed).login()
    rec.update(over)
    return rec


def digest(kek_id: str) -> str:
    """How an unconfigured KEK id appears in details (recomputed here with hashlib)."""
    return "sha256:" + hashlib.sha256(kek_id.encode()).hexdigest()[:12]


def inp(topic: str, value: bytes | None, offset: int = 0, key: bytes | None = b"key-1", partition: int = 3) -> InputRecord:
    return InputRecord(topic, partition, offset, key, value, 1_700_000_000_000, (("h", b"v"),))


def headers(out: Any) -> dict[str, bytes]:
    h = dict(out.headers)
    assert len(h) == len(out.headers), "duplicate header"
    return h


def reasons(res: BatchResult) -> list[Reason]:
    return [q.reason for q in res.quarantined]


def single(kit: PipelineKit, rec: InputRecord) -> BatchResult:
    return kit.pipeline.process([rec])


# -- happy path ------------------------------------------------------------------------------


def test_fan_out_provenance_and_decoding(make_pipeline: Maker) -> None:
    kit = make_pipeline(routes=[Route(("orders", "logins"), TWO)])
    s_order, s_login = sealers(kit)
    orders = [order(i) for i in range(3)]
    logins = [login(i) for i in range(2)]
    batch = [inp("orders", s_order.seal(r), offset=10 + i) for i, r in enumerate(orders)]
    batch += [inp("logins", s_login.seal(r), offset=20 + i, partition=0) for i, r in enumerate(logins)]
    res = kit.pipeline.process(batch)
    assert res.quarantined == []
    assert len(res.outputs) == 5 * 2
    by_topic: dict[str, list[Any]] = {}
    for o in res.outputs:
        by_topic.setdefault(o.topic, []).append(o)
    assert sorted(by_topic) == ["sanitized.analytics", "sanitized.fraud"]
    assert all(len(v) == 5 for v in by_topic.values())

    opener = RecordOpener(kit.keyring, kit.schemas)
    refs: dict[tuple[str, int, int], set[str]] = {}
    for o in res.outputs:
        h = headers(o)
        src = o.source
        assert src in batch
        aud = "analytics" if o.topic.endswith("analytics") else "fraud"
        # one header: format, audience, policy version, output schema, pseudonym version, ref
        assert set(h) == {H_PROVENANCE}
        prov = provenance.parse_header(h[H_PROVENANCE])
        assert (prov.format, prov.audience, prov.policy_version, prov.key_version) == (
            1, aud, kit.policy.version, kit.keys.primary_version)
        assert prov.ref is not None
        # the reference resolves, with this audience's key only, to exactly this source record
        key = kit.keys.provenance_key(aud)[1]
        assert provenance.resolve_reference(key, prov.ref, ["logins", "orders"]) == (src.topic, src.partition, src.offset)
        other = kit.keys.provenance_key("fraud" if aud == "analytics" else "analytics")[1]
        with pytest.raises(provenance.ProvenanceError):
            provenance.resolve_reference(other, prov.ref, ["logins", "orders"])
        refs.setdefault((src.topic, src.partition, src.offset), set()).add(prov.ref)
        # the output opens with the audience's KEK and decodes with the registered output schema
        rs, decoded = opener.open(o.topic, o.value)
        assert prov.schema_id == rs.schema_id
        assert rs.json == kit.schemas.get(rs.schema_id).json
        assert envelope.parse_header(o.value).kek_id == f"{aud}-kek"
        if src.topic == "orders":
            _check_order(aud, orders[batch.index(src)], decoded, kit)
        else:
            _check_login(aud, logins[batch.index(src) - 3], decoded)
    # no two audiences share a reference to one source record: nothing to join them on
    assert len(refs) == 5 and all(len(r) == 2 for r in refs.values())
    assert res.stats.egress_records == {("sanitized.analytics", "analytics"): 5, ("sanitized.fraud", "fraud"): 5}
    # source KEKs the routes do not name are producer-chosen text: counted by digest
    assert res.stats.decryptions == {("orders", digest("orders-kek")): 3, ("logins", digest("logins-kek")): 2}
    assert res.stats.transforms["token"] > 0 and res.stats.quarantined == {}


def _check_order(aud: str, src: dict[str, Any], out: dict[str, Any], kit: PipelineKit) -> None:
    assert out["order_id"] == src["order_id"]  # PUBLIC: kept
    assert out["amount_cents"] == src["amount_cents"]
    assert out["items"] == src["items"]
    assert TOKEN_RE.match(out["customer_id"]) and out["customer_id"] != src["customer_id"]
    assert "street" not in out["shipping_address"] or aud == "fraud"
    if aud == "analytics":
        assert TOKEN_RE.match(out["email"])
        assert "card_number" not in out and "phone" not in out
        assert out["ip_address"] == ".".join(src["ip_address"].split(".")[:3]) + ".0/24"
        born = dt.date(1970, 1, 1) + dt.timedelta(days=src["birth_date"])
        assert out["birth_date"] == dt.date(born.year, 1, 1)
        assert out["shipping_address"]["postcode"] == src["shipping_address"]["postcode"].split(" ")[0]
        assert "street" not in out["shipping_address"]
    else:
        assert out["email"].startswith("de1_")
        _, key = kit.keys.siv_key("fraud")
        assert siv_decrypt(key, "EMAIL", out["email"]) == src["email"].strip().lower().encode()
        assert out["card_number"] == "*" * 12 + src["card_number"][-4:]
        assert out["ip_address"] == src["ip_address"]
        shift = (out["birth_date"] - (dt.date(1970, 1, 1) + dt.timedelta(days=src["birth_date"]))).days
        assert 1 <= abs(shift) <= 30
        assert out["shipping_address"]["street"] is None  # redact -> null
        assert out["shipping_address"]["postcode"] == src["shipping_address"]["postcode"]
        if src["phone"] is None:
            assert out["phone"] is None
        else:
            assert out["phone"] == "*" * (len(src["phone"]) - 2) + src["phone"][-2:]


def _check_login(aud: str, src: dict[str, Any], out: dict[str, Any]) -> None:
    assert out["event_id"] == src["event_id"]
    assert out["method"] == src["method"] and out["success"] == src["success"]
    assert out["risk_score"] == src["risk_score"]
    if aud == "analytics":
        assert all(TOKEN_RE.match(e) for e in out["recovery_emails"])
        assert len(out["recovery_emails"]) == len(src["recovery_emails"])
        if src["device"] is not None:
            assert out["device"]["user_agent"] == src["device"]["user_agent"]
            assert TOKEN_RE.match(out["device"]["device_id"])
            assert "geo" not in out["device"]
    else:
        assert [e.startswith("de1_") for e in out["recovery_emails"]] == [True] * len(src["recovery_emails"])
        if src["device"] is not None:
            assert out["device"]["device_id"] == src["device"]["device_id"]
            assert out["device"]["geo"] == {k: float(int(v // 1)) for k, v in src["device"]["geo"].items()}


def _customer_tokens(kit: PipelineKit) -> dict[tuple[str, str], str]:
    s_order, s_login = sealers(kit)
    res = kit.pipeline.process([
        inp("orders", s_order.seal(order(1, customer_id="cust-42")), key=b"cust-42"),
        inp("logins", s_login.seal(login(2, customer_id="cust-42")), key=b"cust-42"),
    ])
    opener = RecordOpener(kit.keyring, kit.schemas)
    out = {(o.source.topic, o.topic): opener.decode(o.topic, o.value)["customer_id"] for o in res.outputs}
    out.update({(o.source.topic, o.topic + "#key"): (o.key or b"").decode() for o in res.outputs})
    return out


def test_same_customer_joins_across_schemas_but_not_across_audiences(make_pipeline: Maker) -> None:
    """Point 8: tokens (field and record key) are per audience unless the policy shares."""
    kit = make_pipeline()
    tokens = _customer_tokens(kit)
    # streamproc.domain "customer" on both schemas: one token per audience, across schemas
    for aud in ("analytics", "fraud"):
        assert tokens[("orders", f"sanitized.{aud}")] == tokens[("logins", f"sanitized.{aud}")]
    assert tokens[("orders", "sanitized.analytics")] != tokens[("orders", "sanitized.fraud")]
    assert tokens[("orders", "sanitized.analytics#key")] != tokens[("orders", "sanitized.fraud#key")]
    assert tokens[("orders", "sanitized.support")] == "cust-42"  # support keeps CUSTOMER_ID


def test_shared_domain_joins_only_the_named_audiences(make_pipeline: Maker) -> None:
    import yaml

    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["keys"]["shared_domains"] = {"customer": ["analytics", "fraud"]}
    kit = make_pipeline(policy_obj=parse_policy(raw, "shared.yaml"))
    tokens = _customer_tokens(kit)
    shared = {tokens[(s, f"sanitized.{a}")] for s in ("orders", "logins") for a in ("analytics", "fraud")}
    assert len(shared) == 1 and TOKEN_RE.match(shared.pop())
    # the record-key domain is not shared: those tokens stay per audience
    assert tokens[("orders", "sanitized.analytics#key")] != tokens[("orders", "sanitized.fraud#key")]


# -- tombstones and record keys ---------------------------------------------------------------


KEY_POLICY = """
keys: {pseudonym: pseudonym-master}
audiences:
  keeper: {record_key: keep, tags: {PUBLIC: keep}}
  tokener: {record_key: token, tags: {PUBLIC: keep}}
  dropper: {record_key: drop, tags: {PUBLIC: keep}}
  custom: {record_key: {op: token, domain: accounts}, tags: {PUBLIC: keep}}
"""


def _key_kit(make_pipeline: Maker) -> PipelineKit:
    import yaml

    pol = parse_policy(yaml.safe_load(KEY_POLICY), "keys.yaml")
    dests = tuple(Destination(f"out.{a}", a, "analytics-kek") for a in ("keeper", "tokener", "dropper", "custom"))
    return make_pipeline(routes=[Route(("orders",), dests)], policy_obj=pol)


def test_record_key_keep_token_drop(make_pipeline: Maker) -> None:
    kit = _key_kit(make_pipeline)
    s_order, _ = sealers(kit)
    v = s_order.seal(order())
    res = kit.pipeline.process([inp("orders", v, key=b"cust-42"), inp("orders", v, 1, key=b"cust-42"), inp("orders", v, 2, key=None)])
    keys = {(o.topic, o.source.offset): o.key for o in res.outputs}
    assert keys[("out.keeper", 0)] == b"cust-42"
    assert keys[("out.dropper", 0)] is None
    tok = keys[("out.tokener", 0)]
    assert tok is not None and TOKEN_RE.match(tok.decode())
    assert keys[("out.tokener", 1)] == tok  # deterministic: partitioning by key survives
    expected = make_tokenizer(*kit.keys.token_key("record_key", audience="tokener"))(b"cust-42").encode()
    assert tok == expected
    custom = make_tokenizer(*kit.keys.token_key("accounts", audience="custom"))(b"cust-42").encode()
    assert keys[("out.custom", 0)] == custom != tok
    assert all(keys[(t, 2)] is None for t in ("out.keeper", "out.tokener", "out.dropper", "out.custom"))


def test_tombstones_are_forwarded_with_transformed_keys(make_pipeline: Maker) -> None:
    kit = _key_kit(make_pipeline)
    res = kit.pipeline.process([inp("orders", None, offset=9, key=b"cust-42")])
    assert res.quarantined == []
    assert res.stats.tombstones == 1
    assert sorted(o.topic for o in res.outputs) == ["out.custom", "out.dropper", "out.keeper", "out.tokener"]
    for o in res.outputs:
        assert o.value is None
        prov = provenance.parse_header(headers(o)[H_PROVENANCE])
        assert prov.policy_version == kit.policy.version and prov.schema_id is None
        assert prov.audience == o.topic[4:] and prov.ref is not None
        key = kit.keys.provenance_key(prov.audience)[1]
        assert provenance.resolve_reference(key, prov.ref, ["orders"]) == ("orders", 3, 9)
    keys = {o.topic: o.key for o in res.outputs}
    assert keys["out.keeper"] == b"cust-42" and keys["out.dropper"] is None
    assert keys["out.tokener"] == make_tokenizer(*kit.keys.token_key("record_key", audience="tokener"))(b"cust-42").encode()
    assert kit.kms.calls["unwrap"] == 0 and kit.kms.calls["generate_data_key"] == 0  # nothing to open or seal


# -- quarantine: every reason, through process --------------------------------------------------


def _reseal(s: RecordSealer, plaintext: bytes) -> bytes:
    return s.sealer.seal(plaintext)


def test_quarantine_envelope_reasons(make_pipeline: Maker, tmp_path: Any) -> None:
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    good = s_order.seal(order())
    tampered = bytearray(good)
    tampered[-5] ^= 1
    rogue = new_keyring(tmp_path / "rogue")
    rogue.create_key("rogue-kek")
    unknown = RecordSealer(rogue, "rogue-kek", "orders", ORDER_SCHEMA, kit.schemas).seal(order())
    cases = [
        (b"", Reason.MALFORMED),
        (b"\x01", Reason.MALFORMED),
        (good[:30], Reason.MALFORMED),
        (b"\x02" + good[1:], Reason.UNSUPPORTED_VERSION),
        (b"\x00" + good[1:], Reason.UNSUPPORTED_VERSION),
        (bytes(tampered), Reason.TAMPERED),
        (unknown, Reason.UNKNOWN_KEY),
    ]
    res = kit.pipeline.process([inp("orders", v, offset=i) for i, (v, _) in enumerate(cases)])
    assert res.outputs == []
    assert reasons(res) == [r for _, r in cases]
    assert res.stats.quarantined[Reason.MALFORMED] == 3
    for q, (v, _) in zip(res.quarantined, cases, strict=True):
        assert q.record.value is v  # the original bytes, for the dead-letter topic
    # wrong topic: sealed for orders, consumed from logins (both are routed)
    res = kit.pipeline.process([inp("logins", good)])
    assert reasons(res) == [Reason.WRONG_TOPIC]
    # orders-kek is not named by the routes: producer-chosen text, shown as a digest
    assert res.quarantined[0].detail == f"key {digest('orders-kek')} v1; sealed for another topic"


def test_quarantine_key_revoked(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    old = s_order.seal(order())
    kit.keyring.rotate("orders-kek")
    kit.keyring.revoke("orders-kek", 1)
    res = single(kit, inp("orders", old))
    assert reasons(res) == [Reason.KEY_REVOKED]
    assert res.quarantined[0].detail == f"key {digest('orders-kek')} v1"
    s_new = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    assert single(kit, inp("orders", s_new.seal(order()))).quarantined == []


def test_quarantine_oversized(make_pipeline: Maker) -> None:
    kit = make_pipeline(max_record_bytes=200)
    s_order, _ = sealers(kit)
    big = s_order.seal(order())
    assert len(big) > 200
    res = single(kit, inp("orders", big))
    assert reasons(res) == [Reason.OVERSIZED]
    assert res.quarantined[0].detail == f"{len(big)} bytes > limit 200"
    assert kit.kms.calls["unwrap"] == 0  # refused before any KMS call


def test_quarantine_payload_reasons(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    plain = s_order.encode(order())
    cases = [
        (frame(999_999, plain[5:]), Reason.UNKNOWN_SCHEMA, "schema id 999999"),
        (plain[:5] + b"\xff\xfe garbage \x00\x01" * 3, Reason.BAD_PAYLOAD, f"Avro does not match schema id {s_order.schema_id}"),
        (b'{"order_id": "not framed"}', Reason.BAD_PAYLOAD, "plaintext is not Confluent-framed"),
        (b"\x00\x00", Reason.BAD_PAYLOAD, "plaintext is not Confluent-framed"),
        (s_order.encode(order(ip_address="not-an-ip")), Reason.TRANSFORM_FAILED, "field ip_address"),
    ]
    res = kit.pipeline.process([inp("orders", _reseal(s_order, p), offset=i) for i, (p, _, _) in enumerate(cases)])
    assert res.outputs == []
    assert [(q.reason, q.detail) for q in res.quarantined] == [(r, d) for _, r, d in cases]


def test_quarantine_unsupported_schema_and_no_route(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    odd = copy.deepcopy(ORDER_SCHEMA)
    odd["name"] = "OddOrder"
    odd["fields"][5] = {"name": "birth_date", "type": "string", "confluent:tags": ["PII", "BIRTH_DATE"]}
    s_odd = RecordSealer(kit.keyring, "orders-kek", "orders", odd, kit.schemas)
    rec = order(birth_date="1980-01-01")
    res = kit.pipeline.process([inp("orders", s_odd.seal(rec)), inp("audit", s_odd.seal(rec))])
    assert reasons(res) == [Reason.UNSUPPORTED_SCHEMA, Reason.NO_ROUTE]
    detail = res.quarantined[0].detail
    assert detail.startswith(f"schema id {s_odd.schema_id} -> sanitized.analytics: ")
    assert "field 'birth_date', tag 'BIRTH_DATE': generalize does not apply to Avro type 'string'" in detail
    assert res.quarantined[1].detail == "topic 'audit' has no route"
    assert res.outputs == []


def test_all_or_nothing_across_audiences(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    # an invalid IP fails only analytics (cidr); fraud keeps it and support drops it
    batch = [
        inp("orders", s_order.seal(order(1)), offset=0),
        inp("orders", s_order.seal(order(2, ip_address="999.1.1.1")), offset=1),
        inp("orders", s_order.seal(order(3)), offset=2),
    ]
    res = kit.pipeline.process(batch)
    assert [(q.record.offset, q.reason) for q in res.quarantined] == [(1, Reason.TRANSFORM_FAILED)]
    assert sorted((o.source.offset, o.topic) for o in res.outputs) == [
        (off, t.topic) for off in (0, 2) for t in sorted(DESTINATIONS, key=lambda d: d.topic)
    ]
    assert res.stats.egress_records == {(d.topic, d.audience): 2 for d in DESTINATIONS}


# -- economy: plans and KMS ----------------------------------------------------------------------


def test_plans_compiled_once_per_schema_and_destination(make_pipeline: Maker, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    builds: list[str] = []
    real_compile, real_build = core.compile_plan, core.build_plan

    def counting_compile(plan: Any, schema: Any, **kw: Any) -> Any:
        calls.append(f"{schema.fullname}/{plan.audience}")
        return real_compile(plan, schema, **kw)

    def counting_build(schema: Any, audience: Any, keys: Any, erasure: Any = None) -> Any:
        builds.append(f"{schema.fullname}/{audience.name}")
        return real_build(schema, audience, keys, erasure)

    monkeypatch.setattr(core, "compile_plan", counting_compile)
    monkeypatch.setattr(core, "build_plan", counting_build)
    kit = make_pipeline()
    s_order, s_login = sealers(kit)
    odd = copy.deepcopy(ORDER_SCHEMA)
    odd["name"] = "OddOrder"
    odd["fields"][5] = {"name": "birth_date", "type": "string", "confluent:tags": ["PII", "BIRTH_DATE"]}
    s_odd = RecordSealer(kit.keyring, "orders-kek", "orders", odd, kit.schemas)
    for _ in range(3):
        batch = [inp("orders", s_order.seal(order(i)), offset=i) for i in range(4)]
        batch += [inp("logins", s_login.seal(login(i)), offset=i) for i in range(4)]
        batch.append(inp("orders", s_odd.seal(order(9, birth_date="x")), offset=99))
        res = kit.pipeline.process(batch)
        assert len(res.outputs) == 8 * 3 and reasons(res) == [Reason.UNSUPPORTED_SCHEMA]
    assert sorted(calls) == sorted(
        f"{s}/{a}" for s in ("com.acme.shop.OrderPlaced", "com.acme.identity.UserLoggedIn")
        for a in ("analytics", "fraud", "support")
    )
    # the refused schema is refused once, then remembered (not rebuilt per record)
    assert builds.count("com.acme.shop.OddOrder/analytics") == 1
    # reset_plans forgets them (key rotation, schema change)
    kit.pipeline.reset_plans()
    kit.pipeline.process([inp("orders", s_order.seal(order()))])
    assert len(calls) == 6 + 3


def test_kms_called_once_per_data_key(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, s_login = sealers(kit)
    batch1 = [inp("orders", v, offset=i) for i, v in enumerate(s_order.sealer.seal_many([s_order.encode(order(i)) for i in range(20)]))]
    batch1 += [inp("logins", s_login.seal(login(i)), offset=i) for i in range(5)]
    res = kit.pipeline.process(batch1)
    assert len(res.outputs) == 25 * 3
    # one unwrap per producer data key (one per source topic), one data key per destination
    assert kit.kms.calls["unwrap"] == 2
    assert kit.kms.calls["generate_data_key"] == 3
    res = kit.pipeline.process([inp("orders", s_order.seal(order(i)), offset=100 + i) for i in range(10)])
    assert len(res.outputs) == 30
    assert kit.kms.calls["unwrap"] == 2 and kit.kms.calls["generate_data_key"] == 3
    # a new producer data key costs exactly one more unwrap
    s_order.sealer.rotate()
    kit.pipeline.process([inp("orders", s_order.seal(order(i)), offset=200 + i) for i in range(5)])
    assert kit.kms.calls["unwrap"] == 3 and kit.kms.calls["generate_data_key"] == 3
    # outputs of one destination share its data key (same wrapped key in every envelope)
    fraud = [o.value for o in res.outputs if o.topic == "sanitized.fraud"]
    assert len({v[: v.index(b"fraud-kek") + 9 + 4 + 2 + 60] for v in fraud}) == 1


def test_envelope_kek_version_follows_rotation(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    kit.keyring.rotate("fraud-kek")
    res = single(kit, inp("orders", s_order.seal(order())))
    versions = {o.topic: envelope.parse_header(o.value).kek_version for o in res.outputs}
    assert versions == {"sanitized.analytics": 1, "sanitized.fraud": 2, "sanitized.support": 1}
    opener = RecordOpener(kit.keyring, kit.schemas)
    for o in res.outputs:
        opener.decode(o.topic, o.value)


# -- caller data ------------------------------------------------------------------------------


def test_inputs_are_not_mutated(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, s_login = sealers(kit)
    batch = [inp("orders", s_order.seal(order(i)), offset=i) for i in range(3)]
    batch += [inp("logins", s_login.seal(login(1))), inp("orders", None), inp("nowhere", b"x"),
              inp("orders", s_order.seal(order(5, ip_address="bad")))]
    snapshot = copy.deepcopy(batch)
    values = [bytes(r.value) if r.value is not None else None for r in batch]
    ids = [id(r) for r in batch]
    res = kit.pipeline.process(batch)
    assert len(res.outputs) == 4 * 3 + 3 and len(res.quarantined) == 2
    assert batch == snapshot
    assert [id(r) for r in batch] == ids
    assert [r.value for r in batch] == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch[0].value = b"other"  # type: ignore[misc]
    # outputs point at the very input objects (no copies), and are fresh objects themselves
    assert all(any(o.source is r for r in batch) for o in res.outputs)
    assert all(o.value is not r.value for o in res.outputs for r in batch if o.value is not None)
    # a generator works as well as a list
    res2 = kit.pipeline.process(r for r in snapshot[:2])
    assert len(res2.outputs) == 6


# -- configuration -------------------------------------------------------------------------------


def test_build_routes_and_route_validation(make_pipeline: Maker) -> None:
    routes = build_routes([{"sources": ["orders"], "destinations": [{"topic": "a", "audience": "fraud", "kek": "fraud-kek"}]},
                           {"source": "logins", "destinations": [{"topic": "a", "audience": "fraud", "kek": "fraud-kek"}]}])
    assert routes[1].sources == ("logins",)
    kit = make_pipeline(routes=routes)
    assert kit.pipeline.source_topics == ["orders", "logins"]
    assert kit.pipeline.destinations == [Destination("a", "fraud", "fraud-kek")]
    with pytest.raises(PolicyError, match=r"pipeline #1: needs 'sources'"):
        build_routes({"destinations": []})
    with pytest.raises(PolicyError, match=r"pipeline #1: needs at least one destination"):
        build_routes({"sources": ["x"]})
    with pytest.raises(PolicyError, match=r"configured twice with different settings"):
        make_pipeline(routes=[Route(("x",), (Destination("a", "fraud", "fraud-kek"), Destination("a", "support", "support-kek")))])
    with pytest.raises(PolicyError, match=r"'a' is both a source and a destination"):
        make_pipeline(routes=[Route(("x",), (Destination("a", "fraud", "fraud-kek"),)), Route(("a",), (Destination("b", "fraud", "fraud-kek"),))])
    with pytest.raises(PolicyError, match=r"no audience 'marketing'"):
        make_pipeline(routes=[Route(("x",), (Destination("m", "marketing", "fraud-kek"),))])


def test_explain_returns_the_registered_output_schema(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    schema, out_id = kit.pipeline.explain(s_order.schema_id, "sanitized.analytics")
    names = [f["name"] for f in schema["fields"]]
    assert "card_number" not in names and "phone" not in names and "email" in names
    email = next(f for f in schema["fields"] if f["name"] == "email")
    assert email["streamproc.transform"] == "token" and email["type"] == "string"
    assert kit.schemas.get(out_id).json == schema
    fastavro.parse_schema(schema)


def test_decoding_outputs_with_fastavro_directly(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    """A subscriber without streamproc: unframe, then fastavro with the registered schema."""
    kit = make_pipeline()
    s_order, _ = sealers(kit)
    res = single(kit, inp("orders", s_order.seal(order(4))))
    opener = RecordOpener(keyring, kit.schemas)
    for o in res.outputs:
        plain = opener.opener.open(o.topic, o.value).plaintext
        assert plain[0] == 0
        (sid,) = struct.unpack(">I", plain[1:5])
        rec = fastavro.schemaless_reader(io.BytesIO(plain[5:]), fastavro.parse_schema(kit.schemas.get(sid).json), None)
        assert rec["order_id"] == order(4)["order_id"]


def _linked(with_secret: bool) -> dict[str, Any]:
    fields: list[dict[str, Any]] = [{"name": "v", "type": "long", "confluent:tags": ["PUBLIC"]}]
    if with_secret:
        fields.append({"name": "secret", "type": "string", "confluent:tags": ["EMAIL"]})
    fields.append({"name": "next", "type": ["null", "Node"], "default": None})
    return {"type": "record", "name": "Node" if with_secret else "Plain", "namespace": "ll", "fields": fields}


@pytest.mark.parametrize("with_secret", [False, True], ids=["kept-structure", "tokenized-field"])
@pytest.mark.parametrize("depth", [5, 5000])
def test_deeply_nested_recursive_record_is_quarantined_not_a_crash(make_pipeline: Maker, depth: int, with_secret: bool) -> None:
    """Valid Avro nested deeper than Python's stack must not take the batch down."""
    kit = make_pipeline()
    schema = _linked(with_secret)
    if not with_secret:
        schema["fields"][1]["type"] = ["null", "Plain"]
    s = RecordSealer(kit.keyring, "orders-kek", "orders", schema, kit.schemas)
    # written by hand (fastavro's writer recurses as well): v=1, [secret="x"], next=branch 1 ...
    item = b"\x02\x02x" if with_secret else b"\x02"
    body = (item + b"\x02") * depth + item + b"\x00"
    good = sealers(kit)[0].seal(order(1))  # a normal record in the same batch still goes through
    res = kit.pipeline.process([inp("orders", s.sealer.seal(s._prefix + body)), inp("orders", good, 1)])
    if depth == 5:
        assert res.quarantined == [] and len(res.outputs) == 6
        decoded = RecordOpener(kit.keyring, kit.schemas).decode("sanitized.analytics", res.outputs[0].value)
        assert decoded["v"] == 1 and decoded["next"]["v"] == 1
        assert not with_secret or decoded["secret"].startswith("tk1_")
    else:
        # where the stack runs out decides the class: in a skip (bad_payload) or inside an
        # operator call (transform_failed); either way it is quarantined, not a crash
        assert [q.record.offset for q in res.quarantined] == [0]
        assert res.quarantined[0].reason in (Reason.BAD_PAYLOAD, Reason.TRANSFORM_FAILED)
        assert sorted(o.source.offset for o in res.outputs) == [1, 1, 1]


# -- stages: open+transform, then seal ---------------------------------------------------------


def test_interleaved_schemas_keep_input_order_and_count_like_single_records(make_pipeline: Maker) -> None:
    """Stage 1 queues outputs per destination with alternating plans; stage 2 seals them
    in input order and counts transforms per run: the batch must agree, per destination
    and counter, with the same records processed one by one."""
    kit = make_pipeline(routes=[Route(("orders", "logins"), TWO)])
    s_order, s_login = sealers(kit)
    batch = []
    for i in range(9):  # order, order, login, order, order, login, ... plus failures
        if i % 3 == 2:
            batch.append(inp("logins", s_login.seal(login(i)), offset=i, partition=0))
        else:
            batch.append(inp("orders", s_order.seal(order(i)), offset=i))
    batch.insert(4, inp("orders", b"\x01garbage", offset=100))
    batch.insert(7, inp("orders", None, offset=101))  # tombstone
    res = kit.pipeline.process(batch)
    assert reasons(res) == [Reason.MALFORMED]
    # tombstones first, then each destination's outputs in input order
    assert [(o.topic, o.source.offset, o.value is None) for o in res.outputs[:2]] == [
        ("sanitized.analytics", 101, True), ("sanitized.fraud", 101, True),
    ]
    for dest in ("sanitized.analytics", "sanitized.fraud"):
        got = [o.source.offset for o in res.outputs[2:] if o.topic == dest]
        assert got == list(range(9))
    assert [o.topic for o in res.outputs[2:]] == ["sanitized.analytics"] * 9 + ["sanitized.fraud"] * 9
    transforms: dict[str, int] = {}
    egress: dict[tuple[str, str], int] = {}
    for rec in batch:
        one = kit.pipeline.process([rec]).stats
        for op, n in one.transforms.items():
            transforms[op] = transforms.get(op, 0) + n
        for k, n in one.egress_records.items():
            egress[k] = egress.get(k, 0) + n
    assert res.stats.transforms == transforms and sum(transforms.values()) > 0
    assert res.stats.egress_records == egress == {("sanitized.analytics", "analytics"): 9, ("sanitized.fraud", "fraud"): 9}
    opener = RecordOpener(kit.keyring, kit.schemas)
    for o in res.outputs[2:]:
        assert opener.decode(o.topic, o.value)  # sealed under the destination's key
