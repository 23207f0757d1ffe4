"""The kcat command lines in docs/integrations.md work, and print what the page says.

The test reads every ``kcat ...`` line from the ``sh`` blocks of the page's kcat section,
maps the page's topic names (``orders``, ``orders.dlq``, ``orders.analytics``) to this
test's topics, runs each with ``bash -o pipefail`` against a broker where the real worker
has written sanitized records and dead letters, and checks the output.  A command added
to the page later is at least run (exit 0, some output); the known ones are checked in
detail, including the sample outputs the page shows.

Skips cleanly when kcat is not installed (Debian/Ubuntu: ``apt-get install -y kcat``);
a command piping into jq is skipped when jq is missing.  When the system kcat cannot talk
to the broker (Debian 12's kcat links librdkafka 2.0.2, which cannot parse Tansu's
ApiVersions response), the page's own workaround snippet is run -- so it is tested too --
and the commands run with the library it sets up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordSealer
from streamproc.client.generator import EventGenerator
from streamproc.crypto import provenance
from streamproc.pipeline import core
from tests.integration.conftest import REPO, WorkerProcess, producer, read_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
DOC = REPO / "docs" / "integrations.md"
GOOD = 6  # good records at offsets 0..5 of partition 0; bad ones at 6, 7, 8
REASONS = {"malformed_envelope", "wrong_topic", "tampered"}
OUTPUT_HEADERS = [provenance.H_PROVENANCE]


def kcat_section() -> str:
    return DOC.read_text().split("\n## kcat", 1)[1]


def doc_commands() -> list[str]:
    """Every kcat command line of the page's kcat section, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", kcat_section(), re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip().startswith("kcat ")]


def doc_sample_after(marker: str) -> list[str]:
    """Lines of the plain ``` block that follows the sh block containing ``marker``."""
    m = re.search(re.escape(marker) + r".*?```\n\n```\n(.*?)```", kcat_section(), re.S)
    assert m, f"no sample output after {marker!r}"
    return [line for line in m.group(1).splitlines() if line.strip()]


def kcat_env(bootstrap: str, home: Path) -> dict[str, str]:
    """The environment for the page's commands: the page's librdkafka workaround if needed."""
    env = {**os.environ, "BOOTSTRAP": bootstrap}
    probe = [KCAT or "kcat", "-b", bootstrap, "-L", "-m", "5"]
    r = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30, check=False)
    if r.returncode == 0:
        return env
    block = next((b for b in re.findall(r"```sh\n(.*?)```", kcat_section(), re.S) if "LD_LIBRARY_PATH" in b), None)
    assert block is not None, f"kcat fails against the broker and the page has no workaround:\n{r.stderr[-1000:]}"
    w = subprocess.run(["bash", "-e", "-c", block + '\nprintf %s "$LD_LIBRARY_PATH"'], env={**env, "HOME": str(home)},
                       capture_output=True, text=True, timeout=60, check=False)
    if w.returncode != 0:
        pytest.skip(f"kcat cannot talk to this broker and the workaround failed: {w.stderr[-500:]}")
    env["LD_LIBRARY_PATH"] = w.stdout
    r = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, f"kcat still fails with the page's workaround:\n{r.stderr[-1000:]}"
    return env


def headers_of(csv: str) -> list[tuple[str, str]]:
    """kcat's ``%h`` (name=value CSV) -> pairs; only our ``streamproc.*`` names start a pair."""
    out: list[tuple[str, str]] = []
    for part in csv.split(","):
        name, eq, value = part.partition("=")
        if eq and name.startswith("streamproc."):
            out.append((name, value))
        elif out:  # a comma inside a value (e.g. a detail): glue it back
            out[-1] = (out[-1][0], out[-1][1] + "," + part)
    return out


@pytest.fixture
def populated(workspace_factory: Any, workers: list[WorkerProcess]) -> Any:
    """A workspace whose worker has written GOOD sanitized records and three dead letters."""
    # An audit trail: `streamproc provenance resolve` refuses to run without one.
    ws = workspace_factory(sources=("orders",), extra={"audit": {"file": "./audit.jsonl"}})
    source = ws.topic("orders")
    worker = WorkerProcess(ws)
    workers.append(worker)
    kms, schemas = ws.kms(), ws.schema_source()
    sealer = ws.sealer("orders", kms, schemas)
    elsewhere = RecordSealer(kms, "orders-kek", f"{source}-elsewhere", ws.schema_json("orders"), schemas)
    gen = EventGenerator(21)
    orders = [gen.order() for _ in range(GOOD + 2)]
    good = sealer.seal_many(orders[:GOOD])
    tampered = bytearray(sealer.seal(orders[GOOD]))
    tampered[-1] ^= 0x01
    items = [(o["customer_id"].encode(), v) for o, v in zip(orders, good, strict=False)]
    items += [
        (b"bad-6", b"\x01garbage"),  # malformed_envelope: 8 bytes
        (b"bad-7", elsewhere.seal(orders[GOOD + 1])),  # wrong_topic
        (b"bad-8", bytes(tampered)),  # tampered
    ]
    p = producer(ws.bootstrap)
    for key, value in items:  # one partition, so the offsets are the ones the page uses
        p.produce(source, key=key, value=value, partition=0)
    assert p.flush(30) == 0
    dlq, analytics = ws.dlq("orders"), ws.dest("orders", "analytics")
    got = read_topics(ws.bootstrap, [dlq, analytics], until=lambda r: len(r[dlq]) >= 3 and len(r[analytics]) >= GOOD, timeout=60)
    assert len(got[dlq]) == 3 and len(got[analytics]) >= GOOD, worker.log()[-3000:]
    return ws


def test_doc_kcat_commands(populated: Any, tmp_path: Path) -> None:
    if KCAT is None:
        pytest.skip("kcat is not installed (apt-get install -y kcat)")
    ws = populated
    env = kcat_env(ws.bootstrap, tmp_path / "home")
    names = {"orders": ws.topic("orders"), "orders.dlq": ws.dlq("orders"), "orders.analytics": ws.dest("orders", "analytics")}
    src, dlq = names["orders"], names["orders.dlq"]

    def check_dlq_list(out: str) -> None:
        lines = out.splitlines()
        assert len(lines) == 3, out
        reasons, offsets = set(), set()
        for line in lines:
            h = dict(headers_of(line.split("headers=", 1)[1]))
            assert h[core.H_SOURCE_TOPIC] == src and h[core.H_SOURCE_PARTITION] == "0"
            assert h[core.H_PROCESSOR] and h["streamproc.dlq.format"] == "sealed-v1"
            assert "streamproc.dlq.detail" in h
            reasons.add(h["streamproc.dlq.reason"])
            offsets.add(int(h[core.H_SOURCE_OFFSET]))
        assert reasons == REASONS and offsets == {6, 7, 8}
        # The page's sample line has the same header names in the same order as a real one.
        sample = doc_sample_after("partition=%p offset=%o headers=%h")[0]
        assert [n for n, _ in headers_of(sample.split("headers=", 1)[1])] == [n for n, _ in headers_of(lines[0].split("headers=", 1)[1])]

    def check_per_reason(out: str) -> None:
        assert [" ".join(x.split()) for x in out.splitlines()] == [" ".join(x.split()) for x in doc_sample_after("uniq -c")]

    def check_json(out: str) -> None:
        objs = [json.loads(line) for line in out.splitlines()]
        assert len(objs) == 3 and all("streamproc.dlq.reason" in o["headers"] for o in objs), out
        # Nothing the producer sent (keys bad-6..8, its headers) is in the clear metadata.
        assert "bad-" not in out and "garbage" not in out

    def check_source_record(out: str) -> None:
        assert re.fullmatch(r"offset=7 bytes=\d+", out.strip()), out

    def check_provenance(out: str) -> None:
        records = re.findall(r"offset=(\d+) key=(\S*)\n  (.*)", out)
        assert len(records) == 3, out
        for _, key, h in records:
            assert key.startswith("tk1_")  # analytics' record_key policy: token
            pairs = headers_of(h)
            assert sorted(n for n, _ in pairs) == sorted(OUTPUT_HEADERS)
            prov = provenance.parse_header(dict(pairs)[provenance.H_PROVENANCE])
            assert prov.audience == "analytics" and prov.ref is not None and src not in h
        # The page's sample has the real header's shape (its field names, in order).
        sample = doc_sample_after("-c 3 -f 'offset=%o key=%k")[1].strip()
        assert [f.split("=")[0] for f in sample.split("=", 1)[1].split(";")] == [
            f.split("=")[0] for f in records[0][2].split("=", 1)[1].split(";")
        ]

    def check_resolve(out: str) -> None:
        rows = [line.split() for line in out.splitlines()]
        assert len(rows) == 3 and all(r[1] == src and r[2] == "0" for r in rows), out
        assert len({r[3] for r in rows}) == 3, out

    def check_lineage(out: str) -> None:
        rows = [line.split() for line in out.splitlines()]
        assert len(rows) == 1 and rows[0][1:] == [src, "0", "3"], out
        events = [json.loads(x) for x in (ws.root / "audit-tools.jsonl").read_text().splitlines()]
        assert [e["attrs"]["audiences"] for e in events if e["type"] == "provenance_resolved"] == [["analytics"]] * 2

    def check_metadata(out: str) -> None:
        assert f'topic "{dlq}"' in out and "partition 0" in out, out

    checkers: list[tuple[str, Callable[[str], None]]] = [
        ("uniq -c", check_per_reason),
        ("| jq", check_json),
        ("-t orders.dlq -o beginning -e -q -f 'partition=%p", check_dlq_list),
        ("-t orders -p 0 -o 7", check_source_record),
        ("-c 3 -f 'offset=%o key=%k", check_provenance),
        ("-c 3 -f '%h\\n' | streamproc provenance resolve", check_resolve),
        ("awk '$3 == 0 && $4 == 3'", check_lineage),
        ("-L -t orders.dlq", check_metadata),
    ]
    commands = doc_commands()
    assert len(commands) >= len(checkers), commands
    checked = set()
    for cmd in commands:
        if "| jq" in cmd and shutil.which("jq") is None:
            continue
        real = re.sub(r"(?<=-t )(orders(?:\.dlq|\.analytics)?)(?=\s|$)", lambda m: names[m.group(1)], cmd)
        real = KCAT + real[len("kcat"):] if KCAT.rsplit("/", 1)[-1] != "kcat" else real
        real = real.replace("--config streamproc.yaml", f"--config {ws.config_path}")
        r = subprocess.run(["bash", "-o", "pipefail", "-c", real], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0 and r.stdout.strip(), f"{real}\nexit {r.returncode}\n{r.stderr[-2000:]}"
        for marker, check in checkers:
            if marker in cmd:
                check(r.stdout)
                checked.add(marker)
                break
    expected = {m for m, _ in checkers if shutil.which("jq") or m != "| jq"}
    assert checked == expected, f"page commands without their check: {expected - checked}"
