"""``mask``: keep the first and/or last N characters, replace the rest.

``mask: {keep_last: 4}`` turns a card number into ``************1111``.  With
``preserve: "@."`` the listed separator characters stay (an e-mail keeps its shape).
Numbers are masked on their decimal form and become strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.operators.base import STRING, OpContext, Operator, OperatorError, require_kind
from streamproc.schema.avro import AvroType

_KINDS = frozenset({"string", "int", "long"})


class Mask(Operator):
    name = "mask"
    params = {"keep_first": (int,), "keep_last": (int,), "char": (str,), "preserve": (str,), "fixed_length": (int,)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        for k in ("keep_first", "keep_last", "fixed_length"):
            if params.get(k, 0) < 0:
                raise OperatorError(f"{k} must be >= 0")
        if len(params.get("char", "*")) != 1:
            raise OperatorError("char must be a single character")

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, _KINDS)
        return STRING

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        first = params.get("keep_first", 0)
        last = params.get("keep_last", 0)
        ch = params.get("char", "*")
        keep_chars = frozenset(params.get("preserve", ""))
        fixed = params.get("fixed_length")

        def mask(v: Any) -> str:
            s = v if isinstance(v, str) else str(v)
            n = len(s)
            if first + last >= n:
                # Too short to reveal anything safely: mask everything.
                head, tail, mid_len = "", "", n
                mid = s
            else:
                head, tail = s[:first], s[n - last :] if last else ""
                mid = s[first : n - last]
                mid_len = len(mid)
            if fixed is not None:
                return head + ch * fixed + tail
            if keep_chars:
                return head + "".join(c if c in keep_chars else ch for c in mid) + tail
            return head + ch * mid_len + tail

        return mask
