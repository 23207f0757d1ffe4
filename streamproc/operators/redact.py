"""``redact``: replace the value with a constant, or with null.

``value: null`` (the default) makes the output field nullable (``["null", T]`` with
default null) so the schema stays valid whatever ``T`` was; that also works for records,
arrays and maps.  A constant must fit the field's type (checked when the policy loads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.operators.base import OpContext, Operator, OperatorError, value_kind
from streamproc.schema.avro import AvroType, Primitive, Union

_CONST_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "long": (int,),
    "date": (int,),
    "timestamp-millis": (int,),
    "timestamp-micros": (int,),
    "float": (int, float),
    "double": (int, float),
    "boolean": (bool,),
}


class Redact(Operator):
    name = "redact"
    any_type = True
    params = {"value": (str, int, float, bool, type(None))}

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        value = params.get("value")
        if value is None:
            if isinstance(t, Union):
                if not any(b.kind == "null" for b in t.branches):
                    raise OperatorError("redact to null needs a union with a null branch")
                return t
            return Union("union", branches=[Primitive("null"), t])
        kind = value_kind(t)
        allowed = _CONST_TYPES.get(kind)
        if allowed is None or not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise OperatorError(f"redact constant {type(value).__name__} does not fit Avro type {kind!r}")
        return t

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        const = params.get("value")
        if isinstance(const, int) and value_kind(t) in ("float", "double"):
            const = float(const)
        return lambda _v: const
