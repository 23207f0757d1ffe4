"""One instrumented KMS wrapper measures every data-path KMS call; Pipeline reports its cache.

The wrapper (``streamproc.crypto.kms.instrumented``) replaces the hooks that the data-key
cache, the runtime and the metrics each had: these tests drive it with a real local
keyring and count what reaches the provider independently (``CountingKms``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from streamproc.client import RecordSealer
from streamproc.crypto.dek_cache import DekCacheStats
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms import DataKey
from streamproc.crypto.kms.instrumented import InstrumentedKms, call_outcome, instrumented
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import KeyNotFound, KmsError, KmsUnavailable, UnwrapFailed
from streamproc.pipeline.core import InputRecord
from tests.unit.conftest import ORDER_SCHEMA, Maker


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        assert isinstance(seconds, float) and seconds >= 0.0
        self.seen.append((provider, operation, outcome))


class Exploding:
    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("observer bug")


class Down:
    """A provider in an outage (every call transient)."""

    name = "down"

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        raise KmsUnavailable("no route to host")

    def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        raise KmsUnavailable("no route to host")

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        raise KmsUnavailable("no route to host")


def test_outcome_classes() -> None:
    assert call_outcome(None) == "ok"
    assert call_outcome(KmsUnavailable("x")) == "unavailable"
    assert call_outcome(KeyNotFound("x")) == "KeyNotFound"
    assert call_outcome(UnwrapFailed("x")) == "UnwrapFailed"
    assert call_outcome(KmsError("x")) == "error"  # unmapped by the provider
    assert call_outcome(ValueError("x")) == "error"


def test_generate_and_unwrap_are_reported_and_pass_through(keyring: LocalKeyring) -> None:
    rec = Recorder()
    kms = InstrumentedKms(keyring, rec)
    dk = kms.generate_data_key("orders-kek", {"topic": "orders"})
    assert kms.unwrap(dk.kek_id, dk.kek_version, dk.wrapped, {"topic": "orders"}) == dk.plaintext
    with pytest.raises(KeyNotFound):
        kms.generate_data_key("no-such-kek", {"topic": "orders"})
    with pytest.raises(UnwrapFailed):
        kms.unwrap(dk.kek_id, dk.kek_version, dk.wrapped, {"topic": "payments"})
    assert kms.is_revoked("orders-kek", 1) is False  # a state check: delegated, not counted
    assert kms.get_secret("pseudonym-master")[1] == keyring.get_secret("pseudonym-master")[1]
    assert rec.seen == [
        ("local", "generate_data_key", "ok"),
        ("local", "unwrap", "ok"),
        ("local", "generate_data_key", "KeyNotFound"),
        ("local", "unwrap", "UnwrapFailed"),
    ]


def test_outage_is_unavailable_and_an_observer_error_never_fails_a_call(keyring: LocalKeyring) -> None:
    rec = Recorder()
    with pytest.raises(KmsUnavailable):
        InstrumentedKms(Down(), rec).unwrap("k", 1, b"w", {})  # type: ignore[arg-type]
    assert rec.seen == [("down", "unwrap", "unavailable")]
    broken = InstrumentedKms(keyring, Exploding())
    dk = broken.generate_data_key("orders-kek", {"topic": "orders"})
    assert broken.unwrap(dk.kek_id, dk.kek_version, dk.wrapped, {"topic": "orders"}) == dk.plaintext
    assert broken.observer_errors == 2


def test_instrumenting_twice_counts_once(keyring: LocalKeyring) -> None:
    rec = Recorder()
    once = instrumented(keyring, rec)
    assert instrumented(once, Recorder()) is once
    once.generate_data_key("orders-kek", {"topic": "orders"})
    assert rec.seen == [("local", "generate_data_key", "ok")]


def test_pipeline_reports_every_kms_call_once_and_its_cache(make_pipeline: Maker) -> None:
    kit = make_pipeline()
    rec = Recorder()
    kit.pipeline.instrument_kms(rec)
    kit.pipeline.instrument_kms(Recorder())  # a second observer: already instrumented
    sealer = RecordSealer(kit.keyring, "orders-kek", "orders", ORDER_SCHEMA, kit.schemas)
    values = sealer.seal_many([{**_order(i)} for i in range(5)])
    res = kit.pipeline.process([InputRecord("orders", 0, i, b"k", v) for i, v in enumerate(values)])
    assert not res.quarantined and len(res.outputs) == 15
    # What reached the provider, counted by the provider-side wrapper of the fixture:
    # one unwrap (one data key for 5 records), one data key per destination.
    assert kit.kms.calls["unwrap"] == 1 and kit.kms.calls["generate_data_key"] == 3
    assert sorted(rec.seen) == sorted(
        [("local", "unwrap", "ok")] + [("local", "generate_data_key", "ok")] * 3
    )
    assert kit.pipeline.dek_cache_stats() == DekCacheStats(hits=4, misses=1, evictions=0, entries=1)


def test_dek_cache_stats_without_a_cache(make_pipeline: Maker, keyring: LocalKeyring) -> None:
    class BareOpener:
        """A caller-supplied opener without a data-key cache."""

        def __init__(self) -> None:
            self.inner = Opener.for_kms(keyring)

        def open(self, topic: str, data: bytes) -> Any:
            return self.inner.open(topic, data)

    kit = make_pipeline()
    kit.pipeline.opener = BareOpener()  # type: ignore[assignment]
    assert kit.pipeline.dek_cache_stats() == DekCacheStats()
    kit.pipeline.instrument_kms(Recorder())  # sealers only; nothing to wrap on the opener
    assert all(isinstance(s.sealer.kms, InstrumentedKms) for s in kit.pipeline._dest_by_topic.values())


def test_crypto_sealer_through_the_wrapper(keyring: LocalKeyring) -> None:
    rec = Recorder()
    sealer = Sealer(InstrumentedKms(keyring, rec), "orders-kek", "orders", max_records=2)
    sealer.seal_many([b"a", b"b", b"c"])  # two data keys
    assert rec.seen == [("local", "generate_data_key", "ok")] * 2


def _order(seed: int) -> dict[str, Any]:
    from streamproc.client.generator import EventGenerator

    return EventGenerator(seed=seed).order()
