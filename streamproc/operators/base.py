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

import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from streamproc.crypto.erasure import SubjectKeyTable
from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.schema.avro import AvroType, Enum, Primitive

ValueFn = Callable[[Any], Any]
SubjectValueFn = Callable[[Any, bytes], Any]


class OperatorError(ValueError):
    """Bad parameters or an inapplicable type.  The policy layer adds file/audience/tag."""


class Ineffective(Exception):
    """An operator's output would reveal its input (``on_failure: quarantine``).

    Carries nothing: the value must not travel in an exception.  The plan compiler turns it
    into the ``ineffective_transform`` reason class.
    """


#: The *strictness order*, loosest first, used whenever several rules govern one value (a
#: field with several tags, a tagged field inside a tagged container): the strictest wins,
#: so the outcome is never looser than any rule that applies.  Ranked by what the output
#: still reveals: keep (everything) < date_shift (a full-precision value under a secret
#: offset) < generalize (a coarser value) < mask (some characters) < dp_noise (a noised
#: value: bounded influence of the true one, epsilon-DP) < randomized_response (a category
#: that is a lie with known probability) < encrypt_deterministic (equality, reversible with
#: the audience key: linkable, which noised values are not) < token (equality,
#: irreversible) < redact (presence only) < drop (nothing, not even presence).  Every
#: operator must be listed.
STRICTNESS = (
    "keep", "date_shift", "generalize", "mask", "dp_noise", "randomized_response",
    "encrypt_deterministic", "token", "redact", "drop",
)


def strictness(op_name: str) -> int:
    """Rank of an operator in :data:`STRICTNESS` (higher is stricter)."""
    return STRICTNESS.index(op_name)


#: ``on_failure`` values of operators that can fail open (see :meth:`Operator.guarded`).
ON_FAILURE = ("redact", "quarantine")


@dataclass(frozen=True)
class OpContext:
    """Everything an operator may need when it is bound to a field."""

    audience: str
    domain: str
    """Pseudonym domain: the rule's ``domain``, the field's ``streamproc.domain`` hint, or the tag."""
    path: str
    keys: PseudonymKeys | None
    shared_domains: frozenset[str] = frozenset()
    """Domains the policy shares between this audience and others (``keys.shared_domains``)."""
    erasure: SubjectKeyTable | None = None
    """The per-subject key table of ``erasable`` rules (``None``: none configured)."""

    def key_audience(self, domain: str) -> str | None:
        """Whose keys to derive for ``domain``: the audience, or ``None`` if the policy shares it."""
        return None if domain in self.shared_domains else self.audience


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

    def field_props(self, params: Mapping[str, Any], t: AvroType) -> Mapping[str, Any]:
        """Properties the output schema's field carries besides ``streamproc.transform``
        (the differential-privacy operators describe their mechanism and epsilon there, so
        subscribers know a value is noised).  Evaluated when the plan is compiled."""
        return {}

    def guarded(self, params: Mapping[str, Any], t: AvroType) -> bool:
        """Whether this rule's output can degenerate into its input for some values.

        True for operators that *reduce* a value to a part of itself (``mask``, string
        ``generalize``): ``prefix: 8`` of a 6-character postcode, ``until: " "`` without
        the separator, ``cidr: 32``.  Their bound function is then wrapped by
        :func:`fail_closed`; keyed operators and numeric coarsening are not (a date already
        on a year boundary generalizes to itself, and that reveals nothing new).
        """
        return False

    def guard_contains(self, params: Mapping[str, Any]) -> bool:
        """Whether the guard also refuses an output that merely *contains* the input
        (``mask``: kept characters around preserved ones), or only an equal one."""
        return True

    def suppressed(self, params: Mapping[str, Any]) -> str:
        """The value written instead when ``on_failure: redact`` (the default) applies.

        ``*`` is the top of every generalization hierarchy (ARX's suppression value): it
        says "withheld" without changing the field's type or output schema.
        """
        return "*"

    def bind_checked(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        """:meth:`bind`, wrapped by :func:`fail_closed` when :meth:`guarded` says so.

        The plan compiler calls this, never :meth:`bind` directly, so the check cannot be
        forgotten by a new operator that declares itself guarded.
        """
        fn = self.bind(params, t, ctx)
        if fn is None or not self.guarded(params, t):
            return fn
        return fail_closed(
            fn, params.get("on_failure", "redact"), self.suppressed(params), value_kind(t) == "string",
            self.guard_contains(params),
        )


def check_on_failure(params: Mapping[str, Any]) -> None:
    v = params.get("on_failure", "redact")
    if v not in ON_FAILURE:
        raise OperatorError(f"on_failure must be {' or '.join(ON_FAILURE)}, not {v!r}")


def fail_closed(fn: ValueFn, on_failure: str, suppressed: str, text_input: bool, contains: bool = True) -> ValueFn:
    """Wrap a string-producing ``fn`` so that an output equal to (or, with ``contains``,
    containing) its input never leaves: it becomes ``suppressed`` (``redact``), or
    :class:`Ineffective` is raised (``quarantine``: the record goes to the dead-letter topic
    with ``ineffective_transform``).

    "Contains" is the general form of "equal" for operators whose output keeps the input's
    characters around others (``mask`` of a value made of separators).  The empty string is
    contained in everything, so under ``contains`` an empty input is always suppressed (it
    had nothing to hide, and ``*`` hides that too).
    """
    quarantine = on_failure == "quarantine"

    def fail() -> Any:
        if quarantine:
            raise Ineffective()
        return suppressed

    # A text operator the compiled plan interpreter computes itself (``native_op``) keeps
    # that ability behind this guard: the interpreter applies the same check.
    inner = getattr(fn, "native_op", None)
    if text_input and contains:

        def guard_text(v: str) -> Any:
            out = fn(v)
            return fail() if v in out else out

        if inner is not None and isinstance(suppressed, str):
            setattr(guard_text, "native_op", ("guard", inner, True, suppressed, quarantine))  # noqa: B010
        return guard_text
    if text_input:

        def guard_equal(v: str) -> Any:
            out = fn(v)
            return fail() if out == v else out

        if inner is not None and isinstance(suppressed, str):
            setattr(guard_equal, "native_op", ("guard", inner, False, suppressed, quarantine))  # noqa: B010
        return guard_equal

    def guard(v: Any) -> Any:
        out = fn(v)
        s = str(v)
        return fail() if (s in out if contains else out == s) else out

    return guard


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


_ASCII_DIGITS = frozenset("0123456789")


def fold_case(x: str) -> str:
    """Case-insensitive form: NFKC, then full Unicode case folding, then NFKC again.

    ``str.lower`` is not case-insensitive comparison: ``Straße``/``STRASSE`` and the
    full-width ``U+FF21``/``A`` stay different, so one person would get two tokens.
    Unicode's recommended caseless match (UAX #15/#21: ``NFKC(casefold(NFKC(x)))``) folds
    compatibility forms and case together; ASCII input is returned as ``x.lower()``.
    """
    if x.isascii():
        return x.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", x).casefold())


def ascii_digits(x: str) -> str:
    """The ASCII digits of ``x`` (after NFKC, so full-width digits U+FF10..U+FF19 count).

    ``str.isdigit`` also accepts superscripts and other scripts' digits (``²``, ``٣``),
    which a phone number does not mean: the same number written two ways must give one
    token, and other scripts' digits are not silently reinterpreted.
    """
    if not x.isascii():
        x = unicodedata.normalize("NFKC", x)
    return "".join(c for c in x if c in _ASCII_DIGITS)


def normalizer(spec: Any) -> Callable[[str], str] | None:
    """Build a string normalizer from ``normalize: [lower, strip, digits]``.

    ``lower`` is a caseless match (:func:`fold_case`), ``digits`` keeps ASCII digits
    (:func:`ascii_digits`), ``strip`` removes leading and trailing whitespace.
    """
    if not spec:
        return None
    steps = [spec] if isinstance(spec, str) else list(spec)
    funcs: list[Callable[[str], str]] = []
    for s in steps:
        if s == "lower":
            funcs.append(fold_case)
        elif s == "strip":
            funcs.append(str.strip)
        elif s == "digits":
            funcs.append(ascii_digits)
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
