"""streamproc.runtime.dlq: the parts test_dlq_format.py does not cover -- malformed
payloads, sealing a whole batch (every KMS failure is an outage, never a record's fault),
the DLQ key token (a known answer computed with ``cryptography`` and ``hmac``), and every
refusal of the reader."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streamproc.crypto.envelope import Sealer
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import KeyNotFound, KmsUnavailable, Reason, SealingUnavailable
from streamproc.pipeline.core import InputRecord, Quarantined
from streamproc.runtime.checkpoint import InvariantViolation
from streamproc.runtime.dlq import (
    H_DLQ_REASON,
    DeadLetterError,
    DeadLetterReader,
    DeadLetterWriter,
    OutDeadLetter,
    dead_letter_headers,
    decode_payload,
    dlq_key_token,
    encode_payload,
    from_quarantined,
)


@pytest.fixture()
def ring(tmp_path: Path) -> LocalKeyring:
    k = LocalKeyring.create(tmp_path / "ring.json")
    k.create_key("quarantine-kek")
    return k


def q(topic: str = "orders", offset: int = 41, key: bytes | None = b"k", value: bytes | None = b"v") -> Quarantined:
    return Quarantined(InputRecord(topic, 2, offset, key, value, None, ()), Reason.TAMPERED, "tag")


# -- malformed payloads ------------------------------------------------------------------------
def test_decode_refuses_what_is_not_a_dead_letter() -> None:
    with pytest.raises(DeadLetterError, match=r"^not a sealed-v1 dead letter payload$"):
        decode_payload(b"SPDL\x02" + bytes(100))
    good = encode_payload(from_quarantined(q()))
    with pytest.raises(DeadLetterError, match=r"^trailing bytes after the payload$"):
        decode_payload(good + b"\x00")
    for cut in (5, 40, len(good) - 1):  # in the fixed part, in a string, in the value
        with pytest.raises(DeadLetterError, match=r"^truncated payload$"):
            decode_payload(good[:cut])


def test_decode_refuses_a_string_length_past_the_end() -> None:
    d = from_quarantined(q())
    data = bytearray(encode_payload(d))
    fixed = 5 + struct.calcsize(">BiqqiiI32s32s")
    data[fixed : fixed + 2] = struct.pack(">H", 60_000)  # the reason's length
    with pytest.raises(DeadLetterError, match=r"^truncated payload$"):
        decode_payload(bytes(data))


def test_a_reference_payload_has_no_key_headers_or_value() -> None:
    d = dataclasses.replace(from_quarantined(q(key=b"kk", value=b"vvv")), key=None, headers=(), value=None, reference=True)
    back = decode_payload(encode_payload(d))
    assert back.reference and not back.complete
    assert (back.key, back.headers, back.value) == (None, (), None)
    assert (back.key_length, back.value_length) == (2, 3)
    assert back.value_sha256 == hashlib.sha256(b"vvv").digest()


def test_clear_headers_escape_the_detail_to_printable_ascii() -> None:
    rec = InputRecord("orders", 2, 41, b"k", b"v", None, (("user", b"alice"),))
    headers = dead_letter_headers(Quarantined(rec, Reason.TAMPERED, "a\nb\xe9\u20ac~"))
    assert dict(headers)["streamproc.dlq.detail"] == b"a\\x0ab\\xe9\\u20ac~"
    assert "streamproc.source.timestamp" not in dict(headers)  # the record had none
    assert "user" not in dict(headers)  # no original header travels in the clear


# -- sealing a batch ---------------------------------------------------------------------------
def test_seal_batch_one_dead_letter_per_record_in_order(ring: LocalKeyring) -> None:
    w = DeadLetterWriter(ring, "quarantine-kek", key_token=None)
    batch = [q("orders", 1), q("logins", 7), q("orders", 3)]
    out = w.seal_batch(batch, {"orders": "orders.dlq", "logins": "logins.dlq"})
    assert [type(o) for o in out] == [OutDeadLetter] * 3
    assert [o.topic for o in out] == ["orders.dlq", "logins.dlq", "orders.dlq"]
    reader = DeadLetterReader(ring)
    opened = [reader.open(o.topic, o.value, o.headers) for o in out]
    assert [(d.topic, d.offset) for d in opened] == [("orders", 1), ("logins", 7), ("orders", 3)]
    assert all(o.key is None for o in out)  # no key token: unkeyed


def test_seal_batch_without_a_dead_letter_topic_is_an_invariant_violation(ring: LocalKeyring) -> None:
    w = DeadLetterWriter(ring, "quarantine-kek", key_token=None)
    with pytest.raises(InvariantViolation, match=r"^quarantined record of 'payments' has no dead-letter topic$"):
        w.seal_batch([q("payments")], {"orders": "orders.dlq"})


class FailingSealer:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def seal(self, _plain: bytes) -> bytes:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (KeyNotFound("provider text"), "dead letters for 'orders.dlq' under 'quarantine-kek': KeyNotFound"),
        (KmsUnavailable("provider text"), "dead letters for 'orders.dlq' under 'quarantine-kek': KmsUnavailable"),
        (SealingUnavailable("already classified"), "already classified"),
    ],
)
def test_every_kms_failure_while_sealing_is_an_outage(ring: LocalKeyring, exc: Exception, expected: str) -> None:
    w = DeadLetterWriter(ring, "quarantine-kek", key_token=None,
                         sealer_factory=lambda _k, _kek, _t: FailingSealer(exc))  # type: ignore[arg-type,return-value]  # fmt: skip
    with pytest.raises(SealingUnavailable) as ei:
        w.seal_batch([q()], {"orders": "orders.dlq"})
    assert str(ei.value) == expected and "provider text" not in str(ei.value)


def test_check_makes_one_sealer_per_topic_and_generates_a_data_key(ring: LocalKeyring) -> None:
    made: list[tuple[str, str]] = []

    def factory(kms: LocalKeyring, kek: str, topic: str) -> Sealer:
        made.append((kek, topic))
        return Sealer(kms, kek, topic)

    w = DeadLetterWriter(ring, "quarantine-kek", key_token=None, sealer_factory=factory)  # type: ignore[arg-type]
    w.check(["a.dlq", "b.dlq"])
    w.seal_batch([q("a")], {"a": "a.dlq"})
    assert made == [("quarantine-kek", "a.dlq"), ("quarantine-kek", "b.dlq")]
    bad = DeadLetterWriter(ring, "no-such-kek", key_token=None)
    with pytest.raises(KeyNotFound):
        bad.check(["a.dlq"])


# -- the DLQ key token -------------------------------------------------------------------------
class FakeKeys:
    def master(self) -> tuple[int, bytes]:
        return 7, bytes(range(32))


def expected_token(version: int, master: bytes, info: str, data: bytes) -> bytes:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"streamproc/token/v2", info=info.encode()).derive(master)
    mac = hmac.new(key, data, hashlib.sha256).digest()[:16]
    return f"tk{version}_".encode() + base64.urlsafe_b64encode(mac).rstrip(b"=")


def test_dlq_key_token_known_answer_in_its_own_domain() -> None:
    token = dlq_key_token(SimpleNamespace(keys=FakeKeys()))  # type: ignore[arg-type]
    assert token is not None
    master = bytes(range(32))
    assert token(b"customer-42") == expected_token(7, master, "dead_letter\x00streamproc/dlq/record_key", b"customer-42")
    # never the token an audience or a shared domain would compute for the same key
    for info in ("audience\x00analytics\x00streamproc/dlq/record_key", "shared\x00streamproc/dlq/record_key"):
        assert token(b"customer-42") != expected_token(7, master, info, b"customer-42")
    assert token(b"customer-42") != token(b"customer-43")


def test_no_pseudonym_keys_no_dlq_key() -> None:
    assert dlq_key_token(SimpleNamespace(keys=None)) is None  # type: ignore[arg-type]
    assert dlq_key_token(SimpleNamespace()) is None  # type: ignore[arg-type]


# -- the reader's refusals ---------------------------------------------------------------------
def test_reader_refuses_a_dead_letter_without_a_value(ring: LocalKeyring) -> None:
    with pytest.raises(DeadLetterError, match=r"^dead letter without a value$"):
        DeadLetterReader(ring).open("orders.dlq", None, [])


def test_reader_names_the_reason_class_of_an_unopenable_value(ring: LocalKeyring) -> None:
    with pytest.raises(DeadLetterError, match=r"^cannot open the dead letter \(malformed_envelope\)$"):
        DeadLetterReader(ring).open("orders.dlq", b"\x01garbage", [])


@pytest.mark.parametrize("header", ["streamproc.dlq.reason", "streamproc.source.topic", "streamproc.source.partition"])
def test_reader_refuses_clear_headers_that_disagree(ring: LocalKeyring, header: str) -> None:
    w = DeadLetterWriter(ring, "quarantine-kek", key_token=None)
    _k, value, headers = w.build(q(), "orders.dlq")
    forged = [(n, b"forged" if n == header else v) for n, v in headers]
    with pytest.raises(DeadLetterError, match=f"^clear header {header} does not match the sealed dead letter$"):
        DeadLetterReader(ring).open("orders.dlq", value, forged)
    missing = [(n, v) for n, v in headers if n != H_DLQ_REASON]
    with pytest.raises(DeadLetterError, match=r"streamproc.dlq.reason does not match"):
        DeadLetterReader(ring).open("orders.dlq", value, missing)


def test_reader_refuses_a_sealed_copy_whose_digests_do_not_match(ring: LocalKeyring) -> None:
    d = from_quarantined(q(key=b"k", value=b"original"))
    forged = dataclasses.replace(d, value=b"replaced")  # digest still of "original"
    value = Sealer(ring, "quarantine-kek", "orders.dlq").seal(encode_payload(forged))
    headers = DeadLetterWriter(ring, "quarantine-kek", key_token=None).build(q(), "orders.dlq")[2]
    with pytest.raises(DeadLetterError, match=r"^sealed dead letter digests do not match its content$"):
        DeadLetterReader(ring).open("orders.dlq", value, headers)
    # a truncated dead letter's digest is of the whole original: not checked against the prefix
    cut = dataclasses.replace(d, value=b"orig", truncated=True)
    value = Sealer(ring, "quarantine-kek", "orders.dlq").seal(encode_payload(cut))
    got = DeadLetterReader(ring).open("orders.dlq", value, headers, where=("orders.dlq", 0, 9))
    assert got.truncated and got.value == b"orig" and got.dlq == ("orders.dlq", 0, 9)
