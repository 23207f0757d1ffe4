"""LocalKeyring: administration, file protection, rotation, revocation, context binding."""

from __future__ import annotations

import base64
import json
import os
import stat
import traceback
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streamproc.crypto.kms import DataKey, KeyInfo, KmsProvider
from streamproc.crypto.kms.local import FORMAT, KeyringUnavailable, LocalKeyring
from streamproc.errors import (
    ConfigError,
    KeyNotFound,
    KeyRevoked,
    KmsUnavailable,
    UnwrapFailed,
)

CTX = {"topic": "orders"}


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "keyring.json"


@pytest.fixture
def kr(path: Path) -> LocalKeyring:
    ring = LocalKeyring.create(path)
    ring.create_key("kek")
    return ring


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def materials(p: Path) -> list[str]:
    data = json.loads(p.read_text())
    return [m["material"] for e in data["keys"].values() for m in e["versions"].values()]


# -- creation and administration ---------------------------------------------------------


def test_create_makes_an_empty_0600_file(path: Path) -> None:
    ring = LocalKeyring.create(path)
    assert isinstance(ring, KmsProvider)
    assert ring.name == "local"
    assert mode(path) == 0o600
    assert json.loads(path.read_text()) == {"format": FORMAT, "keys": {}}
    assert ring.list_keys() == []
    with pytest.raises(ConfigError, match="already exists"):
        LocalKeyring.create(path)
    # Nothing but the keyring is left in the directory (no temporary files).
    assert os.listdir(path.parent) == [path.name]


def test_open_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        LocalKeyring(tmp_path / "nope.json")


def test_open_or_create(path: Path) -> None:
    first = LocalKeyring.open_or_create(path)
    first.create_key("kek")
    again = LocalKeyring.open_or_create(path)
    assert [k.kek_id for k in again.list_keys()] == ["kek"]


def test_create_rotate_revoke_list(kr: LocalKeyring) -> None:
    assert kr.list_keys() == [KeyInfo("kek", (1,), 1, (), "kek")]
    assert kr.create_key("pseudo", kind="secret") == 1
    assert kr.rotate("kek") == 2
    assert kr.rotate("kek") == 3
    kr.revoke("kek", 1)
    assert kr.list_keys() == [
        KeyInfo("kek", (1, 2, 3), 3, (1,), "kek"),
        KeyInfo("pseudo", (1,), 1, (), "secret"),
    ]
    # Nothing in the listing carries key material.
    text = repr(kr.list_keys())
    for m in materials(kr.path):
        assert m not in text
        assert base64.b64decode(m).hex() not in text


def test_create_key_rejects_duplicates_and_unknown_kinds(kr: LocalKeyring) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        kr.create_key("kek")
    with pytest.raises(ConfigError, match="unknown key kind"):
        kr.create_key("x", kind="hsm")
    kr.ensure_key("kek")  # idempotent
    kr.ensure_key("new")
    assert [k.kek_id for k in kr.list_keys()] == ["kek", "new"]


def test_revoking_the_primary_is_refused(kr: LocalKeyring) -> None:
    with pytest.raises(ConfigError, match="primary"):
        kr.revoke("kek", 1)
    assert not kr.is_revoked("kek", 1)
    kr.rotate("kek")
    with pytest.raises(ConfigError, match="primary"):
        kr.revoke("kek", 2)
    kr.revoke("kek", 1)
    assert kr.is_revoked("kek", 1)
    assert not kr.is_revoked("kek", 2)


def test_unknown_keys_and_versions(kr: LocalKeyring) -> None:
    with pytest.raises(KeyNotFound):
        kr.rotate("nope")
    with pytest.raises(KeyNotFound):
        kr.revoke("nope", 1)
    with pytest.raises(KeyNotFound):
        kr.revoke("kek", 7)
    with pytest.raises(KeyNotFound):
        kr.generate_data_key("nope", CTX)
    dk = kr.generate_data_key("kek", CTX)
    with pytest.raises(KeyNotFound):
        kr.unwrap("kek", 7, dk.wrapped, CTX)
    with pytest.raises(KeyNotFound):
        kr.unwrap("nope", 1, dk.wrapped, CTX)
    assert kr.is_revoked("nope", 1)  # an unknown key cannot be used either
    assert kr.is_revoked("kek", 7)


# -- file protection ---------------------------------------------------------------------


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_group_or_world_access_is_refused(kr: LocalKeyring, bad_mode: int) -> None:
    os.chmod(kr.path, bad_mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        LocalKeyring(kr.path)


def test_stricter_mode_is_accepted(kr: LocalKeyring) -> None:
    os.chmod(kr.path, 0o400)
    assert [k.kek_id for k in LocalKeyring(kr.path).list_keys()] == ["kek"]


def test_rewrites_are_atomic_and_keep_0600(kr: LocalKeyring) -> None:
    ino = kr.path.stat().st_ino
    kr.rotate("kek")
    assert mode(kr.path) == 0o600
    assert kr.path.stat().st_ino != ino  # replaced, not rewritten in place
    kr.create_key("s", kind="secret")
    kr.revoke("kek", 1)
    assert mode(kr.path) == 0o600
    assert os.listdir(kr.path.parent) == [kr.path.name]
    assert json.loads(kr.path.read_text())["format"] == FORMAT


def test_rewrite_with_permissive_umask_still_0600(path: Path) -> None:
    old = os.umask(0)
    try:
        ring = LocalKeyring.create(path)
        ring.create_key("kek")
        ring.rotate("kek")
    finally:
        os.umask(old)
    assert mode(path) == 0o600


@pytest.mark.parametrize(
    "content",
    [
        '{"format": "streamproc-keyring/1", "keys": {"kek": {"material": "c2VjcmV0LXNlY3JldA=="',
        "not json at all: SECRET-CONTENT",
        '["streamproc-keyring/1", "SECRET-CONTENT"]',
        '{"format": "other/9", "keys": {}, "note": "SECRET-CONTENT"}',
        '{"format": "streamproc-keyring/1", "keys": "SECRET-CONTENT"}',
        "",
    ],
    ids=["truncated", "garbage", "list", "wrong-format", "keys-not-object", "empty"],
)
def test_corrupt_file_is_config_error_without_contents(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        LocalKeyring(path)
    assert str(path) in str(info.value)
    # Neither the message nor anything a log handler would print (the chained
    # exceptions included) echoes the file.
    printed = "".join(traceback.format_exception(info.value))
    for fragment in ("SECRET-CONTENT", "c2VjcmV0", "secret-secret"):
        assert fragment not in printed


# -- data keys, rotation and context binding ---------------------------------------------


def test_data_key_round_trip(kr: LocalKeyring) -> None:
    dk = kr.generate_data_key("kek", CTX)
    assert isinstance(dk, DataKey)
    assert (dk.kek_id, dk.kek_version, len(dk.plaintext)) == ("kek", 1, 32)
    assert len(dk.wrapped) == 12 + 32 + 16
    assert dk.plaintext not in dk.wrapped
    assert kr.unwrap("kek", 1, dk.wrapped, CTX) == dk.plaintext
    assert dk.plaintext.hex() not in repr(dk)
    other = kr.generate_data_key("kek", CTX)
    assert other.plaintext != dk.plaintext and other.wrapped != dk.wrapped


def test_rotation_new_keys_use_new_version_old_still_unwrap(kr: LocalKeyring) -> None:
    old = kr.generate_data_key("kek", CTX)
    assert kr.rotate("kek") == 2
    new = kr.generate_data_key("kek", CTX)
    assert (old.kek_version, new.kek_version) == (1, 2)
    assert kr.unwrap("kek", 1, old.wrapped, CTX) == old.plaintext
    assert kr.unwrap("kek", 2, new.wrapped, CTX) == new.plaintext
    # Each wrapped key is bound to its version.
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek", 2, old.wrapped, CTX)
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek", 1, new.wrapped, CTX)


def test_revoked_version_no_longer_unwraps(kr: LocalKeyring) -> None:
    old = kr.generate_data_key("kek", CTX)
    kr.rotate("kek")
    kr.revoke("kek", 1)
    with pytest.raises(KeyRevoked):
        kr.unwrap("kek", 1, old.wrapped, CTX)
    assert kr.generate_data_key("kek", CTX).kek_version == 2


def test_context_binding(kr: LocalKeyring) -> None:
    dk = kr.generate_data_key("kek", {"topic": "orders"})
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek", 1, dk.wrapped, {"topic": "payments"})
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek", 1, dk.wrapped, {})
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek", 1, dk.wrapped, {"topic": "orders", "extra": "x"})
    kr.create_key("kek2")
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek2", 1, dk.wrapped, {"topic": "orders"})
    assert kr.unwrap("kek", 1, dk.wrapped, {"topic": "orders"}) == dk.plaintext


def test_wrapped_key_is_aes_gcm_under_the_documented_aad(kr: LocalKeyring) -> None:
    """The wrap is nonce || AES-256-GCM(KEK, DEK, AAD = context_aad), as documented."""
    dk = kr.generate_data_key("kek", CTX)
    material = base64.b64decode(
        json.loads(kr.path.read_text())["keys"]["kek"]["versions"]["1"]["material"]
    )
    aad = b"kek=kek\x1fv=1\x1ftopic=orders"
    assert AESGCM(material).decrypt(dk.wrapped[:12], dk.wrapped[12:], aad) == dk.plaintext


@pytest.mark.parametrize("cut", [0, 1, 59, 61])
def test_wrong_length_wrapped_key_is_unwrap_failed(kr: LocalKeyring, cut: int) -> None:
    dk = kr.generate_data_key("kek", CTX)
    wrapped = (dk.wrapped + b"\x00")[:cut]
    with pytest.raises(UnwrapFailed):
        kr.unwrap("kek", 1, wrapped, CTX)


def test_tampered_wrapped_key_is_unwrap_failed(kr: LocalKeyring) -> None:
    dk = kr.generate_data_key("kek", CTX)
    for i in range(len(dk.wrapped)):
        bad = bytearray(dk.wrapped)
        bad[i] ^= 0x80
        with pytest.raises(UnwrapFailed) as info:
            kr.unwrap("kek", 1, bytes(bad), CTX)
        assert dk.plaintext.hex() not in str(info.value)


def test_secret_keys_are_not_keks(kr: LocalKeyring) -> None:
    kr.create_key("pseudo", kind="secret")
    with pytest.raises(KeyNotFound):
        kr.generate_data_key("pseudo", CTX)
    with pytest.raises(KeyNotFound):
        kr.get_secret("kek")


# -- secrets -----------------------------------------------------------------------------


def test_get_secret(kr: LocalKeyring) -> None:
    kr.create_key("pseudo", kind="secret")
    v1, s1 = kr.get_secret("pseudo")
    assert v1 == 1 and len(s1) == 32
    assert kr.get_secret("pseudo", 1) == (1, s1)
    assert kr.rotate("pseudo") == 2
    v2, s2 = kr.get_secret("pseudo")
    assert v2 == 2 and s2 != s1 and len(s2) == 32
    assert kr.get_secret("pseudo", 1) == (1, s1)  # old versions stay readable
    kr.revoke("pseudo", 1)
    with pytest.raises(KeyRevoked):
        kr.get_secret("pseudo", 1)
    with pytest.raises(KeyNotFound):
        kr.get_secret("pseudo", 9)
    with pytest.raises(KeyNotFound):
        kr.get_secret("nope")
    # A second instance reads the same material from the file.
    assert LocalKeyring(kr.path).get_secret("pseudo") == (2, s2)


# -- a second instance (another process) sees changes after the reload interval ----------


def test_second_instance_sees_revocation_after_reload_interval(kr: LocalKeyring) -> None:
    old = kr.generate_data_key("kek", CTX)
    clock = FakeClock()
    other = LocalKeyring(kr.path, clock=clock, reload_interval=1.0)
    assert other.unwrap("kek", 1, old.wrapped, CTX) == old.plaintext
    assert not other.is_revoked("kek", 1)

    kr.rotate("kek")
    kr.revoke("kek", 1)  # as `streamproc keys revoke` in another process would

    clock.t += 0.5  # within the reload interval: the old view is still used
    assert not other.is_revoked("kek", 1)
    assert other.unwrap("kek", 1, old.wrapped, CTX) == old.plaintext
    clock.t += 0.5  # the interval has passed: the file is re-read
    assert other.is_revoked("kek", 1)
    with pytest.raises(KeyRevoked):
        other.unwrap("kek", 1, old.wrapped, CTX)
    assert other.generate_data_key("kek", CTX).kek_version == 2
    assert other.list_keys() == [KeyInfo("kek", (1, 2), 2, (1,), "kek")]


def test_second_instance_sees_new_keys_after_reload(kr: LocalKeyring) -> None:
    clock = FakeClock()
    other = LocalKeyring(kr.path, clock=clock, reload_interval=1.0)
    assert not other.is_revoked("kek", 1)
    kr.create_key("later")
    clock.t += 0.25
    with pytest.raises(KeyNotFound):
        other.generate_data_key("later", CTX)
    clock.t += 1.0
    dk = other.generate_data_key("later", CTX)
    assert kr.unwrap("later", 1, dk.wrapped, CTX) == dk.plaintext


def test_admin_operations_start_from_the_file(kr: LocalKeyring) -> None:
    """An admin command never overwrites a change another instance made meanwhile."""
    clock = FakeClock()
    other = LocalKeyring(kr.path, clock=clock, reload_interval=3600.0)
    kr.create_key("from-first")
    other.create_key("from-second")  # re-reads the file before changing it
    assert [k.kek_id for k in LocalKeyring(kr.path).list_keys()] == [
        "from-first",
        "from-second",
        "kek",
    ]


# -- a running keyring fails closed when its file is loosened, deleted or damaged ----------


def running(kr: LocalKeyring) -> tuple[LocalKeyring, FakeClock, DataKey]:
    clock = FakeClock()
    ring = LocalKeyring(kr.path, clock=clock, reload_interval=1.0)
    dk = ring.generate_data_key("kek", CTX)
    assert ring.unwrap("kek", 1, dk.wrapped, CTX) == dk.plaintext
    return ring, clock, dk


def assert_serves_nothing(ring: LocalKeyring, dk: DataKey, match: str) -> None:
    with pytest.raises(KeyringUnavailable, match=match) as info:
        ring.unwrap("kek", 1, dk.wrapped, CTX)
    assert isinstance(info.value, KmsUnavailable)  # transient: pause, never dead-letter
    with pytest.raises(KeyringUnavailable):
        ring.generate_data_key("kek", CTX)
    with pytest.raises(KeyringUnavailable):
        ring.get_secret("pseudo")
    assert ring.is_revoked("kek", 1)  # so that data keys cached elsewhere get evicted


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_chmod_to_a_looser_mode_while_running_fails_closed(kr: LocalKeyring, loose: int) -> None:
    kr.create_key("pseudo", "secret")
    ring, clock, dk = running(kr)
    os.chmod(kr.path, loose)  # the mtime does not change; the mode is what matters
    clock.t += 1.0
    assert_serves_nothing(ring, dk, f"mode {loose:04o}")
    clock.t += 0.5  # still failing within the reload interval, without a new stat
    assert_serves_nothing(ring, dk, "chmod 600")
    os.chmod(kr.path, 0o600)
    clock.t += 1.0
    assert ring.unwrap("kek", 1, dk.wrapped, CTX) == dk.plaintext
    assert not ring.is_revoked("kek", 1)


def test_deleted_file_fails_closed_until_restored(kr: LocalKeyring) -> None:
    kr.create_key("pseudo", "secret")
    saved = kr.path.read_bytes()
    ring, clock, dk = running(kr)
    kr.path.unlink()
    clock.t += 1.0
    assert_serves_nothing(ring, dk, "was deleted")
    kr.path.write_bytes(saved)
    os.chmod(kr.path, 0o600)
    clock.t += 1.0
    assert ring.unwrap("kek", 1, dk.wrapped, CTX) == dk.plaintext


def test_damaged_or_replaced_file_fails_closed(kr: LocalKeyring) -> None:
    kr.create_key("pseudo", "secret")
    ring, clock, dk = running(kr)
    kr.path.write_text("{not json")  # write_text keeps the 0600 mode
    clock.t += 1.0
    assert_serves_nothing(ring, dk, "not readable JSON")
    kr.path.unlink()
    kr.path.mkdir()
    clock.t += 1.0
    assert_serves_nothing(ring, dk, "no longer a regular file")


def test_failing_closed_is_logged_once_without_material(
    kr: LocalKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    ring, clock, dk = running(kr)
    os.chmod(kr.path, 0o644)
    for _ in range(3):
        clock.t += 1.0
        with pytest.raises(KeyringUnavailable):
            ring.unwrap("kek", 1, dk.wrapped, CTX)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "0644" in errors[0].getMessage()
    for m in materials(kr.path):
        assert m not in caplog.text
