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

Keys.  Each route says which KEKs may seal its sources (``source_keks``; by default any
KEK except those the configuration uses for another role: destination KEKs and
``reserved_keks``).  The check runs on the envelope header before any KMS call, and a
record that fails it is quarantined as ``kek_not_allowed``: a record sealed under a
destination audience's KEK is never opened.  Every KMS error while opening is a reason
class or transient (:meth:`Opener._aead <streamproc.crypto.envelope.Opener>`); every KMS
error while sealing is :class:`~streamproc.errors.SealingUnavailable` (transient: the
destination key is not the record's fault).  At most every ``revocation_check_interval``
seconds, before sealing, each destination sealer's KEK version is checked with the KMS,
and a sealer whose version was revoked takes a fresh data key under the primary version:
no output is sealed under a version revoked longer ago than that interval (plus the
provider's own state cache).
"""

from __future__ import annotations

import collections
import functools
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streamproc import __version__
from streamproc.crypto.dek_cache import DekCache, DekCacheStats
from streamproc.crypto.envelope import Opener, Sealer, fast_dataclass_constructor, kek_digest
from streamproc.crypto.erasure import SubjectForgotten, SubjectKeyTable
from streamproc.crypto.kms import KmsProvider
from streamproc.crypto.kms.instrumented import KmsObserver, instrumented
from streamproc.crypto.provenance import H_PROVENANCE, header_prefix, make_referencer
from streamproc.crypto.pseudonym import PseudonymKeys, make_tokenizer
from streamproc.errors import (
    EnvelopeError,
    PolicyError,
    Reason,
    RecordError,
    SchemaError,
    SchemaNotFound,
    SealingUnavailable,
    TransientError,
)
from streamproc.pipeline.budget import EXHAUSTED, NO_SUBJECT, WITHHELD, BudgetBook
from streamproc.pipeline.codegen import BadPayload, TransformFailed, compile_plan, compile_subject
from streamproc.pipeline.consent import ConsentGate
from streamproc.pipeline.hold import Held, HoldBook
from streamproc.pipeline.hold import encode as encode_held
from streamproc.pipeline.lineage import FieldTreatment, field_treatments
from streamproc.pipeline.native import compile_native
from streamproc.pipeline.plan import build_plan, subject_of
from streamproc.pipeline.risk import EXPIRED, HELD, RELEASED, SUPPRESSED, RiskGuard, RiskProbe
from streamproc.pipeline.state import StateWrite
from streamproc.policy.consent import FORGOTTEN
from streamproc.policy.model import Audience, Policy, Purpose
from streamproc.privacy.budget import Cost
from streamproc.privacy.risk import RiskReport
from streamproc.schema import avro
from streamproc.schema.avro import Record
from streamproc.schema.framing import HEADER_LEN, MAGIC, frame_prefix
from streamproc.schema.registry import SchemaSource

# Sanitized outputs carry one header, H_PROVENANCE (streamproc.crypto.provenance): an
# audience-keyed reference instead of the source coordinates, which would join audiences.
# The names below are the dead-letter headers (operators only) and the pre-0.2 output
# headers, kept as names for readers of old records.
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
    #: KEKs that may seal these sources; ``None``: any KEK not configured for another role.
    source_keks: tuple[str, ...] | None = None


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
    #: The key the envelope header names, when it parsed (from :class:`EnvelopeError`):
    #: readers such as the audit trail never re-parse the record.  Producer-chosen text:
    #: show it only through ``envelope.kek_label``.
    kek_id: str | None = field(default=None, repr=False)
    kek_version: int | None = None


@dataclass
class BatchStats:
    """Counts for observability; every key is from a bounded set (no values)."""

    decryptions: dict[tuple[str, str], int] = field(default_factory=dict)
    """(source topic, KEK id) -> records opened.  A KEK id the configuration does not name
    is producer-chosen text: it is counted under its digest (``sha256:...``), so it never
    reaches a metric label or an anomaly log line in clear."""
    egress_records: dict[tuple[str, str], int] = field(default_factory=dict)
    """(destination topic, audience) -> records."""
    egress_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    transforms: dict[str, int] = field(default_factory=dict)
    """operator -> transformed field positions."""
    quarantined: dict[Reason, int] = field(default_factory=dict)
    failures: dict[tuple[str, Reason], int] = field(default_factory=dict)
    """(source topic, reason) -> quarantined records: where failures come from, so an
    anomaly can name the topic (a configured source, never record text)."""
    tombstones: int = 0
    withheld: dict[tuple[str, str], int] = field(default_factory=dict)
    """(audience, reason) -> records withheld from that audience for lack of consent or an
    objection (``streamproc.policy.consent.WITHHELD_REASONS``); no output, no dead letter."""
    risk: dict[str, RiskReport] = field(default_factory=dict)
    """audience -> its risk window after this batch (audiences with ``risk:`` that had outputs)."""
    risk_enforced: dict[tuple[str, str], int] = field(default_factory=dict)
    """(audience, ``suppressed`` | ``generalized``) -> records whose quasi-identifiers
    enforcement rewrote (streamproc.pipeline.risk); with ``action: hold``, (audience,
    ``held`` | ``released`` | ``expired``) -> records kept back, released with their
    full output, released suppressed (streamproc.pipeline.hold)."""
    dp_suppressed: dict[tuple[str, str], int] = field(default_factory=dict)
    """(audience, reason) -> records whose DP fields were written as null for that
    audience: ``exhausted`` (the subject's budget is spent) or ``no_subject`` (no subject
    value to account against: fail closed); ``withheld`` when even the null variant failed
    and the record was not delivered to that audience (``pipeline.budget.SUPPRESSED_REASONS``)."""


@dataclass
class BatchResult:
    outputs: list[OutputRecord]
    quarantined: list[Quarantined]
    stats: BatchStats
    state_writes: list[StateWrite] = field(default_factory=list)
    """Changelog records of the stateful collaborators (:attr:`Pipeline.state_stores`),
    to be produced in the batch's transaction (:mod:`streamproc.pipeline.state`)."""


@dataclass
class _Compiled:
    """Everything needed per (input schema, destination), computed once."""

    fn: Callable[[bytes], list[bytes]]
    out_schema_id: int
    prov_prefix: bytes
    """The constant part of the streamproc.prov value; the per-record reference follows."""
    transforms: tuple[tuple[str, int], ...]
    info: CompiledPlan | None = None
    consent: tuple[Purpose, str, Callable[[bytes], bytes | None] | None] | None = None
    """For a gated audience: its purpose, the subject field's name and the function that
    reads the subject from the framed plaintext (``None``: the schema has no subject)."""
    probe: RiskProbe | None = None
    """For an audience with ``risk:``: reads (and rewrites) its outputs' quasi-identifiers."""
    budget: _BudgetPlan | None = None
    """For an audience with ``budget:``: what a record costs and how to suppress it."""


class _BudgetPlan(NamedTuple):
    """A budgeted destination's plan parts: the suppressed variant of the plan (same
    output schema, every DP field null), one record's cost, and the subject reader
    (``None``: the schema names no subject, so every record is suppressed)."""

    suppressed: Callable[[bytes], list[bytes]]
    cost: Cost
    subject: Callable[[bytes], bytes | None] | None


@dataclass(frozen=True)
class CompiledPlan:
    """What a plan compilation produced, for observers (``Pipeline(on_compile=...)``).

    Structure only (schemas, field treatments with policy parameters): no key, no value.
    The lineage emitter (observability layer) turns it into an OpenLineage event; the
    pipeline does not know who listens.
    """

    schema_id: int
    input_schema: Any
    """The input schema JSON (external tags merged)."""
    output_schema: Any
    output_schema_id: int
    destination: Destination
    sources: tuple[str, ...]
    """The source topics routed to this destination."""
    policy_version: str
    fields: tuple[FieldTreatment, ...]


class _DestState:
    def __init__(
        self,
        dest: Destination,
        audience: Audience,
        sealer: Sealer,
        key_fn: Callable[[bytes | None], bytes | None],
        prov_key: tuple[int, bytes] | None,
        risk: RiskGuard | None = None,
    ) -> None:
        self.dest = dest
        #: The audience's risk windows (shared by its destinations), or None without ``risk:``.
        self.risk = risk
        self.audience = audience
        self.sealer = sealer
        self.key_fn = key_fn
        #: The record-key rule's op ("keep", "drop" or "token"): keep/drop need no call.
        self.key_mode = audience.record_key.op
        #: (pseudonym version, AES key) of this audience's provenance references, or None
        #: without a pseudonym key (then outputs carry no reference at all).
        self.prov_key = prov_key
        self.references = None if prov_key is None else make_referencer(prov_key[1])

    def prov_prefix(self, policy_version: str, schema_id: int | None) -> bytes:
        kv = None if self.prov_key is None else self.prov_key[0]
        return header_prefix(self.dest.audience, policy_version, schema_id, kv)


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
        reserved_keks: Iterable[str] = (),
        revocation_check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_compile: Callable[[CompiledPlan], None] | None = None,
        consent: ConsentGate | None = None,
        erasure: SubjectKeyTable | None = None,
        budget_topic: str | None = None,
        budget_clock: Callable[[], float] = time.time,
        hold_topic: str | None = None,
    ) -> None:
        self.policy = policy
        #: The subject-key table of ``erasable`` rules (``None``: such rules do not compile).
        self.erasure = erasure
        #: The consent check (``None``: nothing is withheld); see streamproc.pipeline.consent.
        self.consent = consent
        #: Called after each new plan compilation (outside the plan lock); its errors are
        #: counted in :attr:`observer_errors` and never affect a record.
        self.on_compile = on_compile
        self.observer_errors = 0
        self.opener = opener
        #: The KMS provider the sealers use (instrumented by :meth:`instrument_kms`), for
        #: collaborators that seal on the pipeline's behalf (the dead-letter writer).
        self.kms = kms
        self.schemas = schemas
        self.keys = keys
        self.max_record_bytes = max_record_bytes
        self.register_schemas = register_schemas
        make_sealer = sealer_factory or (lambda k, kek, topic: Sealer(k, kek, topic))
        #: audience -> its re-identification risk windows (audiences with ``risk:``).
        self.risk_guards: dict[str, RiskGuard] = {}
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
                    prov = None if keys is None else keys.provenance_key(aud.name)
                    guard = None
                    if aud.risk is not None:
                        guard = self.risk_guards.get(aud.name) or self.risk_guards.setdefault(aud.name, RiskGuard(aud))
                    state = _DestState(d, aud, make_sealer(kms, d.kek_id, d.topic), self._key_fn(aud), prov, guard)
                    self._dest_by_topic[d.topic] = state
                for src in route.sources:
                    if src in self._dest_by_topic:
                        raise PolicyError(f"topic {src!r} is both a source and a destination")
                    dests = self._routes.setdefault(src, [])
                    if state not in dests:
                        dests.append(state)
        self._init_keks(routes, reserved_keks)
        #: The per-subject budgets of the audiences with ``budget:`` (``None``: none has one).
        self.budgets = self._init_budgets(budget_topic, budget_clock)
        #: Wall-clock time of ``action: hold`` (hold times are written to the changelog).
        self._hold_clock = budget_clock
        #: The held records of the ``action: hold`` audiences (``None``: none holds).
        self.holds = self._init_holds(hold_topic)
        self.revocation_check_interval = revocation_check_interval
        self._clock = clock
        self._sealers_checked = clock()
        #: The last sealer moves off a confirmed-revoked version, as (destination topic,
        #: KEK id, old version); bounded (moves for an *unknown* state are not recorded).
        self.sealer_rotations: collections.deque[tuple[str, str, int]] = collections.deque(
            maxlen=100
        )
        self._plans: dict[tuple[int, str], _Compiled | PolicyError] = {}
        self._lock = threading.Lock()
        self._version_b = __version__.encode()
        self._policy_b = policy.version.encode()

    def _init_budgets(self, topic: str | None, clock: Callable[[], float]) -> BudgetBook | None:
        """The :class:`BudgetBook` of the routed audiences that have a budget.

        Fail closed: a budget needs subject tokens (``keys.pseudonym``) and a changelog
        topic to survive restarts; without either, the pipeline does not start.
        """
        budgets = {}
        for st in self._dest_by_topic.values():
            if st.audience.budget is not None:
                budgets[st.audience.name] = st.audience.budget
        if not budgets:
            return None
        name = sorted(budgets)[0]
        if self.keys is None:
            raise PolicyError(f"audience {name!r}: 'budget' needs keys.pseudonym (the changelog keys are subject tokens)")
        if not topic:
            raise PolicyError(f"audience {name!r}: 'budget' needs a changelog topic (budget state survives restarts there)")
        keys = self.keys
        return BudgetBook(topic, budgets, {a: keys.budget_key(a)[1] for a in budgets}, clock=clock)

    def _init_holds(self, topic: str | None) -> HoldBook | None:
        """The :class:`HoldBook` of the routed audiences with ``risk.action: hold``.

        Fail closed: the class digests need the pseudonym master (``keys.pseudonym``) and
        held records need their changelog topic; without either, the pipeline does not
        start (a hold in memory could lose records)."""
        guards = {n: g for n, g in self.risk_guards.items() if g.target.action == "hold"}
        if not guards:
            return None
        name = sorted(guards)[0]
        if self.keys is None:
            raise PolicyError(f"audience {name!r}: risk action 'hold' needs keys.pseudonym (the class digests are keyed)")
        if not topic:
            raise PolicyError(f"audience {name!r}: risk action 'hold' needs its changelog topic (held records survive there)")
        for n, g in guards.items():
            g.hold_key = self.keys.hold_key(n)[1]

        def counted(audience: str, digest: bytes, held_at: float) -> None:
            guards[audience].restore_held(digest, held_at)

        return HoldBook(topic, {n: (g.target.hold_max, g.target.window_s) for n, g in guards.items()}, counted)

    def _init_keks(self, routes: Sequence[Route], reserved: Iterable[str]) -> None:
        """Per-source KEK admission, installed on the opener (checked before the KMS)."""
        reserved_set = frozenset(reserved)
        dest_keks = frozenset(s.dest.kek_id for s in self._dest_by_topic.values())
        denied = dest_keks | reserved_set
        allowed: dict[str, frozenset[str] | None] = {}
        explicit: set[str] = set()
        for route in routes:
            if route.source_keks is None:
                continue
            keks = frozenset(route.source_keks)
            clash = sorted(keks & denied)
            if clash:
                raise PolicyError(
                    f"source_keks of {', '.join(route.sources)}: {clash[0]!r} is a destination "
                    "or reserved KEK; records sealed under it must never be opened as input"
                )
            explicit |= keks
            for src in route.sources:
                allowed[src] = keks
        self._allowed_keks = allowed
        self._denied_keks = denied
        self.known_keks = frozenset(explicit) | denied
        configure = getattr(self.opener, "configure_keks", None)
        if configure is not None:
            configure(self.known_keks, self.kek_allowed)

    def _kek_stat(self, kek_id: str) -> str:
        """A KEK id as statistics carry it: configured ids in clear, others as a digest."""
        return kek_id if kek_id in self.known_keks else kek_digest(kek_id)

    def kek_allowed(self, topic: str, kek_id: str) -> bool:
        """May ``kek_id`` seal records of source ``topic``?"""
        allowed = self._allowed_keks.get(topic)
        if allowed is not None:
            return kek_id in allowed
        return kek_id not in self._denied_keks

    def check_sealers(self, *, force: bool = False) -> None:
        """Move every sealer whose KEK version was revoked to a fresh data key.

        Called before each batch is sealed; asks the KMS at most every
        ``revocation_check_interval`` seconds (``force`` asks now).  A provider that cannot
        answer for a sealer's version -- it may not read key state, or it is down -- makes
        that sealer take a fresh data key anyway, so the KMS itself decides whether the
        version may still seal; a failure to get one is :class:`SealingUnavailable`.
        """
        now = self._clock()
        if not force and now - self._sealers_checked < self.revocation_check_interval:
            return
        for st in self._dest_by_topic.values():
            sealer = st.sealer
            version = sealer.kek_version
            if version is None:
                continue  # no data key yet: the next one comes from the primary version
            revoked: bool | None
            try:
                revoked = sealer.kms.is_revoked(st.dest.kek_id, version)
            except Exception:  # unknown state (no read access, outage): the KMS decides
                revoked = None
            if revoked is not False:
                if revoked:
                    self.sealer_rotations.append((st.dest.topic, st.dest.kek_id, version))
                self._guarded(st, sealer.rotate)
        self._sealers_checked = now

    @staticmethod
    def _guarded(st: _DestState, call: Callable[[], Any]) -> Any:
        """Run a sealing call; every KMS error becomes :class:`SealingUnavailable`."""
        try:
            return call()
        except SealingUnavailable:
            raise
        except Exception as exc:
            detail = (
                f"destination {st.dest.topic!r}: KEK {st.dest.kek_id!r} cannot seal "
                f"({type(exc).__name__})"
            )
            if isinstance(exc, TransientError):
                raise SealingUnavailable(detail + "; KMS unavailable") from None
            raise SealingUnavailable(detail) from None

    @property
    def state_stores(self) -> list[Any]:
        """The changelog-backed stateful collaborators (``ChangelogStore`` of
        :mod:`streamproc.runtime.state`) whose writes come in ``BatchResult.state_writes``."""
        return [s for s in (self.erasure, self.budgets, self.holds) if s is not None]

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
        domain = str(rule.params.get("domain", "record_key"))
        # Per audience like every token (unless the policy shares the domain): a record key
        # equal across audiences would join their outputs.
        audience = None if domain in aud.shared_domains else aud.name
        version, key = self.keys.token_key(domain, audience=audience)
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
                except SchemaNotFound:
                    raise  # not cached: the id may appear in the registry later
                except SchemaError as exc:
                    # The registry refused the schema (4xx other than 404) or the derived
                    # output schema (409 incompatible): a property of this schema, not of
                    # the moment, so it is cached like a policy error.
                    hit = PolicyError(str(exc))
                except PolicyError as exc:
                    hit = exc
                self._plans[key] = hit
                built = hit
            else:
                built = None
        if isinstance(built, _Compiled) and built.info is not None and self.on_compile is not None:
            try:
                self.on_compile(built.info)
            except Exception:
                self.observer_errors += 1
        if isinstance(hit, PolicyError):
            raise RecordError(Reason.UNSUPPORTED_SCHEMA, f"schema id {schema_id} -> {state.dest.topic}: {hit}")
        return hit

    def _build(self, schema_id: int, state: _DestState) -> _Compiled:
        rs = self.schemas.get(schema_id)  # SchemaNotFound propagates (not cached here)
        try:
            plan = build_plan(rs.node, state.audience, self.keys, self.erasure)
        except SchemaError as exc:
            raise PolicyError(str(exc)) from None
        if self.register_schemas:
            out_id = self.schemas.register(f"{state.dest.topic}-value", plan.out_schema)
        else:
            from streamproc.schema.registry import content_id

            out_id = content_id(plan.out_schema)
        fn, _src = compile_plan(plan, rs.node, offset=HEADER_LEN, prefix=frame_prefix(out_id))  # type: ignore[arg-type]
        # The compiled interpreter when it is built and handles the plan (same bytes, same
        # failures: streamproc.pipeline.native); the generated function otherwise.
        fn = compile_native(plan, rs.node, offset=HEADER_LEN, prefix=frame_prefix(out_id)) or fn
        prefix = state.prov_prefix(self.policy.version, out_id)
        info = None
        if self.on_compile is not None and isinstance(rs.node, Record):
            sources = tuple(src for src, states in self._routes.items() if state in states)
            info = CompiledPlan(
                schema_id, rs.json, plan.out_schema, out_id, state.dest, sources, self.policy.version,
                tuple(field_treatments(rs.node, plan)),
            )
        gate: tuple[Purpose, str, Callable[[bytes], bytes | None] | None] | None = None
        purpose = None if self.consent is None else self.consent.gated(state.audience)
        if purpose is not None:
            subject = subject_of(rs.node, state.audience)
            if subject is None or not isinstance(rs.node, Record):
                gate = (purpose, "", None)
            else:
                gate = (purpose, subject.name, compile_subject(rs.node, subject, offset=HEADER_LEN))
        probe = None
        if state.audience.risk is not None and isinstance(rs.node, Record):
            probe = RiskProbe(plan, rs.node, state.audience, HEADER_LEN)
        budget = None
        if state.audience.budget is not None:
            budget = self._budget_plan(rs.node, state, plan, out_id)
        return _Compiled(fn, out_id, prefix, tuple(plan.transforms.items()), info, gate, probe, budget)

    def _budget_plan(self, schema: Any, state: _DestState, plan: Any, out_id: int) -> _BudgetPlan:
        """The suppressed variant, the cost and the subject reader of a budgeted plan."""
        sup = build_plan(schema, state.audience, self.keys, self.erasure, dp_suppressed=True)
        if avro.canonical_json(sup.out_schema) != avro.canonical_json(plan.out_schema):
            raise PolicyError(f"audience {state.audience.name!r}: the suppressed plan's output schema differs")
        sfn, _src = compile_plan(sup, schema, offset=HEADER_LEN, prefix=frame_prefix(out_id))
        subject = subject_of(schema, state.audience)
        read = None if subject is None else compile_subject(schema, subject, offset=HEADER_LEN)
        assert plan.dp_cost is not None
        return _BudgetPlan(sfn, plan.dp_cost, read)

    def _spend(
        self,
        plain: bytes,
        partition: int,
        targets: tuple[_Target, ...],
        outs: list[bytes] | list[bytes | None],
        admitted: list[bool],
        suppressed: dict[tuple[str, str], int],
    ) -> None:
        """Charge the record's DP releases to its subject's budget, per budgeted target;
        where the cost does not fit (or there is no subject), replace the output by the
        suppressed variant (every DP field null) and count why.  Targets the record is
        withheld from are not charged.  A suppressed variant that fails (it ran the same
        structure as the plan, so it should not) withholds the record from that target:
        never the noised output of a subject over budget."""
        book = self.budgets
        assert book is not None
        for i, t in enumerate(targets):
            b = t.plan.budget
            if b is None or not admitted[i]:
                continue
            aud = t.pending.state.dest.audience
            try:
                subj = None if b.subject is None else b.subject(plain)
            except (BadPayload, IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError):
                subj = None  # cannot happen after the plan ran; fail closed
            if subj is None:
                why = NO_SUBJECT
            elif book.spend(aud, partition, book.key(aud, subj), b.cost):
                continue
            else:
                why = EXHAUSTED
            try:
                outs[i] = b"".join(b.suppressed(plain))
            except Exception:
                admitted[i] = False
                why = WITHHELD
            k = (aud, why)
            suppressed[k] = suppressed.get(k, 0) + 1

    def _admit(
        self, plain: bytes, targets: tuple[_Target, ...], withheld: dict[tuple[str, str], int]
    ) -> list[bool]:
        """Per target: may this record flow to it?  Counts each refusal in ``withheld``."""
        gate = self.consent
        assert gate is not None
        subjects: dict[str, bytes | None] = {}
        tokens: dict[bytes, list[tuple[int, str]]] = {}
        out = []
        for t in targets:
            c = t.plan.consent
            if c is None:
                out.append(True)
                continue
            purpose, name, read = c
            if name not in subjects:
                try:
                    subjects[name] = None if read is None else read(plain)
                except (BadPayload, IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError):
                    subjects[name] = None  # cannot happen after the plan ran; fail closed
            subj = subjects[name]
            if subj is not None and subj not in tokens:
                tokens[subj] = gate.tokens(subj)
            why = gate.reason(purpose, subj, None if subj is None else tokens[subj])
            if why is not None:
                wk = (t.pending.state.dest.audience, why)
                withheld[wk] = withheld.get(wk, 0) + 1
            out.append(why is None)
        return out

    def explain(self, schema_id: int, destination_topic: str) -> tuple[Any, int]:
        """The output schema JSON and id for (schema, destination); compiles if needed."""
        state = self._dest_by_topic[destination_topic]
        c = self._compile(schema_id, state)
        return self.schemas.get(c.out_schema_id).json if self.register_schemas else None, c.out_schema_id

    def reset_plans(self) -> None:
        """Forget compiled plans (after a pseudonym-key rotation or a schema change)."""
        with self._lock:
            self._plans.clear()

    # -- observability --------------------------------------------------------------------
    def dek_cache_stats(self) -> DekCacheStats:
        """The opener's data-key cache counters (hits, misses, evictions, entries).

        Zeros for an opener without a :class:`~streamproc.crypto.dek_cache.DekCache`
        (a caller-supplied opener): the runtime reports these once per batch and never
        needs to know how the opener is built.
        """
        cache = getattr(self.opener, "cache", None)
        return cache.stats() if isinstance(cache, DekCache) else DekCacheStats()

    def instrument_kms(self, observer: KmsObserver) -> None:
        """Report every KMS call this pipeline makes (unwraps, data keys) to ``observer``.

        Wraps the opener's and each sealer's provider in an
        :class:`~streamproc.crypto.kms.instrumented.InstrumentedKms`.  A provider already
        instrumented (the composition root instruments the one it builds) is left as is,
        so no call is counted twice.  Call before processing starts.
        """
        cache = getattr(self.opener, "cache", None)
        if isinstance(cache, DekCache):
            cache.kms = instrumented(cache.kms, observer)
        self.kms = instrumented(self.kms, observer)
        for st in self._dest_by_topic.values():
            st.sealer.kms = instrumented(st.sealer.kms, observer)

    # -- processing ---------------------------------------------------------------------------
    def process(self, batch: Iterable[InputRecord]) -> BatchResult:
        """Sanitize a batch: two named stages, then the failure counts.

        1. :meth:`_open_and_transform` -- per record, in input order: route it, open its
           envelope, run the plan of every destination.  Tombstones and quarantined
           records are final here; sanitized plaintexts wait in one :class:`_Pending` per
           destination (all destinations of a record or none: a record whose plan fails
           for one destination is quarantined and added to none).
        2. :meth:`_seal` -- per destination: one ``seal_many`` call for all of its
           plaintexts (one lock round trip per data key), then the output records (record
           key rule, provenance header) in input order.

        Outputs are the tombstones first, then each destination's sealed records.
        """
        outputs: list[OutputRecord] = []
        quarantined: list[Quarantined] = []
        stats = BatchStats()
        pending = self._open_and_transform(batch, outputs, quarantined, stats)
        if pending:
            saved = self.savepoint() if self.risk_guards else None
            try:
                if saved is not None:
                    self._measure_risk(pending, stats)
                self.check_sealers()
                for pend in pending.values():
                    if pend.plains:  # a destination whose every record failed has none
                        self._seal(pend, outputs, stats)
                if self.holds is not None:
                    self._release_held(outputs, stats)
            except BaseException:
                if saved is not None:  # the batch will come again: count it once
                    self.rollback(saved)
                raise
        failures = stats.failures
        for q in quarantined:
            stats.quarantined[q.reason] = stats.quarantined.get(q.reason, 0) + 1
            fk = (q.record.topic, q.reason)
            failures[fk] = failures.get(fk, 0) + 1
        writes = [] if self.erasure is None else self._key_writes(self.erasure)
        if self.budgets is not None:
            writes += self.budgets.writes()
        if self.holds is not None:
            writes += self.holds.writes()
        return BatchResult(outputs, quarantined, stats, writes)

    @staticmethod
    def _key_writes(table: SubjectKeyTable) -> list[StateWrite]:
        """The subject keys created (and shreds queued) by this batch, sealed now: they
        commit in the batch's transaction with the outputs that use them.  A KMS error is
        :class:`SealingUnavailable` (transient, as for a destination key)."""
        try:
            writes = table.take_writes()
        except TransientError:
            raise
        except Exception as exc:
            raise SealingUnavailable(f"subject keys for {table.topic!r} cannot be sealed ({type(exc).__name__})") from None
        return [StateWrite(table.topic, None, k, v) for k, v in writes]

    def _measure_risk(self, pending: dict[str, _Pending], stats: BatchStats) -> None:
        """Between the stages: each ``risk:`` audience's windows take the batch's outputs,
        and enforcement rewrites the plaintexts of at-risk records before they are sealed
        (:mod:`streamproc.pipeline.risk`).  One clock reading per batch."""
        now = self._clock()
        for g in self.risk_guards.values():
            g.reached.clear()  # a retried batch decides its releases anew
        for pend in pending.values():
            guard = pend.state.risk
            if guard is None or not pend.plains:
                continue
            runs = [(c.probe, start, end) for c, start, end in pend.runs() if c.probe is not None]
            if guard.target.action == "hold":
                wall = self._hold_clock()
                pend.held = guard.hold(runs, pend.plains, wall)
                stats.risk[guard.audience] = guard.released.report(wall)
                continue
            stats.risk[guard.audience] = guard.apply(runs, pend.plains, now, stats.risk_enforced)

    def _release_held(self, outputs: list[OutputRecord], stats: BatchStats) -> None:
        """After sealing: each ``hold`` audience's classes that reached k in this batch
        release their held records (full output), then records past the window or over
        ``hold.max_records`` are released suppressed; every release is produced here and
        tombstoned in the same transaction (streamproc.pipeline.hold)."""
        book = self.holds
        assert book is not None
        now = self._hold_clock()
        enforced = stats.risk_enforced
        for name, guard in self.risk_guards.items():
            if guard.target.action != "hold":
                continue
            reached, guard.reached = guard.reached, set()
            full = [h for d in sorted(reached) for h in book.release_class(name, d)]
            expired = book.expire(name, now)
            null = guard.suppressed_digest if expired else b""
            for h in full:
                guard.released.add(h.digest, None, now)
            for _ in expired:
                guard.released.add(null, None, now)
            for h, value in [*((h, h.value) for h in full), *((h, h.suppressed) for h in expired)]:
                src = InputRecord(h.source, h.partition, h.offset, None, None)
                outputs.append(_new_output(h.topic, h.key, value, list(h.headers), src))
                ek = (h.topic, name)
                stats.egress_records[ek] = stats.egress_records.get(ek, 0) + 1
                stats.egress_bytes[ek] = stats.egress_bytes.get(ek, 0) + len(value)
            for action, n in ((RELEASED, len(full)), (EXPIRED, len(expired))):
                if n:
                    enforced[(name, action)] = enforced.get((name, action), 0) + n
            if full or expired:
                stats.risk[name] = guard.released.report(now)

    def savepoint(self) -> dict[str, tuple[int, ...]]:
        """A mark of every risk window, for :meth:`rollback` when the batch's transaction
        aborts (its records come again and must not be counted twice)."""
        return {name: g.savepoint() for name, g in self.risk_guards.items()}

    def rollback(self, savepoint: dict[str, tuple[int, ...]]) -> None:
        """Undo what every batch since ``savepoint`` added to the risk windows."""
        for name, sp in savepoint.items():
            self.risk_guards[name].rollback(sp)

    def _open_and_transform(
        self,
        batch: Iterable[InputRecord],
        outputs: list[OutputRecord],
        quarantined: list[Quarantined],
        stats: BatchStats,
    ) -> dict[str, _Pending]:
        """Stage 1: open and transform every record; returns the outputs waiting to be sealed.

        Hot path: per record one envelope open, then per destination one plan call, one
        join and two list appends (the :class:`_Pending` lists, bound once).  What is the
        same for many records is looked up once: the targets (plan and pending outputs of
        each destination) per (source topic, schema id) of the batch -- the only point
        where a destination's plan can change, so that is where :meth:`_Pending.mark`
        records it -- and decryptions are counted per run of one (topic, KEK id).
        """
        pending: dict[str, _Pending] = {}
        targets_of: dict[tuple[str, int], tuple[_Target, ...]] = {}
        routes = self._routes
        max_bytes = self.max_record_bytes
        opener = self.opener
        # The built-in Opener has a tuple-returning variant of open() (no result object).
        open_parts = getattr(opener, "open_parts", None)
        join = b"".join
        unpack_u32 = _U32.unpack_from
        decryptions = stats.decryptions
        run_topic = run_kek = ""  # run-length count of decryptions per (topic, KEK id)
        run_n = 0
        last_key: tuple[str, int] | None = None
        targets: tuple[_Target, ...] = ()
        single = False  # one destination: its plan and lists are bound below
        gated = False  # does any destination of the current targets check consent?
        budgeted = False  # does any destination of the current targets have a budget?
        withheld = stats.withheld
        fns: list[Callable[[bytes], list[bytes]]] = []
        puts: list[tuple[Callable[[bytes], None], Callable[[InputRecord], None]]] = []
        fn0: Callable[[bytes], list[bytes]]
        put_plain0: Callable[[bytes], None]
        put_rec0: Callable[[InputRecord], None]
        schema_id = -1
        for rec in batch:
            topic = rec.topic
            dests = routes.get(topic)
            if dests is None:
                quarantined.append(Quarantined(rec, Reason.NO_ROUTE, f"topic {topic!r} has no route"))
                continue
            value = rec.value
            if value is None:
                # A tombstone carries no data; forward it so deletions propagate.
                stats.tombstones += 1
                for st in dests:
                    outputs.append(OutputRecord(st.dest.topic, st.key_fn(rec.key), None, self._tomb_headers(st, rec), rec))
                continue
            try:
                if len(value) > max_bytes:
                    raise RecordError(Reason.OVERSIZED, f"{len(value)} bytes > limit {max_bytes}")
                if open_parts is not None:
                    plain, kek_id, _ = open_parts(topic, value)
                else:
                    opened = opener.open(topic, value)
                    plain, kek_id = opened.plaintext, opened.kek_id
                if len(plain) < HEADER_LEN or plain[0] != MAGIC:
                    raise RecordError(Reason.BAD_PAYLOAD, "plaintext is not Confluent-framed")
                schema_id = unpack_u32(plain, 1)[0]
                key = (topic, schema_id)
                if key != last_key:
                    hit = targets_of.get(key)
                    if hit is None:
                        hit = targets_of[key] = self._targets_for(schema_id, dests, pending)
                    targets, last_key = hit, key
                    for t in targets:
                        t.pending.mark(t.plan)
                    # Bound once per (topic, schema): each destination's plan and lists.
                    fns = [t.plan.fn for t in targets]
                    puts = [(t.pending.plains.append, t.pending.records.append) for t in targets]
                    gated = any(t.plan.consent is not None for t in targets)
                    budgeted = any(t.plan.budget is not None for t in targets)
                    single = len(targets) == 1 and not gated and not budgeted
                    if single:  # the common case, without a loop per record
                        fn0 = fns[0]
                        put_plain0, put_rec0 = puts[0]
                forgot = False
                try:
                    if single:
                        out_plain = join(fn0(plain))
                    else:
                        outs = [join(fn(plain)) for fn in fns]
                except SubjectForgotten:
                    # Erasable rules of a forgotten subject: withheld from those audiences.
                    forgot = True
                    each = self._each(plain, fns, targets, withheld, schema_id)
                except TransformFailed as exc:
                    raise RecordError(exc.reason, f"field {exc.args[0]}") from None
                except (BadPayload, IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError):
                    raise RecordError(Reason.BAD_PAYLOAD, f"Avro does not match schema id {schema_id}") from None
            except SchemaNotFound:
                quarantined.append(Quarantined(rec, Reason.UNKNOWN_SCHEMA, f"schema id {schema_id}"))
                continue
            except EnvelopeError as exc:
                quarantined.append(Quarantined(rec, exc.reason, exc.detail, exc.kek_id, exc.kek_version))
                continue
            except RecordError as exc:
                quarantined.append(Quarantined(rec, exc.reason, exc.detail))
                continue
            if kek_id != run_kek or topic != run_topic:
                if run_n:
                    dk = (run_topic, self._kek_stat(run_kek))
                    decryptions[dk] = decryptions.get(dk, 0) + run_n
                run_topic, run_kek, run_n = topic, kek_id, 0
            run_n += 1
            if forgot:
                # Withheld as forgotten where a plan refused (counted there); the others by
                # consent as usual: one refusal, one reason.
                live = tuple(t for t, o in zip(targets, each, strict=True) if o is not None)
                ok_live = iter(self._admit(plain, live, withheld) if gated else [True] * len(live))
                admitted = [o is not None and next(ok_live) for o in each]
                if budgeted:
                    self._spend(plain, rec.partition, targets, each, admitted, stats.dp_suppressed)
                for (put_plain, put_rec), o, ok in zip(puts, each, admitted, strict=True):
                    if ok and o is not None:
                        put_plain(o)
                        put_rec(rec)
            elif single:
                put_plain0(out_plain)
                put_rec0(rec)
            elif gated or budgeted:
                # Withheld from an audience (consent): no output for that destination, no
                # dead letter; over its budget: the DP fields null.
                admitted = self._admit(plain, targets, withheld) if gated else [True] * len(targets)
                if budgeted:
                    self._spend(plain, rec.partition, targets, outs, admitted, stats.dp_suppressed)
                for (put_plain, put_rec), out_plain, ok in zip(puts, outs, admitted, strict=True):
                    if ok:
                        put_plain(out_plain)
                        put_rec(rec)
            else:
                for (put_plain, put_rec), out_plain in zip(puts, outs, strict=True):
                    put_plain(out_plain)
                    put_rec(rec)
        if run_n:
            dk = (run_topic, self._kek_stat(run_kek))
            decryptions[dk] = decryptions.get(dk, 0) + run_n
        return pending

    @staticmethod
    def _each(
        plain: bytes,
        fns: list[Callable[[bytes], list[bytes]]],
        targets: tuple[_Target, ...],
        withheld: dict[tuple[str, str], int],
        schema_id: int,
    ) -> list[bytes | None]:
        """Every destination's output of one record, ``None`` where its subject is forgotten.

        The slow path, taken only when some plan raised :class:`SubjectForgotten`: each
        plan runs on its own, so an audience without erasable rules still gets the record.
        Any other failure fails the whole record, as on the fast path.
        """
        outs: list[bytes | None] = []
        for fn, t in zip(fns, targets, strict=True):
            try:
                outs.append(b"".join(fn(plain)))
            except SubjectForgotten:
                wk = (t.pending.state.dest.audience, FORGOTTEN)
                withheld[wk] = withheld.get(wk, 0) + 1
                outs.append(None)
            except TransformFailed as exc:
                raise RecordError(exc.reason, f"field {exc.args[0]}") from None
            except (BadPayload, IndexError, UnicodeDecodeError, struct.error, ValueError, OverflowError):
                raise RecordError(Reason.BAD_PAYLOAD, f"Avro does not match schema id {schema_id}") from None
        return outs

    def _targets_for(
        self, schema_id: int, dests: list[_DestState], pending: dict[str, _Pending]
    ) -> tuple[_Target, ...]:
        """The plan and pending outputs of every destination for one schema id.

        Compiles what is missing in destination order, so the first failing destination
        decides the reason class (:meth:`_compile` raises); nothing is returned unless
        every destination has a plan.
        """
        plans = self._plans
        compiled = []
        for st in dests:
            c = plans.get((schema_id, st.dest.topic))
            compiled.append(c if isinstance(c, _Compiled) else self._compile(schema_id, st))
        out = []
        for st, c in zip(dests, compiled, strict=True):
            pend = pending.get(st.dest.topic)
            if pend is None:
                pend = pending[st.dest.topic] = _Pending(st)
            out.append(_Target(c, pend))
        return tuple(out)

    def _seal(self, pend: _Pending, outputs: list[OutputRecord], stats: BatchStats) -> None:
        """Stage 2, for one destination: seal its plaintexts in one go, then build outputs."""
        st = pend.state
        topic = st.dest.topic
        held = pend.held
        # Held records (action: hold) are sealed twice, full and suppressed, in the same
        # call: both variants rest in the hold changelog as ciphertext, never plaintext.
        plains = pend.plains if not held else [*pend.plains, *(sp for _, _, sp in held)]
        sealed_all = self._guarded(st, functools.partial(st.sealer.seal_many, plains))
        holding = {j: (digest, len(pend.plains) + i) for i, (j, digest, _) in enumerate(held)}
        key_mode, key_fn = st.key_mode, st.key_fn
        recs = pend.records
        refs = None if st.references is None else st.references(recs)
        transforms = stats.transforms
        now = self._hold_clock() if held else 0.0
        kept_back: set[int] = set()
        n_big = 0
        for compiled, start, end in pend.runs():
            _count_transforms(transforms, compiled, end - start)
            prefix = compiled.prov_prefix
            for j in range(start, end):
                rec = recs[j]
                # One header: the constant fields, then the audience-keyed reference.
                headers = [(H_PROVENANCE, prefix if refs is None else prefix + refs[j])]
                if key_mode == "keep":
                    key = rec.key
                elif key_mode == "drop":
                    key = None
                else:
                    key = key_fn(rec.key)
                if holding and j in holding:
                    assert self.holds is not None and st.risk is not None
                    digest, si = holding[j]
                    h = Held(
                        st.dest.audience, digest, now, topic, key, tuple(headers), sealed_all[j], sealed_all[si],
                        rec.topic, rec.partition, rec.offset,
                    )  # fmt: skip
                    value = encode_held(h)
                    if len(value) + len(h.changelog_key()) <= self.max_record_bytes:
                        self.holds.hold(h, value)
                        kept_back.add(j)
                        continue
                    # Too large to hold (both variants, base64, in one changelog record):
                    # released suppressed now rather than failing every retry of the batch.
                    st.risk.released.add(st.risk.suppressed_digest, None, now)
                    n_big += 1
                    sealed_all[j] = sealed_all[si]
                outputs.append(_new_output(topic, key, sealed_all[j], headers, rec))
        if held:
            for action, n in ((HELD, len(kept_back)), (SUPPRESSED, n_big)):
                if n:
                    hk = (st.dest.audience, action)
                    stats.risk_enforced[hk] = stats.risk_enforced.get(hk, 0) + n
            sealed_all = [v for j, v in enumerate(sealed_all[: len(pend.plains)]) if j not in kept_back]
        ek = (topic, st.dest.audience)
        stats.egress_records[ek] = stats.egress_records.get(ek, 0) + len(sealed_all)
        stats.egress_bytes[ek] = stats.egress_bytes.get(ek, 0) + sum(map(len, sealed_all))

    def _tomb_headers(self, st: _DestState, rec: InputRecord) -> Headers:
        """A tombstone's provenance: as a record's, without an output schema."""
        value = st.prov_prefix(self.policy.version, None)
        if st.references is not None:
            value += st.references([rec])[0]
        return [(H_PROVENANCE, value)]


class _Pending:
    """One destination's sanitized plaintexts of a batch, waiting to be sealed.

    The plaintexts go to :meth:`Sealer.seal_many <streamproc.crypto.envelope.Sealer>` as
    one list, so stage 1 appends them (and their input records, same index) directly.  The
    plans that produced them change only when the batch's (source topic, schema id)
    changes: stage 1 then calls :meth:`mark`, so nothing per record is spent on them, and
    :meth:`runs` gives the stretches of one plan (how transforms are counted).
    """

    __slots__ = ("held", "marks", "plains", "records", "state")

    def __init__(self, state: _DestState) -> None:
        self.state = state
        #: ``action: hold``: (index, class digest, suppressed plaintext) of held records.
        self.held: list[tuple[int, bytes, bytes]] = []
        self.plains: list[bytes] = []
        self.records: list[InputRecord] = []
        self.marks: list[tuple[_Compiled, int]] = []  # (plan, index of its first output)

    def mark(self, plan: _Compiled) -> None:
        """Outputs from here on come from ``plan`` (until the next mark)."""
        if not self.marks or self.marks[-1][0] is not plan:
            self.marks.append((plan, len(self.plains)))

    def runs(self) -> Iterator[tuple[_Compiled, int, int]]:
        """``(plan, start, end)`` for every non-empty stretch of outputs of one plan."""
        marks = self.marks
        for k, (plan, start) in enumerate(marks):
            end = marks[k + 1][1] if k + 1 < len(marks) else len(self.plains)
            if end > start:
                yield plan, start, end


class _Target(NamedTuple):
    """Where one destination's output of a (source topic, schema id) goes."""

    plan: _Compiled
    pending: _Pending


def _count_transforms(transforms: dict[str, int], compiled: _Compiled, records: int) -> None:
    for op, n in compiled.transforms:
        transforms[op] = transforms.get(op, 0) + n * records


#: OutputRecord(topic, key, value, headers, source) without the frozen-dataclass __init__
#: (which sets each field through object.__setattr__): same object, about half the cost.
_new_output = fast_dataclass_constructor(OutputRecord, ("topic", "key", "value", "headers", "source"))


def build_routes(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Route]:
    """Routes from a literal spec: ``[{sources: [...], destinations: [{topic, audience, kek}]}]``.

    For tests, the demo workspace and benchmarks; the runtime builds its routes from the
    typed configuration (``streamproc.runtime.factory.routes_from_config``).
    """
    items = [spec] if isinstance(spec, Mapping) else list(spec)
    routes = []
    for i, r in enumerate(items):
        srcs = r.get("sources") or ([r["source"]] if "source" in r else [])
        if not srcs:
            raise PolicyError(f"pipeline #{i + 1}: needs 'sources'")
        dests = tuple(Destination(str(d["topic"]), str(d["audience"]), str(d["kek"])) for d in r.get("destinations", []))
        if not dests:
            raise PolicyError(f"pipeline #{i + 1}: needs at least one destination")
        keks = r.get("source_keks")
        routes.append(Route(tuple(srcs), dests, None if keks is None else tuple(str(k) for k in keks)))
    return routes


__all__ = [
    "BatchResult",
    "BatchStats",
    "CompiledPlan",
    "Destination",
    "EnvelopeError",
    "InputRecord",
    "OutputRecord",
    "Pipeline",
    "Quarantined",
    "Route",
    "build_routes",
]
