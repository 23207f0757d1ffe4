"""The consent table: the compacted consent topic, read into memory (the KTable pattern).

:class:`ConsentTable` restores the table by reading every partition of the topic from the
beginning to the end it had when the restore began (librdkafka's partition-EOF events say
when), *before* the worker consumes anything; then a background thread keeps applying new
records in topic order.  Per key the last record applied wins (record order, not the
``at`` timestamp: producers' clocks do not decide).  The state itself and the decision per
legal basis are pure (:mod:`streamproc.policy.consent`); the pipeline reads the state
through :class:`~streamproc.pipeline.consent.ConsentGate`.

The source is injectable (:class:`ConsentSource`): :class:`KafkaConsentSource` in
production, a scripted one in unit tests.

Ordering bound.  A withdrawal is honoured by every record the pipeline evaluates after
the table applied it.  Records evaluated before that may still flow: the window is the
time from the withdrawal's produce to its apply -- the table consumer's fetch latency
(``fetch.wait.max.ms``, 100 ms here, plus one poll interval) -- plus, for records already
in a batch being processed, that batch's processing time.  ``last_applied`` records when
each update was applied, so tests and operators can measure the lag.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from streamproc.errors import ConfigError, StreamprocError
from streamproc.policy.consent import ConsentFormatError, ConsentState

log = logging.getLogger("streamproc.runtime.consent")


@dataclass(frozen=True, slots=True)
class ConsentMessage:
    """One record of the consent topic, or an end-of-partition marker (``eof``)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    eof: bool = False


class ConsentSource(Protocol):
    """Where the table's records come from, in order per partition."""

    def partitions(self) -> Sequence[int]:
        """Every partition of the topic (all are read: the table is not sharded)."""
        ...

    def poll(self, timeout: float) -> list[ConsentMessage]:
        """Records (and partition-EOF markers) in offset order per partition."""
        ...

    def close(self) -> None: ...


class ConsentUnavailable(StreamprocError):
    """The consent topic could not be read to its end in time: the worker does not start."""


class ConsentTable:
    """The consent state, restored from a :class:`ConsentSource` and kept current."""

    def __init__(
        self,
        source: ConsentSource,
        *,
        topic: str = "<consent>",
        clock: Callable[[], float] = time.time,
        on_failure: Callable[[BaseException], None] | None = None,
        apply: Callable[[bytes | None, bytes | None], None] | None = None,
        format_errors: tuple[type[Exception], ...] = (ConsentFormatError,),
        what: str = "consent",
    ) -> None:
        self.source = source
        #: The restore/follow machinery is shared with the subject-key table
        #: (:mod:`streamproc.runtime.erasure`): ``apply`` replaces the consent state's, and
        #: ``format_errors`` are the malformed-record errors it raises (skipped, logged).
        self._apply_one = apply
        self._format_errors = format_errors
        self.what = what
        #: Called (from the follower thread) when it stops on an error: a table that no
        #: longer follows the topic would miss withdrawals, so the worker must stop.
        self.on_failure = on_failure
        self.topic = topic
        self.state = ConsentState()
        self._clock = clock
        self.applied = 0
        """Records applied since the start (restore included)."""
        self.last_applied: tuple[int, int, float] | None = None
        """(partition, offset, wall-clock seconds) of the last record applied."""
        self.rejected = 0
        """Records with a malformed key (not a consent key): skipped and logged."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- applying -------------------------------------------------------------------------
    def _apply(self, messages: list[ConsentMessage]) -> set[int]:
        """Apply records in order; return the partitions that reported EOF."""
        eof: set[int] = set()
        for m in messages:
            if m.eof:
                eof.add(m.partition)
                continue
            try:
                if self._apply_one is not None:
                    self._apply_one(m.key, m.value)
                else:
                    self.state.apply(m.key, m.value)
            except self._format_errors as exc:
                self.rejected += 1
                log.warning(
                    f"{self.what} record skipped: %s",
                    exc,
                    extra={"topic": self.topic, "partition": m.partition, "offset": m.offset},
                )
                continue
            self.applied += 1
            self.last_applied = (m.partition, m.offset, self._clock())
        return eof

    def restore(self, timeout: float) -> None:
        """Read every partition to its end; raises :class:`ConsentUnavailable` after ``timeout``."""
        waiting = set(self.source.partitions())
        if not waiting:
            raise ConsentUnavailable(f"{self.what} topic {self.topic!r} has no partitions (does it exist?)")
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsentUnavailable(
                    f"{self.what} topic {self.topic!r}: partitions {sorted(waiting)} not read to "
                    f"their end within {timeout:.0f}s; not starting (a worker without the whole "
                    "table would decide on a partial one)"
                )
            waiting -= self._apply(self.source.poll(min(left, 0.5)))
        log.info(
            f"{self.what} table restored",
            extra={"topic": self.topic, "records": self.applied, "keys": len(self.state)},
        )

    # -- following ------------------------------------------------------------------------
    def start(self, poll_timeout: float = 0.1) -> None:
        """Apply updates in a daemon thread until :meth:`stop` (after :meth:`restore`)."""
        self._thread = threading.Thread(
            target=self._follow, args=(poll_timeout,), name=f"{self.what}-table", daemon=True
        )
        self._thread.start()

    def _follow(self, poll_timeout: float) -> None:
        try:
            while not self._stop.is_set():
                messages = self.source.poll(poll_timeout)
                before = self.applied
                self._apply(messages)
                if self.applied != before and self.last_applied is not None:
                    p, o, _ = self.last_applied
                    log.info(
                        f"{self.what} updates applied",
                        extra={"topic": self.topic, "count": self.applied - before, "partition": p, "offset": o},
                    )
        except BaseException as exc:  # surfaced by `failed`; the worker stops on it
            self._error = exc
            log.error(f"{self.what} table consumer failed (%s)", type(exc).__name__, extra={"topic": self.topic})
            if self.on_failure is not None:
                self.on_failure(exc)

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the follower thread, if any."""
        return self._error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.source.close()


class KafkaConsentSource:
    """Every partition of the consent topic, from the beginning, without a consumer group.

    Each worker needs the whole table, so partitions are *assigned*, not subscribed, and no
    offset is ever committed (the group id, ``<group_id>.consent-<random>``, is unused).  ``enable.partition.eof``
    marks the end of each partition for :meth:`ConsentTable.restore`.
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        topic: str,
        *,
        group_prefix: str = "streamproc",
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
        timeout: float = 10.0,
        role: str = "consent",
    ) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        conf = {
            **consumer_config,
            # Its own, never committed: ACLs grant READ on the prefix <group_id>.consent-.
            "group.id": f"{group_prefix}.{role}-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
        }
        for k in ("group.instance.id", "partition.assignment.strategy"):
            conf.pop(k, None)
        self.topic = topic
        self.role = role
        self.consumer = (consumer_factory or Consumer)(conf)
        meta = self.consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            self.consumer.close()
            raise ConfigError(
                f"{role}.topic: {topic!r} does not exist or cannot be described "
                "(create it with `streamproc topics apply`)"
            )
        self._partitions = sorted(meta.partitions)
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self._partitions])

    def partitions(self) -> Sequence[int]:
        return self._partitions

    def poll(self, timeout: float) -> list[ConsentMessage]:
        from confluent_kafka import KafkaError

        out: list[ConsentMessage] = []
        for m in self.consumer.consume(500, timeout):
            err = m.error()
            if err is None:
                out.append(ConsentMessage(cast(int, m.partition()), cast(int, m.offset()), m.key(), m.value()))
            elif err.code() == KafkaError._PARTITION_EOF:
                out.append(ConsentMessage(cast(int, m.partition()), cast(int, m.offset()), None, None, eof=True))
            elif err.fatal():
                raise ConsentUnavailable(f"{self.role} topic {self.topic!r}: {err.name()}")
            else:
                log.warning(f"{self.role} consumer error: %s", err.name(), extra={"topic": self.topic})
        return out

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception as exc:  # closing twice, or after a fatal error
            log.debug("consent consumer close: %s", type(exc).__name__)


__all__ = ["ConsentMessage", "ConsentSource", "ConsentTable", "ConsentUnavailable", "KafkaConsentSource"]
