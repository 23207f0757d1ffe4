"""Per-subject privacy budgets through the real worker on Kafka: exhaustion, SIGKILL,
rebalance.

The analytics audience noises ``amount_cents`` (geometric, epsilon ``EPS`` per record)
under a budget of ``BUDGET`` per subject and day, so each subject may receive
``floor(BUDGET / EPS)`` noised amounts; every later record of that subject reaches
analytics with ``amount_cents`` null.  Inputs are keyed by subject (exact accounting).
Outputs are read back with ``read_committed`` and counted per subject (by ``order_id``,
which the test chose): the expected count comes from the policy's numbers, not from the
accountant.

* **SIGKILL**: a worker processes part of the stream, is SIGKILLed while records keep
  arriving, and a new instance finishes it.  The new one restores the budget states from
  the changelog (written in the killed worker's committed transactions; the open one was
  aborted): every subject gets exactly its allowance, no double spend, no lost spend.
* **Rebalance**: two workers share the two input partitions; one stops, the other takes
  its partition over and restores that partition's states before processing it.
* The changelog topic is compacted, partitioned like the input, keyed by audience and
  subject token (never the subject), each subject's state on its input partition.

Real Kafka only (Tansu shows aborted transactions to read_committed readers).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    Broker,
    Watermarks,
    WorkerProcess,
    Workspace,
    make_workspace,
    producer,
    read_topics,
    wait_for,
)

pytestmark = pytest.mark.integration

EPS = 0.5
BUDGET = 2.0
ALLOWANCE = math.floor(BUDGET / EPS + 1e-9)  # noised amounts per subject: 4
SUBJECTS = [f"cust-{i:02d}-{c}" for i, c in enumerate("abcdefgh")]
ROUNDS = 9  # records per subject (more than the allowance)


@pytest.fixture
def real_kafka(kafka_broker: Broker) -> Broker:
    if kafka_broker.kind == "tansu":
        pytest.skip("Tansu shows aborted transactions to read_committed readers")
    return kafka_broker


def budget_workspace(root: Path, bootstrap: str, suffix: str) -> Workspace:
    from streamproc.runtime.topics import apply_topics

    ws = make_workspace(root, bootstrap, suffix, sources=("orders",), partitions=2,
                        batch={"max_records": 6, "max_wait_ms": 50})  # fmt: skip
    schema = json.loads((ws.schemas / "order.avsc").read_text())
    for f in schema["fields"]:
        if f["name"] == "amount_cents":
            f["confluent:tags"] = ["AMOUNT"]
    (ws.schemas / "order.avsc").write_text(json.dumps(schema))
    policy = yaml.safe_load(ws.policy.read_text())
    analytics = policy["audiences"]["analytics"]
    analytics["tags"]["AMOUNT"] = {"op": "dp_noise", "mechanism": "geometric", "epsilon": EPS, "bounds": [0, 100000]}
    analytics["budget"] = {"epsilon": BUDGET, "window": "1d"}
    ws.policy.write_text(yaml.safe_dump(policy, sort_keys=False))
    apply_topics(ws.load_config())
    return ws


class Orders:
    """Orders of every subject in rounds, keyed by subject; order ids name subject and round."""

    def __init__(self, ws: Workspace) -> None:
        from streamproc.client.generator import EventGenerator

        self.ws, self.sealer, self.gen = ws, ws.sealer("orders"), EventGenerator(3)
        self.p = producer(ws.bootstrap)
        self.partition_of: dict[str, int] = {}
        self.sent: list[str] = []

    def send(self, rounds: range, rate: float = 0.0) -> None:
        for r in rounds:
            for s in SUBJECTS:
                rec = self.gen.order()
                rec.update(customer_id=s, order_id=f"{s}/{r}")

                def done(err: Any, msg: Any, s: str = s) -> None:
                    assert err is None, err
                    self.partition_of[s] = msg.partition()

                self.p.produce(self.ws.topic("orders"), key=s.encode(), value=self.sealer.seal(rec), on_delivery=done)
                self.sent.append(rec["order_id"])
                self.p.poll(0)
                if rate:
                    time.sleep(1.0 / rate)
        assert self.p.flush(30) == 0


def analytics_rows(ws: Workspace, expect: set[str], timeout: float = 60) -> list[dict[str, Any]]:
    """Every analytics output (read_committed), decoded, once all ``expect`` ids are in."""
    opener, topic = ws.opener(), ws.dest("orders", "analytics")

    def rows(recs: dict[str, list[Any]]) -> list[dict[str, Any]]:
        return [opener.open(topic, r.value)[1] for r in recs[topic] if r.value is not None]

    got = read_topics(ws.bootstrap, [topic], until=lambda r: expect <= {x["order_id"] for x in rows(r)}, timeout=timeout)
    return rows(got)


def assert_allowance(rows: list[dict[str, Any]], sent: list[str], log: str) -> None:
    ids = Counter(r["order_id"] for r in rows)
    assert set(ids) == set(sent) and all(n == 1 for n in ids.values()), f"not exactly once\n{log[-3000:]}"
    released = Counter(r["order_id"].split("/")[0] for r in rows if r["amount_cents"] is not None)
    # no double spend, no lost spend: exactly the allowance per subject
    assert {s: released[s] for s in SUBJECTS} == dict.fromkeys(SUBJECTS, ALLOWANCE), f"{released}\n{log[-3000:]}"
    assert all(r["customer_id"].startswith("tk1_") for r in rows)


def assert_changelog(ws: Workspace, orders: Orders) -> None:
    """Compacted, partitioned like the input; per subject one state on its input
    partition, keyed by a token; the last state has the whole budget spent."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    from streamproc.privacy.budget import SubjectState

    topic = ws.load_config().budget_changelog_topic
    assert topic == f"{ws.group_id}.budget-changelog"
    admin = AdminClient({"bootstrap.servers": ws.bootstrap})
    described = next(iter(admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values())).result(30)
    assert described["cleanup.policy"].value == "compact"
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 2
    last: dict[tuple[int, bytes], bytes | None] = {}
    for r in read_topics(ws.bootstrap, [topic], timeout=30, idle=1.0)[topic]:
        assert r.key is not None and r.key.startswith(b"analytics\x00") and len(r.key) == len(b"analytics\x00") + 16
        assert not any(s.encode() in r.key + (r.value or b"") for s in SUBJECTS)
        last[(r.partition, r.key)] = r.value
    assert len(last) == len(SUBJECTS)  # one key per subject: every subject stayed on its partition
    assert Counter(p for p, _ in last) == Counter(orders.partition_of[s] for s in SUBJECTS)
    for value in last.values():
        assert value is not None
        assert SubjectState.from_bytes(value).spent().epsilon == pytest.approx(ALLOWANCE * EPS)


def test_budget_survives_sigkill_without_double_spend(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess]
) -> None:
    ws = budget_workspace(tmp_path / "ws", real_kafka.bootstrap, unique)
    orders = Orders(ws)
    orders.send(range(0, 3))  # 3 per subject: within the allowance
    w = WorkerProcess(ws, "--instance", "one", name="w1")
    workers.append(w)
    analytics_rows(ws, set(orders.sent))  # all committed
    # more records arrive; the worker dies mid-stream (SIGKILL: an open transaction stays)
    progress = Watermarks(ws.bootstrap, [ws.dest("orders", "analytics")])
    start = progress.total()
    feeder = threading.Thread(target=orders.send, args=(range(3, ROUNDS), 60.0))
    feeder.start()
    wait_for(lambda: progress.total() >= start + 8 or not w.alive(), 60, interval=0.02, what="progress")
    w.proc.send_signal(signal.SIGKILL)
    w.wait(10)
    progress.close()
    # a new instance (same name: it fences the dead one's transactional.id)
    w2 = WorkerProcess(ws, "--instance", "one", name="w2")
    workers.append(w2)
    feeder.join(60)
    rows = analytics_rows(ws, set(orders.sent))
    assert_allowance(rows, orders.sent, w2.log())
    restored = [e for e in w2.log_events() if e.get("message") == "state restored"]
    assert restored and sum(e["records"] for e in restored) > 0, w2.log()[-3000:]
    assert_changelog(ws, orders)
    topic = ws.load_config().budget_changelog_topic
    assert topic is not None
    committed = len(read_topics(ws.bootstrap, [topic], timeout=30, idle=1.0)[topic])
    written = len(read_topics(ws.bootstrap, [topic], timeout=30, idle=1.0, isolation="read_uncommitted")[topic])
    print(
        f"\n[budget] SIGKILL: subjects={len(SUBJECTS)} records={len(orders.sent)} allowance={ALLOWANCE} "
        f"restored_records={sum(e['records'] for e in restored)} changelog_committed={committed} "
        f"changelog_aborted_hidden={written - committed}"
    )
    w2.terminate()
    assert w2.wait(60) == 0, w2.log()[-3000:]


def test_budget_moves_with_the_partition_on_rebalance(
    real_kafka: Broker, tmp_path: Path, unique: str, workers: list[WorkerProcess]
) -> None:
    ws = budget_workspace(tmp_path / "ws", real_kafka.bootstrap, unique)
    orders = Orders(ws)
    a = WorkerProcess(ws, "--instance", "a", name="a")
    b = WorkerProcess(ws, "--instance", "b", name="b")
    workers += [a, b]
    a.wait_assigned(60)
    b.wait_assigned(60)
    wait_for(lambda: all(  # both hold one partition (a second rebalance gave b its share)
        any(e.get("message") == "partitions assigned" and e.get("count") == 1 for e in x.log_events()) for x in (a, b)
    ), 60, what="one partition each")  # fmt: skip
    orders.send(range(0, 3))
    analytics_rows(ws, set(orders.sent))
    b.terminate()  # leaves the group: a gets b's partition and its budget states
    assert b.wait(60) == 0, b.log()[-3000:]
    orders.send(range(3, ROUNDS))
    rows = analytics_rows(ws, set(orders.sent))
    assert_allowance(rows, orders.sent, a.log())
    restored = [e for e in a.log_events() if e.get("message") == "state restored"]
    assert sum(e["records"] for e in restored) > 0, a.log()[-3000:]
    assert_changelog(ws, orders)
