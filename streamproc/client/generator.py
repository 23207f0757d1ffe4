"""Realistic fake events for the demo, tests and benchmarks (Faker, seeded).

Every value is synthetic.  ``canary`` mode plants unmistakable marker strings in every
sensitive field so tests can prove that no plaintext value survives a transform or
reaches a log line.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

from faker import Faker

EPOCH = dt.date(1970, 1, 1)
CANARY_PREFIX = "CANARY"


class EventGenerator:
    def __init__(self, seed: int = 7, locale: str = "en_GB") -> None:
        self.fake = Faker(locale)
        self.fake.seed_instance(seed)
        self.rng = random.Random(seed)
        self._customers = [f"cust-{self.rng.randrange(10**8):08d}" for _ in range(500)]

    def _customer(self) -> str:
        return self.rng.choice(self._customers)

    def order(self, canary: bool = False, edge: bool = False) -> dict[str, Any]:
        """One order.  ``canary``: marker strings in every sensitive field; ``edge`` (with
        ``canary``) uses the forms that defeat reducing operators: a postcode without its
        separator, and the canary IPv4 address inside an IPv6 form (6to4, IPv4-mapped,
        NAT64, IPv4-compatible)."""
        f, r = self.fake, self.rng
        items: list[dict[str, Any]] = [
            {"sku": f"SKU-{r.randrange(10**5):05d}", "quantity": r.randint(1, 4), "unit_price_cents": r.randint(199, 19999)}
            for _ in range(r.randint(1, 3))
        ]
        rec: dict[str, Any] = {
            "order_id": f"ord-{r.randrange(10**10):010d}",
            "customer_id": self._customer(),
            "email": f.email(),
            "card_number": f.credit_card_number(card_type="visa16"),
            "ip_address": f.ipv4_public(),
            "birth_date": (f.date_of_birth(minimum_age=18, maximum_age=90) - EPOCH).days,
            "amount_cents": sum(i["quantity"] * i["unit_price_cents"] for i in items),
            "currency": r.choice(["GBP", "EUR", "USD"]),
            "placed_at": int(f.date_time_between("-30d", "now", tzinfo=dt.UTC).timestamp() * 1000),
            "shipping_address": {
                "street": f.street_address(),
                "city": f.city(),
                "postcode": f.postcode(),
                "country": "GB",
            },
            "items": items,
            "coupon_code": r.choice([None, None, f"SAVE{r.randint(5, 30)}"]),
            "phone": r.choice([None, f.phone_number()]),
        }
        if canary:
            n = r.randrange(10**6)
            rec.update(
                customer_id=f"{CANARY_PREFIX}CUST{n}",
                email=f"{CANARY_PREFIX.lower()}{n}@canary.invalid",
                card_number=f"4000{n:012d}",
                ip_address=f"198.51.{n % 250}.{(n // 250) % 250 + 1}",
                phone=f"+44{CANARY_PREFIX}PHONE{n}",
            )
            rec["shipping_address"]["street"] = f"{CANARY_PREFIX}STREET{n}"
            rec["shipping_address"]["postcode"] = f"{CANARY_PREFIX}PC{n} 1AA"
            if edge:
                rec["shipping_address"]["postcode"] = f"{CANARY_PREFIX}PC{n}1AA"
                v4 = rec["ip_address"]
                a, b, c, d = (int(x) for x in v4.split("."))
                rec["ip_address"] = r.choice([
                    f"2002:{a:02x}{b:02x}:{c:02x}{d:02x}::{n % 65535 + 1:x}",  # 6to4
                    f"2002:{a:02x}{b:02x}:{c:02x}{d:02x}::{n % 65535 + 1:x}",
                    f"::ffff:{v4}",
                    f"64:ff9b::{v4}",
                    f"::{v4}",
                ])
        return rec

    def login(self, canary: bool = False) -> dict[str, Any]:
        f, r = self.fake, self.rng
        rec = {
            "event_id": f.uuid4(),
            "customer_id": self._customer(),
            "username": f.email(),
            "ip_address": r.choice([f.ipv4_public(), f.ipv6()]),
            "occurred_at": int(f.date_time_between("-30d", "now", tzinfo=dt.UTC).timestamp() * 1000),
            "method": r.choice(["PASSWORD", "SSO", "PASSKEY"]),
            "success": r.random() > 0.1,
            "recovery_emails": [f.email() for _ in range(r.randint(0, 2))],
            "device": r.choice([None, {
                "user_agent": f.user_agent(),
                "device_id": f"dev-{f.uuid4()}",
                "geo": {"lat": float(f.latitude()), "lon": float(f.longitude())},
            }]),
            "risk_score": round(r.random(), 3),
        }
        if canary:
            n = r.randrange(10**6)
            rec.update(
                customer_id=f"{CANARY_PREFIX}CUST{n}",
                username=f"{CANARY_PREFIX.lower()}{n}@canary.invalid",
                recovery_emails=[f"{CANARY_PREFIX.lower()}rec{n}@canary.invalid"],
                device={"user_agent": "ua", "device_id": f"{CANARY_PREFIX}DEV{n}", "geo": {"lat": 1.5, "lon": 2.5}},
            )
        return rec

    def events(self, kind: str, n: int, canary: bool = False) -> Iterator[dict[str, Any]]:
        make = {"order": self.order, "login": self.login}[kind]
        for _ in range(n):
            yield make(canary)
