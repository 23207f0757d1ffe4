"""``streamproc produce``: seal records and produce them to a source topic.

Input is JSON lines (``--from-jsonl FILE`` or ``-`` for stdin) or synthetic events
(``--generate order|login --count N``).  Each record is Avro-encoded with ``--schema``,
framed with its schema id and sealed under ``--kek`` for ``--topic``; the record key is
the ``--key-field`` of the record (UTF-8), or none when the field is absent or the option
is empty.  JSON has no dates or bytes, so for fields of logical type ``date`` /
``timestamp-millis`` / ``timestamp-micros`` ISO-8601 strings are accepted (as printed by
``streamproc consume``), and base64 strings for ``bytes`` -- numbers work as well.
Progress goes to stderr, never a record value.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, StreamprocError


def _coerce(schema: Any, value: Any, named: dict[str, Any]) -> Any:
    """JSON value -> what fastavro accepts, for ISO dates/timestamps and base64 bytes."""
    if isinstance(schema, str):
        if schema in named:
            return _coerce(named[schema], value, named)
        if schema in ("bytes",) and isinstance(value, str):
            return base64.b64decode(value)
        return value
    if isinstance(schema, list):  # union: leave strings alone if a string branch exists
        if value is None:
            return None
        if isinstance(value, str) and "string" in schema:
            return value
        for branch in schema:
            if branch == "null":
                continue
            try:
                return _coerce(branch, value, named)
            except (ValueError, TypeError):
                continue
        return value
    if not isinstance(schema, dict):
        return value
    t = schema.get("type")
    if "name" in schema and t in ("record", "enum", "fixed"):
        named[schema["name"]] = schema
        if "namespace" in schema:
            named[f"{schema['namespace']}.{schema['name']}"] = schema
    lt = schema.get("logicalType")
    if isinstance(value, str):
        if lt == "date":
            return dt.date.fromisoformat(value)
        if lt in ("timestamp-millis", "timestamp-micros"):
            d = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return d if d.tzinfo else d.replace(tzinfo=dt.UTC)
        if t in ("bytes", "fixed"):
            return base64.b64decode(value)
    if t == "record" and isinstance(value, dict):
        out = dict(value)
        for f in schema.get("fields", []):
            if f["name"] in out:
                out[f["name"]] = _coerce(f["type"], out[f["name"]], named)
        return out
    if t == "array" and isinstance(value, list):
        return [_coerce(schema["items"], v, named) for v in value]
    if t == "map" and isinstance(value, dict):
        return {k: _coerce(schema["values"], v, named) for k, v in value.items()}
    if isinstance(t, dict | list):
        return _coerce(t, value, named)
    return value


def _jsonl(source: str) -> Iterator[dict[str, Any]]:
    fh = sys.stdin if source == "-" else open(source)  # noqa: SIM115 - closed below
    try:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise click.ClickException(f"{source}: line {n} is not valid JSON") from None
            if not isinstance(obj, dict):
                raise click.ClickException(f"{source}: line {n} is not a JSON object")
            yield obj
    finally:
        if fh is not sys.stdin:
            fh.close()


@click.command("produce")
@config_option("Config (kafka, kms, schemas).")
@click.option("--topic", required=True, help="Source topic to produce to.")
@click.option(
    "--schema",
    "schema_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Avro schema (.avsc).",
)
@click.option("--kek", required=True, help="KEK id to seal under.")
@click.option("--from-jsonl", "jsonl", help="JSON-lines file, or - for stdin.")
@click.option(
    "--generate", type=click.Choice(["order", "login"]), help="Synthetic events instead of input."
)
@click.option(
    "--count", type=click.IntRange(0), default=100, show_default=True, help="Events to generate."
)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    help="Records per second (default: as fast as possible).",
)
@click.option("--canary", is_flag=True, help="Plant canary markers in sensitive generated fields.")
@click.option("--seed", type=int, default=7, show_default=True, help="Generator seed.")
@click.option(
    "--key-field",
    default="customer_id",
    show_default=True,
    help="Record field used as the Kafka key ('' for none).",
)
def produce(
    config_path: str,
    topic: str,
    schema_path: str,
    kek: str,
    jsonl: str | None,
    generate: str | None,
    count: int,
    rate: float | None,
    canary: bool,
    seed: int,
    key_field: str,
) -> None:
    """Seal JSON records (or generated events) and produce them to TOPIC."""
    from confluent_kafka import KafkaException, Producer
    from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError

    from streamproc.client import RecordSealer
    from streamproc.client.kafka import SealingSerializer
    from streamproc.config import load_config
    from streamproc.runtime.factory import build_kms, build_schemas

    if (jsonl is None) == (generate is None):
        raise click.UsageError("give exactly one of --from-jsonl or --generate")
    try:
        config = load_config(config_path, check_policy=False)
        kms = build_kms(config)
        schemas = build_schemas(config)
        schema = json.loads(Path(schema_path).read_text())
        sealer = RecordSealer(kms, kek, topic, schema, schemas)
    except (ConfigError, StreamprocError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    ser = SealingSerializer(sealer)
    ctx = SerializationContext(topic, MessageField.VALUE)
    producer = Producer(config.producer_config(**{"enable.idempotence": True, "acks": "all"}))
    failed: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(err.name())

    if generate is not None:
        from streamproc.client.generator import EventGenerator

        records: Iterator[dict[str, Any]] = EventGenerator(seed).events(generate, count, canary)
    else:
        assert jsonl is not None
        named: dict[str, Any] = {}
        records = (_coerce(schema, r, named) for r in _jsonl(jsonl))
    t0 = last = time.monotonic()
    n = 0
    for i, rec in enumerate(records):
        if rate:
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                producer.poll(wait)
        try:
            value = ser(rec, ctx)
        except SerializationError as exc:
            raise click.ClickException(f"record {i + 1}: {exc}") from None
        k = rec.get(key_field) if key_field else None
        key = None if k is None else str(k).encode()
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as exc:
                raise click.ClickException(f"produce failed: {exc}") from None
        producer.poll(0)
        n += 1
        now = time.monotonic()
        if now - last >= 1.0:
            last = now
            click.echo(f"produced {n} records ({n / (now - t0):.0f}/s)", err=True)
    remaining = producer.flush(30)
    if remaining or failed:
        click.echo(f"streamproc: {remaining + len(failed)} of {n} records not delivered", err=True)
        sys.exit(1)
    click.echo(
        f"produced {n} records to {topic} (schema id {sealer.schema_id}, kek {kek})", err=True
    )
