"""Re-identification risk in the pipeline: measured on, and enforced in, each audience's outputs.

An audience with ``risk:`` in the policy gets a :class:`RiskGuard`.  Once per batch, after
its plans ran and before its outputs are sealed, the guard reads the quasi-identifiers
(and the sensitive value) of every output plaintext -- the values the audience's
subscribers will decrypt, after every transformation, consent, budget suppression and
enforcement included -- with readers compiled per output schema (:class:`RiskProbe`), and:

* **measures**: every released tuple goes into a :class:`~streamproc.privacy.risk.RiskWindow`
  (``released``), whose report the worker exports as gauges per audience.  Measurement
  alone compares encodings, not values: a record's class key is its quasi-identifier
  fields' encodings concatenated and its sensitive key the sensitive field's encoding
  (read in Rust, one walk per record, when the compiled extension is built, else by one
  generated reader), so nothing is decoded and no tuple is built per record;
* **enforces** (``risk.action``): a *candidate* window per ladder level counts the tuple
  each record would have at that level (level 0: what the policy's rules give).  A record
  is released at the lowest level whose class, counting this record, holds at least k
  records of the window; ``suppress`` has only level 0, ``generalize_more`` climbs the
  policy's ladder (each step applied to the previous level's value: it can only coarsen
  what the audience already sees); when no level reaches k the record's
  quasi-identifiers are written as null (the plan made those fields nullable), as they
  are when a ladder step raises on the record's value (fail closed per record: raising
  would fail the batch on every retry and keep the worker down).  Every
  record counts in every level's window, whatever it was released as: a class is the set
  of records that truly share the tuple.

Why the candidate counts and not the released ones decide: a tuple is released only once
k records of the window truly have it, and the k - 1 before it were released with their
quasi-identifiers suppressed (which matches any tuple), so the released record is one of
at least k candidates.  Deciding on released tuples alone would never release a new
tuple.  The released window measures exact equality (a null is one value), as pycanon
and ``streamproc risk`` do, so it is the stricter reading: it shows the first released
records of a new class as below k even though their suppressed peers hide them.

The windows are per worker process (each sees the partitions it owns), in memory, and
start empty: after a restart or a rebalance every class starts from 0, so enforcement
suppresses more until the window refills (it errs towards suppression, never towards
release).  A batch's additions are undone when its transaction aborts
(:meth:`RiskGuard.savepoint` / :meth:`RiskGuard.rollback`): a record is never counted
twice.  Nothing here logs or reports a value: only counts and shares leave.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from streamproc.errors import PolicyError
from streamproc.operators import OpContext
from streamproc.pipeline.codegen import (
    PASS_THROUGH,
    compile_key_reader,
    compile_reader,
    enc_long,
    encoder,
)
from streamproc.pipeline.native import compile_native_keys, risk_counts
from streamproc.pipeline.plan import Plan, node_out_type, quasi_identifier_fields, scalar_of
from streamproc.policy.model import Audience
from streamproc.privacy.risk import RiskReport, RiskWindow
from streamproc.schema.avro import Record, Union

#: ``streamproc_risk_enforced_total{action}`` values: how an at-risk record was released.
SUPPRESSED = "suppressed"
GENERALIZED = "generalized"
#: ``action: hold``: a record kept back, one released with its full output once its class
#: reached k, one released suppressed (window passed, or the hold full).
HELD, RELEASED, EXPIRED = "held", "released", "expired"

_MEMO_MAX = 4096
"""Ladder values remembered per (field, level): quasi-identifiers repeat (that is the point
of them), so most records cost a dict lookup, not an operator call."""


@dataclass
class _Field:
    """One quasi-identifier (or sensitive) output field, as the probe reads and rewrites it."""

    name: str
    null: bytes
    """The Avro encoding of null in this field (its union's null branch index)."""
    prefix: bytes
    """The union branch index of a value."""
    encode: Callable[[Any], bytes]
    steps: list[Callable[[Any], Any]]
    """Ladder steps for this field (the first ladder of its tags; empty without one)."""
    memo: list[dict[Hashable, Any]]


class RiskProbe:
    """Reads (and rewrites) the quasi-identifiers of one output schema's plaintexts."""

    def __init__(self, plan: Plan, schema: Record, audience: Audience, offset: int) -> None:
        risk = audience.risk
        assert risk is not None
        out = node_out_type(plan.root)
        if not isinstance(out, Record):
            raise PolicyError(f"audience {audience.name!r}: risk is measured on record outputs")
        present = {f.name: f for f in out.fields}
        ladder = dict(audience.risk_ladder)

        def field_of(tag: str) -> str | None:
            return next((f.name for f in quasi_identifier_fields(schema, (tag,)) if f.name in present), None)

        qi_names = [field_of(t) for t in risk.quasi_identifiers]
        sens_name = field_of(risk.sensitive) if risk.sensitive is not None else None
        names = [f.name for f in out.fields if f.name in set(qi_names) | {sens_name}]
        self.read = compile_reader(out, names, offset=offset)
        # Measurement only: each record's class key (its quasi-identifiers' encodings) and
        # sensitive key, straight from the bytes -- by the compiled interpreter when it is
        # built (one call per key, in Rust), else by one generated reader for both.
        qi_set = {n for n in qi_names if n is not None}
        self.read_keys = compile_key_reader(out, qi_set, sens_name, offset=offset)
        #: The interpreter's reader of a batch's keys, or None (then ``read_keys`` per record).
        self.native = compile_native_keys(out, qi_set, sens_name, offset=offset)
        index = {n: i for i, n in enumerate(names)}
        #: Position in the reader's values of each quasi-identifier (-1: not received).
        self.qi = [-1 if n is None else index[n] for n in qi_names]
        self.sensitive = -1 if sens_name is None else index[sens_name]
        #: Reader positions of the distinct quasi-identifier fields enforcement rewrites.
        self.rewrite = sorted({i for i in self.qi if i >= 0})
        self.fields: list[_Field | None] = [None] * len(names)
        self.levels = max((len(steps) for _, steps in audience.risk_ladder), default=0)
        if risk.action is None:
            return
        for i in self.rewrite:
            f = present[names[i]]
            t = f.type
            if not (isinstance(t, Union) and t.nullable_of is not None):
                raise PolicyError(f"audience {audience.name!r}, field {f.name!r}: not nullable (plan not enforceable)")
            null_idx = next(j for j, b in enumerate(t.branches) if b.kind == "null")
            base = scalar_of(t)
            src = next(sf for sf in schema.fields if sf.name == f.name)
            tag = next((tg for tg in src.tags if tg in ladder), None)
            steps = []
            for step in ladder.get(tag, ()) if tag is not None else ():
                ctx = OpContext(audience.name, str(tag), f.name, None, audience.shared_domains)
                steps.append(step.operator.bind_checked(step.params, base, ctx))
            self.fields[i] = _Field(
                f.name, enc_long(null_idx), enc_long(1 - null_idx), encoder(base), steps,
                [{} for _ in steps],
            )

    def level_values(self, vals: list[Any], level: int) -> list[Any]:
        """``vals`` one ladder level further (level >= 1): each field's step ``level`` on
        its level - 1 value, or its value unchanged past the end of its ladder."""
        out = list(vals)
        for i in self.rewrite:
            f = self.fields[i]
            assert f is not None
            if level > len(f.steps):
                continue
            v = vals[i]
            if v is None:
                continue  # null stays null (the operators never see it)
            memo = f.memo[level - 1]
            hit = memo.get(v, _MISS)
            if hit is _MISS:
                if len(memo) >= _MEMO_MAX:
                    memo.clear()
                hit = memo[v] = f.steps[level - 1](v)
            out[i] = hit
        return out

    def splice(self, plain: bytes, spans: list[int], vals: list[Any] | None) -> bytes:
        """``plain`` with the quasi-identifier fields rewritten: null (``vals`` None) or the
        given values.  Fields are top-level, so no enclosing length changes."""
        parts = []
        pos = 0
        for i in self.rewrite:
            f = self.fields[i]
            assert f is not None
            start, end = spans[2 * i], spans[2 * i + 1]
            parts.append(plain[pos:start])
            v = None if vals is None else vals[i]
            parts.append(f.null if v is None else f.prefix + f.encode(v))
            pos = end
        parts.append(plain[pos:])
        return b"".join(parts)


_MISS = object()


class RiskGuard:
    """One audience's windows (see the module doc): measurement and enforcement."""

    def __init__(self, audience: Audience) -> None:
        target = audience.risk
        assert target is not None
        self.audience = audience.name
        self.target = target
        # Measurement alone adds bytes keys (RiskGuard.keys): the compiled counters take
        # them when the extension is built.  Enforcement adds decoded tuples: Python counters.
        self.released = RiskWindow(target, counts=risk_counts(target.k, target.l) if target.action is None else None)
        levels = max((len(steps) for _, steps in audience.risk_ladder), default=0)
        self.candidates = [] if target.action is None else [RiskWindow(target) for _ in range(levels + 1)]
        #: ``action: hold``: the key of the class digests (set by the pipeline, from the
        #: pseudonym master), and the classes that reached k in the current batch.
        self.hold_key: bytes | None = None
        self.reached: set[bytes] = set()

    def class_digest(self, tup: tuple[Any, ...]) -> bytes:
        """``action: hold``'s class key: a keyed digest of the quasi-identifier tuple (the
        hold changelog's keys name it; a digest the hold key cannot recompute is no
        dictionary of quasi-identifiers).  ``repr`` of decoded Avro values is stable
        across processes (no hash randomization), so a restored class matches."""
        assert self.hold_key is not None
        return hmac.new(self.hold_key, repr(tup).encode(), hashlib.sha256).digest()[:16]

    @property
    def suppressed_digest(self) -> bytes:
        """The class of a record released with its quasi-identifiers null."""
        return self.class_digest((None,) * len(self.target.quasi_identifiers))

    def hold(
        self, runs: list[tuple[RiskProbe, int, int]], plains: list[bytes], now: float
    ) -> list[tuple[int, bytes, bytes]]:
        """``action: hold`` on ``plains[start:end]`` of each run: the records whose class,
        counting them, is still below k, as ``(index, class digest, suppressed plaintext)``.

        Every record counts in the candidate window (a class is the records that truly
        share the tuple, held or not); one that reaches k is released as is, and its
        class is added to :attr:`reached` (its held records go out with it).  The
        released window measures in digest space: what subscribers got, a held record
        from its release on (:class:`~streamproc.pipeline.hold.HoldBook`).
        """
        cand = self.candidates[0]
        k = self.target.k
        held = []
        for probe, start, end in runs:
            read, qi = probe.read, probe.qi
            for j in range(start, end):
                vals, spans = read(plains[j])
                h = self.class_digest(tuple([vals[i] if i >= 0 else None for i in qi]))
                if cand.add(h, None, now) >= k:
                    self.reached.add(h)
                    self.released.add(h, None, now)
                else:
                    held.append((j, h, probe.splice(plains[j], spans, None)))
        return held

    def restore_held(self, digest: bytes, held_at: float) -> None:
        """A held record restored from the changelog counts in its class again (at its
        hold time, or at the newest time the window has if that is later: the window's
        times only grow, so a late restore counts at most a batch interval longer)."""
        cand = self.candidates[0]
        newest = cand.newest()
        cand.add(digest, None, held_at if newest is None else max(held_at, newest))

    def savepoint(self) -> tuple[int, ...]:
        return (self.released.savepoint(), *(w.savepoint() for w in self.candidates))

    def rollback(self, savepoint: tuple[int, ...]) -> None:
        self.reached.clear()
        self.released.rollback(savepoint[0])
        for w, sp in zip(self.candidates, savepoint[1:], strict=True):
            w.rollback(sp)

    def keys(
        self, runs: list[tuple[RiskProbe, int, int]], plains: list[bytes]
    ) -> tuple[list[Hashable], list[Hashable] | None]:
        """The class key and (with l) the sensitive key of every record of ``runs``, in
        order: one ``map`` per run and key, so the loop over records stays in C."""
        with_l = self.target.sensitive is not None
        qis: list[Hashable] = []
        sens: list[Hashable] | None = [] if with_l else None
        for probe, start, end in runs:  # one run per plan
            part = plains[start:end] if start or end < len(plains) else plains
            if probe.native is not None:
                q, s = probe.native(part)
                qis += q
                if sens is not None:
                    sens += s
            else:
                rows = list(map(probe.read_keys, part))
                qis += map(itemgetter(0), rows)
                if sens is not None:
                    sens += map(itemgetter(1), rows)
        return qis, sens

    def apply(
        self, runs: list[tuple[RiskProbe, int, int]], plains: list[bytes], now: float,
        enforced: dict[tuple[str, str], int],
    ) -> RiskReport:
        """Measure (and enforce on) ``plains[start:end]`` of each run; rewrites ``plains`` in
        place where enforcement says so, counts in ``enforced[(audience, action)]``."""
        add = self.released.add
        k = self.target.k
        cands = self.candidates
        suppressed = generalized = 0
        nulls = (None,) * len(self.target.quasi_identifiers)
        if not cands:  # measurement only: read the keys, one batch into the window
            self.released.add_batch(*self.keys(runs, plains), now)
            return self.released.report(now)
        for probe, start, end in runs:
            read, qi, sens = probe.read, probe.qi, probe.sensitive
            for j in range(start, end):
                vals, spans = read(plains[j])
                tup = tuple([vals[i] if i >= 0 else None for i in qi])
                s = vals[sens] if sens >= 0 else None
                tup_l = tup
                level = 0 if cands[0].add(tup, None, now) >= k else -1
                chosen = vals
                cur = vals
                try:
                    for lv in range(1, len(cands)):
                        cur = probe.level_values(cur, lv)
                        t_l = tuple([cur[i] if i >= 0 else None for i in qi])
                        if cands[lv].add(t_l, None, now) >= k and level < 0:
                            level, chosen, tup_l = lv, cur, t_l
                except PASS_THROUGH:
                    raise  # an outage: the batch is retried, as for the plan's operators
                except Exception:
                    # A ladder step that cannot coarsen this value (out of its range, say)
                    # fails this record closed -- its quasi-identifiers are suppressed, even
                    # if level 0 reached k, since its higher levels went uncounted -- rather
                    # than the batch: raising here would stop the worker on every retry of
                    # the same record.  It is not counted in the levels it has no tuple at.
                    level = -1
                if level < 0:
                    plains[j] = probe.splice(plains[j], spans, None)
                    tup = nulls
                    suppressed += 1
                elif level > 0:
                    plains[j] = probe.splice(plains[j], spans, chosen)
                    tup = tup_l
                    generalized += 1
                add(tup, s, now)
        if suppressed:
            key = (self.audience, SUPPRESSED)
            enforced[key] = enforced.get(key, 0) + suppressed
        if generalized:
            key = (self.audience, GENERALIZED)
            enforced[key] = enforced.get(key, 0) + generalized
        return self.released.report(now)
