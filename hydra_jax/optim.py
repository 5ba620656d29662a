"""What trains in each stage, the optimizers and the learning-rate schedules (reference `utils/schedules.py`).

A stage only decides which leaves of `{'params': params, 'scores': scores}` train: `trainable_labels` marks
each leaf 'train' or 'freeze', and `make_optimizer` gives frozen leaves no update at all (optax
`multi_transform`). Weight decay is L2 added to the gradient before momentum / Adam moments, as PyTorch does.

  labels = optim.trainable_labels(params, scores, 'prune', freeze_bn=False)
  tx = optim.make_optimizer(config, 'prune', labels, steps_per_epoch=390)
  epochs = optim.stage_epochs(config, 'prune')      # warmup included, divided by the objective's replays

Optimizers and schedules are registries: `get_optimizer(name)` / `get_schedule(name)` raise ValueError
listing the valid names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from hydra_jax import PyTree
from hydra_jax import objectives

Schedule = Callable[..., jax.Array]


def param_kinds(params: PyTree) -> PyTree:
  """'norm' at the leaves of normalisation layers (a module with a 'scale'), 'weight' at every other leaf."""

  def kinds(tree, is_norm):
    if isinstance(tree, Mapping):
      return {name: kinds(value, "scale" in tree and "kernel" not in tree) for name, value in tree.items()}
    return "norm" if is_norm else "weight"

  return kinds(params, False)


def trainable_labels(
  params: PyTree,
  scores: PyTree | None,
  stage: str,
  freeze_bn: bool,
  rates: PyTree | None = None,
  *,
  learn_rates: bool = False,
  learn_scores: bool = True,
) -> PyTree:
  """'train' / 'freeze' for every leaf of `{'params': params, 'scores': scores}` (and 'rates' when given) in `stage`.

  Scores train in 'prune' (HYDRA's scores) and 'str' (the slot holds STR's thresholds, which train beside the
  weights, weight decay included); params train everywhere but in 'prune' (BatchNorm unless `freeze_bn`). HARP's
  rates train in 'prune' with `learn_rates` (the scores too unless `learn_scores` is False: HARP's rate_prune), and
  are fixed in every other stage.
  """

  def param_label(kind):
    if stage != "prune":
      return "train"
    return "train" if kind == "norm" and not freeze_bn else "freeze"

  learning_rates = learn_rates and stage == "prune"
  score_label = "train" if stage in ("prune", "str") and (learn_scores or not learning_rates) else "freeze"
  labels = {
    "params": jax.tree.map(param_label, param_kinds(params)),
    "scores": jax.tree.map(lambda _: score_label, scores),
  }
  if rates is not None:
    labels["rates"] = jax.tree.map(lambda _: "train" if learning_rates else "freeze", rates)
  return labels


def _sgd(lr, opt):
  return optax.sgd(lr, momentum=opt.momentum or None)


def _adam(lr, opt):
  del opt
  return optax.adam(lr)


def _rmsprop(lr, opt):
  return optax.rmsprop(lr, decay=0.99, eps=1e-8, momentum=opt.momentum or None, eps_in_sqrt=False)


_OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "rmsprop": _rmsprop}


def optimizer_names() -> tuple[str, ...]:
  """The registered optimizer names."""
  return tuple(_OPTIMIZERS)


def get_optimizer(name: str) -> Callable[[Schedule, ml_collections.ConfigDict], optax.GradientTransformation]:
  """`(schedule, config.optimizer) -> optax transform` of `name`; raises ValueError listing the valid names."""
  if name not in _OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {sorted(_OPTIMIZERS)}")
  return _OPTIMIZERS[name]


# Each schedule maps a step counted from the end of warmup to the learning rate; `learning_rate` adds the
# warmup (warmup_lr for the first warmup_epochs, the reference's behaviour for every schedule).


def _cosine(step, *, lr, steps, steps_per_epoch):
  """Per step: lr/2 (1 + cos(pi t / T)) over the T steps after warmup (the reference's is per epoch)."""
  del steps_per_epoch
  return 0.5 * lr * (1 + jnp.cos(jnp.pi * step / max(steps, 1)))


def _reference_cosine(step, *, lr, steps, steps_per_epoch):
  """The reference's per-epoch cosine, quirk included: epoch e' uses cos((e' - 1) / E * pi)."""
  epoch, epochs = step // steps_per_epoch, max(steps // steps_per_epoch, 1)
  return 0.5 * lr * (1 + jnp.cos((epoch - 1) / epochs * jnp.pi))


def _step_decay(step, *, lr, steps, steps_per_epoch):
  """lr, then lr / 10 from 75% of the steps after warmup and lr / 100 from 90% (reference `step`)."""
  del steps_per_epoch
  fraction = step / max(steps, 1)
  return lr * jnp.where(fraction >= 0.9, 0.01, jnp.where(fraction >= 0.75, 0.1, 1.0))


def _constant(step, *, lr, steps, steps_per_epoch):
  del steps, steps_per_epoch
  return lr * jnp.ones_like(step, jnp.float32)


_SCHEDULES = {"cosine": _cosine, "reference_cosine": _reference_cosine, "step": _step_decay, "constant": _constant}


def schedule_names() -> tuple[str, ...]:
  """The registered schedule names."""
  return tuple(_SCHEDULES)


def get_schedule(name: str) -> Schedule:
  """`(step, *, lr, steps, steps_per_epoch) -> lr` of `name`, for steps counted from the end of warmup.

  Raises ValueError listing the valid names.
  """
  if name not in _SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; valid schedules: {sorted(_SCHEDULES)}")
  return _SCHEDULES[name]


def stage_epochs(config: ml_collections.ConfigDict, stage: str) -> int:
  """Epochs of `stage`: warmup_epochs plus the stage's epochs divided by the objective's replays.

  As the reference: it trains `epochs + warmup_epochs` epochs, and free AT's epochs become ceil(epochs / m).
  """
  objective = objectives.get_objective(config.objective.name)
  epochs = math.ceil(config.stages[stage].epochs / objective.replays(config.objective))
  return config.optimizer.warmup_epochs + epochs


def learning_rate(config: ml_collections.ConfigDict, stage: str, steps_per_epoch: int) -> Schedule:
  """`step -> lr` of `stage`: warmup_lr for warmup_epochs, then config.optimizer.schedule to the stage's end.

  Args:
    config: run config (optimizer.schedule / warmup_epochs / warmup_lr, stages.<stage>.lr and epochs).
    stage: one of `config.STAGES`.
    steps_per_epoch: optimizer updates per epoch.

  Returns:
    A function of the optimizer step (int32 scalar) giving the learning rate (float32 scalar).
  """
  opt = config.optimizer
  warmup_steps = opt.warmup_epochs * steps_per_epoch
  steps = stage_epochs(config, stage) * steps_per_epoch - warmup_steps
  schedule = functools.partial(
    get_schedule(opt.schedule), lr=config.stages[stage].lr, steps=steps, steps_per_epoch=steps_per_epoch
  )
  return lambda step: jnp.where(step < warmup_steps, opt.warmup_lr, schedule(step - warmup_steps))


def make_optimizer(
  config: ml_collections.ConfigDict, stage: str, labels: PyTree, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The stage's optimizer over `{'params', 'scores'}`: frozen leaves get no update at all.

  Args:
    config: run config (optimizer, stages.<stage>.lr / epochs, objective replays).
    stage: one of `config.STAGES`.
    labels: from `trainable_labels`.
    steps_per_epoch: optimizer updates per epoch (batches x the objective's replays).

  Returns:
    An optax transform over `{'params': params, 'scores': scores}`.
  """
  opt = config.optimizer
  schedule = learning_rate(config, stage, steps_per_epoch)
  train = optax.chain(optax.add_decayed_weights(opt.weight_decay), get_optimizer(opt.name)(schedule, opt))
  return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)
