"""Re-identification: audience-bound keys, version checks, one audit event per call, CLI."""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.audit import (
    AuditLog,
    AuditSinkError,
    MemorySink,
    load_hmac_key,
    verify,
    verify_file,
    write_hmac_key,
)
from streamproc.cli.reidentify import export_audience, reidentify
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys, ReidentificationError
from streamproc.errors import ConfigError
from streamproc.operators import REGISTRY, OpContext
from streamproc.policy.model import parse_policy
from streamproc.reid import (
    AUDIENCE_KEY_FORMAT,
    AudienceKey,
    ExportRefused,
    Reidentifier,
    export_audience_key,
    export_audience_key_audited,
    reidentifiable_fields,
    write_audience_key,
)
from streamproc.schema.avro import Primitive
from streamproc.schema.registry import load_document

SECRET = "pseudonym-master"
POLICY_YAML = f"""keys: {{pseudonym: {SECRET}}}
audiences:
  fraud:
    tags:
      EMAIL: {{op: encrypt_deterministic, normalize: [lower, strip]}}
      ACCT: {{op: encrypt_deterministic, domain: acct}}
      BLOB: {{op: encrypt_deterministic, domain: blob}}
      PHONE: {{op: encrypt_deterministic, domain: customer}}
  support:
    tags:
      EMAIL: {{op: encrypt_deterministic, normalize: [lower, strip]}}
  analytics:
    tags:
      EMAIL: token
"""
POLICY = parse_policy(yaml.safe_load(POLICY_YAML))
POLICY_VERSION = POLICY.version
NORMALIZE = {"normalize": ["lower", "strip"]}
EMAIL = "Alice.Smith@Example.com "


@pytest.fixture
def ring(tmp_path: Path) -> LocalKeyring:
    r = LocalKeyring.create(tmp_path / "keys" / "keyring.json")
    r.create_key(SECRET, "secret")
    return r


@pytest.fixture
def pkeys(ring: LocalKeyring) -> PseudonymKeys:
    return PseudonymKeys(ring, SECRET)


def encryptor(
    keys: PseudonymKeys,
    audience: str,
    domain: str,
    params: dict[str, Any] | None = None,
    kind: str = "string",
) -> Callable[[Any], str]:
    """Exactly what a compiled plan runs for an ``encrypt_deterministic`` field."""
    op = REGISTRY["encrypt_deterministic"]
    p = NORMALIZE if params is None else params
    op.validate(p)
    fn: Callable[[Any], str] = op.bind(
        p, Primitive(kind), OpContext(audience, domain, "customer.email", keys)
    )
    return fn


def reidentifier(
    keys: PseudonymKeys, audience: str, version: int | None = None, policy: Any = POLICY
) -> tuple[Reidentifier, MemorySink]:
    sink = MemorySink()
    log = AuditLog([sink], stream="reidentify", clock=lambda: 1_700_000_000.0)
    return Reidentifier(export_audience_key(keys, audience, version), log, policy), sink


CALL = {
    "actor": "bob@corp.example",
    "field": "customer.email",
    "subject": "orders:3:1234",
    "reason": "INC0012345 chargeback review",
}


def test_round_trip_and_audit_event(pkeys: PseudonymKeys) -> None:
    ct = encryptor(pkeys, "fraud", "EMAIL")(EMAIL)
    assert ct.startswith("de1_")
    reid, sink = reidentifier(pkeys, "fraud")
    assert reid.reidentify(ct, "EMAIL", **CALL) == "alice.smith@example.com"
    (_, ev) = sink.events()  # after the chain's genesis
    assert ev["type"] == "reidentification" and ev["actor"] == "bob@corp.example"
    assert ev["ts"] == "2023-11-14T22:13:20.000000Z"
    assert ev["attrs"] == {
        "audience": "fraud",
        "domain": "EMAIL",
        "field": "customer.email",
        "subject": "orders:3:1234",
        "reason": "INC0012345 chargeback review",
        "policy_version": POLICY_VERSION,
        "key_version": 1,
        "outcome": "success",
        "value_digest": ev["attrs"]["value_digest"],
    }
    line = sink.lines[1].lower()
    assert b"alice" not in line and b"example.com" not in line  # no plaintext
    assert ct.encode().lower() not in line  # nor the ciphertext itself (only a digest)
    assert verify(sink.lines).ok


@pytest.mark.parametrize(
    ("kind", "value", "text"), [("long", 42, "42"), ("boolean", True, "true"), ("int", -7, "-7")]
)
def test_non_string_values_come_back_as_canonical_text(
    pkeys: PseudonymKeys, kind: str, value: Any, text: str
) -> None:
    ct = encryptor(pkeys, "fraud", "acct", {}, kind)(value)
    reid, _ = reidentifier(pkeys, "fraud")
    assert reid.reidentify(ct, "acct", **CALL) == text


def test_binary_plaintext_needs_reidentify_bytes(pkeys: PseudonymKeys) -> None:
    ct = encryptor(pkeys, "fraud", "blob", {}, "bytes")(b"\xff\x00\x01")
    reid, sink = reidentifier(pkeys, "fraud")
    with pytest.raises(ReidentificationError, match="binary"):
        reid.reidentify(ct, "blob", **CALL)
    assert reid.reidentify_bytes(ct, "blob", **CALL) == b"\xff\x00\x01"
    assert [e["attrs"]["outcome"] for e in sink.events()[1:]] == ["failed", "success"]
    assert sink.events()[1]["attrs"]["error"] == "not_text"


def test_audience_a_cannot_reverse_audience_b(pkeys: PseudonymKeys) -> None:
    ct_b = encryptor(pkeys, "support", "EMAIL")(EMAIL)
    reid_a, sink = reidentifier(pkeys, "fraud")
    with pytest.raises(ReidentificationError) as info:
        reid_a.reidentify(ct_b, "EMAIL", **CALL)
    assert ct_b not in str(info.value) and "alice" not in str(info.value).lower()
    (_, ev) = sink.events()  # after the chain's genesis
    assert ev["attrs"]["outcome"] == "failed" and ev["attrs"]["error"] == "decrypt_failed"
    assert ev["attrs"]["audience"] == "fraud"
    # and the right audience can
    reid_b, _ = reidentifier(pkeys, "support")
    assert reid_b.reidentify(ct_b, "EMAIL", **CALL) == "alice.smith@example.com"


def test_wrong_domain_fails(pkeys: PseudonymKeys) -> None:
    ct = encryptor(pkeys, "fraud", "EMAIL")(EMAIL)
    reid, sink = reidentifier(pkeys, "fraud")
    with pytest.raises(ReidentificationError, match="domain 'customer'"):
        reid.reidentify(ct, "customer", **CALL)
    assert sink.events()[1]["attrs"]["error"] == "decrypt_failed"


def test_modified_ciphertext_fails(pkeys: PseudonymKeys) -> None:
    ct = encryptor(pkeys, "fraud", "EMAIL")(EMAIL)
    reid, sink = reidentifier(pkeys, "fraud")
    bad = ct[:-2] + ("A" if ct[-2] != "A" else "B") + ct[-1]
    with pytest.raises(ReidentificationError):
        reid.reidentify(bad, "EMAIL", **CALL)
    assert sink.events()[1]["attrs"]["outcome"] == "failed"


def test_version_mismatch_after_master_rotation(ring: LocalKeyring, pkeys: PseudonymKeys) -> None:
    old_ct = encryptor(pkeys, "fraud", "EMAIL")(EMAIL)
    old_reid, _ = reidentifier(pkeys, "fraud")
    ring.rotate(SECRET)
    keys2 = PseudonymKeys(ring, SECRET)
    new_ct = encryptor(keys2, "fraud", "EMAIL")(EMAIL)
    assert new_ct.startswith("de2_") and new_ct != old_ct
    with pytest.raises(ReidentificationError) as info:
        old_reid.reidentify(new_ct, "EMAIL", **CALL)
    msg = str(info.value)
    assert "version 2" in msg and "version 1" in msg and "--version 2" in msg
    ev = old_reid.audit.sinks[0].events()[-1]  # type: ignore[attr-defined]
    assert (ev["attrs"]["outcome"], ev["attrs"]["error"], ev["attrs"]["key_version"]) == (
        "denied",
        "version_mismatch",
        1,
    )
    # each version's key reverses its own values; old values stay reversible with an old key
    new_reid, _ = reidentifier(keys2, "fraud")
    assert new_reid.reidentify(new_ct, "EMAIL", **CALL) == "alice.smith@example.com"
    v1_reid, _ = reidentifier(keys2, "fraud", version=1)
    assert v1_reid.reidentify(old_ct, "EMAIL", **CALL) == "alice.smith@example.com"
    with pytest.raises(ReidentificationError, match="version 1"):
        new_reid.reidentify(old_ct, "EMAIL", **CALL)


@pytest.mark.parametrize(
    ("change", "outcome", "error"),
    [
        ({}, "success", None),
        ({"value": "tk1_AAAAAAAAAAAAAAAAAAAAAA"}, "denied", "token_not_reversible"),
        ({"value": "alice@example.com"}, "denied", "not_ciphertext"),
        ({"domain": "customer"}, "failed", "decrypt_failed"),
        ({"subject": "alice@example.com"}, "denied", "invalid_subject"),
        ({"subject": None}, "success", None),
        ({"reason": ""}, "denied", "missing_reason"),
        ({"reason": "customer alice@example.com asked"}, "denied", "invalid_reason"),
        ({"field": "not a field"}, "denied", "invalid_field"),
        ({"domain": "two words"}, "denied", "invalid_domain"),
        ({"domain": "SSN"}, "denied", "domain_not_in_policy"),
        ({"actor": "Alice Smith"}, "denied", "invalid_actor"),
    ],
)
def test_every_call_writes_exactly_one_event(
    pkeys: PseudonymKeys, change: dict[str, Any], outcome: str, error: str | None
) -> None:
    ct = encryptor(pkeys, "fraud", "EMAIL")(EMAIL)
    reid, sink = reidentifier(pkeys, "fraud")
    args = {"value": ct, "domain": "EMAIL", **CALL, **change}
    value, domain = args.pop("value"), args.pop("domain")
    if outcome == "success":
        assert reid.reidentify(value, domain, **args) == "alice.smith@example.com"
    else:
        with pytest.raises(ReidentificationError) as info:
            reid.reidentify(value, domain, **args)
        assert "alice" not in str(info.value).lower() and ct not in str(info.value)
    assert len(sink.lines) == 2
    ev = sink.events()[1]
    assert ev["attrs"]["outcome"] == outcome and ev["attrs"].get("error") == error
    assert ev["attrs"]["audience"] == "fraud" and ev["attrs"]["policy_version"] == POLICY_VERSION
    assert ev["actor"] == ("unknown" if error == "invalid_actor" else CALL["actor"])
    line = sink.lines[1].lower()
    assert b"alice" not in line and b"smith" not in line  # plaintexts never reach the log
    assert verify(sink.lines).ok


def test_no_value_without_an_audit_trail(pkeys: PseudonymKeys) -> None:
    class Down(MemorySink):
        down = False

        def write(self, line: bytes) -> None:
            if self.down:
                raise AuditSinkError("disk full")
            super().write(line)

    ct = encryptor(pkeys, "fraud", "EMAIL")(EMAIL)
    sink = Down()
    log = AuditLog([sink], stream="r")
    sink.down = True
    reid = Reidentifier(export_audience_key(pkeys, "fraud"), log, POLICY)
    with pytest.raises(ReidentificationError, match="audit log could not be written"):
        reid.reidentify(ct, "EMAIL", **CALL)


def test_policy_gates_the_audience(pkeys: PseudonymKeys) -> None:
    policy = parse_policy(
        {
            "keys": {"pseudonym": SECRET},
            "audiences": {
                "fraud": {"tags": {"EMAIL": {"op": "encrypt_deterministic"}}},
                "analytics": {"tags": {"EMAIL": "token"}},
            },
        }
    )
    ct = encryptor(pkeys, "fraud", "EMAIL", {})(EMAIL)
    reid, sink = reidentifier(pkeys, "fraud", policy=policy)
    assert reid.reidentify(ct, "EMAIL", **CALL) == EMAIL
    assert sink.events()[1]["attrs"]["policy_version"] == policy.version
    an, sink = reidentifier(pkeys, "analytics", policy=policy)
    with pytest.raises(ReidentificationError, match="no encrypt_deterministic"):
        an.reidentify(ct, "EMAIL", **CALL)
    other, sink = reidentifier(pkeys, "support", policy=policy)
    with pytest.raises(ReidentificationError, match="not in the policy"):
        other.reidentify(ct, "EMAIL", **CALL)
    assert sink.events()[1]["attrs"]["error"] == "audience_not_in_policy"
    with pytest.raises(ConfigError):
        reidentifier(pkeys, "fraud", policy="v1")


def test_audience_key_file(tmp_path: Path, pkeys: PseudonymKeys) -> None:
    blob = export_audience_key(pkeys, "fraud")
    doc = json.loads(blob)
    assert (
        doc["format"] == AUDIENCE_KEY_FORMAT
        and doc["audience"] == "fraud"
        and doc["master_version"] == 1
    )
    assert set(doc) == {"format", "audience", "master_version", "key", "secret_id"}
    key = AudienceKey.from_bytes(blob)
    assert "key=" not in repr(key)  # material never in reprs
    assert key.key == pkeys.siv_key("fraud")[1]
    path = tmp_path / "fraud.key"
    write_audience_key(path, blob)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert AudienceKey.load(path) == key
    with pytest.raises(ConfigError, match="already exists"):
        write_audience_key(path, blob)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="0600"):
        AudienceKey.load(path)
    for broken in (
        b"nope",
        b"{}",
        json.dumps({**doc, "key": "!!"}).encode(),
        json.dumps({**doc, "master_version": 0}).encode(),
        json.dumps({k: v for k, v in doc.items() if k != "audience"}).encode(),
    ):
        with pytest.raises(ConfigError):
            AudienceKey.from_bytes(broken)


# -- CLI: the audited path is the only path ----------------------------------------------------------------


def os_user() -> str:
    """The OS user as `id -un` reports it (not the code under test, not $USER)."""
    return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


ORDER_SCHEMA = {
    "type": "record",
    "name": "Order",
    "namespace": "test",
    "fields": [
        {"name": "email", "type": "string", "confluent:tags": ["EMAIL"]},
        {
            "name": "customer",
            "type": {
                "type": "record",
                "name": "Customer",
                "fields": [{"name": "email", "type": "string", "confluent:tags": ["EMAIL"]}],
            },
        },
        {
            "name": "contact",
            "type": "string",
            "confluent:tags": ["EMAIL"],
            "streamproc.domain": "contact",
        },
        {"name": "note", "type": "string", "confluent:tags": ["PUBLIC"]},
    ],
}


def make_config(
    root: Path, ring: LocalKeyring, *, audit: str | None = "file", extra: str = ""
) -> Path:
    """A processor config over ``ring`` with POLICY_YAML, ORDER_SCHEMA and an audit file."""
    (root / "schemas").mkdir(parents=True, exist_ok=True)
    (root / "schemas" / "order.avsc").write_text(json.dumps(ORDER_SCHEMA))
    (root / "policy.yaml").write_text(POLICY_YAML)
    write_hmac_key(root / "audit.key")
    audit_section = (
        "audit: {file: ./audit/processor.jsonl, hmac_key_file: ./audit.key}\n"
        if audit == "file"
        else ""
    )
    cfg = root / "streamproc.yaml"
    cfg.write_text(
        'kafka: {bootstrap.servers: "127.0.0.1:9"}\n'
        "schemas: {directory: ./schemas}\n"
        f"kms: {{provider: local, path: {ring.path}}}\n"
        "policy: ./policy.yaml\n"
        "pipelines:\n"
        "  - sources: [orders]\n"
        "    dead_letter_topic: orders.dlq\n"
        "    destinations: [{topic: orders.fraud, audience: fraud, kek: fraud-kek}]\n"
        + audit_section
        + extra
    )
    return cfg


def tool_events(root: Path) -> list[dict[str, Any]]:
    path = root / "audit" / "processor-tools.jsonl"
    r = verify_file(path, hmac_key=load_hmac_key(root / "audit.key"), require_hmac=True)
    assert r.ok, r.report()
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_export_and_reidentify(
    tmp_path: Path, ring: LocalKeyring, pkeys: PseudonymKeys
) -> None:
    runner = CliRunner()
    cfg = make_config(tmp_path, ring)
    key_file = tmp_path / "fraud.key"
    res = runner.invoke(
        export_audience,
        ["--config", str(cfg), "--audience", "fraud", "--out", str(key_file),
         "--actor", "custodian on INC-77"],
    )
    assert res.exit_code == 0, res.output
    assert "master version 1" in res.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    evs = tool_events(tmp_path)
    assert evs[0]["type"] == "chain_started" and evs[0]["stream"] == "tools"
    exp = evs[1]
    assert exp["type"] == "audience_key_exported"
    assert exp["actor"] == os_user()  # who really ran it, not what was typed
    assert exp["attrs"] == {
        "kms": "local",
        "key_id": SECRET,
        "audience": "fraud",
        "key_version": 1,
        "outcome": "success",
        "policy_version": POLICY.version,
        "actor_source": "os",
        "note": "custodian on INC-77",
    }
    # a second export to the same file is refused -- and audited
    res = runner.invoke(
        export_audience, ["--config", str(cfg), "--audience", "fraud", "--out", str(key_file)]
    )
    assert res.exit_code == 1 and "already exists" in res.output
    assert tool_events(tmp_path)[-1]["attrs"]["error"] == "file_exists"

    enc = encryptor(pkeys, "fraud", "EMAIL")
    cts = [enc("a@x.org"), enc("B@Y.org")]
    base = [
        "--config", str(cfg), "--key-file", str(key_file), "--domain", "EMAIL",
        "--field", "customer.email", "--actor", "bob", "--reason", "INC-77 fraud review",
    ]
    res = runner.invoke(reidentify, [*base, *cts])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["a@x.org", "b@y.org"]
    res = runner.invoke(reidentify, base, input=f"{cts[1]}\n\n{cts[0]}\n")
    assert res.exit_code == 0 and res.output.splitlines() == ["b@y.org", "a@x.org"]
    # a foreign value stops the run with exit 1 and no echo of the input
    foreign = encryptor(pkeys, "support", "EMAIL")("c@z.org")
    res = runner.invoke(reidentify, [*base, cts[0], foreign, cts[1]])
    assert res.exit_code == 1
    assert res.stdout.splitlines() == ["a@x.org"]
    assert "value #2" in res.stderr and foreign not in res.stderr
    reids = [e for e in tool_events(tmp_path) if e["type"] == "reidentification"]
    assert [e["attrs"]["outcome"] for e in reids] == ["success"] * 5 + ["failed"]
    assert {e["actor"] for e in reids} == {os_user()}
    assert {(e["attrs"]["actor_source"], e["attrs"]["note"]) for e in reids} == {("os", "bob")}
    text = (tmp_path / "audit" / "processor-tools.jsonl").read_text()
    assert "x.org" not in text and "y.org" not in text and "z.org" not in text


def test_cli_refuses_without_an_audit_section(
    tmp_path: Path, ring: LocalKeyring, pkeys: PseudonymKeys
) -> None:
    runner = CliRunner()
    cfg = make_config(tmp_path, ring, audit=None)
    key_file = tmp_path / "fraud.key"
    res = runner.invoke(
        export_audience, ["--config", str(cfg), "--audience", "fraud", "--out", str(key_file)]
    )
    assert res.exit_code == 1 and "no audit: section" in res.output
    assert not key_file.exists()
    write_audience_key(key_file, export_audience_key(pkeys, "fraud"))
    ct = encryptor(pkeys, "fraud", "EMAIL")("dana@example.org")
    res = runner.invoke(
        reidentify,
        ["--config", str(cfg), "--key-file", str(key_file), "--domain", "EMAIL",
         "--field", "email", "--reason", "INC-1", ct],
    )
    assert res.exit_code == 1 and "audit log unavailable" in res.output
    assert "dana" not in res.output


def test_cli_policy_checks_are_always_on(
    tmp_path: Path, ring: LocalKeyring, pkeys: PseudonymKeys
) -> None:
    runner = CliRunner()
    cfg = make_config(tmp_path, ring)
    out = tmp_path / "k.key"
    for audience, error in [
        ("nobody", "audience_not_in_policy"),
        ("analytics", "audience_has_no_encrypt_deterministic"),
    ]:
        res = runner.invoke(
            export_audience, ["--config", str(cfg), "--audience", audience, "--out", str(out)]
        )
        assert res.exit_code == 1 and not out.exists(), res.output
        ev = tool_events(tmp_path)[-1]
        assert (ev["type"], ev["attrs"]["outcome"], ev["attrs"]["error"]) == (
            "audience_key_exported", "denied", error,
        )
    res = runner.invoke(
        export_audience, ["--config", str(cfg), "--audience", "fraud", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    ct = encryptor(pkeys, "fraud", "EMAIL")("dana@example.org")
    base = ["--config", str(cfg), "--key-file", str(out), "--field", "email",
            "--subject", "orders:0:17"]
    res = runner.invoke(reidentify, [*base, "--domain", "EMAIL", "--reason", "INC-1", ct])
    assert res.exit_code == 0 and res.output.strip() == "dana@example.org"
    ev = tool_events(tmp_path)[-1]
    assert ev["attrs"]["subject"] == "orders:0:17"
    assert ev["attrs"]["policy_version"] == POLICY.version
    # a domain no encrypt_deterministic rule of the audience produces: denied, audited
    res = runner.invoke(reidentify, [*base, "--domain", "SSN", "--reason", "INC-1", ct])
    assert res.exit_code == 1 and "dana" not in res.output
    assert tool_events(tmp_path)[-1]["attrs"]["error"] == "domain_not_in_policy"
    res = runner.invoke(reidentify, [*base, "--domain", "EMAIL", "--reason", "call 555 123 4567", ct])
    assert res.exit_code == 1 and "personal data" in res.stderr
    assert tool_events(tmp_path)[-1]["attrs"]["error"] == "invalid_reason"


def test_cli_field_must_be_encrypted_deterministically_in_a_source_schema(
    tmp_path: Path, ring: LocalKeyring, pkeys: PseudonymKeys
) -> None:
    """The field is checked against the schemas: a domain hint makes its domain
    reversible for that field only; unknown or not-ED fields are denied and audited."""
    runner = CliRunner()
    cfg = make_config(tmp_path, ring)
    key_file = tmp_path / "fraud.key"
    write_audience_key(key_file, export_audience_key(pkeys, "fraud"))
    hinted = encryptor(pkeys, "fraud", "contact")("erin@example.org")
    base = ["--config", str(cfg), "--key-file", str(key_file), "--reason", "INC-9"]
    cases = [
        (["--field", "contact", "--domain", "contact"], 0, None),
        (["--field", "email", "--domain", "contact"], 1, "domain_not_in_policy"),
        (["--field", "note", "--domain", "EMAIL"], 1, "field_not_reidentifiable"),
        (["--field", "customer.phone", "--domain", "EMAIL"], 1, "field_not_reidentifiable"),
    ]
    for args, code, error in cases:
        res = runner.invoke(reidentify, [*base, *args, hinted])
        assert res.exit_code == code, (args, res.output)
        ev = tool_events(tmp_path)[-1]
        assert ev["attrs"].get("error") == error, args
        assert ("erin" in res.output) == (code == 0)
    # the field check follows the schemas: a policy-level domain without the schema's
    # field is not enough
    assert reidentifiable_fields(POLICY, "fraud", [load_document(tmp_path / "schemas" / "order.avsc")]) == {
        "email": {"EMAIL"},
        "customer.email": {"EMAIL"},
        "contact": {"contact"},
    }
    assert reidentifiable_fields(POLICY, "analytics", [load_document(tmp_path / "schemas" / "order.avsc")]) == {}


def test_registry_schemas_are_the_sources_of_the_audience(tmp_path: Path, ring: LocalKeyring) -> None:
    """With a registry, the latest <source>-value schema of the audience's pipelines
    (confluent-kafka's in-memory registry client stands in for the server)."""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    from streamproc.cli.reidentify import source_schemas
    from streamproc.config import load_config

    client = SchemaRegistryClient.new_client({"url": "mock://reid"})  # in-memory
    client.register_schema("orders-value", Schema(json.dumps(ORDER_SCHEMA), "AVRO"))
    client.register_schema("other-value", Schema(json.dumps({**ORDER_SCHEMA, "name": "X"}), "AVRO"))
    cfg_path = make_config(tmp_path, ring)
    cfg_path.write_text(
        cfg_path.read_text().replace("schemas: {directory: ./schemas}", "schemas: {url: 'mock://reid'}")
    )
    config = load_config(cfg_path)
    got = source_schemas(config, "fraud", registry_client=client)
    assert [rs.subject for rs in got] == ["orders-value"]
    assert reidentifiable_fields(POLICY, "fraud", got)["contact"] == {"contact"}
    assert source_schemas(config, "support", registry_client=client) == []  # no pipeline


def test_cli_refusals_are_audited_and_fail_closed(
    tmp_path: Path, ring: LocalKeyring, pkeys: PseudonymKeys
) -> None:
    runner = CliRunner()
    cfg = make_config(tmp_path, ring)
    key_file = tmp_path / "fraud.key"
    write_audience_key(key_file, export_audience_key(pkeys, "fraud"))
    ct = encryptor(pkeys, "fraud", "EMAIL")("dana@example.org")
    base = ["--config", str(cfg), "--key-file", str(key_file), "--domain", "EMAIL",
            "--field", "email", "--reason", "INC-1", ct]
    # a key file others can read: refused, and the refusal is one audit event
    key_file.chmod(0o644)
    res = runner.invoke(reidentify, base)
    assert res.exit_code == 1 and "0600" in res.output and "dana" not in res.output
    ev = tool_events(tmp_path)[-1]
    assert (ev["type"], ev["attrs"]["outcome"], ev["attrs"]["error"]) == (
        "reidentification", "denied", "key_file_refused",
    )
    assert ev["actor"] == os_user() and ev["attrs"]["actor_source"] == "os"
    key_file.chmod(0o600)
    # a tampered tools chain blocks re-identification altogether
    tools = tmp_path / "audit" / "processor-tools.jsonl"
    tools.write_text(tools.read_text().replace('"key_file_refused"', '"key_file_refusex"', 1))
    res = runner.invoke(reidentify, base)
    assert res.exit_code == 1 and "audit log unavailable" in res.output
    assert "dana" not in res.output
    # ...and so does one that was emptied (its exported head knows better)
    tools.write_text("")
    res = runner.invoke(reidentify, base)
    assert res.exit_code == 1 and "audit log unavailable" in res.output and "seq" in res.output
    assert tools.read_text() == ""


def test_cli_kafka_audit_failure_reveals_nothing(
    tmp_path: Path, ring: LocalKeyring, pkeys: PseudonymKeys
) -> None:
    """An audit topic on a port nothing listens on: the event cannot be delivered, so the
    export writes no file (librdkafka's own timeout, shortened for the test)."""
    cfg = make_config(
        tmp_path,
        ring,
        audit=None,
        extra="producer: {message.timeout.ms: 1500}\naudit: {kafka_topic: streamproc.audit}\n",
    )
    out = tmp_path / "k.key"
    res = CliRunner().invoke(
        export_audience, ["--config", str(cfg), "--audience", "fraud", "--out", str(out)]
    )
    assert res.exit_code == 1 and "audit" in res.output, res.output
    assert not out.exists()


def test_wired_into_the_main_cli(tmp_path: Path, ring: LocalKeyring) -> None:
    from streamproc.cli import main

    cfg = make_config(tmp_path, ring)
    res = CliRunner().invoke(
        main.cli,
        ["keys", "export-audience", "--config", str(cfg), "--audience", "fraud",
         "--out", str(tmp_path / "f.key")],
    )
    assert res.exit_code == 0, res.output
    assert "reidentify" in main.cli.commands and "audit" in main.cli.commands
    res = CliRunner().invoke(
        main.cli,
        ["audit", "verify", str(tmp_path / "audit" / "processor-tools.jsonl"),
         "--hmac-key-file", str(tmp_path / "audit.key"), "--require-hmac"],
    )
    assert res.exit_code == 0 and res.output.startswith("OK: 2 events"), res.output


def test_cli_export_audience_from_a_wrapped_secret_file(tmp_path: Path, ring: LocalKeyring) -> None:
    """pseudonym_secrets: wrapped_file exports the same key the worker uses."""
    from streamproc.crypto.wrapped_secrets import WrappedSecretFile

    ring.ensure_key("secrets-kek")
    wrapped = WrappedSecretFile(tmp_path / "pseudonym.json", ring, kek="secrets-kek")
    wrapped.create("pseudonym-master", "secrets-kek")
    cfg = make_config(
        tmp_path,
        ring,
        extra="pseudonym_secrets: {provider: wrapped_file, path: pseudonym.json, kek: secrets-kek}\n",
    )
    key_file = tmp_path / "fraud.key"
    res = CliRunner().invoke(
        export_audience,
        ["--config", str(cfg), "--audience", "fraud", "--out", str(key_file)],
    )
    assert res.exit_code == 0, res.output
    wkeys = PseudonymKeys(
        WrappedSecretFile(tmp_path / "pseudonym.json", ring, kek="secrets-kek"), "pseudonym-master"
    )
    ct = encryptor(wkeys, "fraud", "EMAIL")("a@x.org")
    log = AuditLog([MemorySink()], stream="t")
    assert Reidentifier(key_file, log, POLICY).reidentify(
        ct, "EMAIL", actor="bob", field="email", reason="case-1"
    ) == "a@x.org"


def test_no_key_file_without_an_audit_event(tmp_path: Path, pkeys: PseudonymKeys) -> None:
    class Down(MemorySink):
        down = False

        def write(self, line: bytes) -> None:
            if self.down:
                raise AuditSinkError("disk full")
            super().write(line)

    sink = Down()
    log = AuditLog([sink], stream="tools")
    sink.down = True
    out = tmp_path / "fraud.key"
    with pytest.raises(ExportRefused, match="audit log could not be written"):
        export_audience_key_audited(
            pkeys, "fraud", out, audit=log, policy=POLICY, kms="local", secret_id=SECRET
        )
    assert not out.exists()
    sink.down = False
    exported = export_audience_key_audited(
        pkeys, "fraud", out, audit=log, policy=POLICY, kms="local", secret_id=SECRET
    )
    assert AudienceKey.load(out) == exported
    ev = sink.events()[-1]
    assert (ev["type"], ev["attrs"]["outcome"], ev["attrs"]["key_version"]) == (
        "audience_key_exported",
        "success",
        1,
    )
