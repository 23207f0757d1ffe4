"""Exactly-once against real Apache Kafka: zero duplicates after three SIGKILLs.

Tansu (the default test broker) shows records of aborted transactions to read_committed
consumers, so on Tansu the crash test can only prove zero *loss*.  This module proves
zero *duplicates* too, on a real broker:

* ``STREAMPROC_TEST_BOOTSTRAP`` naming a real Kafka cluster (and ``STREAMPROC_TEST_BROKER``
  not ``tansu``), or
* a Docker engine, through testcontainers' ``KafkaContainer``.

Without either it skips with the reason (docs/testing.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import WorkerProcess, docker_engine_available, make_workspace
from tests.integration.test_worker_crash import BATCH, run_crash_scenario

pytestmark = [pytest.mark.integration, pytest.mark.docker]


@pytest.fixture(scope="module")
def real_kafka() -> Iterator[str]:
    external = os.environ.get("STREAMPROC_TEST_BOOTSTRAP")
    if external and os.environ.get("STREAMPROC_TEST_BROKER", "kafka").lower() != "tansu":
        yield external
        return
    ok, reason = docker_engine_available()
    if not ok:
        pytest.skip(f"real Kafka needs a Docker engine or STREAMPROC_TEST_BOOTSTRAP: {reason}")
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as kafka:
        yield kafka.get_bootstrap_server()


def test_exactly_once_zero_duplicates_on_real_kafka(
    real_kafka: str, tmp_path: Path, workers: list[WorkerProcess], request: Any, unique: str
) -> None:
    from streamproc.runtime.topics import apply_topics

    ws = make_workspace(
        tmp_path / "ws",
        real_kafka,
        unique,
        sources=("orders",),
        batch={"max_records": BATCH, "max_wait_ms": 50},
    )
    apply_topics(ws.load_config())
    missing, dups, _ = run_crash_scenario(ws, workers, request)
    assert missing == 0
    assert dups == 0, f"{dups} duplicates: read_committed must hide aborted transactions"
    final = workers[-1]
    final.terminate()
    assert final.wait(30) == 0
