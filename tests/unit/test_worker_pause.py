"""streamproc.runtime.pause: pause while an outage is waited out, keep serving the group,
and rewind every partition to the first record ``consume()`` returned meanwhile."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import KafkaError

from streamproc.runtime.pause import Pause
from tests.unit.worker_fakes import FakeClock, FakeConsumer, kerr, msg

TP = tuple[str, int]


class World:
    def __init__(self, owned: set[TP] | None = None) -> None:
        self.owned: set[TP] = {("orders", 1), ("orders", 0)} if owned is None else owned
        self.consumer = FakeConsumer()
        self.clock = FakeClock()
        self.stop = threading.Event()
        self.seeks: list[tuple[TP, int]] = []
        # consume() blocks for its timeout: the fake moves the clock by as much
        self.consumer.on_consume = self.clock.advance
        self.pause = Pause(
            lambda: self.consumer,  # type: ignore[arg-type,return-value]
            owned=lambda: self.owned,
            seek=lambda tp, off: self.seeks.append((tp, off)),
            stop=self.stop,
            clock=self.clock,
        )


def test_begin_pauses_the_owned_partitions_once() -> None:
    w = World()
    w.pause.begin()
    w.pause.begin()
    assert w.consumer.calls == [("pause", [("orders", 0), ("orders", 1)])]
    assert w.pause.active


def test_begin_with_nothing_owned_pauses_nothing() -> None:
    w = World(owned=set())
    w.pause.begin()
    assert w.pause.active and w.consumer.calls == []


def test_wait_serves_consume_until_the_deadline_and_remembers_the_first_dropped_offsets() -> None:
    w = World()
    w.consumer.batches = [
        [msg("orders", 2, 7), msg("orders", 2, 8)],  # newly assigned, not paused
        [msg("orders", 2, 5), msg("orders", 0, 40), msg("orders", 0, 39, error=kerr(KafkaError._PARTITION_EOF))],
        [msg("orders", 0, 41)],
    ]
    w.pause.begin()
    assert w.pause.wait(0.5) is True
    # min offset per partition; the errored message is not a record
    assert w.pause.dropped == {("orders", 2): 5, ("orders", 0): 40}
    # 0.2 + 0.2 + 0.1 s: never past the deadline
    assert [t for _n, t in w.consumer.of("consume")] == pytest.approx([0.2, 0.2, 0.1])
    assert all(n == 100 for n, _t in w.consumer.of("consume"))


def test_wait_returns_false_when_stop_is_requested() -> None:
    w = World()

    def consume(timeout: float) -> None:
        w.clock.advance(timeout)
        w.stop.set()

    w.consumer.on_consume = consume
    assert w.pause.wait(10.0) is False
    assert len(w.consumer.of("consume")) == 1


def test_end_resumes_and_rewinds_only_what_is_still_owned() -> None:
    w = World()
    w.pause.begin()
    w.pause.dropped = {("orders", 0): 40, ("orders", 2): 5}
    w.owned = {("orders", 0), ("orders", 1)}  # orders[2] went away meanwhile
    w.pause.end()
    assert w.consumer.calls[-1] == ("resume", [("orders", 0), ("orders", 1)])
    assert w.seeks == [(("orders", 0), 40)]
    assert not w.pause.active and w.pause.dropped == {}
    w.pause.end()  # not active: nothing more
    assert len(w.consumer.of("resume")) == 1


def test_hold_waits_paused_and_stays_paused() -> None:
    w = World()
    assert w.pause.hold(0.3) is True
    assert w.pause.active
    assert w.consumer.of("resume") == []


def test_hold_interrupted_by_stop_resumes_and_rewinds() -> None:
    w = World()

    def consume(timeout: float) -> None:
        w.clock.advance(timeout)
        w.stop.set()

    w.consumer.on_consume = consume
    w.consumer.batches = [[msg("orders", 1, 12)]]
    assert w.pause.hold(5.0) is False
    assert not w.pause.active
    assert w.consumer.of("resume") == [([("orders", 0), ("orders", 1)],)]
    assert w.seeks == [(("orders", 1), 12)]


def test_forget_drops_the_bookkeeping_of_revoked_partitions() -> None:
    w = World()
    w.pause.begin()
    w.pause.dropped = {("orders", 0): 40, ("orders", 1): 3}
    w.pause.forget([("orders", 1), ("orders", 9)])
    assert w.pause.dropped == {("orders", 0): 40}
