"""The Adversarial Pruning Benchmark's grid (Piras et al. 2024, arXiv 2409.01249): one dense pretrain, then HYDRA,
HARP and LWM at 90 / 95 / 99% unstructured and 50 / 75 / 90% channel-structured pruning, each model evaluated by
AutoAttack standard (`--autoattack`, the benchmark's metric) or the per-example worst case of `--methods` (default
PGD and APGD, cheaper at reduced size); the table's first line names which.

Run (the benchmark's setting: CIFAR-10 ResNet18 or VGG16-BN, adversarial training; needs an accelerator and the data):
  python -m experiments.apb --model=resnet18 --autoattack --out runs/apb
Reduced (the digits upsampled to 16x16, CNN-small, PGD-3 training; about an hour on 2 shared CPU cores):
  python -m experiments.apb --dataset=digits --image_size=16 --model=cnn_small --eps=0.1 --batch_size=64 \
      --objective=pgd_at --attack_steps=3 --pretrain_epochs=15 --pretrain_lr=0.05 --prune_epochs=5 \
      --finetune_epochs=5 --methods=pgd_linf,apgd_ce --out runs/apb_digits

HARP (`mask.learn_rates`) learns per-layer rates at weight granularity (hardware loss: kept weights) and per-group
rates at channel granularity (HARP's FLOP loss, whose target is structured HYDRA's FLOPs at the same k; docs/harp.md).
`--pruning_methods` / `--granularities` run a part of the grid (e.g. `--pruning_methods=harp --granularities=channel`:
the other cells are '-'). Each stage is `train.run_stage`; a rerun resumes every stage and re-evaluates. Writes
`<out>/apb.csv` (method, granularity, target k, kept fraction, clean, each attack, robust), `<out>/apb.md` (the
benchmark's table: clean / robust per cell, in %) and `<out>/config.json`, and prints the table.
"""

import argparse
import os
import sys

import ml_collections

from experiments import common
from hydra_jax import config as config_lib
from hydra_jax import train

GRID = {"weight": (0.1, 0.05, 0.01), "channel": (0.5, 0.25, 0.1)}  # fractions KEPT: 90/95/99% and 50/75/90% pruned
METHODS = ("hydra", "harp", "lwm")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_run_flags(parser)
  parser.add_argument("--finetune_epochs", type=int, default=100)
  parser.add_argument("--rate_init", default="uniform", help="HARP's initial rates: uniform or erk")
  parser.add_argument("--methods", default=",".join(common.METHODS), help="evaluation methods; robust = worst case")
  parser.add_argument("--autoattack", action="store_true", help="robust = AutoAttack standard (replaces --methods)")
  parser.add_argument("--autoattack_steps", type=int, default=100, help="AutoAttack's APGD and FAB iterations")
  parser.add_argument("--autoattack_queries", type=int, default=5000, help="AutoAttack's Square queries")
  parser.add_argument("--pruning_methods", default=",".join(METHODS), help="the grid's rows to run")
  parser.add_argument("--granularities", default=",".join(GRID), help="the grid's column groups to run")
  return parser.parse_args(argv)


def cell_config(base: ml_collections.ConfigDict, method: str, granularity: str, k: float, out: str):
  """(config, workdir) of the stages of one cell: [prune, finetune] (HYDRA, HARP) or [finetune] (LWM)."""
  branch = os.path.join(out, granularity, f"k{k:g}", method)
  common_keys = {"k": k, "mask.granularity": granularity, "mask.learn_rates": method == "harp"}
  pretrain = os.path.join(out, "pretrain")
  if method == "lwm":
    overrides = {**common_keys, "stages.finetune.score_init": "scaled"}
    return [(config_lib.stage_config(base, "finetune", source=pretrain, **overrides), os.path.join(branch, "finetune"))]
  prune = config_lib.stage_config(base, "prune", source=pretrain, **common_keys)
  finetune = config_lib.stage_config(base, "finetune", source=os.path.join(branch, "prune"), **common_keys)
  return [(prune, os.path.join(branch, "prune")), (finetune, os.path.join(branch, "finetune"))]


def run_grid(
  base: ml_collections.ConfigDict,
  out: str,
  methods: list[str],
  pruning_methods: tuple[str, ...] = METHODS,
  granularities: tuple[str, ...] = tuple(GRID),
) -> list[dict]:
  """Trains (or resumes) every stage of the grid's chosen cells and evaluates each finished cell; one row per cell."""
  train.run_stage(config_lib.stage_config(base, "pretrain"), os.path.join(out, "pretrain"))
  rows = [{"method": "dense", "granularity": "-", "target_k": 1.0}]
  rows[0].update(common.evaluate_run(base, os.path.join(out, "pretrain"), methods))
  for granularity in granularities:
    for k in GRID[granularity]:
      for method in pruning_methods:
        stages = cell_config(base, method, granularity, k, out)
        for config, workdir in stages:
          train.run_stage(config, workdir)
        config, workdir = stages[-1]
        row = {"method": method, "granularity": granularity, "target_k": k}
        rows.append({**row, **common.evaluate_run(config, workdir, methods)})
  return rows


def robust_label(methods: list[str]) -> str:
  """What the table's robust accuracy is: AutoAttack standard, or the per-example worst case of `methods`."""
  if methods == ["autoattack"]:
    return "robust: AutoAttack standard"
  return f"robust: per-example worst case of {', '.join(methods)}"


def markdown_table(rows: list[dict], robust: str) -> str:
  """The benchmark's table: one row per method, one column per (granularity, sparsity), cells clean / robust (%);
  its first line says what robust is (`robust_label`)."""
  columns = [(g, k) for g, ks in GRID.items() for k in ks]
  header = (
    f"Cells: clean / {robust} (%).\n\n| method | " + " | ".join(f"{g} {100 * (1 - k):g}%" for g, k in columns) + " |"
  )
  lines = [header, "|---" * (len(columns) + 1) + "|"]
  dense = next(row for row in rows if row["method"] == "dense")
  lines.append(
    f"| dense | {100 * dense['clean']:.1f} / {100 * dense['robust']:.1f} (every column) |" + " |" * (len(columns) - 1)
  )
  for method in METHODS:
    cells = {(row["granularity"], row["target_k"]): row for row in rows if row["method"] == method}
    text = [f"{100 * c['clean']:.1f} / {100 * c['robust']:.1f}" if (c := cells.get(col)) else "-" for col in columns]
    lines.append(f"| {method} | " + " | ".join(text) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  base = common.run_config(args)
  base.stages.finetune.epochs = args.finetune_epochs
  base.mask.rate_init = args.rate_init
  base.eval.every_epochs = max(args.pretrain_epochs, args.prune_epochs, args.finetune_epochs)
  base.log.progress = False
  methods = ["autoattack"] if args.autoattack else args.methods.split(",")
  steps, queries = args.autoattack_steps, args.autoattack_queries
  base.eval.autoattack.update(apgd_steps=steps, fab_steps=steps, square_queries=queries)
  os.makedirs(args.out, exist_ok=True)
  chosen = tuple(args.pruning_methods.split(",")), tuple(args.granularities.split(","))
  for names, valid, flag in ((chosen[0], METHODS, "pruning_methods"), (chosen[1], tuple(GRID), "granularities")):
    if unknown := sorted(set(names) - set(valid)):
      raise SystemExit(f"--{flag}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
  rows = run_grid(base, args.out, methods, *chosen)
  common.write_csv(os.path.join(args.out, "apb.csv"), rows)
  common.write_config(os.path.join(args.out, "config.json"), base)
  table = markdown_table(rows, robust_label(methods))
  with open(os.path.join(args.out, "apb.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main(sys.argv[1:])
