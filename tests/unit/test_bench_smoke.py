"""The core benchmark keeps working (benchmarks/bench_core.py), and the hot-path shortcuts
it motivated keep their reference semantics.  No timing assertions here: only that every
case runs, handles the records it was given and produces what it should."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import fastavro
import pytest

from streamproc.client import RecordOpener
from streamproc.crypto import provenance
from streamproc.crypto.pseudonym import b64u, hmac_sha256_fn, make_text_tokenizer, make_tokenizer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_core.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_core", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_core"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load()


@pytest.fixture(scope="module")
def setup(bench: ModuleType) -> Iterator[object]:
    s = bench.setup(200, n_distinct=50)
    yield s
    s.close()


def test_reference_record_shape(bench: ModuleType) -> None:
    schema = json.loads(bench.SCHEMA_FILE.read_text())
    assert len(schema["fields"]) == 12
    kinds = {
        f["name"]: (f["type"]["type"] if isinstance(f["type"], dict) else f["type"])
        for f in schema["fields"]
    }
    assert kinds["shipping"] == "record" and kinds["items"] == "array"
    sensitive = [f["name"] for f in schema["fields"] if f["confluent:tags"] != ["PUBLIC"]]
    assert len(sensitive) == 4


def test_every_case_runs_and_counts_match(bench: ModuleType, setup: object) -> None:
    results = bench.measure(setup, list(bench.CASES), 200, 64, 1)
    assert set(results) == set(bench.CASES)
    for name, r in results.items():
        assert r["records"] == 200, name
        assert r["records_per_s"] > 0 and r["ratio_to_baseline"] > 0, name
    assert results["baseline"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert "x base" in bench.table(results)


def test_pipeline_outputs_open_and_match_the_policy(bench: ModuleType, setup: object) -> None:
    s = setup
    for n_aud in (1, 2):
        res = s.pipelines[n_aud].process(s.inputs[:100])  # type: ignore[attr-defined]
        assert not res.quarantined
        assert len(res.outputs) == 100 * n_aud
        assert sum(res.stats.egress_records.values()) == 100 * n_aud
        assert res.stats.transforms == {
            "token": 100 * n_aud,
            "mask": 100 * n_aud,
            "generalize": 100 * n_aud,
        }
    opener = RecordOpener(s.kms, s.pipelines[1].schemas)  # type: ignore[attr-defined]
    res = s.pipelines[2].process(s.inputs[:10])  # type: ignore[attr-defined]
    for out in res.outputs:
        src = s.records[out.source.offset * bench.PARTITIONS + out.source.partition]  # type: ignore[attr-defined]
        rec = opener.decode(out.topic, out.value)
        assert "email" not in rec  # drop
        assert (
            rec["customer_id"].startswith("tk") and rec["customer_id"] != src["customer_id"]
        )  # token
        assert (
            rec["card_number"].endswith(src["card_number"][-4:]) and "*" in rec["card_number"]
        )  # mask
        assert rec["ip_address"].endswith(
            "/24" if out.topic.endswith("a1") else "/16"
        )  # generalize
        assert rec["items"] == src["items"] and rec["shipping"] == src["shipping"]  # PUBLIC: kept
        [(name, value)] = out.headers  # one compact provenance header
        prov = provenance.parse_header(value)
        assert name == provenance.H_PROVENANCE and prov.audience == out.topic.rsplit(".", 1)[1]
        keys = s.pipelines[2].keys  # type: ignore[attr-defined]
        assert prov.ref is not None and provenance.resolve_reference(
            keys.provenance_key(prov.audience)[1], prov.ref, [out.source.topic]
        ) == (out.source.topic, out.source.partition, out.source.offset)


def test_plan_fn_output_is_valid_avro(bench: ModuleType, setup: object) -> None:
    s = setup
    out_schema = s.pipelines[1].explain(s.schema_id, f"{bench.SOURCE_TOPIC}.a1")[0]  # type: ignore[attr-defined]
    parsed = fastavro.parse_schema(out_schema)
    for p in s.plaintexts:  # type: ignore[attr-defined]
        out = b"".join(s.plan_fn(p))  # type: ignore[attr-defined]
        rec = fastavro.schemaless_reader(io.BytesIO(out[5:]), parsed, None)
        assert isinstance(rec, dict)
        assert set(rec) == {f["name"] for f in out_schema["fields"]}


def test_main_writes_json(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        rc = bench.main(
            [
                "--records",
                "120",
                "--distinct",
                "40",
                "--repeat",
                "1",
                "--batch",
                "50",
                "--cases",
                "baseline,plan,pipeline_1",
                "--json",
                str(out),
            ]
        )
    finally:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)  # main() pins the process; undo it for other tests
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"baseline", "plan", "pipeline_1"}
    assert all(r["records"] == 120 for r in data["results"].values())


# -- the hot-path shortcuts are exact -----------------------------------------------------------


@pytest.mark.parametrize("klen", [0, 1, 20, 32, 63, 64, 65, 131])
def test_precomputed_hmac_and_token_format_match_the_stdlib(klen: int) -> None:
    key = bytes(range(klen % 256)) * (klen // 256 + 1)
    key = (key + b"\xaa" * klen)[:klen]
    mac = hmac_sha256_fn(key)
    tok = make_tokenizer(7, key)
    for data in (b"", b"x", b"cust-00012345", os.urandom(64), os.urandom(1000)):
        ref = hmac.new(key, data, hashlib.sha256).digest()
        assert mac(data) == ref
        assert tok(data) == "tk7_" + base64.urlsafe_b64encode(ref[:16])[:22].decode()
    text_tok, lower_tok = make_text_tokenizer(7, key), make_text_tokenizer(7, key, str.lower)
    for text in ("", "Cust-0001", "é漢字🙂", "x" * 300):
        assert text_tok(text) == tok(text.encode())
        assert lower_tok(text) == tok(text.lower().encode())
    # RFC 4231 test case 2
    assert hmac_sha256_fn(b"Jefe")(b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_b64u_matches_urlsafe_b64encode() -> None:
    for n in range(70):
        data = os.urandom(n)
        assert b64u(data) == base64.urlsafe_b64encode(data).rstrip(b"=").decode()
