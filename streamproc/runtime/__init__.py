"""The Kafka runtime: the worker, its supervisor and topic administration.

The runtime knows nothing of operators or policies: it turns Kafka messages into
:class:`~streamproc.pipeline.core.InputRecord` objects, calls
:meth:`~streamproc.pipeline.core.Pipeline.process`, and writes the outputs and dead
letters back -- atomically with the consumer offsets under ``exactly_once``.
See ``docs/runtime.md``.
"""

from streamproc.runtime.worker import FatalWorkerError, InvariantViolation, Worker

__all__ = ["FatalWorkerError", "InvariantViolation", "Worker"]
