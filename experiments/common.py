"""Flags, the run config and the evaluation / CSV helpers shared by the experiment scripts (`init_ablation.py`,
`baselines.py`, `table1.py`).

Not run by itself; the defaults are the reference's CIFAR-10 setting (VGG16-BN, TRADES, l_inf 8/255, 100
pretrain epochs at lr 0.1, 20 prune epochs).
"""

import argparse
import csv
import json
import os

import ml_collections

from hydra_jax import config as config_lib
from hydra_jax import export

# The attacks whose per-example worst case is every experiment's robust accuracy.
METHODS = ("pgd_linf", "apgd_ce", "apgd_dlr")


def add_run_flags(parser: argparse.ArgumentParser, model: bool = True) -> None:
  """The flags that choose the model (unless `model` is False), data, objective and stage lengths of the runs."""
  parser.add_argument("--out", required=True, help="output directory (run directories, CSV, PNG)")
  if model:
    parser.add_argument("--model", default="vgg16_bn")
  parser.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (models.get_model)")
  parser.add_argument("--dataset", default="cifar10")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--image_size", type=int, default=0, help="0: the dataset's own size")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--objective", default="trades")
  parser.add_argument("--eps", type=float, default=8 / 255, help="l_inf radius of training, on [0, 1] pixels")
  parser.add_argument("--attack_steps", type=int, default=10, help="PGD steps of training and in-training eval")
  parser.add_argument("--pretrain_epochs", type=int, default=100)
  parser.add_argument("--pretrain_lr", type=float, default=0.1)
  parser.add_argument("--prune_epochs", type=int, default=20)
  parser.add_argument("--seed", type=int, default=1234)


def run_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """A `hydra_jax.config` run config from the flags of `add_run_flags` (step size eps / 4)."""
  config = config_lib.default_config()
  config.seed = args.seed
  config.model.name, config.model.width = getattr(args, "model", config.model.name), args.width
  config.data.name, config.data.data_dir, config.data.image_size = args.dataset, args.data_dir, args.image_size
  config.data.batch_size = args.batch_size
  config.objective = config_lib.objective_config(args.objective)
  for section in (config.objective, config.eval):
    section.eps, section.step_size, section.steps = args.eps, args.eps / 4, args.attack_steps
  config.stages.pretrain.epochs, config.stages.pretrain.lr = args.pretrain_epochs, args.pretrain_lr
  config.stages.prune.epochs = args.prune_epochs
  config.checkpoint.async_save = False
  return config


def kept_fraction(workdir: str) -> float:
  """The kept fraction of a finished run, from its summary.json (counted on the weights it runs with)."""
  with open(os.path.join(workdir, "summary.json")) as f:
    return float(json.load(f)["kept_fraction"])


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, methods: list[str]) -> dict[str, float]:
  """kept_fraction, clean and each method's accuracy of a finished run, and robust: their per-example worst case.

  Accuracies are fractions in [0, 1] on the eval split (`export.evaluate_checkpoint`, the latest checkpoint).
  """
  results = export.evaluate_checkpoint(config, workdir, methods=methods, progress=False)
  return {"kept_fraction": kept_fraction(workdir), **{name: results[name] for name in ("clean", *methods, "robust")}}


def accuracy_header(methods: list[str]) -> str:
  """Header of `accuracy_cells`: kept %, clean, each method, robust."""
  return f"{'kept %':>7} " + " ".join(f"{n:>9}" for n in ("clean", *methods, "robust"))


def accuracy_cells(row: dict, methods: list[str]) -> str:
  """A row of `evaluate_run` as fixed-width cells in %: kept fraction, clean, each method, robust."""
  return f"{100 * row['kept_fraction']:>7.2f} " + " ".join(
    f"{100 * row[n]:>9.2f}" for n in ("clean", *methods, "robust")
  )


def write_csv(path: str, rows: list[dict]) -> None:
  """The rows (dicts with the same keys, in order) as a CSV file with a header."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def write_config(path: str, config: ml_collections.ConfigDict) -> None:
  """The resolved run config as JSON, to keep beside a results table."""
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
