"""CROWN on graphs (hydra_jax.bounds): a residual net's CROWN bound by hand, sigmoid / tanh relaxations, IBP at max
pooling, and soundness of CROWN-IBP / CROWN / alpha-CROWN at sampled points on every zoo family (slow)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import bounds
from hydra_jax import models
from tests import zoo_helpers


def _hand_crown(w1, b1, w2, w3, lo, hi, c):
  """CROWN lower bound of c . (relu(x W1 + b1) W2 + x W3) on the box, by hand (float64): z's exact interval, relu's
  lines (adaptive lower slope, chord above), the rows of W2 c through them and W3 c straight to x."""
  mid, rad = (lo + hi) / 2, (hi - lo) / 2
  low_z, up_z = mid @ w1 + b1 - rad @ np.abs(w1), mid @ w1 + b1 + rad @ np.abs(w1)
  unstable = (low_z < 0) & (up_z > 0)
  chord = np.where(unstable, up_z / np.where(unstable, up_z - low_z, 1), (low_z >= 0).astype(float))
  low = np.where(unstable, (up_z > -low_z).astype(float), chord)
  rows = c @ w2.T  # [B, m, hidden]
  slopes = np.where(rows > 0, low[:, None], chord[:, None])
  lam = rows * slopes
  bias = np.einsum("bmh,bh->bm", np.minimum(rows, 0), np.where(unstable, -low_z * chord, 0)) + lam @ b1
  g = lam @ w1.T + c @ w3.T  # [B, m, n]
  return bias + np.einsum("bmn,bn->bm", g, mid) - np.einsum("bmn,bn->bm", np.abs(g), rad)


def test_residual_net_crown_is_the_hand_computed_bound_and_branches_sum_at_the_input():
  rng = np.random.default_rng(0)
  w1, b1, w2, w3 = rng.normal(size=(4, 6)), rng.normal(size=6) * 0.3, rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
  x = rng.uniform(size=(2, 4))
  lo, hi = x - 0.3, x + 0.3
  f = lambda z: (
    jax.nn.relu(z @ w1.astype(np.float32) + b1.astype(np.float32)) @ w2.astype(np.float32) + z @ w3.astype(np.float32)
  )
  c = np.asarray(bounds.margin_spec(jnp.array([0, 2]), 3), np.float64)
  expected = (_hand_crown(w1, b1, w2, w3, lo, hi, c), -_hand_crown(w1, b1, w2, w3, lo, hi, -c))
  box = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  for method in (bounds.crown_ibp, bounds.crown):  # z is affine in x: CROWN's intermediate bounds are IBP's
    found = method(f, *box, jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(np.stack(found), np.stack(expected), rtol=1e-5, atol=1e-5)
  assert np.mean(expected[0]) > np.mean(np.asarray(bounds.ibp(f, *box, jnp.asarray(c, jnp.float32))[0])) + 1e-2


def _stable_conv_bn_net(rng):
  """(f, pre) of a net affine on the box below: x [2, 6, 6, 2] -> conv 3x3 + bias -> BatchNorm in eval mode
  ((h - mean) * scale + shift) -> clip to [0, 6] -> + 1x1 conv of x + bias (a residual join) -> pad with 1.5 ->
  2x2 average pooling -> dense + bias - 0.7. pre(x) is clip's input; the shifts put each channel where clip is
  the identity (1, 3), 0 (2, a relu at rest) or 6 (0, saturated), so every relaxation is stable and every
  constant of the net enters the bounds only through the affine offsets."""
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  k1, b1 = rng.normal(size=(3, 3, 2, 4)) * 0.2, rng.normal(size=4)
  mean, scale = rng.normal(size=4), rng.uniform(0.5, 1.5, size=4)
  reach = scale * (np.abs(k1).sum((0, 1, 2)) + np.abs(b1 - mean))  # |(conv + b1 - mean) * scale| on [0, 1]
  shift = np.array([6, 3, -1, 3]) + np.array([1, 0, -1, 0]) * reach
  k2, b2 = rng.normal(size=(1, 1, 2, 4)), rng.normal(size=4)
  w, b = rng.normal(size=(4 * 4 * 4, 3)) * 0.3, rng.normal(size=3)
  k1, b1, mean, scale, shift, k2, b2, w, b = (
    jnp.asarray(a, jnp.float32) for a in (k1, b1, mean, scale, shift, k2, b2, w, b)
  )
  pre = lambda x: (conv(x, k1) + b1 - mean) * scale + shift

  def f(x):
    h = jnp.clip(pre(x), 0, 6) + conv(x, k2) + b2
    h = nn.avg_pool(jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.5), (2, 2), (2, 2))
    return h.reshape(x.shape[0], -1) @ w + b - 0.7

  return f, pre


def test_crown_on_a_stable_conv_bn_residual_net_gives_its_exact_range_through_the_offsets():
  """With every clip stable, f is affine on the box, so CROWN-IBP and CROWN must give its exact range:
  spec . f at the corner of the box that minimises (maximises) each row, found from the sign of spec . df/dx. The
  constants (biases, BN mean and shift, clip's 0 and 6, the padding value, -0.7) move the bounds by O(1): a lost or
  mis-signed affine offset anywhere fails this test."""
  rng = np.random.default_rng(7)
  f, pre = _stable_conv_bn_net(rng)
  x = jnp.asarray(rng.uniform(0.1, 0.9, size=(2, 6, 6, 2)), jnp.float32)
  lo, hi = x - 0.05, x + 0.05
  pre_lb, pre_ub = (np.asarray(v) for v in jax.jit(functools.partial(bounds.ibp, pre))(lo, hi))
  assert np.all((pre_lb > 0) & (pre_ub < 6) | (pre_ub < 0) | (pre_lb > 6))  # the premise: every clip is stable
  spec = bounds.margin_spec(jnp.array([0, 2]), 3)
  one = lambda z: f(z[None])[0]

  @jax.jit
  def exact_range(lo, hi):
    rows = jnp.einsum("bmc,bc...->bm...", spec, jax.vmap(jax.jacobian(one))((lo + hi) / 2))  # spec . df/dx
    at = lambda corner: jnp.einsum("bmc,bmc->bm", spec, jax.vmap(jax.vmap(one), in_axes=1, out_axes=1)(corner))
    return at(jnp.where(rows > 0, lo[:, None], hi[:, None])), at(jnp.where(rows > 0, hi[:, None], lo[:, None]))

  methods = {"ibp": bounds.ibp, "crown_ibp": bounds.crown_ibp, "crown": bounds.crown}
  found = jax.jit(lambda lo, hi: {m: method(f, lo, hi, spec) for m, method in methods.items()})(lo, hi)
  exact = exact_range(lo, hi)
  for method in ("crown_ibp", "crown"):  # alpha-CROWN shares their backward pass
    np.testing.assert_allclose(np.stack(found[method]), np.stack(exact), rtol=1e-5, atol=2e-5, err_msg=method)
  ibp_lb = found["ibp"][0]
  assert np.mean(exact[0] - ibp_lb) > 0.1  # and IBP is looser: the check is not IBP's


def _sampled(f, lo, hi, n=256):
  key_uniform, key_corner = jax.random.split(jax.random.key(0))
  uniform = lo + (hi - lo) * jax.random.uniform(key_uniform, (n, *lo.shape))
  corner = jnp.where(jax.random.bernoulli(key_corner, 0.5, (n, *lo.shape)), hi, lo)
  return np.asarray(jax.vmap(f)(jnp.concatenate([uniform, corner])))


@pytest.mark.parametrize("activation", [jax.nn.sigmoid, jnp.tanh], ids=["sigmoid", "tanh"])
def test_sigmoid_and_tanh_relaxations_are_sound_and_tighter_than_ibp(activation):
  """Two lines parallel to the chord through the function's extreme points relative to it: every method contains
  the samples; CROWN's relaxation, over the relu-free net, beats IBP's interval."""
  rng = np.random.default_rng(1)
  w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(4, 8), (8, 3)])
  f = lambda x: activation(2 * x @ w1) @ w2
  x = jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32)
  lo, hi = x - 0.3, x + 0.3
  values = _sampled(f, lo, hi)
  found = jax.jit(lambda lo, hi: {m: bounds.METHODS[m](f, lo, hi) for m in ("ibp", "crown", "symbolic")})(lo, hi)
  for method, (lb, ub) in found.items():
    assert np.all(values >= np.asarray(lb) - 1e-5) and np.all(values <= np.asarray(ub) + 1e-5), method
  assert np.mean(found["crown"][1] - found["crown"][0]) < 0.8 * np.mean(found["ibp"][1] - found["ibp"][0])


def test_max_pooling_enters_crown_by_its_ibp_box():
  """conv -> relu -> 2x2 max pool -> dense: the backward pass stops at the pool with its IBP bounds (stated in the
  docs), so CROWN-IBP is sound and, with one dense layer after the pool, equals IBP merged into it."""
  rng = np.random.default_rng(2)
  kernel, dense = (
    jnp.asarray(rng.normal(size=(3, 3, 1, 2)), jnp.float32),
    jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
  )

  def f(x):
    h = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.reshape(x.shape[0], -1) @ dense

  x = jnp.asarray(rng.uniform(size=(2, 4, 4, 1)), jnp.float32)
  lo, hi = x - 0.05, x + 0.05
  lb, ub = bounds.crown_ibp(f, lo, hi)
  values = _sampled(f, lo, hi, n=64)
  assert np.all(values >= np.asarray(lb) - 1e-5) and np.all(values <= np.asarray(ub) + 1e-5)
  np.testing.assert_allclose(np.stack([lb, ub]), np.stack(bounds.ibp(f, lo, hi)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in models.model_names() if n.endswith("_tiny") and models.is_zoo(n)])
def test_zoo_margins_at_samples_lie_in_crown_ibp_crown_and_alpha_crown_bounds(name):
  model, x, variables = zoo_helpers.random_variables(name, batch=2, seed=4)
  size = 32 if name == "cnn_tiny" else 8
  x = x[:, :size, :size]
  lo, hi = jnp.clip(x - 0.004, 0, 1), jnp.clip(x + 0.004, 0, 1)
  spec = bounds.margin_spec(jnp.array([3, 5]), 10)
  f = lambda z: model.apply(variables, z, train=False)
  margins = np.einsum("bmc,nbc->nbm", spec, _sampled(f, lo, hi, n=16))
  methods = ("crown_ibp", "crown", "alpha_crown")
  found = jax.jit(lambda lo, hi: {m: bounds.METHODS[m](f, lo, hi, spec) for m in methods})(lo, hi)
  for method, (lb, ub) in found.items():
    scale = 1e-4 * (1 + np.abs(margins))
    assert np.all(margins >= np.asarray(lb) - scale) and np.all(margins <= np.asarray(ub) + scale), method
  assert np.all(np.asarray(found["alpha_crown"][0]) >= np.asarray(found["crown"][0]) - 1e-5)


@pytest.mark.slow
def test_crown_ibp_objective_bounds_a_residual_network_under_grad():
  """What `objective=crown_ibp` differentiates, on resnet_tiny (residual adds, BatchNorm): finite, non-zero."""
  model, x, variables = zoo_helpers.random_variables("resnet_tiny", batch=2, seed=5)
  x = x[:, :8, :8]
  spec = bounds.margin_spec(jnp.array([1, 2]), 10)

  def loss(params):
    f = lambda z: model.apply({**variables, "params": params}, z, train=False)
    ibp_lb, crown_lb = bounds.ibp_and_crown_lower(f, jnp.clip(x - 1e-3, 0, 1), jnp.clip(x + 1e-3, 0, 1), spec)
    return jnp.sum(ibp_lb) + jnp.sum(crown_lb)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)
