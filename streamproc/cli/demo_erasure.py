"""The demo's erasure scene (``streamproc demo --in-process``): a forgotten subject's values
are no longer reversible.

Fraud's e-mail rule becomes ``erasable: true`` (subject ``customer_id``) in a copy of the
example policy; the subject-key table is in memory here (a worker reads and writes the
compacted subject-key topic, docs/governance.md).  Two subjects place an order; both
fraud values re-identify through the audited path; one subject is forgotten with the
records ``streamproc forget`` writes (the forgotten marker and a shred record over each of
their keys); then the forgotten subject's value fails with ``subject_forgotten``, the other
still re-identifies, and the forgotten subject's next order is withheld from fraud.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console

from streamproc import demo as d

#: The subject-key KEK of the fraud audience in the demo keyring (``erasure.keks``).
FRAUD_SUBJECT_KEK = "fraud-subject-kek"
KEY_TOPIC = "streamproc.subject-keys"


def erasable_policy(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The example policy with fraud's e-mail ``erasable`` (``None`` for a custom policy)."""
    fraud = (raw.get("audiences") or {}).get("fraud")
    if not isinstance(fraud, dict) or not isinstance(fraud.get("tags"), dict) or "EMAIL" not in fraud["tags"]:
        return None
    rule = fraud["tags"]["EMAIL"]
    if not isinstance(rule, dict) or rule.get("op") != "encrypt_deterministic":
        return None
    fraud["subject"] = "customer_id"
    fraud["tags"]["EMAIL"] = {**rule, "erasable": True}
    return raw


def erasure_scene(console: Console, ws: d.Workspace, kms: Any, schemas: Any, seed: int) -> None:
    import yaml

    from streamproc.audit import AuditLog, MemorySink
    from streamproc.client import RecordOpener, RecordSealer
    from streamproc.client.generator import EventGenerator
    from streamproc.crypto import erasure
    from streamproc.crypto.envelope import Opener, Sealer
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.pipeline.core import InputRecord, Pipeline, build_routes
    from streamproc.policy.model import parse_policy
    from streamproc.reid import AudienceKey, Reidentifier, SubjectForgottenError

    raw = erasable_policy(yaml.safe_load(ws.policy.read_text()))
    if raw is None:
        return  # a custom policy: the scene is written for the example one
    policy = parse_policy(raw, str(ws.policy))
    kms.ensure_key(FRAUD_SUBJECT_KEK)
    keys = PseudonymKeys(kms, d.PSEUDONYM_SECRET)
    key_opener = Opener.for_kms(kms)

    def open_key(sealed: bytes) -> bytes:
        return key_opener.open_parts(KEY_TOPIC, sealed)[0]

    table = erasure.SubjectKeyTable(
        keys, topic=KEY_TOPIC, sealers={"fraud": Sealer(kms, FRAUD_SUBJECT_KEK, KEY_TOPIC)}, open_envelope=open_key
    )
    pipeline = Pipeline(
        routes=build_routes(ws.pipelines()), policy=policy,
        opener=Opener.for_kms(kms), kms=kms, schemas=schemas, keys=keys,
    )  # fmt: skip
    pipeline.erasure = table
    topic = "orders"
    schema_file, kek, _ = d.SOURCES[topic]
    sealer = RecordSealer(kms, kek, topic, json.loads((ws.schemas / schema_file).read_text()), schemas)
    opener = RecordOpener(kms, schemas)
    directory = erasure.KeyDirectory()  # what the key topic holds, as `reidentify` reads it
    sink = MemorySink()
    reid = Reidentifier(
        AudienceKey("fraud", keys.primary_version, keys.siv_key("fraud")[1]), AuditLog([sink], stream="demo"),
        policy, subject_keys=lambda aud, kid: directory.resolve(aud, kid, open_key),
    )  # fmt: skip

    def run(offset: int, rec: dict[str, Any]) -> dict[str, Any]:
        result = pipeline.process([InputRecord(topic, 0, offset, rec["customer_id"].encode(), sealer.seal(rec))])
        for w in result.state_writes:  # the batch's key records, as its transaction writes them
            directory.apply(w.key, w.value)
            table.apply(w.key, w.value)
        table.committed(0)
        out = {a: o for a in d.AUDIENCES for o in result.outputs if o.topic == d.dest_topic(topic, a)}
        return {"fraud": opener.decode(d.dest_topic(topic, "fraud"), out["fraud"].value or b"") if "fraud" in out else None,
                "got": sorted(out), "withheld": sorted(result.stats.withheld)}

    def reveal(value: str) -> str:
        try:
            return "re-identified: " + reid.reidentify(value, "EMAIL", actor="demo", field="email", reason="DEMO-1 scene")
        except SubjectForgottenError as exc:
            return f"[red]{exc.reason}[/]: not reversible"

    gen = EventGenerator(seed + 2)
    forgotten, stays = gen.order(), gen.order()
    console.print(
        "[bold]erasure by crypto-shredding[/]: fraud's e-mail is encrypt_deterministic with erasable: true -- "
        "each subject's values under the subject's own key, kept sealed in the subject-key topic"
    )
    values = {}
    for i, rec in enumerate((forgotten, stays)):
        got = run(i, rec)
        values[rec["customer_id"]] = got["fraud"]["email"]
        console.print(f"  subject {rec['customer_id']}: fraud gets email {got['fraud']['email'][:40]}... -> {reveal(got['fraud']['email'])}")
    subject = forgotten["customer_id"]
    token = erasure.subject_tokens(keys, subject.encode(), [keys.primary_version])[keys.primary_version]
    now = int(time.time() * 1000)
    shredded = [r for r in directory.keys.values() if r.token == token]
    written = [(erasure.record_key(token, erasure.MARKER), erasure.marker_value(now))]
    written += [(erasure.record_key(r.token, r.suffix), erasure.shred_value(r.audience or "-", now)) for r in shredded]
    for k, v in written:  # what `streamproc forget` writes, read back by the worker and the tools
        directory.apply(k, v)
        table.apply(k, v)
    console.print(f"  [bold]streamproc forget {subject}[/]: forgotten marker + {len(shredded)} shred record(s) in {KEY_TOPIC}")
    for rec in (forgotten, stays):
        console.print(f"  subject {rec['customer_id']}: the same fraud value as before -> {reveal(values[rec['customer_id']])}")
    again = gen.order()
    again["customer_id"] = subject
    got = run(2, again)
    why = ", ".join(f"{a}: {r}" for a, r in got["withheld"])
    console.print(f"  a new order of {subject}: delivered to {', '.join(got['got'])}; withheld ({why})")
    console.print(
        "[dim]once compaction removes the old key record, nothing the processor ever output for the subject's "
        "erasable fields can be reversed by anyone; tokens are one-way and stay (docs/governance.md)[/]\n"
    )


__all__ = ["erasable_policy", "erasure_scene"]
