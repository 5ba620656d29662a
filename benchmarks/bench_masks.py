"""Cost of computing HYDRA's per-layer top-k masks for every kernel of a zoo model (default CIFAR ResNet-18).

Run: python benchmarks/bench_masks.py [--model resnet18] [--k 0.01] [--repeats 5]

Compares, in one jit over all kernels (ResNet-18: 21 kernels, 11.2M scores), three ways to get the exact
per-layer mask:
  bisection   hydra_jax.masking.topk_mask: 31 O(n) passes on the int32 bit pattern of |s| (the library's)
  argsort     a full jnp.argsort of |s| and a scatter of the kept positions (the sort the reference does)
  lax.top_k   jax.lax.top_k of the kept count, then a scatter
and prints median wall time per call (after compilation) and its ratio against argsort in the same run.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import machine
from hydra_jax import masking
from hydra_jax import models


def kernel_shapes(model_name: str) -> list[tuple[int, ...]]:
  """Shapes of the prunable kernels of a zoo model (from jax.eval_shape: nothing is allocated)."""
  model = models.get_model(model_name, 10)
  x = jnp.zeros((1, *models.input_shape(model_name)))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))["params"]
  return [
    leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if masking.is_prunable(path, leaf)
  ]


def _scatter_keep(abs_scores, kept_index):
  flat = jnp.zeros(abs_scores.size, abs_scores.dtype).at[kept_index].set(1)
  return flat.reshape(abs_scores.shape)


def argsort_mask(scores, k):
  order = jnp.argsort(jnp.abs(scores).ravel(), stable=True)
  return _scatter_keep(scores, order[masking.num_pruned(scores.size, k) :])


def lax_top_k_mask(scores, k):
  kept = scores.size - masking.num_pruned(scores.size, k)
  return _scatter_keep(scores, jax.lax.top_k(jnp.abs(scores).ravel(), kept)[1])


def time_call(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--k", type=float, default=0.01)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--model", default="resnet18", help="zoo model whose kernels are masked")
  args = parser.parse_args()
  shapes = kernel_shapes(args.model)
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
  scores = [jax.random.normal(key, shape) for key, shape in zip(keys, shapes)]
  n = sum(s.size for s in scores)
  methods = {"argsort": argsort_mask, "lax.top_k": lax_top_k_mask, "bisection": masking.topk_mask}
  masks = {name: jax.jit(lambda ss, f=f: [f(s, args.k) for s in ss]) for name, f in methods.items()}
  reference = masks["argsort"](scores)
  # The bisection must equal the stable sort exactly (float32 |s| has ties at this size: +-x, repeats);
  # lax.top_k breaks ties its own way, so only its kept counts are checked.
  assert all(bool((a == b).all()) for a, b in zip(masks["bisection"](scores), reference))
  assert all(int(a.sum()) == int(b.sum()) for a, b in zip(masks["lax.top_k"](scores), reference))
  timings = {name: time_call(fn, scores, repeats=args.repeats) for name, fn in masks.items()}
  print(machine.header(machine.describe(), machine.matmul_gflops()))
  print(f"{args.model} kernels: {len(scores)} arrays, {n:,} scores, k={args.k}, backend={jax.default_backend()}")
  print(f"{'method':<12} {'seconds':>9} {'vs argsort':>11}")
  for name, seconds in timings.items():
    print(f"{name:<12} {seconds:>9.4f} {timings['argsort'] / seconds:>10.1f}x")


if __name__ == "__main__":
  main()
