"""The CPU fast paths on each ISA: the prune step and APGD with each knob on and off, natively and with XLA's
generated code capped at AVX2, against PyTorch in the same process.

Run: python -m benchmarks.bench_isa [--model resnet18] [--batch 64] [--attack-steps 3] [--apgd-steps 10]
                                    [--repeats 2] [--settings native,avx2] [--variants default] [--json FILE]
     python -m benchmarks.bench_isa --merge native.json,avx2.json   # one table from runs of one setting each

Each ISA setting runs in its own process (XLA_FLAGS must be set before jax is imported):
  native  this CPU as it is;
  avx2    XLA_FLAGS=--xla_cpu_max_isa=AVX2 and ATEN_CPU_CAPABILITY=avx2, so that both XLA's generated code and
          PyTorch's ATen kernels use AVX2 at most. An emulation of an AVX2 machine: library kernels XLA calls
          (its matmul / convolution runtimes) and oneDNN inside PyTorch may still dispatch on the real CPU, and
          the caches, memory bandwidth and clock stay this machine's.
In each process, after one warm-up call each, `--repeats` rounds alternate (`bench_vs_torch.interleaved`):
  prune/default          the hydra_jax prune-stage TRADES step as users get it (`bench_vs_torch.jax_step_setup`)
  prune/conv_chunk=off   every Conv2d on the whole batch (`backend_knobs` row's conv_batch_chunk 0)
  prune/attack_chunk=off the TRADES attack on the whole batch (attack_chunk_size = batch)
  prune/weight_grad=xla  no per-tap kernel gradients (`Conv2d(weight_grad="xla")`; the default's program where
                         the machine's `backend_knobs` row has taps_weight_grad False, e.g. under the AVX2 cap)
  prune/input_grad=xla   autodiff's own input-gradient convolution instead of `layers.input_grad`
  prune/torch            the original HYDRA step (`benchmarks/torch_hydra.py`)
  apgd/default, apgd/chunks=off (convs and attack on the whole batch), apgd/input_grad=xla, apgd/torch
                         APGD-CE-(--apgd-steps) on the masked model; torch: torchattacks' APGD (CE, one restart)
  matmul                 the float32 2048^3 matmul, the roofline (benchmarks/machine.py)
and prints per row the median seconds, the ratio default / row (> 1: the row is faster than the default), the
speed-up over torch (torch / row) and the fraction of the roofline (matmul and convolution FLOPs counted from
the jaxpr, `machine.jaxpr_flops`, / seconds / matmul rate).
Every ratio is within one process; rows of different settings compare only through those ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

SETTINGS = {
  "native": {},
  "avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
PRUNE_VARIANTS = ("default", "conv_chunk=off", "attack_chunk=off", "weight_grad=xla", "input_grad=xla")
APGD_VARIANTS = ("default", "chunks=off", "input_grad=xla")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--attack-steps", type=int, default=3, help="TRADES attack steps of the prune step")
  parser.add_argument("--apgd-steps", type=int, default=10)
  parser.add_argument("--k", type=float, default=0.01)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--settings", default="native,avx2", help=f"comma-separated of {', '.join(SETTINGS)}")
  parser.add_argument("--workloads", default="prune,apgd")
  parser.add_argument(
    "--variants",
    default=",".join(dict.fromkeys(PRUNE_VARIANTS + APGD_VARIANTS)),
    help="comma-separated rows to time besides torch's ('default' always; 'default' alone: the speed table)",
  )
  parser.add_argument("--json", default="")
  parser.add_argument("--merge", default="", help="comma-separated --json files of earlier runs: print one table")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  unknown = set(args.settings.split(",")) - set(SETTINGS)
  if unknown:
    parser.error(f"unknown settings {sorted(unknown)}; valid: {', '.join(SETTINGS)}")
  unknown = set(args.variants.split(",")) - set(PRUNE_VARIANTS + APGD_VARIANTS)
  if unknown:
    parser.error(
      f"unknown variants {sorted(unknown)}; valid: {', '.join(dict.fromkeys(PRUNE_VARIANTS + APGD_VARIANTS))}"
    )
  return args


def chosen(variants: tuple[str, ...], args: argparse.Namespace) -> list[str]:
  """The workload's `variants` that --variants names, 'default' always first."""
  return ["default", *(v for v in variants[1:] if v in args.variants.split(","))]


# ----------------------------------------------------------------------------------------------------------
# One setting, in this process (jax imported here, after the parent set XLA_FLAGS).


@contextlib.contextmanager
def knob(variant: str, batch: int):
  """The library patched for `variant` while a program is traced and compiled (compiled programs keep it): the
  chunk knobs by editing this machine's row of `backend_knobs.KNOBS`, as the library reads them."""
  import dataclasses
  from unittest import mock

  import jax
  import jax.numpy as jnp

  from hydra_jax import backend_knobs
  from hydra_jax.models import layers

  def autodiff_input_grad(g, kernel, x_shape, stride, padding):
    conv = lambda x: layers.xla_conv(x, kernel, stride, padding)
    return jax.vjp(conv, jnp.zeros(x_shape, g.dtype))[1](g)[0]

  def row(**changes):
    knobs = dataclasses.replace(backend_knobs.current(), **changes)
    return mock.patch.dict(backend_knobs.KNOBS, {backend_knobs.row(): knobs})

  conv2d = layers.conv2d
  patches = {
    "default": [],
    "conv_chunk=off": [row(conv_batch_chunk=0)],
    "chunks=off": [row(conv_batch_chunk=0, attack_chunk=0)],
    "attack_chunk=off": [row(attack_chunk=batch)],
    "weight_grad=xla": [mock.patch.object(layers, "conv2d", lambda *a: conv2d(*a[:5], "xla", *a[6:]))],
    "input_grad=xla": [mock.patch.object(layers, "input_grad", autodiff_input_grad)],
  }[variant]
  with contextlib.ExitStack() as stack:
    for patch in patches:
      stack.enter_context(patch)
    yield


def prune_side(args, variant: str, host_batch: dict) -> dict:
  """`bench_vs_torch.jax_step_setup`'s dict ('compiled', 'call', ...) of the prune step traced under `variant`."""
  from benchmarks import bench_vs_torch as bvt

  with knob(variant, args.batch):
    return bvt.jax_step_setup(args.model, "prune", args.k, host_batch, args.attack_steps)


def prune_calls(args) -> tuple[dict, dict]:
  """({row: call}, {row: XLA flops}) of the prune-step variants and the torch step."""
  from benchmarks import bench_vs_torch as bvt
  from benchmarks import machine

  host_batch = bvt.random_batch(args.batch)
  calls, flops = {}, {}
  for variant in chosen(PRUNE_VARIANTS, args):
    side = prune_side(args, variant, host_batch)
    calls[f"prune/{variant}"] = side["call"]
    if variant == "default":  # the variants do the same matmuls and convolutions
      step = bvt.jax_train_step(side["apply_fn"], side["trainable"], "prune", args.k, args.attack_steps, True)[0]
      count = machine.jaxpr_flops(step, *side["state"], side["batch"], side["key"])
    flops[f"prune/{variant}"] = count
  calls["prune/torch"] = bvt.torch_step_call(args.model, "prune", args.k, host_batch, args.attack_steps)
  return calls, flops


def apgd_attack(args, host_batch: dict) -> tuple:
  """(attack, (x, y, key)): APGD-CE-(--apgd-steps) on the masked model, `attack(x, y, key)` -> adversarial
  images [B, 32, 32, 3], and its inputs on the device."""
  import jax

  from benchmarks import bench_vs_torch as bvt
  from hydra_jax import attacks

  logits_fn = bvt.masked_logits_fn(args.model, args.batch, args.k)
  x, y, key = jax.device_put(host_batch["image"]), jax.device_put(host_batch["label"]), jax.random.key(3)
  attack = lambda x, y, key: attacks.apgd(
    attacks.in_chunks(logits_fn, 0), x, y, key=key, eps=8 / 255, steps=args.apgd_steps
  )
  return attack, (x, y, key)


def apgd_compiled(attack, inputs: tuple, variant: str, batch: int):
  """`attack` compiled for `inputs` under `variant`'s knobs."""
  import jax

  with knob(variant, batch):
    return jax.jit(attack).lower(*inputs).compile()


def torch_apgd_call(args, host_batch: dict):
  """A call running torchattacks' APGD-CE (one restart) on the reference's masked model."""
  import torch
  import torchattacks

  from benchmarks import torch_hydra

  net = torch_hydra.prepare(torch_hydra.build(args.model), "finetune", args.k).eval()
  images, labels = (
    torch.from_numpy(host_batch["image"].transpose(0, 3, 1, 2).copy()),
    torch.from_numpy(host_batch["label"].astype("int64")),
  )
  apgd = torchattacks.APGD(net, eps=8 / 255, steps=args.apgd_steps, n_restarts=1, loss="ce", seed=0)
  return lambda: apgd(images, labels)


def apgd_calls(args) -> tuple[dict, dict]:
  """({row: call}, {row: XLA flops}) of APGD-CE on the masked model, each variant, and torchattacks' APGD."""
  from benchmarks import bench_vs_torch as bvt
  from benchmarks import machine

  host_batch = bvt.random_batch(args.batch)
  attack, inputs = apgd_attack(args, host_batch)
  calls, count = {}, machine.jaxpr_flops(attack, *inputs)
  flops = {f"apgd/{variant}": count for variant in chosen(APGD_VARIANTS, args)}
  for variant in chosen(APGD_VARIANTS, args):
    compiled = apgd_compiled(attack, inputs, variant, args.batch)
    calls[f"apgd/{variant}"] = lambda compiled=compiled: compiled(*inputs).block_until_ready()
  calls["apgd/torch"] = torch_apgd_call(args, host_batch)
  return calls, flops


def run_setting(args) -> dict:
  """Times every row of this process's setting; returns {'machine', 'matmul_gflops', 'rows': {row: {...}}}."""
  import jax

  from benchmarks import bench_vs_torch as bvt
  from benchmarks import machine

  jax.config.update("jax_threefry_partitionable", False)
  calls, flops = {}, {}
  for workload in args.workloads.split(","):
    more_calls, more_flops = {"prune": prune_calls, "apgd": apgd_calls}[workload](args)
    calls.update(more_calls)
    flops.update(more_flops)
  matmul_call, matmul_flops = bvt.matmul_probe(2048)
  timing = bvt.interleaved({**calls, "matmul": matmul_call}, args.repeats)
  matmul = matmul_flops / timing["matmul"]["min"] / 1e9
  rows = {name: {"s": timing[name]["median"], "flops": flops.get(name, 0.0)} for name in calls}
  info = machine.describe()
  print(machine.header(info, matmul), file=sys.stderr, flush=True)
  return {"machine": info, "matmul_gflops": matmul, "rows": rows}


# ----------------------------------------------------------------------------------------------------------
# The parent: one process per setting, then one table.


def child_result(args, setting: str, argv: list[str]) -> dict:
  """Runs this module with --child under `setting`'s environment; returns its JSON result."""
  env = {**os.environ, **SETTINGS[setting]}
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks.bench_isa", "--child", *argv], env=env, capture_output=True, text=True
  )
  sys.stderr.write(out.stderr[-2000:])
  if out.returncode:
    raise RuntimeError(f"setting {setting} failed (exit {out.returncode})")
  return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict]) -> str:
  """Markdown: one row per measurement, per setting its seconds, default / row, torch / row and roofline share."""
  settings = list(results)
  head = "| row | " + " | ".join(f"{s} s | {s} default/row | {s} torch/row | {s} roofline" for s in settings) + " |"
  lines = [head, "|---" * (1 + 4 * len(settings)) + "|"]
  names = list(results[settings[0]]["rows"])
  for name in names:
    cells = []
    for s in settings:
      rows, matmul = results[s]["rows"], results[s]["matmul_gflops"]
      row, workload = rows[name], name.split("/")[0]
      default, torch_s = rows[f"{workload}/default"]["s"], rows[f"{workload}/torch"]["s"]
      share = row["flops"] / row["s"] / 1e9 / matmul if row["flops"] else None
      cells += [f"{row['s']:.2f}", f"{default / row['s']:.2f}", f"{torch_s / row['s']:.2f}x"]
      cells.append(f"{share:.2f}" if share is not None else "")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("| matmul GFLOP/s | " + " | ".join(f"{results[s]['matmul_gflops']:.0f} | | |" for s in settings) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.merge:
    results = {}
    for path in args.merge.split(","):
      with open(path) as f:
        results.update(json.load(f))
    print(table(results))
    return results
  if args.child:
    print(json.dumps(run_setting(args)))
    return {}
  passed = [a for i, a in enumerate(argv) if not (a == "--json" or (i and argv[i - 1] == "--json"))]
  results = {setting: child_result(args, setting, passed) for setting in args.settings.split(",")}
  workloads = {"prune": f"prune TRADES-{args.attack_steps} k={args.k}", "apgd": f"APGD-CE-{args.apgd_steps}"}
  shown = ", ".join(workloads[w] for w in args.workloads.split(","))
  print(
    f"{args.model}, batch {args.batch}, {shown}; median of {args.repeats} alternating calls per row after a warm-up"
  )
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
