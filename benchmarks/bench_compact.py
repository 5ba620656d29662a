"""Inference of the dense (masked) network against its compact form after channel pruning.

Run: python benchmarks/bench_compact.py [--models resnet18,vgg16_bn,wrn_28_4] [--pruned 0.5,0.75,0.9]
                                        [--batches 1,256] [--repeats 3] [--json FILE]

For each model and fraction of channels pruned (k = 1 - pruned in every channel group, channel LWM masks on
random He-scaled weights: the mask's values do not change the cost), jits eval-mode inference of
  dense    the full network with the pruned channels zeroed (what a masked run costs: the same as unpruned)
  compact  the network built from the channel plan, every layer with only its kept channels
(`hydra_jax.channels.compact_variables`, `models.get_model(..., channel_plan=...)`), checks that their logits
agree, and reports per batch size: median latency after compilation, parameters, the FLOPs of its matmuls and
convolutions (`machine.jaxpr_flops`: XLA's cost analysis counts the body of the CPU batch-chunk loop once) and
XLA's memory estimate (`compiled.memory_analysis()`: arguments + outputs +
temporaries), with the dense / compact ratios measured in the same run. `speedup / flop_ratio` near 1 means the
FLOP reduction turns into time. `roof d/c` is each side's FLOP rate over the float32 matmul rate measured in the
same run (`benchmarks/machine.py`, printed first with the CPU model and ISA).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from hydra_jax import baselines
from hydra_jax import channels
from hydra_jax import masking
from hydra_jax import models


def random_variables(model, x):
  """He-scaled random kernels, small random biases, BatchNorm statistics near 1 / 0 (numpy: nothing compiled)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(0)

  def value(path, leaf):
    name = masking.path_name(path)
    if name.endswith("kernel"):
      return rng.normal(size=leaf.shape) * math.sqrt(2 / math.prod(leaf.shape[:-1]))
    if name.endswith(("scale", "var")):
      return rng.uniform(0.5, 1.5, size=leaf.shape)
    return rng.normal(size=leaf.shape) * 0.1

  return jax.tree_util.tree_map_with_path(lambda p, leaf: jnp.asarray(value(p, leaf), jnp.float32), shapes)


def compiled_stats(fn, variables, x, repeats):
  """(median seconds per call, matmul + conv flops, XLA bytes: arguments + outputs + temporaries) of jitted
  fn(variables, x)."""
  compiled = jax.jit(fn).lower(variables, x).compile()
  memory = compiled.memory_analysis()
  peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
  jax.block_until_ready(compiled(variables, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times), machine.jaxpr_flops(fn, variables, x), int(peak)


def num_params(variables) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables["params"]))


def compact_network(name, model, variables, pruned):
  """(compact model, its variables, masked full variables) at `pruned` of the channels of every group."""
  x = jnp.zeros((1, *models.input_shape(name)))
  wiring = channels.trace_wiring(model, variables, x.shape)
  scores = baselines.channel_magnitude_scores(variables["params"], wiring.groups)
  k = 1.0 - pruned
  masks = jax.jit(masking.channel_masks, static_argnames=("k", "groups"))(
    variables["params"], scores, k=k, groups=wiring.groups
  )
  export = jax.jit(masking.export_dense, static_argnames=("k", "groups"))
  masked = {**variables, "params": export(variables["params"], scores, k=k, groups=wiring.groups)}
  small, plan = channels.compact_variables(wiring, masked, channels.pruned_units(wiring, masks))
  return models.get_model(name, 10, channel_plan=plan), jax.tree.map(jnp.asarray, small), masked


def bench_model(name, pruned_fractions, batches, repeats, matmul):
  model = models.get_model(name, 10)
  shape = models.input_shape(name)
  variables = random_variables(model, jnp.zeros((1, *shape)))
  dense_fn = lambda v, x: model.apply(v, x, train=False)
  rows, dense_cache = [], {}
  for pruned in pruned_fractions:
    compact, small, masked = compact_network(name, model, variables, pruned)
    compact_fn = lambda v, x, compact=compact: compact.apply(v, x, train=False)
    probe = jax.random.uniform(jax.random.key(1), (2, *shape))
    expected, got = jax.jit(dense_fn)(masked, probe), jax.jit(compact_fn)(small, probe)
    error = float(jnp.max(jnp.abs(expected - got)) / jnp.max(jnp.abs(expected)))
    for batch in batches:
      x = jax.random.uniform(jax.random.key(2), (batch, *shape))
      if batch not in dense_cache:
        dense_cache[batch] = compiled_stats(dense_fn, masked, x, repeats)
      dense_s, dense_flops, dense_bytes = dense_cache[batch]
      compact_s, compact_flops, compact_bytes = compiled_stats(compact_fn, small, x, repeats)
      rows.append(
        {
          "model": name,
          "pruned": pruned,
          "batch": batch,
          "dense_s": dense_s,
          "compact_s": compact_s,
          "speedup": dense_s / compact_s,
          "dense_params": num_params(variables),
          "compact_params": num_params(small),
          "dense_gflops": dense_flops / 1e9,
          "compact_gflops": compact_flops / 1e9,
          "flop_ratio": dense_flops / compact_flops,
          "dense_mb": dense_bytes / 2**20,
          "compact_mb": compact_bytes / 2**20,
          "max_rel_logit_error": error,
          "dense_roofline": machine.roofline_fraction(dense_flops, dense_s, matmul),
          "compact_roofline": machine.roofline_fraction(compact_flops, compact_s, matmul),
        }
      )
      print(format_table(rows[-1:], header=not rows[:-1] and name == _FIRST[0]), flush=True)
  return rows


_FIRST: list[str] = []


def format_table(rows, header=True) -> str:
  """Fixed-width table: latency (ms), speed-up, parameters (M), GFLOPs, XLA memory (MB), with dense/compact ratios."""
  head = (
    f"{'model':<10} {'pruned':>6} {'batch':>5} {'dense ms':>9} {'compact ms':>10} {'speedup':>7} "
    f"{'params M':>13} {'GFLOPs':>17} {'flop x':>6} {'spd/flop':>8} {'XLA MB':>15} {'logit err':>9} {'roof d/c':>9}"
  )
  lines = [head] if header else []
  for r in rows:
    lines.append(
      f"{r['model']:<10} {r['pruned']:>6.2f} {r['batch']:>5d} {1e3 * r['dense_s']:>9.1f} {1e3 * r['compact_s']:>10.1f} "
      f"{r['speedup']:>7.2f} {r['dense_params'] / 1e6:>6.2f}/{r['compact_params'] / 1e6:<6.2f} "
      f"{r['dense_gflops']:>8.2f}/{r['compact_gflops']:<8.2f} {r['flop_ratio']:>6.2f} "
      f"{r['speedup'] / r['flop_ratio']:>8.2f} {r['dense_mb']:>7.1f}/{r['compact_mb']:<7.1f} "
      f"{r['max_rel_logit_error']:>9.1e} {r['dense_roofline']:>4.2f}/{r['compact_roofline']:<4.2f}"
    )
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet18,vgg16_bn,wrn_28_4")
  parser.add_argument("--pruned", default="0.5,0.75,0.9", help="fractions of channels pruned per group")
  parser.add_argument("--batches", default="1,256")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="", help="also write the rows to this file")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  names = args.models.split(",")
  _FIRST[:] = names[:1]
  matmul = machine.matmul_gflops()
  print(machine.header(machine.describe(), matmul))
  rows = []
  for name in names:
    rows += bench_model(
      name,
      [float(p) for p in args.pruned.split(",")],
      [int(b) for b in args.batches.split(",")],
      args.repeats,
      matmul,
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
