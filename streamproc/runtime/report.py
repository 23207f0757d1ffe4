"""Step 8 of the checkpoint: what the observer and the log learn about a committed batch.

Per batch, not per record: one latency update for the whole batch (the observer buckets
it), one dead-letter count per (reason, topic), the cache counters once.  The only
per-record work left is a log line per dead letter (naming topic, partition, offset and
reason class, never a value).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping

from streamproc.observability import Observer
from streamproc.pipeline.core import BatchResult, Pipeline
from streamproc.runtime.batch import Batch

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before


def report_commit(
    observer: Observer, pipeline: Pipeline, dlq_for: Mapping[str, str], batch: Batch,
    result: BatchResult, now: float | None = None,
) -> None:  # fmt: skip
    """Report a committed batch (end-to-end latency, dead letters, DEK cache).

    ``now``: when its commit returned (wall clock), which with the commit overlapped is
    earlier than when the worker gets round to reporting it.
    """
    stamps = batch.timestamps_ms()
    if stamps:
        observer.end_to_end_latency_ms(time.time() if now is None else now, stamps)
    dl: dict[tuple[str, str], int] = defaultdict(int)
    for q in result.quarantined:
        dl[(q.reason.value, q.record.topic)] += 1
        log.warning(
            "record dead-lettered (%s)",
            q.detail,
            extra={
                "reason": q.reason.value,
                "dlq_topic": dlq_for.get(q.record.topic),
                "topic": q.record.topic,
                "partition": q.record.partition,
                "offset": q.record.offset,
            },
        )
    for (reason, topic), n in dl.items():
        observer.dead_lettered(reason, topic, n)
    cache = pipeline.dek_cache_stats()
    observer.dek_cache(cache.hits, cache.misses)
    log.debug(
        "batch committed: %d outputs, %d dead letters",
        len(result.outputs),
        len(result.quarantined),
        extra={"records": len(batch.messages)},
    )
