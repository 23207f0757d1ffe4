"""Capped exponential backoff with jitter, shared by every retry loop of the runtime.

Jitter matters when several workers lose the same dependency at once: without it they
retry in lock-step and hit the KMS or broker together as it comes back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``delay(attempt)`` = min(cap, base * 2**(attempt-1)) scaled by a jitter in [0.5, 1]."""

    base: float = 0.1
    cap: float = 10.0
    jitter: bool = True
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay(self, attempt: int) -> float:
        raw = min(self.cap, self.base * (2 ** max(0, attempt - 1)))
        return raw * (0.5 + 0.5 * self._rng.random()) if self.jitter else raw
