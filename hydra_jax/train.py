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

  config = config_lib.default_config()       # hydra_jax.config, or a configs/*.py get_config(arg)
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
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from hydra_jax import PyTree
from hydra_jax import attacks
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import convert
from hydra_jax import data
from hydra_jax import masking
from hydra_jax import metrics as metrics_lib
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel


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
    tx: from `optim.make_optimizer`.
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


def build_model(config: ml_collections.ConfigDict, axis_name: str | None = None):
  """The zoo model of `config.model` for `config.data`'s classes, BN averaged over `axis_name`."""
  return models.get_model(config.model.name, config_lib.num_classes(config), dtype=jnp.dtype(config.model.dtype),
                          bn_axis_name=axis_name)


def init_variables(config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, PyTree]:
  """Freshly initialised {'params', 'batch_stats'} of the configured model."""
  model = build_model(config)
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *config_lib.image_shape(config))), train=False))(key)


def _model_item(state: TrainState) -> dict[str, PyTree]:
  return {"params": state.params, "batch_stats": state.batch_stats, "scores": state.scores}


def _train_item(state: TrainState) -> dict[str, PyTree]:
  return {"step": state.step, "opt_state": state.opt_state, "carry": state.carry, "rng": state.rng}


def load_source(config: ml_collections.ConfigDict) -> tuple[PyTree, PyTree, PyTree | None]:
  """(params, batch_stats, scores or None) of `config.source`.

  The source is a hydra_jax run directory (its latest checkpoint), or a reference HYDRA PyTorch checkpoint
  (`.pth`, `.pth.tar`, `.pt`; needs torch) read by `convert.load_torch_checkpoint`.
  """
  classes = config_lib.num_classes(config)
  if config.source.endswith(convert.TORCH_SUFFIXES):
    variables, scores = convert.load_torch_checkpoint(config.source, config.model.name, classes,
                                                      config_lib.image_shape(config))
    return variables["params"], variables.get("batch_stats", {}), scores
  template = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
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
  init_key, score_key = jax.random.split(jax.random.fold_in(rng, config_lib.STAGES.index(stage)))
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
  labels = optim.trainable_labels(params, scores, stage, config.freeze_bn)
  tx = optim.make_optimizer(config, stage, labels, steps_per_epoch * objective.replays(config.objective))
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
  return {"model": config.model.name, "num_classes": config_lib.num_classes(config), "stage": stage,
          "k": config.k if state.scores is not None else 1.0, "has_scores": state.scores is not None,
          "metrics": metrics, "versions": checkpoints.versions(), "config": json.loads(config.to_json_best_effort())}


class Cadence(NamedTuple):
  """What happens after a step: log the mean train metrics (and check they are finite), evaluate, save."""

  log: bool
  evaluate: bool
  save: bool


def cadence(done: int, *, steps_per_epoch: int, total_steps: int, stop: int, log_every: int,
            eval_every_epochs: int, save_every: int) -> Cadence:
  """The actions after the step that completes `done` steps of a stage (pure; tested without training).

  Args:
    done: steps completed, 1 <= done <= stop.
    steps_per_epoch: batches per epoch.
    total_steps: the stage's length in steps.
    stop: where this run ends (total_steps, or earlier with config.stop_after_steps).
    log_every: config.log.every_steps.
    eval_every_epochs: config.eval.every_epochs.
    save_every: config.checkpoint.every_steps (0: only at epoch ends and at `stop`).

  Returns:
    A `Cadence`. Epoch ends log and save, and evaluate every `eval_every_epochs` epochs and at the end.
  """
  epoch_end = done % steps_per_epoch == 0 or done == total_steps
  evaluate = epoch_end and ((done // steps_per_epoch) % eval_every_epochs == 0 or done == total_steps)
  save = epoch_end or done == stop or bool(save_every and done % save_every == 0)
  log = done % log_every == 0 or epoch_end or done == stop
  return Cadence(log=log, evaluate=evaluate, save=save)


def _data(config: ml_collections.ConfigDict) -> tuple[data.TrainBatches, data.EvalBatches]:
  data_dir = config.data.data_dir or None
  train_data = data.train_batches(
      config.data.name, config.data.batch_size, seed=config.seed, data_dir=data_dir,
      image_size=config.data.image_size or None, data_fraction=config.data.data_fraction,
      semisup_path=config.data.semisup_path or None, semisup_fraction=config.data.semisup_fraction)
  eval_data = data.eval_batches(config.data.name, config.data.eval_batch_size, data_dir=data_dir,
                                image_size=config.data.image_size or None)
  return train_data, eval_data


def _resume(state: TrainState, ckpt: checkpoints.Checkpoints) -> tuple[TrainState, dict[str, float] | None]:
  """The latest checkpoint's state and its evaluation metrics, or `state` and None when there is none."""
  if ckpt.latest_step() is None:
    return state, None
  abstract = jax.eval_shape(lambda s: {"model": _model_item(s), "train": _train_item(s)}, state)
  items, meta = ckpt.restore(abstract)
  return state.replace(**items["model"], **items["train"]), meta.get("metrics")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """config.json of the first run in `workdir` (each checkpoint's meta holds its own config)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) and jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one stage in `workdir` and returns its final summary (also in summary.json).

  A rerun of the same command continues from the last checkpoint and ends with exactly the params of an
  uninterrupted run. Nothing in `workdir` is written before the config and any checkpoint there have been
  read and checked.
  """
  config_lib.check_config(config)
  stage = config.stage
  mode = _parallel_mode(config)
  axis_name = None if mode == "single" else parallel.AXIS
  devices = jax.devices()[:1] if mode == "single" else jax.devices()
  parallel.check_batch_divides(config.data.batch_size, len(devices))
  parallel.check_batch_divides(config.data.eval_batch_size, len(devices))
  train_data, eval_data = _data(config)
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = optim.stage_epochs(config, stage) * steps_per_epoch
  rows = config.data.batch_size * (2 if config.data.semisup_path else 1)  # semisup doubles every batch
  state, tx = initial_state(config, stage, steps_per_epoch, (rows, *config_lib.image_shape(config)))
  ckpt = checkpoints.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  state, eval_metrics = _resume(state, ckpt)
  _write_config(config, workdir)

  apply_fn = models.make_apply_fn(build_model(config, axis_name))
  objective = objectives.get_objective(config.objective.name)
  step_fn = functools.partial(train_step, apply_fn=apply_fn, objective=objective, config=config, tx=tx,
                              k=config.k, steps_per_epoch=steps_per_epoch)
  runner = parallel.make_runner(step_fn, mode, carry_fields=("carry",), devices=devices)
  eval_runner = parallel.make_runner(
      functools.partial(eval_step, apply_fn=apply_fn, eval_config=config.eval), mode, devices=devices)

  def save(step, metrics=None):
    host_state = runner.get_state(device_state)
    ckpt.save(step, {"model": _model_item(host_state), "train": _train_item(host_state)},
              meta=_stage_meta(config, stage, host_state, metrics),
              sparsity=sparsity(host_state, config).to_json(), metrics=metrics)

  start = int(state.step)
  stop = min(total_steps, config.stop_after_steps or total_steps)
  device_state = runner.put_state(state)
  history = []
  writer = metrics_lib.MetricWriter(workdir, config.log.tensorboard)
  progress = tqdm.tqdm(total=stop, initial=start, desc=f"{stage}", unit="step",
                       disable=not (config.log.progress and jax.process_index() == 0))
  try:
    batches = data.iterate(train_data, range(start, stop), prefetch=config.data.prefetch,
                           worker_count=config.data.workers)
    for done in range(start + 1, stop + 1):
      device_state, step_metrics = runner(device_state, runner.put_batch(next(batches)))
      history.append(step_metrics)
      progress.update()
      todo = cadence(done, steps_per_epoch=steps_per_epoch, total_steps=total_steps, stop=stop,
                     log_every=config.log.every_steps, eval_every_epochs=config.eval.every_epochs,
                     save_every=config.checkpoint.every_steps)
      if todo.log:
        train_metrics, history = metrics_lib.mean_metrics(history), []
        _check_finite(train_metrics, done, ckpt)
        writer.write(done, "train", train_metrics)
        progress.set_postfix({k: f"{v:.3f}" for k, v in train_metrics.items()})
      if todo.evaluate:
        eval_metrics = evaluate_state(runner.get_state(device_state), config, eval_data, eval_runner)
        writer.write(done, "eval", eval_metrics)
      if todo.save:
        save(done, eval_metrics if todo.evaluate else None)
  finally:
    progress.close()
    writer.close()
    ckpt.close()
  return _summarize(config, runner.get_state(device_state), total_steps, eval_metrics, workdir)


def _summarize(config: ml_collections.ConfigDict, final: TrainState, total_steps: int,
               eval_metrics: dict[str, float] | None, workdir: str) -> dict[str, Any]:
  """The stage's summary (also written to summary.json)."""
  report = sparsity(final, config)
  summary = {"stage": config.stage, "step": int(final.step), "total_steps": total_steps,
             "kept_fraction": report.kept / report.total, **(eval_metrics or {})}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """stage='all': pretrain, then for each k in config.ks prune + finetune and (config.lwm) the LWM baseline.

  Layout: <workdir>/pretrain, <workdir>/k<k>/{prune,finetune,lwm}. Each stage resumes independently, so
  rerunning the command after an interruption continues where it stopped. Returns one summary row per
  trained model (pretrain, then per k: hydra (prune+finetune) and lwm), also written to summary.json.
  """
  pretrain_dir = os.path.join(workdir, "pretrain")
  rows = [{"method": "dense", **run_stage(config_lib.stage_config(config, "pretrain"), pretrain_dir)}]
  for k in config.ks:
    branch = os.path.join(workdir, f"k{k:g}")
    prune = run_stage(config_lib.stage_config(config, "prune", source=pretrain_dir, k=k), os.path.join(branch, "prune"))
    rows.append({"method": "hydra (prune only)", **prune})
    finetune_dir = os.path.join(branch, "finetune")
    rows.append({"method": "hydra", **run_stage(
        config_lib.stage_config(config, "finetune", source=os.path.join(branch, "prune"), k=k), finetune_dir)})
    if config.lwm:
      lwm = config_lib.stage_config(config, "finetune", source=pretrain_dir, k=k, score_init="scaled")
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
  config_lib.check_config(config)
  if config.parallel.distributed:
    parallel.init_distributed()
  if config.stage == "all":
    return run_pipeline(config, workdir)
  return run_stage(config, workdir)
