"""Audiences are not linkable unless the policy says so (issue: fail closed, points 8-9).

* keys are derived per audience; ``keys.shared_domains`` is the one, explicit, validated
  and linted way for named audiences to share a pseudonym domain;
* ``date_shift`` moves every date of one subject in one record by one shift, whatever the
  dates' tags, and refuses policies whose date_shift rules of one audience disagree.

Expected shifts are computed here from HMAC-SHA256 and HKDF written out with the standard
library (the same construction as test_crypto_vectors.py), not with the operator.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import fastavro
import pytest
import yaml

from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.pipeline.codegen import compile_plan
from streamproc.pipeline.lint import check
from streamproc.pipeline.plan import build_plan
from streamproc.policy.model import Policy, parse_policy
from streamproc.schema import avro
from streamproc.schema.avro import Record
from streamproc.schema.registry import RegisteredSchema

SECRET = bytes(range(32))


class FixedSecret:
    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        return version or 1, SECRET


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with hmac/hashlib (checked against RFC 5869 in test_crypto_vectors.py)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def expected_days(audience: str | None, domain: str, subject: bytes, max_days: int) -> int:
    info = f"shared\x00{domain}" if audience is None else f"audience\x00{audience}\x00{domain}"
    key = hkdf_sha256(SECRET, b"streamproc/dateshift/v2", info.encode())
    x = int.from_bytes(hmac.new(key, subject, hashlib.sha256).digest()[:8], "big")
    d = (x >> 1) % max_days + 1
    return d if x & 1 else -d


def policy(text: str) -> Policy:
    return parse_policy(yaml.safe_load(textwrap.dedent(text)), "p.yaml")


def policy_error(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        policy(text)
    return str(info.value)


STAY = {
    "type": "record",
    "name": "Stay",
    "fields": [
        {"name": "patient", "type": "string", "confluent:tags": ["PATIENT_ID"], "streamproc.subject": True},
        {"name": "admitted", "type": {"type": "int", "logicalType": "date"}, "confluent:tags": ["ADMISSION"]},
        {"name": "discharged", "type": {"type": "long", "logicalType": "timestamp-millis"},
         "confluent:tags": ["DISCHARGE"]},
        {"name": "birth", "type": ["null", {"type": "int", "logicalType": "date"}], "default": None,
         "confluent:tags": ["BIRTH_DATE"]},
        {"name": "email", "type": "string", "confluent:tags": ["EMAIL"], "streamproc.domain": "customer"},
    ],
}


# -- keys.shared_domains: validation -------------------------------------------------------


SHARED = """
keys:
  pseudonym: m
  shared_domains: {customer: [analytics, fraud]}
audiences:
  analytics: {tags: {PUBLIC: keep, EMAIL: token}}
  fraud: {tags: {PUBLIC: keep, EMAIL: token}}
  support: {record_key: keep, tags: {PUBLIC: keep, EMAIL: keep}}
"""


def test_shared_domains_are_parsed_per_audience() -> None:
    p = policy(SHARED)
    assert p.shared_domains == {"customer": ("analytics", "fraud")}
    assert p.audience("analytics").shared_domains == frozenset({"customer"})
    assert p.audience("support").shared_domains == frozenset()


@pytest.mark.parametrize(
    ("shared", "expected"),
    [
        ("{customer: [analytics, marketing]}", "keys.shared_domains.customer: unknown audience(s) ['marketing']"),
        ("{customer: [analytics]}", "keys.shared_domains.customer: a list of two or more distinct audience names"),
        ("{customer: [fraud, fraud]}", "a list of two or more distinct audience names"),
        ("{customer: analytics}", "a list of two or more distinct audience names"),
        ("[customer]", "keys.shared_domains: must map pseudonym domains to lists of audiences"),
    ],
)
def test_shared_domain_errors(shared: str, expected: str) -> None:
    assert expected in policy_error(SHARED.replace("{customer: [analytics, fraud]}", shared))


def test_an_unlisted_audience_naming_a_shared_domain_is_an_error() -> None:
    text = SHARED.replace("support: {record_key: keep, tags: {PUBLIC: keep, EMAIL: keep}}",
                          "support: {record_key: keep, tags: {PUBLIC: keep, EMAIL: {op: token, domain: customer}}}")
    msg = policy_error(text)
    assert "audience 'support', tag 'EMAIL': domain 'customer' is shared only by ['analytics', 'fraud']" in msg
    # the record-key domain counts too
    text = SHARED.replace("{customer: [analytics, fraud]}", "{record_key: [analytics, fraud]}").replace(
        "support: {record_key: keep,", "support: {record_key: token,")
    assert "domain 'record_key' is shared only by ['analytics', 'fraud']" in policy_error(text)


def _lint(p: Policy, schema: dict[str, Any]) -> list[str]:
    return [f.message for f in check(p, [RegisteredSchema(1, json.dumps(schema))]).errors]


def test_linter_flags_an_unlisted_audience_deriving_a_shared_domain() -> None:
    # support tokenizes EMAIL, whose schema domain hint is the shared "customer"
    p = policy(SHARED.replace("EMAIL: keep", "EMAIL: token"))
    schema = {**STAY, "fields": [f for f in STAY["fields"] if f["name"] in ("patient", "email")]}
    schema["fields"][0] = {**schema["fields"][0], "confluent:tags": ["PUBLIC"]}
    errors = _lint(p, schema)
    assert errors == [
        "audience 'support' uses pseudonym domain 'customer', which keys.shared_domains shares only by "
        "['analytics', 'fraud']: its values would not join theirs; add 'support' or use another domain"
    ]
    # listed: clean
    ok = policy(SHARED.replace("EMAIL: keep", "EMAIL: token").replace("[analytics, fraud]", "[analytics, fraud, support]"))
    assert _lint(ok, schema) == []


def test_encrypt_deterministic_in_a_shared_domain_is_refused() -> None:
    p = policy(SHARED.replace("fraud: {tags: {PUBLIC: keep, EMAIL: token}}", "fraud: {tags: {PUBLIC: keep, EMAIL: encrypt_deterministic}}"))
    schema = {**STAY, "fields": [{**STAY["fields"][0], "confluent:tags": ["PUBLIC"]}, STAY["fields"][4]]}
    errors = _lint(p, schema)
    assert len(errors) == 1 and "domain 'customer' is shared between audiences" in errors[0]


# -- date_shift: one shift per subject and record ------------------------------------------


DATES = """
keys: {pseudonym: m}
audiences:
  research:
    record_key: drop
    untagged: drop
    tags:
      PATIENT_ID: token
      ADMISSION: {op: date_shift, max_days: 60}
      DISCHARGE: {op: date_shift, max_days: 60}
      BIRTH_DATE: {op: date_shift, max_days: 60}
      EMAIL: drop
"""


def _run(p: Policy, audience: str, schema: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    node = avro.parse(schema)
    assert isinstance(node, Record)
    plan = build_plan(node, p.audience(audience), PseudonymKeys(FixedSecret(), "m"))
    fn, _ = compile_plan(plan, node)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(avro.strip_logical(schema)), record)
    out = b"".join(fn(buf.getvalue()))
    got: dict[str, Any] = fastavro.schemaless_reader(  # type: ignore[assignment]
        io.BytesIO(out), fastavro.parse_schema(avro.strip_logical(plan.out_schema)), None
    )
    return got


def test_one_subjects_dates_of_different_tags_move_together() -> None:
    """A 5-day stay stays 5 days; the shift is the documented HMAC of the subject."""
    p = policy(DATES)
    admitted = (dt.date(2024, 3, 1) - dt.date(1970, 1, 1)).days
    discharged = (admitted + 5) * 86_400_000 + 3_600_000
    for i in range(30):
        subject = f"patient-{i}"
        out = _run(p, "research", STAY, {"patient": subject, "admitted": admitted, "discharged": discharged,
                                          "birth": 3000, "email": "x@y.z"})
        d = expected_days("research", "subject", subject.encode(), 60)
        assert out["admitted"] == admitted + d
        assert out["discharged"] == discharged + d * 86_400_000
        assert out["birth"] == 3000 + d


def test_audience_level_subject_names_the_subject_field() -> None:
    p = policy(DATES.replace("    record_key: drop", "    record_key: drop\n    subject: email"))
    schema = {**STAY, "fields": [{k: v for k, v in f.items() if k != "streamproc.subject"} for f in STAY["fields"]]}
    out = _run(p, "research", schema, {"patient": "p1", "admitted": 100, "discharged": 0, "birth": None,
                                        "email": "a@b.c"})
    assert out["admitted"] == 100 + expected_days("research", "subject", b"a@b.c", 60)
    assert out["birth"] is None


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ([("DISCHARGE: {op: date_shift, max_days: 60}", "DISCHARGE: {op: date_shift, max_days: 30}")],
         "date_shift rules name different max_days values"),
        ([("DISCHARGE: {op: date_shift, max_days: 60}", "DISCHARGE: {op: date_shift, max_days: 60, domain: d}")],
         "date_shift rules name different domain values"),
        ([("DISCHARGE: {op: date_shift, max_days: 60}",
           "DISCHARGE: {op: date_shift, max_days: 60, subject_field: email}"),
          ("    record_key: drop", "    record_key: drop\n    subject: patient")],
         "date_shift rules and 'subject' name different subject fields ['email', 'patient']"),
        ([("    record_key: drop", "    record_key: drop\n    subject: 3")], "'subject' names a top-level field"),
    ],
)
def test_inconsistent_date_shift_rules_are_refused(edits: list[tuple[str, str]], expected: str) -> None:
    text = DATES
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    assert expected in policy_error(text)


def test_shared_date_shift_domain_moves_both_audiences_alike() -> None:
    text = DATES.replace("keys: {pseudonym: m}", "keys: {pseudonym: m, shared_domains: {subject: [research, audit]}}")
    text += textwrap.indent(textwrap.dedent("""\
        audit:
          record_key: drop
          tags: {PATIENT_ID: drop, ADMISSION: date_shift, DISCHARGE: date_shift, BIRTH_DATE: drop, EMAIL: drop}
        """), "  ")
    text = text.replace("{op: date_shift, max_days: 60}", "date_shift")
    p = policy(text)
    rec = {"patient": "p9", "admitted": 100, "discharged": 0, "birth": None, "email": "e"}
    a, b = _run(p, "research", STAY, rec), _run(p, "audit", STAY, rec)
    assert a["admitted"] == b["admitted"] == 100 + expected_days(None, "subject", b"p9", 30)
    # and per audience when not shared
    p2 = policy(text.replace("shared_domains: {subject: [research, audit]}", "shared_domains: {}"))
    assert _run(p2, "research", STAY, rec)["admitted"] == 100 + expected_days("research", "subject", b"p9", 30)
    assert _run(p2, "audit", STAY, rec)["admitted"] == 100 + expected_days("audit", "subject", b"p9", 30)


def test_shipped_policy_has_no_shared_domains() -> None:
    """The shipped example keeps the default: audiences' tokens do not join."""
    from tests.unit.conftest import POLICY_FILE

    raw = yaml.safe_load(Path(POLICY_FILE).read_text())
    assert "shared_domains" not in raw.get("keys", {})


# -- provenance resolve (the lineage team's path) ------------------------------------------


def test_provenance_resolve_cli(tmp_path: Path) -> None:
    """``streamproc provenance resolve`` inverts the references the pipeline writes, with
    the config's KMS; another audience's key, or a forged reference, resolves to nothing."""
    from click.testing import CliRunner

    from streamproc.cli.main import cli
    from streamproc.crypto import provenance
    from streamproc.crypto.kms.local import LocalKeyring

    ring = LocalKeyring.create(tmp_path / "keys" / "ring.json")
    ring.create_key("pseudonym-master", "secret")
    ring.create_key("a-kek")
    ring.create_key("src-kek")
    (tmp_path / "policy.yaml").write_text(SHARED.replace("pseudonym: m", "pseudonym: pseudonym-master"))
    (tmp_path / "schemas").mkdir()
    cfg = {
        "kafka": {"bootstrap.servers": "127.0.0.1:1"},
        "group_id": "g",
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/ring.json"},
        "policy": "./policy.yaml",
        "audit": {"file": "./audit.jsonl"},
        "pipelines": [{"sources": ["orders", "logins"], "dead_letter_topic": "dlq",
                       "destinations": [{"topic": f"out.{a}", "audience": a, "kek": "a-kek"}
                                        for a in ("analytics", "fraud")]}],
    }
    (tmp_path / "streamproc.yaml").write_text(yaml.safe_dump(cfg))
    keys = PseudonymKeys(ring, "pseudonym-master")
    ref = provenance.reference(keys.provenance_key("analytics")[1], "logins", 2, 1234)
    header = provenance.header_prefix("analytics", "sha256:0", 7, 1).decode() + ref
    run = CliRunner().invoke
    args = ["provenance", "resolve", "--config", str(tmp_path / "streamproc.yaml")]
    res = run(cli, [*args, "--audience", "analytics", "--reason", "LIN-7", ref])
    assert res.exit_code == 0, res.output
    assert res.stdout.split() == [ref, "logins", "2", "1234"]
    # audited (tools' chain beside audit.file) before anything resolved
    [event] = [e for e in map(json.loads, (tmp_path / "audit-tools.jsonl").read_text().splitlines())
               if e["type"] == "provenance_resolved"]
    assert event["attrs"]["audiences"] == ["analytics"] and event["attrs"]["count"] == 1
    assert event["attrs"]["reason"] == "LIN-7" and event["attrs"]["outcome"] == "success"
    # a reference is base64url: those that look like options (even "-h") are references
    dash = [(o, r) for o in range(20000)
            if (r := provenance.reference(keys.provenance_key("analytics")[1], "logins", 0, o))
            .startswith(("-h", "-"))]
    for offset, r in [next(x for x in dash if x[1].startswith("-h")), dash[0]]:
        res = run(cli, [*args, "--audience", "analytics", r])
        assert res.exit_code == 0, res.output
        assert res.stdout.split() == [r, "logins", "0", str(offset)]
    res = run(cli, [*args, "--json"], input=f"streamproc.prov={header}\n")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"ref": ref, "audience": "analytics", "topic": "logins", "partition": 2,
                                      "offset": 1234}
    # fraud's key does not resolve analytics' reference; nothing is echoed
    res = run(cli, [*args, "--audience", "fraud", ref])
    assert res.exit_code == 1 and ref not in res.output
    assert "does not resolve to a configured source topic" in res.output
    forged = ("A" if ref[0] != "A" else "B") + ref[1:]
    assert run(cli, [*args, "--audience", "analytics", forged]).exit_code == 1
    # without an audit trail nothing resolves
    cfg.pop("audit")
    (tmp_path / "streamproc.yaml").write_text(yaml.safe_dump(cfg))
    res = run(cli, [*args, "--audience", "analytics", ref])
    assert res.exit_code == 1 and "audit trail unavailable, refusing to resolve" in res.output
    assert "logins" not in res.output


def test_date_shift_version_is_carried_and_old_shifts_recompute(make_pipeline: Any, keyring: Any) -> None:
    """Point 9, versioning: the shift follows the master version named by the output's
    ``k=`` (rotation visible), and each version's shift recomputes from that version."""
    from streamproc.client import RecordOpener, RecordSealer, provenance_of
    from streamproc.client.generator import EventGenerator
    from streamproc.pipeline.core import InputRecord
    from tests.unit.conftest import ORDER_SCHEMA, PSEUDONYM

    rec = EventGenerator(5).order()
    seen = {}
    for version in (1, 2):
        if version == 2:
            assert keyring.rotate(PSEUDONYM) == 2
        kit = make_pipeline()
        sealed = RecordSealer(keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas).seal(rec)
        [out] = [o for o in kit.pipeline.process([InputRecord("orders", 0, 7, b"k", sealed)]).outputs
                 if o.topic == "sanitized.fraud"]
        assert provenance_of(out.headers).key_version == version
        decoded = RecordOpener(keyring, kit.schemas).decode(out.topic, out.value)["birth_date"]
        shifted = (decoded - dt.date(1970, 1, 1)).days
        master = keyring.get_secret(PSEUDONYM, version)[1]
        info = b"audience\x00fraud\x00subject"
        key = hkdf_sha256(master, b"streamproc/dateshift/v2", info)
        x = int.from_bytes(hmac.new(key, rec["customer_id"].encode(), hashlib.sha256).digest()[:8], "big")
        days = (x >> 1) % 30 + 1
        birth = rec["birth_date"]
        birth = birth if isinstance(birth, int) else (birth - dt.date(1970, 1, 1)).days
        assert shifted == birth + (days if x & 1 else -days)
        seen[version] = shifted
    assert len(seen) == 2
