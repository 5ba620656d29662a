"""Tests of the training pipeline: stage freezing, parallel == single device, exact resume, errors."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import convert
from hydra_jax import data
from hydra_jax import errors
from hydra_jax import export
from hydra_jax import masking
from hydra_jax import metrics as metrics_lib
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel
from hydra_jax import pipeline
from hydra_jax import sources
from hydra_jax import train
from tests import pipeline_helpers as ph


def tiny_config(**overrides):
  """cnn_tiny-like runs on digits: a few steps per stage, cheap evaluation."""
  config = config_lib.default_config()
  config.model.name = "vgg_tiny"  # has BatchNorm, conv and dense biases
  config.data.name = "digits"
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.eval_examples = 40  # the first 40 of the 360 test images, in a padded batch of 64
  config.data.prefetch = 0
  config.objective = config_lib.objective_config("pgd_at")
  config.objective.eps, config.objective.step_size, config.objective.steps = 0.1, 0.05, 2
  config.eval.eps, config.eval.step_size, config.eval.steps = 0.1, 0.05, 2
  for stage in config_lib.STAGES:
    config.stages[stage].epochs = 1
  config.stages.pretrain.lr = 0.05
  config.log.progress = False
  config.log.every_steps = 5
  config.checkpoint.async_save = False
  config.parallel.mode = "single"
  return ph.override(config, **overrides)


def digits_batch(size=16):
  return data.train_batches("digits", size, seed=0).batch_at(0)


def make_state(config, stage, batch):
  """Initial state of `stage` (prune/finetune from a fresh model written as a source checkpoint)."""
  return train.initial_state(config, stage, steps_per_epoch=10, batch_shape=batch["image"].shape)


def step_fn(config, tx, mode_axis=None):
  """The per-device step for a runner (which supplies axis_name)."""
  apply_fn = models.make_apply_fn(sources.build_model(config, mode_axis))
  return functools.partial(
    train.train_step,
    apply_fn=apply_fn,
    objective=objectives.get_objective(config.objective.name),
    config=config,
    tx=tx,
    k=config.k,
    steps_per_epoch=10,
  )


def single_step(config, tx):
  """The step on one device, jitted."""
  return jax.jit(functools.partial(step_fn(config, tx), axis_name=None))


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  train.run_stage(tiny_config(**{"stages.pretrain.epochs": 1}), workdir)
  return workdir


def test_param_kinds_tell_batchnorm_from_conv_and_dense_biases():
  config = tiny_config()
  params = sources.init_variables(config, jax.random.PRNGKey(0))["params"]
  kinds = {masking.path_name(p): kind for p, kind in jax.tree_util.tree_flatten_with_path(optim.param_kinds(params))[0]}
  norm = sorted(name for name, kind in kinds.items() if kind == "norm")
  assert norm and all(name.rsplit("/", 1)[1] in ("scale", "bias") for name in norm)
  biases = [name for name in kinds if name.endswith("bias") and name not in norm]
  assert biases, "vgg_tiny has dense biases"
  # Every BN module has both scale and bias labelled norm; nothing with a kernel is.
  for name in norm:
    module = name.rsplit("/", 1)[0]
    assert f"{module}/kernel" not in kinds and {f"{module}/scale", f"{module}/bias"} <= set(norm)


def test_prune_trains_only_scores_and_batchnorm(pretrained_dir):
  batch = digits_batch()
  for freeze_bn in (False, True):
    config = tiny_config(stage="prune", source=pretrained_dir, k=0.1, freeze_bn=freeze_bn)
    state, tx = make_state(config, "prune", batch)
    new_state = state
    for _ in range(2):
      new_state, _ = single_step(config, tx)(new_state, batch)
    kinds = optim.param_kinds(state.params)
    for (path, before), after, kind in zip(
      jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(new_state.params), jax.tree.leaves(kinds)
    ):
      changed = not np.array_equal(before, after)
      assert changed == (kind == "norm" and not freeze_bn), (masking.path_name(path), freeze_bn)
    assert all(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.scores), jax.tree.leaves(new_state.scores))
    )
    # BN running statistics update in every stage (reference behaviour).
    assert not np.array_equal(jax.tree.leaves(state.batch_stats)[0], jax.tree.leaves(new_state.batch_stats)[0])


def test_prune_scores_start_scaled_from_the_pretrained_weights(pretrained_dir):
  config = tiny_config(stage="prune", source=pretrained_dir, k=0.1)
  state, _ = make_state(config, "prune", digits_batch())
  params, _, _ = sources.load_source(config)
  expected = masking.init_scores(params, "scaled", jax.random.PRNGKey(0))
  for got, want in zip(jax.tree.leaves(state.scores), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.fixture(scope="module")
def pruned_dir(pretrained_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("prune"))
  train.run_stage(tiny_config(stage="prune", source=pretrained_dir, k=0.1), workdir)
  return workdir


def test_finetune_keeps_the_mask_and_pruned_weights_at_exactly_zero(pruned_dir):
  config = tiny_config(stage="finetune", source=pruned_dir, k=0.1)
  batch = digits_batch()
  state, tx = make_state(config, "finetune", batch)
  _, _, source_scores = sources.load_source(config)
  masks = masking.compute_masks(state.scores, 0.1)
  run = single_step(config, tx)
  current = state
  for _ in range(3):
    current, _ = run(current, batch)
    pruned = jax.tree.map(
      lambda w, m: None if m is None else np.asarray(w)[np.asarray(m) == 0],
      current.params,
      masks,
      is_leaf=lambda x: x is None,
    )
    assert all(np.all(values == 0) for values in jax.tree.leaves(pruned))
  for s0, s1, src in zip(
    jax.tree.leaves(state.scores), jax.tree.leaves(current.scores), jax.tree.leaves(source_scores)
  ):
    np.testing.assert_array_equal(s0, s1)  # scores frozen...
    np.testing.assert_array_equal(s0, src)  # ...and taken from the prune checkpoint
  assert any(
    not np.array_equal(w0, w1) for w0, w1 in zip(jax.tree.leaves(state.params), jax.tree.leaves(current.params))
  )  # weights train


def test_mask_is_computed_once_per_step_never_inside_the_attack(pretrained_dir, monkeypatch):
  config = tiny_config(stage="prune", source=pretrained_dir, k=0.1)
  config.objective.steps = 7
  batch = digits_batch()
  state, tx = make_state(config, "prune", batch)
  ranked = []  # the number of layers of each call of the one mask function
  real = masking.topk_masks
  monkeypatch.setattr(masking, "topk_masks", lambda scores, ks: ranked.append(len(scores)) or real(scores, ks))
  single_step(config, tx).lower(state, batch)
  assert ranked == [len(masking.prunable_paths(state.params))]  # every layer once, not x attack steps


def _single_and_multi(config, state, tx, batches, mode):
  """(final state, last metrics) of the steps on `batches`, on one device and on 8 devices in `mode`."""

  def run(mode, axis):
    runner = parallel.make_runner(step_fn(config, tx, axis), mode, carry_fields=("carry",))
    current = runner.put_state(state)
    for batch in batches:
      current, metrics = runner(current, runner.put_batch(batch))
    return runner.get_state(current), metrics

  return run("single", None), run(mode, parallel.AXIS)


# The default run takes each runner once (benign on shard_map, PGD with its per-position random start on pmap; about
# 8 s of CPU each); the other pairs, TRADES and smoothing are slow.
_DEFAULT_RUNNER_RUNS = {("benign", "shard_map"), ("pgd_at", "pmap")}


@pytest.mark.devices(8)
@pytest.mark.parametrize(
  "objective, mode",
  [
    pytest.param(objective, mode, marks=() if (objective, mode) in _DEFAULT_RUNNER_RUNS else pytest.mark.slow)
    for objective in ("benign", "pgd_at", "trades", "smooth")
    for mode in ("pmap", "shard_map")
  ],
)
def test_eight_devices_give_the_single_device_result(mode, objective, pretrained_dir):
  config = tiny_config(stage="prune", source=pretrained_dir, k=0.1)
  config.objective = config_lib.objective_config(objective)
  if objective != "smooth":  # pgd_at with its random start: draws keyed by position in the global batch
    config.objective.eps, config.objective.step_size, config.objective.steps = 0.1, 0.05, 2
  batches = [data.train_batches("digits", 32, seed=0).batch_at(i) for i in range(3)]
  state, tx = make_state(config, "prune", batches[0])
  (single, single_metrics), (multi, multi_metrics) = _single_and_multi(config, state, tx, batches, mode)
  for a, b in zip(
    jax.tree.leaves((single.params, single.scores, single.batch_stats)),
    jax.tree.leaves((multi.params, multi.scores, multi.batch_stats)),
  ):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(single_metrics["loss"], np.mean(multi_metrics["loss"]), rtol=1e-5)


@pytest.mark.slow  # 15 CPU s each; MixTrain's loss is checked by default in test_verified_objectives
@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_mixtrain_on_eight_devices_gives_the_single_device_result(mode):
  config = tiny_config(**{"model.name": "cnn_tiny"})  # a chain, as symbolic intervals need
  config.objective = config_lib.objective_config("mixtrain")
  config.objective.eps, config.objective.schedule_length, config.objective.mixtraink = 0.05, 0, 2
  batches = [data.train_batches("digits", 16, seed=0).batch_at(i) for i in range(3)]
  state, tx = make_state(config, "pretrain", batches[0])
  (single, single_metrics), (multi, multi_metrics) = _single_and_multi(config, state, tx, batches, mode)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(multi.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # One coin for the whole global batch, and the robust loss over k = 2 examples in total (not 2 per device).
  assert np.all(np.asarray(multi_metrics["drawn"]) == float(single_metrics["drawn"]))
  np.testing.assert_allclose(np.mean(multi_metrics["robust_loss"]), single_metrics["robust_loss"], rtol=1e-5)
  np.testing.assert_allclose(np.mean(multi_metrics["loss"]), single_metrics["loss"], rtol=1e-5)


def test_snip_gradients_with_a_random_start_objective_do_not_depend_on_the_device_count(pretrained_dir):
  config = tiny_config(stage="prune", source=pretrained_dir)  # pgd_at, random start
  params, batch_stats, _ = sources.load_source(config)
  batch = data.train_batches("digits", 16, seed=0).batch_at(0)
  grads = {
    mode: sources.snip_gradients(config, params, batch_stats, [batch], jax.random.PRNGKey(3), mode)
    for mode in ("single", "shard_map")
  }
  for a, b in zip(jax.tree.leaves(grads["single"]), jax.tree.leaves(grads["shard_map"])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_free_adversarial_carry_is_split_over_devices_and_reset_each_epoch(pretrained_dir):
  config = tiny_config(stage="prune", source=pretrained_dir, k=0.1)
  config.objective = config_lib.objective_config("free")
  config.objective.eps, config.objective.replays = 0.1, 2
  batch = digits_batch(32)
  state, tx = make_state(config, "prune", batch)
  assert state.carry.shape == batch["image"].shape
  outputs = {}
  for mode, axis in (("single", None), ("shard_map", parallel.AXIS)):
    runner = parallel.make_runner(step_fn(config, tx, axis), mode, carry_fields=("carry",))
    current = runner.put_state(state)
    current, _ = runner(current, runner.put_batch(batch))
    outputs[mode] = runner.get_state(current)
  np.testing.assert_allclose(outputs["single"].carry, outputs["shard_map"].carry, atol=1e-6)
  carry = np.asarray(outputs["single"].carry)
  assert np.abs(carry).max() <= 0.1 + 1e-7 and np.abs(carry).max() > 0  # stepped by eps, clipped to eps
  # At an epoch start (step % steps_per_epoch == 0) the carried perturbation restarts from init_carry.
  at_epoch_start = outputs["single"].replace(step=jnp.int32(10))
  after, _ = single_step(config, tx)(at_epoch_start, batch)
  fresh, _ = single_step(config, tx)(at_epoch_start.replace(carry=jnp.zeros_like(carry)), batch)
  np.testing.assert_array_equal(after.carry, fresh.carry)


def run_to_end(config, workdir):
  summary = train.run_stage(config, workdir)
  items, _ = checkpoints.restore(
    workdir,
    {
      "model": jax.eval_shape(
        lambda: {
          "params": sources.init_variables(config, jax.random.PRNGKey(0))["params"],
          "batch_stats": sources.init_variables(config, jax.random.PRNGKey(0))["batch_stats"],
          "scores": None,
        }
      )
    },
  )
  return summary, items["model"]


def test_a_stopped_run_resumes_to_bit_identical_params(tmp_path):
  config = tiny_config(**{"stages.pretrain.epochs": 2, "checkpoint.every_steps": 4})
  config.objective = config_lib.objective_config("trades")
  config.objective.steps = 2
  _, straight = run_to_end(config, str(tmp_path / "straight"))
  interrupted = str(tmp_path / "interrupted")
  stopped = train.run_stage(config_lib.stage_config(config, "pretrain", stop_after_steps=7), interrupted)
  assert stopped["step"] == 7 and checkpoints.read_meta(interrupted)[0] == 7
  summary, resumed = run_to_end(config, interrupted)
  assert summary["step"] == summary["total_steps"] == 2 * 44
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_nan_is_caught_before_a_mid_epoch_save(tmp_path):
  workdir = str(tmp_path / "run")
  exploding = tiny_config(
    **{"stages.pretrain.epochs": 2, "stages.pretrain.lr": 1e30, "checkpoint.every_steps": 2, "log.every_steps": 100}
  )
  with pytest.raises(FloatingPointError, match="before step 2.*No checkpoint was saved"):
    train.run_stage(exploding, workdir)
  assert not [name for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]


def test_cadence_checks_finite_metrics_before_every_save():
  # 23 steps of 10 per epoch: epoch ends at 10, 20 and the stage end 23; evaluation every 2 epochs and at the end.
  for save_every, saves in ((0, {10, 20, 23}), (3, {3, 6, 9, 10, 12, 15, 18, 20, 21, 23})):
    todo = {
      done: metrics_lib.cadence(
        done, steps_per_epoch=10, total_steps=23, stop=23, log_every=7, eval_every_epochs=2, save_every=save_every
      )
      for done in range(1, 24)
    }
    assert {done for done, t in todo.items() if t.save} == saves
    assert {done for done, t in todo.items() if t.log} == saves | {7, 14, 21}
    assert {done for done, t in todo.items() if t.evaluate} == {20, 23}
  stopped = metrics_lib.cadence(
    5, steps_per_epoch=10, total_steps=23, stop=5, log_every=7, eval_every_epochs=1, save_every=0
  )
  assert stopped == metrics_lib.Cadence(log=True, evaluate=False, save=True)  # an early stop saves, without evaluation


def test_errors_of_the_best_checkpoint_manager_are_raised(tmp_path, monkeypatch):
  ocp = pytest.importorskip("orbax.checkpoint")
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=1, async_save=True)
  ckpt.save(1, {"model": {"w": jnp.ones(2)}}, meta={}, sparsity="{}", metrics={"robust": 0.5})
  real = ocp.CheckpointManager.check_for_errors

  def failing_best(manager):  # an async save of best/ that failed in the background
    if os.path.basename(str(manager.directory)) == "best":
      raise RuntimeError("the save of best/1 failed")
    return real(manager)

  monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", failing_best)
  with pytest.raises(RuntimeError, match="best/1 failed"):
    ckpt.wait()


def test_eval_examples_keeps_exactly_the_first_examples():
  full = data.eval_batches("digits", 8)
  first = data.first_examples(full, 10)
  assert first.num_steps == 2
  batches = [first.batch_at(i) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1] * 10 + [0] * 6)
  reference = np.concatenate([full.batch_at(i)["image"] for i in range(2)])[:10]
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:10], reference)
  assert data.first_examples(full, 0) is full and data.first_examples(full, 10_000) is full


def test_resume_under_the_other_prng_setting_is_refused(pretrained_dir):
  config = tiny_config(**{"stages.pretrain.epochs": 1, "threefry_partitionable": True})
  with pytest.raises(checkpoints.CheckpointError, match="threefry_partitionable=False.*this run has True"):
    train.run_stage(config, pretrained_dir)


def test_lwm_from_a_reference_checkpoint_with_random_scores_is_magnitude_pruning(tmp_path):
  torch = pytest.importorskip("torch")
  config = tiny_config()
  variables = sources.init_variables(config, jax.random.PRNGKey(3))
  random_scores = masking.init_scores(variables["params"], "uniform", jax.random.PRNGKey(4))  # subnet layers' init
  source = str(tmp_path / "checkpoint.pth.tar")
  torch.save(
    {
      "epoch": 100,
      "state_dict": convert.to_torch_state_dict(
        variables, random_scores, model_name="vgg_tiny", input_shape=config_lib.image_shape(config), as_torch=True
      ),
    },
    source,
  )
  lwm = tiny_config(stage="finetune", source=source, k=0.1, **{"stages.finetune.score_init": "scaled"})
  state, _ = make_state(lwm, "finetune", digits_batch())
  kept = jax.tree.map(lambda w: np.asarray(w) != 0, state.params)
  for path, w in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    if not masking.is_prunable(path, w):
      continue
    flat = np.abs(np.asarray(w)).ravel()
    magnitude = np.ones(flat.size, bool)
    magnitude[np.argsort(flat, kind="stable")[: int(0.9 * flat.size)]] = False  # drop the smallest |w|
    got = kept
    for key in path:
      got = got[key.key]
    np.testing.assert_array_equal(got.ravel(), magnitude, err_msg=masking.path_name(path))
  # The default finetune init keeps the source's (here random) scores: a different mask.
  source_state, _ = make_state(tiny_config(stage="finetune", source=source, k=0.1), "finetune", digits_batch())
  for got, want in zip(jax.tree.leaves(source_state.scores), jax.tree.leaves(random_scores)):
    np.testing.assert_array_equal(got, want)


def test_snip_from_the_config_scores_the_one_batch_loss_sensitivity(pretrained_dir, tmp_path):
  config = tiny_config(
    stage="prune", source=pretrained_dir, k=0.1, stop_after_steps=1, **{"stages.prune.score_init": "snip"}
  )
  config.objective = config_lib.objective_config("benign")
  batch = data.train_batches("digits", 32, seed=config.seed).batch_at(0)
  state, _ = train.initial_state(config, "prune", 10, batch["image"].shape, first_batch=batch)
  params, batch_stats, _ = sources.load_source(config)
  model = sources.build_model(config)

  def loss(p):  # the benign objective: mean cross-entropy, train-mode BatchNorm, all weights kept
    logits, _ = model.apply(
      {"params": p, "batch_stats": batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  grads = jax.grad(loss)(params)
  flat_scores = jax.tree_util.tree_flatten_with_path(state.scores, is_leaf=lambda x: x is None)[0]
  for (path, score), w, g in zip(flat_scores, jax.tree.leaves(params), jax.tree.leaves(grads)):
    if score is not None:
      np.testing.assert_allclose(
        score, np.abs(np.asarray(w) * np.asarray(g)), rtol=1e-4, atol=1e-9, err_msg=masking.path_name(path)
      )
  assert train.run_stage(config, str(tmp_path / "snip"))["step"] == 1
  with pytest.raises(ValueError, match="'snip' needs the stage's first batch"):
    train.initial_state(config, "prune", 10, batch["image"].shape)


@objectives.register("test_epoch_probe", defaults={}, takes_epoch=True)
def _epoch_probe_loss(apply_fn, variables, batch, key, config, *, epoch):
  """Cross-entropy scaled by the epoch the train step passes; reports that epoch as a metric."""
  del key, config
  logits, variables = apply_fn(variables, batch["image"], True)
  loss = epoch * optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, ({"loss": loss, "epoch": epoch}, variables)


def test_an_objective_that_takes_epoch_gets_the_fraction_of_the_stage_done():
  config = tiny_config()
  config.objective = config_lib.objective_config("test_epoch_probe")
  batch = digits_batch()
  state, tx = make_state(config, "pretrain", batch)  # 10 steps per epoch
  run = single_step(config, tx)
  for step in (0, 7, 25):
    _, metrics = run(state.replace(step=jnp.int32(step)), batch)
    assert metrics["epoch"].dtype == jnp.float32
    np.testing.assert_allclose(metrics["epoch"], step / 10, rtol=1e-7)
  assert float(run(state, batch)[1]["loss"]) == 0.0  # epoch 0 scales the loss to 0


def test_a_checkpoint_saved_on_eight_devices_resumes_on_one(tmp_path):
  config = tiny_config(**{"stages.pretrain.epochs": 2, "parallel.mode": "shard_map"})
  config.objective = config_lib.objective_config("benign")  # no random draws: device counts give the same maths
  workdir = str(tmp_path / "run")
  train.run_stage(config_lib.stage_config(config, "pretrain", stop_after_steps=50), workdir)
  assert checkpoints.read_meta(workdir)[0] == 50
  single = {"parallel.mode": "single"}
  summary, resumed = run_to_end(config_lib.stage_config(config, "pretrain", **single), workdir)
  assert summary["step"] == summary["total_steps"] == 88
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [row["step"] for row in map(json.loads, f) if row["split"] == "train"]
  assert logged == sorted(set(logged)) and 50 in logged and logged[logged.index(50) + 1] == 55  # resumed at 50
  _, straight = run_to_end(config_lib.stage_config(config, "pretrain", **single), str(tmp_path / "straight"))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_errors_name_the_key():
  cases = [
    ({"k": 0.0}, "config.k=0.0 must lie in \\(0, 1\\]"),
    ({"k": 1.5}, "config.k=1.5"),
    ({"stage": "train"}, "config.stage='train' is invalid"),
    ({"model.name": "resnet9"}, "Unknown model 'resnet9'"),
    ({"data.name": "cifar11"}, "cifar11"),
    ({"objective.name": "madry"}, "unknown objective 'madry'"),
    ({"optimizer.name": "lamb"}, "config.optimizer.name='lamb'"),
    ({"stage": "prune"}, "config.source must name the checkpoint"),
    ({"data.batch_size": 0}, "config.data.batch_size must be positive"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      config_lib.check_config(tiny_config(**overrides))
  with pytest.raises(errors.ConfigError, match=r"config.stages.prune.nosuch does not exist"):
    config_lib.lookup(tiny_config(), "stages.prune.nosuch.lr")
  with pytest.raises(errors.ConfigError, match=r"config.stages.prune.nosuch does not exist"):
    config_lib.stage_config(tiny_config(), "prune", **{"stages.prune.nosuch": 1})
  assert config_lib.lookup(tiny_config(), "stages.prune.score_init") == "scaled"


@pytest.mark.devices(8)
def test_batch_that_does_not_divide_over_devices_is_rejected(tmp_path):
  config = tiny_config(**{"parallel.mode": "pmap", "data.batch_size": 36})
  with pytest.raises(ValueError, match="batch size 36 does not divide by the 8 devices"):
    train.run_stage(config, str(tmp_path / "run"))


def test_mismatched_or_corrupt_source_gives_a_clear_error(pretrained_dir, tmp_path):
  other_model = tiny_config(stage="prune", source=pretrained_dir, **{"model.name": "cnn_tiny"})
  with pytest.raises(checkpoints.CheckpointError, match="holds model 'vgg_tiny'.*asks for 'cnn_tiny'"):
    train.run_stage(other_model, str(tmp_path / "prune"))
  assert not os.path.exists(tmp_path / "prune")  # nothing written
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint directory"):
    sources.load_source(tiny_config(stage="prune", source=str(tmp_path / "nowhere")))
  corrupt = tmp_path / "corrupt"
  os.system(f"cp -r {pretrained_dir} {corrupt}")
  step_dir = corrupt / "checkpoints" / str(checkpoints.read_meta(str(corrupt))[0]) / "model"
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoints.CheckpointDamaged, match=r"step \d+ is unreadable: its files are damaged"):
    sources.load_source(tiny_config(stage="prune", source=str(corrupt)))


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"stages.pretrain.epochs": 2})
  train.run_stage(config_lib.stage_config(config, "pretrain", stop_after_steps=10), workdir)
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  exploding = tiny_config(**{"stages.pretrain.epochs": 2, "stages.pretrain.lr": 1e30})
  with pytest.raises(FloatingPointError, match="non-finite training metrics.*checkpoint \\(step 10\\)"):
    train.run_stage(exploding, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == saved


@pytest.mark.parametrize("objective", ["benign", "pgd_at", "trades", "free", "smooth"])
def test_each_objective_lowers_its_loss(objective, tmp_path):
  config = tiny_config(
    **{"stages.pretrain.epochs": 3, "stages.pretrain.lr": 0.01, "model.name": "cnn_tiny", "optimizer.name": "adam"}
  )
  config.objective = config_lib.objective_config(objective)
  config.objective.eps, config.objective.step_size, config.objective.steps = 0.05, 0.025, 2
  config.objective.replays = 2
  config.optimizer.schedule = "constant"
  train.run_stage(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [row["loss"] for row in map(json.loads, f) if row["split"] == "train"]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses


def test_run_writes_config_versions_and_sparsity_beside_checkpoints(pretrained_dir, tmp_path):
  workdir = str(tmp_path / "prune")
  summary = train.run_stage(tiny_config(stage="prune", source=pretrained_dir, k=0.1), workdir)
  step, meta = checkpoints.read_meta(workdir)
  assert meta["stage"] == "prune" and meta["k"] == 0.1 and meta["config"]["model"]["name"] == "vgg_tiny"
  assert set(meta["versions"]) == {"jax", "jaxlib", "flax", "orbax"}
  with open(os.path.join(workdir, "checkpoints", str(step), "sparsity", "metadata")) as f:
    report = json.load(f)
  for layer in report["layers"]:
    assert layer["kept"] == layer["total"] - int(0.9 * layer["total"])
  assert abs(summary["kept_fraction"] - report["kept"] / report["total"]) < 1e-9
  assert json.load(open(os.path.join(workdir, "config.json")))["k"] == 0.1
  assert summary["num_examples"] == 40 and {"clean", "clean_top5", "pgd_linf", "robust"} <= set(summary)
  # One definition of robust accuracy: `hydra-jax eval` of the checkpoint reproduces the run's own evaluation.
  config = tiny_config(stage="prune", source=pretrained_dir, k=0.1)
  again = export.evaluate_checkpoint(config, workdir, progress=False)
  for name in ("num_examples", "clean", "clean_top5", "pgd_linf", "robust"):
    assert again[name] == summary[name], name


def test_k_one_masking_reproduces_the_dense_model_exactly():
  config = tiny_config()
  variables = sources.init_variables(config, jax.random.PRNGKey(0))
  scores = masking.init_scores(variables["params"], "kaiming_normal", jax.random.PRNGKey(1))
  apply_fn = models.make_apply_fn(sources.build_model(config))
  x = digits_batch()["image"]
  dense = apply_fn(variables, x, False)[0]
  masked = apply_fn({**variables, "params": masking.apply_masks(variables["params"], scores, 1.0)}, x, False)[0]
  np.testing.assert_array_equal(masked, dense)


def test_export_writes_exact_zeros_and_reference_layout_torch_state_dicts(pruned_dir, tmp_path):
  torch = pytest.importorskip("torch")
  config = tiny_config(stage="prune")
  run = export.load_run(pruned_dir, config=config)
  for layer in masking.sparsity_report(run.variables["params"]).layers:
    assert layer[1] == layer[2] - int(0.9 * layer[2])  # exported weights: exactly the kept count nonzero

  dense_file, subnet_file = str(tmp_path / "dense.pth"), str(tmp_path / "subnet.pth")
  export.export_checkpoint(config, pruned_dir, dense_file)
  export.export_checkpoint(config, pruned_dir, subnet_file, dense=False)
  shape = config_lib.image_shape(config)
  dense_vars, no_scores = convert.from_torch_state_dict(torch.load(dense_file), "vgg_tiny", 10, shape)
  raw_vars, scores = convert.from_torch_state_dict(torch.load(subnet_file), "vgg_tiny", 10, shape)
  assert no_scores is None
  for a, b in zip(jax.tree.leaves(dense_vars), jax.tree.leaves(run.variables)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(scores), jax.tree.leaves(run.scores)):
    np.testing.assert_array_equal(a, b)
  remasked = masking.export_dense(raw_vars["params"], scores, run.k)  # the subnet file re-masks to the same
  for a, b in zip(jax.tree.leaves(remasked), jax.tree.leaves(run.variables["params"])):
    np.testing.assert_array_equal(a, b)

  size = export.sparse_size(run.variables["params"])
  kernels = [
    w for p, w in jax.tree_util.tree_flatten_with_path(run.variables["params"])[0] if masking.is_prunable(p, w)
  ]
  assert size["dense_bytes"] == 4 * sum(w.size for w in kernels)
  assert size["bcoo_bytes"] == sum(np.count_nonzero(w) * 4 * (1 + w.ndim) for w in kernels)  # values + indices


def test_warmup_adds_epochs_and_every_schedule_warms_up():
  # W = 2 warmup epochs at 0.01, then E = 4 epochs at lr 0.1; the stage trains W + E epochs (reference).
  config = tiny_config(
    **{
      "optimizer.warmup_epochs": 2,
      "optimizer.warmup_lr": 0.01,
      "stages.pretrain.epochs": 4,
      "stages.pretrain.lr": 0.1,
    }
  )
  assert optim.stage_epochs(config, "pretrain") == 6
  half = lambda angle: 0.05 * (1 + np.cos(angle))  # lr/2 (1 + cos)
  pi = np.pi
  expected = {  # lr at the start of epochs 0..5 and at the end of the stage (epoch 6), 3 steps per epoch
    "cosine": [0.01, 0.01, 0.1, half(pi / 4), half(pi / 2), half(3 * pi / 4), 0.0],
    "reference_cosine": [0.01, 0.01, half(-pi / 4), 0.1, half(pi / 4), half(pi / 2), half(3 * pi / 4)],
    "step": [0.01, 0.01, 0.1, 0.1, 0.1, 0.01, 0.001],  # x0.1 from 75% of E, x0.01 from 90%
    "constant": [0.01, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1],
  }
  for schedule, values in expected.items():
    config.optimizer.schedule = schedule
    lr = optim.learning_rate(config, "pretrain", steps_per_epoch=3)
    got = [float(lr(jnp.int32(3 * epoch))) for epoch in range(7)]
    np.testing.assert_allclose(got, values, atol=1e-7, err_msg=schedule)
  config.optimizer.schedule = "reference_cosine"  # per epoch: constant within an epoch
  lr = optim.learning_rate(config, "pretrain", steps_per_epoch=3)
  assert float(lr(jnp.int32(8))) == float(lr(jnp.int32(6))) != float(lr(jnp.int32(9)))


def test_sgd_follows_pytorch_weight_decay_and_momentum():
  config = tiny_config(**{"optimizer.schedule": "constant", "stages.pretrain.lr": 0.1})
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optim.make_optimizer(config, "pretrain", {"params": {"w": "train"}, "scores": None}, steps_per_epoch=1)
  trainable = {"params": params, "scores": None}
  state = tx.init(trainable)
  grads = [np.array([0.5, 0.5]), np.array([-1.0, 0.0]), np.array([0.0, 2.0])]
  w, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:  # torch.optim.SGD: d = g + wd * w; buf = momentum * buf + d; w -= lr * buf
    updates, state = tx.update({"params": {"w": jnp.asarray(g)}, "scores": None}, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    buf = 0.9 * buf + (g + 1e-4 * w)
    w = w - 0.1 * buf
  np.testing.assert_allclose(trainable["params"]["w"], w, rtol=1e-6)


def test_config_arguments_are_typed_and_checked():
  args = config_lib.parse_config_arg("model=wrn_28_4,steps=7,lwm=false", model="vgg16_bn", steps=10, lwm=True)
  assert (args.model, args.steps, args.lwm) == ("wrn_28_4", 7, False)
  with pytest.raises(errors.ConfigError, match="^config argument 'depth=3' is not NAME=VALUE with NAME one of model$"):
    config_lib.parse_config_arg("depth=3", model="vgg16_bn")
  with pytest.raises(
    errors.ConfigError, match="'modle=x' is not NAME=VALUE with NAME one of model, steps .did you mean model"
  ):
    config_lib.parse_config_arg("modle=x", model="vgg16_bn", steps=10)
  with pytest.raises(errors.ConfigError, match="^config argument steps='ten' is not a valid int$"):
    config_lib.parse_config_arg("steps=ten", model="vgg16_bn", steps=10)


def test_summary_table_rows():
  rows = [
    {"method": "hydra", "stage": "finetune", "kept_fraction": 0.01, "clean": 0.5, "robust": 0.25},
    {"method": "dense", "stage": "pretrain", "kept_fraction": 1.0, "clean": 0.875},
  ]
  lines = pipeline.summary_table(rows).splitlines()
  assert lines[1].split() == ["hydra", "finetune", "1.00", "50.00", "25.00"]
  assert lines[2].split() == ["dense", "pretrain", "100.00", "87.50", "-"]
