"""Re-identification risk in Pipeline.process: the windows see what each audience receives,
and enforcement (suppress, generalize_more) decides as an independent count says.

Expected values are computed here from the *inputs* with plain Python (the tuple each
record would get, counted over the records before it), and the measurements are checked
against pycanon over the decoded outputs -- what a subscriber actually receives.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordOpener, RecordSealer
from streamproc.crypto.envelope import Opener
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.pipeline.core import Destination, InputRecord, Pipeline, Route
from streamproc.policy.model import parse_policy
from streamproc.schema.registry import CachingSchemaSource, DirectorySchemaSource
from tests.unit.conftest import PSEUDONYM

pd = pytest.importorskip("pandas")
anonymity = pytest.importorskip("pycanon.anonymity")

SCHEMA: dict[str, Any] = {
    "type": "record", "name": "Visit", "namespace": "test.risk", "fields": [
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
QI_FIELDS = ["postcode", "birth_date", "gender"]
K = 3
LADDER = {"POSTCODE": [{"op": "generalize", "prefix": 2}, {"op": "generalize", "prefix": 1}]}


def risk(**extra: Any) -> dict[str, Any]:
    return {"quasi_identifiers": QI, "k": K, "l": 2, "sensitive": "DIAGNOSIS", "window": "1h", **extra}


POLICY = {
    "keys": {"pseudonym": PSEUDONYM},
    "audiences": {
        "measured": {"record_key": "keep", "risk": risk(), "tags": RULES},
        "suppressed": {"record_key": "keep", "risk": risk(action="suppress"), "tags": RULES},
        "laddered": {"record_key": "keep", "risk": risk(action="generalize_more", ladder=LADDER), "tags": RULES},
        "plain": {"record_key": "keep", "tags": RULES},
    },
}
DESTS = (
    Destination("visits.measured", "measured", "analytics-kek"),
    Destination("visits.suppressed", "suppressed", "fraud-kek"),
    Destination("visits.laddered", "laddered", "support-kek"),
    Destination("visits.plain", "plain", "analytics-kek"),
)
DISTRICTS = ["SW1A", "SW2B", "SE1X", "NW3Q", "N7AB", "N1CD"]


class Kit:
    def __init__(self, tmp: Path, keyring: LocalKeyring, policy: dict[str, Any] = POLICY) -> None:
        (tmp / "schemas").mkdir(exist_ok=True)
        self.schemas = CachingSchemaSource(DirectorySchemaSource(tmp / "schemas"))
        self.keyring = keyring
        self.policy = parse_policy(policy)
        self.sealer = RecordSealer(keyring, "orders-kek", "visits", SCHEMA, self.schemas)
        self.clock = [1000.0]

    def pipeline(self) -> Pipeline:
        return Pipeline(
            routes=[Route(("visits",), DESTS)], policy=self.policy, opener=Opener.for_kms(self.keyring),
            kms=self.keyring, schemas=self.schemas, keys=PseudonymKeys(self.keyring, PSEUDONYM),
            clock=lambda: self.clock[0],
        )

    def inputs(self, records: list[dict[str, Any]], start: int = 0) -> list[InputRecord]:
        return [InputRecord("visits", 0, start + i, None, v, 1_700_000_000_000)
                for i, v in enumerate(self.sealer.seal_many(records))]

    def received(self, outputs: list[Any], topic: str) -> list[dict[str, Any]]:
        opener = RecordOpener(self.keyring, self.schemas)
        return [opener.decode(topic, o.value) for o in outputs if o.topic == topic]


def visits(n: int, seed: int) -> list[dict[str, Any]]:
    """Skewed quasi-identifiers: a few frequent tuples and a long tail of rare ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = DISTRICTS[min(int(rng.expovariate(0.9)), len(DISTRICTS) - 1)]
        out.append({
            "visit_id": f"v{i}",
            "postcode": f"{d} {rng.randint(1, 9)}{rng.choice('AB')}",
            "birth_date": rng.randint(0, 3 * 365),  # 1970..1972
            "gender": rng.choice(["F", "M", "F", "M", "X"]),
            "diagnosis": rng.choice(["flu", "asthma", "covid"]),
        })
    return out


def year_start(days: int) -> dt.date:
    """generalize to: year of an Avro date (as a subscriber decodes it), independently."""
    return dt.date((dt.date(1970, 1, 1) + dt.timedelta(days=days)).year, 1, 1)


def base_tuple(v: dict[str, Any]) -> tuple[Any, ...]:
    return (v["postcode"].split(" ")[0], year_start(v["birth_date"]), v["gender"])


def level(t: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """The ladder independently: postcode prefix 2, then prefix 1 (all districts are longer)."""
    if n == 0:
        return t
    return (t[0][: 3 - n], *t[1:])


def expected(records: list[dict[str, Any]], levels: int) -> list[tuple[Any, ...] | None]:
    """What enforcement must release per record: the lowest level whose tuple is shared by
    at least K of the records so far (this one included), else None (suppressed)."""
    counts = [Counter() for _ in range(levels + 1)]  # type: list[Counter[tuple[Any, ...]]]
    out: list[tuple[Any, ...] | None] = []
    for v in records:
        chosen = None
        for n in range(levels + 1):
            t = level(base_tuple(v), n)
            counts[n][t] += 1
            if chosen is None and counts[n][t] >= K:
                chosen = t
        out.append(chosen)
    return out


def pycanon_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    df = pd.DataFrame([{f: str(r[f]) for f in [*QI_FIELDS, "diagnosis"]} for r in rows])
    sizes = Counter(tuple(str(r[f]) for f in QI_FIELDS) for r in rows)
    return {
        "k": int(anonymity.k_anonymity(df, QI_FIELDS)),
        "l": int(anonymity.l_diversity(df, QI_FIELDS, ["diagnosis"])),
        "below_k": sum(c for c in sizes.values() if c < K) / len(rows),
        "unique": sum(1 for c in sizes.values() if c == 1) / len(rows),
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_enforcement_and_measurement_match_independent_counts(tmp_path: Path, keyring: LocalKeyring, seed: int) -> None:
    kit = Kit(tmp_path, keyring)
    p = kit.pipeline()
    records = visits(400, seed)
    outputs: list[Any] = []
    last: dict[str, Any] = {}
    enforced: Counter[tuple[str, str]] = Counter()
    for b in range(0, len(records), 70):  # several batches: the windows carry over
        res = p.process(kit.inputs(records[b:b + 70], b))
        assert not res.quarantined
        outputs += res.outputs
        last = res.stats.risk
        enforced.update(res.stats.risk_enforced)
    measured = kit.received(outputs, "visits.measured")
    plain = kit.received(outputs, "visits.plain")
    assert measured == plain  # measuring changes nothing
    for topic, aud, levels in (("visits.suppressed", "suppressed", 0), ("visits.laddered", "laddered", 2)):
        got = kit.received(outputs, topic)
        want = expected(records, levels)
        assert [None if r["postcode"] is None else (r["postcode"], r["birth_date"], r["gender"]) for r in got] == want
        # a suppressed record has all its quasi-identifiers null, and nothing else changed
        for r, p_ in zip(got, plain, strict=True):
            assert r["visit_id"] == p_["visit_id"] and r["diagnosis"] == p_["diagnosis"]
            assert (r["postcode"] is None) == (r["birth_date"] is None) == (r["gender"] is None)
        n_sup = sum(1 for t in want if t is None)
        n_gen = sum(1 for t, v in zip(want, records, strict=True) if t is not None and t != base_tuple(v))
        assert n_sup > 0 and (n_gen > 0) == (levels > 0)
        assert enforced[(aud, "suppressed")] == n_sup and enforced[(aud, "generalized")] == n_gen
    # the gauges: the last batch's report equals pycanon over everything each audience received
    for topic, aud in (("visits.measured", "measured"), ("visits.suppressed", "suppressed"),
                       ("visits.laddered", "laddered")):
        rep, ref = last[aud], pycanon_report(kit.received(outputs, topic))
        assert rep.records == len(records)
        assert (rep.min_class, rep.min_l) == (ref["k"], ref["l"])
        assert rep.share_below_k == pytest.approx(ref["below_k"])
        assert rep.share_unique == pytest.approx(ref["unique"])
    assert "plain" not in last


def test_enforcement_counts_per_action(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = Kit(tmp_path, keyring)
    records = visits(300, 7)
    res = kit.pipeline().process(kit.inputs(records))
    sup = expected(records, 0)
    lad = expected(records, 2)
    assert res.stats.risk_enforced.get(("suppressed", "suppressed"), 0) == sum(1 for t in sup if t is None)
    assert res.stats.risk_enforced.get(("laddered", "suppressed"), 0) == sum(1 for t in lad if t is None)
    assert res.stats.risk_enforced.get(("laddered", "generalized"), 0) == sum(
        1 for t, v in zip(lad, records, strict=True) if t is not None and t != base_tuple(v))
    assert not any(a == "measured" for a, _ in res.stats.risk_enforced)


def test_rollback_counts_an_aborted_batch_once(tmp_path: Path, keyring: LocalKeyring) -> None:
    """A batch whose transaction aborted comes again: after rollback the outputs are those of
    a pipeline that never saw it (a double count would release records too early)."""
    kit = Kit(tmp_path, keyring)
    records = visits(200, 11)
    first, second = kit.inputs(records[:120]), kit.inputs(records[120:], 120)
    p = kit.pipeline()
    p.process(first)
    sp = p.savepoint()
    p.process(second)  # "aborted"
    p.rollback(sp)
    again = p.process(second)
    fresh = kit.pipeline()
    fresh.process(first)
    ref = fresh.process(second)
    for topic in ("visits.suppressed", "visits.laddered"):
        assert kit.received(again.outputs, topic) == kit.received(ref.outputs, topic)
    assert again.stats.risk["suppressed"] == ref.stats.risk["suppressed"]


def test_windows_expire_by_the_batch_clock(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = Kit(tmp_path, keyring)
    p = kit.pipeline()
    same = [{**visits(1, 5)[0], "visit_id": f"v{i}"} for i in range(K)]
    out = p.process(kit.inputs(same))
    got = kit.received(out.outputs, "visits.suppressed")
    assert [r["postcode"] is None for r in got] == [True] * (K - 1) + [False]
    kit.clock[0] += 3600.0  # the window (1h) has passed: the class starts again from 0
    out = p.process(kit.inputs(same[:1], K))
    assert kit.received(out.outputs, "visits.suppressed")[0]["postcode"] is None
    assert out.stats.risk["suppressed"].records == 1


def test_output_schema_of_an_enforced_audience(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = Kit(tmp_path, keyring)
    p = kit.pipeline()
    sid = kit.sealer.schema_id
    sup = {f["name"]: f for f in p.explain(sid, "visits.suppressed")[0]["fields"]}
    for name in QI_FIELDS:
        assert sup[name]["type"][0] == "null" and sup[name]["default"] is None
        assert sup[name]["streamproc.risk"] == {"k": K, "action": "suppress"}
    assert sup["diagnosis"]["type"] == "string"
    plain = {f["name"]: f for f in p.explain(sid, "visits.plain")[0]["fields"]}
    measured = {f["name"]: f for f in p.explain(sid, "visits.measured")[0]["fields"]}
    assert plain == measured  # measuring alone changes no schema
    assert plain["postcode"]["type"] == "string" and "streamproc.risk" not in plain["postcode"]


@pytest.mark.parametrize(
    ("risk_spec", "message"),
    [
        (risk(action="hold"), "action hold needs 'hold: {max_records: N}'"),
        (risk(action="hold", hold={"max_records": 10}), "action: hold does not take l"),
        ({**risk(action="hold", hold={"max_records": 0}), "l": None, "sensitive": None}, "hold.max_records is an integer"),
        (risk(action="suppress", hold={"max_records": 5}), "'hold' applies only with action: hold"),
        (risk(action="generalize_more"), "generalize_more needs 'ladder'"),
        (risk(action="suppress", ladder=LADDER), "'ladder' applies only with action: generalize_more"),
        (risk(action="generalize_more", ladder={"DIAGNOSIS": [{"op": "generalize", "prefix": 1}]}),
         "not one of the quasi_identifiers"),
        (risk(action="generalize_more", ladder={"POSTCODE": [{"op": "token"}]}), "a ladder step is one of"),
        (risk(action="generalize_more", ladder={"POSTCODE": [{"op": "redact"}]}), "redact to null is what"),
        (risk(action="generalize_more", ladder={"POSTCODE": []}), "non-empty list of rules"),
        (risk(action="freeze"), "'action' is one of"),
    ],
)
def test_bad_enforcement_settings_are_refused_at_load(risk_spec: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy({"audiences": {"a": {"record_key": "keep", "risk": risk_spec, "tags": RULES}}})


@pytest.mark.parametrize(
    ("ladder", "message"),
    [
        ({"BIRTH_DATE": [{"op": "mask", "keep_first": 2}]}, r"risk.ladder.BIRTH_DATE level 1: mask does not apply"),
        ({"GENDER": [{"op": "redact", "value": "?"}]}, r"risk.ladder.GENDER level 1: redact constant"),
        ({"AGE": [{"op": "generalize", "bucket": 10}, {"op": "mask", "keep_first": 1}]},
         r"risk.ladder.AGE level 2 \(mask\) turns int into string; a ladder step keeps the type"),
    ],
)
def test_a_ladder_step_must_keep_the_type(ladder: dict[str, Any], message: str) -> None:
    """Types are known only with the schema: the plan (which ``policy check`` compiles for
    every schema and audience) refuses a step that would change a quasi-identifier's type."""
    from streamproc.pipeline.plan import build_plan
    from streamproc.schema import avro

    schema = {**SCHEMA, "fields": [*SCHEMA["fields"], {"name": "age", "type": "int", "confluent:tags": ["AGE"]}]}
    pol = parse_policy({"audiences": {"a": {"record_key": "keep", "tags": {**RULES, "AGE": "keep"}, "risk": {
        **risk(action="generalize_more", ladder=ladder), "quasi_identifiers": [*QI, "AGE"]}}}})
    with pytest.raises(PolicyError, match=message):
        build_plan(avro.parse(schema), pol.audience("a"), None)


def test_the_data_map_shows_enforcement_and_its_diff(tmp_path: Path) -> None:
    """The catalog names the action (enforcement changes outputs), and ``catalog --diff``
    reports turning it on."""
    from streamproc.pipeline.catalog import data_map, diff, render_markdown
    from streamproc.schema.registry import RegisteredSchema

    schemas = [RegisteredSchema(1, json.dumps(SCHEMA), "visits")]
    new = data_map(parse_policy(POLICY), schemas)
    assert new["audiences"]["suppressed"]["risk"]["action"] == "suppress"
    assert "action" not in new["audiences"]["measured"]["risk"]
    assert "k 3, l 2 over POSTCODE, BIRTH_DATE, GENDER, enforced (suppress)" in render_markdown(new)
    measured_only = {**POLICY, "audiences": {**POLICY["audiences"], "suppressed": POLICY["audiences"]["measured"]}}
    old = data_map(parse_policy(measured_only), schemas)
    changes = [c for c in diff(old, new) if c["attribute"] == "risk"]
    assert [(c["audience"], c["after"].get("action")) for c in changes] == [("suppressed", "suppress")]


def test_a_ladder_step_that_raises_suppresses_that_record_not_the_batch(tmp_path: Path, keyring: LocalKeyring) -> None:
    """A ladder step that cannot coarsen a value (a date past year 9999: ``generalize to:
    month`` overflows) fails that record closed -- its quasi-identifiers null, counted as
    suppressed, even when its level-0 class reached k -- and every other record is
    enforced as if the odd ones were not there (raising would stop the worker on every
    retry of the same batch)."""
    rules = {**RULES, "BIRTH_DATE": "keep"}
    ladder = {"BIRTH_DATE": [{"op": "generalize", "to": "month"}, {"op": "generalize", "to": "year"}]}
    policy = {**POLICY, "audiences": {
        **{a: {**spec, "tags": rules} for a, spec in POLICY["audiences"].items()},
        "laddered": {"record_key": "keep", "tags": rules, "risk": risk(action="generalize_more", ladder=ladder)},
    }}
    kit = Kit(tmp_path, keyring, policy)
    odd_days = 2**31 - 1  # a valid Avro date (int), far beyond what datetime can hold
    records = visits(300, 13)
    odd_at = {40, 41, 150, 151, 299}  # K + 2 identical odd records: their level-0 class reaches k
    for i in sorted(odd_at):
        records.insert(i, {"visit_id": f"odd{i}", "postcode": "SW1A 1A", "birth_date": odd_days,
                           "gender": "F", "diagnosis": "flu"})
    p = kit.pipeline()
    outputs: list[Any] = []
    enforced: Counter[tuple[str, str]] = Counter()
    for b in range(0, len(records), 100):
        res = p.process(kit.inputs(records[b:b + 100], b))
        assert not res.quarantined
        outputs += res.outputs
        enforced.update(res.stats.risk_enforced)

    def at_level(v: dict[str, Any], n: int) -> tuple[Any, ...]:
        d = dt.date(1970, 1, 1) + dt.timedelta(days=v["birth_date"])
        d = d if n == 0 else d.replace(day=1) if n == 1 else d.replace(month=1, day=1)
        return (v["postcode"].split(" ")[0], d, v["gender"])

    counts = [Counter() for _ in range(3)]  # type: list[Counter[tuple[Any, ...]]]
    want: list[tuple[tuple[Any, ...], int] | None] = []
    for v in records:
        if v["birth_date"] == odd_days:
            want.append(None)
            continue
        chosen = None
        for n in range(3):
            t = at_level(v, n)
            counts[n][t] += 1
            if chosen is None and counts[n][t] >= K:
                chosen = (t, n)
        want.append(chosen)
    got = kit.received(outputs, "visits.laddered")
    assert [r["visit_id"] for r in got] == [v["visit_id"] for v in records]
    assert [None if r["postcode"] is None else (r["postcode"], r["birth_date"], r["gender"]) for r in got] == [
        None if w is None else w[0] for w in want]
    assert all(r["birth_date"] is None and r["gender"] is None for r in got if r["visit_id"].startswith("odd"))
    n_gen = sum(1 for w in want if w is not None and w[1] > 0)
    assert n_gen > 0
    assert enforced[("laddered", "suppressed")] == sum(1 for w in want if w is None)
    assert enforced[("laddered", "generalized")] == n_gen
