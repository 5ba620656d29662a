"""Tests of hydra_jax.parallel: pmap and shard_map runners against the single-device step, batch and state
placement over the 8 simulated devices, and the errors for batches that do not divide."""

import functools
import inspect
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import parallel
from hydra_jax import sources
from hydra_jax import train
from tests import tolerances

DEVICES = 8
BATCH = 16  # 2 examples per device


@flax.struct.dataclass
class ToyState:
  """A linear regression weight (replicated), a step counter, and a per-example carry (split by example)."""

  w: jax.Array
  step: jax.Array
  carry: jax.Array


def toy_step(state, batch, *, axis_name):
  """One SGD step of least squares on this device's rows; gradient and metrics averaged over `axis_name`."""

  def loss_fn(w):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

  loss, grad = jax.value_and_grad(loss_fn)(state.w)
  device = jnp.int32(0)
  if axis_name is not None:
    loss, grad = jax.lax.pmean((loss, grad), axis_name)
    device = jax.lax.axis_index(axis_name)
  # The carry rows this device holds must be the rows of its batch slice: add each row's example id.
  carry = state.carry + batch["id"][:, None].astype(jnp.float32)
  metrics = {"loss": loss, "device": device}
  return ToyState(w=state.w - 0.1 * grad, step=state.step + 1, carry=carry), metrics


def toy_data(steps=3, seed=0):
  rng = np.random.default_rng(seed)
  batches = [
    {
      "x": rng.normal(size=(BATCH, 3)).astype(np.float32),
      "y": rng.normal(size=BATCH).astype(np.float32),
      "id": np.arange(BATCH, dtype=np.int32),
    }
    for _ in range(steps)
  ]
  state = ToyState(
    w=jnp.asarray(rng.normal(size=3), jnp.float32), step=jnp.int32(0), carry=jnp.zeros((BATCH, 2), jnp.float32)
  )
  return state, batches


def run(mode, state, batches):
  runner = parallel.make_runner(toy_step, mode, carry_fields=("carry",))
  current = runner.put_state(state)
  losses = []
  for batch in batches:
    current, metrics = runner(current, runner.put_batch(batch))
    losses.append(np.mean(np.asarray(metrics["loss"])))
  return runner.get_state(current), losses


def numpy_reference(state, batches):
  """The same SGD by hand on the full batch (the mean over devices of equal-size means is the full mean)."""
  w, losses = np.asarray(state.w, np.float64), []
  for batch in batches:
    residual = batch["x"] @ w - batch["y"]
    losses.append(np.mean(residual**2))
    w = w - 0.1 * 2 * batch["x"].T @ residual / BATCH
  return w, losses


@pytest.mark.devices(DEVICES)
@pytest.mark.parametrize("mode", ["single", "pmap", "shard_map"])
def test_runners_give_the_full_batch_sgd_result(mode):
  state, batches = toy_data()
  final, losses = run(mode, state, batches)
  expected_w, expected_losses = numpy_reference(state, batches)
  np.testing.assert_allclose(final.w, expected_w, rtol=1e-5)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  assert int(final.step) == 3
  # Each carry row got its example id once per step, whichever device held it.
  np.testing.assert_array_equal(final.carry, np.repeat(3 * np.arange(BATCH, dtype=np.float32)[:, None], 2, 1))


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_parallel_runners_equal_the_single_device_runner(mode):
  state, batches = toy_data(seed=1)
  single, single_losses = run("single", state, batches)
  multi, multi_losses = run(mode, state, batches)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(single_losses, multi_losses, rtol=1e-6)


@pytest.mark.devices(DEVICES)
def test_each_device_gets_a_contiguous_slice_of_the_batch_and_the_carry():
  state, batches = toy_data(steps=1)
  per_device = BATCH // DEVICES
  for mode in ("pmap", "shard_map"):
    runner = parallel.make_runner(toy_step, mode, carry_fields=("carry",))
    placed = runner.put_batch(batches[0])
    placed_state = runner.put_state(state)
    if mode == "pmap":  # host arrays stacked [devices, per-device rows, ...]
      assert placed["x"].shape == (DEVICES, per_device, 3)
      np.testing.assert_array_equal(placed["id"], np.arange(BATCH).reshape(DEVICES, per_device))
      assert placed_state.w.shape == (DEVICES, 3) and placed_state.carry.shape == (DEVICES, per_device, 2)
      np.testing.assert_array_equal(placed_state.w, np.broadcast_to(state.w, (DEVICES, 3)))
    else:  # global arrays: the batch and carry sharded by rows over the mesh, the rest replicated
      assert placed["x"].shape == (BATCH, 3)
      mesh_devices = list(runner.mesh.devices.ravel())
      for shard in placed["id"].addressable_shards:
        i = mesh_devices.index(shard.device)
        np.testing.assert_array_equal(shard.data, np.arange(i * per_device, (i + 1) * per_device))
      for shard in placed_state.carry.addressable_shards:
        assert shard.data.shape == (per_device, 2)
      assert all(np.array_equal(s.data, state.w) for s in placed_state.w.addressable_shards)
      assert len(placed_state.w.addressable_shards) == DEVICES
    # The step sees device i's rows on device i: after one step carry row r holds r, and device indices agree.
    new_state, metrics = runner(placed_state, placed)
    host = runner.get_state(new_state)
    np.testing.assert_array_equal(host.carry[:, 0], np.arange(BATCH))
    if mode == "pmap":
      np.testing.assert_array_equal(metrics["device"], np.arange(DEVICES))


def test_put_state_then_get_state_is_the_identity():
  state, _ = toy_data()
  state = state.replace(carry=jnp.arange(BATCH * 2, dtype=jnp.float32).reshape(BATCH, 2))
  for mode in parallel.MODES:
    runner = parallel.make_runner(toy_step, mode, carry_fields=("carry",))
    back = runner.get_state(runner.put_state(state))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
      assert np.shape(a) == np.shape(b)
      np.testing.assert_array_equal(a, b)


def test_single_mode_runs_on_one_device_without_collectives():
  runner = parallel.make_runner(toy_step, "single")
  assert runner.devices == (jax.devices()[0],)
  state, batches = toy_data(steps=1)
  _, metrics = runner(runner.put_state(state), runner.put_batch(batches[0]))
  assert int(metrics["device"]) == 0  # axis_name=None: no axis_index


@pytest.mark.devices(DEVICES)
def test_batches_that_do_not_divide_over_the_devices_are_rejected():
  parallel.check_batch_divides(64, 8)
  parallel.check_batch_divides(3, 1)
  with pytest.raises(ValueError, match="batch size 36 does not divide by the 8 devices; use a multiple of 8"):
    parallel.check_batch_divides(36, 8)
  _, batches = toy_data(steps=1)
  odd = {name: value[:12] for name, value in batches[0].items()}
  for mode in ("pmap", "shard_map"):
    runner = parallel.make_runner(toy_step, mode)
    with pytest.raises(ValueError, match="batch size 12 does not divide by the 8 devices"):
      runner.put_batch(odd)
  with pytest.raises(ValueError, match="unknown parallel mode 'dp'; valid: single, pmap, shard_map"):
    parallel.make_runner(toy_step, "dp")


def test_cpu_steps_compile_with_the_memory_optimized_scheduler_to_a_smaller_plan_and_the_same_values():
  assert parallel.compiler_options("gpu") is None
  options = parallel.compiler_options("cpu")
  assert options == parallel.CPU_COMPILER_OPTIONS
  model = models.get_model("cnn_small", 10)
  apply_fn = models.make_apply_fn(model)
  x = jnp.linspace(0.0, 1.0, 8 * 32 * 32 * 3).reshape(8, 32, 32, 3)
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params, x):
    return jnp.sum(apply_fn({**variables, "params": params}, x, True)[0] ** 2)

  default = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile()
  scheduled = jax.jit(jax.grad(loss), compiler_options=options).lower(variables["params"], x).compile()
  assert scheduled.memory_analysis().temp_size_in_bytes < default.memory_analysis().temp_size_in_bytes
  # Another schedule may place buffers and order the work differently, which the code does not promise keeps every
  # sum's order: each gradient entry composes the sums (at most batch x pixels terms) of cnn_small's 4 layers, so the
  # two differ by at most about 4 x 2 gamma_n of the leaf's size (tests/tolerances.py), as in the BatchNorm runs below.
  budget = 4 * 2 * tolerances.gamma(8 * 32 * 32)
  for a, b in zip(jax.tree.leaves(default(variables["params"], x)), jax.tree.leaves(scheduled(variables["params"], x))):
    np.testing.assert_allclose(a, b, rtol=0, atol=budget * np.max(np.abs(b)))


@pytest.mark.parametrize("mode", ["single", "shard_map"])
def test_the_runners_own_cpu_program_is_compiled_with_the_memory_optimized_scheduler(mode):
  """The program a 'single' / 'shard_map' runner executes is the one XLA compiles with `CPU_COMPILER_OPTIONS`
  (the toy step's schedule differs from XLA's default one), not a default compile of the same step."""
  runner = parallel.make_runner(toy_step, mode, carry_fields=("carry",))
  state, batches = toy_data(steps=1)
  state, batch = runner.put_state(state), runner.put_batch(batches[0])
  runner(state, batch)  # a 'shard_map' runner builds its jitted step on the first call
  if mode == "single":
    jitted = runner.run
  else:
    (jitted,) = inspect.getclosurevars(runner.run).nonlocals["compiled"].values()
  program = jitted.lower(state, batch).compile().as_text()
  step = jitted.__wrapped__
  scheduled = jax.jit(step, compiler_options=parallel.CPU_COMPILER_OPTIONS).lower(state, batch).compile().as_text()
  assert program == scheduled
  assert program != jax.jit(step).lower(state, batch).compile().as_text()


# ------------------------------------------------------------------------------------------------------------
# BatchNorm models, 1 vs 8 devices, several steps of the real train step.
#
# Every value of a step is a sum of at most n terms (the largest: the stem's BN statistics and kernel gradient over
# the global batch's pixels), and two programs that add them in another order (8 devices, other batch chunks) differ
# by at most 2 gamma_n of the sum of |terms| (tests/tolerances.py). A gradient composes the sums of the D = BN_DEPTH
# layers that backpropagation crosses (to first order D gamma_n, as for a product of D matrices), and the step is well
# conditioned where its objective is smooth, so S steps differ by at most about S D 2 gamma_n of what the S steps
# changed (measured on resnet_tiny: 1/15 of it at most). Sign-based ascent steps are not smooth: the TRADES attack
# starts 0.001 N(0, I) from x, where its logits differ from the clean ones by ~3e-5, so its gradient carries the
# logits' rounding at 1e-3 of its size, signs near 0 flip, and a flip is a whole step: one ulp anywhere changes the
# run as much as 8 devices do (docs/multihost.md). These tests therefore run TRADES without ascent steps (its random
# start: per-example draws keyed by global position, its four train-mode forwards and KL) and PGD with an l2 step (the
# normalised gradient of the cross-entropy, continuous where that gradient is not near 0).

BN_STEPS = 4
BN_BATCH = 16  # 2 examples of 8x8 digits per device
BN_DEPTH = 10  # conv / dense layers: resnet_tiny has 10 (stem, 8 in blocks, classifier), wrn_tiny 8


def _bn_config(model, objective):
  config = config_lib.default_config()
  config.model.name, config.data.name, config.data.batch_size = model, "digits", BN_BATCH
  config.stages.pretrain.lr = 0.05
  config.objective = config_lib.objective_config(objective)
  if objective == "pgd_at":  # l2 steps: x + step_size g / ||g||, continuous in g
    config.objective.norm, config.objective.eps, config.objective.step_size, config.objective.steps = "l2", 0.5, 0.25, 1
  elif objective == "trades":  # the start x + 0.001 N(0, I) only (see above)
    config.objective.eps, config.objective.steps = 0.1, 0
  return config


@functools.cache
def _bn_run(model, objective, mode):
  """(initial state, the states after each of BN_STEPS pretrain steps) on 8 devices in `mode`, or 1 ('single')."""
  config = _bn_config(model, objective)
  batches = [data.train_batches("digits", BN_BATCH, seed=0).batch_at(i) for i in range(BN_STEPS)]
  state, tx = train.initial_state(config, "pretrain", 10, batches[0]["image"].shape)
  axis = None if mode == "single" else parallel.AXIS
  step = functools.partial(
    train.train_step,
    apply_fn=models.make_apply_fn(sources.build_model(config, axis)),
    objective=objectives.get_objective(objective),
    config=config,
    tx=tx,
    k=config.k,
    steps_per_epoch=10,
  )
  runner = parallel.make_runner(step, mode, carry_fields=("carry",))
  current, states = runner.put_state(state), []
  for batch in batches:
    current, _ = runner(current, runner.put_batch(batch))
    states.append(jax.device_get(runner.get_state(current)))
  return jax.device_get(state), states


def _assert_runs_agree(model, objective, mode):
  initial, single = _bn_run(model, objective, "single")
  _, multi = _bn_run(model, objective, mode)
  n_terms = BN_BATCH * 8 * 8  # global batch x pixels of the 8x8 digits
  for steps, (want, got) in enumerate(zip(single, multi), 1):
    budget = steps * BN_DEPTH * 2 * tolerances.gamma(n_terms)
    for name in ("params", "batch_stats"):
      flat = jax.tree_util.tree_flatten_with_path(getattr(want, name))[0]
      for (path, w), g, w0 in zip(flat, jax.tree.leaves(getattr(got, name)), jax.tree.leaves(getattr(initial, name))):
        changed = np.max(np.abs(np.asarray(w, np.float64) - w0))
        diff = np.max(np.abs(np.asarray(g, np.float64) - w))
        assert diff <= budget * changed, (
          f"{model} {objective} {mode} step {steps} {name}{jax.tree_util.keystr(path)}: 8 devices differ from 1 "
          f"by {diff:.3g}, {diff / changed:.3g} of the change {changed:.3g} (float reassociation: {budget:.3g})"
        )


# All slow (the WRN's benign run alone is about 20 s of CPU): BatchNorm over the device axis is in the default run
# through tests/test_own_models.py (a Linen and an NNX network with BatchNorm, 8 devices = 1 with batch statistics
# averaged over the axis), and PGD's attack per device through test_train.py's 8-device pgd_at test.
@pytest.mark.slow
@pytest.mark.devices(DEVICES)
@pytest.mark.parametrize(
  "model, objective, mode",
  list(itertools.product(("resnet_tiny", "wrn_tiny"), ("benign", "pgd_at", "trades"), ("shard_map", "pmap"))),
)
def test_batchnorm_models_train_on_eight_devices_as_on_one(model, objective, mode):
  _assert_runs_agree(model, objective, mode)
