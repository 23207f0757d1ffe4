"""Audit log: chain integrity, tamper location, restart, HMAC, attribute guard, sinks, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamproc.audit import (
    GENESIS,
    Anchor,
    AuditAttributeError,
    AuditChainError,
    AuditLog,
    AuditSinkError,
    BreakKind,
    DeadLetterBurstDetector,
    EventType,
    FileSink,
    Fsync,
    Head,
    KafkaSink,
    MemorySink,
    canonical_json,
    check_attrs,
    event_hash,
    event_mac,
    head_file_for,
    is_head_record,
    load_hmac_key,
    verify,
    verify_file,
    verify_files,
    verify_records,
    write_hmac_key,
)
from streamproc.cli.audit import audit as audit_cli

KEY = b"k" * 32
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 0.25
        return self.t


# -- event generation -----------------------------------------------------------------------

ident = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
small = st.integers(min_value=0, max_value=10_000)

calls = st.one_of(
    st.builds(
        lambda v: ("policy_loaded", {"policy_version": f"sha256:{v:016x}", "policy_name": "acme"}),
        st.integers(0, 2**63),
    ),
    st.builds(
        lambda k, v: (
            "key_rotated",
            {"kms": "local", "key_id": k, "version": v + 1, "previous_version": v},
        ),
        ident,
        small,
    ),
    st.builds(
        lambda k, v: ("key_revoked", {"kms": "vault", "key_id": k, "version": v}), ident, small
    ),
    st.builds(
        lambda k, t: ("key_revocation_seen", {"kms": "aws", "key_id": k, "version": 1, "topic": t}),
        ident,
        ident,
    ),
    st.builds(
        lambda t, n: (
            "dead_letter_burst",
            {"reason": "key_revoked", "topic": t, "count": n, "window_seconds": 60},
        ),
        ident,
        small,
    ),
    st.builds(lambda k: ("anomaly", {"kind": k, "count": 1}), ident),
    st.just(("processor_started", {"processor_version": "0.1.0", "instance": "worker-1"})),
    st.just(("processor_stopped", {"reason": "shutdown"})),
    st.builds(
        lambda a, f: (
            "reidentification",
            {
                "audience": a,
                "field": f,
                "outcome": "success",
                "reason": "ticket SEC-42",
                "subject": "orders:3:1234",
            },
        ),
        ident,
        st.sampled_from(["email", "customer.email", "items[].sku"]),
    ),
)


def build(
    specs: list[tuple[str, dict[str, Any]]],
    *,
    hmac_key: bytes | None = None,
    stream: str = "processor:w1",
) -> tuple[AuditLog, MemorySink]:
    sink = MemorySink()
    log = AuditLog([sink], stream=stream, clock=Clock(), hmac_key=hmac_key)
    for t, attrs in specs:
        log.emit(t, attrs)
    return log, sink


def rechain(events: list[dict[str, Any]], start: int, *, key: bytes | None = None) -> None:
    """What an attacker without the audit key does: recompute every link from ``start``."""
    for i in range(start, len(events)):
        ev = events[i]
        ev.pop("mac", None)
        ev["seq"] = i
        ev["prev"] = events[i - 1]["hash"] if i else GENESIS
        if key is not None:
            ev["mac"] = event_mac(key, ev)
        ev["hash"] = event_hash(ev)


def first(result: Any) -> Any:
    assert not result.ok, "tampering went undetected"
    return result.breaks[0]


# -- intact chains ---------------------------------------------------------------------------


@SETTINGS
@given(st.lists(calls, min_size=0, max_size=25))
def test_random_chains_verify(specs: list[tuple[str, dict[str, Any]]]) -> None:
    log, sink = build(specs)
    r = verify(sink.lines)
    assert r.ok, r.report()
    assert r.count == len(specs) + 1  # the chain_started genesis comes first
    assert r.head == (log.head.hash if log.head else None)
    assert r.report().startswith(f"OK: {len(specs) + 1} events, head ")
    events = sink.events()
    assert [e["seq"] for e in events] == list(range(len(specs) + 1))
    assert events[0]["type"] == "chain_started" and events[0]["attrs"]["integrity"] == "sha256"
    assert all(e["hash"] == event_hash(e) for e in events)
    # parsed events verify the same way as raw lines
    assert verify(events).ok


def test_event_shape() -> None:
    _, sink = build(
        [("policy_loaded", {"policy_version": "sha256:0123456789abcdef", "policy_name": "acme"})]
    )
    (gen, ev) = sink.events()
    assert gen["seq"] == 0 and gen["prev"] == GENESIS and gen["type"] == "chain_started"
    assert set(ev) == {"v", "stream", "seq", "ts", "type", "actor", "attrs", "prev", "hash"}
    assert ev["seq"] == 1 and ev["prev"] == gen["hash"] and ev["type"] == "policy_loaded"
    assert ev["ts"] == "2023-11-14T22:13:20.500000Z"
    assert ev["actor"] == "processor" and ev["stream"] == "processor:w1"
    assert sink.lines[1] == canonical_json(ev) + b"\n"


# -- tampering ---------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(calls, min_size=1, max_size=15), st.data())
def test_modification_is_located(
    specs: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    _, sink = build(specs)
    events = sink.events()
    i = data.draw(st.integers(0, len(events) - 1))  # 0: the genesis itself
    events[i]["actor"] = events[i]["actor"] + "x"
    b = first(verify(events))
    assert (b.index, b.kind, b.seq) == (i, BreakKind.HASH_MISMATCH, i)
    # recomputing this event's hash moves the break to the next link
    events[i]["hash"] = event_hash(events[i])
    r = verify(events)
    if i + 1 < len(events):
        assert (first(r).index, first(r).kind) == (i + 1, BreakKind.PREV_MISMATCH)
    else:
        assert r.ok  # the last event can only be caught by anchoring the head
        assert (
            verify(events, expected_head=sink.events()[-1]["hash"]).breaks[0].kind
            is BreakKind.HEAD_MISMATCH
        )


@SETTINGS
@given(st.lists(calls, min_size=1, max_size=15), st.data())
def test_deletion_is_located(specs: list[tuple[str, dict[str, Any]]], data: st.DataObject) -> None:
    _, sink = build(specs)
    lines = list(sink.lines)
    head = json.loads(lines[-1])["hash"]
    i = data.draw(st.integers(1, len(lines) - 1))  # the genesis: test_genesis_is_required
    del lines[i]
    r = verify(lines, expected_head=head)
    b = first(r)
    if i < len(lines):
        assert b.index == i and b.kind is BreakKind.SEQUENCE_GAP and b.line == i + 1
        assert {x.kind for x in r.breaks if x.index == i} == {
            BreakKind.SEQUENCE_GAP,
            BreakKind.PREV_MISMATCH,
        }
    else:  # tail truncation: only the anchored head reveals it
        assert verify(lines).ok
        assert b.kind is BreakKind.HEAD_MISMATCH


@SETTINGS
@given(st.lists(calls, min_size=2, max_size=15), st.data())
def test_swap_is_located(specs: list[tuple[str, dict[str, Any]]], data: st.DataObject) -> None:
    _, sink = build(specs)
    lines = list(sink.lines)
    i = data.draw(st.integers(1, len(lines) - 2))
    j = data.draw(st.integers(i + 1, len(lines) - 1))
    lines[i], lines[j] = lines[j], lines[i]
    b = first(verify(lines))
    assert b.index == i and b.kind is BreakKind.SEQUENCE_GAP


@SETTINGS
@given(st.lists(calls, min_size=1, max_size=15), calls, st.data())
def test_insertion_is_located(
    specs: list[tuple[str, dict[str, Any]]], extra: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    _, sink = build(specs, hmac_key=KEY)
    events = sink.events()
    i = data.draw(st.integers(1, len(events)))
    # a well-formed forgery: right seq, right prev, a hash that matches its own content
    forged = {
        "v": 1,
        "stream": "processor:w1",
        "seq": i,
        "ts": "2030-01-01T00:00:00.000000Z",
        "type": extra[0],
        "actor": "mallory",
        "attrs": extra[1],
        "prev": events[i - 1]["hash"] if i else GENESIS,
    }
    unmacced = {**forged, "hash": event_hash(forged)}
    # the genesis declares MACs: a forgery without one is pointed at even without the key
    b = first(verify([*events[:i], unmacced, *events[i:]]))
    assert (b.index, b.kind) == (i, BreakKind.HMAC_MISMATCH)
    forged["mac"] = "0" * 64  # a MAC-shaped guess
    forged["hash"] = event_hash(forged)
    tampered = [*events[:i], forged, *events[i:]]
    b = first(verify(tampered, expected_head=events[-1]["hash"]))
    # without the key the forgery itself is consistent; the chain breaks where it resumes
    assert b.index == i + 1
    assert b.kind in (BreakKind.SEQUENCE_REGRESSION, BreakKind.HEAD_MISMATCH)
    # with the key the forged event itself is pointed at
    b = first(verify(tampered, hmac_key=KEY))
    assert (b.index, b.kind) == (i, BreakKind.HMAC_MISMATCH)
    # a duplicated (replayed) genuine event is a regression right after the original
    dup = (
        [*events[: i + 1], events[min(i, len(events) - 1)], *events[i + 1 :]]
        if i < len(events)
        else None
    )
    if dup is not None:
        b = first(verify(dup))
        assert (b.index, b.kind) == (i + 1, BreakKind.SEQUENCE_REGRESSION)


@SETTINGS
@given(st.lists(calls, min_size=1, max_size=8), st.data())
def test_any_edited_byte_in_the_file_is_located(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[str, dict[str, Any]]],
    data: st.DataObject,
) -> None:
    path = tmp_path_factory.mktemp("edit") / "audit.jsonl"
    key = data.draw(st.sampled_from([None, KEY]))
    log = AuditLog([FileSink(path, fsync="never")], stream="s", clock=Clock(), hmac_key=key)
    for t, attrs in specs:
        log.emit(t, attrs)
    log.close()
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
    line = raw[:pos].count(b"\n") + 1
    raw[pos] = new
    path.write_bytes(bytes(raw))
    for r in (verify_file(path), verify_file(path, hmac_key=key)):
        assert not r.ok, f"edit at byte {pos} ({new:#x}) undetected"
        assert r.breaks[0].line == line, r.report()


def test_full_rewrite_needs_the_hmac_key() -> None:
    _, sink = build(
        [("key_rotated", {"kms": "local", "key_id": "k", "version": v + 1}) for v in range(6)],
        hmac_key=KEY,
    )
    events = sink.events()
    events[2]["attrs"]["version"] = 99
    del events[4]
    rechain(events, 2)  # an attacker who rewrites the tail, without the key
    # the genesis declared MACs: stripped ones are breaks even without the key
    assert {b.kind for b in verify(events).breaks} == {BreakKind.HMAC_MISMATCH}
    r = verify(events, hmac_key=KEY)
    assert [(b.index, b.kind) for b in r.breaks] == [
        (i, BreakKind.HMAC_MISMATCH) for i in range(2, 6)
    ]
    assert "without the audit key" not in r.report()  # report uses the kinds' own words
    rechain(events, 2, key=b"z" * 32)  # ...or with a guessed key
    assert first(verify(events, hmac_key=KEY)).index == 2
    assert verify(sink.lines, hmac_key=KEY).ok
    assert verify(sink.lines, hmac_key=KEY).macs_present


def test_anchor_and_stream_checks() -> None:
    _, sink = build([("anomaly", {"kind": "a"})] * 5)
    tail = sink.lines[2:]
    anchor = Anchor("processor:w1", 1, json.loads(sink.lines[1])["hash"])
    assert verify(tail, anchor=anchor).ok
    assert not verify(tail).ok  # not from the genesis
    assert verify(tail, from_genesis=False).ok  # retention cut the start: trust the first
    assert Anchor.parse(str(anchor)).hash == anchor.hash
    with pytest.raises(ValueError):
        Anchor.parse("x:y")
    r = verify(sink.lines, stream="other")
    assert r.breaks[0].kind is BreakKind.STREAM_MISMATCH


def test_malformed_and_truncated_lines() -> None:
    _, sink = build([("anomaly", {"kind": "a"})] * 4)
    lines = list(sink.lines)
    lines[1] = lines[1][:40]  # torn write
    lines[2] = b'{"hello":"world"}'
    r = verify(lines)
    kinds = [(b.index, b.kind) for b in r.breaks]
    assert kinds == [(1, BreakKind.TRUNCATED_JSON), (2, BreakKind.MALFORMED)]


# -- file sink: restart, locking, fsync ------------------------------------------------------------


def test_file_sink_resumes_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a" / "audit.jsonl"
    with AuditLog([FileSink(path)], stream="w1", clock=Clock()) as log:
        log.processor_started(processor_version="0.1.0", instance="w1")
        log.policy_loaded(
            "sha256:0123456789abcdef", policy_name="acme", audiences=["fraud", "support"]
        )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with AuditLog([FileSink(path)], stream="w1", clock=Clock()) as log:
        assert log.head is not None and log.head.seq == 2
        log.processor_stopped(reason="shutdown")
    r = verify_file(path)
    assert r.ok and r.count == 4
    assert [e["seq"] for e in map(json.loads, path.read_bytes().splitlines())] == [0, 1, 2, 3]


def test_file_sink_refuses_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog([FileSink(path)], stream="w1", clock=Clock()) as log:
        for v in range(3):
            log.key_revoked("local", "kek", v)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])
    with pytest.raises(AuditChainError, match="line 2"):
        AuditLog([FileSink(path)], stream="w1")
    path.write_bytes(b"".join(lines) + b'{"v":1,"str')  # a torn final write
    with pytest.raises(AuditChainError, match="truncated_json"):
        AuditLog([FileSink(path)], stream="w1")
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainError, match=r"another writer .'w1'.*--instance"):
        AuditLog([FileSink(path)], stream="w2")


def test_file_sink_continues_a_rotated_file(tmp_path: Path) -> None:
    old, new = tmp_path / "audit.1.jsonl", tmp_path / "audit.2.jsonl"
    with AuditLog([FileSink(old)], stream="w1", clock=Clock()) as log:
        log.anomaly("x")
        log.anomaly("y")
        head = log.head
    assert head is not None
    with AuditLog([FileSink(new, start=head)], stream="w1", clock=Clock()) as log:
        log.anomaly("z")
    with AuditLog([FileSink(new, start=head)], stream="w1", clock=Clock()) as log:
        log.anomaly("w")
    assert verify_files([old, new]).ok
    assert verify_file(new, anchor=head).ok
    assert not verify_file(new).ok


def test_one_writer_per_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path)
    with pytest.raises(AuditSinkError, match="in use"):
        FileSink(path)
    sink.close()
    FileSink(path).close()


@pytest.mark.parametrize(("policy", "expected"), [("always", 3), ("interval", 1), ("never", 0)])
def test_fsync_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, expected: int
) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    # init, genesis write, its head export's sync, then the three events at 0.1, 1.5, 1.6
    mono = iter([0.0, 0.05, 0.08, 0.1, 1.5, 1.6, 5.0, 5.1, 5.2, 5.3])
    sink = FileSink(
        tmp_path / "a.jsonl", fsync=policy, fsync_interval=1.0, clock=lambda: next(mono)
    )
    log = AuditLog([sink], stream="s")  # writes the genesis and its head
    calls.clear()
    for _ in range(3):
        log.anomaly("x")
    assert len(calls) == expected
    log.close()  # exports the final head (fsynced unless "never"), then syncs the log
    assert len(calls) == {"always": 4, "interval": 3, "never": 0}[policy]
    assert Fsync("always") is Fsync.ALWAYS


# -- kafka sink and multiple sinks ---------------------------------------------------------------------


class FakeProducer:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []
        self.flushes = 0

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        assert value is not None
        self.records.append((topic, key, value))

    def flush(self) -> int:
        self.flushes += 1
        return 0


def test_kafka_sink_chain_verifies_when_read_back(tmp_path: Path) -> None:
    prod = FakeProducer()
    file_path = tmp_path / "audit.jsonl"
    a = AuditLog(
        [FileSink(file_path), KafkaSink(prod, "streamproc.audit")],
        stream="w1",
        clock=Clock(),
        hmac_key=KEY,
    )
    b = AuditLog([KafkaSink(prod, "streamproc.audit")], stream="w2", clock=Clock())
    for i in range(5):
        a.key_rotated("local", "kek", i + 2)
        b.anomaly("unknown_schema", count=i)
    a.close()
    assert prod.flushes >= 10
    assert {t for t, _, _ in prod.records} == {"streamproc.audit"}
    # the topic holds exactly the file's lines (without newline) for that key
    events_w1 = [v for _, k, v in prod.records if k == b"w1" and not is_head_record(v)]
    assert events_w1 == file_path.read_bytes().splitlines()
    heads = [Head.from_json(v) for _, k, v in prod.records if k == b"w1" and is_head_record(v)]
    assert heads[-1].seq == 5 and heads[-1].signed_by(KEY)  # exported on close
    results = verify_records([(k, v) for _, k, v in prod.records], hmac_key=None)
    assert set(results) == {"w1", "w2"} and all(r.ok for r in results.values())
    assert verify_records([(k, v) for _, k, v in prod.records if k == b"w1"], hmac_key=KEY)["w1"].ok
    # tamper with one value of w2 and move one w1 event under the w2 key
    recs = [(k, v) for _, k, v in prod.records if not is_head_record(v)]
    w2 = [n for n, (k, _) in enumerate(recs) if k == b"w2"]
    recs[w2[2]] = (b"w2", recs[w2[2]][1].replace(b"unknown_schema", b"unknown_schemb"))
    recs.append((b"w2", recs[0][1]))
    r = verify_records(recs)
    assert r["w1"].ok
    kinds = [(x.line, x.kind) for x in r["w2"].breaks]
    assert (3, BreakKind.HASH_MISMATCH) in kinds and (7, BreakKind.STREAM_MISMATCH) in kinds
    assert r["w2"].breaks[0].where == "key w2"


def test_sink_failure_fails_loudly_but_keeps_the_chain() -> None:
    class Broken(FakeProducer):
        broken = False

        def flush(self) -> int:
            return 1 if self.broken else 0

    good, bad = MemorySink(), Broken()
    log = AuditLog([good, KafkaSink(bad, "t")], stream="s")
    bad.broken = True
    with pytest.raises(AuditSinkError, match="not delivered"):
        log.anomaly("x")
    bad2 = Broken()
    log2 = AuditLog([KafkaSink(bad2, "t")], stream="s")
    bad2.broken = True
    with pytest.raises(AuditSinkError):
        log2.anomaly("x")
    assert log2.head is not None and log2.head.seq == 0  # nothing accepted it: no advance
    with pytest.raises(AuditSinkError):  # a log that cannot write its genesis never opens
        AuditLog([KafkaSink(bad2, "t")], stream="s")
    log.sinks = [good]
    log.anomaly("y")
    assert verify(good.lines).ok and len(good.lines) == 3


def test_sinks_must_agree_on_the_head(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with AuditLog([FileSink(a)], stream="s") as log:
        log.anomaly("x")
    with AuditLog([FileSink(b)], stream="s") as log:
        log.anomaly("y")
    with pytest.raises(AuditChainError, match="disagree"):
        AuditLog([FileSink(a), FileSink(b)], stream="s")
    # the failed start released both files; a fresh sink joins the resumed chain
    c = tmp_path / "c"
    with AuditLog([FileSink(a), FileSink(c)], stream="s") as log:
        assert log.head is not None and log.head.seq == 1
        log.anomaly("z")
    with AuditLog(
        [FileSink(a), FileSink(c)], stream="s"
    ) as log:  # c starts at seq 2: still resumes
        assert log.head is not None and log.head.seq == 2
    assert verify_file(a).ok
    kinds = {b.kind for b in verify_file(c).breaks}  # the auditor sees c's late start
    assert kinds == {BreakKind.MISSING_GENESIS, BreakKind.SEQUENCE_GAP, BreakKind.PREV_MISMATCH}
    assert verify_file(
        c, anchor=Anchor("s", 1, json.loads(a.read_bytes().splitlines()[1])["hash"])
    ).ok


def test_thread_safe_sequence(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog([FileSink(path, fsync="never")], stream="s")

    def work(n: int) -> None:
        for i in range(50):
            log.anomaly(f"t{n}", count=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    r = verify_file(path)
    assert r.ok and r.count == 401 and r.head_seq == 400


# -- attribute guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "attrs", "match"),
    [
        ("anomaly", {"kind": "x", "email": "a"}, "'email' is not allowed"),
        ("key_rotated", {"kms": "local", "key_id": "k", "version": 1, "topic": "t"}, "not allowed"),
        ("anomaly", {"kind": "alice@example.com"}, "'kind'"),
        ("anomaly", {"kind": "4111111111111111"}, "'kind'"),
        ("anomaly", {"kind": "John Smith"}, "'kind'"),
        ("anomaly", {"kind": "x", "count": -1}, "'count'"),
        ("anomaly", {"kind": "x", "count": True}, "'count'"),
        ("anomaly", {"kind": "x", "count": "3"}, "'count'"),
        ("reidentification", {"subject": "alice@example.com"}, "'subject'"),
        ("reidentification", {"subject": "Alice Smith"}, "'subject'"),
        ("reidentification", {"reason": "customer alice@example.com called"}, "'reason'"),
        ("reidentification", {"reason": "call back +1 555 123 4567"}, "'reason'"),
        ("reidentification", {"reason": "ssn 123-45-6789"}, "'reason'"),
        ("reidentification", {"reason": "multi\nline"}, "'reason'"),
        ("reidentification", {"field": "email; drop table"}, "'field'"),
        ("policy_loaded", {"policy_version": "v1"}, "'policy_version'"),
        ("policy_loaded", {"audiences": ["ok", "not ok"]}, "'audiences'"),
        ("nonsense", {}, "unknown audit event type"),
    ],
)
def test_guard_rejects_non_identifiers(event_type: str, attrs: dict[str, Any], match: str) -> None:
    with pytest.raises(AuditAttributeError, match=match) as info:
        check_attrs(event_type, attrs)
    for v in attrs.values():
        if isinstance(v, str) and len(v) > 3:
            assert v not in str(info.value)  # the error never echoes the value


def test_guard_accepts_identifiers_and_drops_nones() -> None:
    assert check_attrs(
        "reidentification",
        {
            "audience": "fraud",
            "domain": "EMAIL",
            "field": "items[].sku",
            "subject": "tk1_" + "A" * 22,
            "reason": "INC0012345 chargeback review",
            "outcome": "denied",
            "error": "version_mismatch",
            "policy_version": "sha256:0123456789abcdef",
            "key_version": 2,
            "value_digest": "0123456789abcdef",
            "count": None,
        },
    )["subject"].startswith("tk1_")
    assert check_attrs("reidentification", {"subject": "orders:3:12345"})
    assert check_attrs(
        "key_revoked",
        {
            "kms": "aws",
            "key_id": "arn:aws:kms:us-east-1:111122223333:key/1111aaaa-0000-4000-8000-000000000001",
            "version": 0,
        },
    )
    log, sink = build([])
    with pytest.raises(AuditAttributeError):
        log.anomaly("x", actor="bob smith")
    with pytest.raises(AuditAttributeError):
        log.emit(EventType.ANOMALY, {"kind": "x", "value": "secret"})
    assert len(sink.lines) == 1  # rejected events are not written and do not consume a seq
    log.anomaly("x", actor="alice@corp.example")
    assert verify(sink.lines).ok


# -- convenience -----------------------------------------------------------------------------------------------


def test_helpers_cover_every_event_type() -> None:
    log, sink = build([])
    log.policy_loaded("sha256:0123456789abcdef", policy_name="acme", source="policy.yaml")
    log.key_rotated("local", "orders-kek", 2, previous_version=1, actor="alice")
    log.key_revoked("local", "orders-kek", 1, actor="alice")
    assert (
        log.key_revocation_seen("local", "orders-kek", 1, topic="orders", partition=0) is not None
    )
    assert log.key_revocation_seen("local", "orders-kek", 1, topic="orders", partition=1) is None
    log.audience_key_exported("local", "pseudonym-master", "fraud", 1, actor="alice")
    log.reidentification(
        actor="bob", audience="fraud", outcome="success", field="email", reason="INC-1"
    )
    log.dead_letter_burst("key_revoked", "orders", 120, 60)
    log.anomaly("tampered", count=3, topic="orders")
    log.processor_started(processor_version="0.1.0", policy_version="sha256:0123456789abcdef")
    log.processor_stopped(reason="sigterm", count=10)
    log.emit(EventType.SECRET_CREATED, {"kms": "aws", "key_id": "pseudonym-master", "version": 1})
    log.emit(EventType.SECRET_IMPORTED, {"kms": "aws", "key_id": "pseudonym-master", "count": 2})
    log.source_topic_read(actor="alice", topic="orders", reason="INC-1", outcome="success", count=3)
    log.emit(EventType.PROVENANCE_RESOLVED, {"audiences": ["analytics"], "count": 2, "outcome": "success"})
    log.emit(EventType.CONSENT_WITHHELD, {"audience": "analytics", "purpose": "marketing", "reason": "withdrawn", "count": 2})
    for dl in (EventType.DEAD_LETTER_INSPECTED, EventType.DEAD_LETTER_REPLAYED):
        log.emit(dl, {"subject": "orders.dlq:0:7", "topic": "orders", "reason": "INC-1", "outcome": "success"})
    log.emit(EventType.SUBJECT_FORGOTTEN, {"subject": "tk1_q3Zp0GkT8bWm2cXa9RrL1e", "topic": "keys", "audiences": ["fraud"], "purposes": ["marketing"], "count": 1, "outcome": "success"})
    assert {e["type"] for e in sink.events()} == {t.value for t in EventType}
    assert verify(sink.lines).ok


def test_dead_letter_burst_detector() -> None:
    log, sink = build([])
    t = [0.0]
    det = DeadLetterBurstDetector(log, threshold=10, window_seconds=60, clock=lambda: t[0])
    assert det.observe("key_revoked", "orders", 4) is None
    ev = det.observe("key_revoked", "orders", 7)
    assert ev is not None and ev["attrs"]["count"] == 11
    assert det.observe("key_revoked", "orders", 50) is None  # once per window
    assert det.observe("tampered", "orders", 3) is None
    t[0] = 61.0
    assert det.observe("key_revoked", "orders", 10) is not None
    assert len(sink.lines) == 3


def test_hmac_key_file(tmp_path: Path) -> None:
    p = tmp_path / "audit.key"
    write_hmac_key(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert len(load_hmac_key(p)) == 32
    with pytest.raises(FileExistsError):
        write_hmac_key(p)
    p.chmod(0o644)
    with pytest.raises(Exception, match="0600"):
        load_hmac_key(p)


# -- CLI -------------------------------------------------------------------------------------------------------------


def test_cli_verify_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    keyfile = tmp_path / "audit.key"
    write_hmac_key(keyfile)
    with AuditLog(
        [FileSink(path)], stream="w1", clock=Clock(), hmac_key=load_hmac_key(keyfile)
    ) as log:
        for v in range(30):
            log.key_rotated("local", "kek", v + 2, previous_version=v + 1)
        head = log.head
    assert head is not None
    runner = CliRunner()
    res = runner.invoke(audit_cli, ["verify", str(path)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"OK: 31 events, head {head.hash}")
    assert "not checked" in res.output
    res = runner.invoke(
        audit_cli,
        ["verify", str(path), "--hmac-key-file", str(keyfile), "--expected-head", head.hash],
    )
    assert res.exit_code == 0 and "not checked" not in res.output

    res = runner.invoke(audit_cli, ["tail", str(path), "-n", "3"])
    assert res.exit_code == 0
    out = res.output.splitlines()
    assert (
        len(out) == 3
        and out[-1].split()[0] == "30"
        and "key_rotated" in out[-1]
        and "version=31" in out[-1]
    )
    assert len(runner.invoke(audit_cli, ["tail", str(path)]).output.splitlines()) == 20
    assert (
        json.loads(runner.invoke(audit_cli, ["tail", str(path), "-n", "1", "--json"]).output)["seq"]
        == 30
    )

    lines = path.read_bytes().splitlines(keepends=True)
    lines[7] = lines[7].replace(b'"version":8', b'"version":9')
    del lines[20]
    path.write_bytes(b"".join(lines))
    res = runner.invoke(audit_cli, ["verify", str(path)])
    assert res.exit_code == 1
    assert "line 8 (seq 7): hash_mismatch" in res.output
    assert "line 21 (seq 21): sequence_gap: expected seq 20, found 21" in res.output
    res = runner.invoke(
        audit_cli, ["verify", str(path), "--hmac-key-file", str(tmp_path / "missing")]
    )
    assert res.exit_code == 2

    new = tmp_path / "new.key"
    assert runner.invoke(audit_cli, ["keygen", "--out", str(new)]).exit_code == 0
    assert runner.invoke(audit_cli, ["keygen", "--out", str(new)]).exit_code == 1


def test_unexpected_sink_errors_do_not_fork_the_chain() -> None:
    class Flaky(MemorySink):
        fail = True

        def write(self, line: bytes) -> None:
            if self.fail:
                raise OSError(5, "I/O error")
            super().write(line)

    flaky, good = Flaky(), MemorySink()
    flaky.fail = False
    log = AuditLog([good, flaky], stream="s")
    flaky.fail = True
    with pytest.raises(AuditSinkError, match="OSError"):
        log.key_revocation_seen("local", "kek", 1)
    # written to one sink: the chain advanced; the flaky sink shows a gap, not a fork
    flaky.fail = False
    assert log.key_revocation_seen("local", "kek", 1) is None  # recorded once (in `good`)
    log.anomaly("y")
    assert verify(good.lines).ok
    assert first(verify(flaky.lines)).kind is BreakKind.SEQUENCE_GAP
    # when no sink accepted it, the revocation is reported again later
    only = Flaky()
    only.fail = False
    log2 = AuditLog([only], stream="s")
    only.fail = True
    with pytest.raises(AuditSinkError):
        log2.key_revocation_seen("local", "kek", 1)
    only.fail = False
    assert log2.key_revocation_seen("local", "kek", 1) is not None
    assert verify(only.lines).ok


# -- issue: tampering classes, signed heads, writers that never restart a chain --------------------


def _attacker_hash(ev: dict[str, Any]) -> str:
    """SHA-256 over sorted, compact, ASCII JSON without ``hash``: written from the format
    description in docs/keys.md, not with the module under test."""
    body = {k: v for k, v in ev.items() if k != "hash"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()


def _attacker_rechain(events: list[dict[str, Any]]) -> bytes:
    """Strip every MAC, renumber, relink and rehash: a full rewrite without the key."""
    prev = "0" * 64
    out = []
    for i, ev in enumerate(events):
        ev = {k: v for k, v in ev.items() if k not in ("mac", "hash")}
        ev["seq"], ev["prev"] = i, prev
        ev["hash"] = prev = _attacker_hash(ev)
        out.append(json.dumps(ev, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return b"".join(out)


def _tamper(kind: str, lines: list[bytes]) -> bytes:
    events = [json.loads(x) for x in lines]
    if kind == "truncate_tail":
        return b"".join(lines[:-3])
    if kind == "empty":
        return b""
    if kind == "delete_middle":
        return b"".join(lines[:5] + lines[6:])
    if kind == "strip_macs_rehash":
        del events[5]
        return _attacker_rechain(events)
    if kind == "strip_macs_rehash_genesis":  # also declare the chain MAC-less
        del events[5]
        events[0]["attrs"]["integrity"] = "sha256"
        return _attacker_rechain(events)
    if kind == "reorder":
        return b"".join([*lines[:3], lines[4], lines[3], *lines[5:]])
    if kind == "edit_field":
        return b"".join([*lines[:7], lines[7].replace(b'"version":8', b'"version":9'), *lines[8:]])
    raise AssertionError(kind)


TAMPERING = [
    "truncate_tail",
    "empty",
    "delete_middle",
    "strip_macs_rehash",
    "strip_macs_rehash_genesis",
    "reorder",
    "edit_field",
]


@pytest.fixture
def keyed_chain(tmp_path: Path) -> tuple[Path, Path, str]:
    """A 13-event MAC'd chain, its key file and the head `audit head` prints for it."""
    path, keyfile = tmp_path / "orig" / "audit.jsonl", tmp_path / "audit.key"
    write_hmac_key(keyfile)
    with AuditLog(
        [FileSink(path)], stream="w1", clock=Clock(), hmac_key=load_hmac_key(keyfile)
    ) as log:
        for v in range(12):
            log.key_rotated("local", "kek", v + 2, previous_version=v + 1)
    res = CliRunner().invoke(audit_cli, ["head", str(path), "--hmac-key-file", str(keyfile)])
    assert res.exit_code == 0, res.output
    return path, keyfile, res.output.strip()


def test_head_is_signed_over_stream_seq_and_hash(keyed_chain: tuple[Path, Path, str]) -> None:
    path, keyfile, text = keyed_chain
    last = json.loads(path.read_bytes().splitlines()[-1])
    stream, _, rest = text.rpartition("@")
    seq, h, mac = rest.split(":")
    assert (stream, int(seq), h) == ("w1", 12, last["hash"])
    # recomputed with the standard library from the documented layout
    body = json.dumps(
        {"format": "streamproc-audit-head/1", "hash": h, "seq": 12, "stream": "w1"},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert mac == hmac.new(load_hmac_key(keyfile), body, hashlib.sha256).hexdigest()
    assert Head.parse(text).signed_by(load_hmac_key(keyfile))
    assert not Head.parse(text).signed_by(b"z" * 32)
    # the writer exported the same head beside the file on close
    assert Head.from_json(head_file_for(path).read_bytes()) == Head.parse(text)


def test_untampered_copy_passes_every_check(
    tmp_path: Path, keyed_chain: tuple[Path, Path, str]
) -> None:
    path, keyfile, head = keyed_chain
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    args = ["verify", str(copy), "--hmac-key-file", str(keyfile), "--require-hmac"]
    res = CliRunner().invoke(audit_cli, [*args, "--expect-head", head])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", TAMPERING)
def test_every_tampering_class_fails_verification(
    tmp_path: Path, keyed_chain: tuple[Path, Path, str], kind: str
) -> None:
    path, keyfile, head = keyed_chain
    copy = tmp_path / "copy.jsonl"  # no .head file beside it: only the CLI flags help
    copy.write_bytes(_tamper(kind, path.read_bytes().splitlines(keepends=True)))
    runner = CliRunner()
    full = ["verify", str(copy), "--hmac-key-file", str(keyfile), "--require-hmac"]
    res = runner.invoke(audit_cli, [*full, "--expect-head", head])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("BROKEN")
    # which checks catch which class on their own
    bare = runner.invoke(audit_cli, ["verify", str(copy)]).exit_code
    keyed = runner.invoke(audit_cli, full).exit_code
    expected_bare = 0 if kind in ("truncate_tail", "strip_macs_rehash_genesis") else 1
    expected_keyed = 0 if kind == "truncate_tail" else 1
    assert (bare, keyed) == (expected_bare, expected_keyed)
    headed = runner.invoke(audit_cli, ["verify", str(copy), "--expect-head", head])
    assert headed.exit_code == 1, headed.output  # every class also loses the exported head


def test_a_forged_or_unsigned_head_is_refused(keyed_chain: tuple[Path, Path, str]) -> None:
    path, keyfile, head = keyed_chain
    h = Head.parse(head)
    lowered = Head.make(h.stream, 3, json.loads(path.read_bytes().splitlines()[3])["hash"], None)
    runner = CliRunner()
    base = ["verify", str(path), "--hmac-key-file", str(keyfile)]
    res = runner.invoke(audit_cli, [*base, "--expect-head", str(lowered)])
    assert res.exit_code == 1 and "not signed" in res.output
    forged = dataclasses.replace(h, mac="0" * 64)
    assert runner.invoke(audit_cli, [*base, "--expect-head", str(forged)]).exit_code == 1
    assert runner.invoke(audit_cli, ["verify", str(path), "--require-hmac"]).exit_code == 2
    assert runner.invoke(audit_cli, [*base, "--expect-head", "nonsense"]).exit_code == 2


def test_the_head_file_beside_the_log_is_checked_by_verify(
    keyed_chain: tuple[Path, Path, str],
) -> None:
    path, _, _ = keyed_chain
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))
    res = CliRunner().invoke(audit_cli, ["verify", str(path)])
    assert res.exit_code == 1 and "expected next seq 13" in res.output


@pytest.mark.parametrize("cut", ["empty", "truncate", "delete"])
def test_a_writer_never_silently_restarts_a_chain(
    keyed_chain: tuple[Path, Path, str], cut: str
) -> None:
    path, keyfile, _ = keyed_chain
    lines = path.read_bytes().splitlines(keepends=True)
    if cut == "empty":
        path.write_bytes(b"")
    elif cut == "truncate":
        path.write_bytes(b"".join(lines[:-4]))
    else:
        path.unlink()
    key = load_hmac_key(keyfile)
    with pytest.raises(AuditChainError) as exc:
        AuditLog([FileSink(path)], stream="w1", hmac_key=key)
    msg = str(exc.value)
    assert str(path) in msg and "seq 13" in msg and "refusing" in msg
    # the refused start wrote nothing and released the lock
    assert path.read_bytes() == (b"".join(lines[:-4]) if cut == "truncate" else b"")
    FileSink(path).close()


def test_a_head_file_signed_with_another_key_is_refused(
    keyed_chain: tuple[Path, Path, str],
) -> None:
    path, keyfile, _ = keyed_chain
    with pytest.raises(AuditChainError, match="not signed by the audit key"):
        AuditLog([FileSink(path)], stream="w1", hmac_key=b"z" * 32)
    with AuditLog([FileSink(path)], stream="w1", hmac_key=load_hmac_key(keyfile)) as log:
        assert log.head is not None and log.head.seq == 12  # resumes, never restarts


def test_another_instance_on_the_same_file_names_the_cause(
    keyed_chain: tuple[Path, Path, str],
) -> None:
    path, keyfile, _ = keyed_chain
    with pytest.raises(AuditChainError) as exc:
        AuditLog([FileSink(path)], stream="w2", hmac_key=load_hmac_key(keyfile))
    assert "another writer ('w1')" in str(exc.value) and "--instance" in str(exc.value)
    assert "does not verify" not in str(exc.value)
    head_file_for(path).unlink()  # also without the head file: read from the first event
    with pytest.raises(AuditChainError, match=r"another writer .'w1'."):
        AuditLog([FileSink(path)], stream="w2", hmac_key=load_hmac_key(keyfile))


def test_head_is_exported_periodically_and_on_close() -> None:
    sink, mono = MemorySink(), [0.0]
    log = AuditLog(
        [sink], stream="s", hmac_key=KEY, head_interval=10.0, monotonic=lambda: mono[0]
    )
    assert [h.seq for h in sink.heads] == [0]  # the genesis
    log.anomaly("a")
    log.anomaly("b")
    assert [h.seq for h in sink.heads] == [0]  # not yet due
    mono[0] = 11.0
    assert log.maybe_export_head() is not None and sink.heads[-1].seq == 2
    assert log.maybe_export_head() is None  # unchanged: nothing to export
    log.anomaly("c")
    log.close()
    assert sink.heads[-1].seq == 3 and all(h.signed_by(KEY) for h in sink.heads)


def test_topic_only_tool_chains_are_distinct_and_verify(tmp_path: Path) -> None:
    """With only audit.kafka_topic every tool run is its own chain on the topic."""
    import types

    from streamproc.audit import open_tool_log
    from streamproc.config import AuditConfig

    class Producer(FakeProducer):
        def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                    on_delivery: Any = None) -> None:  # fmt: skip
            super().produce(topic, key=key, value=value)

        def flush(self, timeout: float = 0) -> int:
            return 0

    prod = Producer()
    cfg = types.SimpleNamespace(
        kms={"provider": "local"},
        audit=AuditConfig(kafka_topic="streamproc.audit"),
        producer_config=lambda: {},
        group_id="g",
    )
    for _ in range(2):
        log = open_tool_log(cfg, producer_factory=lambda conf: prod)
        log.emit(EventType.KEY_REVOKED, {"kms": "local", "key_id": "k", "version": 1})
        log.close()
    results = verify_records([(k, v) for _, k, v in prod.records])
    assert len(results) == 2 and all(r.ok and r.count == 2 for r in results.values())
    assert all(s.startswith("tools-") for s in results)


def test_a_chain_without_genesis_is_refused_with_a_hint(tmp_path: Path) -> None:
    """Files written before chains began with chain_started: named, not silently extended."""
    legacy = [
        {"v": 1, "stream": "w1", "seq": 0, "ts": "2025-01-01T00:00:00.000000Z",
         "type": "anomaly", "actor": "processor", "attrs": {"kind": "x"}}
    ]  # fmt: skip
    path = tmp_path / "audit.jsonl"
    path.write_bytes(_attacker_rechain(legacy))
    r = verify_file(path)
    assert [b.kind for b in r.breaks] == [BreakKind.MISSING_GENESIS]
    with pytest.raises(AuditChainError, match="before chains began with chain_started"):
        AuditLog([FileSink(path)], stream="w1")
    assert verify_file(path).count == 1  # nothing appended


def test_rotation_is_the_deliberate_way_to_continue_in_a_new_file(
    tmp_path: Path, keyed_chain: tuple[Path, Path, str]
) -> None:
    path, keyfile, _ = keyed_chain
    key = load_hmac_key(keyfile)
    runner = CliRunner()
    holder = FileSink(path)  # a running writer: nothing moves
    res = runner.invoke(audit_cli, ["rotate", str(path), "--hmac-key-file", str(keyfile)])
    assert res.exit_code == 1 and "in use" in res.output
    holder.close()
    new_keyfile = tmp_path / "new.key"
    write_hmac_key(new_keyfile)
    res = runner.invoke(
        audit_cli,
        ["rotate", str(path), "--hmac-key-file", str(keyfile),
         "--new-hmac-key-file", str(new_keyfile)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "continues at seq 13" in res.output
    (old,) = [p for p in path.parent.glob("audit.*.jsonl")]
    assert not path.exists() and head_file_for(old).exists()
    # the next writer (with the new key) continues the chain: no genesis, seq 13
    new_key = load_hmac_key(new_keyfile)
    with AuditLog([FileSink(path)], stream="w1", clock=Clock(), hmac_key=new_key) as log:
        assert log.head is not None and log.head.seq == 12
        log.anomaly("after-rotation")
    (ev,) = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert ev["seq"] == 13 and ev["prev"] == json.loads(old.read_bytes().splitlines()[-1])["hash"]
    assert verify_file(old, hmac_key=key, require_hmac=True).ok
    for args in (
        ["verify", str(path), "--hmac-key-file", str(new_keyfile), "--require-hmac"],
        ["verify", str(old), str(path)],
    ):
        res = runner.invoke(audit_cli, args)
        assert res.exit_code == 0, res.output
    # a rotated-and-continued file that is then emptied is still refused
    path.write_bytes(b"")
    with pytest.raises(AuditChainError, match="seq 14"):
        AuditLog([FileSink(path)], stream="w1", hmac_key=new_key)


def test_the_head_is_never_on_disk_before_the_events_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync=interval: exporting the head syncs the log first, so a crash cannot leave a
    head that claims events the log lost (the next writer would refuse an honest file)."""
    sink = FileSink(tmp_path / "a.jsonl", fsync="interval", fsync_interval=3600)
    log = AuditLog([sink], stream="s", head_interval=3600)
    log.anomaly("x")  # written, not yet synced (interval)
    synced: list[str] = []
    real = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("log" if fd == sink._fd else "head")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    log.export_head()
    assert synced == ["log", "head"]
    log.close()
