"""Faust (``faust-streaming``) integration: seal records for producers, open them for subscribers.

Install with ``pip install 'streamproc[faust]'``.  Two ways in, both thin adapters over
:class:`~streamproc.client.RecordSealer` / :class:`~streamproc.client.RecordOpener`:

**Schemas (recommended).**  :class:`SealingSchema` and :class:`OpeningSchema` are
``faust.Schema`` subclasses that own value (de)serialization of a topic::

    orders = sealed_topic(app, RecordSealer(kms, "orders-kek", "orders", schema, schemas))
    await orders.send(key=order["customer_id"], value=order)          # dict -> envelope

    analytics = opened_topic(app, "orders.analytics", opener=RecordOpener(kms, schemas),
                             on_error="skip")

    @app.agent(analytics)
    async def count(stream):
        async for order in stream: ...                                 # envelope -> dict

Why schemas rather than codecs: the envelope authenticates the topic it was sealed for
(the topic is part of the AEAD associated data, docs/wire-format.md), so opening must use
the topic the record was *read from*.  A Faust codec only ever sees bytes; a schema's
``loads_value`` gets the whole message, so :class:`OpeningSchema` opens with
``message.topic`` -- a record copied into another topic fails (``wrong_topic``) instead of
being trusted.  On the producing side Faust never tells a codec or a schema where the
value goes, so the sealer is bound to one topic at construction and
:class:`StreamprocTopic` checks, at send time, that a :class:`SealingSchema` is only used
on that topic.  Schemas also close two plaintext leaks that a codec cannot: Faust's
serializer registry passes ``bytes`` values through untouched and lets a
``faust.Record`` with ``serializer=...`` in its options override the topic's codec --
:class:`SealingSchema` refuses both.

**Codecs.**  For code that is configured by codec name (``value_serializer="..."``),
:func:`register_sealing_codec` and :func:`register_opening_codec` register one codec per
topic with ``faust.serializers.codecs.register`` and return its name
(``streamproc-seal-orders``, ``streamproc-open-orders.analytics``).  The topic is fixed at
registration, so the binding is only as good as the configuration that attaches the codec
to the right topic (a mismatch fails closed: ``wrong_topic`` downstream).

Errors
------

A record that cannot be opened raises :class:`RecordOpenError`: a subclass of Faust's
``ValueDecodeError`` carrying a reason class from :class:`~streamproc.errors.Reason`
(``unknown_key``, ``tampered``, ``wrong_topic``, ``unknown_schema``, ``bad_payload``...),
the topic, partition and offset -- never a value.  What Faust does with it:

1. the Conductor catches the ``ValueDecodeError`` and **acks the message** (its offset
   will be committed: Faust never redelivers a record that failed to decode), then
2. calls ``Topic.on_value_decode_error``, which by default throws the error into every
   stream reading the topic: the agent's ``async for`` raises, the agent crashes and its
   supervisor restarts it (it resumes with the next record).

Hence the two policies of ``on_error``:

* ``"raise"`` (default) -- Faust's behaviour above: the error surfaces in the agent,
  which may catch it or crash (logged with its value-free message) and be restarted.
* ``"skip"`` -- :class:`StreamprocTopic` swallows the error: the record is counted in
  ``policy.skipped[reason]``, logged at WARNING (topic, partition, offset, reason) and
  handed to ``on_skip``; the agent never sees it.  Needs the topic to be a
  :class:`StreamprocTopic` (``opened_topic()`` makes one; or ``faust.App(...,
  Topic=StreamprocTopic)`` for every ``app.topic()``); on a plain ``faust.Topic`` it
  behaves like ``"raise"``.

Transient failures (KMS or schema registry unavailable:
:class:`~streamproc.errors.TransientError`) are *not* record errors and are never turned
into a ``ValueDecodeError`` by the schema: skipping would silently lose the record
because Faust acks decode errors.  They propagate out of the Conductor, which crashes the
consumer and stops the worker without committing past the record -- restart it when the
dependency is back.  The codec path cannot do this (Faust's registry wraps every codec
exception in a ``ValueDecodeError``, which is acked), one more reason to prefer schemas.

KMS calls happen on data-key cache misses only (once per data key and KEK version), but
they are synchronous: with a remote KMS a miss briefly blocks the event loop.
"""

from __future__ import annotations

import logging
import struct
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import faust
from faust.exceptions import ValueDecodeError
from faust.serializers import codecs
from faust.types import AppT, CodecArg, ModelArg, ModelT
from faust.types.core import OpenHeadersArg
from faust.types.serializers import SchemaT
from faust.types.tuples import Message

from streamproc.client import RecordOpener, RecordSealer
from streamproc.errors import (
    Reason,
    RecordError,
    SchemaNotFound,
    StreamprocError,
    TransientError,
)
from streamproc.schema.registry import RegisteredSchema

log = logging.getLogger("streamproc.integrations.faust")

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[OnError, ...] = ("raise", "skip")

#: Faust app settings for the local Tansu broker (streamproc.devbroker) -- harmless on
#: Apache Kafka, whose minimum session timeout is 6 s.  Tansu answers a consumer-group join
#: after about half of the session timeout, and aiokafka sends Faust's
#: ``broker_session_timeout`` (default 60 s) as the join's session timeout: with the
#: default, a Faust worker waits ~30 s before its agents see a record; with 6 s, ~3 s.
TANSU_APP_SETTINGS: dict[str, Any] = {"broker_session_timeout": 6.0, "broker_heartbeat_interval": 1.0}

#: Faust's model metadata key, added by ``Record.to_representation()``; not an Avro field.
_FAUST_META = "__faust"


# -- errors -------------------------------------------------------------------------------


class RecordSealError(StreamprocError, ValueError):
    """A record could not be sealed (schema mismatch, KMS refusal).  Value-free message."""

    def __init__(self, topic: str, detail: str) -> None:
        self.topic = topic
        self.detail = detail
        super().__init__(f"cannot seal record for {topic!r}: {detail}")


class TopicMismatch(StreamprocError, ValueError):
    """A :class:`SealingSchema` for one topic was used to send to another.

    The envelope authenticates the topic, so such a record could never be opened by the
    processor (it would be dead-lettered as ``wrong_topic``); refusing at the producer
    turns a silent data loss into an error at the line that caused it.
    """


class RecordOpenError(ValueDecodeError):
    """A record could not be opened or decoded.  Says why and where, never what.

    A ``ValueDecodeError``, so Faust treats it like any value decode failure (see the
    module docstring: the message is acked, then the error is thrown into the agent, or
    skipped under ``on_error="skip"``).
    """

    def __init__(
        self,
        topic: str,
        reason: str,
        detail: str = "",
        *,
        partition: int | None = None,
        offset: int | None = None,
        policy: ErrorPolicy | None = None,
    ) -> None:
        self.topic = topic
        self.reason = reason
        self.detail = detail
        self.partition = partition
        self.offset = offset
        self.policy = policy
        where = topic if partition is None else f"{topic}[{partition}]@{offset}"
        super().__init__(f"cannot open record {where}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class ErrorPolicy:
    """What a subscriber does with a record it cannot open: ``raise`` or ``skip``.

    ``skipped`` counts skipped records per reason class (a bounded set: safe to export as
    a metric label).  ``on_skip`` is called with the :class:`RecordOpenError` of each
    skipped record, e.g. to count it in the application's own metrics.
    """

    on_error: OnError = "raise"
    on_skip: Callable[[RecordOpenError], None] | None = None
    skipped: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, not {self.on_error!r}")

    def skip(self, err: RecordOpenError) -> None:
        self.skipped[err.reason] += 1
        log.warning(
            "skipped a record that cannot be opened: %s",
            err,
            extra={"topic": err.topic, "partition": err.partition, "offset": err.offset, "reason": err.reason},
        )
        if self.on_skip is not None:
            self.on_skip(err)


# -- sealing / opening shared by schemas and codecs -------------------------------------------


def _plain(obj: Any) -> Any:
    """Faust models (possibly nested) as plain dicts; everything else unchanged."""
    if isinstance(obj, ModelT):
        return {k: _plain(v) for k, v in cast(Any, obj).asdict().items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _as_record(value: Any, topic: str) -> dict[str, Any]:
    """The dict to encode; refuses anything that is not a record.

    ``bytes`` in particular: Faust would pass them through its serializer registry
    untouched, so accepting them here would publish whatever they are without an envelope.
    """
    if isinstance(value, ModelT):
        return cast(dict[str, Any], _plain(value))
    if isinstance(value, Mapping):
        if _FAUST_META in value:  # a Record serialized through the codec path
            return {k: v for k, v in value.items() if k != _FAUST_META}
        return value if isinstance(value, dict) else dict(value)
    raise TypeError(
        f"topic {topic!r} is sealed: send a dict or a faust.Record, not {type(value).__name__} "
        "(bytes or str would bypass the envelope)"
    )


def _seal(sealer: RecordSealer, value: Any) -> bytes:
    record = _as_record(value, sealer.topic)
    try:
        return sealer.seal(record)
    except TransientError:
        raise  # a KMS outage is not the record's fault: the caller retries the send
    except StreamprocError as exc:
        raise RecordSealError(sealer.topic, type(exc).__name__) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        # fastavro's messages quote the offending datum; keep only the exception type.
        raise RecordSealError(sealer.topic, f"record does not match the schema ({type(exc).__name__})") from None


def _open(
    opener: RecordOpener,
    topic: str,
    value: bytes,
    policy: ErrorPolicy,
    *,
    partition: int | None = None,
    offset: int | None = None,
) -> tuple[RegisteredSchema, dict[str, Any]]:
    """Open and decode, mapping every record-level failure to :class:`RecordOpenError`."""
    try:
        return opener.open(topic, value)
    except TransientError:
        raise  # never acked as a decode error: see the module docstring
    except RecordError as exc:  # EnvelopeError included: reason + value-free detail
        reason, detail = exc.reason.value, exc.detail
    except SchemaNotFound:
        reason, detail = Reason.UNKNOWN_SCHEMA.value, ""
    except StreamprocError as exc:
        reason, detail = "error", type(exc).__name__
    except (ValueError, TypeError, EOFError, IndexError, KeyError, UnicodeDecodeError, struct.error) as exc:
        # Unframing or Avro decoding failed; the messages may quote bytes, so keep the type.
        reason, detail = Reason.BAD_PAYLOAD.value, type(exc).__name__
    raise RecordOpenError(topic, reason, detail, partition=partition, offset=offset, policy=policy) from None


# -- schemas ------------------------------------------------------------------------------------


class _EnvelopeSchema(faust.Schema):
    """A schema that owns value (de)serialization: values are envelopes, nothing else.

    Faust calls ``update`` from ``app.topic(..., value_serializer=...)``; a value
    serializer there would replace the envelope with plaintext, so it is refused.
    """

    #: What the schema owns, for the refusal message.
    _owns = "value serialization"

    def _owner(self) -> str:
        return type(self).__name__

    def update(
        self,
        *,
        key_type: ModelArg | None = None,
        value_type: ModelArg | None = None,
        key_serializer: CodecArg | None = None,
        value_serializer: CodecArg | None = None,
        allow_empty: bool | None = None,
    ) -> None:
        if value_serializer is not None:
            raise ValueError(
                f"{self._owner()} owns {self._owns}; drop value_serializer={value_serializer!r}"
            )
        super().update(key_type=key_type, value_type=value_type, key_serializer=key_serializer, allow_empty=allow_empty)
        self.value_serializer = None


class SealingSchema(_EnvelopeSchema):
    """Producer side: values are dicts (or ``faust.Record``\\s) sealed for ``sealer.topic``.

    Keys keep an ordinary Faust serializer (``raw`` by default: the processor tokenizes or
    passes record keys per audience policy, so producers send them as they are).
    """

    def __init__(self, sealer: RecordSealer, *, key_serializer: CodecArg = "raw", key_type: ModelArg | None = None) -> None:
        self.sealer = sealer
        super().__init__(key_type=key_type, key_serializer=key_serializer)

    def _owner(self) -> str:
        return f"SealingSchema({self.topic!r})"

    @property
    def topic(self) -> str:
        return self.sealer.topic

    def dumps_value(
        self, app: AppT, value: Any, *, serializer: CodecArg | None = None, headers: OpenHeadersArg
    ) -> tuple[Any, OpenHeadersArg]:
        if serializer is not None:
            raise ValueError(f"topic {self.topic!r} is sealed; value_serializer={serializer!r} would bypass the envelope")
        if value is None:
            return None, headers  # a tombstone: the processor forwards it to every audience
        return _seal(self.sealer, value), headers

    def loads_value(
        self, app: AppT, message: Message, *, loads: Callable[..., Any] | None = None, serializer: CodecArg | None = None
    ) -> Any:
        raise RecordOpenError(
            message.topic, "write_only", "SealingSchema only seals; read with OpeningSchema",
            partition=message.partition, offset=message.offset,
        )


class OpeningSchema(_EnvelopeSchema):
    """Subscriber side: sanitized envelopes -> dicts, opened with the message's own topic.

    ``opener`` should hold only the audience's KEK access (a Vault/AWS credential scoped to
    it, or :class:`~streamproc.integrations.ScopedKms` over a local keyring).  With
    ``value_type`` set to a ``faust.Record`` class, values are built with
    ``value_type.from_data(record)`` instead of returned as dicts.
    """

    _owns = "value deserialization"

    def __init__(
        self,
        opener: RecordOpener,
        *,
        on_error: OnError = "raise",
        on_skip: Callable[[RecordOpenError], None] | None = None,
        value_type: ModelArg | None = None,
        key_serializer: CodecArg = "raw",
        key_type: ModelArg | None = None,
    ) -> None:
        self.opener = opener
        self.policy = ErrorPolicy(on_error, on_skip)
        super().__init__(key_type=key_type, value_type=value_type, key_serializer=key_serializer)

    def loads_value(
        self, app: AppT, message: Message, *, loads: Callable[..., Any] | None = None, serializer: CodecArg | None = None
    ) -> Any:
        if message.value is None:
            return None  # tombstone (deletion forwarded by the processor)
        _, record = _open(
            self.opener, message.topic, message.value, self.policy, partition=message.partition, offset=message.offset
        )
        vt = self.value_type
        if isinstance(vt, type) and issubclass(vt, ModelT):
            return vt.from_data(record, preferred_type=vt)
        return record

    def dumps_value(
        self, app: AppT, value: Any, *, serializer: CodecArg | None = None, headers: OpenHeadersArg
    ) -> tuple[Any, OpenHeadersArg]:
        raise TypeError(
            "OpeningSchema is read-only: a sanitized topic is written by the processor only; "
            "to produce elsewhere use that topic's SealingSchema"
        )


# -- topic class ----------------------------------------------------------------------------------

#: Per app: topic name -> the SealingSchema that :func:`sealed_topic` made for it.
_SEALED: weakref.WeakKeyDictionary[AppT, dict[str, SealingSchema]] = weakref.WeakKeyDictionary()


def _open_error(exc: BaseException) -> RecordOpenError | None:
    """Our error, raised by a schema directly or wrapped by Faust's registry (codec path)."""
    if isinstance(exc, RecordOpenError):
        return exc
    cause = exc.__cause__
    return cause if isinstance(cause, RecordOpenError) else None


class StreamprocTopic(faust.Topic):
    """A ``faust.Topic`` that enforces the topic binding and implements ``on_error="skip"``.

    * Sending with a :class:`SealingSchema` checks that the schema was made for this topic.
    * Sending *without* one to a topic name that :func:`sealed_topic` registered on the
      same app (``app.send("orders", value=...)`` by name, which creates a fresh topic with
      the default JSON schema) is refused instead of publishing plaintext.
    * A :class:`RecordOpenError` whose policy is ``skip`` is counted, logged and dropped
      instead of being thrown into the agent.  Faust has already acked the message.

    Use it through :func:`sealed_topic` / :func:`opened_topic`, or for every topic of an
    app with ``faust.App(..., Topic=StreamprocTopic)``.
    """

    def prepare_value(
        self, value: Any, value_serializer: CodecArg, schema: SchemaT | None = None, headers: OpenHeadersArg = None
    ) -> tuple[Any, OpenHeadersArg]:
        effective = schema or self.schema
        names = [] if self.pattern else list(self.topics)
        if isinstance(effective, SealingSchema):
            if names != [effective.topic]:
                raise TopicMismatch(
                    f"SealingSchema for {effective.topic!r} cannot send to {names or self.pattern!r}: "
                    "the envelope authenticates its topic; make one RecordSealer per topic"
                )
        else:
            sealed = _SEALED.get(self.app, {})
            hit = [n for n in names if n in sealed]
            if hit and value is not None:
                raise TopicMismatch(
                    f"topic {hit[0]!r} is sealed on this app; send through the topic returned by "
                    "sealed_topic() (this one would publish without an envelope)"
                )
        return cast(tuple[Any, OpenHeadersArg], super().prepare_value(value, value_serializer, schema, headers))

    async def on_value_decode_error(self, exc: Exception, message: Message) -> None:
        err = _open_error(exc)
        if err is not None and err.policy is not None and err.policy.on_error == "skip":
            err.policy.skip(err)
            return
        await super().on_value_decode_error(exc, message)


def sealed_topic(app: faust.App, sealer: RecordSealer, **topic_options: Any) -> StreamprocTopic:
    """The producer's topic: named after ``sealer.topic`` so name and binding cannot differ."""
    schema = SealingSchema(sealer)
    _SEALED.setdefault(app, {})[sealer.topic] = schema
    return StreamprocTopic(app, topics=[sealer.topic], schema=schema, **topic_options)


def opened_topic(
    app: faust.App,
    *topics: str,
    opener: RecordOpener,
    on_error: OnError = "raise",
    on_skip: Callable[[RecordOpenError], None] | None = None,
    value_type: ModelArg | None = None,
    **topic_options: Any,
) -> StreamprocTopic:
    """A subscriber's topic(s): records opened with the audience's access, per ``on_error``."""
    schema = OpeningSchema(opener, on_error=on_error, on_skip=on_skip, value_type=value_type)
    return StreamprocTopic(app, topics=list(topics), schema=schema, **topic_options)


# -- codecs ----------------------------------------------------------------------------------------


class SealingCodec(codecs.Codec):
    """``value_serializer`` codec sealing dicts for one topic (see the module docstring)."""

    def __init__(self, sealer: RecordSealer, children: tuple[codecs.CodecT, ...] | None = None, **kwargs: Any) -> None:
        # Faust rebuilds codecs from ``self.kwargs`` when chaining (``codec | other``).
        super().__init__(children, sealer=sealer, **kwargs)
        self.sealer = sealer

    def _dumps(self, obj: Any) -> bytes:
        return _seal(self.sealer, obj)

    def _loads(self, s: bytes) -> Any:
        raise RecordOpenError(self.sealer.topic, "write_only", "a sealing codec only seals; read with an opening codec")


class OpeningCodec(codecs.Codec):
    """``value_serializer`` codec opening the sanitized records of one topic."""

    def __init__(
        self,
        opener: RecordOpener,
        topic: str,
        children: tuple[codecs.CodecT, ...] | None = None,
        *,
        policy: ErrorPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        policy = policy or ErrorPolicy()
        super().__init__(children, opener=opener, topic=topic, policy=policy, **kwargs)
        self.opener = opener
        self.topic = topic
        self.policy = policy

    def _loads(self, s: bytes) -> Any:
        return _open(self.opener, self.topic, s, self.policy)[1]

    def _dumps(self, obj: Any) -> bytes:
        raise TypeError(f"an opening codec is read-only ({self.topic!r} is written by the processor)")


def register_sealing_codec(sealer: RecordSealer, name: str | None = None) -> str:
    """Register a :class:`SealingCodec` for ``sealer.topic``; returns the codec name."""
    name = name or f"streamproc-seal-{sealer.topic}"
    _check_name(name)
    codecs.register(name, SealingCodec(sealer))
    return name


def register_opening_codec(
    opener: RecordOpener,
    topic: str,
    name: str | None = None,
    *,
    on_error: OnError = "raise",
    on_skip: Callable[[RecordOpenError], None] | None = None,
) -> str:
    """Register an :class:`OpeningCodec` for ``topic``; returns the codec name.

    ``on_error="skip"`` needs the topic to be a :class:`StreamprocTopic`.  Transient KMS
    errors through a codec are acked by Faust like any decode error (see module docs).
    """
    name = name or f"streamproc-open-{topic}"
    _check_name(name)
    codecs.register(name, OpeningCodec(opener, topic, policy=ErrorPolicy(on_error, on_skip)))
    return name


def _check_name(name: str) -> None:
    if "|" in name:
        raise ValueError(f"codec name {name!r} may not contain '|' (Faust's codec chain separator)")


__all__ = [
    "TANSU_APP_SETTINGS",
    "ErrorPolicy",
    "OnError",
    "OpeningCodec",
    "OpeningSchema",
    "RecordOpenError",
    "RecordSealError",
    "SealingCodec",
    "SealingSchema",
    "StreamprocTopic",
    "TopicMismatch",
    "opened_topic",
    "register_opening_codec",
    "register_sealing_codec",
    "sealed_topic",
]
