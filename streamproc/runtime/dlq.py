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


def dead_letter_headers(q: Quarantined) -> list[tuple[str, bytes | None]]:
    rec = q.record
    return [
        *rec.headers,
        (H_DLQ_REASON, q.reason.value.encode()),
        (H_DLQ_DETAIL, q.detail.encode("utf-8", "replace")),
        (H_SOURCE_TOPIC, rec.topic.encode()),
        (H_SOURCE_PARTITION, str(rec.partition).encode()),
        (H_SOURCE_OFFSET, str(rec.offset).encode()),
        (H_PROCESSOR, _VERSION),
    ]


__all__ = ["H_DLQ_DETAIL", "H_DLQ_REASON", "dead_letter_headers"]
