"""The consent table under least privilege: SASL_SSL Kafka with only the derived ACLs.

``streamproc acls apply`` grants the processor ``READ`` on the consent topic and on its
table readers' groups, and the consent application's principal ``WRITE`` on it.  Proven
here with real principals: the application records a grant as itself, the shop producer
is refused on the consent topic, and the worker -- authenticated as the processor --
restores the table and delivers the granting subject to the consent-basis audience while
withholding the one that never granted.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import AUDIENCES, WorkerProcess, make_workspace, wait_for
from tests.integration.test_kafka_security import cli, start_sasl_broker, write_error

devkafka = pytest.importorskip("streamproc.devkafka")
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402

pytestmark = pytest.mark.integration

USERS = ("proc", "shop", "prefs", *AUDIENCES)
PURPOSES = {"marketing": {"basis": "consent"}, "fraud_prevention": {"basis": "legitimate_interest"}, "service": {"basis": "contract"}}
AUDIENCE_PURPOSE = {"analytics": "marketing", "fraud": "fraud_prevention", "support": "service"}


def read_all(conf: dict[str, Any], topics: list[str], partitions: int) -> dict[str, list[Any]]:
    c = Consumer({**conf, "group.id": f"count-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False, "isolation.level": "read_committed"})
    out: dict[str, list[Any]] = {t: [] for t in topics}
    try:
        c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(partitions)])
        idle = time.monotonic()
        deadline = idle + 30
        while time.monotonic() - idle < 1.5 and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    out[m.topic()].append(m)
                    idle = time.monotonic()
    finally:
        c.close()
    return out


def test_worker_reads_the_consent_table_with_only_the_derived_acls(tmp_path: Path) -> None:
    from streamproc.client.consent import ConsentWriter
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys

    broker, pw = start_sasl_broker(tmp_path / "broker", USERS)
    w = None
    try:
        suffix = uuid.uuid4().hex[:8]
        consent_topic = f"consent-{suffix}"
        ws = make_workspace(
            tmp_path / "ws", broker.bootstrap, suffix, sources=("orders",), partitions=2,
            extra={
                "kafka": {**broker.client_config("proc", pw["proc"]), "sasl.password": "${PROC_PASSWORD}"},
                "consent": {"topic": consent_topic},
                "acls": {
                    "processor": "User:proc",
                    "audiences": {a: {"principal": f"User:{a}", "group_prefix": f"{a}."} for a in AUDIENCES},
                    "producers": [
                        {"principal": "User:shop", "topics": [f"orders-{suffix}"]},
                        {"principal": "User:prefs", "topics": [consent_topic]},
                    ],
                },
            },
        )
        policy = yaml.safe_load(ws.policy.read_text())
        policy["purposes"] = PURPOSES
        for a, p in AUDIENCE_PURPOSE.items():
            policy["audiences"][a]["purpose"] = p
        ws.policy.write_text(yaml.safe_dump(policy, sort_keys=False))
        admin_props = tmp_path / "admin.properties"
        admin_props.write_text(
            "".join(f"{k}={v}\n" for k, v in broker.client_config().items() if k != "sasl.password")
            + "sasl.password=${ADMIN_PASSWORD}\n"
        )
        os.environ["PROC_PASSWORD"] = pw["proc"]
        env = {"ADMIN_PASSWORD": broker.admin_password}
        for cmd in ("topics", "acls"):
            r = cli(cmd, "apply", "--config", str(ws.config_path), "--admin-config", str(admin_props), env=env)
            assert r.returncode == 0, r.stdout + r.stderr

        keys = PseudonymKeys(LocalKeyring(ws.keyring_path), "pseudonym-master")
        writer = ConsentWriter(broker.client_config("prefs", pw["prefs"]), consent_topic, keys, purposes=PURPOSES)
        writer.grant("cust-granted", "marketing")
        writer.close()
        err = write_error(broker.client_config("shop", pw["shop"]), consent_topic)
        assert err is not None and err.name() == "TOPIC_AUTHORIZATION_FAILED"

        subjects = ["cust-granted", "cust-never"] * 5
        recs = []
        for i, s in enumerate(subjects):
            r0 = EventGenerator(i + 1).order()
            r0.update(customer_id=s, order_id=f"o-{i}")
            recs.append(r0)
        p = Producer({**broker.client_config("shop", pw["shop"]), "enable.idempotence": True})
        for r0, v in zip(recs, ws.sealer("orders").seal_many(recs), strict=True):
            p.produce(ws.topic("orders"), v, r0["customer_id"].encode())
        assert p.flush(30) == 0

        w = WorkerProcess(ws, name="consent-acl")
        dests = [ws.dest("orders", a) for a in AUDIENCES]
        admin = dict(broker.client_config())
        wait_for(lambda: len(read_all(admin, [ws.dest("orders", "support")], 2)[ws.dest("orders", "support")]) >= len(recs), 90, what="outputs")
        w.terminate()
        assert w.wait(60) == 0, w.log()[-3000:]
        assert "consent table restored" in w.log()
        got = read_all(admin, [*dests, ws.dlq("orders")], 2)
        opener = ws.opener()
        ids = {t: {opener.open(t, m.value())[1]["order_id"] for m in ms} for t, ms in got.items() if t in dests}
        granted = {f"o-{i}" for i, s in enumerate(subjects) if s == "cust-granted"}
        assert ids[ws.dest("orders", "analytics")] == granted
        assert ids[ws.dest("orders", "support")] == ids[ws.dest("orders", "fraud")] == {f"o-{i}" for i in range(len(recs))}
        assert got[ws.dlq("orders")] == []
    finally:
        os.environ.pop("PROC_PASSWORD", None)
        if w is not None:
            w.stop()
        broker.cleanup()
