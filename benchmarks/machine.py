"""Where a benchmark's numbers come from, and how far they are from this machine's limit: one module every
bench_*.py uses.

- `describe()`: CPU model, its ISA (AVX2 / AVX-512 / AMX from /proc/cpuinfo), the ISA XLA's generated code may
  use (capped by `--xla_cpu_max_isa` in XLA_FLAGS), JAX / jaxlib / XLA versions, torch's ATen CPU capability
  when torch is imported, core count and load average. The ISA facts are `hydra_jax.backend_knobs`'s, the ones
  the library's per-ISA choices read.
- `matmul_gflops()`: the same run's float32 matmul rate (2048 x 2048 `jnp.dot`, best of a few), the roofline.
- `jaxpr_flops`: a function's matmul and convolution FLOPs counted from its jaxpr, loops times their trip
  counts; `compiled_flops` / `jit_flops`: XLA's cost analysis, which counts a loop body once (a `lax.map` of 8
  batch chunks or a rolled 10-step attack: 1/8 or 1/10 of the work), so use it only for loop-free programs;
  `roofline_fraction`: the achieved rate over the matmul rate.

Run `python -m benchmarks.machine` to print the header and roofline of this machine.

`--xla_cpu_max_isa=AVX2` restricts only the code XLA generates (fusions, its own loops and convolution
emitters); library kernels called from it (Eigen / oneDNN matmuls) and PyTorch's ATen kernels dispatch on the
real CPU (PyTorch honours `ATEN_CPU_CAPABILITY=avx2` instead). See docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
from jax._src.interpreters import partial_eval  # dce_jaxpr: no public equivalent
from jax.extend import core

from hydra_jax import backend_knobs


def cpu_model(cpuinfo: str | None = None) -> str:
  """The 'model name' of /proc/cpuinfo, else platform.processor()."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  for line in cpuinfo.splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def describe() -> dict:
  """Where the numbers come from: device, CPU model and cores, CPU ISA, XLA's ISA, versions, load average."""
  isa = backend_knobs.isa_of_flags(backend_knobs.cpu_flags())
  xla_flags = os.environ.get("XLA_FLAGS", "")
  info = {
    "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "cpu_isa": isa,
    "xla_isa": backend_knobs.xla_isa(isa, xla_flags),
    "xla_flags": xla_flags,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }
  torch = sys.modules.get("torch")
  if torch is not None:
    info["torch"] = torch.__version__
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
  return info


def header(info: dict, matmul: float | None = None) -> str:
  """One line for a benchmark's output: `describe()`'s fields and the matmul rate (GFLOP/s) if measured."""
  parts = [
    f"{info['device']} | {info['cpu']}, {info['cpu_count']} cores, ISA {info['cpu_isa']}",
    f"XLA code ISA {info['xla_isa']}" + (f" (XLA_FLAGS={info['xla_flags']})" if info["xla_flags"] else ""),
    f"jax {info['jax']}, jaxlib/XLA {info['jaxlib']}",
  ]
  if "torch" in info:
    parts.append(f"torch {info['torch']} (ATen {info['torch_cpu_capability']})")
  if info["load_average"] is not None:
    parts.append("load " + " ".join(f"{v:.2f}" for v in info["load_average"]))
  if matmul is not None:
    parts.append(f"f32 matmul {matmul:.1f} GFLOP/s")
  return " | ".join(parts)


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (`.lower(...).compile()`); 0.0 when the backend reports none."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def jit_flops(fn, *args, **kwargs) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args, **kwargs)` (compiled, not run)."""
  return compiled_flops(jax.jit(fn).lower(*args, **kwargs).compile())


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
  out_elements = math.prod(eqn.outvars[0].aval.shape)
  return 2 * out_elements * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> int:
  """2 x output elements x kernel elements per output channel: every tap, those on padding or dilation zeros
  included (the usual count; XLA's cost analysis skips taps on padding, 6% fewer for a 3x3 conv at 32x32)."""
  rhs = eqn.invars[1].aval.shape
  out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features


def _sub_jaxprs(value):
  if isinstance(value, core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for item in value for j in _sub_jaxprs(item)]
  return []


def count_jaxpr_flops(jaxpr) -> int:
  """Matmul (dot_general) and convolution FLOPs of a jaxpr: scan bodies times their length, the largest branch of
  a cond, a while loop's body once (its trip count is not static: an undercount)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = [count_jaxpr_flops(j) for value in eqn.params.values() for j in _sub_jaxprs(value)]
    if name == "cond":
      total += max(subs, default=0)
    else:
      total += sum(subs) * (eqn.params["length"] if name == "scan" else 1)
  return total


def jaxpr_flops(fn, *args, **kwargs) -> int:
  """Matmul and convolution FLOPs of `fn(*args, **kwargs)` from its jaxpr (`count_jaxpr_flops`), loops included,
  after dead-code elimination: only what the outputs need, as XLA compiles it. (An attack's input gradient goes
  through the zoo's custom-VJP convolutions, whose backward also computes a kernel gradient that the attack never
  uses and XLA drops: counted, it made a ResNet-18 input gradient 1.55x its FLOPs and an idle prune step read 1.17
  of the matmul roofline.)"""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  live, _ = partial_eval.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return count_jaxpr_flops(live)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """This run's float32 matmul rate in GFLOP/s: a size x size x size `jnp.dot`, best of `repeats` after a warm-up."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  product = jax.jit(jnp.dot)
  product(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best / 1e9


def roofline_fraction(flops: float, seconds: float, matmul: float) -> float:
  """Achieved FLOP rate over the matmul rate (GFLOP/s): 1.0 runs at the roofline; nan when flops is 0."""
  return flops / seconds / 1e9 / matmul if flops else float("nan")


def main() -> None:
  matmul = matmul_gflops()
  print(header(describe(), matmul))


if __name__ == "__main__":
  main()
