"""One stage (HYDRA's pretrain, prune or finetune; the baselines' str, admm or rigl): the train state, one train step
for every stage and objective, and the stage loop with evaluation, checkpoints and resume.

A stage only chooses what trains (Sehwag et al. 2020, Sec. 3; `optim.trainable_labels`): pretrain trains the
dense weights; prune freezes them and trains the scores (and BatchNorm unless `freeze_bn`); finetune freezes
the scores and trains the weights, whose pruned entries start at exactly 0 and stay 0 (their gradient through
the mask is 0). BatchNorm running statistics update in every stage. The step masks the parameters once
(`masking.apply_masks`), then calls the objective, whose attacks close over the masked parameters. It is
written per device: with `axis_name` set it averages gradients, metrics and BN statistics over that axis, and
`parallel.make_runner` runs it with pmap or shard_map. The baselines' stages 'str', 'admm' and 'rigl' change the
step through `baselines.PhaseHooks` (the weights the model runs with, a loss term, an update before or after
each step).

HARP (`config.mask.learn_rates`, `hydra_jax.harp`): prune also trains per-layer rates (`TrainState.rates`) with the
hardware loss added to the objective's, and finetune keeps them fixed.

  config = config_lib.default_config()        # hydra_jax.config, or a configs/*.py get_config(arg)
  config.stage, config.source, config.k = 'prune', 'runs/pretrain', 0.01
  summary = train.run_stage(config, 'runs/prune')   # pipeline.train_and_evaluate runs stage='all'

`k` is the fraction of weights KEPT: k=0.01 is 99% pruning.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from hydra_jax import PyTree
from hydra_jax import baselines
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import harp
from hydra_jax import masking
from hydra_jax import metrics as metrics_lib
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel
from hydra_jax import paths
from hydra_jax import preemption
from hydra_jax import sources


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: one pytree.

  Attributes:
    step: number of batches consumed (int32 scalar).
    params: the dense weights (`'params'` collection); in finetune the pruned ones are exactly 0.
    scores: mirror of params with an array at each prunable kernel and None elsewhere; None in pretrain and
      admm; in str a scalar threshold parameter per prunable kernel.
    batch_stats: BatchNorm running statistics ({} for BN-free models).
    opt_state: optax state over {'params': params, 'scores': scores}.
    carry: per-example objective state (free AT's perturbation, leading axis = batch), () otherwise.
    rng: the run's root key; step keys are fold_in(rng, step).
    aux: the admm stage's `baselines.AdmmState` or the rigl stage's `baselines.RiglState` (not trained: updated by
      their hooks), HARP's {'frozen_gamma': float32} where prune learns rates (0 until frozen), () otherwise.
    rates: HARP's per-layer rate parameters k_score (a scalar at each scored kernel, or at each channel group's
      `ChannelGroup.name`; None elsewhere; `harp`),
      trained in prune with config.mask.learn_rates and fixed in finetune; None otherwise.
  """

  step: jax.Array
  params: PyTree
  scores: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  carry: PyTree
  rng: jax.Array
  aux: PyTree
  rates: PyTree = None


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  apply_fn: models.ApplyFn,
  objective: objectives.Objective,
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  k: Any,
  steps_per_epoch: int,
  axis_name: str | None,
  hooks: baselines.PhaseHooks | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One batch: mask once, objective loss and gradient, optimizer update (x replays); per device.

  Args:
    state: the (replicated) train state.
    batch: this device's {'image': [B, H, W, C] in [0, 1], 'label': [B]}.
    apply_fn: `models.make_apply_fn(model)`.
    objective: from `objectives.get_objective`; `config.objective` is its config.
    config: the run config.
    tx: from `optim.make_optimizer`.
    k: fraction kept: a float or per-layer (ignored when state.scores is None, or where prune learns HARP's rates,
      whose per-layer fractions the masks use, with the hardware loss added).
    steps_per_epoch: batches per epoch; the objective's carry is reset at each epoch start, and an objective
      with `takes_epoch` gets `epoch=step / steps_per_epoch` (float32).
    axis_name: the device axis to average over, or None on one device.
    hooks: `baselines.phase_hooks` of the stage (str, admm, rigl): `before_step` updates an untrained aux first,
      the model runs with `hooks.weights` instead of the mask, `hooks.penalty` joins the loss, and
      `hooks.after_step` (RigL) gets the updated params and the dense gradient w.r.t. the weights the model ran with.

  Returns:
    The new state and scalar metrics averaged over the batch (and devices).
  """
  key = jax.random.fold_in(state.rng, state.step)  # the same on every device: draws are keyed by position
  batch = parallel.with_positions(batch, axis_name)
  epoch = state.step.astype(jnp.float32) / steps_per_epoch
  stateful = objective.init_carry is not None
  carry = state.carry
  if stateful:
    fresh = objective.init_carry(batch["image"].shape, config.objective)
    carry = jax.tree.map(lambda c, f: jnp.where(state.step % steps_per_epoch == 0, f, c), carry, fresh)
  aux = state.aux
  if hooks is not None and not hooks.trains_aux:
    aux = hooks.before_step(state.params, aux, state.step)  # ADMM's Z/U update, before this batch's forward
  after_step = None if hooks is None else hooks.after_step
  mask = config.mask
  # HARP (`harp.Learning`) where prune learns the rates: the masks use the learned fractions, the loss adds gamma
  # (growing per epoch until frozen) times the hardware loss, and gamma may freeze after the step.
  learning = sources.rate_learning(config, state.scores, steps_per_epoch)
  hw_gamma = None if learning is None else learning.gamma(state.step, aux)

  def loss_fn(trainable, carry, batch_stats, key, probe):
    params, scores = trainable["params"], trainable["scores"]
    if hooks is None:
      layer_k = k if learning is None else learning.layer_k(trainable["rates"])
      weights = sources.masked_params(
        params, scores, layer_k, mask.scope, mask.min_layer_k, sources.mask_groups(config)
      )
      penalty = 0.0 if learning is None else hw_gamma * learning.loss(trainable["rates"])
    else:
      phase = hooks.phase_state(scores, aux)
      weights, penalty = hooks.weights(params, phase), hooks.penalty(params, phase)
    if probe is not None:  # zeros: d loss / d probe is the dense gradient dL/d(weights) that RigL grows by
      weights = jax.tree.map(jnp.add, weights, probe)
    loss, (metrics, variables) = sources.objective_loss(
      objective, config, apply_fn, sources.model_variables(weights, batch_stats), batch, key, carry, epoch
    )
    return loss + penalty, (metrics, variables.get("batch_stats", {}))

  trainable = _trainable(state)
  opt_state, batch_stats = state.opt_state, state.batch_stats
  probe = None if after_step is None else jax.tree.map(jnp.zeros_like, state.params)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 4), has_aux=True)
  for replay in range(objective.replays(config.objective)):
    (_, (metrics, batch_stats)), (grads, carry_grad, weight_grads) = grad_fn(
      trainable, carry, batch_stats, jax.random.fold_in(key, replay), probe
    )
    if axis_name is not None:
      grads, metrics, batch_stats = jax.lax.pmean((grads, metrics, batch_stats), axis_name)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if stateful:
      carry = objective.update_carry(carry, carry_grad, config.objective)
  params = trainable["params"]
  if learning is not None:
    aux, rate_metrics = learning.after_step(trainable["rates"], aux, state.step, hw_gamma)
    metrics = {**metrics, **rate_metrics}
  if after_step is not None:  # RigL's mask update; the device average of weight_grads runs only where it is used
    mean_weight_grads = functools.partial(_device_mean, weight_grads, axis_name)
    params, aux = after_step(params, aux, mean_weight_grads, state.step + 1)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    scores=trainable["scores"],
    batch_stats=batch_stats,
    opt_state=opt_state,
    carry=carry,
    aux=aux,
    rates=trainable.get("rates"),
  )
  return new_state, metrics


def _trainable(state: TrainState) -> dict[str, PyTree]:
  """What the optimizer sees: {'params', 'scores'}, and 'rates' where the state has HARP's rates."""
  rates = {} if state.rates is None else {"rates": state.rates}
  return {"params": state.params, "scores": state.scores, **rates}


def _device_mean(tree: PyTree, axis_name: str | None) -> PyTree:
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _model_item(state: TrainState) -> dict[str, PyTree]:
  return {"params": state.params, "batch_stats": state.batch_stats, "scores": state.scores}


def _items(state: TrainState) -> dict[str, PyTree]:
  """The checkpoint's items: 'model', 'train', and HARP's 'rates' where the state has them."""
  rates = {} if state.rates is None else {"rates": state.rates}
  return {"model": _model_item(state), "train": _train_item(state), **rates}


def _train_item(state: TrainState) -> dict[str, PyTree]:
  return {"step": state.step, "opt_state": state.opt_state, "carry": state.carry, "rng": state.rng, "aux": state.aux}


def initial_state(
  config: ml_collections.ConfigDict,
  stage: str,
  steps_per_epoch: int,
  batch_shape: tuple[int, ...],
  *,
  first_batch: dict | None = None,
  mode: str = "single",
) -> tuple[TrainState, optax.GradientTransformation]:
  """The state a stage starts from, and its optimizer.

  pretrain: fresh weights, no scores. prune / finetune: the source's weights, and scores from
  `config.stages.<stage>.score_init` ('source': the source's scores, the finetune default; 'snip': SNIP on
  `first_batch` with the run's objective). finetune zeroes the pruned weights. str: fresh weights and STR's
  thresholds in the scores slot; admm: the source's weights and ADMM's state in aux; rigl: fresh weights and
  RigL's random masks at k in aux (`PhaseHooks.init_state`).

  Args:
    config: run config.
    stage: one of `config.STAGES`.
    steps_per_epoch: batches per epoch (the optimizer schedule's unit).
    batch_shape: [B, H, W, C] of a global train batch (shapes the objective's carry).
    first_batch: the stage's first batch (this host's part), needed by score_init='snip'.
    mode: parallel mode of the run (for the SNIP gradient).

  Returns:
    (state, optimizer).
  """
  rng = jax.random.PRNGKey(config.seed)  # raw uint32[2]: checkpointable
  init_key, score_key = jax.random.split(jax.random.fold_in(rng, config_lib.STAGES.index(stage)))
  hooks, scores, aux = baselines.phase_hooks(config, stage, steps_per_epoch), None, ()
  if stage in ("pretrain", "str", "rigl"):
    variables = sources.init_variables(config, init_key)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
  else:
    params, batch_stats, source_scores = sources.load_source(config)
  rates = None
  if stage in ("prune", "finetune"):
    scores = sources.initial_scores(config, stage, params, batch_stats, source_scores, score_key, first_batch, mode)
    source_rates = sources.load_source_rates(config, params, source_scores) if stage == "finetune" else None
    rates = sources.initial_rates(config, params, scores, source_rates)
  if sources.learns_rates(config):
    aux = {"frozen_gamma": jnp.float32(0)}
  if hooks is not None:
    scores, aux = hooks.init_state(params, score_key)
  if stage == "finetune":
    k = sources.mask_k(config, rates, scores)
    params = sources.exported_params(params, scores, k, config.mask, sources.mask_groups(config))
  objective = objectives.get_objective(config.objective.name)
  rate_config = config_lib.rate_settings(config)
  labels = optim.trainable_labels(
    params,
    scores,
    stage,
    config.freeze_bn,
    rates,
    learn_rates=rate_config.learn_rates,
    learn_scores=rate_config.learn_scores,
  )
  tx = optim.make_optimizer(config, stage, labels, steps_per_epoch * objective.replays(config.objective))
  carry = () if objective.init_carry is None else objective.init_carry(batch_shape, config.objective)
  state = TrainState(
    step=jnp.int32(0),
    params=params,
    scores=scores,
    batch_stats=batch_stats,
    opt_state=tx.init({"params": params, "scores": scores, **({} if rates is None else {"rates": rates})}),
    carry=carry,
    rng=rng,
    aux=aux,
    rates=rates,
  )
  return state, tx


def _stage_meta(config, stage, state, metrics):
  has_scores = state.scores is not None and stage != "str"  # STR's scores slot holds its thresholds
  return {
    "model": config.model.name,
    "num_classes": config_lib.num_classes(config),
    "stage": stage,
    "k": _meta_k(config, stage, state, has_scores),
    "has_scores": has_scores,
    "has_rates": state.rates is not None,
    "metrics": metrics,
    "versions": checkpoints.versions(),
    "config": json.loads(config.to_json_best_effort()),
    "threefry_partitionable": config.threefry_partitionable,
    "prunable": sources.prunable_leaves(config, state.params),
  }


def _meta_k(config, stage, state, has_scores):
  if state.rates is not None:  # HARP: the per-layer fractions fixed to the exact target, as finetune uses them
    return sources.fixed_k(config, state.rates, state.scores)
  return config.k if has_scores or stage == "rigl" else 1.0  # RigL keeps k (its masks live in the train item)


def _resume(state: TrainState, ckpt: checkpoints.Checkpoints) -> tuple[TrainState, dict[str, float] | None]:
  """The latest checkpoint's state and its evaluation metrics, or `state` and None when there is none."""
  if ckpt.latest_step() is None:
    return state, None
  items, meta = ckpt.restore_intact(jax.eval_shape(_items, state))
  rates = {"rates": items["rates"]} if "rates" in items else {}
  return state.replace(**items["model"], **items["train"], **rates), meta.get("metrics")


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one stage in `workdir` and returns its final summary (also in summary.json).

  A rerun of the same command continues from the last checkpoint and ends with exactly the params of an
  uninterrupted run. Nothing in `workdir` is written before the config and any checkpoint there have been
  read and checked. Every random draw happens under `config_lib.prng_scope(config)`. On SIGTERM or SIGINT the
  stage finishes its step, saves it (every process the same step) and raises `preemption.Preempted`.
  """
  config_lib.check_config(config)
  paths.check_writable(workdir, directory=True)
  with config_lib.prng_scope(config):
    return _run_stage(config, workdir)


def _run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  stage = config.stage
  mode, devices = sources.run_mode(config)
  axis_name = None if mode == "single" else parallel.AXIS
  checkpoints.check_resumable(workdir, config.threefry_partitionable)
  train_data, eval_data = sources.train_batches(config), sources.eval_split(config)
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = optim.stage_epochs(config, stage) * steps_per_epoch
  rows = config.data.batch_size * (2 if config.data.semisup_path else 1)  # semisup doubles every batch
  snip = config.stages[stage].get("score_init") == "snip"
  state, tx = initial_state(
    config,
    stage,
    steps_per_epoch,
    (rows, *config_lib.image_shape(config)),
    first_batch=train_data.batch_at(0) if snip else None,
    mode=mode,
  )
  prunable = sources.prunable_leaves(config, state.params)  # checks config.mask.include / exclude
  if stage in ("prune", "finetune") and sources.mask_groups(config) is None and jax.process_index() == 0:
    print(sources.describe_prunable(prunable), file=sys.stderr)
  ckpt = checkpoints.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  state, eval_metrics = _resume(state, ckpt)
  checkpoints.write_config(config.to_json_best_effort(indent=2), workdir)

  apply_fn = models.make_apply_fn(sources.build_model(config, axis_name))
  objective = objectives.get_objective(config.objective.name)
  hooks = baselines.phase_hooks(config, stage, steps_per_epoch)
  step_fn = functools.partial(
    train_step,
    apply_fn=apply_fn,
    objective=objective,
    config=config,
    tx=tx,
    k=config.k if sources.learns_rates(config) else sources.mask_k(config, state.rates, state.scores),
    steps_per_epoch=steps_per_epoch,
    hooks=hooks,
  )
  runner = parallel.make_runner(step_fn, mode, carry_fields=("carry",), devices=devices)

  def save(step, metrics=None):
    host_state = runner.get_state(device_state)
    ckpt.save(
      step,
      _items(host_state),
      meta=_stage_meta(config, stage, host_state, metrics),
      sparsity=sources.sparsity(host_state, config, hooks).to_json(),
      metrics=metrics,
    )

  start = int(state.step)
  stop = min(total_steps, config.stop_after_steps or total_steps)
  device_state = runner.put_state(state)
  history = []
  writer = metrics_lib.MetricWriter(workdir, config.log.tensorboard)
  signals = preemption.StopSignals()
  progress = tqdm.tqdm(
    total=stop,
    initial=start,
    desc=f"{stage}",
    unit="step",
    disable=not (config.log.progress and jax.process_index() == 0),
  )
  stopped = 0
  try:
    batches = data.iterate(
      train_data, range(start, stop), prefetch=config.data.prefetch, worker_count=config.data.workers
    )
    signals.install()
    for done in range(start + 1, stop + 1):
      device_state, step_metrics = runner(device_state, runner.put_batch(next(batches)))
      history.append(step_metrics)
      progress.update()
      todo = metrics_lib.cadence(
        done,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        stop=stop,
        log_every=config.log.every_steps,
        eval_every_epochs=config.eval.every_epochs,
        save_every=config.checkpoint.every_steps,
      )
      stopped = signals.stop_signal()  # every process agrees: all save this step and stop
      if stopped:
        todo = todo._replace(log=True, save=True)
      if todo.log:
        train_metrics, history = metrics_lib.mean_metrics(history), []
        metrics_lib.check_finite(train_metrics, done, ckpt.latest_step(), ckpt.workdir)
        writer.write(done, "train", train_metrics)
        progress.set_postfix({k: f"{v:.3f}" for k, v in train_metrics.items()})
      if todo.evaluate:
        eval_metrics = sources.evaluate_state(
          runner.get_state(device_state), config, eval_data, apply_fn, mode, devices, hooks
        )
        writer.write(done, "eval", eval_metrics)
      if todo.save:
        save(done, eval_metrics if todo.evaluate else None)
      if stopped:
        break
  finally:
    progress.close()
    writer.close()
    ckpt.close()
    signals.restore()
  if stopped:
    raise preemption.Preempted(
      stopped,
      done,
      f"stopped by {signal.Signals(stopped).name} after step {done} of {total_steps} of stage {stage}; "
      f"the checkpoint of step {done} is in {paths.join(workdir, 'checkpoints')}: rerun the same command to resume",
    )
  final = runner.get_state(device_state)
  rates = None if final.rates is None else sources.rate_report(config, final.rates, final.scores)
  if rates is not None and jax.process_index() == 0:
    (paths.path(workdir) / "rates.png").write_bytes(harp.plot_rates(rates))
  report = sources.sparsity(final, config, hooks)
  return _summarize(config, total_steps, eval_metrics, workdir, report, int(final.step), rates)


def _summarize(
  config: ml_collections.ConfigDict,
  total_steps: int,
  eval_metrics: dict[str, float] | None,
  workdir: str,
  report: masking.SparsityReport,
  step: int,
  rates: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The stage's summary (also written to summary.json), with HARP's per-layer `harp.rate_report` where learned."""
  summary = {
    "stage": config.stage,
    "step": step,
    "total_steps": total_steps,
    "kept_fraction": report.kept / report.total,
    "prunable": {name: total for name, _, total in report.layers},
    **(eval_metrics or {}),
    **({} if rates is None else {"rates": rates}),
  }
  if jax.process_index() == 0:
    (paths.path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
