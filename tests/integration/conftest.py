"""Fixtures for integration tests against a real Kafka-protocol broker.

Which broker (session-scoped ``kafka_broker`` / ``kafka_bootstrap``) is chosen by
``STREAMPROC_TEST_BROKER``:

* ``kafka`` -- Apache Kafka from Maven Central (``scripts/kafka/fetch.sh``), started by
  :class:`streamproc.devkafka.KafkaBroker` on free 127.0.0.1 ports and stopped at session
  end.  The default whenever the jars and a ``java`` are present.
* ``tansu`` -- Tansu via :class:`streamproc.devbroker.DevBroker` (the demo's broker).
* ``external`` -- a cluster you started, at ``STREAMPROC_TEST_BOOTSTRAP=host:port``
  (``STREAMPROC_TEST_BROKER_KIND=tansu`` if it is a Tansu broker; default real Kafka).
* ``docker`` -- testcontainers' ``KafkaContainer`` (needs a Docker engine).

Unset: ``kafka`` if its jars are present, else ``docker`` if a Docker engine answers, else
``tansu``.  For compatibility, ``STREAMPROC_TEST_BOOTSTRAP`` alone means ``external``
(and ``STREAMPROC_TEST_BROKER=tansu`` next to it means an external Tansu).

``broker_is_tansu`` tells tests which guarantees the broker can prove: Tansu shows records
of aborted transactions to read_committed consumers, so exactly-once tests assert zero
*loss* there and only *report* duplicates; on Kafka they assert zero duplicates
(docs/testing.md).  ``kafka_broker.server`` is the :class:`KafkaBroker` object when this
session started one (tests that need a broker of their own start another).

Helpers (plain functions and classes, importable from this module) build a temporary
workspace -- keyring (0600), schemas, policy, config with uuid-suffixed topic names --
produce sealed events, run the worker as a subprocess, and read topics back;
:func:`worker_end_to_end` is the whole "produce, run the worker, read every destination"
shape that tests with another KMS or schema registry share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCE_KEKS = {"orders": "orders-kek", "logins": "logins-kek"}
SCHEMA_FILES = {"orders": "order.avsc", "logins": "login.avsc"}
GEN_KIND = {"orders": "order", "logins": "login"}
AUDIENCES = ("analytics", "fraud", "support")
#: Consumer settings that keep group joins fast (Tansu waits ~half the session timeout).
CLIENT_DEFAULTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


# --------------------------------------------------------------------------------------
# Broker selection
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Broker:
    bootstrap: str
    kind: str  # "tansu" | "kafka"
    origin: str  # "external" | "testcontainers" | "devbroker" | "maven"
    server: Any = None  # the KafkaBroker when origin == "maven"


BROKER_CHOICES = ("kafka", "tansu", "external", "docker")


def selected_broker() -> str:
    """The broker this session runs on (see the module docstring), or a usage error."""
    choice = os.environ.get("STREAMPROC_TEST_BROKER", "").strip().lower()
    external = os.environ.get("STREAMPROC_TEST_BOOTSTRAP", "").strip()
    if external and choice in ("", "tansu"):
        return "external"
    if choice:
        if choice not in BROKER_CHOICES:
            raise pytest.UsageError(
                f"STREAMPROC_TEST_BROKER={choice!r}: choose one of {', '.join(BROKER_CHOICES)}"
            )
        return choice
    from streamproc.devkafka import kafka_available

    if kafka_available()[0]:
        return "kafka"
    if docker_engine_available()[0]:
        return "docker"
    return "tansu"


def docker_engine_available(timeout: float = 5.0) -> tuple[bool, str]:
    """(available, reason): a Docker engine that answers, not just a docker CLI."""
    docker = shutil.which("docker")
    if docker is None:
        return False, "no docker CLI on PATH"
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False, "no Docker engine (no DOCKER_HOST and no /var/run/docker.sock)"
    try:
        r = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False, f"`docker info` did not answer within {timeout:.0f}s"
    if r.returncode != 0 or not r.stdout.strip():
        return False, "`docker info` found no running Docker engine"
    try:
        import testcontainers.kafka  # noqa: F401
    except ImportError:
        return False, "testcontainers[kafka] is not installed"
    return True, ""


@contextlib.contextmanager
def _kafka_container() -> Iterator[str]:
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    choice = selected_broker()
    if choice == "external":
        bootstrap = os.environ.get("STREAMPROC_TEST_BOOTSTRAP", "").strip()
        if not bootstrap:
            raise pytest.UsageError("STREAMPROC_TEST_BROKER=external needs STREAMPROC_TEST_BOOTSTRAP")
        kind = (
            os.environ.get("STREAMPROC_TEST_BROKER_KIND")
            or os.environ.get("STREAMPROC_TEST_BROKER", "kafka")
        ).lower()
        yield Broker(bootstrap, "tansu" if kind == "tansu" else "kafka", "external")
        return
    if choice == "docker":
        ok, reason = docker_engine_available()
        if not ok:
            pytest.fail(f"STREAMPROC_TEST_BROKER=docker: {reason}")
        with _kafka_container() as bootstrap:
            yield Broker(bootstrap, "kafka", "testcontainers")
        return
    if choice == "kafka":
        from streamproc.devkafka import KafkaBroker, kafka_available

        ok, reason = kafka_available()
        if not ok:
            pytest.fail(f"STREAMPROC_TEST_BROKER=kafka: {reason}")
        server = KafkaBroker()
        try:
            server.start()
        except (OSError, RuntimeError, TimeoutError) as exc:
            server.cleanup()
            pytest.fail(f"Apache Kafka did not start: {exc}")
        try:
            yield Broker(server.bootstrap, "kafka", "maven", server)
        finally:
            server.cleanup()
        return
    from streamproc.devbroker import DevBroker

    try:
        broker = DevBroker().start()
    except (OSError, RuntimeError, TimeoutError, ImportError) as exc:
        pytest.skip(f"no broker: Tansu failed to start ({exc})")
    try:
        yield Broker(broker.bootstrap, "tansu", "devbroker")
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: Broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def broker_is_tansu(kafka_broker: Broker) -> bool:
    return kafka_broker.kind == "tansu"


@pytest.fixture
def unique() -> str:
    """A short uuid suffix so every test has its own topics and group."""
    return uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------------------
# Workspace
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workspace:
    root: Path
    bootstrap: str
    suffix: str
    keyring_path: Path
    schemas: Path
    policy: Path
    config_path: Path
    sources: tuple[str, ...]

    def topic(self, source: str) -> str:
        return f"{source}-{self.suffix}"

    def dest(self, source: str, audience: str) -> str:
        return f"{source}.{audience}-{self.suffix}"

    def dlq(self, source: str) -> str:
        return f"{source}.dlq-{self.suffix}"

    @property
    def group_id(self) -> str:
        return f"streamproc-test-{self.suffix}"

    def destinations(self) -> list[str]:
        return [self.dest(s, a) for s in self.sources for a in AUDIENCES]

    def kms(self) -> Any:
        from streamproc.crypto.kms.local import LocalKeyring

        return LocalKeyring(self.keyring_path)

    def schema_source(self) -> Any:
        from streamproc.schema.registry import build_schema_source

        return build_schema_source({"directory": str(self.schemas)})

    def schema_json(self, source: str) -> Any:
        return json.loads((self.schemas / SCHEMA_FILES[source]).read_text())

    def sealer(self, source: str, kms: Any = None, schemas: Any = None) -> Any:
        from streamproc.client import RecordSealer

        return RecordSealer(
            kms or self.kms(),
            SOURCE_KEKS[source],
            self.topic(source),
            self.schema_json(source),
            schemas or self.schema_source(),
        )

    def opener(self) -> Any:
        from streamproc.client import RecordOpener

        return RecordOpener(self.kms(), self.schema_source())

    def load_config(self) -> Any:
        from streamproc.config import load_config

        return load_config(self.config_path)

    def resolver(self) -> Any:
        """The provenance resolver of the current config (rebuilt when the config changes)."""
        from streamproc.cli.provenance import Resolver

        stamp = self.config_path.stat().st_mtime_ns
        cached = _RESOLVERS.get(self.config_path)
        if cached is None or cached[0] != stamp:
            cached = _RESOLVERS[self.config_path] = (stamp, Resolver(self.config_path))
        return cached[1]


#: Workspaces made in this session (Rec.source finds a record's workspace by topic suffix).
_WORKSPACES: list[Workspace] = []
_RESOLVERS: dict[Path, tuple[int, Any]] = {}


def make_workspace(
    root: Path,
    bootstrap: str,
    suffix: str,
    *,
    sources: Sequence[str] = ("orders", "logins"),
    partitions: int = 3,
    batch: dict[str, int] | None = None,
    max_record_bytes: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Workspace:
    """Keyring (0600) with every KEK and the pseudonym secret, schemas, policy, config."""
    from streamproc.crypto.kms.local import LocalKeyring

    root.mkdir(parents=True, exist_ok=True)
    sdir = root / "schemas"
    sdir.mkdir(exist_ok=True)
    for src in sources:
        shutil.copy(REPO / "schemas" / SCHEMA_FILES[src], sdir / SCHEMA_FILES[src])
    policy = root / "policy.yaml"
    shutil.copy(REPO / "policy.yaml", policy)
    ring_path = root / "keys" / "keyring.json"
    ring = LocalKeyring.create(ring_path)
    for src in sources:
        ring.create_key(SOURCE_KEKS[src])
    for a in AUDIENCES:
        ring.create_key(f"{a}-kek")
    ring.create_key("pseudonym-master", "secret")
    ring.create_key("quarantine-kek")  # dead letters are sealed under it (dead_letter.kek)
    assert (ring_path.stat().st_mode & 0o777) == 0o600
    ws = Workspace(
        root, bootstrap, suffix, ring_path, sdir, policy, root / "streamproc.yaml", tuple(sources)
    )
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap.servers": bootstrap},
        "consumer": dict(CLIENT_DEFAULTS),
        "producer": {"linger.ms": 5},
        "group_id": ws.group_id,
        "processing_guarantee": "exactly_once",
        "batch": batch or {"max_records": 200, "max_wait_ms": 100},
        **({"max_record_bytes": max_record_bytes} if max_record_bytes is not None else {}),
        "schemas": {"directory": "./schemas"},  # relative: resolved against the config file
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [
            {
                "sources": [ws.topic(src)],
                "dead_letter_topic": ws.dlq(src),
                "destinations": [
                    {"topic": ws.dest(src, a), "audience": a, "kek": f"{a}-kek"} for a in AUDIENCES
                ],
            }
            for src in sources
        ],
        "topics": {"defaults": {"partitions": partitions, "replication_factor": 1}},
        "metrics": {"enabled": False},
        "logging": {"level": "INFO", "format": "json"},
    }
    for k, v in (extra or {}).items():
        cfg[k] = v
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _WORKSPACES.append(ws)
    return ws


@pytest.fixture
def workspace_factory(
    tmp_path: Path, kafka_bootstrap: str, unique: str
) -> Callable[..., Workspace]:
    """``make(**options)`` -> a workspace whose topics exist on the broker."""
    from streamproc.runtime.topics import apply_topics

    count = 0

    def make(**options: Any) -> Workspace:
        nonlocal count
        count += 1
        ws = make_workspace(tmp_path / f"ws{count}", kafka_bootstrap, f"{unique}{count}", **options)
        apply_topics(ws.load_config())
        return ws

    return make


# --------------------------------------------------------------------------------------
# Producing
# --------------------------------------------------------------------------------------
def producer(bootstrap: str) -> Any:
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})


@dataclasses.dataclass
class Produced:
    """What was produced, by (partition, offset): the record dict (or raw bytes) and key."""

    topic: str
    records: dict[tuple[int, int], Any]
    keys: dict[tuple[int, int], bytes | None]
    values: dict[tuple[int, int], bytes | None]


def produce_raw(
    bootstrap: str,
    topic: str,
    items: Sequence[tuple[bytes | None, bytes | None, Any]],
    headers: list[tuple[str, bytes]] | None = None,
) -> Produced:
    """Produce (key, value, payload-for-bookkeeping) triples; returns where each landed."""
    p = producer(bootstrap)
    out = Produced(topic, {}, {}, {})
    errors: list[str] = []

    def cb(item: tuple[bytes | None, bytes | None, Any]) -> Callable[[Any, Any], None]:
        def done(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err.name())
                return
            k = (msg.partition(), msg.offset())
            out.records[k] = item[2]
            out.keys[k] = item[0]
            out.values[k] = item[1]

        return done

    for item in items:
        p.produce(topic, key=item[0], value=item[1], headers=headers, on_delivery=cb(item))
        p.poll(0)
    assert p.flush(30) == 0
    assert not errors, errors
    return out


def produce_events(
    ws: Workspace, source: str, n: int, *, seed: int = 7, canary: bool = False
) -> Produced:
    """``n`` generated events of ``source``'s schema, sealed, keyed by customer_id."""
    from streamproc.client.generator import EventGenerator

    sealer = ws.sealer(source)
    gen = EventGenerator(seed)
    recs = list(gen.events(GEN_KIND[source], n, canary))
    values = sealer.seal_many(recs)
    return produce_raw(
        ws.bootstrap,
        ws.topic(source),
        [(r["customer_id"].encode(), v, r) for r, v in zip(recs, values, strict=True)],
    )


class Ticker:
    """Produces events of one source in a background thread at a steady rate."""

    def __init__(self, ws: Workspace, source: str, total: int, rate: float, seed: int = 11) -> None:
        import threading

        self.ws, self.source, self.total, self.rate = ws, source, total, rate
        self.produced = Produced(ws.topic(source), {}, {}, {})
        self.sent = 0
        self._seed = seed
        self.flush_timeout = 30.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _run(self) -> None:
        from streamproc.client.generator import EventGenerator

        try:
            sealer = self.ws.sealer(self.source)
            gen = EventGenerator(self._seed)
            p = producer(self.ws.bootstrap)
            t0 = time.monotonic()
            chunk = max(1, int(self.rate / 20))
            while self.sent < self.total and not self._stop.is_set():
                recs = list(gen.events(GEN_KIND[self.source], min(chunk, self.total - self.sent)))
                for r, v in zip(recs, sealer.seal_many(recs), strict=True):

                    def done(err: Any, msg: Any, r: Any = r, v: Any = v) -> None:
                        if err is None:
                            k = (msg.partition(), msg.offset())
                            self.produced.records[k] = r
                            self.produced.keys[k] = r["customer_id"].encode()
                            self.produced.values[k] = v

                    p.produce(
                        self.produced.topic,
                        key=r["customer_id"].encode(),
                        value=v,
                        on_delivery=done,
                    )
                self.sent += len(recs)
                p.poll(0)
                wait = t0 + self.sent / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            assert p.flush(self.flush_timeout) == 0
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def stop(self) -> None:
        """Stop after the current chunk (``join`` then checks what was sent was delivered)."""
        self._stop.set()

    def join(self, timeout: float = 60) -> Produced:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "producer thread did not finish"
        if self.error is not None:
            raise self.error
        assert len(self.produced.records) == self.sent
        assert self._stop.is_set() or self.sent == self.total
        return self.produced


# --------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return None if v is None else v.decode()
        return None

    @property
    def source(self) -> tuple[str, int, int]:
        """The source record behind this output, resolved from its audience-keyed
        ``streamproc.prov`` reference with the workspace's config, exactly as the lineage
        team does (``streamproc provenance resolve``): outputs carry no clear coordinates."""
        from streamproc.crypto.provenance import H_PROVENANCE

        value = self.header(H_PROVENANCE)
        assert value is not None, f"missing provenance on {self.topic}[{self.partition}]@{self.offset}"
        ws = next((w for w in reversed(_WORKSPACES) if self.topic.endswith(f"-{w.suffix}")), None)
        assert ws is not None, f"no workspace owns {self.topic}"
        return ws.resolver().resolve_header(value)


def open_dead_letters(ws: Workspace, records: Sequence[Rec], kms: Any = None) -> list[Any]:
    """Open dead letters as incident response does (the quarantine KEK's unwrap right).

    Every reader of a DLQ goes through this (or ``streamproc dlq inspect``): the DLQ
    holds nothing readable without the key.
    """
    from streamproc.runtime.dlq import DeadLetterReader

    reader = DeadLetterReader(kms or ws.kms())
    return [
        reader.open(r.topic, r.value, r.headers, where=(r.topic, r.partition, r.offset))
        for r in records
    ]


def read_topics(
    bootstrap: str,
    topics: Sequence[str],
    *,
    until: Callable[[dict[str, list[Rec]]], bool] | None = None,
    timeout: float = 30.0,
    idle: float = 1.5,
    isolation: str = "read_committed",
) -> dict[str, list[Rec]]:
    """Read every partition of ``topics`` from the beginning (read_committed, no group).

    Stops when ``until(records)`` holds and nothing new arrived for ``idle`` seconds (so
    late duplicates are seen), or at ``timeout``.  Without ``until`` it stops when idle.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    out: dict[str, list[Rec]] = {t: [] for t in topics}
    try:
        parts = []
        for t in topics:
            md = c.list_topics(t, timeout=10).topics[t]
            parts += [TopicPartition(t, p, OFFSET_BEGINNING) for p in md.partitions]
        c.assign(parts)
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(1000, 0.2)
            now = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    out[m.topic()].append(
                        Rec(
                            m.topic(),
                            m.partition(),
                            m.offset(),
                            m.key(),
                            m.value(),
                            tuple(m.headers() or ()),
                        )
                    )
                    last_new = now
            if now - last_new >= idle and (until is None or until(out)):
                break
    finally:
        c.close()
    return out


class Watermarks:
    """Cheap progress probe: the sum of high watermarks of some topics (no group, no reads)."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self._c = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid.uuid4().hex[:8]}"}
        )
        self._parts = []
        for t in topics:
            md = self._c.list_topics(t, timeout=10).topics[t]
            self._parts += [TopicPartition(t, p) for p in md.partitions]

    def total(self) -> int:
        return sum(max(0, self._high(tp)) for tp in self._parts)

    def _high(self, tp: Any, timeout: float = 15.0) -> int:
        """High watermark, retrying retriable errors (a just-created partition on Kafka
        answers NOT_LEADER_FOR_PARTITION until its leader has loaded it, and a restarted
        broker refuses connections for a moment)."""
        from confluent_kafka import KafkaError, KafkaException

        deadline = time.monotonic() + timeout
        while True:
            try:
                return int(self._c.get_watermark_offsets(tp, timeout=5)[1])
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                retriable = getattr(err, "retriable", lambda: False)() or getattr(
                    err, "code", lambda: None
                )() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION)
                if not retriable or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self._c.close()


def wait_for(
    cond: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# Worker subprocess
# --------------------------------------------------------------------------------------
class WorkerProcess:
    """``python -m streamproc.cli.run --config ...`` with its stderr in a log file."""

    def __init__(self, ws: Workspace, *args: str, name: str = "worker") -> None:
        self.log_path = ws.root / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamproc.cli.run", "--config", str(ws.config_path), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(REPO),
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def wait_assigned(self, timeout: float = 30.0) -> None:
        wait_for(
            lambda: (
                any(e.get("message") == "partitions assigned" for e in self.log_events())
                or not self.alive()
            ),
            timeout,
            what="partition assignment",
        )
        assert self.alive(), f"worker exited early:\n{self.log()[-3000:]}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        return rc

    def stop(self) -> None:
        """Best-effort cleanup for finalizers: SIGTERM, then SIGKILL."""
        if self.alive():
            self.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Collects WorkerProcess objects and stops any still running at teardown."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop()


# --------------------------------------------------------------------------------------
# Worker end to end: produce, run the worker, read every destination
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class EndToEnd:
    """What :func:`worker_end_to_end` produced and read back (the worker has exited 0)."""

    ws: Workspace
    produced: Produced
    #: audience -> its destination topic of ``orders``.
    dests: dict[str, str]
    #: topic -> records read back (every destination and the DLQ).
    out: dict[str, list[Rec]]
    worker: WorkerProcess


def vault_transit(url: str, **kms: Any) -> Callable[[dict[str, Any]], None]:
    """A ``configure`` for :func:`worker_end_to_end`: the Vault/OpenBao transit KMS at
    ``url`` with the ``streamproc-*`` key names of docs/keys.md (quarantine, one KEK per
    audience); the token comes from the environment (``BAO_TOKEN``)."""

    def configure(cfg: dict[str, Any]) -> None:
        cfg["kms"] = {"provider": "vault", "url": url, **kms}
        cfg["dead_letter"] = {"kek": "streamproc-quarantine"}
        for d in cfg["pipelines"][0]["destinations"]:
            d["kek"] = f"streamproc-dst-{d['audience']}"

    return configure


def worker_end_to_end(
    root: Path,
    bootstrap: str,
    suffix: str,
    workers: list[WorkerProcess],
    *,
    configure: Callable[[dict[str, Any]], None] | None = None,
    sealer: Callable[[Workspace], Any] | None = None,
    n: int = 20,
    seed: int = 7,
    timeout: float = 60.0,
) -> EndToEnd:
    """The shape several integration tests share, for an ``orders``-only workspace with
    two partitions whose config ``configure`` adjusts (KMS, registry...):

    create the topics, seal ``n`` generated orders with ``sealer(ws)`` (default: the
    workspace's local keyring and schema directory), produce them keyed by customer id,
    run a worker subprocess, read every destination and the DLQ until each destination has
    ``n`` records; then check what holds whatever the KMS or registry: the worker is
    alive, each destination holds exactly one output per produced record (resolved
    through its provenance reference), nothing is dead-lettered, and SIGTERM exits 0.
    The caller checks what is specific to it on the returned records.
    """
    from streamproc.client.generator import EventGenerator
    from streamproc.runtime.topics import apply_topics

    ws = make_workspace(root, bootstrap, suffix, sources=("orders",), partitions=2)
    if configure is not None:
        cfg = yaml.safe_load(ws.config_path.read_text())
        configure(cfg)
        ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    apply_topics(ws.load_config())
    seal = (sealer or (lambda w: w.sealer("orders")))(ws)
    recs = list(EventGenerator(seed).events("order", n))
    produced = produce_raw(
        ws.bootstrap,
        ws.topic("orders"),
        [(r["customer_id"].encode(), v, r) for r, v in zip(recs, seal.seal_many(recs), strict=True)],
    )
    w = WorkerProcess(ws)
    workers.append(w)
    dests = {a: ws.dest("orders", a) for a in AUDIENCES}
    dlq = ws.dlq("orders")
    out = read_topics(
        ws.bootstrap,
        [*dests.values(), dlq],
        until=lambda r: all(len(r[t]) >= n for t in dests.values()),
        timeout=timeout,
    )
    assert w.alive(), w.log()[-3000:]
    assert out[dlq] == [], w.log()[-3000:]
    source = ws.topic("orders")
    for a, t in dests.items():
        assert len(out[t]) == n, (a, w.log()[-3000:])
        assert sorted(r.source for r in out[t]) == sorted((source, p, o) for p, o in produced.records)
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]
    return EndToEnd(ws, produced, dests, out, w)
