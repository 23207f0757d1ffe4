"""Provenance of a sanitized record: one compact header, keyed per audience.

Why not the source coordinates
------------------------------
Every output used to carry its source topic, partition and offset in clear headers.
Those three values are the same in every audience's copy of a record, so joining the
support audience's output (plain customer id) with the analytics audience's output
(tokens) on them re-identified every analytics token.  An output now carries one header,
``streamproc.prov`` (:data:`H_PROVENANCE`), whose only per-record part is a *reference*:

    ref = base64url(AES-256(K_audience, tag(topic)[4] || partition u32 || offset u64))

one AES block (a pseudorandom permutation) under the audience's provenance key
``HKDF(master, "streamproc/provenance/v1", audience)``.  Two audiences' references to
one source record are unrelated without the keys; the lineage team, which may read the
pseudonym master, inverts a reference (:func:`resolve_reference`, ``streamproc
provenance resolve``) back to the exact source offset.  The input block is unique per
source record, so the only equal references are re-deliveries of the same record to the
same audience (what idempotent consumers want).  ``tag(topic)`` is the first four bytes
of SHA-256 of the topic name: the resolver matches it against the configured source
topics, and a reference that matches none (forged, or another audience's) is refused.

The header value (ASCII, ``;``-separated ``name=value`` fields, format ``f=1``)::

    f=1;a=<audience>;p=<policy version>;s=<output schema id>;k=<pseudonym version>;r=<ref>

``s`` is absent on tombstones; ``k`` and ``r`` are absent when the policy has no
pseudonym key (there is no key to make a reference with, and nothing unkeyed is sent
instead).  ``k`` is the pseudonym-master version that derived the reference *and* every
token, date shift and deterministic ciphertext of the record, so a secret rotation is
visible to subscribers (date shifts change with it) and old shifts can be recomputed.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from streamproc.errors import StreamprocError

H_PROVENANCE = "streamproc.prov"
FORMAT = 1
REF_CHARS = 22

_BLOCK = struct.Struct(">4sIQ")
_PAD = b"\0\0"
_B64_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_URLSAFE_TO_B64 = str.maketrans("-_", "+/")


class ProvenanceError(StreamprocError):
    """A provenance header or reference that cannot be read or resolved (never echoed)."""


def topic_tag(topic: str) -> bytes:
    return hashlib.sha256(topic.encode()).digest()[:4]


class Coordinates(Protocol):
    """Where a source record was read (the pipeline's ``InputRecord`` has these)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


def make_referencer(key: bytes) -> Callable[[Sequence[Coordinates]], list[bytes]]:
    """``f(records) -> [reference]`` (ASCII bytes) under one audience's provenance key.

    One call per batch and destination: the blocks are encrypted in one AES call and
    base64-encoded in one more (each 16-byte block padded to 18 bytes is exactly 24
    characters, of which the first 22 are the reference), so the per-record Python work
    is a ``pack`` and a slice.  Each call uses its own cipher context (thread-safe).
    """
    cipher = Cipher(algorithms.AES(key), modes.ECB())  # one block per record: a PRP, see module doc
    pack = _BLOCK.pack
    b2a = binascii.b2a_base64
    tags: dict[str, bytes] = {}

    def refs(records: Sequence[Coordinates]) -> list[bytes]:
        blocks = []
        for r in records:
            tag = tags.get(r.topic)
            if tag is None:
                tag = tags[r.topic] = topic_tag(r.topic)
            blocks.append(pack(tag, r.partition, r.offset))
        ct = memoryview(cipher.encryptor().update(b"".join(blocks)))
        text = b2a(_PAD.join([ct[i : i + 16] for i in range(0, len(ct), 16)]) + _PAD, newline=False)
        text = text.translate(_B64_TO_URLSAFE)
        return [text[i : i + REF_CHARS] for i in range(0, len(text), 24)]

    return refs


@dataclass(frozen=True)
class _Coords:
    topic: str
    partition: int
    offset: int


def reference(key: bytes, topic: str, partition: int, offset: int) -> str:
    """The reference of one source record (tests, tools; the pipeline batches)."""
    return make_referencer(key)([_Coords(topic, partition, offset)])[0].decode()


def _b64u(block: bytes) -> str:
    return binascii.b2a_base64(block, newline=False)[:REF_CHARS].translate(_B64_TO_URLSAFE).decode()


def resolve_reference(key: bytes, ref: str, topics: Iterable[str]) -> tuple[str, int, int]:
    """Invert a reference: ``(source topic, partition, offset)``.

    ``topics`` are the candidate source topics (the configuration's).  Raises
    :class:`ProvenanceError` when the reference is malformed or its topic tag matches none
    of them (wrong audience, wrong master version, forged).
    """
    try:
        if len(ref) != REF_CHARS:
            raise ValueError
        block = binascii.a2b_base64(ref.translate(_URLSAFE_TO_B64) + "==", strict_mode=True)
        if len(block) != 16 or _b64u(block) != ref:  # one spelling per reference
            raise ValueError
    except (ValueError, binascii.Error):
        raise ProvenanceError("not a provenance reference") from None
    dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    tag, partition, offset = _BLOCK.unpack(dec.update(block) + dec.finalize())
    matches = [t for t in dict.fromkeys(topics) if topic_tag(t) == tag]
    if len(matches) != 1:
        raise ProvenanceError(
            "reference does not resolve to a configured source topic under this audience's key"
            if not matches
            else "reference matches several source topics (4-byte tag collision)"
        )
    return matches[0], partition, offset


@dataclass(frozen=True)
class Provenance:
    """The parsed ``streamproc.prov`` header."""

    format: int
    audience: str
    policy_version: str
    schema_id: int | None
    key_version: int | None
    ref: str | None


def header_prefix(audience: str, policy_version: str, schema_id: int | None, key_version: int | None) -> bytes:
    """The constant part of the header value; the reference (if any) is appended per record."""
    parts = [f"f={FORMAT}", f"a={audience}", f"p={policy_version}"]
    if schema_id is not None:
        parts.append(f"s={schema_id}")
    if key_version is not None:
        parts += [f"k={key_version}", "r="]
    return ";".join(parts).encode()


def parse_header(value: bytes | str) -> Provenance:
    """Parse a ``streamproc.prov`` value; :class:`ProvenanceError` if malformed."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
        fields = dict(part.split("=", 1) for part in text.split(";"))
        fmt = int(fields["f"])
        if fmt != FORMAT:
            raise ProvenanceError(f"provenance header format {fmt} is not supported (this version reads {FORMAT})")
        s, k, r = fields.get("s"), fields.get("k"), fields.get("r")
        return Provenance(fmt, fields["a"], fields["p"], None if s is None else int(s), None if k is None else int(k), r)
    except (UnicodeDecodeError, ValueError, KeyError):
        raise ProvenanceError("malformed streamproc.prov header") from None


def from_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> Provenance:
    """The provenance of a consumed record (confluent-kafka's ``Message.headers()``)."""
    for name, value in headers or ():
        if name == H_PROVENANCE and value is not None:
            return parse_header(value)
    raise ProvenanceError(f"record has no {H_PROVENANCE} header")


__all__ = [
    "H_PROVENANCE",
    "Provenance",
    "ProvenanceError",
    "from_headers",
    "header_prefix",
    "make_referencer",
    "parse_header",
    "reference",
    "resolve_reference",
]
