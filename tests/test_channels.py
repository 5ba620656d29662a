"""Structured (channel) HYDRA: channel groups traced from the models, exact per-group top-k, the straight-through
gradient of a channel score, the compact network's logits against the masked network's, and bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import numpy_topk_mask
from pipeline_helpers import run_train_steps
from pipeline_helpers import tiny_config
from zoo_helpers import random_variables

from hydra_jax import channels
from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import errors
from hydra_jax import export
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import pipeline
from hydra_jax import sources
from hydra_jax import train
from hydra_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wired(name):
  model, x, variables = random_variables(name)
  return model, x, variables, channels.trace_wiring(model, variables, x.shape)


def _group_of(groups, leaf):
  return next(group for group in groups if leaf in dict(group.members))


_channel_masks = jax.jit(masking.channel_masks, static_argnames="groups")  # k traced: one program for every k


def _masks(variables, scores, k, groups):
  return _channel_masks(variables["params"], scores, k, groups=groups)


def test_each_group_keeps_exactly_its_count_and_its_members_agree():
  _, _, variables, wiring = _wired("resnet_tiny")
  scores = masking.init_channel_scores(variables["params"], "uniform", jax.random.key(3), wiring.groups)
  for k in (0.5, 0.3, 0.01):
    masks = _masks(variables, scores, k, wiring.groups)
    for group in wiring.groups:
      unit_masks = np.stack([np.asarray(masks[name])[list(index)] for name, index in group.members])
      assert np.all(unit_masks == unit_masks[:1])  # one decision per unit, shared by every member
      n = group.size
      assert unit_masks[0].sum() == n - min(int((1 - k) * n), n - 1) >= 1


def test_residual_and_depthwise_ties_come_from_the_models():
  groups = _wired("resnet_tiny")[3].groups
  stem = dict(_group_of(groups, "conv1/kernel").members)  # identity shortcuts tie the stem to layer1's conv2
  assert {"conv1/kernel", "bn1/scale", "bn1/bias", "layer1_0/conv2/kernel", "layer1_0/bn2/scale"} <= set(stem)
  stage2 = dict(_group_of(groups, "layer2_0/shortcut_0/kernel").members)  # projection + conv2 of one block
  assert {"layer2_0/conv2/kernel", "layer2_0/shortcut_1/bias", "layer2_0/bn2/bias"} <= set(stage2)
  assert "linear/kernel" not in masking.scored_kernels(groups)  # the classifier's outputs are never pruned
  assert dict(_group_of(groups, "layer1_0/conv1/kernel").members).keys() == {
    "layer1_0/conv1/kernel",
    "layer1_0/bn1/scale",
    "layer1_0/bn1/bias",
  }
  mobile = _wired("mobilenet_v2_tiny")[3].groups  # the depthwise conv's channel c is its input channel c
  assert "layers_0/conv2/kernel" in dict(_group_of(mobile, "layers_0/conv1/kernel").members)
  wrn = _wired("wrn_tiny")[3].groups  # pre-activation: block2's bn1 normalises block1's residual sum
  assert {"block1/layer_0/conv2/kernel", "block2/layer_0/bn1/scale"} <= set(
    dict(_group_of(wrn, "conv1/kernel").members)
  )


def test_straight_through_gradient_of_a_channel_score_on_a_tiny_conv():
  conv = layers.Conv2d(3, 2, use_bias=False, weight_grad="xla", name="conv")
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
  params = conv.init(jax.random.key(1), x)["params"]
  target = jax.random.normal(jax.random.key(2), (2, 3, 3, 3))
  loss_of_kernel = lambda kernel: jnp.sum((conv.apply({"params": {"kernel": kernel}}, x) - target) ** 2)
  groups = (masking.ChannelGroup((("kernel", (0, 1, 2)),)),)
  scores = {"kernel": jnp.array([0.7, -0.2, -0.9])}  # k=2/3 keeps channels 0 and 2
  grads = jax.grad(lambda s: loss_of_kernel(masking.apply_masks(params, s, 2 / 3, groups=groups)["kernel"]))(scores)
  w = params["kernel"]
  w_eff = w * jnp.array([1.0, 0.0, 1.0])
  dl_dw_eff = jax.grad(loss_of_kernel)(w_eff)
  expected = jnp.sum(w * dl_dw_eff, axis=(0, 1, 2)) * jnp.sign(scores["kernel"])
  np.testing.assert_allclose(grads["kernel"], expected, rtol=1e-5)
  assert grads["kernel"][1] != 0  # the pruned channel's score still learns


FAST_FAMILIES = ["cnn_tiny", "resnet_tiny", "mobilenet_v2_tiny"]
SLOW_FAMILIES = ["vgg_tiny", "wrn_tiny", "googlenet_tiny", "resnet_imagenet_tiny"]


def _compact_matches_masked(name, k=0.5):
  model, x, variables, wiring = _wired(name)
  scores = masking.init_channel_scores(variables["params"], "kaiming_normal", jax.random.key(1), wiring.groups)
  export_dense = jax.jit(masking.export_dense, static_argnames=("k", "groups"))
  masked = {**variables, "params": export_dense(variables["params"], scores, k=k, groups=wiring.groups)}
  small, plan = channels.compact_variables(
    wiring, masked, channels.pruned_units(wiring, _masks(variables, scores, k, wiring.groups))
  )
  compact = models.get_model(name, 10, channel_plan=plan)
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(masked, x)
  got = jax.jit(lambda v, x: compact.apply(v, x, train=False))(small, x)
  np.testing.assert_allclose(got, expected, atol=1e-5 * float(jnp.max(jnp.abs(expected))))
  assert sum(w.size for w in jax.tree.leaves(small)) < sum(w.size for w in jax.tree.leaves(variables))
  for group in wiring.groups:  # every layer keeps exactly its group's count
    for name_, _ in group.members:
      if name_.endswith("/kernel"):
        assert plan[name_.removesuffix("/kernel")] <= group.kept(k) * len(
          [g for g in wiring.groups if name_ in dict(g.members)]
        )


@pytest.mark.parametrize("name", FAST_FAMILIES)
def test_compact_logits_equal_masked_logits(name):
  _compact_matches_masked(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FAMILIES)
def test_compact_logits_equal_masked_logits_more_families(name):
  _compact_matches_masked(name)


# ----------------------------------------------------------------------------------------------------------
# Runs: a saved channel checkpoint, exported and evaluated compact through the command line.


def _channel_run(tmp_path, k=0.5):
  config = tiny_config(**{"mask.granularity": "channel", "k": k, "stage": "prune", "source": "unused"})
  variables = sources.init_variables(config, jax.random.key(0))
  scores = masking.init_channel_scores(
    variables["params"], "kaiming_normal", jax.random.key(1), sources.mask_groups(config)
  )
  workdir = str(tmp_path / "prune")
  pipeline.save_source(config, workdir, "prune", variables["params"], {}, scores)
  return config, workdir


def _config_file(path):
  spec = importlib.util.spec_from_file_location("config_file", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "hydra_jax", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_compact_export_round_trips_and_evaluates_like_the_masked_network(tmp_path):
  config, workdir = _channel_run(tmp_path)
  out = str(tmp_path / "small.npz")
  assert "of 1,286 parameters" in export.export_compact(config, workdir, out)
  small = export.read_compact(out)
  assert small.channel_plan == {"0": 2, "2": 4, "5": 8, "7": 10}  # cnn_tiny's 4, 8, 16 channels halved; 10 logits
  x = jax.random.uniform(jax.random.key(5), (3, 8, 8, 1))
  expected = export.load_run(workdir, config=config)(x)
  np.testing.assert_allclose(small(x), expected, atol=1e-5)
  np.testing.assert_allclose(export.load_run(workdir, compact=True)(x), expected, atol=1e-5)
  compact_eval = export.evaluate_checkpoint(config, workdir, methods=["clean"], progress=False, compact=True)
  masked_eval = export.evaluate_checkpoint(config, workdir, methods=["clean"], progress=False)
  assert compact_eval["clean"] == pytest.approx(masked_eval["clean"], abs=1e-6)


@pytest.mark.slow
def test_compact_export_loads_and_evaluates_through_the_cli(tmp_path):
  config, workdir = _channel_run(tmp_path)
  flags = [
    "--config",
    "configs/digits_demo.py:model=cnn_tiny",
    "--config.data.image_size=8",
    "--config.mask.granularity=channel",
    "--config.k=0.5",
    "--config.eval.steps=1",
    "--workdir",
    workdir,
  ]
  out = str(tmp_path / "small.npz")
  result = _cli("export", *flags, "--compact", f"--out={out}")
  assert "wrote" in result.stdout, result.stderr
  small = export.read_compact(out)
  assert small.channel_plan == {"0": 2, "2": 4, "5": 8, "7": 10}  # cnn_tiny's 4, 8, 16 channels halved
  x = jax.random.uniform(jax.random.key(5), (3, 8, 8, 1))
  expected = export.load_run(workdir, config=config)(x)
  np.testing.assert_allclose(small(x), expected, atol=1e-5)
  compact_eval = json.loads(_cli("eval", *flags, "--methods=clean", "--compact").stdout)
  demo = _config_file("configs/digits_demo.py").get_config("model=cnn_tiny")  # the config the CLI ran
  demo.data.image_size, demo.mask.granularity, demo.k = 8, "channel", 0.5
  masked_eval = export.evaluate_checkpoint(demo, workdir, methods=["clean"], progress=False)
  assert compact_eval["num_examples"] == 360 and compact_eval["clean"] == pytest.approx(masked_eval["clean"], abs=1e-6)


def test_bad_channel_input_is_a_one_line_error(tmp_path):
  with pytest.raises(errors.ConfigError, match="mask.granularity='sparse' is invalid; valid: weight, channel"):
    config_lib.check_config(tiny_config(**{"mask.granularity": "sparse"}))
  with pytest.raises(errors.ConfigError, match="use --config.baselines=lwm"):
    config_lib.check_config(tiny_config(**{"mask.granularity": "channel", "stage": "all", "baselines": ("snip",)}))
  with pytest.raises(errors.ConfigError, match="needs mask.granularity='weight'"):
    config_lib.check_config(tiny_config(**{"mask.granularity": "channel", "mask.scope": "global"}))
  with pytest.raises(errors.ConfigError, match="score_init='snip' is invalid"):
    config_lib.check_config(tiny_config(**{"mask.granularity": "channel", "stages.prune.score_init": "snip"}))
  config, workdir = _channel_run(tmp_path)
  with pytest.raises(errors.ConfigError, match="exports its masked weights"):
    export.export_checkpoint(config, workdir, str(tmp_path / "scores.npz"), dense=False)
  with pytest.raises(errors.UserError, match="run with --config.mask.granularity=channel"):
    export.load_run(workdir, config=tiny_config())  # a channel run read as a weight run
  weight_config = tiny_config(**{"stage": "prune", "source": "unused"})
  variables = sources.init_variables(weight_config, jax.random.key(0))
  scores = masking.init_scores(variables["params"], "scaled", jax.random.key(1))
  pipeline.save_source(weight_config, str(tmp_path / "weights"), "prune", variables["params"], {}, scores)
  with pytest.raises(errors.ConfigError, match="needs a prune / finetune run trained with --config.mask.granularity"):
    export.load_run(str(tmp_path / "weights"), compact=True)


def test_channel_k_keeps_at_least_one_channel_of_every_group():
  group = masking.ChannelGroup((("kernel", (0, 1, 2)),))
  assert [group.kept(k) for k in (1e-9, 0.2, 0.34, 1.0)] == [1, 1, 2, 3]
  with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
    masking.channel_masks({"kernel": jnp.ones((1, 3))}, {"kernel": jnp.ones(3)}, 0.0, (group,))


class _Grouped(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    return layers.Conv2d(4, 1, groups=2, name="conv")(x)


def test_a_grouped_conv_that_is_not_depthwise_is_named():
  variables = jax.eval_shape(lambda: _Grouped().init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)), train=False))
  with pytest.raises(channels.UnsupportedModelError, match="grouped conv 'params/conv/kernel'"):
    channels.trace_wiring(_Grouped(), variables, (1, 2, 2, 4))


@pytest.mark.slow
def test_stage_all_with_channels_runs_hydra_and_the_channel_lwm_on_eight_devices(tmp_path):
  overrides = {"mask.granularity": "channel", "parallel.mode": "shard_map"}
  config = tiny_config(**overrides, stage="all", ks=(0.5,), baselines=("lwm",))
  rows = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [row["method"] for row in rows] == ["dense", "hydra (prune only)", "hydra", "lwm"]
  # The channel LWM keeps the half of each layer's filters with the largest L1 norm of the pretrained weights.
  pretrained = export.load_run(str(tmp_path / "pretrain")).variables["params"]
  lwm = export.load_run(str(tmp_path / "k0.5" / "lwm" / "mask"), compact=True).variables
  kept_inputs = np.arange(1)
  for layer in ("0", "2"):
    kernel = np.asarray(pretrained[layer]["kernel"])
    norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)
    kept = np.sort(np.argsort(-norms)[: kernel.shape[-1] // 2])
    np.testing.assert_array_equal(lwm["params"][layer]["kernel"], kernel[:, :, kept_inputs][..., kept])
    kept_inputs = kept


@pytest.mark.slow
def test_a_channel_prune_step_on_eight_devices_gives_the_single_device_result(tmp_path):
  config = tiny_config(**{"model.name": "vgg_tiny", "mask.granularity": "channel", "stage": "prune", "k": 0.5})
  config.source = str(tmp_path / "source")
  variables = sources.init_variables(config, jax.random.key(0))
  scores = masking.init_channel_scores(variables["params"], "scaled", jax.random.key(1), sources.mask_groups(config))
  pipeline.save_source(config, config.source, "source", variables["params"], variables["batch_stats"], scores)
  batches = [data.train_batches("digits", 32, seed=0).batch_at(i) for i in range(2)]
  state, tx = train.initial_state(config, "prune", steps_per_epoch=10, batch_shape=batches[0]["image"].shape)
  assert jax.tree.leaves(state.scores)[0].ndim == 1  # one score per output channel

  single, _ = run_train_steps(config, state, tx, batches, "single", steps_per_epoch=10)
  multi, _ = run_train_steps(config, state, tx, batches, "shard_map", steps_per_epoch=10)
  for a, b in zip(jax.tree.leaves((single.params, single.scores)), jax.tree.leaves((multi.params, multi.scores))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert not np.allclose(jax.tree.leaves(single.scores)[0], jax.tree.leaves(state.scores)[0])  # scores trained
  kernels = [(a, b) for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(state.params)) if a.ndim > 1]
  assert all(np.array_equal(a, b) for a, b in kernels)  # weights frozen in prune


# ----------------------------------------------------------------------------------------------------------
# A concatenation of unequal branches, and a group of several kernels, on hand-sized networks.


class _TwoBranches(nn.Module):
  """Two convs of unequal widths concatenated on channels, then a conv and a dense classifier; `widths` gives
  every module's output channels (the compact network is the same class with smaller widths)."""

  widths: tuple[tuple[str, int], ...] = (("narrow", 3), ("wide", 5), ("joint", 4))

  @nn.compact
  def __call__(self, x, train=False):
    width = dict(self.widths)
    branches = [nn.relu(nn.Conv(width[name], (3, 3), name=name)(x)) for name in ("narrow", "wide")]
    h = nn.relu(nn.Conv(width["joint"], (3, 3), strides=2, name="joint")(jnp.concatenate(branches, -1)))
    return nn.Dense(10, name="head")(h.reshape(len(h), -1))


def test_a_concatenation_of_unequal_branches_feeds_each_kept_channel_to_the_right_kernel_rows():
  """The channels after the concatenation are the narrow branch's, then the wide branch's; the compact network
  (each branch and the joint conv at half width) gives the masked network's logits."""
  model, x = _TwoBranches(), jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 6, 2)), jnp.float32)
  rng = np.random.default_rng(1)  # numpy draws of the eval_shape'd variables: nothing compiled but the two applies
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  variables = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), jnp.float32), shapes)
  wiring = channels.trace_wiring(model, variables, x.shape)
  assert [len(group.members[0][1]) for group in wiring.groups] == [4, 3, 5]  # joint, narrow, wide (by name)
  scores = {name: {"kernel": jnp.asarray(rng.normal(size=width), jnp.float32)} for name, width in model.widths}
  scores["head"] = {"kernel": None}  # the classifier's outputs are never pruned
  masks = _masks(variables, scores, 0.5, wiring.groups)
  masked = jax.tree_util.tree_map_with_path(
    lambda path, leaf: leaf * masks.get(masking.path_name(path), 1.0), variables["params"]
  )
  masked = {"params": masked}
  small, plan = channels.compact_variables(wiring, masked, channels.pruned_units(wiring, masks))
  assert plan == {"narrow": 2, "wide": 3, "joint": 2, "head": 10}  # n - floor(n / 2) of 3, 5 and 4
  compact = _TwoBranches(tuple((name, plan[name]) for name in ("narrow", "wide", "joint")))
  expected = jax.jit(model.apply)(masked, x)
  # Same sums in the same order except for the terms of pruned channels (exact zeros): float32 rounding of a
  # 3x3x8-term conv and a 36-term dense layer at most.
  np.testing.assert_allclose(jax.jit(compact.apply)(small, x), expected, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_a_group_of_two_kernels_ranks_units_by_summed_scores_and_trains_both_kernels_scores():
  """A residual group spans a block's conv and its shortcut (whose channel c holds unit 5 - c here) and a
  BatchNorm scale: a unit's score is |s_conv| + |s_shortcut|, and each kernel's score gets its unit's
  straight-through cotangent (the sum over the members' mask cotangents), times sign(s)."""
  n, k = 6, 0.5
  reverse = tuple(range(n - 1, -1, -1))
  group = masking.ChannelGroup(
    (("conv/kernel", tuple(range(n))), ("norm/scale", tuple(range(n))), ("shortcut/kernel", reverse))
  )
  params = {
    "conv": {"kernel": jnp.ones((3, 3, 2, n))},
    "norm": {"scale": jnp.ones(n)},
    "shortcut": {"kernel": jnp.ones((1, 1, 2, n))},
  }
  rng = np.random.default_rng(0)
  by_unit = {"conv": [0.9, -0.1, 0.5, 0.3, -0.7, 0.2], "shortcut": [0.05, 1.2, -0.1, 0.8, 0.15, -0.45]}
  scores = {"conv": jnp.array(by_unit["conv"]), "shortcut": jnp.array(by_unit["shortcut"][::-1])}  # channel c: unit 5-c
  tree = {"conv": {"kernel": scores["conv"]}, "norm": {"scale": None}, "shortcut": {"kernel": scores["shortcut"]}}
  unit = np.abs(np.asarray(scores["conv"])) + np.abs(np.asarray(scores["shortcut"]))[list(reverse)]  # float32
  kept = numpy_topk_mask(unit, k)  # units 1, 3, 0 (summed 1.3, 1.1, 0.95)
  assert not np.array_equal(kept, numpy_topk_mask(scores["conv"], k))  # the first kernel alone ranks otherwise
  masks = _channel_masks(params, tree, k, groups=(group,))
  np.testing.assert_array_equal(masks["conv/kernel"], kept)
  np.testing.assert_array_equal(masks["norm/scale"], kept)
  np.testing.assert_array_equal(masks["shortcut/kernel"], kept[list(reverse)])

  upstream = {name: jnp.asarray(rng.normal(size=n), jnp.float32) for name in masks}
  loss = lambda tree: sum(jnp.vdot(m, upstream[name]) for name, m in _channel_masks(params, tree, k, (group,)).items())
  grads = jax.jit(jax.grad(loss))(tree)
  cotangent = sum(np.asarray(upstream[name])[list(index)] for name, index in group.members)  # per unit
  np.testing.assert_allclose(grads["conv"]["kernel"], np.sign(scores["conv"]) * cotangent, rtol=1e-6)
  np.testing.assert_allclose(
    grads["shortcut"]["kernel"], np.sign(scores["shortcut"]) * cotangent[list(reverse)], rtol=1e-6
  )
  assert np.all(np.asarray(grads["conv"]["kernel"]) != 0) and np.all(np.asarray(grads["shortcut"]["kernel"]) != 0)
