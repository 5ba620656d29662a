"""hydra_jax against the original PyTorch HYDRA, side by side in one process: time per step, memory, FLOP/s.

Run from the repository root (torch is a benchmark-only extra: `pip install torch`):

  python -m benchmarks.bench_vs_torch                                  # every workload, batch 128 (long on a CPU)
  python -m benchmarks.bench_vs_torch --workloads prune --models resnet18 --repeats 3 --json results.json
  python -m benchmarks.bench_vs_torch --tiny                           # every workload at toy size, seconds

Each workload runs the hydra_jax program and its PyTorch baseline (`benchmarks/torch_hydra.py`, the reference
code re-stated; its docstring lists what was re-stated) on the same random CIFAR-shaped batch, alternating
the two (and a matmul probe) `--repeats` times after one warm-up call each, so that both see the same machine
load. Reported per workload: the median seconds per call and images/s of each, `speedup` = torch seconds /
hydra_jax seconds, hydra_jax compile seconds, peak memory of each (CPU: the largest process RSS increase over
the call's start, sampled every 5 ms, which charges memory to whichever call first grows the process, so
compare it only across processes, as the `memory` workload does; for train steps also `jax_plan_mb`, the
bytes XLA's compiled program plans for arguments, outputs and temporaries; GPU:
`memory_stats()['peak_bytes_in_use']` for JAX, which only grows within a process, and
`torch.cuda.max_memory_allocated` reset per workload), and for train steps and attacks the achieved GFLOP/s
(matmul and conv FLOPs counted from the jaxpr, `machine.jaxpr_flops`, / median time) against a square f32
matmul measured in the same rotation
(the roofline). With --compare-xla-conv, train steps are also timed (in the same rotation) with every conv
at `Conv2d(weight_grad="xla")` (XLA's own kernel gradients; the default 'auto' uses per-tap matmuls on CPU
where they win alone, see `layers.conv2d`): `jax_xla_conv_s`. With --compare-xla-defaults, train steps are also
timed compiled with XLA's default options instead of the runners' (`parallel.compiler_options`: on CPU the
memory-optimized scheduler): `jax_xla_defaults_s` and its plan `jax_xla_defaults_plan_mb`. hydra_jax's attacks
(in train steps, pgd, apgd) run in batch chunks of --attack-chunk-size examples (`attacks.in_chunks`; 0, the
default, is what users get: the backend's `attack_chunk` in `backend_knobs`); with --compare-whole-batch-attack
they are also timed on the whole batch at once, `jax_whole_batch_s`.

Workloads (`--workloads`, comma-separated; default all):
  prune     prune-stage TRADES step (scores + BatchNorm train, weights frozen) at k=--k for each --models;
            also the time of all the model's masks alone (one jit) and its share of the step.
  finetune  finetune-stage TRADES step (weights + BatchNorm train, mask fixed) for each --models.
  pgd       PGD-(--pgd-steps) evaluation of the masked model (eval-mode BN), first of --models.
  apgd      APGD-CE-(--apgd-steps) evaluation, first of --models (torch: see torch_hydra.apgd_ce).
  topk      one layer's mask vs tensor size (--sizes): masking.topk_mask against GetSubnet's sort.
  width     prune step of WRN-(--wrn-depth)-w for w in --widths.
  k         prune step of the first of --models at each of --ks (hydra_jax's time must be flat in k).
  memory    prune step of each --models with each side alone in a fresh process (`isolated_step`): the peak
            RSS increase during its timed steps over the RSS after setup, one warm-up step and `malloc_trim`
            (jax_peak_mb, torch_peak_mb; jax_base_mb, torch_base_mb the baselines) and the peak RSS itself
            (jax_peak_rss_mb, torch_peak_rss_mb; both processes import both frameworks).
            With --compare-xla-defaults also the hydra_jax step compiled with XLA's defaults, in a third process.
  bounds    IBP and CROWN-IBP (lower bound, margin spec, eps 2/255) on --bounds-model (cnn_large), each also as
            a multiple of its own framework's forward pass (jax_x_forward, torch_x_forward); torch: the
            reference's crown/bound_layers.py re-stated in `benchmarks/torch_bounds.py`.
  smoothing randomized-smoothing noise samples per second of one example (--batch per chunk), first of
            --models at k: `smoothing.sample_counts` vs Cohen et al.'s `_sample_noise` (torch_hydra.py).
  input     ImageNet training input of --input-images synthetic 500x375 JPEGs, one process (one core's worth):
            hydra_jax's (`ImageFolderSource.decode`, `data.random_resized_crop`, the batch divided by 255, as
            `TrainBatches` does) against torchvision's recipe spelled out in Pillow calls (pil_loader's decode and
            convert("RGB"), RandomResizedCrop's crop then resize to 224 BILINEAR on uint8 with the same box,
            RandomHorizontalFlip's transpose, ToTensor's division by 255 without its HWC->CHW copy); both give
            the same float32 bytes (checked); batch = images per call, images/s per side; the note adds the
            ratio per CPU second of the process (jax_cpu_img_s, torch_cpu_img_s, cpu_speedup in --json), the
            per-core rate, which the machine's load disturbs less than the wall-clock one.
  compile   cold-cache compile time, hydra_jax only (the persistent compilation cache off): for each --models
            the prune step (TRADES-(--attack-steps)), each evaluation attack of `evaluate` alone
            (`evaluate.method_correct` with its default settings, as `evaluate` runs it) and the evaluation
            program of `evaluate.DEFAULT_METHODS` together (`evaluate.batch_counts`), at --batch: seconds
            tracing + lowering to StableHLO (lower_s) and XLA compiling (xla_compile_s); compile_s, their sum,
            is what the other workloads report as their compile time; compile_cpu_s, the process's CPU
            seconds over both (less dependent on the machine's load). Also IBP on each --models, IBP and
            CROWN-IBP on --bounds-model (`evaluate.method_correct`; CROWN-IBP bounds chains only), and the
            smoothing sampler's program (one pass of the smooth method's batch_size noise samples).

The hydra_jax train step is `train.train_step`'s computation on one device, written here from the public
pieces (masking.apply_masks once per step, objectives' TRADES, one backward pass, optax SGD with momentum 0.9
and weight decay 1e-4 on the trainable leaves only, compiled with the runners' `parallel.compiler_options`),
so that the benchmark does not depend on train.py's internals. TRADES uses the library defaults (eps 8/255,
step 2/255, --attack-steps steps, beta 6, unrolled), PGD and APGD the attacks module's defaults. Results go
to stdout as a table and to --json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import functools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil
import torch
from PIL import Image

from benchmarks import machine
from benchmarks import torch_bounds
from benchmarks import torch_hydra
from hydra_jax import attacks
from hydra_jax import bounds
from hydra_jax import data
from hydra_jax import data_formats
from hydra_jax import evaluate
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import parallel
from hydra_jax import smoothing
from hydra_jax.models import layers
from hydra_jax.models import wrn

TINY = [
  "--models",
  "resnet_tiny",
  "--batch",
  "4",
  "--repeats",
  "1",
  "--attack-steps",
  "1",
  "--pgd-steps",
  "2",
  "--apgd-steps",
  "3",
  "--sizes",
  "1000,10000",
  "--widths",
  "1",
  "--wrn-depth",
  "10",
  "--ks",
  "0.1,0.01",
  "--matmul-size",
  "256",
  "--bounds-model",
  "cnn_tiny",
  "--input-images",
  "4",
]
WORKLOADS = (
  "prune",
  "finetune",
  "pgd",
  "apgd",
  "topk",
  "width",
  "k",
  "memory",
  "bounds",
  "smoothing",
  "input",
  "compile",
)
COLUMNS = (
  ("workload", "{}"),
  ("model", "{}"),
  ("batch", "{:d}"),
  ("jax_s", "{:.4f}"),
  ("torch_s", "{:.4f}"),
  ("speedup", "{:.2f}x"),
  ("jax_img_s", "{:.1f}"),
  ("torch_img_s", "{:.1f}"),
  ("compile_s", "{:.1f}"),
  ("lower_s", "{:.1f}"),
  ("xla_compile_s", "{:.1f}"),
  ("compile_cpu_s", "{:.1f}"),
  ("jax_peak_mb", "{:.0f}"),
  ("torch_peak_mb", "{:.0f}"),
  ("jax_gflop_s", "{:.1f}"),
  ("roofline_pct", "{:.1f}"),
  ("mask_share_pct", "{:.2f}"),
  ("jax_plan_mb", "{:.0f}"),
  ("jax_peak_rss_mb", "{:.0f}"),
  ("torch_peak_rss_mb", "{:.0f}"),
  ("jax_whole_batch_s", "{:.4f}"),
  ("jax_xla_conv_s", "{:.4f}"),
  ("jax_xla_defaults_s", "{:.4f}"),
  ("jax_xla_defaults_plan_mb", "{:.0f}"),
  ("jax_x_forward", "{:.2f}"),
  ("torch_x_forward", "{:.2f}"),
  ("note", "{}"),
)
TEXT_COLUMNS = ("workload", "model", "note")


# ----------------------------------------------------------------------------------------------------------
# Measuring.


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


class PeakMemory:
  """Peak memory of one call in bytes: process RSS increase on CPU (sampled), the device's counters on GPU."""

  def __init__(self, framework: str):
    self.framework, self.peak = framework, 0

  def __enter__(self):
    if on_gpu():
      if self.framework == "torch":
        torch.cuda.reset_peak_memory_stats()
      return self
    self._process = psutil.Process()
    self._start = self._process.memory_info().rss
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self._process.memory_info().rss - self._start)

  def __exit__(self, *exc):
    if not on_gpu():
      self._stop.set()
      self._thread.join()
      self.peak = max(self.peak, self._process.memory_info().rss - self._start)
    elif self.framework == "torch":
      self.peak = torch.cuda.max_memory_allocated()
    else:
      self.peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]


def sync_torch() -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def interleaved(
  calls: dict[str, Callable[[], Any]], repeats: int, warmups: dict[str, Callable[[], Any]] | None = None
) -> dict[str, dict[str, float]]:
  """Runs each call once to warm up (or its stand-in in `warmups`: the same program on the same shapes, shorter),
  then all of them in turn `repeats` times.

  Returns per name: median and min seconds, and peak memory bytes over the timed calls (see PeakMemory).
  """
  for name, call in calls.items():
    (warmups or {}).get(name, call)()
  times = {name: [] for name in calls}
  peaks = dict.fromkeys(calls, 0)
  for _ in range(repeats):
    for name, call in calls.items():
      with PeakMemory("torch" if name.startswith("torch") else "jax") as memory:
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)
      peaks[name] = max(peaks[name], memory.peak)
  return {name: {"median": statistics.median(t), "min": min(t), "peak": peaks[name]} for name, t in times.items()}


def matmul_probe(size: int) -> tuple[Callable[[], Any], float]:
  """(call, flops): a jitted f32 size x size x size matmul, the roofline of the train step's FLOP/s."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return lambda: f(a).block_until_ready(), 2.0 * size**3


def lower_and_compile_seconds(jitted, *args) -> tuple[Any, float, float]:
  """(compiled executable, seconds tracing + lowering it, seconds XLA compiling it)."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - start, time.perf_counter() - lowered_at


def compile_seconds(jitted, *args) -> tuple[Any, float]:
  """(compiled executable, seconds spent lowering and compiling it)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def planned_bytes(compiled) -> int:
  """Bytes XLA plans for a compiled program: arguments + outputs + temporaries (aliased outputs counted once)."""
  stats = compiled.memory_analysis()
  held = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
  return held + stats.temp_size_in_bytes


# ----------------------------------------------------------------------------------------------------------
# The hydra_jax side.


def random_batch(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """{'image': [B, 32, 32, 3] uniform in [0, 1], 'label': [B] int32 in [0, 10)} as host arrays."""
  rng = np.random.default_rng(seed)
  return {
    "image": rng.uniform(size=(batch, 32, 32, 3)).astype(np.float32),
    "label": rng.integers(0, 10, batch).astype(np.int32),
  }


def jax_model(name: str, batch: int):
  """(apply_fn, variables, scores) of zoo model `name` or any `wrn_<depth>_<widen>` (scores: HYDRA's scaled init)."""
  if name.startswith("wrn_") and name not in models.model_names():
    _, depth, widen = name.split("_")
    model = wrn.WideResNet(depth=int(depth), widen_factor=int(widen), num_classes=10)
  else:
    model = models.get_model(name, 10)
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((batch, 32, 32, 3)), train=False))(jax.random.key(0))
  scores = masking.init_scores(variables["params"], "scaled", jax.random.key(1))
  return models.make_apply_fn(model), variables, scores


def trainable_labels(params, scores, stage: str):
  """'train' / 'freeze' per leaf of {'params', 'scores'}: prune trains scores + BN, finetune weights + BN."""

  def label_params(tree, in_norm=False):
    if isinstance(tree, dict):
      return {key: label_params(value, "scale" in tree) for key, value in tree.items()}
    return "train" if stage == "finetune" or in_norm else "freeze"

  return {
    "params": label_params(params),
    "scores": jax.tree.map(lambda _: "train" if stage == "prune" else "freeze", scores),
  }


def jax_train_step(
  apply_fn, trainable, stage: str, k: float, attack_steps: int, xla_defaults: bool = False, attack_chunk_size: int = 0
):
  """(jitted step(trainable, batch_stats, opt_state, batch, key) -> (trainable, batch_stats, opt_state, loss), tx).

  Compiled with the XLA options of `parallel.make_runner` (`parallel.compiler_options`), or with XLA's own
  defaults when `xla_defaults`. `attack_chunk_size`: the TRADES config's (0: the backend's, `backend_knobs`).
  """
  config = objectives.default_config("trades")
  config.steps = attack_steps
  config.attack_chunk_size = attack_chunk_size
  trades = objectives.get_objective("trades").loss_fn
  sgd = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  tx = optax.multi_transform(
    {"train": sgd, "freeze": optax.set_to_zero()}, trainable_labels(trainable["params"], trainable["scores"], stage)
  )

  def loss_fn(trainable, batch_stats, batch, key):
    weights = masking.apply_masks(trainable["params"], trainable["scores"], k)
    loss, (_, variables) = trades(apply_fn, {"params": weights, "batch_stats": batch_stats}, batch, key, config)
    return loss, variables["batch_stats"]

  def step(trainable, batch_stats, opt_state, batch, key):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch_stats, batch, key)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), batch_stats, opt_state, loss

  options = None if xla_defaults else parallel.compiler_options(jax.devices()[0].platform)
  return jax.jit(step, compiler_options=options), tx


# ----------------------------------------------------------------------------------------------------------
# Workloads: each returns table rows (dicts with COLUMNS keys).


def _torch_batch(batch: dict[str, np.ndarray], device: str):
  return (
    torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(device),
    torch.from_numpy(batch["label"].astype(np.int64)).to(device),
  )


def _torch_device() -> str:
  return "cuda" if torch.cuda.is_available() and on_gpu() else "cpu"


def _row(workload, model, batch, timing, compile_s=None, flops=0.0, roofline=None, note=""):
  """A table row from `interleaved` results with keys 'jax', 'torch' (and 'matmul' with roofline flops)."""
  jax_s, torch_s = timing["jax"]["median"], timing["torch"]["median"]
  row = {
    "workload": workload,
    "model": model,
    "batch": batch,
    "jax_s": jax_s,
    "torch_s": torch_s,
    "speedup": torch_s / jax_s,
    "jax_img_s": batch and batch / jax_s,
    "torch_img_s": batch and batch / torch_s,
    "compile_s": compile_s,
    "jax_peak_mb": timing["jax"]["peak"] / 2**20,
    "torch_peak_mb": timing["torch"]["peak"] / 2**20,
    "jax_gflop_s": flops / jax_s / 1e9 if flops else None,
    "roofline_pct": None,
    "note": note,
    "jax_min_s": timing["jax"]["min"],
    "torch_min_s": timing["torch"]["min"],
  }
  if roofline is not None:
    matmul_gflop_s = roofline / timing["matmul"]["median"] / 1e9
    row["matmul_gflop_s"] = matmul_gflop_s
    row["roofline_pct"] = 100 * row["jax_gflop_s"] / matmul_gflop_s if flops else None
  return row


def jax_step_setup(
  model_name: str,
  stage: str,
  k: float,
  host_batch: dict,
  attack_steps: int,
  xla_defaults: bool = False,
  attack_chunk_size: int = 0,
) -> dict:
  """The hydra_jax side of a train step: {'compiled', 'compile_s', 'call', 'state', 'batch', 'key', 'trainable',
  'apply_fn'}; `call()` runs one step on the state (updated in place) and waits for it. `xla_defaults` and
  `attack_chunk_size`: see `jax_train_step`."""
  apply_fn, variables, scores = jax_model(model_name, len(host_batch["label"]))
  trainable = {"params": variables["params"], "scores": scores}
  if stage == "finetune":
    trainable["params"] = masking.export_dense(variables["params"], scores, k)
  step, tx = jax_train_step(apply_fn, trainable, stage, k, attack_steps, xla_defaults, attack_chunk_size)
  state = [trainable, variables["batch_stats"], tx.init(trainable)]
  batch, key = jax.device_put(host_batch), jax.random.key(2)
  compiled, compile_s = compile_seconds(step, *state, batch, key)
  return {
    "compiled": compiled,
    "compile_s": compile_s,
    "call": _stepper(compiled, state, batch, key),
    "state": state,
    "batch": batch,
    "key": key,
    "trainable": trainable,
    "apply_fn": apply_fn,
  }


def torch_step_call(model_name: str, stage: str, k: float, host_batch: dict, attack_steps: int) -> Callable[[], Any]:
  """A call running one step of the PyTorch reference's TRADES trainer on `host_batch` (and waiting for it)."""
  device = _torch_device()
  net = torch_hydra.prepare(torch_hydra.build(model_name).to(device), stage, k)
  torch_step = torch_hydra.trades_train_step(net, torch_hydra.sgd(net), attack_steps)
  images, labels = _torch_batch(host_batch, device)
  return lambda: (torch_step(images, labels), sync_torch())


def step_flops(jax_side: dict, stage: str, k: float, attack_steps: int) -> int:
  """Matmul and conv FLOPs of the hydra_jax train step (`machine.jaxpr_flops`: the batch-chunk loops counted
  times their trip count, which XLA's cost analysis does not)."""
  step = jax_train_step(jax_side["apply_fn"], jax_side["trainable"], stage, k, attack_steps, xla_defaults=True)[0]
  return machine.jaxpr_flops(step, *jax_side["state"], jax_side["batch"], jax_side["key"])


def train_step_row(args, workload: str, model_name: str, stage: str, k: float, batch_size: int) -> dict:
  """TRADES train step of `stage` at `k`, hydra_jax vs torch, with FLOP/s against the matmul probe."""
  host_batch = random_batch(batch_size)
  jax_side = jax_step_setup(model_name, stage, k, host_batch, args.attack_steps, False, args.attack_chunk_size)
  compiled, compile_s, trainable = jax_side["compiled"], jax_side["compile_s"], jax_side["trainable"]
  calls = {"jax": jax_side["call"]}
  state, batch, key = jax_side["state"], jax_side["batch"], jax_side["key"]
  if args.compare_whole_batch_attack:  # the same step with its attack on the whole batch at once
    whole_step, _ = jax_train_step(
      jax_side["apply_fn"], trainable, stage, k, args.attack_steps, attack_chunk_size=batch_size
    )
    calls["jax_whole_batch"] = _stepper(compile_seconds(whole_step, *state, batch, key)[0], list(state), batch, key)
  if args.compare_xla_conv:  # the same step traced with every Conv2d at weight_grad="xla"
    conv2d = layers.conv2d
    with mock.patch.object(layers, "conv2d", lambda *conv_args: conv2d(*conv_args[:5], "xla", *conv_args[6:])):
      xla_conv_step, _ = jax_train_step(
        jax_side["apply_fn"], trainable, stage, k, args.attack_steps, attack_chunk_size=args.attack_chunk_size
      )
      compiled_xla_conv = compile_seconds(xla_conv_step, *state, batch, key)[0]
      calls["jax_xla_conv"] = _stepper(compiled_xla_conv, list(state), batch, key)
  if args.compare_xla_defaults:  # the same step compiled with XLA's default options
    default_step, _ = jax_train_step(
      jax_side["apply_fn"], trainable, stage, k, args.attack_steps, True, args.attack_chunk_size
    )
    default_compiled = compile_seconds(default_step, *state, batch, key)[0]
    calls["jax_xla_defaults"] = _stepper(default_compiled, list(state), batch, key)

  probe, probe_flops = matmul_probe(args.matmul_size)
  calls.update(torch=torch_step_call(model_name, stage, k, host_batch, args.attack_steps), matmul=probe)
  timing = interleaved(calls, args.repeats)
  row = _row(
    workload,
    model_name,
    batch_size,
    timing,
    compile_s,
    step_flops(jax_side, stage, k, args.attack_steps),
    probe_flops,
    note=f"{stage} TRADES-{args.attack_steps} k={k:g}",
  )
  row["jax_plan_mb"] = planned_bytes(compiled) / 2**20
  if "jax_xla_defaults" in timing:
    row["jax_xla_defaults_s"] = timing["jax_xla_defaults"]["median"]
    row["jax_xla_defaults_plan_mb"] = planned_bytes(default_compiled) / 2**20
  if "jax_whole_batch" in timing:
    row["jax_whole_batch_s"] = timing["jax_whole_batch"]["median"]
  if "jax_xla_conv" in timing:
    row["jax_xla_conv_s"] = timing["jax_xla_conv"]["median"]
    row["jax_xla_conv_peak_mb"] = timing["jax_xla_conv"]["peak"] / 2**20
  if workload == "prune":
    row.update(mask_row(trainable, k, timing["jax"]["median"], args.repeats))
  return row


def isolated_step(side: str, model_name: str, stage: str, k: float, batch_size: int, attack_steps: int, repeats: int):
  """One side's train step measured alone in this process (run it in a fresh one).

  `side`: 'jax', 'jax_xla_defaults' (compiled with XLA's default options, see `jax_train_step`) or 'torch'.

  Builds the model, batch and state, runs one warm-up step (hydra_jax compiles first), returns the freed heap
  memory to the OS (`trimmed_rss`), takes the process RSS as the baseline and times `repeats` steps, sampling
  the RSS every 5 ms (`PeakMemory`).

  Returns:
    {'median', 'min': seconds per step, 'peak': bytes, the largest RSS increase over the baseline during a
    step (GPU: the device's peak counters), 'base': the baseline RSS in bytes, 'plan': XLA's planned bytes
    (hydra_jax only, else None)}.
  """
  jax.config.update("jax_threefry_partitionable", False)
  host_batch = random_batch(batch_size)
  plan = None
  if side.startswith("jax"):
    jax_side = jax_step_setup(model_name, stage, k, host_batch, attack_steps, side == "jax_xla_defaults")
    call, plan = jax_side["call"], planned_bytes(jax_side["compiled"])
  else:
    call = torch_step_call(model_name, stage, k, host_batch, attack_steps)
  call()
  base, times, peak = trimmed_rss(), [], 0
  for _ in range(repeats):
    with PeakMemory("torch" if side == "torch" else "jax") as memory:
      times.append(_time(call))
    peak = max(peak, memory.peak)
  return {"median": statistics.median(times), "min": min(times), "peak": peak, "base": base, "plan": plan}


def trimmed_rss() -> int:
  """Process RSS in bytes after handing freed heap memory back to the OS (glibc's `malloc_trim`, where present),
  so that memory freed by earlier calls is not counted as held."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  return psutil.Process().memory_info().rss


def memory_rows(args) -> list[dict]:
  """Prune step of each --models with each side alone in a fresh (spawned) process: peak RSS over its step."""
  rows = []
  for name in args.models:
    timing = {}
    for side in ("jax", "torch") + (("jax_xla_defaults",) if args.compare_xla_defaults else ()):
      spawn = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as process:
        timing[side] = process.submit(
          isolated_step, side, name, "prune", args.k, args.batch, args.attack_steps, args.repeats
        ).result()
    row = _row(
      "memory", name, args.batch, timing, note=f"prune TRADES-{args.attack_steps} k={args.k:g}, own process each"
    )
    row.update(
      jax_plan_mb=timing["jax"]["plan"] / 2**20,
      jax_base_mb=timing["jax"]["base"] / 2**20,
      torch_base_mb=timing["torch"]["base"] / 2**20,
      jax_peak_rss_mb=(timing["jax"]["base"] + timing["jax"]["peak"]) / 2**20,
      torch_peak_rss_mb=(timing["torch"]["base"] + timing["torch"]["peak"]) / 2**20,
    )
    if "jax_xla_defaults" in timing:
      defaults = timing["jax_xla_defaults"]
      row.update(
        jax_xla_defaults_s=defaults["median"],
        jax_xla_defaults_plan_mb=defaults["plan"] / 2**20,
        jax_xla_defaults_peak_mb=defaults["peak"] / 2**20,
        jax_xla_defaults_peak_rss_mb=(defaults["base"] + defaults["peak"]) / 2**20,
      )
    rows.append(row)
  return rows


def _stepper(compiled, state: list, batch, key) -> Callable[[], None]:
  """A call running one train step on `state` (updated in place) and waiting for it."""

  def run():
    state[:] = compiled(*state, batch, key)[:3]
    jax.block_until_ready(state)

  return run


def mask_row(trainable, k: float, step_s: float, repeats: int) -> dict:
  """Seconds to compute every mask of the model alone (one jit) and its share of the step time."""
  masks = jax.jit(lambda p, s: masking.apply_masks(p, s, k))
  call = lambda: jax.block_until_ready(masks(trainable["params"], trainable["scores"]))
  call()
  seconds = statistics.median(_time(call) for _ in range(max(repeats, 1)))
  return {"mask_s": seconds, "mask_share_pct": 100 * seconds / step_s}


def _time(call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def prune_rows(args):
  return [train_step_row(args, "prune", name, "prune", args.k, args.batch) for name in args.models]


def finetune_rows(args):
  return [train_step_row(args, "finetune", name, "finetune", args.k, args.batch) for name in args.models]


def width_rows(args):
  return [train_step_row(args, "width", f"wrn_{args.wrn_depth}_{w}", "prune", args.k, args.batch) for w in args.widths]


def k_rows(args):
  return [train_step_row(args, "k", args.models[0], "prune", k, args.batch) for k in args.ks]


def masked_logits_fn(name: str, batch: int, k: float) -> jax.tree_util.Partial:
  """Eval-mode logits [B, 10] of zoo model `name` with its pruned weights exactly 0 at k, the weights held as
  arguments of the Partial (not constants of a compiled program)."""
  apply_fn, variables, scores = jax_model(name, batch)
  evaluated = {**variables, "params": masking.export_dense(variables["params"], scores, k)}
  return jax.tree_util.Partial(lambda v, x: apply_fn(v, x, False)[0], evaluated)


def attack_row(args, workload: str) -> dict:
  """PGD or APGD evaluation of the masked model (eval-mode BN), hydra_jax vs torch, same batch."""
  name, steps = args.models[0], args.pgd_steps if workload == "pgd" else args.apgd_steps
  logits_fn = masked_logits_fn(name, args.batch, args.k)

  def attack(x, y, key, chunk_size, steps):
    chunked = attacks.in_chunks(logits_fn, chunk_size)
    if workload == "pgd":
      return attacks.pgd(chunked, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=steps)
    return attacks.apgd(chunked, x, y, key=key, eps=8 / 255, steps=steps)

  host_batch = random_batch(args.batch)
  x, y = jax.device_put(host_batch["image"]), jax.device_put(host_batch["label"])
  jitted = jax.jit(attack, static_argnums=(3, 4))
  compiled, compile_s = compile_seconds(jitted, x, y, jax.random.key(3), args.attack_chunk_size, steps)
  key = jax.random.key(3)
  calls = {"jax": lambda: compiled(x, y, key).block_until_ready()}
  warmups = {}
  if args.attack_warmup_steps:
    short = compile_seconds(jitted, x, y, jax.random.key(3), args.attack_chunk_size, args.attack_warmup_steps)[0]
    warmups["jax"] = lambda: short(x, y, jax.random.key(3)).block_until_ready()
  if args.compare_whole_batch_attack:
    whole = compile_seconds(jitted, x, y, jax.random.key(3), args.batch, steps)[0]
    calls["jax_whole_batch"] = lambda: whole(x, y, jax.random.key(3)).block_until_ready()
  device = _torch_device()
  net = torch_hydra.prepare(torch_hydra.build(name).to(device), "finetune", args.k)
  images, labels = _torch_batch(host_batch, device)
  torch_attack = torch_hydra.pgd_whitebox if workload == "pgd" else torch_hydra.apgd_ce
  run_torch = lambda n: (
    torch_attack(model=net, x=images, y=labels, **{"pgd": {"num_steps": n}, "apgd": {"steps": n}}[workload]),
    sync_torch(),
  )
  if args.attack_warmup_steps:
    warmups["torch"] = lambda: run_torch(args.attack_warmup_steps)
  probe, probe_flops = matmul_probe(args.matmul_size)
  timing = interleaved({**calls, "torch": lambda: run_torch(steps), "matmul": probe}, args.repeats, warmups)
  label = f"PGD-{steps}" if workload == "pgd" else f"APGD-CE-{steps}"
  flops = machine.jaxpr_flops(functools.partial(attack, chunk_size=args.attack_chunk_size, steps=steps), x, y, key)
  row = _row(workload, name, args.batch, timing, compile_s, flops, probe_flops, f"{label}, eps 8/255, k={args.k:g}")
  if "jax_whole_batch" in timing:
    row["jax_whole_batch_s"] = timing["jax_whole_batch"]["median"]
  return row


def topk_rows(args):
  """One layer's mask at each size: hydra_jax's bisection vs the reference's GetSubnet (full sort)."""
  rows = []
  for size in args.sizes:
    scores = jax.random.normal(jax.random.key(0), (size,))
    mask = jax.jit(lambda s: masking.topk_mask(s, args.k))
    compiled, compile_s = compile_seconds(mask, scores)
    torch_scores = torch.from_numpy(np.array(scores)).to(_torch_device())
    timing = interleaved(
      {
        "jax": lambda: compiled(scores).block_until_ready(),  # noqa: B023  (called within this iteration)
        "torch": lambda: (torch_hydra.GetSubnet.apply(torch_scores.abs(), args.k), sync_torch()),  # noqa: B023
      },
      args.repeats,
    )
    rows.append(_row("topk", f"n={size:.0e}", None, timing, compile_s, note=f"one layer's mask, k={args.k:g}"))
  return rows


def bounds_rows(args):
  """IBP and CROWN-IBP (lower bound, margin spec) of --bounds-model, each as a multiple of its own forward pass,
  hydra_jax (`hydra_jax.bounds`) vs the reference's `crown/bound_layers.py` (`torch_bounds`), same batch."""
  name, eps = args.bounds_model, 2 / 255
  model = models.get_model(name, 10)
  host_batch = random_batch(args.batch)
  x, y = jax.device_put(host_batch["image"]), jax.device_put(host_batch["label"])
  variables = model.init(jax.random.key(0), x[:1], train=False)
  f = lambda v: model.apply(variables, v, train=False)
  lower, upper, spec = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1), bounds.margin_spec(y, 10)
  device = _torch_device()
  seq = torch_bounds.cnn(name).to(device)
  images, _ = _torch_batch(host_batch, device)
  lo, hi = (images - eps).clamp(0, 1), (images + eps).clamp(0, 1)
  c = torch.from_numpy(np.array(spec)).to(device)
  programs = {  # method: (hydra_jax function, its arguments, the reference's call)
    "forward": (f, (x,), lambda: seq(images)),
    "ibp": (lambda *a: bounds.ibp(f, *a)[0], (lower, upper, spec), lambda: torch_bounds.interval_range(seq, lo, hi, c)),
    "crown_ibp": (
      lambda *a: bounds.crown_ibp(f, *a)[0],
      (lower, upper, spec),
      lambda: torch_bounds.backward_range(seq, lo, hi, c),
    ),
  }
  calls, compile_s = {}, {}
  for method, (fn, fn_args, torch_call) in programs.items():
    executable, compile_s[method] = compile_seconds(jax.jit(fn), *fn_args)
    calls[f"jax_{method}"] = functools.partial(_block, executable, *fn_args)
    calls[f"torch_{method}"] = functools.partial(_torch_no_grad, torch_call)
  timing = interleaved(calls, args.repeats)
  rows = []
  for method in programs:
    pair = {"jax": timing[f"jax_{method}"], "torch": timing[f"torch_{method}"]}
    row = _row("bounds", name, args.batch, pair, compile_s[method], note=f"{method}, eps 2/255")
    row["jax_x_forward"] = pair["jax"]["median"] / timing["jax_forward"]["median"]
    row["torch_x_forward"] = pair["torch"]["median"] / timing["torch_forward"]["median"]
    rows.append(row)
  return rows


def _block(executable, *call_args):
  return jax.block_until_ready(executable(*call_args))


def _torch_no_grad(call):
  with torch.no_grad():
    call()
  sync_torch()


def smoothing_rows(args):
  """Randomized-smoothing noise samples of one example per second, the first of --models at k (eval-mode BN):
  `hydra_jax.smoothing.sample_counts` vs Cohen et al.'s `_sample_noise` on the reference's Subnet model.
  Each call counts --batch samples in one chunk; images/s is samples/s."""
  name, sigma = args.models[0], 0.25
  f = masked_logits_fn(name, args.batch, args.k)
  x = jax.device_put(random_batch(1)["image"][0])
  count = functools.partial(smoothing.sample_counts, f, x, sigma=sigma, num=args.batch, batch_size=args.batch)
  start = time.perf_counter()
  count(key=jax.random.key(4))  # compiles
  compile_s = time.perf_counter() - start
  device = _torch_device()
  net = torch_hydra.prepare(torch_hydra.build(name).to(device), "finetune", args.k).eval()
  image = _torch_batch(random_batch(1), device)[0][0]
  timing = interleaved(
    {
      "jax": lambda: count(key=jax.random.key(5)),
      "torch": lambda: (torch_hydra.sample_noise(net, image, args.batch, args.batch, sigma), sync_torch()),
    },
    args.repeats,
  )
  row = _row("smoothing", name, args.batch, timing, compile_s, note=f"noise samples, sigma {sigma}, k={args.k:g}")
  row["note"] += f"; certify n=1e5: {1e5 / row['jax_img_s']:.0f} s"
  return [row]


def _synthetic_jpegs(folder: str, count: int) -> list[str]:
  """`count` smooth random 500x375 RGB JPEGs (quality 90, ImageNet's typical size) written under `folder`."""
  rng, paths = np.random.default_rng(0), []
  for i in range(count):
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    noisy = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (375, 500, 3))
    paths.append(os.path.join(folder, f"{i}.jpg"))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
  return paths


def input_rows(args):
  """ImageNet training input (decode, random resized crop to 224, flip), hydra_jax vs torchvision's Pillow recipe."""
  size, count = 224, args.input_images
  rng = np.random.default_rng(1)
  uniforms, flips = rng.random((count, 10, 4)), rng.random(count) < 0.5
  with tempfile.TemporaryDirectory() as folder:
    source = data_formats.ImageFolderSource(tuple(_synthetic_jpegs(folder, count)), np.zeros(count, np.int32), ("c",))

    def ours():
      crops = [data.random_resized_crop(source.decode(i), uniforms[i], flips[i], size) for i in range(count)]
      return np.divide(np.stack(crops), np.float32(255), dtype=np.float32)

    def torchvision_recipe():
      out = []
      for path, u, flip in zip(source.paths, uniforms, flips):
        with open(path, "rb") as file, Image.open(file) as image:
          image = image.convert("RGB")
        top, left, h, w = data.inception_crop_box(image.height, image.width, u)
        crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
        out.append(np.divide(np.asarray(crop), np.float32(255), dtype=np.float32))
      return out

    if not np.array_equal(ours(), np.stack(torchvision_recipe())):
      raise AssertionError("hydra_jax's ImageNet input differs from torchvision's recipe")
    cpu_s = {"jax": [], "torch": []}
    calls = {name: _cpu_timed(call, cpu_s[name]) for name, call in (("jax", ours), ("torch", torchvision_recipe))}
    timing = interleaved(calls, args.repeats)
  row = _row("input", "imagenet_rrc", count, timing)
  # Per core: images per second of this process's CPU time (both sides are single-threaded), robust to load.
  for name in cpu_s:
    row[f"{name}_cpu_img_s"] = count / statistics.median(cpu_s[name][1:])  # [0] is the warm-up call
  row["cpu_speedup"] = row["jax_cpu_img_s"] / row["torch_cpu_img_s"]
  row["note"] = (
    f"500x375 JPEG -> 224, identical output; per CPU second {row['cpu_speedup']:.2f}x "
    f"({row['jax_cpu_img_s']:.0f} vs {row['torch_cpu_img_s']:.0f} img/s)"
  )
  return [row]


def _cpu_timed(call: Callable[[], Any], seconds: list[float]) -> Callable[[], Any]:
  """`call`, appending the process CPU time (user + system, all threads) of each run to `seconds`."""

  def run():
    start = time.process_time()
    result = call()
    seconds.append(time.process_time() - start)
    return result

  return run


def compile_rows(args) -> list[dict]:
  """Cold-cache lower / compile seconds of the prune step and the evaluation programs of each --models."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return [row for name in args.models for row in _compile_rows_of(args, name)]
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def _compile_rows_of(args, name: str) -> list[dict]:
  """`compile_rows` for model `name`: the prune step, each attack alone, the default methods together."""
  host_batch = random_batch(args.batch)
  apply_fn, variables, scores = jax_model(name, args.batch)
  trainable = {"params": variables["params"], "scores": scores}
  step, tx = jax_train_step(apply_fn, trainable, "prune", args.k, args.attack_steps)
  state = [trainable, variables["batch_stats"], tx.init(trainable)]
  programs = {
    f"prune step, TRADES-{args.attack_steps}": (step, (*state, jax.device_put(host_batch), jax.random.key(2)))
  }
  logits_fn = masked_logits_fn(name, args.batch, args.k)
  x, y = jax.device_put(host_batch["image"]), jax.device_put(host_batch["label"])
  attacks_ = [m for m in evaluate.method_names() if evaluate.get_method(m).kind == "attack"] + ["ibp"]
  for method in attacks_:
    settings = evaluate.get_method(method).defaults
    correct = functools.partial(evaluate.method_correct, method, settings)
    programs[f"eval {method} {settings.get('steps', '')}".rstrip()] = (
      jax.jit(correct),
      (logits_fn, x, y, jax.random.key(3)),
    )
  methods = tuple((m, tuple(sorted(evaluate.get_method(m).defaults.items()))) for m in evaluate.DEFAULT_METHODS)
  batch = {"image": x, "label": y, "mask": jnp.ones(args.batch)}
  counts = functools.partial(evaluate.batch_counts, methods=methods)
  programs[f"eval {'+'.join(evaluate.DEFAULT_METHODS)}"] = (jax.jit(counts), (logits_fn, batch, jax.random.key(3)))
  bounds_logits_fn = masked_logits_fn(args.bounds_model, args.batch, args.k)  # CROWN-IBP: chains only
  for method in ("ibp", "crown_ibp"):
    correct = functools.partial(evaluate.method_correct, method, evaluate.get_method(method).defaults)
    programs[f"eval {method} on {args.bounds_model}"] = (jax.jit(correct), (bounds_logits_fn, x, y, jax.random.key(3)))
  smooth = evaluate.get_method("smooth").defaults  # the sampler's one program: a pass of batch_size noise samples
  programs[f"eval smooth sampler, {smooth['batch_size']} samples"] = (
    jax.jit(functools.partial(smoothing._chunk_votes, size=smooth["batch_size"])),  # = smoothing._chunk_counts
    (logits_fn, x[0], jax.random.key(3), 0, jnp.float32(smooth["sigma"])),
  )
  rows = []
  for program, (jitted, call_args) in programs.items():
    cpu_start = time.process_time()
    _, lower_s, xla_compile_s = lower_and_compile_seconds(jitted, *call_args)
    compile_cpu_s = time.process_time() - cpu_start  # all threads of this process: less load-dependent
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    note = f"{program}, k={args.k:g}" + (f", load {load:.1f}" if load is not None else "")
    rows.append(
      {
        "workload": "compile",
        "model": name,
        "batch": args.batch,
        "compile_s": lower_s + xla_compile_s,
        "lower_s": lower_s,
        "xla_compile_s": xla_compile_s,
        "compile_cpu_s": compile_cpu_s,
        "note": note,
      }
    )
    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
  return rows


RUNNERS = {
  "prune": prune_rows,
  "finetune": finetune_rows,
  "pgd": lambda args: [attack_row(args, "pgd")],
  "apgd": lambda args: [attack_row(args, "apgd")],
  "topk": topk_rows,
  "width": width_rows,
  "k": k_rows,
  "memory": memory_rows,
  "bounds": bounds_rows,
  "smoothing": smoothing_rows,
  "input": input_rows,
  "compile": compile_rows,
}


# ----------------------------------------------------------------------------------------------------------
# Output.


def format_table(rows: list[dict]) -> str:
  """Fixed-width text table of COLUMNS (numbers right-aligned, text left-aligned, blank when missing)."""
  cells = [[name for name, _ in COLUMNS]]
  cells += [[fmt.format(row[name]) if row.get(name) is not None else "" for name, fmt in COLUMNS] for row in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
  align = lambda name, text, width: text.ljust(width) if name in TEXT_COLUMNS else text.rjust(width)
  return "\n".join(
    "  ".join(align(name, line[i], widths[i]) for i, (name, _) in enumerate(COLUMNS)).rstrip() for line in cells
  )


def machine_info() -> dict:
  """Where the numbers come from: `benchmarks.machine.describe()` (device, CPU model and ISA, XLA's ISA, versions,
  load average) and torch's thread count."""
  return {**machine.describe(), "torch_threads": torch.get_num_threads()}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  csv = lambda cast: lambda text: [cast(v) for v in text.split(",") if v]
  parser.add_argument("--workloads", type=csv(str), default=list(WORKLOADS))
  parser.add_argument("--models", type=csv(str), default=["resnet18", "wrn_28_4"])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side, after one warm-up call")
  parser.add_argument("--k", type=float, default=0.01, help="fraction of weights kept")
  parser.add_argument("--attack-steps", type=int, default=10, help="TRADES attack steps of the train steps")
  parser.add_argument("--pgd-steps", type=int, default=50)
  parser.add_argument("--apgd-steps", type=int, default=100)
  parser.add_argument(
    "--attack-warmup-steps",
    type=int,
    default=0,
    help="pgd, apgd: warm each side up with this many steps on the same batch instead of a full attack (0: full)",
  )
  parser.add_argument("--sizes", type=csv(lambda v: int(float(v))), default=[10**e for e in range(3, 8)])
  parser.add_argument("--wrn-depth", type=int, default=28)
  parser.add_argument("--widths", type=csv(int), default=[2, 4, 10])
  parser.add_argument("--ks", type=csv(float), default=[0.1, 0.05, 0.01])
  parser.add_argument("--matmul-size", type=int, default=2048, help="side of the roofline matmul")
  parser.add_argument("--input-images", type=int, default=64, help="JPEGs per call of the input workload")
  parser.add_argument("--bounds-model", default="cnn_large", help="the bounds workload's model (a basic CNN)")
  parser.add_argument(
    "--compare-xla-conv",
    action="store_true",
    help="train steps: also time hydra_jax with Conv2d(weight_grad='xla') (jax_xla_conv_s)",
  )
  parser.add_argument(
    "--compare-xla-defaults",
    action="store_true",
    help="train steps: also time hydra_jax compiled with XLA's default options (jax_xla_defaults_s, _plan_mb)",
  )
  parser.add_argument(
    "--attack-chunk-size",
    type=int,
    default=0,
    help="examples per chunk of hydra_jax's attacks (0: the backend's attack_chunk in hydra_jax.backend_knobs)",
  )
  parser.add_argument(
    "--compare-whole-batch-attack",
    action="store_true",
    help="train steps, pgd, apgd: also time hydra_jax's attack on the whole batch at once (jax_whole_batch_s)",
  )
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument("--tiny", action="store_true", help="toy sizes: " + " ".join(TINY))
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  if args.tiny:
    args = parser.parse_args(TINY + argv)
  unknown = set(args.workloads) - set(WORKLOADS)
  if unknown:
    parser.error(f"unknown workloads {sorted(unknown)}; valid: {', '.join(WORKLOADS)}")
  return args


def main(argv=None) -> dict:
  """Runs the chosen workloads, prints the table, writes --json; returns {'machine', 'args', 'rows'}."""
  args = parse_args(argv)
  # As the CLI: the partitionable threefry PRNG compiles for seconds per random op on CPU.
  jax.config.update("jax_threefry_partitionable", False)
  result = {"machine": machine_info(), "args": vars(args), "rows": []}
  print(f"{machine.header(result['machine'])}; median of {args.repeats} alternating calls each", flush=True)
  for workload in args.workloads:
    result["rows"].extend(RUNNERS[workload](args))
  result["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(format_table(result["rows"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
