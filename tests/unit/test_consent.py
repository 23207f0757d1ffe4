"""Consent and purpose: policy model, wire format, table semantics, evaluation per basis.

Expected values come from the specification (the truth table of docs/governance.md,
written out below as literals), from a second derivation of the subject token with
``cryptography``'s HKDF and the standard library's ``hmac``, and from ``json``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streamproc.audit import AuditAttributeError, ConsentWithheld
from streamproc.client import RecordSealer
from streamproc.client.consent import ConsentWriteError, ConsentWriter, subject_token
from streamproc.client.generator import EventGenerator
from streamproc.config import load_config
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import ConfigError, PolicyError
from streamproc.pipeline.consent import ConsentGate
from streamproc.pipeline.core import InputRecord
from streamproc.policy.consent import (
    ConsentFormatError,
    ConsentRecord,
    ConsentState,
    decide,
    decode,
    encode,
    record_key,
)
from streamproc.policy.model import parse_policy
from streamproc.runtime.consent import ConsentMessage, ConsentTable, ConsentUnavailable
from tests.unit.conftest import ORDER_SCHEMA, POLICY_FILE, PSEUDONYM, Maker

PURPOSES = {
    "marketing": {"basis": "consent", "description": "Product analytics and marketing"},
    "fraud_prevention": {"basis": "legitimate_interest"},
    "service": {"basis": "contract"},
}
AUDIENCE_PURPOSE = {"analytics": "marketing", "fraud": "fraud_prevention", "support": "service"}


def raw_policy(**audience_over: dict[str, Any]) -> dict[str, Any]:
    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["purposes"] = copy.deepcopy(PURPOSES)
    for a, p in AUDIENCE_PURPOSE.items():
        raw["audiences"][a]["purpose"] = p
    for a, over in audience_over.items():
        raw["audiences"][a].update(over)
    return raw


# -- policy model -------------------------------------------------------------------------


def test_purposes_parse_with_their_basis() -> None:
    p = parse_policy(raw_policy())
    assert {n: (x.basis, x.opt_in) for n, x in p.purposes.items()} == {
        "marketing": ("consent", True),
        "fraud_prevention": ("legitimate_interest", False),
        "service": ("contract", False),
    }
    assert p.basis_of("analytics") == p.purposes["marketing"]
    assert p.basis_of("support") == p.purposes["service"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["purposes"]["marketing"].pop("basis"), "basis must be one of"),
        (lambda r: r["purposes"]["marketing"].update(basis="vital_interest"), "basis must be one of"),
        (lambda r: r["audiences"]["analytics"].update(purpose="unknown"), "must name one of purposes"),
        (lambda r: r["audiences"]["analytics"].pop("purpose"), "must name one of purposes"),
        (lambda r: r["purposes"].update({"bad name": {"basis": "contract"}}), "purpose names"),
        (lambda r: r["purposes"]["service"].update(extra=1), "a mapping with 'basis'"),
        (lambda r: r.pop("keys"), "purposes need 'keys.pseudonym'"),
    ],
)
def test_purpose_errors_fail_closed(mutate: Any, message: str) -> None:
    raw = raw_policy()
    if message.startswith("purposes need"):  # no keyed rule may hide the purposes error
        for a in raw["audiences"].values():
            a["tags"] = {t: "drop" for t in a["tags"]}
            a["record_key"] = "drop"
    mutate(raw)
    with pytest.raises(PolicyError, match=message):
        parse_policy(raw)


def test_a_basis_is_part_of_the_policy_version() -> None:
    a = parse_policy(raw_policy())
    raw = raw_policy()
    raw["purposes"]["service"]["basis"] = "consent"
    assert parse_policy(raw).version != a.version


def test_purpose_without_purposes_section_stays_a_label() -> None:
    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["audiences"]["analytics"]["purpose"] = "product analytics"
    p = parse_policy(raw)
    assert p.purposes == {} and p.basis_of("analytics") is None


# -- wire format and decision -------------------------------------------------------------

#: The specification's truth table: (basis is consent, status or None) -> reason or None.
TRUTH = {
    (True, None): "not_granted",
    (True, "granted"): None,
    (True, "withdrawn"): "withdrawn",
    (True, "objected"): "withdrawn",
    (False, None): None,
    (False, "granted"): None,
    (False, "withdrawn"): None,
    (False, "objected"): "objected",
}


@pytest.mark.parametrize(("opt_in", "status"), list(TRUTH))
def test_decision_truth_table(opt_in: bool, status: str | None) -> None:
    rec = None if status is None else ConsentRecord("p", status, 1)
    assert decide(opt_in, rec) == TRUTH[(opt_in, status)]


def test_value_format_v1() -> None:
    v = encode("marketing", "withdrawn", 1_700_000_000_123)
    assert json.loads(v) == {"v": 1, "purpose": "marketing", "status": "withdrawn", "at": 1_700_000_000_123}
    key = b"tk1_" + b"A" * 22 + b"/marketing"
    assert decode(key, v) == ConsentRecord("marketing", "withdrawn", 1_700_000_000_123)
    with pytest.raises(ConsentFormatError, match="does not match its key"):
        decode(b"tk1_" + b"A" * 22 + b"/service", v)
    with pytest.raises(ConsentFormatError, match="format version"):
        decode(key, json.dumps({"v": 2, "purpose": "marketing", "status": "granted", "at": 1}).encode())
    with pytest.raises(ConsentFormatError):
        encode("marketing", "maybe", 1)


def test_state_last_writer_wins_by_record_order_not_timestamp() -> None:
    s = ConsentState()
    k = b"tk1_" + b"B" * 22 + b"/marketing"
    s.apply(k, encode("marketing", "granted", 2_000))
    s.apply(k, encode("marketing", "withdrawn", 1_000))  # older `at`, later record: wins
    assert s.get(k) == ConsentRecord("marketing", "withdrawn", 1_000)
    s.apply(k, None)  # tombstone: as if the subject never acted
    assert s.get(k) is None and len(s) == 0
    s.apply(k, b"not json")  # unreadable: fails closed as an objection
    assert s.get(k) == ConsentRecord("marketing", "objected", 0) and s.unreadable == 1
    with pytest.raises(ConsentFormatError):
        s.apply(b"alice@example.com/marketing", encode("marketing", "granted", 1))
    assert s.versions == frozenset({1})


# -- the table: restore then follow -------------------------------------------------------


class ScriptedSource:
    """A consent source that returns scripted polls, then nothing; records what it was asked."""

    def __init__(self, partitions: Sequence[int], polls: list[list[ConsentMessage]]) -> None:
        self._partitions = list(partitions)
        self.polls = polls
        self.lock = threading.Lock()
        self.closed = False
        self.fail: BaseException | None = None

    def partitions(self) -> Sequence[int]:
        return self._partitions

    def poll(self, timeout: float) -> list[ConsentMessage]:
        if self.fail is not None:
            raise self.fail
        with self.lock:
            if self.polls:
                return self.polls.pop(0)
        time.sleep(min(timeout, 0.01))
        return []

    def push(self, msgs: list[ConsentMessage]) -> None:
        with self.lock:
            self.polls.append(msgs)

    def close(self) -> None:
        self.closed = True


def K(n: int, purpose: str = "marketing") -> bytes:
    return record_key("tk1_" + base64.urlsafe_b64encode(bytes([n]) * 16).rstrip(b"=").decode(), purpose)


def msg(p: int, o: int, key: bytes, status: str | None, purpose: str = "marketing") -> ConsentMessage:
    return ConsentMessage(p, o, key, None if status is None else encode(purpose, status, o))


def test_restore_reads_every_partition_to_its_end_first() -> None:
    src = ScriptedSource(
        [0, 1],
        [
            [msg(0, 0, K(1), "granted"), msg(1, 0, K(2), "granted")],
            [ConsentMessage(0, 1, None, None, eof=True)],
            [msg(1, 1, K(2), "withdrawn"), msg(1, 2, K(1, "service"), "objected", "service")],
            [ConsentMessage(1, 3, None, None, eof=True)],
            [msg(0, 1, K(1), "withdrawn")],  # after both EOFs: for the follower
        ],
    )
    t = ConsentTable(src, topic="consent")
    t.restore(5)
    assert t.state.get(K(1)) == ConsentRecord("marketing", "granted", 0)
    assert t.state.get(K(2)) == ConsentRecord("marketing", "withdrawn", 1)
    assert t.state.get(K(1, "service")) == ConsentRecord("service", "objected", 2)
    assert t.applied == 4 and len(src.polls) == 1
    t.start(poll_timeout=0.01)
    deadline = time.monotonic() + 5
    while t.state.get(K(1)) != ConsentRecord("marketing", "withdrawn", 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.state.get(K(1)) == ConsentRecord("marketing", "withdrawn", 1)
    assert t.last_applied is not None and t.last_applied[:2] == (0, 1)
    t.stop()
    assert src.closed


def test_restore_times_out_without_the_end_of_every_partition() -> None:
    src = ScriptedSource([0, 1], [[ConsentMessage(0, 0, None, None, eof=True)]])
    with pytest.raises(ConsentUnavailable, match=r"partitions \[1\] not read"):
        ConsentTable(src, topic="consent").restore(0.3)


def test_follower_failure_is_reported() -> None:
    src = ScriptedSource([0], [[ConsentMessage(0, 0, None, None, eof=True)]])
    seen: list[BaseException] = []
    t = ConsentTable(src, topic="consent", on_failure=seen.append)
    t.restore(1)
    src.fail = RuntimeError("broker gone")
    t.start(poll_timeout=0.01)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(t.failed, RuntimeError) and seen == [t.failed]
    t.stop()


# -- keys: the subject's token, and no raw subject in the topic ---------------------------


def expected_token(master: bytes, version: int, domain: str, subject: bytes) -> str:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"streamproc/consent/v1", info=domain.encode()).derive(master)
    mac = hmac.new(key, subject, hashlib.sha256).digest()[:16]
    return f"tk{version}_" + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_subject_token_is_an_hkdf_hmac_token_of_the_consent_domain(keyring: LocalKeyring) -> None:
    keys = PseudonymKeys(keyring, PSEUDONYM)
    v, master = keyring.get_secret(PSEUDONYM)
    assert subject_token(keys, "consent", "cust-42") == expected_token(master, v, "consent", b"cust-42")
    assert subject_token(keys, "consent", 42) == expected_token(master, v, "consent", b"42")
    assert subject_token(keys, "other", "cust-42") != subject_token(keys, "consent", "cust-42")
    # Not any audience's token of the same value, even in a domain named like it.
    assert subject_token(keys, "consent", "cust-42") != keys.token_key("consent", audience=None)[1]


class FakeProducer:
    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.sent: list[tuple[str, bytes, bytes]] = []
        self._pending: list[Any] = []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Any) -> None:
        self.sent.append((topic, key, value))
        n = len(self.sent) - 1

        class Msg:
            def partition(self) -> int:
                return 0

            def offset(self) -> int:
                return n

        self._pending.append(lambda: on_delivery(None, Msg()))

    def flush(self, timeout: float) -> int:
        while self._pending:
            self._pending.pop(0)()
        return 0


def test_writer_puts_no_raw_subject_in_keys_or_values(keyring: LocalKeyring) -> None:
    keys = PseudonymKeys(keyring, PSEUDONYM)
    fake: list[FakeProducer] = []
    w = ConsentWriter({"bootstrap.servers": "127.0.0.1:1"}, "consent", keys, purposes=PURPOSES,
                      producer_factory=lambda c: fake.append(FakeProducer(c)) or fake[-1])
    subject = "alice.subject-7731@example.com"
    assert w.grant(subject, "marketing", at_ms=5) == (0, 0)
    assert w.withdraw(subject, "marketing", at_ms=6) == (0, 1)
    assert w.object(subject, "service", at_ms=7) == (0, 2)
    with pytest.raises(ConsentWriteError, match="unknown purpose"):
        w.grant(subject, "markting")
    v, master = keyring.get_secret(PSEUDONYM)
    tok = expected_token(master, v, "consent", subject.encode())
    p = fake[0]
    assert p.conf["enable.idempotence"] is True and p.conf["acks"] == "all"
    assert [(k, json.loads(val)["status"]) for _, k, val in p.sent] == [
        (f"{tok}/marketing".encode(), "granted"),
        (f"{tok}/marketing".encode(), "withdrawn"),
        (f"{tok}/service".encode(), "objected"),
    ]
    for _, k, val in p.sent:
        for part in (subject, "alice", "7731", "example.com"):
            assert part.encode() not in k and part.encode() not in val


# -- evaluation through the pipeline ------------------------------------------------------


def gated_kit(make_pipeline: Maker, state: ConsentState, **over: dict[str, Any]) -> Any:
    kit = make_pipeline(policy_obj=parse_policy(raw_policy(**over)))
    kit.pipeline.consent = ConsentGate(kit.policy, state, kit.keys, "consent")
    return kit


def orders(kit: Any, customers: Sequence[str], **over: Any) -> list[InputRecord]:
    sealer = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    out = []
    for i, c in enumerate(customers):
        rec = EventGenerator(i + 1).order()
        rec.update(customer_id=c, **over)
        out.append(InputRecord("orders", 0, i, c.encode(), sealer.seal(rec), 1, ()))
    return out


def per_dest(result: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for o in result.outputs:
        out.setdefault(o.topic.split(".")[1], []).append(o.source.offset)
    return out


def test_every_record_every_audience_by_basis(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    keys = PseudonymKeys(keyring, PSEUDONYM)
    state = ConsentState()

    def put(subject: str, purpose: str, status: str) -> None:
        state.apply(record_key(subject_token(keys, "consent", subject), purpose), encode(purpose, status, 1))

    # c0: no record anywhere; c1 granted marketing; c2 granted then withdrew marketing;
    # c3 objected to fraud prevention and to service; c4 withdrew service (not an objection).
    put("c1", "marketing", "granted")
    put("c2", "marketing", "granted")
    put("c2", "marketing", "withdrawn")
    put("c3", "fraud_prevention", "objected")
    put("c3", "service", "objected")
    put("c4", "service", "withdrawn")
    kit = gated_kit(make_pipeline, state)
    result = kit.pipeline.process(orders(kit, ["c0", "c1", "c2", "c3", "c4"]))
    assert result.quarantined == []
    assert per_dest(result) == {"analytics": [1], "fraud": [0, 1, 2, 4], "support": [0, 1, 2, 4]}
    assert result.stats.withheld == {
        ("analytics", "not_granted"): 3,  # c0, c3, c4
        ("analytics", "withdrawn"): 1,  # c2
        ("fraud", "objected"): 1,
        ("support", "objected"): 1,
    }
    assert result.stats.egress_records[("sanitized.analytics", "analytics")] == 1


def test_withdrawal_applied_between_batches_is_honoured(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    keys = PseudonymKeys(keyring, PSEUDONYM)
    state = ConsentState()
    k = record_key(subject_token(keys, "consent", "c9"), "marketing")
    state.apply(k, encode("marketing", "granted", 1))
    kit = gated_kit(make_pipeline, state)
    assert per_dest(kit.pipeline.process(orders(kit, ["c9"])))["analytics"] == [0]
    state.apply(k, encode("marketing", "withdrawn", 2))
    r = kit.pipeline.process(orders(kit, ["c9"]))
    assert "analytics" not in per_dest(r) and r.stats.withheld == {("analytics", "withdrawn"): 1}


def test_a_record_without_subject_is_withheld_from_every_gated_audience(make_pipeline: Maker) -> None:
    # analytics names a nullable field as its subject; a null there cannot be evaluated.
    kit = gated_kit(make_pipeline, ConsentState(), analytics={"subject": "coupon_code"})
    r = kit.pipeline.process(orders(kit, ["c0"], coupon_code=None))
    assert "analytics" not in per_dest(r)
    assert r.stats.withheld == {("analytics", "no_subject"): 1}


def test_tokens_of_every_key_version_are_looked_up(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    """After a rotation of the pseudonym master, old consent records still count."""
    keys = PseudonymKeys(keyring, PSEUDONYM)
    state = ConsentState()
    state.apply(record_key(subject_token(keys, "consent", "c5"), "fraud_prevention"), encode("fraud_prevention", "objected", 1))
    keyring.rotate(PSEUDONYM)
    kit = gated_kit(make_pipeline, state)
    assert kit.keys.primary_version == 2
    r = kit.pipeline.process(orders(kit, ["c5"]))
    assert "fraud" not in per_dest(r)
    assert r.stats.withheld == {("fraud", "objected"): 1, ("analytics", "not_granted"): 1}


# -- audit event, config ------------------------------------------------------------------


def test_audit_event_carries_counts_only() -> None:
    e = ConsentWithheld(audience="analytics", purpose="marketing", reason="withdrawn", count=3)
    assert e.attrs() == {"audience": "analytics", "purpose": "marketing", "reason": "withdrawn", "count": 3}
    with pytest.raises(AuditAttributeError):
        ConsentWithheld(audience="alice@example.com", reason="withdrawn", count=1)


def config_dir(tmp_path: Path, policy: dict[str, Any], consent: dict[str, Any] | None) -> Path:
    import shutil

    from tests.unit.conftest import ROOT

    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [{"sources": ["orders"], "dead_letter_topic": "orders.dlq", "destinations": [
            {"topic": f"orders.{a}", "audience": a, "kek": f"{a}-kek"} for a in AUDIENCE_PURPOSE]}],
    }
    if consent is not None:
        cfg["consent"] = consent
    p = tmp_path / "streamproc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    LocalKeyring.create(tmp_path / "keys" / "keyring.json")
    return p


def test_config_consent_section(tmp_path: Path) -> None:
    c = load_config(config_dir(tmp_path / "a", raw_policy(), {"topic": "consent.v1"}), env={})
    assert c.consent is not None and (c.consent.topic, c.consent.domain) == ("consent.v1", "consent")
    assert c.all_topics()[-1] == "consent.v1"
    with pytest.raises(ConfigError, match="declares purposes"):
        load_config(config_dir(tmp_path / "b", raw_policy(), None), env={})
    with pytest.raises(ConfigError, match="also a pipeline topic"):
        load_config(config_dir(tmp_path / "c", raw_policy(), {"topic": "orders.dlq"}), env={})
    plain = yaml.safe_load(POLICY_FILE.read_text())
    with pytest.raises(ConfigError, match="declares no purposes"):
        load_config(config_dir(tmp_path / "d", plain, {"topic": "consent.v1"}), env={})


def test_metrics_count_withheld_per_audience_and_reason() -> None:
    from prometheus_client import CollectorRegistry

    from streamproc.observability.metrics import KnownLabels, Metrics
    from streamproc.pipeline.core import BatchStats

    m = Metrics(registry=CollectorRegistry(), known=KnownLabels.of(audiences=["analytics"]))
    st = BatchStats(withheld={("analytics", "withdrawn"): 2, ("analytics", "not_granted"): 1, ("alice@example.com", "withdrawn"): 1})
    m.batch_processed(st, 4, 0.01)
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    samples = {
        (s.labels["audience"], s.labels["reason"]): s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "streamproc_consent_withheld_total"
    }
    assert samples == {("analytics", "withdrawn"): 2, ("analytics", "not_granted"): 1, ("_other", "withdrawn"): 1}
    assert "alice" not in text


# -- lint ---------------------------------------------------------------------------------


def test_lint_refuses_a_gated_audience_without_a_subject_field() -> None:
    from streamproc.pipeline.lint import check
    from streamproc.schema.registry import RegisteredSchema

    no_hint = copy.deepcopy(ORDER_SCHEMA)
    for f in no_hint["fields"]:
        f.pop("streamproc.subject", None)
    raw = raw_policy()
    raw["purposes"]["unused"] = {"basis": "contract"}
    for a in raw["audiences"].values():  # date_shift would need a subject too: not this test
        a["tags"] = {t: ("drop" if r == {"op": "date_shift", "max_days": 30} else r) for t, r in a["tags"].items()}
    report = check(parse_policy(raw), [RegisteredSchema(1, json.dumps(no_hint))])
    errors = [f.message for f in report.errors]
    assert sorted(m.split("'")[1] for m in errors if "no subject field" in m) == ["analytics", "fraud", "support"]
    assert any("purpose 'unused' is declared but no audience serves it" in f.message for f in report.findings)
    ok = check(parse_policy(raw_policy()), [RegisteredSchema(1, json.dumps(ORDER_SCHEMA))])
    assert not [f for f in ok.errors if "subject" in f.message]


def test_consent_token_known_answer_vector() -> None:
    """The docs/keys.md vector: fixed master bytes(range(32)) v1, domain ``consent``, ``cust-42``
    (the literals were computed with an RFC 5869 HKDF written on ``hmac`` alone)."""

    class Fixed:
        def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
            return 1, bytes(range(32))

    keys = PseudonymKeys(Fixed(), "pseudonym-master")
    assert keys.consent_key("consent")[1].hex() == "37e751358aa5531bf52cbce59eb5d55d4b1145f953757894b7096b5d2ebbc7a5"
    assert subject_token(keys, "consent", "cust-42") == "tk1_A2W2jgvFQYiPCUTpFoaFew"


def test_acls_let_the_processor_read_the_table_and_the_consent_app_write_it(tmp_path: Path) -> None:
    import shutil

    from streamproc.runtime.acls import Acl, desired_acls
    from tests.unit.test_acls import REPO as ACL_REPO
    from tests.unit.test_acls import base

    shutil.copytree(ACL_REPO / "schemas", tmp_path / "schemas")
    raw = raw_policy()
    raw["audiences"].pop("support")
    raw["purposes"].pop("service")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(raw))
    cfg = base()
    cfg["consent"] = {"topic": "sp.consent"}
    cfg["acls"]["producers"].append({"principal": "User:prefs", "topics": ["sp.consent"]})
    p = tmp_path / "streamproc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with_consent = set(desired_acls(load_config(p, env={})))
    cfg.pop("consent")
    cfg["acls"]["producers"].pop()
    p.write_text(yaml.safe_dump(cfg))
    (tmp_path / "policy.yaml").write_text(POLICY_FILE.read_text())
    without = set(desired_acls(load_config(p, env={})))
    assert with_consent - without == {
        Acl("User:proc", "TOPIC", "LITERAL", "sp.consent", "READ"),
        Acl("User:proc", "GROUP", "PREFIXED", "sp.consent-", "READ"),
        # the worker's periodic check of the table's cleanup.policy (runtime/state_topics.py)
        Acl("User:proc", "TOPIC", "LITERAL", "sp.consent", "DESCRIBE_CONFIGS"),
        Acl("User:prefs", "TOPIC", "LITERAL", "sp.consent", "WRITE"),
    }


def test_in_process_demo_shows_the_withdrawn_subject_missing_from_analytics(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from streamproc.cli.main import cli

    r = CliRunner().invoke(cli, ["demo", "--in-process", "--events", "2", "--workdir", str(tmp_path / "demo")], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "granted 'marketing' -> an order of theirs: analytics: delivered, fraud: delivered, support: delivered" in out
    assert "withdrawn 'marketing' -> an order of theirs: analytics: withheld (withdrawn), fraud: delivered, support: delivered" in out
