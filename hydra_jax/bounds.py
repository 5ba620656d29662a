"""Verified bounds of a pure logits function over an l_inf input box: IBP, CROWN-IBP, symbolic intervals.

All three take `f(x) -> logits`, a pure function of a batch `[B, H, W, C]` (e.g. a zoo model applied with
masked params and BatchNorm in eval mode), the box `lower <= x <= upper` (same shape; the caller clips it to
the data range) and an optional specification `spec [B, m, classes]`, and return `(lb, ub)` with
`lb <= f(x) <= ub` for every x in the box: `[B, classes]` without spec, else bounds of
`einsum('bmc,bc->bm', spec, f(x))` (margins `e_y - e_j` from `margin_spec` give verified robustness).
`f` must treat the examples of the batch independently (true of every model in eval mode).

How: `f` is traced to a jaxpr and interpreted with one rule per primitive (jax_verify's approach):
- IBP (Gowal et al. 2018, eqs. 6-7): affine ops map (center, radius) to (W c + b, |W| r): conv, dot_general,
  add/sub, mul/div by constants (so BN in eval mode), reduce_sum, reduce_window_sum (average pooling), reshape,
  transpose, broadcast, slice, concatenate, pad, convert_element_type between floats. Monotone ops map (l, u)
  to (g(l), g(u)): max/min (relu arrives as `custom_jvp_call(max(x, 0))`), max pooling, casts to integers,
  exp, tanh, ...; rsqrt maps to (g(u), g(l)). The sub-jaxprs of call-like primitives (an explicit list,
  `_CALLS`: jit, closed_call, custom_jvp / custom_vjp calls, checkpoint, shard_map on replicated values) are
  recursed into; `scan` (what fori_loop with static bounds, lax.scan, lax.map and nn.scan lower to) is
  unrolled over its static length, xs sliced per step; equations that do not depend on x are evaluated. Any
  other primitive with an x-dependent operand (while, cond, ...) raises NotImplementedError naming it.
  Consecutive affine ops are kept as one affine map of the last box, so the spec is merged into the whole
  last affine segment (`|C W| r`, not `|C| |W| r`), as the reference merges it into the last linear layer.
- CROWN-IBP (Zhang et al. 2020, eq. 5): IBP pre-activation bounds, then a CROWN backward pass (Zhang et al.
  2018, Thm. 3.2) from the spec through the ReLU relaxations: upper line u/(u-l) (z - l); lower slope 1 if
  u > -l else 0 (the reference's adaptive choice, `lower_slope="adaptive"`) or always 0 (`"zero"`),
  concretised over the box as A c -/+ |A| r.
- Symbolic intervals (Wang et al. 2018, "Efficient formal safety analysis", the MixTrain "sym" method): every
  neuron is kept as a linear function of the input plus one error term per relaxed ReLU (Neurify's
  relaxation: slope u/(u-l), offset and error u(-l)/(2(u-l))), concretised at each layer.
CROWN-IBP and symbolic intervals need a chain input -> affine -> ReLU -> affine -> ... -> affine (the zoo's cnn
models and any other such net, whatever its linear ops); other graphs raise NotImplementedError naming the op.

Differences from the reference (`crown/bound_layers.py`, `symbolic_interval/`): the box is the caller's (the
reference clamps x -/+ eps to the batch's min/max); symbolic generators are dense, so memory grows as
B * (n_inputs + sum of ReLU widths) * layer width (the reference stores only unstable neurons' error rows).

Usage:

  f = lambda x: model.apply(variables, x, train=False)
  lo, hi = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
  lb, ub = bounds.ibp(f, lo, hi)                                   # [B, classes]
  lb, _ = bounds.crown_ibp(f, lo, hi, bounds.margin_spec(y, 10))   # [B, 9] margins z_y - z_j
  ok = bounds.verified_correct(f, x, y, eps=2 / 255, method="symbolic")   # bool [B]
"""

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend  # jax.extend.core.Literal
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Fn = Callable[[Array], Array]
LOWER_SLOPES = ("adaptive", "zero")


# ----------------------------------------------------------------------------------------------------------
# Abstract values: a constant (an Array, independent of x), a _Box, or an _Affine map of a _Box.


@dataclasses.dataclass(frozen=True, eq=False)
class _Relu:
  """A ReLU on `pre` with pre-activation IBP bounds [lower, upper]."""

  pre: "_Affine"
  lower: Array
  upper: Array


@dataclasses.dataclass(frozen=True, eq=False)
class _Box:
  """lower <= v <= upper. origin: "input", the _Relu that made it, or the name of the op that concretised it."""

  lower: Array
  upper: Array
  origin: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Affine:
  """v = linear(h) + offset for h in `base`; IBP's center / radius of v are computed eagerly (cheap)."""

  base: _Box
  linear: Fn
  center: Array
  radius: Array

  def box(self, origin: Any) -> _Box:
    return _Box(self.center - self.radius, self.center + self.radius, origin)

  def offset(self) -> Array:
    return self.center - self.linear(_midpoint(self.base))


def _midpoint(box: _Box) -> Array:
  return (box.lower + box.upper) / 2


def _is_bound(value: Any) -> bool:
  return isinstance(value, (_Box, _Affine))


def _as_affine(value: _Box | _Affine) -> _Affine:
  if isinstance(value, _Affine):
    return value
  return _Affine(value, lambda h: h, _midpoint(value), (value.upper - value.lower) / 2)


def _as_box(value: _Box | _Affine, origin: str) -> _Box:
  return value if isinstance(value, _Box) else value.box(origin)


def _fit(x: Array, shape: tuple[int, ...]) -> Array:
  return x if x.shape == tuple(shape) else jnp.broadcast_to(x, shape)


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
  "convert_element_type",
  "copy",
  "copy_p",
  "reduce_window_sum",
  "cumsum",
  "reduce_precision",
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
  center, radius = _fit(center, shape), _fit(radius, shape)
  bases = {id(a.base): a.base for a in affines if a}
  if len(bases) > 1:
    return _Box(center - radius, center + radius, prim.name)

  def linear(h):
    parts = [a.linear(h) if a else jnp.zeros_like(v) for a, v in zip(affines, values)]
    return _fit(prim.bind(*parts, **params), shape)

  return _Affine(next(iter(bases.values())), linear, center, radius)


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
  return _Affine(a.base, lambda h: apply(a.linear(h), values), apply(a.center, values), apply(a.radius, magnitudes))


def _neg_rule(value: _Box | _Affine) -> _Affine:
  a = _as_affine(value)
  return _Affine(a.base, lambda h: -a.linear(h), -a.center, a.radius)


def _is_zero(value: Any) -> bool:
  try:
    return bool(np.all(np.asarray(value) == 0))
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def _monotone_rule(prim, params, values, increasing: bool) -> _Box:
  """Elementwise / window ops monotone in every operand: bounds from the operands' bounds (IBP eq. 7)."""
  boxes = [_as_box(v, prim.name) if _is_bound(v) else None for v in values]
  lows = [b.lower if b else v for b, v in zip(boxes, values)]
  highs = [b.upper if b else v for b, v in zip(boxes, values)]
  low, high = prim.bind(*lows, **params), prim.bind(*highs, **params)
  if not increasing:
    low, high = high, low
  bound = [i for i, box in enumerate(boxes) if box]
  if prim.name == "max" and len(values) == 2 and len(bound) == 1 and _is_zero(values[1 - bound[0]]):
    pre = _as_affine(values[bound[0]])
    return _Box(low, high, _Relu(pre, boxes[bound[0]].lower, boxes[bound[0]].upper))
  return _Box(low, high, prim.name)


def _cast_to_integer_rule(prim, params, values) -> _Box:
  """A cast to an integer type truncates toward zero: not linear (int(c) -/+ int(r) misses x = 0.5 in
  [0.4, 1.6]) but nondecreasing. A cast to bool (x != 0) is neither."""
  if params["new_dtype"] == jnp.bool_:
    raise NotImplementedError("bounds: primitive 'convert_element_type' to bool with an x-dependent operand")
  return _monotone_rule(prim, params, values, increasing=True)


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


def _apply_rule(eqn, values) -> list:
  """Abstract value(s) of one equation's outputs given its inputs' (at least one x-dependent)."""
  prim, name = eqn.primitive, eqn.primitive.name
  if name in _CALLS:
    return _call_rule(eqn, values)
  if name == "scan":
    return _scan_rule(eqn, values)
  shape = eqn.outvars[0].aval.shape
  if name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
    return [_cast_to_integer_rule(prim, eqn.params, values)]
  if name in _LINEAR:
    return [_linear_rule(prim, eqn.params, values, shape)]
  if name in _SCALED:
    return [_scaled_rule(prim, eqn.params, values, shape)]
  if name == "neg":
    return [_neg_rule(values[0])]
  if name in _INCREASING or name in _DECREASING:
    return [_monotone_rule(prim, eqn.params, values, name in _INCREASING)]
  raise NotImplementedError(f"bounds: no rule for primitive {name!r} with an x-dependent operand")


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
  return _interpret(closed.jaxpr, closed.consts, [_Box(lower, upper, "input")])[0]


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


def _spec_rows(linear: Fn, point: Array, spec: Array) -> Array:
  """Rows of spec o linear: [B, m, *point.shape[1:]] (vector-Jacobian products; linear acts per example)."""
  _, pullback = jax.vjp(linear, point)
  return jax.vmap(lambda row: pullback(row)[0], in_axes=1, out_axes=1)(spec)


def _dot(a: Array, b: Array) -> Array:
  """Sum over the non-batch axes of a [B, m, ...] and b [B, ...] -> [B, m]."""
  return jnp.sum(a * b[:, None], axis=tuple(range(2, a.ndim)))


def _ibp_result(value: Any, spec: Array | None) -> tuple[Array, Array]:
  """IBP bounds of the (spec-merged) output."""
  if not _is_bound(value):
    value = jnp.asarray(value)
    return (value, value) if spec is None else (jnp.einsum("bmc,bc->bm", spec, value),) * 2
  if spec is None:
    box = _as_box(value, "output")
    return box.lower, box.upper
  a = _as_affine(value)
  center = jnp.einsum("bmc,bc->bm", spec, a.center)
  rows = _spec_rows(a.linear, _midpoint(a.base), spec)
  radius = _dot(jnp.abs(rows), (a.base.upper - a.base.lower) / 2)
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
# Chains for CROWN-IBP and symbolic intervals.


def _chain(value: Any) -> list[tuple[_Affine, _Relu | None]]:
  """Segments from the output back to the input: (affine map, ReLU whose output it reads or None at the input)."""
  if not _is_bound(value):
    raise NotImplementedError("bounds: f does not depend on x")
  segments, affine = [], _as_affine(value)
  while True:
    origin = affine.base.origin
    if origin == "input":
      return segments + [(affine, None)]
    if not isinstance(origin, _Relu):
      raise NotImplementedError(
        f"bounds: crown_ibp / symbolic_interval need a chain of affine maps and ReLUs "
        f"from the input; found the op {origin!r} on the path"
      )
    segments.append((affine, origin))
    affine = origin.pre


def _relu_lines(lower: Array, upper: Array) -> tuple[Array, Array, Array]:
  """Upper line slope d_u and intercept b_u of relu on [l, u], and the unstable mask (l < 0 < u)."""
  unstable = (lower < 0) & (upper > 0)
  slope = jnp.where(unstable, upper / jnp.where(unstable, upper - lower, 1.0), (lower >= 0).astype(lower.dtype))
  return slope, jnp.where(unstable, -lower * slope, 0.0), unstable


def _affine_backward(affine: _Affine, rows: Array, bias: Array) -> tuple[Array, Array]:
  """rows . (L h + offset) = (rows o L) . h + rows . offset, for the segment's affine map of h."""
  point = _midpoint(affine.base)
  new_rows = _spec_rows(affine.linear, point, rows)
  return new_rows, bias + _dot(rows, affine.center) - _dot(new_rows, point)


def _relu_backward(relu: _Relu, rows: Array, bias: Array, lower_slope: str) -> tuple[Array, Array]:
  """Lower linear bound of rows . relu(z): upper line where the coefficient is negative, lower line elsewhere."""
  slope_up, intercept_up, unstable = _relu_lines(relu.lower, relu.upper)
  adaptive = (relu.upper > -relu.lower).astype(rows.dtype)
  slope_low = jnp.where(unstable, adaptive if lower_slope == "adaptive" else 0.0, slope_up)
  positive, negative = jnp.maximum(rows, 0), jnp.minimum(rows, 0)
  return positive * slope_low[:, None] + negative * slope_up[:, None], bias + _dot(negative, intercept_up)


def _crown_lower(segments, spec: Array, lower_slope: str) -> Array:
  """CROWN lower bound of spec @ f over the input box, using each ReLU's IBP pre-activation bounds."""
  rows, bias = spec, jnp.zeros(spec.shape[:2], spec.dtype)
  for affine, relu in segments:
    rows, bias = _affine_backward(affine, rows, bias)
    if relu is not None:
      rows, bias = _relu_backward(relu, rows, bias, lower_slope)
  box = segments[-1][0].base
  return bias + _dot(rows, _midpoint(box)) - _dot(jnp.abs(rows), (box.upper - box.lower) / 2)


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
    f: pure function of x [B, ...] -> logits [B, K] that is a chain affine -> ReLU -> ... -> affine.
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
  segments, spec = _chain(value), _default_spec(value, lower, spec)
  return _crown_lower(segments, spec, lower_slope), -_crown_lower(segments, -spec, lower_slope)


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
  return _ibp_result(value, spec)[0], _crown_lower(_chain(value), spec, lower_slope)


# ----------------------------------------------------------------------------------------------------------
# Symbolic intervals.


def _one_hot_generators(scale: Array) -> Array:
  """[n, B, *shape] generators, generator i scaling unit vector i by scale[b, i] (scale [B, *shape])."""
  n = int(np.prod(scale.shape[1:]))
  return jnp.eye(n, dtype=scale.dtype).reshape(n, 1, *scale.shape[1:]) * scale[None]


def _concretise(center: Array, generators: Array) -> tuple[Array, Array]:
  radius = jnp.sum(jnp.abs(generators), axis=0)
  return center - radius, center + radius


def _symbolic_relu(center, generators, lower, upper):
  """Neurify's relaxation: relu(z) in d z + e -/+ e, d = u/(u-l), e = u(-l)/(2(u-l)) on unstable neurons."""
  slope, intercept, unstable = _relu_lines(lower, upper)
  error = jnp.where(unstable, intercept / 2, 0.0)
  generators = jnp.concatenate([generators * slope[None], _one_hot_generators(error)], axis=0)
  return center * slope + error, generators


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
  segments = _chain(value)[::-1]
  center = _midpoint(segments[0][0].base)
  generators = _one_hot_generators((upper - lower) / 2)
  for index, (affine, _) in enumerate(segments):
    center = affine.linear(center) + affine.offset()
    generators = jax.vmap(affine.linear)(generators)
    if index + 1 < len(segments):
      relu = segments[index + 1][1]
      low, high = _concretise(center, generators)
      if intersect_ibp:
        low, high = jnp.maximum(low, relu.lower), jnp.minimum(high, relu.upper)
      center, generators = _symbolic_relu(center, generators, low, high)
  if spec is not None:
    center = jnp.einsum("bmc,bc->bm", spec, center)
    generators = jnp.einsum("bmc,sbc->sbm", spec, generators)
  low, high = _concretise(center, generators)
  if intersect_ibp:
    ibp_low, ibp_high = _ibp_result(value, spec)
    low, high = jnp.maximum(low, ibp_low), jnp.minimum(high, ibp_high)
  return low, high


# ----------------------------------------------------------------------------------------------------------
# Verified accuracy.


METHODS = {"ibp": ibp, "crown_ibp": crown_ibp, "symbolic": symbolic_interval}


def verified_correct(
  f: Callable[[Array], Array], x: Array, y: Array, *, eps: float, method: str, lower: float = 0.0, upper: float = 1.0
) -> Array:
  """Per-example verified robustness: every margin z_y - z_j is lower-bounded above 0 on the l_inf eps-ball.

  Args:
    f: pure logits function (BN in eval mode).
    x: [B, H, W, C] inputs; y: int [B] labels.
    eps: l_inf radius, in x's units.
    method: "ibp", "crown_ibp" or "symbolic".
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
