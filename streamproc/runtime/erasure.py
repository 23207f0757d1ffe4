"""The subject-key table in the worker, and the key topic as the tools read it.

:func:`start_key_table` builds the :class:`~streamproc.crypto.erasure.SubjectKeyTable` of
a config with ``erasure:``, restores it from the whole subject-key topic (every partition
to its end, before the worker consumes anything) and installs it in the pipeline, whose
``erasable`` rules then bind to it.  The restore and the background follower are the
consent table's (:class:`~streamproc.runtime.consent.ConsentTable`, the KTable pattern)
with the key table's ``apply``; the reader's group ids are ``<group_id>.erasure-<random>``
(never committed).

Keys this worker creates reach the topic in its batch transactions (the pipeline's
``state_writes``, :mod:`streamproc.runtime.state`); keys other workers create, shreds and
forgotten markers written by ``streamproc forget`` reach the table through the follower.
:func:`read_key_directory` reads the topic once for ``forget`` and ``reidentify``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamproc.config import Config
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.erasure import KeyDirectory, KeyRecordError, SubjectKeyTable
from streamproc.crypto.kms import KmsProvider
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import ConfigError
from streamproc.runtime.consent import ConsentSource, ConsentTable, KafkaConsentSource

ROLE = "erasure"


def key_opener(kms: KmsProvider, topic: str) -> Callable[[bytes], bytes]:
    """``sealed key record -> plaintext`` through a data-key cache of its own."""
    opener = Opener.for_kms(kms)
    return lambda data: opener.open_parts(topic, data)[0]


def build_key_table(config: Config, kms: KmsProvider, keys: PseudonymKeys) -> SubjectKeyTable:
    """The empty table of ``config.erasure`` (one sealer per audience, under its KEK)."""
    assert config.erasure is not None
    topic = config.erasure.topic
    sealers = {aud: Sealer(kms, kek, topic) for aud, kek in config.subject_key_keks().items()}
    return SubjectKeyTable(keys, topic=topic, sealers=sealers, open_envelope=key_opener(kms, topic))


def start_key_table(config: Config, pipeline: Any, *, source: ConsentSource | None = None) -> ConsentTable | None:
    """With ``erasure:``, the restored key table installed in ``pipeline``; the caller
    starts the returned follower (``.start()``) and stops it.  ``None`` without ``erasure:``."""
    if config.erasure is None:
        return None
    if pipeline.keys is None:
        raise ConfigError("erasure: the policy needs keys.pseudonym (subject tokens derive from it)")
    ec = config.erasure
    table = build_key_table(config, pipeline.kms, pipeline.keys)
    if source is None:
        source = KafkaConsentSource(config.consumer_config(), ec.topic, group_prefix=config.group_id, role=ROLE)
    follower = ConsentTable(
        source, topic=ec.topic, apply=table.apply, format_errors=(KeyRecordError,), what="subject-key"
    )
    try:
        follower.restore(ec.restore_timeout_seconds)
    except BaseException:
        source.close()
        raise
    pipeline.erasure = table
    pipeline.reset_plans()  # erasable plans bind to the table: none may predate it
    return follower


def read_key_directory(config: Config, *, timeout: float = 30.0, consumer_config: dict[str, Any] | None = None) -> KeyDirectory:
    """The whole subject-key topic, read once to its end (for ``forget`` and ``reidentify``)."""
    if config.erasure is None:
        raise ConfigError("erasure: is not configured (no subject-key topic)")
    directory = KeyDirectory()
    source = KafkaConsentSource(
        consumer_config or config.consumer_config(), config.erasure.topic, group_prefix=config.group_id, role=ROLE
    )
    table = ConsentTable(source, topic=config.erasure.topic, apply=directory.apply, what="subject-key")
    try:
        table.restore(timeout)
    finally:
        source.close()
    return directory


__all__ = ["ROLE", "build_key_table", "key_opener", "read_key_directory", "start_key_table"]
