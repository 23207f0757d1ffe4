"""The Vault/OpenBao KMS over TLS: a real OpenBao whose only listener is TLS.

The server's certificate comes from a CA generated now (``streamproc.devtls.DevCA``, the
same kind as the test Kafka broker's) and names 127.0.0.1, so the client checks the
hostname too.  Shown here:

* the KMS provider built from config (``kms.ca_cert``) wraps and unwraps data keys, and
  the worker processes records end to end with its Vault KMS over verified TLS;
* a client that does not pin the CA (system trust) or pins another CA is refused: the
  TLS handshake fails, no request is made (so no token is sent);
* ``verify: false`` is refused without ``insecure: true``; with it the connection works
  and a warning says so.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hvac = pytest.importorskip("hvac")
devtls = pytest.importorskip("streamproc.devtls")

from streamproc.crypto.kms.factory import build_kms  # noqa: E402
from streamproc.errors import ConfigError, KmsError  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    AUDIENCES,
    WorkerProcess,
    vault_transit,
    worker_end_to_end,
)
from tests.integration.servers import OpenBaoServer, start_openbao_tls  # noqa: E402

pytestmark = pytest.mark.integration

KEKS = ["streamproc-src-orders", "streamproc-quarantine", *(f"streamproc-dst-{a}" for a in AUDIENCES)]


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    ca = devtls.DevCA("streamproc test OpenBao CA")
    with start_openbao_tls(ca, tmp_path_factory.mktemp("bao-tls")) as server:
        assert server.url.startswith("https://127.0.0.1:")
        server.enable_transit()
        root = server.client()
        for name in KEKS:
            root.secrets.transit.create_key(name, key_type="aes256-gcm96")
        yield server


def spec(bao: OpenBaoServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "vault", "url": bao.url, "token": bao.root_token, **extra}


def roundtrip(kms: Any) -> None:
    ctx = {"topic": "orders"}
    dk = kms.generate_data_key("streamproc-src-orders", ctx)
    assert len(dk.plaintext) == 32
    assert kms.unwrap(dk.kek_id, dk.kek_version, dk.wrapped, ctx) == dk.plaintext


def test_kms_with_the_pinned_ca_works(bao: OpenBaoServer) -> None:
    assert bao.ca_file is not None
    roundtrip(build_kms(spec(bao, ca_cert=str(bao.ca_file)), env={}))


def refused(kms: Any) -> KmsError:
    with pytest.raises(KmsError) as info:
        kms.generate_data_key("streamproc-src-orders", {"topic": "orders"})
    return info.value


def test_system_trust_does_not_accept_the_private_ca(bao: OpenBaoServer) -> None:
    err = refused(build_kms(spec(bao), env={}))
    assert "SSLError" in str(err), err


def test_another_ca_is_refused(bao: OpenBaoServer, tmp_path: Path) -> None:
    other = devtls.DevCA("some other CA").write_ca(tmp_path / "other.pem")
    err = refused(build_kms(spec(bao, ca_cert=str(other)), env={}))
    assert "SSLError" in str(err), err
    assert bao.root_token not in str(err)


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")  # that is the point here
def test_verify_false_needs_insecure_and_says_so(
    bao: OpenBaoServer, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=r"kms\.insecure: true"):
        build_kms(spec(bao, verify=False), env={})
    with caplog.at_level("WARNING", logger="streamproc.crypto.kms.factory"):
        kms = build_kms(spec(bao, verify=False, insecure=True), env={})
    assert any(
        "verification is OFF" in r.getMessage() and bao.url in r.getMessage()
        for r in caplog.records
    )
    roundtrip(kms)  # it does connect, unverified -- which is why it must be explicit


def test_worker_end_to_end_with_vault_over_tls(
    bao: OpenBaoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamproc.client import RecordSealer
    from streamproc.crypto.envelope import parse_header

    bao.client().secrets.kv.v2.create_or_update_secret(
        path="streamproc/pseudonym-master",
        secret={"material": base64.b64encode(os.urandom(32)).decode()},
    )
    for k in ("VAULT_TOKEN", "VAULT_ADDR", "BAO_ADDR", "VAULT_NAMESPACE", "VAULT_CACERT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("BAO_TOKEN", bao.root_token)
    kms = build_kms(spec(bao, ca_cert=str(bao.ca_file)), env={})

    e2e = worker_end_to_end(
        tmp_path / "ws", kafka_bootstrap, unique, workers,
        configure=vault_transit(bao.url, ca_cert=str(bao.ca_file)),
        sealer=lambda ws: RecordSealer(
            kms, "streamproc-src-orders", ws.topic("orders"), ws.schema_json("orders"),
            ws.schema_source(),
        ),
        seed=3,
    )  # fmt: skip
    for a, t in e2e.dests.items():
        assert {parse_header(r.value).kek_id for r in e2e.out[t] if r.value} == {f"streamproc-dst-{a}"}
