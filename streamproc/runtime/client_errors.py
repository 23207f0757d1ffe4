"""What the worker does with librdkafka's errors outside the commit path.

The commit path classifies its own errors (:func:`streamproc.runtime.checkpoint.classify`);
this module handles the rest: the clients' error callback (transport trouble, a refused
login, a missing ACL, a fatal client) and an error carried by a consumed message.  A
refusal becomes a configuration error naming principal, operation and resource (exit
78), a fatal error stops the worker (exit 1), a lost broker is retried and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, Message

from streamproc.errors import ConfigError
from streamproc.runtime.access import AUTHZ_OPERATION, AccessGuard
from streamproc.runtime.checkpoint import FENCED_CODES, FatalWorkerError
from streamproc.runtime.health import Health

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before

_TRANSPORT = (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE)


def is_fatal(err: KafkaError) -> bool:
    """librdkafka's fatal flag, plus fencing."""
    return bool(err.fatal()) or err.code() in FENCED_CODES


class ClientErrors:
    """The clients' ``error_cb`` (:meth:`on_error`) and consumed-message errors
    (:meth:`check_message`); :attr:`fatal` holds a fatal client error, if any."""

    def __init__(self, access: AccessGuard, health: Health, stop: Callable[[], None]) -> None:
        self.access = access
        self.health = health
        self._stop = stop
        self.fatal: str | None = None

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's error callback: transport-level trouble (it reconnects by itself)."""
        if AccessGuard.is_authentication(err):
            self.access.authentication_failed(err)  # a restart cannot fix it: exit 78
        elif err.code() in AUTHZ_OPERATION:
            self.access.deny(err, None)
        elif is_fatal(err):
            log.error("fatal client error: %s", err.name())
            self.fatal = f"client: {err.name()}"
            self._stop()
        elif err.code() in _TRANSPORT:
            self.health.transport_error()
        else:
            log.warning("client error: %s", err.name())

    def check_message(self, m: Message) -> bool:
        """True for a record to process; False to skip; raises to stop the worker."""
        err = m.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        if err.code() in AUTHZ_OPERATION:
            self.access.deny(err, m.topic())
            raise ConfigError(str(self.access.error))
        if is_fatal(err):
            raise FatalWorkerError(f"consumer: {err.name()}")
        log.warning(
            "consumer error: %s", err.name(), extra={"topic": m.topic(), "partition": m.partition()}
        )
        return False
