"""Per-subject privacy budgets through Pipeline.process (no Kafka).

Expected counts come from the policy's numbers, not from the accountant: a subject whose
records each cost ``COST`` (the sum of the audience's DP epsilons) under a budget
``BUDGET`` gets ``floor(BUDGET / COST)`` records with noised values, and every later one
with its DP fields null.  Changelog keys are checked against an independent HKDF + HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import CollectorRegistry

from streamproc.client import RecordOpener, RecordSealer
from streamproc.crypto.envelope import Opener
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.observability.metrics import KnownLabels, Metrics
from streamproc.pipeline.core import BatchResult, Destination, InputRecord, Pipeline, Route
from streamproc.pipeline.plan import build_plan
from streamproc.policy.model import parse_policy
from streamproc.privacy.budget import SubjectState
from streamproc.schema import avro
from streamproc.schema.registry import CachingSchemaSource
from tests.unit.conftest import PSEUDONYM

BUDGET = 2.5
AMOUNT_EPS, SCORE_EPS = 1.0, 0.25
COST = AMOUNT_EPS + SCORE_EPS  # two noised fields per record: two releases
RELEASES = math.floor(BUDGET / COST + 1e-9)  # per subject and window: 2
TOPIC = "app.budget-changelog"

SCHEMA = {
    "type": "record", "name": "Visit", "namespace": "t", "fields": [
        {"name": "customer_id", "type": "string", "confluent:tags": ["CUSTOMER_ID"], "streamproc.subject": True},
        {"name": "coupon", "type": ["null", "string"], "default": None},
        {"name": "amount", "type": "double", "confluent:tags": ["AMOUNT"]},
        {"name": "score", "type": ["null", "int"], "default": None, "confluent:tags": ["SCORE"]},
        {"name": "country", "type": "string"},
    ],
}  # fmt: skip


def raw_policy(**analytics: Any) -> dict[str, Any]:
    return {
        "keys": {"pseudonym": PSEUDONYM},
        "audiences": {
            "analytics": {
                "record_key": "drop", "untagged": "keep",
                "tags": {
                    "CUSTOMER_ID": "token",
                    "AMOUNT": {"op": "dp_noise", "mechanism": "laplace", "epsilon": AMOUNT_EPS, "bounds": [0, 1000]},
                    "SCORE": {"op": "dp_noise", "mechanism": "geometric", "epsilon": SCORE_EPS, "bounds": [0, 10]},
                },
                "budget": {"epsilon": BUDGET, "window": "1d"},
                **analytics,
            },
            "ops": {"record_key": "drop", "untagged": "keep", "tags": {"CUSTOMER_ID": "token", "AMOUNT": "keep", "SCORE": "keep"}},
        },
    }  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Kit:
    def __init__(self, keyring: LocalKeyring, schemas: CachingSchemaSource, clock: Clock | None = None, **analytics: Any) -> None:
        for kek in ("visits-kek", "analytics-kek", "ops-kek"):
            keyring.ensure_key(kek)
        self.keyring, self.schemas = keyring, schemas
        self.keys = PseudonymKeys(keyring, PSEUDONYM)
        self.policy = parse_policy(raw_policy(**analytics))
        self.clock = clock or Clock()
        self.pipeline = self.build()
        self.sealer = RecordSealer(keyring, "visits-kek", "visits", SCHEMA, schemas)
        self.opener = RecordOpener(keyring, schemas)
        self.offset = 0

    def build(self, **over: Any) -> Pipeline:
        dests = (Destination("analytics.visits", "analytics", "analytics-kek"), Destination("ops.visits", "ops", "ops-kek"))
        kwargs: dict[str, Any] = dict(
            routes=[Route(("visits",), dests)], policy=self.policy, opener=Opener.for_kms(self.keyring),
            kms=self.keyring, schemas=self.schemas, keys=self.keys, budget_topic=TOPIC, budget_clock=self.clock,
        )  # fmt: skip
        kwargs.update(over)
        return Pipeline(**kwargs)

    def records(self, subjects: list[str | None], partition: int = 0) -> list[InputRecord]:
        out = []
        for s in subjects:
            rec = {"customer_id": s or "", "coupon": s, "amount": 12.5, "score": 3, "country": "FR"}
            out.append(InputRecord("visits", partition, self.offset, None, self.sealer.seal(rec)))
            self.offset += 1
        return out

    def decoded(self, result: BatchResult, topic: str) -> list[dict[str, Any]]:
        return [self.opener.open(o.topic, o.value)[1] for o in result.outputs if o.topic == topic]


@pytest.fixture
def kit(keyring: LocalKeyring, schemas: CachingSchemaSource) -> Kit:
    return Kit(keyring, schemas)


def released(rows: list[dict[str, Any]]) -> list[bool]:
    """Per output row: were its DP fields released (both non-null) or suppressed (both null)?"""
    out = []
    for r in rows:
        assert (r["amount"] is None) == (r["score"] is None)
        out.append(r["amount"] is not None)
    return out


def expected_key(keyring: LocalKeyring, audience: str, subject: bytes) -> bytes:
    """``audience NUL HMAC-SHA256(HKDF(master, 'streamproc/budget/v1', audience), subject)[:16]``."""
    _v, master = keyring.get_secret(PSEUDONYM)
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"streamproc/budget/v1", info=audience.encode()).derive(master)
    return audience.encode() + b"\x00" + hmac.new(k, subject, hashlib.sha256).digest()[:16]


def test_a_subject_gets_its_budget_then_null_dp_fields(kit: Kit) -> None:
    subjects = ["alice"] * 5 + ["bob"] + ["alice"]
    res = kit.pipeline.process(kit.records(subjects))
    assert res.quarantined == []
    rows = kit.decoded(res, "analytics.visits")
    alice = [ok for s, ok in zip(subjects, released(rows), strict=True) if s == "alice"]
    assert alice == [True] * RELEASES + [False] * (6 - RELEASES)
    assert released(rows)[subjects.index("bob")] is True  # bob has a budget of his own
    # non-DP fields are untouched, suppressed or not; the audience without a budget sees all
    assert all(r["country"] == "FR" and r["customer_id"].startswith("tk1_") for r in rows)
    assert [r["amount"] for r in kit.decoded(res, "ops.visits")] == [12.5] * len(subjects)
    assert res.stats.dp_suppressed == {("analytics", "exhausted"): 6 - RELEASES}
    # ... and the metric keeps the reason (a closed label set: not folded into _other)
    m = Metrics(registry=CollectorRegistry(), known=KnownLabels.of(audiences=["analytics"]))
    m.batch_processed(res.stats, len(subjects), 0.01)
    samples = {
        (s.labels["audience"], s.labels["reason"]): s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "streamproc_dp_budget_suppressed_total"
    }
    assert samples == {("analytics", "exhausted"): 6 - RELEASES}
    # the next batch: still spent (the state is kept between batches)
    rows2 = kit.decoded(kit.pipeline.process(kit.records(["alice", "bob"])), "analytics.visits")
    assert released(rows2) == [False, RELEASES > 1]


def test_output_schema_is_nullable_and_says_noised(kit: Kit) -> None:
    res = kit.pipeline.process(kit.records(["carol"] * (RELEASES + 1)))
    ids = {kit.opener.open(o.topic, o.value)[0].schema_id for o in res.outputs if o.topic == "analytics.visits"}
    assert len(ids) == 1  # released and suppressed records share one output schema
    out = kit.schemas.get(ids.pop()).json
    fields = {f["name"]: f for f in out["fields"]}
    assert fields["amount"]["type"] == ["null", "double"] and fields["amount"]["default"] is None
    assert fields["score"]["type"] == ["null", "int"]
    assert fields["amount"]["streamproc.dp"]["mechanism"] == "laplace"
    assert fields["amount"]["streamproc.dp"]["epsilon"] == AMOUNT_EPS
    assert fields["score"]["streamproc.dp"]["epsilon"] == SCORE_EPS
    assert fields["country"]["type"] == "string"


def test_changelog_writes_are_keyed_by_token_on_the_input_partition(kit: Kit) -> None:
    res = kit.pipeline.process(kit.records(["alice"] * 3, partition=4) + kit.records(["bob"], partition=1))
    writes = {(w.partition, w.key): w for w in res.state_writes}
    assert set(writes) == {(4, expected_key(kit.keyring, "analytics", b"alice")), (1, expected_key(kit.keyring, "analytics", b"bob"))}
    for w in writes.values():
        assert w.topic == TOPIC and w.value is not None
        assert b"alice" not in w.key + w.value and b"bob" not in w.key + w.value
    alice = SubjectState.from_bytes(writes[(4, expected_key(kit.keyring, "analytics", b"alice"))].value or b"")
    assert alice.spent().epsilon == pytest.approx(RELEASES * COST)
    assert {w.key for w in kit.pipeline.process(kit.records(["alice"], partition=4)).state_writes} == set()  # refused: no change


def test_a_redone_batch_is_charged_once(kit: Kit) -> None:
    book = kit.pipeline.budgets
    assert book is not None and kit.pipeline.state_stores == [book]
    book.begin(1)
    first = kit.pipeline.process(kit.records(["erin"]))
    book.committed(1)
    batch = kit.records(["erin"] * 3)
    book.begin(2)
    attempt = released(kit.decoded(kit.pipeline.process(batch), "analytics.visits"))
    book.rollback()  # the transaction aborted
    book.begin(3)
    redo = released(kit.decoded(kit.pipeline.process(batch), "analytics.visits"))
    assert attempt == redo == [True] * (RELEASES - 1) + [False] * (3 - RELEASES + 1)
    book.discard(3)  # a transient failure: the attempt is undone alone
    book.begin(4)
    again = kit.pipeline.process(batch)
    assert released(kit.decoded(again, "analytics.visits")) == redo
    assert released(kit.decoded(first, "analytics.visits")) == [True]


def test_restored_state_keeps_the_spend_and_drop_forgets_it(kit: Kit, keyring: LocalKeyring, schemas: CachingSchemaSource) -> None:
    res = kit.pipeline.process(kit.records(["frank"] * RELEASES, partition=2))
    successor = Kit(keyring, schemas, kit.clock)  # another worker (or a restart)
    for w in res.state_writes:
        assert w.partition is not None
        successor.pipeline.state_stores[0].restore(w.partition, w.key, w.value)
    assert released(successor.decoded(successor.pipeline.process(successor.records(["frank"], partition=2)), "analytics.visits")) == [False]
    successor.pipeline.state_stores[0].drop(2)
    assert released(successor.decoded(successor.pipeline.process(successor.records(["frank"], partition=2)), "analytics.visits")) == [True]
    # a malformed changelog value is an error, never a reset budget
    with pytest.raises(ValueError):
        successor.pipeline.state_stores[0].restore(2, expected_key(keyring, "analytics", b"x"), b"\x01garbage")


def test_partitions_account_separately(kit: Kit) -> None:
    """Inputs not keyed by subject: each partition that sees a subject has its own state
    (the documented over-release bound: the budget once per such partition)."""
    res = kit.pipeline.process(kit.records(["gina"] * 3, partition=0) + kit.records(["gina"] * 3, partition=1))
    flags = released(kit.decoded(res, "analytics.visits"))
    assert flags == ([True] * RELEASES + [False] * (3 - RELEASES)) * 2


def test_expired_states_become_tombstones(kit: Kit) -> None:
    kit.pipeline.process(kit.records(["hana"] * RELEASES))
    kit.clock.t += 86_400 + 2 * 3600  # the window (and one slice) later
    res = kit.pipeline.process(kit.records(["ivan"]))
    tomb = [w for w in res.state_writes if w.value is None]
    assert [w.key for w in tomb] == [expected_key(kit.keyring, "analytics", b"hana")]
    assert released(kit.decoded(kit.pipeline.process(kit.records(["hana"])), "analytics.visits")) == [True]


def test_no_subject_value_fails_closed(keyring: LocalKeyring, schemas: CachingSchemaSource) -> None:
    kit = Kit(keyring, schemas, subject="coupon")  # a nullable subject field
    res = kit.pipeline.process(kit.records([None, "jo"]))
    assert released(kit.decoded(res, "analytics.visits")) == [False, True]
    assert res.stats.dp_suppressed == {("analytics", "no_subject"): 1}
    m = Metrics(registry=CollectorRegistry(), known=KnownLabels.of(audiences=["analytics"]))
    m.batch_processed(res.stats, 2, 0.01)
    samples = {
        (s.labels["audience"], s.labels["reason"]): s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "streamproc_dp_budget_suppressed_total"
    }
    assert samples == {("analytics", "no_subject"): 1}


def test_a_budget_needs_tokens_and_a_changelog(kit: Kit) -> None:
    with pytest.raises(PolicyError, match="changelog topic"):
        kit.build(budget_topic=None)
    with pytest.raises(PolicyError, match=r"keys\.pseudonym"):
        kit.build(keys=None)


def test_a_schema_whose_record_cost_exceeds_the_budget_is_refused(keys: PseudonymKeys) -> None:
    """Each rule fits the budget, the record does not: nothing could ever be released."""
    over = BUDGET - AMOUNT_EPS + 0.1  # SCORE's epsilon, so that AMOUNT + SCORE > BUDGET
    pol = raw_policy()
    pol["audiences"]["analytics"]["tags"]["SCORE"]["epsilon"] = over
    with pytest.raises(PolicyError, match="more than the whole budget"):
        build_plan(avro.parse(SCHEMA), parse_policy(pol).audience("analytics"), keys)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"name": "xs", "type": {"type": "array", "items": "double"}, "confluent:tags": ["AMOUNT"]}, "array or map"),
        ({"name": "u", "type": ["int", "double"], "confluent:tags": ["AMOUNT"]}, "needs a null branch"),
        ({"name": "rs", "type": {"type": "array", "items": {"type": "record", "name": "I", "fields": [
            {"name": "v", "type": "double", "confluent:tags": ["AMOUNT"]}]}}}, "inside an array"),
    ],
)  # fmt: skip
def test_plans_refuse_dp_values_a_budget_cannot_count(field: dict[str, Any], message: str) -> None:
    schema = avro.parse({"type": "record", "name": "R", "fields": [field]})
    aud = parse_policy(raw_policy()).audience("analytics")
    with pytest.raises(PolicyError, match=message):
        build_plan(schema, aud, None)


def test_config_names_the_changelog_and_acls_grant_it(tmp_path: Path) -> None:
    """``<group_id>.budget-changelog`` exists in the config only when a routed audience has
    a budget; ``topics apply`` creates it (all_topics) and the processor may write it,
    read it back and use its restore reader's group prefix."""
    import shutil

    import yaml

    from streamproc.config import load_config
    from streamproc.runtime.acls import GROUP, LITERAL, PREFIXED, TOPIC, Acl, desired_acls
    from tests.unit.test_acls import REPO, base

    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    pol = yaml.safe_load((REPO / "policy.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(pol))
    (tmp_path / "streamproc.yaml").write_text(yaml.safe_dump(base()))
    plain = load_config(tmp_path / "streamproc.yaml", env={})
    assert plain.budget_changelog_topic is None and not any("budget" in t for t in plain.all_topics())
    pol["audiences"]["analytics"]["tags"]["PUBLIC"] = {"op": "dp_noise", "mechanism": "laplace", "epsilon": 0.5, "bounds": [0, 10]}
    pol["audiences"]["analytics"]["budget"] = {"epsilon": 2.0, "window": "1d"}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(pol))
    cfg = load_config(tmp_path / "streamproc.yaml", env={})
    assert cfg.budget_changelog_topic == "sp.budget-changelog"
    assert cfg.all_topics()[-1] == "sp.budget-changelog"
    acls = set(desired_acls(cfg))
    for a in (
        Acl("User:proc", TOPIC, LITERAL, "sp.budget-changelog", "WRITE"),
        Acl("User:proc", TOPIC, LITERAL, "sp.budget-changelog", "READ"),
        Acl("User:proc", GROUP, PREFIXED, "sp.state-", "READ"),
    ):
        assert a in acls
    # no audience principal may read it
    assert not any(a.name == "sp.budget-changelog" and a.principal != "User:proc" for a in acls)


def test_the_suppressed_variant_matches_the_reference_interpreter(keyring: LocalKeyring, schemas: CachingSchemaSource) -> None:
    """The generated code of the suppressed plan (no noise: deterministic) against the
    dict-walking reference interpreter, on the same record."""
    import io

    import fastavro

    from streamproc.pipeline.codegen import compile_plan
    from streamproc.pipeline.reference import run_reference

    aud = parse_policy(raw_policy()).audience("analytics")
    node = avro.parse(SCHEMA)
    keys = PseudonymKeys(keyring, PSEUDONYM)
    plan = build_plan(node, aud, keys, dp_suppressed=True)
    assert isinstance(node, avro.Record)
    fn, _src = compile_plan(plan, node)
    for rec in ({"customer_id": "a", "coupon": None, "amount": 3.0, "score": None, "country": "FR"},
                {"customer_id": "b", "coupon": "x", "amount": -1.0, "score": 7, "country": "DE"}):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(SCHEMA), rec)
        assert b"".join(fn(buf.getvalue())) == run_reference(plan, SCHEMA, buf.getvalue())
