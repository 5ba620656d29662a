"""The HYDRA pipeline (stage='all'): pretrain, then per k prune + finetune and the baselines of
`config.baselines`; the runner of a fixed-mask baseline; and the entry point for every stage.

  config = config_lib.default_config()         # or a configs/*.py get_config(arg)
  config.stage, config.baselines = 'all', ('lwm', 'snip', 'random', 'admm', 'rigl', 'str')
  rows = pipeline.train_and_evaluate(config, '/tmp/hydra_run')
  print(pipeline.summary_table(rows))
  row = pipeline.run_baseline(config, 'lwm', 'runs/pretrain', 'runs/k0.01/lwm')   # one baseline at config.k
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from hydra_jax import PyTree
from hydra_jax import baselines
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import masking
from hydra_jax import parallel
from hydra_jax import paths
from hydra_jax import sources
from hydra_jax import train


def _start_weights(
  config: ml_collections.ConfigDict, baseline: baselines.Baseline, source_dir: str, key: jax.Array
) -> tuple[PyTree, PyTree]:
  """(params, batch_stats) the baseline starts from: `source_dir`'s latest checkpoint, or a fresh init."""
  if baseline.start == "pretrained":
    params, batch_stats, _ = sources.load_source(config_lib.stage_config(config, "finetune", source=source_dir))
    return params, batch_stats
  variables = sources.init_variables(config, key)
  return variables["params"], variables.get("batch_stats", {})


def mask_source(config: ml_collections.ConfigDict, name: str, source_dir: str) -> tuple[PyTree, PyTree, PyTree]:
  """(params, batch_stats, scores) a fixed-mask baseline's training starts from.

  Args:
    config: the run config (model, data, objective, seed; SNIP's `baseline.grad_batches`: g is the mean
      gradient over that many first training batches).
    name: a baseline with `mask_scores` ('lwm', 'snip', 'random', 'admm'); with channel granularity only
      'lwm', whose mask is then L1-norm filter pruning (`baselines.channel_magnitude_scores`).
    source_dir: the run directory whose weights 'pretrained' baselines start from: the pretrain stage's
      (lwm) or the ADMM phase's (admm: the hard prune); unused by 'scratch' baselines, which start from a
      fresh initialisation drawn with fold_in(PRNGKey(seed), len(config.STAGES)) (each stage uses its index).
  """
  baseline = baselines.get_baseline(name)
  if baseline.mask_scores is None:
    raise ValueError(
      f"baseline {name!r} has no fixed mask; fixed-mask baselines: "
      f"{sorted(n for n, b in baselines.BASELINES.items() if b.mask_scores is not None)}"
    )
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), len(config_lib.STAGES))
  init_key, score_key, grad_key = jax.random.split(rng, 3)
  params, batch_stats = _start_weights(config, baseline, source_dir, init_key)
  groups = sources.mask_groups(config)
  if groups is not None:
    if name != "lwm":
      raise ValueError(f"baseline {name!r} has no channel version; with mask.granularity='channel' use 'lwm'")
    return params, batch_stats, baselines.channel_magnitude_scores(params, groups)
  grads = None
  if baseline.needs_grads:
    stream = sources.train_batches(config)
    batches = [stream.batch_at(step) for step in range(config.baseline.grad_batches)]
    mode = parallel.resolve_mode(config.parallel.mode)
    grads = sources.snip_gradients(config, params, batch_stats, batches, grad_key, mode)
  return params, batch_stats, sources.restrict_scores(config, params, baseline.mask_scores(params, score_key, grads))


def save_source(
  config: ml_collections.ConfigDict, directory: str, label: str, params: PyTree, batch_stats: PyTree, scores: PyTree
) -> None:
  """Writes (params, batch_stats, scores) as a checkpoint that `sources.load_source` reads (step 0)."""
  weights = sources.exported_params(params, scores, config.k, config.mask, sources.mask_groups(config))
  report = masking.sparsity_report(weights, sources.prunable(config))
  meta = {
    "model": config.model.name,
    "num_classes": config_lib.num_classes(config),
    "stage": label,
    "k": config.k,
    "has_scores": True,
    "versions": checkpoints.versions(),
    "config": json.loads(config.to_json_best_effort()),
  }
  ckpt = checkpoints.Checkpoints(directory, keep=1, async_save=False, best_metric=None)
  ckpt.save(
    0, {"model": {"params": params, "batch_stats": batch_stats, "scores": scores}}, meta=meta, sparsity=report.to_json()
  )
  ckpt.close()


def _has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds a checkpoint; one that cannot be read now (permission, I/O) is an error, not none."""
  try:
    checkpoints.read_meta(directory)
  except checkpoints.CheckpointReadError:
    raise
  except checkpoints.CheckpointError:
    return False
  return True


def run_baseline(config: ml_collections.ConfigDict, name: str, source_dir: str, workdir: str) -> dict[str, Any]:
  """Runs a fixed-mask baseline at `config.k`: its mask, then the weights trained with the mask fixed.

  Layout: <workdir>/mask (the starting checkpoint with the mask's scores), <workdir>/train (HYDRA's finetune
  stage from it: scores frozen, pruned weights exactly 0; on the pretrain stage's epochs and learning rate
  for 'scratch' baselines). 'admm' first runs its ADMM phase (stage 'admm' from `source_dir`) in
  <workdir>/phase, and its mask is the hard prune of that phase's weights. Rerunning resumes: an existing mask
  checkpoint is reused.

  Args:
    config: the run config; `config.k`, `config.mask` set the mask; `config.baseline` the baselines' options.
    name: 'lwm', 'snip', 'random' or 'admm'.
    source_dir: the pretrain stage's run directory (unused by 'snip' and 'random', which start from scratch).
    workdir: the baseline's run directory.

  Returns:
    The finetune stage's summary (kept_fraction, clean / PGD accuracy, ...) with 'method': name.
  """
  mask_dir, train_dir = paths.join(workdir, "mask"), paths.join(workdir, "train")
  if name == "admm":
    phase_dir = paths.join(workdir, "phase")
    train.run_stage(config_lib.stage_config(config, "admm", source=source_dir), phase_dir)
    source_dir = phase_dir
  if not _has_checkpoint(mask_dir):
    save_source(config, mask_dir, f"{name} mask", *mask_source(config, name, source_dir))
  stage = config_lib.stage_config(config, "finetune", source=mask_dir, **{"stages.finetune.score_init": "source"})
  if baselines.get_baseline(name).start == "scratch":
    stage.stages.finetune.epochs, stage.stages.finetune.lr = stage.stages.pretrain.epochs, stage.stages.pretrain.lr
  return {"method": name, **train.run_stage(stage, train_dir)}


def _run_baseline_at_k(
  config: ml_collections.ConfigDict, name: str, k: float, pretrain_dir: str, workdir: str
) -> dict[str, Any]:
  """One baseline's row at `k`: a training phase of its own (rigl: its stage, in `workdir`) or `run_baseline`."""
  if baselines.get_baseline(name).mask_scores is None:
    return {"method": name, **train.run_stage(config_lib.stage_config(config, name, k=k), workdir)}
  return run_baseline(config_lib.stage_config(config, "finetune", k=k), name, pretrain_dir, workdir)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """stage='all': pretrain, then for each k in config.ks prune + finetune and the baselines of config.baselines.

  Layout: <workdir>/pretrain, <workdir>/k<k>/{prune,finetune,<baseline>} for HYDRA and the fixed-mask baselines
  (lwm, snip, random, admm: `run_baseline` at that k) and RigL (its stage 'rigl' from scratch at that k, in
  <workdir>/k<k>/rigl), and <workdir>/str for STR, run once: its sparsity is what its thresholds reach, not a k.
  Each stage resumes independently, so rerunning the command after an
  interruption continues where it stopped. Returns one summary row per trained model ('method': dense, hydra
  (prune only), hydra, then each baseline's name; harp for hydra with config.mask.learn_rates), also written to
  summary.json.
  """
  pretrain_dir = paths.join(workdir, "pretrain")
  rows = [{"method": "dense", **train.run_stage(config_lib.stage_config(config, "pretrain"), pretrain_dir)}]
  method = "harp" if config.mask.get("learn_rates") else "hydra"  # HARP: prune learns the per-layer rates too
  for k in config.ks:
    branch = paths.join(workdir, f"k{k:g}")
    prune_config = config_lib.stage_config(config, "prune", source=pretrain_dir, k=k)
    prune = train.run_stage(prune_config, paths.join(branch, "prune"))
    rows.append({"method": f"{method} (prune only)", **prune})
    finetune_dir = paths.join(branch, "finetune")
    rows.append(
      {
        "method": method,
        **train.run_stage(
          config_lib.stage_config(config, "finetune", source=paths.join(branch, "prune"), k=k), finetune_dir
        ),
      }
    )
    for name in (name for name in config.baselines if name != "str"):
      rows.append(_run_baseline_at_k(config, name, k, pretrain_dir, paths.join(branch, name)))
  if "str" in config.baselines:
    str_run = train.run_stage(config_lib.stage_config(config, "str"), paths.join(workdir, "str"))
    rows.append({"method": "str", **str_run})
  if jax.process_index() == 0:
    (paths.path(workdir) / "summary.json").write_text(json.dumps(rows, indent=2))
  return rows


def _percent_cell(row: dict[str, Any], name: str) -> str:
  return f"{100 * row[name]:>8.2f}" if name in row else f"{'-':>8}"


def summary_table(rows: list[dict[str, Any]]) -> str:
  """Fixed-width text table of pipeline summaries: method, stage, kept %, clean and robust accuracy (%)."""
  lines = [f"{'method':<20} {'stage':<9} {'kept %':>7} {'clean %':>8} {'robust %':>8}"]
  for row in rows:
    lines.append(
      f"{row.get('method', ''):<20} {row['stage']:<9} {100 * row['kept_fraction']:>7.2f} "
      f"{_percent_cell(row, 'clean')} {_percent_cell(row, 'robust')}"
    )
  return "\n".join(lines)


def _agreed_settings(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What every process of a multi-host run must share: the config (less its per-process keys) and workdir."""
  settings = {"config": json.loads(config.to_json_best_effort()), "workdir": workdir}
  del settings["config"]["parallel"]["process_id"], settings["config"]["parallel"]["coordinator_address"]
  return settings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `config.stage` in `workdir`: one stage's summary dict, or for 'all' the list of pipeline rows.

  Every path (workdir, source, data_dir, semisup_path) may be a `gs://` URL; one that cannot be reached, or a
  local workdir that cannot be written, is a one-line `paths.PathError` before anything is done. SIGTERM / SIGINT
  stop every stage after its current step with a checkpoint there (`preemption.Preempted`); rerunning resumes.
  """
  config_lib.check_config(config)
  for location in (workdir, config.source, config.data.data_dir, config.data.semisup_path):
    if location:
      paths.check_access(location)
  paths.check_writable(workdir, directory=True)
  if parallel.init_from_config(config.parallel):
    parallel.check_processes_agree(_agreed_settings(config, workdir), timeout_s=config.parallel.timeout_s)
  if config.stage == "all":
    return run_pipeline(config, workdir)
  return train.run_stage(config, workdir)
