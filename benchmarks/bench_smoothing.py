"""Benchmark: randomized-smoothing noise samples per second (`smoothing.sample_counts`) against a plain forward.

Run from the repository root:

  python -m benchmarks.bench_smoothing                       # ResNet-18 and CNN-small, CIFAR shapes, batch 256
  python -m benchmarks.bench_smoothing --models resnet18 --batches 64,256 --chunks 4

For each zoo model (random weights, BatchNorm in eval mode, 32x32x3 inputs) and batch size it prints the
compile time of the counting program, the median time of one chunk (noise draw, forward, argmax, vote
count) over `--chunks` chunks, the noise samples per second, and the median time of a plain jitted forward
of an already-noisy batch of the same size (so the overhead of sampling and counting is visible).
Certifying one example with Cohen et al.'s n = 100,000 costs about 100,000 / (samples per second) seconds.

Measured with the first command on the 2-core development CPU while six other jobs ran on it (load
average ~16, so these are lower bounds of what the CPU does alone; 2026-11-25):

  model       batch   compile   s/chunk  samples/s  forward s  n=1e5 s
  resnet18      256    15.75s   13.950s       18.4    15.382s     5449
  cnn_small     256     2.77s    0.084s     3045.9     0.074s       33

For ResNet-18, sampling and counting cost nothing measurable next to the forward pass (the chunk and the
plain forward differ by less than the run-to-run spread of this shared machine). For the small CNN they
do: a second run gave 0.076 s per chunk against 0.033 s for the forward. The noise is drawn from one key per
sample (fold_in(key, i)), which makes the counts independent of the batch size; drawing 256 CIFAR-sized
noise images that way took 20 ms here against 4 ms for one draw of the whole batch, a price paid only by
models much cheaper than the ones the paper certifies.
"""

import argparse
import statistics
import time

import jax

from benchmarks import machine
from hydra_jax import models
from hydra_jax import smoothing


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(name: str, batch: int, chunks: int) -> dict[str, float]:
  """Compile seconds, seconds per chunk, samples per second and seconds per plain forward for one model."""
  model = models.get_model(name, num_classes=10)
  x = jax.random.uniform(jax.random.PRNGKey(0), (32, 32, 3))
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(1), x[None], train=False))()
  logits_fn = jax.tree_util.Partial(lambda v, z: model.apply(v, z, train=False), variables)

  def count(num):
    return smoothing.sample_counts(logits_fn, x, key=jax.random.PRNGKey(2), sigma=0.25, num=num, batch_size=batch)

  start = time.perf_counter()
  count(batch)  # compiles once; later calls of any num reuse it
  compile_seconds = time.perf_counter() - start
  chunk = _median_seconds(lambda: count(batch), chunks)
  forward = jax.jit(lambda v, z: model.apply(v, z, train=False))
  noisy = x[None] + 0.25 * jax.random.normal(jax.random.PRNGKey(3), (batch, *x.shape))
  forward(variables, noisy).block_until_ready()
  plain = _median_seconds(lambda: forward(variables, noisy), chunks)
  flops = machine.jit_flops(lambda v, z: model.apply(v, z, train=False), variables, noisy)
  return {"compile": compile_seconds, "chunk": chunk, "rate": batch / chunk, "forward": plain, "flops": flops}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet18,cnn_small")
  parser.add_argument("--batches", default="256")
  parser.add_argument("--chunks", type=int, default=3, help="timed chunks (median) per setting")
  args = parser.parse_args()
  matmul = machine.matmul_gflops()
  print(machine.header(machine.describe(), matmul))
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
  print(
    f"{'model':<10} {'batch':>6} {'compile':>9} {'s/chunk':>9} {'samples/s':>10} {'forward s':>10} {'n=1e5 s':>8} "
    f"{'roofline':>8}"
  )
  for name in args.models.split(","):
    for batch in map(int, args.batches.split(",")):
      r = bench(name, batch, args.chunks)
      roofline = machine.roofline_fraction(r["flops"], r["chunk"], matmul)
      print(
        f"{name:<10} {batch:>6} {r['compile']:>8.2f}s {r['chunk']:>8.3f}s {r['rate']:>10.1f} "
        f"{r['forward']:>9.3f}s {1e5 / r['rate']:>8.0f} {roofline:>8.2f}"
      )


if __name__ == "__main__":
  jax.config.update("jax_threefry_partitionable", False)
  main()
