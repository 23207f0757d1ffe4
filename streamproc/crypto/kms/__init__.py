"""The KMS interface every key provider implements.

A provider holds key-encryption keys (KEKs) and does exactly two things with them on the
data path: it *generates* a fresh data key (returning the plaintext and the wrapped form)
and it *unwraps* a wrapped data key.  The processor needs ``unwrap`` on source KEKs and
only ``generate_data_key`` on destination KEKs; keeping the two apart is what lets an
operator grant least privilege.

``context`` is bound to the wrapped key (AAD for local keys, the encryption context for
AWS KMS, transit ``associated_data`` for Vault/OpenBao, with derived keys as a fallback): a data key wrapped for one topic
does not unwrap for another.

Errors are typed (:class:`~streamproc.errors.KeyNotFound`,
:class:`~streamproc.errors.KeyRevoked`, :class:`~streamproc.errors.UnwrapFailed` for
bad input; :class:`~streamproc.errors.KmsUnavailable` for outages that must be retried,
never dead-lettered).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from streamproc.errors import KmsError, Reason, TransientError


@dataclasses.dataclass(frozen=True, slots=True)
class DataKey:
    """A freshly generated data key: use ``plaintext`` locally, ship ``wrapped``."""

    kek_id: str
    kek_version: int
    plaintext: bytes = dataclasses.field(repr=False)
    wrapped: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``streamproc keys list`` shows of a key: never its material."""

    kek_id: str
    versions: tuple[int, ...]
    primary_version: int
    revoked_versions: tuple[int, ...] = ()
    kind: str = "kek"


@runtime_checkable
class KmsProvider(Protocol):
    """A key-management service as seen by streamproc."""

    #: Short provider name, used as a metric label (``local``, ``vault``, ``aws``).
    name: str

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        """Create a 256-bit data key under the KEK's primary version."""
        ...

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        """Return the plaintext data key, or raise a typed :class:`KmsError`."""
        ...

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        """Cheap check used to evict cached data keys after a revocation (may be cached)."""
        ...


def context_aad(kek_id: str, kek_version: int, context: Mapping[str, str]) -> bytes:
    """Canonical byte encoding of a wrap context, shared by providers that need AAD."""
    parts = [f"kek={kek_id}", f"v={kek_version}"]
    parts.extend(f"{k}={context[k]}" for k in sorted(context))
    return "\x1f".join(parts).encode()


def kms_error_reason(exc: BaseException) -> Reason | None:
    """Classify an error raised by a provider's ``unwrap``: a reason class, or ``None``.

    ``None`` means transient (:class:`~streamproc.errors.TransientError`, e.g.
    :class:`~streamproc.errors.KmsUnavailable`): not the record's fault, pause and retry.
    Everything else is record-level, because the key id and wrapped key that caused it
    came from the record:

    ==========================================  =======================================
    error                                       reason class
    ==========================================  =======================================
    ``KeyNotFound`` (incl. ``KeyAccessDenied``)  ``unknown_key``
    ``KeyRevoked``                              ``key_revoked``
    ``UnwrapFailed``                            ``tampered``
    any other ``KmsError`` (unmapped by the     ``kms_error``
    provider), or any other exception the
    provider let escape
    ==========================================  =======================================

    The per-provider tables (which server answer becomes which error) are in the
    provider modules and docs/keys.md.
    """
    if isinstance(exc, TransientError):
        return None
    reason = getattr(type(exc), "reason", None) if isinstance(exc, KmsError) else None
    return reason if isinstance(reason, Reason) else Reason.KMS_ERROR
