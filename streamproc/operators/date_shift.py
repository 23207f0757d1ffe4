"""``date_shift``: move dates by a per-subject offset, consistent across records.

Every date of one data subject moves by the same number of days (1..``max_days``, either
direction), so intervals between a subject's events survive while the absolute dates do
not.  The offset is ``HMAC(shift_key(audience, domain), subject)``: keyed, so it cannot be
recomputed without the key.  The subject is the value of the field marked
``"streamproc.subject": true`` in the schema, or the one named by ``subject_field``.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        _, key = ctx.keys.shift_key(ctx.audience, ctx.domain)
        mac = hmac_sha256_fn(key)  # HMAC-SHA256 with the key schedule precomputed
        max_days = params.get("max_days", 30)
        unit = _PER_DAY[value_kind(t)]

        def shift(v: int, subject: bytes) -> int:
            x = int.from_bytes(mac(subject)[:8], "big")
            days = (x >> 1) % max_days + 1
            return v + (days if x & 1 else -days) * unit

        return shift
