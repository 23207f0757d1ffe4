"""Erasure by crypto-shredding: formats, the subject-key table, rollback, the pipeline, reid.

Expected values are computed independently of the code under test: the ciphertext from
``cryptography``'s AES-SIV and the standard library's base64 (the format of
docs/wire-format.md), the subject token from ``cryptography``'s HKDF and the standard
library's ``hmac``, the key-record plaintext from its documented layout, and JSON with
``json``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streamproc.audit import AuditLog, MemorySink
from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.config import load_config
from streamproc.crypto import erasure
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys, ReidentificationError
from streamproc.errors import ConfigError, KmsUnavailable, PolicyError, SealingUnavailable
from streamproc.pipeline.core import InputRecord
from streamproc.pipeline.state import StateWrite
from streamproc.policy.model import parse_policy
from streamproc.reid import AudienceKey, Reidentifier, SubjectForgottenError
from tests.unit.conftest import ORDER_SCHEMA, POLICY_FILE, PSEUDONYM, Maker

TOPIC = "subject-keys"
KEK = "fraud-subject-kek"


@pytest.fixture(autouse=True)
def _subject_kek(keyring: LocalKeyring) -> None:
    keyring.create_key(KEK)  # the fraud audience's subject-key KEK (not its destination KEK)


def erasable_policy(**fraud: Any) -> dict[str, Any]:
    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["audiences"]["fraud"]["subject"] = "customer_id"
    raw["audiences"]["fraud"]["tags"]["EMAIL"] = {
        "op": "encrypt_deterministic", "normalize": ["lower", "strip"], "erasable": True, **fraud,
    }
    return raw


class FixedRng:
    """``os.urandom`` stand-in with known output: byte ``seed + i`` repeated, per call."""

    def __init__(self, seed: int = 1) -> None:
        self.next = seed

    def __call__(self, n: int) -> bytes:
        b = bytes([self.next % 256]) * n
        self.next += 1
        return b


def new_table(kms: Any, keys: PseudonymKeys, rng: Callable[[int], bytes] | None = None, **kw: Any) -> erasure.SubjectKeyTable:
    opener = Opener.for_kms(kms)
    return erasure.SubjectKeyTable(
        keys, topic=TOPIC, sealers={"fraud": Sealer(kms, KEK, TOPIC)},
        open_envelope=lambda v: opener.open_parts(TOPIC, v)[0], **({"rng": rng} if rng else {}), **kw,
    )  # fmt: skip


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def expected_token(master: bytes, version: int, subject: bytes) -> str:
    key = HKDF(hashes.SHA256(), 32, b"streamproc/erasure/v1", b"subject-keys").derive(master)
    return f"tk{version}_" + b64u(hmac.new(key, subject, hashlib.sha256).digest()[:16])


# -- formats --------------------------------------------------------------------------------------


def test_erasable_ciphertext_known_answer_vector(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    """The ds1_ format from primitives: AES-SIV(subject key, value, AD=[domain, key id])."""
    table = new_table(keyring, keys, FixedRng(7))
    prefix, siv, kid_b = table.cipher_fn("fraud")(b"cust-1")
    kid = (bytes([7]) * 8).hex()  # the first draw is the key id, the second the key
    key = bytes([8]) * 64
    assert (prefix, kid_b) == (f"ds1_{kid}_", kid.encode())
    want = f"ds1_{kid}_" + b64u(AESSIV(key).encrypt(b"alice@example.com", [b"EMAIL", kid.encode()]))
    assert prefix + b64u(siv.encrypt(b"alice@example.com", [b"EMAIL", kid_b])) == want
    assert erasure.decrypt(key, "EMAIL", want) == b"alice@example.com"
    assert erasure.key_id_of(want) == kid and erasure.is_erasable(want)
    assert not erasure.is_erasable("de1_" + want[4:])  # distinguishable from the plain format
    with pytest.raises(ReidentificationError):
        erasure.decrypt(key, "OTHER", want)  # the domain is bound


def test_subject_token_and_record_key_known_answer(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    master = keyring.get_secret(PSEUDONYM)[1]
    table = new_table(keyring, keys, FixedRng(1))
    table.cipher_fn("fraud")(b"cust-1")
    writes = table.take_writes()
    token = expected_token(master, 1, b"cust-1")
    kid = (bytes([1]) * 8).hex()
    assert [k for k, _ in writes] == [f"{token}/{kid}".encode()]
    # The subject's value and the consent domain's token appear nowhere in the record.
    k, v = writes[0]
    assert b"cust-1" not in k and v is not None and b"cust-1" not in v


def test_key_record_is_sealed_under_the_audience_kek(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    table = new_table(keyring, keys, FixedRng(1))
    table.cipher_fn("fraud")(b"cust-1")
    (k, v), = table.take_writes()
    assert v is not None
    doc = json.loads(v)
    assert set(doc) == {"v", "audience", "key"} and doc["v"] == 1 and doc["audience"] == "fraud"
    sealed = base64.b64decode(doc["key"])
    assert bytes([1]) * 64 not in sealed and (bytes([2]) * 64) not in sealed  # no plaintext key at rest
    plain = Opener.for_kms(keyring).open_parts(TOPIC, sealed)[0]  # the audience's KEK opens it
    assert plain == b"streamproc/erasure-key/v1\x00" + k + b"\x00fraud\x00" + bytes([2]) * 64
    # Copied under another record key (another subject), the key does not open.
    other = erasure.parse_record(k.replace(b"/0101", b"/0202"), v)
    opener = Opener.for_kms(keyring)
    with pytest.raises(erasure.SubjectKeyUnavailable):
        erasure.open_sealed(lambda d: opener.open_parts(TOPIC, d)[0], f"{other.token}/{other.suffix}", "fraud", sealed)


def test_a_key_record_that_does_not_open_is_named_by_its_key_id_not_the_subject_token(
    keyring: LocalKeyring, keys: PseudonymKeys
) -> None:
    """The record key's first half is the subject's token (a stable identifier of the
    person): an error names the random key id only, whatever the failure."""
    table = new_table(keyring, keys, FixedRng(1))
    table.cipher_fn("fraud")(b"cust-1")
    (k, v), = table.take_writes()
    assert v is not None
    token, kid = k.decode().split("/")
    sealed = base64.b64decode(json.loads(v)["key"])
    opener = Opener.for_kms(keyring)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for rkey, blob in ((f"{token}/{'0' * 16}", sealed), (k.decode(), tampered)):
        with pytest.raises(erasure.SubjectKeyUnavailable) as info:
            erasure.open_sealed(lambda d: opener.open_parts(TOPIC, d)[0], rkey, "fraud", blob)
        assert token not in str(info.value) and rkey.split("/")[1] in str(info.value)
    assert kid == (bytes([1]) * 8).hex()


def test_the_raw_subject_key_is_dropped_once_sealed_and_in_use(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    """The AES-SIV object is the one in-memory copy a key needs once its record is written
    (a key this worker created) or opened (a key read from the topic)."""
    a, b = new_table(keyring, keys, FixedRng(1)), new_table(keyring, keys)
    cipher = a.cipher_fn("fraud")
    c1 = cipher(b"cust-1")
    (e,) = a._live.values()
    assert e.key == bytes([2]) * 64  # not sealed yet: kept to seal it
    copy_writes(a, b)
    assert e.key is None and e.sealed is None
    assert cipher(b"cust-1") is c1  # still encrypts (the memo, then the entry's cipher)
    assert a._cipher(e) is c1
    cb = b.cipher_fn("fraud")(b"cust-1")  # opened through the KMS
    (eb,) = b._live.values()
    assert eb.key is None and eb.sealed is None
    assert cb[1].encrypt(b"x", [b"d"]) == AESSIV(bytes([2]) * 64).encrypt(b"x", [b"d"])


@pytest.mark.parametrize(
    "key, value",
    [
        (b"no-slash", b"{}"),
        (b"tk1_AAAAAAAAAAAAAAAAAAAAAA/notakeyid", b"{}"),
        (b"tk1_AAAAAAAAAAAAAAAAAAAAAA/0123456789abcdef", b"not json"),
        (b"tk1_AAAAAAAAAAAAAAAAAAAAAA/0123456789abcdef", b'{"v": 2}'),
        (b"tk1_AAAAAAAAAAAAAAAAAAAAAA/0123456789abcdef", b'{"v": 1, "audience": "fraud", "key": "!!"}'),
        (b"tk1_AAAAAAAAAAAAAAAAAAAAAA/forgotten", b'{"v": 1}'),
    ],
)
def test_malformed_key_records_are_refused(key: bytes, value: bytes) -> None:
    with pytest.raises(erasure.KeyRecordError):
        erasure.parse_record(key, value)


# -- the table ------------------------------------------------------------------------------------


def copy_writes(src: erasure.SubjectKeyTable, dst: erasure.SubjectKeyTable | erasure.KeyDirectory) -> list[tuple[bytes, bytes | None]]:
    writes = src.take_writes()
    for k, v in writes:
        dst.apply(k, v)
    return writes


def test_keys_restored_from_the_topic_give_the_same_ciphertexts(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    a, b = new_table(keyring, keys), new_table(keyring, keys)
    ca = a.cipher_fn("fraud")(b"cust-1")
    copy_writes(a, b)
    cb = b.cipher_fn("fraud")(b"cust-1")  # opened lazily, through the KMS
    assert ca[0] == cb[0] and ca[1].encrypt(b"x", [b"d"]) == cb[1].encrypt(b"x", [b"d"])
    assert b.created == 0 and len(b) == 1


def test_two_workers_keys_converge_on_the_lowest_key_id(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    a, b = new_table(keyring, keys, FixedRng(9)), new_table(keyring, keys, FixedRng(3))
    fa, fb = a.cipher_fn("fraud"), b.cipher_fn("fraud")
    assert fa(b"cust-1")[0] != fb(b"cust-1")[0]  # created concurrently: two keys
    copy_writes(a, b)
    copy_writes(b, a)
    low = f"ds1_{(bytes([3]) * 8).hex()}_"
    assert fa(b"cust-1")[0] == fb(b"cust-1")[0] == low
    assert len(a) == len(b) == 2  # both records stay valid (and both are shredded by forget)
    # The lower key shredded alone (a tombstone): the other one takes over, nothing new is made.
    tok = erasure.subject_tokens(keys, b"cust-1", [1])[1]
    a.apply(erasure.record_key(tok, (bytes([3]) * 8).hex()), None)
    assert fa(b"cust-1")[0] == f"ds1_{(bytes([9]) * 8).hex()}_" and len(a) == 1 and a.created == 1


def test_forget_marker_drops_keys_refuses_new_ones_and_shreds_stragglers(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    a, straggler = new_table(keyring, keys), new_table(keyring, keys)
    f = a.cipher_fn("fraud")
    f(b"cust-1")
    f(b"cust-2")
    copy_writes(a, a)
    a.committed(0)
    tok1 = erasure.subject_tokens(keys, b"cust-1", [1])[1]
    a.apply(erasure.record_key(tok1, erasure.MARKER), erasure.marker_value(1))
    with pytest.raises(erasure.SubjectForgotten):
        f(b"cust-1")
    assert a.is_forgotten(tok1) and len(a) == 1  # cust-2 keeps its key
    f(b"cust-2")
    # A worker that had not seen the marker made a key: the table shreds it in its next writes.
    straggler.cipher_fn("fraud")(b"cust-1")
    (sk, sv), = straggler.take_writes()
    a.apply(sk, sv)
    writes = dict(a.take_writes())
    shredded = {k: json.loads(v) for k, v in writes.items() if v is not None and b"shredded" in v}
    assert sk in shredded and shredded[sk]["audience"] == "fraud"
    assert all(k.decode().startswith(tok1 + "/") for k in shredded)  # only the forgotten subject's
    with pytest.raises(erasure.SubjectForgotten):
        f(b"cust-1")
    # Lifting the marker (a tombstone on it) lets a new key be made.
    a.apply(erasure.record_key(tok1, erasure.MARKER), None)
    assert f(b"cust-1")[0].startswith("ds1_")


@pytest.mark.parametrize("value", [b"not json", b'{"v": 2, "shredded": 1}', b'{"v": 1, "audience": "fraud"}'])
def test_an_unreadable_record_over_a_key_fails_closed(keyring: LocalKeyring, keys: PseudonymKeys, value: bytes) -> None:
    """Compaction keeps the unreadable record in place of the key record: the key is gone
    for the table and the directory too (a new key is made; the old one re-identifies
    nothing), and the record is still reported as malformed."""
    a = new_table(keyring, keys, FixedRng(1))
    f = a.cipher_fn("fraud")
    old = f(b"cust-1")[0]
    directory = erasure.KeyDirectory()
    (k, _v), = copy_writes(a, directory)
    a.committed(0)
    kid = k.decode().split("/")[1]
    assert kid in directory.keys
    with pytest.raises(erasure.KeyRecordError):
        a.apply(k, value)
    directory.apply(k, value)
    assert len(a) == 0
    assert f(b"cust-1")[0] != old  # a new key, not the unreadable one
    assert len(a) == 1 and a.created == 2 and directory.rejected == 1 and kid not in directory.keys
    with pytest.raises(ReidentificationError):
        directory.resolve("fraud", kid, lambda d: d)


@pytest.mark.parametrize("value", [b"not json", b'{"v": 2, "forgotten": 1}', b'{"v": 1}'])
def test_an_unreadable_forgotten_marker_forgets(keyring: LocalKeyring, keys: PseudonymKeys, value: bytes) -> None:
    """A record under ``<token>/forgotten`` that does not parse (a newer format, a damaged
    one) is a forget all the same: no key is made for the subject, theirs are shredded."""
    a = new_table(keyring, keys)
    f = a.cipher_fn("fraud")
    f(b"cust-1")
    copy_writes(a, a)
    a.committed(0)
    tok = erasure.subject_tokens(keys, b"cust-1", [1])[1]
    with pytest.raises(erasure.KeyRecordError):
        a.apply(erasure.record_key(tok, erasure.MARKER), value)
    assert a.is_forgotten(tok) and len(a) == 0 and a.pending_shreds == 1
    with pytest.raises(erasure.SubjectForgotten):
        f(b"cust-1")
    directory = erasure.KeyDirectory()
    directory.apply(erasure.record_key(tok, erasure.MARKER), value)
    assert tok in directory.forgotten and directory.rejected == 1
    # A malformed record key names no subject or key: skipped, nothing changes.
    with pytest.raises(erasure.KeyRecordError):
        a.apply(b"no-slash", b"{}")
    assert a.pending_shreds == 1


def test_rollback_drops_uncommitted_keys_and_a_redo_makes_new_ones(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    t = new_table(keyring, keys)
    f = t.cipher_fn("fraud")
    t.begin(1)
    committed = f(b"cust-1")[0]
    assert len(t.take_writes()) == 1
    t.committed(1)
    t.begin(2)
    aborted = f(b"cust-2")[0]
    assert f(b"cust-1")[0] == committed
    assert len(t.take_writes()) == 1
    t.rollback()  # the transaction of epoch 2 aborted: cust-2's key was never persisted
    t.begin(3)
    assert f(b"cust-1")[0] == committed
    redo = f(b"cust-2")[0]
    assert redo != aborted
    assert [k.decode().split("/")[1] for k, _ in t.take_writes()] == [redo[4:20]]


def test_discard_forgets_the_failed_attempts_keys_only(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    t = new_table(keyring, keys)
    f = t.cipher_fn("fraud")
    t.begin(1)
    first = f(b"cust-1")[0]
    t.take_writes()
    t.begin(2)
    second = f(b"cust-2")[0]
    t.discard(2)
    assert f(b"cust-1")[0] == first  # epoch 1 is open (pipelined) and untouched
    assert f(b"cust-2")[0] != second


def test_shreds_are_queued_again_after_an_abort(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    t, other = new_table(keyring, keys), new_table(keyring, keys)
    other.cipher_fn("fraud")(b"cust-1")
    tok = erasure.subject_tokens(keys, b"cust-1", [1])[1]
    t.apply(erasure.record_key(tok, erasure.MARKER), erasure.marker_value(1))
    copy_writes(other, t)
    t.begin(1)
    assert len(t.take_writes()) == 1
    t.rollback()
    assert len(t.take_writes()) == 1  # not lost with the aborted transaction


class FlakyKms:
    def __init__(self, inner: LocalKeyring) -> None:
        self.inner, self.name, self.down = inner, "flaky", True

    def generate_data_key(self, kek_id: str, context: Any) -> Any:
        if self.down:
            raise KmsUnavailable("kms down")
        return self.inner.generate_data_key(kek_id, context)

    def unwrap(self, *a: Any) -> bytes:
        return self.inner.unwrap(*a)

    def is_revoked(self, *a: Any) -> bool:
        return False


def test_a_kms_outage_while_sealing_keeps_the_keys_unsent(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    kms = FlakyKms(keyring)
    t = new_table(kms, keys)
    t.cipher_fn("fraud")(b"cust-1")
    with pytest.raises(KmsUnavailable):
        t.take_writes()
    kms.down = False
    assert len(t.take_writes()) == 1


# -- policy and config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["audiences"]["fraud"].pop("subject"), "needs the audience's 'subject:'"),
        (lambda r: r["audiences"]["fraud"]["tags"]["EMAIL"].update(erasable="yes"), "must be bool"),
        (lambda r: r["audiences"]["analytics"]["tags"].update(EMAIL={"op": "token", "erasable": True}), "unknown parameter"),
        (
            lambda r: r["audiences"]["fraud"]["tags"]["EMAIL"].update(erasable=False, subject_field="customer_id"),
            "subject_field applies to erasable rules only",
        ),
    ],
)
def test_erasable_policy_errors(mutate: Any, message: str) -> None:
    raw = erasable_policy()
    mutate(raw)
    with pytest.raises(PolicyError, match=message):
        parse_policy(raw)


def test_erasable_rule_takes_the_audience_subject_and_changes_the_version() -> None:
    p = parse_policy(erasable_policy())
    rule = next(r for r in p.audiences["fraud"].rules if r.tag == "EMAIL")
    assert rule.op == "encrypt_deterministic" and rule.operator.needs_subject
    assert rule.params["subject_field"] == "customer_id"
    plain = yaml.safe_load(POLICY_FILE.read_text())
    plain["audiences"]["fraud"]["subject"] = "customer_id"
    assert parse_policy(plain).version != p.version


def config_dir(tmp_path: Path, erasure_section: dict[str, Any] | None) -> Path:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(erasable_policy()))
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap.servers": "127.0.0.1:9"},
        "group_id": "g",
        "schemas": {"directory": str(POLICY_FILE.parent / "schemas")},
        "kms": {"provider": "local", "path": str(tmp_path / "keyring.json")},
        "policy": "policy.yaml",
        "pipelines": [{
            "sources": ["orders"],
            "destinations": [{"topic": "orders.fraud", "audience": "fraud", "kek": "fraud-kek"}],
            "dead_letter_topic": "orders.dlq",
        }],
        "acls": {
            "processor": "User:proc",
            "audiences": {"fraud": {"principal": "User:fraud", "group_prefix": "fraud."}},
            "producers": [{"principal": "User:shop", "topics": ["orders"]}],
        },
    }  # fmt: skip
    if erasure_section is not None:
        cfg["erasure"] = erasure_section
    path = tmp_path / "streamproc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SECTION = {"topic": TOPIC, "keks": {"fraud": KEK}}


@pytest.mark.parametrize(
    "section, message",
    [
        (None, r"erasure.*is required"),
        ({"topic": "orders.fraud", "keks": {"fraud": KEK}}, "also a pipeline"),
        ({"topic": TOPIC}, "names no subject-key KEK for fraud"),
        ({"topic": TOPIC, "keks": {"fraud": "fraud-kek"}}, "also the KEK of pipelines"),  # a destination KEK
        ({"topic": TOPIC, "keks": {"fraud": "quarantine-kek"}}, "also dead_letter.kek"),
        ({"topic": TOPIC, "keks": {"nobody": KEK}}, "not an audience"),
    ],
)
def test_config_erasure_section_fails_closed(tmp_path: Path, section: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config_dir(tmp_path, section))


def test_config_requires_the_key_topic_for_erasable_rules(tmp_path: Path) -> None:
    c = load_config(config_dir(tmp_path, SECTION))
    assert c.erasure is not None and c.erasure.topic == TOPIC and TOPIC in c.all_topics()
    assert c.subject_key_keks() == {"fraud": KEK}


def test_acls_plan_covers_the_key_topic(tmp_path: Path) -> None:
    from streamproc.runtime.acls import desired_acls

    c = load_config(config_dir(tmp_path, SECTION))
    got = {(a.principal, a.resource_type, a.pattern, a.name, a.operation) for a in desired_acls(c)}
    assert ("User:proc", "TOPIC", "LITERAL", TOPIC, "READ") in got
    assert ("User:proc", "TOPIC", "LITERAL", TOPIC, "WRITE") in got
    assert ("User:proc", "GROUP", "PREFIXED", "g.erasure-", "READ") in got
    assert not any(a[3] == TOPIC for a in got if a[0] != "User:proc")  # no audience reads keys


class FakeAdmin:
    def __init__(self) -> None:
        self.created: dict[str, Any] = {}

    def list_topics(self, timeout: float = 0) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(topics={
            t: SimpleNamespace(error=None, partitions={0: SimpleNamespace(leader=1, error=None)}) for t in self.created
        })  # fmt: skip

    def create_topics(self, new: Sequence[Any], **_: Any) -> dict[str, Any]:
        from concurrent.futures import Future

        out = {}
        for nt in new:
            self.created[nt.topic] = dict(nt.config)
            f: Future[None] = Future()
            f.set_result(None)
            out[nt.topic] = f
        return out

    def describe_configs(self, resources: Sequence[Any], **_: Any) -> dict[Any, Any]:
        return {}


def test_topics_apply_creates_the_key_topic_compacted_with_bounded_cleaning(tmp_path: Path) -> None:
    from streamproc.runtime.topics import apply_topics

    admin = FakeAdmin()
    apply_topics(load_config(config_dir(tmp_path, SECTION)), admin=admin)  # type: ignore[arg-type]
    conf = admin.created[TOPIC]
    assert conf["cleanup.policy"] == "compact"
    for k in ("segment.ms", "min.cleanable.dirty.ratio", "max.compaction.lag.ms", "delete.retention.ms"):
        assert k in conf
    assert int(conf["max.compaction.lag.ms"]) <= 3_600_000 and float(conf["min.cleanable.dirty.ratio"]) <= 0.01


def test_topics_apply_creates_the_state_topics_with_the_settings_that_are_checked(tmp_path: Path) -> None:
    """What ``topics apply`` creates is what ``topics check`` and the worker compare with
    (one source: :func:`expected_state_configs`); ``topics.defaults.config`` still applies
    to the key topic where it sets nothing of the key topic's own."""
    from streamproc.runtime.state_topics import (
        KEY_TOPIC_CONFIG,
        LiveConfigs,
        config_drift,
        expected_state_configs,
    )
    from streamproc.runtime.topics import apply_topics

    path = config_dir(tmp_path, SECTION)
    raw = yaml.safe_load(path.read_text())
    raw["topics"] = {
        "defaults": {"config": {"min.insync.replicas": "1", "segment.ms": "604800000", "cleanup.policy": "delete"}},
        "overrides": {TOPIC: {"config": {"max.compaction.lag.ms": "600000"}}},
    }
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    admin = FakeAdmin()
    apply_topics(config, admin=admin)  # type: ignore[arg-type]
    conf = admin.created[TOPIC]
    assert conf["min.insync.replicas"] == "1"  # the defaults reach the key topic
    assert conf["cleanup.policy"] == "compact"  # ... but never undo compaction
    assert conf["segment.ms"] == KEY_TOPIC_CONFIG["segment.ms"] == "3600000"  # nor its bounds
    assert conf["max.compaction.lag.ms"] == "600000"  # its own override does
    expected = expected_state_configs(config)
    live = {t: LiveConfigs(t, admin.created[t]) for t in expected}
    assert config_drift(expected, live) == {t: None for t in expected}


# -- through the pipeline -------------------------------------------------------------------------


def erasable_kit(make_pipeline: Maker, keyring: LocalKeyring) -> Any:
    kit = make_pipeline(policy_obj=parse_policy(erasable_policy()))
    kit.pipeline.erasure = new_table(kit.kms, kit.keys)
    return kit


FRAUD, ANALYTICS, SUPPORT = "sanitized.fraud", "sanitized.analytics", "sanitized.support"


def orders(kit: Any, rows: Sequence[tuple[str, str]]) -> list[InputRecord]:
    sealer = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    out = []
    for i, (customer, email) in enumerate(rows):
        rec = EventGenerator(i + 1).order()
        rec.update(customer_id=customer, email=email)
        out.append(InputRecord("orders", 0, i, customer.encode(), sealer.seal(rec), 1, ()))
    return out


def fraud_emails(kit: Any, result: Any) -> dict[int, str]:
    from streamproc.client import RecordOpener

    opener = RecordOpener(kit.keyring, kit.schemas)
    return {o.source.offset: opener.open(o.topic, o.value)[1]["email"] for o in result.outputs if o.topic == FRAUD}


def test_pipeline_encrypts_per_subject_and_writes_keys_with_the_batch(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    kit = erasable_kit(make_pipeline, keyring)
    batch = orders(kit, [("c1", "a@x.io"), ("c1", "A@x.io "), ("c2", "a@x.io")])
    result = kit.pipeline.process(batch)
    emails = fraud_emails(kit, result)
    assert emails[0] == emails[1]  # deterministic within the subject's key (normalized)
    assert emails[0] != emails[2]  # another subject, another key
    assert all(erasure.is_erasable(e) for e in emails.values())
    assert [type(w) for w in result.state_writes] == [StateWrite, StateWrite]
    assert {w.topic for w in result.state_writes} == {TOPIC} and all(w.partition is None for w in result.state_writes)
    # The subject key from the state write reverses the value (AES-SIV from primitives).
    kid = erasure.key_id_of(emails[0])
    w = next(w for w in result.state_writes if w.key.decode().endswith(kid))
    sealed = base64.b64decode(json.loads(w.value or b"")["key"])
    key = Opener.for_kms(keyring).open_parts(TOPIC, sealed)[0][-64:]
    body = base64.urlsafe_b64decode(emails[0].split("_", 2)[2] + "==")
    assert AESSIV(key).decrypt(body, [b"EMAIL", kid.encode()]) == b"a@x.io"
    assert kit.pipeline.state_stores == [kit.pipeline.erasure]


def test_forgotten_subject_is_withheld_from_erasable_audiences_only(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    kit = erasable_kit(make_pipeline, keyring)
    table = kit.pipeline.erasure
    kit.pipeline.process(orders(kit, [("c1", "a@x.io")]))
    tok = erasure.subject_tokens(kit.keys, b"c1", [1])[1]
    table.apply(erasure.record_key(tok, erasure.MARKER), erasure.marker_value(1))
    result = kit.pipeline.process(orders(kit, [("c1", "a@x.io"), ("c2", "b@x.io")]))
    per_dest: dict[str, list[int]] = {}
    for o in result.outputs:
        per_dest.setdefault(o.topic, []).append(o.source.offset)
    assert per_dest[FRAUD] == [1]  # c1 withheld from fraud (erasable EMAIL)
    assert per_dest[ANALYTICS] == [0, 1] and per_dest[SUPPORT] == [0, 1]
    assert result.stats.withheld == {("fraud", "forgotten"): 1}
    assert not result.quarantined
    # The old key of c1 is shredded in this batch's writes; nothing for c1 is created.
    shreds = [w for w in result.state_writes if w.value is not None and b"shredded" in w.value]
    assert [w.key.decode().split("/")[0] for w in shreds] == [tok]


# -- re-identification ----------------------------------------------------------------------------


def reid_for(kit: Any, directory: erasure.KeyDirectory, keyring: LocalKeyring) -> tuple[Reidentifier, MemorySink]:
    sink = MemorySink()
    log = AuditLog([sink], stream="t")
    opener = Opener.for_kms(keyring)
    key = AudienceKey("fraud", 1, kit.keys.siv_key("fraud")[1])
    r = Reidentifier(
        key, log, kit.policy,
        subject_keys=lambda aud, kid: directory.resolve(aud, kid, lambda v: opener.open_parts(TOPIC, v)[0]),
    )  # fmt: skip
    return r, sink


def test_reidentification_of_a_forgotten_subject_fails_with_its_reason_audited(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    kit = erasable_kit(make_pipeline, keyring)
    result = kit.pipeline.process(orders(kit, [("c1", "a@x.io"), ("c2", "b@x.io")]))
    emails = fraud_emails(kit, result)
    directory = erasure.KeyDirectory()
    for w in result.state_writes:
        directory.apply(w.key, w.value)
    reid, sink = reid_for(kit, directory, keyring)
    assert reid.reidentify(emails[0], "EMAIL", actor="alice", field="email", reason="TICKET-1") == "a@x.io"
    # forget c1: its key record is replaced by a shred record
    tok = erasure.subject_tokens(kit.keys, b"c1", [1])[1]
    kid = erasure.key_id_of(emails[0])
    directory.apply(erasure.record_key(tok, erasure.MARKER), erasure.marker_value(2))
    directory.apply(erasure.record_key(tok, kid), erasure.shred_value("fraud", 2))
    with pytest.raises(SubjectForgottenError) as exc:
        reid.reidentify(emails[0], "EMAIL", actor="alice", field="email", reason="TICKET-1")
    assert exc.value.reason == "subject_forgotten" and "a@x.io" not in str(exc.value)
    assert reid.reidentify(emails[1], "EMAIL", actor="alice", field="email", reason="TICKET-1") == "b@x.io"  # others unaffected
    events = [e for e in map(json.loads, sink.lines) if e["type"] == "reidentification"]
    assert [(e["attrs"].get("outcome"), e["attrs"].get("error")) for e in events] == [
        ("success", None), ("failed", "subject_forgotten"), ("success", None),
    ]
    assert all("a@x.io" not in json.dumps(e) for e in events)
    unknown = emails[1][:4] + "f" * 16 + emails[1][20:]
    with pytest.raises(ReidentificationError, match="no subject key"):
        reid.reidentify(unknown, "EMAIL", actor="alice", field="email", reason="TICKET-1")
    assert json.loads(sink.lines[-1])["attrs"]["error"] == "unknown_subject_key"


def test_an_erasable_plan_without_the_table_fails_closed(make_pipeline: Maker) -> None:
    kit = make_pipeline(policy_obj=parse_policy(erasable_policy()))
    result = kit.pipeline.process(orders(kit, [("c1", "a@x.io")]))
    assert not result.outputs and [q.reason.value for q in result.quarantined] == ["unsupported_schema"]


def test_sealing_failure_of_new_keys_is_transient(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    kit = make_pipeline(policy_obj=parse_policy(erasable_policy()))
    kms = FlakyKms(keyring)
    kit.pipeline.erasure = new_table(kms, kit.keys)
    with pytest.raises((KmsUnavailable, SealingUnavailable)):
        kit.pipeline.process(orders(kit, [("c1", "a@x.io")]))
    kms.down = False
    assert len(kit.pipeline.process(orders(kit, [("c1", "a@x.io")])).state_writes) == 1


# -- the demo -------------------------------------------------------------------------------------


def test_in_process_demo_shows_a_forgotten_subject_no_longer_reversible(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from streamproc.cli.main import cli
    from streamproc.client.generator import EventGenerator

    r = CliRunner().invoke(cli, ["demo", "--in-process", "--events", "2", "--workdir", str(tmp_path / "demo")], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    gen = EventGenerator(7 + 2)  # the scene's generator (demo seed 7): the same two orders
    first, second = gen.order(), gen.order()
    gone, stays = first["customer_id"], second["customer_id"]
    assert f"subject {gone}: fraud gets email ds1_" in out
    assert f"re-identified: {first['email'].strip().lower()}" in out  # reversible before the forget
    assert f"streamproc forget {gone}: forgotten marker + 1 shred record(s)" in out
    assert f"subject {gone}: the same fraud value as before -> subject_forgotten: not reversible" in out
    assert f"subject {stays}: the same fraud value as before -> re-identified: {second['email'].strip().lower()}" in out
    assert f"a new order of {gone}: delivered to analytics, support; withheld (fraud: forgotten)" in out


def test_keys_and_markers_of_an_older_master_version_still_count(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    """After a rotation of the pseudonym master, a subject's key made under the old token is
    still found (no second key), and a forget recorded under the old token still holds."""
    v1 = new_table(keyring, keys)
    before = v1.cipher_fn("fraud")(b"cust-1")[0]
    writes = v1.take_writes()
    keyring.rotate(PSEUDONYM)
    keys2 = PseudonymKeys(keyring, PSEUDONYM)
    assert keys2.primary_version == 2
    v2 = new_table(keyring, keys2)
    for k, v in writes:
        v2.apply(k, v)
    assert v2.cipher_fn("fraud")(b"cust-1")[0] == before and v2.created == 0
    old_token = erasure.subject_tokens(keys2, b"cust-2", [1])[1]
    assert old_token == erasure.subject_tokens(keys, b"cust-2", [1])[1]  # the v1 token, derived again
    v2.apply(erasure.record_key(old_token, erasure.MARKER), erasure.marker_value(1))
    with pytest.raises(erasure.SubjectForgotten):
        v2.cipher_fn("fraud")(b"cust-2")


def test_forget_writes_marker_shreds_withdrawals_and_one_audit_event(
    keyring: LocalKeyring, keys: PseudonymKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forget_subject on a directory holding two keys of the subject (two audiences' worth:
    one live, one already shredded) and another subject's key: what it writes, withdraws and
    audits, and that the subject's identifier appears in none of it."""
    import streamproc.client.consent as client_consent
    import streamproc.runtime.erasure as runtime_erasure
    from streamproc.cli import forget as forget_mod

    subject = "cust-0042"
    master = keyring.get_secret(PSEUDONYM)[1]
    token = expected_token(master, 1, subject.encode())
    other = expected_token(master, 1, b"cust-0043")
    directory = erasure.KeyDirectory()
    rec = json.dumps({"v": 1, "audience": "fraud", "key": base64.b64encode(b"sealed").decode()}).encode()
    directory.apply(f"{token}/{'a' * 16}".encode(), rec)
    directory.apply(f"{token}/{'b' * 16}".encode(), rec)
    directory.apply(f"{token}/{'b' * 16}".encode(), erasure.shred_value("fraud", 1))
    directory.apply(f"{other}/{'c' * 16}".encode(), rec)
    monkeypatch.setattr(runtime_erasure, "read_key_directory", lambda config, timeout: directory)
    produced: list[tuple[bytes, bytes]] = []
    monkeypatch.setattr(forget_mod, "_produce_all", lambda conf, topic, records, timeout: produced.extend(records))
    withdrawn: list[tuple[str, str]] = []

    class Writer:
        def __init__(self, *a: Any, **kw: Any) -> None:
            pass

        def withdraw(self, subj: str, purpose: str) -> None:
            withdrawn.append((subj, purpose))

        def close(self) -> None:
            pass

    monkeypatch.setattr(client_consent, "ConsentWriter", Writer)
    raw = erasable_policy()
    raw["purposes"] = {"marketing": {"basis": "consent"}, "service": {"basis": "contract"}}
    for a, p in (("analytics", "marketing"), ("fraud", "service"), ("support", "service")):
        raw["audiences"][a]["purpose"] = p
    policy = parse_policy(raw)
    config = SimpleNamespace(
        erasure=SimpleNamespace(topic=TOPIC), consent=SimpleNamespace(topic="consent", domain="consent"),
        producer_config=lambda: {},
    )
    sink = MemorySink()
    done = forget_mod.forget_subject(config, policy, keys, subject, log=AuditLog([sink], stream="t"), reason="DSR-7")
    assert done["shredded"] == 1 and done["audiences"] == ["fraud"] and done["token"] == token
    written = {k.decode(): json.loads(v) for k, v in produced}
    assert set(written) == {f"{token}/forgotten", f"{token}/{'a' * 16}", f"{token}/{'b' * 16}"}  # not the other subject
    assert "forgotten" in written[f"{token}/forgotten"] and all(
        "shredded" in v and "key" not in v for k, v in written.items() if not k.endswith("/forgotten")
    )
    assert sorted(withdrawn) == [(subject, "marketing"), (subject, "service")]
    events = [json.loads(x) for x in sink.lines]
    forgot = [e for e in events if e["type"] == "subject_forgotten"]
    assert len(forgot) == 1 and forgot[0]["attrs"]["subject"] == token and forgot[0]["attrs"]["count"] == 1
    assert forgot[0]["attrs"]["purposes"] == ["marketing", "service"]
    assert subject not in json.dumps(events) and all(subject.encode() not in k + v for k, v in produced)


def test_forget_without_a_key_topic_audits_the_consent_token(
    keyring: LocalKeyring, keys: PseudonymKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``consent:`` and no ``erasure:``, the audit event still says whom it was about:
    the subject's token in the consent domain (HKDF salt ``streamproc/consent/v1``, info the
    domain), which keys their withdrawals; never the identifier."""
    import streamproc.client.consent as client_consent
    from streamproc.cli import forget as forget_mod

    withdrawn: list[tuple[str, str]] = []

    class Writer:
        def __init__(self, *a: Any, **kw: Any) -> None:
            pass

        def withdraw(self, subj: str, purpose: str) -> None:
            withdrawn.append((subj, purpose))

        def close(self) -> None:
            pass

    monkeypatch.setattr(client_consent, "ConsentWriter", Writer)
    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["purposes"] = {"marketing": {"basis": "consent"}, "service": {"basis": "contract"}}
    for a, p in (("analytics", "marketing"), ("fraud", "service"), ("support", "service")):
        raw["audiences"][a]["purpose"] = p
    config = SimpleNamespace(erasure=None, consent=SimpleNamespace(topic="consent", domain="shop"), producer_config=lambda: {})
    sink = MemorySink()
    subject = "cust-0042"
    done = forget_mod.forget_subject(
        config, parse_policy(raw), keys, subject, log=AuditLog([sink], stream="t"), reason="DSR-8"
    )  # fmt: skip
    master = keyring.get_secret(PSEUDONYM)[1]
    k = HKDF(hashes.SHA256(), 32, b"streamproc/consent/v1", b"shop").derive(master)
    want = "tk1_" + b64u(hmac.new(k, subject.encode(), hashlib.sha256).digest()[:16])
    assert done["token"] == want and done["topic"] is None and done["shredded"] == 0
    assert sorted(withdrawn) == [(subject, "marketing"), (subject, "service")]
    (event,) = [json.loads(x) for x in sink.lines if json.loads(x)["type"] == "subject_forgotten"]
    assert event["attrs"]["subject"] == want and subject not in json.dumps(event)


def test_policy_check_and_the_data_map_show_the_rule_as_erasable() -> None:
    from streamproc.pipeline.catalog import data_map
    from streamproc.pipeline.lint import check
    from streamproc.schema.registry import load_document

    policy = parse_policy(erasable_policy())
    schemas = [load_document(POLICY_FILE.parent / "schemas" / "order.avsc")]
    report = check(policy, schemas)
    assert report.ok, [f.message for f in report.errors]  # compiles without a key topic
    (rows,) = report.matrix.values()
    assert "'erasable': True" in rows["email"]["fraud"] and "'subject_field': 'customer_id'" in rows["email"]["fraud"]
    (order,) = data_map(policy, schemas)["schemas"].values()
    assert order["fields"]["email"]["audiences"]["fraud"]["operation"].startswith("encrypt_deterministic(erasable=true")
    assert "erasable" not in order["fields"]["email"]["audiences"]["analytics"]["operation"]


def test_a_forgotten_subject_is_counted_once_per_audience_even_when_consent_also_withholds(
    make_pipeline: Maker, keyring: LocalKeyring
) -> None:
    """forget also withdraws consent: on an audience that is both erasable and consent-gated
    the record is withheld once, as forgotten (not once per reason)."""
    from streamproc.client.consent import subject_token
    from streamproc.pipeline.consent import ConsentGate
    from streamproc.policy.consent import ConsentState, encode, record_key

    raw = erasable_policy()
    raw["purposes"] = {"marketing": {"basis": "consent"}, "service": {"basis": "contract"}}
    for a, p in (("analytics", "service"), ("fraud", "marketing"), ("support", "service")):
        raw["audiences"][a]["purpose"] = p
        raw["audiences"][a]["subject"] = "customer_id"
    kit = make_pipeline(policy_obj=parse_policy(raw))
    kit.pipeline.erasure = new_table(kit.kms, kit.keys)
    state = ConsentState()
    kit.pipeline.consent = ConsentGate(kit.policy, state, kit.keys, "consent")
    for c, status in (("c1", "withdrawn"), ("c2", "granted")):
        state.apply(record_key(subject_token(kit.keys, "consent", c), "marketing"), encode("marketing", status, 1))
    tok = erasure.subject_tokens(kit.keys, b"c1", [1])[1]
    kit.pipeline.erasure.apply(erasure.record_key(tok, erasure.MARKER), erasure.marker_value(1))
    result = kit.pipeline.process(orders(kit, [("c1", "a@x.io"), ("c2", "b@x.io")]))
    assert result.stats.withheld == {("fraud", "forgotten"): 1}
    fraud = [o.source.offset for o in result.outputs if o.topic == FRAUD]
    assert fraud == [1]
    assert sorted(o.source.offset for o in result.outputs if o.topic == SUPPORT) == [0, 1]


def test_a_key_forgotten_while_its_batch_is_sealed_is_never_written(keyring: LocalKeyring, keys: PseudonymKeys) -> None:
    """The marker arrives (follower thread) while the batch that made the subject's key is
    being sealed: the key record is not written -- the batch's values under it are
    unreadable from the start -- and a shred is queued for it."""
    t = new_table(keyring, keys)
    tok = erasure.subject_tokens(keys, b"cust-1", [1])[1]
    real = t.sealers["fraud"]

    class MarkerDuringSeal:
        def seal_many(self, plains: list[bytes]) -> list[bytes]:
            t.apply(erasure.record_key(tok, erasure.MARKER), erasure.marker_value(1))
            return real.seal_many(plains)

    t.sealers["fraud"] = MarkerDuringSeal()  # type: ignore[assignment]
    t.cipher_fn("fraud")(b"cust-1")
    t.cipher_fn("fraud")(b"cust-2")
    written = {k.decode().split("/")[0] for k, v in t.take_writes()}
    assert tok not in written and len(written) == 1  # cust-2's key only
    t.sealers["fraud"] = real
    shreds = t.take_writes()
    assert [k.decode().split("/")[0] for k, _ in shreds] == [tok] and b"shredded" in (shreds[0][1] or b"")


def test_an_erasable_value_without_a_key_topic_is_denied_and_audited(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    kit = erasable_kit(make_pipeline, keyring)
    value = fraud_emails(kit, kit.pipeline.process(orders(kit, [("c1", "a@x.io")])))[0]
    sink = MemorySink()
    reid = Reidentifier(AudienceKey("fraud", 1, kit.keys.siv_key("fraud")[1]), AuditLog([sink], stream="t"), kit.policy)
    with pytest.raises(ReidentificationError, match="no subject-key topic"):
        reid.reidentify(value, "EMAIL", actor="alice", field="email", reason="TICKET-1")
    attrs = json.loads(sink.lines[-1])["attrs"]
    assert (attrs["outcome"], attrs["error"]) == ("denied", "no_subject_key_topic")
