"""Consent and purpose: the wire format of the consent topic and the decision per basis.

A policy's ``purposes:`` give each purpose a legal basis (:class:`~streamproc.policy.model.Purpose`);
each audience names its purpose.  Whether one subject's record reaches an audience is then
a function of the basis and of the subject's last consent record for that purpose:

=================  ==========  ===========  ===========  ===========
basis              no record   granted      withdrawn    objected
=================  ==========  ===========  ===========  ===========
consent            not_granted allow        withdrawn    withdrawn
contract, l. int.  allow       allow        allow        objected
=================  ==========  ===========  ===========  ===========

``consent`` is opt-in (default deny); the other bases are opt-out (default allow until the
subject objects).  Withdrawing consent does not stop processing that rests on another basis
(that is what an objection is for); an objection under a consent purpose counts as a
withdrawal.  Every refusal has a reason class (:data:`WITHHELD_REASONS`, bounded: metric
labels and audit counts use it), never a value.

The consent topic (compacted) holds one record per (subject, purpose):

* key: ``<token>/<purpose>`` -- the subject's token in the consent domain (HKDF-derived
  from the pseudonym master, salt ``streamproc/consent/v1``; never the raw identifier),
  then the purpose name.  One key per purpose, not per subject: compaction keeps the last
  record of a key, so a per-subject key would make every writer read the subject's state
  first and race any concurrent writer; per-purpose keys make each write self-contained.
* value: JSON ``{"v": 1, "purpose": NAME, "status": granted|withdrawn|objected, "at": MS}``
  (``at``: when the subject acted, epoch milliseconds; informative -- the *record order*
  decides, last writer wins per key).  A tombstone (null value) removes the record: the
  subject is then as if they never acted.

This module is pure (no Kafka, no keys): the runtime feeds :class:`ConsentState` from the
topic, the pipeline asks :func:`decide`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: What a subject can say about a purpose.
STATUSES = ("granted", "withdrawn", "objected")
#: Why a record was withheld from an audience (metric label values and audit counts).
NOT_GRANTED = "not_granted"
WITHDRAWN = "withdrawn"
OBJECTED = "objected"
NO_SUBJECT = "no_subject"
#: The subject was forgotten (``streamproc forget``): no key may encrypt their erasable
#: fields any more, so audiences with ``erasable`` rules get nothing of their records.
FORGOTTEN = "forgotten"
WITHHELD_REASONS = (NOT_GRANTED, WITHDRAWN, OBJECTED, NO_SUBJECT, FORGOTTEN)

FORMAT_VERSION = 1
_KEY = re.compile(rb"tk(\d+)_[A-Za-z0-9_-]{22}/[A-Za-z0-9_-]+")


class ConsentFormatError(ValueError):
    """A consent-topic record that is not in the format (the message names no value)."""


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """One subject's last word on one purpose."""

    purpose: str
    status: str
    at_ms: int


def record_key(token: str, purpose: str) -> bytes:
    """The consent-topic key of (subject token, purpose)."""
    return f"{token}/{purpose}".encode()


def key_version(key: bytes) -> int:
    """The pseudonym-master version a key's token was derived under (``tk<v>_``)."""
    m = _KEY.fullmatch(key)
    if m is None:
        raise ConsentFormatError("consent key is not <token>/<purpose>")
    return int(m.group(1))


def encode(purpose: str, status: str, at_ms: int) -> bytes:
    """The value of a consent-topic record (format v1, compact JSON)."""
    if status not in STATUSES:
        raise ConsentFormatError(f"status must be one of {', '.join(STATUSES)}")
    return json.dumps(
        {"v": FORMAT_VERSION, "purpose": purpose, "status": status, "at": int(at_ms)},
        separators=(",", ":"),
    ).encode()


def decode(key: bytes, value: bytes) -> ConsentRecord:
    """Parse a value; the key's purpose must match (a value copied under another key is refused)."""
    try:
        obj: Any = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise ConsentFormatError("consent value is not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
        raise ConsentFormatError("consent value has an unknown format version")
    purpose, status, at = obj.get("purpose"), obj.get("status"), obj.get("at")
    if status not in STATUSES or not isinstance(purpose, str) or not isinstance(at, int):
        raise ConsentFormatError("consent value lacks purpose, status or at")
    if not key.endswith(b"/" + purpose.encode()):
        raise ConsentFormatError("consent value's purpose does not match its key")
    return ConsentRecord(purpose, status, at)


def decide(opt_in: bool, record: ConsentRecord | None) -> str | None:
    """``None`` (the record may flow) or the reason it is withheld; see the module table."""
    if opt_in:
        if record is None:
            return NOT_GRANTED
        return None if record.status == "granted" else WITHDRAWN
    if record is not None and record.status == "objected":
        return OBJECTED
    return None


class ConsentState:
    """The table: consent key -> the last record applied for it (last writer wins).

    Written by one thread (the table's consumer, in topic order), read by the processing
    thread: each :meth:`apply` is one dict assignment or deletion, atomic in CPython, so a
    reader sees either the old or the new record of a key, never a mix.  An unreadable
    value fails closed: it is kept as an objection (nothing flows on any basis) until a
    readable record replaces it.
    """

    def __init__(self) -> None:
        self._records: dict[bytes, ConsentRecord] = {}
        self._versions: frozenset[int] = frozenset()
        self.unreadable = 0
        """Unreadable values applied so far (each withholds its subject's purpose)."""

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one topic record; raises :class:`ConsentFormatError` for a malformed key."""
        if key is None:
            raise ConsentFormatError("consent record without a key")
        version = key_version(key)
        if value is None:
            self._records.pop(key, None)
            return
        try:
            rec = decode(key, value)
        except ConsentFormatError:
            self.unreadable += 1
            purpose = key.rsplit(b"/", 1)[1].decode()
            rec = ConsentRecord(purpose, "objected", 0)
        if version not in self._versions:
            self._versions = self._versions | {version}
        self._records[key] = rec

    def get(self, key: bytes) -> ConsentRecord | None:
        return self._records.get(key)

    @property
    def versions(self) -> frozenset[int]:
        """The master versions the keys were derived under (lookups try each)."""
        return self._versions

    def __len__(self) -> int:
        return len(self._records)

    def keys(self) -> Iterable[bytes]:
        return list(self._records)


def latest(records: Iterable[tuple[int, ConsentRecord | None]]) -> ConsentRecord | None:
    """Of one subject's records for one purpose under several master versions, the one
    under the newest version (writers always use the primary version, so after a rotation
    the newer version's record is the later word)."""
    best: tuple[int, ConsentRecord] | None = None
    for version, rec in records:
        if rec is not None and (best is None or version > best[0]):
            best = (version, rec)
    return None if best is None else best[1]


__all__ = [
    "FORGOTTEN",
    "NOT_GRANTED",
    "NO_SUBJECT",
    "OBJECTED",
    "STATUSES",
    "WITHDRAWN",
    "WITHHELD_REASONS",
    "ConsentFormatError",
    "ConsentRecord",
    "ConsentState",
    "decide",
    "decode",
    "encode",
    "key_version",
    "latest",
    "record_key",
]
