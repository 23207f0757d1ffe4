"""The schema registry integration against a real registry: Apicurio Registry.

Apicurio Registry publishes its server on Maven Central
(``io.apicurio:apicurio-registry-app:3.0.9``, classifier ``all``; ``bash
scripts/apicurio/fetch.sh``) and speaks Confluent's REST API at ``/apis/ccompat/v7``,
which is what :class:`~streamproc.schema.registry.ConfluentSchemaSource` (through
confluent-kafka's ``SchemaRegistryClient``) talks to.  Shown here:

* schema lookup by id, with the inline ``confluent:tags`` intact; an unknown id is
  ``SchemaNotFound`` (not an outage);
* compatibility: a subject set to ``BACKWARD`` refuses an incompatible version with
  HTTP 409, which is a ``SchemaError`` (a record-level refusal), not an outage; a
  compatible one is accepted;
* the worker end to end with ``schemas: {url: .../apis/ccompat/v7}``: the producer
  registers the annotated source schema, the worker registers one output schema per
  destination (``<topic>-value``) and frames its outputs with those ids;
* Apicurio 3.0.9 does *not* keep Confluent's ``metadata.tags`` (external tags): the
  schema comes back without them.  Recorded here so it cannot change silently.

Authentication failures are not run here: Apicurio's authentication needs an OIDC
provider (Keycloak); the HTTP 401/403 handling stays covered by the registry double.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from streamproc.errors import SchemaError, SchemaNotFound
from streamproc.schema.registry import ConfluentSchemaSource
from tests.integration.conftest import REPO, WorkerProcess, worker_end_to_end
from tests.integration.servers import ApicurioServer, start_apicurio

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def apicurio() -> Iterator[ApicurioServer]:
    with start_apicurio() as server:
        yield server


def tags_by_field(schema_json: dict) -> dict[str, list[str]]:
    return {f["name"]: f.get("confluent:tags", []) for f in schema_json["fields"]}


def test_lookup_by_id_keeps_inline_tags(apicurio: ApicurioServer) -> None:
    src = ConfluentSchemaSource({"url": apicurio.ccompat})
    doc = json.loads((REPO / "schemas" / "order.avsc").read_text())
    sid = src.register("lookup-orders-value", doc)
    assert src.register("lookup-orders-value", doc) == sid  # same schema, same id
    got = json.loads(src.get(sid).text)
    assert got["name"] == doc["name"]
    assert tags_by_field(got) == tags_by_field(doc)
    assert tags_by_field(doc)["email"]  # the file does classify it
    with pytest.raises(SchemaNotFound):
        src.get(sid + 100_000)


def test_compatibility_refusal_is_a_schema_error_not_an_outage(apicurio: ApicurioServer) -> None:
    subject = "compat-value"
    req = urllib.request.Request(
        f"{apicurio.ccompat}/config/{subject}",
        data=json.dumps({"compatibility": "BACKWARD"}).encode(),
        method="PUT",
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["compatibilityLevel"] == "BACKWARD"
    src = ConfluentSchemaSource({"url": apicurio.ccompat})
    v1 = {"type": "record", "name": "C", "fields": [{"name": "a", "type": "string"}]}
    first = src.register(subject, v1)
    required = {**v1, "fields": [*v1["fields"], {"name": "b", "type": "string"}]}
    with pytest.raises(SchemaError, match="HTTP 409") as info:
        src.register(subject, required)
    assert type(info.value) is SchemaError  # not SchemaRegistryUnavailable: never retried
    optional = {**v1, "fields": [*v1["fields"], {"name": "b", "type": "string", "default": ""}]}
    assert src.register(subject, optional) != first


def test_external_metadata_tags_are_not_kept_by_apicurio(apicurio: ApicurioServer) -> None:
    src = ConfluentSchemaSource({"url": apicurio.ccompat})
    doc = {
        "schema": {
            "type": "record",
            "name": "T",
            "fields": [{"name": "a", "type": "string"}, {"name": "email", "type": "string"}],
        },
        "metadata": {"tags": {"T.email": ["PII", "EMAIL"]}},
    }
    got = src.get(src.register("external-tags-value", doc))
    assert got.metadata_tags == {}
    assert tags_by_field(json.loads(got.text)) == {"a": [], "email": []}


def test_worker_end_to_end_registers_output_schemas(
    apicurio: ApicurioServer,
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: str,
    workers: list[WorkerProcess],
) -> None:
    from streamproc.client import RecordOpener

    registry = ConfluentSchemaSource({"url": apicurio.ccompat})
    e2e = worker_end_to_end(
        tmp_path / "ws", kafka_bootstrap, unique, workers,
        configure=lambda cfg: cfg.update(schemas={"url": apicurio.ccompat}),
        sealer=lambda ws: ws.sealer("orders", schemas=registry),
        seed=9, timeout=90,
    )  # fmt: skip
    ws, out = e2e.ws, e2e.out
    with urllib.request.urlopen(f"{apicurio.ccompat}/subjects", timeout=10) as resp:
        subjects = set(json.loads(resp.read()))
    assert f"{ws.topic('orders')}-value" in subjects
    source = json.loads((REPO / "schemas" / "order.avsc").read_text())
    policy = yaml.safe_load((REPO / "policy.yaml").read_text())
    opener = RecordOpener(ws.kms(), registry)
    for a, t in e2e.dests.items():
        assert f"{t}-value" in subjects
        ids = set()
        for r in out[t]:
            assert r.value is not None
            schema, record = opener.open(r.topic, r.value)
            ids.add(schema.schema_id)
            assert isinstance(record, dict)
        (out_id,) = ids  # one output schema per destination, registered in Apicurio
        names = {f["name"] for f in json.loads(registry.get(out_id).text)["fields"]}
        # what the policy drops for this audience is not in its output schema
        # (policy.md: the first rule, in file order, whose tag the field has governs it;
        # a field whose tags no rule mentions is dropped)
        rules = policy["audiences"][a]["tags"]

        def governing(tags: list[str], rules: dict = rules) -> object:
            return next((rules[t] for t in rules if t in tags), "drop")

        dropped = {
            f["name"]
            for f in source["fields"]
            if f.get("confluent:tags") and governing(f["confluent:tags"]) == "drop"
        }
        if a == "analytics":
            assert {"card_number", "phone"} <= dropped  # the check is not vacuous
        assert names <= {f["name"] for f in source["fields"]}
        assert not names & dropped, (a, names & dropped)
