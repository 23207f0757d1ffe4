"""Faust round trip through the real processor on a real broker.

    Faust producer (examples/faust_producer.py, SealingSchema)
      -> orders-<id>             sealed under orders-kek
      -> streamproc run          (worker subprocess: open, apply policy.yaml, re-seal)
      -> orders.analytics-<id>   sealed under analytics-kek
      -> Faust subscriber (examples/faust_subscriber.py, OpeningSchema, analytics-kek only)

The test drives the two example apps themselves (their factories, with a unique app id),
so the examples cannot rot without a failing test.  Faust runs in this process
(``await app.start()`` / ``app.stop()``), the worker in a subprocess; every wait is
bounded.  A second test covers the codec path and the producer-side guards.

Broker: ``kafka_bootstrap`` from ``tests/integration/conftest.py`` (Tansu by default).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("faust")

import faust

from streamproc.client import RecordOpener, RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.errors import KmsUnavailable
from streamproc.integrations import ScopedKms
from streamproc.integrations.faust import (
    TANSU_APP_SETTINGS,
    RecordOpenError,
    RecordSealError,
    StreamprocTopic,
    TopicMismatch,
    opened_topic,
    register_opening_codec,
    register_sealing_codec,
    sealed_topic,
)
from tests.integration.conftest import REPO, WorkerProcess, committed_offsets, produce_raw, producer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N_ORDERS = 60


class JsonOrder(faust.Record, serializer="json"):
    """An order model that names its own serializer (the Faust idiom that bypasses codecs)."""

    order_id: str
    customer_id: str
    email: str
    card_number: str
    ip_address: str
    birth_date: int
    amount_cents: int
    currency: str
    placed_at: int
    shipping_address: dict[str, Any]
    items: list[dict[str, Any]]
    coupon_code: str | None = None
    phone: str | None = None


def load_example(name: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> ModuleType:
    """Import ``examples/<name>.py`` fresh, with its environment (it builds an app at import)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location(f"_example_{name}_{uuid.uuid4().hex[:6]}", REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


def test_faust_producer_processor_subscriber(
    workspace_factory: Any, workers: list[WorkerProcess], monkeypatch: pytest.MonkeyPatch, broker_is_tansu: bool
) -> None:
    ws = workspace_factory(sources=("orders",))
    source, analytics = ws.topic("orders"), ws.dest("orders", "analytics")
    env = {"STREAMPROC_WORKSPACE": str(ws.root), "KAFKA_BOOTSTRAP": ws.bootstrap}
    prod_mod = load_example("faust_producer", monkeypatch, env)
    sub_mod = load_example("faust_subscriber", monkeypatch, env)

    # The producer first: it may add the demo's other keys to the keyring file.
    producer = prod_mod.OrderProducer(
        prod_mod.Settings(bootstrap=ws.bootstrap, workspace=ws.root, topic=source, app_id=f"fp-{ws.suffix}", seed=3)
    )
    worker = WorkerProcess(ws)
    workers.append(worker)

    # A record on the analytics topic that analytics must not be able to open: sealed for
    # that topic, but under fraud-kek.  The subscriber holds analytics-kek only.
    forged = RecordSealer(ws.kms(), "fraud-kek", analytics, ws.schema_json("orders"), ws.schema_source())
    produce_raw(ws.bootstrap, analytics, [(b"k", forged.seal(EventGenerator(99).order()), None)])

    received: list[dict[str, Any]] = []
    subscriber = sub_mod.AnalyticsSubscriber(
        sub_mod.Settings(
            bootstrap=ws.bootstrap, workspace=ws.root, topic=analytics, app_id=f"fs-{ws.suffix}", on_error="skip", report_every=2.0
        ),
        on_order=received.append,
    )

    async def scenario() -> None:
        await producer.produce(N_ORDERS)
        await producer.app.producer.stop()
        await subscriber.app.start()
        try:
            await wait_until(
                lambda: len({r["order_id"] for r in received}) >= N_ORDERS and subscriber.skipped,
                75,
                f"{N_ORDERS} sanitized orders and one skipped record",
            )
            await asyncio.sleep(1.0)  # late duplicates, if any, arrive now
        finally:
            await subscriber.app.stop()

    try:
        asyncio.run(scenario())
    except AssertionError:
        raise AssertionError(f"{len(received)} received; worker log tail:\n{worker.log()[-3000:]}") from None

    # -- every order made it through, once (Tansu may show aborted-transaction copies) ------
    sent = {o["order_id"]: o for o in producer.sent}
    got = Counter(r["order_id"] for r in received)
    assert set(got) == set(sent)
    if not broker_is_tansu:
        assert all(n == 1 for n in got.values()), got.most_common(3)

    # -- transformed per policy.yaml's analytics audience ------------------------------------
    tokens: dict[str, set[str]] = defaultdict(set)
    for rec in received:
        orig = sent[rec["order_id"]]
        assert "card_number" not in rec and "phone" not in rec  # CARD_NUMBER, PHONE: drop
        assert "street" not in rec["shipping_address"]  # STREET: drop
        assert rec["email"].startswith("tk1_") and orig["email"] not in json.dumps(rec, default=str)
        assert rec["customer_id"].startswith("tk1_") and rec["customer_id"] != orig["customer_id"]
        assert rec["ip_address"] == ".".join(orig["ip_address"].split(".")[:3]) + ".0/24"  # cidr 24
        assert rec["birth_date"].month == 1 and rec["birth_date"].day == 1  # generalize to year
        # AMOUNT: the demo workspace gives analytics dp_noise (laplace; integers stay integers)
        assert isinstance(rec["amount_cents"], int)
        assert (rec["currency"], rec["items"]) == (orig["currency"], orig["items"])
        tokens[orig["customer_id"]].add(rec["customer_id"])
    # Tokens are deterministic per customer and distinct across customers: the counts per
    # token that analytics computes are exactly the counts per (hidden) customer.
    assert all(len(t) == 1 for t in tokens.values())
    assert len({next(iter(t)) for t in tokens.values()}) == len(tokens)
    unique_records = {r["order_id"]: r for r in received}.values()
    per_token = Counter(r["customer_id"] for r in unique_records)
    per_customer = Counter(o["customer_id"] for o in producer.sent)
    assert sorted(per_token.values()) == sorted(per_customer.values())
    assert subscriber.stats.received == len(received)

    # -- the forged record was skipped, by reason, without crashing the agent -----------------
    assert dict(subscriber.skipped) == {"unknown_key": 1}
    assert dict(subscriber.topic.schema.policy.skipped) == {"unknown_key": 1}

    worker.terminate()
    assert worker.wait(30) == 0, worker.log()[-3000:]


def test_codecs_and_producer_guards(workspace_factory: Any) -> None:
    """Codec path over the broker, and every way the producer side refuses to leak plaintext."""
    ws = workspace_factory(sources=("orders",))
    source = ws.topic("orders")
    kms, schemas = ws.kms(), ws.schema_source()
    sealer = ws.sealer("orders", kms, schemas)
    gen = EventGenerator(5)
    app = faust.App(f"fc-{ws.suffix}", broker=f"kafka://{ws.bootstrap}", store="memory://", web_enabled=False, **TANSU_APP_SETTINGS)

    # Codec names are per topic; the opening side reads the *source* with orders-kek here.
    seal_name = register_sealing_codec(sealer)
    open_name = register_opening_codec(RecordOpener(ScopedKms(kms, {"orders-kek"}), schemas), source, on_error="skip")
    assert (seal_name, open_name) == (f"streamproc-seal-{source}", f"streamproc-open-{source}")
    out_topic = app.topic(source, key_serializer="raw", value_serializer=seal_name)
    in_topic = StreamprocTopic(app, topics=[source], key_serializer="raw", value_serializer=open_name)
    orders = [gen.order() for _ in range(5)]
    got: list[dict[str, Any]] = []

    @app.agent(in_topic, name="collect")
    async def collect(stream: Any) -> None:
        async for v in stream:
            got.append(v)

    async def scenario() -> None:
        for o in orders:
            await (await out_topic.send(key=o["customer_id"], value=o))
        # Garbage on the source topic: Faust's registry wraps the codec's RecordOpenError in a
        # ValueDecodeError; StreamprocTopic finds it as the cause and skips it.
        await app.producer.send_and_wait(source, b"k", b"\x01garbage", partition=0, timestamp=None, headers=None)
        await app.start()
        try:
            await wait_until(lambda: len(got) >= len(orders), 45, "the codec round trip")
            await asyncio.sleep(0.5)
        finally:
            await app.stop()

    asyncio.run(scenario())
    assert sorted(g["order_id"] for g in got) == sorted(o["order_id"] for o in orders)
    assert got[0]["card_number"]  # the source topic, opened with the source key: unsanitized

    # -- guards: none of these may publish anything ----------------------------------------
    guard_app = faust.App(f"fg-{ws.suffix}", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False, Topic=StreamprocTopic)
    sealed = sealed_topic(guard_app, sealer)
    order = gen.order()
    with pytest.raises(TypeError, match="bypass the envelope"):
        sealed.as_future_message(key=None, value=b"plaintext bytes")
    with pytest.raises(ValueError, match="bypass the envelope"):
        sealed.as_future_message(key=None, value=order, value_serializer="json")
    with pytest.raises(TopicMismatch, match="authenticates its topic"):
        guard_app.topic("elsewhere").as_future_message(key=None, value=order, schema=sealed.schema)
    with pytest.raises(TopicMismatch, match="sealed on this app"):
        guard_app.topic(source).as_future_message(key=None, value=order)  # by name: would be JSON
    with pytest.raises(ValueError, match="owns value serialization"):
        guard_app.topic(source, schema=sealed.schema, value_serializer="json")
    bad = {**order, "amount_cents": "not a number " + order["email"]}
    with pytest.raises(RecordSealError) as info:
        sealed.as_future_message(key=None, value=bad)
    assert order["email"] not in str(info.value) and info.value.__cause__ is None
    # A faust.Record that declares its own serializer: Faust lets the model's serializer win
    # over a topic's codec (plaintext JSON!); the sealing schema ignores it and seals.
    record = JsonOrder(**order)

    async def serialized(topic: Any) -> bytes:  # a FutureMessage needs a running loop
        return bytes(topic.as_future_message(key=None, value=record).message.value)

    leaked = asyncio.run(serialized(out_topic))
    assert order["email"].encode() in leaked  # the codec path: this is why schemas are preferred
    sealed_value = asyncio.run(serialized(sealed))
    assert order["email"].encode() not in sealed_value
    assert RecordOpener(kms, schemas).decode(source, sealed_value)["email"] == order["email"]
    # A subscriber topic is read-only.
    ro = opened_topic(guard_app, ws.dest("orders", "analytics"), opener=RecordOpener(kms, schemas))
    with pytest.raises(TypeError, match="read-only"):
        ro.as_future_message(key=None, value=order)


class FlakyKms:
    """A KMS whose unwrap is 'down' while ``down`` is set (a transient outage)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.down = inner, "flaky", True

    def generate_data_key(self, kek_id: str, context: Any) -> Any:
        return self.inner.generate_data_key(kek_id, context)

    def unwrap(self, kek_id: str, kek_version: int, wrapped: bytes, context: Any) -> bytes:
        if self.down:
            raise KmsUnavailable("kms down (test)")
        return bytes(self.inner.unwrap(kek_id, kek_version, wrapped, context))

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        return bool(self.inner.is_revoked(kek_id, kek_version))


def test_open_error_policies_raise_and_transient(workspace_factory: Any) -> None:
    """What docs/integrations.md says Faust does with errors, on the real broker.

    ``raise``: the error reaches the agent, which crashes and is restarted; the bad record
    is acked and the next one is delivered.  A KMS outage: not a decode error -- the
    consumer stops, nothing is committed, and a restarted app reads the record again.
    """
    ws = workspace_factory(sources=("orders",))
    source = ws.topic("orders")
    kms, schemas = ws.kms(), ws.schema_source()
    gen = EventGenerator(8)
    good = [gen.order() for _ in range(2)]
    sealed = ws.sealer("orders", kms, schemas).seal_many(good)
    p = producer(ws.bootstrap)
    for value in (sealed[0], b"\x01garbage", sealed[1]):  # offsets 0, 1, 2 of partition 0
        p.produce(source, value=value, partition=0)
    assert p.flush(30) == 0

    def make_app(app_id: str, opener_kms: Any, on_error: Any, sink: list[Any]) -> tuple[Any, Any]:
        app = faust.App(app_id, broker=f"kafka://{ws.bootstrap}", store="memory://", web_enabled=False, **TANSU_APP_SETTINGS)
        topic = opened_topic(app, source, opener=RecordOpener(opener_kms, schemas), on_error=on_error)

        @app.agent(topic, name="collect")
        async def collect(stream: Any) -> None:
            try:
                async for v in stream:
                    sink.append(v["order_id"])
            except RecordOpenError as exc:
                sink.append(exc)
                raise  # crash: Faust's supervisor restarts the agent

        return app, topic

    # -- raise ------------------------------------------------------------------------------
    seen: list[Any] = []
    app, _ = make_app(f"fr-{ws.suffix}", kms, "raise", seen)

    async def run_raise() -> None:
        await app.start()
        try:
            await wait_until(lambda: len(seen) >= 3, 45, "two orders and one error")
        finally:
            await app.stop()

    asyncio.run(run_raise())
    assert [x for x in seen if isinstance(x, str)] == [o["order_id"] for o in good]
    errors = [x for x in seen if isinstance(x, RecordOpenError)]
    assert len(errors) == 1 and (errors[0].reason, errors[0].partition, errors[0].offset) == ("malformed_envelope", 0, 1)

    # -- transient: the consumer stops without committing ---------------------------------
    flaky = FlakyKms(kms)
    group = f"ft-{ws.suffix}"
    got: list[Any] = []
    down, down_topic = make_app(group, flaky, "skip", got)

    async def run_down() -> None:
        await down.start()
        try:
            await wait_until(lambda: down.should_stop, 45, "the Faust consumer to stop on a KMS outage")
        finally:
            await down.stop()

    asyncio.run(run_down())
    assert got == [] and not down_topic.schema.policy.skipped  # not skipped, not delivered
    assert committed_offsets(ws.bootstrap, group, source, 1)[0] < 0  # nothing committed

    flaky.down = False  # the KMS is back: the same group starts over from the first record
    again: list[Any] = []
    up, _ = make_app(group, flaky, "skip", again)

    async def run_up() -> None:
        await up.start()
        try:
            await wait_until(lambda: len(again) >= 2, 45, "the records after the outage")
        finally:
            await up.stop()

    asyncio.run(run_up())
    assert again == [o["order_id"] for o in good]


def test_producer_example_commands_exist(tmp_path: Path) -> None:
    """The commands the examples' docstrings tell people to run are real Faust commands."""
    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / "faust_producer.py"), "--help"],
        env={**os.environ, "STREAMPROC_WORKSPACE": str(tmp_path / "ws")},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    listed = r.stdout.split("Commands:")[1]
    doc = (REPO / "examples" / "faust_producer.py").read_text()
    for cmd in ("dev-broker", "setup", "produce", "worker"):
        assert f"\n  {cmd} " in listed and f"faust_producer.py {cmd}" in doc, cmd
