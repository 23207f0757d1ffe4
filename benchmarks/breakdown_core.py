"""Per-record cost breakdown of ``Pipeline.process`` on the reference record (docs/benchmarks.md).

Usage::

    python benchmarks/breakdown_core.py [--records N] [--repeat R] [--cpu C]

Times each piece of the hot path on its own, in CPU time of this thread, single core,
median of ``--repeat`` rounds over the same records as ``bench_core.py``:

* envelope open (header memo + DEK-cache hit + AES-GCM decrypt), its DEK-cache hit and its
  AES-GCM decrypt alone;
* the plan function (audience a1), each bound operator alone, and the plan function with
  every operator replaced by ``str`` (the cost of walking and copying the Avro binary);
* sealing (``seal_many``), ``os.urandom(12)`` and AES-GCM encrypt alone;
* the full ``Pipeline.process`` with one audience; what is left after subtracting open,
  plan and seal is the pipeline's own per-record overhead (headers, output objects,
  bookkeeping).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core

from streamproc.crypto.envelope import Sealer, parse_header


def _time(fn: Callable[[], Any], n: int, repeat: int) -> float:
    """Median CPU microseconds per item of ``fn`` (which handles ``n`` items)."""
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        c0 = time.thread_time()
        fn()
        runs.append((time.thread_time() - c0) / n * 1e6)
    return statistics.median(runs)


def breakdown(s: bench_core.Setup, n: int, repeat: int) -> list[tuple[str, float]]:
    topic = bench_core.SOURCE_TOPIC
    pipeline = s.pipelines[1]
    opener = pipeline.opener
    values = [r.value or b"" for r in s.inputs[:n]]
    plains = bench_core._cycle(s.plaintexts, n)
    h = parse_header(values[0])
    cache = opener.cache
    aead = cache.get(h.kek_id, h.kek_version, h.wrapped, topic)
    hl = h.header_len
    from streamproc.crypto.envelope import _topic_aad

    aad = _topic_aad(topic) + values[0][:hl]
    cts = [(v[hl : hl + 12], v[hl + 12 :]) for v in values]
    fn = s.plan_fn_py  # the generated Python function: its operators are in its globals
    nat = s.plan_fn  # the compiled interpreter's, when it is built (else the same function)
    g = fn.__globals__
    ops = {k: v for k, v in g.items() if k.startswith("_op")}
    paths = {k: g["_path" + str(int(k[3:]) + 2)] for k in ops}
    field_values = {p: [r[p] for r in s.records] for p in paths.values()}
    outs = [b"".join(fn(p)) for p in s.plaintexts]
    out_plains = bench_core._cycle(outs, n)
    sealer = Sealer(s.kms, "a1-kek", f"{topic}.a1")
    sealer.seal(b"x")  # generates the data key
    seal_aead, seal_aad = sealer._aead, sealer._aad
    nonce = os.urandom(12)
    batch = 1000

    rows: list[tuple[str, float]] = []
    t_open = _time(lambda: [opener.open_parts(topic, v) for v in values], n, repeat)
    rows.append(("open (Opener.open_parts)", t_open))
    rows.append(
        (
            "  of which DEK-cache hit (DekCache.get)",
            _time(
                lambda: [cache.get(h.kek_id, h.kek_version, h.wrapped, topic) for _ in values],
                n,
                repeat,
            ),
        )
    )
    rows.append(
        (
            "  of which AES-GCM decrypt",
            _time(lambda: [aead.decrypt(a, b, aad) for a, b in cts], n, repeat),
        )
    )
    t_plan_py = _time(lambda: [b"".join(fn(p)) for p in plains], n, repeat)
    rows.append(("plan fn a1 + join, generated Python", t_plan_py))
    for k, op in sorted(ops.items(), key=lambda kv: paths[kv[0]]):
        vs = bench_core._cycle(field_values[paths[k]], n)

        def run_op(op: Callable[[Any], Any] = op, vs: list[Any] = vs) -> list[Any]:
            return [op(v) for v in vs]

        rows.append((f"  operator on {paths[k]}", _time(run_op, n, repeat)))
    for k in ops:
        g[k] = str
    try:
        rows.append(
            (
                "  walk/copy only (operators = str)",
                _time(lambda: [b"".join(fn(p)) for p in plains], n, repeat),
            )
        )
    finally:
        g.update(ops)
    t_plan = _time(lambda: [b"".join(nat(p)) for p in plains], n, repeat)
    if nat is not fn:
        rows.append(("plan fn a1 + join, compiled interpreter", t_plan))
        rows.extend(_native_rows(s, plains, n, repeat))
    t_seal = _time(
        lambda: [sealer.seal_many(out_plains[i : i + batch]) for i in range(0, n, batch)], n, repeat
    )
    rows.append(("seal (Sealer.seal_many)", t_seal))
    rows.append(
        ("  of which os.urandom(12)", _time(lambda: [os.urandom(12) for _ in values], n, repeat))
    )
    rows.append(
        (
            "  of which AES-GCM encrypt",
            _time(lambda: [seal_aead.encrypt(nonce, p, seal_aad) for p in out_plains], n, repeat),  # type: ignore[union-attr]
        )
    )
    t_total = _time(lambda: bench_core.run_pipeline(s, 1, n, batch), n, repeat)
    rows.append(("Pipeline.process, 1 audience (total)", t_total))
    rows.append(
        ("  pipeline overhead = total - open - plan - seal", t_total - t_open - t_plan - t_seal)
    )
    return rows


def _native_rows(s: bench_core.Setup, plains: list[bytes], n: int, repeat: int) -> list[tuple[str, float]]:
    """The compiled interpreter's plan with its operators called back in Python (the
    tokenizer too), and with every operator replaced by ``str``: the walk alone."""
    import json

    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline import native
    from streamproc.pipeline.plan import Apply, Node, RecordNode, build_plan
    from streamproc.schema import avro
    from streamproc.schema.framing import HEADER_LEN

    node = avro.parse(json.loads(bench_core.SCHEMA_FILE.read_text()))
    keys = PseudonymKeys(s.kms, bench_core.PSEUDONYM_SECRET)
    plan = build_plan(node, s.pipelines[1].policy.audience("a1"), keys)
    rows = []
    saved, native.NATIVE_OPS = native.NATIVE_OPS, False
    try:
        cb = native.compile_native(plan, node, offset=HEADER_LEN, force=True)
    finally:
        native.NATIVE_OPS = saved
    assert cb is not None
    rows.append(("  of which: every operator called back in Python", _time(lambda: [cb(p) for p in plains], n, repeat)))

    def to_str(x: Node) -> None:
        if isinstance(x, Apply):
            x.fn = str
        elif isinstance(x, RecordNode):
            for _, c in x.fields:
                to_str(c)

    to_str(plan.root)
    walk = native.compile_native(plan, node, offset=HEADER_LEN, force=True)
    assert walk is not None
    rows.append(("  of which: walk/copy only (operators = str)", _time(lambda: [walk(p) for p in plains], n, repeat)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--distinct", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--cpu", type=int, default=None)
    args = ap.parse_args(argv)
    cpu = bench_core.pin(args.cpu)
    s = bench_core.setup(args.records, args.distinct)
    try:
        rows = breakdown(s, args.records, args.repeat)
    finally:
        s.close()
    print(
        f"per-record CPU time, pinned to cpu {cpu}, median of {args.repeat}, load {os.getloadavg()[0]:.2f}"
    )
    for label, us in rows:
        print(f"{label:<50} {us:6.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
