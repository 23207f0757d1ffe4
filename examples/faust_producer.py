"""A Faust app that produces envelope-encrypted order events for streamproc.

Each order is a plain dict; the topic's :class:`~streamproc.integrations.faust.SealingSchema`
encodes it with ``schemas/order.avsc`` (Avro, Confluent framing), seals it under
``orders-kek`` for the topic ``orders``, and Faust publishes the envelope.  The record key
is the customer id as bytes: the processor tokenizes it per audience.

Run it against the local broker and the processor (repository root, one terminal each)::

    export STREAMPROC_WORKSPACE=$PWD/.faust-demo KAFKA_BOOTSTRAP=127.0.0.1:9092

    # 1. a local Kafka-compatible broker (Tansu, the one the tests use), until Ctrl-C
    python examples/faust_producer.py dev-broker --port 9092
    # 2. keys, schemas, policy and streamproc.yaml in $STREAMPROC_WORKSPACE, then the processor
    python examples/faust_producer.py setup
    streamproc run --config $STREAMPROC_WORKSPACE/streamproc.yaml
    # 3. the subscriber (see examples/faust_subscriber.py)
    python examples/faust_subscriber.py worker -l info
    # 4. this producer: a worker emitting ORDERS_PER_SECOND orders per second ...
    python examples/faust_producer.py worker -l info
    #    ... or a one-shot batch
    python examples/faust_producer.py produce --count 500

``faust -A examples.faust_producer worker -l info`` works as well when the repository root
is on ``PYTHONPATH``.  Any Kafka works instead of step 1: point ``KAFKA_BOOTSTRAP`` at it.

Environment: ``STREAMPROC_WORKSPACE`` (default ``./.faust-demo``; created on first use
with the demo's keyring, schemas and policy), ``KAFKA_BOOTSTRAP`` (default
``127.0.0.1:9092``), ``ORDERS_TOPIC`` (default ``orders``), ``ORDERS_PER_SECOND``
(default 5).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.cli import option

from streamproc import demo
from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.integrations.faust import TANSU_APP_SETTINGS, StreamprocTopic, sealed_topic
from streamproc.schema.registry import build_schema_source


@dataclass(frozen=True)
class Settings:
    bootstrap: str = "127.0.0.1:9092"
    workspace: Path = Path(".faust-demo")
    topic: str = "orders"
    kek: str = "orders-kek"
    app_id: str = "streamproc-faust-producer"
    orders_per_second: float = 5.0
    seed: int = 7
    app_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            bootstrap=env.get("KAFKA_BOOTSTRAP", cls.bootstrap),
            workspace=Path(env.get("STREAMPROC_WORKSPACE", str(cls.workspace))).resolve(),
            topic=env.get("ORDERS_TOPIC", cls.topic),
            orders_per_second=float(env.get("ORDERS_PER_SECOND", cls.orders_per_second)),
        )


def ensure_workspace(root: Path) -> demo.Workspace:
    """The demo workspace (keyring with every KEK, schemas, policy); idempotent.

    Only the producer creates it: two processes creating a keyring at the same moment
    could each write different keys, so the subscriber insists that it exists.
    """
    schemas, policy = demo.find_examples()
    return demo.make_workspace(root, schemas, policy)


class OrderProducer:
    """The Faust app, its sealed ``orders`` topic and a seeded fake-order generator."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ws = self.workspace = ensure_workspace(settings.workspace)
        kms = LocalKeyring(ws.keyring)
        schemas = build_schema_source(str(ws.schemas))
        schema = json.loads((ws.schemas / "order.avsc").read_text())
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{settings.bootstrap}",
            store="memory://",
            web_enabled=False,
            worker_redirect_stdouts_level="INFO",  # print() is output here, not a warning
            # Every app.topic() checks sealing, so a send by topic *name* cannot go out as JSON.
            Topic=StreamprocTopic,
            **{**TANSU_APP_SETTINGS, **settings.app_options},
        )
        # The sealer binds the topic: the envelope authenticates "orders", so the record
        # can be opened from that topic only.  sealed_topic() names the topic after it.
        self.topic = sealed_topic(self.app, RecordSealer(kms, settings.kek, settings.topic, schema, schemas))
        self.generator = EventGenerator(settings.seed)
        self.sent: list[dict[str, Any]] = []

    async def send_order(self, order: dict[str, Any] | None = None) -> Any:
        """Seal and send one order; returns Faust's delivery future."""
        order = order or self.generator.order()
        self.sent.append(order)
        return await self.topic.send(key=order["customer_id"], value=order)

    async def produce(self, count: int) -> int:
        """Send ``count`` orders and wait until the broker acknowledged all of them."""
        futures = [await self.send_order() for _ in range(count)]
        await asyncio.gather(*futures)
        return count


producer = OrderProducer(Settings.from_env())
app = producer.app


@app.timer(interval=1.0 / max(producer.settings.orders_per_second, 0.001))
async def emit_order() -> None:
    """Worker mode: one sealed order per tick."""
    await producer.send_order()


@app.command(option("--count", type=int, default=100, show_default=True, help="Orders to send."))
async def produce(self: Any, count: int) -> None:
    """Send COUNT sealed orders and exit."""
    await producer.produce(count)
    await app.producer.stop()
    print(f"sent {count} sealed orders to {producer.settings.topic!r} via {producer.settings.bootstrap}")


@app.command()
async def setup(self: Any) -> None:
    """Create the workspace and write streamproc.yaml for KAFKA_BOOTSTRAP."""
    from streamproc.devbroker import free_port

    ws = producer.workspace
    cfg = ws.write_config(producer.settings.bootstrap, free_port())
    print(f"workspace {ws.root}\nkeyring   {ws.keyring}\nconfig    {cfg}\n"
          f"next:     streamproc run --config {cfg}")


@app.command(option("--port", type=int, default=9092, show_default=True, help="Port on 127.0.0.1."))
async def dev_broker(self: Any, port: int) -> None:
    """Run the local Tansu broker on 127.0.0.1:PORT until interrupted."""
    from streamproc.devbroker import DevBroker

    with DevBroker(port=port) as broker:
        print(f"Tansu listening on {broker.bootstrap} (log: {broker.log_path}); Ctrl-C to stop", flush=True)
        while broker.running:
            await asyncio.sleep(1.0)


if __name__ == "__main__":
    app.main()
