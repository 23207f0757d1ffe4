"""The worker's exit codes, and which failure gets which (with the one log line it gets).

Exit 78 (``EX_CONFIG``) means "do not restart, fix the configuration": bad librdkafka
settings, a refused login, a missing ACL, a quarantine KEK that cannot be used.  Exit 1
is everything else that stopped the worker (fencing, an invariant violation, a bug).
Every message logged here is value-free: names, ids and librdkafka error names
(:func:`streamproc.runtime.checkpoint.describe`), never a third-party message.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from confluent_kafka import KafkaException

from streamproc.errors import ConfigError
from streamproc.runtime.access import AccessGuard
from streamproc.runtime.checkpoint import AccessDenied, FatalWorkerError, describe

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before

#: Exit codes of ``Worker.run`` (and of ``streamproc run``).
EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: do not restart, fix the config


def exit_code(exc: Exception, access: AccessGuard) -> int:
    """Log why the worker stops and return its exit code."""
    if isinstance(exc, ConfigError):
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    if isinstance(exc, AccessDenied):
        # The checkpoint says which call the broker refused; access says who and what.
        if access.error is None and exc.error is not None:
            access.deny(exc.error, exc.topic, produce=True)
        log.error("configuration error: %s", access.error or exc)
        return EXIT_CONFIG
    if isinstance(exc, FatalWorkerError):
        if access.error is not None:  # the root cause, e.g. behind a timeout
            log.error("configuration error: %s", access.error)
            return EXIT_CONFIG
        log.error("fatal %s: %s", type(exc).__name__, exc)
        return EXIT_FATAL
    if isinstance(exc, KafkaException):
        log.error("fatal Kafka error: %s", describe(exc))
        return EXIT_FATAL
    # A bug (the pipeline is supposed to turn every record problem into a quarantine).
    # Commit nothing more; the stack goes to the log, and the formatter keeps
    # third-party exception messages out of it.
    log.error("unexpected error; stopping without committing the batch", exc_info=exc)
    return EXIT_FATAL


def install_stop(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT -> ``stop`` (main thread only): the worker drains, then exits 0."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal received; draining", extra={"signal": signal.Signals(signum).name})
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
