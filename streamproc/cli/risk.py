"""``streamproc risk``: the re-identification risk of what an audience actually received.

Reads the JSON lines ``streamproc consume`` prints for an audience's sanitized topic (a
file or stdin) and reports, over the policy's risk window (the newest records of the
sample, by their timestamps), the k-anonymity, uniqueness and l-diversity of the
quasi-identifier tuples the audience sees::

    streamproc consume --config subscriber.yaml --topic orders.analytics --max 50000 \\
      | streamproc risk --policy policy.yaml --schemas schemas --audience analytics

The quasi-identifiers and targets come from the audience's ``risk:`` in the policy (or
``--qi``/``--k``/``--l``/``--sensitive``).  Tags are mapped to fields through the source
schemas' tags (top-level fields: a plan never renames a field; a field the audience does
not receive counts as one constant value).  Exit 0 when the target is met, 1 when it is
not (a CI gate and a periodic job a privacy officer can sign off), 65 on bad input (a
line that is not JSON, no record at all).  The report holds counts and shares, never a
value.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, TextIO

import click

from streamproc.cli.errors import DataError
from streamproc.errors import PolicyError, SchemaError

EX_NOT_MET = 1


def _hashable(v: Any) -> Hashable:
    """Values as they were received, made hashable (records, lists, maps as canonical JSON)."""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return v


def _timestamp(line: dict[str, Any]) -> float:
    ts = line.get("timestamp")
    if not isinstance(ts, str):
        return 0.0
    try:
        return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def fields_by_tag(schema_paths: Iterable[Path]) -> dict[str, list[str]]:
    """Tag -> the top-level field names that carry it (inline or ``metadata.tags``)."""
    from streamproc.schema.avro import Record
    from streamproc.schema.registry import load_document

    out: dict[str, list[str]] = {}
    for path in schema_paths:
        node = load_document(path).node
        if not isinstance(node, Record):
            continue
        for f in node.fields:
            for tag in f.tags:
                names = out.setdefault(tag, [])
                if f.name not in names:
                    names.append(f.name)
    return out


@click.command("risk")
@click.option("--policy", "policy_path", default="policy.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--schemas", "schema_paths", multiple=True, default=["schemas"], show_default=True,
              type=click.Path(exists=True), help="Source schemas (directory of .avsc or files; repeatable).")
@click.option("--audience", required=True, help="The audience whose received records are measured.")
@click.option("--input", "input_path", default="-", show_default=True,
              help="JSON lines as printed by `streamproc consume` ('-': stdin).")
@click.option("--qi", "qi_tags", multiple=True, help="Quasi-identifier tag (repeatable; default: the policy's).")
@click.option("--k", "k_target", type=click.IntRange(2), help="Target k (default: the policy's).")
@click.option("--l", "l_target", type=click.IntRange(2), help="Target l (with --sensitive).")
@click.option("--sensitive", help="Sensitive tag for l-diversity (default: the policy's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def risk(
    policy_path: str,
    schema_paths: tuple[str, ...],
    audience: str,
    input_path: str,
    qi_tags: tuple[str, ...],
    k_target: int | None,
    l_target: int | None,
    sensitive: str | None,
    as_json: bool,
) -> None:
    """Measure k-anonymity, uniqueness and l-diversity of an audience's received records."""
    from streamproc.policy.model import load_policy
    from streamproc.privacy.risk import RiskTarget, RiskWindow

    try:
        aud = load_policy(policy_path).audience(audience)
        files: list[Path] = []
        for p in schema_paths:
            files += [Path(p)] if p.endswith(".avsc") else sorted(Path(p).glob("*.avsc"))
        by_tag = fields_by_tag(files)
    except (PolicyError, SchemaError) as exc:
        raise click.ClickException(str(exc)) from None
    base = aud.risk
    qi = tuple(qi_tags) or (base.quasi_identifiers if base else ())
    k = k_target or (base.k if base else None)
    sens = sensitive or (base.sensitive if base else None)
    l_ = l_target or (base.l if base and sens == base.sensitive else None)
    if not qi or k is None:
        raise click.ClickException(
            f"audience {audience!r} has no 'risk:' in the policy: give --qi TAG (repeatable) and --k N"
        )
    if (l_ is None) != (sens is None):
        raise click.ClickException("--l and --sensitive go together")
    window_s = base.window_s if base else math.inf
    missing = [t for t in (*qi, *([sens] if sens else [])) if t not in by_tag]
    if missing:
        raise click.ClickException(f"no field of the schemas carries tag(s) {missing}")
    try:
        target = RiskTarget(qi, k, window_s if math.isfinite(window_s) else 1e18, l_, sens,
                            base.max_records if base else 10_000_000)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    window = RiskWindow(target, clock=lambda: 0.0)

    def pick(value: dict[str, Any], tag: str) -> Hashable:
        for name in by_tag[tag]:
            if name in value:
                return _hashable(value[name])
        return None  # not received by this audience: one constant value

    stream: TextIO = sys.stdin if input_path == "-" else Path(input_path).open()  # noqa: SIM115
    n_lines = skipped = 0
    last_ts = 0.0
    try:
        for lineno, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                raise DataError(f"line {lineno}: not JSON (expected `streamproc consume` output)") from None
            value = line.get("value") if isinstance(line, dict) else None
            if not isinstance(value, dict):
                skipped += 1  # a tombstone or a record that could not be opened
                continue
            ts = _timestamp(line)
            last_ts = max(last_ts, ts)
            window.add(tuple(pick(value, t) for t in qi), pick(value, sens) if sens else None, ts)
            n_lines += 1
    finally:
        if stream is not sys.stdin:
            stream.close()
    if n_lines == 0:
        raise DataError("no records to measure (nothing to sign off)")
    report = window.report(now=last_ts)
    out = {
        "audience": audience,
        "quasi_identifiers": list(qi),
        "records_read": n_lines,
        "records_skipped": skipped,
        "records_in_window": report.records,
        "classes": report.classes,
        "k": report.min_class,
        "k_target": k,
        "share_below_k": report.share_below_k,
        "share_unique": report.share_unique,
        "l": report.min_l,
        "l_target": l_,
        "share_below_l": report.share_below_l,
        "meets_target": report.meets_target,
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"audience {audience}: {report.records} records in the window "
                   f"({n_lines} read, {skipped} skipped), quasi-identifiers {', '.join(qi)}")
        click.echo(f"  k = {report.min_class} (target {k}); {report.classes} classes; "
                   f"{report.share_below_k:.1%} of records in classes below k; "
                   f"{report.share_unique:.1%} unique")
        if l_ is not None:
            click.echo(f"  l = {report.min_l} (target {l_}) over {sens}; "
                       f"{report.share_below_l or 0.0:.1%} of records in classes below l")
        click.echo("  target met" if report.meets_target else "  TARGET NOT MET")
    if not report.meets_target:
        sys.exit(EX_NOT_MET)
