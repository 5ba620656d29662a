"""Tests of the verified-training objectives (crown_ibp, ibp, mixtrain): schedules against re-statements of the
reference's schedulers, loss values against the reference's bound code in PyTorch, gradients, and a few optax
steps that lower the verified loss."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hydra_jax import models
from hydra_jax import objectives
from tests import robust_helpers as helpers
from tests import verified_reference
from tests import zoo_helpers


def _reference_linear_schedule(step, init_step, final_step, init_value, final_value):
  """crown/eps_scheduler.py linear_schedule."""
  if init_step == final_step:
    return final_value
  rate = (step - init_step) / (final_step - init_step)
  return float(
    np.clip(rate * (final_value - init_value) + init_value, min(init_value, final_value), max(init_value, final_value))
  )


def test_registered_with_the_reference_defaults_and_takes_epoch():
  for name in ("crown_ibp", "ibp", "mixtrain"):
    assert objectives.get_objective(name).takes_epoch
  assert not objectives.get_objective("trades").takes_epoch
  crown = objectives.default_config("crown_ibp")
  assert (crown.eps, crown.starting_epsilon, crown.schedule_length, crown.kappa_start, crown.lower_slope) == (
    0.007,
    0.0,
    60,
    0.0,
    "adaptive",
  )
  mix = objectives.default_config("mixtrain")
  assert (mix.eps, mix.schedule_length, mix.interval_weight, mix.mixtraink, mix.alpha) == (0.007, 10, 0.1, 1, 0.8)


@pytest.mark.parametrize("length", [60, 3, 1])
def test_crown_ibp_eps_follows_the_reference_scheduler_per_step(length):
  steps_per_epoch, start, final = 7, 0.001, 0.007
  config = objectives.default_config("crown_ibp")
  config.update(schedule_length=length, starting_epsilon=start, eps=final)
  for epoch in (0, 1, length - 1, length + 2):
    for batch in (0, 3, 6):
      expected = _reference_linear_schedule(
        epoch * steps_per_epoch + batch, 0, (length - 1) * steps_per_epoch, start, final
      )
      ramp = objectives.crown_ibp_ramp(jnp.float32(epoch + batch / steps_per_epoch), length)
      np.testing.assert_allclose(start + (final - start) * ramp, expected, rtol=1e-5)


def test_mixtrain_schedule_follows_the_reference_per_epoch():
  config = objectives.default_config("mixtrain")
  config.update(schedule_length=10, starting_epsilon=0.001, eps=0.007, interval_weight=0.1)
  for epoch in (0.0, 3.7, 9.99, 10.0, 14.5, 15.0, 27.0, 80.0):
    e = int(epoch)  # the reference's integer epoch
    eps = e * (0.007 - 0.001) / 10 + 0.001 if e < 10 else 0.007
    weight = min(0.1 * 2.5 ** (max(e - 10, 0) // 5), 50)
    np.testing.assert_allclose(objectives.mixtrain_schedule(jnp.float32(epoch), config), (eps, weight), rtol=1e-5)


def _cnn_problem(batch=4, seed=0):
  model, x, variables = zoo_helpers.random_variables("cnn_tiny", batch=batch, seed=seed)
  y = jnp.asarray(np.random.default_rng(seed).integers(0, 10, batch))
  return model, models.make_apply_fn(model), variables, {"image": x, "label": y}


def _reference_losses(model_variables, batch, eps, beta):
  """The reference trainer's computation in PyTorch: CE(-lb scattered with 0 at y), natural CE, sym wc CE."""
  pytest.importorskip("torch")
  losses = verified_reference.reference_losses(model_variables, batch, eps, beta)
  return tuple(float(np.mean(losses[name])) for name in ("robust", "natural", "sym"))


def test_crown_ibp_and_ibp_losses_equal_the_reference_trainer_computation():
  _, apply_fn, variables, batch = _cnn_problem()
  config = objectives.default_config("crown_ibp")
  config.update(eps=0.02, schedule_length=3)
  epoch = jnp.float32(0.5)  # ramp 0.25: eps_t = 0.005, beta = 0.75
  robust, natural, _ = _reference_losses(variables, batch, 0.005, 0.75)
  loss, (metrics, _) = objectives.get_objective("crown_ibp").loss_fn(
    apply_fn, variables, batch, None, config, epoch=epoch
  )
  np.testing.assert_allclose(
    [loss, metrics["natural_loss"], metrics["eps"], metrics["beta"]], [robust, natural, 0.005, 0.75], rtol=1e-4
  )
  ibp_robust, _, _ = _reference_losses(variables, batch, 0.005, 0.0)
  loss, _ = objectives.get_objective("ibp").loss_fn(apply_fn, variables, batch, None, config, epoch=epoch)
  np.testing.assert_allclose(loss, ibp_robust, rtol=1e-4)
  # kappa-mixed form: kappa = 1 + (0 - 1) * 0.25 = 0.75.
  config.update(kappa_start=1.0, kappa_end=0.0)
  loss, _ = objectives.get_objective("crown_ibp").loss_fn(apply_fn, variables, batch, None, config, epoch=epoch)
  np.testing.assert_allclose(loss, 0.75 * natural + 0.25 * robust, rtol=1e-4)
  # After the ramp beta = 0: pure IBP at the final eps (the CROWN branch is skipped).
  config.update(kappa_start=0.0)
  final_ibp, _, _ = _reference_losses(variables, batch, 0.02, 0.0)
  loss, (metrics, _) = objectives.get_objective("crown_ibp").loss_fn(
    apply_fn, variables, batch, None, config, epoch=jnp.float32(5.0)
  )
  np.testing.assert_allclose([loss, metrics["beta"]], [final_ibp, 0.0], rtol=1e-4, atol=1e-7)


def test_mixtrain_loss_adds_the_weighted_symbolic_worst_case_ce_when_drawn():
  _, apply_fn, variables, batch = _cnn_problem(batch=1, seed=1)  # one example: every draw picks it
  config = objectives.default_config("mixtrain")
  config.update(eps=0.01, schedule_length=2, interval_weight=0.1, mixtraink=2)
  _, natural, sym = _reference_losses(variables, batch, 0.01, 0.0)
  mixtrain = objectives.get_objective("mixtrain").loss_fn
  for alpha, expected in ((1.0, natural + 0.1 * 2.5 * sym), (0.0, natural)):
    config.alpha = alpha
    loss, (metrics, _) = mixtrain(apply_fn, variables, batch, jax.random.key(0), config, epoch=jnp.float32(7.5))
    np.testing.assert_allclose([loss, metrics["drawn"], metrics["interval_weight"]], [expected, alpha, 0.25], rtol=1e-4)


def _stored(case):
  """`case` of tests/data/verified_reference.json (torch reference values) and its problem, checked to be the same."""
  with open(verified_reference.FIXTURE) as f:
    stored = json.load(f)
  values = stored["cases"][case]
  apply_fn, variables, batch = verified_reference.problem(values["problem"])
  sums = verified_reference.checksums(variables, batch)
  for name, total in sums.items():  # the problem the values were computed for (numpy draws only)
    assert total == pytest.approx(stored["problems"][values["problem"]][name], rel=1e-9), name
  return apply_fn, variables, batch, values


@pytest.mark.parametrize("start", [0.0, 0.004])
def test_crown_ibp_and_ibp_at_a_starting_epsilon_equal_the_stored_torch_reference(start):
  """The reference's bound code in PyTorch at eps_t and beta computed here by hand; no torch needed.

  The stored values come from `PYTHONPATH=. python -m tests.verified_reference` (torch==2.13.0 CPU), which runs
  `verified_reference.reference_losses` (benchmarks/torch_bounds.py on tests/torch_reference.py's cnn_tiny).
  """
  # eps 0.02, L 3, epoch 0.5: ramp = 0.5 / (3 - 1) = 0.25; eps_t = start + (0.02 - start) * 0.25;
  # beta = 1 - eps_t / 0.02.
  eps_t, beta = {0.0: (0.005, 0.75), 0.004: (0.008, 0.6)}[start]
  apply_fn, variables, batch, values = _stored("crown_start0" if start == 0 else "crown_start004")
  assert (values["eps"], values["beta"]) == (eps_t, beta)
  config = objectives.default_config("crown_ibp")
  config.update(eps=0.02, starting_epsilon=start, schedule_length=3)
  loss, (metrics, _) = objectives.get_objective("crown_ibp").loss_fn(
    apply_fn, variables, batch, None, config, epoch=jnp.float32(0.5)
  )
  np.testing.assert_allclose(
    [loss, metrics["natural_loss"], metrics["eps"], metrics["beta"]],
    [np.mean(values["robust"]), np.mean(values["natural"]), eps_t, beta],
    rtol=1e-4,
  )
  if start:
    ibp = _stored("ibp_start004")[3]
    loss, (metrics, _) = objectives.get_objective("ibp").loss_fn(
      apply_fn, variables, batch, None, config, epoch=jnp.float32(0.5)
    )
    np.testing.assert_allclose([loss, metrics["eps"]], [np.mean(ibp["robust"]), eps_t], rtol=1e-4)


def test_stored_torch_reference_values_are_what_the_torch_reference_computes():
  pytest.importorskip("torch")
  for case in verified_reference.CASES:
    _, variables, batch, values = _stored(case)
    live = verified_reference.reference_losses(variables, batch, values["eps"], values["beta"])
    for name in ("robust", "natural", "sym"):
      np.testing.assert_allclose(live[name], values[name], rtol=1e-6, err_msg=f"{case} {name}")


def test_mixtrain_draws_its_coin_at_rate_alpha():
  """400 keys at alpha 0.5 (a linear model on 8 x 8 digits: the bound is cheap): drawn at rate 0.5 (binomial, within
  4 sigma); a step not drawn is the natural CE alone, a drawn one adds iw * a positive robust CE."""
  model = helpers.Linear()
  variables = helpers.init_variables(model, (4, 8, 8, 1))
  x, y, _, _ = helpers.digits()
  batch = {"image": jnp.asarray(x[:4]), "label": jnp.asarray(y[:4])}
  config = objectives.default_config("mixtrain")
  config.update(eps=0.05, schedule_length=0, interval_weight=0.1, alpha=0.5)
  mixtrain = objectives.get_objective("mixtrain").loss_fn
  apply_fn = helpers.make_apply_fn(model)
  run = jax.jit(jax.vmap(lambda key: mixtrain(apply_fn, variables, batch, key, config, epoch=jnp.float32(0))[1][0]))
  metrics = jax.tree.map(np.asarray, run(jax.random.split(jax.random.key(0), 400)))
  drawn = metrics["drawn"] == 1
  assert abs(drawn.sum() - 200) <= 4 * 10, drawn.sum()  # binomial(400, 0.5): sd 10
  np.testing.assert_array_equal(metrics["robust_loss"][~drawn], 0.0)
  assert np.all(metrics["robust_loss"][drawn] > 0)
  np.testing.assert_allclose(metrics["loss"], metrics["natural_loss"] + 0.1 * metrics["robust_loss"], rtol=1e-6)


def test_mixtrain_bounds_the_example_at_a_drawn_position_that_varies_with_the_key():
  """Batch 4, mixtraink 1, alpha 1, 16 keys: each step adds iw * the stored torch "sym" CE (see
  `test_crown_ibp_and_ibp_at_a_starting_epsilon_equal_the_stored_torch_reference`) of one example of the batch,
  and not always the same one (4 positions, 16 draws: all equal w.p. 4^-15)."""
  apply_fn, variables, batch, values = _stored("mixtrain")
  config = objectives.default_config("mixtrain")
  config.update(eps=0.01, schedule_length=2, interval_weight=0.1, mixtraink=1, alpha=1.0)  # epoch 7.5: iw 0.25
  mixtrain = objectives.get_objective("mixtrain").loss_fn
  run = jax.jit(  # lax.map, not vmap: the 16 symbolic passes run one at a time (memory)
    lambda keys: jax.lax.map(
      lambda key: mixtrain(apply_fn, variables, batch, key, config, epoch=jnp.float32(7.5))[1][0], keys
    )
  )
  metrics = jax.tree.map(np.asarray, run(jax.random.split(jax.random.key(0), 16)))
  np.testing.assert_allclose(metrics["natural_loss"], np.mean(values["natural"]), rtol=1e-4)
  sym = np.asarray(values["sym"])
  assert np.min(np.abs(sym[:, None] - sym[None, :]) + np.eye(4)) > 0.01  # distinct: the value names the example
  errors = np.abs(metrics["robust_loss"][:, None] - sym[None, :]) / sym
  assert np.all(np.min(errors, axis=1) < 1e-4), errors  # each step bounds exactly one example of the batch
  positions = np.argmin(errors, axis=1)
  assert len(set(positions.tolist())) >= 2, positions
  np.testing.assert_allclose(metrics["loss"], metrics["natural_loss"] + 0.25 * metrics["robust_loss"], rtol=1e-6)


@pytest.mark.parametrize(
  "name", ["ibp", pytest.param("crown_ibp", marks=pytest.mark.slow), pytest.param("mixtrain", marks=pytest.mark.slow)]
)
def test_verified_objectives_give_finite_gradients_and_update_bn_statistics(name):
  model = helpers.TinyCNN(batch_norm=True)
  variables = helpers.init_variables(model, (4, 8, 8, 1))
  apply_fn = helpers.make_apply_fn(model)
  x, y, _, _ = helpers.digits()
  batch = {"image": jnp.asarray(x[:4]), "label": jnp.asarray(y[:4])}
  config = objectives.default_config(name)
  config.alpha = 1.0  # mixtrain: always add the symbolic term
  loss_fn = objectives.get_objective(name).loss_fn
  grad_fn = jax.jit(
    jax.value_and_grad(
      lambda p: loss_fn(apply_fn, {**variables, "params": p}, batch, jax.random.key(1), config, epoch=jnp.float32(2.0)),
      has_aux=True,
    )
  )
  (loss, (_, new_variables)), grads = grad_fn(variables["params"])
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new_variables["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))  # the train-mode natural forward updated the running statistics


def test_a_few_adam_steps_lower_the_crown_ibp_loss_and_raise_verified_accuracy():
  model = helpers.TinyCNN()
  variables = helpers.init_variables(model, (64, 8, 8, 1))
  apply_fn = helpers.make_apply_fn(model)
  x, y, _, _ = helpers.digits()
  batch = {"image": jnp.asarray(x[:64]), "label": jnp.asarray(y[:64])}
  config = objectives.default_config("crown_ibp")
  config.update(eps=0.02, schedule_length=3)  # at epoch 1: eps 0.01, beta 0.5 (CROWN-IBP and IBP mixed)
  loss_fn = objectives.get_objective("crown_ibp").loss_fn
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(apply_fn, {"params": p}, batch, None, config, epoch=jnp.float32(1.0)), has_aux=True
    )
    (_, (metrics, _)), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  params, opt_state = variables["params"], tx.init(variables["params"])
  history = []
  for _ in range(40):
    params, opt_state, metrics = step(params, opt_state)
    history.append((float(metrics["loss"]), float(metrics["verified_accuracy"])))
  assert history[-1][0] < 0.7 * history[0][0]  # measured: 2.96 -> 1.67
  assert history[-1][1] > history[0][1] + 0.25  # measured: 0 -> 0.47


def _verified_config(arg):
  spec = importlib.util.spec_from_file_location("verified_config", "configs/verified.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_verified_config_carries_the_reference_script_settings():
  config = _verified_config("")
  assert (config.objective.name, config.model.name, config.data.name, config.data.batch_size) == (
    "crown_ibp",
    "cnn_large",
    "svhn_cropped",
    128,
  )
  assert (
    config.objective.eps,
    config.objective.schedule_length,
    config.stages.pretrain.epochs,
    config.stages.pretrain.lr,
    config.optimizer.name,
  ) == (0.007, 120, 200, 1e-3, "adam")
  config = _verified_config("method=mixtrain,model=cnn_small,stage=prune")
  assert (
    config.objective.name,
    config.objective.mixtraink,
    config.objective.schedule_length,
    config.stage,
    config.stages.prune.epochs,
    config.stages.prune.lr,
    config.data.batch_size,
  ) == ("mixtrain", 5, 0, "prune", 20, 1e-5, 50)
  with pytest.raises(ValueError, match="config argument method='diffai' is invalid; valid: crown_ibp, mixtrain"):
    _verified_config("method=diffai")
  with pytest.raises(ValueError, match="config argument stage='all' is invalid"):
    _verified_config("stage=all")


@pytest.mark.slow  # 80 s here, mostly compiling CROWN-IBP through the ResNet
def test_crown_ibp_trains_a_residual_network():
  """objective=crown_ibp on resnet_tiny (BatchNorm, residual adds, 1x1-conv shortcuts): CROWN-IBP through the
  graph, a few Adam steps lower the loss (measured 514 -> 14.8 in 4 steps)."""
  model = models.get_model("resnet_tiny", 10)
  variables = helpers.init_variables(model, (8, 8, 8, 1))
  apply_fn = helpers.make_apply_fn(model)
  x, y, _, _ = helpers.digits()
  batch = {"image": jnp.asarray(x[:8]), "label": jnp.asarray(y[:8])}
  config = objectives.default_config("crown_ibp")
  config.update(eps=0.02, schedule_length=3)  # at epoch 1: eps 0.01, beta 0.5 (CROWN-IBP and IBP mixed)
  loss_fn = objectives.get_objective("crown_ibp").loss_fn
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, stats, opt_state):
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(apply_fn, {"params": p, "batch_stats": stats}, batch, None, config, epoch=jnp.float32(1.0)),
      has_aux=True,
    )
    (_, (metrics, new_variables)), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), new_variables["batch_stats"], opt_state, metrics

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  losses = []
  for _ in range(4):
    params, stats, opt_state, metrics = step(params, stats, opt_state)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and float(metrics["beta"]) == 0.5
  assert losses[-1] < 0.5 * losses[0]
