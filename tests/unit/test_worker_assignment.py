"""streamproc.runtime.assignment: owned partitions through rebalances, seek and rewind."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streamproc.runtime.assignment import Assignment
from streamproc.runtime.batch import Batch
from streamproc.runtime.checkpoint import (
    AtLeastOnceCheckpoint,
    FatalWorkerError,
    InvariantViolation,
    TransactionalCheckpoint,
)
from streamproc.runtime.health import Health
from tests.unit.worker_fakes import (
    BROKER_TEXT,
    FakeClock,
    FakeConsumer,
    RecordingObserver,
    kerr,
    msg,
)

TP = tuple[str, int]


class AbortingProducer:
    def __init__(self) -> None:
        self.aborts = 0

    def abort_transaction(self, timeout: float) -> None:
        self.aborts += 1


class World:
    def __init__(self, checkpoint: object = None) -> None:
        self.obs = RecordingObserver()
        self.consumer = FakeConsumer()
        self.cp = checkpoint
        self.gone: list[set[TP]] = []
        self.a = Assignment(
            self.obs, consumer=lambda: self.consumer, checkpoint=lambda: self.cp  # type: ignore[arg-type,return-value]
        )
        self.a.on_gone = self.gone.append


def parts(*tps: TP) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t, p in tps]


def test_assign_then_revoke_and_lose() -> None:
    cp = AtLeastOnceCheckpoint(None, None)
    cp.committed = {("orders", 0): 10, ("orders", 1): 20, ("orders", 2): 30}
    w = World(cp)
    w.a.on_assign(None, parts(("orders", 1), ("orders", 0)))  # type: ignore[arg-type]
    assert w.a.owned == {("orders", 0), ("orders", 1)}
    # someone else may have committed meanwhile: forget what we knew for those
    assert cp.committed == {("orders", 2): 30}
    w.a.on_assign(None, parts(("orders", 2)))  # type: ignore[arg-type]
    assert w.obs.of("assignment") == [
        ([("orders", 0), ("orders", 1)],),
        ([("orders", 0), ("orders", 1), ("orders", 2)],),
    ]
    cp.committed = {("orders", 0): 11, ("orders", 1): 21}
    w.a.on_revoke(None, parts(("orders", 0)))  # type: ignore[arg-type]
    w.a.on_lost(None, parts(("orders", 2)))  # type: ignore[arg-type]
    assert w.a.owned == {("orders", 1)}
    assert w.a.revoked_in_flight == {("orders", 0), ("orders", 2)}
    assert cp.committed == {("orders", 1): 21}
    assert w.gone == [{("orders", 0)}, {("orders", 2)}]
    assert w.obs.of("assignment")[-2:] == [([("orders", 1), ("orders", 2)],), ([("orders", 1)],)]


def test_rebalance_callbacks_before_the_checkpoint_exists() -> None:
    w = World(None)
    w.a.on_assign(None, parts(("orders", 0)))  # type: ignore[arg-type]
    assert w.a.committed(("orders", 0)) is None
    w.a.on_revoke(None, parts(("orders", 0)))  # type: ignore[arg-type]
    assert w.a.owned == set() and w.gone == [{("orders", 0)}]


def test_an_assignment_means_the_broker_answers_and_readiness_follows() -> None:
    w = World()
    w.a.health = h = Health(w.obs, owned=lambda: w.a.owned, paused=lambda: False, clock=FakeClock())
    h.broker_down(1)
    w.a.on_assign(None, parts(("orders", 0)))  # type: ignore[arg-type]
    assert w.obs.of("dependency_restored") == [("broker",)]
    assert w.obs.of("ready")[-1] == (True, "")
    w.a.on_revoke(None, parts(("orders", 0)))  # type: ignore[arg-type]
    assert w.obs.of("ready")[-1] == (False, "no partitions")


def test_a_rebalance_with_an_open_transaction_aborts_it(caplog: pytest.LogCaptureFixture) -> None:
    producer = AbortingProducer()
    cp = TransactionalCheckpoint(producer, None)
    cp.txn_open = True
    w = World(cp)
    w.a.owned = {("orders", 0)}
    caplog.set_level(logging.WARNING, "streamproc.runtime.worker")
    w.a.on_revoke(None, parts(("orders", 0)))  # type: ignore[arg-type]
    assert producer.aborts == 1 and cp.txn_open is False
    assert "rebalance with an open transaction; aborting it" in caplog.text
    w.a.on_lost(None, parts(("orders", 0)))  # type: ignore[arg-type]
    assert producer.aborts == 1  # nothing open any more


def test_rewind_seeks_owned_partitions_to_the_batch_start() -> None:
    cp = AtLeastOnceCheckpoint(None, None)
    cp.committed = {("orders", 0): 100}
    w = World(cp)
    w.a.owned = {("orders", 0), ("orders", 1)}
    batch = Batch([msg("orders", 0, 100), msg("orders", 1, 7), msg("orders", 2, 3), msg("orders", 0, 101)])
    w.a.rewind(batch)
    # orders[2] is not ours any more: its new owner starts from the committed offset
    assert w.consumer.of("seek") == [(("orders", 0), 100), (("orders", 1), 7)]


def test_rewind_before_the_committed_offset_is_an_invariant_violation() -> None:
    cp = AtLeastOnceCheckpoint(None, None)
    cp.committed = {("orders", 0): 101}
    w = World(cp)
    w.a.owned = {("orders", 0)}
    with pytest.raises(InvariantViolation, match=r"^orders\[0\]: batch starts at 100, before the committed 101$"):
        w.a.rewind(Batch([msg("orders", 0, 100)]))
    assert w.consumer.of("seek") == []


def test_a_failed_seek_is_fatal_and_names_partition_offset_and_error() -> None:
    w = World()
    w.consumer.seek_error = KafkaException(kerr(KafkaError._STATE))
    with pytest.raises(FatalWorkerError) as ei:
        w.a.seek(("orders", 3), 42)
    assert str(ei.value) == "seek orders[3] to 42: _STATE"
    assert BROKER_TEXT not in str(ei.value)
