"""The audit actor of operator commands comes from an authenticated identity.

OpenBao (a real dev server on 127.0.0.1): ``auth/token/lookup-self`` of the configured
token names its display name; an unusable token fails closed.  AWS (moto's server on
127.0.0.1): STS ``GetCallerIdentity`` names the caller's ARN.  Events written through
:func:`streamproc.audit.open_tool_log` carry that actor and ``actor_source``.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamproc.audit import EventType, open_tool_log, tool_audit_file
from streamproc.config import AuditConfig
from streamproc.identity import IdentityError, resolve_actor
from tests.integration.servers import MotoServer, OpenBaoServer, start_moto, start_openbao

pytestmark = pytest.mark.integration
REGION = "us-east-1"


def config(tmp_path: Path, kms: dict[str, Any]) -> Any:
    """The two parts of a Config these functions read: ``kms`` and ``audit``."""
    return types.SimpleNamespace(
        kms=kms,
        base_dir=tmp_path,
        path=tmp_path / "streamproc.yaml",
        audit=AuditConfig(file=tmp_path / "audit" / "processor.jsonl"),
    )


def last_event(tmp_path: Path) -> dict[str, Any]:
    path = tool_audit_file(tmp_path / "audit" / "processor.jsonl")
    return json.loads(path.read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    pytest.importorskip("hvac")
    with start_openbao() as server:
        yield server


def test_vault_token_identity_is_the_actor(bao: OpenBaoServer, tmp_path: Path) -> None:
    tok = bao.client().auth.token.create(display_name="alice", policies=["default"], ttl="1h")
    token = tok["auth"]["client_token"]
    cfg = config(tmp_path, {"provider": "vault", "url": bao.url, "token": token})
    who = resolve_actor(cfg)
    # OpenBao prefixes token display names with the auth method: "token-alice"
    assert (who.principal, who.source) == ("token-alice", "vault")
    log = open_tool_log(cfg, note="typed by the caller")
    log.emit(EventType.KEY_ROTATED, {"kms": "vault", "key_id": "orders-kek", "version": 2})
    log.close()
    ev = last_event(tmp_path)
    assert ev["actor"] == "token-alice"
    assert ev["attrs"]["actor_source"] == "vault" and ev["attrs"]["note"] == "typed by the caller"


def test_an_unusable_vault_token_fails_closed(bao: OpenBaoServer, tmp_path: Path) -> None:
    cfg = config(tmp_path, {"provider": "vault", "url": bao.url, "token": "not-a-token"})
    with pytest.raises(IdentityError, match="lookup-self"):
        resolve_actor(cfg)
    with pytest.raises(IdentityError):
        open_tool_log(cfg)
    assert not tool_audit_file(tmp_path / "audit" / "processor.jsonl").exists()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION,
        }.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS"):
            mp.delenv(k, raising=False)
        with start_moto() as server:
            yield server


def test_aws_caller_arn_is_the_actor(moto: MotoServer, tmp_path: Path) -> None:
    import boto3

    cfg = config(tmp_path, {"provider": "aws", "region": REGION, "endpoint_url": moto.url})
    who = resolve_actor(cfg)
    expected = boto3.client("sts", region_name=REGION, endpoint_url=moto.url).get_caller_identity()
    assert who.source == "aws" and who.principal == expected["Arn"]
    assert who.principal.startswith("arn:aws:")
    log = open_tool_log(cfg)
    log.emit(EventType.KEY_REVOKED, {"kms": "aws", "key_id": "alias/orders", "version": 1})
    log.close()
    ev = last_event(tmp_path)
    assert ev["actor"] == expected["Arn"] and ev["attrs"]["actor_source"] == "aws"


def test_aws_without_a_reachable_sts_fails_closed(tmp_path: Path) -> None:
    from tests.integration.servers import free_port

    cfg = config(
        tmp_path,
        {"provider": "aws", "region": REGION, "endpoint_url": f"http://127.0.0.1:{free_port()}"},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(IdentityError, match="aws: cannot establish"):
            resolve_actor(cfg)
