"""``token``: a keyed HMAC-SHA256 pseudonym, deterministic within an audience's domain.

Equal inputs in the same domain give equal tokens for one audience, so joins and counts
work downstream; the same input in another domain, or for another audience, gives an
unrelated token (unless the policy shares the domain between named audiences).  Tokens look like
``tk3_<22 base64url characters>``: the master-key version, then 128 bits of HMAC.
Any scalar type is accepted; the output is a string.  ``normalize: [lower, strip]``
canonicalizes strings first (e-mail addresses, say).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamproc.crypto.pseudonym import make_text_tokenizer, make_tokenizer
from streamproc.operators.base import KeyedScalarOperator, OpContext, OperatorError, normalizer
from streamproc.schema.avro import AvroType


class Token(KeyedScalarOperator):
    name = "token"

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        if ctx.keys is None:
            raise OperatorError("token needs pseudonym keys (policy 'keys.pseudonym')")
        version, key = ctx.keys.token_key(ctx.domain, audience=ctx.key_audience(ctx.domain))
        if t.kind == "string":
            # Same tokens as tok(value_bytes(v)), in one call instead of two or three.
            return make_text_tokenizer(version, key, normalizer(params.get("normalize")))
        tok = make_tokenizer(version, key)
        if t.kind in ("bytes", "fixed"):
            return tok
        value_bytes = self.value_bytes(params, t)
        return lambda v: tok(value_bytes(v))
