"""Health endpoints of a real worker on a real broker, wired as ``streamproc run`` wires
them: a wedged processing loop turns ``/healthz`` 503, and a broker outage makes
``/readyz`` name the broker (never the symptom, "no partitions")."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.runtime.app import build_observer as _observer
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.factory import build_pipeline
from streamproc.runtime.topics import apply_topics
from streamproc.runtime.worker import Worker
from tests.integration.conftest import make_workspace, produce_events, wait_for

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _with_metrics(ws: Any, **metrics: Any) -> None:
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["metrics"] = {"host": "127.0.0.1", "port": 0, **metrics}
    # A short transaction timeout makes a short liveness timeout valid.
    cfg["producer"] = {**cfg.get("producer", {}), "transaction.timeout.ms": 2000}
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_a_wedged_processing_loop_turns_healthz_503(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), partitions=1)
    _with_metrics(ws, liveness_timeout_seconds=3)
    config = ws.load_config()
    assert config.liveness_timeout == 3.0
    observer, server = _observer(config, 0, True)  # exactly as `streamproc run` builds them
    pipeline = build_pipeline(config, observer=observer)
    release = threading.Event()
    entered = threading.Event()
    real_process = pipeline.process

    def wedged(batch: Any) -> Any:
        # A KMS call without a timeout, a deadlock: the loop never comes back by itself.
        entered.set()
        release.wait(120)
        return real_process(batch)

    pipeline.process = wedged  # type: ignore[method-assign]
    worker = Worker(config, pipeline, instance="wedge", observer=observer)
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    try:
        url = f"{server.url}/healthz"
        wait_for(lambda: _get(url)[0] == 200, 30, what="healthz 200 while the loop runs")
        produce_events(ws, "orders", 5, seed=3)
        wait_for(entered.is_set, 60, what="the loop to wedge")
        wait_for(lambda: _get(url)[0] == 503, 30, what="healthz 503 for the wedged loop")
        code, body = _get(url)
        assert code == 503 and "no heartbeat" in body["reason"], body
        release.set()
        wait_for(lambda: _get(url)[0] == 200, 30, what="healthz 200 once the loop moves again")
    finally:
        release.set()
        worker.stop()
        t.join(30)
        server.stop()


def test_readyz_names_the_broker_during_an_outage(tmp_path: Path, unique: str) -> None:
    from streamproc.devbroker import DevBroker

    try:
        broker = DevBroker().start()
    except (OSError, RuntimeError, TimeoutError, ImportError) as exc:
        pytest.skip(f"no private Tansu broker to kill ({exc})")
    try:
        ws = make_workspace(tmp_path / "ws", broker.bootstrap, unique, sources=("orders",), partitions=1)
        apply_topics(ws.load_config())
        _with_metrics(ws)
        config = ws.load_config()
        observer, server = _observer(config, 0, True)
        worker = Worker(
            config,
            build_pipeline(config, observer=observer),
            instance="outage",
            observer=observer,
            backoff=Backoff(base=0.1, cap=0.5),
            lag_interval=0.2,
        )
        t = threading.Thread(target=worker.run, daemon=True)
        t.start()
        url = f"{server.url}/readyz"
        metrics = f"{server.url}/metrics"
        try:
            wait_for(lambda: _get(url)[0] == 200, 60, what="ready with partitions")
            text = urllib.request.urlopen(metrics, timeout=5).read().decode()
            assert 'streamproc_retries_total{dependency="broker"} 0.0' in text
            broker.stop()
            wait_for(lambda: _get(url)[0] == 503, 60, what="readyz 503 once the broker is gone")
            t_down = time.monotonic()
            reasons = []
            # Past the group's session timeout (6 s): the partitions are gone by then, and
            # the reason must still be the dependency, not the symptom.
            while time.monotonic() - t_down < 10:
                code, body = _get(url)
                reasons.append((code, body.get("reason")))
                time.sleep(0.25)
            assert set(reasons) == {(503, "broker")}, sorted(set(reasons))
            # Kafka's coordinator drops a member it cannot hear from (Tansu does not, so
            # the callback librdkafka then runs is invoked here): the reason stays.
            from confluent_kafka import TopicPartition

            worker.assignment.on_lost(worker.consumer, [TopicPartition(ws.topic("orders"), 0)])  # type: ignore[arg-type]
            assert _get(url) == (503, {"status": "not ready", "reason": "broker"})
            text = urllib.request.urlopen(metrics, timeout=5).read().decode()
            retries = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('streamproc_retries_total{dependency="broker"}')
            ]
            assert retries and retries[0] >= 1
            outage = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('streamproc_dependency_outage_seconds{dependency="broker"}')
            ]
            assert outage and outage[0] > 0
        finally:
            worker.stop()
            t.join(60)
            server.stop()
    finally:
        broker.stop()
