"""HARP in the pipeline: prune learns rates and scores by the one train step (with the hardware loss), finetune keeps
the learned rates with the exact overall kept count, the rates are reported (JSON, PNG), a stopped prune resumes
bit-identical, and 8 devices give the single-device result."""

import functools
import json
import math

import jax
import numpy as np
import pytest

from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import export
from hydra_jax import harp
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import sources
from hydra_jax import train
from tests import pipeline_helpers as ph

K = 0.1
WEIGHTS = sum(math.prod(shape) for shape in ph.KERNEL_SHAPES.values())  # 1248 in cnn_tiny


def harp_config(**overrides):
  """cnn_tiny on 10% of digits (4 steps per epoch), prune for 3 epochs learning rates and scores (k = 0.1)."""
  config = ph.tiny_config(**{"data.data_fraction": 0.1, "eval.methods": ()})
  config.k = K
  config.mask.learn_rates = True
  config.mask.rate_init = "erk"
  config.stages.prune.epochs = 3
  config.stages.prune.lr = 0.05
  return ph.override(config, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("harp")
  config = harp_config(stage="pretrain")
  train.run_stage(config, str(root / "pretrain"))
  prune = config_lib.stage_config(config, "prune", source=str(root / "pretrain"))
  summaries = {"prune": train.run_stage(prune, str(root / "prune"))}
  finetune = config_lib.stage_config(config, "finetune", source=str(root / "prune"))
  summaries["finetune"] = train.run_stage(finetune, str(root / "finetune"))
  return root, prune, summaries


def _rates(workdir, config):
  template = sources.init_variables(config, jax.random.key(0))["params"]
  scores = masking.init_scores(template, "uniform", jax.random.key(0))
  abstract = jax.eval_shape(lambda: harp.init_rates(template, scores, k=0.5, alpha=0.0))
  return checkpoints.restore(workdir, {"rates": abstract})[0]["rates"], scores


def test_prune_learns_rates_and_reports_them(runs):
  root, config, summaries = runs
  report = summaries["prune"]["rates"]
  assert [layer["name"] for layer in report["layers"]] == list(ph.KERNEL_SHAPES)
  start = harp.initial_fractions(
    sources.init_variables(config, jax.random.key(0))["params"], _rates(str(root / "prune"), config)[1], K, "erk"
  )
  learned = [layer["learned_k"] for layer in report["layers"]]
  assert not np.allclose(learned, [start[name] for name in ph.KERNEL_SHAPES], atol=1e-4)  # the rates trained
  assert report["kept"] == round(K * WEIGHTS)
  assert (root / "prune" / "rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((root / "prune" / "summary.json").read_text())["rates"] == report
  logged = [json.loads(line) for line in (root / "prune" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [row for row in logged if row["split"] == "train"]
  assert all({"hw_gamma", "hw_loss", "rate_kept_fraction"} <= row.keys() for row in train_rows)


def test_finetune_keeps_the_learned_rates_with_the_exact_kept_count(runs):
  root, config, summaries = runs
  rates, scores = _rates(str(root / "prune"), config)
  report = summaries["prune"]["rates"]
  weights = export.load_run(str(root / "finetune")).variables["params"]
  kept = masking.sparsity_report(weights)
  assert kept.kept == round(K * WEIGHTS) == 125  # the target exactly: round(124.8)
  assert [k for _, k, _ in kept.layers] == [layer["kept"] for layer in report["layers"]]
  assert summaries["finetune"]["kept_fraction"] == 125 / WEIGHTS
  # The fixed counts keep the learned proportions: each within one weight of the scaled learned fraction.
  learned = np.asarray([layer["learned_k"] * layer["size"] for layer in report["layers"]])
  scaled = learned * 125 / learned.sum()
  assert np.all(np.abs(np.asarray([k for _, k, _ in kept.layers]) - scaled) < 1 + 1e-9) or any(
    k == n for _, k, n in kept.layers
  )
  assert summaries["finetune"]["rates"]["layers"] == report["layers"]  # rates fixed in finetune


def test_a_stopped_harp_prune_resumes_bit_identical(runs, tmp_path):
  root, config, _ = runs
  interrupted = str(tmp_path / "interrupted")
  train.run_stage(config_lib.stage_config(config, "prune", stop_after_steps=5), interrupted)
  train.run_stage(config, interrupted)
  for workdir in (str(root / "prune"), interrupted):
    assert checkpoints.read_meta(workdir)[0] == 12
  straight, resumed = _rates(str(root / "prune"), config)[0], _rates(interrupted, config)[0]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  straight_run, resumed_run = export.load_run(str(root / "prune")), export.load_run(interrupted)
  for a, b in zip(jax.tree.leaves(straight_run.scores), jax.tree.leaves(resumed_run.scores)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 12 CPU s of 8-device compiles; the default run checks 1 = 8 devices for HYDRA
@pytest.mark.devices(8)
def test_a_harp_prune_step_on_eight_devices_gives_the_single_device_result(runs):
  _, config, _ = runs
  batches = [data.train_batches("digits", 32, seed=0).batch_at(i) for i in range(3)]
  state, tx = train.initial_state(config, "prune", steps_per_epoch=2, batch_shape=batches[0]["image"].shape)

  single, single_metrics = ph.run_train_steps(config, state, tx, batches, "single", steps_per_epoch=2)
  multi, multi_metrics = ph.run_train_steps(config, state, tx, batches, "shard_map", steps_per_epoch=2)
  for a, b in zip(jax.tree.leaves((single.rates, single.scores)), jax.tree.leaves((multi.rates, multi.scores))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert not np.allclose(jax.tree.leaves(single.rates), jax.tree.leaves(state.rates))  # rates trained
  np.testing.assert_array_equal(single.aux["frozen_gamma"], multi.aux["frozen_gamma"])
  np.testing.assert_allclose(single_metrics["hw_loss"], np.mean(multi_metrics["hw_loss"]), rtol=1e-5)


def test_rates_only_prune_freezes_the_scores(runs):
  _, config, _ = runs
  config = ph.override(config_lib.stage_config(config, "prune"), **{"mask.learn_scores": False})
  batch = data.train_batches("digits", 32, seed=0).batch_at(0)
  state, tx = train.initial_state(config, "prune", steps_per_epoch=2, batch_shape=batch["image"].shape)
  step = functools.partial(
    train.train_step,
    apply_fn=models.make_apply_fn(sources.build_model(config)),
    objective=objectives.get_objective(config.objective.name),
    config=config,
    tx=tx,
    k=config.k,
    steps_per_epoch=2,
    axis_name=None,
  )
  new, _ = jax.jit(step)(state, batch)
  for a, b in zip(jax.tree.leaves(state.scores), jax.tree.leaves(new.scores)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(jax.tree.leaves(new.rates), jax.tree.leaves(state.rates))


def test_learned_rates_with_a_global_scope_or_channel_erk_are_refused():
  for overrides, match in (
    ({"mask.granularity": "channel"}, "rate_init='erk' has no channel version; valid .*: uniform, dense"),
    ({"mask.scope": "global"}, "learn_rates=true learns per-layer rates"),
    ({"mask.rate_alpha": 1.0}, r"rate_alpha=1.0 must lie in \[0, 1\)"),
  ):
    with pytest.raises(config_lib.errors.ConfigError, match=match):
      config_lib.check_config(harp_config(stage="pretrain", **overrides))


def test_the_train_step_adds_gamma_times_the_hardware_loss_gradient_to_the_rates():
  """With plain SGD (no momentum, no weight decay) the rates' update differs between hw_gamma = g and 0 by exactly
  -lr * g * d hw_loss / d rates (the first epoch's gamma is 1 * g)."""
  config = harp_config(stage="prune", **{"optimizer.name": "sgd", "optimizer.momentum": 0.0})
  config.optimizer.weight_decay = 0.0
  config.source = "unused"
  batch = data.train_batches("digits", 32, seed=0).batch_at(0)
  model = models.get_model(config.model.name, 10)
  params = model.init(jax.random.key(0), batch["image"][:1], train=False)["params"]
  scores = masking.init_scores(params, "scaled", jax.random.key(1))
  rates = harp.init_rates(params, scores, k=K, alpha=0.1, strategy="uniform")
  rates = jax.tree.map(lambda r: r + 1.0, rates)  # above the target: the hardware loss is positive
  labels = {"params": jax.tree.map(lambda _: "freeze", params), "scores": jax.tree.map(lambda _: "train", scores)}
  labels["rates"] = jax.tree.map(lambda _: "train", rates)

  def new_rates(gamma):
    step_config = ph.override(config_lib.stage_config(config, "prune"), **{"mask.hw_gamma": gamma})
    tx = optim.make_optimizer(step_config, "prune", labels, 4)
    trainable = {"params": params, "scores": scores, "rates": rates}
    state = train.TrainState(
      step=jax.numpy.int32(0),
      params=params,
      scores=scores,
      batch_stats={},
      opt_state=tx.init(trainable),
      carry=(),
      rng=jax.random.PRNGKey(0),
      aux={"frozen_gamma": jax.numpy.float32(0)},
      rates=rates,
    )
    step = functools.partial(
      train.train_step,
      apply_fn=models.make_apply_fn(model),
      objective=objectives.get_objective("benign"),
      config=step_config,
      tx=tx,
      k=K,
      steps_per_epoch=4,
      axis_name=None,
    )
    return jax.jit(step)(state, batch)[0].rates

  lr, gamma = config.stages.prune.lr, 7.0
  hw_grad = jax.grad(harp.hw_loss)(rates, scores, K, 0.1)
  for with_hw, without, g in zip(*(jax.tree.leaves(t) for t in (new_rates(gamma), new_rates(0.0), hw_grad))):
    np.testing.assert_allclose(with_hw - without, -lr * gamma * g, rtol=1e-4, atol=1e-7)
  assert float(harp.hw_loss(rates, scores, K, 0.1)) > 0


@pytest.mark.slow
def test_stage_all_with_learned_rates_runs_harp_beside_the_baselines(tmp_path):
  from hydra_jax import pipeline  # noqa: PLC0415

  config = harp_config(stage="all", ks=(0.2,), baselines=("lwm",))
  rows = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [row["method"] for row in rows] == ["dense", "harp (prune only)", "harp", "lwm"]
  assert rows[2]["kept_fraction"] == round(0.2 * WEIGHTS) / WEIGHTS  # the target exactly
  assert "rates" in rows[2] and "rates" not in rows[3]  # LWM: HYDRA's uniform k


def test_a_config_whose_mask_lacks_the_rate_keys_runs_as_hydra_and_a_bad_rate_init_is_named():
  config = harp_config(stage="pretrain")
  config.mask = {"scope": "global", "min_layer_k": 0.0}  # an older config, or mask set as a dict
  config_lib.check_config(config)
  assert not config_lib.rate_settings(config).learn_rates and config_lib.rate_settings(config).rate_alpha == 0.1
  with pytest.raises(
    config_lib.errors.ConfigError, match="config.mask.rate_init='lamp' is invalid; valid: uniform, erk"
  ):
    config_lib.check_config(harp_config(stage="pretrain", **{"mask.rate_init": "lamp"}))


def test_finetune_at_another_k_than_the_rates_were_learned_at_is_refused(runs):
  root, config, _ = runs
  finetune = config_lib.stage_config(config, "finetune", source=str(root / "prune"), k=0.2)
  with pytest.raises(config_lib.errors.ConfigError, match=r"learned its rates with k=0.1; run with --config.k=0.1"):
    train.initial_state(finetune, "finetune", steps_per_epoch=4, batch_shape=(32, 8, 8, 1))
