"""``streamproc consume``: open and print an audience's sanitized records as JSON lines.

A subscriber's view: each record is opened with the KMS named in the config (so it works
only for KEKs those credentials may use) and decoded with its output schema.  One JSON
object per line on stdout::

    {"topic": "orders.analytics", "partition": 0, "offset": 12, "timestamp": "...Z",
     "key": "tk1_...", "value": {...}, "headers": {...}}

Dates and timestamps are ISO-8601 strings, bytes are base64; a key that is not UTF-8 is
printed as base64 with ``"key_encoding": "base64"``.  A record that cannot be opened (a
KEK the credentials may not use, a tampered record) is printed with ``"error": <reason
class>`` instead of a value -- its bytes are never printed.

**Only sanitized topics.**  The config is a subscriber config
(:class:`~streamproc.config.SubscriberConfig`: kafka, kms, schemas, audience[, topics]) or
the processor's config.  Either way the command opens only records sanitized for one
audience: with a processor config the topic must be one of its destinations (and only
that destination's KEK is used); with a subscriber config the topic must be listed under
``topics`` if that is given, and a record whose ``streamproc.prov`` header does not name
the audience is never decrypted -- the command stops.  Reading anything else (a source topic:
plaintext under the producers' keys) takes ``--incident-response --reason TEXT`` and a
processor config with an ``audit:`` section; the read is audited before the first record
is opened and again at the end, and fails closed when the audit cannot be written.

**How far.**  Without ``--follow`` the command reads each partition up to its high
watermark at start (from the beginning, or from the end with ``--from-end``: then it
prints nothing unless ``--follow``) and exits; ``--follow`` keeps printing new records
until ``--max``, ``--timeout`` idle seconds or Ctrl-C.  It says on stderr how many records
it printed and whether it reached the end.

Partitions are *assigned*, not subscribed: no consumer-group join, no committed offsets,
so inspecting a topic never disturbs a group.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, RecordError, SchemaNotFound, StreamprocError


def _json_default(o: Any) -> Any:
    if isinstance(o, dt.datetime | dt.date | dt.time):
        return o.isoformat()
    if isinstance(o, bytes | bytearray):
        return base64.b64encode(bytes(o)).decode()
    if isinstance(o, decimal.Decimal | uuid.UUID):
        return str(o)
    raise TypeError(type(o).__name__)


def _text(b: bytes | None) -> tuple[str | None, bool]:
    """(text, is_base64)."""
    if b is None:
        return None, False
    try:
        return b.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(b).decode(), True


def _headers(hs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in hs or []:
        out[k] = _text(v.encode() if isinstance(v, str) else v)[0]
    return out


@dataclass
class _Access:
    """What this invocation may open, decided before any record is read."""

    consumer_config: Callable[..., dict[str, Any]]
    kms: Any
    schemas: Any
    audience: str | None
    """Records' ``streamproc.prov`` header must name this audience (``None``: incident response)."""
    audit: Any = None


def _is_processor_config(path: str) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the loader reports it properly
    return isinstance(raw, dict) and ("pipelines" in raw or "policy" in raw)


def _access(config_path: str, topic: str, incident: bool, reason: str | None) -> _Access:
    """Load the config and decide what may be opened; refuse a source topic by default."""
    from streamproc.crypto.kms.factory import build_kms
    from streamproc.schema.registry import build_schema_source

    if _is_processor_config(config_path):
        from streamproc.config import load_config
        from streamproc.integrations import ScopedKms

        config = load_config(config_path, check_policy=False)
        kms = build_kms(dict(config.kms), base_dir=config.base_dir)
        schemas = build_schema_source(dict(config.schemas))
        dest = next((d for p in config.pipelines for d in p.destinations if d.topic == topic), None)
        if dest is not None and not incident:
            # The destination's KEK only: the processor's credentials open every topic.
            return _Access(config.consumer_config, ScopedKms(kms, {dest.kek}), schemas, dest.audience)
        if not incident:
            role = (
                "a source topic (plaintext under the producers' keys)"
                if topic in config.source_topics
                else "a dead-letter topic (use the dead-letter tools)"
                if topic in config.dead_letter_topics
                else "not a destination topic of this config"
            )
            raise click.ClickException(
                f"topic {topic!r} is {role}: consume opens only sanitized destination "
                "topics; an incident responder may read it with --incident-response "
                "--reason TEXT (audited)"
            )
        from streamproc.audit import open_tool_log

        assert reason is not None
        # The tools' audit chain, with the caller's authenticated identity as the actor.
        # Audited before the first record is opened; a failed write refuses the read.
        audit = open_tool_log(config)
        try:
            audit.source_topic_read(topic=topic, reason=reason, outcome="success")
        except BaseException:
            audit.close()
            raise
        return _Access(config.consumer_config, kms, schemas, None, audit)

    from streamproc.config import load_subscriber_config

    sc = load_subscriber_config(config_path)
    if incident:
        raise click.ClickException(
            "--incident-response needs the processor config (its audit: section records the "
            "read); a subscriber config opens its audience's topics only"
        )
    if sc.topics and topic not in sc.topics:
        raise click.ClickException(
            f"topic {topic!r} is not one of the subscriber config's topics ({', '.join(sc.topics)})"
        )
    kms = build_kms(dict(sc.kms), base_dir=sc.base_dir)
    return _Access(sc.consumer_config, kms, build_schema_source(dict(sc.schemas)), sc.audience)


@click.command("consume")
@config_option(
    "Subscriber config (kafka, kms, schemas, audience[, topics]; docs/integrations.md), "
    "or the processor config (then only its destination topics)."
)
@click.option("--topic", required=True, help="Sanitized topic to read.")
@click.option(
    "--audience",
    help="Only records sanitized for this audience (streamproc.prov header, a=); others are skipped.",
)
@click.option("--max", "max_records", type=click.IntRange(1), help="Stop after this many records.")
@click.option(
    "--follow",
    is_flag=True,
    help="Keep printing new records after the end (until --max, --timeout or Ctrl-C).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    help="Stop after this many seconds without a record (default: 30 without --follow, "
    "never with it).",
)
@click.option(
    "--from-beginning/--from-end",
    default=True,
    show_default=True,
    help="Where to start in each partition.",
)
@click.option("--headers", "show_headers", is_flag=True, help="Include record headers.")
@click.option(
    "--incident-response",
    "incident",
    is_flag=True,
    help="Read a topic that is not a sanitized destination (e.g. a source topic). Needs "
    "--reason and the processor config; audited before and after.",
)
@click.option("--reason", help="Why (--incident-response): a ticket id, audited. No personal data.")
def consume(
    config_path: str,
    topic: str,
    audience: str | None,
    max_records: int | None,
    follow: bool,
    timeout: float | None,
    from_beginning: bool,
    show_headers: bool,
    incident: bool,
    reason: str | None,
) -> None:
    """Print TOPIC's records, opened and decoded, as JSON lines.

    Without --follow: every record up to the end of each partition (its high watermark
    when the command starts), then a summary on stderr.
    """
    from confluent_kafka import (
        OFFSET_BEGINNING,
        OFFSET_END,
        Consumer,
        KafkaError,
        KafkaException,
        TopicPartition,
    )

    from streamproc.audit import AuditError
    from streamproc.client import RecordOpener
    from streamproc.crypto.provenance import H_PROVENANCE
    from streamproc.identity import IdentityError

    if incident and not reason:
        raise click.UsageError("--incident-response needs --reason (a ticket id; audited)")
    if reason and not incident:
        raise click.UsageError("--reason only applies with --incident-response")
    try:
        access = _access(config_path, topic, incident, reason)
        opener = RecordOpener(access.kms, access.schemas)
    except (AuditError, IdentityError) as exc:
        raise click.ClickException(f"audit trail unavailable, refusing to read: {exc}") from None
    except (ConfigError, StreamprocError) as exc:
        raise click.ClickException(str(exc)) from None
    idle_limit = timeout if timeout is not None else (None if follow else 30.0)
    consumer = Consumer(
        access.consumer_config(
            **{
                "group.id": f"streamproc-consume-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
    )
    n = skipped = errors = 0
    reached_end = False
    refused: str | None = None
    try:
        try:
            md = consumer.list_topics(topic, timeout=15)
        except KafkaException as exc:
            raise click.ClickException(f"cannot reach the cluster: {exc}") from None
        tmeta = md.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise click.ClickException(f"topic {topic!r} does not exist")
        parts = sorted(tmeta.partitions)
        # Where "the end" is: each partition's high watermark at start.  A partition is
        # done at its end-of-partition event or at the first record past that mark.  The
        # mark is the larger of ListOffsets now and the first fetch's high watermark:
        # some brokers (Tansu) under-report ListOffsets, and records produced between
        # the two are a harmless extra, while a low mark would silently cut the output.
        end: dict[int, int] = {}
        fetched: set[int] = set()
        pending: set[int] = set()
        for p in parts:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            end[p] = high
            if from_beginning and not follow:
                pending.add(p)  # even if it looks empty: the fetch says for sure (EOF)
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in parts])
        idle_since = time.monotonic()
        aud_filter = audience.encode() if audience else None
        required = access.audience.encode() if access.audience is not None else None
        while (follow or pending) and (max_records is None or n < max_records):
            msgs = consumer.consume(min(500, (max_records - n) if max_records else 500), 0.5)
            if not msgs:
                if idle_limit is not None and time.monotonic() - idle_since >= idle_limit:
                    break
                continue
            idle_since = time.monotonic()
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                    else:
                        click.echo(f"streamproc: consumer error: {err.name()}", err=True)
                    continue
                part, offset = int(m.partition() or 0), int(m.offset() or 0)
                if part not in fetched:
                    fetched.add(part)
                    cached = consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
                    if cached is not None and cached[1] > end.get(part, 0):
                        end[part] = cached[1]
                if not follow and offset >= end.get(part, 0):
                    pending.discard(part)  # produced after the start: beyond "the end"
                    continue
                hs: list[tuple[str, Any]] = list(m.headers() or [])  # type: ignore[arg-type]
                hdr_b = _audience_of(hs)
                if required is not None and hdr_b is None and m.value() is not None:
                    refused = (
                        f"the record at partition {part} offset {offset} of {topic!r} carries no "
                        f"{H_PROVENANCE} header: not a sanitized record, so it was not opened "
                        "(consume opens sanitized destination topics only; see --incident-response)"
                    )
                    break
                if (aud_filter is not None and hdr_b != aud_filter) or (
                    required is not None and hdr_b is not None and hdr_b != required
                ):
                    skipped += 1
                    continue
                key, key_b64 = _text(m.key())
                ts_type, ts = m.timestamp()
                out: dict[str, Any] = {"topic": m.topic(), "partition": part, "offset": offset}
                if ts_type != 0 and ts >= 0:
                    out["timestamp"] = (
                        dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
                        .isoformat()
                        .replace("+00:00", "Z")
                    )
                out["key"] = key
                if key_b64:
                    out["key_encoding"] = "base64"
                value = m.value()
                if value is None:
                    out["value"] = None
                else:
                    try:
                        out["value"] = opener.decode(topic, value)
                    except RecordError as exc:
                        out["error"] = exc.reason.value
                    except SchemaNotFound:
                        out["error"] = "unknown_schema"
                    except (StreamprocError, ValueError, EOFError, IndexError) as exc:
                        out["error"] = f"bad_payload ({type(exc).__name__})"
                if "error" in out:
                    errors += 1
                if show_headers:
                    out["headers"] = _headers(hs)
                click.echo(json.dumps(out, default=_json_default, ensure_ascii=False))
                n += 1
                if not follow and offset + 1 >= end.get(part, 0):
                    pending.discard(part)
                if max_records is not None and n >= max_records:
                    break
            if refused:
                break
        reached_end = not follow and not pending
    except KeyboardInterrupt:
        pass  # Ctrl-C ends --follow: the summary below still goes out
    finally:
        consumer.close()
        if access.audit is not None:
            try:
                access.audit.source_topic_read(
                    topic=topic, reason=reason or "", outcome="success", count=n
                )
            except AuditError as exc:
                refused = f"the closing audit event could not be written: {exc}"
            finally:
                access.audit.close()
    at_max = max_records is not None and n >= max_records
    summary = f"{n} records from {topic}"
    if errors:
        summary += f", {errors} could not be opened"
    if skipped:
        summary += f", {skipped} for other audiences skipped"
    if at_max:
        summary += f", stopped at --max {max_records}"
    elif not follow:
        summary += ", to the end of every partition" if reached_end else ", end NOT reached"
    click.echo(summary, err=True)
    if refused:
        raise click.ClickException(refused)
    if not follow and not reached_end and not at_max:
        raise click.ClickException(
            f"no record for {idle_limit:g}s before the end of the partitions (their high "
            "watermarks at start): the output is incomplete"
        )


def _audience_of(headers: list[tuple[str, Any]]) -> bytes | None:
    """The audience a record was sanitized for (its ``streamproc.prov`` header), or None
    for a record without a readable one (not a sanitized record)."""
    from streamproc.crypto.provenance import ProvenanceError, from_headers

    try:
        return from_headers(headers).audience.encode()
    except ProvenanceError:
        return None
