"""Benchmark: PGD-10 wall time with a rolled loop versus straight-line (unrolled) steps.

Run from the repository root:

  python -m benchmarks.bench_attacks            # about 1-2 minutes on a 2-core CPU
  python -m benchmarks.bench_attacks --repeats 5 --batch 32
  python -m benchmarks.bench_attacks --apgd     # adds APGD-100 on the small CNN (unrolled compile ~2.5 min)

For a small CNN and a narrow ResNet (both defined here, 32x32x3 inputs, BatchNorm in eval mode) it prints
the compile time and the median run time of `attacks.pgd` (l_inf, eps 8/255, step 2/255, 10 steps) with
`unroll=False` and `unroll=True`, and the ratio rolled / unrolled measured in the same run. This
measurement chose `attacks.DEFAULT_UNROLL`. On the 2-core CPU of the development machine (shared with
other jobs, so absolute times vary by ~20%):

  attack   model              batch  compile rolled  compile unrolled  run rolled  run unrolled  rolled/unrolled
  PGD-10   small CNN             64           3.97s             3.12s      0.420s        0.109s            3.84x
  PGD-10   narrow ResNet-18      16           7.46s             7.53s      3.419s        0.514s            6.65x
  APGD-100 small CNN             64           5.70s           116.00s      7.644s        6.681s            1.14x
"""

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from hydra_jax import attacks


class SmallCNN(nn.Module):
  """Two stride-2 convs and two dense layers (the reference's CNN-small shape, without pruning)."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Conv(16, (4, 4), strides=2)(x))
    x = nn.relu(nn.Conv(32, (4, 4), strides=2)(x))
    x = nn.relu(nn.Dense(100)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class Block(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    h = nn.relu(norm()(nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)))
    h = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(h))
    if x.shape != h.shape:
      x = norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(h + x)


class NarrowResNet(nn.Module):
  """ResNet-18 layout (2 blocks per stage, strides 1/2/2/2) with widths 16/32/64/128 and BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3), use_bias=False)(x)))
    for i, width in enumerate((16, 32, 64, 128)):
      for j in range(2):
        x = Block(width, 2 if (i > 0 and j == 0) else 1)(x, train)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def time_attack(model, batch, unroll, repeats, attack_name="pgd"):
  """Returns (compile seconds, median run seconds, XLA FLOPs) of jitted PGD-10 (or APGD-CE-100) on `model`."""
  x = jax.random.uniform(jax.random.key(0), (batch, 32, 32, 3))
  y = jnp.arange(batch) % 10
  variables = model.init(jax.random.key(1), x, train=False)

  @jax.jit
  def attack(variables, x, y, key):
    logits_fn = lambda z: model.apply(variables, z, train=False)
    if attack_name == "apgd":
      return attacks.apgd(logits_fn, x, y, key=key, eps=8 / 255, steps=100, unroll=unroll)
    return attacks.pgd(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=10, unroll=unroll)

  start = time.perf_counter()
  compiled = attack.lower(variables, x, y, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - start
  compiled(variables, x, y, jax.random.key(2)).block_until_ready()  # warm-up
  runs = []
  for r in range(repeats):
    start = time.perf_counter()
    compiled(variables, x, y, jax.random.key(3 + r)).block_until_ready()
    runs.append(time.perf_counter() - start)
  return compile_s, float(np.median(runs)), machine.compiled_flops(compiled)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=0, help="one batch size for both nets (0: 64 / 16)")
  parser.add_argument("--apgd", action="store_true", help="also time APGD-CE-100 on the small CNN")
  args = parser.parse_args()
  cases = [
    ("pgd", "small CNN", SmallCNN(), args.batch or 64),
    ("pgd", "narrow ResNet-18", NarrowResNet(), args.batch or 16),
  ]
  if args.apgd:
    cases.append(("apgd", "small CNN", SmallCNN(), args.batch or 64))
  matmul = machine.matmul_gflops()
  print(machine.header(machine.describe(), matmul))
  print(f"devices: {jax.devices()}  l_inf eps 8/255, median of {args.repeats} runs")
  print(
    f"{'attack':8s} {'model':18s} {'batch':>5s} {'compile rolled':>15s} {'compile unrolled':>17s} "
    f"{'run rolled':>11s} {'run unrolled':>13s} {'rolled/unrolled':>16s} {'roofline r/u':>12s}"
  )
  for attack_name, name, model, batch in cases:
    rolled_c, rolled, rolled_flops = time_attack(model, batch, False, args.repeats, attack_name)
    unrolled_c, unrolled, unrolled_flops = time_attack(model, batch, True, args.repeats, attack_name)
    roofline = [
      machine.roofline_fraction(f, s, matmul) for f, s in ((rolled_flops, rolled), (unrolled_flops, unrolled))
    ]
    label = {"pgd": "PGD-10", "apgd": "APGD-100"}[attack_name]
    print(
      f"{label:8s} {name:18s} {batch:5d} {rolled_c:14.2f}s {unrolled_c:16.2f}s "
      f"{rolled:10.3f}s {unrolled:12.3f}s {rolled / unrolled:15.2f}x {roofline[0]:>6.2f}/{roofline[1]:<5.2f}"
    )


if __name__ == "__main__":
  main()
