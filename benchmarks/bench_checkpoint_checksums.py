"""What the checkpoint checksums cost: save and restore time of a ResNet-18 prune-stage checkpoint with and
without them.

Run: python benchmarks/bench_checkpoint_checksums.py [--model resnet18] [--repeats 3] [--dir /tmp/bench_ckpt]

The checkpoint is what the train loop saves in the prune stage (CIFAR ResNet-18: 11.2M weights, as many scores,
BatchNorm statistics, SGD momentum over weights and scores, step and rng: 179 MB of float32), with random values
(incompressible, as trained weights are). Both columns use the library's `checkpoints.Checkpoints.save` /
`checkpoints.restore` path and the same orbax options (synchronous save, OCDBT):
  with       as the library saves now: CRC-32 of every array (and of the meta and sparsity JSON) in a `checksums`
             item of the save; the restore recomputes and compares them for every array it reads
  without    the same save without the `checksums` item, which the library reads back unchecked (as it does a
             step written before checksums existed)
and `checksum only` times `checkpoints.checksums` alone (hashing the host arrays). Prints the median wall time of
`--repeats` saves (each to a new step, on the `--dir` file system, after one untimed warm-up) and restores.
"""

import argparse
import json
import os
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import machine
from hydra_jax import checkpoints
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import parallel


def prune_state(model_name: str):
  """Host (numpy) items shaped like a prune-stage save of `model_name`, with random values."""
  model = models.get_model(model_name, 10)
  x = jnp.zeros((1, *models.input_shape(model_name)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(0)
  fill = lambda s: rng.standard_normal(s.shape, dtype=np.float32)  # noqa: E731
  params = jax.tree.map(fill, shapes["params"])
  scores = jax.tree_util.tree_map_with_path(
    lambda p, s: fill(s) if masking.is_prunable(p, s) else None, shapes["params"]
  )
  model_item = {"params": params, "batch_stats": jax.tree.map(fill, shapes.get("batch_stats", {})), "scores": scores}
  momentum = {"params": jax.tree.map(fill, shapes["params"]), "scores": jax.tree.map(lambda s: fill(s), scores)}
  train_item = {"step": np.int32(1), "opt_state": momentum, "rng": np.array([0, 1], np.uint32)}
  return {"model": model_item, "train": train_item}


def save_without_checksums(directory, step, items, meta, sparsity):
  """The library's save (same manager options and items) minus the `checksums` item."""
  manager = checkpoints._manager(directory, 100, False, None)  # pylint: disable=protected-access
  args = ocp.args.Composite(
    meta=ocp.args.JsonSave(meta),
    sparsity=ocp.args.JsonSave(json.loads(sparsity)),
    **{name: ocp.args.StandardSave(parallel.one_copy_per_process(item)) for name, item in items.items()},
  )
  manager.save(step, args=args)
  manager.wait_until_finished()
  manager.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default="/tmp/bench_ckpt")
  args = parser.parse_args()
  items = prune_state(args.model)
  size = sum(x.nbytes for x in jax.tree.leaves(items))
  abstract = jax.eval_shape(lambda: items)
  meta, sparsity = {"model": args.model, "stage": "prune"}, json.dumps({"kept": 1, "total": 2})
  times = {key: [] for key in ("with_save", "with_restore", "without_save", "without_restore", "checksum")}
  for variant in ("with", "without"):
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    for step in range(args.repeats + 1):  # step 0: a warm-up (first compiles and opens), not timed
      start = time.perf_counter()
      if variant == "with":
        ckpt = checkpoints.Checkpoints(args.dir, keep=100, async_save=False, best_metric=None)
        ckpt.save(step, items, meta=meta, sparsity=sparsity)
        ckpt.close()
      else:
        save_without_checksums(os.path.join(args.dir, "checkpoints"), step, items, meta, sparsity)
      saved = time.perf_counter() - start
      start = time.perf_counter()
      restored, _ = checkpoints.restore(args.dir, abstract, step)
      jax.block_until_ready(restored)
      if step:
        times[f"{variant}_save"].append(saved)
        times[f"{variant}_restore"].append(time.perf_counter() - start)
  for _ in range(args.repeats):
    start = time.perf_counter()
    checkpoints.checksums(items, meta, json.loads(sparsity))
    times["checksum"].append(time.perf_counter() - start)
  shutil.rmtree(args.dir, ignore_errors=True)
  median = {key: statistics.median(value) for key, value in times.items()}
  print(machine.header(machine.describe(), machine.matmul_gflops()))
  print(
    f"{args.model} prune-stage checkpoint: {size / 1e6:.0f} MB, {len(jax.tree.leaves(items))} arrays; "
    f"median of {args.repeats}, {jax.devices()[0].platform}"
  )
  print("| | without checksums | with checksums | difference |")
  print("|---|---|---|---|")
  for what in ("save", "restore"):
    a, b = median[f"without_{what}"], median[f"with_{what}"]
    print(f"| {what} | {a:.2f} s | {b:.2f} s | {b - a:+.2f} s ({(b - a) / a:+.0%}) |")
  print(f"| checksum only (`checkpoints.checksums`) | | {median['checksum']:.2f} s | |")


if __name__ == "__main__":
  main()
