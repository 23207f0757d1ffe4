"""The operator contract, shared by every transform the policy can name.

Each operator is a small class (after Presidio's anonymizer operators):

* :meth:`Operator.validate` checks parameters alone, when the policy is loaded;
* :meth:`Operator.output_type` checks that the operator applies to a field's Avro type
  and says what the field becomes (``None``: the field leaves the output schema);
* :meth:`Operator.bind` returns the per-value function used on the hot path, with keys
  already derived and parameters already parsed, so nothing is looked up per record.

Operators see *raw* Avro values: ``int`` days for ``date``, ``int`` epoch units for
timestamps, ``str`` for strings, ``bytes`` for bytes and fixed.  Nullable unions are
handled by the plan compiler: a null stays null and the operator sees only the value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.schema.avro import AvroType, Enum, Primitive

ValueFn = Callable[[Any], Any]
SubjectValueFn = Callable[[Any, bytes], Any]


class OperatorError(ValueError):
    """Bad parameters or an inapplicable type.  The policy layer adds file/audience/tag."""


@dataclass(frozen=True)
class OpContext:
    """Everything an operator may need when it is bound to a field."""

    audience: str
    domain: str
    """Pseudonym domain: the rule's ``domain``, the field's ``streamproc.domain`` hint, or the tag."""
    path: str
    keys: PseudonymKeys | None


def value_kind(t: AvroType) -> str:
    """``string``, ``int``, ..., or the logical type for date and timestamps."""
    lt = t.logical
    if lt in ("date", "timestamp-millis", "timestamp-micros", "local-timestamp-millis", "local-timestamp-micros"):
        return lt.replace("local-", "")
    return t.kind


STRING = Primitive("string")
SCALARS = frozenset({"string", "bytes", "int", "long", "float", "double", "boolean", "enum", "fixed"})
TEMPORAL = frozenset({"date", "timestamp-millis", "timestamp-micros"})


class Operator(ABC):
    name: ClassVar[str]
    #: Parameter names and the Python types they accept.
    params: ClassVar[Mapping[str, tuple[type, ...]]] = {}
    #: Whether :meth:`bind` returns ``f(value, subject_bytes)`` (date shifting).
    needs_subject: ClassVar[bool] = False
    #: Whether the operator needs pseudonym keys.
    needs_keys: ClassVar[bool] = False
    #: Whether the operator accepts any type, including records, arrays and maps.
    any_type: ClassVar[bool] = False

    def validate(self, params: Mapping[str, Any]) -> None:
        unknown = set(params) - set(self.params)
        if unknown:
            raise OperatorError(f"unknown parameter(s) {sorted(unknown)}; allowed: {sorted(self.params) or 'none'}")
        for k, v in params.items():
            if not isinstance(v, self.params[k]) or (isinstance(v, bool) and bool not in self.params[k]):
                names = "/".join(t.__name__ for t in self.params[k])
                raise OperatorError(f"parameter {k!r} must be {names}")
        self.check_params(params)

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Operator-specific parameter checks (ranges, enumerations)."""

    @abstractmethod
    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        """The field's output type; raise :class:`OperatorError` if ``t`` is not supported."""

    @abstractmethod
    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        """A per-value function (``ValueFn``, or ``SubjectValueFn`` if ``needs_subject``)."""


def require_kind(op: str, t: AvroType, allowed: frozenset[str]) -> str:
    kind = value_kind(t)
    if kind not in allowed:
        raise OperatorError(f"{op} does not apply to Avro type {kind!r} (applies to {', '.join(sorted(allowed))})")
    return kind


def canonical_bytes(value: Any) -> bytes:
    """Bytes that identify a value across types: joins work for ``"42"`` and ``42``."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)).encode()
    return str(value).encode()


def normalizer(spec: Any) -> Callable[[str], str] | None:
    """Build a string normalizer from ``normalize: [lower, strip, digits]``."""
    if not spec:
        return None
    steps = [spec] if isinstance(spec, str) else list(spec)
    funcs: list[Callable[[str], str]] = []
    for s in steps:
        if s == "lower":
            funcs.append(str.lower)
        elif s == "strip":
            funcs.append(str.strip)
        elif s == "digits":
            funcs.append(lambda x: "".join(c for c in x if c.isdigit()))
        else:
            raise OperatorError(f"unknown normalization {s!r} (lower, strip, digits)")
    if len(funcs) == 1:
        return funcs[0]

    def chain(x: str) -> str:
        for f in funcs:
            x = f(x)
        return x

    return chain


class KeyedScalarOperator(Operator):
    """Shared shape of ``token`` and ``encrypt_deterministic``.

    Both take any scalar (or date/timestamp), honour ``domain`` and ``normalize``, output
    a string, and work on the *canonical bytes* of the value, so that equal identifiers
    give equal outputs across types and schemas.
    """

    needs_keys = True
    params = {"domain": (str,), "normalize": (str, list)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        normalizer(params.get("normalize"))

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, SCALARS | TEMPORAL)
        return STRING

    @staticmethod
    def value_bytes(params: Mapping[str, Any], t: AvroType) -> Callable[[Any], bytes]:
        """``value -> canonical bytes`` for ``t`` (enum index -> symbol, normalized text)."""
        if isinstance(t, Enum):
            symbols = t.symbols
            return lambda v: symbols[v].encode()
        norm = normalizer(params.get("normalize"))
        if t.kind == "string" and norm is not None:
            return lambda v: norm(v).encode()
        if t.kind in ("bytes", "fixed"):
            return bytes
        return canonical_bytes
