"""Use, evaluate and export a finished run: a callable model, credible robust accuracy, dense / PyTorch / sparse
weight files.

  model = export.load_run('runs/k0.01/finetune')                   # also hydra_jax.load_run; 'best' or a step
  logits = model(images)                                           # [N, H, W, C] in [0, 1] -> [N, classes]
  model.evaluate(['pgd_linf', 'apgd_ce'])                          # = hydra-jax eval (test split, key, threat model)
  export.evaluate_checkpoint(config, 'runs/k0.01/finetune', methods=['pgd_linf', 'apgd_ce', 'apgd_dlr'])
  export.export_checkpoint(config, 'runs/k0.01/finetune', 'wrn.pth')   # reference-layout PyTorch state dict
  export.certify_checkpoint(config, 'runs/smooth', 'runs/smooth/certify', sigma=0.25)  # randomized smoothing
  small = export.load_run('runs/k0.5/finetune', compact=True)     # channel runs: the physically smaller network
  export.export_compact(config, 'runs/k0.5/finetune', 'small.npz'); small = export.read_compact('small.npz')

Exported weights are dense arrays with the pruned entries exactly 0 (`masking.export_dense`). Masking does not
make inference faster by itself: a dense kernel full of zeros costs what it did. `sparse_size` reports what a
compressed (BCOO) copy of the kept weights would occupy. A run pruned with `mask.granularity='channel'` has a
compact form (`compact=True`): every layer with only its kept channels (`channels.compact_variables`), built by
the zoo from its channel plan; its logits equal the masked network's (eval mode) and it runs faster
(benchmarks/bench_compact.py, docs/structured.md).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import json
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from hydra_jax import PyTree
from hydra_jax import channels
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import convert
from hydra_jax import data
from hydra_jax import errors
from hydra_jax import evaluate
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import paths
from hydra_jax import smoothing
from hydra_jax import sources


@dataclasses.dataclass(frozen=True, eq=False)
class RunModel:
  """A trained model read back from a run directory (`load_run`): `model(images) -> logits`.

  `model(x)` maps float images [N, H, W, C] in [0, 1] to logits [N, classes]: jitted, BatchNorm in eval mode,
  with the weights the model runs with (pruned entries exactly 0). It is a pure, differentiable function of x,
  so `jax.grad`, `jax.vmap` and attack libraries that take a JAX `logits_fn` use it as it is.

  Attributes:
    variables: {'params': weights the model runs with (pruned entries exactly 0), 'batch_stats': ...}.
    trained_params: the params as stored (in a prune run the pruned weights are still there).
    scores: the scores tree, or None for a dense (pretrain) run.
    k: fraction kept (1.0 for dense runs).
    meta: the checkpoint's metadata (config, stage, metrics, versions).
    config: the run's config: its checkpoint's resolved config (locked), unless `load_run` was given one.
    step: the checkpoint's step.
    module: the Flax module; `models.make_apply_fn(module)` with `variables` is the model in the library's
      call convention (`apply_fn`).
    channel_plan: for a compact network (`load_run(..., compact=True)`, `read_compact`), {conv / dense module
      path: kept output channels}, and `module` is `models.get_model(..., channel_plan=channel_plan)`; else None.
  """

  variables: dict[str, PyTree]
  trained_params: PyTree
  scores: PyTree | None
  k: float
  meta: dict[str, Any]
  config: ml_collections.ConfigDict
  step: int
  module: nn.Module | models.PlannedModel
  channel_plan: dict[str, int] | None = None

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits [N, classes] of float images [N, H, W, C] in [0, 1]."""
    return self._forward(self.variables, images)

  @functools.cached_property
  def _forward(self):
    return jax.jit(lambda variables, images: self.module.apply(variables, images, train=False))

  @functools.cached_property
  def apply_fn(self) -> models.ApplyFn:
    """`apply_fn(variables, x, train) -> (logits, variables)` of `models.make_apply_fn` (one object per model,
    so that `evaluate.evaluate(model.apply_fn, model.variables, ...)` compiles once)."""
    return models.make_apply_fn(self.module)

  def evaluate_per_example(
    self, methods: Sequence[str] | None = None, *, progress: bool = False
  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`evaluate` and `evaluate.evaluate_per_example`'s per-example correctness (index, label, each accuracy)."""
    names = [name for name in (self.config.eval.methods if methods is None else methods) if name != "clean"]
    config_lib.check_eval_methods(self.config, names)
    batches = sources.eval_split(self.config)
    settings = evaluate.config_settings(self.config.eval, names)
    with config_lib.prng_scope(self.config):
      results, examples = evaluate.evaluate_per_example(
        self.apply_fn,
        self.variables,
        data.iterate(batches, range(batches.num_steps)),
        key=jax.random.PRNGKey(self.config.seed + 1),
        methods=names,
        config=settings,
        progress=progress,
        **self._parallel(),
      )
    results = {**results, "k": self.k, "stage": self.meta.get("stage"), "seed": self.config.seed, "settings": settings}
    found = evaluate.masking_warnings(results, names)
    return ({**results, "warnings": found} if found else results), examples

  def min_norms(self, norm: str | None = None, *, settings: Mapping[str, Any] | None = None, progress: bool = False):
    """FMN's smallest adversarial norm of each test example (`evaluate.min_norms`) on the run's eval split (the
    one its evaluation uses), in `norm` (default config.eval.norm)."""
    batches = sources.eval_split(self.config)
    with config_lib.prng_scope(self.config):
      return evaluate.min_norms(
        self.apply_fn,
        self.variables,
        data.iterate(batches, range(batches.num_steps)),
        norm=norm or self.config.eval.norm,
        settings=settings,
        progress=progress,
        **self._parallel(),
      )

  def _parallel(self) -> dict[str, Any]:
    """The mode and devices of the run's `config.parallel.mode` (as its training evaluation ran): 'auto' is
    data-parallel over every device when there are several."""
    mode, devices = sources.run_mode(self.config, ("data.eval_batch_size",))
    return dict(mode=mode, devices=devices)

  def evaluate(self, methods: Sequence[str] | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Accuracies on the run's test split exactly as its training evaluation and `hydra-jax eval` compute them
    (`config.data.eval_examples`, the key PRNGKey(seed + 1), `config.eval`'s threat model), with `methods`
    (default: config.eval.methods; see `evaluate_checkpoint`)."""
    return self.evaluate_per_example(methods, progress=progress)[0]


CHECKPOINTS = ("latest", "best")


def load_run(
  workdir: str,
  checkpoint: str | int = "latest",
  *,
  config: ml_collections.ConfigDict | None = None,
  compact: bool = False,
) -> RunModel:
  """The model of the run in `workdir` at `checkpoint`: a callable `RunModel` with its variables and config.

  Args:
    workdir: a run directory (one stage's: of a stage='all' run, e.g. 'runs/all/k0.01/finetune').
    checkpoint: 'latest', 'best' (the highest robust accuracy, `best/`) or a step number.
    config: the config to build the model and data for (e.g. with another data_dir); default: the resolved
      config stored with the checkpoint.
    compact: for a mask.granularity='channel' run: the compact network (only the kept channels of every layer,
      `channels.compact_variables`); its logits equal the masked network's, and `trained_params` are its
      params and `scores` None.

  Raises:
    CheckpointError: no run or no such checkpoint in `workdir`, or one of another model than `config`'s.
    ConfigError: compact=True for a run that is not channel-pruned.
  """
  directory, step, meta = _checkpoint_meta(workdir, checkpoint)
  config = _stored_config(meta) if config is None else config
  source_config = config_lib.stage_config(config, config.stage, source=directory)
  params, batch_stats, scores = sources.load_source(source_config, step=step)
  groups = sources.mask_groups(config, _granularity(meta))
  weights = sources.exported_params(params, scores, meta["k"], meta["config"]["mask"], groups)
  variables = sources.model_variables(weights, batch_stats)
  run = RunModel(variables, params, scores, meta["k"], meta, config, step, sources.build_model(config))
  return _compact(run, workdir) if compact else run


def _granularity(meta: Mapping[str, Any]) -> str:
  return meta["config"]["mask"].get("granularity", "weight")


_channel_masks_jit = jax.jit(masking.channel_masks, static_argnames=("k", "groups"))


def _compact(run: RunModel, workdir: str) -> RunModel:
  """`run` with its pruned channels removed from every tensor (`channels.compact_variables`)."""
  if not models.is_zoo(run.config.model.name):
    raise errors.ConfigError(
      f"the compact network is built by the zoo's models; own model '{run.config.model.name}' exports its masked "
      "weights (.npz)"
    )
  if run.scores is None or _granularity(run.meta) != "channel":
    raise errors.ConfigError(
      f"{workdir} is not a channel-pruned run (stage {run.meta.get('stage')!r}); a compact network needs a "
      "prune / finetune run trained with --config.mask.granularity=channel"
    )
  wiring = sources.channel_wiring(run.config)
  k = flax.core.FrozenDict(run.k) if isinstance(run.k, Mapping) else run.k  # HARP's per-group k: static, hashable
  masks = _channel_masks_jit(run.trained_params, run.scores, k=k, groups=wiring.groups)
  variables, plan = channels.compact_variables(wiring, run.variables, channels.pruned_units(wiring, masks))
  return _compact_model(jax.tree.map(jnp.asarray, variables), plan, run.meta, run.config, run.step)


def _compact_model(variables, plan, meta, config, step) -> RunModel:
  module = models.get_model(
    config.model.name, config_lib.num_classes(config), width=config.model.width, channel_plan=plan
  )
  return RunModel(variables, variables["params"], None, meta["k"], meta, config, step, module, plan)


_PLAN_KEY = "__channel_plan__"


def export_compact(config: ml_collections.ConfigDict, workdir: str, out: str) -> str:
  """Writes the compact network of a channel run (`load_run(..., compact=True)`) to `out` and describes it.

  `.npz`: the '/'-joined variable paths of the compact network, and under '__channel_plan__' a JSON object with
  the channel plan, the checkpoint's meta (its config, k, stage) and step: `read_compact(out)` rebuilds it.
  """
  check_output("compact", out)
  full = load_run(workdir, config=config)
  small = _compact(full, workdir)
  flat = {masking.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(small.variables)[0]}
  info = {"plan": small.channel_plan, "meta": small.meta, "step": small.step, "config": config.to_dict()}
  np.savez(out, **flat, **{_PLAN_KEY: np.array(json.dumps(info, default=str))})
  count = lambda run: sum(int(np.size(w)) for w in jax.tree.leaves(run.variables["params"]))
  kept = (
    f"k={small.k:g} of the channels of every group"
    if not isinstance(small.k, Mapping)
    else "the channels of each group HARP's learned rates keep"
  )
  return (
    f"wrote {out}: compact {config.model.name} with {count(small):,} of {count(full):,} parameters "
    f"({100 * count(small) / count(full):.2f}%), {kept}"
  )


def read_compact(path: str) -> RunModel:
  """The compact network written by `export_compact`, with its config (no run directory needed)."""
  with np.load(path) as archive:
    if _PLAN_KEY not in archive:
      raise errors.ConfigError(f"{path} is not a compact export (no channel plan); write one with export --compact")
    info = json.loads(str(archive[_PLAN_KEY]))
    variables: dict[str, Any] = {}
    for name in archive.files:
      if name != _PLAN_KEY:
        *parents, leaf = name.split("/")
        node = variables
        for parent in parents:
          node = node.setdefault(parent, {})
        node[leaf] = jnp.asarray(archive[name])
  config = ml_collections.ConfigDict(info["config"])
  config.lock()
  return _compact_model(variables, info["plan"], info["meta"], config, info["step"])


def _checkpoint_meta(workdir: str, checkpoint: str | int) -> tuple[str, int, dict[str, Any]]:
  """(checkpoint directory, step, meta) of `checkpoint` ('latest', 'best', a step) of the run in `workdir`; a
  workdir without one is an error that names the runs under it, if any."""
  if checkpoint not in CHECKPOINTS and not isinstance(checkpoint, int):
    raise checkpoints.CheckpointError(f"checkpoint={checkpoint!r} must be 'latest', 'best' or a step number")
  directory = paths.join(workdir, "best") if checkpoint == "best" else workdir
  try:
    step, meta = checkpoints.read_meta(directory, checkpoint if isinstance(checkpoint, int) else None)
  except checkpoints.CheckpointError as error:
    runs = runs_under(workdir)
    if not runs:
      raise
    raise checkpoints.CheckpointError(f"{error}; the runs under it: {', '.join(runs)}") from None
  return directory, step, meta


def runs_under(directory: str, depth: int = 3) -> list[str]:
  """The run directories (holding checkpoints/) up to `depth` levels below `directory`, relative to it and sorted,
  e.g. ['k0.05/finetune', 'k0.05/prune', 'pretrain'] for a stage='all' run."""
  found = []
  for level in range(1, depth + 1):
    for path in paths.path(directory).glob("/".join(["*"] * level + ["checkpoints"])):
      found.append("/".join(path.parent.parts[-level:]))
  return sorted(found)


def _stored_config(meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(meta["config"])
  config.lock()
  return config


def run_config(workdir: str, checkpoint: str | int = "latest") -> ml_collections.ConfigDict:
  """The resolved config stored with `checkpoint` of the run in `workdir` (what `load_run` uses), locked."""
  return _stored_config(_checkpoint_meta(workdir, checkpoint)[2])


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  methods: Sequence[str] | None = None,
  best: bool = False,
  progress: bool = True,
  per_example: str | None = None,
  compact: bool = False,
) -> dict[str, Any]:
  """`evaluate.evaluate` of a finished run, exactly as the run's own evaluation but with any methods.

  Args:
    config: the run's config; `config.eval` gives the threat model (`evaluate.config_settings`), and the key,
      the eval split and `data.eval_examples` are the training evaluation's.
    workdir: the run directory.
    methods: names registered in `hydra_jax.evaluate` (default: config.eval.methods); 'clean' is always
      reported and may be listed.
    best: evaluate the best/ checkpoint instead of the latest.
    progress: show a progress bar.
    per_example: also write each test example's correctness to this file (`write_per_example`).
    compact: evaluate the compact network of a channel run (`load_run(..., compact=True)`): the masked
      network's accuracies up to float rounding.

  Returns:
    `evaluate.evaluate`'s accuracies, plus 'k' and 'stage' of the checkpoint, the run's 'seed' (the evaluation
    key is PRNGKey(seed + 1)), 'warnings' when AutoAttack suspects gradient masking
    (`evaluate.masking_warnings`), and 'settings': every method's
    settings (threat model, eps, steps; a certifier's sigma, n, alpha), so that each number names what gave it.
  """
  if per_example is not None:
    check_output("per_example", per_example)
  config_lib.check_eval_methods(config, [name for name in (methods or ()) if name != "clean"])
  run = load_run(workdir, "best" if best else "latest", config=config, compact=compact)
  results, examples = run.evaluate_per_example(methods, progress=progress)
  if per_example is not None:
    write_per_example(per_example, examples)
  return results


CURVE_POINTS = 41


def security_curve(
  config: ml_collections.ConfigDict | None,
  workdirs: Sequence[str],
  out: str,
  *,
  norm: str | None = None,
  max_eps: float | None = None,
  settings: Mapping[str, Any] | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Security curves (robust accuracy against eps, from FMN's per-example smallest adversarial norms) of one or
  several runs on the same axes: writes `out` (.png), and beside it the same numbers as .csv (a column per run)
  and .json (with each run's median smallest norm and the FMN settings).

  Args:
    config: the first run's config override (None: each run's own); the other runs use their own.
    workdirs: run directories (e.g. a HYDRA and an LWM branch at the same k), labelled by their paths.
    out: the figure's path, ending in .png.
    norm: 'linf' or 'l2' (default: the first run's config.eval.norm).
    max_eps: the curve's last eps (default: twice the first run's config.eval.eps when the norms agree, else
      16/255 for l_inf and 1.0 for l_2); CURVE_POINTS evenly spaced eps from 0.
    settings: FMN settings overriding `evaluate.FMN_DEFAULTS` (steps, max_stepsize, gamma).
    progress: show progress bars.

  Returns:
    {'norm', 'eps': [E], 'runs': {workdir: {'robust': [E], 'clean', 'median_min_norm', 'num_examples'}},
     'settings', 'files': [png, csv, json]}.
  """
  check_output("curve", out)
  if not workdirs:
    raise errors.UserError("a security curve needs at least one run directory")
  runs = [load_run(w, config=config if i == 0 else None) for i, w in enumerate(workdirs)]
  first = runs[0].config.eval
  norm = norm or first.norm
  if max_eps is None:
    max_eps = 2 * first.eps if norm == first.norm else {"linf": 16 / 255, "l2": 1.0}[norm]
  eps = np.linspace(0.0, max_eps, CURVE_POINTS)
  fmn_settings = {**evaluate.FMN_DEFAULTS, **(settings or {})}
  curves = {}
  for workdir, run in zip(workdirs, runs):
    columns = run.min_norms(norm, settings=fmn_settings, progress=progress)
    norms = columns["min_norm"]
    curves[workdir] = {
      "robust": evaluate.robust_curve(norms, eps).tolist(),
      "clean": float(columns["clean"].mean()),
      "median_min_norm": float(np.median(norms)),
      "num_examples": len(norms),
    }
  stem = out[: -len(".png")]
  result = {"norm": norm, "eps": eps.tolist(), "runs": curves, "settings": {"fmn": fmn_settings}}
  with paths.path(f"{stem}.json").open("w") as f:
    json.dump(result, f, indent=2)
  with paths.path(f"{stem}.csv").open("w") as f:
    writer = csv.writer(f)
    writer.writerow(["eps", *workdirs])
    writer.writerows([e, *(curves[w]["robust"][i] for w in workdirs)] for i, e in enumerate(eps))
  _plot_curves(f"{stem}.png", eps, curves, norm)
  return {**result, "files": [f"{stem}.png", f"{stem}.csv", f"{stem}.json"]}


def _plot_curves(path: str, eps: np.ndarray, curves: Mapping[str, Mapping[str, Any]], norm: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  # only curves pay its import

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(5, 3.5))
  for label, curve in curves.items():
    axes.plot(eps, curve["robust"], label=label)
  axes.set_xlabel({"linf": "eps (l_inf)", "l2": "eps (l_2)"}.get(norm, norm))
  axes.set_ylabel("robust accuracy (FMN)")
  axes.set_ylim(0, 1)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7)
  figure.tight_layout()
  with paths.path(path).open("wb") as f:
    figure.savefig(f, format="png", dpi=120)
  plt.close(figure)


# What each kind of output is called in messages, and the file name endings it takes (None: a directory).
OUTPUTS = {
  "export": ("export file", (".npz", ".pth", ".pt")),
  "compact": ("compact export file", (".npz",)),
  "per_example": ("per-example file", (".npz", ".csv")),
  "certify": ("certify output directory", None),
  "curve": ("security curve", (".png",)),
}


def check_output(kind: str, location: str) -> None:
  """Raises a one-line UserError before any work when `location`, an output of `kind` (an `OUTPUTS` key), has
  a name ending it does not take or cannot be written (`paths.check_writable`); creates nothing."""
  what, endings = OUTPUTS[kind]
  if endings and not location.endswith(endings):
    listed = f"{', '.join(endings[:-1])} or {endings[-1]}" if len(endings) > 1 else endings[0]
    raise errors.UserError(f"{what} '{location}' must end in {listed}")
  paths.check_writable(location, directory=endings is None)


def write_per_example(path: str, examples: Mapping[str, np.ndarray]) -> None:
  """Writes `evaluate.evaluate_per_example`'s columns: `.npz` (one array per column) or `.csv` (a header row of
  the column names, then one row per example; correctness as 0 / 1).

  Columns: index (in the eval split), label, then per accuracy name (clean, each method, robust, ...) whether
  the example counts as correct there; each column's mean is the accuracy `hydra-jax eval` prints.
  """
  if path.endswith(".npz"):
    with paths.path(path).open("wb") as f:
      np.savez(f, **examples)
    return
  names = list(examples)
  with paths.path(path).open("w") as f:
    writer = csv.writer(f)
    writer.writerow(names)
    writer.writerows(zip(*(np.asarray(examples[name], np.int64) for name in names)))


def sparse_size(params: PyTree) -> dict[str, int]:
  """Bytes of the prunable kernels stored dense vs as BCOO (int32 indices + float values of nonzeros)."""
  from jax.experimental import sparse  # pylint: disable=g-import-not-at-top  # only this report pays its import

  kernels = [jnp.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0] if masking.is_prunable(p, w)]
  bcoo = [sparse.BCOO.fromdense(w) for w in kernels]
  return {
    "dense_bytes": sum(w.nbytes for w in kernels),
    "bcoo_bytes": sum(m.data.nbytes + m.indices.nbytes for m in bcoo),
  }


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str, out: str, *, dense: bool = True) -> str:
  """Writes the run's model to `out` and returns a one-line description.

  `.npz`: flattened '/'-joined variable paths -> arrays ('scores/...' too when dense=False). `.pth`/`.pt`:
  a reference-layout PyTorch state dict (needs torch) that loads with strict=True into the reference model
  (dense=True: masked weights and no scores, for the reference's `dense` layer type; dense=False: raw
  weights plus `popup_scores` for its `subnet` layers); the description then names the reference class and
  the layer shapes it needs for the run's input size (`convert.reference_model`).
  """
  check_output("export", out)
  if out.endswith((".pth", ".pt")) and not models.is_zoo(config.model.name):
    raise errors.ConfigError(
      f"the PyTorch export maps the zoo's models to the reference's; own model '{config.model.name}' exports .npz"
    )
  run = load_run(workdir, config=config)
  variables, scores = run.variables, None
  if not dense and _granularity(run.meta) == "channel":
    raise errors.ConfigError("a channel run exports its masked weights (--dense) or its compact network (--compact)")
  if not dense and run.scores is not None:
    variables, scores = {**run.variables, "params": run.trained_params}, run.scores
  reference = ""
  if out.endswith((".pth", ".pt")):
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)

    input_shape = config_lib.image_shape(config)
    state_dict = convert.to_torch_state_dict(
      variables, scores, model_name=config.model.name, input_shape=input_shape, as_torch=True
    )
    with paths.path(out).open("wb") as f:
      torch.save(state_dict, f)
    classes = config_lib.num_classes(config)
    reference = convert.reference_model(config.model.name, classes, input_shape, subnet=scores is not None)
  else:
    tree = {**variables, **({"scores": scores} if scores is not None else {})}
    flat = {masking.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    with paths.path(out).open("wb") as f:
      np.savez(f, **flat)
  size = sparse_size(run.variables["params"])
  report = masking.sparsity_report(run.variables["params"], sources.prunable(run.config))
  return (
    f"wrote {out}: {report.kept:,} of {report.total:,} prunable weights kept "
    f"({100 * report.kept / report.total:.2f}%); kernels {size['dense_bytes']:,} bytes dense, "
    f"{size['bcoo_bytes']:,} bytes as BCOO" + (f"\nthe state dict {reference}" if reference else "")
  )


def _certify_examples(
  config: ml_collections.ConfigDict, skip: int, max_examples: int
) -> tuple[data.EvalBatches, range]:
  """The eval split one example per batch, and the indices to certify: every skip-th, at most max_examples."""
  examples = data.eval_batches(
    config.data.name,
    1,
    data_dir=config.data.data_dir or None,
    data_format=config.data.format,
    process_index=0,
    process_count=1,
    image_size=config.data.image_size or None,
  )
  indices = range(0, examples.num_steps, skip)
  return examples, indices[:max_examples] if max_examples > 0 else indices


def certify_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  out_dir: str,
  *,
  sigma: float,
  n0: int = 100,
  n: int = 100_000,
  alpha: float = 0.001,
  batch_size: int = 1000,
  skip: int = 1,
  max_examples: int = 0,
  radii: Sequence[float] | None = None,
  best: bool = False,
  progress: bool = True,
) -> dict[str, Any]:
  """Certifies the run's smoothed classifier on every `skip`-th eval example (Cohen et al. 2019, CERTIFY).

  The base classifier is the run's model with masked weights and BatchNorm in eval mode; each example gets
  `smoothing.certify` with key fold_in(PRNGKey(config.seed), index). Writes to `out_dir`:
  `certify.tsv` (Cohen et al.'s columns: idx, label, predict (-1: abstain), radius, correct, time),
  `certified_accuracy.txt` / `.json` (certified accuracy at `radii`, with sigma, n0, n, alpha and the
  checkpoint) and `certified_accuracy.png`. The accuracies are those of the smoothed classifier g, each
  certificate holding with probability >= 1 - alpha; they say nothing of the base classifier's robustness.

  Args:
    config, workdir, best: the run, as in `load_run`.
    out_dir: output directory (created).
    sigma, n0, n, alpha, batch_size: as in `smoothing.certify` (sigma in [0, 1] pixel units).
    skip: certify examples 0, skip, 2 * skip, ... (as the reference's --skip).
    max_examples: certify at most this many (0: all). The reference's --max bounds the index instead.
    radii: l2 radii of the table (default: 0, 0.25, ... up to `smoothing.max_radius(sigma, n, alpha)`).
    progress: progress bar over the examples.

  Returns:
    The JSON summary ('certified_accuracy' fractions per radius, settings, counts) plus 'table' (text).
  """
  smoothing.check_settings(sigma, alpha, n0=n0, n=n, batch_size=batch_size, skip=skip)
  check_output("certify", out_dir)
  run = load_run(workdir, "best" if best else "latest", config=config)
  apply_fn = run.apply_fn
  logits_fn = jax.tree_util.Partial(lambda variables, x: apply_fn(variables, x, False)[0], run.variables)
  examples, indices = _certify_examples(config, skip, max_examples)
  key = jax.random.PRNGKey(config.seed)
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  rows = []
  tsv = paths.Appender(paths.join(out_dir, "certify.tsv"), keep=False)
  try:
    tsv.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    for index in tqdm(indices, desc=f"certify sigma={sigma}", disable=not progress):
      example = examples.batch_at(index)
      label, start = int(example["label"][0]), time.time()
      predicted, radius = smoothing.certify(
        logits_fn,
        example["image"][0],
        key=jax.random.fold_in(key, index),
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=batch_size,
      )
      rows.append((predicted, label, radius))
      tsv.write(
        f"{index}\t{label}\t{predicted}\t{radius:.6g}\t{int(predicted == label)}\t"
        f"{datetime.timedelta(seconds=time.time() - start)}\n"
      )
  finally:
    tsv.close()
  settings = {
    "checkpoint": workdir,
    "stage": run.meta.get("stage"),
    "k": run.k,
    "sigma": sigma,
    "n0": n0,
    "n": n,
    "alpha": alpha,
    "skip": skip,
    "max_examples": max_examples,
  }
  return _write_certified_accuracy(out_dir, rows, radii, settings)


def _write_certified_accuracy(
  out_dir: str, rows: list[tuple[int, int, float]], radii: Sequence[float] | None, settings: dict[str, Any]
) -> dict[str, Any]:
  """Writes certified_accuracy.{txt,json,png} from (predicted, label, radius) rows; returns the summary."""
  predicted, labels, radius = (np.array(column) for column in zip(*rows, strict=True))
  correct = predicted == labels
  sigma, n, alpha = settings["sigma"], settings["n"], settings["alpha"]
  if radii is None:
    radii = np.arange(0.0, max(smoothing.max_radius(sigma, n, alpha), 0.0) + 1e-9, 0.25)
  accuracy = smoothing.certified_accuracy(correct, radius, radii)
  title = f"smoothed classifier g: sigma={sigma}, n={n}, alpha={alpha}, {len(rows)} examples"
  table = smoothing.accuracy_table(radii, accuracy, title=title)
  summary = {
    **settings,
    "num_examples": len(rows),
    "abstained": int(np.sum(predicted == smoothing.ABSTAIN)),
    "radii": [float(r) for r in radii],
    "certified_accuracy": [float(a) for a in accuracy],
  }
  out = paths.path(out_dir)
  (out / "certified_accuracy.txt").write_text(table + "\n")
  (out / "certified_accuracy.json").write_text(json.dumps(summary, indent=2))
  with (out / "certified_accuracy.png").open("wb") as f:
    smoothing.plot_certified_accuracy(f, correct, radius, title=title)
  return {**summary, "table": table}
