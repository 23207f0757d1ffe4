"""Build the runtime's collaborators (KMS, schema source, policy, pipeline) from a Config.

Kept apart from the worker so the worker receives collaborators rather than reaching for
them: tests hand it a pipeline over a test-double KMS, production hands it this.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from streamproc.config import Config
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms import DataKey, KmsProvider
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.observability import Observer
from streamproc.pipeline.core import Pipeline, build_routes
from streamproc.policy.model import load_policy
from streamproc.schema.registry import SchemaSource, build_schema_source


def build_kms(config: Config) -> KmsProvider:
    """The provider named by ``kms:`` (the factory validates provider settings)."""
    from streamproc.crypto.kms.factory import build_kms as _build

    return _build(dict(config.kms), base_dir=config.base_dir)


def build_schemas(config: Config) -> SchemaSource:
    return build_schema_source(dict(config.schemas))


class _TimedKms:
    """Reports ``generate_data_key`` calls (sealer rotations) to the observer.

    Unwraps are reported by the data-key cache's ``on_kms_call`` hook; this wrapper only
    sees the calls the sealers make, so nothing is counted twice.
    """

    def __init__(self, inner: KmsProvider, observer: Observer) -> None:
        self.inner = inner
        self.observer = observer
        self.name = getattr(inner, "name", "unknown")

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            return self.inner.generate_data_key(kek_id, context)
        except Exception as exc:
            outcome = "unavailable" if _is_transient(exc) else type(exc).__name__
            raise
        finally:
            self.observer.kms_call(
                self.name, "generate_data_key", outcome, time.perf_counter() - t0
            )

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        return self.inner.unwrap(kek_id, kek_version, wrapped, context)

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        return self.inner.is_revoked(kek_id, kek_version)

    def __getattr__(self, item: str) -> Any:  # get_secret and provider extras
        return getattr(self.inner, item)


def _is_transient(exc: BaseException) -> bool:
    from streamproc.errors import TransientError

    return isinstance(exc, TransientError)


def build_pipeline(
    config: Config,
    *,
    kms: KmsProvider | None = None,
    schemas: SchemaSource | None = None,
    observer: Observer | None = None,
) -> Pipeline:
    """A :class:`Pipeline` for the config's routes, instrumented for ``observer``.

    May raise :class:`~streamproc.errors.TransientError` (the pseudonym secret is fetched
    from the KMS here); callers retry.
    """
    observer = observer or Observer()
    kms = kms or build_kms(config)
    schemas = schemas or build_schemas(config)
    policy = load_policy(config.policy)
    keys = PseudonymKeys(kms, policy.pseudonym_key) if policy.pseudonym_key else None  # type: ignore[arg-type]
    opener = Opener.for_kms(kms)
    provider = getattr(kms, "name", "unknown")
    opener.cache.on_kms_call = lambda op, outcome, s: observer.kms_call(provider, op, outcome, s)
    timed = _TimedKms(kms, observer)

    def make_sealer(_kms: KmsProvider, kek: str, topic: str) -> Sealer:
        return Sealer(timed, kek, topic)

    return Pipeline(
        routes=build_routes(config.routes_spec()),
        policy=policy,
        opener=opener,
        kms=kms,
        schemas=schemas,
        keys=keys,
        max_record_bytes=config.max_record_bytes,
        sealer_factory=make_sealer,
    )
