"""OpenLineage run events: which topics the processor reads and writes, field by field.

With a ``lineage:`` section in the config (off without one) each worker emits, through
``openlineage-python`` and the transport configured there (console, file, HTTP such as
Marquez, Kafka):

* ``START`` when it starts: the job (``lineage.namespace`` / ``lineage.job``, default the
  consumer group), the source topics as inputs and the destination topics as outputs;
* ``RUNNING`` on every plan compilation (the first record of a schema for a destination):
  the source topics with the input schema, the destination with its output schema and the
  **column-lineage facet**: for every output field, the input field it came from and the
  transformation -- ``DIRECT``/``IDENTITY`` for a kept value, ``DIRECT``/``TRANSFORMATION``
  with ``masking: true`` and a description naming the operator and its parameters
  (``token(normalize=["lower","strip"])``) for every privacy operator;
* ``COMPLETE`` when it drains cleanly, ``FAIL`` when it stops on an error.

Datasets follow OpenLineage's naming for Kafka: namespace ``kafka://<first bootstrap
server>``, name the topic.  Events carry schemas, field names and policy parameters,
never a record value or key material.  Events are sent by a background thread from a
bounded queue: a slow or unreachable transport (an HTTP endpoint retrying with backoff)
never stalls the consume loop.  An event that cannot be sent, or finds the queue full, is
logged (the transport's error class) and dropped; lineage never decides what happens to a
record.  :meth:`LineageEmitter.close` drains the queue (bounded by a timeout) on shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import column_lineage_dataset, job_type_job, schema_dataset
from openlineage.client.transport import get_default_factory
from openlineage.client.uuid import generate_new_uuid

from streamproc import __version__
from streamproc.pipeline.core import CompiledPlan
from streamproc.pipeline.lineage import IDENTITY_OPS

log = logging.getLogger("streamproc.lineage")

#: The ``producer`` URI of every event (this software and its version).
PRODUCER = f"urn:streamproc:processor:{__version__}"
TRANSPORTS = ("console", "file", "http", "kafka")


def dataset_namespace(bootstrap_servers: str) -> str:
    """``kafka://host:port`` of the first bootstrap server (OpenLineage's Kafka naming)."""
    first = bootstrap_servers.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    return f"kafka://{first}"


def _avro_type(t: Any) -> tuple[str, list[schema_dataset.SchemaDatasetFacetFields]]:
    """A type name for the schema facet, and the nested fields of a record."""
    if isinstance(t, str):
        return t, []
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        if len(branches) == 1 and len(t) == 2:
            return _avro_type(branches[0])
        names = [_avro_type(b)[0] for b in t]
        return f"union<{','.join(names)}>", []
    if isinstance(t, dict):
        kind = t.get("type")
        if t.get("logicalType"):
            return f"{kind}({t['logicalType']})", []
        if kind == "record":
            return "record", _schema_fields(t)
        if kind == "array":
            inner, nested = _avro_type(t.get("items"))
            return f"array<{inner}>", nested
        if kind == "map":
            inner, nested = _avro_type(t.get("values"))
            return f"map<{inner}>", nested
        if kind in ("enum", "fixed"):
            return str(kind), []
        return _avro_type(kind)
    return "unknown", []


def _schema_fields(record: Mapping[str, Any]) -> list[schema_dataset.SchemaDatasetFacetFields]:
    out = []
    for i, f in enumerate(record.get("fields", []), start=1):
        type_name, nested = _avro_type(f.get("type"))
        doc = f.get("doc")
        out.append(
            schema_dataset.SchemaDatasetFacetFields(
                name=f["name"],
                type=type_name,
                description=doc if isinstance(doc, str) else None,
                ordinal_position=i,
                fields=nested,
            )
        )
    return out


def schema_facet(avro_schema: Any) -> schema_dataset.SchemaDatasetFacet:
    """The schema facet of an Avro record schema (nested records as nested fields)."""
    return schema_dataset.SchemaDatasetFacet(fields=_schema_fields(avro_schema if isinstance(avro_schema, Mapping) else {}))


def column_lineage(plan: CompiledPlan, namespace: str) -> column_lineage_dataset.ColumnLineageDatasetFacet:
    """The column-lineage facet of one compiled plan: one entry per output field."""
    fields: dict[str, column_lineage_dataset.Fields] = {}
    for t in plan.fields:
        if t.output_field is None:
            continue
        if not t.ops or all(u.op in IDENTITY_OPS for u in t.ops):
            transformations = [
                column_lineage_dataset.Transformation(type="DIRECT", subtype="IDENTITY", description="keep", masking=False)
            ]
        else:
            transformations = [
                column_lineage_dataset.Transformation(
                    type="DIRECT", subtype="TRANSFORMATION", description=u.describe(), masking=u.op not in IDENTITY_OPS
                )
                for u in t.ops
            ]
        fields[t.output_field] = column_lineage_dataset.Fields(
            inputFields=[
                column_lineage_dataset.InputField(
                    namespace=namespace, name=src, field=t.path, transformations=list(transformations)
                )
                for src in plan.sources
            ]
        )
    return column_lineage_dataset.ColumnLineageDatasetFacet(fields=fields)


class LineageEmitter:
    """Builds and sends the run events of one worker (see the module doc)."""

    def __init__(
        self,
        client: Any,
        *,
        job_namespace: str,
        job_name: str,
        dataset_namespace: str,
        sources: Sequence[str],
        destinations: Sequence[str],
        policy_version: str,
        queue_size: int = 1000,
    ) -> None:
        self.client = client
        self.job_namespace = job_namespace
        self.job_name = job_name
        self.namespace = dataset_namespace
        self.sources = list(sources)
        self.destinations = list(destinations)
        self.policy_version = policy_version
        self.run_id = str(generate_new_uuid())
        #: Events that could not be sent or queued (their error class was logged).
        self.failed = 0
        self._queue: queue.Queue[RunEvent | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any, policy_version: str) -> LineageEmitter | None:
        """The emitter of ``config.lineage``, or None when lineage is off."""
        lc = getattr(config, "lineage", None)
        if lc is None or not lc.enabled:
            return None
        transport_conf = dict(lc.transport)
        transport = get_default_factory().create(config=transport_conf)
        client = OpenLineageClient(transport=transport, config={"transport": transport_conf})
        return cls(
            client,
            job_namespace=lc.namespace,
            job_name=lc.job or config.group_id,
            dataset_namespace=dataset_namespace(str(config.kafka["bootstrap.servers"])),
            sources=config.source_topics,
            destinations=config.destination_topics,
            policy_version=policy_version,
        )

    def _job(self) -> Job:
        return Job(
            namespace=self.job_namespace,
            name=self.job_name,
            facets={"jobType": job_type_job.JobTypeJobFacet(processingType="STREAMING", integration="STREAMPROC", jobType="JOB")},
        )

    def _event(self, state: RunState, inputs: list[InputDataset], outputs: list[OutputDataset]) -> RunEvent:
        return RunEvent(
            eventType=state,
            eventTime=datetime.now(UTC).isoformat(),
            run=Run(runId=self.run_id),
            job=self._job(),
            producer=PRODUCER,
            inputs=inputs,
            outputs=outputs,
        )

    def _emit(self, event: RunEvent) -> RunEvent:
        """Queue ``event`` for the sender thread (never blocks the caller)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_loop, name="lineage", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.failed += 1
            log.warning("lineage event dropped: queue full", extra={"event_type": _kind(event)})
        return event

    def _send_loop(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                self.client.emit(event)
            except Exception as exc:  # the transport's errors: lineage never stops processing
                self.failed += 1
                log.warning("lineage event not sent", extra={"event_type": _kind(event), "error": type(exc).__name__})
            finally:
                self._queue.task_done()

    def start(self) -> RunEvent:
        return self._emit(
            self._event(
                RunState.START,
                [InputDataset(namespace=self.namespace, name=t) for t in self.sources],
                [OutputDataset(namespace=self.namespace, name=t) for t in self.destinations],
            )
        )

    def plan_compiled(self, plan: CompiledPlan) -> RunEvent:
        """The RUNNING event of one compiled (input schema, destination) plan."""
        in_schema = schema_facet(plan.input_schema)
        inputs = [InputDataset(namespace=self.namespace, name=t, facets={"schema": in_schema}) for t in plan.sources]
        output = OutputDataset(
            namespace=self.namespace,
            name=plan.destination.topic,
            facets={"schema": schema_facet(plan.output_schema), "columnLineage": column_lineage(plan, self.namespace)},
        )
        return self._emit(self._event(RunState.RUNNING, inputs, [output]))

    def finish(self, ok: bool) -> RunEvent:
        return self._emit(self._event(RunState.COMPLETE if ok else RunState.FAIL, [], []))

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), then close the transport."""
        thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.warning("lineage queue not drained at shutdown")
            thread.join(timeout)
        close = getattr(self.client, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:
                log.warning("lineage transport close failed", extra={"error": type(exc).__name__})


def _kind(event: RunEvent | None) -> str:
    return "" if event is None else str(getattr(event.eventType, "value", ""))


__all__ = ["PRODUCER", "TRANSPORTS", "LineageEmitter", "column_lineage", "dataset_namespace", "schema_facet"]
