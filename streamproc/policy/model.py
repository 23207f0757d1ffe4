"""The policy file: audiences, and for each, an operator per tag.

Example (see docs/policy.md for the full reference)::

    name: acme-privacy
    keys:
      pseudonym: pseudonym-master      # secret key that token/encrypt/date_shift derive from
      shared_domains:                  # opt-in: these audiences get equal tokens in 'customer'
        customer: [analytics, fraud]
    defaults:
      untagged: drop                   # data minimization is the default
      record_key: token
    audiences:
      analytics:
        untagged: keep
        tags:
          EMAIL: {op: token, normalize: [lower, strip]}
          CARD_NUMBER: {op: mask, keep_last: 4}
          BIRTH_DATE: {op: generalize, to: year}
          PII: drop

Keys are derived per audience: two audiences get unrelated tokens for the same value
unless ``keys.shared_domains`` names the domain and both audiences (see docs/keys.md).
``date_shift`` moves every date of one subject in one record by one shift: an audience's
``date_shift`` rules share one subject field (``subject:`` at the audience, or the rule's
``subject_field``), one ``domain`` and one ``max_days``.

A field carrying several tags is governed by the *strictest* of the audience's rules for
those tags (:data:`~streamproc.operators.base.STRICTNESS`; between rules of the same
operator, the first in file order); tags the audience does not mention are ignored when
another tag has a rule, and make the field ``drop`` when none has.  The policy version is a hash of its canonical content, so it
changes exactly when the meaning changes, not when comments or formatting do.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamproc.errors import PolicyError
from streamproc.operators import Operator, OperatorError, get_operator
from streamproc.operators.base import ON_FAILURE, strictness
from streamproc.privacy.budget import Budget
from streamproc.privacy.risk import ACTIONS, RiskTarget

RECORD_KEY_MODES = ("keep", "token", "drop")
#: The pseudonym domain of a record-key token or a date_shift rule that names none.
_DEFAULT_DOMAIN = {"token": "record_key", "date_shift": "subject"}


#: Legal bases of a purpose (GDPR art. 6(1)): ``consent`` is opt-in (default deny), the
#: others are opt-out (default allow until the subject objects).
BASES = ("consent", "contract", "legitimate_interest")


@dataclass(frozen=True)
class Purpose:
    """A purpose of processing and its legal basis (``purposes: {name: {basis: ...}}``)."""

    name: str
    basis: str
    description: str = ""

    @property
    def opt_in(self) -> bool:
        """True when the subject must have granted it (``consent``); else allowed until objected."""
        return self.basis == "consent"


@dataclass(frozen=True)
class Rule:
    tag: str
    op: str
    params: Mapping[str, Any]
    operator: Operator = field(repr=False, compare=False)


@dataclass(frozen=True)
class Audience:
    name: str
    untagged: str
    record_key: Rule
    rules: tuple[Rule, ...]
    description: str = ""
    shared_domains: frozenset[str] = frozenset()
    """Pseudonym domains whose keys this audience shares with others (``keys.shared_domains``)."""
    retention_ms: int | None = None
    """The longest this audience's topics may keep a record (``retention: 30d``); None: unstated."""
    purpose: str | None = None
    """What the audience uses the data for (``purpose:``), shown in the data map; with a
    ``purposes:`` section it names one of them, and its legal basis decides whether a
    subject's records reach this audience (:mod:`streamproc.policy.consent`)."""
    subject: str | None = None
    """The top-level field naming the data subject (``subject:``); ``None``: the schema's
    ``streamproc.subject`` hint."""
    budget: Budget | None = None
    """Per-subject privacy budget over the audience's DP rules (``budget:``)."""
    risk: RiskTarget | None = None
    """Re-identification risk target over the audience's outputs (``risk:``)."""
    risk_ladder: tuple[tuple[str, tuple[Rule, ...]], ...] = ()
    """``risk.ladder``: per quasi-identifier tag, the rules ``generalize_more`` applies, one
    level further each, to the value the audience would otherwise receive."""

    def rule_for(self, tags: tuple[str, ...]) -> Rule | None:
        """The strictest rule whose tag the field carries (ties: the first in file order).

        Never the loosest: a field tagged ``PUBLIC`` and ``EMAIL`` (inline, from registry
        metadata or from an enclosing record) gets EMAIL's ``token``, not PUBLIC's ``keep``,
        whatever order the policy lists them in.
        """
        best: Rule | None = None
        for r in self.rules:
            if r.tag in tags and (best is None or strictness(r.op) > strictness(best.op)):
                best = r
        return best


@dataclass(frozen=True)
class Policy:
    name: str
    version: str
    pseudonym_key: str | None
    audiences: Mapping[str, Audience]
    source: str = "<policy>"
    shared_domains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Pseudonym domain -> the audiences that share its keys (explicit opt-in)."""
    dead_letter_retention_ms: int | None = None
    """The longest dead-letter topics may keep a record (``dead_letter: {retention: 7d}``)."""
    purposes: Mapping[str, Purpose] = field(default_factory=dict)
    """``purposes:``: name -> legal basis.  Empty: purposes are labels, nothing is withheld."""

    def basis_of(self, audience: str) -> Purpose | None:
        """The purpose (with its legal basis) an audience's records are evaluated under."""
        name = self.audience(audience).purpose
        return None if name is None else self.purposes.get(name)

    def audience(self, name: str) -> Audience:
        try:
            return self.audiences[name]
        except KeyError:
            raise PolicyError(f"{self.source}: no audience {name!r} (have: {', '.join(self.audiences)})") from None

    @property
    def tags(self) -> set[str]:
        return {r.tag for a in self.audiences.values() for r in a.rules}


def _rule(src: str, audience: str, tag: str, spec: Any, on_failure: str | None = None) -> Rule:
    where = f"{src}: audience {audience!r}, tag {tag!r}"
    if isinstance(spec, str):
        op_name, params = spec, {}
    elif isinstance(spec, Mapping):
        if "op" not in spec:
            raise PolicyError(f"{where}: rule needs 'op' (one of the operators)")
        op_name = spec["op"]
        params = {k: v for k, v in spec.items() if k != "op"}
    else:
        raise PolicyError(f"{where}: rule must be an operator name or a mapping with 'op'")
    try:
        op = get_operator(str(op_name))
        op.validate(params)
    except OperatorError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    if on_failure is not None and "on_failure" in op.params and "on_failure" not in params:
        params = {**params, "on_failure": on_failure}  # defaults.on_failure (no effect where nothing can fail open)
    if op.name == "encrypt_deterministic" and params.get("erasable") is True:
        from streamproc.operators.deterministic import ERASABLE

        op = ERASABLE  # per-subject keys (crypto-shredding); same operator name
    return Rule(tag, op.name, dict(params), op)


def _record_key(src: str, audience: str, spec: Any) -> Rule:
    rule = _rule(src, audience, "<record key>", spec)
    if rule.op not in RECORD_KEY_MODES:
        raise PolicyError(f"{src}: audience {audience!r}: record_key must be one of {RECORD_KEY_MODES}")
    return rule


def parse_policy(raw: Any, source: str = "<policy>") -> Policy:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{source}: a policy is a mapping with 'audiences'")
    unknown = set(raw) - {"name", "keys", "defaults", "audiences", "description", "dead_letter", "purposes"}
    if unknown:
        raise PolicyError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping) or set(defaults) - {"untagged", "record_key", "on_failure"}:
        raise PolicyError(f"{source}: 'defaults' may set only 'untagged', 'record_key' and 'on_failure'")
    on_failure = defaults.get("on_failure")
    if on_failure is not None and on_failure not in ON_FAILURE:
        raise PolicyError(f"{source}: defaults.on_failure must be {' or '.join(ON_FAILURE)}, not {on_failure!r}")
    keys = raw.get("keys") or {}
    if not isinstance(keys, Mapping) or set(keys) - {"pseudonym", "shared_domains"}:
        raise PolicyError(f"{source}: 'keys' may set only 'pseudonym' and 'shared_domains'")
    auds = raw.get("audiences")
    if not isinstance(auds, Mapping) or not auds:
        raise PolicyError(f"{source}: 'audiences' must be a non-empty mapping")
    shared = _shared_domains(source, keys.get("shared_domains"), auds)
    purposes = _purposes(source, raw.get("purposes"))
    audiences: dict[str, Audience] = {}
    needs_keys: Rule | None = None
    needs_keys_where = ""
    for name, spec in auds.items():
        where = f"{source}: audience {name!r}"
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise PolicyError(f"{where}: audience names are letters, digits, '-' and '_'")
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise PolicyError(f"{where}: must be a mapping")
        bad = set(spec) - {
            "untagged", "record_key", "tags", "description", "subject", "retention", "purpose", "budget", "risk",
        }
        if bad:
            raise PolicyError(f"{where}: unknown key(s) {sorted(bad)}")
        untagged = spec.get("untagged", defaults.get("untagged", "drop"))
        if untagged not in ("keep", "drop"):
            raise PolicyError(f"{where}: 'untagged' must be keep or drop, not {untagged!r}")
        tags = spec.get("tags") or {}
        if not isinstance(tags, Mapping):
            raise PolicyError(f"{where}: 'tags' must map tag names to rules")
        rules = _date_shift_rules(where, spec.get("subject"), tuple(_rule(source, name, str(t), r, on_failure) for t, r in tags.items()))
        rules = _erasable_rules(where, spec.get("subject"), rules)
        rk = _record_key(source, name, spec.get("record_key", defaults.get("record_key", "token")))
        mine = frozenset(d for d, members in shared.items() if name in members)
        for r in (*rules, rk):
            d = r.params.get("domain", _DEFAULT_DOMAIN.get(r.op) if r is rk or r.op == "date_shift" else None)
            if r.operator.needs_keys and d in shared and name not in shared[d]:
                raise PolicyError(
                    f"{where}, tag {r.tag!r}: domain {d!r} is shared only by {list(shared[d])}; "
                    f"add {name!r} to keys.shared_domains.{d} or use another domain"
                )
        keyed = next((r for r in (*rules, rk) if r.operator.needs_keys), None)
        if keyed is not None and needs_keys is None:
            needs_keys, needs_keys_where = keyed, f"{where}, tag {keyed.tag!r}"
        purpose = spec.get("purpose")
        if purpose is not None and not (isinstance(purpose, str) and purpose):
            raise PolicyError(f"{where}: 'purpose' is a non-empty string")
        if purposes and purpose not in purposes:
            # Fail closed: an audience outside every purpose would never be withheld.
            raise PolicyError(
                f"{where}: 'purpose' must name one of purposes ({', '.join(purposes)}), "
                f"not {purpose!r}"
            )
        subject = spec.get("subject")
        risk, ladder = _risk(where, spec.get("risk"), source, name)
        audiences[name] = Audience(
            name, untagged, rk, rules, str(spec.get("description", "")), mine,
            parse_duration_ms(spec.get("retention"), f"{where}: retention"), purpose,
            subject=subject if isinstance(subject, str) else None,
            budget=_budget(where, spec.get("budget"), rules), risk=risk, risk_ladder=ladder,
        )
    pseudonym = keys.get("pseudonym")
    if needs_keys is not None and not pseudonym:
        raise PolicyError(
            f"{needs_keys_where}: {needs_keys.op} needs 'keys.pseudonym' "
            "(token, encrypt_deterministic and date_shift derive their keys from it)"
        )
    if purposes and not pseudonym:
        raise PolicyError(
            f"{source}: purposes need 'keys.pseudonym' (the consent table is keyed by subject "
            "tokens derived from it)"
        )
    dead_letter = raw.get("dead_letter") or {}
    if not isinstance(dead_letter, Mapping) or set(dead_letter) - {"retention"}:
        raise PolicyError(f"{source}: 'dead_letter' may set only 'retention'")
    dl_retention = parse_duration_ms(dead_letter.get("retention"), f"{source}: dead_letter.retention")
    canonical = json.dumps(_ordered_tags(raw), sort_keys=True, separators=(",", ":"), default=str)
    version = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return Policy(
        str(raw.get("name", "policy")), version, pseudonym, audiences, source, shared, dl_retention, purposes
    )


def _purposes(source: str, spec: Any) -> dict[str, Purpose]:
    """``purposes:``: name -> ``{basis: consent|contract|legitimate_interest, description}``.

    The basis is stated, never defaulted: which one applies is a legal decision, and
    guessing ``legitimate_interest`` would let records flow that need consent.
    """
    if spec is None:
        return {}
    where = f"{source}: purposes"
    if not isinstance(spec, Mapping) or not spec:
        raise PolicyError(f"{where}: a non-empty mapping of purpose names to {{basis: ...}}")
    out: dict[str, Purpose] = {}
    for name, p in spec.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise PolicyError(f"{where}: purpose names are letters, digits, '-' and '_'")
        if not isinstance(p, Mapping) or set(p) - {"basis", "description"}:
            raise PolicyError(f"{where}.{name}: a mapping with 'basis' (and 'description')")
        basis = p.get("basis")
        if basis not in BASES:
            raise PolicyError(f"{where}.{name}: basis must be one of {', '.join(BASES)}, not {basis!r}")
        out[name] = Purpose(name, str(basis), str(p.get("description", "")))
    return out


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


DP_OPERATORS = ("dp_noise", "randomized_response")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _budget(where: str, spec: Any, rules: tuple[Rule, ...]) -> Budget | None:
    """``budget: {epsilon: 4.0, window: 1d, delta: 1e-6}``: per subject, over any window.

    Refused when it could never be honoured or never matters: an audience without DP
    rules has nothing to account, and a rule whose own epsilon exceeds the budget could
    never release a value.
    """
    if spec is None:
        return None
    where = f"{where}: budget"
    if not isinstance(spec, Mapping) or set(spec) - {"epsilon", "delta", "window"} or "epsilon" not in spec:
        raise PolicyError(f"{where}: a mapping with 'epsilon', 'window' and optionally 'delta'")
    window_ms = parse_duration_ms(spec.get("window"), f"{where}.window")
    if window_ms is None:
        raise PolicyError(f"{where}: 'window' is required (e.g. 1d)")
    eps, delta = spec["epsilon"], spec.get("delta", 0.0)
    if not (_number(eps) and _number(delta)):
        raise PolicyError(f"{where}: epsilon and delta are numbers")
    try:
        budget = Budget(float(eps), window_ms / 1000, float(delta))
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    dp_rules = [r for r in rules if r.op in DP_OPERATORS]
    if not dp_rules:
        raise PolicyError(f"{where}: the audience has no dp_noise or randomized_response rule to account")
    for r in dp_rules:
        if float(r.params["epsilon"]) > budget.epsilon:
            raise PolicyError(f"{where}: tag {r.tag!r} spends epsilon {r.params['epsilon']} per record, "
                              f"more than the whole budget {budget.epsilon}")
    if any(r.params.get("mechanism") == "gaussian" for r in dp_rules) and budget.delta <= 0:
        raise PolicyError(f"{where}: gaussian rules need a budget 'delta' (zCDP composition converts with it)")
    return budget


#: Operators a ``risk.ladder`` step may use: each coarsens the value it is given, needs no
#: key and no subject, and keeps the type (checked when the plan compiles).
LADDER_OPS = ("generalize", "mask", "redact")

def _risk(where: str, spec: Any, source: str = "<policy>", audience: str = "") -> tuple[
    RiskTarget | None, tuple[tuple[str, tuple[Rule, ...]], ...]
]:
    """``risk: {quasi_identifiers: [POSTCODE, BIRTH_DATE, GENDER], k: 5, window: 1h,
    l: 2, sensitive: DIAGNOSIS, max_records: 100000, action: suppress | generalize_more,
    ladder: {POSTCODE: [{op: generalize, prefix: 2}], ...}}``.

    Without ``action`` the audience's risk is measured only.  With ``action`` a record
    whose quasi-identifier tuple is shared by fewer than k records of the window has its
    quasi-identifiers suppressed (null) or, with ``generalize_more``, generalized one
    ladder level further at a time until its class reaches k (and suppressed when even
    the last level does not).  With ``hold`` (and ``hold: {max_records: N}``) the record
    is kept back, sealed, in the hold changelog until its class reaches k in the window,
    and released suppressed when it expires or the hold is full (streamproc.pipeline.hold).
    """
    if spec is None:
        return None, ()
    where = f"{where}: risk"
    allowed = {"quasi_identifiers", "k", "l", "sensitive", "window", "max_records", "action", "ladder", "hold"}
    if not isinstance(spec, Mapping) or set(spec) - allowed:
        raise PolicyError(f"{where}: a mapping with {', '.join(sorted(allowed))}")
    qi = spec.get("quasi_identifiers")
    if not (isinstance(qi, list) and qi and all(isinstance(t, str) and t for t in qi) and len(set(qi)) == len(qi)):
        raise PolicyError(f"{where}: 'quasi_identifiers' is a list of distinct tag names")
    k, l_ = spec.get("k"), spec.get("l")
    sensitive = spec.get("sensitive")
    max_records = spec.get("max_records", 100_000)
    if not (isinstance(k, int) and not isinstance(k, bool)):
        raise PolicyError(f"{where}: 'k' is an integer >= 2")
    if l_ is not None and not (isinstance(l_, int) and not isinstance(l_, bool)):
        raise PolicyError(f"{where}: 'l' is an integer >= 2")
    if sensitive is not None and not (isinstance(sensitive, str) and sensitive):
        raise PolicyError(f"{where}: 'sensitive' names a tag")
    if sensitive in qi:
        raise PolicyError(f"{where}: the sensitive tag cannot also be a quasi-identifier")
    if not (isinstance(max_records, int) and not isinstance(max_records, bool)):
        raise PolicyError(f"{where}: 'max_records' is an integer")
    window_ms = parse_duration_ms(spec.get("window"), f"{where}.window")
    if window_ms is None:
        raise PolicyError(f"{where}: 'window' is required (e.g. 1h)")
    action = spec.get("action")
    if action is not None and action not in ACTIONS:
        raise PolicyError(f"{where}: 'action' is one of {', '.join(ACTIONS)} (or absent: measure only), not {action!r}")
    ladder = _ladder(where, spec.get("ladder"), action, qi, source, audience)
    hold, hold_max = spec.get("hold"), 0
    if action == "hold":
        if not (isinstance(hold, Mapping) and set(hold) == {"max_records"}):
            raise PolicyError(f"{where}: action hold needs 'hold: {{max_records: N}}' (the most records held at once)")
        hold_max = hold["max_records"]
        if not (isinstance(hold_max, int) and not isinstance(hold_max, bool) and 1 <= hold_max <= 1_000_000):
            raise PolicyError(f"{where}: hold.max_records is an integer 1..1000000")
    elif hold is not None:
        raise PolicyError(f"{where}: 'hold' applies only with action: hold")
    try:
        target = RiskTarget(tuple(qi), k, window_ms / 1000, l_, sensitive, max_records, action, hold_max)
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    return target, ladder


def _ladder(
    where: str, spec: Any, action: Any, qi: list[str], source: str, audience: str
) -> tuple[tuple[str, tuple[Rule, ...]], ...]:
    """``ladder: {TAG: [rule, ...]}``: required by ``generalize_more``, refused otherwise.

    Each step is an ordinary rule (validated like any other) of a :data:`LADDER_OPS`
    operator, applied to the value the audience would receive at the level before: it can
    only coarsen what the audience already sees.  That each step keeps the field's type
    is checked when the plan compiles (``policy check``), where types are known.
    """
    if action != "generalize_more":
        if spec is not None:
            raise PolicyError(f"{where}: 'ladder' applies only with action: generalize_more")
        return ()
    if not isinstance(spec, Mapping) or not spec:
        raise PolicyError(f"{where}: generalize_more needs 'ladder': {{TAG: [rule, ...]}} for one or more quasi-identifiers")
    out = []
    for tag, steps in spec.items():
        if tag not in qi:
            raise PolicyError(f"{where}.ladder: {tag!r} is not one of the quasi_identifiers")
        if not isinstance(steps, list) or not steps:
            raise PolicyError(f"{where}.ladder.{tag}: a non-empty list of rules, one per level")
        rules = []
        for i, step in enumerate(steps, 1):
            r = _rule(source, audience, f"{tag} (risk ladder level {i})", step)
            if r.op not in LADDER_OPS:
                raise PolicyError(
                    f"{where}.ladder.{tag}: level {i} uses {r.op!r}; a ladder step is one of "
                    f"{', '.join(LADDER_OPS)} (it coarsens the value, with no key)"
                )
            if r.op == "redact" and r.params.get("value") is None:
                raise PolicyError(
                    f"{where}.ladder.{tag}: level {i}: redact to null is what suppression does; "
                    "give redact a constant 'value' or end the ladder before it"
                )
            rules.append(Rule(tag, r.op, r.params, r.operator))
        out.append((str(tag), tuple(rules)))
    return tuple(out)


def parse_duration_ms(value: Any, where: str) -> int | None:
    """``30d`` -> milliseconds (units ms, s, m, h, d, w); None stays None.

    A retention is a promise to delete, so there is no "forever" spelling: an audience
    that may keep data indefinitely simply states no retention (and the data map says so).
    """
    if value is None:
        return None
    m = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) <= 0:
        raise PolicyError(f"{where}: a positive duration like 30d, 12h or 90m, not {value!r}")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def format_duration_ms(ms: int | None) -> str:
    """The largest whole unit up to days: 2592000000 -> ``30d`` (parses back with :func:`parse_duration_ms`)."""
    if ms is None:
        return "-"
    for unit in ("d", "h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def _shared_domains(source: str, spec: Any, auds: Mapping[Any, Any]) -> dict[str, tuple[str, ...]]:
    """``keys.shared_domains``: domain -> two or more known audiences.

    Sharing is the one way two audiences' outputs become joinable, so it is spelled out
    per domain and per audience; a name that is not an audience is an error, not ignored.
    """
    if spec is None:
        return {}
    where = f"{source}: keys.shared_domains"
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{where}: must map pseudonym domains to lists of audiences")
    out: dict[str, tuple[str, ...]] = {}
    for domain, members in spec.items():
        if not isinstance(domain, str) or not domain:
            raise PolicyError(f"{where}: domain names are non-empty strings")
        if (
            not isinstance(members, list)
            or not all(isinstance(m, str) for m in members)
            or len(set(members)) != len(members)
            or len(members) < 2
        ):
            raise PolicyError(f"{where}.{domain}: a list of two or more distinct audience names")
        unknown = [m for m in members if m not in auds]
        if unknown:
            raise PolicyError(f"{where}.{domain}: unknown audience(s) {unknown} (have: {', '.join(map(str, auds))})")
        out[domain] = tuple(members)
    return out


def _date_shift_rules(where: str, subject: Any, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """One shift per subject and record: an audience's date_shift rules must agree.

    Two dates of one subject shifted by different amounts lose the interval between them
    (a 5-day stay becoming 27 or -12 days), so the subject field, the date-shift domain
    and ``max_days`` are one per audience.  The audience-level ``subject`` is folded into
    each rule as ``subject_field``.
    """
    if subject is not None and not (isinstance(subject, str) and subject):
        raise PolicyError(f"{where}: 'subject' names a top-level field")
    shifts = [r for r in rules if r.op == "date_shift"]
    for param, default in (("domain", None), ("max_days", None)):
        values = {r.params.get(param, default) for r in shifts}
        if len(values) > 1:
            raise PolicyError(
                f"{where}: date_shift rules name different {param} values; one subject's dates "
                "must move by one shift"
            )
    fields = {r.params["subject_field"] for r in shifts if "subject_field" in r.params}
    if subject is not None:
        fields.add(subject)
    if len(fields) > 1:
        raise PolicyError(f"{where}: date_shift rules and 'subject' name different subject fields {sorted(fields)}")
    if subject is None:
        return rules
    return tuple(
        Rule(r.tag, r.op, {**r.params, "subject_field": subject}, r.operator) if r.op == "date_shift" else r
        for r in rules
    )


def erasable(rule: Rule) -> bool:
    """Whether ``rule`` encrypts under per-subject keys (``erasable: true``)."""
    return rule.op == "encrypt_deterministic" and rule.params.get("erasable") is True


def _erasable_rules(where: str, subject: Any, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """``erasable: true`` needs the audience's ``subject:``, folded in as ``subject_field``.

    The key a value is encrypted under is the subject's; a subject found only through a
    schema hint could differ between schemas of one audience, and ``forget SUBJECT`` must
    name exactly what the keys are keyed by, so the audience names it explicitly.
    """
    if not any(erasable(r) for r in rules):
        return rules
    if not isinstance(subject, str) or not subject:
        tag = next(r.tag for r in rules if erasable(r))
        raise PolicyError(
            f"{where}, tag {tag!r}: erasable encrypt_deterministic needs the audience's 'subject:' "
            "(the top-level field naming the data subject whose key encrypts the value)"
        )
    return tuple(Rule(r.tag, r.op, {**r.params, "subject_field": subject}, r.operator) if erasable(r) else r for r in rules)


def _ordered_tags(raw: Mapping[str, Any]) -> Any:
    """The policy with each audience's ``tags`` as a list of pairs: rule order is meaning
    (the first matching rule wins), so it must survive the key sorting of the version hash."""
    auds = raw.get("audiences")
    if not isinstance(auds, Mapping):
        return raw
    out = {}
    for name, spec in auds.items():
        if isinstance(spec, Mapping) and isinstance(spec.get("tags"), Mapping):
            spec = {**spec, "tags": [[str(t), r] for t, r in spec["tags"].items()]}
        out[name] = spec
    return {**raw, "audiences": out}


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{p}: not valid YAML{where}") from None
    return parse_policy(raw, str(p))
