"""Dependency and readiness tracking of one worker: what is down, and what /readyz says.

The worker retries its dependencies (broker, KMS, schema registry) instead of exiting;
while one is being retried /readyz names it and the ``retries`` series counts the
attempts, and when it answers again ``dependency_restored`` is reported once.  An outage
outranks "no partitions": the group drops a worker that cannot reach the broker, and the
reason an operator needs is the broker, not the symptom.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Producer

from streamproc.errors import (
    KmsUnavailable,
    SchemaRegistryUnavailable,
    SealingUnavailable,
    TransientError,
)
from streamproc.observability import Observer
from streamproc.runtime.access import AccessGuard
from streamproc.runtime.checkpoint import AccessDenied

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before


def dependency_of(exc: BaseException) -> str:
    """The ``dependency`` label of a transient outage (metrics, readiness reason)."""
    if isinstance(exc, KmsUnavailable):
        return "kms"
    if isinstance(exc, SchemaRegistryUnavailable):
        return "schema_registry"
    return "dependency"


class Health:
    """Dependencies currently down (with the time each went down) and readiness.

    ``owned`` and ``paused`` read the worker's state: readiness is "no partitions" while
    nothing is assigned and "paused" while a transient outage is waited out.  ``clock``
    (monotonic seconds) orders the outages and times the broker's; tests pass their own.
    """

    def __init__(
        self, observer: Observer, *, owned: Callable[[], object], paused: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.observer = observer
        self._owned = owned
        self._paused = paused
        self._clock = clock
        #: Dependencies (broker, kms, schema_registry) currently being retried: while any
        #: is down, /readyz names it, even after the partitions were lost because of it.
        self.down: dict[str, float] = {}
        self._broker_down_since: float | None = None
        self.broker_attempt = 0
        #: The committer thread reports broker retries while the loop reports the rest.
        self._lock = threading.RLock()

    def ready(self) -> None:
        """Report readiness from the worker's state (see the module docstring)."""
        with self._lock:
            self._ready()

    def _ready(self) -> None:
        if self.down:
            self.observer.ready(False, min(self.down, key=self.down.__getitem__))
        elif not self._owned():
            self.observer.ready(False, "no partitions")
        else:
            paused = self._paused()
            self.observer.ready(not paused, "paused" if paused else "")

    def broker_down(self, attempt: int) -> None:
        with self._lock:
            self._broker_down(attempt)

    def _broker_down(self, attempt: int) -> None:
        if self._broker_down_since is None:
            self._broker_down_since = self._clock()
            log.warning("broker unavailable; retrying")
        self.observer.retrying("broker", attempt)
        self.down.setdefault("broker", self._clock())
        self.ready()

    def broker_ok(self) -> None:
        with self._lock:
            self._broker_ok()

    def _broker_ok(self) -> None:
        if self._broker_down_since is not None:
            log.info(
                "broker reachable again",
                extra={"seconds": round(self._clock() - self._broker_down_since, 3)},
            )
            self._broker_down_since = None
            self.broker_attempt = 0
            if self.down.pop("broker", None) is not None:
                self.observer.dependency_restored("broker")
            self.ready()

    def transport_error(self) -> None:
        """librdkafka lost the brokers (it reconnects by itself): count an attempt."""
        self.broker_attempt += 1
        self.broker_down(self.broker_attempt)

    def probe_broker(self, consumer: Consumer, topic: str) -> None:
        """While the broker is believed down, a metadata round trip may say it is back
        (idle partitions bring no record to say so)."""
        if "broker" not in self.down:
            return
        try:
            consumer.list_topics(topic, timeout=1.0)
        except KafkaException:
            return
        self.broker_ok()

    def dependency_down(self, exc: TransientError, attempt: int, records: int) -> None:
        """A transient outage (KMS, schema registry...) holds up a batch of ``records``."""
        dep = dependency_of(exc)
        with self._lock:
            self.down.setdefault(dep, self._clock())
        log.warning(
            "transient outage (%s); pausing and retrying the batch",
            type(exc).__name__,
            extra={
                "dependency": dep,
                "attempt": attempt,
                "records": records,
                # value-free by construction (configured topic and KEK, error class)
                "detail": exc.detail if isinstance(exc, SealingUnavailable) else None,
            },
        )
        self.observer.retrying(dep, attempt)
        self.ready()

    def dependencies_restored(self) -> None:
        """The batch went through: every dependency but the broker answers again."""
        with self._lock:
            gone = [d for d in self.down if d != "broker"]
            for dep in gone:
                del self.down[dep]
        for dep in gone:
            self.observer.dependency_restored(dep)
        self.ready()


class CheckpointHealth:
    """The checkpoint's view of broker health (``down(attempt)`` / ``ok()``).

    ``down`` also serves librdkafka's error callback: an authentication failure shows up
    there only, while the blocking call merely times out, and waiting cannot fix it.
    """

    def __init__(
        self, health: Health, access: AccessGuard, producer: Callable[[], Producer | None]
    ) -> None:
        self._health = health
        self._access = access
        self._producer = producer

    def down(self, attempt: int) -> None:
        self._health.broker_down(attempt)
        producer = self._producer()
        if self._access.error is None and producer is not None:
            with contextlib.suppress(KafkaException):  # a fatal producer raises here
                producer.poll(0)
        if self._access.error is not None:
            raise AccessDenied(self._access.error)

    def ok(self) -> None:
        self._health.broker_ok()
