"""A real Prometheus scrapes the processor and sees exactly the ground truth.

Prometheus (the Debian package's binary) runs on a free 127.0.0.1 port with a temporary
config that scrapes two metrics ports every second, storage in a temp dir.  Two scenarios
feed it:

* ``test_real_worker_*``: a real :class:`~streamproc.runtime.worker.Worker`, in-process,
  on the test broker (Tansu via DevBroker unless configured otherwise), reporting to
  :class:`Metrics` exactly as in production; canary records plus tampered, malformed and
  unknown-key records are produced to Kafka.  The worker's JSON log output is captured and
  checked for canary values too (the canary test of tests/unit extended to the worker).
* ``test_in_process_pipeline_*``: no broker; sealed records go through ``Pipeline.process``
  and are reported the way the worker reports them.

Both then push a 20x burst of decryptions after the anomaly detector warmed up on an
injected clock and check that Prometheus sees ``streamproc_anomalies_total{kind=
"decryption_spike"}`` rise.  Every wait is bounded.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.observability.anomaly import AnomalyConfig
from streamproc.observability.logging import configure_logging
from streamproc.observability.metrics import KnownLabels, Metrics
from streamproc.observability.server import start_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ANOMALY = AnomalyConfig(interval=1.0, warmup_intervals=3, max_gap_intervals=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Prometheus:
    url: str
    targets: list[int]
    proc: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> float | None:
        """The value of a PromQL expression that yields at most one sample."""
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            data = json.load(r)
        assert data["status"] == "success", data
        result = data["data"]["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, want: Callable[[float | None], bool], timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        got: float | None = None
        while time.monotonic() < deadline:
            got = self.query(expr)
            if want(got):
                return got
            time.sleep(0.25)
        raise AssertionError(f"Prometheus: {expr} = {got} after {timeout}s")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    targets = [free_port(), free_port()]
    port = free_port()
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "streamproc",
            "scrape_interval": "1s",
            "scrape_timeout": "900ms",
            "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = tmp / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", targets, proc, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture()
def captured_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging("DEBUG", "json", stream=buf)
    yield buf
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def sel(port: int, **labels: str) -> str:
    parts = [f'instance="127.0.0.1:{port}"'] + [f'{k}="{v}"' for k, v in labels.items()]
    return "{" + ",".join(parts) + "}"


def registry_value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def burst_and_check(prom: Prometheus, port: int, metrics: Metrics, clock: FakeClock,
                    push: Callable[[int], None], decrypted: Callable[[], float]) -> None:
    """Silence, warm-up at 10 per interval, then 200 in one interval: one decryption_spike."""
    spike = f"sum(streamproc_anomalies_total{sel(port, kind='decryption_spike')})"
    assert prom.wait_value(spike, lambda v: v == 0.0) == 0.0
    clock.t += 100 * ANOMALY.interval  # long silence: the baseline starts over
    metrics.tick()
    for n in [10] * (ANOMALY.warmup_intervals + 2) + [200]:
        before = decrypted()
        push(n)
        target = before + n
        wait_for(lambda: decrypted() >= target, 30, f"{n} decryptions")  # noqa: B023 - called at once
        clock.t += ANOMALY.interval
        metrics.tick()
    assert registry_value(metrics, "streamproc_anomalies_total", kind="decryption_spike") == 1
    prom.wait_value(spike, lambda v: v == 1.0)


# -- a real worker on a real broker -------------------------------------------------------------
def test_real_worker_counters_and_anomaly_seen_by_prometheus(
    prometheus: Prometheus, workspace_factory: Callable[..., Any], captured_logs: io.StringIO
) -> None:
    from streamproc.client import RecordSealer
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.runtime.factory import build_pipeline
    from streamproc.runtime.worker import Worker
    from tests.integration.conftest import produce_events, produce_raw

    ws = workspace_factory(sources=("orders",), partitions=1)
    # The producers' KEK is named (source_keks), so decryptions by KEK are labelled with it;
    # ghost-kek is allowed too, so that its records reach the KMS and fail as unknown_key.
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["pipelines"][0]["source_keks"] = ["orders-kek", "ghost-kek"]
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = ws.load_config()
    clock = FakeClock()
    known = KnownLabels.from_config(config)
    metrics = Metrics(allowed_destinations=config.destination_topics, anomaly=ANOMALY, clock=clock, known=known)
    pipeline = build_pipeline(config, observer=metrics)
    worker = Worker(config, pipeline, observer=metrics, lag_interval=0.2)
    port = prometheus.targets[0]
    server = start_server(metrics, "127.0.0.1", port)
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    topic = ws.topic("orders")
    try:
        # Ground truth: canary orders, plus records that must be dead-lettered.
        n_good = 60
        produced = produce_events(ws, "orders", n_good, canary=True)
        planted = [str(r[f]) for r in produced.records.values() for f in ("customer_id", "email", "card_number", "ip_address")]
        good_vals = list(produced.values.values())
        tampered = [v[:-4] + bytes(b ^ 0xFF for b in v[-4:]) for v in good_vals[:3] if v]
        ghost = LocalKeyring.create(ws.root / "ghost.json")
        ghost.create_key("ghost-kek")
        ghost_vals = RecordSealer(ghost, "ghost-kek", topic, ws.schema_json("orders"), ws.schema_source()).seal_many(
            [produced.records[k] for k in list(produced.records)[:2]])
        produce_raw(ws.bootstrap, topic, [(b"k", v, None) for v in [*tampered, *ghost_vals, b"CANARY not an envelope", b"\x01CANARY"]])
        truth_dlq = {"tampered": 3, "unknown_key": 2, "malformed_envelope": 1, "unsupported_version": 1}

        wait_for(lambda: registry_value(metrics, "streamproc_decryptions_total", topic=topic, kek_id="orders-kek") >= n_good
                 and sum(registry_value(metrics, "streamproc_dead_letters_total", topic=topic, reason=r) for r in truth_dlq) >= 7,
                 45, "the worker to process everything")

        prometheus.wait_value(f"sum(streamproc_decryptions_total{sel(port, topic=topic, kek_id='orders-kek')})", lambda v: v == n_good)
        for dest in config.destination_topics:
            prometheus.wait_value(f"sum(streamproc_egress_records_total{sel(port, topic=dest)})", lambda v: v == n_good)
        for reason, n in truth_dlq.items():
            want = float(n)
            prometheus.wait_value(f"sum(streamproc_dead_letters_total{sel(port, topic=topic, reason=reason)})", lambda v: v == want)  # noqa: B023
        prometheus.wait_value(f"sum(streamproc_records_consumed_total{sel(port, topic=topic)})", lambda v: v == n_good + 7)
        prometheus.wait_value(f"sum(streamproc_transactions_total{sel(port, outcome='committed')})", lambda v: v is not None and v >= 1)
        prometheus.wait_value(f"sum(streamproc_ready{sel(port)})", lambda v: v == 1.0)
        prometheus.wait_value(f"sum(streamproc_anomalies_total{sel(port, kind='unknown_key')})", lambda v: v is not None and v >= 1)

        seed = [100]

        def push(n: int) -> None:
            seed[0] += 1
            produce_events(ws, "orders", n, seed=seed[0])

        burst_and_check(prometheus, port, metrics, clock, push,
                        lambda: registry_value(metrics, "streamproc_decryptions_total", topic=topic, kek_id="orders-kek"))
    finally:
        worker.stop()
        thread.join(30)
        server.stop()
    assert not thread.is_alive()

    # The worker's own log lines (JSON, root at DEBUG) carry no canary value.
    lines = captured_logs.getvalue().splitlines()
    assert any("dead-lettered" in ln for ln in lines) and any("partitions assigned" in ln for ln in lines)
    for ln in lines:
        assert "canary" not in ln.lower(), ln
        for v in planted:
            assert v not in ln, (v, ln)


# -- the pipeline alone, no broker ------------------------------------------------------------------
def test_in_process_pipeline_counters_and_anomaly_seen_by_prometheus(prometheus: Prometheus, tmp_path: Path) -> None:
    from streamproc.client import RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto.envelope import Opener
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
    from streamproc.policy import load_policy
    from streamproc.schema.registry import build_schema_source

    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    k = LocalKeyring.create(tmp_path / "k.json")
    for kid in ("orders-kek", "analytics-kek", "fraud-kek"):
        k.create_key(kid)
    k.create_key("pseudonym-master", "secret")
    schemas = build_schema_source(str(tmp_path / "schemas"))
    dests = [{"topic": "orders.analytics", "audience": "analytics", "kek": "analytics-kek"},
             {"topic": "orders.fraud", "audience": "fraud", "kek": "fraud-kek"}]
    pipeline = Pipeline(routes=build_routes([{"sources": ["orders"], "source_keks": ["orders-kek"], "destinations": dests}]),
                        policy=load_policy(str(ROOT / "policy.yaml")), opener=Opener.for_kms(k), kms=k,
                        schemas=schemas, keys=PseudonymKeys(k, "pseudonym-master"))
    sealer = RecordSealer(k, "orders-kek", "orders", json.loads((ROOT / "schemas" / "order.avsc").read_text()), schemas)
    gen = EventGenerator(seed=5)
    clock = FakeClock()
    known = KnownLabels.of(topics=["orders", *(d["topic"] for d in dests)], audiences=[d["audience"] for d in dests],
                           kek_ids=["orders-kek", *(d["kek"] for d in dests)])
    metrics = Metrics(allowed_destinations=[d["topic"] for d in dests], anomaly=ANOMALY, clock=clock, known=known)
    pipeline.instrument_kms(metrics)
    port = prometheus.targets[1]
    offset = [0]

    def run(values: list[bytes]) -> None:
        """What the worker does per batch, minus Kafka."""
        inputs = [InputRecord("orders", 0, offset[0] + i, b"k", v, int(time.time() * 1000)) for i, v in enumerate(values)]
        offset[0] += len(inputs)
        metrics.records_consumed("orders", 0, len(inputs))
        t0 = time.perf_counter()
        res = pipeline.process(inputs)
        metrics.batch_processed(res.stats, len(inputs), time.perf_counter() - t0)
        metrics.transaction("committed")
        metrics.end_to_end_latency([0.01] * len(inputs))
        by_reason: dict[str, int] = {}
        for q in res.quarantined:
            by_reason[q.reason.value] = by_reason.get(q.reason.value, 0) + 1
        for reason, n in by_reason.items():
            metrics.dead_lettered(reason, "orders", n)
        cache = pipeline.dek_cache_stats()
        metrics.dek_cache(cache.hits, cache.misses)

    with start_server(metrics, "127.0.0.1", port):
        metrics.assignment([("orders", 0)])
        metrics.ready(True)
        good = sealer.seal_many([gen.order(canary=True) for _ in range(50)])
        bad = [v[:-2] + b"\x00\x00" for v in good[:4]] + [b"\x01\x02"]
        for i in range(0, 50, 10):
            run(good[i:i + 10])
        run(bad)
        prometheus.wait_value(f"sum(streamproc_decryptions_total{sel(port, topic='orders', kek_id='orders-kek')})", lambda v: v == 50)
        for d in dests:
            prometheus.wait_value(f"sum(streamproc_egress_records_total{sel(port, topic=d['topic'], audience=d['audience'])})", lambda v: v == 50)
        prometheus.wait_value(f"sum(streamproc_dead_letters_total{sel(port, reason='tampered')})", lambda v: v == 4)
        prometheus.wait_value(f"sum(streamproc_dead_letters_total{sel(port, reason='malformed_envelope')})", lambda v: v == 1)
        prometheus.wait_value(f"sum(streamproc_kms_calls_total{sel(port, provider='local', operation='unwrap', outcome='ok')})", lambda v: v == 1)
        prometheus.wait_value(f"sum(streamproc_batch_size_count{sel(port)})", lambda v: v == 6)
        prometheus.wait_value(f"sum(streamproc_ready{sel(port)})", lambda v: v == 1)

        def push(n: int) -> None:
            run(sealer.seal_many([gen.order() for _ in range(n)]))

        burst_and_check(prometheus, port, metrics, clock, push,
                        lambda: registry_value(metrics, "streamproc_decryptions_total", topic="orders", kek_id="orders-kek"))


def test_every_dashboard_query_is_valid_promql(prometheus: Prometheus) -> None:
    """Grafana shows a broken query as an empty panel; a real Prometheus parses each one.

    ``$job`` and ``$__rate_interval`` are substituted as Grafana would.
    """
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "streamproc.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert len(exprs) >= 20
    for expr in exprs:
        q = expr.replace("$__rate_interval", "1m").replace("$job", "streamproc")
        url = f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': q})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                data = json.load(r)
        except urllib.error.HTTPError as exc:  # 400 bad_data: the message says where
            data = json.load(exc)
        assert data["status"] == "success", (expr, data.get("error"))
