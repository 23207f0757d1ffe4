"""The data map: per source schema and field, what every audience gets, and why.

``streamproc catalog`` renders it for a data catalog and for reviews; ``--diff`` compares
the maps of two policies over the same schemas, which is what a policy pull request
changes.  Each row is built from the compiled plan (:mod:`streamproc.pipeline.lineage`),
not from the policy text, so the map shows what the processor does, strictest-tag and
container rules included.  Plans are compiled with a throw-away random pseudonym key:
the map holds structure only, and building it needs no access to key material.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamproc.crypto.erasure import offline_table
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.pipeline.lineage import FieldTreatment, field_treatments
from streamproc.pipeline.plan import Plan, build_plan
from streamproc.policy.model import Audience, Policy, format_duration_ms
from streamproc.schema.avro import Record
from streamproc.schema.registry import RegisteredSchema

#: Rule parameters the data map lifts into columns of their own (privacy budgets); an
#: audience's ``budget:`` and ``risk:`` (its k over the quasi-identifiers) are shown per audience.
BUDGET_PARAMS = ("k", "epsilon")


class _Throwaway:
    def __init__(self) -> None:
        self._key = os.urandom(32)

    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        return version or 1, self._key


def _retention(ms: int | None) -> str | None:
    return None if ms is None else format_duration_ms(ms)


@dataclass(frozen=True)
class CompiledPlan:
    """One (schema, audience) plan compiled with throw-away keys, and its field rows."""

    schema: Record
    audience: Audience
    plan: Plan | None
    rows: list[FieldTreatment]
    """Every leaf field with what the audience gets (empty when the plan failed)."""
    error: str | None = None
    """Why the plan does not compile (a :class:`PolicyError` message), else None."""


def compiled_plans(policy: Policy, schemas: Sequence[RegisteredSchema]) -> Iterator[CompiledPlan]:
    """Every record schema (by name) x audience (in policy order), compiled as the
    processor compiles it.  The one walk behind the data map and ``policy explain``: what
    they show is what the plan does, strictest-tag and container rules included."""
    keys = PseudonymKeys(_Throwaway(), policy.pseudonym_key or "catalog")
    erasure = offline_table(keys)  # erasable rules bind; no key is ever made
    for rs in sorted(schemas, key=lambda s: s.name):
        node = rs.node
        if not isinstance(node, Record):
            continue
        for aud in policy.audiences.values():
            try:
                plan = build_plan(node, aud, keys, erasure)
            except PolicyError as exc:
                yield CompiledPlan(node, aud, None, [], str(exc))
                continue
            yield CompiledPlan(node, aud, plan, field_treatments(node, plan))


def data_map(
    policy: Policy,
    schemas: Sequence[RegisteredSchema],
    topics: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The data map as a JSON-able dict (``topics``: audience -> its destination topics)."""
    audiences = {
        a.name: {
            "purpose": a.purpose,
            "retention": _retention(a.retention_ms),
            "topics": list((topics or {}).get(a.name, ())),
            "budget": None if a.budget is None else {
                "epsilon": a.budget.epsilon, "window": _retention(round(a.budget.window_s * 1000)), "delta": a.budget.delta,
            },
            "risk": None if a.risk is None else {
                "k": a.risk.k, "l": a.risk.l, "quasi_identifiers": list(a.risk.quasi_identifiers),
                **({"action": a.risk.action} if a.risk.action else {}),  # enforced: outputs change
                **({"hold_max_records": a.risk.hold_max} if a.risk.action == "hold" else {}),
            },
        }
        for a in policy.audiences.values()
    }
    out_schemas: dict[str, Any] = {}
    for c in compiled_plans(policy, schemas):
        fields: dict[str, Any] = out_schemas.setdefault(c.schema.fullname, {"fields": {}})["fields"]
        aud = c.audience
        if c.error is not None:
            fields.setdefault("<plan>", {"tags": [], "audiences": {}})["audiences"][aud.name] = {
                "operation": "error",
                "error": c.error,
                "output_field": None,
            }
            continue
        for t in c.rows:
            entry = fields.setdefault(t.path, {"tags": list(t.tags), "audiences": {}})
            cell: dict[str, Any] = {
                "operation": t.operation,
                "output_field": t.output_field,
                "purpose": aud.purpose,
                "retention": _retention(aud.retention_ms),
            }
            for p in BUDGET_PARAMS:
                values = [u.params[p] for u in t.ops if p in u.params]
                if values:
                    cell[p] = values[0]
            entry["audiences"][aud.name] = cell
    return {
        "policy": {"name": policy.name, "version": policy.version},
        "dead_letter": {"retention": _retention(policy.dead_letter_retention_ms)},
        "audiences": audiences,
        "schemas": out_schemas,
    }


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(dm: Mapping[str, Any]) -> str:
    pol = dm["policy"]
    lines = [f"# Data map: {pol['name']} ({pol['version']})", "", "## Audiences", ""]
    lines += ["| audience | purpose | retention | topics | budget | risk |", "|---|---|---|---|---|---|"]
    for name, a in dm["audiences"].items():
        b, r = a.get("budget"), a.get("risk")
        budget = "-" if b is None else f"epsilon {b['epsilon']} per {b['window']}" + (f", delta {b['delta']}" if b["delta"] else "")
        risk = "-" if r is None else f"k {r['k']}" + (f", l {r['l']}" if r["l"] else "") + f" over {', '.join(r['quasi_identifiers'])}"
        if r is not None and r.get("action"):
            risk += f", enforced ({r['action']})"
            if r.get("hold_max_records"):
                risk += f", at most {r['hold_max_records']} held"
        lines.append(
            f"| {name} | {_cell(a['purpose'])} | {_cell(a['retention'])} | {_cell(', '.join(a['topics']))} | "
            f"{_cell(budget)} | {_cell(risk)} |"
        )
    lines += ["", f"Dead-letter topics: retention {_cell(dm['dead_letter']['retention'])}."]
    for schema, s in dm["schemas"].items():
        lines += ["", f"## {schema}", ""]
        lines += [
            "| field | tags | audience | operation | output field | purpose | retention | k | epsilon |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for path, f in s["fields"].items():
            for aud, c in f["audiences"].items():
                lines.append(
                    f"| {_cell(path)} | {_cell(', '.join(f['tags']))} | {aud} | {_cell(c['operation'])} | "
                    f"{_cell(c['output_field'])} | {_cell(c.get('purpose'))} | {_cell(c.get('retention'))} | "
                    f"{_cell(c.get('k'))} | {_cell(c.get('epsilon'))} |"
                )
    return "\n".join(lines) + "\n"


#: Per-field attributes compared by the diff (purpose and retention are compared once per audience).
_FIELD_ATTRS = ("operation", "output_field", "k", "epsilon")


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What changes from ``old`` to ``new``: one dict per changed attribute, in a stable order.

    Each change names ``schema`` and ``field`` (None for audience-level changes),
    ``audience`` (None for the dead-letter retention), ``attribute``, ``before`` and
    ``after`` (None where the thing does not exist on that side).
    """
    changes: list[dict[str, Any]] = []

    def add(schema: str | None, field: str | None, audience: str | None, attr: str, before: Any, after: Any) -> None:
        if before != after:
            changes.append({"schema": schema, "field": field, "audience": audience, "attribute": attr, "before": before, "after": after})

    add(None, None, None, "dead_letter.retention", old["dead_letter"]["retention"], new["dead_letter"]["retention"])
    for aud in _union(old["audiences"], new["audiences"]):
        a, b = old["audiences"].get(aud), new["audiences"].get(aud)
        if a is None or b is None:
            add(None, None, aud, "audience", None if a is None else "present", None if b is None else "present")
            continue
        for attr in ("purpose", "retention", "budget", "risk"):
            add(None, None, aud, attr, a.get(attr), b.get(attr))
    for schema in _union(old["schemas"], new["schemas"]):
        fo = old["schemas"].get(schema, {}).get("fields", {})
        fn = new["schemas"].get(schema, {}).get("fields", {})
        for path in _union(fo, fn):
            ao = fo.get(path, {}).get("audiences", {})
            an = fn.get(path, {}).get("audiences", {})
            for aud in _union(ao, an):
                co, cn = ao.get(aud, {}), an.get(aud, {})
                for attr in _FIELD_ATTRS:
                    add(schema, path, aud, attr, co.get(attr), cn.get(attr))
    return changes


def _union(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))


def render_diff_markdown(changes: Sequence[Mapping[str, Any]]) -> str:
    if not changes:
        return "No change to the data map.\n"
    lines = ["| schema | field | audience | attribute | before | after |", "|---|---|---|---|---|---|"]
    for c in changes:
        lines.append(
            f"| {_cell(c['schema'])} | {_cell(c['field'])} | {_cell(c['audience'])} | {c['attribute']} | "
            f"{_cell(c['before'])} | {_cell(c['after'])} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["CompiledPlan", "compiled_plans", "data_map", "diff", "render_diff_markdown", "render_markdown"]
