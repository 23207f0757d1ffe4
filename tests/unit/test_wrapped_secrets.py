"""The wrapped secret file (pseudonym master under a KEK of any KMS), its CLI and config.

The KMS here is the local keyring; ``tests/integration/test_revocation.py`` runs the same
file format against AWS KMS (moto) with a real worker.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from streamproc.audit import verify_file
from streamproc.cli.secrets import secrets as secrets_cli
from streamproc.config import load_config
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.crypto.wrapped_secrets import (
    FORMAT,
    WrappedSecretFile,
    load_keyring_secret_versions,
    wrap_context,
)
from streamproc.errors import ConfigError, KeyNotFound, KeyRevoked, UnwrapFailed

REPO = Path(__file__).resolve().parents[2]
SID = "pseudonym-master"


@pytest.fixture
def ring(tmp_path: Path) -> LocalKeyring:
    r = LocalKeyring.create(tmp_path / "keys" / "keyring.json")
    r.create_key("secret-kek")
    r.create_key("orders-kek")  # a source KEK: producers may generate data keys under it
    r.create_key(SID, "secret")
    return r


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "pseudonym.json"


def _raw(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


# -- create, rotate, read ---------------------------------------------------------------------


def test_create_rotate_and_read_back(ring: LocalKeyring, path: Path) -> None:
    store = WrappedSecretFile(path, ring)
    assert store.create(SID, "secret-kek") == 1
    assert (path.stat().st_mode & 0o777) == 0o600
    reader = WrappedSecretFile(path, ring, kek="secret-kek")
    v, m1 = reader.get_secret(SID)
    assert v == 1 and len(m1) == 32
    assert store.rotate(SID) == 2
    fresh = WrappedSecretFile(path, ring, kek="secret-kek")
    v2, m2 = fresh.get_secret(SID)
    assert v2 == 2 and m2 != m1
    assert fresh.get_secret(SID, 1) == (1, m1)
    # the reader built before the rotation sees version 2 once asked for it (mtime reload)
    assert reader.get_secret(SID, 2) == (2, m2)
    # the file holds wrapped forms only: neither the material nor its base64 appear
    text = path.read_text()
    for m in (m1, m2):
        assert base64.b64encode(m).decode() not in text
        assert m.hex() not in text
    raw = _raw(path)
    assert raw["format"] == FORMAT
    meta = raw["secrets"][SID]["versions"]["2"]
    assert meta["kms"] == "local" and meta["kek"] == "secret-kek" and meta["kek_version"] == 1
    assert raw["secrets"][SID]["primary"] == 2
    [info] = fresh.list_secrets()
    assert (info.secret_id, info.primary, info.versions, info.keks) == (
        SID,
        2,
        (1, 2),
        ("secret-kek",),
    )
    with pytest.raises(ConfigError, match="already exists"):
        store.create(SID, "secret-kek")
    with pytest.raises(KeyNotFound):
        fresh.get_secret(SID, 9)
    with pytest.raises(KeyNotFound):
        fresh.get_secret("other-secret")


def test_pseudonym_keys_over_a_wrapped_file(ring: LocalKeyring, path: Path) -> None:
    store = WrappedSecretFile(path, ring)
    store.create(SID, "secret-kek")
    store.rotate(SID)
    keys = PseudonymKeys(WrappedSecretFile(path, ring, kek="secret-kek"), SID)
    assert keys.primary_version == 2
    v, k = keys.token_key("EMAIL", audience="analytics")
    assert v == 2 and len(k) == 32
    assert keys.token_key("EMAIL", 1, audience="analytics")[1] != k  # older versions stay derivable


def test_import_keeps_versions_and_tokens(ring: LocalKeyring, path: Path) -> None:
    """Moving the master from the keyring into a wrapped file must not break joins."""
    ring.rotate(SID)
    ring.rotate(SID)
    ring.revoke(SID, 1)
    store = WrappedSecretFile(path, ring)
    for v, m in load_keyring_secret_versions(ring, SID):
        store.import_version(SID, v, m, "secret-kek", primary=v == 3)
    reader = WrappedSecretFile(path, ring, kek="secret-kek")
    assert reader.get_secret(SID) == ring.get_secret(SID)
    assert reader.get_secret(SID, 2) == ring.get_secret(SID, 2)
    with pytest.raises(KeyNotFound):  # revoked versions are not carried over
        reader.get_secret(SID, 1)
    a, b = PseudonymKeys(ring, SID), PseudonymKeys(reader, SID)
    assert a.token_key("EMAIL", audience="x") == b.token_key("EMAIL", audience="x")
    assert _raw(path)["secrets"][SID]["versions"]["3"].get("sealed")
    [info] = reader.list_secrets()
    assert info.imported == (2, 3)
    with pytest.raises(ConfigError, match="already has a version"):
        store.import_version(SID, 3, b"x" * 32, "secret-kek")
    with pytest.raises(ConfigError, match="shorter"):
        store.import_version("short", 1, b"x" * 16, "secret-kek")


# -- what the file cannot be made to do ----------------------------------------------------------


def test_context_binds_id_and_version(ring: LocalKeyring, path: Path) -> None:
    store = WrappedSecretFile(path, ring)
    store.create(SID, "secret-kek")
    store.rotate(SID)
    store.create("other", "secret-kek")
    raw = _raw(path)
    vs = raw["secrets"][SID]["versions"]
    # relabel: version 1's blob presented as version 2
    vs["2"]["wrapped"] = vs["1"]["wrapped"]
    # move: another secret's blob presented as this secret's version 1
    vs["1"]["wrapped"] = raw["secrets"]["other"]["versions"]["1"]["wrapped"]
    path.write_text(json.dumps(raw))
    reader = WrappedSecretFile(path, ring, kek="secret-kek")
    for v in (1, 2):
        with pytest.raises(UnwrapFailed):
            reader.get_secret(SID, v)
    assert wrap_context(SID, 2) == {"secret": SID, "version": "2"}


def test_imported_ciphertext_is_authenticated(ring: LocalKeyring, path: Path) -> None:
    store = WrappedSecretFile(path, ring)
    store.import_version(SID, 1, b"m" * 32, "secret-kek")
    raw = _raw(path)
    sealed = bytearray(base64.b64decode(raw["secrets"][SID]["versions"]["1"]["sealed"]))
    sealed[-1] ^= 1
    raw["secrets"][SID]["versions"]["1"]["sealed"] = base64.b64encode(bytes(sealed)).decode()
    path.write_text(json.dumps(raw))
    with pytest.raises(UnwrapFailed) as info:
        WrappedSecretFile(path, ring).get_secret(SID)
    assert "m" * 8 not in str(info.value)


def test_pinned_kek_refuses_a_planted_master(ring: LocalKeyring, path: Path) -> None:
    """A producer can generate data keys under a source KEK, which the processor unwraps:
    with write access to the file it could plant a master it knows.  The pin stops it."""
    WrappedSecretFile(path, ring).create(SID, "orders-kek")  # the planted version
    with pytest.raises(ConfigError, match="pinned KEK 'secret-kek'"):
        WrappedSecretFile(path, ring, kek="secret-kek").get_secret(SID)
    assert WrappedSecretFile(path, ring).get_secret(SID)[0] == 1  # unpinned: accepted


def test_other_kms_and_revoked_kek(ring: LocalKeyring, path: Path) -> None:
    store = WrappedSecretFile(path, ring)
    store.create(SID, "secret-kek")
    raw = _raw(path)
    raw["secrets"][SID]["versions"]["1"]["kms"] = "aws"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="wrapped by KMS 'aws'"):
        WrappedSecretFile(path, ring).get_secret(SID)
    raw["secrets"][SID]["versions"]["1"]["kms"] = "local"
    path.write_text(json.dumps(raw))
    ring.rotate("secret-kek")
    ring.revoke("secret-kek", 1)
    with pytest.raises(KeyRevoked):
        WrappedSecretFile(path, ring).get_secret(SID)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="x"), "not a streamproc-wrapped-secrets/1 file"),
        (lambda d: d.update(secrets=[]), "'secrets' must be a mapping"),
        (lambda d: d["secrets"][SID].update(primary=7), "no primary version"),
        (lambda d: d["secrets"][SID]["versions"]["1"].pop("kek"), "missing 'kek'"),
        (lambda d: d["secrets"][SID]["versions"]["1"].update(kek_version=0), "kek_version"),
        (lambda d: d["secrets"][SID]["versions"]["1"].update(wrapped="***"), "not base64"),
        (lambda d: d["secrets"][SID]["versions"].update({"x": {}}), "positive integers"),
    ],
)
def test_malformed_files_are_config_errors(
    ring: LocalKeyring, path: Path, mutate: Any, message: str
) -> None:
    WrappedSecretFile(path, ring).create(SID, "secret-kek")
    raw = _raw(path)
    mutate(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        WrappedSecretFile(path, ring).get_secret(SID)


def test_missing_or_unreadable_file(ring: LocalKeyring, path: Path) -> None:
    with pytest.raises(ConfigError, match="streamproc secrets create"):
        WrappedSecretFile(path, ring).get_secret(SID)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        WrappedSecretFile(path, ring)
    with pytest.raises(ConfigError, match="secret ids"):
        WrappedSecretFile(path.with_name("new.json"), ring).create("bad id", "secret-kek")


# -- configuration and factory ----------------------------------------------------------------


@pytest.fixture
def ws(tmp_path: Path, ring: LocalKeyring) -> Path:
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    return tmp_path


def _config(ws: Path, **extra: Any) -> Path:
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap.servers": "127.0.0.1:9092"},
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [
            {
                "sources": ["orders"],
                "dead_letter_topic": "orders.dlq",
                "destinations": [
                    {"topic": "orders.fraud", "audience": "fraud", "kek": "fraud-kek"}
                ],
            }
        ],
        **extra,
    }
    p = ws / "streamproc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _error(p: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    return str(info.value)


def test_config_pseudonym_secrets(ws: Path) -> None:
    c = load_config(_config(ws), env={})
    assert c.pseudonym_secrets.provider == "kms"
    c = load_config(
        _config(
            ws,
            pseudonym_secrets={
                "provider": "wrapped_file",
                "path": "./keys/pseudonym.json",
                "kek": "secret-kek",
            },
        ),
        env={},
    )
    assert c.pseudonym_secrets.path == ws / "keys" / "pseudonym.json"  # relative to the file
    assert c.pseudonym_secrets.kek == "secret-kek"
    cases = [
        ({"provider": "vault"}, "pseudonym_secrets.provider: must be one of kms, wrapped_file"),
        ({"provider": "wrapped_file", "kek": "k"}, "pseudonym_secrets.path: is required"),
        ({"provider": "wrapped_file", "path": "p"}, "pseudonym_secrets.kek: is required"),
        ({"provider": "kms", "path": "p"}, "pseudonym_secrets.path: only applies"),
        ({"provider": "wrapped_file", "path": "p", "kek": "k", "x": 1}, "pseudonym_secrets.x"),
        (
            {"provider": "wrapped_file", "path": "p", "kek": "fraud-kek"},
            "also the KEK of pipelines[0].destinations[0]",
        ),
    ]
    for spec, msg in cases:
        assert msg in _error(_config(ws, pseudonym_secrets=spec))
    # AWS KMS holds no secrets: the policy's pseudonym master needs a wrapped file
    aws = {"provider": "aws", "region": "us-east-1"}
    msg = _error(_config(ws, kms=aws))
    assert "pseudonym_secrets" in msg and "cannot hold the pseudonym master" in msg
    load_config(
        _config(
            ws,
            kms=aws,
            pseudonym_secrets={"provider": "wrapped_file", "path": "p.json", "kek": "alias/pm"},
        ),
        env={},
    )


def test_build_pipeline_reads_the_wrapped_file(ws: Path, ring: LocalKeyring) -> None:
    from streamproc.runtime.factory import build_pipeline, build_secret_source

    ps = {"provider": "wrapped_file", "path": "./keys/pseudonym.json", "kek": "secret-kek"}
    config = load_config(_config(ws, pseudonym_secrets=ps), env={})
    with pytest.raises(ConfigError, match="streamproc secrets create"):
        build_secret_source(config, ring)
    WrappedSecretFile(ws / "keys" / "pseudonym.json", ring).create(SID, "secret-kek")
    for k in ("fraud-kek", "analytics-kek", "support-kek"):
        ring.create_key(k)
    pipeline = build_pipeline(config, kms=ring)
    assert pipeline.keys is not None and pipeline.keys.primary_version == 1
    assert isinstance(pipeline.keys.source, WrappedSecretFile)

    class NoSecrets:  # like AwsKms: no get_secret
        name = "aws"

    with pytest.raises(ConfigError, match="holds no pseudonym secrets"):
        build_secret_source(load_config(_config(ws), env={}), NoSecrets())  # type: ignore[arg-type]


def test_unreadable_master_stops_the_worker_as_a_config_error(ws: Path, ring: LocalKeyring) -> None:
    """Revoked/disabled secret KEK: exit 78 before any Kafka client exists, naming the key."""
    from streamproc.runtime.app import run_worker

    ps = {"provider": "wrapped_file", "path": "./keys/pseudonym.json", "kek": "secret-kek"}
    config = load_config(_config(ws, pseudonym_secrets=ps), env={})
    WrappedSecretFile(ws / "keys" / "pseudonym.json", ring).create(SID, "secret-kek")
    ring.rotate("secret-kek")
    ring.revoke("secret-kek", 1)
    with pytest.raises(ConfigError) as info:
        run_worker(config, install_signals=False)
    assert str(info.value).startswith("pseudonym secret: ")
    assert "secret-kek" in str(info.value) and "revoked" in str(info.value)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_create_rotate_list_import(ws: Path, ring: LocalKeyring) -> None:
    ps = {"provider": "wrapped_file", "path": "./keys/pseudonym.json", "kek": "secret-kek"}
    run = CliRunner().invoke
    # without an audit trail nothing changes
    bare = str(_config(ws, pseudonym_secrets=ps))
    r = run(secrets_cli, ["create", "--kms-config", bare])
    assert r.exit_code == 1 and "no audit: section" in r.output
    assert not (ws / "keys" / "pseudonym.json").exists()
    cfg = str(_config(ws, pseudonym_secrets=ps, audit={"file": "./audit/processor.jsonl"}))
    r = run(secrets_cli, ["create", "--kms-config", cfg])  # file, kek and id from the config
    assert r.exit_code == 0, r.output
    assert "pseudonym-master: created version 1 under secret-kek" in r.output
    r = run(secrets_cli, ["create", "--kms-config", cfg])
    assert r.exit_code == 1 and "already exists" in r.output
    r = run(secrets_cli, ["rotate", "--kms-config", cfg])
    assert r.exit_code == 0 and "primary version 2" in r.output, r.output
    r = run(secrets_cli, ["list", "--file", str(ws / "keys" / "pseudonym.json")])
    assert r.exit_code == 0, r.output
    assert "pseudonym-master" in r.output and "versions: 1,2" in r.output
    assert "kek: secret-kek" in r.output
    reader = WrappedSecretFile(ws / "keys" / "pseudonym.json", ring, kek="secret-kek")
    assert reader.get_secret(SID)[0] == 2

    other = ws / "keys" / "imported.json"
    r = run(
        secrets_cli,
        [
            "import",
            "--kms-config",
            cfg,
            "--file",
            str(other),
            "--from-keyring",
            str(ring.path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert WrappedSecretFile(other, ring).get_secret(SID) == ring.get_secret(SID)
    # every change is in the tools' chain, written before it happened, by the OS user
    tools = ws / "audit" / "processor-tools.jsonl"
    assert verify_file(tools).ok
    evs = [json.loads(x) for x in tools.read_text().splitlines()]
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout
    assert [
        (e["type"], e["attrs"].get("version"), e["attrs"]["outcome"], e["attrs"].get("error"))
        for e in evs[1:]
    ] == [
        ("secret_created", 1, "success", None),
        ("secret_created", 1, "success", None),  # the attempt on an existing secret...
        ("secret_created", 1, "failed", "ConfigError"),  # ...and its failure
        ("key_rotated", 2, "success", None),
        ("secret_imported", 1, "success", None),
    ]
    assert evs[4]["attrs"]["previous_version"] == 1 and evs[4]["attrs"]["kind"] == "secret"
    assert evs[5]["attrs"]["count"] == 1
    assert {(e["actor"], e["attrs"]["actor_source"]) for e in evs[1:]} == {(user.strip(), "os")}
    r = run(secrets_cli, ["create", "--file", str(other)])
    assert r.exit_code == 2 and "--kms-config is required" in r.output
    r = run(secrets_cli, ["create", "--kms-config", str(_config(ws)), "--file", str(other)])
    assert r.exit_code == 2 and "--kek is required" in r.output
    for out in (r.output,):
        assert "material" not in out
