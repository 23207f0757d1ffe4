"""One place that measures KMS calls: a provider wrapper reporting to an observer.

In the style of Kroxylicious' ``InstrumentedKms``: instead of hooks in every caller (the
data-key cache, the sealers, the runtime), the provider itself is decorated once, where
the runtime is composed, and every data-path call through it is reported as
``(provider, operation, outcome, seconds)``.  A new KMS metric is therefore added in
one place: :meth:`KmsObserver.kms_call`'s implementation, fed from here.

The crypto layer does not know who listens: :class:`KmsObserver` is a protocol that the
observability layer's ``Observer`` satisfies structurally, so nothing here imports it.

What is reported: ``generate_data_key`` (a sealer taking a fresh data key) and
``unwrap`` (a data-key cache miss).  ``is_revoked`` is a key-*state* check whose
failures mean "state unknown" by design (a processor may lack read access to a source
KEK's state) and are swallowed by its callers; it is delegated unmeasured so that it
cannot raise a KMS error alert on a deployment that is working as intended.

Outcomes are value-free class names: ``ok``, ``unavailable`` (any
:class:`~streamproc.errors.TransientError`), the class name of a typed
:class:`~streamproc.errors.KmsError` subclass (``KeyNotFound``, ``KeyRevoked``, ...),
and ``error`` for anything else (a plain ``KmsError`` or an exception the provider did
not map).  The exception itself -- whose message may quote a key id -- is never
passed on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from streamproc.crypto.kms import DataKey, KmsProvider
from streamproc.errors import KmsError, TransientError


class KmsObserver(Protocol):
    """Who hears about KMS calls (``streamproc.observability.Observer`` is one)."""

    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        """One KMS call: provider name, operation, outcome class, wall-clock seconds."""
        ...


def call_outcome(exc: BaseException | None) -> str:
    """The outcome class of a KMS call that raised ``exc`` (``None``: it succeeded)."""
    if exc is None:
        return "ok"
    if isinstance(exc, TransientError):
        return "unavailable"
    if isinstance(exc, KmsError) and type(exc) is not KmsError:
        return type(exc).__name__
    return "error"


class InstrumentedKms:
    """A :class:`~streamproc.crypto.kms.KmsProvider` that reports its data-path calls.

    Transparent otherwise: results and exceptions pass through unchanged, and any other
    attribute (``get_secret``, provider extras) is delegated to ``inner``.  An observer
    that raises never turns a successful KMS call into a failure (its error is counted in
    :attr:`observer_errors`).
    """

    def __init__(self, inner: KmsProvider, observer: KmsObserver) -> None:
        self.inner = inner
        self.observer = observer
        self.name: str = getattr(inner, "name", "unknown")
        self.observer_errors = 0

    def _report(self, operation: str, exc: BaseException | None, t0: float) -> None:
        try:
            self.observer.kms_call(self.name, operation, call_outcome(exc), time.perf_counter() - t0)
        except Exception:
            self.observer_errors += 1

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        t0 = time.perf_counter()
        try:
            dk = self.inner.generate_data_key(kek_id, context)
        except Exception as exc:
            self._report("generate_data_key", exc, t0)
            raise
        self._report("generate_data_key", None, t0)
        return dk

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        t0 = time.perf_counter()
        try:
            key = self.inner.unwrap(kek_id, kek_version, wrapped, context)
        except Exception as exc:
            self._report("unwrap", exc, t0)
            raise
        self._report("unwrap", None, t0)
        return key

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        return self.inner.is_revoked(kek_id, kek_version)

    def __getattr__(self, item: str) -> Any:  # get_secret and provider extras
        return getattr(self.inner, item)


def instrumented(kms: KmsProvider, observer: KmsObserver) -> KmsProvider:
    """``kms`` reporting to ``observer``; a provider already instrumented is kept as is.

    Idempotent on purpose: the composition root instruments the provider it builds, and
    a runtime handed a pipeline composed elsewhere (tests, embedders) instruments it
    without counting any call twice.
    """
    if isinstance(kms, InstrumentedKms):
        return kms
    return InstrumentedKms(kms, observer)


__all__ = ["InstrumentedKms", "KmsObserver", "call_outcome", "instrumented"]
