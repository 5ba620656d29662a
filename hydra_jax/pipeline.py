"""The HYDRA pipeline (stage='all'): pretrain, then per k prune + finetune and the LWM baseline; and the entry
point for every stage.

  config = config_lib.default_config()         # or a configs/*.py get_config(arg)
  config.stage = 'all'
  rows = pipeline.train_and_evaluate(config, '/tmp/hydra_run')
  print(pipeline.summary_table(rows))
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from hydra_jax import config as config_lib
from hydra_jax import parallel
from hydra_jax import train


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """stage='all': pretrain, then for each k in config.ks prune + finetune and (config.lwm) the LWM baseline.

  Layout: <workdir>/pretrain, <workdir>/k<k>/{prune,finetune,lwm}. Each stage resumes independently, so
  rerunning the command after an interruption continues where it stopped. Returns one summary row per
  trained model (pretrain, then per k: hydra (prune+finetune) and lwm), also written to summary.json.
  """
  pretrain_dir = os.path.join(workdir, "pretrain")
  rows = [{"method": "dense", **train.run_stage(config_lib.stage_config(config, "pretrain"), pretrain_dir)}]
  for k in config.ks:
    branch = os.path.join(workdir, f"k{k:g}")
    prune_config = config_lib.stage_config(config, "prune", source=pretrain_dir, k=k)
    prune = train.run_stage(prune_config, os.path.join(branch, "prune"))
    rows.append({"method": "hydra (prune only)", **prune})
    finetune_dir = os.path.join(branch, "finetune")
    rows.append({"method": "hydra", **train.run_stage(
        config_lib.stage_config(config, "finetune", source=os.path.join(branch, "prune"), k=k), finetune_dir)})
    if config.lwm:
      lwm = config_lib.stage_config(config, "finetune", source=pretrain_dir, k=k,
                                    **{"stages.finetune.score_init": "scaled"})
      rows.append({"method": "lwm", **train.run_stage(lwm, os.path.join(branch, "lwm"))})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
  """Fixed-width text table of pipeline summaries: method, stage, kept %, clean and robust accuracy (%)."""
  lines = [f"{'method':<20} {'stage':<9} {'kept %':>7} {'clean %':>8} {'robust %':>8}"]
  for row in rows:
    accuracy = lambda name: f"{100 * row[name]:>8.2f}" if name in row else f"{'-':>8}"
    lines.append(f"{row.get('method', ''):<20} {row['stage']:<9} {100 * row['kept_fraction']:>7.2f} "
                 f"{accuracy('clean')} {accuracy('robust')}")
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs `config.stage` in `workdir`: one stage's summary dict, or for 'all' the list of pipeline rows."""
  config_lib.check_config(config)
  if config.parallel.distributed:
    parallel.init_distributed()
  if config.stage == "all":
    return run_pipeline(config, workdir)
  return train.run_stage(config, workdir)
