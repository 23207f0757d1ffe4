"""A bounded cache of unwrapped data keys (LRU plus TTL), with negative caching.

Envelope decryption calls the KMS once per *data key*, not once per record: producers
reuse a data key for many records, so after the first record every other record of that
data key is a dictionary hit.  Entries expire after ``ttl`` seconds so that a revocation
in the KMS takes effect within a bounded time even if nobody tells us, and every
``revocation_check_interval`` seconds the cache asks the provider whether any cached KEK
version was revoked and evicts its keys.

Failures that are properties of the key (unknown, revoked, inauthentic) are cached for
``negative_ttl`` seconds so a flood of records under a dead key does not become a flood
of KMS calls.  Transient outages (:class:`~streamproc.errors.KmsUnavailable`) are never
cached.  Any other exception a provider lets escape (an error it does not map, a
``ConfigError`` about one key, a library bug) is a failure of *this* wrapped key: it is
re-raised as a plain :class:`~streamproc.errors.KmsError` naming only its class and
negatively cached like the others, so that a record can never turn a provider quirk into
a crash of the processor (the pipeline dead-letters it as ``kms_error``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streamproc.crypto.kms import KmsProvider
from streamproc.errors import KmsError, TransientError

CacheKey = tuple[str, int, bytes, str]


class DekCache:
    def __init__(
        self,
        kms: KmsProvider,
        *,
        max_entries: int = 10_000,
        ttl: float = 300.0,
        negative_ttl: float = 5.0,
        revocation_check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.kms = kms
        self.max_entries = max_entries
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.revocation_check_interval = revocation_check_interval
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, AESGCM]] = OrderedDict()
        self._failures: dict[CacheKey, tuple[float, KmsError]] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()
        #: Plain counters (cheap on the hot path); read them through :meth:`stats`.
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, kek_id: str, kek_version: int, wrapped: bytes, topic: str) -> AESGCM:
        """Return the AEAD for a wrapped data key, unwrapping through the KMS on a miss."""
        key = (kek_id, kek_version, wrapped, topic)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            self.hits += 1
            with self._lock:  # LRU, not FIFO: a hit makes the entry the most recent
                if key in self._entries:
                    self._entries.move_to_end(key)
            if now - self._last_sweep >= self.revocation_check_interval:
                self._sweep(now)
                if key not in self._entries:
                    return self.get(kek_id, kek_version, wrapped, topic)
            return entry[1]
        return self._miss(key, now)

    def _miss(self, key: CacheKey, now: float) -> AESGCM:
        self.misses += 1
        failure = self._failures.get(key)
        if failure is not None:
            if failure[0] > now:
                raise failure[1].with_traceback(None)  # do not pile up frames on each re-raise
            del self._failures[key]
        kek_id, kek_version, wrapped, topic = key
        ctx: Mapping[str, str] = {"topic": topic}
        try:
            dek = self.kms.unwrap(kek_id, kek_version, wrapped, ctx)
        except TransientError:
            raise
        except Exception as exc:
            err = (
                exc
                if isinstance(exc, KmsError)
                else KmsError(f"unwrap raised {type(exc).__name__}")
            )
            if len(self._failures) > self.max_entries:
                self._failures.clear()
            self._failures[key] = (now + self.negative_ttl, err)
            raise err from None
        try:
            aead = AESGCM(dek)
        except (TypeError, ValueError):  # not 128/192/256 bits: the provider misbehaved
            err = KmsError("unwrap returned no usable data key")
            self._failures[key] = (now + self.negative_ttl, err)
            raise err from None
        with self._lock:
            self._entries[key] = (now + self.ttl, aead)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1
        return aead

    def _sweep(self, now: float) -> None:
        """Evict expired entries and entries whose KEK version the KMS reports revoked."""
        self._last_sweep = now
        with self._lock:
            versions = {(k[0], k[1]) for k in self._entries}
            revoked = {kv for kv in versions if self._safe_is_revoked(*kv)}
            for k in [k for k, (exp, _) in self._entries.items() if exp <= now or (k[0], k[1]) in revoked]:
                del self._entries[k]
                self.evictions += 1

    def _safe_is_revoked(self, kek_id: str, version: int) -> bool:
        try:
            return self.kms.is_revoked(kek_id, version)
        except Exception:
            return False  # an outage is not a revocation; TTL still bounds staleness

    def evict_kek(self, kek_id: str, kek_version: int | None = None) -> int:
        """Drop every cached key of a KEK (or one version); returns how many went."""
        with self._lock:
            doomed = [k for k in self._entries if k[0] == kek_id and (kek_version is None or k[1] == kek_version)]
            for k in doomed:
                del self._entries[k]
            self.evictions += len(doomed)
            return len(doomed)

    def stats(self) -> DekCacheStats:
        """The cumulative counters and current size, as one value for reporters."""
        return DekCacheStats(self.hits, self.misses, self.evictions, len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class DekCacheStats:
    """What a data-key cache reports: cumulative hits, misses, evictions; entries now.

    Cumulative so that a reporter can turn them into counter increments by difference
    (and notice a new cache by a smaller value).
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
