"""Backend and ISA performance knobs: the one table that `models.layers` and `attacks` read.

Some choices only change speed, never results (beyond float rounding), and were made by measurement per
backend and, on CPU, per vector ISA: how many images a convolution runs on at once, how many examples an
attack's forward and backward passes take at once, whether a convolution's kernel gradient may be per-tap
matmuls and whether its input gradient is an explicit convolution. They are one row each of `KNOBS`, keyed by
(backend, ISA of XLA's generated code):

  knobs = backend_knobs.current()     # the row of JAX's default backend and this CPU's XLA ISA
  knobs.conv_batch_chunk              # 32 on CPU, 0 (the whole batch) on GPU / TPU

`layers.conv2d(batch_chunk=0)`, `Conv2d(weight_grad="auto")` and `attacks.in_chunks(fn, 0)` read
`current()`; `benchmarks/machine.py` reads its ISA facts (`cpu_flags`, `isa_of_flags`, `xla_isa`) from here.

Why a module of its own rather than a table passed down: `models` and `attacks` import nothing of the project,
and the knobs are read deep inside them (every `Conv2d`, every `in_chunks`), below any caller that could hand
them in; passing them from `parallel` would add an argument to every model constructor and attack for one
number each. This module imports nothing of the project (only jax), so the layers and the attacks may both
import it without a dependency on anything above them: the one documented exception to their rule.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

# From least to most capable.
ISA_LEVELS = ("SSE4.2", "AVX", "AVX2", "AVX-512", "AMX")
# XLA's --xla_cpu_max_isa names (matched case-insensitively) and the ISA level each stands for.
XLA_ISA_NAMES = {
  "SSE4_2": "SSE4.2",
  "AVX": "AVX",
  "AVX2": "AVX2",
  "AVX512": "AVX-512",
  "AVX512_VNNI": "AVX-512",
  "AVX512_BF16": "AVX-512",
  "AMX": "AMX",
  "AMX_FP16": "AMX",
}


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The speed-only choices of one backend and ISA.

  Attributes:
    conv_batch_chunk: images per convolution call of `layers.conv2d` given batch_chunk=0; 0: the whole batch.
    attack_chunk: examples per chunk of `attacks.in_chunks` given chunk_size=0; 0: the whole batch.
    taps_weight_grad: whether `layers.conv2d(weight_grad="auto")` computes kernel gradients as per-tap matmuls
      for the shapes where `layers.taps_are_faster`; False: XLA's own kernel gradients everywhere.
    hwio_input_grad: whether `layers.conv2d` (groups 1, on the whole batch) writes its input gradient as an
      explicit NHWC x HWIO convolution (`layers.input_grad`); batch chunks and per-tap gradients always do.
  """

  conv_batch_chunk: int = 0
  attack_chunk: int = 0
  taps_weight_grad: bool = False
  hwio_input_grad: bool = False


# (backend, ISA of XLA's generated code) -> Knobs; (backend, None) is that backend's row for any ISA not listed;
# a backend not listed gets Knobs(): whole batches and XLA's own gradients (one batch keeps an accelerator busy).
# Measured on 2-core CPUs (docs/benchmarks.md, benchmarks/RESULTS.md; the batch-64 ratios: two calls each under
# load 12-21, benchmarks/bench_isa.py):
# - conv_batch_chunk 32: one 3x3 64->64 conv at 32x32, 106 ms on chunks of 32 vs 128 ms on a batch of 128; the
#   ResNet-18 TRADES-10 prune step at batch 128, 26.1 vs 29.7 s (chunks of 16: 29.0 s). Without it the ResNet-18
#   TRADES-2 prune step at batch 64 took 1.21x as long natively (AVX-512) and 1.43x with XLA capped at AVX2.
# - attack_chunk 32: the ResNet-18 TRADES-10 attack at batch 128, 17.5 s in chunks of 32 vs 22.5 s as one batch
#   (chunks of 16: 17.0 s, at 9 s more compile time); without it the TRADES-2 prune step (batch 64) took 1.05x
#   (AVX-512) and 1.31x (XLA capped at AVX2) as long.
# - taps_weight_grad: per-tap kernel gradients made the ResNet-18 prune step 26.9 vs 28.5 s (batch 128, AVX-512);
#   with XLA's code capped at AVX2 XLA's own made it 1.45x faster (batch 64), hence only where XLA may use AVX-512.
# - hwio_input_grad: XLA:CPU runs autodiff's input-gradient convolution (swapped kernel labels) on a slow path
#   inside loop bodies: APGD-CE-10 rolled took 50 s against 30 s for PyTorch before it; with autodiff's the
#   TRADES-2 prune step (batch 64) took 1.90x (AVX-512) and 1.55x (XLA capped at AVX2) as long.
KNOBS: dict[tuple[str, str | None], Knobs] = {
  ("cpu", "AMX"): Knobs(conv_batch_chunk=32, attack_chunk=32, taps_weight_grad=True, hwio_input_grad=True),
  ("cpu", "AVX-512"): Knobs(conv_batch_chunk=32, attack_chunk=32, taps_weight_grad=True, hwio_input_grad=True),
  ("cpu", None): Knobs(conv_batch_chunk=32, attack_chunk=32, taps_weight_grad=False, hwio_input_grad=True),
}


def row(backend: str | None = None) -> tuple[str, str | None]:
  """The key of the `KNOBS` row that applies to `backend` (default: JAX's): (backend, XLA's ISA) where listed
  (CPU only; `xla_isa`), else (backend, None)."""
  backend = backend or jax.default_backend()
  key = (backend, xla_isa() if backend == "cpu" else None)
  return key if key in KNOBS else (backend, None)


def current(backend: str | None = None) -> Knobs:
  """The knobs of `backend` (default: JAX's) on this machine: `KNOBS[row(backend)]`, or Knobs() if unlisted."""
  return KNOBS.get(row(backend), Knobs())


@functools.cache
def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
  """The flags of the first processor in /proc/cpuinfo's text (read when None; empty off Linux)."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return frozenset()
  lines = cpuinfo.splitlines()
  return next((frozenset(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), frozenset())


def isa_of_flags(flags: frozenset[str]) -> str:
  """The widest vector ISA among cpuinfo flags (`cpu_flags`): 'AMX', 'AVX-512', 'AVX2', 'AVX' or 'SSE4.2'."""
  for flag, isa in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
    if flag in flags:
      return isa
  return "SSE4.2"


def xla_isa_cap(xla_flags: str) -> str | None:
  """The ISA level (of ISA_LEVELS) that `--xla_cpu_max_isa=NAME` in an XLA_FLAGS string caps XLA's code at, or None.

  The last such flag counts. A name XLA does not know counts as no cap: XLA logs "Unknown CPU ISA" for it and
  starts anyway.
  """
  cap = None
  for flag in xla_flags.split():
    if flag.startswith("--xla_cpu_max_isa="):
      cap = XLA_ISA_NAMES.get(flag.split("=", 1)[1].upper())
  return cap


def xla_isa(cpu_isa: str | None = None, xla_flags: str | None = None) -> str:
  """The ISA XLA:CPU's generated code may use: the CPU's, lowered to XLA_FLAGS' cap if any.

  Args:
    cpu_isa: one of ISA_LEVELS; None: this CPU's (`isa_of_flags(cpu_flags())`).
    xla_flags: an XLA_FLAGS string; None reads the environment (XLA reads it once, when its backend starts).
  """
  if cpu_isa is None:
    cpu_isa = isa_of_flags(cpu_flags())
  if xla_flags is None:
    xla_flags = os.environ.get("XLA_FLAGS", "")
  cap = xla_isa_cap(xla_flags)
  return cpu_isa if cap is None else min(cpu_isa, cap, key=ISA_LEVELS.index)
