"""Naming a broker refusal: who we are, what was refused, on which resource.

Authentication failures and missing ACLs are configuration errors (the worker exits 78):
waiting cannot fix them, and a worker that keeps retrying looks alive while it does
nothing.  librdkafka reports them in several places (the error callback, a consumed
message, a delivery report, a refused commit) and rarely says which resource; this
module turns each into one value-free sentence naming the principal, the operation and
the resource, so the operator knows which ACL to grant.  Only the first refusal is kept:
later ones are usually consequences of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamproc.config import Config

log = logging.getLogger("streamproc.runtime.worker")  # the worker's lines, as before

#: Broker authorization refusals and the operation each one means.  Not retried: an ACL
#: does not appear by waiting.  The commit path classifies them as DENIED
#: (:func:`streamproc.runtime.checkpoint.classify`).
AUTHZ_OPERATION = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "READ",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "READ",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "WRITE",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "IDEMPOTENT_WRITE",
}


class AccessGuard:
    """Holds the first broker refusal (:attr:`error`) and asks the worker to stop.

    ``producer`` returns the worker's current producer (``None`` before start and after
    close); it is only used to find which output topics the principal cannot see.
    """

    def __init__(
        self,
        config: Config,
        transactional_id: str,
        *,
        producer: Callable[[], Producer | None],
        stop: Callable[[], None],
        timeout: float,
    ) -> None:
        self.config = config
        self.transactional_id = transactional_id
        self._producer = producer
        self._stop = stop
        self._timeout = timeout
        #: The sentence :meth:`run` logs before exiting 78, or ``None``.
        self.error: str | None = None

    def principal(self) -> str:
        """Who we are to the broker, for messages: never a password."""
        acls = getattr(self.config, "acls", None)
        if acls is not None:
            return str(acls.processor)
        user = self.config.producer_config().get("sasl.username")
        return f"User:{user}" if user else "the client's principal"

    def deny(self, err: KafkaError, topic: str | None, *, produce: bool = False) -> None:
        """Record the first refusal, as a message naming principal, operation, resource."""
        if self.error is not None:
            return
        code = err.code()
        if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            op = "WRITE" if produce else "READ"
            names = [topic] if topic else self.hidden_outputs() if produce else []
            res = f"TOPIC {', '.join(repr(t) for t in names)}" if names else "a topic"
        elif code == KafkaError.GROUP_AUTHORIZATION_FAILED:
            op, res = "READ", f"GROUP {self.config.group_id!r}"
        elif code == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            op, res = "WRITE", f"TRANSACTIONAL_ID {self.transactional_id!r}"
        else:  # CLUSTER_AUTHORIZATION_FAILED
            op, res = AUTHZ_OPERATION[code], "the CLUSTER"
        self.error = (
            f"{self.principal()} is not authorized to {op} {res} ({err.name()}); "
            "grant it with `streamproc acls apply` (docs/configuration.md#acls)"
        )
        self._stop()  # Worker.run logs it once and returns EXIT_CONFIG

    def hidden_outputs(self) -> list[str]:
        """Output topics the broker will not even describe to us: the ones missing WRITE.

        A refused transaction says "Topic authorization failed" without naming the topic;
        Kafka implies DESCRIBE from WRITE, so a topic our principal cannot see in the
        metadata is one it cannot write.
        """
        producer = self._producer()
        if producer is None:
            return []
        try:
            visible = producer.list_topics(timeout=min(self._timeout, 10.0)).topics
        except KafkaException:
            return []
        outputs = [*self.config.destination_topics, *self.config.dead_letter_topics]
        if self.config.audit is not None and self.config.audit.kafka_topic:
            outputs.append(self.config.audit.kafka_topic)
        return [t for t in dict.fromkeys(outputs) if t not in visible or visible[t].error]

    def authentication_failed(self, err: KafkaError) -> None:
        """A refused login or an untrusted broker certificate: a restart cannot fix it."""
        if self.error is not None:
            return
        conf = self.config.producer_config()
        mech = conf.get("sasl.mechanisms") or conf.get("sasl.mechanism") or "SASL"
        if err.code() == KafkaError._AUTHENTICATION:
            what = (
                f"authentication of {self.principal()} failed ({mech}, {err.name()}); "
                "check sasl.username and sasl.password"
            )
        else:
            what = (
                f"the broker's TLS certificate was not accepted ({err.name()}); check that "
                "ssl.ca.location holds the cluster's CA and the broker name matches it"
            )
        self.error = what
        self._stop()

    @staticmethod
    def is_authentication(err: KafkaError) -> bool:
        """librdkafka's error callback reports a refused login or certificate this way."""
        return err.code() == KafkaError._AUTHENTICATION or (
            err.code() == KafkaError._SSL and "certificate" in (err.str() or "")
        )

    def on_delivery_error(self, err: KafkaError, topic: str | None) -> None:
        """A failed delivery (at least once): a refusal names the topic."""
        if err.code() in AUTHZ_OPERATION:
            self.deny(err, topic, produce=True)

    def on_txn_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """Producer-wide delivery callback (failures only) of the transactional producer."""
        if err is not None and err.code() in AUTHZ_OPERATION:
            self.deny(err, msg.topic(), produce=True)
