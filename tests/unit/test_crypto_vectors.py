"""Known-answer tests: the primitives we rely on, and envelope wire format v1.

The primitive vectors come from their specifications (McGrew & Viega, "The Galois/Counter
Mode of Operation", test cases 13-16; RFC 5297 appendix A; RFC 5869 appendix A; RFC 4231
section 4).  A failing vector is a typo in this file or a broken primitive, never a reason
to loosen an assertion.

The envelope vector pins the exact bytes of format v1 (docs/wire-format.md shows the same
example).  Its expected value is computed here from the documented layout, byte by byte,
and also written out as a literal, so that any change to the format breaks this test.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from streamproc.crypto import envelope
from streamproc.crypto.dek_cache import DekCache
from streamproc.crypto.kms import DataKey
from streamproc.errors import UnwrapFailed


def h(s: str) -> bytes:
    """Hex with optional whitespace, as the specifications print it."""
    return bytes.fromhex("".join(s.split()))


# ---------------------------------------------------------------------------------------
# AES-256-GCM: McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13-16
# ---------------------------------------------------------------------------------------
_GCM_K15 = h("feffe9928665731c6d6a8f9467308308 feffe9928665731c6d6a8f9467308308")
_GCM_P15 = h(
    "d9313225f88406e5a55909c5aff5269a 86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525 b16aedf5aa0de657ba637b391aafd255"
)
_GCM_C15 = h(
    "522dc1f099567d07f47f37a32a84427d 643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838 c5f61e6393ba7a0abcc9f662898015ad"
)

GCM_VECTORS = [
    pytest.param(
        bytes(32), bytes(12), b"", b"", b"", h("530f8afbc74536b9a963b4f1c4cb738b"), id="tc13-empty"
    ),
    pytest.param(
        bytes(32),
        bytes(12),
        bytes(16),
        b"",
        h("cea7403d4d606b6e074ec5d3baf39d18"),
        h("d0d1c8a799996bf0265b98b5d48ab919"),
        id="tc14-one-block",
    ),
    pytest.param(
        _GCM_K15,
        h("cafebabefacedbaddecaf888"),
        _GCM_P15,
        b"",
        _GCM_C15,
        h("b094dac5d93471bdec1a502270e3cc6c"),
        id="tc15-no-aad",
    ),
    pytest.param(
        _GCM_K15,
        h("cafebabefacedbaddecaf888"),
        _GCM_P15[:60],
        h("feedfacedeadbeeffeedfacedeadbeef abaddad2"),
        _GCM_C15[:60],
        h("76fc6ece0f4e1768cddf8853bb2d551b"),
        id="tc16-with-aad",
    ),
]


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_aes256_gcm_known_answers(
    key: bytes, iv: bytes, pt: bytes, aad: bytes, ct: bytes, tag: bytes
) -> None:
    aead = AESGCM(key)
    assert aead.encrypt(iv, pt, aad or None) == ct + tag
    assert aead.decrypt(iv, ct + tag, aad or None) == pt


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_aes256_gcm_rejects_modified_tag_and_aad(
    key: bytes, iv: bytes, pt: bytes, aad: bytes, ct: bytes, tag: bytes
) -> None:
    aead = AESGCM(key)
    bad_tag = tag[:-1] + bytes([tag[-1] ^ 0x01])
    with pytest.raises(InvalidTag):
        aead.decrypt(iv, ct + bad_tag, aad or None)
    with pytest.raises(InvalidTag):
        aead.decrypt(iv, ct + tag, aad + b"\x00")


# ---------------------------------------------------------------------------------------
# AES-SIV: RFC 5297 appendix A
# ---------------------------------------------------------------------------------------
def test_aes_siv_rfc5297_a1_deterministic() -> None:
    key = h(
        "fffefdfc fbfaf9f8 f7f6f5f4 f3f2f1f0"
        "f0f1f2f3 f4f5f6f7 f8f9fafb fcfdfeff"
    )
    ad = h("10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627")
    pt = h("11223344 55667788 99aabbcc ddee")
    expected = h(
        "85632d07 c6e8f37f 950acd32 0a2ecc93"  # V (the synthetic IV)
        "40c02b96 90c4dc04 daef7f6a fe5c"  # C
    )
    siv = AESSIV(key)
    assert siv.encrypt(pt, [ad]) == expected
    assert siv.decrypt(expected, [ad]) == pt
    # Deterministic: the same input always gives the same output.
    assert siv.encrypt(pt, [ad]) == siv.encrypt(pt, [ad])
    with pytest.raises(InvalidTag):
        siv.decrypt(expected, [ad + b"\x00"])


def test_aes_siv_rfc5297_a2_nonce_based_multiple_ad() -> None:
    key = h(
        "7f7e7d7c 7b7a7978 77767574 73727170"
        "40414243 44454647 48494a4b 4c4d4e4f"
    )
    ad1 = h(
        "00112233 44556677 8899aabb ccddeeff"
        "deaddada deaddada ffeeddcc bbaa9988"
        "77665544 33221100"
    )
    ad2 = h("10203040 50607080 90a0")
    nonce = h("09f91102 9d74e35b d84156c5 635688c0")
    pt = h(
        "74686973 20697320 736f6d65 20706c61"
        "696e7465 78742074 6f20656e 63727970"
        "74207573 696e6720 5349562d 414553"
    )
    assert pt == b"this is some plaintext to encrypt using SIV-AES"
    expected = h(
        "7bdb6e3b 432667eb 06f4d14b ff2fbd0f"  # V
        "cb900f2f ddbe4043 26601965 c889bf17"
        "dba77ceb 094fa663 b7a3f748 ba8af829"
        "ea64ad54 4a272e9c 485b62a3 fd5c0d"
    )
    siv = AESSIV(key)
    # The RFC treats the nonce as the last associated-data component.
    assert siv.encrypt(pt, [ad1, ad2, nonce]) == expected
    assert siv.decrypt(expected, [ad1, ad2, nonce]) == pt
    # Order of the associated-data components matters.
    with pytest.raises(InvalidTag):
        siv.decrypt(expected, [ad2, ad1, nonce])


# ---------------------------------------------------------------------------------------
# HKDF-SHA256: RFC 5869 appendix A, test cases 1-3
# ---------------------------------------------------------------------------------------
HKDF_VECTORS = [
    pytest.param(
        b"\x0b" * 22,
        h("000102030405060708090a0b0c"),
        h("f0f1f2f3f4f5f6f7f8f9"),
        42,
        h("077709362c2e32df0ddc3f0dc47bba63 90b6c73bb50f9c3122ec844ad7c2b3e5"),
        h(
            "3cb25f25faacd57a90434f64d0362f2a 2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
            "34007208d5b887185865"
        ),
        id="tc1-basic",
    ),
    pytest.param(
        bytes(range(0x00, 0x50)),
        bytes(range(0x60, 0xB0)),
        bytes(range(0xB0, 0x100)),
        82,
        h("06a6b88c5853361a06104c9ceb35b45c ef760014904671014a193f40c15fc244"),
        h(
            "b11e398dc80327a1c8e7f78c596a4934 4f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09 da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f 1d87"
        ),
        id="tc2-long-inputs",
    ),
    pytest.param(
        b"\x0b" * 22,
        b"",
        b"",
        42,
        h("19ef24a32c717b167f33a91d6f648bdf 96596776afdb6377ac434c1c293ccb04"),
        h(
            "8da4e775a563c18f715f802a063c5a31 b8a11f5c5ee1879ec3454e5f3c738d2d"
            "9d201395faa4b61a96c8"
        ),
        id="tc3-empty-salt-info",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), HKDF_VECTORS)
def test_hkdf_sha256_rfc5869(
    ikm: bytes, salt: bytes, info: bytes, length: int, prk: bytes, okm: bytes
) -> None:
    assert len(okm) == length
    derived = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)
    assert derived == okm
    # The extract step is HMAC(salt, IKM), with a zero-filled salt when none is given.
    assert hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest() == prk
    # And the expand step on its own, from the published PRK.
    assert HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(prk) == okm


# ---------------------------------------------------------------------------------------
# HMAC-SHA256: RFC 4231 section 4
# ---------------------------------------------------------------------------------------
HMAC_VECTORS = [
    pytest.param(
        b"\x0b" * 20,
        b"Hi There",
        h("b0344c61d8db38535ca8afceaf0bf12b 881dc200c9833da726e9376c2e32cff7"),
        id="tc1",
    ),
    pytest.param(
        b"Jefe",
        b"what do ya want for nothing?",
        h("5bdcc146bf60754e6a042426089575c7 5a003f089d2739839dec58b964ec3843"),
        id="tc2-short-key",
    ),
    pytest.param(
        b"\xaa" * 20,
        b"\xdd" * 50,
        h("773ea91e36800e46854db8ebd09181a7 2959098b3ef8c122d9635514ced565fe"),
        id="tc3",
    ),
    pytest.param(
        bytes(range(0x01, 0x1A)),
        b"\xcd" * 50,
        h("82558a389a443c0ea4cc819899f2083a 85f0faa3e578f8077a2e3ff46729665b"),
        id="tc4",
    ),
    pytest.param(
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        h("60e431591ee0b67f0d8a26aacbf5b77f 8e0bc6213728c5140546040f0ee37f54"),
        id="tc6-long-key",
    ),
    pytest.param(
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than "
        b"block-size data. The key needs to be hashed before being used by the "
        b"HMAC algorithm.",
        h("9b09ffa71b942fcb27635fbcd5b0e944 bfdc63644f0713938a7f51535c3a35e2"),
        id="tc7-long-key-and-data",
    ),
]


@pytest.mark.parametrize(("key", "data", "mac"), HMAC_VECTORS)
def test_hmac_sha256_rfc4231(key: bytes, data: bytes, mac: bytes) -> None:
    assert hmac.new(key, data, hashlib.sha256).digest() == mac
    m = crypto_hmac.HMAC(key, hashes.SHA256())
    m.update(data)
    assert m.finalize() == mac


def test_hmac_sha256_rfc4231_tc5_truncated() -> None:
    mac = hmac.new(b"\x0c" * 20, b"Test With Truncation", hashlib.sha256).digest()
    assert mac[:16] == h("a3b6167473100ee06e0c796c2955552b")


# ---------------------------------------------------------------------------------------
# Envelope format v1: a fixed example, pinned byte for byte
# ---------------------------------------------------------------------------------------
KAT_DEK = bytes(range(32))  # 000102...1f
KAT_KEK_ID = "orders-kek"
KAT_KEK_VERSION = 3
KAT_WRAPPED = bytes(range(0xF0, 0x100))  # a 16-byte stand-in; the format treats it as opaque
KAT_TOPIC = "orders"
KAT_NONCE = h("cafebabefacedbaddecaf888")
# Confluent-framed Avro: magic 0x00, schema id 42 (u32 BE), Avro binary of {"name": "Alice"}
# (a string is a zigzag varint length, 5 -> 0x0a, then the UTF-8 bytes).
KAT_PLAINTEXT = h("00 0000002a 0a") + b"Alice"

KAT_HEADER_HEX = (
    "01"  # version
    "0a"  # KEK id length = 10
    "6f72646572732d6b656b"  # "orders-kek"
    "00000003"  # KEK version 3
    "0010"  # wrapped key length = 16
    "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"  # wrapped data key
    "1c168adb"  # SHA-256("orders")[:4]
)
KAT_AAD_HEX = (
    "73747265616d70726f632f656e762f763100"  # "streamproc/env/v1\0"
    "0006"  # topic length = 6
    "6f7264657273"  # "orders"
) + KAT_HEADER_HEX
KAT_ENVELOPE_HEX = (
    KAT_HEADER_HEX
    + "cafebabefacedbaddecaf888"  # nonce
    + "8aa3a02680700e772f6838"  # ciphertext (11 bytes, as long as the plaintext)
    + "d1de1e00b8a0a3aea367bed2975a5b97"  # GCM tag (16 bytes)
)


def _independent_envelope() -> tuple[bytes, bytes]:
    """Build the envelope from the documented layout, without streamproc code."""
    kid = KAT_KEK_ID.encode("utf-8")
    header = (
        bytes([0x01])
        + bytes([len(kid)])
        + kid
        + KAT_KEK_VERSION.to_bytes(4, "big")
        + len(KAT_WRAPPED).to_bytes(2, "big")
        + KAT_WRAPPED
        + hashlib.sha256(KAT_TOPIC.encode("utf-8")).digest()[:4]
    )
    topic = KAT_TOPIC.encode("utf-8")
    aad = b"streamproc/env/v1\x00" + len(topic).to_bytes(2, "big") + topic + header
    return header + KAT_NONCE + AESGCM(KAT_DEK).encrypt(KAT_NONCE, KAT_PLAINTEXT, aad), aad


class FixedKms:
    """A KMS that hands out the known-answer data key and unwraps only its wrapped form."""

    name = "fixed"

    def __init__(self) -> None:
        self.unwrap_calls = 0

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        assert kek_id == KAT_KEK_ID
        assert dict(context) == {"topic": KAT_TOPIC}
        return DataKey(KAT_KEK_ID, KAT_KEK_VERSION, KAT_DEK, KAT_WRAPPED)

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        self.unwrap_calls += 1
        if (kek_id, kek_version, wrapped, dict(context)) != (
            KAT_KEK_ID,
            KAT_KEK_VERSION,
            KAT_WRAPPED,
            {"topic": KAT_TOPIC},
        ):
            raise UnwrapFailed("not the known-answer key")
        return KAT_DEK

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        return False


def test_envelope_v1_independent_computation_matches_pinned_hex() -> None:
    env, aad = _independent_envelope()
    assert aad.hex() == KAT_AAD_HEX
    assert env.hex() == KAT_ENVELOPE_HEX
    assert len(env) == 1 + 1 + 10 + 4 + 2 + 16 + 4 + 12 + len(KAT_PLAINTEXT) + 16


def test_envelope_v1_seal_produces_pinned_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    nonces: list[int] = []

    def fixed_urandom(n: int) -> bytes:
        nonces.append(n)
        return KAT_NONCE

    monkeypatch.setattr(envelope, "os", types.SimpleNamespace(urandom=fixed_urandom))
    sealer = envelope.Sealer(FixedKms(), KAT_KEK_ID, KAT_TOPIC)
    assert sealer.seal(KAT_PLAINTEXT).hex() == KAT_ENVELOPE_HEX
    assert sealer.seal_many([KAT_PLAINTEXT, KAT_PLAINTEXT]) == [bytes.fromhex(KAT_ENVELOPE_HEX)] * 2
    assert nonces == [12, 12, 12]


def test_envelope_v1_build_and_parse_header_match_pinned_bytes() -> None:
    header = envelope.build_header(KAT_KEK_ID, KAT_KEK_VERSION, KAT_WRAPPED, KAT_TOPIC)
    assert header.hex() == KAT_HEADER_HEX
    assert envelope.topic_fingerprint(KAT_TOPIC).hex() == "1c168adb"
    parsed = envelope.parse_header(bytes.fromhex(KAT_ENVELOPE_HEX))
    assert parsed == envelope.EnvelopeHeader(
        KAT_KEK_ID, KAT_KEK_VERSION, KAT_WRAPPED, h("1c168adb"), len(header)
    )


def test_envelope_v1_pinned_bytes_open() -> None:
    kms = FixedKms()
    opened = envelope.Opener(DekCache(kms)).open(KAT_TOPIC, bytes.fromhex(KAT_ENVELOPE_HEX))
    assert opened == envelope.Opened(KAT_PLAINTEXT, KAT_KEK_ID, KAT_KEK_VERSION)
    assert kms.unwrap_calls == 1


def test_wire_format_doc_shows_the_pinned_example() -> None:
    """docs/wire-format.md's worked example is these exact bytes."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire-format.md").read_text()
    block = re.search(r"The whole envelope as one hex string:\s*```\n(.*?)```", doc, re.S)
    assert block is not None
    assert "".join(block.group(1).split()) == KAT_ENVELOPE_HEX
    assert f"`{KAT_DEK.hex()}`" in doc
    assert f"`{KAT_PLAINTEXT.hex()}`" in doc
    aad_block = doc.split("The AAD, 64 bytes:")[1].split("```")[1]
    aad_lines = [line.split()[0] for line in aad_block.splitlines() if line.strip()]
    assert "".join(aad_lines) == KAT_AAD_HEX


# ---------------------------------------------------------------------------------------
# streamproc's own derivations: token, record-key token, shared-domain token,
# deterministic encryption, date shift, provenance reference (docs/keys.md, "Known-answer
# vectors").  Each expected value is (1) a literal pinned here and in the docs and (2)
# recomputed below from primitives -- HKDF per RFC 5869 written with hmac/hashlib (checked
# against RFC 5869 first), HMAC-SHA256, `cryptography`'s AESSIV and AES -- never with
# streamproc's functions.  Changing a salt, an info layout, a truncation or an encoding
# in streamproc/crypto breaks test_streamproc_derivations_match_the_pinned_vectors.
# ---------------------------------------------------------------------------------------
KAT_MASTER = bytes(range(32))  # pseudonym master, version 1
KAT_MASTER_VERSION = 1

PINNED = {
    "token_key": "d3e36dffc2473ad627398fc87f7fb55c7ed1ba613f0267b3c066163e926b8eeb",
    "token": "tk1_3ssmE3NeBAGT8x-tbhOMTA",
    "shared_token_key": "c8e96c72a6accfccdc236db1c988db20779ecbc8d881cb4a79b1a2159b65964e",
    "shared_token": "tk1_R6_3ACgvPpE1UV3vgHS4gw",
    "record_key_token_key": "5e5caaf3765b42e1f233c0827ccea42218bc0ebe2456a94115490a024a1ec0ec",
    "record_key_token": "tk1_5-L-PX1nf0R-Z5LBW2-UwQ",
    "siv_key": (
        "a2f00bc6be783b629283615792c5945b1dcdc6871b4029d9278387a9c65462f1"
        "7debcc09368aedec2559f5a5b0462f24f62bb8b928af7a4007839dc8c77ff874"
    ),
    "ciphertext": "de1_r3Bv1aYXyFTPj5L8CrIJtNmXnIlYq2hCqbUINbm1xWY1",
    "shift_key": "9a6656edb59c23887db2ddc794fea090c34de5e3e4b6f89e3c038959dd48da0e",
    "shift_days": "-14",
    "provenance_key": "0054ca69b0cc6d6369614ab47553076ba115d55126f47e31f22f204aafd1505c",
    "provenance_block": "1c168adb00000003000000000000002a",
    "provenance_ref": "u5oWGdGfiQq2GPNMSlu75Q",
}


def hkdf_stdlib(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 section 2 with the standard library only (no `cryptography`)."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, t = b"", b""
    for i in range(1, -(-length // 32) + 1):
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
    return okm[:length]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), HKDF_VECTORS)
def test_stdlib_hkdf_matches_rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int, prk: bytes, okm: bytes) -> None:
    assert hkdf_stdlib(ikm, salt, info, length) == okm


def _b64u(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def independent_vectors() -> dict[str, str]:
    """Every vector from primitives and the layout docs/keys.md documents."""
    m = KAT_MASTER
    out: dict[str, str] = {}
    k = hkdf_stdlib(m, b"streamproc/token/v2", b"audience\x00analytics\x00customer")
    out["token_key"] = k.hex()
    out["token"] = "tk1_" + _b64u(hmac.new(k, b"cust-42", hashlib.sha256).digest()[:16])
    k = hkdf_stdlib(m, b"streamproc/token/v2", b"shared\x00customer")
    out["shared_token_key"] = k.hex()
    out["shared_token"] = "tk1_" + _b64u(hmac.new(k, b"cust-42", hashlib.sha256).digest()[:16])
    k = hkdf_stdlib(m, b"streamproc/token/v2", b"audience\x00analytics\x00record_key")
    out["record_key_token_key"] = k.hex()
    out["record_key_token"] = "tk1_" + _b64u(hmac.new(k, b"cust-42", hashlib.sha256).digest()[:16])
    k = hkdf_stdlib(m, b"streamproc/siv/v1", b"fraud", 64)
    out["siv_key"] = k.hex()
    out["ciphertext"] = "de1_" + _b64u(AESSIV(k).encrypt(b"alice@example.com", [b"EMAIL"]))
    k = hkdf_stdlib(m, b"streamproc/dateshift/v2", b"audience\x00research\x00subject")
    out["shift_key"] = k.hex()
    x = int.from_bytes(hmac.new(k, b"patient-7", hashlib.sha256).digest()[:8], "big")
    days = (x >> 1) % 30 + 1
    out["shift_days"] = str(days if x & 1 else -days)
    k = hkdf_stdlib(m, b"streamproc/provenance/v1", b"analytics")
    out["provenance_key"] = k.hex()
    block = hashlib.sha256(b"orders").digest()[:4] + (3).to_bytes(4, "big") + (42).to_bytes(8, "big")
    out["provenance_block"] = block.hex()
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(k), modes.ECB()).encryptor()
    out["provenance_ref"] = _b64u(enc.update(block) + enc.finalize())
    return out


def test_independent_derivations_match_the_pinned_vectors() -> None:
    assert independent_vectors() == PINNED


class _FixedMaster:
    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        assert version in (None, KAT_MASTER_VERSION)
        return KAT_MASTER_VERSION, KAT_MASTER


def streamproc_vectors() -> dict[str, str]:
    """The same vectors through streamproc's operators, pipeline and provenance code."""
    import yaml

    from streamproc.crypto import provenance
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.operators import get_operator
    from streamproc.operators.base import OpContext
    from streamproc.pipeline.core import Pipeline
    from streamproc.policy.model import parse_policy
    from streamproc.schema.avro import Primitive

    keys = PseudonymKeys(_FixedMaster(), "kat")
    s, date = Primitive("string"), Primitive("int", {"logicalType": "date"})

    def bound(op: str, audience: str, domain: str, t: Any = s, shared: frozenset[str] = frozenset()) -> Any:
        return get_operator(op).bind({}, t, OpContext(audience, domain, "f", keys, shared))

    policy = parse_policy(yaml.safe_load("keys: {pseudonym: kat}\naudiences: {analytics: {record_key: token}}"))
    pipe = Pipeline(routes=[], policy=policy, opener=None, kms=None, schemas=None, keys=keys)  # type: ignore[arg-type]
    return {
        "token_key": keys.token_key("customer", audience="analytics")[1].hex(),
        "token": bound("token", "analytics", "customer")("cust-42"),
        "shared_token_key": keys.token_key("customer", audience=None)[1].hex(),
        "shared_token": bound("token", "fraud", "customer", shared=frozenset({"customer"}))("cust-42"),
        "record_key_token_key": keys.token_key("record_key", audience="analytics")[1].hex(),
        "record_key_token": (pipe._key_fn(policy.audience("analytics"))(b"cust-42") or b"").decode(),
        "siv_key": keys.siv_key("fraud")[1].hex(),
        "ciphertext": bound("encrypt_deterministic", "fraud", "EMAIL")("alice@example.com"),
        "shift_key": keys.shift_key("subject", audience="research")[1].hex(),
        "shift_days": str(bound("date_shift", "research", "BIRTH_DATE", date)(0, b"patient-7")),
        "provenance_key": keys.provenance_key("analytics")[1].hex(),
        "provenance_block": (provenance.topic_tag("orders") + bytes.fromhex("00000003000000000000002a")).hex(),
        "provenance_ref": provenance.reference(keys.provenance_key("analytics")[1], "orders", 3, 42),
    }


def test_streamproc_derivations_match_the_pinned_vectors() -> None:
    assert streamproc_vectors() == PINNED


def test_provenance_reference_resolves_to_the_pinned_coordinates() -> None:
    from streamproc.crypto import provenance

    key = bytes.fromhex(PINNED["provenance_key"])
    assert provenance.resolve_reference(key, PINNED["provenance_ref"], ["logins", "orders"]) == ("orders", 3, 42)


def test_keys_doc_shows_the_pinned_vectors() -> None:
    """docs/keys.md prints every vector; a changed derivation must change the docs too."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "keys.md").read_text()
    section = doc.split("## Known-answer vectors", 1)[1].split("\n## ", 1)[0]
    flat = "".join(section.split())
    for name, value in PINNED.items():
        assert value in flat, name
