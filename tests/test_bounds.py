"""Tests of hydra_jax.bounds: exact values on hand-sized nets, soundness on every zoo model, the tightness
orderings that are theorems, agreement with a PyTorch re-statement of the reference, masked == exported."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import attacks
from hydra_jax import bounds
from hydra_jax import masking
from hydra_jax import models
from hydra_jax.models import layers
from tests import robust_helpers as helpers
from tests import zoo_helpers

FAST_MODELS = ("cnn_tiny", "resnet_tiny")  # a chain; BN and residual adds (the others: pooling, concat, slices)
TINY_MODELS = [
  name if name in FAST_MODELS else pytest.param(name, marks=pytest.mark.slow)
  for name in models.model_names()
  if name.endswith("_tiny") and models.is_zoo(name)  # the ViT's IBP is refused (tests/test_vit.py)
]


@functools.cache
def _jitted(name, method, **options):
  """jit of (variables, lower, upper, spec) -> method(zoo model `name` in eval mode, ...): compiled once per test
  session and shape, shared by the tests."""
  model = models.get_model(name, 10)

  def bound(variables, lower, upper, spec):
    return method(lambda x: model.apply(variables, x, train=False), lower, upper, spec, **options)

  return jax.jit(bound)


def _dense_net(*layers):
  """f(x) = affine_L(relu(... relu(affine_1(x)))) on x [B, n] from [(W, b), ...] numpy arrays."""

  def f(x):
    for index, (w, b) in enumerate(layers):
      x = x @ jnp.asarray(w) + jnp.asarray(b)
      x = jax.nn.relu(x) if index + 1 < len(layers) else x
    return x

  return f


def _box(rng, batch, shape, eps):
  x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
  return x, jnp.asarray(np.clip(x - eps, 0, 1)), jnp.asarray(np.clip(x + eps, 0, 1))


def _inside(values, lb, ub, tol=1e-4):
  scale = 1 + np.abs(np.asarray(values))
  return bool(np.all(values >= lb - tol * scale) and np.all(values <= ub + tol * scale))


def _samples(lower, upper, key, n=16):
  """n uniform points and n corners of the box [lower, upper]: [n, B, ...] each."""
  k1, k2 = jax.random.split(key)
  uniform = jax.random.uniform(k1, (n, *lower.shape))
  corner = jax.random.bernoulli(k2, 0.5, (n, *lower.shape))
  return jnp.concatenate([lower + (upper - lower) * uniform, jnp.where(corner, upper, lower)])


# ----------------------------------------------------------------------------------------------------------
# Exact values.


def test_margin_spec_rows_are_e_y_minus_e_j():
  spec = np.asarray(bounds.margin_spec(jnp.array([0, 2]), 3))
  np.testing.assert_array_equal(spec[0], [[1, -1, 0], [1, 0, -1]])
  np.testing.assert_array_equal(spec[1], [[-1, 0, 1], [0, -1, 1]])


def test_affine_layer_ibp_is_the_exact_interval_with_and_without_spec():
  rng = np.random.default_rng(0)
  w, b = rng.normal(size=(5, 4)), rng.normal(size=4)
  _, lo, hi = _box(rng, 3, (5,), 0.3)
  f = _dense_net((w, b))
  lb, ub = bounds.ibp(f, lo, hi)
  # Exact range of x @ w + b over the box: each coordinate at the end that minimises / maximises w_ij x_i.
  lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  exact_lb = np.minimum(lo64[:, :, None] * w, hi64[:, :, None] * w).sum(1) + b
  exact_ub = np.maximum(lo64[:, :, None] * w, hi64[:, :, None] * w).sum(1) + b
  np.testing.assert_allclose(lb, exact_lb, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ub, exact_ub, rtol=1e-5, atol=1e-5)
  # With a margin spec the merged layer C W is again one affine map: its exact range, tighter than |C| |W| r.
  y = np.array([0, 3, 1])
  spec = np.asarray(bounds.margin_spec(jnp.asarray(y), 4), np.float64)
  cw = np.einsum("bmc,ic->bmi", spec, w)
  exact = np.minimum(lo64[:, None] * cw, hi64[:, None] * cw).sum(-1) + spec @ b
  spec_lb, _ = bounds.ibp(f, lo, hi, jnp.asarray(spec, jnp.float32))
  np.testing.assert_allclose(spec_lb, exact, rtol=1e-5, atol=1e-5)
  unmerged = np.einsum("bmc,bc->bm", np.maximum(spec, 0), exact_lb) + np.einsum(
    "bmc,bc->bm", np.minimum(spec, 0), exact_ub
  )
  assert np.all(spec_lb > unmerged + 1e-3)


def test_two_layer_relu_net_matches_hand_interval_arithmetic_and_contains_a_grid():
  rng = np.random.default_rng(1)
  w1, b1, w2, b2 = rng.normal(size=(2, 3)), rng.normal(size=3), rng.normal(size=(3, 2)), rng.normal(size=2)
  lo, hi = np.array([[-0.5, 0.2]]), np.array([[0.4, 0.9]])
  f = _dense_net((w1, b1), (w2, b2))
  lb, ub = bounds.ibp(f, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
  # Interval arithmetic by hand: [l, u] -> W: c W + b -/+ r |W|, then relu on both ends, then the last layer.
  c, r = (lo + hi) / 2, (hi - lo) / 2
  h_lo, h_hi = np.maximum(c @ w1 + b1 - r @ np.abs(w1), 0), np.maximum(c @ w1 + b1 + r @ np.abs(w1), 0)
  c, r = (h_lo + h_hi) / 2, (h_hi - h_lo) / 2
  np.testing.assert_allclose(lb, c @ w2 + b2 - r @ np.abs(w2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ub, c @ w2 + b2 + r @ np.abs(w2), rtol=1e-5, atol=1e-5)
  grid = np.stack(np.meshgrid(np.linspace(lo[0, 0], hi[0, 0], 41), np.linspace(lo[0, 1], hi[0, 1], 41)), -1)
  values = np.asarray(f(jnp.asarray(grid.reshape(-1, 2), jnp.float32)))
  for method in (bounds.ibp, bounds.crown_ibp, bounds.symbolic_interval):
    low, high = method(f, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
    assert np.all(values >= np.asarray(low) - 1e-5) and np.all(values <= np.asarray(high) + 1e-5), method


def test_one_unstable_relu_by_hand_each_method_and_where_each_is_looser():
  """z = x in [-1, 2], h = relu(z); out = (h, -h). Hand values of every method (see the docstrings' formulas)."""
  f = _dense_net((np.ones((1, 1)), np.zeros(1)), (np.array([[1.0, -1.0]]), np.zeros(2)))
  lo, hi = jnp.array([[-1.0]]), jnp.array([[2.0]])
  np.testing.assert_allclose(np.stack(bounds.ibp(f, lo, hi)), [[[0, -2]], [[2, 0]]], atol=1e-6)
  # CROWN, adaptive slope: u = 2 > -l = 1 gives lower line h >= z, so lb(h) = -1 (looser than IBP's 0);
  # upper line 2/3 (z + 1): ub(h) = 2 = -lb(-h); ub(-h) = -lb(h) = 1. The zero slope gives IBP's values here.
  np.testing.assert_allclose(np.stack(bounds.crown_ibp(f, lo, hi)), [[[-1, -2]], [[2, 1]]], atol=1e-6)
  np.testing.assert_allclose(
    np.stack(bounds.crown_ibp(f, lo, hi, lower_slope="zero")), [[[0, -2]], [[2, 0]]], atol=1e-6
  )
  # Symbolic: h = 2/3 z + 1/3 -/+ 1/3 with z = 1/2 + 3/2 eps: h in [-2/3, 2], -h in [-2, 2/3].
  np.testing.assert_allclose(np.stack(bounds.symbolic_interval(f, lo, hi)), [[[-2 / 3, -2]], [[2, 2 / 3]]], atol=1e-6)
  np.testing.assert_allclose(
    np.stack(bounds.symbolic_interval(f, lo, hi, intersect_ibp=True)), [[[0, -2]], [[2, 0]]], atol=1e-6
  )


# ----------------------------------------------------------------------------------------------------------
# Per-primitive rules: each op's exact interval by hand (numpy), so a bound that is too loose fails as surely as
# an unsound one (soundness and ub > lb hold for any loose bound).


def _hand_box(rng, shape, low, high):
  """A box [l, u] with l < u in [low, high], on a 1/64 grid (exact in float16 too): float64 numpy arrays."""
  ends = np.sort(np.round(rng.uniform(low, high, (2, *shape)) * 64) / 64, axis=0)
  ends[1] += (ends[1] == ends[0]) / 64
  return ends[0], ends[1]


def _ibp_np(f, lo, hi):
  return tuple(
    np.asarray(v, np.float64) for v in bounds.ibp(f, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
  )


def _primitives(f, x):
  """Names of the primitives in f's jaxpr, sub-jaxprs included (to show a test reaches the rule it names)."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn.primitive.name
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  return set(walk(jax.make_jaxpr(f)(jnp.asarray(x, jnp.float32)).jaxpr))


def _relu_residual(w, b):
  """f(x) = relu(x @ W + b) + x on x [B, n] (W [n, n]): a residual addition of two differently based boxes."""
  return lambda x: jax.nn.relu(x @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)) + x


def test_residual_relu_plus_input_ibp_is_the_exact_sum_of_the_two_intervals():
  """IBP of relu(W x + b) + x: [relu(c W + b - r |W|) + l, relu(c W + b + r |W|) + u], exact (a too-wide add
  rule, e.g. center -/+ (3 radius + 1), fails here although it stays sound)."""
  rng = np.random.default_rng(11)
  w, b = rng.normal(size=(4, 4)), rng.normal(size=4) * 0.3
  lo, hi = _hand_box(rng, (3, 4), -1, 1)
  c, r = (lo + hi) / 2, (hi - lo) / 2
  pre_lo, pre_hi = c @ w + b - r @ np.abs(w), c @ w + b + r @ np.abs(w)
  assert np.any(pre_lo < 0) and np.any(pre_hi > 0)  # some relus clip, so both ends are non-trivial
  lb, ub = _ibp_np(_relu_residual(w, b), lo, hi)
  np.testing.assert_allclose(lb, np.maximum(pre_lo, 0) + lo, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ub, np.maximum(pre_hi, 0) + hi, rtol=1e-5, atol=1e-5)
  # IBP adds the two intervals as if the summands were independent (both depend on x), so this may be wider
  # than f's range, but it must contain f at every point of the box.
  points = lo + (hi - lo) * rng.uniform(size=(64, *lo.shape))
  values = np.asarray(jax.vmap(_relu_residual(w, b))(jnp.asarray(points, jnp.float32)))
  assert _inside(values, lb, ub)


def test_crown_ibp_is_exact_on_all_active_and_all_inactive_relus_and_tighter_than_ibp():
  """f = relu(x W1 + b1) W2 + b2. Every relu active on the box: f is the affine map x W1 W2 + b1 W2 + b2 and
  CROWN-IBP gives its exact range (per output, each input at the end minimising / maximising its coefficient),
  which IBP (|W2| |W1| r) is looser than. Every relu inactive: f = b2 exactly, by both methods."""
  rng = np.random.default_rng(12)
  w1, w2, b2 = rng.normal(size=(3, 4)), rng.normal(size=(4, 2)), rng.normal(size=2)
  lo, hi = _hand_box(rng, (2, 3), 0, 1)
  lo32, hi32 = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  shift = np.abs(w1).sum(0) + 1  # |x W1| < shift on [0, 1]^3
  active = _dense_net((w1, shift), (w2, b2))
  coefficient, offset = w1 @ w2, shift @ w2 + b2
  exact_lb = np.minimum(lo[:, :, None] * coefficient, hi[:, :, None] * coefficient).sum(1) + offset
  exact_ub = np.maximum(lo[:, :, None] * coefficient, hi[:, :, None] * coefficient).sum(1) + offset
  ibp_lb, ibp_ub = bounds.ibp(active, lo32, hi32)
  assert np.all(np.asarray(ibp_lb) < exact_lb - 1e-3) and np.all(np.asarray(ibp_ub) > exact_ub + 1e-3)
  inactive = _dense_net((w1, -shift), (w2, b2))
  # No relu is unstable, so the lower slope (adaptive / zero) plays no part: one of each.
  crown = lambda f, slope: np.stack(jax.jit(functools.partial(bounds.crown_ibp, f, lower_slope=slope))(lo32, hi32))
  np.testing.assert_allclose(crown(active, "adaptive"), np.stack([exact_lb, exact_ub]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(crown(inactive, "zero"), np.broadcast_to(b2, (2, 2, 2)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.stack(bounds.ibp(inactive, lo32, hi32)), np.broadcast_to(b2, (2, 2, 2)), atol=1e-6)


def _windows(a, size, stride, pad_value=None, pad=0):
  """[B, H', W', C, size, size]: the size x size windows of a [B, H, W, C] at `stride` (numpy)."""
  if pad:
    a = np.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=pad_value)
  view = np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(1, 2))
  return view[:, ::stride, ::stride]


@pytest.mark.parametrize(
  "pool, expected",
  [
    # 2x2/2 max-pool (vgg): the window max of each end. 3x3/2 with padding 1 (resnet_imagenet): -inf padding.
    (lambda x: layers.max_pool(x, 2, 2), lambda a: _windows(a, 2, 2).max((-2, -1))),
    (lambda x: layers.max_pool(x, 3, 2, 1), lambda a: _windows(a, 3, 2, -np.inf, 1).max((-2, -1))),
    # Average pools (reduce_window_sum, then a division): 2x2/2 and overlapping 2x2/1 windows.
    (lambda x: nn.avg_pool(x, (2, 2), (2, 2)), lambda a: _windows(a, 2, 2).mean((-2, -1))),
    (lambda x: nn.avg_pool(x, (2, 2), (1, 1)), lambda a: _windows(a, 2, 1).mean((-2, -1))),
  ],
  ids=["max_2x2", "max_3x3_pad1", "avg_2x2", "avg_2x2_stride1"],
)
def test_pooling_bounds_are_the_pooled_ends_of_the_box(pool, expected):
  """Max and average pooling are monotone, so IBP's exact bounds are the pooled lower and upper ends."""
  lo, hi = _hand_box(np.random.default_rng(13), (2, 4, 4, 2), -1, 1)
  lb, ub = _ibp_np(pool, lo, hi)
  np.testing.assert_allclose(lb, expected(lo), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ub, expected(hi), rtol=1e-6, atol=1e-6)
  assert np.all(ub > lb)


def _lax_pad_by_hand(a, value):
  """lax.pad(x, value, [(0, 0, 0), (1, -1, 1)]) of a [B, 6] by hand: [B, 11], x at odd positions 1 .. 9 but the
  last entry cropped: positions 1, 3, .., 11 of 12 minus the final one."""
  out = np.full((a.shape[0], 12), value)
  out[:, 1::2] = a
  return out[:, :11]


# (id, primitive reached, f on x [2, 6], exact bounds (lower, upper) from the box's ends (lo, hi), box range)
_SIGNED, _POSITIVE = (-1.5, 1.5), (0.25, 3.0)
_OP_CASES = [
  ("neg", "neg", lambda x: -x, lambda lo, hi: (-hi, -lo), _SIGNED),
  (
    "min_const",
    "min",
    lambda x: jnp.minimum(x, 0.25),
    lambda lo, hi: (np.minimum(lo, 0.25), np.minimum(hi, 0.25)),
    _SIGNED,
  ),
  (
    "min_two",
    "min",
    lambda x: jnp.minimum(x[:, :3], x[:, 3:]),
    lambda lo, hi: (np.minimum(lo[:, :3], lo[:, 3:]), np.minimum(hi[:, :3], hi[:, 3:])),
    _SIGNED,
  ),
  (
    "pad",
    "pad",
    lambda x: jnp.pad(x, ((0, 0), (1, 2)), constant_values=0.5),
    lambda lo, hi: (
      np.pad(lo, ((0, 0), (1, 2)), constant_values=0.5),
      np.pad(hi, ((0, 0), (1, 2)), constant_values=0.5),
    ),
    _SIGNED,
  ),
  (
    "pad_interior_crop",
    "pad",
    lambda x: jax.lax.pad(x, -1.0, [(0, 0, 0), (1, -1, 1)]),
    lambda lo, hi: (_lax_pad_by_hand(lo, -1.0), _lax_pad_by_hand(hi, -1.0)),
    _SIGNED,
  ),
  (
    "transpose",
    "transpose",
    lambda x: jnp.transpose(x.reshape(2, 2, 3), (0, 2, 1)),
    lambda lo, hi: (lo.reshape(2, 2, 3).transpose(0, 2, 1), hi.reshape(2, 2, 3).transpose(0, 2, 1)),
    _SIGNED,
  ),
  ("squeeze", "squeeze", lambda x: jnp.squeeze(x.reshape(2, 1, 6), 1), lambda lo, hi: (lo, hi), _SIGNED),
  # lax.expand_dims lowers to broadcast_in_dim (JAX 0.10 has no expand_dims primitive).
  (
    "expand_dims",
    "broadcast_in_dim",
    lambda x: jax.lax.expand_dims(x, (1,)),
    lambda lo, hi: (lo[:, None], hi[:, None]),
    _SIGNED,
  ),
  ("rev", "rev", lambda x: jnp.flip(x, 1), lambda lo, hi: (lo[:, ::-1], hi[:, ::-1]), _SIGNED),
  ("cumsum", "cumsum", lambda x: jnp.cumsum(x, 1), lambda lo, hi: (np.cumsum(lo, 1), np.cumsum(hi, 1)), _SIGNED),
  (
    "reduce_window_sum",
    "reduce_window_sum",
    lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3), (1, 1), "VALID"),
    lambda lo, hi: (
      np.lib.stride_tricks.sliding_window_view(lo, 3, 1).sum(-1),
      np.lib.stride_tricks.sliding_window_view(hi, 3, 1).sum(-1),
    ),
    _SIGNED,
  ),
  ("to_float16", "convert_element_type", lambda x: x.astype(jnp.float16), lambda lo, hi: (lo, hi), _SIGNED),
  # A cast to an integer truncates toward zero: monotone, not linear (int(c) -/+ int(r) is unsound).
  (
    "to_int32",
    "convert_element_type",
    lambda x: x.astype(jnp.int32),
    lambda lo, hi: (np.trunc(lo), np.trunc(hi)),
    _SIGNED,
  ),
  ("reduce_max", "reduce_max", lambda x: jnp.max(x, 1), lambda lo, hi: (lo.max(1), hi.max(1)), _SIGNED),
  ("reduce_min", "reduce_min", lambda x: jnp.min(x, 1), lambda lo, hi: (lo.min(1), hi.min(1)), _SIGNED),
  ("exp", "exp", jnp.exp, lambda lo, hi: (np.exp(lo), np.exp(hi)), _SIGNED),
  ("tanh", "tanh", jnp.tanh, lambda lo, hi: (np.tanh(lo), np.tanh(hi)), _SIGNED),
  ("logistic", "logistic", jax.nn.sigmoid, lambda lo, hi: (1 / (1 + np.exp(-lo)), 1 / (1 + np.exp(-hi))), _SIGNED),
  ("sqrt", "sqrt", jnp.sqrt, lambda lo, hi: (np.sqrt(lo), np.sqrt(hi)), _POSITIVE),
  ("log", "log", jnp.log, lambda lo, hi: (np.log(lo), np.log(hi)), _POSITIVE),
  ("rsqrt", "rsqrt", jax.lax.rsqrt, lambda lo, hi: (1 / np.sqrt(hi), 1 / np.sqrt(lo)), _POSITIVE),  # decreasing
]


@pytest.mark.parametrize("name, primitive, f, expected, box", _OP_CASES, ids=[case[0] for case in _OP_CASES])
def test_each_primitive_rule_gives_the_exact_interval(name, primitive, f, expected, box):
  """IBP through one op on a box [2, 6] equals the op's exact range, written out per op: a monotone op maps
  the ends (a decreasing one swaps them), a linear re-arrangement moves them, a pad inserts its constant."""
  del name
  lo, hi = _hand_box(np.random.default_rng(14), (2, 6), *box)
  assert primitive in _primitives(f, lo)
  lb, ub = _ibp_np(f, lo, hi)
  want_lb, want_ub = expected(lo, hi)
  np.testing.assert_allclose(lb, want_lb, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ub, want_ub, rtol=1e-6, atol=1e-6)


def _hand_ibp(f, *boxes):
  """IBP (lb, ub) of f(x) for one example x = the boxes [(lower, upper), ...] concatenated (float32), as float64."""
  lo = jnp.asarray(np.concatenate([np.atleast_2d(b[0]) for b in boxes], 1), jnp.float32)
  hi = jnp.asarray(np.concatenate([np.atleast_2d(b[1]) for b in boxes], 1), jnp.float32)
  return tuple(np.asarray(v, np.float64)[0] for v in bounds.ibp(f, lo, hi))


def test_products_of_two_x_dependent_operands_give_hand_intervals():
  """square, integer_pow, mul, div and dot_general of x-dependent operands (LayerNorm, softmax, attention)."""
  np.testing.assert_allclose(_hand_ibp(jnp.square, ([-1, -3, 0.5], [2, -1, 2])), [[0, 1, 0.25], [4, 9, 4]])
  cube = lambda x: jax.lax.integer_pow(x, 3)
  np.testing.assert_allclose(_hand_ibp(cube, ([-2, 0.5], [1, 2])), [[-8, 0.125], [1, 8]])
  fourth = lambda x: jax.lax.integer_pow(x, 4)
  np.testing.assert_allclose(_hand_ibp(fourth, ([-2, -2], [1, -1])), [[0, 1], [16, 16]])
  # [-1, 2] * [3, 4] = [-4, 8]; [-2, -1] * [-3, 5] = [-10, 6] (the four corner products).
  mul = lambda x: x[:, :2] * x[:, 2:]
  np.testing.assert_allclose(_hand_ibp(mul, ([-1, -2], [2, -1]), ([3, -3], [4, 5])), [[-4, -10], [8, 6]])
  # [1, 2] / [2, 4] = [1/4, 1]; [-1, 2] / [-2, -1] = [-2, 1]; a denominator interval holding 0: unbounded.
  div = lambda x: x[:, :3] / x[:, 3:]
  lb, ub = _hand_ibp(div, ([1, -1, 1], [2, 2, 2]), ([2, -2, -1], [4, -1, 1]))
  np.testing.assert_allclose([lb[:2], ub[:2]], [[0.25, -2], [1, 1]])
  assert lb[2] == -np.inf and ub[2] == np.inf
  # a [0, 1] + b [1, 2] . [1, 1] + [-1, 1]: a + b * c over the box is exactly [0 - 2, 1 + 2] = [-2, 3].
  dot = lambda x: jnp.einsum("bi,bi->b", x[:, :2], x[:, 2:])[:, None]
  np.testing.assert_allclose(_hand_ibp(dot, ([0, 1], [1, 2]), ([1, -1], [1, 1])), [[-2], [3]])
  # 0 * inf is not NaN: an unbounded operand gives an unbounded product.
  inf_mul = lambda x: x[:, :1] * jnp.exp(x[:, 1:])
  lb, ub = _hand_ibp(inf_mul, ([-1, 0], [1, 100]))
  assert lb[0] == -np.inf and ub[0] == np.inf


_LINEAR_OP_CASES = [
  case
  for case in _OP_CASES
  if case[0]
  in {
    "neg",
    "pad",
    "pad_interior_crop",
    "transpose",
    "squeeze",
    "expand_dims",
    "rev",
    "cumsum",
    "reduce_window_sum",
  }  # not to_float16: a rounding, relaxed by CROWN with an error term (tests/test_bounds_dtypes.py)
]


@pytest.mark.parametrize(
  "name, primitive, f, expected, box", _LINEAR_OP_CASES, ids=[case[0] for case in _LINEAR_OP_CASES]
)
def test_linear_ops_stay_in_the_affine_chain_and_crown_ibp_gives_their_exact_range(name, primitive, f, expected, box):
  """A linear op is kept as an affine map of the input box, so CROWN-IBP (which needs such a chain) takes it and,
  with no ReLU, gives the exact range: the same ends as IBP's, flattened."""
  del name, primitive
  lo, hi = _hand_box(np.random.default_rng(14), (2, 6), *box)
  flat = lambda x: f(x).reshape(2, -1).astype(jnp.float32)
  lb, ub = jax.jit(functools.partial(bounds.crown_ibp, flat))(
    jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  )
  want_lb, want_ub = expected(lo, hi)
  np.testing.assert_allclose(lb, want_lb.reshape(2, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ub, want_ub.reshape(2, -1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Soundness on the zoo and tightness orderings.


@pytest.mark.parametrize("name", TINY_MODELS)
def test_zoo_model_logits_at_samples_corners_and_pgd_points_lie_in_ibp_bounds(name):
  model, x, variables = zoo_helpers.random_variables(name, batch=2, seed=3)
  f = jax.jit(lambda x: model.apply(variables, x, train=False))
  eps = float(np.random.default_rng(len(name)).uniform(1e-3, 2e-2))
  lo, hi = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
  lb, ub = _jitted(name, bounds.ibp)(variables, lo, hi, None)
  points = _samples(lo, hi, jax.random.key(1), n=4)
  x_adv = attacks.pgd(
    f, x, jnp.argmin(f(x), -1), key=jax.random.key(2), eps=eps, step_size=eps / 2, steps=2, unroll=False
  )
  logits = np.concatenate([np.asarray(jax.vmap(f)(points)), np.asarray(f(x_adv))[None]])
  assert _inside(logits, np.asarray(lb), np.asarray(ub))
  assert np.all(np.asarray(ub) > np.asarray(lb))


@pytest.mark.parametrize(
  "name, options",
  [("vgg_tiny", {"cfg": (4, "M", 4, "M"), "hidden": 8}), ("mobilenet_v2_tiny", {})],
  ids=["vgg", "mobilenet"],
)
def test_narrow_zoo_models_at_8x8_with_max_pools_and_depthwise_convs_are_soundly_bounded(name, options):
  """The default run's zoo soundness beyond cnn_tiny / resnet_tiny, cheaply: vgg (BN, 2x2 max-pools; narrowed)
  and mobilenet_v2_tiny (depthwise convs, expanded residual blocks) on 8x8 inputs (the full-size cases are in
  the slow set): logits at samples and corners of the box lie in the IBP bounds."""
  model, _, variables = zoo_helpers.random_variables(name, batch=1, seed=5, **options)
  rng = np.random.default_rng(5)
  x = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  lo, hi = np.clip(x - 0.02, 0, 1), np.clip(x + 0.02, 0, 1)
  f = lambda x: model.apply(variables, x, train=False)
  assert {"reduce_window_max", "conv_general_dilated"} & _primitives(f, x)
  lb, ub = map(np.asarray, jax.jit(functools.partial(bounds.ibp, f))(jnp.asarray(lo), jnp.asarray(hi)))
  uniform = rng.uniform(size=(8, *x.shape))
  points = np.concatenate([lo + (hi - lo) * uniform, np.where(uniform < 0.5, lo, hi)]).astype(np.float32)
  logits = np.asarray(jax.jit(f)(points.reshape(-1, 8, 8, 3))).reshape(16, 2, -1)
  assert _inside(logits, lb, ub) and np.all(ub > lb)


def _cnn_setup(seed, batch=3, eps=None):
  model, x, variables = zoo_helpers.random_variables("cnn_tiny", batch=batch, seed=seed)
  f = lambda x: model.apply(variables, x, train=False)
  eps = eps or float(np.random.default_rng(seed).uniform(2e-3, 3e-2))
  y = jnp.asarray(np.random.default_rng(seed).integers(0, 10, batch))
  return model, variables, f, x, y, jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_sequential_cnn_crown_ibp_and_symbolic_contain_samples_and_pgd_points(seed):
  _, variables, f, x, y, lo, hi = _cnn_setup(seed)
  spec = bounds.margin_spec(y, 10)
  points = jnp.concatenate(
    [
      _samples(lo, hi, jax.random.key(seed), n=8),
      attacks.pgd(
        f, x, y, key=jax.random.key(3), eps=float((hi - lo).max()) / 2, step_size=0.01, steps=5, unroll=False
      )[None],
    ]
  )
  margins = np.einsum("bmc,nbc->nbm", spec, np.asarray(jax.vmap(f)(points)))
  for method in (bounds.crown_ibp, bounds.symbolic_interval):
    assert _inside(margins, *map(np.asarray, _jitted("cnn_tiny", method)(variables, lo, hi, spec))), method


@pytest.mark.slow
def test_crown_ibp_and_symbolic_take_any_affine_chain_here_with_eval_mode_batchnorm():
  """conv -> BN (eval: a per-channel affine map) -> relu -> conv -> relu -> dense -> relu -> dense is a chain."""
  model = helpers.TinyCNN(batch_norm=True)
  variables = helpers.init_variables(model, (2, 8, 8, 1))
  rng = np.random.default_rng(8)
  variables["batch_stats"] = jax.tree.map(
    lambda v: jnp.asarray(rng.uniform(0.2, 1.5, v.shape), jnp.float32), variables["batch_stats"]
  )
  f = lambda x: model.apply(variables, x, train=False)
  x = jnp.asarray(rng.uniform(0, 1, (2, 8, 8, 1)), jnp.float32)
  lo, hi = jnp.clip(x - 0.03, 0, 1), jnp.clip(x + 0.03, 0, 1)
  spec = bounds.margin_spec(jnp.array([3, 5]), 10)
  margins = np.einsum("bmc,nbc->nbm", spec, np.asarray(jax.vmap(f)(_samples(lo, hi, jax.random.key(4), n=16))))
  ibp_lb = np.asarray(bounds.ibp(f, lo, hi, spec)[0])
  crown = jax.jit(lambda lo, hi: bounds.crown_ibp(f, lo, hi, spec, lower_slope="zero"))(lo, hi)
  symbolic = jax.jit(lambda lo, hi: bounds.symbolic_interval(f, lo, hi, spec))(lo, hi)
  assert _inside(margins, *map(np.asarray, crown)) and _inside(margins, *map(np.asarray, symbolic))
  assert np.all(np.asarray(crown[0]) >= ibp_lb - 1e-4 * (1 + np.abs(ibp_lb)))


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_zero_slope_crown_ibp_and_intersected_symbolic_are_never_looser_than_ibp(seed):
  """Theorem (by induction over the layers, with the same IBP pre-activation bounds): for a ReLU with
  coefficient a, the relaxed term's minimum over [l, u] is >= min of a h over h in [relu l, relu u] when the
  lower line has slope 0 (a >= 0) or is the upper chord (a < 0); |A B| <= |A| |B| does the rest. With the
  adaptive slope this fails (test_one_unstable_relu_by_hand...)."""
  _, variables, _, _, y, lo, hi = _cnn_setup(seed, eps=0.05)
  spec = bounds.margin_spec(y, 10)
  ibp_lb, ibp_ub = map(np.asarray, _jitted("cnn_tiny", bounds.ibp)(variables, lo, hi, spec))
  crown = _jitted("cnn_tiny", bounds.crown_ibp, lower_slope="zero")
  crown_lb, crown_ub = map(np.asarray, crown(variables, lo, hi, spec))
  symbolic = _jitted("cnn_tiny", bounds.symbolic_interval, intersect_ibp=True)
  sym_lb, sym_ub = map(np.asarray, symbolic(variables, lo, hi, spec))
  tol = 1e-4 * (1 + np.abs(ibp_lb))
  assert np.all(crown_lb >= ibp_lb - tol) and np.all(crown_ub <= ibp_ub + tol)
  assert np.all(sym_lb >= ibp_lb - tol) and np.all(sym_ub <= ibp_ub + tol)
  assert np.mean(crown_lb > ibp_lb + 1e-3) > 0.5 and np.mean(sym_lb > ibp_lb + 1e-3) > 0.5  # and usually tighter


def test_bounds_of_masked_model_equal_bounds_of_its_exported_dense_model():
  _, x, variables = zoo_helpers.random_variables("cnn_tiny", batch=3, seed=4)
  scores = masking.init_scores(variables["params"], "kaiming_normal", jax.random.key(0))
  masked = masking.apply_masks(variables["params"], scores, 0.3)
  dense = masking.export_dense(variables["params"], scores, 0.3)
  lo, hi = jnp.clip(x - 0.02, 0, 1), jnp.clip(x + 0.02, 0, 1)
  spec = bounds.margin_spec(jnp.array([1, 7, 3]), 10)
  for method in (bounds.ibp, bounds.crown_ibp, bounds.symbolic_interval):
    bound = _jitted("cnn_tiny", method)
    of_masked = bound({"params": masked}, lo, hi, spec)
    np.testing.assert_allclose(of_masked, bound({"params": dense}, lo, hi, spec), rtol=1e-6, atol=1e-6)
    assert not np.allclose(of_masked, bound(variables, lo, hi, spec), atol=1e-3)


@pytest.mark.slow  # the crown_ibp objective's training test differentiates the same bounds
def test_bounds_work_under_jit_and_grad_with_respect_to_params():
  model, variables, _, _, y, lo, hi = _cnn_setup(5)
  spec = bounds.margin_spec(y, 10)

  def loss(params):
    f = lambda x: model.apply({"params": params}, x, train=False)
    ibp_lb, crown_lb = bounds.ibp_and_crown_lower(f, lo, hi, spec)
    return jnp.sum(ibp_lb) + jnp.sum(crown_lb)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  f = lambda x: model.apply(variables, x, train=False)
  expected = jnp.sum(bounds.ibp(f, lo, hi, spec)[0]) + jnp.sum(bounds.crown_ibp(f, lo, hi, spec)[0])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)


# ----------------------------------------------------------------------------------------------------------
# Verified accuracy.


def test_verified_correct_on_a_linear_model_equals_the_closed_form_margin():
  """f(x) = x W: margin_j = (w_y - w_j) . x - eps ||w_y - w_j||_1 exactly (no clipping in play); all three
  methods are exact on an affine f."""
  rng = np.random.default_rng(6)
  w = rng.normal(size=(6, 3)).astype(np.float32)
  x = rng.uniform(0.3, 0.7, (40, 6)).astype(np.float32)
  y = rng.integers(0, 3, 40)
  eps = 0.05
  diff = w[:, y].T[:, :, None] - w[None]  # [B, 6, 3]: w_y - w_j
  margins = np.einsum("bi,bij->bj", x, diff) - eps * np.abs(diff).sum(1)
  margins[np.arange(40), y] = np.inf
  expected = margins.min(1) > 0
  assert 0 < expected.sum() < 40
  f = lambda x: x @ jnp.asarray(w)
  for method in bounds.METHODS:
    np.testing.assert_array_equal(
      bounds.verified_correct(f, jnp.asarray(x), jnp.asarray(y), eps=eps, method=method), expected
    )


# ----------------------------------------------------------------------------------------------------------
# Loops: a scan is unrolled, its xs sliced per step.

LOOP_W = jnp.asarray(np.random.default_rng(18).normal(size=(4, 4)), jnp.float32)


def _loop_step(h, w):
  return jax.nn.relu(h @ w) + 0.5


def _fori_net(x):
  """The issue's example: 3 steps of h <- relu(h @ W) + 0.5 as a fori_loop (a scan of length 3)."""
  return jax.lax.fori_loop(0, 3, lambda i, h: _loop_step(h, LOOP_W), x)


def _unrolled_net(x):
  return _loop_step(_loop_step(_loop_step(x, LOOP_W), LOOP_W), LOOP_W)


@pytest.mark.parametrize("method", [bounds.ibp, bounds.crown_ibp])
def test_fori_loop_bounds_contain_the_function_and_equal_the_unrolled_loop(method):
  x, lo, hi = _box(np.random.default_rng(0), 2, (4,), 0.01)
  lb, ub = method(_fori_net, lo, hi)
  points = jax.vmap(_fori_net)(_samples(lo, hi, jax.random.key(0)))
  assert np.all(np.asarray(lb) <= np.asarray(_fori_net(x))) and np.all(np.asarray(_fori_net(x)) <= np.asarray(ub))
  assert _inside(np.asarray(points), np.asarray(lb), np.asarray(ub))
  expected = method(_unrolled_net, lo, hi)  # the same ops without a loop: the interpreter's plain rules
  np.testing.assert_allclose(lb, expected[0], rtol=1e-6)
  np.testing.assert_allclose(ub, expected[1], rtol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", [bounds.ibp, bounds.crown_ibp])
def test_scan_over_stacked_weights_bounds_equal_the_unrolled_loop(method, reverse):
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 4)), jnp.float32)
  offsets = jnp.asarray([0.0, 0.5, -0.25], jnp.float32)  # a second xs, and a ys output that is dropped

  def scanned(x):
    step = lambda h, wb: (_loop_step(h, wb[0]) + wb[1], h.sum())
    return jax.lax.scan(step, x, (weights, offsets), reverse=reverse)[0]

  def unrolled(x):
    for t in reversed(range(3)) if reverse else range(3):
      x = _loop_step(x, weights[t]) + offsets[t]
    return x

  x, lo, hi = _box(np.random.default_rng(2), 2, (4,), 0.02)
  lb, ub = method(scanned, lo, hi)
  expected = method(unrolled, lo, hi)
  np.testing.assert_allclose(lb, expected[0], rtol=1e-6)
  np.testing.assert_allclose(ub, expected[1], rtol=1e-6)
  assert _inside(np.asarray(jax.vmap(scanned)(_samples(lo, hi, jax.random.key(1)))), np.asarray(lb), np.asarray(ub))


def test_scan_outputs_stacked_over_steps_are_bounded_per_step():
  def f(x):  # ys: the state after each step, [3, B, 4] -> [B, 12]
    ys = jax.lax.scan(lambda h, _: (_loop_step(h, LOOP_W),) * 2, x, None, length=3)[1]
    return jnp.transpose(ys, (1, 0, 2)).reshape(x.shape[0], -1)

  x, lo, hi = _box(np.random.default_rng(3), 2, (4,), 0.01)
  lb, ub = bounds.ibp(f, lo, hi)
  h1 = _loop_step(x, LOOP_W)
  steps = [
    bounds.ibp(lambda x, n=n: functools.reduce(lambda h, _: _loop_step(h, LOOP_W), range(n), x), lo, hi)
    for n in (1, 2, 3)
  ]
  np.testing.assert_allclose(lb, np.concatenate([s[0] for s in steps], axis=1), rtol=1e-6)
  np.testing.assert_allclose(ub, np.concatenate([s[1] for s in steps], axis=1), rtol=1e-6)
  assert np.all(np.asarray(lb[:, :4]) <= np.asarray(h1))


@pytest.mark.devices(2)
def test_loops_and_primitives_without_a_rule_raise_errors_naming_them():
  lo, hi = jnp.zeros((1, 3)), jnp.ones((1, 3))
  with pytest.raises(NotImplementedError, match="'while'"):
    bounds.ibp(lambda x: jax.lax.while_loop(lambda h: h.sum() < 10, lambda h: h + 1, x), lo, hi)
  with pytest.raises(NotImplementedError, match="'cond'"):
    bounds.ibp(lambda x: jax.lax.cond(True, lambda h: h + 1, lambda h: h - 1, x), lo, hi)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("d",))
  split = jax.shard_map(lambda h: h * 2, mesh=mesh, in_specs=jax.P("d"), out_specs=jax.P("d"))
  with pytest.raises(NotImplementedError, match="'shard_map' splits x"):
    bounds.ibp(split, jnp.zeros((2, 3)), jnp.ones((2, 3)))
  replicated = jax.shard_map(lambda h: h * 2, mesh=mesh, in_specs=jax.P(), out_specs=jax.P())
  np.testing.assert_array_equal(bounds.ibp(replicated, lo, hi)[1], 2 * hi)


# ----------------------------------------------------------------------------------------------------------
# Unsupported input.


def test_unsupported_primitive_and_graphs_raise_errors_naming_them():
  lo, hi = jnp.zeros((1, 3)), jnp.ones((1, 3))
  with pytest.raises(NotImplementedError, match="'sin'"):
    bounds.ibp(lambda x: jnp.sin(x) @ jnp.ones((3, 2)), lo, hi)
  with pytest.raises(NotImplementedError, match="'integer_pow' with exponent -2"):
    bounds.ibp(lambda x: x**-2, lo, hi)
  with pytest.raises(NotImplementedError, match="'convert_element_type' to bool"):
    bounds.ibp(lambda x: x.astype(bool).astype(jnp.float32), lo, hi)
  model, x, variables = zoo_helpers.random_variables("resnet_tiny", batch=1)
  f = lambda x: model.apply(variables, x, train=False)
  with pytest.raises(NotImplementedError, match="chain.*'add' joining 2 branches"):
    jax.eval_shape(lambda: bounds.symbolic_interval(f, x, x + 0.01))
  with pytest.raises(ValueError, match="unknown bound method 'mip'"):
    bounds.verified_correct(f, x, jnp.array([0]), eps=0.1, method="mip")
  with pytest.raises(ValueError, match="lower_slope"):
    bounds.crown_ibp(lambda x: x, lo, hi, lower_slope="one")
  with pytest.raises(ValueError, match=r"spec must be \[B, m, classes\]"):
    bounds.ibp(lambda x: x, lo, hi, jnp.ones((2, 1, 3)))


# ----------------------------------------------------------------------------------------------------------
# Agreement with the reference's bound code (PyTorch re-statement in benchmarks/torch_bounds.py).


def test_ibp_crown_and_symbolic_equal_the_reference_bound_code_on_the_same_weights():
  torch = pytest.importorskip("torch")
  from benchmarks import torch_bounds as bounds_reference  # pylint: disable=g-import-not-at-top
  from hydra_jax import convert  # pylint: disable=g-import-not-at-top
  from tests import torch_reference  # pylint: disable=g-import-not-at-top

  _, variables, _, _, y, lo, hi = _cnn_setup(7, eps=0.02)
  seq = torch_reference.build("cnn_tiny", 10)
  seq.load_state_dict(convert.to_torch_state_dict(variables, model_name="cnn_tiny", as_torch=True), strict=True)
  nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
  spec = bounds.margin_spec(y, 10)
  c = torch.from_numpy(np.array(spec))
  with torch.no_grad():
    ref_ub, ref_lb, _ = bounds_reference.interval_range(seq, nchw(lo), nchw(hi), c)
    ref_crown_lb = bounds_reference.backward_range(seq, nchw(lo), nchw(hi), c)
    ref_crown_ub = bounds_reference.backward_range(seq, nchw(lo), nchw(hi), c, upper_bound=True)
    ref_wc = bounds_reference.sym_worst_case(seq, nchw(lo), nchw(hi), torch.from_numpy(np.array(y)), 10)
  tol = {"rtol": 1e-4, "atol": 1e-4}
  ibp_bounds = np.stack(_jitted("cnn_tiny", bounds.ibp)(variables, lo, hi, spec))
  crown_bounds = np.stack(_jitted("cnn_tiny", bounds.crown_ibp)(variables, lo, hi, spec))
  np.testing.assert_allclose(ibp_bounds, np.stack([ref_lb, ref_ub]), **tol)
  np.testing.assert_allclose(crown_bounds, np.stack([ref_crown_lb, ref_crown_ub]), **tol)
  sym_lb, _ = _jitted("cnn_tiny", bounds.symbolic_interval)(variables, lo, hi, spec)
  others = np.asarray(spec).argmin(-1)  # class j of row e_y - e_j
  np.testing.assert_allclose(-np.asarray(sym_lb), np.take_along_axis(ref_wc.numpy(), others, 1), **tol)
  np.testing.assert_allclose(ref_wc.numpy()[np.arange(3), np.asarray(y)], 0, atol=1e-6)
  assert not np.allclose(ibp_bounds, crown_bounds, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Benchmark script.


def test_benchmark_prints_a_well_formed_table_at_tiny_size():
  from benchmarks import bench_bounds  # pylint: disable=g-import-not-at-top

  rows = bench_bounds.run("cnn_tiny", batch=2, repeats=1, symbolic_batch=1)
  lines = bench_bounds.table(rows, "cnn_tiny", "cpu").splitlines()
  assert lines[0] == "model cnn_tiny, device cpu" and lines[1].split() == ["method", "batch", "ms", "x", "forward"]
  cells = [line.split() for line in lines[2:]]
  assert [c[0] for c in cells] == ["forward", "ibp", "crown_ibp", "ibp+crown", "forward", "symbolic"]
  assert [int(c[1]) for c in cells] == [2, 2, 2, 2, 1, 1]
  # Positive times checked unrounded: a sub-5-microsecond call prints as 0.00 ms.
  assert all(r[2] > 0 for r in rows) and cells[0][3] == cells[4][3] == "1.00"
  # The ratio is of the unrounded times (the printed ms of a tiny model has too few digits to recompute it).
  np.testing.assert_allclose([r[3] for r in rows[1:4]], [r[2] / rows[0][2] for r in rows[1:4]], rtol=1e-6)
  assert [c[3] for c in cells] == [f"{r[3]:.2f}" for r in rows] and [c[2] for c in cells] == [
    f"{1e3 * r[2]:.2f}" for r in rows
  ]
