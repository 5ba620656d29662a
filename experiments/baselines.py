"""HYDRA against the baselines (LWM, SNIP, random / scratch, STR; RigL with --baselines) at several sparsities,
robust accuracy by the per-example worst case of PGD, APGD-CE and APGD-DLR.

Run (the paper's setting: CIFAR-10 VGG16-BN, TRADES, 90 / 95 / 99% pruning; needs an accelerator and the data):
  python -m experiments.baselines --out runs/baselines
Reduced (the digits upsampled to 16x16, CNN-small; tens of minutes on 2 CPU cores):
  python -m experiments.baselines --dataset=digits --image_size=16 --model=cnn_small --eps=0.1 --batch_size=64 \
      --pretrain_epochs=15 --pretrain_lr=0.05 --prune_epochs=5 --finetune_epochs=5 --ks=0.1,0.05 \
      --out runs/baselines_digits

Runs `stage=all` (`pipeline.train_and_evaluate`: pretrain, then per k HYDRA's prune + finetune and the
baselines, STR once) in `--out`, then evaluates every trained model with `export.evaluate_checkpoint` and
`--methods`. Writes `<out>/baselines.csv` (method, target_k, kept_fraction, clean, each attack, robust) and
`<out>/config.json` (the resolved config), and prints the table. Rerunning resumes every stage and only re-evaluates.
"""

import argparse
import os
import sys

import ml_collections

from experiments import common
from hydra_jax import pipeline


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_run_flags(parser)
  parser.add_argument("--finetune_epochs", type=int, default=100)
  parser.add_argument("--str_epochs", type=int, default=100, help="STR's training length (from scratch)")
  parser.add_argument("--str_s_init", type=float, default=-5.0, help="STR's initial threshold parameter s")
  parser.add_argument("--ks", default="0.1,0.05,0.01", help="fractions of weights kept, comma-separated")
  parser.add_argument("--baselines", default="lwm,snip,random,str", help="hydra_jax.baselines names")
  parser.add_argument("--methods", default=",".join(common.METHODS), help="evaluation methods; robust = worst case")
  return parser.parse_args(argv)


def pipeline_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """stage='all' over `--ks` with `--baselines`; in-training evaluation at each stage's end only."""
  config = common.run_config(args)
  config.stage = "all"
  config.ks = tuple(float(k) for k in args.ks.split(",") if k)
  config.baselines = tuple(args.baselines.split(","))
  config.stages.finetune.epochs, config.stages.str.epochs = args.finetune_epochs, args.str_epochs
  config.baseline.s_init = args.str_s_init
  config.eval.every_epochs = max(args.pretrain_epochs, args.prune_epochs, args.finetune_epochs)
  return config


def trained_models(config: ml_collections.ConfigDict, out: str) -> list[tuple[str, float, str]]:
  """(method, target k, run directory) of every model `pipeline.run_pipeline` trains, in its layout."""
  runs = [("dense", 1.0, os.path.join(out, "pretrain"))]
  for k in config.ks:
    branch = os.path.join(out, f"k{k:g}")
    runs.append(("hydra", k, os.path.join(branch, "finetune")))
    for name in (name for name in config.baselines if name != "str"):  # rigl trains in one stage, in branch/rigl
      runs.append((name, k, os.path.join(branch, name) if name == "rigl" else os.path.join(branch, name, "train")))
  if "str" in config.baselines:
    runs.append(("str", float("nan"), os.path.join(out, "str")))
  return runs


def evaluate_runs(
  config: ml_collections.ConfigDict, runs: list[tuple[str, float, str]], methods: list[str]
) -> list[dict]:
  """One row per run: `common.evaluate_run` accuracies (robust: per-example worst case of `methods`)."""
  return [
    {"method": method, "target_k": k, **common.evaluate_run(config, workdir, methods)} for method, k, workdir in runs
  ]


def table(rows: list[dict], methods: list[str]) -> str:
  """Fixed-width text table of the rows, accuracies in %."""
  lines = [f"{'method':<8} {'k':>6} " + common.accuracy_header(methods)]
  for row in rows:
    lines.append(f"{row['method']:<8} {row['target_k']:>6g} " + common.accuracy_cells(row, methods))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  config = pipeline_config(args)
  methods = args.methods.split(",")
  pipeline.train_and_evaluate(config, args.out)
  rows = evaluate_runs(config, trained_models(config, args.out), methods)
  common.write_csv(os.path.join(args.out, "baselines.csv"), rows)
  common.write_config(os.path.join(args.out, "config.json"), config)
  print(table(rows, methods))


if __name__ == "__main__":
  main(sys.argv[1:])
