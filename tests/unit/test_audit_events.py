"""The audit event dataclasses: one per event type, and they *are* the allow-list.

The expected allow-list below is written out by hand (it is the table the package held
before the event types became dataclasses), so a field added to or dropped from a
dataclass by accident fails here instead of silently widening what events may carry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from streamproc.audit import (
    ALLOWED_ATTRIBUTES,
    ATTRIBUTE_RULES,
    COMMON_ATTRIBUTES,
    EVENTS,
    AuditAttributeError,
    AuditLog,
    Event,
    EventType,
    KeyRotated,
    MemorySink,
    PolicyLoaded,
    Reidentification,
    verify,
)

EXPECTED: dict[str, set[str]] = {
    "policy_loaded": {"policy_name", "source", "audiences"},
    "key_rotated": {"kms", "key_id", "kind", "version", "previous_version", "outcome", "error"},
    "key_revoked": {"kms", "key_id", "kind", "version", "outcome", "error"},
    "key_revocation_seen": {"kms", "key_id", "version", "topic", "partition"},
    "audience_key_exported": {"kms", "key_id", "audience", "key_version", "outcome", "error"},
    "reidentification": {
        "audience",
        "domain",
        "field",
        "subject",
        "key_version",
        "reason",
        "outcome",
        "error",
        "value_digest",
        "count",
    },
    "dead_letter_burst": {"reason", "topic", "partition", "count", "window_seconds"},
    "anomaly": {"kind", "reason", "topic", "partition", "count", "key_id", "kms", "audience"},
    "processor_started": {"processor_version", "instance", "policy_name"},
    "processor_stopped": {"processor_version", "instance", "reason", "count"},
    "chain_started": {"integrity", "processor_version"},
    "secret_created": {"kms", "key_id", "version", "outcome", "error"},
    "secret_imported": {"kms", "key_id", "version", "count", "outcome", "error"},
    "source_topic_read": {"topic", "reason", "outcome", "count", "error"},
    "provenance_resolved": {"audiences", "reason", "outcome", "count", "error"},
    "consent_withheld": {"audience", "purpose", "reason", "count"},
    "dead_letter_inspected": {"subject", "topic", "partition", "key_id", "reason", "outcome", "count", "error"},
    "dead_letter_replayed": {"subject", "topic", "partition", "key_id", "reason", "outcome", "count", "error"},
    "subject_forgotten": {"subject", "topic", "audiences", "purposes", "count", "reason", "outcome", "error"},
}


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_every_event_type_has_exactly_one_dataclass() -> None:
    assert set(EVENTS) == set(EventType)
    assert len({id(c) for c in EVENTS.values()}) == len(EventType)
    for et, cls in EVENTS.items():
        assert cls.TYPE is et
        assert issubclass(cls, Event)
        assert dataclasses.is_dataclass(cls)


def test_allow_list_is_the_dataclass_fields() -> None:
    assert {"policy_version", "actor_source", "note"} == COMMON_ATTRIBUTES
    assert {et.value: set(v) for et, v in ALLOWED_ATTRIBUTES.items()} == EXPECTED
    for et, cls in EVENTS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == EXPECTED[et.value] | COMMON_ATTRIBUTES
        assert names <= set(ATTRIBUTE_RULES)  # every attribute has a value rule


def test_events_are_frozen_and_reject_unknown_fields() -> None:
    ev = KeyRotated(kms="local", key_id="kek", version=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.version = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        KeyRotated(audience="fraud")  # type: ignore[call-arg]


def test_a_bad_value_is_refused_where_the_event_is_made() -> None:
    with pytest.raises(AuditAttributeError) as err:
        Reidentification(subject="alice@example.com", outcome="success")
    assert "subject" in str(err.value)
    assert "alice" not in str(err.value)
    with pytest.raises(AuditAttributeError):
        KeyRotated(kms="local", key_id="4111 1111 1111 1111", version=1)


def _line(ev: dict[str, Any]) -> bytes:
    return json.dumps(ev, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def test_emit_a_dataclass_writes_the_event_with_its_attributes() -> None:
    sink = MemorySink()
    log = AuditLog([sink], stream="w1", clock=Clock(), context={"note": "INC-7"})
    ev = log.emit(
        PolicyLoaded(policy_version="sha256:0123456789abcdef", audiences=("a", "b")),
        actor="alice",
    )
    assert ev["type"] == "policy_loaded"
    assert ev["actor"] == "alice"
    assert ev["attrs"] == {
        "policy_version": "sha256:0123456789abcdef",
        "audiences": ["a", "b"],
        "note": "INC-7",
    }
    # the stored hash is SHA-256 over the canonical JSON without it (computed here with json)
    body = {k: v for k, v in ev.items() if k != "hash"}
    assert ev["hash"] == hashlib.sha256(_line(body)).hexdigest()
    assert sink.lines[-1] == _line(ev) + b"\n"
    assert verify(sink.lines, stream="w1").ok
    with pytest.raises(TypeError):
        log.emit(PolicyLoaded(), {"policy_name": "x"})


def test_dataclass_and_mapping_forms_write_identical_events() -> None:
    a, b = MemorySink(), MemorySink()
    la = AuditLog([a], stream="w1", clock=Clock())
    lb = AuditLog([b], stream="w1", clock=Clock())
    la.emit(KeyRotated(kms="local", key_id="kek", version=2, previous_version=1))
    lb.emit(
        EventType.KEY_ROTATED,
        {"kms": "local", "key_id": "kek", "version": 2, "previous_version": 1, "error": None},
    )
    assert a.lines == b.lines
