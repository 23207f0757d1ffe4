"""Verification: read a chain (file lines, Kafka records, parsed events) and locate every break.

Why locate rather than accept/reject
------------------------------------
An auditor who learns only "the log is broken" cannot tell a torn final write from an
edited event.  :func:`verify` names each break (:class:`BreakKind`) with its position and
resynchronizes after it, so one tampered event yields one located break, not a cascade.
The writers use the same function before they append (a file that does not verify is
refused), so what a writer trusts is exactly what ``streamproc audit verify`` accepts.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac as _hmac
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from streamproc.audit.chain import (
    _EVENT_KEYS,
    _HEX64,
    FORMAT_VERSION,
    GENESIS,
    Anchor,
    Head,
    canonical_json,
    event_hash,
    event_mac,
    is_head_record,
)
from streamproc.audit.events import INTEGRITY_HMAC, EventType, _count


class BreakKind(enum.StrEnum):
    TRUNCATED_JSON = "truncated_json"
    """The line is not valid JSON (a torn write, or edited bytes)."""
    MALFORMED = "malformed_event"
    """Valid JSON but not an audit event (missing or mistyped fields)."""
    NOT_CANONICAL = "not_canonical"
    """Parses, but its bytes are not the canonical encoding: the line was edited."""
    HASH_MISMATCH = "hash_mismatch"
    """The stored hash does not match the event's content: the event was modified."""
    HMAC_MISMATCH = "hmac_mismatch"
    """The MAC is missing or wrong: written by someone without the audit key."""
    PREV_MISMATCH = "prev_mismatch"
    """``prev`` is not the hash of the preceding event: a link was cut."""
    SEQUENCE_GAP = "sequence_gap"
    """``seq`` jumps forward: events are missing (deleted) or reordered."""
    SEQUENCE_REGRESSION = "sequence_regression"
    """``seq`` repeats or goes back: events were inserted, duplicated or reordered."""
    STREAM_MISMATCH = "stream_mismatch"
    """The event belongs to another stream (or another Kafka key)."""
    HEAD_MISMATCH = "head_mismatch"
    """The chain does not reach (or contradicts) an exported head: the tail was truncated."""
    MISSING_GENESIS = "missing_genesis"
    """The chain does not start with its ``chain_started`` declaration (emptied, cut or forged)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Break:
    """One integrity failure, located by position (``index``, ``line``) and claimed ``seq``."""

    index: int
    """0-based position in the verified sequence."""
    kind: BreakKind
    detail: str
    seq: int | None = None
    line: int | None = None
    """1-based line number (files) or the caller's position label."""
    where: str = ""
    """Optional location label (a file name, a Kafka record key)."""
    unit: str = "line"
    """What ``line`` counts: ``line`` in a file, ``record`` under a Kafka key."""

    def __str__(self) -> str:
        loc = f"{self.unit} {self.line}" if self.line is not None else f"event #{self.index}"
        if self.where:
            loc = f"{self.where} {loc}"
        s = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{loc}{s}: {self.kind.value}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found.  Truthy when the chain is intact."""

    count: int
    head: str | None
    head_seq: int | None
    stream: str | None
    breaks: tuple[Break, ...]
    hmac_checked: bool
    macs_present: bool

    @property
    def ok(self) -> bool:
        return not self.breaks

    def __bool__(self) -> bool:
        return self.ok

    @property
    def anchor(self) -> Anchor | None:
        if self.head is None or self.head_seq is None:
            return None
        return Anchor(self.stream or "", self.head_seq, self.head)

    def report(self) -> str:
        if self.ok:
            return f"OK: {self.count} events, head {self.head or GENESIS}"
        lines = [f"BROKEN: {len(self.breaks)} problem(s) in {self.count} events"]
        lines += [f"  {b}" for b in self.breaks]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One input to :func:`verify`: a raw line or a parsed event, with its location."""

    data: bytes | str | Mapping[str, Any]
    line: int | None = None
    where: str = ""
    unit: str = "line"


def _malformed(ev: Any) -> str | None:
    if not isinstance(ev, dict):
        return "not a JSON object"
    extra = set(ev) - _EVENT_KEYS
    if extra:
        return f"unknown field(s) {sorted(extra)}"
    checks = (
        ("v", lambda x: x == FORMAT_VERSION),
        ("stream", lambda x: isinstance(x, str)),
        ("seq", _count),
        ("ts", lambda x: isinstance(x, str)),
        ("type", lambda x: x in EventType.__members__.values()),
        ("actor", lambda x: isinstance(x, str)),
        ("attrs", lambda x: isinstance(x, dict)),
        ("prev", lambda x: isinstance(x, str) and bool(_HEX64.fullmatch(x))),
        ("hash", lambda x: isinstance(x, str) and bool(_HEX64.fullmatch(x))),
    )
    for name, ok in checks:
        if name not in ev:
            return f"missing field {name!r}"
        if not ok(ev[name]):
            return f"field {name!r} has the wrong type or value"
    if "mac" in ev and not (isinstance(ev["mac"], str) and _HEX64.fullmatch(ev["mac"])):
        return "field 'mac' is not 64 hex digits"
    return None


class _Locator:
    """Appends breaks for one position (avoids closures over loop variables)."""

    __slots__ = ("breaks", "index", "item", "line")

    def __init__(self, breaks: list[Break], index: int, line: int | None, item: Item) -> None:
        self.breaks, self.index, self.line, self.item = breaks, index, line, item

    def __call__(self, kind: BreakKind, detail: str, seq: int | None = None) -> None:
        self.breaks.append(
            Break(self.index, kind, detail, seq, self.line, self.item.where, self.item.unit)
        )


def verify(
    events: Iterable[Item | bytes | str | Mapping[str, Any]],
    *,
    hmac_key: bytes | None = None,
    anchor: Anchor | None = None,
    from_genesis: bool = True,
    expected_head: str | None = None,
    stream: str | None = None,
    require_hmac: bool = False,
    expect_head: Head | Sequence[Head] | None = None,
) -> VerifyResult:
    """Check a chain and locate every break.

    ``events`` are raw lines (``bytes``/``str``, as in the file or a Kafka value), parsed
    events, or :class:`Item` objects carrying a location.  Raw lines must also be the
    canonical encoding, so any edited byte is detected even if it leaves the meaning
    intact.

    The chain must start at the genesis (``seq`` 0, ``prev`` = :data:`GENESIS`), or right
    after ``anchor``; with ``from_genesis=False`` and no anchor, the first event is trusted
    as the start (a topic whose oldest events were removed by retention).  With
    ``hmac_key``, every event must carry a valid ``mac``.  ``expected_head`` (from an
    external anchor) detects a truncated tail.  ``stream`` requires every event to belong
    to that stream.

    A chain verified from the genesis must start with its ``chain_started`` event; an
    empty input is therefore a break, not an empty success (an emptied file).  When that
    genesis declares ``integrity: hmac-sha256``, every event must carry a ``mac`` even
    when no key is given (stripped MACs are a break).  ``require_hmac`` (which needs
    ``hmac_key``) additionally refuses a chain that declares no MACs -- the only defence
    against someone who rewrites the genesis too.

    ``expect_head`` (one or several :class:`Head`, exported earlier outside the log)
    detects truncation: the chain must contain each head's ``seq`` with that ``hash``; it
    may have grown since.  With ``hmac_key`` a head must carry a valid signature.

    After a break the verifier resynchronizes on the event's stored ``seq`` and ``hash``,
    so one tampered event yields one located break rather than a cascade.
    """
    if require_hmac and hmac_key is None:
        raise ValueError("require_hmac needs the audit HMAC key")
    heads: list[Head] = (
        []
        if expect_head is None
        else [expect_head]
        if isinstance(expect_head, Head)
        else list(expect_head)
    )
    check_genesis = anchor is None and from_genesis
    integrity: str | None = None
    hashes_at: dict[int, str] = {}
    breaks: list[Break] = []
    if anchor is not None:
        exp_seq: int | None = anchor.seq + 1
        exp_prev: str | None = anchor.hash
        stream = stream or anchor.stream or None
    elif from_genesis:
        exp_seq, exp_prev = 0, GENESIS
    else:
        exp_seq, exp_prev = None, None
    count = 0
    head: str | None = anchor.hash if anchor is not None else None
    head_seq: int | None = anchor.seq if anchor is not None else None
    macs_present = False
    seen_stream: str | None = None

    for index, raw in enumerate(events):
        item = raw if isinstance(raw, Item) else Item(raw)
        line = (
            item.line
            if item.line is not None
            else (index + 1 if not isinstance(item.data, Mapping) else None)
        )
        brk = _Locator(breaks, index, line, item)
        count += 1
        data = item.data
        if isinstance(data, Mapping):
            ev: Any = dict(data)
            raw_bytes: bytes | None = None
        else:
            raw_bytes = (
                data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
            )
            raw_bytes = raw_bytes.removesuffix(b"\n")
            try:
                ev = json.loads(raw_bytes.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                brk(
                    BreakKind.TRUNCATED_JSON,
                    "line is not valid JSON (a torn write or edited bytes)",
                )
                exp_seq = None if exp_seq is None else exp_seq + 1
                exp_prev = None
                continue
        problem = _malformed(ev)
        if problem is not None:
            seq_guess = ev.get("seq") if isinstance(ev, dict) and _count(ev.get("seq")) else None
            brk(BreakKind.MALFORMED, problem, seq_guess)
            exp_seq = (
                (seq_guess + 1)
                if seq_guess is not None
                else (None if exp_seq is None else exp_seq + 1)
            )
            exp_prev = (
                ev["hash"] if isinstance(ev, dict) and isinstance(ev.get("hash"), str) else None
            )
            continue
        seq: int = ev["seq"]
        if raw_bytes is not None and raw_bytes != canonical_json(ev):
            brk(
                BreakKind.NOT_CANONICAL,
                "bytes differ from the canonical encoding of the event (line edited)",
                seq,
            )
        if event_hash(ev) != ev["hash"]:
            brk(
                BreakKind.HASH_MISMATCH,
                "stored hash does not match the event's content (event modified)",
                seq,
            )
        if check_genesis and index == 0:
            if ev["type"] != EventType.CHAIN_STARTED.value or seq != 0:
                brk(
                    BreakKind.MISSING_GENESIS,
                    "the chain does not start with its chain_started event (events removed "
                    "from the start, or a chain written without one)",
                    seq,
                )
            else:
                integrity = ev["attrs"].get("integrity")
                if require_hmac and integrity != INTEGRITY_HMAC:
                    brk(
                        BreakKind.HMAC_MISMATCH,
                        f"the genesis declares integrity {integrity!r}, but MACs are required",
                        seq,
                    )
        elif ev["type"] == EventType.CHAIN_STARTED.value:
            brk(
                BreakKind.SEQUENCE_REGRESSION,
                "a second chain_started event: a new chain was started inside this one",
                seq,
            )
        if "mac" in ev:
            macs_present = True
        if "mac" not in ev and (integrity == INTEGRITY_HMAC or require_hmac) and hmac_key is None:
            brk(BreakKind.HMAC_MISMATCH, "event has no MAC but the chain requires MACs", seq)
        if hmac_key is not None:
            if "mac" not in ev:
                brk(BreakKind.HMAC_MISMATCH, "event has no MAC but an audit key was given", seq)
            elif not _hmac.compare_digest(ev["mac"], event_mac(hmac_key, ev)):
                brk(
                    BreakKind.HMAC_MISMATCH,
                    "MAC does not verify under the audit key (forged or modified)",
                    seq,
                )
        want_stream = stream or seen_stream
        if want_stream is not None and ev["stream"] != want_stream:
            brk(
                BreakKind.STREAM_MISMATCH,
                f"event belongs to stream {ev['stream']!r}, expected {want_stream!r}",
                seq,
            )
        seen_stream = seen_stream or ev["stream"]
        if exp_seq is not None:
            if seq > exp_seq:
                brk(
                    BreakKind.SEQUENCE_GAP,
                    f"expected seq {exp_seq}, found {seq}: {seq - exp_seq} event(s) missing or moved before this one",
                    seq,
                )
            elif seq < exp_seq:
                brk(
                    BreakKind.SEQUENCE_REGRESSION,
                    f"expected seq {exp_seq}, found {seq}: an event was inserted, duplicated or moved here",
                    seq,
                )
        if exp_prev is not None and ev["prev"] != exp_prev:
            what = (
                "the genesis"
                if exp_prev == GENESIS
                else f"the hash of the preceding event ({exp_prev[:12]}...)"
            )
            brk(
                BreakKind.PREV_MISMATCH,
                f"prev is not {what}: the link to the preceding event is cut",
                seq,
            )
        exp_seq, exp_prev = seq + 1, ev["hash"]
        head, head_seq = ev["hash"], seq
        hashes_at.setdefault(seq, ev["hash"])

    if check_genesis and count == 0:
        breaks.append(
            Break(
                0,
                BreakKind.MISSING_GENESIS,
                "no events: a chain starts with its chain_started event (the log was emptied)",
            )
        )
    for h in heads:
        where = head_seq if head_seq is not None else -1
        if hmac_key is not None and not h.signed_by(hmac_key):
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"the expected head for seq {h.seq} is not signed by the audit key",
                    h.seq,
                )
            )
        elif require_hmac and h.mac is None:
            breaks.append(
                Break(count, BreakKind.HEAD_MISMATCH, "the expected head is unsigned", h.seq)
            )
        want = stream or seen_stream
        if want is not None and h.stream != want:
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"the expected head belongs to stream {h.stream!r}, not {want!r}",
                    h.seq,
                )
            )
        elif h.seq not in hashes_at:
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"the chain ends at seq {where}, but an exported head shows it reached seq "
                    f"{h.seq}: events were removed from the end (expected next seq {h.seq + 1})",
                    h.seq,
                )
            )
        elif hashes_at[h.seq] != h.hash:
            breaks.append(
                Break(
                    count,
                    BreakKind.HEAD_MISMATCH,
                    f"event seq {h.seq} is not the one the exported head names (rewritten)",
                    h.seq,
                )
            )

    if expected_head is not None and head != expected_head:
        breaks.append(
            Break(
                count,
                BreakKind.HEAD_MISMATCH,
                f"chain ends at {head or GENESIS}, not at the anchored head {expected_head} "
                "(events removed from, or added to, the end)",
                head_seq,
            )
        )
    return VerifyResult(
        count,
        head,
        head_seq,
        seen_stream or stream,
        tuple(breaks),
        hmac_key is not None,
        macs_present,
    )


def read_lines(path: str | os.PathLike[str]) -> list[Item]:
    """The lines of an audit file as :class:`Item` objects with 1-based line numbers.

    A final line without a newline is kept (it is what a torn write leaves behind).
    """
    data = Path(path).read_bytes()
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return [Item(p, i + 1, str(path)) for i, p in enumerate(parts)]


def verify_file(path: str | os.PathLike[str], **kwargs: Any) -> VerifyResult:
    """:func:`verify` over a JSON-lines audit file; breaks carry line numbers."""
    return verify(read_lines(path), **kwargs)


def verify_files(paths: Sequence[str | os.PathLike[str]], **kwargs: Any) -> VerifyResult:
    """Verify rotated files as one chain, in the given order."""
    items: list[Item] = []
    for p in paths:
        items.extend(read_lines(p))
    return verify(items, **kwargs)


def verify_records(
    records: Iterable[tuple[bytes | str | None, bytes | str]],
    **kwargs: Any,
) -> dict[str, VerifyResult]:
    """Verify chains read back from a Kafka audit topic, one per stream (record key).

    ``records`` are ``(key, value)`` pairs in partition order (a consumer's
    ``msg.key(), msg.value()``; all events of a stream share a key, hence a partition, so
    per-key order is the write order).  An event whose ``stream`` field differs from its
    key is reported as a ``stream_mismatch``.  Pass ``from_genesis=False`` when retention
    may have removed the oldest events.
    """
    groups: dict[str, list[Item]] = {}
    heads: dict[str, list[Head]] = {}
    for key, value in records:
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else (key or "")
        g = groups.setdefault(k, [])
        if is_head_record(value):  # an exported head: the chain must reach it
            try:
                heads.setdefault(k, []).append(Head.from_json(value))
                continue
            except ValueError:
                pass  # not a valid head: verify it as an event (and report it)
        g.append(Item(value, len(g) + 1, f"key {k}", "record"))
    return {
        k: verify(items, stream=k or None, expect_head=heads.get(k), **kwargs)
        for k, items in groups.items()
    }


def _first_stream(item: Item) -> str | None:
    try:
        ev = json.loads(item.data)  # type: ignore[arg-type]
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    st = ev.get("stream") if isinstance(ev, dict) else None
    return st if isinstance(st, str) else None


def iter_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any] | None]:
    """Parsed events of a file (``None`` for an unparsable line); for display, not trust."""
    for item in read_lines(path):
        assert isinstance(item.data, bytes)
        try:
            ev = json.loads(item.data)
        except (UnicodeDecodeError, ValueError):
            yield None
            continue
        yield ev if isinstance(ev, dict) else None
