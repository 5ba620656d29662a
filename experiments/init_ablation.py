"""The rebuttal's Fig. 1: prune-stage loss and mean |score gradient| per step, scaled score init vs six others.

Run (the paper's setting: CIFAR-10, 99% pruning; VGG16-BN, the reference's default network, since the rebuttal
does not name one; 100 pretrain epochs, a 20-epoch prune stage; needs an accelerator and the CIFAR-10 data):
  python -m experiments.init_ablation --out runs/init_ablation
Reduced (the digits upsampled to 16x16, CNN-small, 200 prune steps; minutes on 2 CPU cores):
  python -m experiments.init_ablation --dataset=digits --image_size=16 --model=cnn_small --eps=0.1 --batch_size=64 \
      --pretrain_epochs=15 --pretrain_lr=0.05 --prune_epochs=10 --steps=200 --every=10 --out runs/init_ablation_digits

One pretrain run (`<out>/pretrain`, or `--pretrain_dir`), then one prune stage per init (`<out>/<init>`,
`stages.prune.score_init`) from it, all at the same k, batches and seed. Every `--every` steps the run logs its
mean train loss (metrics.jsonl) and saves a checkpoint; from each checkpoint the mean |dL/ds| over all scores is
computed on the batch the run trains on next, with the run's objective (`score_gradient_fn`). Writes
`<out>/init_ablation.csv` (init, step, loss, score_grad) and `<out>/init_ablation.png`. Rerunning resumes every run
from its checkpoints. Every checkpoint is kept (steps / every copies of the weights and scores per init: choose
`--every` with the disk in mind at full scale).
"""

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections

from experiments import common
from hydra_jax import checkpoints
from hydra_jax import config as config_lib
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import sources
from hydra_jax import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# The rebuttal's seven initialisations, all in masking.SCORE_INITS.
INITS = ("scaled", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "dirac", "orthogonal")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_run_flags(parser)
  parser.add_argument("--k", type=float, default=0.01, help="fraction of weights kept (0.01: 99%% pruning)")
  parser.add_argument("--steps", type=int, default=0, help="prune steps per init (0: the whole prune stage)")
  parser.add_argument("--every", type=int, default=50, help="log, checkpoint and score gradient every N steps")
  parser.add_argument("--inits", default=",".join(INITS), help="comma-separated masking.SCORE_INITS names")
  parser.add_argument("--pretrain_dir", default="", help="a finished pretrain run to prune (default: <out>/pretrain)")
  return parser.parse_args(argv)


def base_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The run config shared by the pretrain and every prune run."""
  config = common.run_config(args)
  config.k = args.k
  config.eval.every_epochs = max(args.pretrain_epochs, args.prune_epochs)  # evaluate at each stage's end only
  return config


def prune_config(
  config: ml_collections.ConfigDict, pretrain_dir: str, init: str, steps: int, every: int
) -> ml_collections.ConfigDict:
  """A prune stage from `pretrain_dir` with scores from `init`, logging and saving every `every` steps."""
  return config_lib.stage_config(
    config,
    "prune",
    source=pretrain_dir,
    stop_after_steps=steps,
    **{
      "stages.prune.score_init": init,
      "log.every_steps": every,
      "checkpoint.every_steps": every,
      "checkpoint.keep": 1_000_000,
    },
  )


def train_losses(workdir: str) -> dict[int, float]:
  """{step: mean train loss since the previous record} from a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def restore_model(config: ml_collections.ConfigDict, workdir: str, step: int) -> dict:
  """{'params', 'batch_stats', 'scores'} of the prune run's checkpoint at `step`."""
  template = jax.eval_shape(lambda: sources.init_variables(config, jax.random.key(0)))
  scores = jax.eval_shape(lambda p: masking.init_scores(p, "uniform", jax.random.key(0)), template["params"])
  abstract = {"params": template["params"], "batch_stats": template.get("batch_stats", {}), "scores": scores}
  items, _ = checkpoints.restore(workdir, {"model": abstract}, step)
  return items["model"]


def score_gradient_fn(config: ml_collections.ConfigDict) -> Callable[[dict, dict, jax.Array], jax.Array]:
  """A jitted `(model, batch, key) -> mean over all scores of |dL/ds|`: L the run's objective on `batch` with the
  model run as in training, `apply_masks(params, scores, k)` (straight-through gradient to the scores)."""
  apply_fn = models.make_apply_fn(sources.build_model(config))
  objective = objectives.get_objective(config.objective.name)

  @jax.jit
  def mean_abs_grad(model, batch, key):
    carry = () if objective.init_carry is None else objective.init_carry(batch["image"].shape, config.objective)

    def loss(scores):
      params = masking.apply_masks(model["params"], scores, config.k)
      variables = sources.model_variables(params, model["batch_stats"])
      return sources.objective_loss(objective, config, apply_fn, variables, batch, key, carry, jnp.float32(0))[0]

    grads = jax.tree.leaves(jax.grad(loss)(model["scores"]))
    return jnp.mean(jnp.abs(jnp.concatenate([g.ravel() for g in grads])))

  return mean_abs_grad


def ablate_init(
  config: ml_collections.ConfigDict, pretrain_dir: str, workdir: str, init: str, steps: int, every: int
) -> list[dict]:
  """Runs one init's prune stage and returns its rows {init, step, loss, score_grad}, by step."""
  run_config = prune_config(config, pretrain_dir, init, steps, every)
  train.run_stage(run_config, workdir)
  batches = sources.train_batches(run_config)
  score_gradient = score_gradient_fn(run_config)
  rows = []
  with config_lib.prng_scope(run_config):
    for step, loss in sorted(train_losses(workdir).items()):
      model = restore_model(run_config, workdir, step)
      batch = {name: jnp.asarray(value) for name, value in batches.batch_at(step).items()}
      grad = score_gradient(model, batch, jax.random.fold_in(jax.random.key(config.seed), step))
      rows.append({"init": init, "step": step, "loss": loss, "score_grad": float(grad)})
  return rows


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["init", "step", "loss", "score_grad"])
    writer.writeheader()
    writer.writerows(rows)


def plot(rows: list[dict], path: str, title: str) -> None:
  """Loss (left) and mean |score gradient| (right, log scale) per prune step, one line per init."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for init in dict.fromkeys(r["init"] for r in rows):
    mine = [r for r in rows if r["init"] == init]
    steps = [r["step"] for r in mine]
    axes[0].plot(steps, [r["loss"] for r in mine], label=init)
    axes[1].plot(steps, [r["score_grad"] for r in mine], label=init)
  axes[0].set(xlabel="prune step", ylabel="train loss")
  axes[1].set(xlabel="prune step", ylabel="mean |dL/d score|", yscale="log")
  axes[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  config = base_config(args)
  pretrain_dir = args.pretrain_dir or os.path.join(args.out, "pretrain")
  if not args.pretrain_dir:
    train.run_stage(config_lib.stage_config(config, "pretrain"), pretrain_dir)
  rows = []
  for init in args.inits.split(","):
    rows += ablate_init(config, pretrain_dir, os.path.join(args.out, init), init, args.steps, args.every)
  write_csv(rows, os.path.join(args.out, "init_ablation.csv"))
  plot(rows, os.path.join(args.out, "init_ablation.png"), f"{args.model} on {args.dataset}, k = {args.k}")
  finals = {init: [r for r in rows if r["init"] == init][-1] for init in dict.fromkeys(r["init"] for r in rows)}
  for init, row in sorted(finals.items(), key=lambda item: item[1]["loss"]):
    print(f"{init:<16} step {row['step']:>6}  loss {row['loss']:.4f}  mean |dL/ds| {row['score_grad']:.3e}")


if __name__ == "__main__":
  main(sys.argv[1:])
