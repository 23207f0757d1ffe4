"""AWS KMS as a :class:`~streamproc.crypto.kms.KmsProvider`.

A KEK is a symmetric AWS KMS key named by key id, key ARN, alias name or alias ARN.  Data
keys come from ``GenerateDataKey(KeySpec=AES_256, EncryptionContext=context)``; the
``CiphertextBlob`` is stored as ``wrapped``.  Unwrapping is ``Decrypt`` with the same
``EncryptionContext`` and ``KeyId`` pinned to the KEK, so a blob produced under some other
key is refused even when our credentials could decrypt it.  AWS authenticates the
encryption context as additional data, which is what binds a data key to its topic; IAM
can additionally condition ``kms:Decrypt`` on ``kms:EncryptionContext:topic`` (see
``deploy/aws/iam-processor-policy.json``).

KEK versions
------------
AWS KMS keeps a key's backing versions internal: with automatic rotation enabled it adds
new key material yearly (or on ``RotateKeyOnDemand``) and ``Decrypt`` picks the right one
from the blob.  Nothing is gained by inventing caller-visible versions, so ``kek_version``
is always ``1`` and rotation is AWS-managed; ``unwrap`` refuses any other version as
unknown.  Revocation is per key: disable it or schedule its deletion.  For the same
reason, do not "rotate" by retargeting an alias at a new key: blobs wrapped under the old
key then fail as not belonging to the KEK.  Name KEKs by ARN, or by aliases that keep
pointing at one key.

Error mapping
-------------
======================================================  ====================================
AWS error                                               raised
======================================================  ====================================
``NotFoundException``, ``InvalidArnException``          :class:`~streamproc.errors.KeyNotFound`
``DisabledException``                                   :class:`~streamproc.errors.KeyRevoked`
``KMSInvalidStateException`` (pending deletion, ...)    :class:`~streamproc.errors.KeyRevoked`
    ... unless DescribeKey then says the key is          :class:`~streamproc.errors.KmsUnavailable`
    ``Unavailable``/``Creating``/``Updating``
``AccessDeniedException``                               :class:`~streamproc.errors.KeyAccessDenied`
``InvalidCiphertextException`` (also: wrong context),   :class:`~streamproc.errors.UnwrapFailed`
``IncorrectKeyException``
throttling, ``KMSInternalException``, 5xx, timeouts,    :class:`~streamproc.errors.KmsUnavailable`
connection errors, missing/expired credentials (incl.
SSO/token/instance-metadata retrieval, retry capacity)
any other code (4xx), any other botocore error          :class:`~streamproc.errors.KmsError`
                                                        (unmapped: the processor dead-letters
                                                        the record as ``kms_error``, or pauses
                                                        if it happened while sealing)
======================================================  ====================================

Expired or missing credentials are an outage of ours, not a property of the key: mapping
them to ``KmsUnavailable`` makes the processor pause instead of dead-lettering everything.

Key state
---------
Before calling ``Decrypt`` or ``GenerateDataKey`` the provider consults the key's state
from ``DescribeKey``, cached for ``state_cache_ttl`` seconds (the same cache that backs
:meth:`AwsKms.is_revoked`).  Real AWS refuses disabled and pending-deletion keys on its
own; the check makes the outcome independent of the endpoint (moto, for one, does not
enforce key state) and agree with ``is_revoked``.  Where the role lacks
``kms:DescribeKey`` (typical for destination keys) the state is unknown and the decision
is left to AWS.  Pass ``check_key_state=False`` to skip it entirely.

Messages name key ids and versions; never key material, blobs or credentials.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import boto3
import botocore.config
import botocore.exceptions as bce

from streamproc.crypto.kms import DataKey
from streamproc.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyNotFound,
    KeyRevoked,
    KmsError,
    KmsUnavailable,
    UnwrapFailed,
)

#: The only KEK version AWS keys expose to streamproc (rotation is internal to AWS).
KEK_VERSION = 1
DATA_KEY_BYTES = 32
MAX_CIPHERTEXT_BLOB = 6144  # the Decrypt API limit

_NOT_FOUND = frozenset({"NotFoundException", "InvalidArnException"})
_INAUTHENTIC = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_TRANSIENT = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "TooManyRequestsException",
        "KMSInternalException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "CustomKeyStoreInvalidStateException",
        "RequestTimeout",
        "RequestTimeoutException",
        # credentials that stopped working: ours to fix, not the record's fault
        "ExpiredTokenException",
        "ExpiredToken",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "IncompleteSignature",
        "RequestExpired",
        "SignatureDoesNotMatch",
    }
)
_TRANSPORT: tuple[type[Exception], ...] = (
    bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError, ...
    bce.HTTPClientError,  # ReadTimeoutError, ConnectionClosedError
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    # Credentials and client-side retry capacity that stopped working: ours to fix, never a
    # property of a record (some of these exist only in newer botocore releases).
    *(
        getattr(bce, name)
        for name in (
            "CapacityNotAvailableError",
            "MetadataRetrievalError",
            "NoAuthTokenError",
            "TokenRetrievalError",
            "SSOError",
            "LoginError",
            "RefreshWithMFAUnsupportedError",
            "UnknownCredentialError",
        )
        if isinstance(getattr(bce, name, None), type)
    ),
)
#: Key states in which a key may still come back without anyone re-enabling it.
_TRANSIENT_STATES = frozenset({"Unavailable", "Creating", "Updating"})
_MISSING = "<missing>"


class AwsKms:
    """KEKs in AWS KMS (or an API-compatible endpoint such as moto, via ``endpoint_url``)."""

    name = "aws"

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        session: boto3.session.Session | None = None,
        profile: str | None = None,
        credentials: Mapping[str, str] | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 3,
        check_key_state: bool = True,
        state_cache_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        client: Any | None = None,
    ) -> None:
        """Create the KMS client (no request is sent until the first operation).

        ``credentials`` may hold ``aws_access_key_id``, ``aws_secret_access_key`` and
        ``aws_session_token``; without it boto3's standard chain applies (environment,
        profile, web identity, instance role).  ``max_attempts`` is the number of tries per
        call, the first included, that botocore makes on throttling and transient errors
        before we report ``KmsUnavailable`` (the caller then backs off and retries itself).
        """
        if max_attempts < 1 or connect_timeout <= 0 or read_timeout <= 0:
            raise ConfigError("aws: timeouts and max_attempts must be positive")
        self.check_key_state = check_key_state
        self.state_cache_ttl = state_cache_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, tuple[float, str | None]] = {}
        if client is not None:
            self.client = client
            return
        if credentials:
            unknown = set(credentials) - {
                "aws_access_key_id",
                "aws_secret_access_key",
                "aws_session_token",
            }
            if unknown:
                raise ConfigError(f"aws: unknown credential field(s) {sorted(unknown)}")
        try:
            sess = session or boto3.session.Session(profile_name=profile, **dict(credentials or {}))
        except bce.ProfileNotFound:
            raise ConfigError(f"aws: profile {profile!r} not found") from None
        cfg = botocore.config.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # total_max_attempts counts the first try; botocore's "max_attempts" would not
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
        )
        try:
            self.client = sess.client(
                "kms", region_name=region, endpoint_url=endpoint_url, config=cfg
            )
        except bce.NoRegionError:
            raise ConfigError(
                "aws: no region (set region, AWS_REGION or AWS_DEFAULT_REGION)"
            ) from None
        except ValueError as exc:  # e.g. a malformed endpoint_url
            raise ConfigError(f"aws: invalid client settings ({exc})") from None

    def __repr__(self) -> str:
        return f"AwsKms(region={self.client.meta.region_name!r}, endpoint={self.client.meta.endpoint_url!r})"

    # -- error mapping ----------------------------------------------------------------------
    def _raise_mapped(self, exc: Exception, op: str, kek_id: str) -> NoReturn:
        what = f"KMS key {kek_id!r}"
        if isinstance(exc, _TRANSPORT):
            raise KmsUnavailable(f"aws: {op} on {what} failed: {type(exc).__name__}") from None
        if isinstance(exc, bce.ParamValidationError):
            if op == "Decrypt":
                raise UnwrapFailed(f"aws: wrapped key under {what} is malformed") from None
            raise KeyNotFound(f"aws: {what} is not a valid key id") from None
        if not isinstance(exc, bce.ClientError):
            raise KmsError(f"aws: {op} on {what} failed ({type(exc).__name__})") from None
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _NOT_FOUND:
            raise KeyNotFound(f"aws: {what} not found") from None
        if code == "DisabledException":
            raise KeyRevoked(f"aws: {what} is disabled") from None
        if code == "KMSInvalidStateException":
            state = self._describe(kek_id, tolerant=True, refresh=True)
            if state in _TRANSIENT_STATES:
                raise KmsUnavailable(f"aws: {what} is temporarily in state {state}") from None
            raise KeyRevoked(f"aws: {what} is not usable (state {state or 'unknown'})") from None
        if code == "AccessDeniedException":
            raise KeyAccessDenied(f"aws: access denied for {op} on {what}") from None
        if code in _INAUTHENTIC:
            raise UnwrapFailed(
                f"aws: wrapped key was refused as inauthentic under {what}"
            ) from None
        if code == "InvalidKeyUsageException":
            if op == "Decrypt":  # the envelope names a key that cannot have wrapped it
                raise UnwrapFailed(f"aws: {what} is not a symmetric encryption key") from None
            raise ConfigError(f"aws: {what} is not a symmetric ENCRYPT_DECRYPT key")
        if code in _TRANSIENT or status >= 500 or status == 429:
            raise KmsUnavailable(
                f"aws: {op} on {what} failed transiently ({code or status})"
            ) from None
        raise KmsError(f"aws: {op} on {what} failed ({code or status})") from None

    # -- key state ----------------------------------------------------------------------
    def _describe(self, kek_id: str, *, tolerant: bool, refresh: bool = False) -> str | None:
        """The key's ``KeyState`` (``_MISSING`` if unknown to KMS), cached briefly.

        With ``tolerant``, a denied or failed DescribeKey yields ``None`` ("unknown")
        instead of raising; denials are cached too, so a role without
        ``kms:DescribeKey`` costs one extra call per ``state_cache_ttl``, not per request.
        """
        now = self._clock()
        if not refresh:
            with self._lock:
                hit = self._states.get(kek_id)
            if hit is not None and hit[0] > now:
                if hit[1] is None and not tolerant:
                    raise KeyAccessDenied(
                        f"aws: access denied for DescribeKey on KMS key {kek_id!r}"
                    )
                return hit[1]
        state: str | None
        try:
            state = str(self.client.describe_key(KeyId=kek_id)["KeyMetadata"]["KeyState"])
        except bce.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _NOT_FOUND:
                state = _MISSING
            elif code == "AccessDeniedException" and tolerant:
                state = None
            elif tolerant:
                return None  # outages are not cached
            else:
                self._raise_mapped(exc, "DescribeKey", kek_id)
        except (bce.BotoCoreError, KeyError) as exc:
            if tolerant:
                return None
            self._raise_mapped(exc, "DescribeKey", kek_id)
        with self._lock:
            if len(self._states) > 10_000:
                self._states.clear()
            self._states[kek_id] = (now + self.state_cache_ttl, state)
        return state

    def _precheck(self, kek_id: str) -> None:
        if not self.check_key_state:
            return
        state = self._describe(kek_id, tolerant=True)
        if state is None or state == "Enabled":
            return
        if state == _MISSING:
            raise KeyNotFound(f"aws: KMS key {kek_id!r} not found")
        if state in _TRANSIENT_STATES:
            raise KmsUnavailable(f"aws: KMS key {kek_id!r} is temporarily in state {state}")
        raise KeyRevoked(f"aws: KMS key {kek_id!r} is in state {state}")

    @staticmethod
    def _check_id(kek_id: str) -> None:
        if not isinstance(kek_id, str) or not 1 <= len(kek_id) <= 2048:
            raise KeyNotFound("aws: KEK id must be 1..2048 characters")

    # -- KmsProvider ----------------------------------------------------------------------
    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        """A fresh AES-256 data key, bound to ``context`` via the encryption context."""
        self._check_id(kek_id)
        self._precheck(kek_id)
        try:
            resp = self.client.generate_data_key(
                KeyId=kek_id, KeySpec="AES_256", EncryptionContext=dict(context)
            )
        except (bce.ClientError, bce.BotoCoreError) as exc:
            self._raise_mapped(exc, "GenerateDataKey", kek_id)
        plaintext, blob = resp.get("Plaintext"), resp.get("CiphertextBlob")
        if (
            not isinstance(plaintext, bytes)
            or len(plaintext) != DATA_KEY_BYTES
            or not isinstance(blob, bytes)
        ):
            raise KmsError(f"aws: GenerateDataKey under {kek_id!r} returned an unexpected response")
        return DataKey(kek_id, KEK_VERSION, plaintext, blob)

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        """``Decrypt`` pinned to ``kek_id`` with the same encryption context."""
        self._check_id(kek_id)
        if kek_version != KEK_VERSION:
            raise KeyNotFound(
                f"aws: KMS key {kek_id!r} has no version {kek_version} (AWS keys are always v{KEK_VERSION})"
            )
        if not 1 <= len(wrapped) <= MAX_CIPHERTEXT_BLOB:
            raise UnwrapFailed(f"aws: wrapped key under {kek_id!r} has an impossible length")
        self._precheck(kek_id)
        try:
            resp = self.client.decrypt(
                CiphertextBlob=bytes(wrapped), KeyId=kek_id, EncryptionContext=dict(context)
            )
        except (bce.ClientError, bce.BotoCoreError) as exc:
            self._raise_mapped(exc, "Decrypt", kek_id)
        plaintext = resp.get("Plaintext")
        if not isinstance(plaintext, bytes) or len(plaintext) != DATA_KEY_BYTES:
            raise UnwrapFailed(
                f"aws: wrapped key under {kek_id!r} did not decrypt to a 256-bit data key"
            )
        return plaintext

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        """True unless DescribeKey says the key is ``Enabled`` (cached briefly).

        Raises :class:`KeyAccessDenied` or :class:`KmsUnavailable` when the state cannot
        be read; the data-key cache treats those as "not known to be revoked".
        """
        self._check_id(kek_id)
        if kek_version != KEK_VERSION:
            return True
        state = self._describe(kek_id, tolerant=False)
        return state != "Enabled"
