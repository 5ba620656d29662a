"""The rebuttal's Table 1: HYDRA against Adv-ADMM at 99% pruning on six networks, clean and robust accuracy.

Run (the paper's setting: CIFAR-10, k = 0.01, TRADES l_inf 8/255 with PGD-10 step 2/255, 100 pretrain epochs at
lr 0.1, 20 prune epochs at lr 0.1, 100 finetune epochs at lr 0.01 (the reference scripts and
configs/adversarial.py); Adv-ADMM from the same pretrained model: 100 ADMM epochs at lr 0.01 with rho 1e-3 grown
1.3x at each Z/U update every 20 epochs, hard prune, then the same 100-epoch finetune; needs an accelerator and the
CIFAR-10 data in --data_dir):
  python -m experiments.table1 --data_dir=/data/cifar10 --out runs/table1
Reduced (the digits at their own 8x8, every network at a quarter of its channels, a short schedule; see
experiments/RESULTS.md for the exact command and its wall time on 2 CPU cores):
  python -m experiments.table1 --dataset=digits --width=0.25 --eps=0.1 --batch_size=64 --attack_steps=5 \
      --pretrain_epochs=6 --pretrain_lr=0.05 --prune_epochs=3 --finetune_epochs=3 --admm_epochs=4 \
      --admm_interval_epochs=1 --out runs/table1_digits

Per network, `stage=all` with `baselines=('admm',)` at the one k (`pipeline.train_and_evaluate`) in
`<out>/<network>`: pretrain, HYDRA's prune + finetune, and Adv-ADMM (`pipeline.run_baseline`: ADMM phase, hard
prune, finetune). Then the HYDRA and Adv-ADMM models are evaluated with `common.evaluate_run` (robust: the
per-example worst case of PGD, APGD-CE and APGD-DLR; the dense model's clean / PGD accuracy is in its run's
summary.json). Writes `<out>/table1.csv` (network, method, target_k,
kept_fraction, clean, each attack, robust) and `<out>/config_<network>.json` after each network, and prints the
table beside the paper's numbers. Rerunning resumes every stage and only re-evaluates.
"""

import argparse
import os
import sys

import ml_collections

from experiments import common
from hydra_jax import pipeline

NETWORKS = ("resnet18", "resnet34", "resnet50", "wrn_28_2", "googlenet", "mobilenet_v2")

# Rebuttal Table 1 (HYDRA, NeurIPS 2020 author response; /work/shared/reference/000_80ab6d3e5492143e.txt):
# CIFAR-10, 99% pruning, test accuracy / robust accuracy (era, PGD) in %, per network and method.
PAPER = {
  "resnet18": {"admm": (58.7, 36.1), "hydra": (69.0, 41.6)},
  "resnet34": {"admm": (68.8, 41.5), "hydra": (71.8, 44.4)},
  "resnet50": {"admm": (69.1, 42.2), "hydra": (73.9, 45.3)},
  "wrn_28_2": {"admm": (48.3, 30.9), "hydra": (54.2, 34.1)},
  "googlenet": {"admm": (53.4, 33.8), "hydra": (66.7, 40.1)},
  "mobilenet_v2": {"admm": (10.0, 10.0), "hydra": (39.7, 26.4)},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_run_flags(parser, model=False)
  parser.add_argument("--networks", default=",".join(NETWORKS), help="zoo names, comma-separated, run in order")
  parser.add_argument("--k", type=float, default=0.01, help="fraction of weights kept (0.01: 99%% pruning)")
  parser.add_argument("--finetune_epochs", type=int, default=100, help="HYDRA's finetune and Adv-ADMM's retrain")
  parser.add_argument("--admm_epochs", type=int, default=100, help="Adv-ADMM's ADMM phase")
  parser.add_argument("--admm_interval_epochs", type=int, default=20, help="epochs between ADMM's Z / U updates")
  parser.add_argument("--methods", default=",".join(common.METHODS), help="evaluation methods; robust = worst case")
  return parser.parse_args(argv)


def network_config(args: argparse.Namespace, network: str) -> ml_collections.ConfigDict:
  """stage='all' of `network` at the one k with Adv-ADMM; in-training evaluation at each stage's end only."""
  config = common.run_config(args)
  config.model.name = network
  config.stage, config.ks, config.baselines = "all", (args.k,), ("admm",)
  config.stages.finetune.epochs, config.stages.admm.epochs = args.finetune_epochs, args.admm_epochs
  config.baseline.admm_interval_epochs = args.admm_interval_epochs
  config.eval.every_epochs = max(args.pretrain_epochs, args.prune_epochs, args.finetune_epochs, args.admm_epochs)
  return config


def trained_models(workdir: str, k: float) -> list[tuple[str, str]]:
  """(method, run directory) of the HYDRA and Adv-ADMM models at `k` in `pipeline.run_pipeline`'s layout."""
  branch = os.path.join(workdir, f"k{k:g}")
  return [("hydra", os.path.join(branch, "finetune")), ("admm", os.path.join(branch, "admm", "train"))]


def run_network(args: argparse.Namespace, network: str, methods: list[str]) -> list[dict]:
  """Trains (or resumes) one network's pipeline and evaluates its two pruned models: one row each."""
  config = network_config(args, network)
  workdir = os.path.join(args.out, network)
  pipeline.train_and_evaluate(config, workdir)
  common.write_config(os.path.join(args.out, f"config_{network}.json"), config)
  return [
    {"network": network, "method": method, "target_k": args.k} | common.evaluate_run(config, run_dir, methods)
    for method, run_dir in trained_models(workdir, args.k)
  ]


def table(rows: list[dict], methods: list[str]) -> str:
  """Fixed-width text table of the rows in %, with the paper's clean / robust beside HYDRA's and Adv-ADMM's."""
  header = f"{'network':<13} {'method':<6} " + common.accuracy_header(methods)
  lines = [header + f" {'paper clean':>11} {'paper rob.':>10}"]
  for row in rows:
    paper = PAPER.get(row["network"], {}).get(row["method"])
    paper_cells = f" {paper[0]:>11.1f} {paper[1]:>10.1f}" if paper else f" {'-':>11} {'-':>10}"
    lines.append(f"{row['network']:<13} {row['method']:<6} " + common.accuracy_cells(row, methods) + paper_cells)
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  methods = args.methods.split(",")
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for network in args.networks.split(","):
    rows += run_network(args, network, methods)
    common.write_csv(os.path.join(args.out, "table1.csv"), rows)
  print(table(rows, methods))


if __name__ == "__main__":
  main(sys.argv[1:])
