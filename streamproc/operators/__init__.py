"""Transform operators, found by name in :data:`REGISTRY`.

To add an operator, write one small class deriving from
:class:`~streamproc.operators.base.Operator` in its own module and list it here.
"""

from __future__ import annotations

from streamproc.operators.base import OpContext, Operator, OperatorError
from streamproc.operators.date_shift import DateShift
from streamproc.operators.deterministic import EncryptDeterministic
from streamproc.operators.dp import DPNoise, RandomizedResponse
from streamproc.operators.drop import Drop
from streamproc.operators.generalize import Generalize
from streamproc.operators.keep import Keep
from streamproc.operators.mask import Mask
from streamproc.operators.redact import Redact
from streamproc.operators.token import Token

REGISTRY: dict[str, Operator] = {
    op.name: op
    for op in (
        Keep(), Drop(), Redact(), Mask(), Token(), EncryptDeterministic(), Generalize(), DateShift(),
        DPNoise(), RandomizedResponse(),
    )
}


def get_operator(name: str) -> Operator:
    try:
        return REGISTRY[name]
    except KeyError:
        raise OperatorError(f"unknown operator {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "OpContext", "Operator", "OperatorError", "get_operator"]
