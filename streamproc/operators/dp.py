"""Differential-privacy operators: ``dp_noise`` and ``randomized_response``.

Both sample with OpenDP (``opendp`` on PyPI), never with :mod:`random`: OpenDP samples
Laplace and Gaussian noise *exactly* on a discrete grid, so the output is not open to
the floating-point attacks on textbook ``x + Laplace(b)`` (Mironov 2012), and its
privacy maps, not a formula copied here, decide the noise scale.

* ``{op: dp_noise, mechanism: laplace | gaussian | geometric, epsilon: E, delta: D,
  bounds: [lo, hi]}`` on ``int``/``long``/``float``/``double``: the value is clamped to
  ``bounds``, then noised.  The sensitivity of one value is ``hi - lo`` (one subject's
  value may be anything in the bounds), and the scale is the smallest one whose OpenDP
  privacy map gives at most ``epsilon`` (``(epsilon, delta)`` for ``gaussian``, through
  OpenDP's zCDP -> approximate-DP conversion), found by ``binary_search_param``.
  Integers stay integers: ``laplace`` and ``geometric`` are the discrete Laplace
  (two-sided geometric) distribution on integers, ``gaussian`` the discrete Gaussian.
  The noised value is *not* clamped back into the bounds (that would bias every mean);
  it is only kept inside the Avro type's range (``int`` is 32 bits), which is
  post-processing and costs no privacy.
* ``{op: randomized_response, epsilon: E}`` on ``boolean`` and ``enum``: k-ary
  randomized response (k = 2 for booleans, the number of symbols for an enum): the true
  value is kept with probability ``e^E / (e^E + k - 1)``, otherwise one of the other
  k - 1 values is written, uniformly.

**Compile time, not per record.** The OpenDP measurement is built and calibrated once,
when the plan for a (schema, audience) is compiled.  For ``dp_noise`` the noise is then
drawn from the *vector* form of the same measurement applied to zeros, :data:`POOL`
values per library call: noise independent of the value is exactly what the mechanism
adds, so ``clamp(x) + z`` has the mechanism's distribution, at a few microseconds per
value instead of ~80 for one library call per value.  For floats the grid is explicit
(``k``, a power of two far below the noise scale): the clamped value is rounded to that
grid, the noise is a multiple of it, so their sum is computed exactly (IEEE addition
rounds only sums beyond ``2^53`` grid steps, and rounding the exact mechanism output is
post-processing).  Each noise value is used once.  ``randomized_response`` pools the
same way, by shift invariance (:func:`build_responder`).

**Feature flags.** ``contrib`` is enabled because OpenDP gates every constructor used
here (``make_laplace``, ``make_gaussian``, ``make_geometric``,
``make_randomized_response[_bool]``, ``make_zCDP_to_approxDP``, ``make_fix_delta``,
``make_composition``)
behind it: their proofs are written but not yet vetted by OpenDP's review.  The
``floating-point`` flag is *not* needed and not enabled: float noise is sampled on the
explicit grid ``2^k``, which OpenDP considers exact.

A NaN cannot be clamped into bounds: the record fails (quarantined,
``transform_failed``), it is never passed through.  Output schemas carry the mechanism,
epsilon, delta, bounds and calibrated scale in the field property
:data:`DP_PROP`, so subscribers know the value is noised and how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from streamproc.operators.base import OpContext, Operator, OperatorError, require_kind, value_kind
from streamproc.schema.avro import AvroType, Enum

DP_PROP = "streamproc.dp"
"""Field property of a noised field: ``{mechanism, epsilon, delta?, bounds?, scale?, rho?,
keep_probability?}`` (``rho``: a Gaussian release's zCDP cost)."""

MECHANISMS = ("laplace", "gaussian", "geometric")
POOL = 1024
"""Noise values drawn per OpenDP call (a few milliseconds of sampling per refill)."""

_INTS = frozenset({"int", "long"})
_FLOATS = frozenset({"float", "double"})
_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
#: The float grid is 2^k with k this many binary orders below the noise scale: input
#: rounding moves a value by at most 2^-31 of the scale, and noise stays below 2^53 steps.
_GRID_BELOW_SCALE = 30


def _dp() -> Any:
    """OpenDP with the ``contrib`` feature enabled (see the module docstring for why)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class DPNoise(Operator):
    name = "dp_noise"
    params = {
        "mechanism": (str,),
        "epsilon": (int, float),
        "delta": (int, float),
        "bounds": (list,),
    }

    def check_params(self, params: Mapping[str, Any]) -> None:
        mech = params.get("mechanism")
        if mech not in MECHANISMS:
            raise OperatorError(f"dp_noise needs 'mechanism': one of {', '.join(MECHANISMS)}")
        eps = params.get("epsilon")
        if eps is None or not _number(eps) or not 0 < eps <= 20:
            raise OperatorError("dp_noise needs 'epsilon' in (0, 20]")
        if mech == "gaussian":
            d = params.get("delta")
            if d is None or not _number(d) or not 0 < d < 1e-2:
                raise OperatorError("gaussian needs 'delta' in (0, 0.01)")
        elif "delta" in params:
            raise OperatorError(f"'delta' applies to gaussian only ({mech} is pure epsilon-DP)")
        b = params.get("bounds")
        if not (isinstance(b, list) and len(b) == 2 and all(_number(x) for x in b) and b[0] < b[1]):
            raise OperatorError("dp_noise needs 'bounds: [lo, hi]' with finite numbers lo < hi")

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        kind = require_kind(self.name, t, _INTS | _FLOATS)
        lo, hi = params["bounds"]
        if kind in _INTS:
            if not all(isinstance(x, int) for x in (lo, hi)):
                raise OperatorError(f"bounds of an {kind} field must be integers")
            rlo, rhi = _RANGE[kind]
            if lo < rlo or hi > rhi:
                raise OperatorError(f"bounds exceed the range of {kind}")
        elif params["mechanism"] == "geometric":
            raise OperatorError("geometric noise is for int and long (use laplace for floating-point fields)")
        return t

    def field_props(self, params: Mapping[str, Any], t: AvroType) -> Mapping[str, Any]:
        return {DP_PROP: dp_description(params, t)}

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        return build_noiser(params, t)


def dp_description(params: Mapping[str, Any], t: AvroType) -> dict[str, Any]:
    """What a subscriber needs to interpret a noised field (the :data:`DP_PROP` value)."""
    if "bounds" not in params:
        out: dict[str, Any] = {"mechanism": "randomized_response", "epsilon": params["epsilon"]}
        k = len(t.symbols) if isinstance(t, Enum) else 2
        out["keep_probability"] = keep_probability(params["epsilon"], k)
        return out
    out = {"mechanism": params["mechanism"], "epsilon": params["epsilon"], "bounds": list(params["bounds"])}
    if "delta" in params:
        out["delta"] = params["delta"]
    cal = calibrate(params, t)
    out["scale"] = cal.scale
    if cal.rho is not None:
        out["rho"] = cal.rho  # zCDP cost of one release (budgets compose these)
    return out


class Calibration:
    """A calibrated mechanism: its scale and float grid, and the OpenDP measurement that
    samples :data:`POOL` noise values from zeros."""

    def __init__(self, scale: float, k: int | None, sampler: Any, rho: float | None = None) -> None:
        self.scale = scale
        self.k = k
        self.sampler = sampler
        self.rho = rho
        """Gaussian only: the zCDP rho of one release, from OpenDP's map."""


_CALIBRATIONS: dict[tuple[Any, ...], Calibration] = {}


def calibrate(params: Mapping[str, Any], t: AvroType) -> Calibration:
    """Build (once per distinct parameters and type) the OpenDP measurement for a rule.

    The scale is the smallest for which the *scalar* measurement's privacy map, at input
    distance ``hi - lo``, stays within ``epsilon`` (``(epsilon, delta)`` for gaussian):
    OpenDP's own accounting, including the rounding of the input to the float grid.
    """
    kind = value_kind(t)
    mech = params["mechanism"]
    eps = float(params["epsilon"])
    delta = float(params["delta"]) if "delta" in params else None
    lo, hi = params["bounds"]
    key = (kind in _INTS, mech, eps, delta, lo, hi)
    cached = _CALIBRATIONS.get(key)
    if cached is not None:
        return cached
    dp = _dp()
    integer = kind in _INTS
    d_in: Any = int(hi - lo) if integer else float(hi - lo)
    if integer:
        atom, dist = dp.atom_domain(T="i64"), dp.absolute_distance(T="i64")
        k: int | None = None
    else:
        atom, dist = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    # A first estimate of the scale (textbook Laplace b = d/eps; classical Gaussian sigma,
    # an upper bound of the calibrated one) fixes the float grid and brackets the search;
    # the search then calibrates against the map of the measurement *with* that grid.
    if mech == "gaussian":
        assert delta is not None
        rough = float(hi - lo) * math.sqrt(2 * math.log(1.25 / delta)) / eps
    else:
        rough = float(hi - lo) / eps
    if not integer:
        k = math.floor(math.log2(rough)) - _GRID_BELOW_SCALE

    def scalar(scale: float) -> Any:
        if mech == "gaussian":
            m = dp.m.make_gaussian(atom, dist, scale, k=k)
            return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(m), delta)
        if mech == "geometric":
            return dp.m.make_geometric(atom, dist, scale)
        return dp.m.make_laplace(atom, dist, scale, k=k)

    d_out: Any = (eps, delta) if mech == "gaussian" else eps
    try:
        # Bracketed: an unbounded search probes scales so small that the maps overflow.
        scale = float(dp.binary_search_param(scalar, d_in=d_in, d_out=d_out, bounds=(rough / 64, rough * 4)))
    except Exception as exc:  # OpenDPException: parameters out of the library's range
        raise OperatorError(f"OpenDP cannot calibrate {mech} for these parameters ({type(exc).__name__})") from None
    if integer:
        vec = dp.vector_domain(dp.atom_domain(T="i64"), size=POOL)
        if mech == "gaussian":
            sampler = dp.m.make_gaussian(vec, dp.l2_distance(T="i64"), scale)
        elif mech == "geometric":
            sampler = dp.m.make_geometric(vec, dp.l1_distance(T="i64"), scale)
        else:
            sampler = dp.m.make_laplace(vec, dp.l1_distance(T="i64"), scale)
    else:
        vec = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=POOL)
        if mech == "gaussian":
            sampler = dp.m.make_gaussian(vec, dp.l2_distance(T=float), scale, k=k)
        else:
            sampler = dp.m.make_laplace(vec, dp.l1_distance(T=float), scale, k=k)
    rho = float(dp.m.make_gaussian(atom, dist, scale, k=k).map(d_in)) if mech == "gaussian" else None
    cal = Calibration(scale, k, sampler, rho)
    _CALIBRATIONS[key] = cal
    return cal


def build_noiser(params: Mapping[str, Any], t: AvroType) -> Callable[[Any], Any]:
    """The per-value function: clamp, (round to the grid,) add the next noise value."""
    kind = value_kind(t)
    cal = calibrate(params, t)
    lo, hi = params["bounds"]
    sampler = cal.sampler
    pool: list[Any] = []
    pop = pool.pop

    if kind in _INTS:
        zeros_i = [0] * POOL
        tlo, thi = _RANGE[kind]
        ilo, ihi = int(lo), int(hi)

        def refill_i() -> None:
            pool.extend(sampler(zeros_i))

        def noise_int(v: int) -> int:
            x = ilo if v < ilo else ihi if v > ihi else v
            try:
                z = pop()
            except IndexError:
                refill_i()
                z = pop()
            out = x + z
            return tlo if out < tlo else thi if out > thi else out

        return noise_int

    assert cal.k is not None
    step = math.ldexp(1.0, cal.k)
    inv = math.ldexp(1.0, -cal.k)
    flo, fhi = float(lo), float(hi)
    zeros_f = [0.0] * POOL
    fmax = 3.4028234663852886e38 if kind == "float" else math.inf

    def refill_f() -> None:
        pool.extend(sampler(zeros_f))

    def noise_float(v: float) -> float:
        if v != v:
            raise ValueError("NaN cannot be clamped")  # no value in the message
        x = flo if v < flo else fhi if v > fhi else v
        x = round(x * inv) * step  # onto the grid 2^k (exact: scaling by powers of two)
        try:
            z = pop()
        except IndexError:
            refill_f()
            z = pop()
        out = x + z
        # float32 fields: keep within the type (post-processing), never write an infinity
        return -fmax if out < -fmax else fmax if out > fmax else out

    return noise_float


def keep_probability(epsilon: float, k: int) -> float:
    """The theoretical keep probability of k-ary randomized response, ``e^E/(e^E+k-1)``."""
    e = math.exp(epsilon)
    return e / (e + k - 1)


class RandomizedResponse(Operator):
    name = "randomized_response"
    params = {"epsilon": (int, float)}

    def check_params(self, params: Mapping[str, Any]) -> None:
        eps = params.get("epsilon")
        if eps is None or not _number(eps) or not 0 < eps <= 20:
            raise OperatorError("randomized_response needs 'epsilon' in (0, 20]")

    def output_type(self, params: Mapping[str, Any], t: AvroType) -> AvroType | None:
        require_kind(self.name, t, frozenset({"boolean", "enum"}))
        if isinstance(t, Enum) and len(t.symbols) < 2:
            raise OperatorError("randomized_response needs an enum with at least two symbols")
        return t

    def field_props(self, params: Mapping[str, Any], t: AvroType) -> Mapping[str, Any]:
        return {DP_PROP: dp_description(params, t)}

    def bind(self, params: Mapping[str, Any], t: AvroType, ctx: OpContext) -> Any:
        return build_responder(params, t)


def build_responder(params: Mapping[str, Any], t: AvroType) -> Callable[[Any], Any]:
    """The per-value function of ``randomized_response``, built once per plan.

    The measurement is OpenDP's (``make_randomized_response`` over the enum's indices,
    ``make_randomized_response_bool``), with the largest keep probability its privacy map
    allows within epsilon.  Samples are drawn :data:`POOL` at a time from that measurement
    applied to the constant ``0``/``False`` (one library call, through
    ``make_composition``): k-ary randomized response is *shift-invariant*, ``RR(x)`` has
    the law of ``(x + RR(0)) mod k`` (keep with probability p, otherwise each other value
    with (1 - p)/(k - 1)), and for booleans ``RR(x) = x XOR flip`` with flips drawn by
    :func:`_bit_flips`.  The pooled draws never see data; each is used once.
    """
    dp = _dp()
    eps = float(params["epsilon"])
    if isinstance(t, Enum):
        k = len(t.symbols)
        cats = list(range(k))  # operators see the enum index

        def enum_rr(p: float) -> Any:
            return dp.m.make_randomized_response(cats, p, T="i32")

        # The largest keep probability OpenDP's map allows within epsilon (the theoretical
        # e^E/(e^E+k-1), less float rounding).
        p = float(dp.binary_search_param(enum_rr, d_in=1, d_out=eps, bounds=(1.0 / k, 1.0 - 1e-12)))
        batch = dp.c.make_composition([enum_rr(p)] * POOL)
        shifts: list[int] = []

        def respond_enum(v: int) -> int:
            try:
                r = shifts.pop()
            except IndexError:
                shifts.extend(batch(0))
                r = shifts.pop()
            return (v + r) % k

        return respond_enum

    p = float(
        dp.binary_search_param(
            lambda q: dp.m.make_randomized_response_bool(q), d_in=1, d_out=eps, bounds=(0.5, 1.0 - 1e-12)
        )
    )
    flips: list[bool] = []
    refill = _bit_flips(dp, 1.0 - p, eps, flips)
    if refill is None:
        flips_batch = dp.c.make_composition([dp.m.make_randomized_response_bool(p)] * POOL)

        def refill_composed() -> None:
            flips.extend(flips_batch(False))

        refill = refill_composed

    def respond_bool(v: bool) -> bool:
        try:
            f = flips.pop()
        except IndexError:
            refill()
            f = flips.pop()
        return v != f  # v XOR flip

    return respond_bool


_BITS = [tuple(bool(b >> i & 1) for i in range(8)) for b in range(256)]


def _bit_flips(dp: Any, q: float, eps: float, flips: list[bool]) -> Callable[[], None] | None:
    """A refill of ``flips`` with Bernoulli(q) bits from OpenDP's bit-vector randomized
    response (RAPPOR's, ``make_randomized_response_bitvec``) on a zero vector: 8 192 flips
    per call at well under a microsecond each, against ~20 µs through
    ``make_composition``.  That mechanism randomizes each bit with probability ``f``,
    i.e. flips it with probability ``f / 2``, so ``f = 2q``.  The semantics is checked
    against OpenDP's own privacy map (neighbouring vectors of weight <= 1 differ in two
    bits, so the map is twice the per-bit epsilon, ``ln((1-q)/q)``); if the map does not
    say the per-bit release is within ``eps``, ``None`` is returned and the caller uses
    the composed boolean measurement instead.
    """
    try:
        m = dp.m.make_randomized_response_bitvec(dp.bitvector_domain(max_weight=1), dp.discrete_distance(), f=2 * q)
        per_bit = float(m.map(1)) / 2
    except Exception:  # an OpenDP without the bit-vector mechanism, or refusing these parameters
        return None
    if not per_bit <= eps * (1 + 1e-9):
        return None
    zeros = bytes(8 * POOL // 8)

    def refill() -> None:
        bits = _BITS
        for byte in m(zeros):
            flips.extend(bits[byte])

    return refill
