"""Least privilege and encryption in transit, proven on real Apache Kafka (SASL_SSL).

One broker for the module: a SASL_SSL listener (SCRAM-SHA-512) with TLS from a CA made
at test time, hostname verification on, the StandardAuthorizer with
``allow.everyone.if.no.acl.found=false`` (:class:`streamproc.devkafka.KafkaBroker`).
SCRAM users are created through the Admin API; the *only* ACLs are the ones
``streamproc acls apply`` derives from the config (run through the real CLI, with the
admin's credentials in an ``--admin-config`` properties file).

Then, each with a real client and principal:

* the allowed paths work: a producer writes its source, the worker (as the processor
  principal) processes end to end, each audience reads its own topic in its own group;
* every denial fails with the broker's own error code: a subscriber reading another
  audience's topic, a source or the DLQ, or using a group outside its prefix; a
  producer reading a sanitized topic or writing one; the processor writing a topic not
  in its config; a PLAINTEXT client; a client trusting another CA; a wrong password;
* the worker stops with exit 78 and a message naming principal, operation and
  resource (never the password) for a wrong password or a missing ACL at start-up, and
  an ACL removed while it runs stops it without losing or duplicating a record.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    AUDIENCES,
    CLIENT_DEFAULTS,
    REPO,
    WorkerProcess,
    Workspace,
    make_workspace,
    wait_for,
)

pytestmark = pytest.mark.integration

devkafka = pytest.importorskip("streamproc.devkafka")
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

PARTITIONS = 2
USERS = ("proc", "analytics", "fraud", "support", "shop")


@dataclass
class Secure:
    broker: Any
    ws: Workspace
    passwords: dict[str, str]
    admin_props: Path
    apply_outputs: list[str]

    def conf(self, user: str, password: str | None = None) -> dict[str, Any]:
        return dict(self.broker.client_config(user, password or self.passwords[user]))

    @property
    def admin(self) -> dict[str, Any]:
        return dict(self.broker.client_config())

    @property
    def source(self) -> str:
        return self.ws.topic("orders")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def write_config(ws: Workspace, **changes: Any) -> Path:
    """A copy of the workspace config with top-level ``changes`` (same directory)."""
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg.update(changes)
    path = ws.root / f"streamproc-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def require_kafka() -> None:
    """Real Kafka or nothing: fail when the session was asked to run on it, else skip."""
    ok, why = devkafka.kafka_available()
    if ok:
        return
    if os.environ.get("STREAMPROC_TEST_BROKER", "").strip().lower() == "kafka":
        pytest.fail(f"STREAMPROC_TEST_BROKER=kafka: {why}")
    pytest.skip(why)


def start_sasl_broker(path: Path, users: Iterable[str]) -> tuple[devkafka.KafkaBroker, dict[str, str]]:
    """A SASL_SSL broker of the test's own with one SCRAM user per name (random passwords).

    Skips (or fails, on a Kafka run) without the jars; on a failed start prints the
    broker's log and cleans up.  The caller calls ``broker.cleanup()`` when done.
    """
    require_kafka()
    broker = devkafka.KafkaBroker(path, security="sasl_ssl")
    try:
        broker.start()
        passwords = {u: secrets.token_urlsafe(12) for u in users}
        for u, pw in passwords.items():
            broker.create_scram_user(u, pw)
    except BaseException:
        print(broker.log_tail())
        broker.cleanup()
        raise
    return broker, passwords


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("kafka-security")
    broker, passwords = start_sasl_broker(root / "broker", USERS)
    try:
        suffix = uuid.uuid4().hex[:8]
        kafka = {
            **broker.client_config("proc", passwords["proc"]),
            # the password comes from the environment, as a deployment would do it
            "sasl.password": "${PROC_PASSWORD}",
        }
        acls = {
            "processor": "User:proc",
            "audiences": {
                a: {"principal": f"User:{a}", "group_prefix": f"{a}."} for a in AUDIENCES
            },
            "producers": [{"principal": "User:shop", "topics": [f"orders-{suffix}"]}],
        }
        ws = make_workspace(
            root / "ws",
            broker.bootstrap,
            suffix,
            sources=("orders",),
            partitions=PARTITIONS,
            extra={
                "kafka": kafka,
                "acls": acls,
                # governed topics: the worker's retention monitor describes their configs
                "topics": {
                    "defaults": {
                        "partitions": PARTITIONS,
                        "replication_factor": 1,
                        "config": {"retention.ms": "604800000"},
                    },
                    "retention_check_interval_seconds": 1,
                },
            },
        )
        admin_props = root / "admin.properties"
        admin_props.write_text(
            "".join(f"{k}={v}\n" for k, v in broker.client_config().items() if k != "sasl.password")
            + "sasl.password=${ADMIN_PASSWORD}\n"
        )
        os.environ["PROC_PASSWORD"] = passwords["proc"]
        env = {"ADMIN_PASSWORD": broker.admin_password}
        topics = cli(
            "topics",
            "apply",
            "--config",
            str(ws.config_path),
            "--admin-config",
            str(admin_props),
            env=env,
        )
        assert topics.returncode == 0, (
            topics.stderr + admin_props.read_text() + broker.log_tail(4000)
        )
        outputs = []
        for _ in range(2):
            r = cli(
                "acls",
                "apply",
                "--config",
                str(ws.config_path),
                "--admin-config",
                str(admin_props),
                env=env,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            outputs.append(r.stdout)
        yield Secure(broker, ws, passwords, admin_props, outputs)
    finally:
        os.environ.pop("PROC_PASSWORD", None)
        broker.cleanup()


# -- helpers ----------------------------------------------------------------------------------------
def produce_orders(s: Secure, n: int, *, seed: int = 7) -> None:
    """``n`` sealed orders, written as the producer principal (the only one allowed to)."""
    from streamproc.client.generator import EventGenerator

    recs = list(EventGenerator(seed).events("order", n, False))
    values = s.ws.sealer("orders").seal_many(recs)
    errors: list[str] = []
    p = Producer({**s.conf("shop"), "enable.idempotence": True, "linger.ms": 5})
    for r, v in zip(recs, values, strict=True):
        p.produce(
            s.source,
            v,
            r["customer_id"].encode(),
            on_delivery=lambda e, _m: errors.append(e.name()) if e else None,
        )
    assert p.flush(30) == 0
    assert not errors, errors


def count_committed(s: Secure, topics: list[str]) -> dict[str, int]:
    """read_committed record counts per topic, read by the admin without a group."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c = Consumer(
        {
            **s.admin,
            "group.id": f"count-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    out = dict.fromkeys(topics, 0)
    try:
        c.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(PARTITIONS)]
        )
        idle_since = time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() - idle_since < 1.5 and time.monotonic() < deadline:
            msgs = c.consume(500, 0.2)
            for m in msgs:
                if m.error() is None:
                    out[m.topic()] += 1
                    idle_since = time.monotonic()
    finally:
        c.close()
    return out


def read_error(
    conf: dict[str, Any], topic: str, group: str, timeout: float = 20.0
) -> KafkaError | None:
    """Subscribe as ``conf`` and return the first error the broker sends (or None)."""
    c = Consumer({**conf, "group.id": group, "auto.offset.reset": "earliest", **CLIENT_DEFAULTS})
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is not None:
                return m.error()
            if m is not None:
                return None  # a record: the read was allowed
        return None
    finally:
        c.close()


def write_error(conf: dict[str, Any], topic: str) -> KafkaError | None:
    """Produce one record as ``conf``; the delivery error (or None if it was written)."""
    got: list[KafkaError | None] = []
    p = Producer({**conf, "message.timeout.ms": 15000})
    p.produce(topic, b"x", on_delivery=lambda e, _m: got.append(e))
    p.flush(20)
    assert got, "no delivery report"
    return got[0]


def connect_errors(conf: dict[str, Any], seconds: float = 6.0) -> list[KafkaError]:
    """Errors a client reports while trying to reach the broker (error_cb)."""
    errs: list[KafkaError] = []
    a = AdminClient({**conf, "error_cb": errs.append})
    with pytest.raises(KafkaException):
        a.list_topics(timeout=seconds)
    a.poll(0.5)
    return errs


# -- acls apply -------------------------------------------------------------------------------------
def test_acls_apply_creates_the_derived_set_once(secure: Secure) -> None:
    first, second = secure.apply_outputs
    # processor: READ source + group, WRITE 3 destinations + DLQ, WRITE txn prefix (6),
    # DESCRIBE_CONFIGS on its 5 topics (size limit at start-up; the retention monitor);
    # audiences: READ own topic + own group prefix (3 x 2); producer: WRITE source (1)
    assert first.strip().endswith(
        "19 added, 0 unchanged, 0 broader than needed (review; --prune deletes them)."
    )
    assert second.strip().endswith(
        "0 added, 19 unchanged, 0 broader than needed (review; --prune deletes them)."
    )
    assert (
        f"+ User:proc ALLOW WRITE on TRANSACTIONAL_ID '{secure.ws.group_id}-' (prefixed)" in first
    )


def test_plan_shows_broader_acls_and_prune_removes_them(secure: Secure) -> None:
    from confluent_kafka.admin import (
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    admin = AdminClient(secure.admin)
    broad = [
        AclBinding(
            ResourceType.TOPIC,
            "*",
            ResourcePatternType.LITERAL,
            "User:analytics",
            "*",
            AclOperation.READ,
            AclPermissionType.ALLOW,
        ),
        AclBinding(
            ResourceType.TOPIC,
            secure.ws.dlq("orders"),
            ResourcePatternType.LITERAL,
            "User:eve",
            "*",
            AclOperation.ALL,
            AclPermissionType.ALLOW,
        ),
    ]
    try:
        for f in admin.create_acls(broad).values():
            f.result(30)
        env = {"ADMIN_PASSWORD": secure.broker.admin_password}
        args = ["--config", str(secure.ws.config_path), "--admin-config", str(secure.admin_props)]
        plan = cli("acls", "plan", *args, env=env)
        assert plan.returncode == 0, plan.stderr
        assert "! User:analytics ALLOW READ on TOPIC '*'" in plan.stdout
        assert "wildcard resource '*'" in plan.stdout
        assert f"! User:eve ALLOW ALL on TOPIC '{secure.ws.dlq('orders')}'" in plan.stdout
        assert "principal not named in acls:; operation ALL" in plan.stdout
        assert plan.stdout.strip().endswith(
            "0 to add, 19 unchanged, 2 broader than needed (review; --prune deletes them)."
        )
        pruned = cli("acls", "apply", "--prune", *args, env=env)
        assert pruned.returncode == 0, pruned.stderr
        assert pruned.stdout.strip().endswith("0 added, 19 unchanged, 2 deleted.")
        again = cli("acls", "plan", *args, env=env)
        assert again.stdout.strip().endswith(
            "0 to add, 19 unchanged, 0 broader than needed (review; --prune deletes them)."
        )
    finally:
        for b in broad:
            flt = AclBindingFilter(
                b.restype,
                b.name,
                b.resource_pattern_type,
                b.principal,
                b.host,
                b.operation,
                b.permission_type,
            )
            for f in admin.delete_acls([flt]).values():
                f.result(30)


# -- the allowed path, end to end ----------------------------------------------------------------
def test_worker_end_to_end_with_only_the_derived_acls(secure: Secure) -> None:
    from streamproc.client import RecordOpener

    n = 30
    produce_orders(secure, n, seed=1)
    w = WorkerProcess(secure.ws, name="e2e")
    try:
        dests = [secure.ws.dest("orders", a) for a in AUDIENCES]
        wait_for(lambda: min(count_committed(secure, dests).values()) >= n, 90, what="outputs")
        w.terminate()
        assert w.wait(60) == 0, w.log()[-3000:]
        log = w.log()
    finally:
        w.stop()
    # the retention monitor and the start-up size limit could read every topic's config
    # (DESCRIBE_CONFIGS)
    assert "retention check" not in log, log[-3000:]
    assert "DescribeConfigs" not in log, log[-3000:]
    counts = count_committed(secure, [*dests, secure.ws.dlq("orders")])
    assert counts == {**dict.fromkeys(dests, n), secure.ws.dlq("orders"): 0}
    # each audience reads its own topic, as itself, in a group of its own prefix
    opener = RecordOpener(secure.ws.kms(), secure.ws.schema_source())
    for a in AUDIENCES:
        c = Consumer(
            {
                **secure.conf(a),
                "group.id": f"{a}.reader-{uuid.uuid4().hex[:6]}",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                **CLIENT_DEFAULTS,
            }
        )
        got = 0
        try:
            c.subscribe([secure.ws.dest("orders", a)])
            deadline = time.monotonic() + 60
            while got < n and time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                assert m.error() is None, m.error()
                _schema, record = opener.open(m.topic(), m.value())
                assert isinstance(record, dict) and record
                got += 1
        finally:
            c.close()
        assert got == n, a


# -- every denial, with the broker's error ------------------------------------------------------------
@pytest.mark.parametrize(
    "user, topic_of, group_prefix, code",
    [
        (
            "analytics",
            lambda ws: ws.dest("orders", "fraud"),
            "analytics.",
            "TOPIC_AUTHORIZATION_FAILED",
        ),
        ("analytics", lambda ws: ws.topic("orders"), "analytics.", "TOPIC_AUTHORIZATION_FAILED"),
        ("analytics", lambda ws: ws.dlq("orders"), "analytics.", "TOPIC_AUTHORIZATION_FAILED"),
        (
            "analytics",
            lambda ws: ws.dest("orders", "analytics"),
            "fraud.",
            "GROUP_AUTHORIZATION_FAILED",
        ),
        ("shop", lambda ws: ws.dest("orders", "analytics"), "shop.", "GROUP_AUTHORIZATION_FAILED"),
        (
            "shop",
            lambda ws: ws.dest("orders", "support"),
            "analytics.",
            "GROUP_AUTHORIZATION_FAILED",
        ),
        ("fraud", lambda ws: ws.dest("orders", "support"), "fraud.", "TOPIC_AUTHORIZATION_FAILED"),
    ],
    ids=[
        "other-audience",
        "source",
        "dlq",
        "foreign-group",
        "producer-own-group",
        "producer-audience-group",
        "fraud-reads-support",
    ],
)
def test_denied_reads(
    secure: Secure, user: str, topic_of: Any, group_prefix: str, code: str
) -> None:
    err = read_error(
        secure.conf(user), topic_of(secure.ws), f"{group_prefix}{uuid.uuid4().hex[:6]}"
    )
    assert err is not None and err.code() == getattr(KafkaError, code), err


def test_producer_cannot_even_see_a_sanitized_topic(secure: Secure) -> None:
    """Without a group (refused above), a reader needs the topic: the broker hides it.

    ``READ`` implies ``DESCRIBE`` in Kafka; the producer has neither on a sanitized
    topic, so the metadata answer itself is the authorization error -- while its own
    source (``WRITE`` implies ``DESCRIBE``) is visible.
    """
    admin = AdminClient(secure.conf("shop"))
    for a in AUDIENCES:
        t = secure.ws.dest("orders", a)
        md = admin.list_topics(t, timeout=20).topics[t]
        assert md.error is not None and md.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    own = admin.list_topics(secure.source, timeout=20).topics[secure.source]
    assert own.error is None and len(own.partitions) == PARTITIONS


@pytest.mark.parametrize(
    "user, topic_of",
    [
        ("shop", lambda ws: ws.dest("orders", "analytics")),  # nobody but the processor
        ("analytics", lambda ws: ws.dest("orders", "analytics")),
        ("analytics", lambda ws: ws.topic("orders")),
        ("proc", lambda ws: ws.topic("orders")),  # the processor never writes its sources
        ("proc", lambda ws: f"not-in-config-{ws.suffix}"),  # nor anything outside its config
    ],
    ids=[
        "producer-sanitized",
        "audience-own-topic",
        "audience-source",
        "processor-source",
        "processor-foreign",
    ],
)
def test_denied_writes(secure: Secure, user: str, topic_of: Any) -> None:
    err = write_error(secure.conf(user), topic_of(secure.ws))
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_plaintext_client_gets_nothing(secure: Secure) -> None:
    """No TLS, no SASL: the broker drops the connection before answering anything."""
    errs = connect_errors({"bootstrap.servers": secure.broker.bootstrap})
    codes = {e.code() for e in errs}
    assert codes & {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}, errs
    assert KafkaError._AUTHENTICATION not in codes  # it never got that far
    assert write_error({"bootstrap.servers": secure.broker.bootstrap}, secure.source) is not None


def test_client_trusting_another_ca_is_refused(secure: Secure, tmp_path: Path) -> None:
    from streamproc.devtls import DevCA

    other = DevCA("some other CA").write_ca(tmp_path / "other-ca.pem")
    errs = connect_errors({**secure.conf("analytics"), "ssl.ca.location": str(other)})
    ssl = [e for e in errs if e.code() == KafkaError._SSL]
    assert ssl and "certificate verify failed" in ssl[0].str(), errs


def test_wrong_password_is_refused(secure: Secure) -> None:
    errs = connect_errors(secure.conf("analytics", "not-the-password"))
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errs), errs


# -- the worker's reaction ----------------------------------------------------------------------------------
def run_to_exit(
    ws: Workspace, config: Path, name: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    log = ws.root / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "streamproc.cli.run", "--config", str(config)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            timeout=120,
        )
    return proc.returncode, log.read_text(errors="replace")


def test_worker_wrong_password_exits_78_naming_the_principal(secure: Secure) -> None:
    wrong = "wrong-" + secrets.token_hex(6)
    rc, log = run_to_exit(secure.ws, secure.ws.config_path, "wrongpw", {"PROC_PASSWORD": wrong})
    assert rc == 78, log[-3000:]
    assert "authentication of User:proc failed (SCRAM-SHA-512, _AUTHENTICATION)" in log, log[-3000:]
    assert wrong not in log and secure.passwords["proc"] not in log


def test_worker_missing_transactional_acl_exits_78(secure: Secure) -> None:
    """Another group id: no ACL covers its transactional ids (nor its group)."""
    group = f"unlisted-{uuid.uuid4().hex[:6]}"
    config = write_config(secure.ws, group_id=group)
    rc, log = run_to_exit(secure.ws, config, "txn-acl")
    assert rc == 78, log[-3000:]
    assert f"User:proc is not authorized to WRITE TRANSACTIONAL_ID '{group}-" in log, log[-3000:]
    assert "(TRANSACTIONAL_ID_AUTHORIZATION_FAILED)" in log
    assert secure.passwords["proc"] not in log


def test_worker_missing_group_acl_exits_78(secure: Secure) -> None:
    group = f"unlisted-{uuid.uuid4().hex[:6]}"
    config = write_config(secure.ws, group_id=group, processing_guarantee="at_least_once")
    rc, log = run_to_exit(secure.ws, config, "group-acl")
    assert rc == 78, log[-3000:]
    assert (
        f"User:proc is not authorized to READ GROUP '{group}' (GROUP_AUTHORIZATION_FAILED)" in log
    ), log[-3000:]


def test_acl_removed_while_running_stops_without_loss_or_duplicates(secure: Secure) -> None:
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    dests = [secure.ws.dest("orders", a) for a in AUDIENCES]
    dlq = secure.ws.dlq("orders")
    before = count_committed(secure, [*dests, dlq])
    base = before[dests[0]]
    assert all(before[d] == base for d in dests) and before[dlq] == 0
    n1, n2 = 20, 20
    produce_orders(secure, n1, seed=21)
    w = WorkerProcess(secure.ws, name="revoke")
    try:
        wait_for(
            lambda: min(count_committed(secure, dests).values()) >= base + n1, 90, what="first part"
        )
        fraud = secure.ws.dest("orders", "fraud")
        flt = AclBindingFilter(
            ResourceType.TOPIC,
            fraud,
            ResourcePatternType.LITERAL,
            "User:proc",
            "*",
            AclOperation.WRITE,
            AclPermissionType.ALLOW,
        )
        admin = AdminClient(secure.admin)
        for f in admin.delete_acls([flt]).values():
            assert len(f.result(30)) == 1
        produce_orders(secure, n2, seed=22)
        rc = w.wait(90)
        log = w.log()
    finally:
        w.stop()
    assert rc == 78, log[-3000:]
    assert (
        f"User:proc is not authorized to WRITE TOPIC '{fraud}' (TOPIC_AUTHORIZATION_FAILED)" in log
    ), log
    mid = count_committed(secure, [*dests, dlq])
    assert mid == {**dict.fromkeys(dests, base + n1), dlq: 0}  # the refused batch: all or nothing
    # the operator restores the ACL; a new worker finishes the job exactly once
    env = {"ADMIN_PASSWORD": secure.broker.admin_password}
    r = cli(
        "acls",
        "apply",
        "--config",
        str(secure.ws.config_path),
        "--admin-config",
        str(secure.admin_props),
        env=env,
    )
    assert r.returncode == 0 and "1 added" in r.stdout, r.stdout + r.stderr
    w2 = WorkerProcess(secure.ws, name="revoke-2")
    try:
        wait_for(
            lambda: min(count_committed(secure, dests).values()) >= base + n1 + n2, 90, what="rest"
        )
        w2.terminate()
        assert w2.wait(60) == 0, w2.log()[-3000:]
    finally:
        w2.stop()
    assert count_committed(secure, [*dests, dlq]) == {
        **dict.fromkeys(dests, base + n1 + n2),
        dlq: 0,
    }


# -- deployment consistency ---------------------------------------------------------------------------
def test_compose_tls_material_serves_real_kafka(tmp_path: Path) -> None:
    """The CA and broker key that docker-compose's kafka-tls service makes work on Kafka.

    The broker loads ``deploy/compose/kafka_tls.py``'s PEM keystore; a client pinning its
    ``ca.pem`` (and nothing else) connects with hostname verification on and the client
    settings of ``deploy/compose/streamproc.yaml``.
    """
    require_kafka()
    tls = tmp_path / "tls"
    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "compose" / "kafka_tls.py"), str(tls)], check=True
    )
    settings = {
        "ssl.keystore.location": str(tls / "kafka-keystore.pem"),
        "ssl.truststore.location": str(tls / "ca.pem"),
    }
    broker = devkafka.KafkaBroker(tmp_path / "broker", security="sasl_ssl", settings=settings)
    test_ca = broker.ca_file
    broker.ca_file = tls / "ca.pem"  # what its own clients (and readiness probe) pin now
    with broker as k:
        compose_kafka = yaml.safe_load((REPO / "deploy/compose/streamproc.yaml").read_text())[
            "kafka"
        ]
        proven = ("security.protocol", "sasl.mechanisms", "ssl.endpoint.identification.algorithm")
        conf = {**k.client_config(), **{key: compose_kafka[key] for key in proven}}
        assert conf["ssl.ca.location"] == str(tls / "ca.pem")
        md = AdminClient(conf).list_topics(timeout=20)
        assert md.brokers, "no metadata over the compose TLS material"
        # the suite's own test CA is not accepted for this broker
        errs = connect_errors({**conf, "ssl.ca.location": str(test_ca)})
        assert any(e.code() == KafkaError._SSL for e in errs), errs
