"""Confluent wire framing: magic byte 0, a 4-byte big-endian schema id, then Avro binary."""

from __future__ import annotations

import struct

from streamproc.errors import Reason, RecordError

MAGIC = 0
_ID = struct.Struct(">I")
HEADER_LEN = 5


def frame(schema_id: int, avro: bytes) -> bytes:
    return b"\x00" + _ID.pack(schema_id) + avro


def frame_prefix(schema_id: int) -> bytes:
    """The 5-byte prefix, computed once per output schema and reused per record."""
    return b"\x00" + _ID.pack(schema_id)


def unframe(data: bytes) -> tuple[int, bytes]:
    """Split a framed payload into (schema id, Avro bytes); raises BAD_PAYLOAD."""
    if len(data) < HEADER_LEN or data[0] != MAGIC:
        raise RecordError(Reason.BAD_PAYLOAD, "payload is not Confluent-framed (magic byte 0 + schema id)")
    return _ID.unpack_from(data, 1)[0], data[HEADER_LEN:]
