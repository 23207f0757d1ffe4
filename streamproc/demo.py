"""The demo: a workspace with keys, schemas and a policy, and before/after views.

Used by ``streamproc demo``.  The workspace is what a real deployment has -- a keyring
(mode 0600) with source and destination KEKs and the pseudonym master secret, a schema
directory, the policy and a processor config -- created in a temporary directory so the
demo never touches anything else.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streamproc.config import DEFAULT_QUARANTINE_KEK
from streamproc.crypto.kms.local import LocalKeyring

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Source topic -> (schema file, source KEK, generator kind).
SOURCES = {
    "orders": ("order.avsc", "orders-kek", "order"),
    "logins": ("login.avsc", "logins-kek", "login"),
}
AUDIENCES = ("analytics", "fraud", "support")
PSEUDONYM_SECRET = "pseudonym-master"


def find_examples(schemas: str | None = None, policy: str | None = None) -> tuple[Path, Path]:
    """The example schemas directory and policy file (repository checkout by default)."""
    s = Path(schemas) if schemas else REPO_ROOT / "schemas"
    p = Path(policy) if policy else REPO_ROOT / "policy.yaml"
    if not (s / "order.avsc").exists() or not p.exists():
        raise FileNotFoundError(
            f"example schemas/policy not found at {s} and {p}; run from a streamproc checkout "
            "or pass --schemas and --policy"
        )
    return s, p


def dest_topic(source: str, audience: str) -> str:
    return f"{source}.{audience}"


def dead_letter_topic(source: str) -> str:
    return f"{source}.dlq"


def scrape_metrics(url: str) -> dict[str, float]:
    """Sum each metric family over its labels (enough for a short summary).

    The demo's scenes print a few of the processor's own counters, read the way
    Prometheus reads them; ``{}`` if the endpoint does not answer (a summary is optional).
    """
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
    return out


@dataclass
class Workspace:
    root: Path
    keyring: Path
    schemas: Path
    policy: Path

    def pipelines(self) -> list[dict[str, Any]]:
        return [
            {
                "sources": [src],
                "dead_letter_topic": dead_letter_topic(src),
                "destinations": [
                    {"topic": dest_topic(src, a), "audience": a, "kek": f"{a}-kek"} for a in AUDIENCES
                ],
            }
            for src in SOURCES
        ]

    def write_config(self, bootstrap: str, metrics_port: int, **extra: Any) -> Path:
        cfg = {
            "kafka": {"bootstrap.servers": bootstrap},
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
            "group_id": "streamproc-demo",
            "processing_guarantee": "exactly_once",
            "schemas": {"directory": str(self.schemas)},
            "kms": {"provider": "local", "path": str(self.keyring)},
            "policy": str(self.policy),
            "pipelines": self.pipelines(),
            "topics": {"defaults": {"partitions": 3, "replication_factor": 1}},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
            "logging": {"level": "WARNING", "format": "human"},
            **extra,
        }
        path = self.root / "streamproc.yaml"
        path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML
        return path


def make_workspace(root: Path, schemas: Path, policy: Path) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    sdir = root / "schemas"
    sdir.mkdir(exist_ok=True)
    for f in schemas.glob("*.avsc"):
        shutil.copy(f, sdir / f.name)
    pol = root / "policy.yaml"
    shutil.copy(policy, pol)
    ring_path = root / "keys" / "keyring.json"
    ring = LocalKeyring.open_or_create(ring_path)
    for _, kek, _ in SOURCES.values():
        ring.ensure_key(kek)
    for a in AUDIENCES:
        ring.ensure_key(f"{a}-kek")
    ring.ensure_key(PSEUDONYM_SECRET, "secret")
    ring.ensure_key(DEFAULT_QUARANTINE_KEK)  # dead letters are sealed under it
    add_statistical_privacy(sdir / "order.avsc", pol)
    return Workspace(root, ring_path, sdir, pol)


#: What the demo adds to the example policy for analytics (its workspace copy only): a
#: noised amount and a re-identification risk target over what analytics receives.
DEMO_NOISE = {"op": "dp_noise", "mechanism": "laplace", "epsilon": 1.0, "bounds": [0, 100_000]}
DEMO_RISK = {"quasi_identifiers": ["BIRTH_DATE"], "k": 5, "window": "1h"}


def add_statistical_privacy(order_schema: Path, policy: Path) -> bool:
    """Tag ``amount_cents`` of the workspace's order schema ``AMOUNT`` and give analytics a
    ``dp_noise`` rule for it and a ``risk:`` target (the birth year as quasi-identifier), so the demo shows a noised field and the risk gauges.  Only for the
    example files (a custom schema or policy is left as it is); returns whether it did."""
    import yaml

    if not order_schema.exists():
        return False
    schema = json.loads(order_schema.read_text())
    raw = yaml.safe_load(policy.read_text())
    fields = {f["name"]: f for f in schema.get("fields", [])}
    analytics = (raw.get("audiences") or {}).get("analytics")
    if "amount_cents" not in fields or not isinstance(analytics, dict) or "risk" in analytics:
        return False
    f = fields["amount_cents"]
    f["confluent:tags"] = [*f.get("confluent:tags", []), "AMOUNT"]
    order_schema.write_text(json.dumps(schema, indent=2))
    analytics.setdefault("tags", {})["AMOUNT"] = DEMO_NOISE
    analytics["risk"] = DEMO_RISK
    for name, aud in raw["audiences"].items():  # the others keep the amount (PUBLIC)
        if name != "analytics" and isinstance(aud, dict):
            aud.setdefault("tags", {}).setdefault("AMOUNT", "keep")
    policy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return True


RISK_GAUGES = (
    "streamproc_risk_window_records", "streamproc_risk_min_class_size", "streamproc_risk_k_target",
    "streamproc_risk_share_below_k", "streamproc_risk_share_unique",
)


def risk_line(audience: str, g: Mapping[str, float]) -> str:
    """One line of an audience's risk gauges (counts and shares, never a value)."""
    k, target = int(g.get("streamproc_risk_min_class_size", 0)), int(g.get("streamproc_risk_k_target", 0))
    status = "[green]target met[/]" if k >= target else "[red]below target: StreamprocReidentificationRisk would fire[/]"
    return (
        f"risk ({audience}): {int(g.get('streamproc_risk_window_records', 0))} records in the window, "
        f"k = {k} (target {target}), {g.get('streamproc_risk_share_below_k', 0.0):.0%} of records in classes "
        f"below k, {g.get('streamproc_risk_share_unique', 0.0):.0%} unique · {status}"
    )


def scrape_risk(url: str) -> dict[str, dict[str, float]]:
    """audience -> its risk gauges, from a /metrics exposition (``{}`` if it does not answer)."""
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name not in RISK_GAUGES or 'audience="' not in line:
            continue
        audience = line.split('audience="', 1)[1].split('"', 1)[0]
        out.setdefault(audience, {})[name] = float(line.rsplit(" ", 1)[1])
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str, separators=(",", ":"))
    return "∅" if v is None else str(v)


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def before_after_table(title: str, before: Mapping[str, Any], afters: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per field: the producer's value, then what each audience received."""
    table = Table(title=title, show_lines=False, header_style="bold", title_justify="left")
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("producer sent", overflow="fold", max_width=28)
    for a in afters:
        table.add_column(a, overflow="fold", max_width=30)
    flat_before = _flatten(before)
    flat_afters = {a: _flatten(r) for a, r in afters.items()}
    for path, v in flat_before.items():
        cells = []
        for a in afters:
            if path in flat_afters[a]:
                after = flat_afters[a][path]
                same = _fmt(after) == _fmt(v)
                cells.append(_fmt(after) if same else f"[yellow]{_fmt(after)}[/]")
            else:
                cells.append("[red](dropped)[/]")
        table.add_row(path, _fmt(v), *cells)
    return table


def show(console: Console, title: str, before: Mapping[str, Any], afters: Mapping[str, Mapping[str, Any]]) -> None:
    console.print(before_after_table(title, before, afters))
    console.print("[dim]yellow: transformed by the audience's policy · red: dropped · ∅: null[/]\n")
