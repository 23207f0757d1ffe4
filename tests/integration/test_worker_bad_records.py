"""Bad input on a real broker: every bad record lands in the DLQ with the right reason
class, sealed under the quarantine KEK (original key, headers and value recoverable by
incident response only); the worker stays up and processes the good records around them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

import pytest

from streamproc import __version__
from streamproc.crypto.envelope import Sealer, parse_header
from streamproc.crypto.kms.local import LocalKeyring
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import Reason
from streamproc.pipeline.core import (
    H_PROCESSOR,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
)
from streamproc.runtime.dlq import H_DLQ_DETAIL, H_DLQ_FORMAT, H_DLQ_REASON, KEY_TOKEN_DOMAIN
from streamproc.schema.framing import frame
from tests.integration.conftest import (
    WorkerProcess,
    open_dead_letters,
    produce_events,
    produce_raw,
    read_topics,
)

pytestmark = pytest.mark.integration

GOOD = 40
LIMIT = 64 * 1024
CLEAR_HEADERS = {
    H_DLQ_REASON,
    H_DLQ_DETAIL,
    H_DLQ_FORMAT,
    H_SOURCE_TOPIC,
    H_SOURCE_PARTITION,
    H_SOURCE_OFFSET,
    "streamproc.source.timestamp",
    H_PROCESSOR,
}


def _bad_records(ws: Any, tmp_path: Any) -> list[tuple[bytes, bytes, Reason]]:
    """(key, value, expected reason) for every kind of bad input."""
    topic = ws.topic("orders")
    kms = ws.kms()
    from streamproc.client.generator import EventGenerator

    sealer = ws.sealer("orders")
    valid = sealer.seal(EventGenerator(3).order())
    tampered = bytearray(valid)
    tampered[-20] ^= 0x01
    ghost_ring = LocalKeyring.create(tmp_path / "ghost.json")
    ghost_ring.create_key("ghost-kek")
    unknown_kek = Sealer(ghost_ring, "ghost-kek", topic).seal(frame(sealer.schema_id, b"\x00"))
    raw_sealer = Sealer(kms, "orders-kek", topic)
    unknown_schema = raw_sealer.seal(frame(0x0BAD_C0DE, b"\x02\x04ab"))
    garbage_avro = raw_sealer.seal(
        frame(sealer.schema_id, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    )
    not_framed = raw_sealer.seal(b"plain text, no framing")
    wrong_topic = Sealer(kms, "orders-kek", ws.topic("logins")).seal(
        frame(sealer.schema_id, b"\x00")
    )
    oversized = raw_sealer.seal(frame(sealer.schema_id, os.urandom(LIMIT + 1000)))
    return [
        (b"k-random", b"\x07" + os.urandom(200), Reason.UNSUPPORTED_VERSION),
        (b"k-empty", b"", Reason.MALFORMED),
        (b"k-truncated", valid[:30], Reason.MALFORMED),
        (b"k-tampered", bytes(tampered), Reason.TAMPERED),
        (b"k-unknown-kek", unknown_kek, Reason.UNKNOWN_KEY),
        (b"k-unknown-schema", unknown_schema, Reason.UNKNOWN_SCHEMA),
        (b"k-garbage-avro", garbage_avro, Reason.BAD_PAYLOAD),
        (b"k-not-framed", not_framed, Reason.BAD_PAYLOAD),
        (b"k-wrong-topic", wrong_topic, Reason.WRONG_TOPIC),
        (b"k-oversized", oversized, Reason.OVERSIZED),
    ]


def expected_dlq_key(ws: Any, key: bytes) -> bytes:
    """The DLQ key, computed with the standard library's HMAC (not the code under test):
    ``tk<v>_`` + base64url(HMAC-SHA256(HKDF(master, "streamproc/token/v2",
    "dead_letter\\0" + domain), key)[:16])."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    version, master = ws.kms().get_secret("pseudonym-master")
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"streamproc/token/v2",
        info=b"dead_letter\x00" + KEY_TOKEN_DOMAIN.encode(),
    ).derive(master)
    # ... and it is no audience's (nor a shared domain's) token key of that domain
    keys = PseudonymKeys(ws.kms(), "pseudonym-master")
    assert derived != keys.token_key(KEY_TOKEN_DOMAIN, audience=None)[1]
    assert derived != keys.token_key(KEY_TOKEN_DOMAIN, audience="analytics")[1]
    mac = hmac.new(derived, key, hashlib.sha256).digest()[:16]
    return f"tk{version}_".encode() + base64.urlsafe_b64encode(mac).rstrip(b"=")


@pytest.mark.tansu_smoke
def test_bad_records_go_to_the_dlq_and_the_worker_carries_on(
    workspace_factory: Any, workers: list[WorkerProcess], tmp_path: Any
) -> None:
    ws = workspace_factory(sources=("orders", "logins"), max_record_bytes=LIMIT)
    bad = _bad_records(ws, tmp_path)
    before = produce_events(ws, "orders", GOOD, seed=5)
    trace = [("trace-id", b"t-123"), ("origin", b"integration-test")]
    dl = produce_raw(
        ws.bootstrap, ws.topic("orders"), [(k, v, r) for k, v, r in bad], headers=trace
    )
    w = WorkerProcess(ws)
    workers.append(w)
    w.wait_assigned()
    after = produce_events(ws, "orders", GOOD, seed=6)
    expected_good = {**before.records, **after.records}
    dest = ws.dest("orders", "fraud")
    out = read_topics(
        ws.bootstrap,
        [dest, ws.dlq("orders")],
        until=lambda r: len(r[dest]) >= 2 * GOOD and len(r[ws.dlq("orders")]) >= len(bad),
        timeout=60,
    )
    assert w.alive(), w.log()[-3000:]
    assert sorted((r.source[1], r.source[2]) for r in out[dest]) == sorted(expected_good)
    dlq = out[ws.dlq("orders")]
    assert len(dlq) == len(bad), [r.header(H_DLQ_REASON) for r in dlq]
    # At rest: a token key, only non-sensitive clear headers, a value sealed under the
    # quarantine KEK -- no original key, header or value bytes anywhere in the record.
    for r in dlq:
        assert {k for k, _ in r.headers} <= CLEAR_HEADERS, r.headers
        assert r.header(H_DLQ_FORMAT) == "sealed-v1"
        assert r.value is not None and parse_header(r.value).kek_id == "quarantine-kek"
        wire = (r.key or b"") + r.value + b"".join(k.encode() + (v or b"") for k, v in r.headers)
        for key, value, _ in bad:
            assert key not in wire
            assert len(value) < 16 or value[-16:] not in wire
        assert b"t-123" not in wire and b"integration-test" not in wire
    by_loc = {(r.header(H_SOURCE_PARTITION), r.header(H_SOURCE_OFFSET)): r for r in dlq}
    opened = {
        (str(d.partition), str(d.offset)): d for d in open_dead_letters(ws, dlq)
    }
    for (part, off), reason in dl.records.items():
        r = by_loc[(str(part), str(off))]
        d = opened[(str(part), str(off))]
        assert r.header(H_DLQ_REASON) == reason.value == d.reason, d.detail
        assert r.key == expected_dlq_key(ws, dl.keys[(part, off)])
        assert r.header(H_SOURCE_TOPIC) == ws.topic("orders") == d.topic
        assert r.header(H_PROCESSOR) == __version__
        assert d.key == dl.keys[(part, off)]
        assert list(d.headers) == trace, "the original headers, sealed"
        assert len(d.detail) < 300
        original = dl.values[(part, off)]
        assert original is not None
        assert d.value_length == len(original)
        assert d.value_sha256 == hashlib.sha256(original).digest()
        if reason is Reason.OVERSIZED:
            # Whole, it would not fit the 64 KiB limit: a prefix is kept, with the digest.
            assert d.truncated and not d.complete
            assert d.value is not None and original.startswith(d.value) and len(d.value) < LIMIT
            assert r.value is not None and len(r.value) <= LIMIT
        else:
            assert d.complete and d.value == original, "the original bytes, sealed"
    # No bad record produced an output anywhere.
    for t in ws.destinations():
        assert not any(
            r.source[1:] in dl.records
            for r in read_topics(ws.bootstrap, [t], idle=0.3)[t]
            if r.source[0] == ws.topic("orders")
        )
    assert not read_topics(ws.bootstrap, [ws.dlq("logins")], idle=0.3)[ws.dlq("logins")]
    events = w.log_events()
    reasons = {
        e.get("reason") for e in events if e.get("message", "").startswith("record dead-lettered")
    }
    assert reasons == {r.value for _, _, r in bad}
    # Logs name reason classes and offsets, never the bytes.
    log = w.log()
    for _, v, _ in bad:
        if len(v) > 8:
            assert v[8:40].hex() not in log
    w.terminate()
    assert w.wait(30) == 0


def test_a_quarantine_kek_the_processor_cannot_use_is_a_config_error(
    workspace_factory: Any, workers: list[WorkerProcess]
) -> None:
    """Caught at start-up (exit 78 naming the setting), not at the first bad record."""
    import yaml

    ws = workspace_factory(sources=("orders",), partitions=1)
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["dead_letter"] = {"kek": "no-such-quarantine-kek"}
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    w = WorkerProcess(ws)
    workers.append(w)
    assert w.wait(60) == 78, w.log()[-2000:]
    assert "dead_letter.kek 'no-such-quarantine-kek'" in w.log()
