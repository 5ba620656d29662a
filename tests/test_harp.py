"""Tests of hydra_jax.harp and the learned-rate top-k of hydra_jax.masking: HARP's rate functions against hand
values, the rate's straight-through gradient, one trace for every k, the hardware loss and its gamma schedule
against a numpy restatement, and the exact kept count of the fixed rates."""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import baselines
from hydra_jax import harp
from hydra_jax import masking


def test_rate_act_and_rate_init_hand_values():
  # k_min = 0.1 * 0.1 = 0.01: rate_act(0) = 0.5 * 0.99 + 0.01 = 0.505.
  assert float(harp.rate_act(jnp.float32(0.0), 0.01)) == pytest.approx(0.505, abs=1e-7)
  # rate_init(0.1, 0.01) = logit(0.09 / 0.99) = log((1 / 11) / (10 / 11)) = log(0.1).
  assert harp.rate_init(0.1, 0.01) == pytest.approx(math.log(0.1), abs=1e-12)
  # A dense layer (k = 1) clips to logit(0.99) = log(99).
  assert harp.rate_init(1.0, 0.01) == pytest.approx(math.log(99.0), abs=1e-12)
  for k in (0.02, 0.3, 0.9):  # rate_act inverts rate_init below the clip
    assert float(harp.rate_act(jnp.float32(harp.rate_init(k, 0.01)), 0.01)) == pytest.approx(k, rel=1e-6)


def test_rate_init_rejects_a_rate_at_or_below_k_min():
  with pytest.raises(ValueError, match="must exceed k_min"):
    harp.rate_init(0.001, 0.001)


def test_rate_gradient_is_the_sum_of_the_mask_gradient():
  """d/dk of sum(mask * c) is sum(c) (HARP's GetSubnet.backward), and d/ds is sign(s) * c."""
  scores = jnp.asarray([[0.3, -1.0, 0.2], [0.5, -0.1, 0.7]], jnp.float32)
  upstream = jnp.asarray([[1.0, 2.0, -3.0], [0.5, 4.0, -1.5]], jnp.float32)

  def f(s, k):
    return jnp.sum(masking.topk_masks([s], [k])[0] * upstream)

  ds, dk = jax.grad(f, argnums=(0, 1))(scores, jnp.float32(0.5))
  assert float(dk) == pytest.approx(float(np.sum(upstream)), abs=1e-6)  # 3.0
  np.testing.assert_array_equal(ds, np.sign(scores) * upstream)


def test_rate_gradient_through_rate_act_by_the_chain_rule():
  scores = jnp.arange(1.0, 13.0).reshape(3, 4)
  upstream = jnp.linspace(-1.0, 2.0, 12).reshape(3, 4)
  k_min = 0.05

  def f(k_score):
    return jnp.sum(masking.topk_masks([scores], [harp.rate_act(k_score, k_min)])[0] * upstream)

  k_score = 0.3
  sig = 1 / (1 + math.exp(-k_score))
  want = float(np.sum(upstream)) * sig * (1 - sig) * (1 - k_min)
  assert float(jax.grad(f)(jnp.float32(k_score))) == pytest.approx(want, rel=1e-5)


def test_traced_per_layer_k_masks_match_numpy_and_trace_once():
  rng = np.random.default_rng(0)
  scores = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((3, 3, 2, 4), (40, 7), (5,))]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def masks(scores, ks):
    return masking.topk_masks(scores, [ks[0], ks[1], ks[2]])

  for ks in ((0.5, 0.1, 0.9), (0.07, 0.93, 0.3), (1.0, 0.01, 0.2)):
    got = masks(scores, jnp.asarray(ks, jnp.float32))
    for m, s, k in zip(got, scores, ks):
      n = s.size
      drop = int(np.floor(np.float32(1 - np.float32(k)) * np.float32(n)))
      drop = min(drop, n - 1)
      want = np.ones(n, np.float32)
      want[np.argsort(np.abs(np.asarray(s)).ravel(), kind="stable")[:drop]] = 0
      np.testing.assert_array_equal(np.asarray(m).ravel(), want)


def _tiny_scores():
  params = {
    "conv": {"kernel": jnp.ones((3, 3, 2, 8)), "bias": jnp.ones(8)},
    "dense": {"kernel": jnp.ones((32, 10))},
    "out": {"kernel": jnp.ones((10, 3))},
  }
  return params, masking.init_scores(params, "uniform", jax.random.key(0))


def test_hw_loss_and_kept_fraction_match_numpy():
  params, scores = _tiny_scores()
  k, alpha = 0.2, 0.1
  rates = {"conv": {"kernel": jnp.float32(1.0), "bias": None}, "dense": {"kernel": jnp.float32(-2.0)}}
  rates["out"] = {"kernel": jnp.float32(0.5)}
  sizes = np.asarray([144, 320, 30], np.float64)
  k_min = alpha * k
  ks = 1 / (1 + np.exp(-np.asarray([1.0, -2.0, 0.5]))) * (1 - k_min) + k_min
  fraction = np.sum(sizes * ks) / sizes.sum()
  assert float(harp.kept_fraction(rates, scores, k, alpha)) == pytest.approx(fraction, rel=1e-6)
  assert float(harp.hw_loss(rates, scores, k, alpha)) == pytest.approx(max(fraction / k - 1, 0), rel=1e-6)
  low = jax.tree.map(lambda r: r - 10.0, rates)  # every layer near k_min: below the target, loss 0
  assert float(harp.hw_loss(low, scores, k, alpha)) == 0.0


def test_gamma_grows_per_epoch_and_freezes_when_the_loss_reaches_zero():
  """HARP's train loop restated: gamma = (epoch + 1) * g0 until an epoch ENDS with round(hw, 4) == 0 (a zero loss
  mid-epoch, step 1, does not count), then fixed."""
  spe, g0 = 3, 0.5
  losses = [0.3, 0.0, 0.1, 0.05, 0.01, 0.00004, 0.2, 0.1, 0.0, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0]
  frozen, got = jnp.float32(0), []
  for step, loss in enumerate(losses):
    g = harp.gamma(jnp.int32(step), spe, g0, frozen)
    got.append(float(g))
    frozen = harp.freeze_gamma(frozen, jnp.float32(loss), g, jnp.bool_((step + 1) % spe == 0))
  want, ref_frozen = [], None  # numpy restatement of train.py / hw.py
  for step, loss in enumerate(losses):
    epoch = step // spe
    g = ref_frozen if ref_frozen is not None else (epoch + 1) * g0
    want.append(g)
    if (step + 1) % spe == 0 and np.round(loss, 4) == 0 and ref_frozen is None:
      ref_frozen = g
  np.testing.assert_allclose(got, want, rtol=1e-7)
  assert want[6:] == [1.0] * 9  # frozen at epoch 1's gamma after step 5's zero loss
  assert float(harp.gamma(jnp.int32(7), spe, g0, jnp.float32(0), dynamic=False)) == g0


@pytest.mark.parametrize("k", [0.01, 0.05, 0.3, 0.77])
def test_fixed_rates_meet_the_target_count_exactly(k):
  params, scores = _tiny_scores()
  rng = np.random.default_rng(1)
  rates = jax.tree.map(lambda _: jnp.float32(rng.normal()), harp.init_rates(params, scores, k=k, alpha=0.1))
  fixed = harp.fixed_k(rates, scores, k=k, alpha=0.1)
  masks = masking.compute_masks(scores, fixed)
  kept = sum(int(np.sum(m)) for m in jax.tree.leaves(masks))
  assert kept == math.floor(k * 494 + 0.5)
  report = harp.rate_report(rates, scores, k=k, alpha=0.1)
  assert report["kept"] == kept
  assert [layer["kept"] for layer in report["layers"]] == [int(np.sum(m)) for m in jax.tree.leaves(masks)]


def test_exact_counts_keep_the_learned_proportions_and_the_layer_bounds():
  # Target round(310 / 2010 * 2010) = 310: c keeps all its 10 (clipped), a and b share 300 as 1 : 2.
  counts = harp.exact_counts({"a": 0.1, "b": 0.2, "c": 1.0}, {"a": 1000, "b": 1000, "c": 10}, 310 / 2010)
  assert counts == {"a": 100, "b": 200, "c": 10}
  # Target 402: a + b = 392 = 130.67 + 261.33, the remaining unit to the larger fractional part (a).
  counts = harp.exact_counts({"a": 0.1, "b": 0.2, "c": 1.0}, {"a": 1000, "b": 1000, "c": 10}, 0.2)
  assert counts == {"a": 131, "b": 261, "c": 10}
  with pytest.raises(ValueError, match="fewer than one per layer"):
    harp.exact_counts({"a": 0.1, "b": 0.1}, {"a": 3, "b": 3}, 0.1)


def test_initial_strategies_uniform_erk_and_dense():
  params, scores = _tiny_scores()
  uniform = harp.layer_rates(harp.init_rates(params, scores, k=0.2, alpha=0.1), 0.2, 0.1)
  for v in jax.tree.leaves(uniform):
    assert float(v) == pytest.approx(0.2, rel=1e-6)
  erk = harp.layer_rates(harp.init_rates(params, scores, k=0.2, alpha=0.1, strategy="erk"), 0.2, 0.1)
  want = baselines.erk_densities(params, 0.2)
  for name, v in harp._scored(erk):
    assert float(v) == pytest.approx(min(want[name], 0.99 * 0.98 + 0.02), rel=1e-6)
  dense = harp.layer_rates(harp.init_rates(params, scores, k=0.2, alpha=0.1, strategy="dense"), 0.2, 0.1)
  for v in jax.tree.leaves(dense):  # HARP's channel 'original': rate_init(1) clips to logit(0.99)
    assert float(v) == pytest.approx(0.99 * 0.98 + 0.02, rel=1e-6)
  with pytest.raises(ValueError, match="unknown rate strategy 'lamp' at this granularity; valid: uniform, erk, dense"):
    harp.init_rates(params, scores, k=0.2, alpha=0.1, strategy="lamp")


@pytest.mark.parametrize(
  "name",
  [
    "cnn_tiny",
    pytest.param("vgg_tiny", marks=pytest.mark.slow),
    pytest.param("wrn_tiny", marks=pytest.mark.slow),
    pytest.param("resnet_tiny", marks=pytest.mark.slow),
    pytest.param("resnet_imagenet_tiny", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2_tiny", marks=pytest.mark.slow),
    pytest.param("googlenet_tiny", marks=pytest.mark.slow),
  ],
)
def test_every_zoo_family_learns_rates_and_meets_the_target_exactly(name):
  from hydra_jax import models  # noqa: PLC0415

  model = models.get_model(name, 10)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *models.input_shape(name))), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  scores = masking.init_scores(params, "scaled", jax.random.key(1))
  rates = harp.init_rates(params, scores, k=0.05, alpha=0.1, strategy="erk")

  @jax.jit
  def grads(scores, rates):
    def loss(scores, rates):
      masked = masking.apply_masks(params, scores, harp.layer_rates(rates, 0.05, 0.1))
      logits = model.apply({**variables, "params": masked}, x, train=False)
      return jnp.sum(logits**2) + harp.hw_loss(rates, scores, 0.05, 0.1)

    return jax.grad(loss, argnums=(0, 1))(scores, rates)

  _, rate_grads = grads(scores, rates)
  assert all(np.isfinite(float(g)) for g in jax.tree.leaves(rate_grads))
  assert any(float(g) != 0 for g in jax.tree.leaves(rate_grads))
  total = sum(int(np.size(s)) for s in jax.tree.leaves(scores))
  fixed = flax.core.FrozenDict(harp.fixed_k(rates, scores, k=0.05, alpha=0.1))
  masks = jax.jit(masking.compute_masks, static_argnums=1)(scores, fixed)
  assert sum(int(np.sum(m)) for m in jax.tree.leaves(masks)) == math.floor(0.05 * total + 0.5)
