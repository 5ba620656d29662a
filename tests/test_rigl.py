"""Tests of RigL (`baselines.rigl_*`, the 'rigl' stage): the drop / grow rule against hand-computed cases and a
numpy brute force, the alpha_t schedule, ERK densities, the update inside the real train step with the
objective's dense gradient, exact resume and 8-device equality."""

import functools
import math

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


def tiny_config(**overrides):
  """cnn_tiny (BN-free) on 10% of digits, benign loss, SGD: RigL at k = 0.25 with a mask update every 2 steps."""
  config = ph.tenth_of_digits_config("cnn_tiny")
  config.stage, config.k = "rigl", 0.25
  config.stages.rigl.epochs, config.stages.rigl.lr = 2, 0.05
  config.baseline.rigl_delta_t = 2
  return config_lib.stage_config(config, "rigl", **overrides)


def mask_list(state):
  return [np.asarray(m) for m in jax.tree.leaves(state.masks)]


def kernel_list(params):
  return [np.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0] if masking.is_prunable(p, w)]


# ----------------------------------------------------------------------------------------------------------
# The rule itself.


def test_drop_fraction_is_the_cosine_decay_of_alpha():
  for step, expected in ((0, 0.3), (25, 0.15 * (1 + math.cos(math.pi / 4))), (50, 0.15), (100, 0.0)):
    assert float(baselines.rigl_drop_fraction(step, 0.3, 100)) == pytest.approx(expected, abs=1e-7)


def test_layer_update_drops_the_smallest_active_and_grows_the_largest_inactive_gradients():
  mask = np.array([[True, True, True, True], [False, False, False, False]])
  w = np.array([[0.5, -0.1, 0.3, 0.05], [0.0, 0.0, 0.0, 0.0]], np.float32)
  g = np.array([[9.0, 9.0, 9.0, 9.0], [0.2, -0.7, 0.1, 0.6]], np.float32)  # active entries' |g| is never used
  new = baselines.rigl_layer_update(jnp.asarray(mask), jnp.asarray(w), jnp.asarray(g), jnp.float32(0.5))
  # n_active 4, floor(0.5 * 4) = 2 swapped: drop 0.05 and -0.1, grow -0.7 and 0.6.
  np.testing.assert_array_equal(new, [[True, False, True, False], [False, True, False, True]])
  # floor(0.3 * 4) = 1: drop 0.05 only, grow -0.7.
  new = baselines.rigl_layer_update(jnp.asarray(mask), jnp.asarray(w), jnp.asarray(g), jnp.float32(0.3))
  np.testing.assert_array_equal(new, [[True, True, True, False], [False, True, False, False]])


def test_layer_update_swaps_at_most_the_inactive_count():
  mask = jnp.array([True, True, True, False])
  new = baselines.rigl_layer_update(mask, jnp.array([0.4, 0.1, 0.2, 0.0]), jnp.array([0.0, 0.0, 0.0, 1.0]), 1.0)
  np.testing.assert_array_equal(new, [True, False, True, True])  # floor(1.0 * 3) = 3 capped at 1 inactive


def brute_force_update(mask, w, g, fraction):
  """The rule restated with numpy full sorts: (dropped, grown) index sets."""
  active, inactive = np.flatnonzero(mask), np.flatnonzero(~mask)
  n = min(int(np.floor(np.float32(fraction) * np.float32(active.size))), inactive.size)
  dropped = active[np.argsort(np.abs(w.ravel()[active]), kind="stable")[:n]]
  grown = inactive[np.argsort(-np.abs(g.ravel()[inactive]), kind="stable")[:n]]
  return set(dropped.tolist()), set(grown.tolist())


def test_schedule_updates_at_multiples_of_delta_t_before_t_end_as_the_brute_force():
  params = {
    "conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)), "bias": jnp.ones(4)},
    "fc": {"kernel": jax.random.normal(jax.random.key(1), (10, 7))},
  }
  state = baselines.rigl_init(params, jax.random.key(2), 0.3)
  assert [int(m.sum()) for m in mask_list(state)] == [ph.kept_count(72, 0.3), ph.kept_count(70, 0.3)] == [22, 21]
  schedule = jax.jit(
    lambda params, state, grads, step: baselines.rigl_schedule(
      params, state, lambda: grads, step, alpha=0.3, delta_t=3, t_end=10
    )
  )
  for step in range(1, 11):
    step_key = jax.random.fold_in(jax.random.key(3), step)
    grads = jax.tree.map(lambda w, key=step_key: jax.random.normal(key, w.shape), params)
    new_params, new_state = schedule(params, state, grads, step)
    old_masks, new_masks = mask_list(state), mask_list(new_state)
    for w, g, old, new, w_new in zip(
      kernel_list(params), kernel_list(grads), old_masks, new_masks, kernel_list(new_params), strict=True
    ):
      assert new.sum() == old.sum()  # the exact count kept, after every step
      np.testing.assert_array_equal(w_new, np.where(old & new, w, 0.0))  # inactive, dropped and grown exactly 0
      dropped, grown = set(np.flatnonzero(old & ~new).tolist()), set(np.flatnonzero(new & ~old).tolist())
      if step % 3 == 0 and step < 10:
        assert (dropped, grown) == brute_force_update(old, w, g, 0.15 * (1 + math.cos(math.pi * step / 10)))
        # 22 and 21 active: floor(n alpha_t) = 5, 2, 0 for alpha_t = 0.2382, 0.1036, 0.0073 at steps 3, 6, 9.
        assert old.sum() in (22, 21) and len(grown) == len(dropped) == {3: 5, 6: 2, 9: 0}[step]
      else:
        assert not dropped and not grown
    np.testing.assert_array_equal(new_params["conv"]["bias"], params["conv"]["bias"])  # never masked
    params = jax.tree.map(lambda w: w + 0.1, new_params)  # the next step's optimizer moves every weight
    state = new_state


def test_erk_densities_follow_the_formula_and_make_overfull_layers_dense():
  params = {"a": {"kernel": jnp.zeros((3, 3, 2, 4))}, "b": {"kernel": jnp.zeros((8, 16))}}
  # raw = sum(shape) / prod(shape): a 12 / 72, b 24 / 128; eps = k N / sum(raw n) = 0.5 * 200 / (12 + 24).
  densities = baselines.erk_densities(params, 0.5)
  eps = 100 / 36
  assert densities == pytest.approx({"a/kernel": eps * 12 / 72, "b/kernel": eps * 24 / 128})
  assert densities["a/kernel"] * 72 + densities["b/kernel"] * 128 == pytest.approx(100)
  small = {"a": {"kernel": jnp.zeros((2, 2))}, "b": {"kernel": jnp.zeros((8, 16))}}
  # raw a = 1, b = 0.1875: eps = 66 / 28 > 1 for a, so a is dense and b gets the other 62 of 66 weights.
  assert baselines.erk_densities(small, 0.5) == pytest.approx({"a/kernel": 1.0, "b/kernel": 62 / 128})
  state = baselines.rigl_hooks(0.5, 0.3, 100, 1000, "erk").init(small, jax.random.key(0))
  assert [int(m.sum()) for m in mask_list(state)] == [4, 62]


# ----------------------------------------------------------------------------------------------------------
# Inside the train step and the pipeline.


def make_step(config, axis_name=None, steps_per_epoch=STEPS_PER_EPOCH):
  state, tx = train.initial_state(config, "rigl", steps_per_epoch, (32, 8, 8, 1))
  step = functools.partial(
    train.train_step,
    apply_fn=models.make_apply_fn(sources.build_model(config, axis_name)),
    tx=tx,
    k=config.k,
    objective=objectives.get_objective(config.objective.name),
    config=config,
    steps_per_epoch=steps_per_epoch,
    hooks=baselines.phase_hooks(config, "rigl", steps_per_epoch),
  )
  return state, step


def test_the_train_step_drops_by_the_updated_weights_and_grows_by_the_objectives_dense_gradient():
  config = tiny_config()
  state, step = make_step(config)
  run = jax.jit(functools.partial(step, axis_name=None))
  _, no_update_step = make_step(tiny_config(**{"baseline.rigl_delta_t": 1000}))
  run_without_update = jax.jit(functools.partial(no_update_step, axis_name=None))
  apply_fn = models.make_apply_fn(sources.build_model(config))
  objective = objectives.get_objective("benign")

  @jax.jit
  def dense_gradient(weights, batch):  # dL/dw of the objective at the weights the model runs with, every entry
    variables = {"params": weights}
    return jax.grad(
      lambda v: sources.objective_loss(objective, config, apply_fn, v, batch, jax.random.key(0), None, 0.0)[0]
    )(variables)["params"]

  masks0 = mask_list(state.aux)
  assert [int(m.sum()) for m in masks0] == [ph.kept_count(m.size, 0.25) for m in masks0]
  for index in range(2):
    batch = sources.train_batches(config).batch_at(index)
    dense = kernel_list(dense_gradient(baselines.rigl_weights(state.params, state.aux), batch))
    trained = kernel_list(run_without_update(state, batch)[0].params)  # the same step, mask fixed
    old = mask_list(state.aux)
    state, _ = run(state, batch)
    for w, w_trained, g, m_old, m_new in zip(kernel_list(state.params), trained, dense, old, mask_list(state.aux)):
      assert m_new.sum() == m_old.sum()
      np.testing.assert_array_equal(w, np.where(m_new, w_trained, 0.0))  # dropped and grown weights exactly 0
      if index == 1:  # 2 batches consumed: due (delta_t 2, t_end = 0.75 * 8 = 6)
        # alpha_t (tested above) as the step computes it in float32: 0.225 * 40 active lies at 9 +- rounding.
        fraction = float(baselines.rigl_drop_fraction(index + 1, 0.3, 6))
        changed = set(np.flatnonzero(m_old & ~m_new)), set(np.flatnonzero(m_new & ~m_old))
        assert changed == brute_force_update(m_old, w_trained, g, fraction)
        assert changed[1]
      else:
        np.testing.assert_array_equal(m_new, m_old)


def test_a_stopped_rigl_stage_resumes_bit_identically_with_its_masks(tmp_path):
  config = tiny_config()
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  summary = train.run_stage(config, straight)
  train.run_stage(config_lib.stage_config(config, "rigl", stop_after_steps=3), interrupted)  # between updates 2, 4
  train.run_stage(config, interrupted)
  state = jax.eval_shape(lambda s: s, train.initial_state(config, "rigl", STEPS_PER_EPOCH, (32, 8, 8, 1))[0])
  target = {
    "model": {"params": state.params, "batch_stats": state.batch_stats, "scores": state.scores},
    "train": {
      "step": state.step,
      "opt_state": state.opt_state,
      "carry": state.carry,
      "rng": state.rng,
      "aux": state.aux,
    },
  }
  ends = [checkpoints.restore(workdir, target)[0] for workdir in (straight, interrupted)]
  for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(ends[1]), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert checkpoints.read_meta(interrupted)[1]["k"] == 0.25
  masks = mask_list(ends[1]["train"]["aux"])
  assert all(m.dtype == bool for m in masks) and int(ends[1]["train"]["step"]) == 2 * STEPS_PER_EPOCH
  # The kept fraction is exactly k per layer, counted on the weights the model runs with.
  sizes = [m.size for m in masks]
  assert summary["kept_fraction"] == sum(ph.kept_count(n, 0.25) for n in sizes) / sum(sizes)
  for w, m in zip(kernel_list(ends[1]["model"]["params"]), masks, strict=True):
    np.testing.assert_array_equal(w != 0, m)


@pytest.mark.devices(8)
@pytest.mark.parametrize("parallel_mode", ["shard_map", pytest.param("pmap", marks=pytest.mark.slow)])
def test_rigl_steps_on_eight_devices_equal_one_device(parallel_mode):
  config = tiny_config()
  batches = [sources.train_batches(config).batch_at(i) for i in range(2)]
  ends = []
  for mode, axis in (("single", None), (parallel_mode, parallel.AXIS)):
    state, step = make_step(config, axis, steps_per_epoch=2)  # 4 steps, t_end 3: an update at step 2
    runner = parallel.make_runner(step, mode, carry_fields=("carry",))
    current = runner.put_state(state)
    for batch in batches:
      current, _ = runner(current, runner.put_batch(batch))
    ends.append(runner.get_state(current))
  assert any((a != b).any() for a, b in zip(mask_list(state.aux), mask_list(ends[0].aux), strict=True))
  for a, b in zip(mask_list(ends[0].aux), mask_list(ends[1].aux), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(ends[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_config_checks_rigls_keys():
  for key, value, message in (
    ("baseline.rigl_distribution", "er", r"config.baseline.rigl_distribution='er' is invalid; valid: uniform, erk"),
    ("baseline.rigl_alpha", 0.0, r"config.baseline.rigl_alpha=0.0 must lie in \(0, 1\]"),
    ("baseline.rigl_delta_t", 0, "config.baseline.rigl_delta_t must be positive"),
  ):
    with pytest.raises(errors.ConfigError, match=message):
      config_lib.check_config(tiny_config(**{key: value}))
  config_lib.check_config(tiny_config())  # from scratch: no source


@pytest.mark.slow
def test_stage_all_trains_rigl_at_each_k(tmp_path):
  config = tiny_config(**{"stages.pretrain.epochs": 1})
  config.stage, config.ks, config.baselines, config.stop_after_steps = "all", (0.1,), ("rigl",), 2
  rows = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [(row["method"], row["stage"]) for row in rows][-1] == ("rigl", "rigl")
  assert checkpoints.read_meta(str(tmp_path / "k0.1" / "rigl"))[1]["stage"] == "rigl"
  shapes = jax.eval_shape(lambda: sources.init_variables(config, jax.random.key(0)))["params"]
  sizes = [w.size for p, w in jax.tree_util.tree_flatten_with_path(shapes)[0] if masking.is_prunable(p, w)]
  assert rows[-1]["kept_fraction"] == sum(ph.kept_count(n, 0.1) for n in sizes) / sum(sizes)
