"""Verified bounds of a pure logits function over an l_inf input box: IBP, CROWN-IBP, CROWN, alpha-CROWN, symbolic
intervals.

Each takes `f(x) -> logits`, a pure function of a batch `[B, H, W, C]` (e.g. a zoo model applied with
masked params and BatchNorm in eval mode), the box `lower <= x <= upper` (same shape; the caller clips it to
the data range) and an optional specification `spec [B, m, classes]`, and return `(lb, ub)` with
`lb <= f(x) <= ub` for every x in the box: `[B, classes]` without spec, else bounds of
`einsum('bmc,bc->bm', spec, f(x))` (margins `e_y - e_j` from `margin_spec` give verified robustness).
`f` must treat the examples of the batch independently (true of every model in eval mode).

How: `f` is traced to a jaxpr and interpreted with one rule per primitive (jax_verify's approach):
- IBP (Gowal et al. 2018, eqs. 6-7): affine ops map (center, radius) to (W c + b, |W| r): conv, dot_general,
  add/sub, mul/div by constants (so BN in eval mode), reduce_sum, reduce_window_sum (average pooling), reshape,
  transpose, broadcast, slice, concatenate, pad. Monotone ops map (l, u) to (g(l), g(u)): max/min (relu
  arrives as `custom_jvp_call(max(x, 0))`), clamp, max pooling, exp, tanh, ...; rsqrt maps to (g(u), g(l)).
  Two x-dependent operands (LayerNorm, softmax, attention): square / integer_pow n >= 0 (0 where an even power's
  interval crosses 0), mul (min / max of the four corner products), div (by [1/u, 1/l] of a denominator interval
  excluding 0; elementwise (-inf, inf) where it holds 0), dot_general (midpoint-radius interval matrix product);
  split, stop_gradient (the identity). These are boxes to CROWN (they enter by their IBP bounds). NaN ends (0 *
  inf, a sqrt below 0) become -inf / inf.
  The sub-jaxprs of call-like primitives (an explicit list, `_CALLS`: jit, closed_call, custom_jvp /
  custom_vjp calls, checkpoint, shard_map on replicated values) are recursed into; `scan` (what fori_loop with
  static bounds, lax.scan, lax.map and nn.scan lower to) is unrolled over its static length, xs sliced per
  step; equations that do not depend on x are evaluated. Any other primitive with an x-dependent operand
  (while, cond, ...) raises NotImplementedError naming it.
  Consecutive affine ops are kept as one affine map of the last box, so the spec is merged into the whole
  last affine segment (`|C W| r`, not `|C| |W| r`), as the reference merges it into the last linear layer.
- Floating-point formats: bounds are computed in float32 (float64 for a float64 box) whatever the model's
  dtype; bfloat16 weights enter exactly. Where the model rounds (an op whose result is bfloat16 / float16, a
  cast to such a format, reduce_precision) the bounds are widened to hold the value rounded to nearest and the
  value unrounded (XLA may keep excess precision: on CPU a bfloat16 dot inside a jit is not rounded before a
  cast back to float32): [min(l, nearest(l)), max(u, nearest(u))], nearest being monotone. A sum of n terms in
  such a format (reduce_sum, average pooling's reduce_window_sum, cumsum; XLA's CPU rounds after every
  addition) widens by Higham's gamma_{n-1} sum |x_i|. bfloat16 dots and convolutions are assumed to accumulate
  in float32 and round once (XLA on CPU, GPU and TPU); the float32 arithmetic of the model and of the bounds is
  trusted as for float32 models. Casts to integers truncate and saturate (monotone); integer -> float casts
  round as above; integer arithmetic on x is refused (NotImplementedError naming the primitive).
- CROWN (Zhang et al. 2018, Thm. 3.2) on the jaxpr's graph: rows of the spec are pulled back through every affine
  map by vector-Jacobian products (a convolution by its transposed convolution, never a dense Jacobian) to each
  of its bases, summed where branches meet again (residual adds, concatenations), and through the relaxations of
  elementwise nonlinearities: ReLU's upper line u/(u-l) (z - l), lower slope 1 if u > -l else 0 (the reference's
  adaptive choice, `lower_slope="adaptive"`) or always 0 (`"zero"`); max(z, c) = c + relu(z - c) and min(z, c)
  = c - relu(c - z) for constants c (relu6, clip, clamp); sigmoid / tanh between two lines parallel to their
  chord; a rounding z -/+ half the format's spacing at max(|l|, |u|) (gamma_{n-1} sum |x_i| for the sums
  above); concretised over the box as A c -/+ |A| r. Any other box on the way (max pooling, a max of two
  x-dependent values, exp, ...) enters by its IBP bounds. `crown_ibp` (Zhang et al. 2020, eq. 5) takes every
  relaxation's input bounds from IBP; `crown` bounds each by its own backward pass from the identity rows
  (chunked under lax.map); `alpha_crown` (Xu et al. 2021) also optimises the relus' lower slopes (optax Adam,
  projected on [0, 1]) per neuron and row of every backward pass, as auto_LiRPA does by default.
- Symbolic intervals (Wang et al. 2018, "Efficient formal safety analysis", the MixTrain "sym" method): every
  neuron is kept as a linear function of the input plus one error term per relaxed neuron (Neurify's
  relaxation for ReLU: slope u/(u-l), offset and error u(-l)/(2(u-l)); the same bands for max / min with a
  constant and rounding), concretised at each layer.
Symbolic intervals need a chain input -> affine -> relaxation -> affine -> ... -> affine (the zoo's cnn models
and any other such net, whatever its linear ops, in any float dtype); other graphs raise NotImplementedError
naming the op. Bounds that inf - inf would make NaN (an overflow) are returned as -inf / inf.

Differences from the reference (`crown/bound_layers.py`, `symbolic_interval/`): the box is the caller's (the
reference clamps x -/+ eps to the batch's min/max); symbolic generators are dense, so memory grows as
B * (n_inputs + sum of ReLU widths) * layer width (the reference stores only unstable neurons' error rows).

Usage:

  f = lambda x: model.apply(variables, x, train=False)
  lo, hi = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
  lb, ub = bounds.ibp(f, lo, hi)                                   # [B, classes]
  lb, _ = bounds.crown_ibp(f, lo, hi, bounds.margin_spec(y, 10))   # [B, 9] margins z_y - z_j
  lb, _ = bounds.alpha_crown(f, lo, hi, bounds.margin_spec(y, 10))  # tighter, for verification
  ok = bounds.verified_correct(f, x, y, eps=2 / 255, method="symbolic")   # bool [B]
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.extend  # jax.extend.core.Literal
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

Array = jax.Array
Fn = Callable[[Array], Array]
LOWER_SLOPES = ("adaptive", "zero")


# ----------------------------------------------------------------------------------------------------------
# Abstract values: a constant (an Array, independent of x), a _Box, or an _Affine map of a _Box.


_CREATION = itertools.count()


@dataclasses.dataclass(frozen=True, eq=False)
class _Box:
  """lower <= v <= upper. origin: "input", the _Relaxation that made it, or the name of the op that concretised it.
  order: creation order, a topological order of the graph (a box is made after the boxes it depends on)."""

  lower: Array
  upper: Array
  origin: Any
  order: int = dataclasses.field(default_factory=lambda: next(_CREATION))


@dataclasses.dataclass(frozen=True, eq=False)
class _Affine:
  """v = linear(h_1, ..., h_k) + offset for h_i in `bases` (several where branches join: a residual add, a
  concatenation); IBP's center / radius of v are computed eagerly (cheap). join: the op that joined branches.
  offset (v at h = 0) is carried through every op, not recovered as center - linear(midpoints): in a deep net
  the midpoints of IBP boxes grow to 1e4 and that difference loses 1e-3 to float32 cancellation (measured on
  resnet_tiny against auto_LiRPA, which propagates the bias itself)."""

  bases: tuple[_Box, ...]
  linear: Callable[..., Array]
  center: Array
  radius: Array
  offset: Array
  join: str | None = None

  def box(self, origin: Any) -> _Box:
    return _Box(*_unnan(self.center - self.radius, self.center + self.radius), origin)


def _midpoint(box: _Box) -> Array:
  return (box.lower + box.upper) / 2


def _is_bound(value: Any) -> bool:
  return isinstance(value, (_Box, _Affine))


def _as_affine(value: _Box | _Affine) -> _Affine:
  if isinstance(value, _Affine):
    return value
  center = _midpoint(value)
  return _Affine((value,), lambda h: h, center, (value.upper - value.lower) / 2, jnp.zeros_like(center))


def _as_box(value: _Box | _Affine, origin: str) -> _Box:
  return value if isinstance(value, _Box) else value.box(origin)


def _fit(x: Array, shape: tuple[int, ...]) -> Array:
  return x if x.shape == tuple(shape) else jnp.broadcast_to(x, shape)


# ----------------------------------------------------------------------------------------------------------
# Relaxations: an elementwise nonlinearity g of an _Affine `pre`, bounded by lines over [lower, upper].


Lines = tuple[Array, Array, Array, Array]


@dataclasses.dataclass(frozen=True, eq=False)
class _Relaxation:
  """g(z) for z = `pre`, with z's IBP bounds [lower, upper]; subclasses give g's linear relaxations."""

  pre: _Affine
  lower: Array
  upper: Array

  def lines(self, lower: Array, upper: Array, lower_slope: str) -> Lines:
    """(a_l, b_l, a_u, b_u) with a_l z + b_l <= g(z) <= a_u z + b_u for z in [lower, upper] (CROWN)."""
    raise NotImplementedError

  def parallel(self, lower: Array, upper: Array) -> tuple[Array, Array, Array]:
    """(slope, offset, error) with |g(z) - slope z - offset| <= error on [lower, upper] (symbolic intervals)."""
    raise NotImplementedError


def _relu_lines(lower: Array, upper: Array, lower_slope: str) -> tuple[Array, Array, Array]:
  """relu on [l, u]: lower slope a_l (intercept 0), upper line a_u z + b_u (the chord u/(u-l) (z - l) where
  l < 0 < u). Unstable lower slope: 1 if u > -l else 0 ("adaptive", the reference's) or 0 ("zero")."""
  unstable = (lower < 0) & (upper > 0)
  slope = jnp.where(unstable, upper / jnp.where(unstable, upper - lower, 1.0), (lower >= 0).astype(lower.dtype))
  adaptive = (upper > -lower).astype(lower.dtype) if lower_slope == "adaptive" else jnp.zeros_like(lower)
  return jnp.where(unstable, adaptive, slope), slope, jnp.where(unstable, -lower * slope, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class _Max(_Relaxation):
  """g(z) = max(z, c) = c + relu(z - c) for a constant c (relu: c = 0)."""

  const: Array

  def lines(self, lower, upper, lower_slope):
    c = self.const
    low, up, intercept = _relu_lines(lower - c, upper - c, lower_slope)
    return low, c * (1 - low), up, c * (1 - up) + intercept

  def parallel(self, lower, upper):
    c = self.const
    _, slope, intercept = _relu_lines(lower - c, upper - c, "zero")
    return slope, c * (1 - slope) + intercept / 2, intercept / 2  # Neurify: the band between the chord and it - b_u


@dataclasses.dataclass(frozen=True, eq=False)
class _Min(_Relaxation):
  """g(z) = min(z, c) = c - relu(c - z) for a constant c (relu6's second half, clip's upper end)."""

  const: Array

  def lines(self, lower, upper, lower_slope):
    c = self.const
    low, up, intercept = _relu_lines(c - upper, c - lower, lower_slope)
    return up, c * (1 - up) - intercept, low, c * (1 - low)

  def parallel(self, lower, upper):
    c = self.const
    _, slope, intercept = _relu_lines(c - upper, c - lower, "zero")
    return slope, c * (1 - slope) - intercept / 2, intercept / 2


def _stationary_sigmoid(slope: Array) -> tuple[Array, Array]:
  """The two z with sigmoid'(z) = s(1 - s) = slope (slope <= 1/4)."""
  root = jnp.sqrt(jnp.clip(1 - 4 * slope, 0.0, 1.0))
  high = jnp.clip((1 + root) / 2, 1e-7, 1 - 1e-7)
  return -jnp.log(high / (1 - high)), jnp.log(high / (1 - high))


def _stationary_tanh(slope: Array) -> tuple[Array, Array]:
  """The two z with tanh'(z) = 1 - t^2 = slope (slope <= 1)."""
  z = jnp.arctanh(jnp.clip(jnp.sqrt(jnp.clip(1 - slope, 0.0, 1.0)), 0.0, 1 - 1e-7))
  return -z, z


@dataclasses.dataclass(frozen=True, eq=False)
class _SShaped(_Relaxation):
  """g = sigmoid or tanh: two lines parallel to the chord of g over [l, u], through g's lowest and highest points
  relative to it (at l, u or where g' equals the chord's slope, in closed form), widened by 1e-6 for rounding."""

  name: str

  def _band(self, lower, upper):
    g = jax.nn.sigmoid if self.name == "logistic" else jnp.tanh
    width = upper - lower
    slope = jnp.where(width > 1e-6, (g(upper) - g(lower)) / jnp.where(width > 1e-6, width, 1.0), 0.0)
    stationary = (_stationary_sigmoid if self.name == "logistic" else _stationary_tanh)(slope)
    points = [lower, upper, *(jnp.clip(z, lower, upper) for z in stationary)]
    gaps = jnp.stack([g(z) - slope * z for z in points])
    return slope, jnp.min(gaps, 0) - 1e-6, jnp.max(gaps, 0) + 1e-6

  def lines(self, lower, upper, lower_slope):
    slope, low, high = self._band(lower, upper)
    return slope, low, slope, high

  def parallel(self, lower, upper):
    slope, low, high = self._band(lower, upper)
    return slope, (low + high) / 2, (high - low) / 2


@dataclasses.dataclass(frozen=True, eq=False)
class _Rounding(_Relaxation):
  """g(z) = z rounded to a floating-point format `fmt` (or not: XLA may keep excess precision), within z -/+ half
  the format's spacing at max(|l|, |u|); for a sum that may round at every addition, within z -/+ `accumulated`."""

  fmt: "_Format"
  accumulated: Array | None

  def error(self, lower: Array, upper: Array) -> Array:
    magnitude = jnp.maximum(jnp.abs(lower), jnp.abs(upper))
    error = _spacing(magnitude, self.fmt) / 2 if self.accumulated is None else self.accumulated
    overflow = jnp.isinf(self.fmt.nearest(magnitude)) | jnp.isinf(error)  # z may round to inf
    return jnp.where(overflow, jnp.finfo(error.dtype).max, error)

  def lines(self, lower, upper, lower_slope):
    error = self.error(lower, upper)
    return jnp.ones_like(error), -error, jnp.ones_like(error), error

  def parallel(self, lower, upper):
    error = self.error(lower, upper)
    return jnp.ones_like(error), jnp.zeros_like(error), error


# ----------------------------------------------------------------------------------------------------------
# Floating-point formats. Bounds are computed in float32 (float64 for a float64 box) whatever the model's dtype;
# where the model rounds to a narrower format (a bfloat16 / float16 op, a cast, reduce_precision), the interval
# grows to hold both the rounded and the unrounded value, since XLA may keep excess precision (on CPU a bfloat16
# dot inside a jit is not rounded before a cast back to float32).


class _Format(NamedTuple):
  """A binary floating-point format: normal numbers m 2^e, 1 <= m < 2 with `mantissa_bits` fraction bits and
  e >= min_exponent (below: subnormals spaced 2^(min_exponent - mantissa_bits)), up to max_finite. `nearest`
  rounds a working-dtype array to it (to nearest, ties to even), as XLA does."""

  mantissa_bits: int
  min_exponent: int
  max_finite: float
  nearest: Callable[[Array], Array]


def _format_of(dtype: Any) -> _Format:
  """The format of a float dtype, rounding as a cast does. bfloat16 rounds with reduce_precision (half the compile
  time of casts; it differs only on float32 subnormals, which XLA's CPU flushes anyway); float16 must not (on CPU,
  reduce_precision flushes float16 subnormals to zero, a cast keeps them)."""
  info = jnp.finfo(dtype)
  if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
    return _reduced_format(int(info.nexp), int(info.nmant))
  return _Format(int(info.nmant), int(info.minexp), float(info.max), lambda v: v.astype(dtype).astype(v.dtype))


def _reduced_format(exponent_bits: int, mantissa_bits: int) -> _Format:
  """The format `lax.reduce_precision(x, exponent_bits, mantissa_bits)` rounds to (IEEE-style, with infinities)."""
  max_exponent = 2 ** (exponent_bits - 1) - 1
  nearest = lambda v: lax.reduce_precision(v, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits)
  return _Format(mantissa_bits, 1 - max_exponent, (2 - 2.0**-mantissa_bits) * 2.0**max_exponent, nearest)


def _is_narrower(dtype: Any, work: Any) -> bool:
  """A float dtype with fewer mantissa bits than the working dtype (bfloat16, float16, float8 under float32)."""
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).nmant < jnp.finfo(work).nmant


def _spacing(magnitude: Array, fmt: _Format) -> Array:
  """An upper bound on the gap between neighbours of `fmt` at |v| <= magnitude (>= 0): the gap at the magnitude,
  2^(max(e, min_exponent) - mantissa_bits) with e = floor(log2 magnitude) read from the exponent bits (a normal
  number of the working dtype, so that nothing hits flushed subnormals). Piecewise constant, nondecreasing."""
  info = jnp.finfo(magnitude.dtype)
  integer, bias = {32: jnp.int32, 64: jnp.int64}[info.bits], info.maxexp - 1
  field = lax.bitcast_convert_type(lax.stop_gradient(magnitude), integer) >> info.nmant
  power = jnp.clip(field - bias, fmt.min_exponent, info.maxexp) - fmt.mantissa_bits
  power = jnp.clip(power, info.minexp, info.maxexp - 1)
  return lax.bitcast_convert_type((power + bias).astype(integer) << info.nmant, magnitude.dtype)


def _gamma(terms: int, fmt: _Format) -> float:
  """Higham's gamma_{n-1} = (n-1) u / (1 - (n-1) u), u = 2^-(mantissa_bits + 1): |computed - exact| <= gamma
  sum |x_i| for a sum of n terms added in `fmt` in any order (inf when (n-1) u >= 1)."""
  k = (terms - 1) * 2.0 ** -(fmt.mantissa_bits + 1)
  return k / (1 - k) if k < 1 else np.inf


def _round_rule(value: Any, fmt: _Format, accumulated: Array | None) -> _Box:
  """z rounded to `fmt` to nearest, or kept unrounded: both lie in [min(l, nearest(l)), max(u, nearest(u))]
  (rounding is nondecreasing). For a sum whose every addition may round: [l - a, u + a], a = `accumulated`."""
  box = _as_box(value, "round")
  if accumulated is None:
    lower, upper = jnp.minimum(box.lower, fmt.nearest(box.lower)), jnp.maximum(box.upper, fmt.nearest(box.upper))
  else:
    lower, upper = box.lower - accumulated, box.upper + accumulated
  return _Box(lower, upper, _Rounding(_as_affine(value), box.lower, box.upper, fmt, accumulated))


# ----------------------------------------------------------------------------------------------------------
# Rules.


_LINEAR = {
  "add",
  "add_any",
  "sub",
  "concatenate",
  "pad",
  "reshape",
  "broadcast_in_dim",
  "transpose",
  "squeeze",
  "expand_dims",
  "slice",
  "rev",
  "reduce_sum",
  "copy",
  "copy_p",
  "reduce_window_sum",
  "cumsum",
}
_SCALED = {"mul": (0, 1), "dot_general": (0, 1), "conv_general_dilated": (0,), "div": (0,)}
_INCREASING = {
  "max",
  "min",
  "reduce_max",
  "reduce_min",
  "reduce_window_max",
  "reduce_window_min",
  "exp",
  "exp2",
  "log",
  "log1p",
  "expm1",
  "tanh",
  "logistic",
  "sqrt",
  "cbrt",
  "erf",
  "atan",
  "asinh",
  "sinh",
  "floor",
  "ceil",
  "round",
  "sign",
}
_DECREASING = {"rsqrt"}
# Ops whose result is exactly representable in their operands' format: no rounding in any dtype.
_EXACT = {
  *("concatenate", "pad", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "rev"),
  *("copy", "copy_p", "stop_gradient", "neg", "max", "min", "clamp", "reduce_max", "reduce_min", "reduce_window_max"),
  *("reduce_window_min", "floor", "ceil", "round", "sign"),
}
# Of those, the ones bounded on an integer operand (integer arithmetic has no rule: it wraps around).
_INTEGER_EXACT = (_EXACT - {"neg", "sign"}) | {"convert_element_type"}
# Sums of many terms: in a narrow float format XLA may round after every addition (CPU does for bfloat16).
_ACCUMULATING = {"reduce_sum", "reduce_window_sum", "cumsum"}
# Call-like primitives: their outputs are their sub-jaxpr's (names across JAX versions: pjit became jit,
# checkpoint is remat2 under jax 0.10). Other primitives with sub-jaxprs (while, cond, ...) have no rule.
_CALLS = {
  "pjit": "jaxpr",
  "jit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
  "checkpoint": "jaxpr",
  "remat": "jaxpr",
  "remat2": "jaxpr",
  "shard_map": "jaxpr",
}


def _linear_rule(prim, params, values, shape) -> _Box | _Affine:
  """Ops linear in their x-dependent operands jointly (constants enter as offsets): IBP center / radius."""
  affines = [_as_affine(v) if _is_bound(v) else None for v in values]
  center = prim.bind(*[a.center if a else v for a, v in zip(affines, values)], **params)
  radius_prim = lax.add_p if prim.name == "sub" else prim  # |a - b| radii add up.
  radius = radius_prim.bind(*[a.radius if a else jnp.zeros_like(v) for a, v in zip(affines, values)], **params)
  offset = prim.bind(*[a.offset if a else v for a, v in zip(affines, values)], **params)
  center, radius, offset = _fit(center, shape), _fit(radius, shape), _fit(offset, shape)
  bases = tuple({id(base): base for a in affines if a for base in a.bases}.values())
  position = {id(base): index for index, base in enumerate(bases)}

  def linear(*hs):
    of = lambda a: a.linear(*[hs[position[id(base)]] for base in a.bases])
    parts = [of(a) if a else jnp.zeros_like(v) for a, v in zip(affines, values)]
    return _fit(prim.bind(*parts, **params), shape)

  joined = len(bases) > max(len(a.bases) for a in affines if a)
  join = prim.name if joined else next((a.join for a in affines if a and a.join), None)
  return _Affine(bases, linear, center, radius, offset, join)


def _scaled_rule(prim, params, values, shape) -> _Affine:
  """mul / div / dot_general / conv with one x-dependent operand: center W c, radius |W| r (IBP eq. 6)."""
  bound = [i for i, v in enumerate(values) if _is_bound(v)]
  if len(bound) > 1 or bound[0] not in _SCALED[prim.name]:
    raise NotImplementedError(
      f"bounds: primitive {prim.name!r} with x-dependent operands at {bound} "
      f"(supported: one, at {_SCALED[prim.name]}; the others constant)"
    )
  index, a = bound[0], _as_affine(values[bound[0]])

  def apply(x, others):
    return _fit(prim.bind(*[x if i == index else o for i, o in enumerate(others)], **params), shape)

  magnitudes = [jnp.abs(v) if i != index else None for i, v in enumerate(values)]
  linear = lambda *hs: apply(a.linear(*hs), values)
  center, radius, offset = apply(a.center, values), apply(a.radius, magnitudes), apply(a.offset, values)
  return _Affine(a.bases, linear, center, radius, offset, a.join)


def _ends(value: Any) -> tuple[Array, Array]:
  """(lower, upper) of a bound, (v, v) of a constant."""
  if not _is_bound(value):
    return value, value
  box = _as_box(value, "ends")
  return box.lower, box.upper


def _power_rule(name: str, value: Any, exponent: int) -> _Box:
  """x^n of an interval (square, integer_pow), n >= 0: odd n is increasing; even n is [0 or min(l^n, u^n), max]
  (0 where l <= 0 <= u). The model's own op is applied to the ends (float rounding is monotone)."""
  if exponent < 0:
    raise NotImplementedError(f"bounds: primitive {name!r} with exponent {exponent} on an x-dependent operand")
  lower, upper = _ends(value)
  power = lambda v: lax.integer_pow(v, exponent)
  if exponent % 2:
    return _Box(power(lower), power(upper), name)
  low, high = power(lower), power(upper)
  crossing = (lower <= 0) & (upper >= 0)
  return _Box(jnp.where(crossing, 0.0, jnp.minimum(low, high)), jnp.maximum(low, high), name)


def _product_rule(prim, params, values, shape) -> _Box:
  """Products of two x-dependent operands (IBP only; CROWN takes the box by these bounds):
  mul: min / max of the four products of the ends (a bilinear map's extremes lie at corners; rounding is
  monotone); div: the numerator times [1/u, 1/l] of a denominator interval that excludes 0, else (-inf, inf)
  elementwise (checked at run time, so under jit too); dot_general: interval matrix product in midpoint-radius
  form, c_a c_b -/+ (|c_a| r_b + r_a |c_b| + r_a r_b), which holds every product of matrices in the boxes."""
  name = prim.name
  if name == "dot_general":
    centers, radii = [], []
    for v in values:
      lower, upper = _ends(v)
      centers.append((lower + upper) / 2)
      radii.append((upper - lower) / 2)
    dot = lambda a, b: _fit(prim.bind(a, b, **params), shape)
    (ca, cb), (ra, rb) = centers, radii
    center = dot(ca, cb)
    radius = dot(jnp.abs(ca), rb) + dot(ra, jnp.abs(cb)) + dot(ra, rb)
    return _Box(*_unnan(center - radius, center + radius), name)
  (al, au), (bl, bu) = _ends(values[0]), _ends(values[1])
  valid = None
  if name == "div":
    valid = (bl > 0) | (bu < 0)
    safe_l, safe_u = jnp.where(valid, bl, 1.0), jnp.where(valid, bu, 1.0)
    bl, bu = 1 / safe_u, 1 / safe_l
  corners = [a * b for a in (al, au) for b in (bl, bu)]
  low, high = _unnan(functools.reduce(jnp.minimum, corners), functools.reduce(jnp.maximum, corners))
  if valid is not None:
    low, high = jnp.where(valid, low, -jnp.inf), jnp.where(valid, high, jnp.inf)
  return _Box(_fit(low, shape), _fit(high, shape), name)


def _unnan(lower: Array, upper: Array) -> tuple[Array, Array]:
  """NaN ends (0 * inf, inf - inf of an unbounded operand) -> -inf / +inf, so that no NaN travels on."""
  return jnp.where(jnp.isnan(lower), -jnp.inf, lower), jnp.where(jnp.isnan(upper), jnp.inf, upper)


def _split_rule(params, value) -> list:
  """lax.split: one slice per output (the slice rule keeps each an affine map)."""
  outs, start = [], 0
  for size in params["sizes"]:
    end = start + size
    slicer = lambda v, start=start, end=end: lax.slice_in_dim(v, start, end, axis=params["axis"])
    outs.append(_interpret_fn(slicer, value)[0])
    start = end
  return outs


def _neg_rule(value: _Box | _Affine) -> _Affine:
  a = _as_affine(value)
  return _Affine(a.bases, lambda *hs: -a.linear(*hs), -a.center, a.radius, -a.offset, a.join)


def _monotone_rule(prim, params, values, increasing: bool) -> _Box:
  """Elementwise / window ops monotone in every operand: bounds from the operands' bounds (IBP eq. 7). max / min of
  one x-dependent operand and a constant (relu, relu6, clip) also keep their relaxation for CROWN."""
  boxes = [_as_box(v, prim.name) if _is_bound(v) else None for v in values]
  lows = [b.lower if b else v for b, v in zip(boxes, values)]
  highs = [b.upper if b else v for b, v in zip(boxes, values)]
  low, high = prim.bind(*lows, **params), prim.bind(*highs, **params)
  if not increasing:
    low, high = high, low
  low, high = _unnan(low, high)  # outside the domain (rsqrt, sqrt, log of an end below 0): unbounded
  bound = [i for i, box in enumerate(boxes) if box]
  if prim.name in ("logistic", "tanh"):
    return _Box(low, high, _SShaped(_as_affine(values[0]), boxes[0].lower, boxes[0].upper, prim.name))
  if prim.name in ("max", "min") and len(bound) == 1:
    index = bound[0]
    relaxation = _Max if prim.name == "max" else _Min
    const = _fit(jnp.asarray(values[1 - index], low.dtype), low.shape)
    return _Box(low, high, relaxation(_as_affine(values[index]), boxes[index].lower, boxes[index].upper, const))
  return _Box(low, high, prim.name)


def _clamp_rule(values) -> _Box:
  """lax.clamp(a, x, b) = min(max(x, a), b) (XLA's definition): two relaxations when a and b are constants."""
  return _interpret_fn(lambda a, x, b: lax.min(lax.max(x, a), b), *values)[0]


def _convert_rule(eqn, value: _Box | _Affine) -> Any:
  """A float -> float or integer -> float cast is the identity in the working dtype (rounded afterwards where the
  target is narrower). float -> integer truncates toward zero and saturates: not linear (int(c) -/+ int(r) misses
  x = 0.5 in [0.4, 1.6]) but nondecreasing. integer -> integer is the identity where it cannot wrap around."""
  source, target = eqn.invars[0].aval.dtype, eqn.params["new_dtype"]
  if target == jnp.bool_:
    raise NotImplementedError("bounds: primitive 'convert_element_type' to bool with an x-dependent operand")
  if not jnp.issubdtype(target, jnp.integer):
    return value
  info = jnp.iinfo(target)
  if jnp.issubdtype(source, jnp.integer):
    if jnp.iinfo(source).min < info.min or jnp.iinfo(source).max > info.max:
      raise NotImplementedError(
        f"bounds: primitive 'convert_element_type' from {source} to {target} on an x-dependent operand "
        "(it wraps around)"
      )
    return value
  box = _as_box(value, "convert_element_type")
  to_integer = lambda v: jnp.clip(jnp.trunc(v), info.min, info.max)
  return _Box(to_integer(box.lower), to_integer(box.upper), "convert_element_type")


def _open(jaxpr) -> tuple[Any, Sequence[Any]]:
  """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
  return (jaxpr.jaxpr, jaxpr.consts) if hasattr(jaxpr, "consts") else (jaxpr, ())


def _call_rule(eqn, values) -> list:
  """A call-like primitive: its sub-jaxpr on the same values (shard_map only on a one-device mesh or with
  every operand and result replicated, where the body sees the global values)."""
  if eqn.primitive.name == "shard_map":
    specs = (*eqn.params["in_specs"], *eqn.params["out_specs"])
    if eqn.params["mesh"].size > 1 and any(any(axis is not None for axis in spec) for spec in specs):
      raise NotImplementedError("bounds: primitive 'shard_map' splits x over devices; call f outside shard_map")
  return _interpret(*_open(eqn.params[_CALLS[eqn.primitive.name]]), values)


def _shape_of(value: Any) -> jax.ShapeDtypeStruct:
  if _is_bound(value):
    like = value.lower if isinstance(value, _Box) else value.center
    return jax.ShapeDtypeStruct(like.shape, like.dtype)
  return jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value))


def _interpret_fn(fn: Callable[..., Any], *values: Any) -> list:
  """`fn`'s outputs (a flat list) on abstract values, through its jaxpr."""
  closed = jax.make_jaxpr(fn)(*map(_shape_of, values))
  return _interpret(closed.jaxpr, closed.consts, values)


def _index(value: Any, t: int) -> Any:
  """value[t]: a constant is indexed, a bound goes through the slice and squeeze rules."""
  return _interpret_fn(lambda v: v[t], value)[0] if _is_bound(value) else value[t]


def _stack(values: Sequence[Any]) -> Any:
  """jnp.stack of per-step outputs (bounds through the broadcast and concatenate rules)."""
  stack = lambda *vs: lax.concatenate([lax.expand_dims(v, (0,)) for v in vs], 0)
  return _interpret_fn(stack, *values)[0] if any(map(_is_bound, values)) else stack(*values)


def _scan_rule(eqn, values) -> list:
  """`lax.scan` (also fori_loop with static bounds, nn.scan) unrolled over its static length: the body runs
  on (consts, carry, xs[t]) for t = 0 .. length - 1 (backwards if `reverse`), its ys are stacked over t.
  Stacked weights in xs are constants sliced per step, so each step is bounded exactly as written out."""
  params = eqn.params
  jaxpr, consts = _open(params["jaxpr"])
  n_consts, n_carry = params["num_consts"], params["num_carry"]
  body_consts, carry, xs = values[:n_consts], values[n_consts : n_consts + n_carry], values[n_consts + n_carry :]
  steps = range(params["length"])[::-1] if params["reverse"] else range(params["length"])
  ys_per_step = []
  for t in steps:
    outs = _interpret(jaxpr, consts, [*body_consts, *carry, *[_index(x, t) for x in xs]])
    carry = outs[:n_carry]
    ys_per_step.append(outs[n_carry:])
  if params["reverse"]:
    ys_per_step.reverse()
  ys = [_stack(step_values) for step_values in zip(*ys_per_step)] if ys_per_step else []
  return [*carry, *ys]


def _eval_constant(eqn, values):
  out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
  return out if eqn.primitive.multiple_results else [out]


def _value_rule(eqn, values) -> Any:
  """Abstract value of one equation's output in the working dtype, before any rounding to the output's format."""
  prim, name, params = eqn.primitive, eqn.primitive.name, eqn.params
  if params.get("preferred_element_type") is not None:  # dot / conv accumulate in the working dtype
    params = {**params, "preferred_element_type": _working_dtype(values)}
  if name == "convert_element_type":
    return _convert_rule(eqn, values[0])
  if name == "reduce_precision":
    return values[0]
  if name == "clamp":
    return _clamp_rule(values)
  if name in _LINEAR:
    return _linear_rule(prim, params, values, eqn.outvars[0].aval.shape)
  if name == "stop_gradient":
    return values[0]  # the identity on values (a linear map through it must not drop the gradient)
  if name == "square":
    return _power_rule(name, values[0], 2)
  if name == "integer_pow":
    return _power_rule(name, values[0], params["y"])
  bound = [i for i, v in enumerate(values) if _is_bound(v)]
  if name in ("mul", "dot_general") and len(bound) > 1 or name == "div" and 1 in bound:
    return _product_rule(prim, params, values, eqn.outvars[0].aval.shape)
  if name in _SCALED:
    return _scaled_rule(prim, params, values, eqn.outvars[0].aval.shape)
  if name == "neg":
    return _neg_rule(values[0])
  if name in _INCREASING or name in _DECREASING:
    return _monotone_rule(prim, params, values, name in _INCREASING)
  raise NotImplementedError(f"bounds: no rule for primitive {name!r} with an x-dependent operand")


def _working_dtype(values: Sequence[Any]) -> Any:
  """The dtype bounds are computed in: that of the x-dependent operands (float32, or float64 for such a box)."""
  bound = next(v for v in values if _is_bound(v))
  return (bound.lower if isinstance(bound, _Box) else bound.center).dtype


def _promoted(eqn, values: Sequence[Any]) -> list:
  """Constant operands in the working dtype: narrower floats (bfloat16 weights) always, exactly; integers where
  the x-dependent operands are integers (whose bounds are held as floats). Integer arithmetic on x is refused."""
  work = _working_dtype(values)
  integers = [_is_bound(v) and not jnp.issubdtype(var.aval.dtype, jnp.inexact) for var, v in zip(eqn.invars, values)]
  if any(integers) and eqn.primitive.name not in _INTEGER_EXACT:
    raise NotImplementedError(
      f"bounds: integer arithmetic: primitive {eqn.primitive.name!r} on an x-dependent integer operand "
      "(cast it to a float type first)"
    )

  def promote(value):
    dtype = jnp.result_type(value)
    if _is_narrower(dtype, work) or (any(integers) and jnp.issubdtype(dtype, jnp.integer)):
      return jnp.asarray(value, work)
    return value

  return [v if _is_bound(v) else promote(v) for v in values]


def _output_format(eqn, work: Any) -> _Format | None:
  """The format an equation rounds its result to (None: exact in the working dtype). Ops of `_EXACT` and casts to a
  format holding every number of the source's do not round."""
  if eqn.primitive.name == "reduce_precision":
    return _reduced_format(eqn.params["exponent_bits"], eqn.params["mantissa_bits"])
  dtype = eqn.outvars[0].aval.dtype
  if not _is_narrower(dtype, work) or eqn.primitive.name in _EXACT:
    return None
  source, target = eqn.invars[0].aval.dtype, _format_of(dtype)
  if eqn.primitive.name == "convert_element_type" and jnp.issubdtype(source, jnp.floating):
    held = _format_of(source)
    if held.mantissa_bits <= target.mantissa_bits and held.min_exponent >= target.min_exponent:
      return None if held.max_finite <= target.max_finite else target  # only an overflow to rule out
  return target


def _accumulated(eqn, values, fmt: _Format) -> Array | None:
  """For a sum of n terms in a narrow format: gamma_{n-1} times the sum of the terms' largest magnitudes (None for
  an op that rounds once, such as a bfloat16 dot or conv, which XLA accumulates in float32)."""
  if eqn.primitive.name not in _ACCUMULATING:
    return None
  box = _as_box(values[0], eqn.primitive.name)
  magnitude = jnp.maximum(jnp.abs(box.lower), jnp.abs(box.upper))
  total = eqn.primitive.bind(magnitude, **eqn.params)
  terms = {
    "reduce_sum": lambda p: math.prod(magnitude.shape[axis] for axis in p["axes"]),
    "reduce_window_sum": lambda p: math.prod(p["window_dimensions"]),
    "cumsum": lambda p: magnitude.shape[p["axis"]],
  }[eqn.primitive.name](eqn.params)
  gamma = _gamma(terms, fmt)
  if not np.isfinite(gamma):
    return jnp.where(total > 0, jnp.inf, 0.0)
  return jnp.where(total * (1 + gamma) <= fmt.max_finite, gamma * total, jnp.inf)  # else a partial sum may overflow


def _apply_rule(eqn, values) -> list:
  """Abstract value(s) of one equation's outputs given its inputs' (at least one x-dependent)."""
  if eqn.primitive.name in _CALLS:
    return _call_rule(eqn, values)
  if eqn.primitive.name == "scan":
    return _scan_rule(eqn, values)
  if eqn.primitive.name == "split":
    return _split_rule(eqn.params, values[0])
  values = _promoted(eqn, values)
  value = _value_rule(eqn, values)
  fmt = _output_format(eqn, _working_dtype(values))
  return [value if fmt is None else _round_rule(value, fmt, _accumulated(eqn, values, fmt))]


def _interpret(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
  """Runs `jaxpr` on abstract values: constants are evaluated, x-dependent values go through `_apply_rule`."""
  env = {}

  def read(var):
    return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    outs = _apply_rule(eqn, values) if any(map(_is_bound, values)) else _eval_constant(eqn, values)
    for var, out in zip(eqn.outvars, outs):
      env[var] = out
  return [read(v) for v in jaxpr.outvars]


def _propagate(f: Callable[[Array], Array], lower: Array, upper: Array) -> Any:
  """Abstract value of f over the box: a constant, a _Box or an _Affine."""
  if lower.shape != upper.shape:
    raise ValueError(f"lower {lower.shape} and upper {upper.shape} differ in shape")
  closed = jax.make_jaxpr(f)(jax.ShapeDtypeStruct(lower.shape, lower.dtype))
  if len(closed.jaxpr.outvars) != 1:
    raise ValueError(f"f must return one array of logits, got {len(closed.jaxpr.outvars)} outputs")
  work = jnp.promote_types(lower.dtype, jnp.float32)  # bounds of a bfloat16 box are float32 too
  box = _Box(jnp.asarray(lower, work), jnp.asarray(upper, work), "input")
  return _interpret(closed.jaxpr, closed.consts, [box])[0]


# ----------------------------------------------------------------------------------------------------------
# Specification merge and IBP.


def margin_spec(labels: Array, num_classes: int) -> Array:
  """Margin specification C [B, K-1, K]: row j is e_y - e_j for the K-1 classes j != y (in increasing order).

  Args:
    labels: int [B].
    num_classes: K.

  Returns:
    C with `C @ z = z_y - z_j`; lb > 0 on every row certifies that no j beats y in the box.
  """
  eye = jnp.eye(num_classes, dtype=jnp.float32)
  others = jnp.arange(num_classes - 1)[None, :] + (jnp.arange(num_classes - 1)[None, :] >= labels[:, None])
  return eye[labels][:, None, :] - eye[others]


def _pull_rows(affine: _Affine, rows: Array) -> tuple[Array, ...]:
  """Rows of rows o linear on each base: rows [m, B, *value shape] -> [m, B, *base shape] each (vector-Jacobian
  products, so a convolution is pulled back by a transposed convolution, never a dense Jacobian; linear acts per
  example). Rows lead so that the row and batch axes merge into the convolutions' batch without a transpose."""
  _, pullback = jax.vjp(affine.linear, *map(_midpoint, affine.bases))
  return jax.vmap(pullback)(rows)


def _dot(a: Array, b: Array) -> Array:
  """Sum over the non-leading axes of a [m, B, ...] times b [B, ...] -> [m, B]."""
  return jnp.sum(a * b, axis=tuple(range(2, a.ndim)))


def _sure(lower: Array, upper: Array) -> tuple[Array, Array]:
  """NaN (inf - inf, from an unbounded value such as a rounding that may overflow) -> -inf / +inf."""
  return jnp.where(jnp.isnan(lower), -jnp.inf, lower), jnp.where(jnp.isnan(upper), jnp.inf, upper)


def _ibp_result(value: Any, spec: Array | None) -> tuple[Array, Array]:
  """IBP bounds of the (spec-merged) output."""
  return _sure(*_ibp_ends(value, spec))


def _ibp_ends(value: Any, spec: Array | None) -> tuple[Array, Array]:
  if not _is_bound(value):
    value = jnp.asarray(value)
    return (value, value) if spec is None else (jnp.einsum("bmc,bc->bm", spec, value),) * 2
  if spec is None:
    box = _as_box(value, "output")
    return box.lower, box.upper
  a = _as_affine(value)
  center = jnp.einsum("bmc,bc->bm", spec, a.center)
  rows = _pull_rows(a, jnp.swapaxes(spec, 0, 1))
  radius = sum(_dot(jnp.abs(r), (base.upper - base.lower) / 2) for r, base in zip(rows, a.bases)).T
  return center - radius, center + radius


def _check_spec(spec: Array | None, lower: Array) -> None:
  if spec is not None and (spec.ndim != 3 or spec.shape[0] != lower.shape[0]):
    raise ValueError(f"spec must be [B, m, classes] with B = {lower.shape[0]}, got {spec.shape}")


def ibp(f: Callable[[Array], Array], lower: Array, upper: Array, spec: Array | None = None) -> tuple[Array, Array]:
  """Interval bound propagation (Gowal et al. 2018) of f over the box [lower, upper].

  Args:
    f: pure function of x [B, ...] -> logits [B, K].
    lower, upper: the input box, x's shape.
    spec: optional [B, m, K]; merged into f's last affine segment.

  Returns:
    (lb, ub), [B, K] or [B, m] with spec: lb <= (spec @) f(x) <= ub on the box.
  """
  _check_spec(spec, lower)
  return _ibp_result(_propagate(f, lower, upper), spec)


# ----------------------------------------------------------------------------------------------------------
# CROWN: backward linear bound propagation over the graph.


class _Linearised(NamedTuple):
  """A relaxation's input bounds [lower, upper], its lines over them (a_l, b_l, a_u, b_u) and where its lower slope
  is free (alpha-CROWN), computed once and shared by every backward pass through it."""

  lower: Array
  upper: Array
  lines: Lines
  unstable: Array


def _linearise(relaxation: _Relaxation, bounds: tuple[Array, Array], lower_slope: str) -> _Linearised:
  return _Linearised(*bounds, relaxation.lines(*bounds, lower_slope), _unstable(relaxation, bounds))


def _ibp_linearised(affine: _Affine, lower_slope: str) -> dict:
  """{id(relaxation): its _Linearised over its IBP bounds} for the relaxations `affine` depends on (CROWN-IBP)."""
  return {id(r): _linearise(r, (r.lower, r.upper), lower_slope) for r in _relaxations(affine)}


def _relaxation_backward(rows: Array, linearised: _Linearised, slope: Array | None) -> tuple[Array, Array]:
  """Lower linear bound of rows . g(z) over z in the linearised bounds: g's lower line where a row's coefficient is
  positive, its upper line where negative. `slope` (alpha-CROWN) replaces the lower slope of unstable relus.
  rows and slope are [m, B, *shape] (rows lead).

  Returns:
    (rows on z [m, B, *shape], bias [m, B]).
  """
  slope_low, intercept_low, slope_up, intercept_up = linearised.lines
  if slope is not None:
    slope_low = jnp.where(linearised.unstable, slope, slope_low)
  positive, negative = jnp.maximum(rows, 0), jnp.minimum(rows, 0)
  new_rows = positive * slope_low + negative * slope_up
  return new_rows, _dot(positive, intercept_low) + _dot(negative, intercept_up)


def _unstable(relaxation: _Relaxation, bounds: tuple[Array, Array]) -> Array:
  """Neurons whose lower line has a free slope (alpha-CROWN): a max / min with a constant crossing it."""
  if not isinstance(relaxation, (_Max, _Min)):
    return jnp.zeros(bounds[0].shape, bool)
  return (bounds[0] < relaxation.const) & (bounds[1] > relaxation.const)


def _backward(value: _Affine, rows: Array, linearised: dict, slopes: dict | None = None) -> Array:
  """CROWN lower bound [m, B] of rows . value over the input box (Zhang et al. 2018, Thm. 3.2, on a graph).

  rows [m, B, *value shape] (rows lead, see `_pull_rows`) are pulled back through affine maps (to every base:
  branches that meet again are summed before going further, boxes taken latest-created first) and relaxations;
  they stop at the input box and at any box without a relaxation (max pooling, a max of two x-dependent values,
  exp, ...), which enter by their IBP bounds: sum of rows+ . lower + rows- . upper.

  Args:
    linearised: {id(relaxation): _Linearised} for every relaxation `value` depends on (IBP input bounds for
      CROWN-IBP, CROWN's own for full CROWN).
    slopes: {id(relaxation): [m, B, *shape]} lower slopes of its unstable neurons (alpha-CROWN).
  """
  slopes = slopes or {}
  pending: dict[int, list] = {}
  bias = jnp.zeros(rows.shape[:2], rows.dtype)

  def pull(affine: _Affine, rows: Array) -> Array:
    """rows . (L(h) + offset): the rows of L go to each base h; returns rows . offset."""
    for base, base_rows in zip(affine.bases, _pull_rows(affine, rows)):
      entry = pending.setdefault(id(base), [base, 0.0])
      entry[1] = entry[1] + base_rows
    return _dot(rows, affine.offset)

  bias = bias + pull(value, rows)
  while pending:
    box, box_rows = pending.pop(max(pending, key=lambda key: pending[key][0].order))
    origin = box.origin
    if isinstance(origin, _Relaxation):
      box_rows, extra = _relaxation_backward(box_rows, linearised[id(origin)], slopes.get(id(origin)))
      bias = bias + extra + pull(origin.pre, box_rows)
    else:
      bias = bias + _dot(jnp.maximum(box_rows, 0), box.lower) + _dot(jnp.minimum(box_rows, 0), box.upper)
  return _sure(bias, bias)[0]


def _spec_backward(value: _Affine, spec: Array, linearised: dict, slopes: dict | None = None) -> Array:
  """`_backward` of spec [B, m, *value shape] -> [B, m]."""
  return _backward(value, jnp.swapaxes(spec, 0, 1), linearised, slopes).T


def _output_affine(value: Any) -> _Affine:
  if not _is_bound(value):
    raise NotImplementedError("bounds: f does not depend on x")
  return _as_affine(value)


def _check_slope(lower_slope: str) -> None:
  if lower_slope not in LOWER_SLOPES:
    raise ValueError(f"unknown lower_slope {lower_slope!r}; valid: {LOWER_SLOPES}")


def _default_spec(value: Any, lower: Array, spec: Array | None) -> Array:
  """The identity spec [B, K, K] when none is given (bounds of the logits themselves)."""
  if spec is not None:
    return spec
  classes = _as_affine(value).center.shape[-1]
  return jnp.broadcast_to(jnp.eye(classes, dtype=lower.dtype), (lower.shape[0], classes, classes))


def crown_ibp(
  f: Callable[[Array], Array], lower: Array, upper: Array, spec: Array | None = None, *, lower_slope: str = "adaptive"
) -> tuple[Array, Array]:
  """CROWN-IBP (Zhang et al. 2020): IBP pre-activation bounds, then a CROWN backward pass from the spec.

  Args:
    f: pure function of x [B, ...] -> logits [B, K] (any graph the interpreter takes).
    lower, upper: the input box, x's shape.
    spec: optional [B, m, K] (default: the identity, bounds of the logits).
    lower_slope: "adaptive" (1 if u > -l else 0, the reference) or "zero" (never looser than IBP).

  Returns:
    (lb, ub), [B, m] or [B, K]. ub is -(lower bound of -spec), a second backward pass (dropped under jit
    when unused).
  """
  _check_spec(spec, lower)
  _check_slope(lower_slope)
  value = _propagate(f, lower, upper)
  affine, spec = _output_affine(value), _default_spec(value, lower, spec)
  linearised = _ibp_linearised(affine, lower_slope)
  return _spec_backward(affine, spec, linearised), -_spec_backward(affine, -spec, linearised)


def ibp_and_crown_lower(
  f: Callable[[Array], Array], lower: Array, upper: Array, spec: Array, *, lower_slope: str = "adaptive"
) -> tuple[Array, Array]:
  """Lower bounds of spec @ f by IBP and by CROWN-IBP from one interpretation (what CROWN-IBP training mixes).

  Args: as `crown_ibp`, spec required [B, m, K].

  Returns:
    (ibp_lb, crown_lb), each [B, m].
  """
  _check_spec(spec, lower)
  _check_slope(lower_slope)
  value = _propagate(f, lower, upper)
  affine = _output_affine(value)
  return _ibp_result(value, spec)[0], _spec_backward(affine, spec, _ibp_linearised(affine, lower_slope))


# ----------------------------------------------------------------------------------------------------------
# CROWN with CROWN intermediate bounds, and alpha-CROWN.

# Identity rows pulled back at once when bounding a layer's neurons: B * rows * (widest layer) floats per chunk.
# XLA's schedule keeps ~25 arrays of that size live in a backward pass: on ResNet-18 at width 1/16, 16x16 inputs,
# batch 2, 2**21 (8 MB) took 193 MB of temporaries where 2**24 took 443 MB, in the same time.
_CHUNK_FLOATS = 2**21


def _relaxations(affine: _Affine) -> list[_Relaxation]:
  """The relaxations `affine` depends on, in creation (topological) order."""
  seen, stack, found = set(), list(affine.bases), []
  while stack:
    box = stack.pop()
    if id(box) in seen:
      continue
    seen.add(id(box))
    if isinstance(box.origin, _Relaxation):
      found.append((box.order, box.origin))
      stack.extend(box.origin.pre.bases)
  return [relaxation for _, relaxation in sorted(found, key=lambda pair: pair[0])]


def _chunking(affine: _Affine) -> tuple[int, int]:
  """(rows per chunk, chunks) for bounding every neuron of `affine`: about _CHUNK_FLOATS floats of rows a chunk."""
  shape = affine.center.shape
  size = math.prod(shape[1:])
  widest = max(size, *(math.prod(base.lower.shape[1:]) for base in affine.bases))
  chunk = max(1, min(size, _CHUNK_FLOATS // (2 * shape[0] * widest)))
  return chunk, -(-size // chunk)


def _neuron_bounds(affine: _Affine, linearised: dict, slopes: dict | None = None) -> tuple:
  """CROWN bounds of every neuron of `affine` [B, *shape]: the backward pass from the identity rows (and their
  negatives, for the upper bounds), in chunks of rows under `lax.map` so that memory stays bounded.

  Args:
    linearised: as `_backward`'s, for the relaxations `affine` depends on.
    slopes: {id(relaxation): [chunks, 2 chunk, B, *shape]} lower slopes per row (alpha-CROWN), chunk by chunk.
  """
  shape = affine.center.shape
  size = math.prod(shape[1:])
  chunk, count = _chunking(affine)

  def bounds_of(args):
    index, chunk_slopes = args
    eye = jax.nn.one_hot(index * chunk + jnp.arange(chunk), size, dtype=affine.center.dtype)
    eye = eye.reshape(chunk, *shape[1:])
    rows = jnp.broadcast_to(jnp.concatenate([eye, -eye])[:, None], (2 * chunk, *shape))
    # The rows exist only once the earlier layers' bounds do, so that XLA does not start this pass (keeping its
    # rows live) while it runs the earlier ones (635 -> 443 MB of temporaries in the case above).
    rows, ready = lax.optimization_barrier((rows, linearised))
    return _backward(affine, rows, ready, chunk_slopes)

  ends = lax.map(bounds_of, (jnp.arange(count), slopes or {}))  # [count, 2 chunk, B]
  lower = jnp.moveaxis(ends[:, :chunk], 2, 0).reshape(shape[0], -1)[:, :size]
  upper = -jnp.moveaxis(ends[:, chunk:], 2, 0).reshape(shape[0], -1)[:, :size]
  return lower.reshape(shape), upper.reshape(shape)


def _bounded(affine: _Affine) -> list[_Relaxation]:
  """The relaxations whose inputs CROWN bounds by their own backward pass (a rounding keeps its IBP bounds: they
  only size its error), earliest first."""
  return [relaxation for relaxation in _relaxations(affine) if not isinstance(relaxation, _Rounding)]


def _crown_linearised(affine: _Affine, lower_slope: str, slopes: dict | None = None) -> dict:
  """{id(relaxation): _Linearised} for the relaxations `affine` depends on, each over its CROWN input bounds
  computed from the ones before (a rounding keeps its IBP bounds). slopes: {id(relaxation): its `_neuron_bounds`
  slopes} (alpha-CROWN)."""
  linearised = {}
  for relaxation in _relaxations(affine):
    if isinstance(relaxation, _Rounding):
      bounds = relaxation.lower, relaxation.upper
    else:
      own = None if slopes is None else slopes[id(relaxation)]
      bounds = _neuron_bounds(relaxation.pre, linearised, own)
    linearised[id(relaxation)] = _linearise(relaxation, bounds, lower_slope)
  return linearised


def crown(
  f: Callable[[Array], Array], lower: Array, upper: Array, spec: Array | None = None, *, lower_slope: str = "adaptive"
) -> tuple[Array, Array]:
  """CROWN (Zhang et al. 2018) on f's graph: every relaxation's input bounded by its own backward pass, then the
  spec's. What auto_LiRPA's `compute_bounds(method="CROWN")` computes (tests/test_bounds_lirpa.py).

  Args: as `crown_ibp`.

  Returns:
    (lb, ub), [B, m] or [B, K]. Cost: a backward pass per relaxed layer with one row per neuron (chunked).
  """
  _check_spec(spec, lower)
  _check_slope(lower_slope)
  value = _propagate(f, lower, upper)
  affine, spec = _output_affine(value), _default_spec(value, lower, spec)
  both = _spec_backward(affine, jnp.concatenate([spec, -spec], axis=1), _crown_linearised(affine, lower_slope))
  return both[:, : spec.shape[1]], -both[:, spec.shape[1] :]


def _initial_slopes(affine: _Affine, rows: int, linearised: dict) -> dict:
  """{id(relu): CROWN's adaptive lower slope, one per row [rows, B, *shape]} for the relus (max with a constant)
  `affine` depends on."""
  slopes = {}
  for relaxation in _relaxations(affine):
    if isinstance(relaxation, _Max):
      low, high = linearised[id(relaxation)][:2]
      adaptive = (high - relaxation.const > relaxation.const - low).astype(low.dtype)
      slopes[id(relaxation)] = jnp.broadcast_to(adaptive, (rows, *low.shape))
  return slopes


def _all_slopes(affine: _Affine, rows: int, linearised: dict) -> tuple[dict, dict]:
  """Slopes of the final backward pass (rows spec rows) and of every intermediate one, chunked as `_neuron_bounds`
  takes them: {id(bounded relaxation): {id(relu before it): [chunks, 2 chunk, B, *relu shape]}}."""
  inner = {}
  for relaxation in _bounded(affine):
    chunk, count = _chunking(relaxation.pre)
    start = _initial_slopes(relaxation.pre, 2 * chunk, linearised)
    inner[id(relaxation)] = {key: jnp.broadcast_to(s, (count, *s.shape)) for key, s in start.items()}
  return _initial_slopes(affine, rows, linearised), inner


def _optimised_lower(affine: _Affine, spec: Array, linearised: dict, steps: int, learning_rate: float) -> Array:
  """alpha-CROWN's lower bound of spec . f. The lower slopes of the unstable relus (max with a constant), one per
  neuron and row of every backward pass (the spec's and each intermediate layer's: intermediate bounds are
  recomputed with their own slopes), start at CROWN's adaptive choice and climb sum(lb) by Adam (learning rate
  decayed by 0.98 a step) projected on [0, 1]; the best bound of any step is kept (auto_LiRPA's defaults)."""

  def bound(slopes):
    final, inner = slopes
    return _spec_backward(affine, spec, _crown_linearised(affine, "adaptive", inner), final)

  optimizer = optax.adam(optax.exponential_decay(learning_rate, 1, 0.98))
  project = lambda tree: jax.tree.map(lambda s: jnp.clip(s, 0.0, 1.0), tree)

  def step(carry, _):
    slopes, state, best = carry
    grads = jax.grad(lambda s: -jnp.sum(bound(s)))(slopes)
    updates, state = optimizer.update(grads, state)
    slopes = project(optax.apply_updates(slopes, updates))
    return (slopes, state, jnp.maximum(best, bound(slopes))), None

  slopes = _all_slopes(affine, spec.shape[1], linearised)
  start = _spec_backward(affine, spec, linearised)
  (_, _, best), _ = lax.scan(step, (slopes, optimizer.init(slopes), start), None, length=steps)
  return best


def alpha_crown(
  f: Callable[[Array], Array],
  lower: Array,
  upper: Array,
  spec: Array | None = None,
  *,
  steps: int = 20,
  learning_rate: float = 0.5,
) -> tuple[Array, Array]:
  """alpha-CROWN (Xu et al. 2021): CROWN whose relu lower slopes are optimised per spec row and neuron (optax Adam,
  projected gradient on [0, 1]); never looser than `crown` (its start), for verification rather than training.

  Args:
    f, lower, upper, spec: as `crown`.
    steps: gradient steps (auto_LiRPA's default 20); learning_rate: Adam's, decayed by 0.98 a step.

  Returns:
    (lb, ub), [B, m] or [B, K]; each end optimised separately.
  """
  _check_spec(spec, lower)
  value = _propagate(f, lower, upper)
  affine, spec = _output_affine(value), _default_spec(value, lower, spec)
  linearised = _crown_linearised(affine, "adaptive")
  lower_bound = _optimised_lower(affine, spec, linearised, steps, learning_rate)
  return lower_bound, -_optimised_lower(affine, -spec, linearised, steps, learning_rate)


# ----------------------------------------------------------------------------------------------------------
# Symbolic intervals.


def _chain(affine: _Affine) -> list[tuple[_Affine, _Relaxation | None]]:
  """Segments from the output back to the input: (affine map, the relaxation whose output it reads, or None at the
  input). Relaxations: relu and max / min with a constant (relu6, clip), rounding to a narrower float format."""
  segments = []
  while True:
    if len(affine.bases) > 1:
      raise NotImplementedError(
        f"bounds: symbolic_interval needs a chain of affine maps and elementwise relaxations from the input; "
        f"found {affine.join!r} joining {len(affine.bases)} branches"
      )
    origin = affine.bases[0].origin
    if origin == "input":
      return segments + [(affine, None)]
    if not isinstance(origin, _Relaxation):
      raise NotImplementedError(
        f"bounds: symbolic_interval needs a chain of affine maps and elementwise relaxations (relu, max / min with "
        f"a constant, rounding) from the input; found the op {origin!r} on the path"
      )
    segments.append((affine, origin))
    affine = origin.pre


def _one_hot_generators(scale: Array) -> Array:
  """[n, B, *shape] generators, generator i scaling unit vector i by scale[b, i] (scale [B, *shape])."""
  n = int(np.prod(scale.shape[1:]))
  return jnp.eye(n, dtype=scale.dtype).reshape(n, 1, *scale.shape[1:]) * scale[None]


def _concretise(center: Array, generators: Array) -> tuple[Array, Array]:
  radius = jnp.sum(jnp.abs(generators), axis=0)
  return center - radius, center + radius


def _symbolic_relaxation(relaxation: _Relaxation, center, generators, lower, upper):
  """g(z) in d z + o -/+ e on [lower, upper] (for relu Neurify's d = u/(u-l), o = e = u(-l)/(2(u-l)) where
  unstable): the generators scale by d and each neuron gets an error generator e."""
  slope, offset, error = relaxation.parallel(lower, upper)
  generators = jnp.concatenate([generators * slope[None], _one_hot_generators(error)], axis=0)
  return center * slope + offset, generators


def symbolic_interval(
  f: Callable[[Array], Array], lower: Array, upper: Array, spec: Array | None = None, *, intersect_ibp: bool = False
) -> tuple[Array, Array]:
  """Symbolic interval analysis (the reference's `sym_interval_analyze`, method "sym", proj=None).

  Each neuron is c + sum_i g_i eps_i with eps_i in [-1, 1]: one generator per input coordinate (radius r_i)
  and one per unstable ReLU met so far; bounds are c -/+ sum_i |g_i| at every layer.

  Args:
    f: pure function of x [B, ...] -> logits [B, K] that is a chain affine -> ReLU -> ... -> affine.
    lower, upper: the input box (the reference clamps x -/+ eps to the batch's min / max instead).
    spec: optional [B, m, K], applied to the symbolic output (exact: the output is linear in the generators).
    intersect_ibp: if True, each ReLU relaxes over the intersection of its symbolic and IBP bounds and the
      result is intersected with IBP's, so it is never looser than `ibp` (the plain method can be looser:
      its relaxed ReLU output is not clipped at 0).

  Returns:
    (lb, ub), [B, m] or [B, K]. Memory: B * (n_inputs + sum of ReLU widths) * (widest layer) floats.
  """
  _check_spec(spec, lower)
  value = _propagate(f, lower, upper)
  segments = _chain(_output_affine(value))[::-1]
  center = _midpoint(segments[0][0].bases[0])
  generators = _one_hot_generators((upper - lower) / 2)
  for index, (affine, _) in enumerate(segments):
    center = affine.linear(center) + affine.offset
    generators = jax.vmap(affine.linear)(generators)
    if index + 1 < len(segments):
      relaxation = segments[index + 1][1]
      low, high = _concretise(center, generators)
      if intersect_ibp:
        low, high = jnp.maximum(low, relaxation.lower), jnp.minimum(high, relaxation.upper)
      center, generators = _symbolic_relaxation(relaxation, center, generators, low, high)
  if spec is not None:
    center = jnp.einsum("bmc,bc->bm", spec, center)
    generators = jnp.einsum("bmc,sbc->sbm", spec, generators)
  low, high = _concretise(center, generators)
  if intersect_ibp:
    ibp_low, ibp_high = _ibp_result(value, spec)
    low, high = jnp.maximum(low, ibp_low), jnp.minimum(high, ibp_high)
  return _sure(low, high)


# ----------------------------------------------------------------------------------------------------------
# Verified accuracy.


METHODS = {
  "ibp": ibp,
  "crown_ibp": crown_ibp,
  "crown": crown,
  "alpha_crown": alpha_crown,
  "symbolic": symbolic_interval,
}


def verified_correct(
  f: Callable[[Array], Array], x: Array, y: Array, *, eps: float, method: str, lower: float = 0.0, upper: float = 1.0
) -> Array:
  """Per-example verified robustness: every margin z_y - z_j is lower-bounded above 0 on the l_inf eps-ball.

  Args:
    f: pure logits function (BN in eval mode).
    x: [B, H, W, C] inputs; y: int [B] labels.
    eps: l_inf radius, in x's units.
    method: a key of METHODS ("ibp", "crown_ibp", "crown", "alpha_crown", "symbolic").
    lower, upper: the data range the ball is clipped to.

  Returns:
    bool [B]; True means no x' in the clipped ball is classified other than y (so f(x) is correct too).
  """
  if method not in METHODS:
    raise ValueError(f"unknown bound method {method!r}; valid: {sorted(METHODS)}")
  num_classes = jax.eval_shape(f, x).shape[-1]
  low, high = jnp.clip(x - eps, lower, upper), jnp.clip(x + eps, lower, upper)
  margins, _ = METHODS[method](f, low, high, margin_spec(y, num_classes))
  return jnp.all(margins > 0, axis=-1)
