"""librdkafka settings of the worker's clients, as pure functions of the config.

Kept apart from the worker so the benchmark's raw copy loops (and anything else that
must behave like the worker on the wire) build their clients from the same settings
instead of reaching into private methods.  What the user sets under ``kafka:``,
``consumer:`` and ``producer:`` comes first; the settings the commit protocol depends on
are forced last and cannot be overridden.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamproc.config import Config


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
