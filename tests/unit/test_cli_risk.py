"""``streamproc risk``: k-anonymity / l-diversity of what an audience received, from the
JSON lines ``streamproc consume`` prints; cross-checked against pycanon."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest
from click.testing import CliRunner

from streamproc.cli.main import cli
from streamproc.pipeline.codegen import compile_plan
from streamproc.pipeline.plan import build_plan
from streamproc.policy.model import load_policy
from streamproc.schema import avro
from streamproc.schema.avro import Record

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
POLICY = """
audiences:
  research:
    record_key: keep
    risk: {quasi_identifiers: [POSTCODE, BIRTH_DATE, GENDER], k: K, l: 2, sensitive: DIAGNOSIS, window: 1h}
    tags:
      PUBLIC: keep
      POSTCODE: {op: generalize, until: " "}
      BIRTH_DATE: {op: generalize, to: year}
      GENDER: keep
      DIAGNOSIS: keep
"""
QI_FIELDS = ["postcode", "birth_date", "gender"]


def workspace(tmp_path: Path, k: int) -> tuple[Path, Path]:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "visit.avsc").write_text(json.dumps(SCHEMA))
    (tmp_path / "policy.yaml").write_text(POLICY.replace("K", str(k)))
    return tmp_path / "policy.yaml", tmp_path / "schemas"


def received(policy: Path, n: int, seed: int, districts: int = 3, start: float = 1_700_000_000.0) -> list[dict[str, Any]]:
    """What the research audience receives: n random visits through the real plan, decoded,
    in `streamproc consume`'s line format (one second apart)."""
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plan = build_plan(node, load_policy(policy).audience("research"), None)
    fn, _ = compile_plan(plan, node)
    writer, reader = fastavro.parse_schema(avro.strip_logical(SCHEMA)), fastavro.parse_schema(plan.out_schema)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        rec = {
            "visit_id": f"v{i}",
            "postcode": f"{['SW1A', 'E1', 'N7'][i % 3] if districts == 3 else f'D{rng.randrange(districts)}'} "
                        f"{rng.randint(1, 9)}{rng.choice('AB')}",
            "birth_date": rng.randint(0, 4 * 365),  # 1970..1973: four birth years
            "gender": rng.choice(["F", "M", "F", "M", "X"]),
            "diagnosis": rng.choice(["flu", "asthma", "covid"]),
        }
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, rec)
        value = fastavro.schemaless_reader(io.BytesIO(b"".join(fn(buf.getvalue()))), reader, None)
        ts = dt.datetime.fromtimestamp(start + i, dt.UTC).isoformat().replace("+00:00", "Z")
        lines.append({"topic": "visits.research", "partition": 0, "offset": i, "timestamp": ts,
                      "key": f"v{i}", "value": value})
    return lines


def as_input(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(x, default=str) + "\n" for x in lines)


def pycanon(values: list[dict[str, Any]]) -> tuple[int, int]:
    df = pd.DataFrame([{f: str(v[f]) for f in [*QI_FIELDS, "diagnosis"]} for v in values])
    return int(anonymity.k_anonymity(df, QI_FIELDS)), int(anonymity.l_diversity(df, QI_FIELDS, ["diagnosis"]))


def run(policy: Path, schemas: Path, text: str, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["risk", "--policy", str(policy), "--schemas", str(schemas),
                                    "--audience", "research", "--json", *extra], input=text)


@pytest.mark.parametrize(("seed", "districts"), [(1, 3), (2, 60), (3, 150), (4, 400)])
def test_report_matches_pycanon_on_the_received_window(tmp_path: Path, seed: int, districts: int) -> None:
    """From 36 large classes (k ~ 50) to hundreds of small ones (k = 1, l = 1)."""
    policy, schemas = workspace(tmp_path, k=2)
    lines = received(policy, 5000, seed, districts)  # 5000 s: the 1 h window holds the last 3600
    res = run(policy, schemas, as_input(lines))
    report = json.loads(res.output)
    window = [x["value"] for x in lines[-3600:]]
    k, l_div = pycanon(window)
    assert (report["k"], report["l"]) == (k, l_div)
    assert report["records_read"] == 5000 and report["records_in_window"] == 3600
    # generalization did its job: birth dates are years now (day 1 of January)
    assert {v["birth_date"].timetuple()[1:3] for v in window} == {(1, 1)}
    assert res.exit_code == (0 if report["meets_target"] else 1)
    assert report["meets_target"] == (k >= 2 and l_div >= 2)


def test_exit_code_says_whether_the_target_is_met(tmp_path: Path) -> None:
    policy, schemas = workspace(tmp_path, k=2)
    lines = received(policy, 3000, 7)
    ok = run(policy, schemas, as_input(lines))
    assert ok.exit_code == 0, ok.output  # 72 generalized tuples, ~40 records each
    # one record with a new (rare) postcode district makes a class of 1
    rare = json.loads(json.dumps(lines[-1], default=str))
    rare["value"]["postcode"] = "ZZ9"
    bad = run(policy, schemas, as_input([*lines, rare]))
    report = json.loads(bad.output)
    assert bad.exit_code == 1 and report["k"] == 1 and report["share_unique"] > 0
    text = CliRunner().invoke(cli, ["risk", "--policy", str(policy), "--schemas", str(schemas),
                                    "--audience", "research"], input=as_input([*lines, rare]))
    assert "TARGET NOT MET" in text.output and "ZZ9" not in text.output  # counts, never values


def test_bad_input_and_missing_settings(tmp_path: Path) -> None:
    policy, schemas = workspace(tmp_path, k=2)
    res = run(policy, schemas, '{"value": {}}\nnot json\n')
    assert res.exit_code == 65 and "line 2" in res.output and "not json" not in res.output
    assert run(policy, schemas, "").exit_code == 65
    (tmp_path / "bare.yaml").write_text("audiences:\n  research:\n    record_key: keep\n    tags: {PUBLIC: keep}\n")
    bare = CliRunner().invoke(cli, ["risk", "--policy", str(tmp_path / "bare.yaml"), "--schemas", str(schemas),
                                    "--audience", "research"], input="{}\n")
    assert bare.exit_code == 1 and "--qi" in bare.output
    unknown = run(policy, schemas, "{}\n", "--qi", "SHOE_SIZE", "--k", "3")
    assert unknown.exit_code == 1 and "SHOE_SIZE" in unknown.output
