#!/usr/bin/env python3
"""The privacy/utility trade-off of k-anonymity enforcement, computed with the real pipeline.

Prints the table of docs/policy.md ("Enforcing k: what it costs"): a synthetic stream of
hospital visits (postcode district, birth date, gender; districts and birth years skewed
like real populations) goes through ``Pipeline.process`` for three audiences per k --
measured only, ``suppress``, and ``generalize_more`` with a postcode ladder -- and the
released records are decoded as a subscriber would and counted::

    python scripts/risk_tradeoff.py              # the docs table (5000 visits, seed 1)
    python scripts/risk_tradeoff.py --n 20000    # a bigger stream

Privacy: the share of released records in classes below k and the smallest class (exact
equality over what was released, as pycanon counts).  Utility: the share of records whose
quasi-identifiers were suppressed (null) or generalized one ladder level or more.
``tests/unit/test_risk_tradeoff.py`` runs this and checks the docs table against it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "record", "name": "Visit", "namespace": "example.risk", "fields": [
        {"name": "visit_id", "type": "string", "confluent:tags": ["PUBLIC"]},
        {"name": "postcode", "type": "string", "confluent:tags": ["POSTCODE"]},
        {"name": "birth_date", "type": {"type": "int", "logicalType": "date"}, "confluent:tags": ["BIRTH_DATE"]},
        {"name": "gender", "type": {"type": "enum", "name": "Gender", "symbols": ["F", "M", "X"]},
         "confluent:tags": ["GENDER"]},
        {"name": "diagnosis", "type": "string", "confluent:tags": ["DIAGNOSIS"]},
    ],
}
RULES = {
    "PUBLIC": "keep",
    "POSTCODE": {"op": "generalize", "until": " "},
    "BIRTH_DATE": {"op": "generalize", "to": "year"},
    "GENDER": "keep",
    "DIAGNOSIS": "keep",
}
QI = ["POSTCODE", "BIRTH_DATE", "GENDER"]
LADDER = {"POSTCODE": [{"op": "generalize", "prefix": 2}, {"op": "generalize", "prefix": 1}]}
#: District codes: two letters, a digit, a letter; the ladder keeps 2, then 1 character.
AREAS = ["SW", "SE", "NW", "NE", "EC", "WC", "N", "E", "W"]


def visits(n: int, seed: int) -> list[dict[str, Any]]:
    """Skewed quasi-identifiers: a few big districts and a long tail, births 1940..2005."""
    rng = random.Random(seed)
    districts = [f"{a}{d}{c}" for a in AREAS for d in range(1, 4) for c in "AB"]  # 54
    weights = [1.0 / (i + 1) for i in range(len(districts))]  # Zipf-like
    out = []
    for i in range(n):
        year = min(2005, max(1940, int(rng.gauss(1975, 15))))
        out.append({
            "visit_id": f"v{i}",
            "postcode": f"{rng.choices(districts, weights)[0]} {rng.randint(1, 9)}{rng.choice('AB')}",
            "birth_date": (dt.date(year, 1, 1) - dt.date(1970, 1, 1)).days + rng.randint(0, 364),
            "gender": rng.choice(["F", "M", "F", "M", "X"]),
            "diagnosis": rng.choice(["flu", "asthma", "covid", "fracture"]),
        })
    return out


def tradeoff(n: int = 5000, seed: int = 1, ks: tuple[int, ...] = (2, 5, 10)) -> list[dict[str, Any]]:
    """One row per k: what each of the three audiences released, counted."""
    from streamproc.client import RecordOpener, RecordSealer
    from streamproc.crypto.envelope import Opener
    from streamproc.crypto.kms.local import LocalKeyring
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.core import Destination, InputRecord, Pipeline, Route
    from streamproc.policy.model import parse_policy
    from streamproc.schema.registry import CachingSchemaSource, DirectorySchemaSource

    records = visits(n, seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="risk-tradeoff-") as tmp:
        ring = LocalKeyring.create(Path(tmp) / "keyring.json")
        for kek in ("visits-kek", "out-kek"):
            ring.create_key(kek)
        ring.create_key("pseudonym-master", "secret")
        (Path(tmp) / "schemas").mkdir()
        schemas = CachingSchemaSource(DirectorySchemaSource(Path(tmp) / "schemas"))
        sealer = RecordSealer(ring, "visits-kek", "visits", SCHEMA, schemas)
        sealed = sealer.seal_many(records)
        opener = RecordOpener(ring, schemas)
        for k in ks:
            risk = {"quasi_identifiers": QI, "k": k, "window": "1h"}
            policy = parse_policy({"keys": {"pseudonym": "pseudonym-master"}, "audiences": {
                "measured": {"record_key": "keep", "tags": RULES, "risk": risk},
                "suppress": {"record_key": "keep", "tags": RULES, "risk": {**risk, "action": "suppress"}},
                "generalize_more": {"record_key": "keep", "tags": RULES,
                                    "risk": {**risk, "action": "generalize_more", "ladder": LADDER}},
            }})
            dests = tuple(Destination(f"visits.{a}", a, "out-kek") for a in policy.audiences)
            p = Pipeline(routes=[Route(("visits",), dests)], policy=policy, opener=Opener.for_kms(ring),
                         kms=ring, schemas=schemas, keys=PseudonymKeys(ring, "pseudonym-master"),
                         clock=lambda: 0.0)
            outs = []
            for b in range(0, n, 500):
                res = p.process([InputRecord("visits", 0, i, None, sealed[i], 0) for i in range(b, min(n, b + 500))])
                if res.quarantined:
                    raise RuntimeError("visits were quarantined")
                outs += res.outputs
            row: dict[str, Any] = {"k": k}
            base = [(r["postcode"].split(" ")[0], r["birth_date"], r["gender"]) for r in records]
            for a in policy.audiences:
                got = [opener.decode(o.topic, o.value) for o in outs if o.topic == f"visits.{a}"]
                tuples = [(r["postcode"], r["birth_date"], r["gender"]) for r in got]
                sizes = Counter(tuples)
                row[a] = {
                    "below_k": sum(c for c in sizes.values() if c < k) / n,
                    "min_class": min(sizes.values()),
                    "unique": sum(1 for c in sizes.values() if c == 1) / n,
                    "suppressed": sum(1 for t in tuples if t[0] is None) / n,
                    "generalized": sum(1 for t, b0 in zip(tuples, base, strict=True)
                                       if t[0] is not None and t[0] != b0[0]) / n,
                }
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| k | measured only: records below k | unique | suppress: QIs suppressed | released below k "
        "| generalize_more: generalized | suppressed | released below k |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, s, g = r["measured"], r["suppress"], r["generalize_more"]
        lines.append(
            f"| {r['k']} | {m['below_k']:.1%} | {m['unique']:.1%} | {s['suppressed']:.1%} | {s['below_k']:.1%} "
            f"| {g['generalized']:.1%} | {g['suppressed']:.1%} | {g['below_k']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="visits in the stream (all inside the 1 h window)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(markdown(tradeoff(args.n, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
