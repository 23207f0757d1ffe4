"""VaultTransitKms against a real OpenBao dev server on 127.0.0.1.

One server per module.  Every test creates its own keys (uuid-suffixed names that follow
the ``streamproc-src-*`` / ``streamproc-dst-*`` convention of the shipped policies), so
tests are independent of order.  The least-privilege tests load the policy files from
``deploy/vault`` verbatim: what ships is what is tested.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hvac = pytest.importorskip("hvac")

from streamproc.crypto.envelope import Opener, Sealer  # noqa: E402
from streamproc.crypto.kms import KmsProvider  # noqa: E402
from streamproc.crypto.kms.vault import VaultTransitKms, canonical_context  # noqa: E402
from streamproc.errors import (  # noqa: E402
    ConfigError,
    EnvelopeError,
    KeyAccessDenied,
    KeyNotFound,
    KeyRevoked,
    KmsUnavailable,
    Reason,
    UnwrapFailed,
)
from tests.integration.servers import OpenBaoServer, free_port, start_openbao  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "deploy" / "vault"
CTX = {"topic": "orders"}

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with start_openbao() as server:
        server.enable_transit()
        for name in (
            "streamproc-processor",
            "streamproc-producer",
            "streamproc-subscriber-analytics",
            "streamproc-incident-response",
        ):
            server.client().sys.create_or_update_policy(
                name, (POLICIES / f"{name}.hcl").read_text()
            )
        yield server


@pytest.fixture
def root(bao: OpenBaoServer) -> Any:
    return bao.client()


def kms_for(bao: OpenBaoServer, token: str | None = None, **kw: Any) -> VaultTransitKms:
    kw.setdefault("revocation_cache_ttl", 0.0)
    return VaultTransitKms(bao.url, token or bao.root_token, timeout=5, **kw)


def new_key(root: Any, kind: str = "src", *, derived: bool = False, suffix: str = "") -> str:
    name = suffix or f"streamproc-{kind}-{uuid.uuid4().hex[:10]}"
    root.secrets.transit.create_key(name, key_type="aes256-gcm96", derived=derived)
    return name


def token_with(root: Any, *policies: str) -> str:
    return str(root.auth.token.create(policies=list(policies), ttl="10m")["auth"]["client_token"])


# -- basics ---------------------------------------------------------------------------------


@integration
def test_round_trip(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    assert isinstance(kms, KmsProvider)
    dk = kms.generate_data_key(kek, CTX)
    assert dk.kek_id == kek and dk.kek_version == 1
    assert len(dk.plaintext) == 32
    assert dk.wrapped.startswith(b"vault:v1:")
    assert kms.unwrap(kek, 1, dk.wrapped, CTX) == dk.plaintext
    assert kms.is_revoked(kek, 1) is False
    # two data keys are different keys
    assert kms.generate_data_key(kek, CTX).plaintext != dk.plaintext
    assert bao.root_token not in repr(kms)


@integration
def test_context_is_bound_to_the_wrapped_key(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    dk = kms.generate_data_key(kek, CTX)
    with pytest.raises(UnwrapFailed) as info:
        kms.unwrap(kek, 1, dk.wrapped, {"topic": "payments"})
    assert kek in str(info.value) and "payments" not in str(info.value)
    with pytest.raises(UnwrapFailed):
        kms.unwrap(kek, 1, dk.wrapped, {})
    with pytest.raises(UnwrapFailed):
        kms.unwrap(kek, 1, dk.wrapped, {"topic": "orders", "extra": "x"})
    # the binding is what the server authenticates, not a client-side check: a raw decrypt
    # with the right associated data works, with the wrong one it does not
    ad = base64.b64encode(canonical_context(CTX)).decode()
    ok = root.secrets.transit.decrypt_data(kek, dk.wrapped.decode(), associated_data=ad)
    assert base64.b64decode(ok["data"]["plaintext"]) == dk.plaintext


@integration
def test_tampered_or_relabelled_wrapped_keys_fail(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    dk = kms.generate_data_key(kek, CTX)
    body = bytearray(base64.b64decode(dk.wrapped[len(b"vault:v1:") :]))
    body[-1] ^= 1
    tampered = b"vault:v1:" + base64.b64encode(bytes(body))
    for bad in (tampered, b"vault:v1:AAAA", b"not a transit ciphertext", b"\xff\xfe"):
        with pytest.raises(UnwrapFailed):
            kms.unwrap(kek, 1, bad, CTX)
    with pytest.raises(UnwrapFailed):  # header says v2, ciphertext says v1
        kms.unwrap(kek, 2, dk.wrapped, CTX)
    other = new_key(root)  # a wrapped key presented under another KEK
    with pytest.raises(UnwrapFailed):
        kms.unwrap(other, 1, dk.wrapped, CTX)


@integration
def test_unknown_key(bao: OpenBaoServer) -> None:
    kms = kms_for(bao)
    with pytest.raises(KeyNotFound) as info:
        kms.generate_data_key("streamproc-src-nope", CTX)
    assert not isinstance(info.value, KeyAccessDenied)
    with pytest.raises(KeyNotFound):
        kms.unwrap("streamproc-src-nope", 1, b"vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", CTX)
    assert kms.is_revoked("streamproc-src-nope", 1) is True
    # names straight from an (untrusted) envelope header never reach a URL
    for evil in ("../../sys/seal", "a/b", "", "x" * 300 + "/"):
        with pytest.raises(KeyNotFound):
            kms.unwrap(evil, 1, b"vault:v1:AAAA", CTX)


@integration
def test_version_from_the_future_is_unknown(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    dk = kms.generate_data_key(kek, CTX)
    future = dk.wrapped.replace(b"vault:v1:", b"vault:v7:")
    with pytest.raises(KeyNotFound):
        kms.unwrap(kek, 7, future, CTX)
    assert kms.is_revoked(kek, 7) is True


# -- rotation and revocation ----------------------------------------------------------------


@integration
def test_rotation_keeps_old_versions_unwrappable(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    old = kms.generate_data_key(kek, CTX)
    root.secrets.transit.rotate_key(kek)
    new = kms.generate_data_key(kek, CTX)
    assert (old.kek_version, new.kek_version) == (1, 2)
    assert new.wrapped.startswith(b"vault:v2:")
    assert kms.unwrap(kek, 1, old.wrapped, CTX) == old.plaintext
    assert kms.unwrap(kek, 2, new.wrapped, CTX) == new.plaintext
    assert not kms.is_revoked(kek, 1) and not kms.is_revoked(kek, 2)


@integration
def test_min_decryption_version_revokes_old_versions(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    old = kms.generate_data_key(kek, CTX)
    root.secrets.transit.rotate_key(kek)
    new = kms.generate_data_key(kek, CTX)
    root.secrets.transit.update_key_configuration(kek, min_decryption_version=2)
    with pytest.raises(KeyRevoked) as info:
        kms.unwrap(kek, 1, old.wrapped, CTX)
    assert kek in str(info.value) and "v1" in str(info.value)
    assert kms.is_revoked(kek, 1) is True
    assert kms.is_revoked(kek, 2) is False
    assert kms.unwrap(kek, 2, new.wrapped, CTX) == new.plaintext


@integration
def test_is_revoked_is_cached_briefly(bao: OpenBaoServer, root: Any) -> None:
    now = [0.0]
    kek = new_key(root)
    root.secrets.transit.rotate_key(kek)
    kms = kms_for(bao, revocation_cache_ttl=5.0, clock=lambda: now[0])
    assert kms.is_revoked(kek, 1) is False
    root.secrets.transit.update_key_configuration(kek, min_decryption_version=2)
    assert kms.is_revoked(kek, 1) is False  # still the cached config
    now[0] += 5.1
    assert kms.is_revoked(kek, 1) is True


@integration
def test_soft_deleted_key_is_revoked_and_restorable(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root)
    kms = kms_for(bao)
    dk = kms.generate_data_key(kek, CTX)
    root.adapter.delete(f"/v1/transit/keys/{kek}/soft-delete")
    with pytest.raises(KeyRevoked):
        kms.unwrap(kek, 1, dk.wrapped, CTX)
    with pytest.raises(KeyRevoked):
        kms.generate_data_key(kek, CTX)
    assert kms.is_revoked(kek, 1) is True
    root.adapter.post(f"/v1/transit/keys/{kek}/soft-delete-restore")
    assert kms.unwrap(kek, 1, dk.wrapped, CTX) == dk.plaintext
    assert kms.is_revoked(kek, 1) is False


@integration
def test_hard_deleted_key_is_not_found(bao: OpenBaoServer, root: Any) -> None:
    """A hard-deleted key is indistinguishable from one that never existed."""
    kek = new_key(root)
    kms = kms_for(bao)
    dk = kms.generate_data_key(kek, CTX)
    root.secrets.transit.update_key_configuration(kek, deletion_allowed=True)
    root.secrets.transit.delete_key(kek)
    with pytest.raises(KeyNotFound):
        kms.unwrap(kek, 1, dk.wrapped, CTX)
    assert kms.is_revoked(kek, 1) is True


# -- least privilege, with the shipped policy files ---------------------------------------------


@integration
def test_processor_policy_is_least_privilege(bao: OpenBaoServer, root: Any) -> None:
    src, dst = new_key(root, "src"), new_key(root, "dst")
    producer = kms_for(bao, token_with(root, "streamproc-producer"))
    processor = kms_for(bao, token_with(root, "streamproc-processor"))

    from_producer = producer.generate_data_key(src, CTX)
    assert processor.unwrap(src, 1, from_producer.wrapped, CTX) == from_producer.plaintext
    assert processor.is_revoked(src, 1) is False

    to_audience = processor.generate_data_key(dst, {"topic": "orders.analytics"})
    with pytest.raises(KeyAccessDenied) as info:
        processor.unwrap(dst, 1, to_audience.wrapped, {"topic": "orders.analytics"})
    assert dst in str(info.value)
    assert isinstance(info.value, KeyNotFound)  # record reason: unknown_key
    with pytest.raises(KeyAccessDenied):  # it cannot forge source data either
        processor.generate_data_key(src, CTX)
    with pytest.raises(KeyAccessDenied):  # and cannot read destination key configs
        processor.is_revoked(dst, 1)
    with pytest.raises(KeyAccessDenied):  # the producer cannot read anything back
        producer.unwrap(src, 1, from_producer.wrapped, CTX)


@integration
def test_processor_deny_beats_other_grants(bao: OpenBaoServer, root: Any) -> None:
    dst = new_key(root, "dst")
    root.sys.create_or_update_policy(
        "too-generous", 'path "transit/*" { capabilities = ["update", "read"] }'
    )
    token = token_with(root, "streamproc-processor", "too-generous")
    processor = kms_for(bao, token)
    dk = processor.generate_data_key(dst, CTX)
    with pytest.raises(KeyAccessDenied):
        processor.unwrap(dst, 1, dk.wrapped, CTX)


@integration
def test_subscriber_policy_opens_only_its_audience(bao: OpenBaoServer, root: Any) -> None:
    mine = new_key(root, suffix="streamproc-dst-analytics")
    theirs = new_key(root, "dst")
    processor = kms_for(bao, token_with(root, "streamproc-processor"))
    subscriber = kms_for(bao, token_with(root, "streamproc-subscriber-analytics"))
    a, b = processor.generate_data_key(mine, CTX), processor.generate_data_key(theirs, CTX)
    assert subscriber.unwrap(mine, 1, a.wrapped, CTX) == a.plaintext
    assert subscriber.is_revoked(mine, 1) is False
    with pytest.raises(KeyAccessDenied):
        subscriber.unwrap(theirs, 1, b.wrapped, CTX)
    with pytest.raises(KeyAccessDenied):
        subscriber.generate_data_key(mine, CTX)


@integration
def test_processor_seals_and_opens_subject_keys_and_a_subscriber_cannot(bao: OpenBaoServer, root: Any) -> None:
    """The shipped policy's streamproc-subject-* stanza (erasure.keks): the processor
    creates and re-opens per-subject keys; an audience's subscriber token opens none."""
    subject_kek = new_key(root, suffix=f"streamproc-subject-{uuid.uuid4().hex[:8]}")
    ctx = {"topic": "streamproc.subject-keys"}
    processor = kms_for(bao, token_with(root, "streamproc-processor"))
    subscriber = kms_for(bao, token_with(root, "streamproc-subscriber-analytics"))
    dk = processor.generate_data_key(subject_kek, ctx)
    assert processor.unwrap(subject_kek, 1, dk.wrapped, ctx) == dk.plaintext
    with pytest.raises(KeyAccessDenied):
        subscriber.unwrap(subject_kek, 1, dk.wrapped, ctx)


@integration
def test_processor_reads_pseudonym_secrets(bao: OpenBaoServer, root: Any) -> None:
    processor = kms_for(bao, token_with(root, "streamproc-processor"))
    name = f"pm-{uuid.uuid4().hex[:8]}"
    m1, m2 = os.urandom(32), os.urandom(32)
    for m in (m1, m2):
        root.secrets.kv.v2.create_or_update_secret(
            path=f"streamproc/{name}", secret={"material": base64.b64encode(m).decode()}
        )
    assert processor.get_secret(name) == (2, m2)
    assert processor.get_secret(name, 1) == (1, m1)
    root.secrets.kv.v2.create_or_update_secret(path=f"elsewhere/{name}", secret={"material": "x"})
    with pytest.raises(KeyAccessDenied):  # only secret/streamproc/* is readable
        VaultTransitKms(bao.url, processor.client.token, kv_prefix="elsewhere").get_secret(name)


@integration
def test_get_secret_versions_and_errors(bao: OpenBaoServer, root: Any) -> None:
    kms = kms_for(bao)
    name = f"pm-{uuid.uuid4().hex[:8]}"
    path = f"streamproc/{name}"
    ms = [os.urandom(32) for _ in range(3)]
    for m in ms:
        root.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"material": base64.b64encode(m).decode()}
        )
    root.secrets.kv.v2.delete_secret_versions(path=path, versions=[1])
    root.secrets.kv.v2.destroy_secret_versions(path=path, versions=[2])
    assert kms.get_secret(name) == (3, ms[2])
    with pytest.raises(KeyRevoked):
        kms.get_secret(name, 1)
    with pytest.raises(KeyRevoked):
        kms.get_secret(name, 2)
    with pytest.raises(KeyNotFound):
        kms.get_secret(name, 9)
    with pytest.raises(KeyNotFound):
        kms.get_secret("pm-does-not-exist")
    with pytest.raises(KeyNotFound):
        kms.get_secret("../../sys/policy")
    root.secrets.kv.v2.create_or_update_secret(
        path="streamproc/short", secret={"material": "c2hvcnQ="}
    )
    with pytest.raises(ConfigError) as info:
        kms.get_secret("short")
    assert "c2hvcnQ" not in str(info.value) and "short" in str(info.value)
    root.secrets.kv.v2.create_or_update_secret(path="streamproc/nofield", secret={"other": "x"})
    with pytest.raises(ConfigError, match="material"):
        kms.get_secret("nofield")


# -- outages ----------------------------------------------------------------------------------


@integration
def test_rejected_token_is_an_outage_not_a_denial(bao: OpenBaoServer, root: Any) -> None:
    """An expired/revoked token must pause the processor, not dead-letter every record."""
    kek = new_key(root)
    dk = kms_for(bao).generate_data_key(kek, CTX)
    token = token_with(root, "streamproc-processor")
    kms = kms_for(bao, token)
    root.auth.token.revoke(token)
    with pytest.raises(KmsUnavailable):
        kms.unwrap(kek, 1, dk.wrapped, CTX)
    with pytest.raises(KmsUnavailable):
        VaultTransitKms(bao.url, "not-a-token").generate_data_key(kek, CTX)


@integration
def test_server_down_is_unavailable() -> None:
    with start_openbao() as server:
        server.enable_transit()
        server.client().secrets.transit.create_key("streamproc-src-x")
        kms = kms_for(server)
        kms.revocation_cache_ttl = 0.0
        dk = kms.generate_data_key("streamproc-src-x", CTX)
        server.stop()
        assert not server.running
        with pytest.raises(KmsUnavailable):
            kms.unwrap("streamproc-src-x", 1, dk.wrapped, CTX)
        with pytest.raises(KmsUnavailable):
            kms.generate_data_key("streamproc-src-x", CTX)
        with pytest.raises(KmsUnavailable):
            kms.is_revoked("streamproc-src-x", 1)
        with pytest.raises(KmsUnavailable):
            kms.get_secret("pm")
    # nothing listening at all, and a fresh provider that has not checked the server yet
    never = VaultTransitKms(f"http://127.0.0.1:{free_port()}", "t", timeout=2)
    with pytest.raises(KmsUnavailable):
        never.generate_data_key("streamproc-src-x", CTX)


# -- derived-key binding (for servers without associated_data) --------------------------------


@integration
def test_derived_binding(bao: OpenBaoServer, root: Any) -> None:
    kek = new_key(root, derived=True)
    kms = kms_for(bao, context_binding="derived")
    dk = kms.generate_data_key(kek, CTX)
    assert kms.unwrap(kek, 1, dk.wrapped, CTX) == dk.plaintext
    with pytest.raises(UnwrapFailed):
        kms.unwrap(kek, 1, dk.wrapped, {"topic": "payments"})
    # derived mode on a plain key would be silently unbound: refused
    with pytest.raises(ConfigError, match="not a derived key"):
        kms.generate_data_key(new_key(root), CTX)
    # associated_data mode on a derived key: the server wants a context, we say why
    with pytest.raises(ConfigError, match="derived"):
        kms_for(bao).generate_data_key(kek, CTX)


class _FakeAdapter:
    """Stands in for hvac's adapter to play servers we cannot run here."""

    def __init__(self, version: str | None, warnings: list[str] | None = None) -> None:
        self.version, self.warnings = version, warnings
        self.calls: list[str] = []

    def request(self, method: str, path: str, **kw: Any) -> Any:
        self.calls.append(path)
        if path.endswith("sys/seal-status"):
            return {"version": self.version} if self.version else {}
        ct = "vault:v1:" + base64.b64encode(b"x" * 60).decode()
        return {
            "data": {
                "ciphertext": ct,
                "plaintext": base64.b64encode(b"k" * 32).decode(),
                "key_version": 1,
            },
            "warnings": self.warnings,
        }


class _FakeClient:
    def __init__(self, adapter: _FakeAdapter) -> None:
        self.adapter, self.url = adapter, "http://fake"


def test_old_servers_without_associated_data_are_refused() -> None:
    kms = VaultTransitKms(client=_FakeClient(_FakeAdapter("1.12.7")))
    with pytest.raises(ConfigError, match=r"1\.12\.7.*derived"):
        kms.generate_data_key("k", CTX)
    ok = VaultTransitKms(client=_FakeClient(_FakeAdapter("1.13.0")))
    assert ok.generate_data_key("k", CTX).kek_version == 1


def test_ignored_associated_data_fails_closed() -> None:
    warning = "Endpoint ignored these unrecognized parameters: [associated_data]"
    kms = VaultTransitKms(client=_FakeClient(_FakeAdapter(None, [warning])))
    with pytest.raises(ConfigError, match="ignored"):
        kms.generate_data_key("k", CTX)


# -- end to end through the envelope ---------------------------------------------------------------


@integration
def test_sealer_opener_end_to_end(bao: OpenBaoServer, root: Any) -> None:
    src = new_key(root, "src")
    producer = kms_for(bao, token_with(root, "streamproc-producer"))
    processor = kms_for(bao, token_with(root, "streamproc-processor"))
    sealer = Sealer(producer, src, "orders")
    records = [f"record-{i}".encode() * 3 for i in range(1000)]
    sealed = sealer.seal_many(records[:500]) + [sealer.seal(r) for r in records[500:]]
    assert sealer.data_keys_generated == 1

    opener = Opener.for_kms(processor)
    opened = [opener.open("orders", s) for s in sealed]
    assert [o.plaintext for o in opened] == records
    assert {(o.kek_id, o.kek_version) for o in opened} == {(src, 1)}
    assert opener.cache.misses == 1  # exactly one KMS unwrap for 1000 records
    assert opener.cache.hits == 999

    # the processor's own output for an audience is closed to it
    dst = new_key(root, "dst")
    out = Sealer(processor, dst, "orders.analytics").seal(b"x")
    with pytest.raises(EnvelopeError) as info:
        Opener.for_kms(processor).open("orders.analytics", out)
    assert info.value.reason is Reason.UNKNOWN_KEY


@integration
def test_quarantine_kek_processor_seals_and_only_incident_response_opens(
    bao: OpenBaoServer, root: Any
) -> None:
    """The shipped policies: dead letters are sealed by the processor and opened by the
    incident-response role only (streamproc dlq inspect/replay)."""
    from streamproc.errors import Reason as R
    from streamproc.pipeline.core import InputRecord, Quarantined
    from streamproc.runtime.dlq import DeadLetterError, DeadLetterReader, DeadLetterWriter

    new_key(root, suffix="streamproc-quarantine")
    processor = kms_for(bao, token_with(root, "streamproc-processor"))
    ir = kms_for(bao, token_with(root, "streamproc-incident-response"))
    rec = InputRecord("orders", 0, 7, b"customer-1", b"not an envelope", None, (("trace", b"t"),))
    _key, value, headers = DeadLetterWriter(processor, "streamproc-quarantine", key_token=None).build(
        Quarantined(rec, R.MALFORMED, "too short"), "orders.dlq"
    )
    d = DeadLetterReader(ir).open("orders.dlq", value, headers)
    assert (d.key, d.value, d.headers) == (b"customer-1", b"not an envelope", (("trace", b"t"),))
    with pytest.raises(DeadLetterError):  # the processor cannot read what it quarantined
        DeadLetterReader(processor).open("orders.dlq", value, headers)
    with pytest.raises(KeyAccessDenied):  # incident response cannot forge dead letters
        ir.generate_data_key("streamproc-quarantine", {"topic": "orders.dlq"})
