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

from streamproc.cli.errors import DataError
from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, StreamprocError


class _BadField(ValueError):
    """A JSON value that cannot become its Avro field: where and what, never the value."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"field {path or '(record)'}: {what}")
        self.path = path


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(schema: Any, value: Any, named: dict[str, Any], path: str = "") -> Any:
    """JSON value -> what fastavro accepts, for ISO dates/timestamps and base64 bytes.

    Raises :class:`_BadField` naming the field path (``shipping_address.postcode``,
    ``items[2].sku``; map entries as ``attrs[*]`` since map keys may be data).
    """
    if isinstance(schema, str):
        if schema in named:
            return _coerce(named[schema], value, named, path)
        if schema in ("bytes",) and isinstance(value, str):
            return _b64(value, path)
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
                return _coerce(branch, value, named, path)
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
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                raise _BadField(path, "not an ISO-8601 date (YYYY-MM-DD)") from None
        if lt in ("timestamp-millis", "timestamp-micros"):
            try:
                d = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise _BadField(path, "not an ISO-8601 timestamp") from None
            return d if d.tzinfo else d.replace(tzinfo=dt.UTC)
        if t in ("bytes", "fixed"):
            return _b64(value, path)
    if t == "record" and isinstance(value, dict):
        out = dict(value)
        for f in schema.get("fields", []):
            if f["name"] in out:
                out[f["name"]] = _coerce(f["type"], out[f["name"]], named, _join(path, f["name"]))
        return out
    if t == "array" and isinstance(value, list):
        return [_coerce(schema["items"], v, named, f"{path}[{i}]") for i, v in enumerate(value)]
    if t == "map" and isinstance(value, dict):
        return {k: _coerce(schema["values"], v, named, f"{path}[*]") for k, v in value.items()}
    if isinstance(t, dict | list):
        return _coerce(t, value, named, path)
    return value


def _b64(value: str, path: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise _BadField(path, "not base64") from None


def _mismatch(schema: Any, record: dict[str, Any]) -> str | None:
    """The first field of ``record`` that does not match ``schema``, by name only.

    fastavro's own messages quote the datum, so only the field name of its first
    validation error is used (relative to the top-level record).  ``None``: the record
    validates, so the failure was not the data's.
    """
    import fastavro
    from fastavro.validation import ValidationError, validate

    try:
        parsed = fastavro.parse_schema(schema)
        validate(record, parsed, raise_errors=True)
    except ValidationError as exc:
        errors = getattr(exc, "errors", None) or []
        field = str(getattr(errors[0], "field", "") or "") if errors else ""
        # fastavro names a field by its record's full name: drop the namespace and the
        # top-level record ("com.acme.shop.OrderPlaced.email" -> "email",
        # "com.acme.shop.Address.postcode" -> "Address.postcode").
        top = str(parsed.get("name", "")) if isinstance(parsed, dict) else ""
        for prefix in (top, top.rpartition(".")[0]):
            if prefix and field.startswith(f"{prefix}."):
                field = field[len(prefix) + 1 :]
                break
        return f"field {field or '(record)'}: does not match the schema"
    except Exception:  # a validator failure must not leak the value either
        return "does not match the schema"
    return None


def _jsonl(source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-empty line; a bad line is a :class:`DataError`."""
    try:
        fh = sys.stdin if source == "-" else open(source)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise click.ClickException(f"{source}: cannot read ({exc.strerror or type(exc).__name__})") from None
    name = "<stdin>" if source == "-" else source
    try:
        n = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise DataError(f"{name}: line {n + 1}: not UTF-8") from None
            if not line:
                return
            n += 1
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f"{name}: line {n}: not valid JSON") from None
            if not isinstance(obj, dict):
                raise DataError(f"{name}: line {n}: not a JSON object")
            yield n, obj
    finally:
        if fh is not sys.stdin:
            fh.close()


@click.command("produce")
@config_option("Processor config (YAML; its kafka, producer, kms and schemas sections are used).")
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

    records: Iterator[tuple[int, dict[str, Any]]]
    if generate is not None:
        from streamproc.client.generator import EventGenerator

        where = "generated record"
        records = enumerate(EventGenerator(seed).events(generate, count, canary), 1)
    else:
        assert jsonl is not None
        where = f"{'<stdin>' if jsonl == '-' else jsonl}: line"
        records = _jsonl(jsonl)
    named: dict[str, Any] = {}
    t0 = last = time.monotonic()
    n = 0

    try:
        for i, (line, raw) in enumerate(records):
            if rate:
                wait = t0 + i / rate - time.monotonic()
                if wait > 0:
                    producer.poll(wait)
            try:
                rec = _coerce(schema, raw, named) if jsonl is not None else raw
                value = ser(rec, ctx)
            except _BadField as exc:
                raise DataError(f"{where} {line}: {exc}") from None
            except SerializationError as exc:
                problem = _mismatch(schema, rec)
                if problem is not None:
                    raise DataError(f"{where} {line}: {problem}") from None
                raise click.ClickException(f"{where} {line}: {exc}") from None
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
    except DataError as exc:
        # Deliver what was accepted before the bad line, then say how far it got.
        remaining = producer.flush(30) if n else 0
        done = n - remaining - len(failed)
        raise DataError(f"{exc.message} ({done} earlier record(s) produced)") from None
    remaining = producer.flush(30)
    if remaining or failed:
        click.echo(f"streamproc: {remaining + len(failed)} of {n} records not delivered", err=True)
        sys.exit(1)
    click.echo(
        f"produced {n} records to {topic} (schema id {sealer.schema_id}, kek {kek})", err=True
    )
