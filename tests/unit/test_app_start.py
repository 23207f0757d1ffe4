"""streamproc.runtime.app.run_worker's start-up order: the consent table, restored first,
owns a consumer; every way the start can stop after it (the subject-key table failing with
any exception, not only ``ConsentUnavailable``) must stop it again.

The Kafka-facing collaborators are replaced by fakes (module attributes of ``app``); the
consent table is the real :class:`~streamproc.runtime.consent.ConsentTable` over a fake
source, so ``stop()`` is the real one and the test sees its source being closed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from streamproc.runtime import app
from streamproc.runtime.consent import ConsentMessage, ConsentTable, ConsentUnavailable
from streamproc.runtime.worker import EXIT_FATAL


class FakeSource:
    def __init__(self) -> None:
        self.closed = 0

    def partitions(self) -> list[int]:
        return [0]

    def poll(self, timeout: float) -> list[ConsentMessage]:
        return []

    def close(self) -> None:
        self.closed += 1


class KeyTopicBroken(Exception):
    pass


def _start(monkeypatch: pytest.MonkeyPatch, key_table_error: BaseException, with_consent: bool = True) -> tuple[FakeSource, Any]:
    source = FakeSource()
    table = ConsentTable(source)
    monkeypatch.setattr(app, "build_kms", lambda config: SimpleNamespace(name="fake"))
    monkeypatch.setattr(app, "build_schemas", lambda config: None)
    monkeypatch.setattr(app, "build_pipeline", lambda config, **kw: SimpleNamespace(policy=None))
    monkeypatch.setattr(app, "_lineage", lambda config, pipeline: None)
    monkeypatch.setattr(app, "start_consent_table", lambda config, pipeline: table if with_consent else None)

    def start_key_table(config: Any, pipeline: Any) -> Any:
        raise key_table_error

    monkeypatch.setattr(app, "start_key_table", start_key_table)
    config = SimpleNamespace(insecure_transport=())
    return source, lambda: app.run_worker(config, install_signals=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error", [KeyTopicBroken("key topic"), KeyboardInterrupt(), ValueError("bad key record")],
    ids=["exception", "keyboard-interrupt", "value-error"],
)
def test_a_failing_key_table_stops_the_restored_consent_table(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    source, run = _start(monkeypatch, error)
    with pytest.raises(type(error)) as info:
        run()
    assert info.value is error  # propagated unchanged, as before
    assert source.closed == 1


def test_an_unavailable_key_table_is_fatal_and_stops_the_consent_table(monkeypatch: pytest.MonkeyPatch) -> None:
    source, run = _start(monkeypatch, ConsentUnavailable("subject-key topic not read to its end"))
    assert run() == EXIT_FATAL
    assert source.closed == 1


def test_without_consent_the_key_table_error_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    source, run = _start(monkeypatch, KeyTopicBroken("key topic"), with_consent=False)
    with pytest.raises(KeyTopicBroken):
        run()
    assert source.closed == 0
