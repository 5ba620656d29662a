"""HYDRA's pipeline: pretrain -> prune -> finetune, one train step for every stage and objective.

A stage only chooses what trains (Sehwag et al. 2020, Sec. 3; reference `utils/model.py:prepare_model`):

  | stage    | scores             | conv / dense weights and biases  | BatchNorm scale / shift     |
  |----------|--------------------|----------------------------------|-----------------------------|
  | pretrain | none (dense, k=1)  | train                            | train                       |
  | prune    | train (+ weight decay) | frozen                       | train unless `freeze_bn`    |
  | finetune | frozen (mask fixed)| train; pruned entries stay 0     | train                       |

BatchNorm running statistics update in every stage (the reference always calls `model.train()`). Prune starts
from the pretrained weights with scores from `masking.init_scores(params, config.score_init)` (HYDRA's
`scaled` init by default); finetune starts from the pruned checkpoint with the pruned weights set to exactly
0 (`masking.export_dense`), so they stay 0 at every step (their gradient through the mask is 0). The LWM
baseline is finetune from the pretrained checkpoint with `score_init='scaled'`: a fixed magnitude mask.

The step masks the parameters once (`masking.apply_masks`), then calls the objective, whose attacks close
over the masked parameters. It is written per device: with `axis_name` set it averages gradients, metrics
and BN statistics over that axis, and `parallel.make_runner` runs it with pmap or shard_map.

Entry points (no absl flags needed, e.g. from a notebook):

  config = train.default_config()            # or a configs/*.py get_config(arg)
  config.stage = 'all'                       # pretrain, prune at each k of config.ks, finetune, LWM
  summary = train.train_and_evaluate(config, '/tmp/hydra_run')

`k` is the fraction of weights KEPT: k=0.01 is 99% pruning.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from hydra_jax import attacks
from hydra_jax import checkpoints
from hydra_jax import convert
from hydra_jax import data
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import parallel

PyTree = Any
STAGES = ("pretrain", "prune", "finetune")


# ----------------------------------------------------------------------------------------------------------
# Configuration.


def default_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with the reference's CIFAR-10 defaults (spec section 7)."""
  c = ml_collections.ConfigDict()
  c.seed = 1234
  c.stage = "pretrain"  # 'pretrain' | 'prune' | 'finetune' | 'all' (pretrain, then per k: prune, finetune, LWM).
  c.source = ""  # prune/finetune: workdir or checkpoint dir of the previous stage, or a HYDRA PyTorch .pth.tar.
  c.k = 0.01  # fraction of weights KEPT in prune/finetune.
  c.ks = (0.1, 0.01)  # stage='all': one prune + finetune (+ LWM) branch per k.
  c.lwm = True  # stage='all': also run the LWM baseline (magnitude mask + finetune) at each k.
  c.score_init = "scaled"  # masking.SCORE_INITS name, or 'source' to keep the source checkpoint's scores.
  c.freeze_bn = False  # prune: freeze BatchNorm scale/shift too.
  c.mask = ml_collections.ConfigDict({"scope": "layer", "min_layer_k": 0.0})

  c.model = ml_collections.ConfigDict({"name": "vgg16_bn", "num_classes": 0, "dtype": "float32"})
  c.data = ml_collections.ConfigDict({
      "name": "cifar10", "data_dir": "", "batch_size": 128, "eval_batch_size": 256, "image_size": 0,
      "data_fraction": 1.0, "semisup_path": "", "semisup_fraction": 1.0, "prefetch": 2, "workers": 0,
      "eval_examples": 0})  # eval_examples: evaluate on the first N test examples only (0: all).
  c.objective = objective_config("trades")
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 0,
      "warmup_lr": 0.1})
  c.stages = ml_collections.ConfigDict({  # per-stage length and learning rate (reference scripts).
      "pretrain": {"epochs": 100, "lr": 0.1},
      "prune": {"epochs": 20, "lr": 0.1},
      "finetune": {"epochs": 100, "lr": 0.01}})
  c.eval = ml_collections.ConfigDict({
      "every_epochs": 1, "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "restarts": 1, "norm": "linf"})
  c.checkpoint = ml_collections.ConfigDict({"keep": 3, "every_steps": 0, "async_save": True})
  c.parallel = ml_collections.ConfigDict({"mode": "auto", "distributed": False})
  c.log = ml_collections.ConfigDict({"every_steps": 50, "progress": True, "tensorboard": False})
  c.stop_after_steps = 0  # end the run after this global step (0: never); rerunning resumes it.

  # Multi-host (issue 12; see parallel.init_from_config). Setting coordinator_address or num_processes implies
  # distributed=true. Unset keys ("", 0, -1) come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  # JAX_PROCESS_ID, else from JAX's auto-detection (TPU VM, SLURM, Open MPI, Kubernetes).
  c.parallel.coordinator_address = ""  # 'host:port' of process 0, reachable from every host.
  c.parallel.num_processes = 0  # processes (one per host) in the run.
  c.parallel.process_id = -1  # this process, in [0, num_processes).
  c.parallel.timeout_s = 300  # seconds to wait for every process to join (then exit with a message).
  return c


def objective_config(name: str) -> ml_collections.ConfigDict:
  """{'name': name} plus the defaults of every registered objective, so --config.objective.name can switch.

  Each objective reads only its own keys (e.g. trades: eps, step_size, steps, norm, beta; free: eps,
  replays; smooth: noise_std, beta); `name`'s own defaults win where objectives disagree.
  """
  merged = {}
  for other in objectives.objective_names():
    merged.update(objectives.get_objective(other).defaults)
  return ml_collections.ConfigDict({"name": name, **merged, **objectives.get_objective(name).defaults})


def parse_config_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'model=wrn_28_4,objective=trades' -> ConfigDict over `defaults`; values typed like the default.

  For config files' `get_config(arg)`; unknown names raise ValueError listing the valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, sep, value = item.partition("=")
    if not sep or name not in defaults:
      raise ValueError(f"config argument '{item}' is not NAME=VALUE with NAME in {sorted(defaults)}")
    default = defaults[name]
    parsed[name] = type(default)(value) if not isinstance(default, bool) else value.lower() in ("1", "true")
  return parsed


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key whose value is invalid."""
  choices = {
      "stage": (*STAGES, "all"), "mask.scope": ("layer", "global"),
      "optimizer.name": tuple(OPTIMIZERS), "optimizer.schedule": tuple(SCHEDULES),
      "parallel.mode": ("auto", *parallel.MODES), "eval.norm": attacks.NORMS,
      "score_init": (*masking.SCORE_INITS, "source"),
  }
  for key, valid in choices.items():
    value = _get(config, key)
    if value not in valid:
      raise ValueError(f"config.{key}={value!r} is invalid; valid: {', '.join(map(str, valid))}")
  models.get_model(config.model.name, 10)  # unknown names raise, listing the valid ones
  data.get_dataset_info(config.data.name)
  objectives.get_objective(config.objective.name)
  for key, value in {"k": config.k, **{f"ks[{i}]": k for i, k in enumerate(config.ks)}}.items():
    if not 0 < value <= 1:
      raise ValueError(f"config.{key}={value!r} must lie in (0, 1]: it is the fraction of weights KEPT")
  for stage in STAGES:
    for field in ("epochs", "lr"):
      if not _get(config, f"stages.{stage}.{field}") >= 0:
        raise ValueError(f"config.stages.{stage}.{field} must be >= 0")
  if config.stage in ("prune", "finetune") and not config.source:
    raise ValueError(f"config.source must name the checkpoint to start stage '{config.stage}' from")
  for key in ("data.batch_size", "data.eval_batch_size", "checkpoint.keep", "log.every_steps", "eval.every_epochs"):
    if _get(config, key) <= 0:
      raise ValueError(f"config.{key} must be positive")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


# ----------------------------------------------------------------------------------------------------------
# What trains: optax transforms and labels per stage.


def param_kinds(params: PyTree) -> PyTree:
  """'norm' at the leaves of normalisation layers (a module with a 'scale'), 'weight' at every other leaf."""
  def kinds(tree, is_norm):
    if isinstance(tree, Mapping):
      return {name: kinds(value, "scale" in tree and "kernel" not in tree) for name, value in tree.items()}
    return "norm" if is_norm else "weight"

  return kinds(params, False)


def trainable_labels(params: PyTree, scores: PyTree | None, stage: str, freeze_bn: bool) -> PyTree:
  """'train' / 'freeze' for every leaf of `{'params': params, 'scores': scores}` in `stage`."""
  def param_label(kind):
    if stage != "prune":
      return "train"
    return "train" if kind == "norm" and not freeze_bn else "freeze"

  score_label = "train" if stage == "prune" else "freeze"
  return {"params": jax.tree.map(param_label, param_kinds(params)),
          "scores": jax.tree.map(lambda _: score_label, scores)}


def _sgd(lr, opt):
  return optax.sgd(lr, momentum=opt.momentum or None)


def _adam(lr, opt):
  return optax.adam(lr)


def _rmsprop(lr, opt):
  return optax.rmsprop(lr, decay=0.99, eps=1e-8, momentum=opt.momentum or None, eps_in_sqrt=False)


# PyTorch semantics: L2 weight decay is added to the gradient before momentum / Adam moments.
OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "rmsprop": _rmsprop}


def _cosine(step, *, lr, warmup_lr, warmup_steps, total_steps, steps_per_epoch):
  progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
  return jnp.where(step < warmup_steps, warmup_lr, 0.5 * lr * (1 + jnp.cos(jnp.pi * progress)))


def _reference_cosine(step, *, lr, warmup_lr, warmup_steps, total_steps, steps_per_epoch):
  """The reference's per-epoch cosine, quirk included: epoch e' uses cos((e' - 1) / E * pi)."""
  epoch = (step - warmup_steps) // steps_per_epoch
  epochs = max((total_steps - warmup_steps) // steps_per_epoch, 1)
  return jnp.where(step < warmup_steps, warmup_lr, 0.5 * lr * (1 + jnp.cos((epoch - 1) / epochs * jnp.pi)))


def _step_decay(step, *, lr, warmup_lr, warmup_steps, total_steps, steps_per_epoch):
  fraction = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
  return lr * jnp.where(fraction >= 0.9, 0.01, jnp.where(fraction >= 0.75, 0.1, 1.0))


def _constant(step, *, lr, **_):
  return lr * jnp.ones_like(step, jnp.float32)


SCHEDULES = {"cosine": _cosine, "reference_cosine": _reference_cosine, "step": _step_decay,
             "constant": _constant}


def make_optimizer(config: ml_collections.ConfigDict, stage: str, labels: PyTree,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The stage's optimizer over `{'params', 'scores'}`: frozen leaves get no update at all.

  Args:
    config: run config (optimizer, stages.<stage>.lr / epochs, objective replays).
    stage: one of STAGES.
    labels: from `trainable_labels`.
    steps_per_epoch: optimizer updates per epoch (batches x the objective's replays).
  """
  opt = config.optimizer
  stage_cfg = config.stages[stage]
  warmup_steps = opt.warmup_epochs * steps_per_epoch
  schedule = functools.partial(
      SCHEDULES[opt.schedule], lr=stage_cfg.lr, warmup_lr=opt.warmup_lr, warmup_steps=warmup_steps,
      total_steps=warmup_steps + _stage_epochs(config, stage) * steps_per_epoch, steps_per_epoch=steps_per_epoch)
  train = optax.chain(optax.add_decayed_weights(opt.weight_decay), OPTIMIZERS[opt.name](schedule, opt))
  return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


def _stage_epochs(config: ml_collections.ConfigDict, stage: str) -> int:
  """Epochs of `stage`, divided by the objective's replays (free AT: ceil(epochs / m), as the reference)."""
  objective = objectives.get_objective(config.objective.name)
  return math.ceil(config.stages[stage].epochs / objective.replays(config.objective))


# ----------------------------------------------------------------------------------------------------------
# The train state and the step.


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: one pytree.

  Attributes:
    step: number of batches consumed (int32 scalar).
    params: the dense weights (`'params'` collection); in finetune the pruned ones are exactly 0.
    scores: mirror of params with an array at each prunable kernel and None elsewhere; None in pretrain.
    batch_stats: BatchNorm running statistics ({} for BN-free models).
    opt_state: optax state over {'params': params, 'scores': scores}.
    carry: per-example objective state (free AT's perturbation, leading axis = batch), () otherwise.
    rng: the run's root key; step keys are fold_in(rng, step).
  """

  step: jax.Array
  params: PyTree
  scores: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  carry: PyTree
  rng: jax.Array


def masked_params(params: PyTree, scores: PyTree | None, k: Any, scope: str = "layer",
                  min_layer_k: float = 0.0) -> PyTree:
  """The weights the model runs with: `apply_masks(params, scores, k)`, or params when dense (no scores)."""
  if scores is None:
    return params
  return masking.apply_masks(params, scores, k, scope=scope, min_layer_k=min_layer_k)


def exported_params(params: PyTree, scores: PyTree | None, k: Any, mask_config: Mapping[str, Any]) -> PyTree:
  """`masking.export_dense` (pruned weights exactly 0) with the run's mask settings, or params when dense."""
  if scores is None:
    return params
  return masking.export_dense(params, scores, k, scope=mask_config["scope"], min_layer_k=mask_config["min_layer_k"])


# For evaluation, compiled once per model; k is static so that it rounds exactly as in the train step.
_masked_params_jit = jax.jit(masked_params, static_argnums=(2, 3, 4))


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, apply_fn: models.ApplyFn,
               objective: objectives.Objective, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               k: Any, steps_per_epoch: int, axis_name: str | None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One batch: mask once, objective loss and gradient, optimizer update (x replays); per device.

  Args:
    state: the (replicated) train state.
    batch: this device's {'image': [B, H, W, C] in [0, 1], 'label': [B]}.
    apply_fn: `models.make_apply_fn(model)`.
    objective: from `objectives.get_objective`; `config.objective` is its config.
    config: the run config.
    tx: from `make_optimizer`.
    k: fraction kept (ignored when state.scores is None).
    steps_per_epoch: batches per epoch; the objective's carry is reset at each epoch start.
    axis_name: the device axis to average over, or None on one device.

  Returns:
    The new state and scalar metrics averaged over the batch (and devices).
  """
  key = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  stateful = objective.init_carry is not None
  carry = state.carry
  if stateful:
    fresh = objective.init_carry(batch["image"].shape, config.objective)
    carry = jax.tree.map(lambda c, f: jnp.where(state.step % steps_per_epoch == 0, f, c), carry, fresh)

  def loss_fn(trainable, carry, batch_stats, key):
    weights = masked_params(trainable["params"], trainable["scores"], k, config.mask.scope, config.mask.min_layer_k)
    extra = (carry,) if stateful else ()
    loss, (metrics, variables) = objective.loss_fn(
        apply_fn, _variables(weights, batch_stats), batch, key, config.objective, *extra)
    return loss, (metrics, variables.get("batch_stats", {}))

  trainable = {"params": state.params, "scores": state.scores}
  opt_state, batch_stats = state.opt_state, state.batch_stats
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  for replay in range(objective.replays(config.objective)):
    (_, (metrics, batch_stats)), (grads, carry_grad) = grad_fn(
        trainable, carry, batch_stats, jax.random.fold_in(key, replay))
    if axis_name is not None:
      grads, metrics, batch_stats = jax.lax.pmean((grads, metrics, batch_stats), axis_name)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if stateful:
      carry = objective.update_carry(carry, carry_grad, config.objective)
  new_state = state.replace(step=state.step + 1, params=trainable["params"], scores=trainable["scores"],
                            batch_stats=batch_stats, opt_state=opt_state, carry=carry)
  return new_state, metrics


def eval_step(state: dict[str, PyTree], batch: dict[str, jax.Array], *, apply_fn: models.ApplyFn,
              eval_config: ml_collections.ConfigDict, axis_name: str | None) -> tuple[dict, dict]:
  """Counts clean and PGD-correct examples of one batch (padding rows, mask 0, are not counted).

  `state` is {'variables': masked eval variables, 'key': PRNG key}; the key advances every batch. Returns
  sums over the batch (and devices): 'count', 'clean', 'pgd'.
  """
  key, attack_key = jax.random.split(state["key"])
  if axis_name is not None:
    attack_key = jax.random.fold_in(attack_key, jax.lax.axis_index(axis_name))
  logits_fn = lambda x: apply_fn(state["variables"], x, False)[0]
  x, y, mask = batch["image"], batch["label"], batch["mask"]
  sums = {"count": jnp.sum(mask), "clean": jnp.sum(mask * (jnp.argmax(logits_fn(x), -1) == y))}
  if eval_config.steps > 0:
    x_adv = attacks.pgd(logits_fn, x, y, key=attack_key, eps=eval_config.eps, step_size=eval_config.step_size,
                        steps=eval_config.steps, norm=eval_config.norm, restarts=eval_config.restarts)
    sums["pgd"] = jnp.sum(mask * (jnp.argmax(logits_fn(x_adv), -1) == y))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return {**state, "key": key}, sums


# ----------------------------------------------------------------------------------------------------------
# Building a stage: model, data, initial state (fresh, from a source checkpoint, or resumed).


def num_classes(config: ml_collections.ConfigDict) -> int:
  """config.model.num_classes, or the dataset's number of classes when it is 0."""
  return config.model.num_classes or data.get_dataset_info(config.data.name).num_classes


def build_model(config: ml_collections.ConfigDict, axis_name: str | None = None):
  """The zoo model of `config.model` for `config.data`'s classes, BN averaged over `axis_name`."""
  return models.get_model(config.model.name, num_classes(config), dtype=jnp.dtype(config.model.dtype),
                          bn_axis_name=axis_name)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the model's inputs for `config.data`."""
  info = data.get_dataset_info(config.data.name)
  side = config.data.image_size or info.image_shape[0]
  return side, side, info.image_shape[2]


def init_variables(config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, PyTree]:
  """Freshly initialised {'params', 'batch_stats'} of the configured model."""
  model = build_model(config)
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape(config))), train=False))(key)


def _model_item(state: TrainState) -> dict[str, PyTree]:
  return {"params": state.params, "batch_stats": state.batch_stats, "scores": state.scores}


def _train_item(state: TrainState) -> dict[str, PyTree]:
  return {"step": state.step, "opt_state": state.opt_state, "carry": state.carry, "rng": state.rng}


def load_source(config: ml_collections.ConfigDict) -> tuple[PyTree, PyTree, PyTree | None]:
  """(params, batch_stats, scores or None) of `config.source`.

  The source is a hydra_jax run directory (its latest checkpoint), or a reference HYDRA PyTorch checkpoint
  (`.pth`, `.pth.tar`, `.pt`; needs torch) converted by `convert.from_torch_state_dict`.
  """
  template = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
  classes = num_classes(config)
  if config.source.endswith((".pth", ".tar", ".pt")):
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
    state_dict = torch.load(config.source, map_location="cpu", weights_only=False)
    variables, scores = convert.from_torch_state_dict(state_dict.get("state_dict", state_dict), config.model.name,
                                                      classes, image_shape(config))
    return variables["params"], variables.get("batch_stats", {}), scores
  _, meta = checkpoints.read_meta(config.source)
  if (meta.get("model"), meta.get("num_classes")) != (config.model.name, classes):
    raise checkpoints.CheckpointError(
        f"source {config.source} holds model '{meta.get('model')}' with {meta.get('num_classes')} classes, "
        f"but the config asks for '{config.model.name}' with {classes}")
  abstract_scores = jax.eval_shape(lambda p: masking.init_scores(p, "uniform", jax.random.key(0)),
                                   template["params"]) if meta.get("has_scores") else None
  items, _ = checkpoints.restore(config.source, {"model": {
      "params": template["params"], "batch_stats": template.get("batch_stats", {}), "scores": abstract_scores}})
  model = items["model"]
  return model["params"], model["batch_stats"], model["scores"]


def initial_state(config: ml_collections.ConfigDict, stage: str, steps_per_epoch: int,
                  batch_shape: tuple[int, ...]) -> tuple[TrainState, optax.GradientTransformation]:
  """The state a stage starts from, and its optimizer (see the module docstring for the score rules).

  pretrain: fresh weights, no scores. prune: source weights; scores from `config.score_init` (or the
  source's with 'source'). finetune: source weights and scores (`score_init` only when the source has
  none: LWM), with the pruned weights zeroed.
  """
  rng = jax.random.PRNGKey(config.seed)  # raw uint32[2]: checkpointable
  init_key, score_key = jax.random.split(jax.random.fold_in(rng, STAGES.index(stage)))
  if stage == "pretrain":
    variables = init_variables(config, init_key)
    params, batch_stats, scores = variables["params"], variables.get("batch_stats", {}), None
  else:
    params, batch_stats, scores = load_source(config)
    use_source_scores = scores is not None and (stage == "finetune" or config.score_init == "source")
    if not use_source_scores:
      if config.score_init == "source":
        raise ValueError(f"config.score_init='source' but source {config.source} has no scores")
      scores = masking.init_scores(params, config.score_init, score_key)
  if stage == "finetune":
    params = exported_params(params, scores, config.k, config.mask)
  objective = objectives.get_objective(config.objective.name)
  labels = trainable_labels(params, scores, stage, config.freeze_bn)
  tx = make_optimizer(config, stage, labels, steps_per_epoch * objective.replays(config.objective))
  carry = () if objective.init_carry is None else objective.init_carry(batch_shape, config.objective)
  state = TrainState(step=jnp.int32(0), params=params, scores=scores, batch_stats=batch_stats,
                     opt_state=tx.init({"params": params, "scores": scores}), carry=carry, rng=rng)
  return state, tx


# ----------------------------------------------------------------------------------------------------------
# Running a stage.


def _parallel_mode(config: ml_collections.ConfigDict) -> str:
  if config.parallel.mode != "auto":
    return config.parallel.mode
  return "single" if jax.device_count() == 1 else "shard_map"


class MetricWriter:
  """JSON lines (always) and TensorBoard scalars (optional, tensorboardX) in the workdir; process 0 only."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.active = jax.process_index() == 0
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.active else None
    self._tb = None
    if self.active and tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (optional dependency)
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"{split}/{name}", value, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host floats averaged over the logged steps (pmap: each value is per device; they are equal)."""
  fetched = jax.device_get(history)
  return {name: float(np.mean([np.mean(m[name]) for m in fetched])) for name in fetched[0]}


def _check_finite(metrics: Mapping[str, float], step: int, ckpt: checkpoints.Checkpoints) -> None:
  if not all(math.isfinite(value) for value in metrics.values()):
    raise FloatingPointError(
        f"non-finite training metrics {dict(metrics)} before step {step}; stopping without saving. The last "
        f"checkpoint (step {ckpt.latest_step()}) in {ckpt.workdir} is untouched: lower the learning rate or "
        f"check the data, then rerun to resume from it.")


def sparsity(state: TrainState, config: ml_collections.ConfigDict) -> masking.SparsityReport:
  """Kept / total weights per prunable layer, counted on the weights the model runs with."""
  return masking.sparsity_report(exported_params(state.params, state.scores, config.k, config.mask))


def eval_steps(config: ml_collections.ConfigDict, eval_data: data.EvalBatches) -> int:
  """Eval batches to run: the whole split, or enough for the first `config.data.eval_examples` examples."""
  if not config.data.eval_examples:
    return eval_data.num_steps
  return min(eval_data.num_steps, -(-config.data.eval_examples // eval_data.batch_size))


def evaluate_state(state: TrainState, config: ml_collections.ConfigDict, eval_data: data.EvalBatches,
                   eval_runner: parallel.Runner) -> dict[str, float]:
  """Clean and PGD accuracy (fractions) of the state's masked model on the eval split."""
  weights = _masked_params_jit(state.params, state.scores, config.k, config.mask.scope, config.mask.min_layer_k)
  variables = _variables(weights, state.batch_stats)
  eval_state = eval_runner.put_state({"variables": variables, "key": jax.random.PRNGKey(config.seed + 1)})
  totals = None
  for batch in data.iterate(eval_data, range(eval_steps(config, eval_data)), prefetch=config.data.prefetch):
    eval_state, sums = eval_runner(eval_state, eval_runner.put_batch(batch))
    sums = jax.tree.map(lambda x: np.asarray(x).reshape(-1)[0], jax.device_get(sums))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  result = {"clean_accuracy": float(totals["clean"] / totals["count"])}
  if "pgd" in totals:
    result["pgd_accuracy"] = float(totals["pgd"] / totals["count"])
  result["robust_accuracy"] = result.get("pgd_accuracy", result["clean_accuracy"])
  return result


def _stage_meta(config, stage, state, metrics):
  return {"model": config.model.name, "num_classes": num_classes(config), "stage": stage,
          "k": config.k if state.scores is not None else 1.0, "has_scores": state.scores is not None,
          "metrics": metrics, "versions": checkpoints.versions(), "config": json.loads(config.to_json_best_effort())}


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one stage in `workdir` and returns its final summary (also in summary.json).

  A rerun of the same command continues from the last checkpoint and ends with exactly the params of an
  uninterrupted run. Nothing in `workdir` is written before the config and any checkpoint there have been
  read and checked.
  """
  check_config(config)
  stage = config.stage
  mode = _parallel_mode(config)
  axis_name = None if mode == "single" else parallel.AXIS
  devices = jax.devices()[:1] if mode == "single" else jax.devices()
  parallel.check_batch_divides(config.data.batch_size, len(devices))
  parallel.check_batch_divides(config.data.eval_batch_size, len(devices))

  data_dir = config.data.data_dir or None
  train_data = data.train_batches(
      config.data.name, config.data.batch_size, seed=config.seed, data_dir=data_dir,
      image_size=config.data.image_size or None, data_fraction=config.data.data_fraction,
      semisup_path=config.data.semisup_path or None, semisup_fraction=config.data.semisup_fraction)
  eval_data = data.eval_batches(config.data.name, config.data.eval_batch_size, data_dir=data_dir,
                                image_size=config.data.image_size or None)
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = _stage_epochs(config, stage) * steps_per_epoch
  rows = config.data.batch_size * (2 if config.data.semisup_path else 1)  # semisup doubles every batch
  batch_shape = (rows, *image_shape(config))

  state, tx = initial_state(config, stage, steps_per_epoch, batch_shape)
  ckpt = checkpoints.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  eval_metrics = None
  if ckpt.latest_step() is not None:
    abstract = jax.eval_shape(lambda s: {"model": _model_item(s), "train": _train_item(s)}, state)
    items, meta = ckpt.restore(abstract)
    state = state.replace(**items["model"], **items["train"])
    eval_metrics = meta.get("metrics")  # a finished stage rerun reports its last evaluation
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "config.json")  # the first run's; each checkpoint's meta has its own
  if not os.path.exists(config_path) and jax.process_index() == 0:
    with open(config_path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  apply_fn = models.make_apply_fn(build_model(config, axis_name))
  objective = objectives.get_objective(config.objective.name)
  step_fn = functools.partial(train_step, apply_fn=apply_fn, objective=objective, config=config, tx=tx,
                              k=config.k, steps_per_epoch=steps_per_epoch)
  runner = parallel.make_runner(step_fn, mode, carry_fields=("carry",), devices=devices)
  eval_runner = parallel.make_runner(
      functools.partial(eval_step, apply_fn=apply_fn, eval_config=config.eval), mode, devices=devices)
  writer = MetricWriter(workdir, config.log.tensorboard)

  def save(step, metrics=None):
    host_state = runner.get_state(device_state)
    ckpt.save(step, {"model": _model_item(host_state), "train": _train_item(host_state)},
              meta=_stage_meta(config, stage, host_state, metrics),
              sparsity=sparsity(host_state, config).to_json(), metrics=metrics)

  start = int(state.step)
  stop = min(total_steps, config.stop_after_steps or total_steps)
  device_state = runner.put_state(state)
  history = []
  batches = data.iterate(train_data, range(start, stop), prefetch=config.data.prefetch,
                         worker_count=config.data.workers)
  progress = tqdm.tqdm(total=stop, initial=start, desc=f"{stage}", unit="step",
                       disable=not (config.log.progress and jax.process_index() == 0))
  for step in range(start, stop):
    device_state, metrics = runner(device_state, runner.put_batch(next(batches)))
    history.append(metrics)
    progress.update()
    done = step + 1
    epoch_end = done % steps_per_epoch == 0 or done == total_steps
    if done % config.log.every_steps == 0 or epoch_end or done == stop:
      train_metrics = _mean_metrics(history)
      history = []
      _check_finite(train_metrics, done, ckpt)
      writer.write(done, "train", train_metrics)
      progress.set_postfix({k: f"{v:.3f}" for k, v in train_metrics.items()})
    epoch = done // steps_per_epoch
    if epoch_end and (epoch % config.eval.every_epochs == 0 or done == total_steps):
      eval_metrics = evaluate_state(runner.get_state(device_state), config, eval_data, eval_runner)
      writer.write(done, "eval", eval_metrics)
      save(done, eval_metrics)
    elif epoch_end or done == stop or (config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0):
      save(done)
  progress.close()
  ckpt.close()
  writer.close()
  final = runner.get_state(device_state)
  report = sparsity(final, config)
  summary = {"stage": stage, "step": int(final.step), "total_steps": total_steps,
             "kept_fraction": report.kept / report.total, **(eval_metrics or {})}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def stage_config(config: ml_collections.ConfigDict, stage: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A copy of `config` set to run `stage`, with top-level `overrides` (e.g. source, k, score_init)."""
  new = ml_collections.ConfigDict(config.to_dict())
  new.stage = stage
  for key, value in overrides.items():
    new[key] = value
  return new


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """stage='all': pretrain, then for each k in config.ks prune + finetune and (config.lwm) the LWM baseline.

  Layout: <workdir>/pretrain, <workdir>/k<k>/{prune,finetune,lwm}. Each stage resumes independently, so
  rerunning the command after an interruption continues where it stopped. Returns one summary row per
  trained model (pretrain, then per k: hydra (prune+finetune) and lwm), also written to summary.json.
  """
  pretrain_dir = os.path.join(workdir, "pretrain")
  rows = [{"method": "dense", **run_stage(stage_config(config, "pretrain"), pretrain_dir)}]
  for k in config.ks:
    branch = os.path.join(workdir, f"k{k:g}")
    prune = run_stage(stage_config(config, "prune", source=pretrain_dir, k=k), os.path.join(branch, "prune"))
    rows.append({"method": "hydra (prune only)", **prune})
    finetune_dir = os.path.join(branch, "finetune")
    rows.append({"method": "hydra", **run_stage(
        stage_config(config, "finetune", source=os.path.join(branch, "prune"), k=k), finetune_dir)})
    if config.lwm:
      lwm = stage_config(config, "finetune", source=pretrain_dir, k=k, score_init="scaled")
      rows.append({"method": "lwm", **run_stage(lwm, os.path.join(branch, "lwm"))})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
  """Fixed-width text table of pipeline summaries: method, stage, kept %, clean and PGD accuracy."""
  lines = [f"{'method':<20} {'stage':<9} {'kept %':>7} {'clean %':>8} {'PGD %':>7}"]
  for row in rows:
    pgd = f"{100 * row['pgd_accuracy']:>7.2f}" if "pgd_accuracy" in row else f"{'-':>7}"
    lines.append(f"{row.get('method', ''):<20} {row['stage']:<9} {100 * row['kept_fraction']:>7.2f} "
                 f"{100 * row.get('clean_accuracy', float('nan')):>8.2f} {pgd}")
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `config.stage` in `workdir`: one stage's summary dict, or for 'all' the list of pipeline rows."""
  check_config(config)
  if parallel.init_from_config(config.parallel):
    settings = {"config": json.loads(config.to_json_best_effort()), "workdir": workdir}
    del settings["config"]["parallel"]["process_id"], settings["config"]["parallel"]["coordinator_address"]
    parallel.check_processes_agree(settings, timeout_s=config.parallel.timeout_s)
  if config.stage == "all":
    return run_pipeline(config, workdir)
  return run_stage(config, workdir)
