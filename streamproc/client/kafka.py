"""confluent-kafka adapters for the client SDK.

* :class:`SealingSerializer` -- a ``confluent_kafka.serialization.Serializer`` that turns
  a dict into a sealed record value (Avro, Confluent framing, envelope) for the topic in
  the serialization context.
* :class:`OpeningDeserializer` -- a ``Deserializer`` that opens and decodes a sanitized
  record for a subscriber.

Use them with ``SerializingProducer`` / ``DeserializingConsumer`` or call them directly::

    ser = SealingSerializer(RecordSealer(kms, "orders-kek", "orders", schema, schemas))
    producer.produce("orders", value=ser(order, SerializationContext("orders", MessageField.VALUE)))

The envelope binds the topic (it is authenticated data), so a sealer made for ``orders``
refuses to serialize for any other topic instead of producing records nobody can open.
Errors are raised as ``SerializationError`` with value-free messages: a subscriber's
error log must not become a copy of the data.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka.serialization import (
    Deserializer,
    SerializationContext,
    SerializationError,
    Serializer,
)

from streamproc.client import RecordOpener, RecordSealer
from streamproc.errors import RecordError, SchemaNotFound, StreamprocError


class SealingSerializer(Serializer):
    """dict -> sealed bytes for ``ctx.topic`` (``None`` stays ``None``: a tombstone)."""

    def __init__(self, sealer: RecordSealer) -> None:
        self.sealer = sealer

    def __call__(
        self, obj: dict[str, Any] | None, ctx: SerializationContext | None = None
    ) -> bytes | None:
        if obj is None:
            return None
        topic = ctx.topic if ctx is not None else self.sealer.topic
        if topic != self.sealer.topic:
            raise SerializationError(
                f"this serializer seals for topic {self.sealer.topic!r}; the envelope binds the "
                f"topic, so it cannot produce to {topic!r} (make one RecordSealer per topic)"
            )
        try:
            return self.sealer.seal(obj)
        except StreamprocError as exc:
            raise SerializationError(f"cannot seal for {topic!r}: {type(exc).__name__}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # fastavro's messages quote the offending datum; keep only the type.
            raise SerializationError(
                f"record does not match the schema of {topic!r} ({type(exc).__name__})"
            ) from None


class OpeningDeserializer(Deserializer):
    """Sealed bytes from ``ctx.topic`` -> dict (``None`` stays ``None``)."""

    def __init__(self, opener: RecordOpener) -> None:
        self.opener = opener

    def __call__(
        self, value: bytes | None, ctx: SerializationContext | None = None
    ) -> dict[str, Any] | None:
        if value is None:
            return None
        if ctx is None or not ctx.topic:
            raise SerializationError(
                "OpeningDeserializer needs the topic in the serialization context"
            )
        try:
            return self.opener.decode(ctx.topic, value)
        except RecordError as exc:
            raise SerializationError(
                f"cannot open record of {ctx.topic!r}: {exc.reason.value}"
            ) from None
        except SchemaNotFound:
            raise SerializationError(
                f"cannot open record of {ctx.topic!r}: unknown_schema"
            ) from None
        except StreamprocError as exc:
            raise SerializationError(
                f"cannot open record of {ctx.topic!r}: {type(exc).__name__}"
            ) from None
        except (ValueError, EOFError, IndexError, UnicodeDecodeError) as exc:
            raise SerializationError(
                f"cannot decode record of {ctx.topic!r}: bad_payload ({type(exc).__name__})"
            ) from None


__all__ = ["OpeningDeserializer", "SealingSerializer"]
