"""Least privilege, shown rather than claimed: a real worker on the *shipped* policies.

One OpenBao dev server for the module, with the policy files of ``deploy/vault`` loaded
verbatim (the subscriber policy is templated for one audience by replacing the audience
name, as its header says to).  Then:

* a producer token (``streamproc-producer.hcl``) seals source records;
* the worker runs with a token of ``streamproc-processor.hcl`` and nothing else: it opens
  every source record, seals every destination with data-key-only rights, and reads the
  pseudonym master from KV v2 (``VaultTransitKms.get_secret``) -- the output tokens are
  those of the KV secret's latest version;
* the same processor token is *denied* a transit decrypt of what it wrote for an audience
  (a direct hvac call on ``streamproc-dst-<audience>``, which the root token can make);
* a subscriber token for audience A opens A's topic with ``RecordOpener`` +
  ``VaultTransitKms`` and gets ``EnvelopeError(unknown_key)`` -- from ``KeyAccessDenied``
  -- on audience B's topic.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hvac = pytest.importorskip("hvac")

from streamproc.client import RecordOpener, RecordSealer  # noqa: E402
from streamproc.crypto.envelope import parse_header  # noqa: E402
from streamproc.crypto.kms.vault import VaultTransitKms, canonical_context  # noqa: E402
from streamproc.crypto.pseudonym import PseudonymKeys, make_text_tokenizer  # noqa: E402
from streamproc.errors import EnvelopeError, KeyAccessDenied, Reason  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    AUDIENCES,
    REPO,
    WorkerProcess,
    vault_transit,
    worker_end_to_end,
)
from tests.integration.servers import OpenBaoServer, start_openbao  # noqa: E402

pytestmark = pytest.mark.integration

POLICIES = REPO / "deploy" / "vault"
N = 25
A, B = "fraud", "analytics"  # subscriber A's audience, and another audience B


def subscriber_policy(audience: str) -> str:
    """The shipped subscriber policy, templated for ``audience`` (as its header says)."""
    text = (POLICIES / "streamproc-subscriber-analytics.hcl").read_text()
    out = text.replace("analytics", audience)
    assert f'path "transit/decrypt/streamproc-dst-{audience}"' in out
    return out


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with start_openbao() as server:
        server.enable_transit()
        root = server.client()
        for name in ("streamproc-processor", "streamproc-producer", "streamproc-incident-response"):
            root.sys.create_or_update_policy(name, (POLICIES / f"{name}.hcl").read_text())
        root.sys.create_or_update_policy(f"streamproc-subscriber-{A}", subscriber_policy(A))
        for name in [
            "streamproc-src-orders",
            "streamproc-quarantine",
            *(f"streamproc-dst-{a}" for a in AUDIENCES),
        ]:
            root.secrets.transit.create_key(name, key_type="aes256-gcm96")
        yield server


def token(root: Any, policy: str) -> str:
    return str(root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"])


def test_processor_and_subscribers_on_the_shipped_policies(
    bao: OpenBaoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = bao.client()
    masters = [os.urandom(32), os.urandom(32)]
    for m in masters:  # two KV versions: the processor must pick the latest (2)
        root.secrets.kv.v2.create_or_update_secret(
            path="streamproc/pseudonym-master",
            secret={"material": base64.b64encode(m).decode()},
        )
    processor_token = token(root, "streamproc-processor")
    producer_token = token(root, "streamproc-producer")
    subscriber_token = token(root, f"streamproc-subscriber-{A}")

    for k in ("VAULT_TOKEN", "VAULT_ADDR", "BAO_ADDR", "VAULT_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("BAO_TOKEN", processor_token)  # the worker's only credential

    # producers seal with the producer policy (datakey on source KEKs, nothing else); the
    # worker opens every source record and seals every destination (checked by the helper)
    producer = VaultTransitKms(bao.url, producer_token)
    e2e = worker_end_to_end(
        tmp_path / "ws", kafka_bootstrap, unique, workers,
        configure=vault_transit(bao.url, mount="transit"),
        sealer=lambda ws: RecordSealer(
            producer, "streamproc-src-orders", ws.topic("orders"), ws.schema_json("orders"),
            ws.schema_source(),
        ),
        n=N, seed=5,
    )  # fmt: skip
    ws, produced, dests, out = e2e.ws, e2e.produced, e2e.dests, e2e.out
    for a, t in dests.items():
        assert {parse_header(r.value).kek_id for r in out[t] if r.value} == {f"streamproc-dst-{a}"}

    # the processor token cannot decrypt what it sealed for an audience ...
    sample = out[dests[B]][0]
    assert sample.value is not None
    ciphertext = parse_header(sample.value).wrapped.decode()
    ad = base64.b64encode(canonical_context({"topic": dests[B]})).decode()
    proc_client = bao.client(processor_token)
    for a in AUDIENCES:
        with pytest.raises(hvac.exceptions.Forbidden):
            proc_client.secrets.transit.decrypt_data(
                f"streamproc-dst-{a}", ciphertext, associated_data=ad
            )
    # ... although the request itself is valid: the root token may make it
    ok = root.secrets.transit.decrypt_data(f"streamproc-dst-{B}", ciphertext, associated_data=ad)
    assert len(base64.b64decode(ok["data"]["plaintext"])) == 32
    with pytest.raises(KeyAccessDenied):
        VaultTransitKms(bao.url, processor_token).unwrap(
            f"streamproc-dst-{B}", 1, ciphertext.encode(), {"topic": dests[B]}
        )
    # it opens source records (its job) but cannot forge them: no encrypt, no data keys
    with pytest.raises(hvac.exceptions.Forbidden):
        proc_client.secrets.transit.encrypt_data(
            "streamproc-src-orders", base64.b64encode(b"forged").decode()
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        proc_client.secrets.transit.generate_data_key("streamproc-src-orders", "plaintext")

    # the pseudonym master came from KV v2, latest version
    keys = PseudonymKeys(VaultTransitKms(bao.url, bao.root_token), "pseudonym-master")
    assert keys.primary_version == 2 and keys.master() == (2, masters[1])
    tok = make_text_tokenizer(*keys.token_key("customer", audience=A))

    # subscriber A opens A's topic ...
    sub = RecordOpener(VaultTransitKms(bao.url, subscriber_token), ws.schema_source())
    got = {}
    for r in out[dests[A]]:
        assert r.value is not None
        _, rec = sub.open(r.topic, r.value)
        got[(r.source[1], r.source[2])] = rec
    assert set(got) == set(produced.records)
    for loc, rec in got.items():
        assert rec["customer_id"] == tok(produced.records[loc]["customer_id"])
        assert rec["customer_id"].startswith("tk2_")
    # ... and not B's
    for r in out[dests[B]][:3]:
        assert r.value is not None
        with pytest.raises(EnvelopeError) as info:
            sub.open(r.topic, r.value)
        assert info.value.reason is Reason.UNKNOWN_KEY
    with pytest.raises(hvac.exceptions.Forbidden):
        bao.client(subscriber_token).secrets.transit.decrypt_data(
            f"streamproc-dst-{B}", ciphertext, associated_data=ad
        )
