"""Consent withdrawal mid-stream through the real worker on the broker, and a restart.

Policy: ``analytics`` serves a ``consent``-basis purpose, ``fraud`` a
``legitimate_interest`` one and ``support`` a ``contract`` one.  Two subjects granted the
consent purpose before the worker started (one with the library call, one with
``streamproc consent grant``).  While orders of both stream in, one subject withdraws.
Then:

* every record of that subject produced after the worker *applied* the withdrawal (the
  worker logs the offset it applied, with a timestamp) is missing from ``analytics``; every
  record produced before the withdrawal is there; the other subject is untouched;
* ``support`` and ``fraud`` (opt-out bases, no objection) get every record;
* nothing is dead-lettered; the audit trail has ``consent_withheld`` counts;
* the measured lag -- from the withdrawal's produce to the first batch that honours it
  (the first ``consent_withheld`` audit event) -- is printed;
* the consent topic is compacted and holds no raw subject identifier;
* a restarted worker restores the table: the withdrawn subject stays out of ``analytics``,
  the granting one stays in.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    REPO,
    WorkerProcess,
    Workspace,
    make_workspace,
    producer,
    read_topics,
)

pytestmark = pytest.mark.integration

WITHDRAWS = "cust-7f3a91-withdraws"
KEEPS = "cust-2b8c44-keeps"
PURPOSES = {
    "marketing": {"basis": "consent"},
    "fraud_prevention": {"basis": "legitimate_interest"},
    "service": {"basis": "contract"},
}
AUDIENCE_PURPOSE = {"analytics": "marketing", "fraud": "fraud_prevention", "support": "service"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", *args],
        capture_output=True, text=True, cwd=str(REPO), timeout=120, check=False,
    )


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def consent_workspace(root: Path, bootstrap: str, suffix: str) -> Workspace:
    from streamproc.audit import write_hmac_key
    from streamproc.runtime.topics import apply_topics

    root.mkdir(parents=True, exist_ok=True)
    write_hmac_key(root / "audit.key")
    ws = make_workspace(
        root, bootstrap, suffix, sources=("orders",), partitions=2,
        batch={"max_records": 20, "max_wait_ms": 50},
        extra={
            "consent": {"topic": f"consent-{suffix}", "restore_timeout_seconds": 60},
            "audit": {"file": "./audit/processor.jsonl", "hmac_key_file": "./audit.key"},
        },
    )
    policy = yaml.safe_load(ws.policy.read_text())
    policy["purposes"] = PURPOSES
    for a, p in AUDIENCE_PURPOSE.items():
        policy["audiences"][a]["purpose"] = p
    ws.policy.write_text(yaml.safe_dump(policy, sort_keys=False))
    apply_topics(ws.load_config())
    return ws


class Stream:
    """Orders of two subjects, alternating, with the wall time of each produce call."""

    def __init__(self, ws: Workspace) -> None:
        from streamproc.client.generator import EventGenerator

        self.ws = ws
        self.sealer = ws.sealer("orders")
        self.gen = EventGenerator(5)
        self.p = producer(ws.bootstrap)
        self.sent: dict[str, tuple[str, float]] = {}  # order_id -> (subject, produce time)
        self.n = 0

    def run(self, seconds: float, rate: float = 40.0) -> None:
        end = time.time() + seconds
        while time.time() < end:
            subject = WITHDRAWS if self.n % 2 == 0 else KEEPS
            rec = self.gen.order()
            rec.update(customer_id=subject, order_id=f"o-{self.n}")
            value = self.sealer.seal(rec)
            self.sent[rec["order_id"]] = (subject, time.time())
            self.p.produce(self.ws.topic("orders"), key=subject.encode(), value=value)
            self.p.poll(0)
            self.n += 1
            time.sleep(1.0 / rate)
        assert self.p.flush(30) == 0


def delivered(ws: Workspace, until_ids: set[str], timeout: float = 60) -> dict[str, set[str]]:
    """audience -> order ids delivered (read until every id of ``until_ids`` is in support)."""
    opener = ws.opener()
    topics = [ws.dest("orders", a) for a in AUDIENCE_PURPOSE] + [ws.dlq("orders")]

    def ids(recs: dict[str, list[Any]], audience: str) -> set[str]:
        t = ws.dest("orders", audience)
        return {opener.open(t, r.value)[1]["order_id"] for r in recs[t] if r.value is not None}

    got = read_topics(ws.bootstrap, topics, until=lambda r: until_ids <= ids(r, "support"), timeout=timeout)
    assert got[ws.dlq("orders")] == [], "nothing is dead-lettered for consent"
    return {a: ids(got, a) for a in AUDIENCE_PURPOSE}


def test_withdrawal_mid_stream_then_restart(tmp_path: Path, kafka_bootstrap: str, unique: str, workers: list[Any]) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    from streamproc.client.consent import ConsentWriter
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys

    ws = consent_workspace(tmp_path / "ws", kafka_bootstrap, unique)
    topic = f"consent-{unique}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    conf = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)])
    described = next(iter(conf.values())).result(30)
    assert described["cleanup.policy"].value == "compact"

    keys = PseudonymKeys(LocalKeyring(ws.keyring_path), "pseudonym-master")
    writer = ConsentWriter({"bootstrap.servers": kafka_bootstrap}, topic, keys, purposes=PURPOSES)
    writer.grant(WITHDRAWS, "marketing")
    r = cli("consent", "grant", "--config", str(ws.config_path), "--subject", KEEPS, "--purpose", "marketing")
    assert r.returncode == 0, r.stderr
    assert KEEPS not in r.stdout + r.stderr

    w = WorkerProcess(ws, name="first")
    workers.append(w)
    w.wait_assigned(60)
    stream = Stream(ws)
    stream.run(2.0)
    phase1 = delivered(ws, set(stream.sent))  # processed before the withdrawal exists
    t_withdraw = time.time()
    part, off = writer.withdraw(WITHDRAWS, "marketing")
    stream.run(3.0)
    got = delivered(ws, set(stream.sent))

    applied = [
        e for e in w.log_events()
        if e.get("message") == "consent updates applied" and (e.get("partition"), e.get("offset")) == (part, off)
    ]
    assert applied, w.log()[-3000:]
    t_applied = ts(applied[0]["ts"])
    audit_path = ws.root / "audit" / "processor.jsonl"
    audit = [json.loads(line) for line in audit_path.read_text().splitlines()]
    withheld = [e for e in audit if e.get("type") == "consent_withheld"]
    assert withheld and all(
        (e["attrs"]["audience"], e["attrs"]["purpose"], e["attrs"]["reason"]) == ("analytics", "marketing", "withdrawn")
        for e in withheld
    )
    t_honoured = ts(withheld[0]["ts"])

    before = {i for i, (s, t) in stream.sent.items() if s == WITHDRAWS and t < t_withdraw}
    assert before <= phase1["analytics"]
    after = {i for i, (s, t) in stream.sent.items() if s == WITHDRAWS and t > t_applied}
    window = {i for i, (s, t) in stream.sent.items() if s == WITHDRAWS and t_withdraw <= t <= t_applied}
    keeps = {i for i, (s, _) in stream.sent.items() if s == KEEPS}
    assert before and after
    assert before <= got["analytics"], "records processed before the withdrawal flowed"
    assert not (after & got["analytics"]), "no record produced after the worker applied it reaches analytics"
    assert keeps <= got["analytics"]
    assert got["support"] == got["fraud"] == set(stream.sent), "opt-out bases: every record"
    assert sum(e["attrs"]["count"] for e in withheld) == len({i for i, (s, _) in stream.sent.items() if s == WITHDRAWS} - got["analytics"])
    print(
        f"\nconsent withdrawal: applied {t_applied - t_withdraw:.3f}s after its produce, first honouring "
        f"batch {t_honoured - t_withdraw:.3f}s after; {len(window & got['analytics'])} of {len(window)} "
        "records produced in between still reached analytics"
    )

    r = cli("consent", "show", "--config", str(ws.config_path), "--subject", WITHDRAWS)
    assert r.returncode == 0, r.stderr
    assert "marketing [consent]: withdrawn" in r.stdout and "withheld (withdrawn)" in r.stdout
    assert "service [contract]: no record; audiences support: flows" in r.stdout
    assert WITHDRAWS not in r.stdout

    raw = read_topics(kafka_bootstrap, [topic], timeout=20)[topic]
    assert len(raw) == 3
    for rec in raw:
        for needle in (WITHDRAWS, KEEPS, "7f3a91", "2b8c44"):
            assert needle.encode() not in (rec.key or b"") + (rec.value or b"")

    # Restart: the table is restored from the topic before anything is processed.
    w.terminate()
    assert w.wait(60) == 0, w.log()[-3000:]
    w2 = WorkerProcess(ws, name="second")
    workers.append(w2)
    w2.wait_assigned(60)
    restored = [e for e in w2.log_events() if e.get("message") == "consent table restored"]
    assert restored and restored[0]["records"] == 3
    first = set(stream.sent)
    stream.run(1.0)
    got2 = delivered(ws, set(stream.sent))
    new = set(stream.sent) - first
    new_withdrawn = {i for i in new if stream.sent[i][0] == WITHDRAWS}
    new_keeps = new - new_withdrawn
    assert new_withdrawn and new_keeps
    assert not (new_withdrawn & got2["analytics"]) and new_keeps <= got2["analytics"]
    assert new <= got2["support"]
    w2.terminate()
    assert w2.wait(60) == 0, w2.log()[-3000:]
    writer.close()
