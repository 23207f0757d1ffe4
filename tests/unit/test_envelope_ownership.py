"""The envelope layout belongs to ``streamproc.crypto.envelope`` alone.

Failures carry the key the header names (``EnvelopeError.kek_id``/``kek_version``, then
``Quarantined``), so no other module parses envelope bytes again -- checked here over the
source tree, and through the audit trail's ``key_revocation_seen``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from streamproc.audit import AuditLog, MemorySink
from streamproc.client import RecordSealer
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import EnvelopeError, Reason
from streamproc.pipeline.core import Destination, InputRecord, Quarantined, Route
from streamproc.runtime.factory import WorkerAudit
from tests.unit.conftest import ORDER_SCHEMA, Maker

PACKAGE = Path(__file__).resolve().parents[2] / "streamproc"
#: Names of the envelope module that expose its byte layout.
LAYOUT = {"parse_header", "build_header", "EnvelopeHeader", "MIN_LEN", "NONCE_LEN", "TAG_LEN", "VERSION"}


def test_no_module_but_envelope_uses_the_layout() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "crypto" / "envelope.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "streamproc.crypto.envelope":
                offenders += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names if a.name in LAYOUT]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in LAYOUT - {"VERSION"}
                and isinstance(node.value, ast.Name)
                and node.value.id == "envelope"
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}: envelope.{node.attr}")
    assert offenders == []


def _error(opener: Opener, topic: str, data: bytes) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        opener.open(topic, data)
    return info.value


def test_envelope_errors_name_the_header_key_as_attributes_only(keyring: LocalKeyring) -> None:
    env = Sealer(keyring, "orders-kek", "orders").seal(b"payload")
    opener = Opener.for_kms(keyring)
    wrong = _error(opener, "payments", env)
    assert (wrong.reason, wrong.kek_id, wrong.kek_version) == (Reason.WRONG_TOPIC, "orders-kek", 1)
    tampered = env[:-1] + bytes([env[-1] ^ 1])
    err = _error(opener, "orders", tampered)
    assert (err.reason, err.kek_id, err.kek_version) == (Reason.TAMPERED, "orders-kek", 1)
    # An unconfigured id is producer-chosen text: the attribute holds it, the message not.
    assert "orders-kek" not in str(err) and "orders-kek" not in repr(err)
    opener.configure_keks({"orders-kek"}, lambda topic, kek: kek != "orders-kek")
    denied = _error(opener, "orders", env)
    assert (denied.reason, denied.kek_id, denied.kek_version) == (Reason.KEK_NOT_ALLOWED, "orders-kek", 1)
    keyring.rotate("orders-kek")
    keyring.revoke("orders-kek", 1)
    revoked = _error(Opener.for_kms(keyring), "orders", env)
    assert (revoked.reason, revoked.kek_id, revoked.kek_version) == (Reason.KEY_REVOKED, "orders-kek", 1)
    malformed = _error(opener, "orders", b"\x01\x00garbage")
    assert (malformed.reason, malformed.kek_id, malformed.kek_version) == (Reason.MALFORMED, None, None)


def test_quarantined_carries_the_key_and_the_audit_names_it(make_pipeline: Maker) -> None:
    """A revoked record's key reaches the audit through Quarantined, not a re-parse."""
    kit = make_pipeline(routes=[Route(("orders",), (Destination("out", "analytics", "analytics-kek"),))])
    sealer = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    from streamproc.client.generator import EventGenerator

    old = sealer.seal(EventGenerator(seed=1).order())
    kit.keyring.rotate("orders-kek")
    kit.keyring.revoke("orders-kek", 1)
    res = kit.pipeline.process([InputRecord("orders", 2, 7, b"k", old), InputRecord("orders", 2, 8, b"k", b"")])
    q, bad = res.quarantined
    assert (q.reason, q.kek_id, q.kek_version) == (Reason.KEY_REVOKED, "orders-kek", 1)
    assert (bad.reason, bad.kek_id, bad.kek_version) == (Reason.MALFORMED, None, None)

    sink = MemorySink()
    audit = WorkerAudit(AuditLog([sink], stream="processor:test"), kms="local", instance="t")
    # The record's bytes are not looked at: a value that is no envelope at all still
    # yields the event from the key the pipeline recorded.
    replaced = Quarantined(InputRecord("orders", 2, 9, None, b"not an envelope"), Reason.KEY_REVOKED, "", "orders-kek", 4)
    audit.after_batch([q, bad, replaced, q])
    events = [json.loads(line) for line in sink.lines]
    seen = [e for e in events if e["type"] == "key_revocation_seen"]
    assert [(e["attrs"]["key_id"], e["attrs"]["version"]) for e in seen] == [("orders-kek", 1), ("orders-kek", 4)]


def test_header_key_names_the_key_of_an_envelope_and_nothing_else(keyring: LocalKeyring) -> None:
    from streamproc.crypto.envelope import header_key

    env = Sealer(keyring, "orders-kek", "orders").seal(b"payload")
    assert header_key(env) == ("orders-kek", 1)
    assert header_key(b"") is None
    assert header_key(b"\x02" + env[1:]) is None
    assert header_key(env[:20]) is None
