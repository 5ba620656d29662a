"""What a stage starts from: the model, its data, its weights (fresh, a run directory, a reference PyTorch checkpoint)
and its initial scores (an init of `masking.SCORE_INITS`, SNIP on one batch, or the source's); and what a train
state's model is made of: the weights it runs with, their sparsity and their evaluation.

  model = sources.build_model(config)                             # the zoo model of config.model / config.data
  train_data, eval_data = sources.train_batches(config), sources.eval_split(config)   # config.data's batches
  params, batch_stats, scores = sources.load_source(config)       # config.source: a workdir or a .pth.tar
  scores = sources.initial_scores(config, 'prune', params, batch_stats, scores, key, first_batch, 'single')
  weights = sources.masked_params(params, scores, config.k)       # what the model runs with
  results = sources.evaluate_state(state, config, eval_data, apply_fn)   # config.eval.methods on the state

`objective_loss` calls a registered objective with the arguments it takes (the train step uses it too).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from hydra_jax import PyTree
from hydra_jax import baselines
from hydra_jax import channels
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import convert
from hydra_jax import data
from hydra_jax import errors
from hydra_jax import evaluate
from hydra_jax import harp
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import parallel


def build_model(config: ml_collections.ConfigDict, axis_name: str | None = None):
  """The model of `config.model` (zoo or own, with its kwargs) for `config.data`'s classes, BN averaged over
  `axis_name`."""
  return models.get_model(
    config.model.name,
    config_lib.num_classes(config),
    width=config.model.width,
    kwargs=config_lib.model_kwargs(config),
    dtype=jnp.dtype(config.model.dtype),
    bn_axis_name=axis_name,
  )


def init_variables(config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, PyTree]:
  """Freshly initialised {'params', 'batch_stats'} of the configured model."""
  model = build_model(config)
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *config_lib.image_shape(config))), train=False))(key)


def channel_wiring(config: ml_collections.ConfigDict) -> channels.Wiring:
  """The channel wiring of the configured model (`channels.trace_wiring`), traced once per model and input shape."""
  kwargs = json.dumps(config_lib.model_kwargs(config), sort_keys=True)
  return _traced_wiring(
    config.model.name, config_lib.num_classes(config), config.model.width, config_lib.image_shape(config), kwargs
  )


@functools.lru_cache(maxsize=16)
def _traced_wiring(
  name: str, classes: int, width: float, image_shape: tuple[int, int, int], kwargs: str = "{}"
) -> channels.Wiring:
  model = models.get_model(name, classes, width=width, kwargs=json.loads(kwargs))
  x = jnp.zeros((1, *image_shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return channels.trace_wiring(model, variables, x.shape)


def rate_budget(config: ml_collections.ConfigDict, scores: PyTree) -> harp.Budget:
  """What HARP's hardware loss counts for this run (`harp.Budget`): the weights of `scores`, or with channel
  granularity the FLOPs of the model's channel groups (`harp.channel_budget`, built once per model)."""
  if config.mask.get("granularity", "weight") == "weight":
    return harp.weight_budget(scores)
  kwargs = json.dumps(config_lib.model_kwargs(config), sort_keys=True)
  return _traced_budget(
    config.model.name, config_lib.num_classes(config), config.model.width, config_lib.image_shape(config), kwargs
  )


@functools.lru_cache(maxsize=16)
def _traced_budget(name: str, classes: int, width: float, image_shape: tuple[int, int, int], kwargs: str):
  model = models.get_model(name, classes, width=width, kwargs=json.loads(kwargs))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))["params"]
  return harp.channel_budget(_traced_wiring(name, classes, width, image_shape, kwargs), params)


def mask_groups(config: ml_collections.ConfigDict, granularity: str | None = None) -> masking.ChannelGroups | None:
  """The model's channel groups with `granularity` (default config.mask.granularity) 'channel'; None for 'weight'."""
  if (granularity or config.mask.get("granularity", "weight")) == "weight":
    return None
  return channel_wiring(config).groups


def prunable(config: ml_collections.ConfigDict) -> masking.PathFilter:
  """Which weights the run prunes: `config.mask.include` / `exclude` (default: every conv and dense kernel)."""
  return masking.PathFilter(tuple(config.mask.get("include", ())), tuple(config.mask.get("exclude", ())))


def prunable_leaves(config: ml_collections.ConfigDict, params: PyTree) -> dict[str, int]:
  """{path: size} of the weights the run prunes (`masking.PathFilter.check`), checked against `params`."""
  try:
    return prunable(config).check(params)
  except ValueError as error:
    raise errors.ConfigError(f"config.{error}" if str(error).startswith("mask.") else str(error)) from None


def describe_prunable(leaves: Mapping[str, int]) -> str:
  """'prunable: 5 leaves, 1,234 weights: stem/kernel 72, ...' (what a run prints at its start)."""
  listed = ", ".join(f"{name} {size:,}" for name, size in leaves.items())
  return f"prunable: {len(leaves)} leaves, {sum(leaves.values()):,} weights: {listed}"


def restrict_scores(config: ml_collections.ConfigDict, params: PyTree, scores: PyTree) -> PyTree:
  """`scores` with None at every leaf the run does not prune (`prunable`): a baseline's mask scores."""
  chosen = prunable(config)
  return jax.tree_util.tree_map_with_path(
    lambda path, s, w: s if s is not None and chosen(path, w) else None, scores, params, is_leaf=lambda x: x is None
  )


def train_batches(config: ml_collections.ConfigDict) -> data.TrainBatches:
  """The run's training batches (`config.data`, seeded by `config.seed`)."""
  return data.train_batches(
    config.data.name,
    config.data.batch_size,
    seed=config.seed,
    data_dir=config.data.data_dir or None,
    data_format=config.data.format,
    image_size=config.data.image_size or None,
    data_fraction=config.data.data_fraction,
    semisup_path=config.data.semisup_path or None,
    semisup_fraction=config.data.semisup_fraction,
  )


def eval_split(config: ml_collections.ConfigDict) -> data.EvalBatches:
  """The batches a run evaluates on: the dataset's eval split, or its first `config.data.eval_examples`."""
  batches = data.eval_batches(
    config.data.name,
    config.data.eval_batch_size,
    data_dir=config.data.data_dir or None,
    data_format=config.data.format,
    image_size=config.data.image_size or None,
  )
  return data.first_examples(batches, config.data.eval_examples)


def load_source(config: ml_collections.ConfigDict, step: int | None = None) -> tuple[PyTree, PyTree, PyTree | None]:
  """(params, batch_stats, scores or None) of `config.source`.

  The source is a hydra_jax run directory (its latest checkpoint, or `step`), or a reference HYDRA PyTorch checkpoint
  (`.pth`, `.pth.tar`, `.pt`; needs torch) read by `convert.load_torch_checkpoint`. A run of stage 'str' gives
  the weights its model runs with, `baselines.str_weights` (exact zeros below its thresholds), and no scores.
  """
  classes = config_lib.num_classes(config)
  if config.source.endswith(convert.TORCH_SUFFIXES):
    variables, scores = convert.load_torch_checkpoint(
      config.source, config.model.name, classes, config_lib.image_shape(config)
    )
    return variables["params"], variables.get("batch_stats", {}), scores
  template = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
  step, meta = checkpoints.read_meta(config.source, step)
  if (meta.get("model"), meta.get("num_classes")) != (config.model.name, classes):
    raise checkpoints.CheckpointError(
      f"source {config.source} holds model '{meta.get('model')}' with {meta.get('num_classes')} classes, "
      f"but the config asks for '{config.model.name}' with {classes}"
    )
  str_run = meta.get("stage") == "str"  # its scores slot holds STR's per-layer thresholds
  abstract_scores = None
  if meta.get("has_scores") or str_run:
    abstract_scores = jax.eval_shape(_score_template(config, meta, str_run), template["params"])
  items, _ = checkpoints.restore(
    config.source,
    {
      "model": {"params": template["params"], "batch_stats": template.get("batch_stats", {}), "scores": abstract_scores}
    },
    step,
  )
  model = items["model"]
  if str_run:
    return baselines.str_weights(model["params"], model["scores"]), model["batch_stats"], None
  return model["params"], model["batch_stats"], model["scores"]


def load_source_rates(config: ml_collections.ConfigDict, params: PyTree, scores: PyTree | None) -> PyTree | None:
  """HARP's learned rates of `config.source` (a tree mirroring `scores`), or None when the source has none."""
  if scores is None or config.source.endswith(convert.TORCH_SUFFIXES):
    return None
  step, meta = checkpoints.read_meta(config.source)
  if not meta.get("has_rates"):
    return None
  learned = meta.get("config", {})
  for key, value in (("k", config.k), ("mask.rate_alpha", config_lib.rate_settings(config).rate_alpha)):
    source_value = learned.get("mask", {}).get("rate_alpha") if key == "mask.rate_alpha" else learned.get("k")
    if source_value is not None and source_value != value:  # the rates mean fractions of that k, k_min = alpha k
      raise errors.ConfigError(
        f"source {config.source} learned its rates with {key}={source_value}; run with --config.{key}={source_value}"
      )
  template = jax.eval_shape(lambda: harp.init_rates(params, scores, k=0.5, alpha=0.0, groups=mask_groups(config)))
  items, _ = checkpoints.restore(config.source, {"rates": template}, step)
  return items["rates"]


def learns_rates(config: ml_collections.ConfigDict) -> bool:
  """Whether this stage learns HARP's per-layer rates: prune with config.mask.learn_rates."""
  return config.stage == "prune" and bool(config_lib.rate_settings(config).learn_rates)


def initial_rates(
  config: ml_collections.ConfigDict, params: PyTree, scores: PyTree | None, source_rates: PyTree | None
):
  """The rates a stage starts from: HARP's init (config.mask.rate_init) where prune learns them, the source's in
  finetune when it takes the source's scores too, else None (HYDRA's uniform k)."""
  if learns_rates(config):
    settings = config_lib.rate_settings(config)
    return harp.init_rates(
      params, scores, k=config.k, alpha=settings.rate_alpha, strategy=settings.rate_init, groups=mask_groups(config)
    )
  if config.stage == "finetune" and config.stages.finetune.score_init == "source":
    return source_rates
  return None


def mask_k(config: ml_collections.ConfigDict, rates: PyTree | None, scores: PyTree | None) -> Any:
  """The k the masks of `scores` use: config.k; with HARP's `rates`, the learned per-layer fractions (a tree of
  arrays) while prune learns them, else the rates fixed to the exact target (`harp.fixed_k`, a hashable FrozenDict)."""
  if rates is None:
    return config.k
  if learns_rates(config):
    return harp.layer_rates(rates, config.k, config_lib.rate_settings(config).rate_alpha)
  return flax.core.FrozenDict(fixed_k(config, rates, scores))


def fixed_k(config: ml_collections.ConfigDict, rates: PyTree, scores: PyTree) -> dict[str, float]:
  """HARP's learned `rates` fixed to kept counts that meet the run's target exactly (`harp.fixed_k` with the run's
  `rate_budget`): {kernel or channel group name: k}."""
  alpha = config_lib.rate_settings(config).rate_alpha
  return harp.fixed_k(rates, scores, k=config.k, alpha=alpha, budget=rate_budget(config, scores))


def rate_report(config: ml_collections.ConfigDict, rates: PyTree, scores: PyTree) -> dict[str, Any]:
  """`harp.rate_report` of the run's learned rates with its `rate_budget`."""
  alpha = config_lib.rate_settings(config).rate_alpha
  return harp.rate_report(rates, scores, k=config.k, alpha=alpha, budget=rate_budget(config, scores))


def rate_learning(config: ml_collections.ConfigDict, scores: PyTree, steps_per_epoch: int) -> harp.Learning | None:
  """What the train step does with HARP's rates where this stage learns them (`harp.Learning`), else None."""
  if not learns_rates(config):
    return None
  settings = config_lib.rate_settings(config)
  return harp.Learning(
    k=config.k,
    alpha=settings.rate_alpha,
    gamma0=settings.hw_gamma,
    dynamic=settings.hw_gamma_dynamic,
    steps_per_epoch=steps_per_epoch,
    budget=rate_budget(config, scores),
  )


def _is_static(k: Any) -> bool:
  return isinstance(k, (int, float, flax.core.FrozenDict))


def source_granularity(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> str:
  """The mask granularity of a checkpoint (its meta's config), checked against `config.mask.granularity`."""
  granularity = meta.get("config", {}).get("mask", {}).get("granularity", "weight")
  if meta.get("has_scores") and granularity != config.mask.get("granularity", "weight"):
    raise checkpoints.CheckpointError(
      f"source {config.source} was pruned with mask.granularity='{granularity}'; run with "
      f"--config.mask.granularity={granularity}"
    )
  return granularity


def _score_template(config: ml_collections.ConfigDict, meta: Mapping[str, Any], str_run: bool):
  """params -> a scores tree shaped like the checkpoint's (STR thresholds, weight or channel scores)."""
  if str_run:
    return lambda p: baselines.str_thresholds(p, 0.0)
  groups = mask_groups(config, source_granularity(config, meta))
  if groups is not None:
    return lambda p: masking.init_channel_scores(p, "uniform", jax.random.key(0), groups)
  mask = meta.get("config", {}).get("mask", {})  # the leaves the checkpoint's run pruned
  chosen = masking.PathFilter(tuple(mask.get("include", ())), tuple(mask.get("exclude", ())))
  return lambda p: masking.init_scores(p, "uniform", jax.random.key(0), prunable=chosen)


def masked_params(
  params: PyTree,
  scores: PyTree | None,
  k: Any,
  scope: str = "layer",
  min_layer_k: float = 0.0,
  groups: masking.ChannelGroups | None = None,
) -> PyTree:
  """The weights the model runs with: `apply_masks(params, scores, k)`, or params when dense (no scores).

  `groups`: the model's channel groups for channel granularity (`mask_groups`), None for weights.
  """
  if scores is None:
    return params
  return masking.apply_masks(params, scores, k, scope=scope, min_layer_k=min_layer_k, groups=groups)


def exported_params(
  params: PyTree,
  scores: PyTree | None,
  k: Any,
  mask_config: Mapping[str, Any],
  groups: masking.ChannelGroups | None = None,
) -> PyTree:
  """`masking.export_dense` (pruned weights exactly 0) with the run's mask settings, or params when dense.

  Jitted: eager masking dispatches every op of every layer's top-k search (28 s for ResNet-18 against 9 s
  compiling and 0.6 s running the jitted program, on the shared 2-core CPU)."""
  if scores is None:
    return params
  scope, min_layer_k = mask_config["scope"], mask_config["min_layer_k"]
  if (
    isinstance(k, Mapping) and not isinstance(k, flax.core.FrozenDict) and all(isinstance(v, float) for v in k.values())
  ):
    k = flax.core.FrozenDict(k)  # per-layer fractions (a checkpoint's meta): static, as a float k
  export = _export_dense_jit if _is_static(k) else _export_dense_traced_jit
  return export(params, scores, k=k, scope=scope, min_layer_k=min_layer_k, groups=groups)


def model_variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  """{'params': params, 'batch_stats': batch_stats}, without batch_stats for BN-free models."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def objective_loss(
  objective: objectives.Objective,
  config: ml_collections.ConfigDict,
  apply_fn: models.ApplyFn,
  variables: PyTree,
  batch: dict[str, jax.Array],
  key: jax.Array,
  carry: PyTree,
  epoch: jax.Array,
) -> objectives.LossOutput:
  """`objective.loss_fn` called with the arguments it takes: the carry (stateful) and `epoch=` (takes_epoch).

  `epoch` is a float32 scalar: the fractional number of epochs of the stage done at this step.
  """
  extra = (carry,) if objective.init_carry is not None else ()
  by_name = {"epoch": epoch} if objective.takes_epoch else {}
  return objective.loss_fn(apply_fn, variables, batch, key, config.objective, *extra, **by_name)


def objective_loss_fn(
  config: ml_collections.ConfigDict, batch_stats: PyTree, axis_name: str | None = None
) -> baselines.LossFn:
  """`(params, batch, key) -> loss` of the run's objective with every weight kept, as at a stage's first batch.

  Train-mode BatchNorm whose statistics are not carried over; stateful objectives (free AT) start from their
  initial carry and scheduled ones (takes_epoch) from epoch 0 (`objective_loss` passes what each takes).
  """
  apply_fn = models.make_apply_fn(build_model(config, axis_name))
  objective = objectives.get_objective(config.objective.name)

  def loss_fn(params, batch, key):
    carry = None if objective.init_carry is None else objective.init_carry(batch["image"].shape, config.objective)
    variables = model_variables(params, batch_stats)
    return objective_loss(objective, config, apply_fn, variables, batch, key, carry, jnp.float32(0))[0]

  return loss_fn


def snip_gradients(
  config: ml_collections.ConfigDict,
  params: PyTree,
  batch_stats: PyTree,
  batches: Sequence[dict[str, jax.Array]],
  key: jax.Array,
  mode: str = "single",
) -> PyTree:
  """Mean over `batches` of dL/dw of the run's objective with every weight kept: the g of SNIP's |w * g|.

  Each batch's gradient is one data-parallel program in `mode`, averaged over all devices of every process
  as in a train step, so that every host derives the same mask from its own part of the global batches.

  Args:
    config: run config (model, objective).
    params, batch_stats: the weights to differentiate at and the BN statistics.
    batches: this host's parts of one or a few global batches {'image': [B, H, W, C], 'label': [B]}.
    key: PRNG key of the objective's randomness; batch i uses fold_in(key, i) (`baselines.mean_gradient`).
    mode: parallel mode.

  Returns:
    A tree mirroring `params`.
  """

  def step(state, batch, axis_name):
    batch = parallel.with_positions(batch, axis_name)  # the objective's draws keyed by global position
    grads = jax.grad(objective_loss_fn(config, state["batch_stats"], axis_name))(state["params"], batch, state["key"])
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    return {**state, "grads": grads}, {}

  runner = parallel.make_runner(step, mode)

  def grad_fn(params, batch, key):
    start = runner.put_state({"params": params, "batch_stats": batch_stats, "key": key, "grads": params})
    state, _ = runner(start, runner.put_batch(batch))
    return runner.get_state(state)["grads"]

  return baselines.mean_gradient(grad_fn, params, batches, key)


def initial_scores(
  config: ml_collections.ConfigDict,
  stage: str,
  params: PyTree,
  batch_stats: PyTree,
  source_scores: PyTree | None,
  key: jax.Array,
  first_batch: dict | None,
  mode: str,
) -> PyTree:
  """The scores `config.stages[stage].score_init` asks for: the source's ('source') or a fresh init.

  Args:
    config: run config.
    stage: 'prune' or 'finetune'.
    params, batch_stats: the source's weights and BN statistics.
    source_scores: the source's scores, or None (a dense source).
    key: PRNG key of the init (and of SNIP's objective).
    first_batch: the stage's first batch (this host's part); needed by 'snip'.
    mode: the run's parallel mode (for SNIP's gradient).

  Returns:
    A scores tree mirroring `params` (None at non-prunable leaves).
  """
  init = config.stages[stage].score_init
  if init == "source":
    if source_scores is None:
      raise errors.ConfigError(
        f"config.stages.{stage}.score_init='source' but source {config.source} has no scores (a dense "
        f"pretrain run?); choose a score init, e.g. --config.stages.{stage}.score_init=scaled (LWM)"
      )
    return source_scores
  grads = {}
  if init == "snip":
    if first_batch is None:
      raise errors.ConfigError(f"config.stages.{stage}.score_init='snip' needs the stage's first batch")
    grads = {"grads": snip_gradients(config, params, batch_stats, [first_batch], key, mode)}
  groups = mask_groups(config)
  if groups is not None:
    return masking.init_channel_scores(params, init, key, groups)
  return masking.init_scores(params, init, key, prunable=prunable(config), **grads)


# For evaluation and export, compiled once per model; k is static so that it rounds exactly as in the train step.
_masked_params_jit = jax.jit(masked_params, static_argnums=(2, 3, 4, 5))
_export_dense_jit = jax.jit(masking.export_dense, static_argnames=("k", "scope", "min_layer_k", "groups"))
# HARP's learned rates (arrays) are traced: one program for every value.
_masked_params_traced_jit = jax.jit(masked_params, static_argnums=(3, 4, 5))
_export_dense_traced_jit = jax.jit(masking.export_dense, static_argnames=("scope", "min_layer_k", "groups"))
_phase_weights_jit = jax.jit(lambda weights_fn, params, phase: weights_fn(params, phase), static_argnums=0)


def model_weights(state: Any, config: ml_collections.ConfigDict, hooks: baselines.PhaseHooks | None = None) -> PyTree:
  """The weights the model runs with (jitted): `hooks.weights` in the str / admm / rigl stages, else the masked
  params."""
  if hooks is None:
    mask, k = config.mask, mask_k(config, getattr(state, "rates", None), state.scores)
    masked = _masked_params_jit if _is_static(k) else _masked_params_traced_jit
    return masked(state.params, state.scores, k, mask.scope, mask.min_layer_k, mask_groups(config))
  return _phase_weights_jit(hooks.weights, state.params, hooks.phase_state(state.scores, state.aux))


def sparsity(
  state: Any, config: ml_collections.ConfigDict, hooks: baselines.PhaseHooks | None = None
) -> masking.SparsityReport:
  """Kept / total weights per prunable layer, counted on the weights the model runs with (STR: |w| > g(s)), or on
  `hooks.kept` where set (RigL's masks)."""
  if hooks is not None and hooks.kept is not None:
    return masking.sparsity_report(hooks.kept(state.params, hooks.phase_state(state.scores, state.aux)))
  if hooks is not None:
    return masking.sparsity_report(model_weights(state, config, hooks))
  k = mask_k(config, getattr(state, "rates", None), state.scores)
  weights = exported_params(state.params, state.scores, k, config.mask, mask_groups(config))
  return masking.sparsity_report(weights, prunable(config))


def run_mode(
  config: ml_collections.ConfigDict, batch_keys: Sequence[str] = ("data.batch_size", "data.eval_batch_size")
) -> tuple[str, list[Any]]:
  """The run's `config.parallel.mode`, resolved ('auto': 'shard_map' on several devices), and its devices;
  ConfigError unless the batch size at each of `batch_keys` divides over them."""
  mode = parallel.resolve_mode(config.parallel.mode)
  return mode, parallel.mode_devices(mode, {key: config_lib.lookup(config, key) for key in batch_keys})


def evaluate_state(
  state: Any,
  config: ml_collections.ConfigDict,
  eval_data: data.EvalBatches,
  apply_fn: models.ApplyFn,
  mode: str = "single",
  devices: list[Any] | None = None,
  hooks: baselines.PhaseHooks | None = None,
) -> dict[str, float]:
  """`evaluate.evaluate` of the state's model (`model_weights`) on `eval_data` with the `config.eval` methods.

  The evaluation key is PRNGKey(config.seed + 1), as in `export.evaluate_checkpoint`.

  Returns:
    Accuracies in [0, 1]: 'clean', 'clean_top5' (more than 5 classes), one per method of config.eval.methods,
    'robust' (their per-example worst case; clean without methods), and 'num_examples'.
  """
  weights = model_weights(state, config, hooks)
  batches = data.iterate(eval_data, range(eval_data.num_steps), prefetch=config.data.prefetch)
  return evaluate.evaluate(
    apply_fn,
    model_variables(weights, state.batch_stats),
    batches,
    key=jax.random.PRNGKey(config.seed + 1),
    methods=tuple(config.eval.methods),
    config=evaluate.config_settings(config.eval),
    progress=False,
    mode=mode,
    devices=devices,
  )
