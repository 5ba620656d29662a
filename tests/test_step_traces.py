"""The train step of a run compiles once per batch shape and moves nothing between host and device inside."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import config as config_lib
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel
from hydra_jax import sources
from hydra_jax import train

STEPS_PER_EPOCH = 4


def prune_setup(objective: str):
  """(config, state, tx) of a prune stage of vgg_tiny at k=0.1 with `objective` (2 attack steps)."""
  config = config_lib.default_config()
  config.model.name, config.model.num_classes, config.k = "vgg_tiny", 10, 0.1
  config.objective = config_lib.objective_config(objective)
  config.objective.steps = 2
  variables = sources.init_variables(config, jax.random.key(0))
  params, batch_stats = variables["params"], variables["batch_stats"]
  scores = masking.init_scores(params, "scaled", jax.random.key(1))
  tx = optim.make_optimizer(config, "prune", optim.trainable_labels(params, scores, "prune", False), STEPS_PER_EPOCH)
  state = train.TrainState(
    step=jnp.int32(0),
    params=params,
    scores=scores,
    batch_stats=batch_stats,
    opt_state=tx.init({"params": params, "scores": scores}),
    carry=(),
    rng=jax.random.PRNGKey(0),
    aux=(),
  )
  return config, state, tx


def batch_of(size: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.uniform(size=(size, 32, 32, 3)).astype(np.float32),
    "label": rng.integers(0, 10, size).astype(np.int32),
  }


def counted_runner(config, tx, traces: list):
  """The single-device runner of `train.run_stage`, around a step that records each trace's batch size."""
  apply_fn = models.make_apply_fn(sources.build_model(config))
  step = functools.partial(
    train.train_step,
    apply_fn=apply_fn,
    objective=objectives.get_objective(config.objective.name),
    config=config,
    tx=tx,
    k=config.k,
    steps_per_epoch=STEPS_PER_EPOCH,
  )

  def recording_step(state, batch, axis_name):
    traces.append(batch["image"].shape[0])
    return step(state, batch, axis_name=axis_name)

  return parallel.make_runner(chex.assert_max_traces(recording_step, n=2), "single")


def test_prune_step_traces_once_per_batch_shape_and_transfers_nothing():
  chex.clear_trace_counter()
  config, state, tx = prune_setup("trades")
  traces = []
  runner = counted_runner(config, tx, traces)
  state = runner.put_state(state)
  batches = [runner.put_batch(batch_of(8, seed)) for seed in range(3)] + [runner.put_batch(batch_of(4, 3))]
  with jax.transfer_guard("disallow"):  # any implicit host <-> device copy inside the loop raises
    for batch in batches[:3]:
      state, metrics = runner(state, batch)
    state, metrics = runner(state, batches[3])  # a new batch shape compiles once more
  assert traces == [8, 4]
  assert int(jax.device_get(state.step)) == 4 and np.isfinite(jax.device_get(metrics["loss"]))
