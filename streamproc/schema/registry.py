"""Schema sources: where schemas are found by id and where output schemas are registered.

Two implementations share one small interface:

* :class:`DirectorySchemaSource` -- the embedded default: a directory of ``.avsc`` files.
  A schema's id is derived from its content (the first 31 bits of SHA-256 over its
  canonical JSON, annotations included), so producers, the processor and subscribers
  that share the directory agree on ids with no index file and no coordination.
  Registering writes ``<subject>-<id>.avsc`` atomically.
* :class:`ConfluentSchemaSource` -- any Confluent-compatible Schema Registry through
  ``confluent_kafka.schema_registry`` (including its ``mock://`` client in tests).

:class:`CachingSchemaSource` wraps either with a cache, including a short negative cache
so that records with a bogus schema id do not turn into a stream of registry lookups.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import fastavro

from streamproc.errors import SchemaError, SchemaNotFound, SchemaRegistryUnavailable
from streamproc.schema import avro


@dataclass(eq=False)
class RegisteredSchema:
    """A schema with its id; parsed forms are computed once, on first use."""

    schema_id: int
    text: str
    subject: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def json(self) -> Any:
        return json.loads(self.text)

    @cached_property
    def node(self) -> avro.AvroType:
        return avro.parse(self.json)

    @cached_property
    def name(self) -> str:
        n = self.node
        return n.fullname if isinstance(n, avro.Record) else n.kind

    @cached_property
    def fastavro_raw(self) -> Any:
        """fastavro-parsed schema with logical types stripped (raw primitive values).

        Parsed with fastavro's write hint so readers and writers reuse it as parsed
        (without it fastavro re-parses the schema on every call).
        """
        return fastavro.parse_schema(avro.strip_logical(self.json))


def content_id(schema: Any) -> int:
    """Stable 31-bit id for a schema's canonical JSON (never 0)."""
    digest = hashlib.sha256(avro.canonical_json(schema).encode()).digest()
    return (int.from_bytes(digest[:4], "big") & 0x7FFFFFFF) or 1


class SchemaSource(Protocol):
    def get(self, schema_id: int) -> RegisteredSchema:
        """Return the schema or raise SchemaNotFound / SchemaRegistryUnavailable."""
        ...

    def register(self, subject: str, schema: Any) -> int:
        """Register (idempotently) and return the id."""
        ...


class DirectorySchemaSource:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SchemaError(f"schema directory {self.path} does not exist")
        self._by_id: dict[int, RegisteredSchema] = {}
        self._lock = threading.Lock()
        self._scanned: dict[Path, float] = {}
        self.rescan()

    def rescan(self) -> None:
        """Load ``.avsc`` files that are new or changed since the last scan."""
        with self._lock:
            for p in sorted(self.path.rglob("*.avsc")):
                try:
                    mtime = p.stat().st_mtime
                except FileNotFoundError:
                    continue
                if self._scanned.get(p) == mtime:
                    continue
                try:
                    obj = json.loads(p.read_text())
                    avro.parse(obj)
                except (ValueError, SchemaError) as exc:
                    raise SchemaError(f"{p}: invalid Avro schema ({exc})") from None
                sid = content_id(obj)
                self._by_id[sid] = RegisteredSchema(sid, avro.canonical_json(obj), p.stem)
                self._scanned[p] = mtime

    def get(self, schema_id: int) -> RegisteredSchema:
        rs = self._by_id.get(schema_id)
        if rs is None:
            self.rescan()
            rs = self._by_id.get(schema_id)
            if rs is None:
                raise SchemaNotFound(f"schema id {schema_id} not found in {self.path}")
        return rs

    def register(self, subject: str, schema: Any) -> int:
        obj = json.loads(schema) if isinstance(schema, str) else schema
        fastavro.parse_schema(obj)  # validity check before anything is written
        sid = content_id(obj)
        if sid in self._by_id:
            return sid
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subject)
        target = self.path / "registered" / f"{safe}-{sid}.avsc"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(target.parent), prefix=".reg-")
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
        os.replace(tmp, target)
        with self._lock:
            self._by_id[sid] = RegisteredSchema(sid, avro.canonical_json(obj), subject)
        return sid

    def schemas(self) -> list[RegisteredSchema]:
        self.rescan()
        return list(self._by_id.values())

    def id_for_file(self, path: str | os.PathLike[str]) -> int:
        return content_id(json.loads(Path(path).read_text()))


#: Registry statuses that say "not now" rather than "never": expired or missing credentials
#: (an operator fixes them; records must not be dead-lettered meanwhile), timeouts, throttling.
_RETRY = frozenset({401, 403, 408, 429})


class ConfluentSchemaSource:
    """A Confluent-compatible registry through ``confluent_kafka.schema_registry``."""

    def __init__(self, conf: dict[str, Any] | str, client: Any = None) -> None:
        if client is None:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            cfg = {"url": conf} if isinstance(conf, str) else dict(conf)
            # new_client() honours mock:// URLs (an in-memory registry); the constructor does not.
            make = getattr(SchemaRegistryClient, "new_client", SchemaRegistryClient)
            client = make(cfg)
        self.client = client

    def get(self, schema_id: int) -> RegisteredSchema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            s = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 or exc.error_code in (40403, 404):
                raise SchemaNotFound(f"schema id {schema_id} not found in the registry") from None
            if exc.http_status_code and 400 <= exc.http_status_code < 500 and exc.http_status_code not in _RETRY:
                raise SchemaError(f"registry refused schema id {schema_id}: HTTP {exc.http_status_code}") from None
            raise SchemaRegistryUnavailable(f"registry error for schema id {schema_id}: HTTP {exc.http_status_code}") from None
        except (OSError, ConnectionError) as exc:
            raise SchemaRegistryUnavailable(f"registry unreachable ({type(exc).__name__})") from None
        except Exception as exc:  # httpx errors and friends: treat as transient
            if type(exc).__module__.startswith("httpx"):
                raise SchemaRegistryUnavailable(f"registry unreachable ({type(exc).__name__})") from None
            raise
        if getattr(s, "schema_type", "AVRO") not in ("AVRO", None):
            raise SchemaNotFound(f"schema id {schema_id} is {s.schema_type}, not Avro")
        return RegisteredSchema(schema_id, avro.canonical_json(s.schema_str))

    def register(self, subject: str, schema: Any) -> int:
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            return int(self.client.register_schema(subject, Schema(text, "AVRO")))
        except SchemaRegistryError as exc:
            status = exc.http_status_code or 0
            if 400 <= status < 500 and status not in _RETRY:
                raise SchemaError(f"registry refused a schema for subject {subject!r}: HTTP {status}") from None
            raise SchemaRegistryUnavailable(f"registry error registering {subject!r}: HTTP {status}") from None
        except (OSError, ConnectionError) as exc:
            raise SchemaRegistryUnavailable(f"registry unreachable ({type(exc).__name__})") from None
        except Exception as exc:  # httpx transport errors: transient
            if type(exc).__module__.startswith("httpx"):
                raise SchemaRegistryUnavailable(f"registry unreachable ({type(exc).__name__})") from None
            raise


class CachingSchemaSource:
    """Caches lookups by id forever (ids are immutable) and failures for ``negative_ttl``."""

    def __init__(
        self,
        inner: SchemaSource,
        *,
        negative_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._cache: dict[int, RegisteredSchema] = {}
        self._missing: dict[int, float] = {}
        self._registered: dict[tuple[str, str], int] = {}
        self.hits = 0
        self.misses = 0

    def get(self, schema_id: int) -> RegisteredSchema:
        rs = self._cache.get(schema_id)
        if rs is not None:
            self.hits += 1
            return rs
        self.misses += 1
        until = self._missing.get(schema_id)
        if until is not None and until > self._clock():
            raise SchemaNotFound(f"schema id {schema_id} not found (cached)")
        try:
            rs = self.inner.get(schema_id)
        except SchemaNotFound:
            if len(self._missing) > 10_000:
                self._missing.clear()
            self._missing[schema_id] = self._clock() + self.negative_ttl
            raise
        self._cache[schema_id] = rs
        return rs

    def register(self, subject: str, schema: Any) -> int:
        key = (subject, avro.canonical_json(schema))
        sid = self._registered.get(key)
        if sid is None:
            sid = self.inner.register(subject, schema)
            self._registered[key] = sid
        return sid


def build_schema_source(spec: dict[str, Any] | str) -> CachingSchemaSource:
    """From config: a directory path, ``{"directory": path}`` or ``{"url": ..., ...}``."""
    if isinstance(spec, str):
        spec = {"url": spec} if "://" in spec else {"directory": spec}
    if "directory" in spec:
        return CachingSchemaSource(DirectorySchemaSource(spec["directory"]))
    if "url" in spec:
        conf = {k: v for k, v in spec.items() if k != "type"}
        return CachingSchemaSource(ConfluentSchemaSource(conf))
    raise SchemaError("schema source needs 'directory' or 'url'")
