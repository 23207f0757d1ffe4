"""A transient KMS outage pauses and retries; it never dead-letters a record.

The worker runs in-process (a thread) so a KMS test double can be injected and a
recording Observer can show what the worker reported.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from streamproc.crypto.kms import DataKey
from streamproc.errors import KmsUnavailable
from streamproc.observability import Observer
from streamproc.runtime.backoff import Backoff
from streamproc.runtime.factory import build_pipeline
from streamproc.runtime.worker import Worker
from tests.integration.conftest import produce_events, read_topics, wait_for

pytestmark = pytest.mark.integration


class FlakyKms:
    """Wraps a real provider; while ``down`` is set every data-path call is an outage."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.down = threading.Event()
        self.refused = 0

    def _check(self) -> None:
        if self.down.is_set():
            self.refused += 1
            raise KmsUnavailable("test double: KMS unavailable")

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> DataKey:
        self._check()
        return self.inner.generate_data_key(kek_id, context)  # type: ignore[no-any-return]

    def unwrap(
        self, kek_id: str, kek_version: int, wrapped: bytes, context: Mapping[str, str]
    ) -> bytes:
        self._check()
        return self.inner.unwrap(kek_id, kek_version, wrapped, context)  # type: ignore[no-any-return]

    def is_revoked(self, kek_id: str, kek_version: int) -> bool:
        return self.inner.is_revoked(kek_id, kek_version)  # type: ignore[no-any-return]

    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        return self.inner.get_secret(key_id, version)  # type: ignore[no-any-return]


class RecordingObserver(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def _rec(self, name: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((name, args))

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [a for n, a in self.calls if n == name]

    def records_consumed(self, topic: str, partition: int, count: int) -> None:
        self._rec("records_consumed", topic, partition, count)

    def batch_processed(self, stats: object, inputs: int, seconds: float) -> None:
        self._rec("batch_processed", inputs)

    def end_to_end_latency(self, seconds: Any) -> None:
        self._rec("end_to_end_latency", len(seconds))

    def dead_lettered(self, reason: str, source_topic: str, count: int) -> None:
        self._rec("dead_lettered", reason, source_topic, count)

    def transaction(self, outcome: str) -> None:
        self._rec("transaction", outcome)

    def kms_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        self._rec("kms_call", provider, operation, outcome)

    def dek_cache(self, hits: int, misses: int) -> None:
        self._rec("dek_cache", hits, misses)

    def consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        self._rec("consumer_lag", dict(lags))

    def assignment(self, partitions: Any) -> None:
        self._rec("assignment", tuple(partitions))

    def ready(self, ready: bool, reason: str = "") -> None:
        self._rec("ready", ready, reason)

    def retrying(self, dependency: str, attempt: int) -> None:
        self._rec("retrying", dependency, attempt)


def test_kms_outage_pauses_retries_and_dead_letters_nothing(workspace_factory: Any) -> None:
    ws = workspace_factory(sources=("orders",), batch={"max_records": 50, "max_wait_ms": 50})
    first = produce_events(ws, "orders", 150, seed=21)
    config = ws.load_config()
    kms = FlakyKms(ws.kms())
    obs = RecordingObserver()
    pipeline = build_pipeline(config, kms=kms, observer=obs)  # pseudonym secret fetched while up
    kms.down.set()
    worker = Worker(
        config, pipeline, instance="transient", observer=obs, backoff=Backoff(base=0.1, cap=0.5)
    )
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.start()
    try:
        wait_for(lambda: len(obs.of("retrying")) >= 4, 40, what="retries during the outage")
        # More records arrive while the partitions are paused.
        second = produce_events(ws, "orders", 100, seed=22)
        wait_for(lambda: len(obs.of("retrying")) >= 6, 20, what="more retries")
        assert not obs.of("transaction"), "nothing may be committed during the outage"
        kms.down.clear()
        dests = ws.destinations()
        expected = set(first.records) | set(second.records)
        out = read_topics(
            ws.bootstrap,
            [*dests, ws.dlq("orders")],
            until=lambda r: all({x.source[1:] for x in r[d]} >= expected for d in dests),
            timeout=60,
        )
    finally:
        worker.stop()
        t.join(30)
    assert rc == [0]
    assert kms.refused >= 4
    for d in dests:
        seen = Counter(x.source[1:] for x in out[d])
        assert set(seen) == expected and max(seen.values()) == 1, d
    assert not out[ws.dlq("orders")], "an outage must never dead-letter"
    assert not obs.of("dead_lettered")
    assert worker.aborts == 0
    # What the observer was told, in order: retrying kms / not ready, then ready again.
    retries = obs.of("retrying")
    assert {r[0] for r in retries} == {"kms"}
    assert [r[1] for r in retries[:3]] == [1, 2, 3]
    readies = obs.of("ready")
    assert (False, "kms") in readies
    last_down = max(i for i, r in enumerate(readies) if r == (False, "kms"))
    assert any(r[0] for r in readies[last_down + 1 :]), "ready(True) after recovery"
    assert ("local", "unwrap", "unavailable") in obs.of("kms_call")
    assert ("local", "unwrap", "ok") in obs.of("kms_call")
    assert ("local", "generate_data_key", "ok") in obs.of("kms_call")
    assert set(obs.of("transaction")) == {("committed",)}
    assert sum(a[2] for a in obs.of("records_consumed")) >= len(expected)
    assert obs.of("batch_processed") and obs.of("dek_cache") and obs.of("end_to_end_latency")
    assert obs.of("assignment")[0] and obs.of("consumer_lag")


def test_at_least_once_mode_delivers_everything(workspace_factory: Any) -> None:
    """processing_guarantee: at_least_once -- idempotent producer, flush, then commit."""
    from tests.integration.conftest import committed_offsets

    ws = workspace_factory(sources=("orders",), extra={"processing_guarantee": "at_least_once"})
    produced = produce_events(ws, "orders", 200, seed=31)
    config = ws.load_config()
    assert not config.exactly_once
    obs = RecordingObserver()
    worker = Worker(config, build_pipeline(config, observer=obs), instance="alo", observer=obs)
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(worker.run()), daemon=True)
    t.start()
    try:
        dests = ws.destinations()
        out = read_topics(
            ws.bootstrap,
            dests,
            until=lambda r: all(
                {x.source[1:] for x in r[d]} >= set(produced.records) for d in dests
            ),
            timeout=60,
        )
        wait_for(lambda: worker.records_committed >= 200, 20, what="offset commits")
    finally:
        worker.stop()
        t.join(30)
    assert rc == [0]
    for d in dests:
        assert {x.source[1:] for x in out[d]} == set(produced.records)
    assert not obs.of("transaction"), "no transactions under at_least_once"
    committed = committed_offsets(ws.bootstrap, ws.group_id, ws.topic("orders"), 3)
    ends: dict[int, int] = {}
    for p, o in produced.records:
        ends[p] = max(ends.get(p, -1), o + 1)
    assert all(committed[p] == end for p, end in ends.items())
