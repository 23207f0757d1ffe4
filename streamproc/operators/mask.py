"""``mask``: keep the first and/or last N characters, replace the rest.

``mask: {keep_last: 4}`` turns a card number into ``************1111``.  With
``preserve: "@."`` the listed separator characters stay (an e-mail keeps its shape).
Numbers are masked on their decimal form and become strings.

At least half of the characters are always masked (:data:`MIN_MASKED_SHARE`): a value
too short to show ``keep_first + keep_last`` characters (and its ``preserve``
separators) *and* hide at least as many is masked entirely, separators included (``keep_last: 4`` on ``12345`` gives ``*****``, never ``*2345``).  Without
that floor, a rule written for 16-digit cards reveals all but one digit of a 5-digit
value.  An output that would still contain the input (a value made only of ``preserve``
or mask characters, the empty string) fails closed like every guarded operator
(``on_failure``: ``redact`` writes the mask character once, ``quarantine``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.operators.base import (
    STRING,
    OpContext,
    Operator,
    OperatorError,
    check_on_failure,
    require_kind,
)
from streamproc.schema.avro import AvroType

_KINDS = frozenset({"string", "int", "long"})

#: The smallest share of a value's characters that is masked (shown <= hidden); kept
#: characters and ``preserve`` separators count as shown.
MIN_MASKED_SHARE = "1/2"


class Mask(Operator):
    name = "mask"
    params = {
        "keep_first": (int,),
        "keep_last": (int,),
        "char": (str,),
        "preserve": (str,),
        "fixed_length": (int,),
        "on_failure": (str,),
    }

    def check_params(self, params: Mapping[str, Any]) -> None:
        for k in ("keep_first", "keep_last", "fixed_length"):
            if params.get(k, 0) < 0:
                raise OperatorError(f"{k} must be >= 0")
        if len(params.get("char", "*")) != 1:
            raise OperatorError("char must be a single character")
        check_on_failure(params)

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, _KINDS)
        return STRING

    def guarded(self, params: Mapping[str, Any], t: AvroType) -> bool:
        return True

    def suppressed(self, params: Mapping[str, Any]) -> str:
        return str(params.get("char", "*"))

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        first = params.get("keep_first", 0)
        last = params.get("keep_last", 0)
        shown = first + last
        ch = params.get("char", "*")
        keep_chars = frozenset(params.get("preserve", ""))
        fixed = params.get("fixed_length")

        def mask(v: Any) -> str:
            s = v if isinstance(v, str) else str(v)
            n = len(s)
            if shown * 2 > n:
                # Too short to show what the rule asks and still hide at least half: mask
                # everything, preserved separators included.
                return ch * (n if fixed is None else fixed)
            head, tail = s[:first], s[n - last :] if last else ""
            mid = s[first : n - last]
            if fixed is not None:
                return head + ch * fixed + tail
            if keep_chars:
                masked = "".join(c if c in keep_chars else ch for c in mid)
                if (shown + sum(c in keep_chars for c in mid)) * 2 > n:
                    return ch * n  # the separators would tip the shown share over half
                return head + masked + tail
            return head + ch * len(mid) + tail

        if not keep_chars and fixed is None:
            # The compiled plan interpreter (streamproc.pipeline.native) computes this
            # variant itself on string fields (same code points, same floor).
            setattr(mask, "native_op", ("mask", first, last, ch))  # noqa: B010 (a function attribute)
        return mask
