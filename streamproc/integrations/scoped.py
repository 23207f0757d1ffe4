"""A KMS view that only knows a few KEKs: least privilege for subscribers in development.

In production a subscriber's credentials decide which keys it may use (a Vault policy on
``transit/decrypt/analytics-kek``, an IAM policy on one KMS key).  With the local keyring
every process that can read the file holds every key, so examples and tests wrap it in
:class:`ScopedKms` to behave like the production set-up: a subscriber of
``orders.analytics`` can open its own topic and gets ``unknown_key`` for anything else,
including the unsanitized source topic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from streamproc.crypto.kms import DataKey, KmsProvider
from streamproc.errors import KeyAccessDenied


class ScopedKms:
    """Delegate to ``inner`` for the KEKs in ``allowed``; refuse every other KEK.

    Refusals raise :class:`~streamproc.errors.KeyAccessDenied` (a ``KeyNotFound``), so an
    envelope under a foreign KEK fails to open with reason ``unknown_key``: for a record,
    a key we may not use is a key we do not have.
    """

    def __init__(self, inner: KmsProvider, allowed: Iterable[str]) -> None:
        self.inner = inner
        self.allowed = frozenset(allowed)
        self.name = getattr(inner, "name", "unknown")

    def _check(self, kek_id: str) -> None:
        if kek_id not in self.allowed:
            raise KeyAccessDenied(f"KEK {kek_id!r} is outside this scope ({', '.join(sorted(self.allowed))})")

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        self._check(kek_id)
        return self.inner.generate_data_key(kek_id, context)

    def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self._check(kek_id)
        return self.inner.unwrap(kek_id, kek_version, wrapped, context)

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        self._check(kek_id)
        return self.inner.is_revoked(kek_id, kek_version)


__all__ = ["ScopedKms"]
