"""Opening the configured trail: the public API for commands that must be audited.

``log = open_tool_log(config, note=...)`` opens the configured trail (``audit:`` of a
:class:`streamproc.config.Config`; the tools' chain beside ``audit.file`` and the audit
topic) with the caller's authenticated identity as actor (:mod:`streamproc.identity`).
``log.emit(...)`` writes one event; ``run_audited(log, EventType.X, attrs, action)`` writes
the event and only then acts; ``log.close()`` exports the signed head.  Every step raises
:class:`~streamproc.audit.AuditError` (or :class:`~streamproc.errors.StreamprocError`) on
failure: the caller must then do nothing.  :func:`open_log` is the lower level (any
stream, any file); the processor's trail is built from it too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from streamproc.audit.chain import Head, load_hmac_key
from streamproc.audit.errors import AuditAttributeError, AuditError, AuditUnavailable
from streamproc.audit.events import ATTRIBUTE_RULES, EventType
from streamproc.audit.log import AuditLog, AuditSink
from streamproc.audit.sinks import (
    FileSink,
    KafkaSink,
    _AuditProducer,
    head_file_for,
    read_topic_heads,
)

TOOLS_STREAM = "tools"
"""The chain of the command-line tools (re-identification, key and secret commands, ...)."""


def tool_audit_file(path: str | os.PathLike[str]) -> Path:
    """``<stem>-tools<suffix>`` beside ``audit.file``: the tools' own chain and lock.

    The processor holds its file's lock while it runs, so tools cannot append there; one
    shared tools file keeps every operator action in one verifiable chain.
    """
    p = Path(path)
    return p.with_name(f"{p.stem}-{TOOLS_STREAM}{p.suffix}")


def open_log(
    config: Any,
    *,
    stream: str,
    actor: str,
    file: str | os.PathLike[str] | None = None,
    wait: float = 0.0,
    context: Mapping[str, Any] | None = None,
    producer_factory: Callable[[dict[str, Any]], Any] | None = None,
    head_interval: float = 30.0,
    client_id: str | None = None,
    consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> AuditLog:
    """The audit trail of ``config.audit`` (a :class:`streamproc.config.Config`).

    Sinks: ``file`` (default ``audit.file``) and/or ``audit.kafka_topic`` (its own
    idempotent, non-transactional producer).  With only a topic (a sink that cannot read
    back) the stream id gets the start time appended: each run is its own chain.  With
    both, and no ``<file>.head`` beside the file, the latest head exported to the topic
    (:func:`read_topic_heads`) is what the file must reach.  Raises
    :class:`AuditUnavailable` when ``audit:`` is missing, :class:`AuditError` when a sink
    cannot be opened (locked, not verifying, cut short) and
    :class:`~streamproc.errors.ConfigError` for a bad key file -- callers fail closed.
    """
    ac = getattr(config, "audit", None)
    if ac is None:
        raise AuditUnavailable(
            f"{getattr(config, 'path', 'the config')} has no audit: section; this action is "
            "only allowed with an audit trail (docs/keys.md, section 7)"
        )
    key = load_hmac_key(ac.hmac_key_file) if ac.hmac_key_file is not None else None
    path = Path(file) if file is not None else ac.file
    if path is None:
        stream = f"{stream}:{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    sinks: list[AuditSink] = []
    known: Head | None = None
    if (
        path is not None
        and ac.kafka_topic is not None
        and not head_file_for(path).exists()
        and not path.with_name(path.name + ".start").exists()
    ):
        # No head beside the file (first start, or deleted with the file): the topic's copy
        # decides whether this file may start or continue a chain.
        consumer_conf = getattr(config, "consumer_config", config.producer_config)()
        known = read_topic_heads(
            {k: v for k, v in consumer_conf.items() if not callable(v)},
            ac.kafka_topic,
            consumer_factory=consumer_factory,
        ).get(stream)
    try:
        if path is not None:
            try:
                sinks.append(FileSink(path, fsync=ac.fsync, wait=wait, known_head=known))
            except OSError as exc:
                raise AuditUnavailable(f"cannot open audit file {path} ({exc.strerror})") from None
        if ac.kafka_topic is not None:
            if producer_factory is None:
                from confluent_kafka import Producer

                producer_factory = Producer
            conf = {
                "message.timeout.ms": 30_000,  # bounded: an outage fails the write
                **config.producer_config(),
                "client.id": client_id
                or f"streamproc-{getattr(config, 'group_id', 'tools')}-audit",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
            }
            sinks.append(KafkaSink(_AuditProducer(producer_factory(conf)), ac.kafka_topic))
        return AuditLog(
            sinks,
            stream=stream,
            actor=actor,
            hmac_key=key,
            context=context,
            head_interval=head_interval,
        )
    except BaseException:
        for s in sinks:  # AuditLog closes them itself only once it owns them
            with contextlib.suppress(Exception):
                s.close()
        raise


def open_tool_log(
    config: Any,
    *,
    note: str | None = None,
    producer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> AuditLog:
    """The audit trail for an operator command: ``log = open_tool_log(config)``.

    The actor is the caller's authenticated identity (:func:`streamproc.identity.resolve_actor`:
    the Vault/OpenBao token, the AWS caller, else the OS user), recorded on every event
    with ``actor_source``; ``note`` (a command's ``--actor`` text) is recorded beside it,
    never instead of it.  Events go to the tools' chain (:func:`tool_audit_file`, stream
    ``tools``; waits up to 30 s for another tool's lock) and the audit topic.  Emit with
    ``log.emit(EventType.X, {...})`` *before* acting, and ``log.close()`` after (exports the
    signed head).  Any failure raises: nothing may happen unaudited.
    """
    from streamproc.identity import resolve_actor

    who = resolve_actor(config)
    ac = getattr(config, "audit", None)
    file = tool_audit_file(ac.file) if ac is not None and ac.file is not None else None
    if note is not None and not ATTRIBUTE_RULES["note"](note):
        raise AuditAttributeError(
            "the note must be short printable text without personal data (no e-mail "
            "addresses or long digit runs)"
        )
    # With a file the tools share one chain; with only a topic each run is its own chain,
    # named by a random run id as well as the start time, so two runs cannot collide.
    stream = TOOLS_STREAM if file is not None else f"{TOOLS_STREAM}-{os.urandom(4).hex()}"
    return open_log(
        config,
        stream=stream,
        actor=who.principal,
        file=file,
        wait=30.0,
        context={"actor_source": who.source, "note": note},
        producer_factory=producer_factory,
    )


def run_audited(
    log: AuditLog,
    event_type: EventType | str,
    attrs: Mapping[str, Any],
    action: Callable[[], Any],
) -> Any:
    """Write the event (``outcome: success``) *then* run ``action``; return its result.

    Fail closed: when the event cannot be written the action does not run.  When the
    action fails after its event was written, a second event of the same type with
    ``outcome: failed`` and ``error`` (the exception class) follows, and the exception
    propagates.  Used by the key and secret commands; any operator action fits.
    """
    log.emit(event_type, {**attrs, "outcome": "success"})
    try:
        return action()
    except BaseException as exc:
        with contextlib.suppress(AuditError):
            log.emit(event_type, {**attrs, "outcome": "failed", "error": type(exc).__name__})
        raise
