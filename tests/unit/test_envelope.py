"""Envelope format v1: round trips, tamper detection by region, reuse bounds, KMS economy."""

from __future__ import annotations

import base64
import hashlib
import math
import threading
import traceback
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc.crypto.dek_cache import DekCache
from streamproc.crypto.envelope import (
    MIN_LEN,
    NONCE_LEN,
    TAG_LEN,
    EnvelopeHeader,
    Opener,
    Sealer,
    build_header,
    parse_header,
    topic_fingerprint,
)
from streamproc.crypto.kms import DataKey
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import EnvelopeError, Reason

KEK = "orders-kek"
TOPIC = "orders"

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Anything Python can encode as UTF-8 (no lone surrogates); Kafka itself allows far less.
topics = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingKms:
    """Wraps a provider and counts the calls that reach it."""

    def __init__(self, inner: LocalKeyring) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: Counter[str] = Counter()
        self.data_keys: list[DataKey] = []

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        self.calls["generate_data_key"] += 1
        dk = self.inner.generate_data_key(kek_id, context)
        self.data_keys.append(dk)
        return dk

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        self.calls["unwrap"] += 1
        return self.inner.unwrap(kek_id, kek_version, wrapped, context)

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        self.calls["is_revoked"] += 1
        return self.inner.is_revoked(kek_id, kek_version)


class LaxKms:
    """A deliberately careless KMS: one data key, whatever the KEK id, version or context.

    Lets us check that the envelope's own AAD (not just the KMS) binds the header.
    """

    name = "lax"
    dek = bytes(range(32))

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        return DataKey(kek_id, 1, self.dek, b"W" * 20)

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        return self.dek

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        return False


def _new_keyring(directory: Path, *kek_ids: str) -> LocalKeyring:
    kr = LocalKeyring.create(directory / "keyring.json")
    for k in kek_ids:
        kr.create_key(k)
    return kr


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> LocalKeyring:
    # One KEK with a single version: any other version number is unknown to it.
    return _new_keyring(tmp_path_factory.mktemp("kr"), KEK)


@pytest.fixture(scope="module")
def opener(keyring: LocalKeyring) -> Opener:
    return Opener.for_kms(keyring)


@pytest.fixture
def kr(tmp_path: Path) -> LocalKeyring:
    return _new_keyring(tmp_path, KEK)


def open_error(opener: Opener, topic: str, data: bytes) -> EnvelopeError:
    """Open and return the EnvelopeError; any other exception type escapes and fails."""
    with pytest.raises(EnvelopeError) as info:
        opener.open(topic, data)
    assert isinstance(info.value.reason, Reason)
    return info.value


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def expected_flip_reasons(env: bytes, byte_index: int, mutated: bytes) -> set[Reason]:
    """What opening ``mutated`` (``env`` with one bit flipped) must fail with, by region.

    Computed from the documented layout, not from the parser under test.
    """
    n = env[1]
    m = int.from_bytes(env[6 + n : 8 + n], "big")
    if byte_index == 0:
        return {Reason.UNSUPPORTED_VERSION}
    if byte_index == 1 or 6 + n <= byte_index < 8 + n:
        # A length field: the rest of the header is read at other offsets, so either the
        # lengths no longer fit or the "fingerprint" is read from somewhere else.
        return {Reason.MALFORMED, Reason.WRONG_TOPIC}
    if 2 <= byte_index < 2 + n:
        try:
            mutated[2 : 2 + n].decode("utf-8")
        except UnicodeDecodeError:
            return {Reason.MALFORMED}
        return {Reason.UNKNOWN_KEY}
    if 2 + n <= byte_index < 6 + n:
        return {Reason.UNKNOWN_KEY}  # the fixture KEK has version 1 only
    if 8 + n <= byte_index < 8 + n + m:
        return {Reason.TAMPERED}  # the KMS refuses the wrapped key
    if 8 + n + m <= byte_index < 12 + n + m:
        return {Reason.WRONG_TOPIC}
    return {Reason.TAMPERED}  # nonce, ciphertext, tag


# -- round trips --------------------------------------------------------------------------


@SETTINGS
@given(plaintext=st.binary(max_size=2048), topic=topics)
def test_round_trip_any_plaintext_and_topic(
    keyring: LocalKeyring, opener: Opener, plaintext: bytes, topic: str
) -> None:
    env = Sealer(keyring, KEK, topic).seal(plaintext)
    assert len(env) == parse_header(env).header_len + NONCE_LEN + len(plaintext) + TAG_LEN
    assert plaintext not in env[parse_header(env).header_len :] or len(plaintext) < 8
    opened = opener.open(topic, env)
    assert opened.plaintext == plaintext
    assert (opened.kek_id, opened.kek_version) == (KEK, 1)


def test_round_trip_empty_plaintext(kr: LocalKeyring) -> None:
    env = Sealer(kr, KEK, TOPIC).seal(b"")
    # version, id length, 10-byte id, version, wrapped length, 60-byte wrapped key,
    # fingerprint, nonce, tag: and nothing else.
    assert len(env) == 1 + 1 + 10 + 4 + 2 + 60 + 4 + 12 + 16
    assert Opener.for_kms(kr).open(TOPIC, env).plaintext == b""


def test_header_fields(kr: LocalKeyring) -> None:
    sealer = Sealer(kr, KEK, TOPIC)
    env = sealer.seal(b"x")
    h = parse_header(env)
    assert env[0] == 0x01
    assert (h.kek_id, h.kek_version) == (KEK, 1) == (KEK, sealer.kek_version)
    assert h.fingerprint == topic_fingerprint(TOPIC)
    assert env[: h.header_len] == build_header(KEK, 1, h.wrapped, TOPIC)
    assert len(h.wrapped) == 12 + 32 + 16  # local keyring: nonce || wrapped DEK || tag


def test_nonces_are_unique(kr: LocalKeyring) -> None:
    sealer = Sealer(kr, KEK, TOPIC)
    envs = [sealer.seal(b"same") for _ in range(300)] + sealer.seal_many([b"same"] * 300)
    hl = parse_header(envs[0]).header_len
    assert len({e[hl : hl + NONCE_LEN] for e in envs}) == 600
    assert len(set(envs)) == 600


def test_build_header_rejects_out_of_range_lengths() -> None:
    with pytest.raises(ValueError):
        build_header("", 1, b"w", TOPIC)
    with pytest.raises(ValueError):
        build_header("k" * 256, 1, b"w", TOPIC)
    with pytest.raises(ValueError):
        build_header("k", 1, b"", TOPIC)
    with pytest.raises(ValueError):
        build_header("k", 1, b"w" * 65536, TOPIC)
    assert len(build_header("k" * 255, 1, b"w" * 65535, TOPIC)) == 2 + 255 + 6 + 65535 + 4


# -- tampering, region by region ---------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"\x00\x00\x00\x00\x2a\x0aAlice", bytes(range(256))])
def test_every_single_bit_flip_fails_with_the_region_reason(
    keyring: LocalKeyring, opener: Opener, plaintext: bytes
) -> None:
    env = Sealer(keyring, KEK, TOPIC).seal(plaintext)
    assert opener.open(TOPIC, env).plaintext == plaintext
    seen: Counter[Reason] = Counter()
    for bit in range(len(env) * 8):
        mutated = flip(env, bit)
        err = open_error(opener, TOPIC, mutated)
        allowed = expected_flip_reasons(env, bit // 8, mutated)
        assert err.reason in allowed, (bit, bit // 8, err.reason, allowed)
        seen[err.reason] += 1
    # Every region was exercised, so every reason class the brief expects occurred.
    assert set(seen) >= {
        Reason.UNSUPPORTED_VERSION,
        Reason.MALFORMED,
        Reason.UNKNOWN_KEY,
        Reason.TAMPERED,
        Reason.WRONG_TOPIC,
    }
    # The untouched envelope still opens (the cache was not poisoned by the failures).
    assert opener.open(TOPIC, env).plaintext == plaintext


@SETTINGS
@given(plaintext=st.binary(max_size=512), topic=topics, data=st.data())
def test_random_bit_flip_fails_with_the_region_reason(
    keyring: LocalKeyring, opener: Opener, plaintext: bytes, topic: str, data: st.DataObject
) -> None:
    env = Sealer(keyring, KEK, topic).seal(plaintext)
    bit = data.draw(st.integers(0, len(env) * 8 - 1), label="bit")
    mutated = flip(env, bit)
    err = open_error(opener, topic, mutated)
    assert err.reason in expected_flip_reasons(env, bit // 8, mutated)


@pytest.mark.parametrize("plaintext", [b"", b"hello", bytes(300)])
def test_every_truncation_fails_with_envelope_error(
    keyring: LocalKeyring, opener: Opener, plaintext: bytes
) -> None:
    env = Sealer(keyring, KEK, TOPIC).seal(plaintext)
    body_start = parse_header(env).header_len + NONCE_LEN + TAG_LEN
    for k in range(len(env)):
        err = open_error(opener, TOPIC, env[:k])
        # Until a whole header, nonce and tag are present the value is malformed; after
        # that the header parses and the GCM tag fails.
        expected = Reason.MALFORMED if k < body_start else Reason.TAMPERED
        assert err.reason is expected, (k, err.reason)
    assert open_error(opener, TOPIC, env + b"\x00").reason is Reason.TAMPERED


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes_only_raise_envelope_error(opener: Opener, data: bytes) -> None:
    open_error(opener, TOPIC, data)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes_after_a_valid_version_byte_only_raise_envelope_error(
    opener: Opener, data: bytes
) -> None:
    err = open_error(opener, TOPIC, b"\x01" + data)
    assert err.reason is not Reason.UNSUPPORTED_VERSION


@st.composite
def plausible_envelopes(draw: st.DrawFn) -> bytes:
    """Random values shaped like an envelope, with the right fingerprint, to get past the
    parser into the KMS and AEAD paths."""
    kid = draw(st.sampled_from([KEK, "other-kek", "é-kek"]) | st.text(min_size=1, max_size=20))
    kid_b = kid.encode("utf-8", "surrogatepass")[:255] or b"k"
    version = draw(st.sampled_from([0, 1, 2, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1))
    wrapped = draw(st.binary(min_size=1, max_size=80))
    claimed_wlen = draw(st.sampled_from([len(wrapped), 0, 0xFFFF]) | st.integers(0, 0xFFFF))
    tail = draw(st.binary(max_size=120))
    return (
        bytes([1, len(kid_b)])
        + kid_b
        + version.to_bytes(4, "big")
        + claimed_wlen.to_bytes(2, "big")
        + wrapped
        + topic_fingerprint(TOPIC)
        + tail
    )


@SETTINGS
@given(data=plausible_envelopes())
def test_plausible_forgeries_only_raise_envelope_error(opener: Opener, data: bytes) -> None:
    err = open_error(opener, TOPIC, data)
    assert err.reason in {
        Reason.MALFORMED,
        Reason.UNKNOWN_KEY,
        Reason.TAMPERED,
        Reason.WRONG_TOPIC,
    }


def test_parse_header_never_raises_other_exceptions_on_short_values() -> None:
    assert parse_header_error(b"").reason is Reason.MALFORMED
    assert parse_header_error(b"\x02").reason is Reason.UNSUPPORTED_VERSION
    assert parse_header_error(b"\x00" * 100).reason is Reason.UNSUPPORTED_VERSION
    assert parse_header_error(b"\x01" * (MIN_LEN - 1)).reason is Reason.MALFORMED
    # A zero-length key id, and a key id running past the end.
    assert parse_header_error(b"\x01\x00" + bytes(60)).reason is Reason.MALFORMED
    assert parse_header_error(b"\x01\xff" + bytes(60)).reason is Reason.MALFORMED
    # A key id that is not UTF-8.
    assert parse_header_error(b"\x01\x02\xff\xfe" + bytes(60)).reason is Reason.MALFORMED
    # A zero-length wrapped key.
    assert parse_header_error(b"\x01\x01k" + bytes(60)).reason is Reason.MALFORMED


def parse_header_error(data: bytes) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        parse_header(data)
    return info.value


# -- topic and key binding ---------------------------------------------------------------


def test_open_under_another_topic_is_wrong_topic(kr: LocalKeyring) -> None:
    env = Sealer(kr, KEK, "orders").seal(b"payload")
    opener = Opener.for_kms(kr)
    assert open_error(opener, "payments", env).reason is Reason.WRONG_TOPIC
    assert opener.open("orders", env).plaintext == b"payload"


def test_relabelled_kek_version_fails(kr: LocalKeyring) -> None:
    env = Sealer(kr, KEK, TOPIC).seal(b"payload")  # under v1
    assert kr.rotate(KEK) == 2
    n = env[1]
    as_v2 = env[: 2 + n] + (2).to_bytes(4, "big") + env[6 + n :]
    as_v9 = env[: 2 + n] + (9).to_bytes(4, "big") + env[6 + n :]
    opener = Opener.for_kms(kr)
    # v2 exists, but the wrapped key was bound to v1: the KMS refuses it.
    assert open_error(opener, TOPIC, as_v2).reason is Reason.TAMPERED
    assert open_error(opener, TOPIC, as_v9).reason is Reason.UNKNOWN_KEY
    assert opener.open(TOPIC, env).kek_version == 1


def test_header_is_authenticated_even_if_the_kms_is_careless() -> None:
    """With a KMS that ignores id, version and context, the envelope AAD still binds them."""
    lax = LaxKms()
    env = Sealer(lax, KEK, "orders").seal(b"payload")
    opener = Opener.for_kms(lax)
    assert opener.open("orders", env).plaintext == b"payload"
    n = env[1]
    relabelled = env[: 2 + n] + (7).to_bytes(4, "big") + env[6 + n :]
    assert open_error(opener, "orders", relabelled).reason is Reason.TAMPERED
    renamed = bytes([1, n]) + b"orders-kex" + env[2 + n :]
    assert open_error(opener, "orders", renamed).reason is Reason.TAMPERED
    # Move the value to another topic and fix up the fingerprint: the fingerprint is only a
    # diagnostic; the topic in the AAD is what stops the move.
    h = parse_header(env)
    moved = env[: h.header_len - 4] + topic_fingerprint("payments") + env[h.header_len :]
    assert open_error(opener, "payments", moved).reason is Reason.TAMPERED


def test_swapped_wrapped_key_fails(kr: LocalKeyring) -> None:
    a = Sealer(kr, KEK, TOPIC).seal(b"first")
    b = Sealer(kr, KEK, TOPIC).seal(b"second")
    ha, hb = parse_header(a), parse_header(b)
    assert ha.wrapped != hb.wrapped
    spliced = b[: hb.header_len] + a[ha.header_len :]
    assert open_error(Opener.for_kms(kr), TOPIC, spliced).reason is Reason.TAMPERED


def test_unknown_kek_is_unknown_key(tmp_path: Path) -> None:
    producer = _new_keyring(tmp_path / "producer", "their-kek")
    consumer = _new_keyring(tmp_path / "consumer", KEK)
    env = Sealer(producer, "their-kek", TOPIC).seal(b"payload")
    err = open_error(Opener.for_kms(consumer), TOPIC, env)
    assert err.reason is Reason.UNKNOWN_KEY
    # the id is producer-chosen text: an unconfigured one is shown as a digest only
    assert "their-kek" not in str(err)
    assert "sha256:" + hashlib.sha256(b"their-kek").hexdigest()[:12] in str(err)


def test_revoked_version_is_key_revoked(kr: LocalKeyring) -> None:
    sealer = Sealer(kr, KEK, TOPIC)
    old = sealer.seal(b"under v1")
    assert kr.rotate(KEK) == 2
    sealer.rotate()
    new = sealer.seal(b"under v2")
    assert parse_header(new).kek_version == 2
    opener_before = Opener.for_kms(kr)
    assert opener_before.open(TOPIC, old).plaintext == b"under v1"  # rotation keeps v1 usable
    kr.revoke(KEK, 1)
    opener = Opener.for_kms(kr)
    err = open_error(opener, TOPIC, old)
    assert err.reason is Reason.KEY_REVOKED
    assert opener.open(TOPIC, new).plaintext == b"under v2"
    # A new sealer never seals under the revoked version.
    assert parse_header(Sealer(kr, KEK, TOPIC).seal(b"x")).kek_version == 2


# -- no secrets in errors ----------------------------------------------------------------


def _renderings(exc: BaseException) -> str:
    parts = [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))]
    if isinstance(exc, EnvelopeError):
        parts.append(exc.detail)
    return "\n".join(parts)


def _forbidden(secret: bytes) -> list[str]:
    return [
        repr(secret),
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        secret.decode("latin-1"),
    ]


def test_error_messages_never_contain_plaintext_or_dek(tmp_path: Path) -> None:
    kr = _new_keyring(tmp_path, KEK)
    kms = CountingKms(kr)
    canary = b"CANARY-4111111111111111-" + bytes(range(0x20, 0x7F))
    sealer = Sealer(kms, KEK, TOPIC)
    env = sealer.seal(canary)
    old_env = env
    dek = kms.data_keys[-1].plaintext
    assert dek not in env and canary not in env
    assert dek.hex() not in repr(kms.data_keys[-1])  # DataKey hides its plaintext

    kr.rotate(KEK)
    sealer.rotate()
    env = sealer.seal(canary)
    deks = [dk.plaintext for dk in kms.data_keys]
    kr.revoke(KEK, 1)

    h = parse_header(env)
    failures = [
        (TOPIC, env[:-1]),  # truncated tag
        (TOPIC, flip(env, len(env) * 8 - 3)),  # tampered ciphertext / tag
        (TOPIC, flip(env, (h.header_len + 2) * 8)),  # tampered nonce
        ("elsewhere", env),  # wrong topic
        (TOPIC, flip(env, (h.header_len - 10) * 8)),  # tampered wrapped key
        (TOPIC, old_env),  # revoked
        (TOPIC, b"\x07" + env[1:]),  # unsupported version
        (TOPIC, env[:20]),  # malformed
        (TOPIC, env[: 2 + env[1]] + (42).to_bytes(4, "big") + env[6 + env[1] :]),  # unknown
    ]
    opener = Opener(DekCache(kms))
    reasons = set()
    for topic, data in failures:
        err = open_error(opener, topic, data)
        reasons.add(err.reason)
        text = _renderings(err)
        for secret in (canary, *deks):
            for form in _forbidden(secret):
                assert form not in text, (err.reason, form[:16])
    assert reasons == {
        Reason.TAMPERED,
        Reason.WRONG_TOPIC,
        Reason.KEY_REVOKED,
        Reason.UNSUPPORTED_VERSION,
        Reason.MALFORMED,
        Reason.UNKNOWN_KEY,
    }


# -- data-key reuse bounds ---------------------------------------------------------------


def _wrapped_keys(envs: list[bytes]) -> list[bytes]:
    return [parse_header(e).wrapped for e in envs]


def _runs(items: list[bytes]) -> list[int]:
    """Lengths of runs of equal consecutive items."""
    runs: list[int] = []
    for i, x in enumerate(items):
        if i and x == items[i - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def test_dek_reuse_bounded_by_count(kr: LocalKeyring) -> None:
    kms = CountingKms(kr)
    sealer = Sealer(kms, KEK, TOPIC, max_records=3, clock=FakeClock())
    envs = [sealer.seal(b"r%d" % i) for i in range(3)]
    assert sealer.data_keys_generated == 1
    envs.append(sealer.seal(b"r3"))  # the 4th seal uses a new data key
    assert sealer.data_keys_generated == 2
    envs += [sealer.seal(b"r%d" % i) for i in range(4, 10)]
    wrapped = _wrapped_keys(envs)
    assert _runs(wrapped) == [3, 3, 3, 1]
    assert len(set(wrapped)) == 4 == sealer.data_keys_generated == kms.calls["generate_data_key"]
    opener = Opener(DekCache(kms))
    assert [opener.open(TOPIC, e).plaintext for e in envs] == [b"r%d" % i for i in range(10)]
    assert kms.calls["unwrap"] == 4


def test_dek_reuse_bounded_by_age(kr: LocalKeyring) -> None:
    clock = FakeClock(50.0)
    sealer = Sealer(kr, KEK, TOPIC, max_age=10.0, clock=clock)
    envs = [sealer.seal(b"a")]
    clock.t = 59.999
    envs.append(sealer.seal(b"b"))
    assert sealer.data_keys_generated == 1
    clock.t = 60.0  # age reaches max_age: a new key
    envs.append(sealer.seal(b"c"))
    assert sealer.data_keys_generated == 2
    clock.t = 69.0
    envs.append(sealer.seal(b"d"))
    clock.t = 1000.0
    envs += sealer.seal_many([b"e", b"f"])
    assert sealer.data_keys_generated == 3
    assert _runs(_wrapped_keys(envs)) == [2, 2, 2]


def test_sealer_rejects_non_positive_bounds(kr: LocalKeyring) -> None:
    with pytest.raises(ValueError):
        Sealer(kr, KEK, TOPIC, max_records=0)
    with pytest.raises(ValueError):
        Sealer(kr, KEK, TOPIC, max_age=0)


def test_rotate_forces_a_new_data_key_under_the_new_primary(kr: LocalKeyring) -> None:
    sealer = Sealer(kr, KEK, TOPIC)
    assert sealer.kek_version is None
    first = sealer.seal(b"1")
    kr.rotate(KEK)
    assert parse_header(sealer.seal(b"2")).wrapped == parse_header(first).wrapped
    sealer.rotate()
    assert sealer.kek_version == 2
    assert parse_header(sealer.seal(b"3")).kek_version == 2
    assert sealer.data_keys_generated == 2


def test_seal_many_matches_seal(kr: LocalKeyring) -> None:
    plaintexts = [b"", b"a", b"bb" * 100, bytes(range(256))]
    sealer = Sealer(kr, KEK, TOPIC)
    batch = sealer.seal_many(plaintexts)
    single = [sealer.seal(p) for p in plaintexts]
    assert sealer.data_keys_generated == 1
    opener = Opener.for_kms(kr)
    assert [opener.open(TOPIC, e).plaintext for e in batch] == plaintexts
    assert [opener.open(TOPIC, e).plaintext for e in single] == plaintexts
    # Same header, same layout and sizes as seal.
    for b, s in zip(batch, single, strict=True):
        hb, hs = parse_header(b), parse_header(s)
        assert b[: hb.header_len] == s[: hs.header_len]
        assert len(b) == len(s)
    assert sealer.seal_many([]) == []


def test_seal_many_respects_max_records_across_batches(kr: LocalKeyring) -> None:
    kms = CountingKms(kr)
    sealer = Sealer(kms, KEK, TOPIC, max_records=3, clock=FakeClock())
    envs = [sealer.seal(b"s0"), sealer.seal(b"s1")]  # 2 of 3 uses of key A
    envs += sealer.seal_many([b"m%d" % i for i in range(8)])  # 1 on A, 3 on B, 3 on C, 1 on D
    envs.append(sealer.seal(b"s2"))  # 2nd use of D
    envs += sealer.seal_many([b"n0", b"n1"])  # 3rd use of D, then E
    assert _runs(_wrapped_keys(envs)) == [3, 3, 3, 3, 1]
    assert sealer.data_keys_generated == 5 == kms.calls["generate_data_key"]
    opener = Opener(DekCache(kms))
    expected = [b"s0", b"s1", *[b"m%d" % i for i in range(8)], b"s2", b"n0", b"n1"]
    assert [opener.open(TOPIC, e).plaintext for e in envs] == expected


@SETTINGS
@given(
    max_records=st.integers(1, 7),
    batches=st.lists(st.integers(0, 12), min_size=1, max_size=6),
)
def test_seal_many_uses_each_key_at_most_max_records(
    keyring: LocalKeyring, max_records: int, batches: list[int]
) -> None:
    sealer = Sealer(keyring, KEK, TOPIC, max_records=max_records, clock=FakeClock())
    envs: list[bytes] = []
    for size in batches:
        envs += sealer.seal_many([b"x"] * size) if size else [sealer.seal(b"x")]
    runs = _runs(_wrapped_keys(envs))
    # Every key but the last is used exactly max_records times: no key is wasted or overused.
    assert all(r == max_records for r in runs[:-1])
    assert 1 <= runs[-1] <= max_records
    assert sealer.data_keys_generated == math.ceil(len(envs) / max_records) == len(runs)


def test_sealer_is_thread_safe_about_reuse_bounds(kr: LocalKeyring) -> None:
    sealer = Sealer(kr, KEK, TOPIC, max_records=10)
    out: list[bytes] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [sealer.seal(b"t") for _ in range(50)] + sealer.seal_many([b"t"] * 25)
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(_wrapped_keys(out))
    assert len(out) == 600
    assert max(counts.values()) == 10
    assert sealer.data_keys_generated == len(counts) == 60


# -- KMS economy -------------------------------------------------------------------------


def test_opener_unwraps_once_per_data_key(kr: LocalKeyring) -> None:
    kms = CountingKms(kr)
    envs = Sealer(kms, KEK, TOPIC).seal_many([b"record-%d" % i for i in range(500)])
    assert kms.calls["generate_data_key"] == 1
    opener = Opener(DekCache(kms))
    for i, e in enumerate(envs):
        assert opener.open(TOPIC, e).plaintext == b"record-%d" % i
    assert kms.calls["unwrap"] == 1
    assert (opener.cache.misses, opener.cache.hits) == (1, 499)


def test_opener_negative_caches_a_dead_key(kr: LocalKeyring) -> None:
    kms = CountingKms(kr)
    sealer = Sealer(kms, KEK, TOPIC)
    env = sealer.seal(b"x")
    n = env[1]
    dead = env[: 2 + n] + (5).to_bytes(4, "big") + env[6 + n :]
    opener = Opener(DekCache(kms, clock=FakeClock()))
    for _ in range(100):
        assert open_error(opener, TOPIC, dead).reason is Reason.UNKNOWN_KEY
    assert kms.calls["unwrap"] == 1


def test_header_dataclass_is_what_parse_returns(kr: LocalKeyring) -> None:
    env = Sealer(kr, KEK, TOPIC).seal(b"abc")
    h = parse_header(env)
    assert isinstance(h, EnvelopeHeader)
    assert h.header_len == 2 + len(KEK) + 4 + 2 + len(h.wrapped) + 4
