"""End to end on a real broker: encrypted orders and logins through a worker subprocess.

Every output record is opened with the subscriber SDK and every field's treatment is
checked against policy.yaml; provenance headers must map each output back to the input
record at that source offset.  The CLI's ``produce``/``consume`` commands are exercised on
the way (logins are produced with ``streamproc produce``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections import Counter, defaultdict
from typing import Any

import pytest
from click.testing import CliRunner

from streamproc.cli.consume import consume
from streamproc.cli.produce import produce
from streamproc.crypto import envelope
from streamproc.crypto.provenance import H_PROVENANCE, parse_header
from tests.integration.conftest import (
    AUDIENCES,
    WorkerProcess,
    produce_events,
    read_topics,
)

pytestmark = pytest.mark.integration

N = 300
TOKEN = re.compile(r"^tk\d+_[A-Za-z0-9_-]{22}$")
DETERMINISTIC = re.compile(r"^de\d+_[A-Za-z0-9_-]+$")


class Tokens:
    """Checks that a token is well-formed and a function of its (normalized) input."""

    def __init__(self) -> None:
        self.fwd: dict[tuple[str, str], str] = {}
        self.back: dict[tuple[str, str], str] = {}

    def check(self, domain: str, plain: str, token: Any) -> None:
        assert isinstance(token, str) and TOKEN.match(token), f"{domain}: not a token"
        assert token != plain
        prev = self.fwd.setdefault((domain, plain), token)
        assert prev == token, f"{domain}: equal inputs gave different tokens"
        prev_plain = self.back.setdefault((domain, token), plain)
        assert prev_plain == plain, f"{domain}: different inputs gave the same token"


def _masked(out: str, plain: str, keep_last: int) -> None:
    assert len(out) == len(plain)
    assert out.endswith(plain[-keep_last:])
    assert set(out[: -keep_last or None]) <= {"*"}


def _ip24(out: str, plain: str) -> None:
    assert out.endswith("/24") or ":" in plain
    if ":" not in plain:
        assert ipaddress.ip_address(plain) in ipaddress.ip_network(out)


def check_order(aud: str, inp: dict[str, Any], out: dict[str, Any], toks: Tokens) -> None:
    for f in ("order_id", "amount_cents", "currency", "items", "coupon_code"):
        assert out[f] == inp[f], f
    assert out["placed_at"] == inp["placed_at"]
    a_in, a_out = inp["shipping_address"], out["shipping_address"]
    assert a_out["city"] == a_in["city"] and a_out["country"] == a_in["country"]
    birth = inp["birth_date"]
    if aud == "analytics":
        toks.check("customer", inp["customer_id"], out["customer_id"])
        toks.check("email", inp["email"].strip().lower(), out["email"])
        for dropped in ("card_number", "phone"):
            assert dropped not in out
        assert "street" not in a_out
        _ip24(out["ip_address"], inp["ip_address"])
        assert out["birth_date"] == dt.date(birth.year, 1, 1)
        assert a_out["postcode"] == a_in["postcode"].split(" ")[0]
    elif aud == "fraud":
        toks.check("customer", inp["customer_id"], out["customer_id"])
        assert DETERMINISTIC.match(out["email"])
        _masked(out["card_number"], inp["card_number"], 4)
        assert out["ip_address"] == inp["ip_address"]
        assert abs((out["birth_date"] - birth).days) <= 30
        assert a_out["postcode"] == a_in["postcode"]
        assert a_out["street"] != a_in["street"]  # redacted
        if inp["phone"] is None:
            assert out["phone"] is None
        else:
            _masked(out["phone"], inp["phone"], 2)
    else:  # support
        assert out["customer_id"] == inp["customer_id"]
        assert out["email"][:2] == inp["email"][:2] and out["email"] != inp["email"]
        _masked(out["card_number"], inp["card_number"], 4)
        assert "ip_address" not in out
        assert out["birth_date"] is None
        assert a_out["street"] == a_in["street"] and a_out["postcode"] == a_in["postcode"]
        if inp["phone"] is not None:
            _masked(out["phone"], inp["phone"], 4)


def check_login(aud: str, inp: dict[str, Any], out: dict[str, Any], toks: Tokens) -> None:
    for f in ("event_id", "method", "success", "risk_score"):
        assert out[f] == inp[f], f
    assert out["occurred_at"] == inp["occurred_at"]
    dev_in, dev_out = inp["device"], out["device"]
    assert (dev_in is None) == (dev_out is None)
    if aud == "analytics":
        toks.check("customer", inp["customer_id"], out["customer_id"])
        toks.check("email", inp["username"].strip().lower(), out["username"])
        assert len(out["recovery_emails"]) == len(inp["recovery_emails"])
        for p, t in zip(inp["recovery_emails"], out["recovery_emails"], strict=True):
            toks.check("email", p.strip().lower(), t)
        _ip24(out["ip_address"], inp["ip_address"])
        if dev_in is not None:
            assert dev_out["user_agent"] == dev_in["user_agent"]
            toks.check("device", dev_in["device_id"], dev_out["device_id"])
            assert "geo" not in dev_out
    elif aud == "fraud":
        toks.check("customer", inp["customer_id"], out["customer_id"])
        assert DETERMINISTIC.match(out["username"])
        assert out["ip_address"] == inp["ip_address"]
        if dev_in is not None:
            assert dev_out["device_id"] == dev_in["device_id"]
    else:
        assert out["customer_id"] == inp["customer_id"]
        assert "ip_address" not in out
        if dev_in is not None:
            assert "device_id" not in dev_out and "geo" not in dev_out


def _source_inputs(
    ws: Any, source: str
) -> dict[tuple[int, int], tuple[bytes | None, dict[str, Any]]]:
    """Read a source topic back and open it: (partition, offset) -> (key, record).

    Decoded with logical types, like the outputs, so dates compare as dates.
    """
    opener = ws.opener()
    recs = read_topics(
        ws.bootstrap, [ws.topic(source)], until=lambda r: len(r[ws.topic(source)]) >= N
    )[ws.topic(source)]
    return {(r.partition, r.offset): (r.key, opener.decode(r.topic, r.value)) for r in recs}


@pytest.mark.tansu_smoke
def test_orders_and_logins_end_to_end(workspace_factory: Any, workers: list[WorkerProcess]) -> None:
    ws = workspace_factory()
    produce_events(ws, "orders", N, seed=1)
    runner = CliRunner()
    res = runner.invoke(
        produce,
        [
            "--config", str(ws.config_path), "--topic", ws.topic("logins"),
            "--schema", str(ws.schemas / "login.avsc"), "--kek", "logins-kek",
            "--generate", "login", "--count", str(N), "--seed", "2",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    inputs = {s: _source_inputs(ws, s) for s in ("orders", "logins")}
    assert all(len(v) == N for v in inputs.values())

    w = WorkerProcess(ws)
    workers.append(w)
    dests = ws.destinations()
    out = read_topics(
        ws.bootstrap, dests, until=lambda r: all(len(r[t]) >= N for t in dests), timeout=60
    )
    assert {t: len(v) for t, v in out.items()} == {t: N for t in dests}, w.log()[-3000:]

    opener = ws.opener()
    policy_versions: set[str | None] = set()
    toks = {a: Tokens() for a in AUDIENCES}
    refs: defaultdict[tuple[str, int, int], set[str]] = defaultdict(set)
    for source, check in (("orders", check_order), ("logins", check_login)):
        for aud in AUDIENCES:
            topic = ws.dest(source, aud)
            seen: Counter[tuple[int, int]] = Counter()
            for rec in out[topic]:
                # One compact header; the source is resolved from its audience-keyed reference.
                assert [k for k, _ in rec.headers] == [H_PROVENANCE]
                prov = parse_header(rec.header(H_PROVENANCE) or "")
                src_topic, part, off = rec.source
                assert src_topic == ws.topic(source)
                seen[(part, off)] += 1
                key_in, inp = inputs[source][(part, off)]
                assert prov.audience == aud and prov.key_version == 1 and prov.ref is not None
                refs[(source, part, off)].add(prov.ref)
                assert rec.value is not None and envelope.parse_header(rec.value).kek_id == f"{aud}-kek"
                policy_versions.add(prov.policy_version)
                if aud == "support":
                    assert rec.key == key_in
                else:
                    toks[aud].check("record_key", key_in.decode(), rec.key.decode())
                check(aud, inp, opener.decode(topic, rec.value), toks[aud])
            assert set(seen) == set(inputs[source]) and max(seen.values()) == 1, topic
    assert len(policy_versions) == 1 and next(iter(policy_versions)).startswith("sha256:")
    # No two audiences' copies of one source record share a reference (nothing to join on).
    assert all(len(r) == len(AUDIENCES) for r in refs.values()) and len(refs) == 2 * N
    dlq = read_topics(ws.bootstrap, [ws.dlq("orders"), ws.dlq("logins")], idle=0.5)
    assert all(not v for v in dlq.values())

    # The subscriber CLI prints opened records as JSON lines with ISO dates.
    res = runner.invoke(
        consume,
        ["--config", str(ws.config_path), "--topic", ws.dest("orders", "analytics"),
         "--from-beginning", "--max", "5", "--timeout", "10", "--headers"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 5
    for line in lines:
        assert TOKEN.match(line["value"]["customer_id"])
        dt.date.fromisoformat(line["value"]["birth_date"])
        dt.datetime.fromisoformat(line["value"]["placed_at"])
        assert parse_header(line["headers"][H_PROVENANCE]).audience == "analytics"
        assert "card_number" not in line["value"]

    # SIGTERM: drains and exits 0.
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]


def test_sigterm_mid_stream_drains_commits_and_exits_zero(
    workspace_factory: Any, workers: list[WorkerProcess], kafka_bootstrap: str
) -> None:
    """SIGTERM while records flow: exit 0, and the committed offsets cover exactly the outputs."""
    from tests.integration.conftest import Ticker, Watermarks, committed_offsets, wait_for

    ws = workspace_factory(sources=("orders",), batch={"max_records": 20, "max_wait_ms": 50})
    ticker = Ticker(ws, "orders", total=3000, rate=300).start()
    w = WorkerProcess(ws)
    workers.append(w)
    dest = ws.dest("orders", "analytics")
    progress = Watermarks(kafka_bootstrap, [dest])
    try:
        wait_for(
            lambda: progress.total() >= 100 or not w.alive(),
            40,
            interval=0.05,
            what="first outputs",
        )
    finally:
        progress.close()
    w.terminate()
    assert w.wait(30) == 0, w.log()[-3000:]
    ticker.join()
    events = w.log_events()
    assert any(e.get("message", "").startswith("stopped after") for e in events)
    # Everything the worker wrote is covered by its committed offsets and vice versa.
    committed = committed_offsets(kafka_bootstrap, ws.group_id, ws.topic("orders"), 3)
    outs = read_topics(kafka_bootstrap, [dest], idle=1.0)[dest]
    by_part: dict[int, set[int]] = defaultdict(set)
    for r in outs:
        _, p, o = r.source
        by_part[p].add(o)
    produced = ticker.produced.records
    for p in range(3):
        expected = (
            {o for (pp, o) in produced if pp == p and o < committed.get(p, -1)}
            if committed.get(p, -1001) >= 0
            else set()
        )
        assert by_part[p] == expected, f"partition {p}: outputs and committed offsets disagree"
    assert sum(len(v) for v in by_part.values()) < len(produced), (
        "the stop should have come mid-stream"
    )
