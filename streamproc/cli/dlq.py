"""``streamproc dlq inspect|replay``: open dead letters, and re-drive them after a fix.

Dead letters are sealed under the quarantine KEK (:mod:`streamproc.runtime.dlq`); only a
KMS identity that may unwrap under it -- the incident-response role, never the processor
-- opens them.  Both commands therefore take that identity's KMS settings
(``--kms-config``, a YAML file with a ``kms:`` section; default: the processor config's)
and write one audit event per dead letter *before* showing or re-producing it, to the
config's audit trail (:func:`streamproc.audit.open_tool_log`: the caller's authenticated
identity is the actor, ``--actor`` only a note beside it): no audit trail, no plaintext
(fail closed).

``replay`` re-produces dead letters to their source topic exactly once: in one Kafka
transaction per batch, the original key, headers and value go to the source topic and
the replay group's offset on the DLQ partition moves past them
(``send_offsets_to_transaction``), so running the same replay twice re-produces nothing
and a crash in between re-produces nothing twice.  Records of the range that are not
selected (another reason class) are passed over for that group; use another ``--group``
to replay them later.  Truncated and reference dead letters (the original did not fit)
cannot be replayed and are reported; their original stays in the source topic until its
retention ends.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import yaml

from streamproc.audit import EventType
from streamproc.cli.options import config_option
from streamproc.config import Config
from streamproc.errors import ConfigError, StreamprocError

H_REPLAY_OF = "streamproc.replay.of"


def _load(config_path: str) -> Config:
    from streamproc.config import load_config

    try:
        return load_config(config_path, check_policy=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _kms(config: Config, kms_config: Path | None) -> Any:
    from streamproc.crypto.kms.factory import build_kms

    if kms_config is None:
        spec, base = dict(config.kms), config.base_dir
    else:
        try:
            raw = yaml.safe_load(kms_config.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise click.UsageError(f"{kms_config}: cannot read YAML ({type(exc).__name__})") from None
        spec = raw.get("kms", raw) if isinstance(raw, dict) else raw
        base = kms_config.parent
    try:
        return build_kms(spec, base_dir=base)
    except StreamprocError as exc:
        raise click.ClickException(f"kms: {exc}") from None


def _audit(config: Config, note: str | None) -> Any:
    from streamproc.audit import AuditError, open_tool_log

    try:
        return open_tool_log(config, note=note)
    except (AuditError, StreamprocError) as exc:
        raise click.ClickException(f"audit log unavailable, refusing to continue: {exc}") from None


def _close(log: Any) -> None:
    from streamproc.audit import AuditError

    try:
        log.close()
    except AuditError as exc:
        click.echo(f"warning: closing the audit log: {exc}", err=True)


def _dlq_topic(config: Config, topic: str) -> str:
    if topic not in config.dead_letter_topics:
        raise click.UsageError(
            f"{topic!r} is not a dead-letter topic of the config "
            f"(have: {', '.join(config.dead_letter_topics)})"
        )
    return topic


def _consumer(config: Config, group: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer(
        {
            **config.kafka,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )


def _read(
    consumer: Any, topic: str, partitions: list[int], start: dict[int, int], end: dict[int, int]
) -> Iterator[Any]:
    """Messages of ``topic`` from ``start`` up to ``end`` (exclusive) per partition."""
    from confluent_kafka import KafkaError, TopicPartition

    todo = {p for p in partitions if start[p] < end[p]}
    if not todo:
        return
    consumer.assign([TopicPartition(topic, p, start[p]) for p in sorted(todo)])
    idle = 0
    while todo and idle < 100:
        msgs = consumer.consume(500, 0.2)
        idle = 0 if msgs else idle + 1
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(m.partition())
                    continue
                raise click.ClickException(f"reading {topic}: {err.name()}")
            p = m.partition()
            if p not in todo:
                continue
            if m.offset() >= end[p]:
                todo.discard(p)
                continue
            yield m
            if m.offset() + 1 >= end[p]:
                todo.discard(p)


def _partitions(consumer: Any, topic: str, only: int | None) -> list[int]:
    md = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        raise click.ClickException(f"topic {topic!r} not found")
    parts = sorted(md.partitions)
    if only is not None:
        if only not in parts:
            raise click.UsageError(f"{topic!r} has no partition {only}")
        return [only]
    return parts


def _range(consumer: Any, topic: str, parts: list[int], first: int | None, last: int | None) -> tuple[dict[int, int], dict[int, int]]:
    from confluent_kafka import TopicPartition

    start, end = {}, {}
    for p in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        start[p] = max(low, first if first is not None else low)
        end[p] = min(high, last + 1 if last is not None else high)
    return start, end


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _describe_value(value: bytes | None) -> dict[str, Any] | None:
    """Whether the original value is an envelope, and under which KEK (never its bytes)."""
    from streamproc.crypto.envelope import header_key

    key = None if value is None else header_key(value)
    if key is None:
        return None
    return {"kek_id": key[0], "kek_version": key[1]}


def _common(f: Any) -> Any:
    opts = [
        config_option(),
        click.option("--topic", required=True, help="The dead-letter topic (one of the config's)."),
        click.option("--partition", type=int, default=None, help="Only this DLQ partition."),
        click.option("--kms-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="YAML with the incident-response role's kms: settings "
                     "(default: the config's own kms:, which the processor's role cannot open)."),
        click.option("--actor", "note", default=None, envvar="STREAMPROC_ACTOR",
                     help="Free-text note recorded beside the authenticated actor (e.g. your "
                     "ticket handle); it never replaces the identity."),
        click.option("--reason", "why", required=True,
                     help="Justification, e.g. a ticket id (audited; no personal data)."),
        click.option("--class", "reason_class", default=None,
                     help="Only dead letters of this reason class (e.g. unknown_schema)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group("dlq")
def dlq() -> None:
    """Open dead letters (incident response) and replay them after a fix; both audited."""


@dlq.command("inspect")
@_common
@click.option("--from-offset", type=int, default=None, help="First DLQ offset (inclusive).")
@click.option("--to-offset", type=int, default=None, help="Last DLQ offset (inclusive).")
@click.option("--max", "max_records", type=click.IntRange(1), default=None, help="Stop after N dead letters.")
def inspect(
    config_path: str,
    topic: str,
    partition: int | None,
    kms_config: Path | None,
    note: str | None,
    why: str,
    reason_class: str | None,
    from_offset: int | None,
    to_offset: int | None,
    max_records: int | None,
) -> None:
    """Print dead letters of TOPIC as JSON lines: reason, detail, source coordinates and the
    original key, headers and value (base64), opened with the quarantine KEK.

    Every dead letter opened is an audit event (written before it is printed).  The value
    stays sealed under its source KEK when it was an envelope (``value_envelope`` names
    that KEK); garbage is shown as it came.
    """
    from streamproc.runtime.dlq import DeadLetterError, DeadLetterReader

    config = _load(config_path)
    topic = _dlq_topic(config, topic)
    reader = DeadLetterReader(_kms(config, kms_config))
    log = _audit(config, note)
    consumer = _consumer(config, f"streamproc-dlq-inspect-{uuid.uuid4().hex[:8]}")
    shown = failed = 0
    try:
        parts = _partitions(consumer, topic, partition)
        start, end = _range(consumer, topic, parts, from_offset, to_offset)
        for m in _read(consumer, topic, parts, start, end):
            subject = f"{topic}:{m.partition()}:{m.offset()}"
            headers = list(m.headers() or ())
            clear = {k: v for k, v in headers}
            cls = (clear.get("streamproc.dlq.reason") or b"").decode("utf-8", "replace")
            if reason_class is not None and cls != reason_class:
                continue
            try:
                d = reader.open(topic, m.value(), headers, where=(topic, m.partition(), m.offset()))
            except DeadLetterError as exc:
                failed += 1
                log.emit(EventType.DEAD_LETTER_INSPECTED, {"subject": subject, "topic": topic,
                         "partition": m.partition(), "reason": why, "outcome": "failed",
                         "error": type(exc).__name__})
                click.echo(f"{subject}: {exc}", err=True)
                continue
            log.emit(EventType.DEAD_LETTER_INSPECTED, {"subject": subject, "topic": topic,
                     "partition": m.partition(), "reason": why, "outcome": "success",
                     "key_id": config.dead_letter_kek})
            click.echo(json.dumps({
                "dlq": {"topic": topic, "partition": m.partition(), "offset": m.offset()},
                "reason": d.reason,
                "detail": d.detail,
                "source": {"topic": d.topic, "partition": d.partition, "offset": d.offset,
                           "timestamp_ms": d.timestamp_ms},
                "key": _b64(d.key),
                "key_length": d.key_length,
                "headers": [[n, _b64(v)] for n, v in d.headers],
                "value": _b64(d.value),
                "value_length": d.value_length,
                "value_sha256": d.value_sha256.hex(),
                "value_envelope": _describe_value(d.value),
                "truncated": d.truncated,
                "reference": d.reference,
            }))
            shown += 1
            if max_records is not None and shown >= max_records:
                break
    except StreamprocError as exc:  # audit sink failures included: stop, fail closed
        raise click.ClickException(str(exc)) from None
    finally:
        consumer.close()
        _close(log)
    click.echo(f"{shown} dead letter(s) shown, {failed} could not be opened", err=True)
    if failed:
        raise SystemExit(1)


@dlq.command("replay")
@_common
@click.option("--to-offset", type=int, required=True,
              help="Replay up to this DLQ offset (inclusive), from the group's position.")
@click.option("--group", default="streamproc-dlq-replay", show_default=True,
              help="Replay group: its committed DLQ offsets say what was replayed already.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; produce and commit nothing.")
def replay(
    config_path: str,
    topic: str,
    partition: int | None,
    kms_config: Path | None,
    note: str | None,
    why: str,
    reason_class: str | None,
    to_offset: int,
    group: str,
    dry_run: bool,
) -> None:
    """Re-produce dead letters of TOPIC to their source topic, exactly once.

    Run it after the cause is fixed (a schema registered, a key restored): the processor
    then reads the originals again like any new record.  Per DLQ partition, everything
    from the replay group's committed offset up to --to-offset is read; dead letters of
    --class (default: all) are re-produced with their original key, headers and value
    (plus a ``streamproc.replay.of`` header naming the dead letter), in one transaction
    together with the group's new offset.
    """
    from confluent_kafka import KafkaException, Producer, TopicPartition

    from streamproc.runtime.dlq import DeadLetterError, DeadLetterReader

    config = _load(config_path)
    topic = _dlq_topic(config, topic)
    sources = {s for p in config.pipelines if p.dead_letter_topic == topic for s in p.sources}
    reader = DeadLetterReader(_kms(config, kms_config))
    log = _audit(config, note)
    consumer = _consumer(config, group)
    producer = None
    replayed = skipped = 0
    try:
        parts = _partitions(consumer, topic, partition)
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        start, end = _range(consumer, topic, parts, None, to_offset)
        for tp in committed:
            if tp.offset >= 0:
                start[tp.partition] = max(start[tp.partition], tp.offset)
        if not dry_run:
            producer = Producer({**config.kafka, "transactional.id": f"{group}-{topic}",
                                 "enable.idempotence": True})
            producer.init_transactions(30)
        for p in parts:
            if start[p] >= end[p]:
                continue
            batch: list[tuple[str, Any]] = []
            last = None
            for m in _read(consumer, topic, [p], start, end):
                last = m.offset()
                subject = f"{topic}:{p}:{m.offset()}"
                headers = list(m.headers() or ())
                cls = (dict(headers).get("streamproc.dlq.reason") or b"").decode("utf-8", "replace")
                if reason_class is not None and cls != reason_class:
                    continue
                try:
                    d = reader.open(topic, m.value(), headers, where=(topic, p, m.offset()))
                except DeadLetterError as exc:
                    raise click.ClickException(f"{subject}: {exc}; nothing replayed from partition {p}") from None
                if not d.complete:
                    skipped += 1
                    click.echo(f"{subject}: not replayable ({'truncated' if d.truncated else 'reference'}); "
                               f"the original is {d.topic}[{d.partition}]@{d.offset}", err=True)
                    continue
                if d.topic not in sources:
                    raise click.ClickException(f"{subject}: source topic {d.topic!r} is not a source of {topic!r}")
                batch.append((subject, d))
            if last is None:
                continue
            # Audited before anything is produced (a dry run only opened them).
            event = EventType.DEAD_LETTER_INSPECTED if dry_run else EventType.DEAD_LETTER_REPLAYED
            for subject, d in batch:
                log.emit(event, {"subject": subject, "topic": d.topic,
                         "partition": d.partition, "reason": why, "outcome": "success",
                         "key_id": config.dead_letter_kek})
            if dry_run:
                for subject, d in batch:
                    click.echo(f"would replay {subject} -> {d.topic}")
                replayed += len(batch)
                continue
            assert producer is not None
            producer.begin_transaction()
            try:
                for subject, d in batch:
                    producer.produce(d.topic, value=d.value, key=d.key,
                                     headers=[*d.headers, (H_REPLAY_OF, subject.encode())])
                producer.send_offsets_to_transaction(
                    [TopicPartition(topic, p, last + 1)], consumer.consumer_group_metadata(), 30
                )
                producer.commit_transaction(30)
            except KafkaException as exc:
                producer.abort_transaction(30)
                for subject, d in batch:
                    log.emit(EventType.DEAD_LETTER_REPLAYED, {"subject": subject, "topic": d.topic,
                             "partition": d.partition, "reason": why, "outcome": "failed",
                             "error": exc.args[0].name() if exc.args else "KafkaException"})
                raise click.ClickException(f"replay of {topic}[{p}] aborted; nothing was replayed from it") from None
            replayed += len(batch)
            for subject, d in batch:
                click.echo(f"replayed {subject} -> {d.topic}")
    except StreamprocError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        consumer.close()
        _close(log)
    verb = "would be replayed" if dry_run else "replayed"
    click.echo(f"{replayed} dead letter(s) {verb}, {skipped} not replayable", err=True)


__all__ = ["dlq"]
