"""Exactly-once against real Apache Kafka: zero duplicates after three SIGKILLs.

Tansu shows records of aborted transactions to read_committed consumers, so on Tansu the
crash test can only prove zero *loss*.  This module proves zero *duplicates* too, on the
session's real Kafka broker: Apache Kafka from Maven Central (the default,
``STREAMPROC_TEST_BROKER=kafka``), testcontainers (``docker``), or an external cluster.
It skips only when the session runs on Tansu (``STREAMPROC_TEST_BROKER=tansu``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Broker, WorkerProcess
from tests.integration.test_worker_crash import BATCH, run_crash_scenario

pytestmark = pytest.mark.integration


def test_exactly_once_zero_duplicates_on_real_kafka(
    kafka_broker: Broker, workspace_factory: Any, workers: list[WorkerProcess], request: Any
) -> None:
    if kafka_broker.kind == "tansu":
        pytest.skip("this session runs on Tansu, which shows aborted transactions")
    ws = workspace_factory(sources=("orders",), batch={"max_records": BATCH, "max_wait_ms": 50})
    missing, dups, _ = run_crash_scenario(ws, workers, request)
    assert missing == 0
    assert dups == 0, f"{dups} duplicates: read_committed must hide aborted transactions"
    final = workers[-1]
    final.terminate()
    assert final.wait(30) == 0
