"""Schema sources: where schemas are found by id and where output schemas are registered.

Two implementations share one small interface:

* :class:`DirectorySchemaSource` -- the embedded default: a directory of ``.avsc`` files
  (searched recursively).  A schema's id is derived from its content
  (:func:`content_id`: the first 4 bytes of SHA-256 over its canonical JSON, big-endian,
  top bit cleared, 0 mapped to 1; inline annotations included, external
  ``metadata.tags`` not), so producers, the processor and subscribers that share the
  directory agree on ids with no index file and no coordination (docs/wire-format.md,
  section 5).  Registering writes ``registered/<subject>-<id>.avsc`` atomically.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import fastavro

from streamproc.errors import SchemaError, SchemaNotFound, SchemaRegistryUnavailable
from streamproc.schema import avro
from streamproc.schema.annotations import apply_external_tags, metadata_tags, split_document


@dataclass(eq=False)
class RegisteredSchema:
    """A schema with its id; parsed forms are computed once, on first use.

    ``metadata_tags`` are the schema's external tags (Confluent ``metadata.tags``); they
    are merged into the inline ``confluent:tags`` of :attr:`json`, so every reader (the
    plan compiler, the linter, output schemas) sees one classification.
    """

    schema_id: int
    text: str
    subject: str | None = None
    metadata_tags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def _tagged(self) -> tuple[Any, list[str]]:
        return apply_external_tags(json.loads(self.text), self.metadata_tags)

    @cached_property
    def json(self) -> Any:
        """The schema JSON, external tags merged into ``confluent:tags``."""
        return self._tagged[0]

    @property
    def unmatched_tag_patterns(self) -> list[str]:
        """``metadata.tags`` patterns that match no field of the schema."""
        return self._tagged[1]

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
    """Stable 31-bit id for a schema's canonical JSON (never 0).

    SHA-256 over :func:`~streamproc.schema.avro.canonical_json` (sorted keys, no
    whitespace); the first 4 bytes big-endian with the top bit cleared, so the id is a
    positive Java int like a Confluent registry's; a result of 0 becomes 1.

    For a schema document with external tags (:func:`split_document`) the id is the
    Avro schema's alone, so a producer that registers the bare schema gets the id under
    which the processor knows its tags: tags cannot be lost by registering without them.
    """
    schema, _ = split_document(schema)
    digest = hashlib.sha256(avro.canonical_json(schema).encode()).digest()
    return (int.from_bytes(digest[:4], "big") & 0x7FFFFFFF) or 1


def load_document(path: Path) -> RegisteredSchema:
    """One ``.avsc`` file: a plain Avro schema or a document with ``metadata.tags``."""
    try:
        obj = json.loads(path.read_text())
        schema, tags = split_document(obj)
        avro.parse(schema)
    except (ValueError, SchemaError) as exc:
        raise SchemaError(f"{path}: invalid Avro schema ({exc})") from None
    rs = RegisteredSchema(content_id(schema), avro.canonical_json(schema), path.stem, tags)
    try:
        avro.parse(rs.json)
    except SchemaError as exc:
        raise SchemaError(f"{path}: invalid after merging metadata.tags ({exc})") from None
    return rs


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
                rs = load_document(p)
                old = self._by_id.get(rs.schema_id)
                if old is not None and old.metadata_tags:
                    # The same schema in several files (a tagged document and a bare copy
                    # registered by a producer): external tags from any of them apply.
                    merged = {k: list(v) for k, v in old.metadata_tags.items()}
                    for k, v in rs.metadata_tags.items():
                        merged[k] = sorted(set(merged.get(k, [])) | set(v))
                    rs = RegisteredSchema(rs.schema_id, rs.text, old.subject or rs.subject, merged)
                self._by_id[rs.schema_id] = rs
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
        bare, tags = split_document(obj)
        fastavro.parse_schema(bare)  # validity check before anything is written
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
            self._by_id[sid] = RegisteredSchema(sid, avro.canonical_json(bare), subject, tags)
        return sid

    def schemas(self) -> list[RegisteredSchema]:
        self.rescan()
        return list(self._by_id.values())

    def id_for_file(self, path: str | os.PathLike[str]) -> int:
        return load_document(Path(path)).schema_id


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
        try:
            tags = metadata_tags(getattr(s, "metadata", None))
        except ValueError:
            raise SchemaError(f"schema id {schema_id}: malformed metadata.tags") from None
        return RegisteredSchema(schema_id, avro.canonical_json(s.schema_str), None, tags)

    def register(self, subject: str, schema: Any) -> int:
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        obj = json.loads(schema) if isinstance(schema, str) else schema
        bare, tags = split_document(obj)
        metadata = None
        if tags:
            from confluent_kafka.schema_registry.schema_registry_client import (
                Metadata,
                MetadataTags,
            )

            metadata = Metadata(tags=MetadataTags(tags=dict(tags)), properties=None, sensitive=None)
        text = json.dumps(bare)
        try:
            return int(self.client.register_schema(subject, Schema(text, "AVRO", metadata=metadata)))
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
