"""build_kms: validation errors name the offending key; env overrides secrets; lazy extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamproc.crypto.kms import KmsProvider
from streamproc.crypto.kms.factory import build_kms
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import ConfigError

NO_ENV: dict[str, str] = {}
VAULT = {"provider": "vault", "url": "http://127.0.0.1:8200", "token": "file-token"}
AWS = {"provider": "aws", "region": "us-east-1"}


def err(spec: Any, env: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build_kms(spec, env=NO_ENV if env is None else env, **kw)
    return str(info.value)


# -- shape ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "vault", ["provider", "local"], 3])
def test_spec_must_be_a_mapping(spec: Any) -> None:
    assert "kms" in err(spec)


def test_provider_is_required_and_known() -> None:
    assert "kms.provider" in err({})
    msg = err({"provider": "hsm"})
    assert "kms.provider" in msg and "'hsm'" in msg and "local, vault, aws" in msg


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"provider": "local", "path": "k.json", "pth": "x"}, "kms.pth"),
        ({**VAULT, "mount_point": "transit"}, "kms.mount_point"),
        ({**AWS, "regoin": "eu-west-1"}, "kms.regoin"),
        ({**AWS, "path": "keys.json"}, "kms.path"),  # a local setting on another provider
    ],
)
def test_unknown_settings_are_named(spec: dict[str, Any], key: str) -> None:
    msg = err(spec)
    assert key in msg and "unknown setting" in msg


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"provider": "local", "path": ""}, "kms.path"),
        ({"provider": "local", "path": 3}, "kms.path"),
        ({"provider": "local", "path": "k.json", "reload_interval": -1}, "kms.reload_interval"),
        ({**VAULT, "timeout": "10"}, "kms.timeout"),
        ({**VAULT, "timeout": True}, "kms.timeout"),
        ({**VAULT, "verify": "yes"}, "kms.verify"),
        ({**VAULT, "mount": ["transit"]}, "kms.mount"),
        ({**VAULT, "context_binding": "aad"}, "kms.context_binding"),
        ({**AWS, "max_attempts": 0}, "kms.max_attempts"),
        ({**AWS, "max_attempts": 2.5}, "kms.max_attempts"),
        ({**AWS, "check_key_state": "no"}, "kms.check_key_state"),
    ],
)
def test_bad_values_are_named(spec: dict[str, Any], key: str) -> None:
    assert key in err(spec)


# -- local ------------------------------------------------------------------------------------


def test_local(tmp_path: Path) -> None:
    LocalKeyring.create(tmp_path / "keyring.json")
    kms = build_kms({"provider": "local", "path": "keyring.json"}, env=NO_ENV, base_dir=tmp_path)
    assert isinstance(kms, LocalKeyring) and isinstance(kms, KmsProvider)
    assert kms.path == tmp_path / "keyring.json"
    assert "kms.path" in err({"provider": "local"})
    assert "does not exist" in err({"provider": "local", "path": str(tmp_path / "missing.json")})


# -- vault ------------------------------------------------------------------------------------


def test_vault_builds_without_contacting_the_server() -> None:
    from streamproc.crypto.kms.vault import VaultTransitKms

    kms = build_kms({**VAULT, "mount": "kek", "kv_mount": "kv", "timeout": 3}, env=NO_ENV)
    assert isinstance(kms, VaultTransitKms) and isinstance(kms, KmsProvider)
    assert (kms.mount, kms.kv_mount, kms.context_binding) == ("kek", "kv", "associated_data")
    assert kms.client.token == "file-token"
    assert "file-token" not in repr(kms)


def test_vault_token_from_environment_overrides_the_file() -> None:
    kms: Any = build_kms(VAULT, env={"VAULT_TOKEN": "env-token"})
    assert kms.client.token == "env-token"
    kms = build_kms(VAULT, env={"BAO_TOKEN": "bao-token"})
    assert kms.client.token == "bao-token"
    kms = build_kms({"provider": "vault"}, env={"BAO_ADDR": "http://127.0.0.1:1", "BAO_TOKEN": "t"})
    assert kms.client.url == "http://127.0.0.1:1"


def test_vault_errors() -> None:
    msg = err({"provider": "vault", "url": "http://127.0.0.1:8200"})
    assert "kms.token" in msg and "VAULT_TOKEN" in msg
    assert "kms.url" in err({"provider": "vault", "token": "t"})
    assert "kms.url" in err({**VAULT, "url": "127.0.0.1:8200"})
    assert "kms.ca_cert" in err({**VAULT, "verify": False, "ca_cert": "/etc/ca.pem"})
    assert "kms.client_key" in err({**VAULT, "client_cert": "/etc/c.pem"})
    assert "kms.client_cert" in err({**VAULT, "client_key": "/etc/k.pem"})
    assert "mount" in err({**VAULT, "mount": "../sys"})
    assert "file-token" not in err({**VAULT, "url": "ftp://x"})


def test_vault_tls_settings() -> None:
    kms: Any = build_kms({**VAULT, "ca_cert": "/etc/ca.pem"}, env=NO_ENV)
    assert kms.client.adapter._kwargs["verify"] == "/etc/ca.pem"


def test_vault_verify_false_needs_insecure(caplog: pytest.LogCaptureFixture) -> None:
    """Switching certificate checks off is refused unless kms.insecure says so, loudly."""
    msg = err({**VAULT, "verify": False})
    assert "kms.verify" in msg and "kms.insecure: true" in msg
    with caplog.at_level("WARNING", logger="streamproc.crypto.kms.factory"):
        kms: Any = build_kms({**VAULT, "verify": False, "insecure": True}, env=NO_ENV)
    assert kms.client.adapter._kwargs["verify"] is False
    assert any("verification is OFF" in r.getMessage() for r in caplog.records)
    assert "kms.insecure" in err({**VAULT, "insecure": "yes"})


# -- aws --------------------------------------------------------------------------------------


def test_aws_builds() -> None:
    from streamproc.crypto.kms.aws import AwsKms

    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    kms: Any = build_kms(
        {**AWS, "endpoint_url": "http://127.0.0.1:5000", "max_attempts": 2}, env=env
    )
    assert isinstance(kms, AwsKms) and isinstance(kms, KmsProvider)
    assert kms.client.meta.region_name == "us-east-1"
    assert kms.client.meta.endpoint_url == "http://127.0.0.1:5000"
    assert kms.client._request_signer._credentials.access_key == "AKIDEXAMPLE"
    assert "s3cr3t" not in repr(kms)


def test_aws_region_and_endpoint_from_environment() -> None:
    env = {"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL_KMS": "http://127.0.0.1:4566"}
    kms: Any = build_kms({"provider": "aws"}, env=env)
    assert kms.client.meta.region_name == "eu-west-1"
    assert kms.client.meta.endpoint_url == "http://127.0.0.1:4566"
    assert "kms.region" in err({"provider": "aws"})


@pytest.mark.parametrize(
    "key", ["secret_access_key", "aws_secret_access_key", "access_key_id", "session_token"]
)
def test_aws_credentials_in_the_file_are_refused(key: str) -> None:
    msg = err({**AWS, key: "s3cr3t"})
    assert f"kms.{key}" in msg and "s3cr3t" not in msg and "AWS_ACCESS_KEY_ID" in msg


def test_aws_half_a_key_pair_is_an_error() -> None:
    assert "AWS_SECRET_ACCESS_KEY" in err(AWS, env={"AWS_ACCESS_KEY_ID": "AKID"})
    assert "AWS_ACCESS_KEY_ID" in err(AWS, env={"AWS_SECRET_ACCESS_KEY": "s"})


def test_aws_profile() -> None:
    msg = err({**AWS, "profile": "streamproc-no-such-profile"})
    assert "streamproc-no-such-profile" in msg
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s"}
    assert "kms.profile" in err({**AWS, "profile": "p"}, env=env)
    assert "kms.endpoint_url" in err({**AWS, "endpoint_url": "localhost:4566"})


# -- optional extras --------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "blocked"), [(VAULT, "hvac"), (AWS, "boto3")])
def test_missing_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any], blocked: str
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # makes "import <blocked>" fail
    for mod in ("streamproc.crypto.kms.vault", "streamproc.crypto.kms.aws"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    msg = err(spec)
    assert f"streamproc[{spec['provider']}]" in msg and blocked in msg


def test_base_install_needs_neither_hvac_nor_boto3(tmp_path: Path) -> None:
    LocalKeyring.create(tmp_path / "k.json")
    code = (
        "import sys; sys.modules['hvac'] = None; sys.modules['boto3'] = None; sys.modules['botocore'] = None\n"
        "from streamproc.crypto.kms.factory import build_kms\n"
        f"kms = build_kms({{'provider': 'local', 'path': {str(tmp_path / 'k.json')!r}}})\n"
        "assert kms.name == 'local'\n"
        "assert 'hvac' not in sys.modules or sys.modules['hvac'] is None\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2]
    )
