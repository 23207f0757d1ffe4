"""/metrics, /healthz, /readyz for one process, and the multiprocess aggregate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from streamproc.observability.metrics import KnownLabels, Metrics
from streamproc.observability.server import (
    mark_worker_dead,
    setup_multiprocess,
    start_aggregate_server,
    start_server,
)


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_single_process_endpoints() -> None:
    m = Metrics(anomaly=False, known=KnownLabels.of(topics=["orders"]))
    m.records_consumed("orders", 0, 42)
    with start_server(m, "127.0.0.1", 0) as srv:
        code, ctype, body = get(f"{srv.url}/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        assert samples(body)[("streamproc_records_consumed_total", (("partition", "0"), ("topic", "orders")))] == 42
        code, ctype, _ = get(f"{srv.url}/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert code == 200 and ctype.startswith("application/openmetrics-text")

        assert get(f"{srv.url}/healthz")[0] == 200
        code, ctype, body = get(f"{srv.url}/readyz")
        assert code == 503 and ctype == "application/json"
        assert json.loads(body) == {"status": "not ready", "reason": "starting"}

        m.ready(True)
        m.assignment([("orders", 0)])
        code, _, body = get(f"{srv.url}/readyz")
        assert code == 200 and json.loads(body)["status"] == "ready"

        m.ready(False, "kms unreachable")
        code, _, body = get(f"{srv.url}/readyz")
        assert code == 503 and json.loads(body)["reason"] == "kms unreachable"

        assert get(f"{srv.url}/nope")[0] == 404
        m.close()
        assert get(f"{srv.url}/healthz")[0] == 503


def test_liveness_timeout_uses_heartbeats() -> None:
    m = Metrics(anomaly=False)
    with start_server(m, "127.0.0.1", 0, liveness_timeout=30) as srv:
        assert get(f"{srv.url}/healthz")[0] == 200
        m._last_beat -= 60  # the processing loop stopped calling in
        code, _, body = get(f"{srv.url}/healthz")
        assert code == 503 and "heartbeat" in json.loads(body)["reason"]
        m.heartbeat()
        assert get(f"{srv.url}/healthz")[0] == 200


# -- multiprocess -------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import sys
    from streamproc.observability.metrics import KnownLabels, Metrics
    from streamproc.pipeline.core import BatchStats
    i, partitions = int(sys.argv[1]), int(sys.argv[2])
    m = Metrics(worker=i, anomaly=False, known=KnownLabels.of(topics=["orders"], kek_ids=["orders-kek"]))
    m.records_consumed("orders", i, 10 * (i + 1))
    m.batch_processed(BatchStats(decryptions={("orders", "orders-kek"): 7}), 7, 0.01)
    m.consumer_lag({("orders", i): 100 + i})
    m.assignment([("orders", p) for p in range(i, i + partitions)])
    m.ready(partitions > 0, "" if partitions else "no partitions")   # as the worker does
    print("up", flush=True)
    sys.stdin.readline()   # stay alive until the test closes stdin
    """
)


@pytest.fixture()
def mpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # setup_multiprocess changes process-global state; undo it for the other tests.
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    path = setup_multiprocess(tmp_path / "mp")
    yield path
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def spawn(i: int, partitions: int = 1) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(partitions)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "up"
    return p


def stop(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(timeout=10)


def test_multiprocess_aggregate_scrape_and_readiness(mpdir: str) -> None:
    with start_aggregate_server("127.0.0.1", 0, expected_workers=2) as srv:
        code, _, body = get(f"{srv.url}/readyz")
        assert code == 503 and json.loads(body)["reason"] == "no live workers"
        procs = [spawn(0), spawn(1, partitions=0)]  # worker 1 idle: more workers than partitions
        try:
            code, _, body = get(f"{srv.url}/metrics")
            assert code == 200
            s = samples(body)
            assert s[("streamproc_decryptions_total", (("kek_id", "orders-kek"), ("topic", "orders")))] == 14
            assert s[("streamproc_records_consumed_total", (("partition", "0"), ("topic", "orders")))] == 10
            assert s[("streamproc_records_consumed_total", (("partition", "1"), ("topic", "orders")))] == 20
            assert s[("streamproc_workers", ())] == 2
            assert s[("streamproc_assigned_partitions", ())] == 1
            assert s[("streamproc_batch_size_count", ())] == 2
            assert s[("streamproc_consumer_lag", (("partition", "0"), ("topic", "orders")))] == 100
            ready = {k[1]: v for k, v in s.items() if k[0] == "streamproc_ready"}
            assert len(ready) == 2  # one series per live worker (pid label)

            code, _, body = get(f"{srv.url}/readyz")
            assert code == 200, body
            assert sorted(w["worker"] for w in json.loads(body)["workers"]) == [0, 1]
            assert get(f"{srv.url}/healthz")[0] == 200

            stop(procs[1])
            mark_worker_dead(procs[1].pid)
            code, _, body = get(f"{srv.url}/readyz")
            assert code == 503 and json.loads(body)["reason"] == "1/2 workers running"
            s = samples(get(f"{srv.url}/metrics")[2])
            # Counts of the dead worker stay; its live gauges go.
            assert s[("streamproc_decryptions_total", (("kek_id", "orders-kek"), ("topic", "orders")))] == 14
            assert s[("streamproc_workers", ())] == 1
        finally:
            for p in procs:
                if p.poll() is None:
                    stop(p)


def test_aggregate_server_requires_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError):
        start_aggregate_server("127.0.0.1", 0, path=tmp_path / "missing")


def test_setup_multiprocess_clears_old_files(mpdir: str) -> None:
    Path(mpdir, "counter_999999.db").write_bytes(b"stale")
    Path(mpdir, "streamproc_worker_999999.json").write_text("{}")
    setup_multiprocess(mpdir)
    assert os.listdir(mpdir) == []
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == mpdir


def test_workers_stale_heartbeat_fails_aggregate_liveness(mpdir: str) -> None:
    state = {"pid": os.getpid(), "worker": 0, "ready": True, "reason": "", "partitions": 1, "alive": True,
             "heartbeat": time.time() - 120}
    Path(mpdir, f"streamproc_worker_{os.getpid()}.json").write_text(json.dumps(state))
    with start_aggregate_server("127.0.0.1", 0, liveness_timeout=60) as srv:
        code, _, body = get(f"{srv.url}/healthz")
        assert code == 503 and "heartbeat" in json.loads(body)["reason"]
        assert get(f"{srv.url}/readyz")[0] == 200
