"""A subject forgotten mid-stream through the real worker on the broker (crypto-shredding).

Policy: ``fraud`` encrypts e-mails with ``erasable: true`` (subject ``customer_id``);
``analytics`` tokenizes them.  Three subjects stream orders; ``streamproc forget`` (the
CLI, as an operator runs it) forgets one of them; more orders of all three, and of new
subjects (whose new keys keep the key topic written), follow.  Then:

* once the key topic is compacted, **none** of the forgotten subject's fraud values --
  every one ever output, before and after the forget -- opens with **any** key record
  left in the key topic (every record in the log is tried, read_uncommitted);
* re-identification of those values fails with ``subject_forgotten`` (audited); the other
  subjects' values still re-identify, and their key records are intact -- through the
  library and through ``streamproc keys export-audience`` + ``streamproc reidentify``;
* the forgotten subject's records after the worker applied the marker are withheld from
  ``fraud`` (counted ``forgotten``), still delivered to ``analytics``; no new key was
  made for them;
* every key a delivered value names is in the key topic (read_committed): written in the
  transaction of the outputs that use it;
* a worker killed (SIGKILL) and restarted restores the table: a kept subject's e-mail gets
  the same ciphertext as before, the forgotten subject stays withheld from ``fraud``;
* nothing is dead-lettered, and the key topic is compacted with the bounding settings.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from tests.integration.conftest import (
    REPO,
    WorkerProcess,
    Workspace,
    make_workspace,
    producer,
    read_topics,
    wait_for,
)

pytestmark = pytest.mark.integration

FORGOTTEN = "cust-9d41e2-forgotten"
STAYS = ("cust-5a7b10-stays", "cust-c3e8f4-stays")
SUBJECT_KEK = "fraud-subject-kek"


def erasure_workspace(root: Path, bootstrap: str, suffix: str) -> tuple[Workspace, str]:
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.runtime.topics import apply_topics

    key_topic = f"subject-keys-{suffix}"
    ws = make_workspace(
        root, bootstrap, suffix, sources=("orders",), partitions=2,
        batch={"max_records": 20, "max_wait_ms": 50},
        extra={
            "erasure": {"topic": key_topic, "keks": {"fraud": SUBJECT_KEK}, "restore_timeout_seconds": 60},
            "audit": {"file": "./audit/processor.jsonl"},
            "topics": {
                "defaults": {"partitions": 2, "replication_factor": 1},
                # The production bounds are an hour; the test shortens them (and the dev
                # broker's cleaner backoff) so compaction happens within seconds.
                "overrides": {key_topic: {"partitions": 1, "config": {
                    "segment.ms": "300", "max.compaction.lag.ms": "300", "delete.retention.ms": "1000",
                }}},
            },
        },
    )  # fmt: skip
    LocalKeyring(ws.keyring_path).create_key(SUBJECT_KEK)
    policy = yaml.safe_load(ws.policy.read_text())
    policy["audiences"]["fraud"]["subject"] = "customer_id"
    policy["audiences"]["fraud"]["tags"]["EMAIL"] = {
        "op": "encrypt_deterministic", "normalize": ["lower", "strip"], "erasable": True,
    }
    ws.policy.write_text(yaml.safe_dump(policy, sort_keys=False))
    apply_topics(ws.load_config())
    return ws, key_topic


class Orders:
    def __init__(self, ws: Workspace) -> None:
        from streamproc.client.generator import EventGenerator

        self.ws, self.sealer, self.gen = ws, ws.sealer("orders"), EventGenerator(21)
        self.p = producer(ws.bootstrap)
        self.sent: dict[str, str] = {}  # order_id -> subject
        self.email: dict[str, str] = {}  # order_id -> the e-mail as produced
        self.n = 0

    def send(self, subjects: tuple[str, ...], rounds: int, email: str | None = None) -> set[str]:
        ids = set()
        for _ in range(rounds):
            for s in subjects:
                rec = self.gen.order()
                rec.update(customer_id=s, order_id=f"o-{self.n}")
                if email is not None:
                    rec["email"] = email
                self.p.produce(self.ws.topic("orders"), key=s.encode(), value=self.sealer.seal(rec))
                self.sent[rec["order_id"]] = s
                self.email[rec["order_id"]] = rec["email"]
                ids.add(rec["order_id"])
                self.n += 1
        assert self.p.flush(30) == 0
        return ids


def outputs(ws: Workspace, until_ids: set[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """audience -> order id -> record, read until every id of ``until_ids`` is in analytics."""
    opener = ws.opener()
    topics = [ws.dest("orders", a) for a in ("analytics", "fraud")] + [ws.dlq("orders")]

    def by_id(recs: dict[str, Any], audience: str) -> dict[str, dict[str, Any]]:
        t = ws.dest("orders", audience)
        return {(r := opener.open(t, m.value)[1])["order_id"]: r for m in recs[t] if m.value is not None}

    got = read_topics(ws.bootstrap, topics, until=lambda r: until_ids <= set(by_id(r, "analytics")), timeout=90)
    assert got[ws.dlq("orders")] == [], "nothing is dead-lettered"
    return {a: by_id(got, a) for a in ("analytics", "fraud")}


def key_log(ws: Workspace, key_topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every record physically in the key topic's log (aborted transactions included)."""
    recs = read_topics(ws.bootstrap, [key_topic], timeout=20, idle=1.0, isolation="read_uncommitted")[key_topic]
    return [(r.key or b"", r.value) for r in recs]


def opens_any(ws: Workspace, key_topic: str, values: list[str]) -> list[str]:
    """The values that some key record left in the log decrypts (AES-SIV from primitives)."""
    from streamproc.crypto.envelope import Opener

    opener = Opener.for_kms(ws.kms())
    keys = []
    for _k, v in key_log(ws, key_topic):
        if v is None or b'"key"' not in v:
            continue
        sealed = base64.b64decode(json.loads(v)["key"])
        keys.append(opener.open_parts(key_topic, sealed)[0][-64:])
    opened = []
    for value in values:
        kid = value.split("_")[1]
        body = base64.urlsafe_b64decode(value.split("_", 2)[2] + "==")
        for key in keys:
            try:
                AESSIV(key).decrypt(body, [b"EMAIL", kid.encode()])
            except InvalidTag:
                continue
            opened.append(value)
            break
    return opened


def test_forget_mid_stream_shreds_every_value_of_the_subject(
    tmp_path: Path, kafka_bootstrap: str, unique: str, workers: list[Any], broker_is_tansu: bool
) -> None:
    if broker_is_tansu:
        pytest.skip("waits for log compaction (what destroys the key record): proven on Apache Kafka")
    from confluent_kafka.admin import AdminClient, ConfigResource

    from streamproc.audit import AuditLog, MemorySink
    from streamproc.config import load_config
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.reid import AudienceKey, Reidentifier, SubjectForgottenError
    from streamproc.runtime.erasure import key_opener, read_key_directory

    ws, key_topic = erasure_workspace(tmp_path / "ws", kafka_bootstrap, unique)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, key_topic)
    described = next(iter(admin.describe_configs([res]).values())).result(30)
    assert described["cleanup.policy"].value == "compact"
    assert float(described["min.cleanable.dirty.ratio"].value) <= 0.01

    w = WorkerProcess(ws, name="worker")
    workers.append(w)
    w.wait_assigned(60)
    orders = Orders(ws)
    everyone = (FORGOTTEN, *STAYS)
    phase1 = orders.send(everyone, rounds=6)
    got = outputs(ws, phase1)
    assert set(got["fraud"]) == phase1  # before the forget, fraud gets everything
    emails = {i: r["email"] for i, r in got["fraud"].items()}
    assert all(e.startswith("ds1_") for e in emails.values())
    # Every key a delivered value names was committed with it (read_committed): no output
    # ever depends on a key that was not persisted.
    committed = read_topics(ws.bootstrap, [key_topic], timeout=20, idle=1.0)[key_topic]
    stored = {(r.key or b"").decode().split("/")[1] for r in committed if r.value is not None}
    assert {e.split("_")[1] for e in emails.values()} <= stored
    mine = [emails[i] for i in phase1 if orders.sent[i] == FORGOTTEN]
    assert len(set(mine)) == 6 and opens_any(ws, key_topic, mine) == mine  # reversible until forgotten

    t_forget = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", "forget", FORGOTTEN, "--config", str(ws.config_path),
         "--reason", "DSR-2041 erasure request"],
        capture_output=True, text=True, cwd=str(REPO), timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert FORGOTTEN not in r.stdout + r.stderr
    assert "1 key(s) shredded (audiences: fraud)" in r.stdout, r.stdout
    # The worker's follower applied the marker and the shred (two records) after the forget.
    wait_for(
        lambda: sum(
            e.get("count", 0) for e in w.log_events()
            if e.get("message") == "subject-key updates applied" and _ts(e.get("ts", "")) >= t_forget
        ) >= 2,
        30, what="the worker applying the forget",
    )  # fmt: skip

    newcomers = tuple(f"cust-new{i:02d}" for i in range(6))
    phase2 = orders.send(everyone, rounds=4) | orders.send(newcomers, rounds=1)
    got = outputs(ws, phase1 | phase2)
    later = {i for i in phase2 if orders.sent[i] == FORGOTTEN}
    assert later <= set(got["analytics"]), "audiences without erasable rules still get them"
    assert not (later & set(got["fraud"])), "withheld from fraud: no key may be made for them"
    assert set(got["fraud"]) == (phase1 | phase2) - later
    emails = {i: r["email"] for i, r in got["fraud"].items()}
    mine = [emails[i] for i in sorted(emails) if orders.sent[i] == FORGOTTEN]

    # Keep the key topic written (new subjects' keys) until compaction has removed the old
    # key record: every record left in the log is tried on every value of the subject.
    extra = [0]

    def shredded() -> bool:
        extra[0] += 1
        orders.send((f"cust-late{extra[0]:03d}",), rounds=1)
        return opens_any(ws, key_topic, mine) == []

    t0 = time.monotonic()
    wait_for(shredded, 90, what="compaction of the forgotten subject's key record")
    print(f"\nforget: key record compacted away {time.monotonic() - t0:.1f}s after the stream resumed")

    # Nothing of the forgotten subject is reversible; the others are.
    config = load_config(ws.config_path)
    keys = PseudonymKeys(ws.kms(), "pseudonym-master")
    directory = read_key_directory(config)
    opener = key_opener(ws.kms(), key_topic)
    sink = MemorySink()
    reid = Reidentifier(
        AudienceKey("fraud", 1, keys.siv_key("fraud")[1]), AuditLog([sink], stream="t"), config.load_policy(),
        subject_keys=lambda aud, kid: directory.resolve(aud, kid, opener),
    )  # fmt: skip
    for value in mine:
        with pytest.raises(SubjectForgottenError) as exc:
            reid.reidentify(value, "EMAIL", actor="investigator", field="email", reason="DSR-2041 check")
        assert exc.value.reason == "subject_forgotten"
    stays = {i: v for i, v in emails.items() if orders.sent[i] in STAYS}
    assert stays
    for i, value in stays.items():
        plain = reid.reidentify(value, "EMAIL", actor="investigator", field="email", reason="DSR-2041 check")
        assert plain == orders.email[i].strip().lower()  # the rule normalizes: lower, strip
    events = [json.loads(x) for x in sink.lines]
    errors = [e["attrs"].get("error") for e in events if e["type"] == "reidentification"]
    assert errors.count("subject_forgotten") == len(mine)

    # The same through the commands an investigator runs (key file, then reidentify).
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamproc.cli.main", *args], capture_output=True, text=True,
            cwd=str(REPO), timeout=120, check=False,
        )  # fmt: skip

    key_file = ws.root / "fraud.key"
    r = cli("keys", "export-audience", "--config", str(ws.config_path), "--audience", "fraud", "--out", str(key_file))
    assert r.returncode == 0, r.stderr
    common = ("reidentify", "--config", str(ws.config_path), "--key-file", str(key_file), "--domain", "EMAIL",
              "--field", "email", "--reason", "DSR-2041 check")  # fmt: skip
    i1, v1 = next(iter(stays.items()))
    r = cli(*common, v1)
    assert r.returncode == 0 and r.stdout.strip() == orders.email[i1].strip().lower(), r.stderr
    r = cli(*common, mine[0])
    assert r.returncode == 1 and "subject was forgotten" in r.stderr and FORGOTTEN not in r.stdout + r.stderr

    # The subject has no live key (no new one was made), a marker and shred records; the
    # others keep theirs.  No record names the subject in clear.
    log = key_log(ws, key_topic)
    assert all(FORGOTTEN.encode() not in k + (v or b"") for k, v in log)
    token = directory.forgotten
    assert len(token) == 1 and not any(r.token in token for r in directory.keys.values())
    assert any(r.token in token for r in directory.shredded.values())
    assert len(directory.keys) >= len(STAYS) + len(newcomers)

    # Counted and audited: withheld as forgotten, the forget itself.
    audit = [json.loads(x) for x in (ws.root / "audit" / "processor.jsonl").read_text().splitlines()]
    withheld = [e for e in audit if e["type"] == "consent_withheld"]
    assert sum(e["attrs"]["count"] for e in withheld) == len(later)
    assert {(e["attrs"]["audience"], e["attrs"]["reason"]) for e in withheld} == {("fraud", "forgotten")}
    tools = [json.loads(x) for x in (ws.root / "audit" / "processor-tools.jsonl").read_text().splitlines()]
    forgot = [e for e in tools if e["type"] == "subject_forgotten"]
    assert len(forgot) == 1 and forgot[0]["attrs"]["count"] == 1 and forgot[0]["attrs"]["outcome"] == "success"
    assert FORGOTTEN not in json.dumps(forgot)

    # A worker killed and restarted restores the table: a kept subject's e-mail gets the
    # same ciphertext as before (its key, not a new one), the forgotten subject stays out.
    w.kill()
    w2 = WorkerProcess(ws, name="restarted")
    workers.append(w2)
    w2.wait_assigned(60)
    i0, v0 = next((i, v) for i, v in stays.items() if orders.sent[i] == STAYS[0])
    again = orders.send((STAYS[0],), rounds=1, email=orders.email[i0]) | orders.send((FORGOTTEN,), rounds=1)
    got = outputs(ws, phase1 | phase2 | again)
    (same,) = [i for i in again if orders.sent[i] == STAYS[0]]
    (gone,) = [i for i in again if orders.sent[i] == FORGOTTEN]
    assert got["fraud"][same]["email"] == v0
    assert gone in got["analytics"] and gone not in got["fraud"]


def _ts(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0
