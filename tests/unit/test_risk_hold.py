"""``risk.action: hold`` in Pipeline.process: records below k are kept back in the hold
changelog (sealed) and released exactly once -- full when their class reaches k,
suppressed when they outlive the window or the hold is full.

Expected outputs come from an independent simulation over the *inputs*: a plain Counter
of each record's tuple (as the policy's rules give it) over the records before it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streamproc.client import RecordOpener
from streamproc.crypto.envelope import Opener
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.pipeline.core import Destination, Pipeline, Route
from streamproc.pipeline.hold import decode
from streamproc.policy.model import parse_policy
from tests.unit.conftest import PSEUDONYM
from tests.unit.test_risk_pipeline import QI, RULES, K, Kit, base_tuple

HOLD_TOPIC = "g.risk-hold"
DEST = Destination("visits.held", "held", "analytics-kek")


def policy(max_records: int = 100) -> dict[str, Any]:
    spec = {"quasi_identifiers": QI, "k": K, "window": "1h", "action": "hold", "hold": {"max_records": max_records}}
    return {"keys": {"pseudonym": PSEUDONYM},
            "audiences": {"held": {"record_key": "keep", "risk": spec, "tags": RULES}}}


class HoldKit(Kit):
    def __init__(self, tmp: Path, keyring: LocalKeyring, max_records: int = 100) -> None:
        super().__init__(tmp, keyring, policy(max_records))
        self.wall = [1_700_000_000.0]

    def pipeline(self, max_record_bytes: int = 1 << 20) -> Pipeline:
        return Pipeline(
            routes=[Route(("visits",), (DEST,))], policy=self.policy, opener=Opener.for_kms(self.keyring),
            kms=self.keyring, schemas=self.schemas, keys=PseudonymKeys(self.keyring, PSEUDONYM),
            clock=lambda: self.clock[0], budget_clock=lambda: self.wall[0], hold_topic=HOLD_TOPIC,
            max_record_bytes=max_record_bytes,
        )


def visit(i: int, district: str, gender: str = "F") -> dict[str, Any]:
    return {"visit_id": f"v{i}", "postcode": f"{district} 1A", "birth_date": 400, "gender": gender,
            "diagnosis": "flu"}


def simulate(batches: list[list[dict[str, Any]]]) -> list[list[str]]:
    """Per batch, the visit ids produced (independent of the pipeline): a record goes out
    when its class, counting it, has k records; then every held record of its class too."""
    seen: Counter[tuple[Any, ...]] = Counter()
    held: dict[tuple[Any, ...], list[str]] = {}
    out = []
    for batch in batches:
        ids: list[str] = []
        reached: list[tuple[Any, ...]] = []
        for v in batch:
            t = base_tuple(v)
            seen[t] += 1
            if seen[t] >= K:
                ids.append(v["visit_id"])
                if t not in reached:
                    reached.append(t)
            else:
                held.setdefault(t, []).append(v["visit_id"])
        for t in reached:
            ids += held.pop(t, [])
        out.append(sorted(ids))
    return out


def run(kit: HoldKit, p: Pipeline, batches: list[list[dict[str, Any]]]) -> tuple[list[list[dict[str, Any]]], list[Any]]:
    got, writes, off = [], [], 0
    for b in batches:
        r = p.process(kit.inputs(b, start=off))
        off += len(b)
        got.append(kit.received(r.outputs, DEST.topic))
        writes += r.state_writes
    return got, writes


def test_records_below_k_are_held_and_released_with_their_class(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = HoldKit(tmp_path, keyring)
    p = kit.pipeline()
    batches = [
        [visit(0, "SW1A"), visit(1, "N7AB"), visit(2, "SW1A", "M")],
        [visit(3, "SW1A")],
        [visit(4, "N7AB"), visit(5, "SW1A"), visit(6, "SW1A")],
    ]
    got, writes = run(kit, p, batches)
    assert [sorted(v["visit_id"] for v in b) for b in got] == simulate(batches)
    # Released records carry their full output: the rules' values, not nulls.
    by_id = {v["visit_id"]: v for b in batches for v in b}
    for b in got:
        for v in b:
            assert (v["postcode"], v["gender"]) == (by_id[v["visit_id"]]["postcode"].split(" ")[0], by_id[v["visit_id"]]["gender"])
    # Every held record was written (ciphertext, not plaintext), every release tombstoned.
    assert all(w.topic == HOLD_TOPIC and w.partition == 0 for w in writes)
    last = {w.key: w.value for w in writes}
    still = sorted(decode(v).offset for v in last.values() if v is not None)
    assert still == [1, 2, 4]  # v1, v4 (N7AB F: 2 < k) and v2 (SW1A M: 1) remain held
    for v in last.values():
        if v is not None:
            assert b"SW1A" not in v and b"N7AB" not in v
    assert p.holds is not None and p.holds.held("held") == 3


def test_a_held_record_past_the_window_is_released_suppressed(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = HoldKit(tmp_path, keyring)
    p = kit.pipeline()
    r1 = p.process(kit.inputs([visit(0, "SW1A")]))
    assert kit.received(r1.outputs, DEST.topic) == []
    assert r1.stats.risk_enforced == {("held", "held"): 1}
    kit.wall[0] += 3601.0  # past the 1h window
    r2 = p.process(kit.inputs([visit(1, "N1CD")], start=1))
    assert kit.received(r2.outputs, DEST.topic) == [
        {**visit(0, "SW1A"), "postcode": None, "birth_date": None, "gender": None}
    ]
    assert r2.stats.risk_enforced == {("held", "held"): 1, ("held", "expired"): 1}
    assert [(w.key, w.value) for w in r2.state_writes if w.value is None] == [
        (w.key, None) for w in r1.state_writes
    ]


def test_the_hold_is_capped_oldest_first(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = HoldKit(tmp_path, keyring, max_records=2)
    p = kit.pipeline()
    got = []
    for i, d in enumerate(["SW1A", "N7AB", "N1CD"]):
        kit.wall[0] += 1.0
        got += kit.received(p.process(kit.inputs([visit(i, d)], start=i)).outputs, DEST.topic)
    assert [(v["visit_id"], v["postcode"]) for v in got] == [("v0", None)]
    assert p.holds is not None and p.holds.held("held") == 2


def test_an_aborted_batch_holds_and_releases_nothing(tmp_path: Path, keyring: LocalKeyring) -> None:
    """The worker's abort path: every open epoch (batch N and the overlapped N+1) undone,
    the windows rolled back; the redone batches give what one clean pass gives."""
    batches = [[visit(0, "SW1A"), visit(1, "SW1A")], [visit(2, "SW1A"), visit(3, "N7AB")]]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    clean = HoldKit(tmp_path / "a", keyring)
    want, want_writes = run(clean, clean.pipeline(), batches)

    kit = HoldKit(tmp_path / "b", keyring)
    p = kit.pipeline()
    assert p.holds is not None
    p.holds.begin(1)
    saved = p.savepoint()
    p.process(kit.inputs(batches[0]))
    p.holds.begin(2)
    p.process(kit.inputs(batches[1], start=2))  # N+1 processed while N commits ...
    p.holds.rollback()  # ... and N aborts: both redone
    p.rollback(saved)
    assert p.holds.held("held") == 0
    p.holds.begin(3)
    got, writes = run(kit, p, batches)
    assert [sorted(v["visit_id"] for v in b) for b in got] == [sorted(v["visit_id"] for v in b) for b in want]
    assert [(w.key, w.value is None) for w in writes] == [(w.key, w.value is None) for w in want_writes]


def test_held_records_are_restored_and_counted_after_a_restart(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = HoldKit(tmp_path, keyring)
    first = kit.pipeline()
    _, writes = run(kit, first, [[visit(0, "SW1A"), visit(1, "SW1A")]])
    held = {w.key: w.value for w in writes}
    # A new process: the window starts empty, the changelog brings back the held records
    # and their class counts, so the k-th record releases them.
    second = kit.pipeline()
    assert second.holds is not None
    for w in writes:
        second.holds.restore(w.partition or 0, w.key, w.value)
    assert second.holds.held("held") == 2
    r = second.process(kit.inputs([visit(2, "SW1A")], start=2))
    got = kit.received(r.outputs, DEST.topic)
    assert sorted(v["visit_id"] for v in got) == ["v0", "v1", "v2"]
    released = [o.value for o in r.outputs if o.source.offset in (0, 1)]
    assert sorted(released) == sorted(decode(v).value for v in held.values() if v is not None)
    assert sorted(w.key for w in r.state_writes if w.value is None) == sorted(held)


def test_hold_needs_its_changelog_and_keys(tmp_path: Path, keyring: LocalKeyring) -> None:
    kit = HoldKit(tmp_path, keyring)
    with pytest.raises(PolicyError, match="needs its changelog topic"):
        Pipeline(routes=[Route(("visits",), (DEST,))], policy=kit.policy, opener=Opener.for_kms(keyring),
                 kms=keyring, schemas=kit.schemas, keys=PseudonymKeys(keyring, PSEUDONYM))
    assert dataclasses.replace(parse_policy(policy()).audience("held").risk).hold_max == 100  # type: ignore[type-var]


def test_received_values_decode_as_the_opener_sees_them(tmp_path: Path, keyring: LocalKeyring) -> None:
    """A held record's suppressed variant opens with the destination's key like any output."""
    kit = HoldKit(tmp_path, keyring, max_records=1)
    p = kit.pipeline()
    p.process(kit.inputs([visit(0, "SW1A")]))
    r = p.process(kit.inputs([visit(1, "N7AB")], start=1))
    (o,) = [o for o in r.outputs if o.topic == DEST.topic]
    assert RecordOpener(keyring, kit.schemas).decode(DEST.topic, o.value)["postcode"] is None


def test_explain_and_catalog_show_the_hold() -> None:
    from streamproc.pipeline.catalog import data_map, render_markdown
    from streamproc.pipeline.explain import explain, render_text

    pol = parse_policy(policy(250))
    text = render_text(explain(pol))
    assert ("re-identification risk: k 3 over POSTCODE, BIRTH_DATE, GENDER within 1h; enforced by hold (records "
            "below k kept back, sealed, until their class reaches k; released suppressed after 1h or beyond 250 held)") in text
    dm = data_map(pol, [])
    assert dm["audiences"]["held"]["risk"] == {"k": K, "l": None, "quasi_identifiers": QI, "action": "hold",
                                               "hold_max_records": 250}
    assert "k 3 over POSTCODE, BIRTH_DATE, GENDER, enforced (hold), at most 250 held |" in render_markdown(dm)


def test_config_names_the_hold_topic_and_topics_acls_cover_it(tmp_path: Path) -> None:
    """``<group_id>.risk-hold`` exists only when a routed audience holds; it is a state
    topic (created compacted, drift-checked) and the processor alone may write and read it."""
    import shutil

    import yaml

    from streamproc.config import load_config
    from streamproc.runtime.acls import GROUP, LITERAL, PREFIXED, TOPIC, Acl, desired_acls
    from streamproc.runtime.state_topics import expected_state_configs
    from tests.unit.test_acls import REPO, base

    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    pol = yaml.safe_load((REPO / "policy.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(pol))
    (tmp_path / "streamproc.yaml").write_text(yaml.safe_dump(base()))
    assert load_config(tmp_path / "streamproc.yaml", env={}).risk_hold_topic is None
    pol["audiences"]["analytics"]["risk"] = {"quasi_identifiers": ["PUBLIC"], "k": 2, "window": "1h",
                                             "action": "hold", "hold": {"max_records": 10}}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(pol))
    cfg = load_config(tmp_path / "streamproc.yaml", env={})
    assert cfg.risk_hold_topic == "sp.risk-hold" and "sp.risk-hold" in cfg.all_topics()
    st = expected_state_configs(cfg)["sp.risk-hold"]
    assert (st.role, dict(st.settings)) == ("risk_hold", {"cleanup.policy": "compact"})
    acls = set(desired_acls(cfg))
    for a in (
        Acl("User:proc", TOPIC, LITERAL, "sp.risk-hold", "WRITE"),
        Acl("User:proc", TOPIC, LITERAL, "sp.risk-hold", "READ"),
        Acl("User:proc", GROUP, PREFIXED, "sp.state-", "READ"),
    ):
        assert a in acls
    assert not any(a.name == "sp.risk-hold" and a.principal != "User:proc" for a in acls)


def test_a_record_too_large_to_hold_is_released_suppressed_at_once(tmp_path: Path, keyring: LocalKeyring) -> None:
    """A hold record carries both sealed variants: one that would not fit the record-size
    limit is not held (its transaction would fail on every retry) but released suppressed."""
    kit = HoldKit(tmp_path, keyring)
    r = kit.pipeline().process(kit.inputs([visit(0, "SW1A")]))
    (w,) = r.state_writes
    assert w.value is not None
    limit = len(w.value) + len(w.key) - 1  # the output itself is far smaller
    r2 = kit.pipeline(max_record_bytes=limit).process(kit.inputs([visit(0, "SW1A")]))
    assert r2.state_writes == []
    assert kit.received(r2.outputs, DEST.topic) == [
        {**visit(0, "SW1A"), "postcode": None, "birth_date": None, "gender": None}
    ]
    assert r2.stats.risk_enforced == {("held", "suppressed"): 1}
    assert r2.stats.egress_records == {(DEST.topic, "held"): 1}


def test_a_partition_that_comes_back_is_not_counted_twice(tmp_path: Path, keyring: LocalKeyring) -> None:
    """Revoked then assigned again: the held record is restored, but the window still
    counts it, so the class needs its true k (a double count would release v0 and v1
    with 2 < k records)."""
    kit = HoldKit(tmp_path, keyring)
    p = kit.pipeline()
    assert p.holds is not None
    writes = p.process(kit.inputs([visit(0, "SW1A")])).state_writes
    p.holds.drop(0)
    assert p.holds.held("held") == 0
    for w in writes:
        p.holds.restore(w.partition or 0, w.key, w.value)
    assert p.holds.held("held") == 1
    r = p.process(kit.inputs([visit(1, "SW1A")], start=1))
    assert kit.received(r.outputs, DEST.topic) == []
    r = p.process(kit.inputs([visit(2, "SW1A")], start=2))
    assert sorted(v["visit_id"] for v in kit.received(r.outputs, DEST.topic)) == ["v0", "v1", "v2"]
