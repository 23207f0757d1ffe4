"""Reserved KEKs (``dead_letter.kek``, ``pseudonym_secrets.kek``) may not be pipeline KEKs.

One check serves both sections; each refusal must still name its own section (the
setting to change), the clashing place (destination or ``source_keks`` entry) and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamproc.config import load_config
from tests.unit.test_config import base, error, write, ws  # noqa: F401  (ws: fixture)

WRAPPED = {"provider": "wrapped_file", "path": "./keys/pseudonym.json"}
WHY = {
    "dead_letter.kek": "dead letters need a key of their own (only incident response may open them)",
    "pseudonym_secrets.kek": "use a dedicated KEK for the pseudonym master",
}


def with_reserved(section: str, kek: str) -> dict[str, Any]:
    cfg = base()
    cfg["pipelines"][0]["source_keks"] = ["orders-kek", "legacy-kek"]
    if section == "dead_letter.kek":
        cfg["dead_letter"] = {"kek": kek}
    else:
        cfg["pseudonym_secrets"] = {**WRAPPED, "kek": kek}
    return cfg


@pytest.mark.parametrize("section", sorted(WHY))
def test_a_dedicated_reserved_kek_is_accepted(ws: Path, section: str) -> None:  # noqa: F811
    c = load_config(write(ws, with_reserved(section, "dedicated-kek")), env={})
    got = c.dead_letter_kek if section == "dead_letter.kek" else c.pseudonym_secrets.kek
    assert got == "dedicated-kek"


@pytest.mark.parametrize("section", sorted(WHY))
def test_reserved_kek_that_is_an_audience_kek_is_refused(ws: Path, section: str) -> None:  # noqa: F811
    msg = error(ws, with_reserved(section, "fraud-kek"))  # destinations[1]
    assert msg.endswith(
        f": {section}: 'fraud-kek' is also the KEK of pipelines[0].destinations[1] "
        f"(an audience KEK); {WHY[section]}"
    ), msg


@pytest.mark.parametrize("section", sorted(WHY))
def test_reserved_kek_that_is_a_source_kek_is_refused(ws: Path, section: str) -> None:  # noqa: F811
    msg = error(ws, with_reserved(section, "legacy-kek"))
    assert msg.endswith(
        f": {section}: 'legacy-kek' is also in pipelines[0].source_keks; {WHY[section]}"
    ), msg


@pytest.mark.parametrize("section", sorted(WHY))
def test_clash_in_a_later_pipeline_names_that_pipeline(ws: Path, section: str) -> None:  # noqa: F811
    cfg = with_reserved(section, "logins-fraud-kek")
    cfg["pipelines"].append(
        {
            "sources": ["logins"],
            "dead_letter_topic": "logins.dlq",
            "destinations": [
                {"topic": "logins.fraud", "audience": "fraud", "kek": "logins-fraud-kek"}
            ],
        }
    )
    msg = error(ws, cfg)
    assert f"{section}: 'logins-fraud-kek' is also the KEK of pipelines[1].destinations[0]" in msg


def test_pseudonym_master_kek_may_not_be_the_quarantine_kek(ws: Path) -> None:  # noqa: F811
    """Incident response may unwrap dead letters; it must not unwrap the pseudonym master
    (with it, every audience's tokens can be recomputed and linked)."""
    cfg = base()
    cfg["pseudonym_secrets"] = {**WRAPPED, "kek": "quarantine-kek"}  # the default dead_letter.kek
    msg = error(ws, cfg)
    assert msg.endswith(
        ": pseudonym_secrets.kek: 'quarantine-kek' is also dead_letter.kek; "
        "use a dedicated KEK for the pseudonym master"
    ), msg
    cfg["dead_letter"] = {"kek": "ir-quarantine"}
    assert load_config(write(ws, cfg), env={}).pseudonym_secrets.kek == "quarantine-kek"
