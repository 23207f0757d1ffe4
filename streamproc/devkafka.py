"""Real Apache Kafka on 127.0.0.1 for the integration suite and the benchmarks.

Tansu (:mod:`streamproc.devbroker`) cannot prove the guarantees that matter most: it shows
aborted transactions to read_committed readers and has no TLS, SASL or ACLs.  This module
runs Apache Kafka's own broker from the jars that ``scripts/kafka/fetch.sh`` copies from
Maven Central (pinned in ``scripts/kafka/pom.xml``) into ``.cache/kafka/lib`` (or
``$STREAMPROC_KAFKA_LIBS``): one JVM, KRaft combined broker + controller, freshly formatted
storage, free loopback ports, a small heap.

PLAINTEXT (the default)::

    from streamproc.devkafka import KafkaBroker

    with KafkaBroker() as kafka:
        conf = kafka.client_config()          # {"bootstrap.servers": "127.0.0.1:NNNNN"}
        ...
        kafka.kill()                          # kill -9 the JVM mid-stream ...
        kafka.start()                         # ... and restart it on the same log directory

SASL_SSL with SCRAM-SHA-512, TLS from a CA generated now, hostname verification on, the
StandardAuthorizer with ``allow.everyone.if.no.acl.found=false``::

    with KafkaBroker(security="sasl_ssl") as kafka:
        admin_conf = kafka.client_config()                     # the bootstrapped super user
        kafka.create_scram_user("alice", "s3cret-pw")          # through the Admin API
        alice_conf = kafka.client_config("alice", "s3cret-pw") # SASL_SSL + SCRAM + pinned CA
        kafka.ca_file                                          # the CA clients pin
        kafka.ca                                               # DevCA: issue more certs

Every listener needs credentials in that mode: clients and inter-broker traffic use the
SASL_SSL listener (SCRAM-SHA-512; the super user ``admin`` is added at format time with
``--add-scram``, since SCRAM users otherwise live in the metadata the broker has yet to
read), and the controller listener is SASL_SSL with PLAIN and one static principal (KRaft
controllers cannot authenticate with SCRAM).  Passwords are random per broker and exist only
in memory and in the broker's private work directory.

The broker's log (log4j, INFO) goes to :attr:`KafkaBroker.log_path`; :meth:`log_tail` is
what a failing test prints.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from streamproc.devbroker import free_port

REPO = Path(__file__).resolve().parents[1]
#: Where ``scripts/kafka/fetch.sh`` puts the jars unless ``STREAMPROC_KAFKA_LIBS`` says otherwise.
DEFAULT_LIBS = REPO / ".cache" / "kafka" / "lib"
FETCH_HINT = "run `bash scripts/kafka/fetch.sh` (Maven Central) or set STREAMPROC_KAFKA_LIBS"
#: The SCRAM mechanism of the SASL_SSL listener.
SCRAM_MECHANISM = "SCRAM-SHA-512"
ADMIN_USER = "admin"
_CONTROLLER_USER = "controller"

#: Settings that make a one-node broker behave (replication factor 1 everywhere) and fast in
#: tests (no initial rebalance delay, few partitions for the internal topics, few threads on
#: a shared 2-core machine, timed-out transactions aborted within seconds).
FAST_SETTINGS: dict[str, str] = {
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "5",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "5",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": "5000",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "num.network.threads": "2",
    "num.io.threads": "2",
    "background.threads": "2",
    "num.recovery.threads.per.data.dir": "1",
    "log.cleaner.threads": "1",
    # The cleaner looks for dirty compacted logs every 15 s by default; tests that wait for
    # compaction (the subject-key topic after `streamproc forget`) need it within a second.
    "log.cleaner.backoff.ms": "500",
    # After a kill -9 the restarted broker can register only once the controller has
    # expired the dead incarnation's session (default 9 s).
    "broker.session.timeout.ms": "5000",
    "broker.heartbeat.interval.ms": "1000",
}

_LOG4J2 = """\
status = error
appender.out.type = Console
appender.out.name = out
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c{1})%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.state.name = state.change.logger
logger.state.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = INFO
"""

_HEAP = os.environ.get("STREAMPROC_KAFKA_HEAP", "512m")


def kafka_libs() -> Path:
    """The folder of broker jars (it may not exist yet: see :func:`kafka_available`)."""
    env = os.environ.get("STREAMPROC_KAFKA_LIBS")
    return Path(env) if env else DEFAULT_LIBS


def kafka_available() -> tuple[bool, str]:
    """(usable, reason): a complete jar folder (fetch.sh's stamp) and a ``java`` on PATH."""
    libs = kafka_libs()
    if not (libs / ".complete").is_file():
        return False, f"no complete Kafka jar folder at {libs}: {FETCH_HINT}"
    if shutil.which("java") is None:
        return False, "no `java` on PATH (apt-get install default-jdk-headless)"
    return True, ""


def _cluster_id() -> str:
    """A fresh KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own ``Uuid.randomUuid()``, never one starting with "-": the storage tool's
    argument parser would read it as an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL the broker if the process that started it dies.

    A test run killed from outside (a CI timeout, SIGKILL) never reaches ``stop()``; on a
    shared machine its JVM must not linger.  Linux only (prctl PR_SET_PDEATHSIG); a no-op
    elsewhere.
    """
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _jaas(module: str, **options: str) -> str:
    """One JAAS line; values are quoted (our passwords are URL-safe tokens, no quotes)."""
    opts = " ".join(f'{k}="{v}"' for k, v in options.items())
    return f"{module} required {opts};"


class KafkaBroker:
    """A single-node Apache Kafka (KRaft) on 127.0.0.1; a context manager.

    ``start()`` formats the storage the first time only, so ``kill()`` (SIGKILL) followed by
    ``start()`` restarts on the same log directory and ports -- the broker-crash scenario.
    ``stop()`` sends SIGTERM (a clean shutdown) and SIGKILL after ``stop_timeout``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        security: Literal["plaintext", "sasl_ssl"] = "plaintext",
        heap: str = _HEAP,
        settings: Mapping[str, str] | None = None,
        libs: str | os.PathLike[str] | None = None,
    ) -> None:
        if security not in ("plaintext", "sasl_ssl"):
            raise ValueError(f"security must be 'plaintext' or 'sasl_ssl', not {security!r}")
        self.security = security
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kafka-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)  # passwords and TLS keys live here
        self.libs = Path(libs) if libs else kafka_libs()
        self.heap = heap
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "broker.log"
        self.admin_password = secrets.token_urlsafe(18)
        self._controller_password = secrets.token_urlsafe(18)
        self._extra = dict(settings or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._formatted = False
        self.ca: Any = None  # DevCA in sasl_ssl mode
        self.ca_file: Path | None = None
        if security == "sasl_ssl":
            self._make_tls()
        self._props = self.workdir / "server.properties"
        self._props.write_text(self._properties())
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)

    # ---------------------------------------------------------------- configuration
    def _make_tls(self) -> None:
        from streamproc.devtls import DevCA

        self.ca = DevCA("streamproc test Kafka CA")
        self.ca_file = self.ca.write_ca(self.workdir / "ca.pem")
        leaf = self.ca.issue("kafka-broker", hosts=("127.0.0.1", "localhost"))
        self._keystore = leaf.write_keystore(self.workdir / "broker-keystore.pem")

    def _properties(self) -> str:
        p: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(self.data_dir),
            **FAST_SETTINGS,
        }
        if self.security == "plaintext":
            p |= {
                "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}",
                "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
                "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name": "PLAINTEXT",
            }
        else:
            assert self.ca_file is not None
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
            plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
            p |= {
                "listeners": f"CLIENT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}",
                "advertised.listeners": f"CLIENT://127.0.0.1:{self.port}",
                "listener.security.protocol.map": "CLIENT:SASL_SSL,CONTROLLER:SASL_SSL",
                "inter.broker.listener.name": "CLIENT",
                # TLS: PEM keystore/truststore from the test CA; the broker verifies the
                # hostname (127.0.0.1 SAN) when it connects to itself, as clients do.
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self._keystore),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(self.ca_file),
                "ssl.endpoint.identification.algorithm": "https",
                "ssl.client.auth": "none",
                # Client listener: SCRAM-SHA-512 only; the broker itself is the super user.
                "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
                "listener.name.client.sasl.enabled.mechanisms": SCRAM_MECHANISM,
                "listener.name.client.scram-sha-512.sasl.jaas.config": _jaas(
                    scram, username=ADMIN_USER, password=self.admin_password
                ),
                # Controller listener: PLAIN with one static user (SCRAM needs metadata the
                # controller serves), so it is not reachable without a password either.
                "sasl.mechanism.controller.protocol": "PLAIN",
                "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
                "listener.name.controller.plain.sasl.jaas.config": _jaas(
                    plain,
                    username=_CONTROLLER_USER,
                    password=self._controller_password,
                    **{f"user_{_CONTROLLER_USER}": self._controller_password},
                ),
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found": "false",
                "super.users": f"User:{ADMIN_USER};User:{_CONTROLLER_USER}",
            }
        p |= self._extra
        return "".join(f"{k}={v}\n" for k, v in p.items())

    def client_config(self, user: str | None = None, password: str | None = None) -> dict[str, Any]:
        """librdkafka settings to reach this broker (as ``user``; default: the super user)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.security == "sasl_ssl":
            conf |= {
                "security.protocol": "SASL_SSL",
                "sasl.mechanisms": SCRAM_MECHANISM,
                "sasl.username": user or ADMIN_USER,
                "sasl.password": password if user else self.admin_password,
                "ssl.ca.location": str(self.ca_file),
                "ssl.endpoint.identification.algorithm": "https",
            }
        return conf

    # ---------------------------------------------------------------- lifecycle
    def _java(self, main: str, *args: str, heap: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("no `java` on PATH (apt-get install default-jdk-headless)")
        return [
            java,
            f"-Xmx{heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _format(self, timeout: float) -> None:
        args = ["format", "-t", _cluster_id(), "-c", str(self._props), "--ignore-formatted"]
        if self.security == "sasl_ssl":
            args += [
                "--add-scram",
                f"{SCRAM_MECHANISM}=[name={ADMIN_USER},password={self.admin_password}]",
            ]
        with open(self.log_path, "ab") as log:
            r = subprocess.run(
                self._java("kafka.tools.StorageTool", *args, heap="256m"),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        if r.returncode != 0:
            raise RuntimeError(f"kafka storage format failed ({r.returncode}):\n{self.log_tail()}")
        self._formatted = True

    def start(self, timeout: float = 90.0) -> KafkaBroker:
        """Format (first time only), start the JVM, and wait until it answers metadata."""
        if self.running:
            return self
        ok, reason = kafka_available() if self.libs == kafka_libs() else (True, "")
        if not ok:
            raise RuntimeError(reason)
        deadline = time.monotonic() + timeout
        if not self._formatted:
            self._format(timeout)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        try:
            self._proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self._props), heap=self.heap),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.workdir),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        atexit.register(self._atexit)
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Poll: TCP accept, then a metadata request that lists this broker."""
        from confluent_kafka.admin import AdminClient

        while True:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kafka did not listen on {self.bootstrap}:\n{self.log_tail()}")
            time.sleep(0.1)
        admin = AdminClient({**self.client_config(), "log_level": 0})
        last: BaseException | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                md = admin.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                if md.brokers:
                    return
            except Exception as exc:  # KafkaException while the broker is still starting
                last = exc
            time.sleep(0.1)
        raise TimeoutError(
            f"kafka on {self.bootstrap} did not answer metadata ({last}):\n{self.log_tail()}"
        )

    def _check_alive(self) -> None:
        p = self._proc
        if p is not None and p.poll() is not None:
            self._proc = None
            raise RuntimeError(f"kafka exited with {p.returncode}:\n{self.log_tail()}")

    def stop(self, stop_timeout: float = 30.0) -> None:
        """Clean shutdown (SIGTERM), SIGKILL if it lingers; the work directory stays."""
        p, self._proc = self._proc, None
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        atexit.unregister(self._atexit)

    def kill(self) -> None:
        """``kill -9`` the broker (no shutdown hook runs); ``start()`` brings it back."""
        p, self._proc = self._proc, None
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        self.kill()

    def cleanup(self) -> None:
        """Stop, and delete the work directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no broker log)"

    # ---------------------------------------------------------------- SCRAM users
    def create_scram_user(self, user: str, password: str, *, timeout: float = 30.0) -> None:
        """Create or update a SCRAM-SHA-512 user with the Admin API; returns once it can log in."""
        if self.security != "sasl_ssl":
            raise RuntimeError("SCRAM users need KafkaBroker(security='sasl_ssl')")
        from confluent_kafka.admin import (
            AdminClient,
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        admin = AdminClient(self.client_config())
        upsert = UserScramCredentialUpsertion(
            user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password.encode()
        )
        for fut in admin.alter_user_scram_credentials([upsert]).values():
            fut.result(timeout)
        probe = AdminClient({**self.client_config(user, password), "log_level": 0})
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe.list_topics(timeout=2)  # authenticates; needs no ACL
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
