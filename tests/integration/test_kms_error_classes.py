"""Every KMS provider error is a reason class or an outage -- never a crash -- against real
servers (OpenBao dev server, moto), through a real :class:`Pipeline`.

For each provider the table below is driven through ``Pipeline.process``: a source record
whose key the KMS refuses is dead-lettered with the listed reason, and the record next to
it (under a good key) still comes out; a KMS that is down raises a
:class:`~streamproc.errors.TransientError` (the worker pauses and retries); a destination
key the KMS refuses raises :class:`~streamproc.errors.SealingUnavailable` (also
transient), never anything that would stop the worker.  The classification table itself is
tests/unit/test_key_hardening.py::test_classification_table.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.envelope import Opener
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import Reason, SealingUnavailable, TransientError
from streamproc.pipeline.core import Destination, InputRecord, Pipeline, Route
from streamproc.policy.model import load_policy
from streamproc.schema.registry import CachingSchemaSource, DirectorySchemaSource
from tests.integration.servers import (
    MotoServer,
    OpenBaoServer,
    free_port,
    start_moto,
    start_openbao,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
TOPIC = "orders"
DEST = "orders.analytics"


class Kit:
    def __init__(self, tmp: Path) -> None:
        shutil.copytree(REPO / "schemas", tmp / "schemas")
        self.schemas = CachingSchemaSource(DirectorySchemaSource(tmp / "schemas"))
        self.ring = LocalKeyring.create(tmp / "ring.json")
        self.ring.create_key("pseudonym-master", "secret")
        self.policy = load_policy(REPO / "policy.yaml")
        self.schema = json.loads((REPO / "schemas" / "order.avsc").read_text())

    def pipeline(self, kms: Any, dest_kek: str) -> Pipeline:
        return Pipeline(
            routes=[Route((TOPIC,), (Destination(DEST, "analytics", dest_kek),))],
            policy=self.policy,
            opener=Opener.for_kms(kms),
            kms=kms,
            schemas=self.schemas,
            keys=PseudonymKeys(self.ring, "pseudonym-master"),
        )

    def seal(self, kms: Any, kek: str, seed: int, topic: str = TOPIC) -> bytes:
        s = RecordSealer(kms, kek, topic, self.schema, self.schemas)
        return s.seal(EventGenerator(seed).order())


def records(values: list[bytes]) -> list[InputRecord]:
    return [InputRecord(TOPIC, 0, i, b"k", v, None, ()) for i, v in enumerate(values)]


def check_record_level(p: Pipeline, bad: bytes, good: bytes, reason: Reason) -> None:
    res = p.process(records([bad, good]))
    assert [q.reason for q in res.quarantined] == [reason], [q.detail for q in res.quarantined]
    assert [o.source.offset for o in res.outputs] == [1]


# -- OpenBao ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with start_openbao() as server:
        server.enable_transit()
        yield server


def test_openbao_error_classes(bao: OpenBaoServer, tmp_path: Path) -> None:
    from streamproc.crypto.kms.vault import VaultTransitKms

    root = bao.client()

    def key(kind: str = "aes256-gcm96", **kw: Any) -> str:
        name = f"k-{uuid.uuid4().hex[:10]}"
        root.secrets.transit.create_key(name, key_type=kind, **kw)
        return name

    kit = Kit(tmp_path)
    kms = VaultTransitKms(bao.url, bao.root_token, revocation_cache_ttl=0)
    src, dst = key(), key()
    good = kit.seal(kms, src, 1)
    p = kit.pipeline(kms, dst)
    assert len(p.process(records([good])).outputs) == 1

    # unknown: a key hard-deleted after sealing looks exactly like one that never existed
    gone = key()
    under_gone = kit.seal(kms, gone, 2)
    root.secrets.transit.update_key_configuration(gone, deletion_allowed=True)
    root.secrets.transit.delete_key(gone)
    check_record_level(p, under_gone, good, Reason.UNKNOWN_KEY)
    # revoked: below min_decryption_version
    old = key()
    under_old = kit.seal(kms, old, 3)
    root.secrets.transit.rotate_key(old)
    root.secrets.transit.update_key_configuration(old, min_decryption_version=2)
    check_record_level(p, under_old, good, Reason.KEY_REVOKED)
    # tampered: a wrapped key from another transit key, relabelled
    other = key()
    foreign = bytearray(kit.seal(kms, other, 4))
    relabelled = bytes(foreign).replace(other.encode(), src.encode(), 1)
    check_record_level(p, relabelled, good, Reason.TAMPERED)
    # a derived key named by a producer while we bind by associated_data: the provider
    # raises ConfigError about that key -- today's crash, now a record-level kms_error
    derived = key(derived=True)
    under_derived = kit.seal(VaultTransitKms(bao.url, bao.root_token, context_binding="derived"), derived, 5)
    check_record_level(p, under_derived, good, Reason.KMS_ERROR)

    # a destination key that cannot make data keys (a signing key): the unmapped error
    # pauses the worker instead of stopping it
    signing = key("ed25519")
    with pytest.raises(SealingUnavailable, match=f"KEK '{signing}' cannot seal"):
        kit.pipeline(kms, signing).process(records([good]))
    # a destination key deleted under a running pipeline: the sealer must not fall back
    doomed = key()
    pd = kit.pipeline(kms, doomed)
    assert len(pd.process(records([good])).outputs) == 1
    root.secrets.transit.update_key_configuration(doomed, deletion_allowed=True)
    root.secrets.transit.delete_key(doomed)
    with pytest.raises(SealingUnavailable):  # what the next revocation interval does
        pd.check_sealers(force=True)
    with pytest.raises(SealingUnavailable):  # and the retry: no fallback to the old data key
        pd.process(records([good]))

    # the server down: an outage, on both sides
    down = VaultTransitKms(f"http://127.0.0.1:{free_port()}", "t", timeout=1.0)
    with pytest.raises(TransientError):
        kit.pipeline(down, dst).process(records([good]))


# -- AWS KMS (moto) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": REGION}.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
            mp.delenv(k, raising=False)
        with start_moto() as server:
            yield server


def test_aws_error_classes(moto: MotoServer, tmp_path: Path) -> None:
    from streamproc.crypto.kms.aws import AwsKms

    admin = moto.kms_client()

    def key(**kw: Any) -> str:
        return str(admin.create_key(Description="streamproc error classes", **kw)["KeyMetadata"]["KeyId"])

    kit = Kit(tmp_path)
    kms = AwsKms(REGION, moto.url, state_cache_ttl=0.0)
    src, dst = key(), key()
    good = kit.seal(kms, src, 1)
    p = kit.pipeline(kms, dst)
    assert len(p.process(records([good])).outputs) == 1

    # an envelope naming a key id AWS does not know (made with a local keyring of that name)
    ghost_id = str(uuid.uuid4())
    ghost = LocalKeyring.create(tmp_path / "ghost.json")
    ghost.create_key(ghost_id)
    check_record_level(p, kit.seal(ghost, ghost_id, 2), good, Reason.UNKNOWN_KEY)
    # the same trick with a real key id: AWS refuses the foreign blob as inauthentic
    ghost.create_key(src)
    check_record_level(p, kit.seal(ghost, src, 3), good, Reason.TAMPERED)
    # disabled and pending deletion: revoked
    off = key()
    under_off = kit.seal(kms, off, 4)
    admin.disable_key(KeyId=off)
    check_record_level(p, under_off, good, Reason.KEY_REVOKED)
    doomed = key()
    under_doomed = kit.seal(kms, doomed, 5)
    admin.schedule_key_deletion(KeyId=doomed, PendingWindowInDays=7)
    check_record_level(p, under_doomed, good, Reason.KEY_REVOKED)
    # an asymmetric (signing) key named by the envelope: inauthentic for Decrypt
    signing = key(KeyUsage="SIGN_VERIFY", KeySpec="RSA_2048")
    ghost.create_key(signing)
    check_record_level(p, kit.seal(ghost, signing, 6), good, Reason.TAMPERED)

    # destination side: a key AWS does not know (moto does not refuse GenerateDataKey on
    # signing keys; that ConfigError is stubbed in test_kms_aws.py and classified in the
    # unit tests), and a key disabled under a running pipeline -- both pause, never crash
    with pytest.raises(SealingUnavailable, match="KeyNotFound"):
        kit.pipeline(kms, ghost_id).process(records([good]))
    dst2 = key()
    p2 = kit.pipeline(kms, dst2)
    assert len(p2.process(records([good])).outputs) == 1
    admin.disable_key(KeyId=dst2)
    with pytest.raises(SealingUnavailable, match="KeyRevoked"):
        p2.check_sealers(force=True)
    with pytest.raises(SealingUnavailable, match="KeyRevoked"):  # no fallback to the old key
        p2.process(records([good]))
    admin.enable_key(KeyId=dst2)
    assert len(p2.process(records([good])).outputs) == 1

    # the endpoint down: an outage
    down = AwsKms(REGION, f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout=0.5)
    with pytest.raises(TransientError):
        kit.pipeline(down, dst).process(records([good]))


# -- a running worker: the record that used to crash it is a dead letter ---------------------------


def test_worker_dead_letters_an_unmapped_kms_error_and_carries_on(
    bao: OpenBaoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the provider's ConfigError escaped ``Pipeline.process`` and the worker
    exited (78), and every restart met the same record.  Now: ``kms_error`` in the DLQ."""
    import yaml

    from streamproc.crypto.kms.vault import VaultTransitKms
    from streamproc.runtime.dlq import H_DLQ_DETAIL, H_DLQ_REASON
    from streamproc.runtime.topics import apply_topics
    from tests.integration.conftest import (
        AUDIENCES,
        WorkerProcess,
        make_workspace,
        produce_raw,
        read_topics,
    )

    root = bao.client()
    tag = uuid.uuid4().hex[:8]
    src, derived = f"src-{tag}", f"derived-{tag}"
    dst = {a: f"dst-{a}-{tag}" for a in AUDIENCES}
    for name in [src, *dst.values(), f"quarantine-{tag}"]:
        root.secrets.transit.create_key(name, key_type="aes256-gcm96")
    root.secrets.transit.create_key(derived, key_type="aes256-gcm96", derived=True)
    for k in ("VAULT_TOKEN", "VAULT_ADDR", "BAO_ADDR", "VAULT_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("BAO_TOKEN", bao.root_token)
    ws = make_workspace(tmp_path / "ws", kafka_bootstrap, unique, sources=("orders",), partitions=1)
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["kms"] = {"provider": "vault", "url": bao.url, "mount": "transit"}
    cfg["dead_letter"] = {"kek": f"quarantine-{tag}"}
    for d in cfg["pipelines"][0]["destinations"]:
        d["kek"] = dst[d["audience"]]
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    root.secrets.kv.v2.create_or_update_secret(
        path="streamproc/pseudonym-master", secret={"material": base64.b64encode(os.urandom(32)).decode()}
    )
    apply_topics(ws.load_config())
    producer = VaultTransitKms(bao.url, bao.root_token)
    by_derived = VaultTransitKms(bao.url, bao.root_token, context_binding="derived")
    topic = ws.topic("orders")

    def seal(kms: Any, kek: str, seed: int) -> tuple[bytes, bytes, int]:
        rec = EventGenerator(seed).order()
        s = RecordSealer(kms, kek, topic, ws.schema_json("orders"), ws.schema_source())
        return (rec["customer_id"].encode(), s.seal(rec), seed)

    produced = produce_raw(
        ws.bootstrap, topic, [seal(producer, src, 1), seal(by_derived, derived, 2), seal(producer, src, 3)]
    )
    w = WorkerProcess(ws)
    workers.append(w)
    dest, dlq = ws.dest("orders", "analytics"), ws.dlq("orders")
    out = read_topics(ws.bootstrap, [dest, dlq], until=lambda r: len(r[dest]) >= 2 and len(r[dlq]) >= 1, timeout=60)
    assert w.alive(), w.log()[-3000:]
    assert len(out[dest]) == 2 and len(out[dlq]) == 1
    (dead,) = out[dlq]
    assert dead.header(H_DLQ_REASON) == Reason.KMS_ERROR.value
    assert dead.header(H_DLQ_DETAIL) == (
        f"key sha256:{hashlib.sha256(derived.encode()).hexdigest()[:12]} v1 (KmsError)"
    )
    assert produced.records  # three records went in; two came out, one dead letter
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]
