"""Keys under attack and under failure: untrusted KEK ids, per-source KEK allow-lists,
KMS errors that must never stop the processor, sealers that leave revoked versions.

The KMS is the real local keyring throughout; where a provider must *misbehave* (an
error it does not map, a library bug), :class:`FaultyKms` wraps it and raises the given
exception for one KEK -- everything else, crypto included, is the real thing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.envelope import KEK_LABEL_MAX, Opener, kek_label, parse_header
from streamproc.crypto.kms import DataKey, kms_error_reason
from streamproc.crypto.kms.local import KeyringUnavailable, LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyNotFound,
    KeyRevoked,
    KmsError,
    KmsUnavailable,
    PolicyError,
    Reason,
    SealingUnavailable,
    TransientError,
    UnwrapFailed,
)
from streamproc.observability.anomaly import AnomalyDetector, AnomalyKind
from streamproc.pipeline.core import InputRecord, Pipeline, Route
from streamproc.policy.model import Policy
from streamproc.runtime.dlq import H_DLQ_DETAIL, dead_letter_headers
from streamproc.schema.registry import CachingSchemaSource
from tests.unit.conftest import DESTINATIONS, ORDER_SCHEMA, PSEUDONYM

CANARY_KEK = "alice@example.com"


def digest(kek_id: str) -> str:
    return "sha256:" + hashlib.sha256(kek_id.encode()).hexdigest()[:12]


class FaultyKms:
    """The local keyring, except that chosen KEKs raise chosen exceptions."""

    name = "faulty"

    def __init__(self, inner: LocalKeyring) -> None:
        self.inner = inner
        self.unwrap_fail: dict[str, BaseException] = {}
        self.generate_fail: dict[str, BaseException] = {}
        self.revoked_fail: dict[str, BaseException] = {}
        self.unwraps = 0

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        if kek_id in self.generate_fail:
            raise self.generate_fail[kek_id]
        return self.inner.generate_data_key(kek_id, context)

    def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self.unwraps += 1
        if kek_id in self.unwrap_fail:
            raise self.unwrap_fail[kek_id]
        return self.inner.unwrap(kek_id, kek_version, wrapped, context)

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        if kek_id in self.revoked_fail:
            raise self.revoked_fail[kek_id]
        return self.inner.is_revoked(kek_id, kek_version)

    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        return self.inner.get_secret(key_id, version)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def build(
    keyring: LocalKeyring,
    schemas: CachingSchemaSource,
    policy: Policy,
    *,
    routes: list[Route] | None = None,
    clock: Clock | None = None,
    **options: Any,
) -> tuple[Pipeline, FaultyKms]:
    kms = FaultyKms(keyring)
    p = Pipeline(
        routes=routes or [Route(("orders", "logins"), DESTINATIONS)],
        policy=policy,
        opener=Opener.for_kms(kms),  # type: ignore[arg-type]
        kms=kms,  # type: ignore[arg-type]
        schemas=schemas,
        keys=PseudonymKeys(keyring, PSEUDONYM),
        clock=clock or Clock(),
        **options,
    )
    return p, kms


def sealed(keyring: Any, kek: str, schemas: CachingSchemaSource, n: int = 2, topic: str = "orders") -> list[bytes]:
    s = RecordSealer(keyring, kek, topic, ORDER_SCHEMA, schemas)
    return s.seal_many([EventGenerator(seed).order() for seed in range(n)])


def records(values: list[bytes], topic: str = "orders") -> list[InputRecord]:
    return [InputRecord(topic, 0, i, b"k", v, None, ()) for i, v in enumerate(values)]


# -- point 6: KEK ids from envelopes are untrusted text -------------------------------------------


def test_kek_label_shows_only_configured_ids_and_escapes_them() -> None:
    assert kek_label(CANARY_KEK) == digest(CANARY_KEK)
    assert kek_label(CANARY_KEK, {"orders-kek"}) == digest(CANARY_KEK)
    assert kek_label("orders-kek", {"orders-kek"}) == "'orders-kek'"
    evil = "kek\n{\"level\":\"ERROR\"}\x1b[31m\u00e9"
    shown = kek_label(evil, {evil})
    assert "\n" not in shown and "\x1b" not in shown and "\u00e9" not in shown
    assert shown == "'kek\\n{\"level\":\"ERROR\"}\\x1b[31m\\xe9'"
    long = "k" * 200
    capped = kek_label(long, {long})
    assert len(capped) == KEK_LABEL_MAX + 2  # quoted
    assert capped.endswith(hashlib.sha256(long.encode()).hexdigest()[:12] + "'")


def test_canary_kek_id_never_reaches_details_or_dlq_headers(
    tmp_path: Path, keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> None:
    """A producer's e-mail as KEK id: unknown to the KMS, wrong topic, not allowed."""
    theirs = LocalKeyring.create(tmp_path / "theirs.json")
    theirs.create_key(CANARY_KEK)
    p, _ = build(keyring, schemas, policy, routes=[
        Route(("orders",), DESTINATIONS[:1], source_keks=("orders-kek",)),
        Route(("logins",), DESTINATIONS[1:2]),
    ])
    unknown = sealed(theirs, CANARY_KEK, schemas, 1, topic="logins")
    wrong_topic = sealed(theirs, CANARY_KEK, schemas, 1, topic="orders")
    not_allowed = sealed(theirs, CANARY_KEK, schemas, 1)
    res = p.process([*records(unknown, "logins"), *records(wrong_topic, "logins"), *records(not_allowed)])
    assert [q.reason for q in res.quarantined] == [
        Reason.UNKNOWN_KEY, Reason.WRONG_TOPIC, Reason.KEK_NOT_ALLOWED,
    ]
    for q in res.quarantined:
        assert CANARY_KEK not in q.detail and "alice" not in q.detail
        assert digest(CANARY_KEK) in q.detail
        hdrs = dead_letter_headers(q)
        assert all(b"alice" not in (v or b"") for k, v in hdrs if k.startswith("streamproc."))
        assert dict(hdrs)[H_DLQ_DETAIL] == q.detail.encode()


def test_dlq_detail_header_is_printable_ascii_and_capped(
    keyring: LocalKeyring, schemas: CachingSchemaSource
) -> None:
    from streamproc.pipeline.core import Quarantined

    q = Quarantined(records([b"x"])[0], Reason.TAMPERED, "a\nb\u00e9" + "z" * 1000)
    detail = dict(dead_letter_headers(q))[H_DLQ_DETAIL]
    assert detail is not None
    assert detail.startswith(b"a\\x0ab\\xe9zz") and len(detail) == 256
    assert all(0x20 <= c <= 0x7E for c in detail)


# -- point 11: per-source KEK allow-list ----------------------------------------------------------


def test_destination_kek_never_seals_a_source_by_default(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> None:
    p, kms = build(keyring, schemas, policy)
    ok = sealed(keyring, "orders-kek", schemas, 2)
    for dest_kek in ("analytics-kek", "fraud-kek", "support-kek"):
        bad = sealed(keyring, dest_kek, schemas, 2)
        before = kms.unwraps
        res = p.process(records([*bad, *ok]))
        assert [q.reason for q in res.quarantined] == [Reason.KEK_NOT_ALLOWED] * 2
        assert [q.detail for q in res.quarantined] == [
            f"key '{dest_kek}' v1 may not seal this source topic"
        ] * 2
        assert res.stats.quarantined == {Reason.KEK_NOT_ALLOWED: 2}
        assert len(res.outputs) == 2 * len(DESTINATIONS)
        assert kms.unwraps - before <= 1  # only orders-kek's data key; never a destination's
    detector = AnomalyDetector()
    found = detector.observe_failures(res.stats.quarantined)
    assert [a.kind for a in found] == [AnomalyKind.KEK_NOT_ALLOWED]


def test_explicit_source_keks_and_reserved_keks(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> None:
    keyring.create_key("other-kek")
    keyring.create_key("secret-kek")
    p, _ = build(
        keyring, schemas, policy,
        routes=[Route(("orders",), DESTINATIONS, source_keks=("orders-kek",)), Route(("logins",), DESTINATIONS)],
        reserved_keks=["secret-kek"],
    )
    orders_ok = sealed(keyring, "orders-kek", schemas, 1)
    orders_other = sealed(keyring, "other-kek", schemas, 1)
    logins_other = sealed(keyring, "other-kek", schemas, 1, topic="logins")  # default: allowed
    logins_secret = sealed(keyring, "secret-kek", schemas, 1, topic="logins")  # reserved
    res = p.process([*records(orders_ok), *records(orders_other), *records(logins_other, "logins"),
                     *records(logins_secret, "logins")])
    assert [(q.record.topic, q.reason) for q in res.quarantined] == [
        ("orders", Reason.KEK_NOT_ALLOWED), ("logins", Reason.KEK_NOT_ALLOWED),
    ]
    assert {o.source.value for o in res.outputs} == {orders_ok[0], logins_other[0]}
    # statistics (metric labels, anomaly lines) name configured KEKs only; others by digest
    assert res.stats.decryptions == {("orders", "orders-kek"): 1, ("logins", digest("other-kek")): 1}
    assert p.kek_allowed("orders", "orders-kek") and not p.kek_allowed("orders", "other-kek")
    assert p.kek_allowed("logins", "other-kek") and not p.kek_allowed("logins", "analytics-kek")
    with pytest.raises(PolicyError, match="analytics-kek"):
        build(keyring, schemas, policy, routes=[Route(("orders",), DESTINATIONS, source_keks=("analytics-kek",))])
    with pytest.raises(PolicyError, match="secret-kek"):
        build(keyring, schemas, policy, routes=[Route(("orders",), DESTINATIONS, source_keks=("secret-kek",))],
              reserved_keks=["secret-kek"])


# -- point 12: every provider error is a reason class or transient --------------------------------

#: The classification table, written out independently of the code under test.
TABLE: list[tuple[BaseException, Reason | None]] = [
    (KmsUnavailable("x"), None),
    (KeyringUnavailable("x"), None),
    (SealingUnavailable("x"), None),
    (KeyNotFound("x"), Reason.UNKNOWN_KEY),
    (KeyAccessDenied("x"), Reason.UNKNOWN_KEY),
    (KeyRevoked("x"), Reason.KEY_REVOKED),
    (UnwrapFailed("x"), Reason.TAMPERED),
    (KmsError("x"), Reason.KMS_ERROR),
    (ConfigError("x"), Reason.KMS_ERROR),
    (RuntimeError("x"), Reason.KMS_ERROR),
]


@pytest.mark.parametrize(("error", "reason"), TABLE, ids=lambda v: type(v).__name__)
def test_classification_table(error: BaseException, reason: Reason | None) -> None:
    assert kms_error_reason(error) is reason


@pytest.mark.parametrize(("error", "reason"), TABLE, ids=lambda v: type(v).__name__)
def test_unwrap_errors_never_escape_as_anything_but_transient(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy, error: BaseException, reason: Reason | None
) -> None:
    p, kms = build(keyring, schemas, policy)
    kms.unwrap_fail["orders-kek"] = error
    values = sealed(keyring, "orders-kek", schemas, 2)
    good = sealed(keyring, "logins-kek", schemas, 1, topic="logins")
    if reason is None:
        with pytest.raises(TransientError):
            p.process([*records(values), *records(good, "logins")])
        return
    res = p.process([*records(values), *records(good, "logins")])
    assert [q.reason for q in res.quarantined] == [reason, reason]
    assert len(res.outputs) == len(DESTINATIONS)  # the other KEK's record went through
    for q in res.quarantined:
        assert "x" not in q.detail.replace(digest("orders-kek"), "")  # no provider message text
    if reason is Reason.KMS_ERROR:
        expected = type(error).__name__ if isinstance(error, KmsError) else "KmsError"
        assert res.quarantined[0].detail == f"key {digest('orders-kek')} v1 ({expected})"


@pytest.mark.parametrize(
    "error",
    [KmsError("PROVIDER TEXT"), ConfigError("PROVIDER TEXT"), KeyRevoked("PROVIDER TEXT"),
     KeyNotFound("PROVIDER TEXT"), KeyAccessDenied("PROVIDER TEXT"), RuntimeError("PROVIDER TEXT"),
     KmsUnavailable("PROVIDER TEXT")],
    ids=lambda e: type(e).__name__,
)
def test_sealing_errors_pause_and_never_fall_back_to_the_old_key(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy, error: BaseException
) -> None:
    clock = Clock()
    p, kms = build(keyring, schemas, policy, clock=clock)
    values = sealed(keyring, "orders-kek", schemas, 1)
    assert len(p.process(records(values)).outputs) == len(DESTINATIONS)
    kms.generate_fail["analytics-kek"] = error
    kms.revoked_fail["analytics-kek"] = KeyAccessDenied("cannot read state")  # unknown: rotate
    clock.t += 5.0
    for _ in range(2):  # the retry meets the same refusal: no output under the old data key
        with pytest.raises(SealingUnavailable) as info:
            p.process(records(values))
        assert isinstance(info.value, TransientError)
        assert info.value.detail.startswith("destination 'sanitized.analytics': KEK 'analytics-kek' cannot seal")
        assert str(error) not in info.value.detail
    del kms.generate_fail["analytics-kek"]
    res = p.process(records(values))
    assert len(res.outputs) == len(DESTINATIONS)


# -- point 10: sealers move off revoked versions within one sweep ----------------------------------


def test_sealer_moves_to_primary_within_one_revocation_interval(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> None:
    clock = Clock()
    p, _ = build(keyring, schemas, policy, clock=clock, revocation_check_interval=5.0)
    values = sealed(keyring, "orders-kek", schemas, 3)

    def versions() -> set[int]:
        res = p.process(records(values))
        return {parse_header(o.value).kek_version for o in res.outputs if o.topic == "sanitized.analytics" and o.value}

    assert versions() == {1}
    keyring.rotate("analytics-kek")
    assert versions() == {1}  # rotation alone: v1 still seals until its data key ages out
    keyring.revoke("analytics-kek", 1)
    clock.t += 5.0
    assert versions() == {2}  # one interval later: never v1 again
    assert list(p.sealer_rotations) == [("sanitized.analytics", "analytics-kek", 1)]
    clock.t += 5.0
    assert versions() == {2}
    assert list(p.sealer_rotations) == [("sanitized.analytics", "analytics-kek", 1)]  # no churn


def test_unknown_sealing_state_takes_a_fresh_data_key_each_interval(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> None:
    """A role without DescribeKey cannot tell; the KMS then decides at each interval."""
    clock = Clock()
    p, kms = build(keyring, schemas, policy, clock=clock, revocation_check_interval=5.0)
    values = sealed(keyring, "orders-kek", schemas, 1)
    p.process(records(values))
    kms.revoked_fail["analytics-kek"] = KeyAccessDenied("no kms:DescribeKey")
    sealer = p._dest_by_topic["sanitized.analytics"].sealer
    n = sealer.data_keys_generated
    clock.t += 5.0
    p.process(records(values))
    assert sealer.data_keys_generated == n + 1
    p.process(records(values))  # within the interval: no extra KMS call
    assert sealer.data_keys_generated == n + 1
    assert not p.sealer_rotations  # an unknown state is not recorded as a revocation


# -- AWS: credential and capacity failures of botocore are outages, not records' faults ------------


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.TokenRetrievalError(provider="sso", error_msg="expired"),
        lambda b: b.SSOTokenLoadError(error_msg="no cache"),
        lambda b: b.MetadataRetrievalError(error_msg="imds down"),
        lambda b: b.CapacityNotAvailableError(),
        lambda b: b.NoAuthTokenError(),
        lambda b: b.NoCredentialsError(),
        lambda b: b.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ],
)
def test_aws_credential_and_capacity_errors_are_transient(make: Any) -> None:
    pytest.importorskip("boto3")
    import botocore.exceptions as bce

    from streamproc.crypto.kms.aws import AwsKms

    kms = AwsKms(client=object(), check_key_state=False)
    with pytest.raises(KmsUnavailable):
        kms._raise_mapped(make(bce), "Decrypt", "alias/src")
    # ... while an unknown botocore error stays record-level (kms_error)
    with pytest.raises(KmsError) as info:
        kms._raise_mapped(bce.UnseekableStreamError(stream_object="s"), "Decrypt", "alias/src")
    assert kms_error_reason(info.value) is Reason.KMS_ERROR


def test_a_provider_returning_a_bad_data_key_is_a_record_level_kms_error(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> None:
    p, _ = build(keyring, schemas, policy)

    class ShortKey(FaultyKms):
        def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]) -> bytes:
            return b"\x00" * 7

    p.opener.cache.kms = ShortKey(keyring)  # type: ignore[assignment]
    res = p.process(records(sealed(keyring, "orders-kek", schemas, 2)))
    assert [q.reason for q in res.quarantined] == [Reason.KMS_ERROR] * 2
    assert res.outputs == []
