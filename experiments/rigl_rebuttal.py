"""The rebuttal's check ([R5]) that sparse networks trained without the robust objective are not robust: RigL and
STR trained with the benign (clean cross-entropy) objective, beside HYDRA with TRADES and RigL with TRADES at the
same k, robust accuracy by the per-example worst case of PGD, APGD-CE and APGD-DLR.

The rebuttal: "techniques like RIGL/STR don't account for the robustness objective while pruning ... we
experimented with their pre-trained checkpoints and observed 0-0.5% robust accuracy".

Run (reduced: the digits upsampled to 16x16, CNN-small, about 90% pruning; minutes on 2 CPU cores):
  python -m experiments.rigl_rebuttal --dataset=digits --image_size=16 --model=cnn_small --eps=0.1 \
      --batch_size=64 --pretrain_epochs=15 --pretrain_lr=0.05 --prune_epochs=5 --finetune_epochs=5 --k=0.1 \
      --rigl_delta_t=10 --scratch_optimizer=adam --scratch_lr=1e-3 --str_s_init=-3.4 \
      --out runs/rigl_rebuttal_digits

Trains in `--out`: trades/ (`stage=all` at k without baselines: the dense TRADES model and HYDRA's prune +
finetune from it; then k<k>/rigl: RigL with TRADES from scratch) and benign/ (the dense model, RigL at k and STR,
each from scratch with the benign objective). RigL and STR train for the pretrain's epochs with
`--scratch_optimizer` at `--scratch_lr` (on this CNN, SGD from a sparse fresh init stays at chance). Every model is
then evaluated with `export.evaluate_checkpoint` and `--methods`; writes `<out>/rigl_rebuttal.csv` and the two
resolved configs, and prints the table. Rerunning resumes every stage and only re-evaluates.
"""

import argparse
import os
import sys

import ml_collections

from experiments import common
from hydra_jax import config as config_lib
from hydra_jax import pipeline
from hydra_jax import train


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_run_flags(parser)
  parser.add_argument("--finetune_epochs", type=int, default=100)
  parser.add_argument("--k", type=float, default=0.1, help="fraction of weights kept (HYDRA and RigL)")
  parser.add_argument("--rigl_delta_t", type=int, default=100, help="batches between RigL's mask updates")
  parser.add_argument("--rigl_alpha", type=float, default=0.3, help="RigL's initial drop fraction")
  parser.add_argument("--str_s_init", type=float, default=-5.0, help="STR's initial threshold parameter s")
  parser.add_argument("--scratch_optimizer", default="sgd", help="optimizer of RigL and STR (trained from scratch)")
  parser.add_argument("--scratch_lr", type=float, default=0.0, help="their learning rate (0: --pretrain_lr)")
  parser.add_argument("--methods", default=",".join(common.METHODS), help="evaluation methods; robust = worst case")
  return parser.parse_args(argv)


def robust_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """stage='all' at `--k` (dense, HYDRA) with the run's (robust) objective; RigL and STR for the pretrain's epochs."""
  config = common.run_config(args)
  config.stage, config.ks, config.k, config.baselines = "all", (args.k,), args.k, ()
  config.stages.finetune.epochs = args.finetune_epochs
  config.stages.rigl.epochs = config.stages.str.epochs = args.pretrain_epochs
  config.baseline.rigl_delta_t, config.baseline.rigl_alpha = args.rigl_delta_t, args.rigl_alpha
  config.baseline.s_init = args.str_s_init
  config.eval.every_epochs = max(args.pretrain_epochs, args.prune_epochs, args.finetune_epochs)
  return config


def benign_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The same run with the benign objective (clean cross-entropy); evaluation settings unchanged."""
  config = robust_config(args)
  config.objective = config_lib.objective_config("benign")
  return config


def scratch_config(
  config: ml_collections.ConfigDict, stage: str, args: argparse.Namespace
) -> ml_collections.ConfigDict:
  """`config` set to run RigL or STR from scratch with `--scratch_optimizer` and `--scratch_lr`."""
  lr = args.scratch_lr or args.pretrain_lr
  return config_lib.stage_config(config, stage, **{"optimizer.name": args.scratch_optimizer, f"stages.{stage}.lr": lr})


def train_benign(config: ml_collections.ConfigDict, out: str, args: argparse.Namespace) -> list[tuple[str, str]]:
  """Trains the dense model, RigL at config.k and STR with `config`'s objective; (label, run directory) each."""
  train.run_stage(config_lib.stage_config(config, "pretrain"), os.path.join(out, "pretrain"))
  for stage in ("rigl", "str"):
    train.run_stage(scratch_config(config, stage, args), os.path.join(out, stage))
  return [
    ("dense", os.path.join(out, "pretrain")),
    ("rigl", os.path.join(out, "rigl")),
    ("str", os.path.join(out, "str")),
  ]


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  robust, benign = robust_config(args), benign_config(args)
  methods = args.methods.split(",")
  robust_dir, benign_dir = os.path.join(args.out, "trades"), os.path.join(args.out, "benign")
  pipeline.train_and_evaluate(robust, robust_dir)
  branch = os.path.join(robust_dir, f"k{args.k:g}")
  train.run_stage(scratch_config(robust, "rigl", args), os.path.join(branch, "rigl"))
  runs = [
    (args.objective, "dense", os.path.join(robust_dir, "pretrain")),
    (args.objective, "hydra", os.path.join(branch, "finetune")),
    (args.objective, "rigl", os.path.join(branch, "rigl")),
  ]
  runs += [("benign", label, workdir) for label, workdir in train_benign(benign, benign_dir, args)]
  rows = [
    {"objective": objective, "method": method, **common.evaluate_run(robust, workdir, methods)}
    for objective, method, workdir in runs
  ]
  common.write_csv(os.path.join(args.out, "rigl_rebuttal.csv"), rows)
  common.write_config(os.path.join(args.out, "config_robust.json"), robust)
  common.write_config(os.path.join(args.out, "config_benign.json"), benign)
  print(table(rows, methods))


def table(rows: list[dict], methods: list[str]) -> str:
  """Fixed-width text table of the rows, accuracies in %."""
  lines = [f"{'objective':<10} {'method':<8} " + common.accuracy_header(methods)]
  for row in rows:
    lines.append(f"{row['objective']:<10} {row['method']:<8} " + common.accuracy_cells(row, methods))
  return "\n".join(lines)


if __name__ == "__main__":
  main(sys.argv[1:])
