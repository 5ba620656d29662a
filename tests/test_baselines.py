"""Tests of hydra_jax.baselines: each baseline's defining property against a brute-force or hand value."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hydra_jax import baselines
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import masking
from hydra_jax import pipeline
from hydra_jax import sources
from hydra_jax import train
from tests.pipeline_helpers import kept_count
from tests.pipeline_helpers import numpy_project
from tests.pipeline_helpers import numpy_topk


def toy_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
    "conv1": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
    "bn1": {"scale": jnp.full((4,), 1.5), "bias": jnp.full((4,), 0.25)},
    "fc": {"kernel": jax.random.normal(k2, (36, 5)), "bias": jax.random.normal(k3, (5,))},
  }


def none_at_non_prunable(tree):
  return tree["bn1"] == {"scale": None, "bias": None} and tree["fc"]["bias"] is None


def test_registry_lists_the_six_baselines_and_rejects_unknown_names():
  assert baselines.baseline_names() == ["admm", "lwm", "random", "rigl", "snip", "str"]
  with pytest.raises(ValueError, match=r"unknown baseline 'gmp'.*'admm', 'lwm', 'random', 'rigl', 'snip', 'str'"):
    baselines.get_baseline("gmp")


@pytest.mark.parametrize("name", ["lwm", "admm", "snip", "random"])
def test_each_registered_fixed_mask_is_its_defining_function(name):
  # What pipeline.mask_source calls: get_baseline(name).mask_scores(start weights, key, grads), its top-k the mask.
  params, other = toy_params(0), toy_params(1)  # `other`: different weights of the same shapes
  grads = jax.tree.map(lambda w: jax.random.normal(jax.random.key(7), w.shape), params)
  baseline = baselines.get_baseline(name)
  assert baseline.start == {"lwm": "pretrained", "admm": "pretrained", "snip": "scratch", "random": "scratch"}[name]
  assert baseline.needs_grads == (name == "snip") and (baseline.phase is not None) == (name == "admm")
  k = 0.25
  masks = masking.compute_masks(baseline.mask_scores(params, jax.random.key(3), grads), k)
  for layer in ("conv1", "fc"):
    w, g = np.asarray(params[layer]["kernel"]), np.asarray(grads[layer]["kernel"])
    got = np.asarray(masks[layer]["kernel"])
    magnitude = numpy_topk(np.abs(w), k)
    if name in ("lwm", "admm"):  # LWM; Adv-ADMM's hard prune of the weights its phase trained
      np.testing.assert_array_equal(got, magnitude)
    elif name == "snip":
      np.testing.assert_array_equal(got, numpy_topk(np.abs(g * w), k))
    else:  # a uniformly random subset at the same count: a function of the key alone, not of the weights
      assert got.sum() == kept_count(w.size, k) and not np.array_equal(got, magnitude)
      for weights, key, same in ((other, 3, True), (params, 4, False)):
        again = masking.compute_masks(baseline.mask_scores(weights, jax.random.key(key), grads), k)
        assert np.array_equal(np.asarray(again[layer]["kernel"]), got) == same, (layer, key)


@pytest.mark.parametrize("k", [0.5, 0.1, 0.01])
def test_lwm_keeps_exactly_the_largest_magnitudes_of_each_layer(k):
  params = toy_params()
  scores = baselines.magnitude_scores(params)
  assert none_at_non_prunable(scores)
  masks = masking.compute_masks(scores, k)
  for name in ("conv1", "fc"):
    expected = numpy_topk(np.abs(params[name]["kernel"]), k)  # normal draws: no ties
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected)


def test_snip_scores_are_abs_gradient_times_weight_of_the_stated_batches():
  # A linear least-squares model: dL/dW = x^T (x W + b - y) / B in closed form, independent of autodiff.
  rng = np.random.default_rng(0)
  params = {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
  }
  batches = [
    {"x": rng.normal(size=(5, 4)).astype(np.float32), "y": rng.normal(size=(5, 3)).astype(np.float32)} for _ in range(2)
  ]

  def loss_fn(p, batch, key):
    residual = batch["x"] @ p["dense"]["kernel"] + p["dense"]["bias"] - batch["y"]
    return 0.5 * jnp.sum(residual**2) / batch["x"].shape[0]

  w, b = np.asarray(params["dense"]["kernel"], np.float64), np.asarray(params["dense"]["bias"], np.float64)
  g = np.mean([bt["x"].T @ (bt["x"] @ w + b - bt["y"]) / 5 for bt in batches], axis=0)
  grads = baselines.mean_gradient(jax.grad(loss_fn), params, batches, jax.random.key(0))
  scores = baselines.snip_scores(params, grads)
  np.testing.assert_allclose(scores["dense"]["kernel"], np.abs(g * w), rtol=1e-5)
  assert scores["dense"]["bias"] is None
  one_batch = baselines.snip_scores(
    params, baselines.mean_gradient(jax.grad(loss_fn), params, batches[:1], jax.random.key(0))
  )
  g0 = batches[0]["x"].T @ (batches[0]["x"] @ w + b - batches[0]["y"]) / 5
  np.testing.assert_allclose(one_batch["dense"]["kernel"], np.abs(g0 * w), rtol=1e-5)


def test_random_masks_keep_exactly_the_per_layer_count_and_differ_per_seed():
  params = toy_params()
  k = {"conv1/kernel": 0.25, "fc/kernel": 0.05}
  masks = [masking.compute_masks(baselines.random_scores(params, jax.random.key(seed)), k) for seed in (0, 1, 0)]
  for mask in masks:
    assert int(mask["conv1"]["kernel"].sum()) == kept_count(72, 0.25)
    assert int(mask["fc"]["kernel"].sum()) == kept_count(180, 0.05)
  assert not np.array_equal(masks[0]["fc"]["kernel"], masks[1]["fc"]["kernel"])
  np.testing.assert_array_equal(masks[0]["fc"]["kernel"], masks[2]["fc"]["kernel"])
  # Uniform over entries: each entry of a layer is kept at rate k (100 seeds: binomial(100, 0.2) per entry).
  keep = jax.jit(jax.vmap(lambda key: masking.compute_masks(baselines.random_scores(params, key), 0.2)["fc"]["kernel"]))
  hits = np.sum(keep(jax.random.split(jax.random.key(2), 100)), axis=0)
  assert np.all(hits >= 3) and np.all(hits <= 45)  # mean 20; all 180 entries inside w.p. > 1 - 1e-6


def test_str_zeroes_weights_below_the_threshold_and_shrinks_the_others():
  params = {"fc": {"kernel": jnp.array([[0.5, -0.2], [0.05, -1.0]]), "bias": jnp.array([0.3, -0.3])}}
  s = math.log(0.25 / 0.75)  # sigmoid(s) = 0.25
  thresholds = baselines.str_thresholds(params, s)
  assert thresholds["fc"]["bias"] is None and thresholds["fc"]["kernel"].shape == ()
  weights = baselines.str_weights(params, thresholds)
  np.testing.assert_allclose(weights["fc"]["kernel"], [[0.25, 0.0], [0.0, -0.75]], atol=1e-7)
  assert np.sum(np.asarray(weights["fc"]["kernel"]) == 0) == 2  # exactly zero, not small
  np.testing.assert_array_equal(weights["fc"]["bias"], params["fc"]["bias"])
  report = baselines.str_sparsity(params, thresholds)
  assert report.layers == (("fc/kernel", 2, 4),)


def test_str_threshold_gradient_matches_hand_derivative_and_finite_difference():
  params = toy_params()
  coeffs = jax.random.normal(jax.random.key(3), (3, 3, 2, 4))

  def loss(s):
    weights = baselines.str_weights(params, {**baselines.str_thresholds(params, 0.0), "conv1": {"kernel": s}})
    return jnp.sum(coeffs * weights["conv1"]["kernel"] ** 2)

  s = jnp.float32(-0.4)
  g = jax.nn.sigmoid(s)
  w = params["conv1"]["kernel"]
  w_eff = jnp.sign(w) * jax.nn.relu(jnp.abs(w) - g)
  # dL/ds = sum 2 c w_eff * d w_eff/ds,  d w_eff/ds = -sign(w) g'(s) 1[|w| > g],  g' = g (1 - g).
  hand = jnp.sum(2 * coeffs * w_eff * -jnp.sign(w) * g * (1 - g) * (jnp.abs(w) > g))
  grad = jax.grad(loss)(s)
  np.testing.assert_allclose(grad, hand, rtol=1e-5)
  h = 1e-3  # central difference; no |w| lies within sigmoid(s +- h) of the threshold for this draw
  assert not np.any(np.abs(np.abs(w) - g) < 1e-3)
  np.testing.assert_allclose(grad, (loss(s + h) - loss(s - h)) / (2 * h), rtol=2e-3)


def brute_force_projection(x, n_keep):
  """argmin ||z - x||^2 over every z with at most n_keep nonzeros: enumerate supports, z = x on the support."""
  flat = np.asarray(x, np.float64).ravel()
  best, best_cost = None, np.inf
  for support in itertools.combinations(range(flat.size), n_keep):
    z = np.zeros_like(flat)
    z[list(support)] = flat[list(support)]
    cost = np.sum((z - flat) ** 2)
    if cost < best_cost - 1e-12:
      best, best_cost = z, cost
  return best.reshape(np.shape(x))


@pytest.mark.parametrize("k", [0.2, 0.5, 0.75])
def test_admm_z_update_is_the_projection_onto_the_k_sparse_set(k):
  tree = {
    "a": {"kernel": jax.random.normal(jax.random.key(4), (2, 4))},
    "b": {"kernel": jax.random.normal(jax.random.key(5), (3, 3)), "bias": None},
  }
  projected = baselines.project_sparse(tree, k)
  for name, n in (("a", 8), ("b", 9)):
    np.testing.assert_allclose(
      projected[name]["kernel"], brute_force_projection(tree[name]["kernel"], kept_count(n, k)), atol=0
    )
  assert projected["b"]["bias"] is None


def test_admm_state_updates_and_penalty_follow_the_equations():
  params = toy_params()
  k, rho = 0.1, 0.01
  state = baselines.admm_init(params, k, rho)
  assert none_at_non_prunable(state.z) and none_at_non_prunable(state.u)
  np.testing.assert_array_equal(state.u["fc"]["kernel"], 0)
  np.testing.assert_array_equal(state.z["fc"]["kernel"], numpy_project(params["fc"]["kernel"], k))
  assert float(baselines.admm_penalty(params, state)) == pytest.approx(
    rho
    / 2
    * sum(np.sum((np.asarray(params[n]["kernel"]) - np.asarray(state.z[n]["kernel"])) ** 2) for n in ("conv1", "fc")),
    rel=1e-5,
  )
  moved = jax.tree.map(lambda w: w + 0.3, params)
  new = baselines.admm_update(moved, state, k, rho_growth=1.3)
  for name in ("conv1", "fc"):
    w, u = np.asarray(moved[name]["kernel"]), np.asarray(state.u[name]["kernel"])
    z_new = numpy_project(w + u, k)
    np.testing.assert_allclose(new.z[name]["kernel"], z_new, atol=1e-6)
    np.testing.assert_allclose(new.u[name]["kernel"], u + w - z_new, atol=1e-6)
  assert float(new.rho) == pytest.approx(1.3 * rho)
  w, z, u = (np.asarray(t["fc"]["kernel"]) for t in (moved, new.z, new.u))
  grad = jax.grad(baselines.admm_penalty)(moved, new)
  np.testing.assert_allclose(grad["fc"]["kernel"], 1.3 * rho * (w - z + u), rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(grad["bn1"]["scale"], 0)


def test_admm_schedule_updates_only_at_positive_multiples_of_the_interval():
  params = toy_params()
  state = baselines.admm_init(params, 0.1, 1e-3)
  moved = jax.tree.map(lambda w: 2 * w + 0.1, params)
  schedule = jax.jit(lambda p, s, step: baselines.admm_schedule(p, s, step, interval_steps=5, k=0.1, rho_growth=2.0))
  for step in (0, 3, 7):
    assert float(schedule(moved, state, step).rho) == pytest.approx(1e-3)
  for step in (5, 10):
    updated = schedule(moved, state, step)
    assert float(updated.rho) == pytest.approx(2e-3)
    np.testing.assert_allclose(
      updated.u["fc"]["kernel"], baselines.admm_update(moved, state, 0.1).u["fc"]["kernel"], atol=0
    )


# ----------------------------------------------------------------------------------------------------------
# A few optimizer steps of each baseline on a tiny regression keep the claimed sparsity.


def tiny_problem():
  params = {
    "hidden": {"kernel": jax.random.normal(jax.random.key(6), (6, 8)) * 0.5, "bias": jnp.zeros(8)},
    "out": {"kernel": jax.random.normal(jax.random.key(7), (8, 2)) * 0.5, "bias": jnp.zeros(2)},
  }
  x = jax.random.normal(jax.random.key(8), (16, 6))
  y = jax.random.normal(jax.random.key(9), (16, 2))

  def loss_fn(weights, batch=None, key=None):
    hidden = jax.nn.relu(x @ weights["hidden"]["kernel"] + weights["hidden"]["bias"])
    return jnp.mean((hidden @ weights["out"]["kernel"] + weights["out"]["bias"] - y) ** 2)

  return params, loss_fn


def run_phase(hooks, loss_fn, params, steps, weight_decay=0.0):
  """The train step's protocol for `PhaseHooks`, with SGD (lr 0.05, momentum 0.9) and weight decay."""
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(0.05, momentum=0.9))
  aux = hooks.init(params, jax.random.key(0))
  trainable = {"params": params, "aux": aux if hooks.trains_aux else ()}
  frozen = () if hooks.trains_aux else aux

  def loss(trainable, frozen):
    aux = trainable["aux"] if hooks.trains_aux else frozen
    return loss_fn(hooks.weights(trainable["params"], aux)) + hooks.penalty(trainable["params"], aux)

  def step(carry, index):
    trainable, frozen, opt_state = carry
    if hooks.trains_aux:
      trainable = {**trainable, "aux": hooks.before_step(trainable["params"], trainable["aux"], index)}
    else:
      frozen = hooks.before_step(trainable["params"], frozen, index)
    updates, opt_state = tx.update(jax.grad(loss)(trainable, frozen), opt_state, trainable)
    return (optax.apply_updates(trainable, updates), frozen, opt_state), None

  run = jax.jit(lambda carry: jax.lax.scan(step, carry, jnp.arange(steps))[0])
  trainable, frozen, _ = run((trainable, frozen, tx.init(trainable)))
  return trainable["params"], trainable["aux"] if hooks.trains_aux else frozen


def fixed_hooks(scores, k):
  """HYDRA's finetune stage in the same protocol: scores frozen, the model runs with the masked params."""
  return baselines.PhaseHooks(
    init=lambda params, key: scores,
    weights=lambda params, s: masking.apply_masks(params, s, k),
    penalty=lambda params, aux: 0.0,
    before_step=lambda params, aux, step: aux,
    trains_aux=False,
  )


def kept_per_layer(params):
  return {name: int(np.count_nonzero(np.asarray(params[name]["kernel"]))) for name in ("hidden", "out")}


@pytest.mark.parametrize("name", ["lwm", "snip", "random"])
def test_fixed_mask_baselines_keep_their_mask_through_training(name):
  params, loss_fn = tiny_problem()
  k = 0.25
  grads = baselines.mean_gradient(jax.grad(loss_fn), params, [None], jax.random.key(0))
  scores = baselines.get_baseline(name).mask_scores(params, jax.random.key(1), grads)
  masks = masking.compute_masks(scores, k)
  start = masking.export_dense(params, scores, k)
  trained, _ = run_phase(fixed_hooks(scores, k), loss_fn, start, 5, weight_decay=1e-3)
  assert kept_per_layer(trained) == {"hidden": kept_count(48, k), "out": kept_count(16, k)}
  for layer in ("hidden", "out"):
    np.testing.assert_array_equal(np.asarray(trained[layer]["kernel"]) != 0, np.asarray(masks[layer]["kernel"]) > 0)
    assert not np.allclose(trained[layer]["kernel"], start[layer]["kernel"])  # the kept weights did train


def test_str_training_reports_the_sparsity_its_thresholds_give():
  params, loss_fn = tiny_problem()
  trained, thresholds = run_phase(
    baselines.get_baseline("str").phase(s_init=-2.0), loss_fn, params, 10, weight_decay=0.05
  )  # sigmoid(-2) = 0.12
  report = baselines.str_sparsity(trained, thresholds)
  for name, kept, total in report.layers:
    layer = name.split("/")[0]
    threshold = jax.nn.sigmoid(thresholds[layer]["kernel"])
    assert kept == int(np.sum(np.abs(np.asarray(trained[layer]["kernel"])) > threshold)) and 0 < kept < total
    assert float(thresholds[layer]["kernel"]) != -2.0  # s was trained


def test_admm_drives_weights_to_the_sparse_set_then_hard_prune_keeps_k():
  params, loss_fn = tiny_problem()
  k = 0.25

  def distance_to_sparse_set(p):
    kernels = {n: {"kernel": p[n]["kernel"]} for n in ("hidden", "out")}
    return sum(
      float(jnp.sum((a - b) ** 2))
      for a, b in zip(jax.tree.leaves(kernels), jax.tree.leaves(baselines.project_sparse(kernels, k)), strict=True)
    )

  hooks = baselines.get_baseline("admm").phase(k=k, rho=1.0, rho_growth=1.3, interval_steps=10)
  admm_trained, state = run_phase(hooks, loss_fn, params, 150)
  plain, _ = run_phase(fixed_hooks(baselines.magnitude_scores(params), 1.0), loss_fn, params, 150)
  assert float(state.rho) == pytest.approx(1.3**14, rel=1e-5)  # updates at steps 10, 20, ..., 140
  assert distance_to_sparse_set(admm_trained) < 0.1 * distance_to_sparse_set(plain)  # pulled toward S_k
  scores = baselines.get_baseline("admm").mask_scores(admm_trained, None, None)
  retrained, _ = run_phase(fixed_hooks(scores, k), loss_fn, masking.export_dense(admm_trained, scores, k), 5)
  assert kept_per_layer(retrained) == {"hidden": kept_count(48, k), "out": kept_count(16, k)}


# ----------------------------------------------------------------------------------------------------------
# The runner (pipeline.run_baseline): a fixed-mask baseline through the train module's finetune stage.


def tiny_config(**overrides):
  config = config_lib.default_config()
  config.model.name = "vgg_tiny"
  config.data.name = "digits"
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.eval_examples = 64
  config.data.prefetch = 0
  config.objective = config_lib.objective_config("pgd_at")
  config.objective.eps, config.objective.step_size, config.objective.steps = 0.1, 0.05, 1
  config.eval.eps, config.eval.step_size, config.eval.steps = 0.1, 0.05, 1
  config.log.progress = False
  config.checkpoint.async_save = False
  config.parallel.mode = "single"
  config.k = 0.1
  config.stop_after_steps = 3
  return config


@pytest.mark.slow  # 20 CPU s; SNIP's scores and fixed mask are checked by default in test_train and test_baselines
def test_run_baseline_trains_the_snip_mask_with_the_mask_fixed(tmp_path):
  config = tiny_config()
  config.objective = config_lib.objective_config("benign")  # key-free loss: g is recomputed here exactly
  summary = pipeline.run_baseline(config, "snip", source_dir="", workdir=str(tmp_path))
  assert summary["method"] == "snip" and summary["step"] == 3
  template = jax.eval_shape(lambda: sources.init_variables(config, jax.random.key(0)))
  abstract = {
    "params": template["params"],
    "batch_stats": template["batch_stats"],
    "scores": jax.eval_shape(lambda p: masking.init_scores(p, "uniform", jax.random.key(0)), template["params"]),
  }
  start = checkpoints.restore(str(tmp_path / "mask"), {"model": abstract})[0]["model"]
  end = checkpoints.restore(str(tmp_path / "train"), {"model": abstract})[0]["model"]
  assert checkpoints.read_meta(str(tmp_path / "train"))[1]["config"]["stages"]["finetune"]["lr"] == 0.1  # scratch

  # g: a hand-written train-mode cross-entropy of the initial network on the first training batch.
  batch = data.train_batches("digits", 32, seed=config.seed).batch_at(0)
  model = sources.build_model(config)

  def cross_entropy(params):
    logits, _ = model.apply(
      {"params": params, "batch_stats": start["batch_stats"]}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=1))

  grads = jax.grad(cross_entropy)(start["params"])
  for path, s in jax.tree_util.tree_flatten_with_path(start["scores"])[0]:
    w = np.asarray(at(start["params"], path))
    np.testing.assert_allclose(s, np.abs(w * np.asarray(at(grads, path))), rtol=1e-4, atol=1e-9)
    kept = np.asarray(at(end["params"], path)) != 0
    np.testing.assert_array_equal(kept, np.asarray(masking.topk_mask(s, config.k)) > 0)
    assert kept.sum() == kept_count(kept.size, config.k)


def test_snip_gradients_are_the_mean_over_batches_and_equal_on_eight_devices():
  # What the SNIP baseline scores with: the mean gradient over `baseline.grad_batches` batches, each one
  # program over all devices (so every host of a multi-host run gets the same mask), against a hand-written
  # train-mode cross-entropy on one device.
  config = tiny_config()
  config.objective = config_lib.objective_config("benign")
  variables = sources.init_variables(config, jax.random.key(0))
  params, batch_stats = variables["params"], variables["batch_stats"]
  stream = data.train_batches("digits", 32, seed=config.seed)
  batches = [stream.batch_at(step) for step in range(2)]
  model = sources.build_model(config)

  def cross_entropy(params, batch):
    logits, _ = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=1))

  expected = jax.tree.map(lambda *g: sum(g) / 2, *[jax.grad(cross_entropy)(params, b) for b in batches])
  for mode in ("single", "shard_map"):
    grads = sources.snip_gradients(config, params, batch_stats, batches, jax.random.key(1), mode)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=mode)


def at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_objective_loss_fn_starts_stateful_objectives_from_their_initial_carry():
  # Free AT with its zero initial perturbation is CE on clip(x + 0) = x: the benign loss, for the same weights.
  config = tiny_config()
  variables = sources.init_variables(config, jax.random.key(0))
  batch = data.train_batches("digits", 8, seed=0).batch_at(0)
  losses = {}
  for name in ("free", "benign"):
    config.objective = config_lib.objective_config(name)
    losses[name] = sources.objective_loss_fn(config, variables["batch_stats"])(
      variables["params"], batch, jax.random.key(1)
    )
  assert np.isfinite(losses["free"]) and float(losses["free"]) == pytest.approx(float(losses["benign"]), rel=1e-6)


@pytest.mark.slow
def test_run_baseline_lwm_equals_the_pipelines_finetune_with_scaled_scores(tmp_path):
  # At layer scope |w| and HYDRA's scaled init (|w| times a per-layer constant) give the same mask, so the
  # runner's LWM must train exactly the weights of pipeline.run_pipeline's LWM branch.
  config = tiny_config()
  pretrain_dir = str(tmp_path / "pretrain")
  train.run_stage(config_lib.stage_config(config, "pretrain", stop_after_steps=5), pretrain_dir)
  pipeline.run_baseline(config, "lwm", pretrain_dir, str(tmp_path / "lwm"))
  scaled = config_lib.stage_config(config, "finetune", source=pretrain_dir, **{"stages.finetune.score_init": "scaled"})
  train.run_stage(scaled, str(tmp_path / "pipeline_lwm"))
  template = jax.eval_shape(lambda: sources.init_variables(config, jax.random.key(0)))
  abstract = {
    "model": {
      "params": template["params"],
      "batch_stats": template["batch_stats"],
      "scores": jax.eval_shape(lambda p: masking.init_scores(p, "uniform", jax.random.key(0)), template["params"]),
    }
  }
  ours = checkpoints.restore(str(tmp_path / "lwm" / "train"), abstract)[0]["model"]["params"]
  theirs = checkpoints.restore(str(tmp_path / "pipeline_lwm"), abstract)[0]["model"]["params"]
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert masking.sparsity_report(ours).kept == masking.sparsity_report(theirs).kept
