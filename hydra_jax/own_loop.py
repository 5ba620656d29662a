"""HYDRA inside your own training loop: scores, top-k masks and the straight-through gradient around your model and
your optax optimizer, with a robust loss from `hydra_jax.objectives` (compare jaxpruner's `wrap_optax`).

HYDRA's prune stage (Sehwag et al. 2020, Sec. 3) freezes the pretrained weights and trains one importance score
per weight; the model runs with `w * mask`, the mask keeping the top-k fraction of |s| in each layer, and the
gradient reaches s straight through the mask (Eq. 4). The finetune stage then trains the kept weights with the
mask fixed. Here both are a few lines around any model with an `apply_fn(variables, x, train) -> (logits,
variables)` (`models.make_apply_fn(linen_module)`, or `apply_fn_of(nnx_module)` for a built NNX module):

  apply_fn, variables = own_loop.apply_fn_of(model)                     # Linen (with its variables) or NNX
  trainable = own_loop.init(variables["params"], jax.random.key(0))     # {'params', 'scores'}: scores = HYDRA's
  tx = own_loop.wrap_optax(optax.sgd(0.1, momentum=0.9), "prune")        # trains the scores, not the weights
  loss_fn = own_loop.robust_loss(apply_fn, "trades", k=0.05, eps=8 / 255, steps=10)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, batch_stats, batch, key):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, batch_stats)), grads = grad_fn(trainable, batch_stats, batch, key)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, batch_stats, loss

  pruned = own_loop.export(trainable, k=0.05)          # the weights, pruned entries exactly 0

For finetuning start from `{'params': pruned, 'scores': trainable['scores']}` with `wrap_optax(tx, "finetune")`:
the pruned weights get zero gradient through the mask and stay 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import nnx

from hydra_jax import PyTree
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax.models import own

Trainable = dict[str, PyTree]  # {'params': the weights, 'scores': HYDRA's scores (None at unpruned leaves)}


def apply_fn_of(model: Any, variables: PyTree | None = None) -> tuple[models.ApplyFn, PyTree]:
  """(apply_fn(variables, x, train) -> (logits, variables), variables) of a built NNX module, or of a Linen module
  with its `variables` ({'params', 'batch_stats'}); NNX BatchNorm statistics become 'batch_stats'."""
  if isinstance(model, nnx.Module):
    model, variables = own.split_nnx(model)
  elif not isinstance(model, nn.Module) or variables is None:
    raise ValueError("apply_fn_of takes a built NNX module, or a Linen module and its variables")
  return models.make_apply_fn(model), variables


def init(
  params: PyTree, key: jax.Array, *, score_init: str = "scaled", prunable: Callable[..., bool] = masking.is_prunable
) -> Trainable:
  """{'params': params, 'scores': scores mirroring params}: a score array at each prunable weight (default: conv and
  dense kernels; `masking.PathFilter` chooses others), None elsewhere. `score_init`: a `masking.SCORE_INITS` name
  ('scaled', HYDRA's, starts from the weight-magnitude mask)."""
  return {"params": params, "scores": masking.init_scores(params, score_init, key, prunable=prunable)}


def masked(trainable: Trainable, k: float, scope: str = "layer") -> PyTree:
  """The weights the model runs with: w * top-k mask of |s| (per layer, or `scope='global'`), differentiable in the
  scores straight through the mask and in the kept weights."""
  return masking.apply_masks(trainable["params"], trainable["scores"], k, scope=scope)


def export(trainable: Trainable, k: float, scope: str = "layer") -> PyTree:
  """The weights with the pruned entries exactly 0 (`masking.export_dense`), e.g. to save or to finetune from."""
  return masking.export_dense(trainable["params"], trainable["scores"], k, scope=scope)


def wrap_optax(tx: optax.GradientTransformation, stage: str = "prune", freeze_bn: bool = False):
  """`tx` over a `Trainable` that updates what HYDRA's `stage` trains, and nothing else (`optim.trainable_labels`).

  'prune': the scores (and normalisation scales / shifts unless `freeze_bn`); the weights stay as they are.
  'finetune': the weights; the scores (the mask) stay fixed.
  """
  if stage not in ("prune", "finetune"):
    raise ValueError(f"stage {stage!r} is not 'prune' or 'finetune'")
  label = lambda trainable: optim.trainable_labels(trainable["params"], trainable["scores"], stage, freeze_bn)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, label)


def robust_loss(apply_fn: models.ApplyFn, objective: str, k: float, scope: str = "layer", **settings: Any):
  """`loss(trainable, batch_stats, batch, key) -> (loss, (metrics, batch_stats))` of a registered objective on the
  masked model (masked once per call; the attack closes over the masked weights).

  Args:
    apply_fn: the model's `apply_fn(variables, x, train) -> (logits, variables)`.
    objective: an `objectives.objective_names()` name without state ('benign', 'pgd_at', 'trades', 'smooth', ...).
    k: fraction of weights kept.
    scope: 'layer' (k in every layer) or 'global'.
    **settings: the objective's settings over its defaults (`objectives.default_config(objective)`), e.g.
      eps=8 / 255, step_size=2 / 255, steps=10, beta=6.0 for TRADES.
  """
  spec = objectives.get_objective(objective)
  if spec.init_carry is not None or spec.takes_epoch:
    raise ValueError(f"objective {objective!r} needs a carry or an epoch schedule; use the pipeline's train step")
  config = objectives.default_config(objective)
  for name, value in settings.items():
    if name not in config:
      raise ValueError(f"objective {objective!r} has no setting {name!r}; its settings: {', '.join(config)}")
    config[name] = value

  def loss(trainable: Trainable, batch_stats: PyTree, batch: dict, key: jax.Array):
    variables = {"params": masked(trainable, k, scope), **({"batch_stats": batch_stats} if batch_stats else {})}
    value, (metrics, new_variables) = spec.loss_fn(apply_fn, variables, batch, key, config)
    return value, (metrics, new_variables.get("batch_stats", batch_stats))

  return loss
