"""The hash chain: canonical bytes, event hashes and MACs, anchors and signed heads, keys.

Why a hash chain
----------------
An audit log is only useful if a reader can tell whether it was edited.  Every event
carries its position (``seq``) and ``prev``, the hash of the event before it, and
``hash`` = SHA-256 over the canonical JSON of the event without ``hash``.  Changing,
deleting, inserting or reordering an event therefore breaks either the event's own hash or
the next event's ``prev`` link, and :func:`streamproc.audit.verify` says where.  With an
audit key every event also carries ``mac`` (HMAC-SHA256), and a chain's last event can be
exported as a signed :class:`Head` to catch a truncated tail.

Everything here is a pure function of its inputs (plus the two key-file helpers): the
writer (:mod:`streamproc.audit.log`), the verifier and the sinks share these definitions,
so the bytes a writer hashes are the bytes a verifier re-hashes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac as _hmac
import json
import os
import re
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamproc.audit.events import _ACTOR_RE
from streamproc.errors import ConfigError

FORMAT_VERSION = 1
GENESIS = "0" * 64
"""``prev`` of the first event of a chain."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_EVENT_KEYS = frozenset(
    {"v", "stream", "seq", "ts", "type", "actor", "attrs", "prev", "hash", "mac"}
)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per event, in any language."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def event_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of the event without ``hash``.

    ``mac``, when present, is covered, so an edited MAC is caught even without the key.
    """
    return hashlib.sha256(
        canonical_json({k: v for k, v in event.items() if k != "hash"})
    ).hexdigest()


def event_mac(key: bytes, event: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) over the canonical JSON of the event without ``hash`` and ``mac``."""
    body = canonical_json({k: v for k, v in event.items() if k not in ("hash", "mac")})
    return _hmac.new(key, body, hashlib.sha256).hexdigest()


def format_ts(t: float) -> str:
    """RFC 3339 UTC with microseconds: a string, so every language hashes the same bytes."""
    return (
        datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Anchor:
    """A verified point in a chain: the next event must have ``seq + 1`` and ``prev == hash``."""

    stream: str
    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str, stream: str = "") -> Anchor:
        """``SEQ:HASH`` as printed by ``streamproc audit verify``."""
        seq, _, h = text.partition(":")
        if not seq.isdigit() or not _HEX64.fullmatch(h):
            raise ValueError("an anchor is SEQ:HASH (a sequence number and a 64-hex-digit hash)")
        return cls(stream, int(seq), h)


HEAD_FORMAT = "streamproc-audit-head/1"


def head_mac(key: bytes, stream: str, seq: int, hash_: str) -> str:
    """HMAC-SHA256 (hex) of a chain head: the chain id, its last sequence and hash.

    Domain-separated by :data:`HEAD_FORMAT`, so an event MAC can never pass for a head
    signature or the reverse.
    """
    body = canonical_json({"format": HEAD_FORMAT, "stream": stream, "seq": seq, "hash": hash_})
    return _hmac.new(key, body, hashlib.sha256).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Head:
    """A chain's last event, signed with the audit key, to be kept *outside* the log.

    Why: a hash chain (even with MACs) cannot tell that events were cut from its end, or
    that the whole file was emptied -- the remaining prefix is a valid chain.  A head
    exported elsewhere (the audit topic, a ``.head`` file, the shutdown log line, a
    ticket) says how far the chain had got; :func:`verify` with ``expect_head`` then fails
    when the chain no longer reaches it.  The signature stops someone who can write the
    head's copy from lowering it (unsigned heads exist only for chains without a key).

    Text form (``streamproc audit head`` prints it, ``--expect-head`` reads it):
    ``STREAM@SEQ:HASH[:MAC]``.
    """

    stream: str
    seq: int
    hash: str
    mac: str | None = None

    def __str__(self) -> str:
        return f"{self.stream}@{self.seq}:{self.hash}" + (f":{self.mac}" if self.mac else "")

    @classmethod
    def make(cls, stream: str, seq: int, hash_: str, key: bytes | None) -> Head:
        return cls(stream, seq, hash_, head_mac(key, stream, seq, hash_) if key else None)

    @classmethod
    def parse(cls, text: str) -> Head:
        stream, at, rest = text.strip().rpartition("@")
        parts = rest.split(":")
        if (
            not at
            or not _ACTOR_RE.fullmatch(stream)
            or len(parts) not in (2, 3)
            or not parts[0].isdigit()
            or not all(_HEX64.fullmatch(p) for p in parts[1:])
        ):
            raise ValueError(
                "a head is STREAM@SEQ:HASH[:MAC] (as printed by `streamproc audit head`)"
            )
        return cls(stream, int(parts[0]), parts[1], parts[2] if len(parts) == 3 else None)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "stream": self.stream,
            "seq": self.seq,
            "hash": self.hash,
        }
        if self.mac:
            doc["mac"] = self.mac
        return canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes | str) -> Head:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
                raise ValueError
            return cls.parse(
                f"{doc['stream']}@{doc['seq']}:{doc['hash']}"
                + (f":{doc['mac']}" if doc.get("mac") else "")
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError):
            raise ValueError(f"not a {HEAD_FORMAT} record") from None

    def signed_by(self, key: bytes) -> bool:
        return self.mac is not None and _hmac.compare_digest(
            self.mac, head_mac(key, self.stream, self.seq, self.hash)
        )

    @property
    def anchor(self) -> Anchor:
        return Anchor(self.stream, self.seq, self.hash)


def is_head_record(data: bytes | str) -> bool:
    """Whether a line/record value is an exported head rather than an event."""
    raw = data.encode() if isinstance(data, str) else data
    return raw.startswith(b'{"format":"' + HEAD_FORMAT.encode())


# -- keys ---------------------------------------------------------------------------------


def load_hmac_key(path: str | os.PathLike[str]) -> bytes:
    """Read an audit HMAC key file: base64 of at least 32 random bytes, mode 0600 or stricter."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read audit key file {p} ({exc.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"audit key file {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 or stricter"
        )
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"audit key file {p} is not base64") from None
    if len(key) < 32:
        raise ConfigError(f"audit key in {p} is shorter than 32 bytes")
    return key


def write_hmac_key(path: str | os.PathLike[str]) -> None:
    """Create a new random audit HMAC key file (mode 0600; refuses to overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")
