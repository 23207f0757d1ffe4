"""Directory schema ids: known answers for the shipped schemas (docs/wire-format.md, section 5).

The expected ids were computed once with plain hashlib/json as the page describes, not
with the code under test; a change of the derivation (which would orphan every record
framed with the old ids) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamproc.schema.registry import DirectorySchemaSource, content_id

ROOT = Path(__file__).resolve().parents[2]
KNOWN = {"order.avsc": 287887939, "login.avsc": 1709351123}


@pytest.mark.parametrize(("name", "sid"), sorted(KNOWN.items()))
def test_known_ids(name: str, sid: int) -> None:
    assert content_id(json.loads((ROOT / "schemas" / name).read_text())) == sid


def test_directory_source_serves_those_ids_and_ignores_external_tags(tmp_path: Path) -> None:
    order = json.loads((ROOT / "schemas" / "order.avsc").read_text())
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "order.avsc").write_text(json.dumps(order, indent=4))  # layout is irrelevant
    doc = {"schema": json.dumps(json.loads((ROOT / "schemas" / "login.avsc").read_text())),
           "schemaType": "AVRO", "metadata": {"tags": {"UserLoggedIn.username": ["PII"]}}}
    (tmp_path / "login-doc.avsc").write_text(json.dumps(doc))
    src = DirectorySchemaSource(tmp_path)
    assert {rs.schema_id for rs in src.schemas()} == set(KNOWN.values())
    sid = src.register("orders.analytics-value", {**order, "doc": "changed"})
    assert (tmp_path / "registered" / f"orders.analytics-value-{sid}.avsc").is_file()
    assert sid == content_id({**order, "doc": "changed"}) != KNOWN["order.avsc"]  # inline properties count
