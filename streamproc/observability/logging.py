"""Log configuration: one JSON object per line (production) or a human format (demo).

The processor handles personal data, so logs are treated as an egress channel like any
other.  Two rules hold everywhere in streamproc: log messages name identifiers (topic,
partition, offset, reason class, KEK id, schema id), never values; and structured context
goes in ``extra=`` fields.  The :class:`RedactionGuard` enforces the second rule at the
handler: an ``extra`` field whose *name* is not in :data:`ALLOWED_FIELDS` is removed
before the record is formatted (its name is reported in ``redacted_fields`` so the bug
can be found), and an allowed field whose value is not a short scalar is replaced by
``"<redacted>"``.  Exceptions are rendered by type and stack only, with the message kept
just for streamproc's own errors, which are value-free by contract -- a third-party
exception message (a decoder's "invalid value ..."), could quote the data it choked on.

The guard sits on the handler, not on a logger, so it also sees records propagated from
every library logger.

Dependencies log what they handle: at DEBUG, botocore prints whole KMS response bodies --
``GenerateDataKey``'s ``Plaintext`` data key included -- and HTTP clients print request
details.  So, whatever ``logging.level`` says, the loggers in :data:`PINNED_LOGGERS` are
set to WARNING or above, and the :class:`DependencyGuard` on the handler drops their
records below WARNING even if something lowers those levels later; it also rewrites the
*message text* of every record (not only ``extra=`` fields) so that key-shaped values --
a ``Plaintext``/``material``/token field, or any base64 string of exactly 32 bytes --
read ``<redacted>``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import traceback
from typing import IO, Any

from streamproc.errors import StreamprocError

#: ``extra`` fields that may be emitted: identifiers and counts, nothing from a record.
ALLOWED_FIELDS: frozenset[str] = frozenset(
    {
        "topic", "partition", "offset", "reason", "kek_id", "kek_version", "schema_id",
        "audience", "destination", "worker", "attempt", "count", "seconds", "kind",
        "dependency", "operator", "provider", "operation", "outcome", "pid", "workers",
        "partitions", "lag", "baseline", "z_score", "unit", "interval", "status", "host",
        "port", "version", "policy_version", "source_topic", "dlq_topic", "transactional_id",
        "group_id", "records", "bytes", "batch", "duration", "state", "signal", "exit_code",
        # Value-free by contract (streamproc.errors): key ids, schema ids, field paths.
        "detail", "field",
    }
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_MAX_VALUE_LEN = 256
REDACTED = "<redacted>"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k != "redacted_fields"}


#: Third-party loggers held at WARNING or above whatever the configured level.
PINNED_LOGGERS: tuple[str, ...] = (
    "botocore", "boto3", "s3transfer", "urllib3", "requests", "hvac", "httpx", "httpcore",
    "confluent_kafka",
)
PINNED_LEVEL = logging.WARNING

# ``"Plaintext": "..."``, ``plaintext=...``, ``'material': b'...'``, tokens and AWS secrets.
_SECRET_FIELD = re.compile(
    r"""(?P<key>["']?(?:plaintext|material|secret_?access_?key|session_?token|client_token|"""
    r"""x-vault-token|authorization)["']?\s*[:=]\s*)(?P<q>b?["']?)(?P<val>[^"',\s}\]]+)""",
    re.IGNORECASE,
)
# Any standalone base64 (or base64url) rendering of exactly 32 bytes: a data key's shape.
_KEY_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{43}=(?![A-Za-z0-9+/=_-])")


def redact_key_material(text: str) -> str:
    """``text`` with key-shaped values replaced by ``<redacted>`` (see the module doc)."""
    text = _SECRET_FIELD.sub(lambda m: f"{m['key']}{m['q']}{REDACTED}", text)
    return _KEY_B64.sub(REDACTED, text)


def _pinned(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PINNED_LOGGERS)


class DependencyGuard(logging.Filter):
    """Drops dependency records below WARNING; redacts key material in message text.

    On the handler, so it holds even when a library (or a test, or ``boto3.set_stream_
    logger``) lowers a pinned logger's level after :func:`configure_logging`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < PINNED_LEVEL and _pinned(record.name):
            return False
        try:
            message = record.getMessage()
        except Exception:
            record.msg, record.args = "<unformattable log message>", None
            return True
        clean = redact_key_material(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def pin_dependency_loggers() -> None:
    """Set every :data:`PINNED_LOGGERS` logger to WARNING or above (never lower)."""
    for name in PINNED_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level < PINNED_LEVEL:
            lg.setLevel(PINNED_LEVEL)


class RedactionGuard(logging.Filter):
    """Drops ``extra`` fields outside the allow-list; never drops the record itself.

    Dropping the whole line would hide the event (an operator would rather see "dead-
    lettered, reason=tampered" without the offending field than nothing).
    """

    def __init__(self, allowed: frozenset[str] = ALLOWED_FIELDS) -> None:
        super().__init__()
        self.allowed = allowed

    def filter(self, record: logging.LogRecord) -> bool:
        removed = []
        for k, v in _extras(record).items():
            if k not in self.allowed:
                delattr(record, k)
                removed.append(k)
            elif not _safe_scalar(v):
                setattr(record, k, REDACTED)
        if removed:
            record.redacted_fields = sorted(removed)
        return True


def _safe_scalar(v: Any) -> bool:
    if v is None or isinstance(v, bool | int | float):
        return True
    if isinstance(v, str):
        return len(v) <= _MAX_VALUE_LEN
    if isinstance(v, list | tuple):  # e.g. a list of partitions
        return len(v) <= 4096 and all(isinstance(i, bool | int | float) or (isinstance(i, str) and len(i) <= 64) for i in v)
    return False


def _exception_text(exc_info: Any) -> tuple[str, str, str]:
    """(type name, message or "", stack) without third-party exception messages."""
    etype, evalue, tb = exc_info
    name = etype.__name__ if etype else "Exception"
    msg = redact_key_material(str(evalue)) if isinstance(evalue, StreamprocError) else ""
    stack = "".join(traceback.format_tb(tb)) if tb is not None else ""
    return name, msg, stack


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in _extras(record).items():
            out.setdefault(k, v)
        redacted = getattr(record, "redacted_fields", None)
        if redacted:
            out["redacted_fields"] = redacted
        if record.exc_info and record.exc_info[0] is not None:
            name, msg, stack = _exception_text(record.exc_info)
            out["exc_type"] = name
            if msg:
                out["exc_message"] = msg
            out["stack"] = stack
        return json.dumps(out, default=lambda o: REDACTED, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``12:00:00.123 WARNING streamproc.anomaly: message  key=value ...`` for the demo."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = _extras(record)
        redacted = getattr(record, "redacted_fields", None)
        if redacted:
            fields["redacted_fields"] = ",".join(redacted)
        if fields:
            line += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info and record.exc_info[0] is not None:
            name, msg, stack = _exception_text(record.exc_info)
            line += f"\n{stack}{name}" + (f": {msg}" if msg else "")
        return line


_HANDLER_FLAG = "_streamproc_handler"


def configure_logging(level: str | int = "INFO", format: str = "json", stream: IO[str] | None = None) -> logging.Handler:
    """Install the one root handler (idempotent: a second call replaces the first).

    ``format`` is ``json`` (one object per line) or ``human``/``text``.  Returns the
    handler so tests can swap its stream.
    """
    fmt = format.lower()
    if fmt not in ("json", "human", "text", "console"):
        raise ValueError(f"logging format must be json or human, not {format!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_FLAG, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_FLAG, True)
    handler.addFilter(DependencyGuard())
    handler.addFilter(RedactionGuard())
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    pin_dependency_loggers()  # after the root level: DEBUG must not reach botocore & co.
    logging.captureWarnings(True)
    return handler


__all__ = [
    "ALLOWED_FIELDS",
    "PINNED_LOGGERS",
    "DependencyGuard",
    "HumanFormatter",
    "JsonFormatter",
    "RedactionGuard",
    "configure_logging",
    "pin_dependency_loggers",
    "redact_key_material",
]
