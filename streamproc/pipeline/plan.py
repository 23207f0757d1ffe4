"""Plan trees: what happens to every part of a record, for one (schema, audience).

:func:`build_plan` combines a schema's annotations with an audience's rules into a tree of
plan nodes, binding each operator once (keys derived, parameters parsed).  The same tree
drives three things, so they cannot disagree:

* :func:`output_schema` -- the derived output schema;
* :mod:`streamproc.pipeline.codegen` -- the byte-level function used on the hot path;
* :mod:`streamproc.pipeline.reference` -- a slow dict-walking interpreter, the oracle
  the property tests compare the generated code against.

Subtrees in which nothing changes collapse into :class:`Keep`, which the generated code
copies as raw bytes without decoding.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from streamproc.crypto.erasure import SubjectKeyTable
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError, SchemaError
from streamproc.operators import OpContext, Operator, OperatorError, get_operator
from streamproc.operators.dp import DP_PROP
from streamproc.policy.model import DP_OPERATORS, Audience, Rule
from streamproc.privacy.budget import Accountant, Cost
from streamproc.schema import avro
from streamproc.schema.annotations import (
    DOMAIN_HINT,
    KEY_TAGS_HINT,
    maps_in,
    merge_tags,
    records_in,
    subject_field,
)
from streamproc.schema.avro import Array, AvroType, Field, Map, Primitive, Record, Union

_ids = itertools.count(1)

TRANSFORM_PROP = "streamproc.transform"


@dataclass(eq=False)
class Node:
    t: AvroType


@dataclass(eq=False)
class Keep(Node):
    """Copy the value's bytes verbatim."""


@dataclass(eq=False)
class Drop(Node):
    """Skip the value; the field leaves the output (record fields only)."""


@dataclass(eq=False)
class Apply(Node):
    """Decode a scalar (unless ``decode`` is False), run ``fn``, encode as ``out``."""

    out: AvroType = field(default_factory=lambda: Primitive("null"))
    fn: Any = None
    op: str = ""
    path: str = ""
    needs_subject: bool = False
    decode: bool = True
    params: Any = None
    """The rule's parameters (lineage and the data map describe the transformation with them)."""
    props: dict[str, Any] = field(default_factory=dict)
    """Output field properties the operator declares (:meth:`Operator.field_props`)."""
    domain: str = ""
    """The pseudonym domain a keyed operator derives its key in (``policy explain`` names it)."""


@dataclass(eq=False)
class RecordNode(Node):
    fields: list[tuple[Field, Node]] = field(default_factory=list)
    out: Record | None = None
    uid: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False)
class ArrayNode(Node):
    items: Node = field(default_factory=lambda: Keep(Primitive("null")))


@dataclass(eq=False)
class MapNode(Node):
    values: Node = field(default_factory=lambda: Keep(Primitive("null")))
    keys: Node = field(default_factory=lambda: Keep(Primitive("string")))
    """:class:`Keep` (keys copied) or :class:`Apply` from string to string.  Transformed
    keys must stay distinct within one map, else the record fails (``transform_failed``):
    merging two entries would silently lose one."""


@dataclass(eq=False)
class UnionNode(Node):
    branches: list[Node] = field(default_factory=list)
    out: Union | None = None
    index_map: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """A compiled plan for one (input schema, audience)."""

    audience: str
    root: Node
    out_schema: Any
    subject: Field | None
    transforms: dict[str, int]
    """Operator name -> number of transformed positions (for metrics and docs)."""
    dp_cost: Cost | None = None
    """With an audience ``budget:``: what one record's DP releases cost (see
    :func:`build_plan`); ``None`` without a budget."""


def is_keep(n: Node) -> bool:
    return isinstance(n, Keep)


class _Builder:
    def __init__(
        self,
        audience: Audience,
        keys: PseudonymKeys | None,
        root: Record,
        erasure: SubjectKeyTable | None = None,
        dp_suppressed: bool = False,
    ) -> None:
        self.audience = audience
        self.keys = keys
        self.erasure = erasure
        #: A budgeted audience's DP fields are nullable; the suppressed variant writes null.
        self.budgeted = audience.budget is not None
        self.dp_suppressed = dp_suppressed
        self.records: dict[tuple[str, tuple[str, ...]], RecordNode] = {}
        self.transforms: dict[str, int] = {}
        self.subject_needed = False
        self.root = root

    # -- fields -------------------------------------------------------------------------
    def record(self, r: Record, prefix: str, inherited: tuple[str, ...] = ()) -> Node:
        key = (r.fullname, inherited)
        memo = self.records.get(key)
        if memo is not None:
            return memo
        node = RecordNode(r)
        self.records[key] = node
        for f in r.fields:
            node.fields.append((f, self.field(f, f"{prefix}{f.name}", inherited)))
        if all(is_keep(n) for _, n in node.fields):
            del self.records[key]
            return Keep(r)
        return node

    def field(self, f: Field, path: str, inherited: tuple[str, ...] = ()) -> Node:
        """One field.  ``inherited``: the tags of the tagged containers around it.

        A tag applies to everything inside the value it is on, so a field's tags are its
        own plus its containers'; :meth:`Audience.rule_for` picks the strictest rule among
        them.  A tagged container whose rule is ``drop`` or ``redact`` hides the whole
        value (nothing inside can be stricter); under any other rule its records are walked
        so that an inner ``EMAIL`` is never kept because the container is ``PUBLIC``.

        Map keys are data too: they get the field's rule, or the rule of the tags in the
        field's ``streamproc.key_tags`` hint when the schema classifies them separately.
        """
        tags = _merge(inherited, f.tags)
        hint = f.props.get(KEY_TAGS_HINT)
        krule: Rule | None = None
        kdomain = ""
        if hint is not None:
            ktags = _merge(inherited, tuple(str(x) for x in hint))
            krule = self.audience.rule_for(ktags) if ktags else None
            if krule is None and maps_in(f.type):
                return Drop(f.type)  # keys whose tags this audience does not mention
            if krule is not None:
                kdomain = str(krule.params.get("domain") or f.props.get(DOMAIN_HINT) or krule.tag)
        if tags:
            rule = self.audience.rule_for(tags)
            if rule is None:
                return Drop(f.type)  # a tag this audience does not mention: minimize
            domain = str(rule.params.get("domain") or f.props.get(DOMAIN_HINT) or rule.tag)
            if hint is None:
                krule, kdomain = rule, domain
            if records_in(f.type) and rule.op not in ("drop", "redact"):
                return self.container(f.type, path, tags, rule, domain, krule, kdomain)
            return self.rule(rule, f.type, path, domain, krule, kdomain)
        if records_in(f.type):
            return self.container(f.type, path, (), None, "", krule, kdomain)
        return Keep(f.type) if self.audience.untagged == "keep" else Drop(f.type)

    def container(
        self,
        t: AvroType,
        path: str,
        tags: tuple[str, ...],
        rule: Rule | None,
        domain: str,
        krule: Rule | None,
        kdomain: str,
    ) -> Node:
        """A value that contains records: walk the records' own fields.

        Without a tag (``rule`` None), scalar values met on the way (the string branch of
        ``["null", "string", R]``, the keys of a map) are untagged data and get the
        audience's ``untagged`` rule: kept, or, under ``drop``, written as null when the
        union has a null branch.  When that is impossible the whole field is dropped
        (:class:`Drop` propagates up to the field): minimization wins over keeping a record
        half-visible.  Under a tagged container's ``rule`` they get that rule.
        """
        if isinstance(t, Record):
            return self.record(t, path + ".", tags)
        if isinstance(t, Array):
            items = self.container(t.items, path + "[]", tags, rule, domain, krule, kdomain)
            if isinstance(items, Drop):
                return Drop(t)
            return Keep(t) if is_keep(items) else ArrayNode(t, items)
        if isinstance(t, Map):
            values = self.container(t.values, path + "{}", tags, rule, domain, krule, kdomain)
            if isinstance(values, Drop):
                return Drop(t)
            if krule is not None:
                keys = self.map_keys(krule, path, kdomain)
            elif self.audience.untagged == "keep":
                keys = Keep(_STRING)
            else:
                return Drop(t)  # unclassified keys under untagged: drop cannot stay
            if is_keep(values) and is_keep(keys):
                return Keep(t)
            return MapNode(t, values, keys)
        if isinstance(t, Union):
            has_null = any(b.kind == "null" for b in t.branches)
            branches: list[Node] = []
            for b in t.branches:
                if b.kind == "null" or records_in(b):
                    node = self.container(b, path, tags, rule, domain, krule, kdomain)
                elif rule is not None:
                    node = self.rule(rule, b, path, domain, krule, kdomain)
                elif self.audience.untagged == "keep":
                    # untagged data is kept, but keys classified by the field's hint get their rule
                    node = self.rule(_KEEP, b, path, domain, krule, kdomain) if krule is not None else Keep(b)
                elif has_null:
                    node = Apply(b, Primitive("null"), _to_null, "redact", path, False, False)
                    self.transforms["redact"] = self.transforms.get("redact", 0) + 1
                else:
                    return Drop(t)
                if isinstance(node, Drop):
                    return Drop(t)
                branches.append(node)
            return self.union(t, branches)
        if t.kind == "null":
            return Keep(t)
        if rule is not None:
            return self.rule(rule, t, path, domain, krule, kdomain)
        return Keep(t) if self.audience.untagged == "keep" else Drop(t)

    def union(self, t: Union, branches: list[Node]) -> Node:
        if all(is_keep(b) for b in branches):
            return Keep(t)
        # The output union and index map are derived later, by node_out_type: a branch may
        # be a record that is still being built (recursive schema), whose output is not known.
        return UnionNode(t, branches)

    # -- rules --------------------------------------------------------------------------
    def rule(self, rule: Rule, t: AvroType, path: str, domain: str, krule: Rule | None, kdomain: str) -> Node:
        """``rule`` on a value of type ``t``; ``krule`` for the keys of maps inside it."""
        op = rule.operator
        if self.budgeted and rule.op in DP_OPERATORS:
            return self.budgeted_dp(rule, t, path, domain)
        if rule.op == "drop":
            return Drop(t)
        if rule.op == "keep" and (krule is None or krule.op == "keep" or not maps_in(t)):
            return Keep(t)
        # redact with a constant on a union, array or map applies per value (null stays
        # null); every other whole-value operator applies to the value as a whole.
        per_value = rule.op == "redact" and rule.params.get("value") is not None and isinstance(t, (Union, Array, Map))
        if op.any_type and not per_value and rule.op != "keep":
            return self.apply(op, rule, t, path, domain, decode=False)
        if isinstance(t, Union):
            branches = [
                Keep(b) if b.kind == "null" else self.rule(rule, b, path, domain, krule, kdomain) for b in t.branches
            ]
            return self.union(t, branches)
        if isinstance(t, Array):
            items = self.rule(rule, t.items, path + "[]", domain, krule, kdomain)
            return Keep(t) if is_keep(items) else ArrayNode(t, items)
        if isinstance(t, Map):
            assert krule is not None
            values = self.rule(rule, t.values, path + "{}", domain, krule, kdomain)
            keys = self.map_keys(krule, path, kdomain)
            return Keep(t) if is_keep(values) and is_keep(keys) else MapNode(t, values, keys)
        if rule.op == "keep":
            return Keep(t)
        return self.apply(op, rule, t, path, domain, decode=True)

    def budgeted_dp(self, rule: Rule, t: AvroType, path: str, domain: str) -> Node:
        """A DP rule under an audience budget: the output can always be null.

        A scalar field's output becomes ``["null", T]``; a union field must already have a
        null branch (its output is the same union).  Both plan variants (noised, and
        suppressed for a subject whose budget is spent) have the same output schema, so a
        subscriber sees one schema whatever the budget decided.  The suppressed variant
        skips the value and writes null.  Repeated values (arrays, maps) are refused: the
        cost of a record would depend on its length (see :func:`dp_cost`).
        """
        where = f"audience {self.audience.name!r}, field {path!r}, tag {rule.tag!r}"
        if isinstance(t, (Array, Map)):
            raise PolicyError(f"{where}: a budget accounts a fixed number of releases per record; "
                              f"{rule.op} on the values of an array or map is not supported with 'budget'")
        if isinstance(t, Union):
            if not any(b.kind == "null" for b in t.branches):
                raise PolicyError(f"{where}: with 'budget' a {rule.op} union field needs a null branch "
                                  "(a suppressed value is written as null)")
            branches = [
                Keep(b) if b.kind == "null" else self.apply(rule.operator, rule, b, path, domain, decode=True)
                for b in t.branches
            ]
            if not self.dp_suppressed:
                return self.union(t, branches)
            props: dict[str, Any] = {}
            for br in branches:
                if isinstance(br, Apply):
                    props.update(br.props)
            return Apply(t, t, _to_null, rule.op, path, False, False, dict(rule.params), props)
        node = self.apply(rule.operator, rule, t, path, domain, decode=True)
        assert isinstance(node, Apply)
        node.out = Union("union", branches=[Primitive("null"), node.out])
        if self.dp_suppressed:
            node.fn, node.decode = _to_null, False
        return node

    def map_keys(self, rule: Rule, path: str, domain: str) -> Node:
        """The rule applied to the keys of a map it governs: keys are data too.

        ``keep`` keeps them; an operator must turn a string into a string (``token``,
        ``encrypt_deterministic``, ``mask``, string ``generalize``); anything else is
        refused, as is ``redact`` with a constant (every key would become the same one).
        ``drop`` and ``redact`` to null never get here: they take the whole map.
        """
        if rule.op == "keep":
            return Keep(_STRING)
        where = f"audience {self.audience.name!r}, field {path!r} (map keys), tag {rule.tag!r}"
        if rule.op in ("drop", "redact"):
            raise PolicyError(
                f"{where}: {rule.op} cannot apply to the keys alone (redact with a constant would give "
                "every key the same value); drop or redact the whole map, or classify its keys with "
                f"\"{KEY_TAGS_HINT}\""
            )
        try:
            out = rule.operator.output_type(rule.params, _STRING)
        except OperatorError as exc:
            raise PolicyError(
                f"{where}: {exc}; map keys are strings: use an operator for strings, or classify "
                f"the keys with \"{KEY_TAGS_HINT}\""
            ) from None
        if out is None or out.kind != "string":
            raise PolicyError(f"{where}: {rule.op} does not turn a string key into a string")
        return self.apply(rule.operator, rule, _STRING, path + "{}<key>", domain, decode=True)

    def apply(self, op: Operator, rule: Rule, t: AvroType, path: str, domain: str, decode: bool) -> Node:
        where = f"audience {self.audience.name!r}, field {path!r}, tag {rule.tag!r}"
        try:
            out = op.output_type(rule.params, t)
            fn = op.bind_checked(
                rule.params, t, OpContext(
                    self.audience.name, domain, path, self.keys, self.audience.shared_domains, self.erasure
                ),
            )
        except OperatorError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        assert out is not None
        if op.needs_subject:
            self.subject_needed = True
            want = rule.params.get("subject_field")
            if want is not None and not any(f.name == want for f in self.root.fields):
                raise PolicyError(f"{where}: subject_field {want!r} is not a top-level field")
        self.transforms[op.name] = self.transforms.get(op.name, 0) + 1
        props = dict(op.field_props(rule.params, t))
        return Apply(
            t, out, fn, op.name, path, op.needs_subject, decode, dict(rule.params), props, domain if op.needs_keys else ""
        )


_STRING = Primitive("string")


_KEEP = Rule("<untagged>", "keep", {}, get_operator("keep"))

_merge = merge_tags


def _to_null(_value: Any) -> None:
    return None


def dp_cost(root: Node, audience: str) -> Cost:
    """What one record's DP releases cost: the sum over DP fields (several noised fields
    of one record are several releases), the largest branch of a union (one branch per
    value), each field once.  A DP value that can repeat within a record -- inside an
    array or a map, or in a record that contains itself -- is refused: its cost would
    depend on the record."""
    zero = Cost(0.0, 0.0, 0.0)

    def walk(n: Node, path: tuple[int, ...], repeated: bool) -> Cost:
        if isinstance(n, Apply):
            if n.op not in DP_OPERATORS:
                return zero
            if repeated:
                raise PolicyError(
                    f"audience {audience!r}, field {n.path!r}: a budget accounts a fixed number of releases "
                    f"per record; {n.op} inside an array, a map or a recursive record is not supported with 'budget'"
                )
            params = n.params or {}
            rho = (n.props.get(DP_PROP) or {}).get("rho")
            return Cost(float(params["epsilon"]), float(params.get("delta", 0.0)), None if rho is None else float(rho))
        if isinstance(n, RecordNode):
            if id(n) in path:  # recursion: the record can occur any number of times
                dp = _dp_apply_in(n, set())
                if dp is not None:
                    walk(dp, path, True)  # raises
                return zero
            total = zero
            for _, c in n.fields:
                total = total + walk(c, (*path, id(n)), repeated)
            return total
        if isinstance(n, (ArrayNode, MapNode)):
            inner = [n.items] if isinstance(n, ArrayNode) else [n.values, n.keys]
            return _cost_max([walk(c, path, True) for c in inner])
        if isinstance(n, UnionNode):
            return _cost_max([walk(b, path, repeated) for b in n.branches])
        return zero

    return walk(root, (), False)


def _dp_apply_in(n: Node, seen: set[int]) -> Apply | None:
    """A DP :class:`Apply` anywhere under ``n`` (following recursion once), or None."""
    if id(n) in seen:
        return None
    seen.add(id(n))
    if isinstance(n, Apply):
        return n if n.op in DP_OPERATORS else None
    children: list[Node] = []
    if isinstance(n, RecordNode):
        children = [c for _, c in n.fields]
    elif isinstance(n, ArrayNode):
        children = [n.items]
    elif isinstance(n, MapNode):
        children = [n.values, n.keys]
    elif isinstance(n, UnionNode):
        children = n.branches
    for c in children:
        hit = _dp_apply_in(c, seen)
        if hit is not None:
            return hit
    return None


def _cost_max(costs: list[Cost]) -> Cost:
    """A cost at least as large as each of ``costs`` (component-wise)."""
    if not costs:
        return Cost(0.0, 0.0, 0.0)
    return Cost(max(c.epsilon for c in costs), max(c.delta for c in costs), max(c.zcdp for c in costs))


def subject_of(schema: AvroType, audience: Audience) -> Field | None:
    """The top-level field naming the data subject of ``audience``'s records, as
    ``date_shift`` finds it: the audience's ``subject:`` (or a ``date_shift`` rule's
    ``subject_field``), else the field marked ``"streamproc.subject": true``.  ``None``
    when neither names a scalar top-level field of this schema."""
    if not isinstance(schema, Record):
        return None
    names = {audience.subject} - {None}
    names |= {r.params.get("subject_field") for r in audience.rules if r.operator.needs_subject} - {None}
    if len(names) > 1:
        return None
    f = next((f for f in schema.fields if f.name in names), None) if names else subject_field(schema)
    if f is None:
        return None
    st = f.type
    if isinstance(st, Union) and st.nullable_of is not None:
        st = st.nullable_of
    return f if st.kind in ("string", "bytes", "int", "long", "fixed") else None


def build_plan(
    schema: AvroType,
    audience: Audience,
    keys: PseudonymKeys | None,
    erasure: SubjectKeyTable | None = None,
    *,
    dp_suppressed: bool = False,
) -> Plan:
    """The plan of ``audience`` for records of ``schema``; ``erasure`` is the subject-key
    table that ``erasable`` rules bind to (without it such a rule is a policy error: fail
    closed).

    With an audience ``budget:`` every DP field's output is nullable and the plan carries
    the cost of one record's releases (:attr:`Plan.dp_cost`); ``dp_suppressed=True``
    builds the variant for a subject whose budget is spent: the same output schema, every
    DP field null (the pipeline picks the variant per record).
    """
    if not isinstance(schema, Record):
        raise PolicyError("streamproc processes record schemas only")
    b = _Builder(audience, keys, schema, erasure, dp_suppressed)
    root = b.record(schema, "")
    subject = None
    if b.subject_needed:
        explicit = {
            r.params.get("subject_field") for r in audience.rules if r.operator.needs_subject
        } - {None}
        if len(explicit) > 1:
            raise PolicyError(f"audience {audience.name!r}: date_shift rules name different subject fields")
        if explicit:
            name = explicit.pop()
            subject = next(f for f in schema.fields if f.name == name)
        else:
            subject = subject_field(schema)
        if subject is None:
            raise PolicyError(
                f"audience {audience.name!r}, schema {schema.fullname}: date_shift needs a subject "
                "(mark a top-level field with \"streamproc.subject\": true or set subject_field)"
            )
        st = subject.type
        if isinstance(st, Union) and st.nullable_of is not None:
            st = st.nullable_of
        if st.kind not in ("string", "bytes", "int", "long", "fixed"):
            raise PolicyError(f"schema {schema.fullname}: subject field {subject.name!r} must be a scalar")
    if audience.risk is not None and audience.risk.action is not None:
        root = _enforceable(root, schema, audience)
    try:
        out_schema = output_schema(schema, root)
    except SchemaError as exc:
        raise PolicyError(f"audience {audience.name!r}, schema {schema.fullname}: {exc}") from None
    cost = None
    if audience.budget is not None:
        cost = dp_cost(root, audience.name)
        if not Accountant(audience.budget).fits(Cost(0.0, 0.0, 0.0), cost):
            # Each rule fits the budget (checked with the policy), but this schema's DP
            # fields together do not: no record of it could ever be released.
            raise PolicyError(
                f"audience {audience.name!r}, schema {schema.fullname}: one record's DP fields cost "
                f"epsilon {cost.epsilon:g}, more than the whole budget {audience.budget.epsilon:g}"
            )
    return Plan(audience.name, root, out_schema, subject, b.transforms, cost)


# -- risk enforcement (see streamproc.pipeline.risk) -------------------------------------------

RISK_PROP = "streamproc.risk"
"""Field property of a quasi-identifier under enforcement: ``{k, action}`` -- a subscriber
knows the value may be null (suppressed) or coarser than the rule says (generalized)."""

_QI_KINDS = frozenset({"string", "bytes", "int", "long", "float", "double", "boolean", "enum", "fixed"})


def _identity(v: Any) -> Any:
    return v


def quasi_identifier_fields(schema: Record, tags: tuple[str, ...]) -> list[Field]:
    """The top-level fields carrying one of ``tags`` (the values risk is measured on)."""
    wanted = set(tags)
    return [f for f in schema.fields if not wanted.isdisjoint(f.tags)]


def scalar_of(t: AvroType) -> AvroType:
    """The non-null branch of ``["null", T]``, else ``t``."""
    if isinstance(t, Union) and t.nullable_of is not None:
        return t.nullable_of
    return t


def _enforceable(root: Node, schema: Record, audience: Audience) -> Node:
    """Make every quasi-identifier field of the output nullable, so enforcement can
    suppress it, and check each ladder step against the field's output type.

    A field the audience drops stays dropped.  A transformed scalar gets a ``["null", T]``
    output (the operator's value goes in the second branch); a kept scalar becomes an
    identity :class:`Apply` with that output; an output that already has a null branch is
    left as is.  Anything else (a record, array or map) cannot be suppressed as one value
    and is refused: quasi-identifiers are scalar top-level fields.
    """
    risk = audience.risk
    assert risk is not None and risk.action is not None
    qi = set(risk.quasi_identifiers)
    if isinstance(root, Keep):
        root = RecordNode(schema, [(f, Keep(f.type)) for f in schema.fields])
    assert isinstance(root, RecordNode)
    ladder = dict(audience.risk_ladder)
    prop = {"k": risk.k, "action": risk.action}
    fields: list[tuple[Field, Node]] = []
    for f, node in root.fields:
        if qi.isdisjoint(f.tags) or isinstance(node, Drop):
            fields.append((f, node))
            continue
        where = f"audience {audience.name!r}, field {f.name!r} (quasi-identifier)"
        out = node_out_type(node)
        assert out is not None
        base = scalar_of(out)
        if base.kind not in _QI_KINDS or (isinstance(out, Union) and out.nullable_of is None):
            raise PolicyError(
                f"{where}: risk.action needs a scalar or [\"null\", scalar] field, not {out.kind}; "
                "quasi-identifiers are scalar top-level fields"
            )
        nullable = Union("union", branches=[Primitive("null"), base])
        if isinstance(node, Apply) and not isinstance(out, Union):
            node.out = nullable
        elif isinstance(node, Keep) and not isinstance(out, Union):
            node = Apply(f.type, nullable, _identity, "", f.name, False, True)
        if isinstance(node, Apply):
            node.props[RISK_PROP] = prop
        for tag in f.tags:
            for level, step in enumerate(ladder.get(tag, ()), 1):
                try:
                    got = step.operator.output_type(step.params, base)
                except OperatorError as exc:
                    raise PolicyError(f"{where}: risk.ladder.{tag} level {level}: {exc}") from None
                if got is None or avro.canonical_json(avro.to_json(got)) != avro.canonical_json(avro.to_json(base)):
                    raise PolicyError(
                        f"{where}: risk.ladder.{tag} level {level} ({step.op}) turns {base.kind} into "
                        f"{'nothing' if got is None else got.kind}; a ladder step keeps the type"
                    )
        fields.append((f, node))
    root.fields = fields
    return root


# -- output schema --------------------------------------------------------------------------


def node_out_type(n: Node) -> AvroType | None:
    if isinstance(n, Keep):
        return n.t
    if isinstance(n, Drop):
        return None
    if isinstance(n, Apply):
        return n.out
    if isinstance(n, RecordNode):
        if n.out is None:
            r = n.t
            assert isinstance(r, Record)
            n.out = Record("record", dict(r.props), r.name, r.namespace, [])
            for f, child in n.fields:
                ot = node_out_type(child)
                if ot is None:
                    continue
                props = dict(f.props)
                if not isinstance(child, Keep):
                    # Only operators applied to this field's own values: a container's
                    # inner fields carry their own property.
                    ops = sorted(_ops_in(child, into_records=False))
                    if ops:
                        props[TRANSFORM_PROP] = ops[0] if len(ops) == 1 else ops
                    props.update(_props_in(child))
                    _fix_default(props, ot)
                n.out.fields.append(Field(f.name, ot, props))
        return n.out
    if isinstance(n, ArrayNode):
        it = node_out_type(n.items)
        assert it is not None
        return Array("array", dict(n.t.props), it)
    if isinstance(n, MapNode):
        vt = node_out_type(n.values)
        assert vt is not None
        return Map("map", dict(n.t.props), vt)
    if isinstance(n, UnionNode):
        if n.out is None:
            uniq: list[AvroType] = []
            keys: list[str] = []
            index_map = []
            for b in n.branches:
                o = node_out_type(b)
                assert o is not None
                k = avro.canonical_json(avro.to_json(o))
                if k not in keys:
                    keys.append(k)
                    uniq.append(o)
                index_map.append(keys.index(k))
            n.index_map = index_map
            n.out = Union("union", branches=uniq)
        return n.out
    raise TypeError(n)


def _ops_in(n: Node, seen: set[int] | None = None, *, into_records: bool = True) -> set[str]:
    seen = set() if seen is None else seen
    if id(n) in seen:
        return set()
    seen.add(id(n))
    if isinstance(n, Apply):
        return {n.op} if n.op else set()  # "": the identity a nullable quasi-identifier needs
    if isinstance(n, RecordNode):
        if not into_records:
            return set()
        return set().union(*(_ops_in(c, seen) for _, c in n.fields))
    if isinstance(n, ArrayNode):
        return _ops_in(n.items, seen, into_records=into_records)
    if isinstance(n, MapNode):
        return _ops_in(n.values, seen, into_records=into_records) | _ops_in(n.keys, seen, into_records=into_records)
    if isinstance(n, UnionNode):
        return set().union(*(_ops_in(b, seen, into_records=into_records) for b in n.branches))
    return set()


def _props_in(n: Node) -> dict[str, Any]:
    """The operator-declared properties of a field's own values (not of inner records)."""
    if isinstance(n, Apply):
        return dict(n.props)
    if isinstance(n, ArrayNode):
        return _props_in(n.items)
    if isinstance(n, MapNode):
        return _props_in(n.values)
    if isinstance(n, UnionNode):
        out: dict[str, Any] = {}
        for b in n.branches:
            out.update(_props_in(b))
        return out
    return {}


def _fix_default(props: dict[str, Any], t_out: AvroType) -> None:
    """A transformed field keeps no default: it may be plaintext or no longer fit the type.

    A nullable output whose first branch is null gets ``default: null`` (schema-evolution
    friendly and reveals nothing), whether or not the input had a default: a field
    redacted to null is documented to carry it; any other default is removed.
    """
    if isinstance(t_out, Union) and t_out.branches and t_out.branches[0].kind == "null":
        props["default"] = None
    else:
        props.pop("default", None)


def output_schema(schema: Record, root: Node) -> Any:
    t = node_out_type(root)
    assert t is not None
    return copy.deepcopy(avro.to_json(t))
