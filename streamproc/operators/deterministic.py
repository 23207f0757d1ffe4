"""``encrypt_deterministic``: AES-SIV under the audience's key, reversible by that key only.

Equal inputs give equal outputs (joins work) but, unlike a token, the holder of the
audience key can recover the value through the re-identification API.  The pseudonym
domain is the SIV associated data, so a ciphertext cannot be replayed into another domain.
Output: ``de<v>_<base64url(SIV tag || ciphertext)>``.

``erasable: true`` encrypts under the *data subject's* own random key instead
(:mod:`streamproc.crypto.erasure`): ``ds1_<key id>_<base64url(...)>``, deterministic per
subject key, so that ``streamproc forget`` can destroy one subject's values everywhere by
destroying their keys.  It needs the audience's ``subject:`` field (the policy folds it
into the rule as ``subject_field``) and the worker's subject-key table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streamproc.crypto.pseudonym import b64u, siv_encrypt
from streamproc.operators.base import KeyedScalarOperator, OpContext, OperatorError
from streamproc.schema.avro import AvroType


class EncryptDeterministic(KeyedScalarOperator):
    name = "encrypt_deterministic"
    params = {**KeyedScalarOperator.params, "erasable": (bool,), "subject_field": (str,)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        super().check_params(params)
        if "subject_field" in params and not params.get("erasable"):
            raise OperatorError("subject_field applies to erasable rules only (set it with the audience's 'subject')")

    def _check(self, ctx: OpContext) -> None:
        if ctx.keys is None:
            raise OperatorError("encrypt_deterministic needs pseudonym keys (policy 'keys.pseudonym')")
        if ctx.key_audience(ctx.domain) is None:
            # Re-identification is scoped to one audience's exported key: a ciphertext two
            # audiences could both reverse would make either key open the other's values.
            raise OperatorError(
                f"domain {ctx.domain!r} is shared between audiences; encrypt_deterministic keys "
                "are per audience (use token for a joinable shared domain)"
            )

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        self._check(ctx)
        assert ctx.keys is not None
        version, key = ctx.keys.siv_key(ctx.audience)
        siv = AESSIV(key)
        ad = ctx.domain.encode()
        value_bytes = self.value_bytes(params, t)
        return lambda v: siv_encrypt(siv, version, ad, value_bytes(v))


class ErasableEncryptDeterministic(EncryptDeterministic):
    """The ``erasable: true`` form: per-subject keys (see the module doc).

    Not in the registry under its own name: the policy picks it for an
    ``encrypt_deterministic`` rule with ``erasable: true``, so the operator name (lineage,
    metrics, the data map) stays ``encrypt_deterministic``.
    """

    needs_subject = True

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        self._check(ctx)
        table = ctx.erasure
        if table is None:
            raise OperatorError(
                "erasable encrypt_deterministic needs the subject-key table (the processor config's 'erasure:')"
            )
        cipher = table.cipher_fn(ctx.audience)
        ad = ctx.domain.encode()
        value_bytes = self.value_bytes(params, t)

        def enc(v: Any, subject: bytes) -> str:
            prefix, siv, kid = cipher(subject)
            return prefix + b64u(siv.encrypt(value_bytes(v), [ad, kid]))

        return enc


ERASABLE = ErasableEncryptDeterministic()

__all__ = ["ERASABLE", "EncryptDeterministic", "ErasableEncryptDeterministic"]
