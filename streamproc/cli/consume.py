"""``streamproc consume``: open and print a topic's records as JSON lines.

A subscriber's view: each record is opened with the KMS named in the config (so it works
only for KEKs those credentials may use) and decoded with its output schema.  One JSON
object per line on stdout::

    {"topic": "orders.analytics", "partition": 0, "offset": 12, "timestamp": "...Z",
     "key": "tk1_...", "value": {...}, "headers": {...}}

Dates and timestamps are ISO-8601 strings, bytes are base64; a key that is not UTF-8 is
printed as base64 with ``"key_encoding": "base64"``.  A record that cannot be opened (a
dead-letter topic, a KEK the credentials may not use) is printed with ``"error": <reason
class>`` instead of a value -- its bytes are never printed.

Partitions are *assigned*, not subscribed: no consumer-group join, no committed offsets,
so inspecting a topic never disturbs a group.  The command stops after ``--max`` records
or ``--timeout`` seconds without a new record.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import time
import uuid
from typing import Any

import click

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


@click.command("consume")
@config_option("Config (kafka, kms, schemas).")
@click.option("--topic", required=True, help="Topic to read.")
@click.option(
    "--audience", help="Only records sanitized for this audience (streamproc.audience header)."
)
@click.option("--max", "max_records", type=click.IntRange(1), help="Stop after this many records.")
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Stop after this many idle seconds.",
)
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Start at the earliest offset (default: only new records).",
)
@click.option("--headers", "show_headers", is_flag=True, help="Include record headers.")
def consume(
    config_path: str,
    topic: str,
    audience: str | None,
    max_records: int | None,
    timeout: float,
    from_beginning: bool,
    show_headers: bool,
) -> None:
    """Print TOPIC's records, opened and decoded, as JSON lines."""
    from confluent_kafka import (
        OFFSET_BEGINNING,
        OFFSET_END,
        Consumer,
        KafkaException,
        TopicPartition,
    )

    from streamproc.client import RecordOpener
    from streamproc.config import load_config
    from streamproc.pipeline.core import H_AUDIENCE
    from streamproc.runtime.factory import build_kms, build_schemas

    try:
        config = load_config(config_path, check_policy=False)
        opener = RecordOpener(build_kms(config), build_schemas(config))
    except (ConfigError, StreamprocError) as exc:
        raise click.ClickException(str(exc)) from None
    consumer = Consumer(
        config.consumer_config(
            **{
                "group.id": f"streamproc-consume-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
            }
        )
    )
    try:
        try:
            md = consumer.list_topics(topic, timeout=15)
        except KafkaException as exc:
            raise click.ClickException(f"cannot reach the cluster: {exc}") from None
        tmeta = md.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise click.ClickException(f"topic {topic!r} does not exist")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in sorted(tmeta.partitions)])
        n = skipped = errors = 0
        idle_since = time.monotonic()
        aud_b = audience.encode() if audience else None
        while max_records is None or n < max_records:
            msgs = consumer.consume(min(500, (max_records or 500) - n), 0.5)
            if not msgs:
                if time.monotonic() - idle_since >= timeout:
                    break
                continue
            idle_since = time.monotonic()
            for m in msgs:
                err = m.error()
                if err is not None:
                    click.echo(f"streamproc: consumer error: {err.name()}", err=True)
                    continue
                hs: list[tuple[str, Any]] = list(m.headers() or [])  # type: ignore[arg-type]
                if aud_b is not None and dict(hs).get(H_AUDIENCE) != aud_b:
                    skipped += 1
                    continue
                key, key_b64 = _text(m.key())
                ts_type, ts = m.timestamp()
                out: dict[str, Any] = {
                    "topic": m.topic(),
                    "partition": m.partition(),
                    "offset": m.offset(),
                }
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
                if max_records is not None and n >= max_records:
                    break
    finally:
        consumer.close()
    summary = f"{n} records from {topic}"
    if errors:
        summary += f", {errors} could not be opened"
    if skipped:
        summary += f", {skipped} for other audiences skipped"
    click.echo(summary, err=True)
