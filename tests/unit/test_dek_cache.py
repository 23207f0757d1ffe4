"""DekCache: LRU bound, TTL, negative caching, outages, revocation sweep, observer."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streamproc.crypto.dek_cache import DekCache, DekCacheStats
from streamproc.crypto.kms.instrumented import InstrumentedKms
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import (
    ConfigError,
    KeyNotFound,
    KeyRevoked,
    KmsError,
    KmsUnavailable,
    TransientError,
    UnwrapFailed,
)

TOPIC = "orders"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def dek_for(kek_id: str, kek_version: int, wrapped: bytes, topic: str) -> bytes:
    return hashlib.sha256(b"%s|%d|%s|%s" % (kek_id.encode(), kek_version, wrapped, topic.encode())).digest()


class ScriptedKms:
    """A provider whose unwrap answers are scripted per KEK id; records every call."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bytes, dict[str, str]]] = []
        self.fail: dict[str, KmsError] = {}
        self.revoked: set[tuple[str, int]] = set()
        self.is_revoked_calls = 0

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]):  # pragma: no cover
        raise AssertionError("the cache never generates data keys")

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        self.calls.append((kek_id, kek_version, wrapped, dict(context)))
        if kek_id in self.fail:
            raise self.fail[kek_id]
        return dek_for(kek_id, kek_version, wrapped, context["topic"])

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        self.is_revoked_calls += 1
        return (kek_id, kek_version) in self.revoked


def works_as(aead: AESGCM, dek: bytes) -> bool:
    """True when ``aead`` encrypts under exactly ``dek``."""
    nonce = bytes(12)
    return AESGCM(dek).decrypt(nonce, aead.encrypt(nonce, b"probe", None), None) == b"probe"


@pytest.fixture
def kms() -> ScriptedKms:
    return ScriptedKms()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(kms: ScriptedKms, clock: FakeClock, **options: float) -> DekCache:
    options.setdefault("revocation_check_interval", 1e9)
    return DekCache(kms, clock=clock, **options)  # type: ignore[arg-type]


def test_hit_after_miss_returns_the_right_key(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock)
    a = cache.get("kek", 1, b"w1", TOPIC)
    assert works_as(a, dek_for("kek", 1, b"w1", TOPIC))
    assert cache.get("kek", 1, b"w1", TOPIC) is a
    assert kms.calls == [("kek", 1, b"w1", {"topic": TOPIC})]
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    # Every component of the key matters, including the topic (it is the wrap context).
    b = cache.get("kek", 1, b"w1", "payments")
    assert works_as(b, dek_for("kek", 1, b"w1", "payments"))
    cache.get("kek", 2, b"w1", TOPIC)
    cache.get("kek", 1, b"w2", TOPIC)
    cache.get("other", 1, b"w1", TOPIC)
    assert len(kms.calls) == 5
    assert kms.calls[1][3] == {"topic": "payments"}
    assert len(cache) == 5


def test_max_entries_must_be_positive(kms: ScriptedKms) -> None:
    with pytest.raises(ValueError):
        DekCache(kms, max_entries=0)


def test_lru_eviction_at_max_entries(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock, max_entries=2)
    cache.get("kek", 1, b"A", TOPIC)
    cache.get("kek", 1, b"B", TOPIC)
    cache.get("kek", 1, b"A", TOPIC)  # A is now the most recently used
    assert len(kms.calls) == 2
    cache.get("kek", 1, b"C", TOPIC)  # evicts the least recently used: B
    assert len(cache) == 2
    assert cache.evictions == 1
    cache.get("kek", 1, b"A", TOPIC)
    assert len(kms.calls) == 3, "A was used more recently than B and must have been kept"
    cache.get("kek", 1, b"B", TOPIC)  # B was evicted: a KMS call; it now evicts C
    assert [c[2] for c in kms.calls] == [b"A", b"B", b"C", b"B"]
    assert len(cache) == 2
    cache.get("kek", 1, b"A", TOPIC)
    assert len(kms.calls) == 4
    assert cache.evictions == 2


def test_size_never_exceeds_max_entries(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock, max_entries=16)
    for i in range(100):
        cache.get("kek", 1, b"w%d" % i, TOPIC)
        assert len(cache) == min(i + 1, 16)
    assert cache.evictions == 84
    # The 16 most recent are the ones kept.
    before = len(kms.calls)
    for i in range(84, 100):
        cache.get("kek", 1, b"w%d" % i, TOPIC)
    assert len(kms.calls) == before


def test_ttl_expiry(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock, ttl=10.0)
    first = cache.get("kek", 1, b"w", TOPIC)
    clock.t += 9.999
    assert cache.get("kek", 1, b"w", TOPIC) is first
    assert len(kms.calls) == 1
    clock.t += 0.001  # exactly ttl after the unwrap: expired
    second = cache.get("kek", 1, b"w", TOPIC)
    assert len(kms.calls) == 2
    assert second is not first
    assert works_as(second, dek_for("kek", 1, b"w", TOPIC))
    clock.t += 5.0
    assert cache.get("kek", 1, b"w", TOPIC) is second  # a fresh TTL from the re-unwrap
    assert len(kms.calls) == 2


@pytest.mark.parametrize(
    "failure",
    [KeyNotFound("gone"), KeyRevoked("revoked"), UnwrapFailed("bad")],
    ids=["not-found", "revoked", "unwrap-failed"],
)
def test_negative_caching_then_retry(
    kms: ScriptedKms, clock: FakeClock, failure: KmsError
) -> None:
    cache = make(kms, clock, negative_ttl=5.0)
    kms.fail["dead"] = failure
    for _ in range(3):
        with pytest.raises(type(failure)):
            cache.get("dead", 1, b"w", TOPIC)
    assert len(kms.calls) == 1
    clock.t += 4.999
    with pytest.raises(type(failure)):
        cache.get("dead", 1, b"w", TOPIC)
    assert len(kms.calls) == 1
    # Another wrapped key under the same KEK is a different entry: it asks the KMS.
    with pytest.raises(type(failure)):
        cache.get("dead", 1, b"other", TOPIC)
    assert len(kms.calls) == 2
    # After negative_ttl the KMS is asked again; now the key exists.
    del kms.fail["dead"]
    clock.t += 0.001
    aead = cache.get("dead", 1, b"w", TOPIC)
    assert len(kms.calls) == 3
    assert works_as(aead, dek_for("dead", 1, b"w", TOPIC))
    assert len(cache) == 1


def test_negative_cache_does_not_grow_tracebacks(kms: ScriptedKms, clock: FakeClock) -> None:
    """Re-raising the cached exception must not chain every earlier raise's frames onto it
    (under a flood of records for a dead key that would grow without bound)."""
    cache = make(kms, clock)
    kms.fail["dead"] = KeyNotFound("gone")
    depths = []
    for _ in range(20):
        with pytest.raises(KeyNotFound) as info:
            cache.get("dead", 1, b"w", TOPIC)
        tb, depth = info.value.__traceback__, 0
        while tb is not None:
            depth += 1
            tb = tb.tb_next
        depths.append(depth)
    assert max(depths) <= depths[0] + 1, depths


def test_kms_unavailable_is_never_cached(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock, negative_ttl=60.0)
    kms.fail["kek"] = KmsUnavailable("outage")
    for i in range(3):
        with pytest.raises(KmsUnavailable):
            cache.get("kek", 1, b"w", TOPIC)
        assert len(kms.calls) == i + 1
    del kms.fail["kek"]
    aead = cache.get("kek", 1, b"w", TOPIC)  # same instant: recovers immediately
    assert works_as(aead, dek_for("kek", 1, b"w", TOPIC))
    assert len(kms.calls) == 4


@pytest.mark.parametrize(
    "error", [KmsError("something odd"), ConfigError("derived key"), RuntimeError("library bug")]
)
def test_unmapped_errors_are_record_level_and_negatively_cached(
    kms: ScriptedKms, clock: FakeClock, error: Exception
) -> None:
    """An error the provider does not map is a failure of this wrapped key (the record
    chose it): re-raised as a plain KmsError naming only the class, cached like the
    mapped ones so a flood of such records is not a flood of KMS calls."""
    cache = make(kms, clock)
    kms.fail["kek"] = error
    for _ in range(2):
        with pytest.raises(KmsError) as info:
            cache.get("kek", 1, b"w", TOPIC)
        assert not isinstance(info.value, TransientError)
        if not isinstance(error, KmsError):
            assert str(info.value) == f"unwrap raised {type(error).__name__}"
    assert len(kms.calls) == 1
    clock.t += 10.0  # past negative_ttl: asked again
    with pytest.raises(KmsError):
        cache.get("kek", 1, b"w", TOPIC)
    assert len(kms.calls) == 2


def test_revocation_sweep_with_scripted_kms(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock, revocation_check_interval=5.0)
    cache.get("kek", 1, b"a", TOPIC)
    cache.get("kek", 2, b"b", TOPIC)
    kms.revoked.add(("kek", 1))
    clock.t += 4.0
    cache.get("kek", 2, b"b", TOPIC)  # before the interval: no sweep
    assert kms.is_revoked_calls == 0
    assert len(cache) == 2
    clock.t += 1.0
    cache.get("kek", 2, b"b", TOPIC)  # a hit after the interval sweeps
    assert kms.is_revoked_calls == 2  # one question per cached (kek, version)
    assert len(cache) == 1
    before = len(kms.calls)
    cache.get("kek", 1, b"a", TOPIC)
    assert len(kms.calls) == before + 1, "the revoked version's key was evicted"


def test_revocation_sweep_ignores_kms_outage(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock, revocation_check_interval=5.0)
    cache.get("kek", 1, b"a", TOPIC)

    def outage(kek_id: str, kek_version: int) -> bool:
        raise KmsUnavailable("down")

    kms.is_revoked = outage  # type: ignore[method-assign]
    clock.t += 10.0
    assert works_as(cache.get("kek", 1, b"a", TOPIC), dek_for("kek", 1, b"a", TOPIC))
    assert len(cache) == 1
    assert len(kms.calls) == 1


def test_revocation_sweep_with_local_keyring(tmp_path: Path) -> None:
    clock = FakeClock()
    kr = LocalKeyring.create(tmp_path / "keyring.json")
    kr.create_key("kek")
    dk1 = kr.generate_data_key("kek", {"topic": TOPIC})
    kr.rotate("kek")
    dk2 = kr.generate_data_key("kek", {"topic": TOPIC})
    assert (dk1.kek_version, dk2.kek_version) == (1, 2)
    cache = DekCache(kr, clock=clock, revocation_check_interval=5.0, ttl=3600.0)
    assert works_as(cache.get("kek", 1, dk1.wrapped, TOPIC), dk1.plaintext)
    assert works_as(cache.get("kek", 2, dk2.wrapped, TOPIC), dk2.plaintext)

    kr.revoke("kek", 1)
    clock.t += 1.0
    # Within the check interval the cached key is still served (bounded staleness).
    assert works_as(cache.get("kek", 1, dk1.wrapped, TOPIC), dk1.plaintext)
    clock.t += 5.0
    # The next hit sweeps; the revoked version's key goes, and the KMS now refuses it.
    with pytest.raises(KeyRevoked):
        cache.get("kek", 1, dk1.wrapped, TOPIC)
    assert len(cache) == 1
    assert works_as(cache.get("kek", 2, dk2.wrapped, TOPIC), dk2.plaintext)
    assert cache.evictions == 1


def test_evict_kek(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock)
    for kek, ver, w in [("a", 1, b"x"), ("a", 1, b"y"), ("a", 2, b"z"), ("b", 1, b"x")]:
        cache.get(kek, ver, w, TOPIC)
    assert cache.evict_kek("a", 1) == 2
    assert len(cache) == 2
    assert cache.evict_kek("a", 1) == 0
    assert cache.evict_kek("nobody") == 0
    assert cache.evict_kek("a") == 1
    assert len(cache) == 1
    assert cache.evictions == 3
    calls = len(kms.calls)
    cache.get("b", 1, b"x", TOPIC)  # untouched
    assert len(kms.calls) == calls
    cache.get("a", 1, b"x", TOPIC)  # evicted: asks the KMS again
    assert len(kms.calls) == calls + 1


class Recorder:
    """A KMS observer that records what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, float]] = []

    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        self.seen.append((provider, operation, outcome, seconds))


def test_instrumented_kms_reports_every_unwrap_the_cache_makes(kms: ScriptedKms, clock: FakeClock) -> None:
    """The cache has no hook of its own: the instrumented provider it holds sees each miss."""
    rec = Recorder()
    cache = make(InstrumentedKms(kms, rec), clock)  # type: ignore[arg-type]

    cache.get("kek", 1, b"w", TOPIC)
    cache.get("kek", 1, b"w", TOPIC)  # a hit: no KMS call, no observation
    kms.fail["gone"] = KeyNotFound("gone")
    with pytest.raises(KeyNotFound):
        cache.get("gone", 1, b"w", TOPIC)
    with pytest.raises(KeyNotFound):
        cache.get("gone", 1, b"w", TOPIC)  # negative-cached: no call
    kms.fail["rev"] = KeyRevoked("rev")
    with pytest.raises(KeyRevoked):
        cache.get("rev", 1, b"w", TOPIC)
    kms.fail["bad"] = UnwrapFailed("bad")
    with pytest.raises(UnwrapFailed):
        cache.get("bad", 1, b"w", TOPIC)
    kms.fail["down"] = KmsUnavailable("down")
    with pytest.raises(KmsUnavailable):
        cache.get("down", 1, b"w", TOPIC)
    kms.fail["odd"] = KmsError("odd")
    with pytest.raises(KmsError):
        cache.get("odd", 1, b"w", TOPIC)

    assert [(p, op, outcome) for p, op, outcome, _ in rec.seen] == [
        ("scripted", "unwrap", "ok"),
        ("scripted", "unwrap", "KeyNotFound"),
        ("scripted", "unwrap", "KeyRevoked"),
        ("scripted", "unwrap", "UnwrapFailed"),
        ("scripted", "unwrap", "unavailable"),
        ("scripted", "unwrap", "error"),
    ]
    assert all(isinstance(s, float) and 0.0 <= s < 5.0 for _, _, _, s in rec.seen)
    assert len(rec.seen) == len(kms.calls)
    assert cache.stats() == DekCacheStats(hits=1, misses=7, evictions=0, entries=1)


def test_hit_and_miss_counters(kms: ScriptedKms, clock: FakeClock) -> None:
    cache = make(kms, clock)
    for _ in range(10):
        cache.get("kek", 1, b"w", TOPIC)
    assert (cache.hits, cache.misses) == (9, 1)
