"""The pipeline core: a pure, batch-oriented function from encrypted inputs to outputs.

``Pipeline.process(batch)`` opens each record's envelope, finds the compiled plan for its
(schema id, destination), runs it, and seals the result under each destination's KEK.
It knows nothing of Kafka: records are plain dataclasses, destinations are names.  Its
only I/O is a KMS or schema-registry call on a cache miss.

Per record, for all of its destinations, the outcome is all or nothing: either every
destination gets its sanitized record, or the input is quarantined once with a reason
class (it then belongs in the dead-letter topic with its original bytes).  Transient
failures (:class:`~streamproc.errors.TransientError`: KMS or registry outages) are not a
property of the record and propagate, so the runtime retries the batch.

Caller data is never mutated: inputs are frozen and outputs are new objects.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamproc import __version__
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms import KmsProvider
from streamproc.crypto.pseudonym import PseudonymKeys, make_tokenizer
from streamproc.errors import (
    EnvelopeError,
    PolicyError,
    Reason,
    RecordError,
    SchemaError,
    SchemaNotFound,
)
from streamproc.pipeline.codegen import BadPayload, TransformFailed, compile_plan
from streamproc.pipeline.plan import build_plan
from streamproc.policy.model import Audience, Policy
from streamproc.schema.framing import HEADER_LEN, MAGIC, frame_prefix
from streamproc.schema.registry import SchemaSource

H_SOURCE_TOPIC = "streamproc.source.topic"
H_SOURCE_PARTITION = "streamproc.source.partition"
H_SOURCE_OFFSET = "streamproc.source.offset"
H_INPUT_SCHEMA = "streamproc.input.schema_id"
H_OUTPUT_SCHEMA = "streamproc.output.schema_id"
H_POLICY = "streamproc.policy.version"
H_AUDIENCE = "streamproc.audience"
H_KEK_ID = "streamproc.kek.id"
H_KEK_VERSION = "streamproc.kek.version"
H_SOURCE_KEK = "streamproc.source.kek"
H_PROCESSOR = "streamproc.processor.version"

Headers = list[tuple[str, bytes]]
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    """A sanitized output: a topic, the audience whose policy applies, and its KEK."""

    topic: str
    audience: str
    kek_id: str


@dataclass(frozen=True, slots=True)
class Route:
    sources: tuple[str, ...]
    destinations: tuple[Destination, ...]


@dataclass(frozen=True, slots=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    source: InputRecord


@dataclass(frozen=True, slots=True)
class Quarantined:
    record: InputRecord
    reason: Reason
    detail: str


@dataclass
class BatchStats:
    """Counts for observability; every key is from a bounded set (no values)."""

    decryptions: dict[tuple[str, str], int] = field(default_factory=dict)
    """(source topic, KEK id) -> records opened."""
    egress_records: dict[tuple[str, str], int] = field(default_factory=dict)
    """(destination topic, audience) -> records."""
    egress_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    transforms: dict[str, int] = field(default_factory=dict)
    """operator -> transformed field positions."""
    quarantined: dict[Reason, int] = field(default_factory=dict)
    tombstones: int = 0


@dataclass
class BatchResult:
    outputs: list[OutputRecord]
    quarantined: list[Quarantined]
    stats: BatchStats


@dataclass
class _Compiled:
    """Everything needed per (input schema, destination), computed once."""

    fn: Callable[[bytes], list[bytes]]
    out_schema_id: int
    const_headers: Headers
    transforms: tuple[tuple[str, int], ...]


class _DestState:
    def __init__(self, dest: Destination, audience: Audience, sealer: Sealer, key_fn: Callable[[bytes | None], bytes | None]) -> None:
        self.dest = dest
        self.audience = audience
        self.sealer = sealer
        self.key_fn = key_fn
        self.kek_id_b = dest.kek_id.encode()
        self.versions: dict[bytes, bytes] = {}

    def kek_version_header(self, sealed: bytes) -> bytes:
        n = sealed[1]
        raw = sealed[2 + n : 6 + n]
        v = self.versions.get(raw)
        if v is None:
            v = str(_U32.unpack(raw)[0]).encode()
            self.versions[raw] = v
        return v


class Pipeline:
    """Compiles and runs plans for a set of routes under one policy."""

    def __init__(
        self,
        *,
        routes: Sequence[Route],
        policy: Policy,
        opener: Opener,
        kms: KmsProvider,
        schemas: SchemaSource,
        keys: PseudonymKeys | None,
        max_record_bytes: int = 1 << 20,
        sealer_factory: Callable[[KmsProvider, str, str], Sealer] | None = None,
        register_schemas: bool = True,
    ) -> None:
        self.policy = policy
        self.opener = opener
        self.schemas = schemas
        self.keys = keys
        self.max_record_bytes = max_record_bytes
        self.register_schemas = register_schemas
        make_sealer = sealer_factory or (lambda k, kek, topic: Sealer(k, kek, topic))
        self._routes: dict[str, list[_DestState]] = {}
        self._dest_by_topic: dict[str, _DestState] = {}
        for route in routes:
            for d in route.destinations:
                if d.topic in self._dest_by_topic:
                    state = self._dest_by_topic[d.topic]
                    if state.dest != d:
                        raise PolicyError(f"destination topic {d.topic!r} is configured twice with different settings")
                else:
                    aud = policy.audience(d.audience)
                    state = _DestState(d, aud, make_sealer(kms, d.kek_id, d.topic), self._key_fn(aud))
                    self._dest_by_topic[d.topic] = state
                for src in route.sources:
                    if src in self._dest_by_topic:
                        raise PolicyError(f"topic {src!r} is both a source and a destination")
                    dests = self._routes.setdefault(src, [])
                    if state not in dests:
                        dests.append(state)
        self._plans: dict[tuple[int, str], _Compiled | PolicyError] = {}
        self._lock = threading.Lock()
        self._version_b = __version__.encode()
        self._policy_b = policy.version.encode()

    @property
    def source_topics(self) -> list[str]:
        return list(self._routes)

    @property
    def destinations(self) -> list[Destination]:
        return [s.dest for s in self._dest_by_topic.values()]

    def _key_fn(self, aud: Audience) -> Callable[[bytes | None], bytes | None]:
        rule = aud.record_key
        if rule.op == "keep":
            return lambda k: k
        if rule.op == "drop":
            return lambda k: None
        if self.keys is None:
            raise PolicyError(f"audience {aud.name!r}: record_key token needs keys.pseudonym")
        version, key = self.keys.token_key(str(rule.params.get("domain", "record_key")))
        tok = make_tokenizer(version, key)
        return lambda k: None if k is None else tok(k).encode()

    # -- plans ----------------------------------------------------------------------------
    def _compile(self, schema_id: int, state: _DestState) -> _Compiled:
        key = (schema_id, state.dest.topic)
        with self._lock:
            hit = self._plans.get(key)
            if hit is None:
                try:
                    hit = self._build(schema_id, state)
                except PolicyError as exc:
                    hit = exc
                self._plans[key] = hit
        if isinstance(hit, PolicyError):
            raise RecordError(Reason.UNSUPPORTED_SCHEMA, f"schema id {schema_id} -> {state.dest.topic}: {hit}")
        return hit

    def _build(self, schema_id: int, state: _DestState) -> _Compiled:
        rs = self.schemas.get(schema_id)  # SchemaNotFound propagates (not cached here)
        try:
            plan = build_plan(rs.node, state.audience, self.keys)
        except SchemaError as exc:
            raise PolicyError(str(exc)) from None
        if self.register_schemas:
            out_id = self.schemas.register(f"{state.dest.topic}-value", plan.out_schema)
        else:
            from streamproc.schema.registry import content_id

            out_id = content_id(plan.out_schema)
        fn, _src = compile_plan(plan, rs.node, offset=HEADER_LEN, prefix=frame_prefix(out_id))  # type: ignore[arg-type]
        headers: Headers = [
            (H_INPUT_SCHEMA, str(schema_id).encode()),
            (H_OUTPUT_SCHEMA, str(out_id).encode()),
            (H_POLICY, self._policy_b),
            (H_AUDIENCE, state.dest.audience.encode()),
            (H_KEK_ID, state.kek_id_b),
            (H_PROCESSOR, self._version_b),
        ]
        return _Compiled(fn, out_id, headers, tuple(plan.transforms.items()))

    def explain(self, schema_id: int, destination_topic: str) -> tuple[Any, int]:
        """The output schema JSON and id for (schema, destination); compiles if needed."""
        state = self._dest_by_topic[destination_topic]
        c = self._compile(schema_id, state)
        return self.schemas.get(c.out_schema_id).json if self.register_schemas else None, c.out_schema_id

    def reset_plans(self) -> None:
        """Forget compiled plans (after a pseudonym-key rotation or a schema change)."""
        with self._lock:
            self._plans.clear()

    # -- processing ---------------------------------------------------------------------------
    def process(self, batch: Iterable[InputRecord]) -> BatchResult:
        outputs: list[OutputRecord] = []
        quarantined: list[Quarantined] = []
        stats = BatchStats()
        # Per destination: plaintexts to seal, with the info needed to build the output.
        pending: dict[str, list[tuple[bytes, InputRecord, _Compiled, bytes | None]]] = {}
        routes = self._routes
        max_bytes = self.max_record_bytes
        opener_open = self.opener.open
        decryptions = stats.decryptions
        for rec in batch:
            dests = routes.get(rec.topic)
            if dests is None:
                quarantined.append(Quarantined(rec, Reason.NO_ROUTE, f"topic {rec.topic!r} has no route"))
                continue
            value = rec.value
            if value is None:
                # A tombstone carries no data; forward it so deletions propagate.
                stats.tombstones += 1
                for st in dests:
                    outputs.append(OutputRecord(st.dest.topic, st.key_fn(rec.key), None, self._tomb_headers(rec), rec))
                continue
            try:
                if len(value) > max_bytes:
                    raise RecordError(Reason.OVERSIZED, f"{len(value)} bytes > limit {max_bytes}")
                opened = opener_open(rec.topic, value)
                plain = opened.plaintext
                if len(plain) < HEADER_LEN or plain[0] != MAGIC:
                    raise RecordError(Reason.BAD_PAYLOAD, "plaintext is not Confluent-framed")
                schema_id = _U32.unpack_from(plain, 1)[0]
                results = []
                for st in dests:
                    compiled = self._plans.get((schema_id, st.dest.topic))
                    if compiled is None or isinstance(compiled, PolicyError):
                        compiled = self._compile(schema_id, st)
                    try:
                        results.append((st, compiled, b"".join(compiled.fn(plain))))
                    except TransformFailed as exc:
                        raise RecordError(Reason.TRANSFORM_FAILED, f"field {exc.args[0]}") from None
                    except (BadPayload, IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError):
                        raise RecordError(Reason.BAD_PAYLOAD, f"Avro does not match schema id {schema_id}") from None
            except SchemaNotFound:
                quarantined.append(Quarantined(rec, Reason.UNKNOWN_SCHEMA, f"schema id {schema_id}"))
                continue
            except RecordError as exc:  # includes EnvelopeError
                quarantined.append(Quarantined(rec, exc.reason, exc.detail))
                continue
            dk = (rec.topic, opened.kek_id)
            decryptions[dk] = decryptions.get(dk, 0) + 1
            key_in = rec.key
            for st, compiled, out_plain in results:
                pending.setdefault(st.dest.topic, []).append((out_plain, rec, compiled, key_in))
        # Seal per destination in one go (one lock round trip per data key).
        for topic, items in pending.items():
            st = self._dest_by_topic[topic]
            sealed_all = st.sealer.seal_many([i[0] for i in items])
            aud = st.dest.audience
            n_bytes = 0
            transforms = stats.transforms
            key_fn = st.key_fn
            for sealed, (_, rec, compiled, key_in) in zip(sealed_all, items, strict=True):
                headers = [
                    (H_SOURCE_TOPIC, rec.topic.encode()),
                    (H_SOURCE_PARTITION, str(rec.partition).encode()),
                    (H_SOURCE_OFFSET, str(rec.offset).encode()),
                    *compiled.const_headers,
                    (H_KEK_VERSION, st.kek_version_header(sealed)),
                ]
                outputs.append(OutputRecord(topic, key_fn(key_in), sealed, headers, rec))
                n_bytes += len(sealed)
                for op, n in compiled.transforms:
                    transforms[op] = transforms.get(op, 0) + n
            ek = (topic, aud)
            stats.egress_records[ek] = stats.egress_records.get(ek, 0) + len(items)
            stats.egress_bytes[ek] = stats.egress_bytes.get(ek, 0) + n_bytes
        for q in quarantined:
            stats.quarantined[q.reason] = stats.quarantined.get(q.reason, 0) + 1
        return BatchResult(outputs, quarantined, stats)

    def _tomb_headers(self, rec: InputRecord) -> Headers:
        return [
            (H_SOURCE_TOPIC, rec.topic.encode()),
            (H_SOURCE_PARTITION, str(rec.partition).encode()),
            (H_SOURCE_OFFSET, str(rec.offset).encode()),
            (H_POLICY, self._policy_b),
            (H_PROCESSOR, self._version_b),
        ]


def build_routes(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Route]:
    """Routes from config: ``[{sources: [...], destinations: [{topic, audience, kek}]}]``."""
    items = [spec] if isinstance(spec, Mapping) else list(spec)
    routes = []
    for i, r in enumerate(items):
        srcs = r.get("sources") or ([r["source"]] if "source" in r else [])
        if not srcs:
            raise PolicyError(f"pipeline #{i + 1}: needs 'sources'")
        dests = tuple(Destination(str(d["topic"]), str(d["audience"]), str(d["kek"])) for d in r.get("destinations", []))
        if not dests:
            raise PolicyError(f"pipeline #{i + 1}: needs at least one destination")
        routes.append(Route(tuple(srcs), dests))
    return routes


__all__ = [
    "BatchResult",
    "BatchStats",
    "Destination",
    "EnvelopeError",
    "InputRecord",
    "OutputRecord",
    "Pipeline",
    "Quarantined",
    "Route",
    "build_routes",
]
