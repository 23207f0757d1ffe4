"""``streamproc policy check``: lint schemas against a policy, for CI.

It fails (non-zero exit) when:

* a field of a schema is neither classified nor explicitly public (no ``confluent:tags``);
* a tag used by a schema has no rule for some audience (that audience would silently
  lose the field: say so explicitly with ``drop``);
* a rule cannot apply to the field's type (``mask`` on a date, ``date_shift`` without a
  subject field, ...), found by compiling every (schema, audience) plan;
* an audience derives keys in a domain that ``keys.shared_domains`` shares between other
  audiences (its tokens would silently not join theirs; list it or rename the domain).

Map keys are checked like fields: keys that are neither classified (the map field's
tags, or its ``streamproc.key_tags`` hint) nor explicitly public are an error, and a rule
that cannot apply to string keys is an error of the compiled plan.

It warns when a field carries several tags whose rules disagree for an audience (the
strictest rule wins), and when a rule's tag is used by no schema.

Plans are compiled with a throw-away random pseudonym key, so the linter needs no access
to real key material.

It lives in the pipeline layer, not beside the policy model, because it compiles plans:
the policy layer sits below the pipeline and never imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from streamproc.crypto.erasure import offline_table
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.pipeline.plan import build_plan, subject_of
from streamproc.policy.model import Policy
from streamproc.schema.annotations import leaves
from streamproc.schema.avro import Record
from streamproc.schema.registry import RegisteredSchema


class _RecordingKeys(PseudonymKeys):
    """Throw-away keys that remember every (domain, key audience) a plan derives."""

    def __init__(self, source: _ThrowawySecrets, secret_id: str) -> None:
        super().__init__(source, secret_id)
        self.derived: set[tuple[str, str | None]] = set()

    def token_key(self, domain: str, version: int | None = None, *, audience: str | None) -> tuple[int, bytes]:
        self.derived.add((domain, audience))
        return super().token_key(domain, version, audience=audience)

    def shift_key(self, domain: str, version: int | None = None, *, audience: str | None) -> tuple[int, bytes]:
        self.derived.add((domain, audience))
        return super().shift_key(domain, version, audience=audience)


class _ThrowawySecrets:
    def __init__(self) -> None:
        self._key = os.urandom(32)

    def get_secret(self, key_id: str, version: int | None = None) -> tuple[int, bytes]:
        return version or 1, self._key


@dataclass
class Finding:
    level: str  # "error" | "warning"
    schema: str
    message: str


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    matrix: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    """schema -> field path -> audience -> treatment."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [f.__dict__ for f in self.findings],
            "matrix": self.matrix,
        }


def check(policy: Policy, schemas: list[RegisteredSchema]) -> Report:
    report = Report()
    keys = _RecordingKeys(_ThrowawySecrets(), policy.pseudonym_key or "lint")
    used_tags: set[str] = set()
    for rs in sorted(schemas, key=lambda s: s.name):
        node = rs.node
        name = rs.name
        if not isinstance(node, Record):
            report.findings.append(Finding("error", name, "top-level schema is not a record"))
            continue
        for pattern in rs.unmatched_tag_patterns:
            report.findings.append(Finding(
                "warning", name,
                f"metadata.tags pattern {pattern!r} matches no field (the field it meant is classified "
                "by its other tags only)",
            ))
        rows: dict[str, dict[str, str]] = {}
        for leaf in leaves(node):
            rows[leaf.path] = {}
            used_tags.update(leaf.tags)
            if not leaf.tags and leaf.path.endswith("{}<key>"):
                # Keys of an unclassified map would pass through unchanged: an error, like
                # any unclassified field (they are often the identifying part).
                report.findings.append(Finding(
                    "error", name,
                    f"map keys {leaf.path!r} are neither classified nor explicitly public (tag the "
                    "map field, or classify its keys with \"streamproc.key_tags\", e.g. [\"PUBLIC\"])",
                ))
            elif not leaf.tags:
                report.findings.append(Finding(
                    "error", name,
                    f"field {leaf.path!r} is neither classified nor explicitly public "
                    "(add \"confluent:tags\", e.g. [\"PUBLIC\"])",
                ))
            for aud in policy.audiences.values():
                if not leaf.tags:
                    rows[leaf.path][aud.name] = f"untagged -> {aud.untagged}"
                    continue
                rule = aud.rule_for(leaf.tags)
                if rule is None:
                    report.findings.append(Finding(
                        "error", name,
                        f"audience {aud.name!r} has no rule for tag(s) {list(leaf.tags)} of field "
                        f"{leaf.path!r} (it would be dropped; say 'drop' explicitly)",
                    ))
                    rows[leaf.path][aud.name] = "no rule -> drop"
                    continue
                rows[leaf.path][aud.name] = rule.op + (f" {dict(rule.params)}" if rule.params else "")
                # Only the field's own tags: a tag inherited from a container (PUBLIC on a
                # record) is meant to be overridden by stricter inner tags, not a conflict.
                ops = {r.op for r in aud.rules if r.tag in leaf.field.tags}
                if len(ops) > 1:
                    report.findings.append(Finding(
                        "warning", name,
                        f"audience {aud.name!r}: field {leaf.path!r} has tags with different rules "
                        f"({sorted(ops)}); the strictest ({rule.tag} -> {rule.op}) applies",
                    ))
        for aud in policy.audiences.values():
            purpose = policy.basis_of(aud.name)
            if purpose is not None and subject_of(node, aud) is None:
                # Fail closed at run time (no_subject), but a whole schema withheld is a
                # configuration mistake: say so before it ships.
                report.findings.append(Finding(
                    "error", name,
                    f"audience {aud.name!r} serves purpose {purpose.name!r} ({purpose.basis}) but "
                    "the schema has no subject field for it: every record would be withheld "
                    "(mark a top-level field \"streamproc.subject\": true or set the audience's subject)",
                ))
            keys.derived.clear()
            try:
                build_plan(node, aud, keys, offline_table(keys))
            except PolicyError as exc:
                report.findings.append(Finding("error", name, str(exc)))
            for domain, key_audience in sorted(keys.derived, key=str):
                if key_audience is not None and domain in policy.shared_domains:
                    report.findings.append(Finding(
                        "error", name,
                        f"audience {aud.name!r} uses pseudonym domain {domain!r}, which "
                        f"keys.shared_domains shares only by {list(policy.shared_domains[domain])}: "
                        f"its values would not join theirs; add {aud.name!r} or use another domain",
                    ))
        report.matrix[name] = rows
    for unused in sorted(set(policy.purposes) - {a.purpose for a in policy.audiences.values()}):
        report.findings.append(Finding("warning", "*", f"purpose {unused!r} is declared but no audience serves it"))
    for tag in sorted(policy.tags - used_tags):
        report.findings.append(Finding("warning", "*", f"tag {tag!r} has rules but no schema uses it"))
    return report


def render_text(report: Report, show_matrix: bool = False) -> str:
    lines = []
    if show_matrix:
        for schema, rows in report.matrix.items():
            lines.append(f"{schema}")
            auds = sorted({a for r in rows.values() for a in r})
            for path, per in rows.items():
                lines.append(f"  {path}")
                for a in auds:
                    lines.append(f"    {a:12} {per.get(a, '')}")
        lines.append("")
    for f in report.findings:
        lines.append(f"{f.level.upper():8} {f.schema}: {f.message}")
    n_err, n_warn = len(report.errors), len(report.findings) - len(report.errors)
    lines.append(f"{'OK' if report.ok else 'FAILED'}: {len(report.matrix)} schema(s), {n_err} error(s), {n_warn} warning(s)")
    return "\n".join(lines)
