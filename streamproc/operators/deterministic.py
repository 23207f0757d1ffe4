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


class EncryptDeterministic(Operator):
    name = "encrypt_deterministic"
    needs_keys = True
    params = {"domain": (str,), "normalize": (str, list)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        normalizer(params.get("normalize"))

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, SCALARS | TEMPORAL)
        return STRING

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        if ctx.keys is None:
            raise OperatorError("encrypt_deterministic needs pseudonym keys (policy 'keys.pseudonym')")
        version, key = ctx.keys.siv_key(ctx.audience)
        siv = AESSIV(key)
        ad = ctx.domain.encode()
        norm = normalizer(params.get("normalize"))
        if isinstance(t, Enum):
            symbols = t.symbols
            return lambda v: siv_encrypt(siv, version, ad, symbols[v].encode())
        if t.kind == "string" and norm is not None:
            return lambda v: siv_encrypt(siv, version, ad, norm(v).encode())
        return lambda v: siv_encrypt(siv, version, ad, canonical_bytes(v))
