"""streamproc.runtime.report: step 8, what the observer and the log learn per batch."""

from __future__ import annotations

import logging
import time

import pytest

from streamproc.crypto.dek_cache import DekCacheStats
from streamproc.errors import Reason
from streamproc.pipeline.core import BatchResult, BatchStats, InputRecord, Quarantined
from streamproc.runtime.batch import Batch
from streamproc.runtime.report import report_commit
from tests.unit.worker_fakes import RecordingObserver, msg


class FakePipeline:
    def dek_cache_stats(self) -> DekCacheStats:
        return DekCacheStats(hits=41, misses=3)


def q(topic: str, offset: int, reason: Reason) -> Quarantined:
    rec = InputRecord(topic, 0, offset, b"secret-key", b"secret-value")
    return Quarantined(rec, reason, f"detail {offset}")


def test_report_counts_dead_letters_per_reason_and_topic_and_latency_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    obs = RecordingObserver()
    batch = Batch([msg("orders", 0, 1, timestamp=(1, 1_000)), msg("logins", 0, 2, timestamp=(0, 5)),
                   msg("orders", 0, 3, timestamp=(1, 3_000))])  # fmt: skip
    quarantined = [
        q("orders", 1, Reason.TAMPERED),
        q("orders", 3, Reason.TAMPERED),
        q("orders", 4, Reason.OVERSIZED),
        q("logins", 2, Reason.TAMPERED),
    ]
    result = BatchResult([], quarantined, BatchStats())
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    before = time.time()
    report_commit(obs, FakePipeline(), {"orders": "orders.dlq"}, batch, result)  # type: ignore[arg-type]
    after = time.time()
    ((now, stamps),) = obs.of("end_to_end_latency_ms")
    assert before <= now <= after and stamps == [1_000, 3_000]
    assert sorted(obs.of("dead_lettered")) == sorted(
        [
            (Reason.TAMPERED.value, "orders", 2),
            (Reason.OVERSIZED.value, "orders", 1),
            (Reason.TAMPERED.value, "logins", 1),
        ]
    )
    assert obs.of("dek_cache") == [(41, 3)]
    lines = [r for r in caplog.records if r.getMessage().startswith("record dead-lettered")]
    assert [(r.topic, r.offset, r.reason, r.dlq_topic) for r in lines] == [  # type: ignore[attr-defined]
        ("orders", 1, Reason.TAMPERED.value, "orders.dlq"),
        ("orders", 3, Reason.TAMPERED.value, "orders.dlq"),
        ("orders", 4, Reason.OVERSIZED.value, "orders.dlq"),
        ("logins", 2, Reason.TAMPERED.value, None),
    ]
    assert "secret" not in caplog.text


def test_report_without_timestamps_or_dead_letters() -> None:
    obs = RecordingObserver()
    batch = Batch([msg("orders", 0, 1, timestamp=(0, 0))])
    report_commit(obs, FakePipeline(), {}, batch, BatchResult([], [], BatchStats()))  # type: ignore[arg-type]
    assert obs.calls == [("dek_cache", 41, 3)]
