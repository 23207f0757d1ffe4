"""Pausing the owned partitions while a transient outage is waited out.

The batch in hand is retried after a backoff; meanwhile ``consume()`` must still be
called (it runs the rebalance callbacks and keeps ``max.poll.interval.ms`` from
expiring), so the partitions are paused.  Whatever ``consume()`` returns anyway (a newly
assigned partition is not paused) is dropped, and on resume its partition is rewound to
the first dropped offset so nothing is skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from confluent_kafka import Consumer, TopicPartition

TP = tuple[str, int]


class Pause:
    """Pause/wait/resume bookkeeping of one consumer (see the module docstring).

    ``owned`` returns the partitions the worker owns now; ``seek`` rewinds one of them;
    ``clock`` (monotonic seconds) bounds :meth:`wait` (tests pass their own).
    """

    def __init__(
        self,
        consumer: Callable[[], Consumer | None],
        *,
        owned: Callable[[], set[TP]],
        seek: Callable[[TP, int], None],
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._owned = owned
        self._seek = seek
        self._stop = stop
        self._clock = clock
        self.active = False
        #: Per partition, the first offset ``consume()`` returned while paused.
        self.dropped: dict[TP, int] = {}

    def _parts(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self._owned())]

    def begin(self) -> None:
        if self.active:
            return
        consumer = self._consumer()
        assert consumer is not None
        self.active = True
        self.dropped = {}
        parts = self._parts()
        if parts:
            consumer.pause(parts)

    def hold(self, seconds: float) -> bool:
        """Pause (if not yet) and wait; False, resumed, if stop was requested meanwhile."""
        self.begin()
        if self.wait(seconds):
            return True
        self.end()
        return False

    def wait(self, seconds: float) -> bool:
        """Wait while serving rebalances and group heartbeats; False if stop was requested."""
        consumer = self._consumer()
        assert consumer is not None
        dropped = self.dropped
        deadline = self._clock() + seconds
        while not self._stop.is_set():
            left = deadline - self._clock()
            if left <= 0:
                return True
            for m in consumer.consume(100, min(left, 0.2)):
                if m.error() is None:
                    tp, moff = (m.topic(), m.partition()), m.offset()
                    off = dropped.get(tp)  # type: ignore[arg-type]
                    if off is None or moff < off:  # type: ignore[operator]
                        dropped[tp] = moff  # type: ignore[index,assignment]
        return False

    def end(self) -> None:
        """Resume; rewind every owned partition to the first record dropped while paused
        (it is after the batch in its partition, or from a newly assigned partition)."""
        if not self.active:
            return
        consumer = self._consumer()
        assert consumer is not None
        self.active = False
        parts = self._parts()
        if parts:
            consumer.resume(parts)
        owned = self._owned()
        for tp, off in self.dropped.items():
            if tp in owned:
                self._seek(tp, off)
        self.dropped = {}

    def forget(self, gone: Iterable[TP]) -> None:
        """Partitions revoked while paused: their new owner starts from the committed offset."""
        for tp in gone:
            self.dropped.pop(tp, None)
