"""``drop``: the field leaves the output schema altogether (the strongest minimization)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.operators.base import OpContext, Operator
from streamproc.schema.avro import AvroType


class Drop(Operator):
    name = "drop"
    any_type = True

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        return None

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        return None  # the compiler skips the bytes; nothing runs per value
