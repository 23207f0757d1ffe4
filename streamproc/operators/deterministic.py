"""``encrypt_deterministic``: AES-SIV under the audience's key, reversible by that key only.

Equal inputs give equal outputs (joins work) but, unlike a token, the holder of the
audience key can recover the value through the re-identification API.  The pseudonym
domain is the SIV associated data, so a ciphertext cannot be replayed into another domain.
Output: ``de<v>_<base64url(SIV tag || ciphertext)>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streamproc.crypto.pseudonym import siv_encrypt
from streamproc.operators.base import KeyedScalarOperator, OpContext, OperatorError
from streamproc.schema.avro import AvroType


class EncryptDeterministic(KeyedScalarOperator):
    name = "encrypt_deterministic"

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        if ctx.keys is None:
            raise OperatorError("encrypt_deterministic needs pseudonym keys (policy 'keys.pseudonym')")
        if ctx.key_audience(ctx.domain) is None:
            # Re-identification is scoped to one audience's exported key: a ciphertext two
            # audiences could both reverse would make either key open the other's values.
            raise OperatorError(
                f"domain {ctx.domain!r} is shared between audiences; encrypt_deterministic keys "
                "are per audience (use token for a joinable shared domain)"
            )
        version, key = ctx.keys.siv_key(ctx.audience)
        siv = AESSIV(key)
        ad = ctx.domain.encode()
        value_bytes = self.value_bytes(params, t)
        return lambda v: siv_encrypt(siv, version, ad, value_bytes(v))
