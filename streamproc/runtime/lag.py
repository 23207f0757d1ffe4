"""Consumer lag per owned partition, reported at most once per interval.

Lag is the high watermark minus the consumer's position (or, before the first fetch,
the committed offset, else the low watermark).  The watermarks are librdkafka's cached
ones: reporting costs no broker round trip, so it can run after every batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamproc.observability import Observer

TP = tuple[str, int]


class LagReporter:
    """``due()`` says whether an interval has passed; ``report()`` observes the lags.

    ``clock`` (monotonic seconds) is injectable so that tests need not sleep.
    """

    def __init__(
        self, observer: Observer, interval: float, committed: Callable[[TP], int | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.observer = observer
        self.interval = interval
        self._committed = committed
        self._clock = clock
        self._last = 0.0

    def due(self) -> bool:
        now = self._clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True

    def report(self, consumer: Consumer, owned: set[TP]) -> None:
        if not owned:
            return
        parts = [TopicPartition(t, p) for t, p in sorted(owned)]
        try:
            positions = consumer.position(parts)
        except KafkaException:
            return
        lags: dict[TP, int] = {}
        for tp in positions:
            try:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high is None or high < 0:
                continue
            pos = tp.offset if tp.offset >= 0 else (self._committed((tp.topic, tp.partition)) or low)
            lags[(tp.topic, tp.partition)] = (
                max(0, high - pos) if pos is not None and pos >= 0 else high
            )
        if lags:
            self.observer.consumer_lag(lags)
