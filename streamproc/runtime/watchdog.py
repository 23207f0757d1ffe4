"""A bound on how long a blocking client call may take before the worker gives up.

librdkafka's transactional calls take a timeout, and normally honour it.  After a broker
restart, ``send_offsets_to_transaction`` has been seen to block far past it
(librdkafka issue 5511): the worker then neither commits nor fails, and only the
liveness probe (``/healthz``) would ever restart it.  The checkpoint therefore registers
every blocking call with a :class:`Watchdog` (``guard``) and the thread that waits for it
-- the committer's caller, see :mod:`streamproc.runtime.committer` -- asks
:meth:`Watchdog.overdue`.  A call still running ``grace`` seconds after its own timeout
is :class:`~streamproc.runtime.checkpoint.TransactionStuck`: a fatal error that names
the call, so the worker exits 1
(and is restarted, which fences and aborts whatever the stuck producer left open) instead
of hanging silently.

The watchdog only watches; it never interrupts a call (librdkafka offers no way to).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

#: Seconds a blocking call may overrun its own timeout before it counts as stuck.
DEFAULT_GRACE = 30.0


class Watchdog:
    """Deadlines of the blocking client calls currently running, one per thread."""

    def __init__(
        self, grace: float = DEFAULT_GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.grace = grace
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[str, float, float]] = {}

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        """Register ``what`` (given ``timeout`` seconds) for as long as it runs."""
        key = threading.get_ident()
        with self._lock:
            self._calls[key] = (what, timeout, self._clock() + timeout + self.grace)
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def overdue(self) -> str | None:
        """What is stuck (the call, how long), for the first call past its deadline."""
        now = self._clock()
        with self._lock:
            late = [c for c in self._calls.values() if now > c[2]]
        if not late:
            return None
        what, timeout, _ = min(late, key=lambda c: c[2])
        return (
            f"{what} has not returned {timeout + self.grace:.0f} s after it was called "
            f"(its timeout: {timeout:.0f} s); the client is stuck (a known librdkafka hang "
            "after a broker restart) -- exiting so a restart fences and aborts it"
        )


__all__ = ["DEFAULT_GRACE", "Watchdog"]
