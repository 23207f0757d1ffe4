"""Recording a data subject's consent, withdrawal or objection: the application-side call.

An application that collects consent (a preferences page, a support tool) calls
:meth:`ConsentWriter.grant`, :meth:`~ConsentWriter.withdraw` or :meth:`~ConsentWriter.object`
with the subject's identifier as it appears in the records' subject field.  The writer
produces one record to the compacted consent topic
(:mod:`streamproc.policy.consent` has the format): keyed by the subject's token in the
consent domain, derived from the pseudonym master, so the raw identifier never reaches
the topic.  Each call waits for the broker's acknowledgement: a caller that returns has
its change durably in the topic, and workers honour it from the moment they read it.

The writer needs the pseudonym master (a :class:`~streamproc.crypto.pseudonym.PseudonymKeys`)
for the same reason the processor does; ``streamproc consent`` builds one from the
processor's config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from streamproc.crypto.pseudonym import PseudonymKeys, make_tokenizer
from streamproc.errors import StreamprocError
from streamproc.operators.base import canonical_bytes
from streamproc.policy.consent import encode, record_key


class ConsentWriteError(StreamprocError):
    """The consent record was not acknowledged (the message names the topic and error class)."""


def subject_token(keys: PseudonymKeys, domain: str, subject: Any, version: int | None = None) -> str:
    """The subject's token in the consent ``domain`` (``tk<v>_...``), as the worker computes it
    from the record's subject field (the value's canonical bytes: ``"42"`` and ``42`` agree)."""
    v, key = keys.consent_key(domain, version)
    return make_tokenizer(v, key)(canonical_bytes(subject))


class ConsentWriter:
    """Writes consent records for one consent topic (thread-safe like the producer)."""

    def __init__(
        self,
        producer_config: dict[str, Any],
        topic: str,
        keys: PseudonymKeys,
        *,
        domain: str = "consent",
        purposes: Iterable[str] | None = None,
        producer_factory: Callable[[dict[str, Any]], Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.keys = keys
        self.domain = domain
        #: The policy's purposes: a name outside them is refused (a typo would be silent).
        self.purposes = None if purposes is None else frozenset(purposes)
        self.timeout = timeout
        conf = {**producer_config, "enable.idempotence": True, "acks": "all"}
        conf.pop("transactional.id", None)
        self.producer = (producer_factory or Producer)(conf)

    def key(self, subject: Any, purpose: str) -> bytes:
        """The consent-topic key of (subject, purpose) under the master's primary version."""
        return record_key(subject_token(self.keys, self.domain, subject), purpose)

    def grant(self, subject: Any, purpose: str, *, at_ms: int | None = None) -> tuple[int, int]:
        """The subject grants ``purpose`` (or lifts an objection); returns (partition, offset)."""
        return self._write(subject, purpose, "granted", at_ms)

    def withdraw(self, subject: Any, purpose: str, *, at_ms: int | None = None) -> tuple[int, int]:
        """The subject withdraws consent for ``purpose``."""
        return self._write(subject, purpose, "withdrawn", at_ms)

    def object(self, subject: Any, purpose: str, *, at_ms: int | None = None) -> tuple[int, int]:
        """The subject objects to ``purpose`` (stops it whatever its legal basis)."""
        return self._write(subject, purpose, "objected", at_ms)

    def _write(self, subject: Any, purpose: str, status: str, at_ms: int | None) -> tuple[int, int]:
        if self.purposes is not None and purpose not in self.purposes:
            raise ConsentWriteError(f"unknown purpose {purpose!r} (the policy has: {', '.join(sorted(self.purposes))})")
        if subject is None or subject == "":
            raise ConsentWriteError("a subject is required")
        at = int(time.time() * 1000) if at_ms is None else int(at_ms)
        result: list[Any] = []

        def done(err: Any, msg: Any) -> None:
            result.append(err if err is not None else (msg.partition(), msg.offset()))

        self.producer.produce(self.topic, key=self.key(subject, purpose), value=encode(purpose, status, at), on_delivery=done)
        self.producer.flush(self.timeout)
        if not result:
            raise ConsentWriteError(f"consent topic {self.topic!r}: not acknowledged within {self.timeout:.0f}s")
        r = result[0]
        if not isinstance(r, tuple):
            raise ConsentWriteError(f"consent topic {self.topic!r}: {r.name()}")
        return r

    def close(self) -> None:
        self.producer.flush(self.timeout)


__all__ = ["ConsentWriteError", "ConsentWriter", "subject_token"]
