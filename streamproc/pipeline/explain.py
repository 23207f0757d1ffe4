"""``streamproc policy explain``: what each audience receives, in plain words and numbers.

A privacy officer signs off a policy, not a YAML file: per audience its purpose and legal
basis, retention, subject field, privacy budget and re-identification target, and per
tag (or, with schemas, per field) what the audience receives -- a per-audience or shared
pseudonym, a ciphertext only the audience's key can reverse (and whether ``forget``
can shred it), a masked or generalized value, or a noised one with the noise's size.

The numbers are derived, not restated:

* ``dp_noise``: the sensitivity is ``hi - lo`` of the declared bounds (one subject's value
  may be anything within them); the noise scale is the one OpenDP calibrates for the rule
  (:func:`streamproc.operators.dp.calibrate`, the same the worker samples with); the
  expected absolute error and the standard deviation of the noise follow from the
  mechanism: continuous Laplace ``b`` gives ``E|Z| = b`` and ``sd = b sqrt 2``; the discrete
  Laplace of integer fields (``P(k) ~ exp(-|k|/b)``, ``a = e^(-1/b)``) gives
  ``E|Z| = 2a/(1-a^2)`` and ``var = 2a/(1-a)^2``; a Gaussian ``sigma`` gives
  ``E|Z| = sigma sqrt(2/pi)`` and ``sd = sigma`` (the discrete Gaussian of integer fields
  is summed exactly when sigma is small, where it differs).
* ``randomized_response``: the probability the true value is reported,
  ``e^E / (e^E + k - 1)`` for k possible values.
* budgets: how many records' DP releases fit one subject's budget per window, by the
  accountant's own rule (basic composition, or zCDP when the budget has a delta).

With schemas, every field row comes from the compiled plan (:func:`~streamproc.pipeline.
catalog.compiled_plans`, the walk the data map uses), so the explanation cannot describe a
transformation the processor does not do.  No key material is involved: plans compile
with throw-away keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from streamproc.operators.base import OperatorError
from streamproc.operators.dp import DP_PROP, calibrate, dp_description, keep_probability
from streamproc.pipeline.catalog import compiled_plans
from streamproc.pipeline.lineage import OpUse
from streamproc.pipeline.plan import subject_of
from streamproc.policy.model import DP_OPERATORS, Audience, Policy, Rule, format_duration_ms
from streamproc.privacy.budget import Accountant, Budget, Cost
from streamproc.schema.avro import Primitive
from streamproc.schema.registry import RegisteredSchema

#: Discrete Gaussians with sigma below this are summed exactly; above it they equal the
#: continuous one to far below the precision printed (the difference decays like
#: ``exp(-2 pi^2 sigma^2)``).
_EXACT_SIGMA = 50.0
#: Releases per window are searched up to this many (a budget that allows more is
#: reported as "more than").
_MAX_RELEASES = 10**9


# -- numbers ---------------------------------------------------------------------------------


def noise_error(mechanism: str, scale: float, integer: bool) -> tuple[float, float]:
    """(expected absolute error, standard deviation) of one noise draw of ``mechanism`` at ``scale``."""
    if mechanism in ("laplace", "geometric"):
        if not integer:
            return scale, scale * math.sqrt(2.0)
        a = math.exp(-1.0 / scale)
        return 2 * a / (1 - a * a), math.sqrt(2 * a) / (1 - a)
    if mechanism != "gaussian":
        raise ValueError(f"unknown mechanism {mechanism!r}")
    if integer and scale < _EXACT_SIGMA:
        span = math.ceil(scale * 40) + 1
        weights = [(k, math.exp(-(k * k) / (2 * scale * scale))) for k in range(-span, span + 1)]
        total = sum(w for _, w in weights)
        mad = sum(abs(k) * w for k, w in weights) / total
        var = sum(k * k * w for k, w in weights) / total
        return mad, math.sqrt(var)
    return scale * math.sqrt(2 / math.pi), scale


def releases_per_window(budget: Budget, cost: Cost) -> int | None:
    """How many releases costing ``cost`` fit one subject's ``budget`` in one window
    (:meth:`Accountant.fits`: basic composition, or zCDP with a budget delta); None when
    the cost is nothing (no DP field)."""
    if cost.epsilon <= 0 and cost.delta <= 0 and cost.zcdp <= 0:
        return None
    acc = Accountant(budget)
    zero = Cost(0.0, 0.0, 0.0)

    def fits(n: int) -> bool:
        return acc.fits(zero, Cost(n * cost.epsilon, n * cost.delta, n * cost.zcdp))

    lo, hi = 0, 1
    while fits(hi):  # exponential search for an upper bound, then bisect
        lo, hi = hi, hi * 2
        if hi > _MAX_RELEASES:
            return _MAX_RELEASES
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _num(x: float) -> str:
    """A number as a person reads it: 6 significant digits, no exponent for ordinary sizes."""
    if x == 0:
        return "0"
    if 1e-4 <= abs(x) < 1e9:
        text = f"{x:.6g}"
        return text if "e" not in text else f"{x:.6f}".rstrip("0").rstrip(".")
    return f"{x:.4g}"


# -- rules in plain words --------------------------------------------------------------------


def _dp_noise(params: Mapping[str, Any], props: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    lo, hi = params["bounds"]
    mech = str(params["mechanism"])
    # A compiled field knows its kind; a tag alone does not: geometric is for integers
    # only, the other mechanisms are described as on a floating-point field (on an
    # integer field their noise is the discrete counterpart, of nearly the same size).
    integer = kind in ("int", "long") if kind else mech == "geometric"
    desc = dict(props.get(DP_PROP) or {}) if props else {}
    if "scale" not in desc:
        # Calibrated for the type the bounds allow: the scale OpenDP finds is the same.
        t = Primitive("long" if all(isinstance(x, int) for x in (lo, hi)) else "double")
        try:
            desc = dp_description(params, t)
        except OperatorError as exc:
            return {"text": f"noised ({mech}); cannot calibrate: {exc}"}
    scale = float(desc["scale"])
    sensitivity = hi - lo
    mad, sd = noise_error(mech, scale, integer)
    out: dict[str, Any] = {
        "mechanism": mech,
        "epsilon": params["epsilon"],
        **({"delta": params["delta"]} if "delta" in params else {}),
        "bounds": [lo, hi],
        "sensitivity": sensitivity,
        "scale": scale,
        "integer": integer,
        "expected_abs_error": mad,
        "std_dev": sd,
    }
    if desc.get("rho") is not None:
        out["rho"] = desc["rho"]
    name = {
        "laplace": "discrete Laplace" if integer else "Laplace",
        "geometric": "geometric (discrete Laplace)",
        "gaussian": "discrete Gaussian" if integer else "Gaussian",
    }[mech]
    scale_name = "sigma" if mech == "gaussian" else "scale"
    guarantee = f"epsilon {_num(float(params['epsilon']))}" + (
        f", delta {_num(float(params['delta']))}" if "delta" in params else ""
    )
    out["text"] = (
        f"a noised value: clamped to [{_num(lo)}, {_num(hi)}] (sensitivity {_num(sensitivity)}), then "
        f"{name} noise with {scale_name} {_num(scale)} ({guarantee} per release"
        + (f"; zCDP rho {_num(float(desc['rho']))}" if desc.get("rho") is not None else "")
        + f"): expected absolute error {_num(mad)}, standard deviation {_num(sd)}"
        + ("; integers stay integers" if integer else "")
        + ("" if kind or integer else " (on an integer field the noise is discrete, of about the same size)")
        + ". Values outside the bounds are clamped first (sums and means of such values are biased)"
    )
    return out


def _randomized_response(params: Mapping[str, Any], props: Mapping[str, Any] | None) -> dict[str, Any]:
    eps = float(params["epsilon"])
    desc = dict(props.get(DP_PROP) or {}) if props else {}
    if "keep_probability" in desc:
        p = float(desc["keep_probability"])
        k = round(1 + (math.exp(eps) * (1 - p) / p))  # from p = e^E / (e^E + k - 1)
        other = (1 - p) / (k - 1)
        return {
            "epsilon": params["epsilon"], "values": k, "keep_probability": p, "other_probability": other,
            "text": (
                f"randomized response over {k} values (epsilon {_num(eps)} per release): the true value is "
                f"reported with probability {_num(p)}, each other value with {_num(other)}"
            ),
        }
    p2 = keep_probability(eps, 2)
    return {
        "epsilon": params["epsilon"], "keep_probability_boolean": p2,
        "text": (
            f"randomized response (epsilon {_num(eps)} per release): the true value is reported with "
            f"probability {_num(p2)} for a boolean, e^{_num(eps)} / (e^{_num(eps)} + k - 1) for an enum of k symbols"
        ),
    }


def _domain_words(policy: Policy, audience: Audience, domain: str) -> str:
    shared = policy.shared_domains.get(domain)
    if shared and audience.name in shared:
        others = [a for a in shared if a != audience.name]
        return (f"in the shared domain {domain!r} (keys.shared_domains): equal values give equal outputs for "
                f"{', '.join(others)} too, so these audiences can join on it")
    return f"in domain {domain!r} with this audience's own key: unlinkable to any other audience's outputs"


def _generalize(params: Mapping[str, Any]) -> str:
    if "to" in params:
        return f"generalized: dates and timestamps truncated to the {params['to']} (UTC)"
    if "bucket" in params:
        return f"generalized: numbers floored to a multiple of {_num(params['bucket'])}"
    if "prefix" in params:
        return f"generalized: strings cut to their first {params['prefix']} characters"
    if "until" in params:
        return f"generalized: strings cut before the first {params['until']!r}"
    if "cidr" in params:
        v6 = f", IPv6 to /{params['cidr6']}" if "cidr6" in params else ""
        return f"generalized: IP addresses to their network, IPv4 /{params['cidr']}{v6}"
    return "generalized"


def _mask(params: Mapping[str, Any]) -> str:
    first, last = int(params.get("keep_first", 0)), int(params.get("keep_last", 0))
    char = params.get("char", "*")
    shown = [f"the first {first}" if first else "", f"the last {last}" if last else ""]
    shown_text = " and ".join(x for x in shown if x) or "no"
    text = f"masked: {shown_text} characters shown, the rest replaced by {char!r} (at least half always masked)"
    if params.get("preserve"):
        text += f"; separators {params['preserve']!r} kept"
    if params.get("fixed_length"):
        text += f"; always {params['fixed_length']} characters long"
    return text + "; numbers become strings"


def describe(
    policy: Policy,
    audience: Audience,
    op: str,
    params: Mapping[str, Any],
    *,
    domain: str | None = None,
    props: Mapping[str, Any] | None = None,
    kind: str = "",
) -> dict[str, Any]:
    """One operation in plain words (``text``) with its parameters and derived numbers.

    ``domain``, ``props`` and ``kind`` come from a compiled field (its pseudonym domain,
    declared output properties, value kind); without them (policy-level), the tag's
    rule is described as it would apply.
    """
    out: dict[str, Any] = {"op": op, "params": dict(params)}
    if op == "keep":
        out["text"] = "the value as it is"
    elif op == "drop":
        out["text"] = "nothing: the field is removed from the audience's schema"
    elif op == "redact":
        value = params.get("value")
        out["text"] = "null (the field is made nullable)" if value is None else f"the constant {json.dumps(value)}"
    elif op == "token":
        d = domain or str(params.get("domain") or "<tag or the field's domain hint>")
        out["domain"] = d
        out["shared"] = audience.name in policy.shared_domains.get(d, ())
        out["text"] = f"a pseudonym (keyed HMAC-SHA256 token) {_domain_words(policy, audience, d)}; not reversible"
    elif op == "encrypt_deterministic":
        d = domain or str(params.get("domain") or "<tag or the field's domain hint>")
        out["domain"] = d
        out["erasable"] = params.get("erasable") is True
        if out["erasable"]:
            subject = params.get("subject_field") or audience.subject
            out["text"] = (
                f"a ciphertext (AES-SIV) under the data subject's own key (subject field {subject!r}), "
                f"equal values of one subject equal; reversible only through the audited re-identification "
                f"path by whoever may unwrap this audience's subject keys; erasable: `streamproc forget SUBJECT` "
                f"shreds the subject's keys, so every copy of their values becomes unreadable and their later "
                f"records are withheld from this audience"
            )
        else:
            out["text"] = (
                f"a deterministic ciphertext (AES-SIV) {_domain_words(policy, audience, d)}; reversible only "
                f"through the audited re-identification path by whoever holds this audience's key; not erasable"
            )
    elif op == "mask":
        out["text"] = _mask(params)
    elif op == "generalize":
        out["text"] = _generalize(params)
    elif op == "date_shift":
        named = params.get("subject_field") or audience.subject
        subject = repr(named) if named else "the schema's streamproc.subject field"
        days = params.get("max_days", 30)
        out["text"] = (
            f"dates moved by a keyed per-subject offset of 1 to {days} days either way (subject {subject}): "
            f"intervals between one subject's dates survive, absolute dates do not"
        )
    elif op == "dp_noise":
        out.update(_dp_noise(params, props, kind))
    elif op == "randomized_response":
        out.update(_randomized_response(params, props))
    else:
        out["text"] = op
    if "normalize" in params and op in ("token", "encrypt_deterministic"):
        norm = params["normalize"]
        out["text"] += f"; normalized first ({', '.join(norm) if isinstance(norm, list) else norm})"
    if params.get("on_failure") and op in ("mask", "generalize"):
        out["text"] += f"; a value it cannot transform is {'replaced' if params['on_failure'] == 'redact' else 'quarantined'}"
    return out


def _rule(policy: Policy, audience: Audience, rule: Rule) -> dict[str, Any]:
    d = describe(policy, audience, rule.op, rule.params,
                 domain=str(rule.params.get("domain") or rule.tag) if rule.operator.needs_keys else None)
    if rule.op in ("token", "encrypt_deterministic") and not rule.params.get("domain") and not d.get("erasable"):
        d["text"] += " (a field's streamproc.domain hint names another domain)"
    if audience.budget is not None and rule.op in DP_OPERATORS:
        cost = _rule_cost(rule)
        n = releases_per_window(audience.budget, cost)
        d["releases_per_window_alone"] = n
        d["text"] += f"; alone, {n} releases per subject per {_window(audience.budget)} fit the budget"
    return d


def _rule_cost(rule: Rule) -> Cost:
    rho = None
    if rule.op == "dp_noise" and rule.params.get("mechanism") == "gaussian":
        lo, hi = rule.params["bounds"]
        integer = all(isinstance(x, int) for x in (lo, hi))
        rho = calibrate(rule.params, Primitive("long" if integer else "double")).rho
    return Cost(float(rule.params["epsilon"]), float(rule.params.get("delta", 0.0)), rho)


def _window(b: Budget) -> str:
    return format_duration_ms(round(b.window_s * 1000))


# -- the document ----------------------------------------------------------------------------


def _audience(policy: Policy, a: Audience, topics: Sequence[str]) -> dict[str, Any]:
    purpose = policy.basis_of(a.name)
    out: dict[str, Any] = {
        "description": a.description or None,
        "purpose": a.purpose,
        "legal_basis": None if purpose is None else purpose.basis,
        "retention": None if a.retention_ms is None else format_duration_ms(a.retention_ms),
        "topics": list(topics),
        "subject": a.subject,
        "untagged": a.untagged,
        "record_key": describe(policy, a, a.record_key.op, a.record_key.params,
                               domain=str(a.record_key.params.get("domain") or "record_key")),
        "budget": None,
        "risk": None,
        "tags": {r.tag: _rule(policy, a, r) for r in a.rules},
    }
    if a.budget is not None:
        out["budget"] = {"epsilon": a.budget.epsilon, "delta": a.budget.delta, "window": _window(a.budget)}
    if a.risk is not None:
        r = a.risk
        out["risk"] = {
            "k": r.k, "l": r.l, "sensitive": r.sensitive, "quasi_identifiers": list(r.quasi_identifiers),
            "window": format_duration_ms(round(r.window_s * 1000)), "action": r.action,
            **({"hold": {"max_records": r.hold_max}} if r.action == "hold" else {}),
            "ladder": {tag: [describe(policy, a, s.op, s.params)["text"] for s in steps] for tag, steps in a.risk_ladder},
        }
    return out


def explain(
    policy: Policy,
    schemas: Sequence[RegisteredSchema] = (),
    topics: Mapping[str, Sequence[str]] | None = None,
    audience: str | None = None,
) -> dict[str, Any]:
    """The explanation as a JSON-able dict (``audience``: only that one)."""
    auds = [policy.audience(audience)] if audience else list(policy.audiences.values())
    names = {a.name for a in auds}
    doc: dict[str, Any] = {
        "policy": {"name": policy.name, "version": policy.version},
        "dead_letter_retention": None if policy.dead_letter_retention_ms is None else format_duration_ms(policy.dead_letter_retention_ms),
        "audiences": {a.name: _audience(policy, a, (topics or {}).get(a.name, ())) for a in auds},
        "schemas": {},
    }
    for c in compiled_plans(policy, schemas):
        if c.audience.name not in names:
            continue
        s = doc["schemas"].setdefault(c.schema.fullname, {"audiences": {}, "fields": {}})
        a = c.audience
        if c.error is not None or c.plan is None:
            s["audiences"][a.name] = {"error": c.error}
            continue
        subject = subject_of(c.schema, a)
        entry: dict[str, Any] = {"subject": None if subject is None else subject.name}
        if a.budget is not None and c.plan.dp_cost is not None:
            cost = c.plan.dp_cost
            entry["record_cost"] = {"epsilon": cost.epsilon, "delta": cost.delta, "rho": cost.zcdp}
            entry["releases_per_window"] = releases_per_window(a.budget, cost)
        s["audiences"][a.name] = entry
        for t in c.rows:
            row = s["fields"].setdefault(t.path, {"tags": list(t.tags), "audiences": {}})
            row["audiences"][a.name] = _field(policy, a, t.tags, t.dropped, t.ops)
    return doc


def _field(policy: Policy, a: Audience, tags: tuple[str, ...], dropped: bool, ops: tuple[OpUse, ...]) -> dict[str, Any]:
    untagged = not tags
    if dropped:
        d = describe(policy, a, "drop", {})
    elif not ops:
        d = describe(policy, a, "keep", {})
    else:
        parts = [describe(policy, a, u.op, u.params, domain=u.domain or None, props=u.props, kind=u.kind) for u in ops]
        d = parts[0] if len(parts) == 1 else {"op": " + ".join(p["op"] for p in parts), "steps": parts,
                                               "text": "; then ".join(p["text"] for p in parts)}
    if untagged:
        d = {**d, "untagged": True, "text": f"unclassified field (untagged: {a.untagged}): {d['text']}"}
    return d


# -- text ------------------------------------------------------------------------------------


def render_text(doc: Mapping[str, Any]) -> str:
    p = doc["policy"]
    lines = [f"Policy {p['name']} ({p['version']})"]
    if doc.get("dead_letter_retention"):
        lines.append(f"Dead letters are kept at most {doc['dead_letter_retention']}.")
    for name, a in doc["audiences"].items():
        lines += ["", f"Audience {name}" + (f": {a['description']}" if a.get("description") else "")]
        purpose = a["purpose"] or "not stated"
        if a["legal_basis"]:
            opt = "opt-in: withheld unless the subject granted it" if a["legal_basis"] == "consent" else \
                "opt-out: received until the subject objects"
            purpose += f" (legal basis {a['legal_basis']}; {opt})"
        lines.append(f"  purpose: {purpose}")
        lines.append(f"  retention: {a['retention'] or 'not stated (no retention limit in the policy)'}"
                     + (f"; topics {', '.join(a['topics'])}" if a["topics"] else ""))
        subject = a["subject"] or "the schema's streamproc.subject field, if any"
        lines.append(f"  subject field: {subject}")
        lines.append(f"  unclassified fields: {'kept as they are' if a['untagged'] == 'keep' else 'dropped'}")
        lines.append(f"  record key: {a['record_key']['text']}")
        b = a["budget"]
        if b is None:
            lines.append("  privacy budget: none (DP fields, if any, are released for every record)")
        else:
            delta = f", delta {_num(b['delta'])}" if b["delta"] else ""
            lines.append(f"  privacy budget: epsilon {_num(b['epsilon'])}{delta} per subject per {b['window']}; "
                         "beyond it the subject's DP fields are null")
        r = a["risk"]
        if r is None:
            lines.append("  re-identification risk: no target")
        else:
            target = f"k {r['k']}" + (f", l {r['l']} over {r['sensitive']}" if r["l"] else "")
            how = "measured only (gauges, alert)" if not r["action"] else f"enforced by {r['action']}"
            if r.get("hold"):
                how += (f" (records below k kept back, sealed, until their class reaches k; released suppressed "
                        f"after {r['window']} or beyond {r['hold']['max_records']} held)")
            lines.append(f"  re-identification risk: {target} over {', '.join(r['quasi_identifiers'])} "
                         f"within {r['window']}; {how}")
            for tag, steps in r["ladder"].items():
                for i, s in enumerate(steps, 1):
                    lines.append(f"    {tag} level {i}: {s}")
        lines.append("  per tag:")
        for tag, d in a["tags"].items():
            lines.append(f"    {tag}: {d['text']}")
    for schema, s in doc["schemas"].items():
        lines += ["", f"Schema {schema}"]
        for aud, e in s["audiences"].items():
            if e.get("error"):
                lines.append(f"  {aud}: the plan does not compile: {e['error']}")
                continue
            extra = ""
            if "releases_per_window" in e:
                b = doc["audiences"][aud]["budget"]
                n = e["releases_per_window"]
                extra = (f"; one record's DP fields cost epsilon {_num(e['record_cost']['epsilon'])}: "
                         f"{n} record{'' if n == 1 else 's'} per subject per {b['window']} fit the budget")
            lines.append(f"  {aud}: subject field {e['subject'] or 'none'}{extra}")
        for path, f in s["fields"].items():
            tags = ", ".join(f["tags"]) or "unclassified"
            lines.append(f"  {path} [{tags}]")
            for aud, d in f["audiences"].items():
                lines.append(f"    {aud}: {d['text']}")
    return "\n".join(lines) + "\n"


__all__ = ["describe", "explain", "noise_error", "releases_per_window", "render_text"]
