"""In-process throughput of the pipeline core on the reference record (docs/benchmarks.md).

Usage::

    python benchmarks/bench_core.py [--records N] [--repeat R] [--batch B] [--cpu C] [--json out.json]

What is measured, single core (the process pins itself to one CPU), over the same
``--distinct`` realistic records (Faker, seeded) cycled up to ``--records`` per repetition,
in batches of ``--batch`` records like the runtime:

(a) baseline   -- plain fastavro ``schemaless_reader`` + ``schemaless_writer`` over the
                  plaintext Avro of the same records (no crypto, no policy);
(b) plan fn    -- the generated plan function alone (audience a1), plaintext in and out;
(c) pipeline 1 -- ``Pipeline.process`` with one destination (a1): open, decode,
                  transform, encode, seal, output headers;
(d) pipeline 2 -- ``Pipeline.process`` with two destinations (a1, a2).

plus two components for the cost breakdown: ``Opener.open`` alone and ``Sealer.seal_many``
alone.  When the compiled plan interpreter (``streamproc._native``, crate ``native/``) is
built, (b)-(d) run on it, and (b py)-(d py) are the same cases with the generated Python
plan functions, measured in the same run.  Each figure is the median of ``--repeat`` timed repetitions after one warm-up
repetition; rates are *input* records per second, and every row also gets its ratio to (a)
measured in the same run.  Nothing here touches a broker.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro

from streamproc.client import RecordSealer
from streamproc.crypto.envelope import Opener, Sealer
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.pipeline import native
from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
from streamproc.policy import load_policy
from streamproc.schema.avro import strip_logical
from streamproc.schema.framing import HEADER_LEN
from streamproc.schema.registry import build_schema_source

HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "reference.avsc"
POLICY_FILE = HERE / "reference_policy.yaml"
SOURCE_TOPIC = "purchases"
SOURCE_KEK = "purchases-kek"
PSEUDONYM_SECRET = "pseudonym-master"
AUDIENCES = ("a1", "a2")
PARTITIONS = 6


# -- the reference data ------------------------------------------------------------------------


def make_records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` distinct, realistic reference records (Faker, seeded: reproducible)."""
    import datetime as dt
    import random

    from faker import Faker

    fake = Faker("en_GB")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    customers = [f"cust-{rng.randrange(10**8):08d}" for _ in range(max(1, n // 4))]
    out = []
    for _ in range(n):
        items: list[dict[str, Any]] = [
            {
                "sku": f"SKU-{rng.randrange(10**5):05d}",
                "quantity": rng.randint(1, 4),
                "unit_price_cents": rng.randint(199, 19999),
            }
            for _ in range(rng.randint(1, 3))
        ]
        out.append(
            {
                "order_id": f"ord-{rng.randrange(10**10):010d}",
                "customer_id": rng.choice(customers),
                "email": fake.email(),
                "card_number": fake.credit_card_number(card_type="visa16"),
                "ip_address": fake.ipv4_public(),
                "amount_cents": sum(i["quantity"] * i["unit_price_cents"] for i in items),
                "currency": rng.choice(["GBP", "EUR", "USD"]),
                "placed_at": int(
                    fake.date_time_between("-30d", "now", tzinfo=dt.UTC).timestamp() * 1000
                ),
                "channel": rng.choice(["WEB", "APP", "STORE"]),
                "shipping": {
                    "city": fake.city(),
                    "region": fake.county(),
                    "country": "GB",
                    "express": rng.random() < 0.2,
                },
                "items": items,
                "coupon_code": rng.choice([None, None, f"SAVE{rng.randint(5, 30)}"]),
            }
        )
    return out


@dataclass
class Setup:
    """Everything the measurements share; built once by :func:`setup`."""

    root: Path
    records: list[dict[str, Any]]
    plaintexts: list[bytes]
    """Framed Avro (what producers seal), one per distinct record."""
    sealed: list[bytes]
    inputs: list[InputRecord]
    """``n_records`` input records cycling over the distinct sealed values."""
    pipelines: dict[int, Pipeline]
    """Number of audiences -> pipeline."""
    schema_id: int
    kms: LocalKeyring
    fastavro_schema: Any
    plan_fn: Callable[[bytes], list[bytes]] = field(repr=False, default=None)  # type: ignore[assignment]
    plan_fn_py: Callable[[bytes], list[bytes]] = field(repr=False, default=None)  # type: ignore[assignment]
    """The generated Python plan function of a1 (the same as ``plan_fn`` without the extension)."""
    pipelines_py: dict[int, Pipeline] = field(default_factory=dict)
    """Like ``pipelines``, with every plan compiled to the generated Python function."""

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def setup(n_records: int, n_distinct: int = 2000, seed: int = 7, root: Path | None = None) -> Setup:
    """Build a demo-like workspace (keyring, schema dir, policy) and the input records."""
    root = Path(tempfile.mkdtemp(prefix="streamproc-bench-")) if root is None else root
    sdir = root / "schemas"
    sdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCHEMA_FILE, sdir / SCHEMA_FILE.name)
    ring_path = root / "keys" / "keyring.json"
    ring = LocalKeyring.open_or_create(ring_path)
    ring.ensure_key(SOURCE_KEK)
    for a in AUDIENCES:
        ring.ensure_key(f"{a}-kek")
    ring.ensure_key(PSEUDONYM_SECRET, "secret")
    kms = LocalKeyring(ring_path)
    schemas = build_schema_source(str(sdir))
    policy = load_policy(POLICY_FILE)
    keys = PseudonymKeys(kms, PSEUDONYM_SECRET)

    schema = json.loads(SCHEMA_FILE.read_text())
    sealer = RecordSealer(kms, SOURCE_KEK, SOURCE_TOPIC, schema, schemas)
    records = make_records(n_distinct, seed)
    plaintexts = [sealer.encode(r) for r in records]
    sealed = sealer.sealer.seal_many(plaintexts)
    inputs = [
        InputRecord(
            SOURCE_TOPIC,
            i % PARTITIONS,
            i // PARTITIONS,
            records[i % n_distinct]["order_id"].encode(),
            sealed[i % n_distinct],
            1_700_000_000_000 + i,
        )
        for i in range(n_records)
    ]

    pipelines, pipelines_py = {}, {}
    for n_aud, target in ((1, pipelines), (2, pipelines), (1, pipelines_py), (2, pipelines_py)):
        spec = [
            {
                "sources": [SOURCE_TOPIC],
                "destinations": [
                    {"topic": f"{SOURCE_TOPIC}.{a}", "audience": a, "kek": f"{a}-kek"}
                    for a in AUDIENCES[:n_aud]
                ],
            }
        ]
        target[n_aud] = Pipeline(
            routes=build_routes(spec),
            policy=policy,
            opener=Opener.for_kms(kms),
            kms=kms,
            schemas=schemas,
            keys=keys,
        )
    # Baseline schema: logical types stripped (raw ints, like the plan fn sees them) and
    # parsed *with* fastavro's parsed-schema hint; without the hint fastavro re-parses the
    # schema on every call and the baseline would look twice as slow as it is.
    fa_schema = fastavro.parse_schema(strip_logical(schema))
    s = Setup(
        root, records, plaintexts, sealed, inputs, pipelines, sealer.schema_id, kms, fa_schema
    )
    for p in pipelines.values():
        for d in p._dest_by_topic:
            p.explain(sealer.schema_id, d)  # compiles the plans (natively where it can)
    saved, native.ENABLED = native.ENABLED, False
    try:
        for p in pipelines_py.values():
            for d in p._dest_by_topic:
                p.explain(sealer.schema_id, d)  # the generated Python functions
    finally:
        native.ENABLED = saved
    s.pipelines_py = pipelines_py
    a1 = (sealer.schema_id, f"{SOURCE_TOPIC}.a1")
    s.plan_fn = pipelines[1]._plans[a1].fn  # type: ignore[union-attr]
    s.plan_fn_py = pipelines_py[1]._plans[a1].fn  # type: ignore[union-attr]
    return s


# -- the measured loops (each returns the number of input records it handled) ----------------


def _cycle(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


def run_baseline(s: Setup, n: int, batch: int) -> int:
    """(a) fastavro decode + encode of the same records' plaintext Avro (frame stripped)."""
    bodies = _cycle([p[HEADER_LEN:] for p in s.plaintexts], n)
    parsed = s.fastavro_schema
    reader, writer = fastavro.schemaless_reader, fastavro.schemaless_writer
    done = 0
    for i in range(0, n, batch):
        outs = []
        for body in bodies[i : i + batch]:
            rec = reader(io.BytesIO(body), parsed, None)
            buf = io.BytesIO()
            writer(buf, parsed, rec)
            outs.append(buf.getvalue())
        done += len(outs)
    return done


def run_plan(s: Setup, n: int, batch: int, python: bool = False) -> int:
    """(b) the plan function alone (audience a1), plaintext to plaintext."""
    plains = _cycle(s.plaintexts, n)
    fn, join = s.plan_fn_py if python else s.plan_fn, b"".join
    done = 0
    for i in range(0, n, batch):
        outs = [join(fn(p)) for p in plains[i : i + batch]]
        done += len(outs)
    return done


def run_pipeline(s: Setup, n_audiences: int, n: int, batch: int, python: bool = False) -> int:
    """(c)/(d) ``Pipeline.process`` over batches of input records."""
    p = (s.pipelines_py if python else s.pipelines)[n_audiences]
    inputs = s.inputs[:n]
    done = 0
    for i in range(0, n, batch):
        res = p.process(inputs[i : i + batch])
        if res.quarantined:
            raise RuntimeError(
                f"benchmark records were quarantined: {res.quarantined[0].reason} {res.quarantined[0].detail}"
            )
        done += len(res.outputs) // n_audiences
    return done


def run_open(s: Setup, n: int, batch: int) -> int:
    """Component: ``Opener.open`` alone (DEK cache hit + AES-GCM decrypt)."""
    opener = s.pipelines[1].opener
    values = [r.value or b"" for r in s.inputs[:n]]
    done = 0
    for i in range(0, n, batch):
        outs = [opener.open(SOURCE_TOPIC, v) for v in values[i : i + batch]]
        done += len(outs)
    return done


def run_seal(s: Setup, n: int, batch: int) -> int:
    """Component: ``Sealer.seal_many`` alone, on plaintexts of the a1 output's size."""
    sealer = Sealer(s.kms, "a1-kek", f"{SOURCE_TOPIC}.a1")
    outs_a1 = [b"".join(s.plan_fn(p)) for p in s.plaintexts]
    plains = _cycle(outs_a1, n)
    done = 0
    for i in range(0, n, batch):
        done += len(sealer.seal_many(plains[i : i + batch]))
    return done


#: Extra rules on audience a1 for the differential-privacy cases: ``amount_cents`` (long),
#: ``channel`` (enum) and ``shipping.express`` (boolean) get one more tag each, so the DP rule (stricter than PUBLIC's
#: keep) governs them; everything else is plan (b).  The difference to (b) is the per-record
#: cost of the operator.
DP_CASES: dict[str, dict[str, Any]] = {
    "plan_dp_laplace": {"AMOUNT": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 1.0, "bounds": [0, 100_000]}},
    "plan_dp_gaussian": {"AMOUNT": {"op": "dp_noise", "mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6,
                                    "bounds": [0, 100_000]}},
    "plan_rr": {"CHANNEL": {"op": "randomized_response", "epsilon": 1.0}},
    "plan_rr_bool": {"EXPRESS": {"op": "randomized_response", "epsilon": 1.0}},
}
_DP_FNS: dict[tuple[int, str], Callable[[bytes], list[bytes]]] = {}


def dp_plan_fn(name: str, s: Setup) -> Callable[[bytes], list[bytes]]:
    """The a1 plan with one DP rule added (compiled once, like the runtime's plan cache)."""
    fn = _DP_FNS.get((id(s), name))
    if fn is None:
        import yaml

        from streamproc.pipeline.codegen import compile_plan
        from streamproc.pipeline.plan import build_plan
        from streamproc.policy.model import parse_policy
        from streamproc.schema import avro

        schema = json.loads(SCHEMA_FILE.read_text())
        extra = {"amount_cents": "AMOUNT", "channel": "CHANNEL"}
        for f in schema["fields"]:
            if f["name"] in extra:
                f["confluent:tags"] = [*f["confluent:tags"], extra[f["name"]]]
            if f["name"] == "shipping":  # shipping.express (boolean), inside a PUBLIC record
                for g in f["type"]["fields"]:
                    if g["name"] == "express":
                        g["confluent:tags"] = ["EXPRESS"]
        raw = yaml.safe_load(POLICY_FILE.read_text())
        raw["audiences"]["a1"]["tags"].update(DP_CASES[name])
        node = avro.parse(schema)
        plan = build_plan(node, parse_policy(raw).audience("a1"), PseudonymKeys(s.kms, PSEUDONYM_SECRET))
        # Like (b): the compiled interpreter where it is built, the generated function otherwise.
        fn = native.compile_native(plan, node, offset=HEADER_LEN) or compile_plan(plan, node, offset=HEADER_LEN)[0]  # type: ignore[arg-type]
        _DP_FNS[(id(s), name)] = fn
    return fn


def run_dp(name: str, s: Setup, n: int, batch: int) -> int:
    """(b) with one differential-privacy rule added (see :data:`DP_CASES`)."""
    plains = _cycle(s.plaintexts, n)
    fn, join = dp_plan_fn(name, s), b"".join
    done = 0
    for i in range(0, n, batch):
        outs = [join(fn(p)) for p in plains[i : i + batch]]
        done += len(outs)
    return done


def run_risk(s: Setup, n: int, batch: int) -> int:
    """Component: :class:`RiskWindow.add` per record, 3 quasi-identifiers (shipping city,
    region, channel) and a sensitive value (currency), in a 1 h window capped at 100 000
    records, plus one report per batch (what a gauge refresh costs).  The tuples are
    prepared outside the loop: extracting them from output records is not measured here."""
    from streamproc.privacy.risk import RiskTarget, RiskWindow

    rows = _cycle(
        [((r["shipping"]["city"], r["shipping"]["region"], r["channel"]), r["currency"]) for r in s.records], n
    )
    window = RiskWindow(RiskTarget(("CITY", "REGION", "CHANNEL"), 5, 3600.0, 2, "CURRENCY"))
    add = window.add
    done = 0
    t0 = 1_700_000_000.0
    for i in range(0, n, batch):
        for j, (qi, sens) in enumerate(rows[i : i + batch]):
            add(qi, sens, t0 + (i + j) * 0.001)
        window.report(t0 + (i + batch) * 0.001)
        done += len(rows[i : i + batch])
    return done


_CONSENT: dict[int, Pipeline] = {}


def consent_pipeline(s: Setup) -> Pipeline:
    """Case (d) with the consent check: a1 serves a ``consent``-basis purpose, a2 a
    ``legitimate_interest`` one, the subject is ``customer_id``; the table holds a grant for
    every subject of the records plus 20 000 other subjects' grants, so every record is
    delivered and the outputs equal (d): the difference is the evaluation alone (subject
    read, one HMAC per record, a dict lookup per audience)."""
    p = _CONSENT.get(id(s))
    if p is None:
        import yaml

        from streamproc.client.consent import subject_token
        from streamproc.pipeline.consent import ConsentGate
        from streamproc.policy.consent import ConsentState, encode, record_key
        from streamproc.policy.model import parse_policy

        raw = yaml.safe_load(POLICY_FILE.read_text())
        raw["purposes"] = {"marketing": {"basis": "consent"}, "fraud": {"basis": "legitimate_interest"}}
        for a, purpose in (("a1", "marketing"), ("a2", "fraud")):
            raw["audiences"][a].update(purpose=purpose, subject="customer_id")
        policy = parse_policy(raw)
        keys = PseudonymKeys(s.kms, PSEUDONYM_SECRET)
        state = ConsentState()
        subjects = {r["customer_id"] for r in s.records} | {f"other-{i}" for i in range(20_000)}
        for subj in subjects:
            state.apply(record_key(subject_token(keys, "consent", subj), "marketing"), encode("marketing", "granted", 0))
        two = s.pipelines[2]
        p = Pipeline(
            routes=build_routes([{"sources": [SOURCE_TOPIC], "destinations": [
                {"topic": f"{SOURCE_TOPIC}.{a}", "audience": a, "kek": f"{a}-kek"} for a in AUDIENCES[:2]]}]),
            policy=policy, opener=Opener.for_kms(s.kms), kms=s.kms, schemas=two.schemas, keys=keys,
            consent=ConsentGate(policy, state, keys),
        )
        _CONSENT[id(s)] = p
    return p


def run_consent(s: Setup, n: int, batch: int) -> int:
    """(d) with the consent check (see :func:`consent_pipeline`)."""
    p = consent_pipeline(s)
    inputs = s.inputs[:n]
    done = 0
    for i in range(0, n, batch):
        res = p.process(inputs[i : i + batch])
        if res.quarantined or res.stats.withheld:
            raise RuntimeError("benchmark records were quarantined or withheld")
        done += len(res.outputs) // 2
    return done


_RISK: dict[tuple[int, str | None], tuple[Pipeline, list[InputRecord]]] = {}
#: Quasi-identifiers of the risk cases: top-level fields of the reference record, tagged
#: for them (ip_address keeps IP_ADDRESS, generalized to /24 by a1's rule).
RISK_TAGS = {"currency": "CURRENCY", "channel": "CHANNEL", "amount_cents": "AMOUNT"}


def risk_pipeline(s: Setup, action: str | None) -> tuple[Pipeline, list[InputRecord]]:
    """Case (c) with a ``risk:`` on a1: quasi-identifiers IP_ADDRESS, CURRENCY, CHANNEL,
    k = 5, l = 2 over AMOUNT, window 1 h; measured only (``action`` None) or enforced.
    The inputs are the same records sealed under a copy of the schema with the extra tags
    (no rule names them, so PUBLIC's keep still governs: the plan is (c)'s)."""
    hit = _RISK.get((id(s), action))
    if hit is None:
        import yaml

        from streamproc.policy.model import parse_policy

        schema = json.loads(SCHEMA_FILE.read_text())
        for f in schema["fields"]:
            if f["name"] in RISK_TAGS:
                f["confluent:tags"] = [*f["confluent:tags"], RISK_TAGS[f["name"]]]
        raw = yaml.safe_load(POLICY_FILE.read_text())
        raw["audiences"]["a1"]["risk"] = {
            "quasi_identifiers": ["IP_ADDRESS", "CURRENCY", "CHANNEL"], "k": 5, "l": 2, "sensitive": "AMOUNT",
            "window": "1h", **({"action": action} if action else {}),
        }
        schemas = s.pipelines[1].schemas
        sealer = RecordSealer(s.kms, SOURCE_KEK, SOURCE_TOPIC, schema, schemas)
        sealed = sealer.sealer.seal_many([sealer.encode(r) for r in s.records])
        inputs = [InputRecord(r.topic, r.partition, r.offset, r.key, sealed[i % len(sealed)], r.timestamp_ms)
                  for i, r in enumerate(s.inputs)]
        p = Pipeline(
            routes=build_routes([{"sources": [SOURCE_TOPIC], "destinations": [
                {"topic": f"{SOURCE_TOPIC}.a1", "audience": "a1", "kek": "a1-kek"}]}]),
            policy=parse_policy(raw), opener=Opener.for_kms(s.kms), kms=s.kms, schemas=schemas,
            keys=PseudonymKeys(s.kms, PSEUDONYM_SECRET),
        )
        hit = _RISK[(id(s), action)] = (p, inputs)
    return hit


def run_pipeline_risk(action: str | None, s: Setup, n: int, batch: int) -> int:
    """(c) with a1's re-identification risk measured (or enforced): reading the
    quasi-identifiers from every output plaintext, the window, one report per batch."""
    p, inputs = risk_pipeline(s, action)
    done = 0
    for i in range(0, n, batch):
        res = p.process(inputs[i : i + batch])
        if res.quarantined or "a1" not in res.stats.risk:
            raise RuntimeError("risk benchmark records were quarantined or not measured")
        done += len(res.outputs)
    return done

#: The KEK that seals the erasure cases' subject keys (a1's ``erasure.keks`` entry).
ERASURE_KEK = "a1-subject-kek"
ERASURE_TOPIC = "subject-keys"
_ERASURE: dict[tuple[int, bool], Pipeline] = {}


def erasure_table(s: Setup, keys: PseudonymKeys) -> Any:
    """A subject-key table for a1, sealing under :data:`ERASURE_KEK` with the local keyring."""
    from streamproc.crypto.erasure import SubjectKeyTable

    s.kms.ensure_key(ERASURE_KEK)
    opener = Opener.for_kms(s.kms)
    return SubjectKeyTable(
        keys, topic=ERASURE_TOPIC, sealers={"a1": Sealer(s.kms, ERASURE_KEK, ERASURE_TOPIC)},
        open_envelope=lambda v: opener.open_parts(ERASURE_TOPIC, v)[0],
    )  # fmt: skip


def deterministic_pipeline(s: Setup, erasable: bool) -> Pipeline:
    """Case (c) with a1's e-mail encrypted deterministically instead of dropped: under the
    audience key, or (``erasable``) under each subject's own key from a subject-key table.
    Both plans are the generated Python functions (an erasable plan reads the subject
    first, which the compiled interpreter does not do), so the two differ by the operator
    alone: the subject read, its token (one HMAC), the table lookup and the key's AES-SIV
    instead of the audience's."""
    p = _ERASURE.get((id(s), erasable))
    if p is None:
        import yaml

        from streamproc.policy.model import parse_policy

        raw = yaml.safe_load(POLICY_FILE.read_text())
        raw["audiences"]["a1"]["subject"] = "customer_id"
        raw["audiences"]["a1"]["tags"]["EMAIL"] = {"op": "encrypt_deterministic", **({"erasable": True} if erasable else {})}
        policy = parse_policy(raw)
        keys = PseudonymKeys(s.kms, PSEUDONYM_SECRET)
        p = Pipeline(
            routes=build_routes([{"sources": [SOURCE_TOPIC], "destinations": [
                {"topic": f"{SOURCE_TOPIC}.a1", "audience": "a1", "kek": "a1-kek"}]}]),
            policy=policy, opener=Opener.for_kms(s.kms), kms=s.kms, schemas=s.pipelines[1].schemas, keys=keys,
        )  # fmt: skip
        if erasable:
            p.erasure = erasure_table(s, keys)
        saved, native.ENABLED = native.ENABLED, False
        try:
            p.explain(s.schema_id, f"{SOURCE_TOPIC}.a1")
        finally:
            native.ENABLED = saved
        _ERASURE[(id(s), erasable)] = p
    return p


def run_deterministic(erasable: bool, s: Setup, n: int, batch: int) -> int:
    """(c) with a1's e-mail ``encrypt_deterministic`` (plain or erasable).  The erasable
    table is warm after the warm-up round (every subject has a committed key): the steady
    state; the cost of a new subject's key is the component case below."""
    p = deterministic_pipeline(s, erasable)
    inputs = s.inputs[:n]
    done = 0
    for i in range(0, n, batch):
        res = p.process(inputs[i : i + batch])
        if res.quarantined or res.stats.withheld:
            raise RuntimeError("erasure benchmark records were quarantined or withheld")
        if p.erasure is not None:
            p.erasure.committed(0)  # what the worker does once the batch's transaction committed
        done += len(res.outputs)
    return done


def run_new_subject_keys(s: Setup, n: int, batch: int) -> int:
    """A new subject's key: created on first sight (random key and id, table insert) and
    sealed for the key topic (``take_writes``, one ``seal_many`` per batch), per subject."""
    keys = PseudonymKeys(s.kms, PSEUDONYM_SECRET)
    table = erasure_table(s, keys)
    cipher = table.cipher_fn("a1")
    subjects = [f"subject-{i}".encode() for i in range(n)]
    for i in range(0, n, batch):
        for subj in subjects[i : i + batch]:
            cipher(subj)
        table.take_writes()
        table.committed(0)
    return n


#: name -> (label, function(setup, n, batch) -> records handled)
CASES: dict[str, tuple[str, Callable[[Setup, int, int], int]]] = {
    "baseline": ("(a) fastavro decode+encode (no crypto)", run_baseline),
    "plan": ("(b) plan fn alone (a1)", run_plan),
    "pipeline_1": ("(c) Pipeline.process, 1 audience", lambda s, n, b: run_pipeline(s, 1, n, b)),
    "pipeline_2": ("(d) Pipeline.process, 2 audiences", lambda s, n, b: run_pipeline(s, 2, n, b)),
    "plan_py": ("(b py) generated Python plan fn (a1)", lambda s, n, b: run_plan(s, n, b, python=True)),
    "pipeline_1_py": ("(c py) (c), generated Python plans", lambda s, n, b: run_pipeline(s, 1, n, b, python=True)),
    "pipeline_2_py": ("(d py) (d), generated Python plans", lambda s, n, b: run_pipeline(s, 2, n, b, python=True)),
    "pipeline_2_consent": ("(d) + consent check (2 audiences)", run_consent),
    "open": ("    component: Opener.open", run_open),
    "seal": ("    component: Sealer.seal_many", run_seal),
    "plan_dp_laplace": ("(b) + dp_noise laplace (long)", lambda s, n, b: run_dp("plan_dp_laplace", s, n, b)),
    "plan_dp_gaussian": ("(b) + dp_noise gaussian (long)", lambda s, n, b: run_dp("plan_dp_gaussian", s, n, b)),
    "plan_rr": ("(b) + randomized_response (enum)", lambda s, n, b: run_dp("plan_rr", s, n, b)),
    "plan_rr_bool": ("(b) + randomized_response (boolean)", lambda s, n, b: run_dp("plan_rr_bool", s, n, b)),
    "risk": ("    component: RiskWindow.add (3 QIs, l)", run_risk),
    "pipeline_1_risk": ("(c) + risk measured (3 QIs, l)", lambda s, n, b: run_pipeline_risk(None, s, n, b)),
    "pipeline_1_risk_suppress": ("(c) + risk enforced (suppress)", lambda s, n, b: run_pipeline_risk("suppress", s, n, b)),
    "pipeline_1_det": ("(c) + e-mail encrypt_deterministic (py)", lambda s, n, b: run_deterministic(False, s, n, b)),
    "pipeline_1_erasable": ("(c) + e-mail erasable, keys warm (py)", lambda s, n, b: run_deterministic(True, s, n, b)),
    "erasure_new_key": ("    component: new subject key + seal", run_new_subject_keys),
}


def measure(
    s: Setup, cases: Sequence[str], n: int, batch: int, repeat: int
) -> dict[str, dict[str, Any]]:
    """Warm up each case once, then time ``repeat`` rounds; the rounds interleave the cases
    so that a burst of load from other processes hits all of them alike.

    Two clocks per round: wall time (``perf_counter``) and this thread's CPU time
    (``thread_time``).  On a quiet core they agree; when other processes compete for the
    core, wall time also counts the time we were waiting, CPU time does not, so the CPU
    figure is the more stable one on a shared machine (both are reported).
    """
    for name in cases:
        CASES[name][1](s, min(n, 2 * batch), batch)  # warm-up: compile plans, fill caches
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu_times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name in cases:
            gc.collect()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            done = CASES[name][1](s, n, batch)
            secs = time.perf_counter() - t0
            cpu = time.thread_time() - c0
            if done != n:
                raise RuntimeError(f"{name}: handled {done} of {n} records")
            times[name].append(secs)
            cpu_times[name].append(cpu)
    out: dict[str, dict[str, Any]] = {}
    for name in cases:
        med = statistics.median(times[name])
        cpu_med = statistics.median(cpu_times[name])
        out[name] = {
            "label": CASES[name][0],
            "records": n,
            "seconds": times[name],
            "cpu_seconds": cpu_times[name],
            "median_s": med,
            "records_per_s": n / med,
            "us_per_record": med / n * 1e6,
            "cpu_records_per_s": n / cpu_med,
            "cpu_us_per_record": cpu_med / n * 1e6,
        }
    if "baseline" in out:
        base = out["baseline"]["records_per_s"]
        cpu_base = out["baseline"]["cpu_records_per_s"]
        for r in out.values():
            r["ratio_to_baseline"] = r["records_per_s"] / base
            r["cpu_ratio_to_baseline"] = r["cpu_records_per_s"] / cpu_base
    return out


def pin(cpu: int | None) -> int | None:
    """Pin this process to one CPU (the last one by default); returns it."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    chosen = cpus[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'case':<40} {'records/s':>10} {'us/rec':>7} {'x base':>7} | "
        f"{'CPU rec/s':>10} {'us/rec':>7} {'x base':>7}",
        "-" * 98,
    ]
    for r in results.values():
        ratio, cratio = r.get("ratio_to_baseline"), r.get("cpu_ratio_to_baseline")
        lines.append(
            f"{r['label']:<40} {r['records_per_s']:>10,.0f} {r['us_per_record']:>7.2f} "
            f"{'' if ratio is None else f'{ratio:.2f}x':>7} | "
            f"{r['cpu_records_per_s']:>10,.0f} {r['cpu_us_per_record']:>7.2f} "
            f"{'' if cratio is None else f'{cratio:.2f}x':>7}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--records", type=int, default=50_000, help="input records per timed repetition"
    )
    ap.add_argument("--distinct", type=int, default=2000, help="distinct records, cycled (>= 1000)")
    ap.add_argument(
        "--repeat", type=int, default=7, help="timed repetitions; the median is reported"
    )
    ap.add_argument("--batch", type=int, default=1000, help="records per Pipeline.process call")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last one)")
    ap.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    ap.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}")
    cpu = pin(args.cpu)
    load_before = os.getloadavg()
    s = setup(args.records, args.distinct)
    try:
        results = measure(s, cases, args.records, args.batch, args.repeat)
    finally:
        s.close()
    load_after = os.getloadavg()
    print(
        f"streamproc bench_core · python {platform.python_version()} · pinned to cpu {cpu} of {os.cpu_count()} · "
        f"{args.records} records/rep ({args.distinct} distinct) · batch {args.batch} · median of {args.repeat} after warm-up"
    )
    print(f"plan functions: {type(s.plan_fn).__name__} (compiled interpreter built: {native.available()}, enabled: {native.ENABLED})")
    print(
        f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min); "
        "left: wall clock, right: CPU time of this thread (robust to other load)"
    )
    print(table(results))
    if "pipeline_1" in results:  # the cost of risk measurement, as a share of (c), same run
        base_us = results["pipeline_1"]["cpu_us_per_record"]
        for name in ("pipeline_1_risk", "pipeline_1_risk_suppress"):
            if name in results:
                added = results[name]["cpu_us_per_record"] - base_us
                results[name]["cpu_added_to_pipeline_1"] = added / base_us
                print(f"{CASES[name][0]}: +{added:.2f} us/record CPU, +{added / base_us:.1%} of (c)")
    if "pipeline_1_det" in results and "pipeline_1_erasable" in results:  # erasable vs plain, same run
        det, era = results["pipeline_1_det"], results["pipeline_1_erasable"]
        ratio = era["cpu_records_per_s"] / det["cpu_records_per_s"]
        era["cpu_throughput_vs_det"] = ratio
        print(
            f"erasable vs plain encrypt_deterministic: {ratio:.2f}x the throughput (CPU), "
            f"+{era['cpu_us_per_record'] - det['cpu_us_per_record']:.2f} us/record"
        )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "pinned_cpu": cpu,
                    "records": args.records,
                    "distinct": args.distinct,
                    "batch": args.batch,
                    "repeat": args.repeat,
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                    "native": {"available": native.available(), "enabled": native.ENABLED},
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
