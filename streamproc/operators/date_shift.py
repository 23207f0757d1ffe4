"""``date_shift``: move dates by a per-subject offset, consistent across fields and records.

Every date of one data subject moves by the same number of days (1..``max_days``, either
direction), so intervals between a subject's events survive while the absolute dates do
not.  The offset is ``HMAC(shift_key(domain, audience), subject)``: keyed, so it cannot be
recomputed without the key.  The subject is the value of the field marked
``"streamproc.subject": true`` in the schema, or the one named by ``subject:`` (audience)
or ``subject_field`` (rule).

The date-shift domain is the rule's ``domain`` or :data:`SHIFT_DOMAIN` -- never the tag or
the field's domain hint: a subject's ``BIRTH_DATE`` and ``ADMISSION_DATE`` must move
together, or a 5-day stay becomes 27 or -12 days.  The policy model refuses an audience
whose date_shift rules disagree on domain, subject or ``max_days``.  The key is derived
from the master's primary version; that version travels in every output's provenance
header, so a secret rotation is visible and old shifts can be recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from streamproc.crypto.pseudonym import hmac_sha256_fn
from streamproc.operators.base import (
    TEMPORAL,
    OpContext,
    Operator,
    OperatorError,
    require_kind,
    value_kind,
)
from streamproc.schema.avro import AvroType

SHIFT_DOMAIN = "subject"
"""The date-shift domain of a rule that names none: one shift per (audience, subject)."""

_PER_DAY = {"date": 1, "timestamp-millis": 86_400_000, "timestamp-micros": 86_400_000_000}


class DateShift(Operator):
    name = "date_shift"
    needs_subject = True
    needs_keys = True
    params = {"max_days": (int,), "subject_field": (str,), "domain": (str,)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        if not 1 <= params.get("max_days", 30) <= 3650:
            raise OperatorError("max_days must be 1..3650")

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, TEMPORAL)
        return t

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        if ctx.keys is None:
            raise OperatorError("date_shift needs pseudonym keys (policy 'keys.pseudonym')")
        domain = params.get("domain", SHIFT_DOMAIN)
        _, key = ctx.keys.shift_key(domain, audience=ctx.key_audience(domain))
        days_of = shift_days_fn(key, params.get("max_days", 30))
        unit = _PER_DAY[value_kind(t)]

        def shift(v: int, subject: bytes) -> int:
            return v + days_of(subject) * unit

        return shift


def shift_days_fn(key: bytes, max_days: int) -> Callable[[bytes], int]:
    """``f(subject bytes) -> signed days``: the first 8 bytes of HMAC-SHA256(key, subject),
    big-endian; bit 0 picks the direction, the rest ``1 + (x >> 1) % max_days`` days."""
    mac = hmac_sha256_fn(key)  # HMAC-SHA256 with the key schedule precomputed

    def days(subject: bytes) -> int:
        x = int.from_bytes(mac(subject)[:8], "big")
        d = (x >> 1) % max_days + 1
        return d if x & 1 else -d

    return days
