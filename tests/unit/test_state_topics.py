"""Unit tests of the state-topic settings and their drift (no broker: drift is a pure comparison)."""

from __future__ import annotations

from streamproc.runtime.state_topics import LiveConfigs, StateTopic, config_drift

KEYS = StateTopic("keys", "subject_keys", {
    "cleanup.policy": "compact", "segment.ms": "3600000", "min.cleanable.dirty.ratio": "0.01",
})  # fmt: skip


def test_compact_and_delete_is_drift_but_order_and_spacing_are_not() -> None:
    cl = StateTopic("cl", "budget_changelog", {"cleanup.policy": "compact"})
    assert config_drift({"cl": cl}, {"cl": LiveConfigs("cl", {"cleanup.policy": "compact, delete"})}) == {"cl": ["cleanup.policy"]}
    assert config_drift({"cl": cl}, {"cl": LiveConfigs("cl", {"cleanup.policy": "delete"})}) == {"cl": ["cleanup.policy"]}
    assert config_drift({"cl": cl}, {"cl": LiveConfigs("cl", {"cleanup.policy": " compact "})}) == {"cl": None}


def test_numbers_compare_by_value_and_missing_settings_drift() -> None:
    live = LiveConfigs("keys", {"cleanup.policy": "compact", "segment.ms": "3600000", "min.cleanable.dirty.ratio": "0.010"})
    assert config_drift({"keys": KEYS}, {"keys": live}) == {"keys": None}
    live = LiveConfigs("keys", {"cleanup.policy": "compact", "segment.ms": "604800000", "min.cleanable.dirty.ratio": None})
    assert config_drift({"keys": KEYS}, {"keys": live}) == {"keys": ["min.cleanable.dirty.ratio", "segment.ms"]}


def test_an_unreadable_topic_is_drift_named_by_its_error_class() -> None:
    out = config_drift({"keys": KEYS}, {"keys": LiveConfigs("keys", {}, "TOPIC_AUTHORIZATION_FAILED")})
    assert out == {"keys": ["<unreadable: TOPIC_AUTHORIZATION_FAILED>"]}
    assert config_drift({"keys": KEYS}, {}) == {"keys": ["<unreadable: not described>"]}
