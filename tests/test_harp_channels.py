"""HARP at channel granularity: a learned rate per channel group, HARP's FLOP loss against a restatement of its FLOP
counts (`utils/hw.py`) on cnn_tiny's hand-listed geometry, the rate's straight-through gradient, and the fixed
counts that meet structured HYDRA's FLOPs."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import channels
from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import export
from hydra_jax import harp
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import train
from tests import pipeline_helpers as ph

K, ALPHA = 0.5, 0.1
GROUPS = ("0/kernel", "2/kernel", "5/kernel")  # cnn_tiny's groups: each conv / hidden dense layer alone


def _flops_conv(height, in_channels, out_channels, kernel, stride, padding):
  """HARP's count_flops_conv (square input and kernel, bias and activation counted), restated."""
  out = (height - kernel + 2 * padding) / stride + 1
  positions = out * out
  return out_channels * positions * (2 * kernel * kernel * in_channels - 1) + 2 * out_channels * positions


def _flops_dense(in_features, out_features):
  """HARP's count_flops_dense (bias and activation counted), restated."""
  return (2 * in_features - 1) * out_features + 2 * out_features


def _cnn_tiny_flops(f0, f2, f5):
  """cnn_tiny on 8x8x1 by hand: conv 4x4/2 pad 1 (1 -> 4 f0, 8x8 -> 4x4), conv 4x4/2 pad 1 (4 f0 -> 8 f2, -> 2x2),
  flatten (2 * 2 * 8 f2 = 32 f2 features), dense -> 16 f5, dense -> 10 classes."""
  return (
    _flops_conv(8, 1, 4 * f0, 4, 2, 1)
    + _flops_conv(4, 4 * f0, 8 * f2, 4, 2, 1)
    + _flops_dense(32 * f2, 16 * f5)
    + _flops_dense(16 * f5, 10)
  )


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("cnn_tiny", 10)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  wiring = channels.trace_wiring(model, variables, (1, 8, 8, 1))
  return model, x, variables["params"], wiring


def test_flop_model_matches_harps_counts_by_hand(tiny):
  _, _, params, wiring = tiny
  budget = harp.channel_budget(wiring, params)
  assert budget.names == GROUPS and list(budget.sizes) == [4, 8, 16]
  # 4 * 16 * 31 + 2 * 4 * 16 + 8 * 4 * 127 + 2 * 8 * 4 + 63 * 16 + 2 * 16 + 31 * 10 + 2 * 10 = 2112 + 4128 + 1040 + 330
  assert budget.flops.total == _cnn_tiny_flops(1, 1, 1) == 7_610
  fractions = np.asarray([0.25, 0.625, 0.8125])
  assert float(budget.flops.flops(fractions)) == pytest.approx(_cnn_tiny_flops(*fractions), rel=1e-12)
  # The target: structured HYDRA at k = 0.5 keeps 2 / 4 / 8 channels.
  assert budget.target(K) == pytest.approx(_cnn_tiny_flops(0.5, 0.5, 0.5) / 7_610, rel=1e-12)


def test_flop_loss_and_gamma_times_it_match_the_restatement(tiny):
  _, _, params, wiring = tiny
  budget = harp.channel_budget(wiring, params)
  scores = masking.init_channel_scores(params, "uniform", jax.random.key(0), wiring.groups)
  logits = {"0/kernel": 2.0, "2/kernel": -1.0, "5/kernel": 0.5}
  rates = jax.tree_util.tree_map_with_path(
    lambda p, s: None if s is None else jnp.float32(logits[masking.path_name(p)]), scores, is_leaf=lambda s: s is None
  )
  k_min = ALPHA * K
  fractions = [1 / (1 + np.exp(-logits[name])) * (1 - k_min) + k_min for name in GROUPS]  # rate_act
  current = _cnn_tiny_flops(*fractions) / _cnn_tiny_flops(1, 1, 1)
  target = _cnn_tiny_flops(0.5, 0.5, 0.5) / _cnn_tiny_flops(1, 1, 1)
  want = max(current / target - 1, 0)
  assert want > 0.1
  loss = harp.hw_loss(rates, scores, K, ALPHA, budget)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(harp.kept_fraction(rates, scores, K, ALPHA, budget)) == pytest.approx(current, rel=1e-5)
  learning = harp.Learning(k=K, alpha=ALPHA, gamma0=2.0, dynamic=True, steps_per_epoch=4, budget=budget)
  gamma = learning.gamma(jnp.int32(9), {"frozen_gamma": jnp.float32(0)})  # epoch 2: (2 + 1) * 2
  assert float(gamma) == 6.0
  aux, metrics = learning.after_step(rates, {"frozen_gamma": jnp.float32(0)}, jnp.int32(11), gamma)
  assert float(aux["frozen_gamma"]) == 0.0  # the loss is above 0 at the epoch's end: gamma keeps growing
  assert float(metrics["hw_loss"]) == pytest.approx(want, rel=1e-5)


def test_the_group_rate_gradient_is_straight_through(tiny):
  """dL/dk_g = sum over the group's units of dL/d(unit mask) = sum over its members (kernel and bias) of
  sum(leaf * dL/d(masked leaf)) when the group spans all of every member's channels (cnn_tiny)."""
  model, x, params, wiring = tiny
  scores = masking.init_channel_scores(params, "uniform", jax.random.key(3), wiring.groups)
  ks = {"0/kernel": 0.5, "2/kernel": 0.625, "5/kernel": 0.4}

  def loss_of_weights(weights):
    return jnp.sum(jnp.tanh(model.apply({"params": weights}, x, train=False)))

  def loss_of_k(ks):
    return loss_of_weights(masking.apply_masks(params, scores, ks, groups=wiring.groups))

  k_grads = jax.jit(jax.grad(loss_of_k))(ks)
  masked = jax.jit(lambda ks: masking.apply_masks(params, scores, ks, groups=wiring.groups))(ks)
  weight_grads = jax.jit(jax.grad(loss_of_weights))(masked)
  named_params = dict(masking._named_leaves(params))
  named_grads = dict(masking._named_leaves(weight_grads))
  masks = jax.jit(lambda ks: masking.channel_masks(params, scores, ks, wiring.groups))(ks)
  for group in wiring.groups:
    want = 0.0
    for name, index in group.members:
      assert index == tuple(range(named_params[name].shape[-1]))
      want += float(jnp.sum(named_params[name] * named_grads[name]))
      assert int(masks[name].sum()) == group.kept(ks[group.name])
    assert float(k_grads[group.name]) == pytest.approx(want, rel=1e-4, abs=1e-6)


def _resnet_budget():
  model = models.get_model("resnet_tiny", 10)
  shape = (1, *models.input_shape("resnet_tiny"))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return harp.channel_budget(channels.trace_wiring(model, variables, shape), variables["params"])


@pytest.mark.parametrize("k", [0.1, 0.25, 0.5, 0.9])
def test_fixed_counts_meet_hydras_flops_and_no_group_can_grow(k):
  budget = _resnet_budget()
  flops = lambda counts: float(budget.flops.flops(np.asarray(counts, np.float64) / budget.sizes))
  target = budget.target(k) * budget.flops.total
  hydra = [n - masking.num_pruned(int(n), k) for n in budget.sizes]
  assert flops(hydra) == pytest.approx(target, rel=1e-12)
  drawn = np.random.default_rng(int(k * 100)).uniform(0.05, 1.0, len(budget.names))
  rates = {
    name: jnp.float32(harp.rate_init(max(f, ALPHA * k + 1e-3), ALPHA * k)) for name, f in zip(budget.names, drawn)
  }
  fractions = {name: float(harp.rate_act(r, ALPHA * k)) for name, r in rates.items()}
  counts = harp.flop_counts(budget, fractions, k)
  c = np.asarray([counts[name] for name in budget.names])
  assert np.all((c >= 1) & (c <= budget.sizes))
  assert flops(c) <= target + 0.5
  for g in range(len(c)):  # maximal: one channel more anywhere exceeds the target
    if c[g] < budget.sizes[g]:
      more = c.copy()
      more[g] += 1
      assert flops(more) > target + 0.5
  fixed = harp.fixed_k(rates, None, k=k, alpha=ALPHA, budget=budget)
  assert [int(n) - masking.num_pruned(int(n), fixed[name]) for name, n in zip(budget.names, budget.sizes)] == list(c)


@pytest.mark.parametrize(
  "name",
  [
    "vgg_tiny",  # the rest: 25-80 s each on the shared 2 cores (load 14)
    pytest.param("resnet_tiny", marks=pytest.mark.slow),
    pytest.param("wrn_tiny", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2_tiny", marks=pytest.mark.slow),
    pytest.param("googlenet_tiny", marks=pytest.mark.slow),
  ],
)
def test_zoo_families_learn_group_rates_and_meet_the_flops(name):
  model = models.get_model(name, 10)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *models.input_shape(name))), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  wiring = channels.trace_wiring(model, variables, (1, *models.input_shape(name)))
  budget = harp.channel_budget(wiring, params)
  scores = masking.init_channel_scores(params, "scaled", jax.random.key(1), wiring.groups)
  rates = harp.init_rates(params, scores, k=0.25, alpha=ALPHA, strategy="dense", groups=wiring.groups)
  assert sum(r is not None for r in jax.tree.leaves(rates, is_leaf=lambda r: r is None)) == len(wiring.groups)

  @jax.jit
  def grads(scores, rates):
    def loss(scores, rates):
      masked = masking.apply_masks(params, scores, harp.layer_rates(rates, 0.25, ALPHA), groups=wiring.groups)
      logits = model.apply({**variables, "params": masked}, x, train=False)
      return jnp.mean(logits**2) + harp.hw_loss(rates, scores, 0.25, ALPHA, budget)

    return jax.grad(loss, argnums=(0, 1))(scores, rates)

  _, rate_grads = grads(scores, rates)
  assert all(np.isfinite(float(g)) for g in jax.tree.leaves(rate_grads))
  assert all(float(g) > 0 for g in jax.tree.leaves(rate_grads))  # dense start: the FLOP loss pulls every rate down
  fixed = harp.fixed_k(rates, scores, k=0.25, alpha=ALPHA, budget=budget)
  masks = jax.jit(masking.channel_masks, static_argnames=("k", "groups"))(
    params, scores, k=flax.core.FrozenDict(fixed), groups=wiring.groups
  )
  counts = np.asarray(
    [int(masks[group.members[0][0]][np.asarray(group.members[0][1])].sum()) for group in wiring.groups]
  )
  assert budget.flops.flops(counts / budget.sizes) <= budget.target(0.25) * budget.flops.total + 0.5


# ----------------------------------------------------------------------------------------------------------
# In the pipeline: channel HARP prune learns per-group rates, finetune keeps them fixed, the compact export works.


def _kept_outputs(kernel):
  """Output channels of a kernel (..., C_out) with a nonzero weight."""
  return int(np.sum(np.any(np.reshape(kernel, (-1, kernel.shape[-1])) != 0, axis=0)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("harp_channels")
  config = ph.tiny_config(**{"data.data_fraction": 0.1, "eval.methods": ()})
  config.k = K
  config.mask.granularity = "channel"
  config.mask.learn_rates = True
  config.stages.prune.epochs = 3
  config.stages.prune.lr = 0.05
  config.mask.hw_gamma = 5.0
  train.run_stage(config_lib.stage_config(config, "pretrain"), str(root / "pretrain"))
  prune = config_lib.stage_config(config, "prune", source=str(root / "pretrain"))
  summaries = {"prune": train.run_stage(prune, str(root / "prune"))}
  finetune = config_lib.stage_config(config, "finetune", source=str(root / "prune"))
  summaries["finetune"] = train.run_stage(finetune, str(root / "finetune"))
  return root, summaries, prune


@pytest.mark.slow  # 35 s on the shared 2 cores: three stages' compiles
def test_channel_prune_learns_group_rates_and_finetune_keeps_them_within_the_flops(runs):
  root, summaries, _ = runs
  report = summaries["prune"]["rates"]
  assert report["granularity"] == "channel"
  assert [layer["name"] for layer in report["layers"]] == list(GROUPS)
  assert not np.allclose([layer["learned_k"] for layer in report["layers"]], K, atol=1e-4)  # the rates trained
  assert report["flops_kept"] <= report["flops_target"] + 0.5 / report["flops_total"]
  assert (root / "prune" / "rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert summaries["finetune"]["rates"]["layers"] == report["layers"]  # fixed in finetune
  run = export.load_run(str(root / "finetune"))
  params = run.variables["params"]
  kept = {name: _kept_outputs(params[name.split("/")[0]]["kernel"]) for name in GROUPS}
  assert kept == {layer["name"]: layer["kept"] for layer in report["layers"]}
  compact = export.load_run(str(root / "finetune"), compact=True)
  assert compact.channel_plan == {"0": kept["0/kernel"], "2": kept["2/kernel"], "5": kept["5/kernel"], "7": 10}
  images = data.eval_batches("digits", 16).batch_at(0)["image"]
  np.testing.assert_allclose(compact(images), run(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_stopped_channel_harp_prune_resumes_bit_identical(runs, tmp_path):
  _, summaries, prune = runs
  interrupted = str(tmp_path / "interrupted")
  train.run_stage(config_lib.stage_config(prune, "prune", stop_after_steps=5), interrupted)
  resumed = train.run_stage(prune, interrupted)
  assert resumed["rates"] == summaries["prune"]["rates"]  # the learned float32 rates, exactly
