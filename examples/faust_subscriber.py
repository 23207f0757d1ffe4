"""A Faust app that reads ``orders.analytics`` with the analytics audience's key only.

The processor (``streamproc run``) writes one sanitized copy of every order per audience.
This subscriber opens the analytics copy with an
:class:`~streamproc.integrations.faust.OpeningSchema` whose KMS view holds ``analytics-kek``
and nothing else (:class:`~streamproc.integrations.ScopedKms`: in production, the
subscriber's Vault or IAM policy), and counts orders per *tokenized* customer: analytics
sees ``customer_id`` and ``email`` as ``tk1_...`` tokens, which are stable per customer, so
aggregations work without anyone in analytics seeing who the customer is.  The card
number is not there at all (dropped by the policy), the IP address is cut to its /24.

Records that cannot be opened (a foreign KEK, a record copied in from another topic,
garbage) are skipped, counted per reason and logged without their value
(``on_error="skip"``; set ``SUBSCRIBER_ON_ERROR=raise`` to let them crash the agent, which
Faust then restarts -- see ``streamproc.integrations.faust``).

Run (after steps 1-2 of ``examples/faust_producer.py``, which also creates the workspace)::

    export STREAMPROC_WORKSPACE=$PWD/.faust-demo KAFKA_BOOTSTRAP=127.0.0.1:9092
    python examples/faust_subscriber.py worker -l info
    # or: PYTHONPATH=. faust -A examples.faust_subscriber worker -l info

Every ``REPORT_EVERY`` seconds (default 10) it prints the number of orders received, the
top customers by orders (as tokens) and revenue per currency.  Environment as for the
producer, plus ``ANALYTICS_TOPIC`` (default ``orders.analytics``), ``ANALYTICS_KEK``
(default ``analytics-kek``), ``SUBSCRIBER_ON_ERROR`` and ``REPORT_EVERY``.

The counts live in process memory, which keeps the example small; for counts that
survive restarts and scale out, use a ``faust.Table`` keyed by the token (repartition the
stream by it with ``group_by``: the record key is tokenized in another domain).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import faust

from streamproc.client import RecordOpener
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.integrations import ScopedKms
from streamproc.integrations.faust import (
    TANSU_APP_SETTINGS,
    OnError,
    RecordOpenError,
    StreamprocTopic,
    opened_topic,
)
from streamproc.schema.registry import build_schema_source


@dataclass(frozen=True)
class Settings:
    bootstrap: str = "127.0.0.1:9092"
    workspace: Path = Path(".faust-demo")
    topic: str = "orders.analytics"
    kek: str = "analytics-kek"
    app_id: str = "streamproc-faust-subscriber"
    on_error: OnError = "skip"
    report_every: float = 10.0
    app_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            bootstrap=env.get("KAFKA_BOOTSTRAP", cls.bootstrap),
            workspace=Path(env.get("STREAMPROC_WORKSPACE", str(cls.workspace))).resolve(),
            topic=env.get("ANALYTICS_TOPIC", cls.topic),
            kek=env.get("ANALYTICS_KEK", cls.kek),
            on_error=cast(OnError, env.get("SUBSCRIBER_ON_ERROR", cls.on_error)),
            report_every=float(env.get("REPORT_EVERY", cls.report_every)),
        )


@dataclass
class OrderStats:
    """What analytics may compute: counts per tokenized customer, revenue per currency."""

    received: int = 0
    orders_per_customer: Counter[str] = field(default_factory=Counter)
    revenue_cents: Counter[str] = field(default_factory=Counter)

    def add(self, order: dict[str, Any]) -> None:
        self.received += 1
        self.orders_per_customer[order["customer_id"]] += 1
        self.revenue_cents[order["currency"]] += order["amount_cents"]

    def report(self, top: int = 5) -> str:
        lines = [f"{self.received} orders from {len(self.orders_per_customer)} customers"]
        lines += [f"  {token[:24]}...  {n} orders" for token, n in self.orders_per_customer.most_common(top)]
        lines += [f"  revenue {cur}: {cents / 100:,.2f}" for cur, cents in sorted(self.revenue_cents.items())]
        return "\n".join(lines)


class AnalyticsSubscriber:
    """The Faust app, its opened topic and the counting agent."""

    def __init__(self, settings: Settings, on_order: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        root = settings.workspace
        keyring = root / "keys" / "keyring.json"
        if not keyring.exists():
            raise SystemExit(
                f"no keyring at {keyring}: create the workspace first with "
                "`python examples/faust_producer.py setup` (same STREAMPROC_WORKSPACE)"
            )
        # Least privilege: this process can unwrap data keys under its audience's KEK only.
        kms = ScopedKms(LocalKeyring(keyring), {settings.kek})
        opener = RecordOpener(kms, build_schema_source(str(root / "schemas")))
        self.stats = OrderStats()
        self.skipped: Counter[str] = Counter()
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{settings.bootstrap}",
            store="memory://",
            web_enabled=False,
            worker_redirect_stdouts_level="INFO",  # print() is output here, not a warning
            Topic=StreamprocTopic,
            **{**TANSU_APP_SETTINGS, **settings.app_options},
        )
        self.topic = opened_topic(
            self.app, settings.topic, opener=opener, on_error=settings.on_error, on_skip=self._on_skip
        )

        @self.app.agent(self.topic, name="count_orders")
        async def count_orders(stream: faust.StreamT[dict[str, Any]]) -> None:
            async for order in stream:
                if self.stats.received == 0:
                    print(f"first order as analytics sees it: {order}", flush=True)
                self.stats.add(order)
                if on_order is not None:
                    on_order(order)

        @self.app.timer(interval=settings.report_every)
        async def report() -> None:
            print(self.stats.report(), flush=True)

    def _on_skip(self, err: RecordOpenError) -> None:
        # err names topic, partition, offset and reason -- never the record's content.
        self.skipped[err.reason] += 1


subscriber = AnalyticsSubscriber(Settings.from_env())
app = subscriber.app

if __name__ == "__main__":
    app.main()
