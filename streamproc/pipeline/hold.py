"""``risk.action: hold``: records kept back until their class reaches k, durably.

A record whose quasi-identifier class is still below k in the audience's risk window is
not produced; it is *held* (:class:`~streamproc.pipeline.risk.RiskGuard.hold` decides).
Holding in memory would lose it on a crash, so the held record lives in a compacted
changelog topic, ``<group_id>.risk-hold``, written in the batch's transaction with the
outputs and the input offsets (the state-in-the-transaction seam of
:mod:`streamproc.pipeline.state`, like the budget book):

* **What is held.**  The record's *sealed* output (ciphertext under the destination's
  KEK: never plaintext at rest) with its record key and headers, and its sealed
  *suppressed* variant (quasi-identifiers null, as ``suppress`` makes), plus the hold
  time and the input's topic and offset.
* **Keys.**  ``audience NUL class-digest NUL destination NUL source NUL offset``: the
  class digest is a keyed HMAC of the tuple under the audience's hold key (derived from
  the pseudonym master), never a value.  Partition = the input partition: whoever owns
  input partition p owns its held records, restores them on assignment and drops them on
  revocation (:mod:`streamproc.runtime.state`).
* **Release.**  When a record of the class reaches k, every held record of the class
  (this worker's partitions) is produced with its full output and its entry tombstoned,
  in that batch's transaction; when a held record outlives the window, or the audience
  holds more than ``hold.max_records`` (oldest first), it is produced as its suppressed
  variant.  Either way exactly once: the output and the tombstone commit together.
* **Epochs.**  Holds and releases of a batch that is not committed are undone
  (:class:`~streamproc.pipeline.state.UndoLog`); the redone batch holds them again.

Nothing here logs a value: held records are ciphertext, keys are digests and names.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from streamproc.pipeline.state import StateWrite, UndoLog

Headers = tuple[tuple[str, bytes | None], ...]
_Key = tuple[int, bytes]  # (input partition, changelog key)


@dataclass(frozen=True, slots=True)
class Held:
    """One held record: its sealed outputs and where it came from."""

    audience: str
    digest: bytes
    held_at: float
    topic: str
    """The destination topic."""
    key: bytes | None
    headers: Headers
    value: bytes
    """The sealed full output (released when the class reaches k)."""
    suppressed: bytes
    """The sealed suppressed variant (released on expiry or when the hold is full)."""
    source: str
    partition: int
    offset: int

    def changelog_key(self) -> bytes:
        return b"\x00".join(
            (self.audience.encode(), self.digest.hex().encode(), self.topic.encode(), self.source.encode(),
             str(self.offset).encode())
        )


def _b(v: bytes | None) -> str | None:
    return None if v is None else base64.b64encode(v).decode()


def _u(v: str | None) -> bytes | None:
    return None if v is None else base64.b64decode(v)


def encode(h: Held) -> bytes:
    """The changelog value of ``h`` (JSON; every byte string base64: ciphertext, digests)."""
    return json.dumps(
        {"v": 1, "a": h.audience, "c": _b(h.digest), "t": h.held_at, "d": h.topic, "k": _b(h.key),
         "h": [[n, _b(v)] for n, v in h.headers], "o": _b(h.value), "s": _b(h.suppressed),
         "src": h.source, "p": h.partition, "off": h.offset},
        separators=(",", ":"),
    ).encode()


def decode(value: bytes) -> Held:
    """The held record of a changelog value; ``ValueError`` (naming no value) if malformed."""
    try:
        d = json.loads(value)
        if d.get("v") != 1:
            raise ValueError("unknown hold record version")
        digest, out, sup = _u(d["c"]), _u(d["o"]), _u(d["s"])
        if digest is None or out is None or sup is None:
            raise ValueError("hold record without its outputs")
        return Held(
            str(d["a"]), digest, float(d["t"]), str(d["d"]), _u(d["k"]),
            tuple((str(n), _u(v)) for n, v in d["h"]), out, sup, str(d["src"]), int(d["p"]), int(d["off"]),
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed hold record ({type(exc).__name__})") from None


class HoldBook:
    """The held records of every ``hold`` audience, per input partition (module doc)."""

    def __init__(
        self,
        topic: str,
        limits: Mapping[str, tuple[int, float]],
        on_restore: Callable[[str, bytes, float], None],
    ) -> None:
        """``limits``: audience -> (``hold.max_records``, window seconds); ``on_restore``
        is called per restored record (audience, class digest, hold time) so the risk
        window counts it again."""
        self.topic = topic
        self.limits = dict(limits)
        self._on_restore = on_restore
        self._entries: dict[_Key, Held] = {}
        self._classes: dict[tuple[str, bytes], set[_Key]] = {}
        self._count: dict[str, int] = dict.fromkeys(limits, 0)
        self._dirty: dict[_Key, bytes | None] = {}
        self._undo: UndoLog[_Key, Held] = UndoLog(self._put)
        #: Held records of dropped partitions -> hold time: the risk window still counts
        #: them, so restoring them again (the partition comes back) must not count twice
        #: (an over-count would release a class before k).
        self._counted: dict[_Key, float] = {}
        self.restored = 0

    # -- decisions -----------------------------------------------------------------------
    def hold(self, h: Held, value: bytes | None = None) -> None:
        """Hold ``h`` (``value``: its :func:`encode`, if the caller has it already)."""
        k = (h.partition, h.changelog_key())
        self._undo.touch(k, lambda: self._entries.get(k))
        self._put(k, h)
        self._dirty[k] = encode(h) if value is None else value

    def release_class(self, audience: str, digest: bytes) -> list[Held]:
        """Take every held record of the class (it reached k), oldest first."""
        keys = self._classes.get((audience, digest))
        if not keys:
            return []
        out = sorted((self._entries[k] for k in keys), key=_age)
        for h in out:
            self._take((h.partition, h.changelog_key()))
        return out

    def expire(self, audience: str, now: float) -> list[Held]:
        """Take the held records of ``audience`` older than the window, then the oldest
        beyond ``hold.max_records``: they are released suppressed."""
        cap, window = self.limits[audience]
        mine = sorted((h for h in self._entries.values() if h.audience == audience), key=_age)
        n_old = sum(1 for h in mine if h.held_at <= now - window)
        n = max(n_old, len(mine) - cap)
        for h in mine[:n]:
            self._take((h.partition, h.changelog_key()))
        return mine[:n]

    def _take(self, k: _Key) -> None:
        self._undo.touch(k, lambda: self._entries.get(k))
        self._put(k, None)
        self._dirty[k] = None

    def held(self, audience: str) -> int:
        return self._count.get(audience, 0)

    def writes(self) -> list[StateWrite]:
        """The holds and releases since the last call (releases are tombstones)."""
        out = [StateWrite(self.topic, p, key, v) for (p, key), v in self._dirty.items()]
        self._dirty.clear()
        return out

    # -- the epoch protocol (streamproc.pipeline.state) -----------------------------------
    def begin(self, epoch: int) -> None:
        self._undo.begin(epoch)

    def committed(self, epoch: int) -> None:
        self._undo.committed(epoch)

    def discard(self, epoch: int) -> None:
        self._dirty.clear()
        self._undo.discard(epoch)

    def rollback(self) -> None:
        self._dirty.clear()
        self._undo.rollback()

    def _put(self, k: _Key, h: Held | None) -> None:
        old = self._entries.pop(k, None)
        if old is not None:
            ck = (old.audience, old.digest)
            keys = self._classes[ck]
            keys.discard(k)
            if not keys:
                del self._classes[ck]
            self._count[old.audience] -= 1
        if h is not None:
            self._entries[k] = h
            self._classes.setdefault((h.audience, h.digest), set()).add(k)
            self._count[h.audience] = self._count.get(h.audience, 0) + 1

    # -- the changelog (streamproc.runtime.state.ChangelogStore) --------------------------
    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record of ``partition`` (offset order: the last wins).  A
        record of an audience that no longer holds is skipped (the operator changed the
        policy; its records stay in the topic); a malformed one raises ``ValueError``
        (the worker stops: held records it cannot read are not dropped)."""
        aud = key.partition(b"\x00")[0].decode("utf-8", "replace")
        if aud not in self.limits:
            return
        k = (partition, key)
        if value is None:
            self._put(k, None)
            return
        h = decode(value)
        if h.audience != aud or h.partition != partition:
            raise ValueError("hold record under another audience's or partition's key")
        self._put(k, h)
        if self._counted.pop(k, None) is None:
            self._on_restore(aud, h.digest, h.held_at)
        self.restored += 1

    def drop(self, partition: int) -> None:
        """Forget ``partition``'s held records (revoked: the next owner restores them)."""
        for k in [k for k in self._entries if k[0] == partition]:
            self._counted[k] = self._entries[k].held_at
            self._put(k, None)
        if self._counted:  # what the windows have let go by now needs counting again
            newest = max(self._counted.values())
            oldest_kept = newest - max(w for _, w in self.limits.values())
            self._counted = {k: t for k, t in self._counted.items() if t > oldest_kept}
        self._undo.forget(lambda k: k[0] != partition)
        self._dirty = {k: v for k, v in self._dirty.items() if k[0] != partition}


def _age(h: Held) -> tuple[float, str, int, str]:
    return (h.held_at, h.source, h.offset, h.topic)


__all__ = ["Held", "HoldBook", "decode", "encode"]
