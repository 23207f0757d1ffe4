"""A batch retried after a transient outage counts once in the risk windows.

The worker processes a batch, then a dependency fails *after* the pipeline ran (sealing
the dead letters: the quarantine KEK's KMS is down), and the same records are processed
again.  Without undoing the first attempt, its records would still be in the windows and
enforcement would release records of tuples that k records do not share yet.  Driven
through ``Worker._process`` with a fake consumer (no broker): the retried outputs must be
those of a worker that never saw the first attempt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from streamproc.client import RecordOpener, RecordSealer
from streamproc.config import load_config
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.errors import KmsUnavailable
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.batch import Batch
from streamproc.runtime.factory import build_pipeline
from streamproc.runtime.worker import Worker
from tests.unit.test_risk_pipeline import DESTS, POLICY, SCHEMA, K, visits
from tests.unit.worker_fakes import FakeConsumer, msg


def workspace(tmp: Path) -> Path:
    (tmp / "schemas").mkdir()
    (tmp / "schemas" / "visit.avsc").write_text(json.dumps(SCHEMA))
    (tmp / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    ring = LocalKeyring.create(tmp / "keys" / "keyring.json")
    for kek in ("orders-kek", "analytics-kek", "fraud-kek", "support-kek", "quarantine-kek"):
        ring.create_key(kek)
    ring.create_key("pseudonym-master", "secret")
    cfg = {
        "kafka": {"bootstrap.servers": "127.0.0.1:9"},  # never contacted
        "schemas": {"directory": "./schemas"},
        "kms": {"provider": "local", "path": "./keys/keyring.json"},
        "policy": "./policy.yaml",
        "pipelines": [{
            "sources": ["visits"], "dead_letter_topic": "visits.dlq",
            "destinations": [{"topic": d.topic, "audience": d.audience, "kek": d.kek_id} for d in DESTS],
        }],
    }
    (tmp / "streamproc.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "streamproc.yaml"


def worker(path: Path) -> Worker:
    config = load_config(path, env={})
    w = Worker(config, build_pipeline(config), backoff=Backoff(base=0.0, cap=0.0, jitter=False))
    w.consumer = FakeConsumer()  # type: ignore[assignment]
    w.assignment.owned = {("visits", 0)}
    return w


def test_a_batch_retried_after_a_late_outage_counts_once(tmp_path: Path) -> None:
    path = workspace(tmp_path)
    ring = LocalKeyring(tmp_path / "keys" / "keyring.json")
    w, fresh = worker(path), worker(path)
    sealer = RecordSealer(ring, "orders-kek", "visits", SCHEMA, w.pipeline.schemas)
    one = visits(1, 3)[0]
    records = [{**one, "visit_id": f"v{i}"} for i in range(K - 1)]  # one tuple, below k
    messages = [msg("visits", 0, i, key=None, value=v) for i, v in enumerate(sealer.seal_many(records))]

    real = w.dead_letters.seal_batch
    failures = [KmsUnavailable("quarantine KEK unreachable")]

    def seal_batch(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    w.dead_letters.seal_batch = seal_batch  # type: ignore[method-assign]
    got = w._process(Batch(messages))
    assert got is not None and not failures  # it failed once, then went through
    ref = fresh._process(Batch(messages))
    assert ref is not None
    opener = RecordOpener(ring, w.pipeline.schemas)

    def received(result: Any, topic: str) -> list[Any]:
        return [opener.decode(topic, o.value)["postcode"] for o in result.outputs if o.topic == topic]

    for topic in ("visits.suppressed", "visits.laddered"):
        assert received(got, topic) == received(ref, topic) == [None] * (K - 1)
    assert got.stats.risk["measured"].records == K - 1
