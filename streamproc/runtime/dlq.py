"""The dead-letter record format.

A dead letter is the *original* record -- key, value and headers byte for byte -- plus
headers that say why it was quarantined and where it came from.  The value is whatever
the producer sent (an envelope, or garbage); the processor never puts plaintext in a dead
letter, so the DLQ needs no more protection than the source topic.

Added headers (all UTF-8 text):

========================================  ============================================
``streamproc.dlq.reason``                 the :class:`~streamproc.errors.Reason` value
``streamproc.dlq.detail``                 a value-free detail (key ids, schema ids...)
``streamproc.source.topic``               source topic
``streamproc.source.partition``           source partition
``streamproc.source.offset``              source offset
``streamproc.processor.version``          the processor version that quarantined it
========================================  ============================================

Original headers come first, in their original order; the added ones follow, so a
re-drive tool can strip the ``streamproc.dlq.*``/``streamproc.source.*`` suffix and
replay the record unchanged.
"""

from __future__ import annotations

from streamproc import __version__
from streamproc.pipeline.core import (
    H_PROCESSOR,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    Quarantined,
)

H_DLQ_REASON = "streamproc.dlq.reason"
H_DLQ_DETAIL = "streamproc.dlq.detail"
_VERSION = __version__.encode()


#: Longest ``streamproc.dlq.detail`` value; details are short by contract.
MAX_DETAIL = 256


def _header_text(detail: str) -> bytes:
    """The detail as printable ASCII, capped: defence in depth for a header consumers
    print.  Details are value-free by contract (KEK ids from envelopes appear only as a
    configured, escaped id or a digest); this only guarantees no control character, no
    non-ASCII text and no unbounded length can ride along."""
    out = []
    for c in detail[:MAX_DETAIL]:
        if " " <= c <= "~":
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return "".join(out)[:MAX_DETAIL].encode("ascii")


def dead_letter_headers(q: Quarantined) -> list[tuple[str, bytes | None]]:
    rec = q.record
    return [
        *rec.headers,
        (H_DLQ_REASON, q.reason.value.encode()),
        (H_DLQ_DETAIL, _header_text(q.detail)),
        (H_SOURCE_TOPIC, rec.topic.encode()),
        (H_SOURCE_PARTITION, str(rec.partition).encode()),
        (H_SOURCE_OFFSET, str(rec.offset).encode()),
        (H_PROCESSOR, _VERSION),
    ]


__all__ = ["H_DLQ_DETAIL", "H_DLQ_REASON", "dead_letter_headers"]
