"""Cost of verified bounds relative to a forward pass, each jitted, on a zoo model (default CNN-large, CIFAR).

Run: python benchmarks/bench_bounds.py [--model cnn_large] [--batch 128] [--repeats 5] [--symbolic-batch 0]

Times, after compilation, the median wall time of one call of
  forward     f(x), the model's eval-mode logits
  ibp         hydra_jax.bounds.ibp with the margin spec [B, 9, 10]
  crown_ibp   hydra_jax.bounds.crown_ibp (lower bound only, as CROWN-IBP training uses it)
  ibp+crown   hydra_jax.bounds.ibp_and_crown_lower (what the crown_ibp objective computes while beta > 0)
  symbolic    hydra_jax.bounds.symbolic_interval on the first --symbolic-batch examples (0: skipped). Its dense
              generators take batch * (inputs + ReLU widths) * layer width floats: cnn_small at batch 1 runs in
              about a second; cnn_large at batch 1 needs more than 10 GB (32768^2 error generators after its
              first ReLU), so leave it out there
and prints them with their ratio to the forward pass of the same batch (timed round-robin, medians).
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from hydra_jax import bounds
from hydra_jax import models


def time_calls(calls: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each `calls[name]()` after one compiling call, timed round-robin so that a change of load
  on a shared machine hits every entry alike."""
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def run(model_name: str, batch: int, repeats: int, symbolic_batch: int, eps: float = 2 / 255) -> list[tuple]:
  """[(name, batch, seconds, ratio to the forward pass of that batch)] for the model's random init."""
  model = models.get_model(model_name, 10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(batch, *models.input_shape(model_name))), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  f = lambda v: model.apply(variables, v, train=False)
  lower, upper = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
  spec = bounds.margin_spec(y, 10)
  methods = {
    "ibp": lambda lo, hi, c: bounds.ibp(f, lo, hi, c)[0],
    "crown_ibp": lambda lo, hi, c: bounds.crown_ibp(f, lo, hi, c)[0],
    "ibp+crown": lambda lo, hi, c: bounds.ibp_and_crown_lower(f, lo, hi, c),
  }
  forward = jax.jit(f)
  calls = {"forward": functools.partial(forward, x)}
  calls.update({name: functools.partial(jax.jit(method), lower, upper, spec) for name, method in methods.items()})
  seconds = time_calls(calls, repeats)
  rows = [(name, batch, seconds[name], seconds[name] / seconds["forward"]) for name in calls]
  if symbolic_batch:
    symbolic = jax.jit(lambda lo, hi, c: bounds.symbolic_interval(f, lo, hi, c)[0])
    small = slice(0, symbolic_batch)
    seconds = time_calls(
      {
        "forward": functools.partial(forward, x[small]),
        "symbolic": functools.partial(symbolic, lower[small], upper[small], spec[small]),
      },
      repeats,
    )
    rows += [(name, symbolic_batch, seconds[name], seconds[name] / seconds["forward"]) for name in seconds]
  return rows


def table(rows: list[tuple], model_name: str, device: str) -> str:
  lines = [f"model {model_name}, device {device}", f"{'method':<10} {'batch':>5} {'ms':>10} {'x forward':>9}"]
  lines += [f"{name:<10} {batch:>5} {1e3 * seconds:>10.2f} {ratio:>9.2f}" for name, batch, seconds, ratio in rows]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cnn_large")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--symbolic-batch", type=int, default=0)
  args = parser.parse_args(argv)
  rows = run(args.model, args.batch, args.repeats, args.symbolic_batch)
  print(machine.header(machine.describe(), machine.matmul_gflops()))
  print(table(rows, args.model, jax.devices()[0].device_kind))


if __name__ == "__main__":
  main()
