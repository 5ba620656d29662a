"""Cost of computing HYDRA's per-layer top-k masks for every kernel of a CIFAR ResNet-18.

Run: python benchmarks/bench_masks.py [--k 0.01] [--repeats 5]

Compares, in one jit over all 21 kernels (11.2M scores), three ways to get the exact per-layer mask:
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

from hydra_jax import masking


def resnet18_kernel_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """HWIO shapes of the 21 conv/dense kernels of the CIFAR ResNet-18 (kuangliu layout)."""
    shapes, width_in = [(3, 3, 3, 64)], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = width_in if block == 0 else width
            shapes += [(3, 3, first_in, width), (3, 3, width, width)]
            if block == 0 and (stride != 1 or first_in != width):
                shapes.append((1, 1, first_in, width))
        width_in = width
    return shapes + [(512, num_classes)]


def _scatter_keep(abs_scores, kept_index):
    flat = jnp.zeros(abs_scores.size, abs_scores.dtype).at[kept_index].set(1)
    return flat.reshape(abs_scores.shape)


def argsort_mask(scores, k):
    order = jnp.argsort(jnp.abs(scores).ravel(), stable=True)
    return _scatter_keep(scores, order[masking.num_pruned(scores.size, k):])


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
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 32)
    scores = [jax.random.normal(key, shape) for key, shape in zip(keys, resnet18_kernel_shapes())]
    n = sum(s.size for s in scores)
    methods = {"argsort": argsort_mask, "lax.top_k": lax_top_k_mask, "bisection": masking.topk_mask}
    masks = {name: jax.jit(lambda ss, f=f: [f(s, args.k) for s in ss]) for name, f in methods.items()}
    reference = masks["argsort"](scores)
    for name, fn in masks.items():  # the three must agree exactly (distinct random scores: no ties)
        assert all(bool((a == b).all()) for a, b in zip(fn(scores), reference)), name
    timings = {name: time_call(fn, scores, repeats=args.repeats) for name, fn in masks.items()}
    print(f"ResNet-18 kernels: {len(scores)} arrays, {n:,} scores, k={args.k}, backend={jax.default_backend()}")
    print(f"{'method':<12} {'seconds':>9} {'vs argsort':>11}")
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:>9.4f} {timings['argsort'] / seconds:>10.1f}x")


if __name__ == "__main__":
    main()
