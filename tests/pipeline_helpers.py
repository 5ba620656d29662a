"""Shared code of the pipeline and export tests: a run config of a few steps per stage, checkpoints read back
with orbax directly, the reference's masks restated in numpy, and the train step run on one or 8 devices."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import parallel
from hydra_jax import sources
from hydra_jax import train

MODEL = "cnn_tiny"  # BN-free: conv 4x4/2 (1 -> 4), conv 4x4/2 (4 -> 8), dense 32 -> 16, dense 16 -> 10 on digits
KERNEL_SHAPES = {"0/kernel": (4, 4, 1, 4), "2/kernel": (4, 4, 4, 8), "5/kernel": (32, 16), "7/kernel": (16, 10)}
STEPS_PER_EPOCH = 44  # 1437 training images in batches of 32


def tiny_config(**overrides):
  """cnn_tiny on digits: one epoch (44 steps) per stage with Adam, benign loss, PGD-5 evaluation on the first 64
  test images. The pretrained model reaches about 60% clean and 12% PGD accuracy (chance: 10%)."""
  config = config_lib.default_config()
  config.model.name = MODEL
  config.data.name = "digits"
  config.data.batch_size = 32
  config.data.eval_batch_size = 32
  config.data.eval_examples = 64
  config.data.prefetch = 0
  config.objective = config_lib.objective_config("benign")
  config.eval.eps, config.eval.step_size, config.eval.steps = 0.1, 0.04, 5
  for stage in config_lib.STAGES:
    config.stages[stage].epochs = 1
  config.optimizer.name, config.optimizer.schedule = "adam", "constant"
  config.stages.pretrain.lr = 0.03
  config.log.progress = False
  config.checkpoint.async_save = False
  config.parallel.mode = "single"
  return override(config, **overrides)


TENTH_STEPS_PER_EPOCH = 4  # 10% of the 1437 digits training images in batches of 32


def tenth_of_digits_config(model):
  """Benign (key-free) training of `model` on 10% of digits (4 steps per epoch), one epoch per stage, k = 0.1,
  clean evaluation on the first 64 test images, in this process."""
  config = config_lib.default_config()
  config.model.name = model
  config.data.name = "digits"
  config.data.batch_size = 32
  config.data.data_fraction = 0.1
  config.data.eval_batch_size = 64
  config.data.eval_examples = 64
  config.data.prefetch = 0
  config.objective = config_lib.objective_config("benign")
  config.eval.methods = ()
  for stage in config_lib.STAGES:
    config.stages[stage].epochs = 1
  config.log.progress = False
  config.checkpoint.async_save = False
  config.parallel.mode = "single"
  config.k = 0.1
  return config


def override(config, **overrides):
  """`config` with each dotted key of `overrides` set, e.g. override(config, **{"data.batch_size": 16})."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    parent = config_lib.lookup(config, ".".join(path)) if path else config
    parent[leaf] = value
  return config


def restore_model(workdir, with_scores=True, model=MODEL, input_shape=(8, 8, 1)):
  """(flat params, flat batch_stats, flat scores or None) of the latest checkpoint under `workdir`, read with
  `checkpoints.restore` against shapes from `model.init` (not through train/export)."""
  variables = jax.eval_shape(
    lambda: models.get_model(model, 10).init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)
  )
  params = variables["params"]
  scores = jax.tree_util.tree_map_with_path(lambda p, w: w if p[-1].key == "kernel" else None, params)
  items, _ = checkpoints.restore(
    workdir,
    {
      "model": {
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "scores": scores if with_scores else None,
      }
    },
  )
  model_item = items["model"]
  return (
    flat(model_item["params"]),
    flat(model_item["batch_stats"]),
    flat(model_item["scores"]) if with_scores else None,
  )


def flat(tree):
  """{'0/kernel': numpy array} for a nested dict; None leaves dropped."""
  if not tree:
    return {}
  return {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items() if v is not None}


def numpy_topk_mask(scores, k):
  """The reference's GetSubnet: stable ascending sort of |s|, the first int((1 - k) n) entries get 0."""
  flat_scores = np.abs(np.asarray(scores, np.float64)).ravel()
  mask = np.ones(flat_scores.size)
  mask[np.argsort(flat_scores, kind="stable")[: int((1 - k) * flat_scores.size)]] = 0
  return mask.reshape(np.shape(scores)).astype(bool)


def numpy_global_mask(scores, k):
  """Top-k of |s| ranked over all layers jointly (ties by flat index over the layers in tree order)."""
  names = sorted(scores)  # flax orders the dict keys of this model's layers the same way
  joint = numpy_topk_mask(np.concatenate([np.ravel(scores[n]) for n in names]), k)
  sizes = np.cumsum([scores[n].size for n in names])[:-1]
  return {n: m.reshape(scores[n].shape) for n, m in zip(names, np.split(joint, sizes))}


def kept_count(n, k):
  """Entries a top-k mask keeps of n: the reference's n - int((1 - k) n), at least one."""
  return n - min(int((1 - k) * n), n - 1)


def numpy_topk(values, k):
  """0/1 float array keeping the kept_count(n, k) largest `values` (a full sort; continuous draws have no ties)."""
  flat = np.asarray(values, np.float64).ravel()
  mask = np.zeros(flat.size)
  mask[np.argsort(-flat)[: kept_count(flat.size, k)]] = 1
  return mask.reshape(np.shape(values))


def numpy_project(w, k):
  """`w` with its kept_count(n, k) largest |w| kept and every other entry 0 (a full sort; distinct values)."""
  return np.where(numpy_topk(np.abs(w), k) > 0, w, np.zeros_like(w))


def scaled_scores(weight):
  """HYDRA's scaled init written out: sqrt(6 / fan_in) * w / max|w|, fan_in = kh * kw * in (or in)."""
  fan_in = math.prod(weight.shape[:-1])
  return math.sqrt(6 / fan_in) * weight / np.max(np.abs(weight))


def run_train_steps(config, state, tx, batches, mode, steps_per_epoch):
  """(final state, last metrics) of the config's train step on `batches`, from `state`: on one device (mode
  'single') or on every device ('pmap' / 'shard_map', the model's BatchNorm over the device axis)."""
  axis = None if mode == "single" else parallel.AXIS
  step = functools.partial(
    train.train_step,
    apply_fn=models.make_apply_fn(sources.build_model(config, axis)),
    objective=objectives.get_objective(config.objective.name),
    config=config,
    tx=tx,
    k=config.k,
    steps_per_epoch=steps_per_epoch,
  )
  runner = parallel.make_runner(step, mode, carry_fields=("carry",))
  current = runner.put_state(state)
  for batch in batches:
    current, metrics = runner(current, runner.put_batch(batch))
  return runner.get_state(current), metrics
