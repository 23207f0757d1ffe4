"""``token``: a keyed HMAC-SHA256 pseudonym, deterministic within a pseudonym domain.

Equal inputs in the same domain give equal tokens, so joins and counts work downstream;
the same input in another domain gives an unrelated token.  Tokens look like
``tk3_<22 base64url characters>``: the master-key version, then 128 bits of HMAC.
Any scalar type is accepted; the output is a string.  ``normalize: [lower, strip]``
canonicalizes strings first (e-mail addresses, say).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.crypto.pseudonym import make_text_tokenizer, make_tokenizer
from streamproc.operators.base import (
    SCALARS,
    STRING,
    TEMPORAL,
    OpContext,
    Operator,
    OperatorError,
    canonical_bytes,
    normalizer,
    require_kind,
)
from streamproc.schema.avro import AvroType, Enum


class Token(Operator):
    name = "token"
    needs_keys = True
    params = {"domain": (str,), "normalize": (str, list)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        normalizer(params.get("normalize"))

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, SCALARS | TEMPORAL)
        return STRING

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        if ctx.keys is None:
            raise OperatorError("token needs pseudonym keys (policy 'keys.pseudonym')")
        version, key = ctx.keys.token_key(ctx.domain)
        tok = make_tokenizer(version, key)
        norm = normalizer(params.get("normalize"))
        if isinstance(t, Enum):
            symbols = t.symbols
            return lambda v: tok(symbols[v].encode())
        if t.kind == "string":
            # Same tokens as tok(norm(v).encode()), in one call instead of two or three.
            return make_text_tokenizer(version, key, norm)
        if t.kind in ("bytes", "fixed"):
            return tok
        return lambda v: tok(canonical_bytes(v))
