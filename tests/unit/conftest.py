"""Shared fixtures for the unit tests of the core engine.

* ``keyring`` -- a fresh :class:`LocalKeyring` in a tmp dir with the KEKs of the example
  deployment and the ``pseudonym-master`` secret (function scope: tests may rotate/revoke);
* ``shared_keyring`` / ``shared_keys`` -- the same, created once per session, for property
  tests (hypothesis does not like function-scoped fixtures) and read-only use;
* ``schema_dir`` -- a tmp copy of ``schemas/`` (tests may register into it);
* ``policy`` -- ``policy.yaml`` loaded;
* ``make_pipeline`` -- a factory for a :class:`Pipeline` over all of the above.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streamproc.crypto.envelope import Opener
from streamproc.crypto.kms import DataKey
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.pipeline.core import Destination, Pipeline, Route
from streamproc.policy.model import Policy, load_policy
from streamproc.schema.registry import CachingSchemaSource, DirectorySchemaSource

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
POLICY_FILE = ROOT / "policy.yaml"
KEKS = ("orders-kek", "logins-kek", "analytics-kek", "fraud-kek", "support-kek")
PSEUDONYM = "pseudonym-master"
AUDIENCES = ("analytics", "fraud", "support")


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


ORDER_SCHEMA = load_schema("order.avsc")
LOGIN_SCHEMA = load_schema("login.avsc")


def new_keyring(directory: Path) -> LocalKeyring:
    ring = LocalKeyring.create(directory / "keyring.json")
    for kek in KEKS:
        ring.create_key(kek)
    ring.create_key(PSEUDONYM, "secret")
    return ring


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return new_keyring(tmp_path / "keys")


@pytest.fixture(scope="session")
def shared_keyring(tmp_path_factory: pytest.TempPathFactory) -> LocalKeyring:
    return new_keyring(tmp_path_factory.mktemp("shared-keys"))


@pytest.fixture(scope="session")
def shared_keys(shared_keyring: LocalKeyring) -> PseudonymKeys:
    return PseudonymKeys(shared_keyring, PSEUDONYM)


@pytest.fixture
def keys(keyring: LocalKeyring) -> PseudonymKeys:
    return PseudonymKeys(keyring, PSEUDONYM)


@pytest.fixture
def schema_dir(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, target)
    return target


@pytest.fixture
def schemas(schema_dir: Path) -> CachingSchemaSource:
    return CachingSchemaSource(DirectorySchemaSource(schema_dir))


@pytest.fixture(scope="session")
def policy() -> Policy:
    return load_policy(POLICY_FILE)


class CountingKms:
    """Wraps a provider and counts the calls that reach it (and is itself a provider)."""

    def __init__(self, inner: LocalKeyring) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: Counter[str] = Counter()

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        self.calls["generate_data_key"] += 1
        return self.inner.generate_data_key(kek_id, context)

    def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self.calls["unwrap"] += 1
        return self.inner.unwrap(kek_id, kek_version, wrapped, context)

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        self.calls["is_revoked"] += 1
        return self.inner.is_revoked(kek_id, kek_version)

    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        self.calls["get_secret"] += 1
        return self.inner.get_secret(key_id, version)


#: The example deployment: orders and logins fan out to one topic per audience.
DESTINATIONS = (
    Destination("sanitized.analytics", "analytics", "analytics-kek"),
    Destination("sanitized.fraud", "fraud", "fraud-kek"),
    Destination("sanitized.support", "support", "support-kek"),
)


def default_routes(destinations: tuple[Destination, ...] = DESTINATIONS) -> list[Route]:
    return [Route(("orders", "logins"), destinations)]


@dataclass
class PipelineKit:
    pipeline: Pipeline
    kms: CountingKms
    keyring: LocalKeyring
    schemas: CachingSchemaSource
    keys: PseudonymKeys
    policy: Policy


@pytest.fixture
def make_pipeline(
    keyring: LocalKeyring, schemas: CachingSchemaSource, policy: Policy
) -> Callable[..., PipelineKit]:
    def make(
        *,
        routes: list[Route] | None = None,
        policy_obj: Policy | None = None,
        max_record_bytes: int = 1 << 20,
    ) -> PipelineKit:
        kms = CountingKms(keyring)
        keys = PseudonymKeys(keyring, PSEUDONYM)
        pol = policy_obj or policy
        p = Pipeline(
            routes=routes or default_routes(),
            policy=pol,
            opener=Opener.for_kms(kms),
            kms=kms,
            schemas=schemas,
            keys=keys,
            max_record_bytes=max_record_bytes,
        )
        return PipelineKit(p, kms, keyring, schemas, keys, pol)

    return make


Maker = Callable[..., PipelineKit]
