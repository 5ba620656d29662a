"""Tests of the baselines wired into the pipeline: stage='all' with baselines, and the str / admm stages through
the real train step (hooks, checkpointed aux, exact resume)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import baselines
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import errors
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import parallel
from hydra_jax import pipeline
from hydra_jax import sources
from hydra_jax import train
from tests import pipeline_helpers as ph

STEPS_PER_EPOCH = ph.TENTH_STEPS_PER_EPOCH


def tiny_config(model="vgg_tiny"):
  """Benign (key-free) training on 10% of digits: 4 steps per epoch, one epoch per stage, clean evaluation."""
  return ph.tenth_of_digits_config(model)


def prunable_sizes(config):
  params = jax.eval_shape(lambda: sources.init_variables(config, jax.random.key(0)))["params"]
  return [w.size for path, w in jax.tree_util.tree_flatten_with_path(params)[0] if masking.is_prunable(path, w)]


def checkpoint_items(config, stage):
  """The 'model' and 'train' items a run of `stage` saves, as shapes (the target of checkpoints.restore)."""
  state = jax.eval_shape(lambda s: s, train.initial_state(config, stage, STEPS_PER_EPOCH, (32, 8, 8, 1))[0])
  return {
    "model": {"params": state.params, "batch_stats": state.batch_stats, "scores": state.scores},
    "train": {
      "step": state.step,
      "opt_state": state.opt_state,
      "carry": state.carry,
      "rng": state.rng,
      "aux": state.aux,
    },
  }


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  train.run_stage(config_lib.stage_config(tiny_config(), "pretrain", stop_after_steps=2), workdir)
  return workdir


def test_config_checks_baseline_names_and_the_admm_source():
  config = tiny_config()
  config.baselines = ("lwm", "gmp")
  with pytest.raises(errors.ConfigError, match=r"config.baselines: unknown baseline 'gmp'.*'admm', 'lwm'"):
    config_lib.check_config(config)
  with pytest.raises(errors.ConfigError, match="config.source must name the checkpoint to start stage 'admm'"):
    config_lib.check_config(config_lib.stage_config(tiny_config(), "admm"))
  config_lib.check_config(config_lib.stage_config(tiny_config(), "str"))  # from scratch: no source


@pytest.mark.slow  # 15 CPU s; stage=all with LWM runs by default in test_docs' main job
def test_stage_all_gives_one_row_per_method_at_exactly_k(tmp_path):
  config = tiny_config("cnn_tiny")
  config.stage, config.ks, config.baselines, config.stop_after_steps = "all", (0.1,), ("lwm", "snip", "random"), 2
  rows = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [row["method"] for row in rows] == ["dense", "hydra (prune only)", "hydra", "lwm", "snip", "random"]
  sizes = prunable_sizes(config)
  exact = sum(ph.kept_count(n, 0.1) for n in sizes) / sum(sizes)
  assert rows[0]["kept_fraction"] == 1.0
  for row in rows[1:]:
    assert row["kept_fraction"] == exact and row["step"] == 2, row
  for name in ("lwm", "snip", "random"):  # each baseline's mask and mask-fixed training in its own directory
    assert checkpoints.read_meta(str(tmp_path / "k0.1" / name / "train"))[1]["stage"] == "finetune"
  # Through the real train step, each kept set is exactly the baseline's mask: LWM's the top-k |w| (numpy) of the
  # pretrained weights; random's the top-k |s| of its stored scores, not the top-k |w| of the fresh weights it
  # starts from.
  load = lambda run: sources.load_source(config_lib.stage_config(config, "finetune", source=str(tmp_path / run)))
  pretrained = kernels(load("pretrain")[0])
  random_start, _, random_scores = load("k0.1/random/mask")
  random_masks = [ph.numpy_topk(np.abs(np.asarray(s)), 0.1) for s in jax.tree.leaves(random_scores)]
  magnitude_masks = [ph.numpy_topk(np.abs(w), 0.1) for w in kernels(random_start)]
  assert not all(np.array_equal(a, b) for a, b in zip(random_masks, magnitude_masks, strict=True))
  for name, masks, start in (
    ("lwm", [ph.numpy_topk(np.abs(w), 0.1) for w in pretrained], pretrained),
    ("random", random_masks, kernels(random_start)),
  ):
    for w, mask, w0 in zip(kernels(load(f"k0.1/{name}/train")[0]), masks, start, strict=True):
      np.testing.assert_array_equal(w != 0, mask > 0, err_msg=name)
      assert not np.allclose(w[mask > 0], w0[mask > 0]), name  # the kept weights trained
  with open(tmp_path / "summary.json") as f:
    assert [row["method"] for row in json.load(f)] == [row["method"] for row in rows]


def test_str_stage_reports_the_kept_fraction_of_its_thresholds(tmp_path):
  config = config_lib.stage_config(tiny_config(), "str", stop_after_steps=3, **{"baseline.s_init": -3.0})
  workdir = str(tmp_path / "str")
  summary = train.run_stage(config, workdir)
  items, meta = checkpoints.restore(workdir, {"model": checkpoint_items(config, "str")["model"]})
  params, thresholds = items["model"]["params"], items["model"]["scores"]
  kept = total = 0
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    if masking.is_prunable(path, w):
      s = np.asarray(functools.reduce(lambda tree, key: tree[key.key], path, thresholds))
      assert s.shape == () and s != -3.0  # one threshold per layer, trained
      kept += int(np.sum(np.abs(np.asarray(w)) > 1 / (1 + np.exp(-s))))
      total += w.size
  assert summary["step"] == 3 and 0 < kept < total
  assert summary["kept_fraction"] == kept / total
  assert not meta["has_scores"] and meta["k"] == 1.0
  # A later stage (or eval / export) reads the weights STR's model runs with: exact zeros, no scores.
  weights, _, scores = sources.load_source(config_lib.stage_config(config, "finetune", source=workdir))
  assert scores is None and masking.sparsity_report(weights).kept == kept


def kernels(params):
  """The prunable kernels of `params` as numpy arrays, in the order of jax.tree.leaves of a scores-like tree."""
  return [np.asarray(w) for path, w in jax.tree_util.tree_flatten_with_path(params)[0] if masking.is_prunable(path, w)]


def test_admm_stage_adds_its_penalty_and_updates_z_and_u_at_the_interval(pretrained_dir):
  config = config_lib.stage_config(
    tiny_config(),
    "admm",
    source=pretrained_dir,
    **{
      "baseline.admm_interval_epochs": 1,
      "baseline.rho": 1.0,
      "baseline.rho_growth": 2.0,
      "optimizer.schedule": "constant",
    },
  )
  batch = sources.train_batches(config).batch_at(0)
  state, tx = train.initial_state(config, "admm", STEPS_PER_EPOCH, batch["image"].shape)
  run = jax.jit(
    functools.partial(
      train.train_step,
      apply_fn=models.make_apply_fn(sources.build_model(config)),
      tx=tx,
      k=config.k,
      objective=objectives.get_objective("benign"),
      config=config,
      steps_per_epoch=STEPS_PER_EPOCH,
      axis_name=None,
      hooks=baselines.phase_hooks(config, "admm", STEPS_PER_EPOCH),
    )
  )
  for w, z in zip(kernels(state.params), jax.tree.leaves(state.aux.z), strict=True):
    np.testing.assert_array_equal(z, ph.numpy_project(w, 0.1))  # Z_0 = Pi_k(W_0), U_0 = 0
  # First step (SGD with momentum starts at d = grad, lr 0.01): the same step with rho = 0 differs by exactly
  # lr * rho * (W - Z + U), the gradient of the penalty rho / 2 ||W - Z + U||^2.
  first, _ = run(state, batch)
  free, _ = run(state.replace(aux=state.aux._replace(rho=jnp.float32(0.0))), batch)
  for w, z, a, b in zip(
    kernels(state.params), jax.tree.leaves(state.aux.z), kernels(first.params), kernels(free.params), strict=True
  ):
    np.testing.assert_allclose(a - b, -0.01 * (w - np.asarray(z)), atol=1e-6)
  current = first
  for step in range(1, STEPS_PER_EPOCH + 1):
    before = current
    current, _ = run(current, batch)
    assert float(current.aux.rho) == (2.0 if step == STEPS_PER_EPOCH else 1.0), step  # at 4 batches consumed
  for w, z, u in zip(
    kernels(before.params), jax.tree.leaves(current.aux.z), jax.tree.leaves(current.aux.u), strict=True
  ):  # Z' = Pi_k(W + U), U' = U + W - Z' with the weights before that step, U = 0
    np.testing.assert_allclose(z, ph.numpy_project(w, 0.1), atol=0)
    np.testing.assert_allclose(u, w - ph.numpy_project(w, 0.1), atol=1e-7)


def admm_phase_config(pretrained_dir):
  """Stage 'admm' from the pretrained run: 2 epochs of 4 batches, Z and U updated after every epoch."""
  return config_lib.stage_config(
    tiny_config(), "admm", source=pretrained_dir, **{"stages.admm.epochs": 2, "baseline.admm_interval_epochs": 1}
  )


@pytest.fixture(scope="module")
def admm_phase_dir(pretrained_dir, tmp_path_factory):
  """A finished `admm_phase_config` run: the weights Adv-ADMM's hard prune ranks."""
  workdir = str(tmp_path_factory.mktemp("admm_phase"))
  train.run_stage(admm_phase_config(pretrained_dir), workdir)
  return workdir


def test_a_stopped_admm_stage_resumes_bit_identically_with_its_aux(pretrained_dir, admm_phase_dir, tmp_path):
  config = admm_phase_config(pretrained_dir)
  straight = admm_phase_dir
  interrupted = str(tmp_path / "interrupted")
  train.run_stage(config_lib.stage_config(config, "admm", stop_after_steps=5), interrupted)
  train.run_stage(config, interrupted)
  ends = [checkpoints.restore(workdir, checkpoint_items(config, "admm"))[0] for workdir in (straight, interrupted)]
  assert float(ends[1]["train"]["aux"].rho) == pytest.approx(1e-3 * 1.3)  # updated once, at step 4 (< 5)
  for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(ends[1]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(ends[1]["train"]["step"]) == 2 * STEPS_PER_EPOCH


def test_admm_hard_prune_keeps_the_top_k_of_the_admm_phase_weights(pretrained_dir, admm_phase_dir, tmp_path):
  # pipeline.run_baseline's steps after the phase: the mask from the phase's weights, saved, and the finetune
  # stage's start from it (the real initial_state): exactly the weights W of the phase's end at their top-k |W|.
  config = config_lib.stage_config(tiny_config(), "finetune")
  phase_weights = kernels(sources.load_source(config_lib.stage_config(config, "finetune", source=admm_phase_dir))[0])
  pretrained = kernels(sources.load_source(config_lib.stage_config(config, "finetune", source=pretrained_dir))[0])
  assert not any(np.allclose(a, b) for a, b in zip(phase_weights, pretrained, strict=True))  # the phase trained
  mask_dir = str(tmp_path / "mask")
  pipeline.save_source(config, mask_dir, "admm mask", *pipeline.mask_source(config, "admm", admm_phase_dir))
  finetune = config_lib.stage_config(config, "finetune", source=mask_dir, **{"stages.finetune.score_init": "source"})
  state, _ = train.initial_state(finetune, "finetune", STEPS_PER_EPOCH, (32, 8, 8, 1))
  for start, w in zip(kernels(state.params), phase_weights, strict=True):
    np.testing.assert_array_equal(start, ph.numpy_project(w, 0.1))


@pytest.mark.slow
def test_stage_all_runs_admm_per_k_and_str_once(tmp_path):
  config = tiny_config("cnn_tiny")
  config.stage, config.ks, config.baselines, config.stop_after_steps = "all", (0.1, 0.5), ("admm", "str"), 2
  rows = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [(row["method"], row["stage"]) for row in rows] == [
    ("dense", "pretrain"),
    ("hydra (prune only)", "prune"),
    ("hydra", "finetune"),
    ("admm", "finetune"),
    ("hydra (prune only)", "prune"),
    ("hydra", "finetune"),
    ("admm", "finetune"),
    ("str", "str"),
  ]
  sizes = prunable_sizes(config)
  for row, k in ((rows[3], 0.1), (rows[6], 0.5)):  # the hard prune of the ADMM phase's weights, then retraining
    assert row["kept_fraction"] == sum(ph.kept_count(n, k) for n in sizes) / sum(sizes)
  phase_meta = checkpoints.read_meta(str(tmp_path / "k0.1" / "admm" / "phase"))[1]
  assert phase_meta["stage"] == "admm" and not phase_meta["has_scores"]
  assert 0 < rows[-1]["kept_fraction"] < 1  # s_init = -5: weights below sigmoid(-5) = 0.0067 are zero


@pytest.mark.slow
@pytest.mark.devices(8)
@pytest.mark.parametrize("stage", ["str", "admm"])
def test_str_and_admm_steps_on_eight_devices_equal_one_device(stage, pretrained_dir):
  config = config_lib.stage_config(
    tiny_config(),
    stage,
    source=pretrained_dir if stage == "admm" else "",
    **{"baseline.admm_interval_epochs": 1, "baseline.rho": 0.5},
  )
  batches = [sources.train_batches(config).batch_at(i) for i in range(3)]
  state, tx = train.initial_state(config, stage, 2, batches[0]["image"].shape)  # ADMM updates at step 2
  ends = []
  for mode, axis in (("single", None), ("shard_map", parallel.AXIS), ("pmap", parallel.AXIS)):
    step = functools.partial(
      train.train_step,
      apply_fn=models.make_apply_fn(sources.build_model(config, axis)),
      tx=tx,
      k=config.k,
      objective=objectives.get_objective("benign"),
      config=config,
      steps_per_epoch=2,
      hooks=baselines.phase_hooks(config, stage, 2),
    )
    runner = parallel.make_runner(step, mode, carry_fields=("carry",))
    current = runner.put_state(state)
    for batch in batches:
      current, _ = runner(current, runner.put_batch(batch))
    ends.append(runner.get_state(current))
  if stage == "admm":
    assert float(ends[0].aux.rho) == pytest.approx(0.5 * 1.3)
  for other in ends[1:]:
    for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
