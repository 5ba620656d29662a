"""Tests of hydra_jax.masking against numpy references, hand-computed values and invariants."""

import math
import re

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from hydra_jax import masking


def numpy_topk_mask(scores, k):
  """The reference rule restated in numpy: stable ascending sort of |s|, zero the first int((1-k)n)."""
  flat = np.abs(np.asarray(scores, np.float64)).ravel()
  mask = np.ones_like(flat)
  mask[np.argsort(flat, kind="stable")[: min(int((1 - k) * flat.size), flat.size - 1)]] = 0
  return mask.reshape(np.shape(scores))


topk_mask_static_k = jax.jit(masking.topk_mask, static_argnums=1)  # one compile per (shape, k), cached


def toy_params(key=None):
  k1, k2, k3 = jax.random.split(jax.random.key(0) if key is None else key, 3)
  return {
    "conv1": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
    "bn1": {"scale": jnp.full((4,), 1.5), "bias": jnp.full((4,), 0.25)},
    "fc": {"kernel": jax.random.normal(k2, (36, 5)), "bias": jax.random.normal(k3, (5,))},
  }


@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3), (3, 3, 3, 16), (5, 1, 1, 9), (257, 10)])
@pytest.mark.parametrize("k", [1e-6, 0.01, 0.1, 0.3333, 0.5, 0.9, 0.999, 1.0])
def test_topk_mask_keeps_exactly_the_requested_count(shape, k):
  scores = jax.random.normal(jax.random.key(sum(shape)), shape)
  mask = topk_mask_static_k(scores, k)
  n = math.prod(shape)
  assert mask.shape == scores.shape and mask.dtype == scores.dtype
  assert int(mask.sum()) == n - min(int((1 - k) * n), n - 1)
  np.testing.assert_array_equal(mask, numpy_topk_mask(scores, k))


@hypothesis.settings(deadline=None, max_examples=100)
@hypothesis.given(
  scores=st.sampled_from([(13,), (4, 6), (2, 3, 5)]).flatmap(
    lambda shape: hnp.arrays(
      np.float32, shape, elements=st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 2.0, -3.0, 1e-30, 7.5e3])
    )
  ),
  k=st.sampled_from([0.01, 0.2, 0.34, 0.5, 0.77, 0.9, 1.0]),
)
def test_topk_mask_matches_stable_sort_with_heavy_ties(scores, k):
  np.testing.assert_array_equal(topk_mask_static_k(jnp.asarray(scores), k), numpy_topk_mask(scores, k))


def test_ties_are_dropped_in_flat_index_order():
  # |s| = [1, 1, 1, .5, 2, 1]; k=.5 drops 3: the .5 (index 3), then the first two tied 1s (indices 0, 1).
  scores = jnp.array([1.0, -1.0, 1.0, 0.5, 2.0, -1.0])
  np.testing.assert_array_equal(masking.topk_mask(scores, 0.5), [0, 0, 1, 0, 1, 1])
  np.testing.assert_array_equal(masking.topk_mask(jnp.zeros(5), 0.4), [0, 0, 0, 1, 1])


def test_k_one_keeps_everything_even_zeros():
  np.testing.assert_array_equal(masking.topk_mask(jnp.array([0.0, -2.0, 0.0]), 1.0), [1, 1, 1])


def test_gradient_is_sign_of_scores_times_upstream():
  scores = jnp.array([[0.3, -2.0, 0.0], [-0.1, 5.0, 1.0]])
  upstream = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  grad = jax.grad(lambda s: jnp.sum(masking.topk_mask(s, 0.5) * upstream))(scores)
  np.testing.assert_array_equal(grad, [[1.0, -2.0, 0.0], [-4.0, 5.0, 6.0]])  # kept or not, sign(s)*g


def test_under_jit_vmap_and_traced_k():
  scores = jax.random.normal(jax.random.key(1), (4, 50))
  ks = jnp.array([0.1, 0.25, 0.5, 1.0])
  masks = jax.jit(jax.vmap(masking.topk_mask))(scores, ks)
  for row, k, mask in zip(scores, [0.1, 0.25, 0.5, 1.0], masks):
    np.testing.assert_array_equal(mask, numpy_topk_mask(row, k))
  grads = jax.jit(jax.vmap(jax.grad(lambda s, k: jnp.sum(masking.topk_mask(s, k) * s))))(scores, ks)
  np.testing.assert_allclose(grads, np.abs(scores) + masks, rtol=1e-6)  # STE term sign(s)*s, plus the mask


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan")])
def test_k_outside_unit_interval_is_rejected(k):
  with pytest.raises(ValueError, match="fraction of weights KEPT"):
    masking.topk_mask(jnp.ones(4), k)
  with pytest.raises(ValueError, match="fraction of weights KEPT"):
    masking.apply_masks(toy_params(), masking.init_scores(toy_params(), "scaled", jax.random.key(0)), k)


def test_topk_masks_needs_one_k_per_score_array():
  with pytest.raises(ValueError, match="2 score arrays but 1 values of k"):
    masking.topk_masks([jnp.ones(4), jnp.ones(3)], [0.5])
  assert masking.topk_masks([], []) == []


def test_prunable_leaves_are_conv_and_dense_kernels_only():
  assert masking.prunable_paths(toy_params()) == ["conv1/kernel", "fc/kernel"]
  scores = masking.init_scores(toy_params(), "uniform", jax.random.key(0))
  assert scores["bn1"] == {"scale": None, "bias": None} and scores["fc"]["bias"] is None


def test_apply_masks_zeroes_pruned_kernels_and_leaves_the_rest_identical():
  params = toy_params()
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(3))
  masked = masking.apply_masks(params, scores, 0.2)
  for name in ("conv1", "fc"):
    expected = np.asarray(params[name]["kernel"]) * numpy_topk_mask(scores[name]["kernel"], 0.2)
    np.testing.assert_array_equal(masked[name]["kernel"], expected)
  for leaf in (("bn1", "scale"), ("bn1", "bias"), ("fc", "bias")):
    assert masked[leaf[0]][leaf[1]] is params[leaf[0]][leaf[1]]


def test_score_gradient_is_sign_times_weight_times_effective_weight_gradient():
  params = toy_params()
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(4))
  x = jax.random.normal(jax.random.key(5), (2, 36))

  def loss_of_effective(fc_kernel):
    return jnp.sum(jnp.tanh(x @ fc_kernel + params["fc"]["bias"]) ** 2)

  def loss(scores):
    return loss_of_effective(masking.apply_masks(params, scores, 0.3)["fc"]["kernel"])

  mask = numpy_topk_mask(scores["fc"]["kernel"], 0.3)
  d_effective = jax.grad(loss_of_effective)(params["fc"]["kernel"] * mask)
  expected = np.sign(scores["fc"]["kernel"]) * params["fc"]["kernel"] * d_effective
  np.testing.assert_allclose(jax.grad(loss)(scores)["fc"]["kernel"], expected, rtol=1e-6)
  weight_grad = jax.grad(lambda p: loss_of_effective(masking.apply_masks(p, scores, 0.3)["fc"]["kernel"]))(params)[
    "fc"
  ]["kernel"]
  np.testing.assert_allclose(weight_grad, mask * d_effective, rtol=1e-6)  # pruned weights: zero gradient


def test_per_layer_k_as_tree_or_path_dict():
  params = toy_params()
  scores = masking.init_scores(params, "scaled", jax.random.key(0))
  by_tree = {"conv1": {"kernel": 0.5}, "bn1": {"scale": None, "bias": None}, "fc": {"kernel": 0.1, "bias": None}}
  for k in (by_tree, {"conv1/kernel": 0.5, "fc/kernel": 0.1}):
    report = masking.sparsity_report(masking.export_dense(params, scores, k))
    assert [(n, kept) for n, kept, _ in report.layers] == [("conv1/kernel", 36), ("fc/kernel", 18)]
  with pytest.raises(ValueError, match="no entry for prunable layer 'fc/kernel'"):
    masking.apply_masks(params, scores, {"conv1/kernel": 0.5})
  with pytest.raises(ValueError, match=r"k\['fc/kernel'\]=2"):
    masking.apply_masks(params, scores, {"conv1/kernel": 0.5, "fc/kernel": 2})


def test_scores_that_do_not_mirror_params_are_rejected_by_name():
  params = toy_params()
  scores = masking.init_scores(params, "scaled", jax.random.key(0))
  missing = {**scores, "fc": {"kernel": scores["fc"]["kernel"]}}
  with pytest.raises(ValueError, match="no entry for param 'fc/bias'"):
    masking.apply_masks(params, missing, 0.5)
  wrong_shape = {**scores, "fc": {"kernel": jnp.ones((5, 36)), "bias": None}}
  with pytest.raises(ValueError, match=r"score 'fc/kernel' has shape \(5, 36\)"):
    masking.apply_masks(params, wrong_shape, 0.5)
  extra = {**scores, "head": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="score 'head/kernel' has no param"):
    masking.apply_masks(params, extra, 0.5)


def test_global_ranking_matches_numpy_and_respects_the_layer_minimum():
  params = toy_params()
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(6))
  arrays = [scores["conv1"]["kernel"], scores["fc"]["kernel"]]
  concatenated = np.concatenate([np.ravel(a) for a in arrays])
  masks = masking.global_masks(scores, 0.1)
  got = np.concatenate([np.ravel(masks["conv1"]["kernel"]), np.ravel(masks["fc"]["kernel"])])
  np.testing.assert_array_equal(got, numpy_topk_mask(concatenated, 0.1))

  floor = masking.global_masks(scores, 0.05, min_layer_k=0.2)
  for name, a in (("conv1", arrays[0]), ("fc", arrays[1])):  # each layer keeps its own top 20% at least
    own_top = numpy_topk_mask(a, 0.2)
    assert np.all(np.asarray(floor[name]["kernel"])[own_top == 1] == 1)
  total = concatenated.size
  guaranteed = sum(a.size - int(0.8 * a.size) for a in arrays)
  assert int(sum(m.sum() for m in jax.tree.leaves(floor))) == max(total - int(0.95 * total), guaranteed)

  grad = jax.grad(lambda s: sum(jnp.sum(m) for m in jax.tree.leaves(masking.global_masks(s, 0.05, 0.2))))(scores)
  np.testing.assert_array_equal(grad["fc"]["kernel"], np.sign(arrays[1]))  # straight through everywhere
  with pytest.raises(ValueError, match="unknown mask scope 'local'"):
    masking.compute_masks(scores, 0.1, scope="local")


def test_export_dense_has_exact_zeros_at_the_target_sparsity():
  params = toy_params()
  scores = masking.init_scores(params, "scaled", jax.random.key(0))
  for k in (0.5, 0.1, 0.01):
    dense = masking.export_dense(params, scores, k)
    for name, kept, total in masking.sparsity_report(dense).layers:
      assert abs(kept - k * total) <= 1, (name, kept, total, k)
    pruned = np.asarray(dense["fc"]["kernel"])[numpy_topk_mask(scores["fc"]["kernel"], k) == 0]
    assert np.all(pruned == 0) and not np.any(np.signbit(pruned))  # +0.0, not -0.0
  report = masking.sparsity_report(masking.export_dense(params, scores, 0.1))
  assert (report.kept, report.total) == (8 + 18, 72 + 180)
  assert "TOTAL" in report.table() and '"kept": 26' in report.to_json()


def test_scaled_init_is_bounded_by_kaiming_uniform_and_keeps_weight_order():
  params = toy_params()
  scores = masking.init_scores(params, "scaled", jax.random.key(0))
  w, s = params["conv1"]["kernel"], scores["conv1"]["kernel"]
  bound = math.sqrt(6 / (3 * 3 * 2))
  np.testing.assert_allclose(np.max(np.abs(s)), bound, rtol=1e-6)
  np.testing.assert_allclose(s, bound * w / np.max(np.abs(w)), rtol=1e-6)
  np.testing.assert_array_equal(np.argsort(np.abs(s).ravel()), np.argsort(np.abs(w).ravel()))


def _stated_distribution(method, fan_in, fan_out):
  """The distribution each random init promises (docs/masking.md / `init_scores` docstring), as a scipy.stats law."""
  xavier_std = math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out))  # ReLU gain sqrt(2), as the reference
  bound = {
    "kaiming_uniform": math.sqrt(6 / fan_in),
    "xavier_uniform": math.sqrt(3) * xavier_std,
    "uniform": 1 / math.sqrt(fan_in),
  }.get(method)
  if bound is not None:
    return scipy.stats.uniform(-bound, 2 * bound)
  return scipy.stats.norm(0, {"kaiming_normal": math.sqrt(2 / fan_in), "xavier_normal": xavier_std}[method])


RANDOM_INITS = ["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "uniform"]


@pytest.mark.parametrize("method", RANDOM_INITS)
def test_random_inits_follow_their_formulas(method):
  # A conv (fan_in 3*3*64 = 576, fan_out 3*3*128 = 1152) and a dense kernel (fan_in 256, fan_out 100), and a
  # second conv of the same shape: each leaf must get its own draw.
  shapes = {"conv": (3, 3, 64, 128), "conv_b": (3, 3, 64, 128), "dense": (256, 100)}
  params = {name: {"kernel": jnp.ones(shape), "bias": jnp.ones(shape[-1])} for name, shape in shapes.items()}
  scores = masking.init_scores(params, method, jax.random.key(7))
  for name, (fan_in, fan_out) in {"conv": (576, 1152), "conv_b": (576, 1152), "dense": (256, 100)}.items():
    s = np.asarray(scores[name]["kernel"], np.float64)
    assert s.shape == shapes[name] and scores[name]["kernel"].dtype == jnp.float32
    assert scores[name]["bias"] is None
    law = _stated_distribution(method, fan_in, fan_out)
    n, std = s.size, law.std()
    # Moments within 5 standard errors for this sample size (std of the sample std <= std / sqrt(2 n)).
    assert abs(s.mean()) < 5 * std / math.sqrt(n), (name, s.mean())
    assert abs(s.std() / std - 1) < 5 / math.sqrt(2 * n), (name, s.std(), std)
    # The whole distribution: Kolmogorov-Smirnov against the stated law (the draw is fixed, so this either
    # always passes or always fails), and the same test rejects the other family with the same std.
    assert scipy.stats.kstest(s.ravel(), law.cdf).pvalue > 1e-3, name
    other = (
      scipy.stats.norm(0, std)
      if law.dist.name == "uniform"
      else scipy.stats.uniform(-math.sqrt(3) * std, 2 * math.sqrt(3) * std)
    )
    assert scipy.stats.kstest(s.ravel(), other.cdf).pvalue < 1e-6, name
    if law.dist.name == "uniform":
      low, high = law.support()
      assert low <= s.min() < low + 1e-3 * (high - low) and high - 1e-3 * (high - low) < s.max() <= high
  assert not np.array_equal(scores["conv"]["kernel"], scores["conv_b"]["kernel"])


def test_dirac_orthogonal_and_snip_inits():
  conv = jnp.ones((3, 3, 4, 6))
  dirac = np.asarray(masking.init_scores({"c": {"kernel": conv}}, "dirac", jax.random.key(0))["c"]["kernel"])
  expected = np.zeros((3, 3, 4, 6))
  expected[1, 1, np.arange(4), np.arange(4)] = 1
  np.testing.assert_array_equal(dirac, expected)

  dense = {"d": {"kernel": jnp.ones((64, 32))}}
  q = np.asarray(masking.init_scores(dense, "orthogonal", jax.random.key(0))["d"]["kernel"])
  np.testing.assert_allclose(q.T @ q, 2 * np.eye(32), atol=1e-5)  # orthonormal columns, ReLU gain sqrt(2)

  params = toy_params()
  grads = jax.tree.map(lambda w: -2 * w, params)
  snip = masking.init_scores(params, "snip", jax.random.key(0), grads=grads)
  np.testing.assert_allclose(snip["fc"]["kernel"], 2 * params["fc"]["kernel"] ** 2, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown score init 'he'.*kaiming_normal"):
    masking.init_scores(params, "he", jax.random.key(0))


@pytest.mark.parametrize("pack_rows", [1, 2048])  # several packs (each the largest layer's 3 rows), or one
def test_all_layers_ranked_together_match_numpy_per_layer(monkeypatch, pack_rows):
  # Layers of different sizes (one spans 3 rows of a pack, one is a single entry), heavy ties (|s| from 4
  # values, +-0 included), a per-layer k each: every mask equals its own layer's numpy stable-sort top-k.
  monkeypatch.setattr(masking, "_PACK_ROWS", pack_rows)
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 3, 4, 70), "b": (1,), "c": (7, 5), "d": (2, 3), "e": (1100, 2)}
  ks = {"a": 0.3, "b": 0.5, "c": 0.01, "d": 0.75, "e": 0.1}
  scores = {
    name: {"kernel": jnp.asarray(rng.choice([0.0, -0.0, 0.5, -1.0, 2.0], shape))} for name, shape in shapes.items()
  }
  per_layer_k = {f"{name}/kernel": k for name, k in ks.items()}
  masks = masking.layer_masks(scores, per_layer_k)
  for name in shapes:
    np.testing.assert_array_equal(
      masks[name]["kernel"], numpy_topk_mask(scores[name]["kernel"], ks[name]), err_msg=name
    )
  grads = jax.grad(lambda s: sum(jnp.sum(m * 2.0) for m in jax.tree.leaves(masking.layer_masks(s, per_layer_k))))(
    scores
  )
  for name in shapes:  # straight through: 2 * sign(s) everywhere, kept or not
    np.testing.assert_array_equal(grads[name]["kernel"], 2.0 * np.sign(scores[name]["kernel"]))


# ----------------------------------------------------------------------------------------------------------
# Which weights are prunable: mask.include / mask.exclude over parameter paths.

HAND_PATHS = {  # a ResNet-like tree: path -> shape
  "conv1/kernel": (3, 3, 3, 8),
  "bn1/scale": (8,),
  "layer1_0/conv1/kernel": (3, 3, 8, 8),
  "layer1_0/conv1/bias": (8,),
  "layer1_0/shortcut/kernel": (1, 1, 8, 8),
  "layer2_0/conv1/kernel": (3, 3, 8, 16),
  "linear/kernel": (16, 10),
  "linear/bias": (10,),
  "pos_embedding": (1, 5, 16),
}


def hand_tree():
  tree = {}
  for path, shape in HAND_PATHS.items():
    *parents, leaf = path.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = jnp.zeros(shape)
  return tree


@pytest.mark.parametrize(
  "include, exclude, chosen",
  [
    (
      (),
      (),
      ["conv1/kernel", "layer1_0/conv1/kernel", "layer1_0/shortcut/kernel", "layer2_0/conv1/kernel", "linear/kernel"],
    ),
    ((), (r"^conv1/", r"^linear/"), ["layer1_0/conv1/kernel", "layer1_0/shortcut/kernel", "layer2_0/conv1/kernel"]),
    ((r"^layer\d_0/conv1",), (), ["layer1_0/conv1/kernel", "layer2_0/conv1/kernel"]),  # the bias is 1-D: not chosen
    ((r"layer1", "pos_emb"), ("shortcut",), ["layer1_0/conv1/kernel", "pos_embedding"]),
  ],
)
def test_path_filter_chooses_the_hand_listed_paths(include, exclude, chosen):
  prunable = masking.PathFilter(tuple(include), tuple(exclude))
  assert list(prunable.check(hand_tree())) == sorted(chosen)  # tree order: keys sorted
  assert prunable.check(hand_tree()) == {name: math.prod(HAND_PATHS[name]) for name in chosen}
  scores = masking.init_scores(hand_tree(), "kaiming_normal", jax.random.key(0), prunable=prunable)
  scored = {masking.path_name(p) for p, s in jax.tree_util.tree_flatten_with_path(scores)[0]}
  assert scored == set(chosen)


@pytest.mark.parametrize(
  "include, exclude, message",
  [
    ((), ("^nosuch/",), "mask.exclude pattern '^nosuch/' matches no prunable parameter path"),
    ((), ("bias",), "mask.exclude pattern 'bias' matches no prunable parameter path"),  # biases are not candidates
    (("bn1",), (), "mask.include pattern 'bn1' matches no parameter of 2 dims or more path"),
    (("(",), (), "mask.include pattern '(' is not a regular expression"),
    ((), ("kernel",), "mask.include / mask.exclude leave no weight to prune"),
  ],
)
def test_path_filter_refuses_a_pattern_that_matches_nothing(include, exclude, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    masking.PathFilter(include, exclude).check(hand_tree())
