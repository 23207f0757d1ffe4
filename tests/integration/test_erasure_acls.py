"""The subject-key topic under least privilege: SASL_SSL Kafka with only the derived ACLs.

``streamproc acls apply`` grants the processor ``READ`` and ``WRITE`` on the subject-key
topic and ``READ`` on its table readers' groups, and nobody else anything on it.  Proven
here with real principals: the worker -- authenticated as the processor -- restores the
table, creates keys in its transactions and delivers erasable values; ``streamproc forget``
run with the processor's credentials shreds the subject's key; an audience principal can
neither read nor write the key topic, and the shop producer cannot write it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import AUDIENCES, WorkerProcess, make_workspace, wait_for
from tests.integration.test_consent_acls import read_all
from tests.integration.test_kafka_security import cli, read_error, start_sasl_broker, write_error

devkafka = pytest.importorskip("streamproc.devkafka")
from confluent_kafka import KafkaError, Producer  # noqa: E402

pytestmark = pytest.mark.integration

USERS = ("proc", "shop", *AUDIENCES)
SUBJECT_KEK = "fraud-subject-kek"


def test_worker_and_forget_use_the_key_topic_with_only_the_derived_acls(tmp_path: Path) -> None:
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.kms.local import LocalKeyring

    broker, pw = start_sasl_broker(tmp_path / "broker", USERS)
    w = None
    try:
        suffix = uuid.uuid4().hex[:8]
        key_topic = f"subject-keys-{suffix}"
        ws = make_workspace(
            tmp_path / "ws", broker.bootstrap, suffix, sources=("orders",), partitions=2,
            extra={
                "kafka": {**broker.client_config("proc", pw["proc"]), "sasl.password": "${PROC_PASSWORD}"},
                "erasure": {"topic": key_topic, "keks": {"fraud": SUBJECT_KEK}},
                "audit": {"file": "./audit/processor.jsonl"},
                "acls": {
                    "processor": "User:proc",
                    "audiences": {a: {"principal": f"User:{a}", "group_prefix": f"{a}."} for a in AUDIENCES},
                    "producers": [{"principal": "User:shop", "topics": [f"orders-{suffix}"]}],
                },
            },
        )  # fmt: skip
        LocalKeyring(ws.keyring_path).create_key(SUBJECT_KEK)
        policy = yaml.safe_load(ws.policy.read_text())
        policy["audiences"]["fraud"]["subject"] = "customer_id"
        policy["audiences"]["fraud"]["tags"]["EMAIL"] = {"op": "encrypt_deterministic", "erasable": True}
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

        subjects = ["cust-forget", "cust-stays"] * 3
        recs = []
        for i, s in enumerate(subjects):
            r0 = EventGenerator(i + 1).order()
            r0.update(customer_id=s, order_id=f"o-{i}")
            recs.append(r0)
        p = Producer({**broker.client_config("shop", pw["shop"]), "enable.idempotence": True})
        for r0, v in zip(recs, ws.sealer("orders").seal_many(recs), strict=True):
            p.produce(ws.topic("orders"), v, r0["customer_id"].encode())
        assert p.flush(30) == 0

        w = WorkerProcess(ws, name="erasure-acl")
        admin = dict(broker.client_config())
        fraud = ws.dest("orders", "fraud")
        wait_for(lambda: len(read_all(admin, [fraud], 2)[fraud]) >= len(recs), 90, what="outputs")
        keys_before = [m for m in read_all(admin, [key_topic], 2)[key_topic] if m.value() is not None]
        assert len(keys_before) == 2  # one key per subject, written by the processor

        r = cli("forget", "cust-forget", "--config", str(ws.config_path), "--reason", "DSR-1 erasure")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 key(s) shredded (audiences: fraud)" in r.stdout
        wait_for(
            lambda: sum(b"shredded" in (m.value() or b"") for m in read_all(admin, [key_topic], 2)[key_topic]) == 1,
            30, what="the shred record",
        )  # fmt: skip

        # Nobody but the processor touches the key topic.
        for user in ("fraud", "analytics"):
            err = write_error(broker.client_config(user, pw[user]), key_topic)
            assert err is not None and err.name() == "TOPIC_AUTHORIZATION_FAILED"
            err = read_error(broker.client_config(user, pw[user]), key_topic, f"{user}.keys-{suffix}")
            assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
        err = write_error(broker.client_config("shop", pw["shop"]), key_topic)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

        w.terminate()
        assert w.wait(60) == 0, w.log()[-3000:]
        assert "subject-key table restored" in w.log()
        got = read_all(admin, [fraud, ws.dlq("orders")], 2)
        assert len(got[fraud]) == len(recs) and got[ws.dlq("orders")] == []
    finally:
        os.environ.pop("PROC_PASSWORD", None)
        if w is not None:
            w.stop()
        broker.cleanup()
