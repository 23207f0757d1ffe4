"""``keep``: the value passes unchanged (the explicit opt-out of minimization)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.operators.base import OpContext, Operator
from streamproc.schema.avro import AvroType


class Keep(Operator):
    name = "keep"
    any_type = True

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        return t

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        return None  # the compiler copies kept bytes verbatim; nothing runs per value
