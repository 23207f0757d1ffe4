"""Revocation end to end: a running worker, a KEK version revoked under it.

For each KMS -- the local keyring (``streamproc keys rotate`` + ``keys revoke``), OpenBao
transit (rotate, then raise ``min_decryption_version``) and AWS KMS through moto (disable
the key) -- the same story:

1. the worker processes records under the source KEK's v1 (their data key is now cached);
2. the version is revoked while the worker runs;
3. after the revocation has had time to reach the worker (the data-key cache sweeps every
   ``revocation_check_interval`` = 5 s, the keyring re-reads its file every second, and
   the Vault/AWS providers cache key state for ``revocation_cache_ttl`` /
   ``state_cache_ttl``, set to 0.5 s here), more v1 records arrive: some under the data
   key the worker has cached, some under a data key it has never seen;
4. every one of them goes to the DLQ with reason ``key_revoked``, the worker's /metrics
   shows ``streamproc_anomalies_total{kind="revoked_key"}`` and
   ``streamproc_dead_letters_total{reason="key_revoked"}``, and records under the other
   source KEK (and, where versions exist, the new v2) keep flowing in the same run.

The same holds for *destination* KEKs (``destination_revocation_story``): once a version
is revoked, within one ``kms.revocation_check_interval`` (1 s in those tests) every new
output is sealed under the primary version -- or, for a disabled AWS key, none is written
(the worker pauses, alive) until the key is enabled again.

The AWS worker takes its pseudonym master from a wrapped secret file (AWS KMS holds no
secrets), created with ``streamproc secrets create`` against moto; the output tokens are
checked against that master.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from streamproc.client import RecordOpener, RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.envelope import parse_header
from streamproc.errors import Reason
from streamproc.runtime.dlq import H_DLQ_REASON
from streamproc.runtime.topics import apply_topics
from tests.integration.conftest import (
    AUDIENCES,
    GEN_KIND,
    REPO,
    WorkerProcess,
    Workspace,
    make_workspace,
    open_dead_letters,
    produce_raw,
    read_topics,
    wait_for,
)
from tests.integration.servers import MotoServer, OpenBaoServer, start_moto, start_openbao

pytestmark = pytest.mark.integration

EARLY = 10  # v1 records before the revocation
LATE_CACHED = 5  # v1 records after it, under the data key the worker has cached
LATE_FRESH = 4  # v1 records after it, under a data key the worker never saw
LATER = 10  # records under the other source KEK (and v2) after the revocation
SETTLE = 6.5  # > revocation_check_interval (5 s) + provider caches (<= 1 s)
REGION = "us-east-1"


# -- helpers ------------------------------------------------------------------------------------


def rewrite_config(ws: Workspace, fn: Callable[[dict[str, Any]], None]) -> None:
    cfg = yaml.safe_load(ws.config_path.read_text())
    fn(cfg)
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def set_keks(cfg: dict[str, Any], dest_kek: Callable[[str], str]) -> None:
    for p in cfg["pipelines"]:
        for d in p["destinations"]:
            d["kek"] = dest_kek(d["audience"])


def workspace(root: Path, bootstrap: str, suffix: str, **extra: Any) -> Workspace:
    ws = make_workspace(
        root,
        bootstrap,
        suffix,
        sources=("orders", "logins"),
        partitions=2,
        extra={"metrics": {"enabled": True, "host": "127.0.0.1", "port": 0}, **extra},
    )
    return ws


def sealer(ws: Workspace, kms: Any, kek: str, source: str) -> RecordSealer:
    return RecordSealer(kms, kek, ws.topic(source), ws.schema_json(source), ws.schema_source())


def seal(s: RecordSealer, source: str, n: int, seed: int) -> list[tuple[bytes, bytes, Any]]:
    recs = list(EventGenerator(seed).events(GEN_KIND[source], n))
    vals = s.seal_many(recs)
    return [(r["customer_id"].encode(), v, r) for r, v in zip(recs, vals, strict=True)]


def metrics_port(w: WorkerProcess) -> int:
    def port() -> int | None:
        for e in w.log_events():
            if str(e.get("message", "")).startswith("metrics at") and e.get("port"):
                return int(e["port"])
        return None

    wait_for(lambda: port() is not None or not w.alive(), 30, what="metrics server")
    p = port()
    assert p is not None, w.log()[-3000:]
    return p


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def revocation_story(
    ws: Workspace,
    workers: list[WorkerProcess],
    *,
    orders_v1: Callable[[], RecordSealer],
    logins: RecordSealer,
    revoke: Callable[[], None],
    orders_after: Callable[[], RecordSealer] | None,
    incident_response_kms: Any = None,
) -> dict[str, Any]:
    """Run the common story; returns what was read back.

    ``incident_response_kms`` opens dead letters (default: the workspace keyring).
    """
    cached, fresh = orders_v1(), orders_v1()
    late_fresh = seal(fresh, "orders", LATE_FRESH, seed=31)  # sealed now, produced later
    w = WorkerProcess(ws)
    workers.append(w)
    port = metrics_port(w)
    early = produce_raw(ws.bootstrap, ws.topic("orders"), seal(cached, "orders", EARLY, seed=30))
    dest = {s: ws.dest(s, "analytics") for s in ("orders", "logins")}
    dlq = ws.dlq("orders")
    got = read_topics(
        ws.bootstrap, [dest["orders"]], until=lambda r: len(r[dest["orders"]]) >= EARLY
    )
    assert len(got[dest["orders"]]) == EARLY, w.log()[-3000:]
    assert scrape(port)[("streamproc_anomalies_total", (("kind", "revoked_key"),))] == 0

    revoke()
    time.sleep(SETTLE)

    late = produce_raw(
        ws.bootstrap,
        ws.topic("orders"),
        [*seal(cached, "orders", LATE_CACHED, seed=32), *late_fresh],
    )
    v2 = None
    if orders_after is not None:
        v2 = produce_raw(
            ws.bootstrap, ws.topic("orders"), seal(orders_after(), "orders", LATER, seed=33)
        )
        assert {parse_header(v).kek_version for v in v2.values.values() if v} == {2}
    assert {parse_header(v).kek_version for v in late.values.values() if v} == {1}
    other = produce_raw(ws.bootstrap, ws.topic("logins"), seal(logins, "logins", LATER, seed=34))
    want_orders = EARLY + (LATER if v2 is not None else 0)
    out = read_topics(
        ws.bootstrap,
        [dest["orders"], dest["logins"], dlq],
        until=lambda r: (
            len(r[dest["orders"]]) >= want_orders
            and len(r[dest["logins"]]) >= LATER
            and len(r[dlq]) >= LATE_CACHED + LATE_FRESH
        ),
        timeout=60,
    )
    assert w.alive(), w.log()[-3000:]
    # every late v1 record, cached data key or not, is dead-lettered as key_revoked
    assert len(out[dlq]) == LATE_CACHED + LATE_FRESH, [r.header(H_DLQ_REASON) for r in out[dlq]]
    assert {r.header(H_DLQ_REASON) for r in out[dlq]} == {Reason.KEY_REVOKED.value}
    opened = open_dead_letters(ws, out[dlq], incident_response_kms)
    assert sorted(d.value for d in opened) == sorted(late.values.values())  # byte for byte
    # ... while the other source KEK (and the new version) kept flowing in the same run
    assert len(out[dest["logins"]]) == len(other.records) == LATER
    assert len(out[dest["orders"]]) == want_orders
    produced_ok = {*early.records, *(v2.records if v2 is not None else {})}
    assert {(r.source[1], r.source[2]) for r in out[dest["orders"]]} == produced_ok

    m: dict[Any, float] = {}

    def counted() -> bool:
        m.update(scrape(port))
        return (
            m.get(
                (
                    "streamproc_dead_letters_total",
                    (("reason", "key_revoked"), ("topic", ws.topic("orders"))),
                )
            )
            == LATE_CACHED + LATE_FRESH
        )

    wait_for(counted, 10, what="dead-letter metrics")
    assert m[("streamproc_anomalies_total", (("kind", "revoked_key"),))] >= 1
    assert m[("streamproc_records_quarantined_total", (("reason", "key_revoked"),))] == (
        LATE_CACHED + LATE_FRESH
    )
    revoked_log = [e for e in w.log_events() if e.get("message") == "anomaly detected: revoked_key"]
    assert revoked_log, "the in-process detector logs the anomaly"
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]
    return {"out": out, "dest": dest}


def audited_ops_config(ws: Any) -> Path:
    """The workspace config plus an audit: section: key and secret commands refuse to
    change anything without one (their events go to ``ops-audit/processor-tools.jsonl``)."""
    ops = yaml.safe_load(ws.config_path.read_text())
    ops["audit"] = {"file": "./ops-audit/processor.jsonl"}
    path = ws.config_path.with_name("ops.yaml")
    path.write_text(yaml.safe_dump(ops))
    return Path(path)


# -- local keyring ------------------------------------------------------------------------------


def test_local_keyring_revocation(
    tmp_path: Path, kafka_bootstrap: str, unique: str, workers: list[WorkerProcess]
) -> None:
    ws = workspace(tmp_path / "ws", kafka_bootstrap, unique)
    apply_topics(ws.load_config())
    kms = ws.kms()

    ops_config = audited_ops_config(ws)

    def cli(*args: str) -> None:
        r = subprocess.run(
            [sys.executable, "-m", "streamproc.cli.main", "keys", args[0], "--config",
             str(ops_config), "--keyring", str(ws.keyring_path), *args[1:]],
            capture_output=True, text=True, cwd=str(REPO), timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr

    def revoke() -> None:
        cli("rotate", "orders-kek")
        cli("revoke", "orders-kek", "1")

    revocation_story(
        ws,
        workers,
        orders_v1=lambda: sealer(ws, kms, "orders-kek", "orders"),
        logins=sealer(ws, kms, "logins-kek", "logins"),
        revoke=revoke,
        orders_after=lambda: sealer(ws, ws.kms(), "orders-kek", "orders"),  # primary: v2
    )


# -- OpenBao transit ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with start_openbao() as server:
        server.enable_transit()
        root = server.client()
        root.sys.create_or_update_policy(
            "streamproc-processor",
            (REPO / "deploy" / "vault" / "streamproc-processor.hcl").read_text(),
        )
        root.secrets.kv.v2.create_or_update_secret(
            path="streamproc/pseudonym-master",
            secret={"material": base64.b64encode(os.urandom(32)).decode()},
        )
        yield server


def test_openbao_min_decryption_version(
    bao: OpenBaoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamproc.crypto.kms.vault import VaultTransitKms

    root = bao.client()
    tag = uuid.uuid4().hex[:8]
    src = {s: f"streamproc-src-{s}-{tag}" for s in ("orders", "logins")}
    dst = {a: f"streamproc-dst-{a}-{tag}" for a in AUDIENCES}
    for name in [*src.values(), *dst.values(), "streamproc-quarantine"]:
        root.secrets.transit.create_key(name, key_type="aes256-gcm96")
    token = root.auth.token.create(policies=["streamproc-processor"], ttl="10m")["auth"][
        "client_token"
    ]
    for k in ("VAULT_TOKEN", "VAULT_ADDR", "BAO_ADDR", "VAULT_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("BAO_TOKEN", token)  # the worker runs with the processor policy only

    ws = workspace(tmp_path / "ws", kafka_bootstrap, unique)
    rewrite_config(
        ws,
        lambda c: (
            c.update(
                kms={
                    "provider": "vault",
                    "url": bao.url,
                    "mount": "transit",
                    "revocation_cache_ttl": 0.5,
                },
                dead_letter={"kek": "streamproc-quarantine"},
            ),
            set_keks(c, dst.__getitem__),
        ),
    )
    apply_topics(ws.load_config())
    producer = VaultTransitKms(bao.url, bao.root_token, revocation_cache_ttl=0)
    incident_response = VaultTransitKms(bao.url, bao.root_token)

    def revoke() -> None:
        root.secrets.transit.rotate_key(src["orders"])
        root.secrets.transit.update_key_configuration(src["orders"], min_decryption_version=2)

    res = revocation_story(
        ws,
        workers,
        orders_v1=lambda: sealer(ws, producer, src["orders"], "orders"),
        logins=sealer(ws, producer, src["logins"], "logins"),
        revoke=revoke,
        orders_after=lambda: sealer(ws, producer, src["orders"], "orders"),  # latest: v2
        incident_response_kms=incident_response,
    )
    opener = RecordOpener(VaultTransitKms(bao.url, bao.root_token), ws.schema_source())
    for r in res["out"][res["dest"]["orders"]]:
        assert parse_header(r.value).kek_id == dst["analytics"]
        opener.open(r.topic, r.value)


# -- AWS KMS (moto) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
        }.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
            mp.delenv(k, raising=False)
        with start_moto() as server:
            yield server


def test_aws_disabled_key_with_a_wrapped_pseudonym_secret(
    moto: MotoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
) -> None:
    from streamproc.crypto.kms.aws import AwsKms
    from streamproc.crypto.pseudonym import PseudonymKeys, make_text_tokenizer
    from streamproc.crypto.wrapped_secrets import WrappedSecretFile

    admin = moto.kms_client()

    def key(what: str) -> str:
        return str(admin.create_key(Description=f"streamproc {what}")["KeyMetadata"]["KeyId"])

    src = {s: key(f"src {s}") for s in ("orders", "logins")}
    dst = {a: key(f"dst {a}") for a in AUDIENCES}
    secret_kek = key("pseudonym master")
    quarantine_kek = key("quarantine")
    ws = workspace(
        tmp_path / "ws",
        kafka_bootstrap,
        unique,
        kms={"provider": "aws", "region": REGION, "endpoint_url": moto.url, "state_cache_ttl": 0.5},
        pseudonym_secrets={
            "provider": "wrapped_file",
            "path": "./keys/pseudonym.json",
            "kek": secret_kek,
        },
        dead_letter={"kek": quarantine_kek},
    )
    rewrite_config(ws, lambda c: set_keks(c, dst.__getitem__))
    apply_topics(ws.load_config())
    # the key custodian creates the master with the CLI, against (mock) AWS KMS
    r = subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", "secrets", "create", "--kms-config",
         str(audited_ops_config(ws))],
        capture_output=True, text=True, cwd=str(REPO), timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"created version 1 under {secret_kek}" in r.stdout
    producer = AwsKms(REGION, moto.url, state_cache_ttl=0)

    res = revocation_story(
        ws,
        workers,
        orders_v1=lambda: sealer(ws, producer, src["orders"], "orders"),
        logins=sealer(ws, producer, src["logins"], "logins"),
        revoke=lambda: admin.disable_key(KeyId=src["orders"]),
        orders_after=None,  # AWS revokes whole keys; there is no "v2" to keep using
        incident_response_kms=producer,
    )
    # tokens come from the master in the wrapped file
    keys = PseudonymKeys(
        WrappedSecretFile(ws.root / "keys" / "pseudonym.json", producer, kek=secret_kek),
        "pseudonym-master",
    )
    v, k = keys.token_key("customer", audience="analytics")
    tok = make_text_tokenizer(v, k)
    opener = RecordOpener(producer, ws.schema_source())
    outs = res["out"][res["dest"]["logins"]]
    assert outs
    for rec in outs:
        _, decoded = opener.open(rec.topic, rec.value)
        assert decoded["customer_id"].startswith("tk1_")
        assert rec.key is not None
    produced_ids = {
        tok(rec["customer_id"]) for rec in EventGenerator(34).events(GEN_KIND["logins"], LATER)
    }
    assert {opener.open(r.topic, r.value)[1]["customer_id"] for r in outs} == produced_ids


# -- destination KEKs: the sealer leaves a revoked version within one sweep ------------------------

DEST_EARLY = 6
DEST_LATE = 8
SWEEP = 1.0  # kms.revocation_check_interval for these workers
DEST_SETTLE = 3.5  # > SWEEP + the provider's state cache (<= 1 s) + one batch wait


def dest_versions(ws: Workspace, dest: str, want: int | None) -> list[int]:
    """KEK versions of the destination's records (``want=None``: whatever is there now)."""
    until = None if want is None else (lambda r: len(r[dest]) >= want)
    out = read_topics(ws.bootstrap, [dest], until=until, timeout=60)
    return sorted(parse_header(r.value).kek_version for r in out[dest] if r.value)


def destination_revocation_story(
    ws: Workspace,
    workers: list[WorkerProcess],
    *,
    kms: Any,
    source_kek: str,
    revoke: Callable[[], None],
    restore: Callable[[], None] | None = None,
) -> WorkerProcess:
    """EARLY records sealed for analytics under dest v1; the version is revoked; after one
    sweep, every LATE output is sealed under the primary version (or, where the KMS
    has no other version -- AWS -- none is written until the key is usable again)."""
    w = WorkerProcess(ws)
    workers.append(w)
    dest = ws.dest("orders", "analytics")
    produce_raw(ws.bootstrap, ws.topic("orders"), seal(sealer(ws, kms, source_kek, "orders"), "orders", DEST_EARLY, 40))
    assert dest_versions(ws, dest, DEST_EARLY) == [1] * DEST_EARLY, w.log()[-3000:]
    revoke()
    time.sleep(DEST_SETTLE)
    produce_raw(ws.bootstrap, ws.topic("orders"), seal(sealer(ws, kms, source_kek, "orders"), "orders", DEST_LATE, 41))
    if restore is None:
        assert dest_versions(ws, dest, DEST_EARLY + DEST_LATE) == [1] * DEST_EARLY + [2] * DEST_LATE
    else:
        def paused() -> bool:
            return any(
                str(e.get("message", "")).startswith("transient outage (SealingUnavailable)")
                and dest in str(e.get("detail", ""))
                for e in w.log_events()
            )

        wait_for(paused, 30, what="the worker to pause on the disabled destination key")
        assert w.alive(), w.log()[-3000:]
        # the batch with the late records was refused as a whole: nothing written for them
        assert dest_versions(ws, dest, None) == [1] * DEST_EARLY
        restore()
        assert dest_versions(ws, dest, DEST_EARLY + DEST_LATE) == [1] * (DEST_EARLY + DEST_LATE)
    assert w.alive(), w.log()[-3000:]
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]
    return w


def test_local_keyring_destination_revocation(
    tmp_path: Path, kafka_bootstrap: str, unique: str, workers: list[WorkerProcess]
) -> None:
    ws = workspace(tmp_path / "ws", kafka_bootstrap, unique)
    rewrite_config(ws, lambda c: c["kms"].update(revocation_check_interval=SWEEP))
    apply_topics(ws.load_config())
    admin = ws.kms()

    def revoke() -> None:
        admin.rotate("analytics-kek")
        admin.revoke("analytics-kek", 1)

    destination_revocation_story(ws, workers, kms=ws.kms(), source_kek="orders-kek", revoke=revoke)


def test_openbao_destination_revocation(
    bao: OpenBaoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The processor's token may not read destination key state (least privilege): the
    sealer then takes a fresh data key each sweep, and transit hands out the latest."""
    from streamproc.crypto.kms.vault import VaultTransitKms

    root = bao.client()
    tag = uuid.uuid4().hex[:8]
    src = f"streamproc-src-orders-{tag}"
    dst = {a: f"streamproc-dst-{a}-{tag}" for a in AUDIENCES}
    for name in [src, f"streamproc-src-logins-{tag}", *dst.values(), "streamproc-quarantine"]:
        root.secrets.transit.create_key(name, key_type="aes256-gcm96")
    token = root.auth.token.create(policies=["streamproc-processor"], ttl="10m")["auth"]["client_token"]
    for k in ("VAULT_TOKEN", "VAULT_ADDR", "BAO_ADDR", "VAULT_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("BAO_TOKEN", token)
    ws = workspace(tmp_path / "ws", kafka_bootstrap, unique)
    rewrite_config(
        ws,
        lambda c: (
            c.update(kms={"provider": "vault", "url": bao.url, "mount": "transit",
                          "revocation_cache_ttl": 0.5, "revocation_check_interval": SWEEP},
                     dead_letter={"kek": "streamproc-quarantine"}),
            set_keks(c, dst.__getitem__),
        ),
    )
    apply_topics(ws.load_config())

    def revoke() -> None:
        root.secrets.transit.rotate_key(dst["analytics"])
        root.secrets.transit.update_key_configuration(dst["analytics"], min_decryption_version=2)

    destination_revocation_story(
        ws, workers, kms=VaultTransitKms(bao.url, bao.root_token), source_kek=src, revoke=revoke
    )


def test_aws_destination_key_disabled(
    moto: MotoServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
) -> None:
    """AWS keys have no caller-visible versions: a disabled destination key must stop
    sealing (the worker pauses, alive) and sealing resumes once it is enabled again."""
    from streamproc.crypto.kms.aws import AwsKms

    admin = moto.kms_client()

    def key(what: str) -> str:
        return str(admin.create_key(Description=f"streamproc {what}")["KeyMetadata"]["KeyId"])

    src = key("src orders")
    dst = {a: key(f"dst {a}") for a in AUDIENCES}
    secret_kek = key("pseudonym master")
    ws = workspace(
        tmp_path / "ws",
        kafka_bootstrap,
        unique,
        dead_letter={"kek": key("quarantine")},
        kms={"provider": "aws", "region": REGION, "endpoint_url": moto.url,
             "state_cache_ttl": 0.5, "revocation_check_interval": SWEEP},
        pseudonym_secrets={"provider": "wrapped_file", "path": "./keys/pseudonym.json", "kek": secret_kek},
    )
    rewrite_config(ws, lambda c: set_keks(c, dst.__getitem__))
    apply_topics(ws.load_config())
    r = subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", "secrets", "create", "--kms-config",
         str(audited_ops_config(ws))],
        capture_output=True, text=True, cwd=str(REPO), timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    destination_revocation_story(
        ws,
        workers,
        kms=AwsKms(REGION, moto.url, state_cache_ttl=0),
        source_kek=src,
        revoke=lambda: admin.disable_key(KeyId=dst["analytics"]),
        restore=lambda: admin.enable_key(KeyId=dst["analytics"]),
    )
