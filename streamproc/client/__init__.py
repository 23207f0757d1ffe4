"""Client SDK for producers and subscribers of streamproc topics.

* :class:`RecordSealer` -- producers: encode a dict with an Avro schema, frame it
  (Confluent wire format) and seal it under the source topic's KEK.
* :class:`RecordOpener` -- subscribers: open a sanitized record with their audience's KEK
  access, and decode it with the output schema (found by id in the schema source).
* :func:`provenance_of` -- subscribers: the record's ``streamproc.prov`` header (audience,
  policy version, output schema id, pseudonym-master version, and an opaque reference
  that only the lineage team can resolve; see docs/wire-format.md).

Both are plain objects usable with any Kafka client; :mod:`streamproc.client.kafka`
adapts them to confluent-kafka's Serializer/Deserializer interface.
"""

from __future__ import annotations

import io
from typing import Any

import fastavro

from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms import KmsProvider
from streamproc.crypto.provenance import Provenance, ProvenanceError
from streamproc.crypto.provenance import from_headers as provenance_of
from streamproc.schema.framing import frame_prefix, unframe
from streamproc.schema.registry import RegisteredSchema, SchemaSource


class RecordSealer:
    """Encode, frame and seal records of one schema for one topic."""

    def __init__(
        self,
        kms: KmsProvider,
        kek_id: str,
        topic: str,
        schema: Any,
        schemas: SchemaSource,
        *,
        subject: str | None = None,
        **sealer_options: Any,
    ) -> None:
        self.topic = topic
        self.schema_id = schemas.register(subject or f"{topic}-value", schema)
        self._parsed = fastavro.parse_schema(schema if not isinstance(schema, str) else __import__("json").loads(schema))
        self._prefix = frame_prefix(self.schema_id)
        self.sealer = Sealer(kms, kek_id, topic, **sealer_options)

    def encode(self, record: dict[str, Any]) -> bytes:
        """Framed Avro plaintext (what goes inside the envelope)."""
        buf = io.BytesIO()
        buf.write(self._prefix)
        fastavro.schemaless_writer(buf, self._parsed, record)
        return buf.getvalue()

    def seal(self, record: dict[str, Any]) -> bytes:
        return self.sealer.seal(self.encode(record))

    def seal_many(self, records: list[dict[str, Any]]) -> list[bytes]:
        return self.sealer.seal_many([self.encode(r) for r in records])


class RecordOpener:
    """Open and decode records of a topic (any schema id the source knows)."""

    def __init__(self, kms: KmsProvider, schemas: SchemaSource, **cache_options: Any) -> None:
        self.opener = Opener.for_kms(kms, **cache_options)
        self.schemas = schemas
        self._parsed: dict[int, Any] = {}

    def open(self, topic: str, value: bytes) -> tuple[RegisteredSchema, dict[str, Any]]:
        """Return (schema, record); raises EnvelopeError / SchemaNotFound / ValueError."""
        plain = self.opener.open(topic, value).plaintext
        schema_id, body = unframe(plain)
        rs = self.schemas.get(schema_id)
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            parsed = self._parsed[schema_id] = fastavro.parse_schema(rs.json)
        record: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(body), parsed, None)  # type: ignore[assignment]
        return rs, record

    def decode(self, topic: str, value: bytes) -> dict[str, Any]:
        return self.open(topic, value)[1]


__all__ = ["Provenance", "ProvenanceError", "RecordOpener", "RecordSealer", "provenance_of"]
