"""CROWN and CROWN-IBP of hydra_jax.bounds against auto_LiRPA 0.3 on the same network and CPU in one run: time and
peak memory.

Run: python -m benchmarks.bench_bounds_lirpa [--model resnet18] [--width 1] [--size 32] [--batch 32]
         [--methods crown_ibp,crown] [--repeats 2] [--timeout 1200] [--lirpa-conv-mode patches]
         [--sides ours,auto_LiRPA] [--eval-compiler-options]

The zoo model `--model` (a CIFAR ResNet; `--width` scales every stage's channels, 1 = the paper's ResNet-18) at its
random initialisation, in eval mode, bounded on `--batch` random --size x --size x 3 images, l_inf box of 2/255
clipped to [0, 1], spec the 9 margins z_y - z_j, both ends (each library's default call). Each (method, library)
runs in its own subprocess, so that its peak resident memory (VmHWM) is its own; both load the same weights from
a file written by the parent (no initialisation in the child: flax's eager init alone grows a JAX process by ~200 MB):
  ours        jax.jit(hydra_jax.bounds.<method>) with the weights as arguments (as constants of the program, XLA's
              compilation took 627 MB instead of 237 at full width, 4x4): the first call (trace, compile, run)
              and then --repeats calls;
              with --eval-compiler-options compiled as `hydra-jax eval`'s runners compile it
              (parallel.compiler_options: XLA:CPU's memory-optimized scheduler)
  auto_LiRPA  BoundedModule(twin) and compute_bounds(method=...) on the PyTorch twin (tests/torch_reference.py,
              weights from hydra_jax.convert): the first call (graph conversion, run) and then --repeats calls
Columns: wall seconds of the first call and the median of the repeats; the process's CPU seconds of one repeat (all
threads: steadier than wall on a shared machine); the floor (RSS after importing the library and one trivial
compiled op: jax.jit(x + 1), torch's x + 1), the peak RSS and the peak minus the floor (what bounding the network
took: weights, graph conversion or compilation, and the bound computation's buffers); ratios ours / auto_LiRPA (below
1: ours faster or smaller); the largest difference of the two libraries' bounds relative to their size (the same
bounds, not only the same time). A subprocess past --timeout is reported as
such. Needs torch and auto_LiRPA (tests/lirpa_reference.py: pip install --no-deps auto-lirpa==0.3 appdirs==1.4.4).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIDES = ("ours", "auto_LiRPA")
LIRPA_NAMES = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}
ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma", "sse4_2")


def cpu_description() -> str:
  """'model name; ISA flags present; cores' from /proc/cpuinfo (the platform's processor string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return f"{platform.processor()}; {os.cpu_count()} cores"
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
  flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
  isa = " ".join(flag for flag in ISA_FLAGS if flag in flags) or "none of " + " ".join(ISA_FLAGS)
  return f"{model}; ISA {isa}; {os.cpu_count()} cores"


def _rss_now_mb() -> float:
  """Resident memory of this process now, MB (VmRSS of /proc/self/status; 0 where there is none)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
  except (OSError, StopIteration):
    return 0.0


def _rss_mb() -> float:
  """Peak resident memory of this process so far, MB: VmHWM of /proc/self/status (Linux; ru_maxrss would start at
  the parent's peak, which Linux carries across fork and exec), else ru_maxrss (KiB on Linux, bytes on macOS)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def _timed(call, repeats: int) -> dict:
  """{'first_s', 'steady_s', 'cpu_s'}: wall seconds of the first call, median wall and CPU seconds of the repeats."""
  start = time.perf_counter()
  result = call()
  first = time.perf_counter() - start
  walls, cpus = [], []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    result = call()
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - cpu)
  steady = {"steady_s": statistics.median(walls), "cpu_s": statistics.median(cpus)} if repeats else {}
  return {"first_s": first, **steady, "bounds": result}


def _case(path: str) -> dict:
  with np.load(os.path.join(path, "case.npz")) as case:
    return dict(case)


def _ours(args) -> dict:
  """hydra_jax.bounds.<method> of the case in args.dir, its times and memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from hydra_jax import bounds  # pylint: disable=g-import-not-at-top
  from hydra_jax import models  # pylint: disable=g-import-not-at-top
  from hydra_jax import parallel  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(jax.jit(lambda v: v + 1)(jax.numpy.zeros(3)))
  floor = _rss_now_mb()
  case = _case(args.dir)
  model = models.get_model(args.model, 10, width=args.width)
  with np.load(os.path.join(args.dir, "variables.npz")) as saved:
    variables = traverse_util.unflatten_dict({k: jax.numpy.asarray(v) for k, v in saved.items()}, sep="/")
  method = bounds.METHODS[args.method]

  def bound(weights, lo, hi, spec):  # weights as arguments, as eval's runners take them, not program constants
    return jax.numpy.stack(method(lambda x: model.apply(weights, x, train=False), lo, hi, spec))

  options = parallel.compiler_options(jax.devices()[0].platform) if args.eval_compiler_options else None
  bound = jax.jit(bound, compiler_options=options)
  lower, upper, spec = (jax.numpy.asarray(case[k]) for k in ("lower", "upper", "spec"))
  found = _timed(lambda: np.asarray(jax.block_until_ready(bound(variables, lower, upper, spec))), args.repeats)
  return {**found, "floor_mb": floor, "peak_mb": _rss_mb()}


def _lirpa(args) -> dict:
  """auto_LiRPA's compute_bounds(method) on the PyTorch twin, its times and memory."""
  import torch  # pylint: disable=g-import-not-at-top

  from tests import lirpa_reference  # pylint: disable=g-import-not-at-top

  auto_lirpa = lirpa_reference.import_auto_lirpa()
  _ = torch.zeros(3) + 1
  floor = _rss_now_mb()
  case = _case(args.dir)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  twin = lirpa_reference.scaled_twin(args.model, 10, args.width)
  state = np.load(os.path.join(args.dir, "state.npz"))
  twin.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files}, strict=True)
  x, spec = nchw(case["x"]), torch.from_numpy(case["spec"])
  box = auto_lirpa.PerturbationLpNorm(norm=np.inf, x_L=nchw(case["lower"]), x_U=nchw(case["upper"]))
  options = {"conv_mode": args.lirpa_conv_mode}
  module = []

  def call():
    if not module:  # the first call converts the graph, as any use of auto_LiRPA must
      module.append(auto_lirpa.BoundedModule(twin.eval(), x, device="cpu", bound_opts=options))
    inputs = (auto_lirpa.BoundedTensor(x, box),)
    lb, ub = module[0].compute_bounds(x=inputs, C=spec, method=LIRPA_NAMES[args.method])
    return np.stack([lb.detach().numpy(), ub.detach().numpy()])

  with torch.no_grad():
    found = _timed(call, args.repeats)
  return {**found, "floor_mb": floor, "peak_mb": _rss_mb()}


def _model_and_variables(name: str, width: float, size: int):
  """The zoo model and its random initialisation (seed 0) for size x size x 3 inputs."""
  import jax  # pylint: disable=g-import-not-at-top

  from hydra_jax import models  # pylint: disable=g-import-not-at-top

  model = models.get_model(name, 10, width=width)
  return model, model.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3)), train=False)


def _write_case(args) -> None:
  """The inputs, box, spec, our variables and the twin's state dict, for the subprocesses (args.dir)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from hydra_jax import bounds  # pylint: disable=g-import-not-at-top
  from hydra_jax import convert  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  eps = 2 / 255
  spec = np.asarray(bounds.margin_spec(jax.numpy.asarray(rng.integers(0, 10, args.batch)), 10))
  lower, upper = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
  np.savez(os.path.join(args.dir, "case.npz"), x=x, lower=lower, upper=upper, spec=spec)
  _, variables = _model_and_variables(args.model, args.width, args.size)
  flat = traverse_util.flatten_dict(variables, sep="/")
  np.savez(os.path.join(args.dir, "variables.npz"), **{k: np.asarray(v) for k, v in flat.items()})
  shape = (args.size, args.size, 3)
  state = convert.to_torch_state_dict(variables, model_name=args.model, input_shape=shape)
  np.savez(os.path.join(args.dir, "state.npz"), **{k: np.asarray(v) for k, v in state.items()})


def _child_argv(args, side: str, method: str) -> list[str]:
  return [
    sys.executable, "-m", "benchmarks.bench_bounds_lirpa", "--child", side, "--method", method, "--dir", args.dir,
    "--model", args.model, "--width", str(args.width), "--size", str(args.size), "--batch", str(args.batch),
    "--repeats", str(args.repeats), "--lirpa-conv-mode", args.lirpa_conv_mode,
    *(["--eval-compiler-options"] if args.eval_compiler_options else []),
  ]  # fmt: skip


def _run_child(args, side: str, method: str) -> dict:
  """The child's JSON result, or {'error': why}."""
  try:
    done = subprocess.run(
      _child_argv(args, side, method), capture_output=True, text=True, timeout=args.timeout, check=False
    )
  except subprocess.TimeoutExpired:
    return {"error": f"past --timeout {args.timeout} s"}
  if done.returncode:
    return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _relative_gap(ours: list, theirs: list) -> float:
  """max |ours - theirs| / |theirs| (floored at 1e-2 of its mean size) over both ends."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  scale = np.maximum(np.abs(theirs), 1e-2 * np.mean(np.abs(theirs)))
  return float(np.max(np.abs(ours - theirs) / scale))


def _load() -> str:
  return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def table(results: dict, args, header: list[str]) -> str:
  """Rows per (method, library) and the ratio rows, after the header lines."""
  lines = [*header, f"{'method':<10} {'library':<11} {'first s':>8} {'steady s':>9} {'cpu s':>8} {'floor MB':>8}"
           f" {'peak MB':>8} {'+MB':>7}  note"]  # fmt: skip
  fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"
  for method in args.methods:
    for side in args.sides:
      r = results[method][side]
      if "error" in r:
        lines.append(f"{method:<10} {side:<11} {r['error']}")
        continue
      grown = r["peak_mb"] - r["floor_mb"]
      cells = [r["first_s"], r.get("steady_s"), r.get("cpu_s"), r["floor_mb"], r["peak_mb"], grown]
      cells = [fmt(c) for c in cells]
      lines.append(
        f"{method:<10} {side:<11} {cells[0]:>8} {cells[1]:>9} {cells[2]:>8} {cells[3]:>8} {cells[4]:>8} {cells[5]:>7}"
      )
    ours, theirs = results[method].get("ours", {"error": ""}), results[method].get("auto_LiRPA", {"error": ""})
    if "error" in ours or "error" in theirs:
      continue
    keys = ("first_s", "steady_s", "cpu_s", "floor_mb", "peak_mb")
    ratios = [fmt(ours[k] / theirs[k]) if k in ours else "-" for k in keys]
    their_growth = theirs["peak_mb"] - theirs["floor_mb"]
    growth = fmt((ours["peak_mb"] - ours["floor_mb"]) / their_growth) if their_growth >= 1 else "-"
    gap = _relative_gap(ours["bounds"], theirs["bounds"])
    lines.append(
      f"{method:<10} {'ours/theirs':<11} {ratios[0]:>8} {ratios[1]:>9} {ratios[2]:>8} {ratios[3]:>8} {ratios[4]:>8}"
      f" {growth:>7}"
      f"  bounds differ by {gap:.1e} relative"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--methods", default="crown_ibp,crown", type=lambda s: s.split(","))
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=1200)
  parser.add_argument("--lirpa-conv-mode", default="patches", choices=("patches", "matrix"))
  parser.add_argument("--eval-compiler-options", action="store_true", help="compile ours as eval's runners do")
  parser.add_argument("--sides", default=",".join(SIDES), type=lambda s: s.split(","), help="run these sides only")
  parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
  parser.add_argument("--method", help=argparse.SUPPRESS)
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    result = (_ours if args.child == "ours" else _lirpa)(args)
    print(json.dumps({**result, "bounds": result["bounds"].tolist()}))
    return
  unknown = [m for m in args.methods if m not in LIRPA_NAMES]
  if unknown:
    parser.error(f"unknown methods {unknown}; valid: {sorted(LIRPA_NAMES)}")
  if not args.sides or set(args.sides) - set(SIDES):
    parser.error(f"unknown sides {args.sides}; valid: {list(SIDES)}")
  header = [
    f"CPU {cpu_description()}; {_load()} at start",
    f"{args.model} width {args.width:g}, {args.size}x{args.size}x3 inputs, batch {args.batch}, eps 2/255, 9 margins;"
    f" auto_LiRPA conv_mode {args.lirpa_conv_mode}; {args.repeats} repeats"
    f"{'; ours with eval compiler options' if args.eval_compiler_options else ''}",
  ]
  with tempfile.TemporaryDirectory() as directory:
    args.dir = directory
    _write_case(args)
    results = {m: {side: _run_child(args, side, m) for side in args.sides} for m in args.methods}
  print(table(results, args, header + [f"{_load()} at end"]))


if __name__ == "__main__":
  main()
