"""librdkafka settings of the worker's clients, as pure functions of the config.

Kept apart from the worker so the benchmark's raw copy loops (and anything else that
must behave like the worker on the wire) build their clients from the same settings
instead of reaching into private methods.  What the user sets under ``kafka:``,
``consumer:`` and ``producer:`` comes first; the settings the commit protocol depends on
are forced last and cannot be overridden.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from streamproc.config import Config
from streamproc.errors import ConfigError


def consumer_conf(
    config: Config, *, index: int = 0, error_cb: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """The consumer of worker ``index``: read_committed, manual offsets, eager rebalance."""
    conf = config.consumer_config()
    conf.setdefault("auto.offset.reset", "earliest")
    conf.setdefault("partition.assignment.strategy", "range")
    conf.setdefault("client.id", f"streamproc-{config.group_id}-{index}")
    conf.update(
        {
            "group.id": config.group_id,
            "enable.auto.commit": False,  # offsets go into the transaction (or commit())
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        }
    )
    if error_cb is not None:
        conf["error_cb"] = error_cb
    return conf


def producer_conf(
    config: Config,
    *,
    index: int = 0,
    transactional_id: str | None = None,
    error_cb: Callable[[Any], None] | None = None,
    on_delivery: Callable[[Any, Any], None] | None = None,
) -> dict[str, Any]:
    """The producer of worker ``index``: transactional, or idempotent with ``acks=all``.

    ``transactional_id`` is required for ``exactly_once`` (the worker passes
    ``<group_id>-<instance>-<index>``, stable across restarts so a restart fences its own
    zombie).  ``on_delivery`` (exactly once) is a producer-wide callback for failed
    deliveries only (``delivery.report.only.error``), so it costs nothing per record.
    """
    conf = config.producer_config()
    conf.setdefault("client.id", f"streamproc-{config.group_id}-{index}-producer")
    conf.setdefault("linger.ms", 5)
    if config.exactly_once:
        if not transactional_id:
            raise ValueError("exactly_once needs a transactional_id")
        conf["transactional.id"] = transactional_id
        if on_delivery is not None:
            conf.setdefault("delivery.report.only.error", True)
            conf["on_delivery"] = on_delivery
    else:
        conf["enable.idempotence"] = True
        conf.setdefault("acks", "all")
    if error_cb is not None:
        conf["error_cb"] = error_cb
    return conf


__all__ = ["consumer_conf", "producer_conf"]


def build_client(factory: Callable[[dict[str, Any]], Any], conf: dict[str, Any], what: str) -> Any:
    """Build a client; a librdkafka settings error is a configuration error (exit 78)."""
    try:
        return factory(conf)
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is not None and err.code() == KafkaError._INVALID_ARG:
            raise ConfigError(f"{what} settings: {setting_error(err.str(), conf)}") from None
        raise


_PROPERTY = re.compile(r'property:? "([A-Za-z0-9._-]+)"')


def setting_error(message: str, keys: Iterable[str] = ()) -> str:
    """librdkafka's complaint about a setting, without the value it quotes.

    librdkafka says ``Invalid value "<value>" for configuration property "<name>"``; the
    value may be a SASL password or an SSL key, so only the property name is kept.  Some
    failures name the property unquoted (``ssl.ca.location failed: ...``) or not at all
    (``No provider for SASL mechanism GSSAPI``): then the configured key (``keys``) the
    message mentions is named, or the setting the message is about.
    """
    names = _PROPERTY.findall(message)
    if names and "No such configuration property" in message:
        return f"unknown librdkafka property {names[-1]!r}"
    if names:
        return f"invalid or unsupported value for librdkafka property {names[-1]!r}"
    for k in sorted((k for k in keys if isinstance(k, str)), key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", message):
            return f"librdkafka cannot use the value of {k!r} (a file it cannot read, an unsupported choice)"
    if "SASL mechanism" in message:
        return "unsupported SASL mechanism: set 'sasl.mechanisms' (e.g. SCRAM-SHA-512, PLAIN) for security.protocol SASL_*"
    return "invalid librdkafka setting (see librdkafka CONFIGURATION.md)"


def default_instance() -> str:
    """``STREAMPROC_INSTANCE`` or the host name: stable per pod in a StatefulSet (the
    ``transactional.id`` of a worker is ``<group_id>-<instance>-<index>``)."""
    import os
    import socket

    return os.environ.get("STREAMPROC_INSTANCE") or socket.gethostname() or "streamproc"
