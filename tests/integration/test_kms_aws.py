"""AwsKms against a real moto server on 127.0.0.1 (dummy credentials, us-east-1).

Moto speaks the KMS wire protocol and authenticates the encryption context, but it does
not enforce key state (disabled and pending-deletion keys still decrypt there), returns
``AccessDeniedException`` where AWS says ``IncorrectKeyException``, and cannot evaluate
KMS resource ARNs or encryption-context conditions in IAM policies.  So:

* the key-state cases go through the provider's DescribeKey pre-check against moto;
* the AWS error codes moto never produces are exercised with botocore's ``Stubber``
  (no network), in the "error mapping" section;
* the shipped IAM policy is checked for structure and intent, not evaluated.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")

from botocore.exceptions import ClientError  # noqa: E402
from botocore.stub import Stubber  # noqa: E402

from streamproc.crypto.envelope import Opener, Sealer  # noqa: E402
from streamproc.crypto.kms import KmsProvider  # noqa: E402
from streamproc.crypto.kms.aws import AwsKms  # noqa: E402
from streamproc.errors import (  # noqa: E402
    ConfigError,
    KeyAccessDenied,
    KeyNotFound,
    KeyRevoked,
    KmsError,
    KmsUnavailable,
    UnwrapFailed,
)
from tests.integration.servers import MotoServer, free_port, start_moto  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
CTX = {"topic": "orders"}
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}

integration = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def dummy_credentials() -> Iterator[None]:
    """Dummy credentials in the environment, so boto3's standard chain is what we test."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in DUMMY_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
            mp.delenv(k, raising=False)
        yield


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with start_moto() as server:
        yield server


@pytest.fixture
def admin(moto: MotoServer) -> Any:
    return moto.kms_client()


def kms_for(moto: MotoServer, **kw: Any) -> AwsKms:
    kw.setdefault("state_cache_ttl", 0.0)
    return AwsKms(REGION, moto.url, **kw)


def new_key(admin: Any, alias: bool = False) -> str:
    key_id = str(admin.create_key(Description="streamproc test KEK")["KeyMetadata"]["KeyId"])
    if not alias:
        return key_id
    name = f"alias/streamproc-{uuid.uuid4().hex[:10]}"
    admin.create_alias(AliasName=name, TargetKeyId=key_id)
    return name


# -- basics ---------------------------------------------------------------------------------


@integration
@pytest.mark.parametrize("naming", ["key_id", "alias", "arn"])
def test_round_trip(moto: MotoServer, admin: Any, naming: str) -> None:
    kek = new_key(admin, alias=naming == "alias")
    if naming == "arn":
        kek = admin.describe_key(KeyId=kek)["KeyMetadata"]["Arn"]
    kms = kms_for(moto)
    assert isinstance(kms, KmsProvider)
    dk = kms.generate_data_key(kek, CTX)
    assert (dk.kek_id, dk.kek_version, len(dk.plaintext)) == (kek, 1, 32)
    assert kms.unwrap(kek, 1, dk.wrapped, CTX) == dk.plaintext
    assert kms.is_revoked(kek, 1) is False
    assert kms.generate_data_key(kek, CTX).plaintext != dk.plaintext


@integration
def test_encryption_context_is_bound(moto: MotoServer, admin: Any) -> None:
    kek = new_key(admin)
    kms = kms_for(moto)
    dk = kms.generate_data_key(kek, CTX)
    for wrong in ({"topic": "payments"}, {}, {"topic": "orders", "extra": "x"}):
        with pytest.raises(UnwrapFailed) as info:
            kms.unwrap(kek, 1, dk.wrapped, wrong)
        assert kek in str(info.value) and "payments" not in str(info.value)
    # the server enforces it: a raw Decrypt without the context fails too
    with pytest.raises(ClientError, match="InvalidCiphertext"):
        admin.decrypt(CiphertextBlob=dk.wrapped, KeyId=kek)


@integration
def test_tampered_and_foreign_blobs(moto: MotoServer, admin: Any) -> None:
    kek, other = new_key(admin), new_key(admin)
    kms = kms_for(moto)
    dk = kms.generate_data_key(kek, CTX)
    tampered = dk.wrapped[:-1] + bytes([dk.wrapped[-1] ^ 1])
    with pytest.raises(UnwrapFailed):
        kms.unwrap(kek, 1, tampered, CTX)
    with pytest.raises(UnwrapFailed):
        kms.unwrap(kek, 1, b"x" * 60, CTX)
    with pytest.raises(UnwrapFailed):
        kms.unwrap(kek, 1, b"x" * 7000, CTX)  # longer than any CiphertextBlob
    # a blob of one key presented under another: AWS says IncorrectKeyException
    # (UnwrapFailed), moto says AccessDeniedException (KeyAccessDenied); never success
    with pytest.raises((UnwrapFailed, KeyAccessDenied)):
        kms.unwrap(other, 1, dk.wrapped, CTX)


@integration
def test_versions_other_than_1_do_not_exist(moto: MotoServer, admin: Any) -> None:
    kek = new_key(admin)
    kms = kms_for(moto)
    dk = kms.generate_data_key(kek, CTX)
    with pytest.raises(KeyNotFound, match="no version 2"):
        kms.unwrap(kek, 2, dk.wrapped, CTX)
    assert kms.is_revoked(kek, 2) is True


@integration
def test_unknown_key(moto: MotoServer) -> None:
    kms = kms_for(moto)
    for kek in ("alias/streamproc-nope", "11111111-2222-3333-4444-555555555555"):
        with pytest.raises(KeyNotFound) as info:
            kms.generate_data_key(kek, CTX)
        assert not isinstance(info.value, KeyAccessDenied)
        with pytest.raises(KeyNotFound):
            kms.unwrap(kek, 1, b"x" * 60, CTX)
        assert kms.is_revoked(kek, 1) is True
    # without the pre-check the server's NotFoundException maps the same way
    bare = kms_for(moto, check_key_state=False)
    with pytest.raises(KeyNotFound):
        bare.generate_data_key("alias/streamproc-nope", CTX)


# -- key state ------------------------------------------------------------------------------


@integration
def test_disabled_key_is_revoked(moto: MotoServer, admin: Any) -> None:
    kek = new_key(admin, alias=True)
    kms = kms_for(moto)
    dk = kms.generate_data_key(kek, CTX)
    key_id = admin.describe_key(KeyId=kek)["KeyMetadata"]["KeyId"]  # admin calls need the id
    admin.disable_key(KeyId=key_id)
    with pytest.raises(KeyRevoked) as info:
        kms.unwrap(kek, 1, dk.wrapped, CTX)
    assert kek in str(info.value) and "Disabled" in str(info.value)
    with pytest.raises(KeyRevoked):
        kms.generate_data_key(kek, CTX)
    assert kms.is_revoked(kek, 1) is True
    admin.enable_key(KeyId=key_id)
    assert kms.unwrap(kek, 1, dk.wrapped, CTX) == dk.plaintext
    assert kms.is_revoked(kek, 1) is False


@integration
def test_key_pending_deletion_is_revoked(moto: MotoServer, admin: Any) -> None:
    kek = new_key(admin)
    kms = kms_for(moto)
    dk = kms.generate_data_key(kek, CTX)
    admin.schedule_key_deletion(KeyId=kek, PendingWindowInDays=7)
    with pytest.raises(KeyRevoked, match="PendingDeletion"):
        kms.unwrap(kek, 1, dk.wrapped, CTX)
    assert kms.is_revoked(kek, 1) is True
    admin.cancel_key_deletion(KeyId=kek)  # leaves the key Disabled, as AWS does
    assert kms.is_revoked(kek, 1) is True
    admin.enable_key(KeyId=kek)
    assert kms.unwrap(kek, 1, dk.wrapped, CTX) == dk.plaintext


@integration
def test_key_state_is_cached_briefly(moto: MotoServer, admin: Any) -> None:
    now = [0.0]
    kek = new_key(admin)
    kms = kms_for(moto, state_cache_ttl=5.0, clock=lambda: now[0])
    assert kms.is_revoked(kek, 1) is False
    admin.disable_key(KeyId=kek)
    assert kms.is_revoked(kek, 1) is False
    now[0] += 5.1
    assert kms.is_revoked(kek, 1) is True


# -- outages ----------------------------------------------------------------------------------


@integration
def test_server_down_is_unavailable(admin: Any) -> None:
    with start_moto() as server:
        kek = new_key(server.kms_client())
        kms = AwsKms(REGION, server.url, max_attempts=1, state_cache_ttl=0.0)
        dk = kms.generate_data_key(kek, CTX)
        server.stop()
        assert not server.running
        with pytest.raises(KmsUnavailable):
            kms.unwrap(kek, 1, dk.wrapped, CTX)
        with pytest.raises(KmsUnavailable):
            kms.generate_data_key(kek, CTX)
        with pytest.raises(KmsUnavailable):
            kms.is_revoked(kek, 1)
    never = AwsKms(REGION, f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(KmsUnavailable):
        never.generate_data_key("alias/x", CTX)


# -- end to end through the envelope ---------------------------------------------------------------


@integration
def test_sealer_opener_end_to_end(moto: MotoServer, admin: Any) -> None:
    kek = new_key(admin, alias=True)
    kms = kms_for(moto, state_cache_ttl=5.0)
    sealer = Sealer(kms, kek, "orders")
    records = [f"record-{i}".encode() * 3 for i in range(1000)]
    sealed = sealer.seal_many(records)
    assert sealer.data_keys_generated == 1

    opener = Opener.for_kms(kms)
    opened = [opener.open("orders", s) for s in sealed]
    assert [o.plaintext for o in opened] == records
    assert {(o.kek_id, o.kek_version) for o in opened} == {(kek, 1)}
    assert opener.cache.misses == 1  # exactly one Decrypt for 1000 records
    assert opener.cache.hits == 999


# -- logging at DEBUG never shows a data key --------------------------------------------------


@integration
def test_debug_logging_never_shows_a_data_key(moto: MotoServer, admin: Any) -> None:
    """``logging.level: DEBUG`` with AWS KMS: botocore logs response bodies, Plaintext
    included; the processor's log handler must show none of it (compared against the
    actual data keys, base64 and hex)."""
    import base64
    import io
    import logging

    from streamproc.observability.logging import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    botocore_log = logging.getLogger("botocore")
    saved_botocore = botocore_log.level
    out, control = io.StringIO(), io.StringIO()
    try:
        configure_logging("DEBUG", "json", stream=out)
        kms, kek = kms_for(moto), new_key(admin)
        first = kms.generate_data_key(kek, CTX)  # at the levels configure_logging leaves
        # Positive control: botocore allowed to log at DEBUG really prints the data key,
        # and its records propagate to the processor's handler, which must drop them.
        raw = logging.StreamHandler(control)
        botocore_log.addHandler(raw)
        botocore_log.setLevel(logging.DEBUG)
        try:
            second = kms.generate_data_key(kek, CTX)
            unwrapped = kms.unwrap(kek, 1, second.wrapped, CTX)
        finally:
            botocore_log.removeHandler(raw)
        logging.getLogger("streamproc.test").debug("streamproc debug still shows")
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])
        botocore_log.setLevel(saved_botocore)
    assert unwrapped == second.plaintext
    assert base64.b64encode(second.plaintext).decode() in control.getvalue()  # the threat is real
    text = out.getvalue()
    assert "streamproc debug still shows" in text
    for dk in (first.plaintext, second.plaintext):
        assert base64.b64encode(dk).decode() not in text
        assert dk.hex() not in text
        assert base64.urlsafe_b64encode(dk).decode() not in text


# -- error mapping for codes moto never produces (botocore Stubber, no network) ---------------------


def _stubbed(**kw: Any) -> tuple[AwsKms, Stubber]:
    client = boto3.client(
        "kms", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    return AwsKms(client=client, **kw), Stubber(client)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("DisabledException", 400, KeyRevoked),
        ("NotFoundException", 400, KeyNotFound),
        ("InvalidArnException", 400, KeyNotFound),
        ("AccessDeniedException", 400, KeyAccessDenied),
        ("InvalidCiphertextException", 400, UnwrapFailed),
        ("IncorrectKeyException", 400, UnwrapFailed),
        ("InvalidKeyUsageException", 400, UnwrapFailed),
        ("ThrottlingException", 400, KmsUnavailable),
        ("KMSInternalException", 500, KmsUnavailable),
        ("DependencyTimeoutException", 503, KmsUnavailable),
        ("KeyUnavailableException", 500, KmsUnavailable),
        ("ExpiredTokenException", 400, KmsUnavailable),
        ("UnrecognizedClientException", 400, KmsUnavailable),
        ("SomethingNew", 502, KmsUnavailable),
        ("SomethingNew", 400, KmsError),
    ],
)
def test_decrypt_error_mapping(code: str, status: int, expected: type[Exception]) -> None:
    kms, stub = _stubbed(check_key_state=False)
    stub.add_client_error("decrypt", service_error_code=code, http_status_code=status)
    with stub, pytest.raises(expected) as info:
        kms.unwrap("alias/src", 1, b"x" * 60, CTX)
    assert type(info.value) is expected or expected is KmsError


@pytest.mark.parametrize(
    ("state", "expected"), [("PendingDeletion", KeyRevoked), ("Unavailable", KmsUnavailable)]
)
def test_invalid_state_is_refined_by_describe_key(state: str, expected: type[Exception]) -> None:
    kms, stub = _stubbed(check_key_state=False)
    stub.add_client_error("decrypt", service_error_code="KMSInvalidStateException")
    stub.add_response("describe_key", {"KeyMetadata": {"KeyId": "k", "KeyState": state}})
    with stub, pytest.raises(expected, match=state):
        kms.unwrap("alias/src", 1, b"x" * 60, CTX)


def test_generate_error_mapping() -> None:
    kms, stub = _stubbed(check_key_state=False)
    stub.add_client_error("generate_data_key", service_error_code="InvalidKeyUsageException")
    stub.add_client_error("generate_data_key", service_error_code="DisabledException")
    with stub:
        with pytest.raises(ConfigError, match="ENCRYPT_DECRYPT"):
            kms.generate_data_key("alias/dst", CTX)
        with pytest.raises(KeyRevoked):
            kms.generate_data_key("alias/dst", CTX)


def test_describe_denied_leaves_the_decision_to_kms() -> None:
    """Least privilege on destination keys: no DescribeKey, yet everything works."""
    kms, stub = _stubbed(state_cache_ttl=60.0)
    stub.add_client_error("describe_key", service_error_code="AccessDeniedException")
    blob = {"CiphertextBlob": b"w" * 60, "Plaintext": b"k" * 32, "KeyId": "arn:k"}
    stub.add_response("generate_data_key", blob)
    stub.add_response("generate_data_key", blob)  # the denial is cached: no 2nd describe
    with stub:
        assert kms.generate_data_key("alias/dst", CTX).plaintext == b"k" * 32
        assert kms.generate_data_key("alias/dst", CTX).kek_version == 1
        with pytest.raises(KeyAccessDenied):  # is_revoked cannot know: it says so
            kms.is_revoked("alias/dst", 1)
    stub.assert_no_pending_responses()


def test_messages_never_carry_material() -> None:
    kms, stub = _stubbed(check_key_state=False)
    stub.add_response("decrypt", {"Plaintext": b"short", "KeyId": "arn:k"})
    with stub, pytest.raises(UnwrapFailed) as info:
        kms.unwrap("alias/src", 1, b"secret-blob" * 6, CTX)
    assert "short" not in str(info.value) and "secret-blob" not in str(info.value)
    assert "secret" not in repr(kms).lower() and "key_id" not in repr(kms).lower()


# -- the shipped IAM policy ---------------------------------------------------------------------------


def test_iam_processor_policy_is_least_privilege() -> None:
    doc = json.loads((REPO / "deploy" / "aws" / "iam-processor-policy.json").read_text())
    assert doc["Version"] == "2012-10-17"

    def actions(st: dict[str, Any]) -> set[str]:
        a = st["Action"]
        return {a} if isinstance(a, str) else set(a)

    def resources(st: dict[str, Any]) -> set[str]:
        r = st["Resource"]
        return {r} if isinstance(r, str) else set(r)

    allows = [s for s in doc["Statement"] if s["Effect"] == "Allow"]
    denies = [s for s in doc["Statement"] if s["Effect"] == "Deny"]
    granted = set().union(*(actions(s) for s in allows))
    assert granted == {"kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"}
    assert all("*" not in r for s in allows for r in resources(s))

    decrypt = [s for s in allows if "kms:Decrypt" in actions(s)]
    generate = [s for s in allows if "kms:GenerateDataKey" in actions(s)]
    src = set().union(*(resources(s) for s in decrypt))
    dst = set().union(*(resources(s) for s in generate))
    assert src and dst and not src & dst
    for s in decrypt:
        # decrypt only for data keys bound to a source topic, or for the wrapped
        # pseudonym master bound to its secret id (docs/keys.md, wrapped secret file)
        ctx = s["Condition"]["StringEquals"]
        assert "kms:EncryptionContext:topic" in ctx or ctx.get("kms:EncryptionContext:secret") == "pseudonym-master"
    for s in generate:  # and data keys for audiences are always bound to a topic
        assert s["Condition"]["Null"]["kms:EncryptionContext:topic"] == "false"
    denied_on_dst = {a for s in denies if resources(s) >= dst for a in actions(s)}
    assert "kms:Decrypt" in denied_on_dst
