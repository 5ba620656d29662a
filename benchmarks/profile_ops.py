"""Where a workload's time goes: the prune step and APGD-CE of `benchmarks/bench_isa.py` under the JAX profiler,
per HLO op kind and per op, with the convolutions' and matmuls' rate against this run's matmul rate.

Run: python -m benchmarks.profile_ops [--model resnet18] [--batch 32] [--attack-steps 2] [--apgd-steps 5]
                                      [--workloads prune,apgd] [--setting native|avx2] [--top 10] [--torch]

`--setting avx2` sets bench_isa's AVX2 environment (`XLA_FLAGS=--xla_cpu_max_isa=AVX2`, `ATEN_CPU_CAPABILITY=avx2`)
before jax is imported: run each setting in a process of its own. Each workload is compiled (bench_isa's
builders, the default knobs), called once to warm up, then once under `jax.profiler.trace`. XLA:CPU records one
event per executed thunk (an HLO instruction of the compiled module: a fusion, a convolution, a copy, a while
loop, ...), and for a thunk it runs asynchronously (Eigen convolutions, matmuls, copies, some loop fusions) an
'end:' event when its work is done. Each op is in flight from its start to its end; the traced span is cut at
every start and end and each piece's time split equally among the ops in flight then (a while loop gets only the
time when none of its body ops is in flight), so the seconds of all ops and the idle time (no op in flight) add up
to the span. An approximation where ops overlap: an asynchronous op waiting for a busy thread pool is counted as
in flight. The tables:
  per op kind  seconds, share of the span, executions, and for convolutions and dots the GFLOP executed
               (2 x output elements x kernel taps x input channels from the HLO shapes: every tap, also those on
               padding or on the zeros of an lhs_dilate, as `machine.jaxpr_flops` counts), their GFLOP/s and
               that rate as a fraction of the run's matmul rate;
  top ops      the `--top` slowest ops: name, kind, output shape (and operand shapes of a conv or dot).
`--torch`: the PyTorch side of the same workload (bench_isa's: the original HYDRA step, torchattacks' APGD) under
torch.profiler: self CPU seconds per aten op kind.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from typing import NamedTuple

DATA_MOVEMENT = frozenset(
  "copy transpose slice dynamic-slice dynamic-update-slice concatenate pad broadcast reshape bitcast reverse "
  "iota parameter constant get-tuple-element tuple convert".split()
)
REDUCTIONS = frozenset({"reduce", "reduce-window", "select-and-scatter"})
CONTROL_FLOW = frozenset({"while", "conditional", "call"})
KINDS = (
  "convolution",
  "convolution (YNNPACK)",
  "dot",
  "dot (YNNPACK)",
  "fusion: elementwise",
  "fusion: elementwise + transpose",
  "fusion: reduce",
  "copy/transpose",
  "reduce",
  "custom-call",
  "while/conditional",
  "other",
)


class Instruction(NamedTuple):
  """One HLO instruction of a compiled module's text: its output `shape` (the text, e.g. 'f32[8,16]{1,0}'),
  `operands` (names), `attrs` (the text after the operands) and `calls` (the computation a fusion runs, or '')."""

  name: str
  opcode: str
  shape: str
  operands: tuple[str, ...]
  attrs: str
  calls: str


class Module(NamedTuple):
  """A compiled HLO module: its name, {instruction name: Instruction} over all computations, and {computation
  name: [instruction names]}."""

  name: str
  instructions: dict[str, Instruction]
  computations: dict[str, list[str]]


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in HLO line: {text!r}")


def parse_instruction(line: str) -> Instruction | None:
  """The Instruction of one line of HLO text ('  [ROOT ]%name = shape opcode(operands), attrs'); None otherwise."""
  match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$", line)
  if not match:
    return None
  name, rest = match.groups()
  shape_end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
  opcode_end = rest.index("(")
  operands_end = _closing(rest, opcode_end)
  attrs = rest[operands_end + 1 :]
  calls = re.search(r"\bcalls=%([\w.\-]+)", attrs)
  return Instruction(
    name,
    rest[:opcode_end],
    shape,
    tuple(re.findall(r"%([\w.\-]+)", rest[opcode_end:operands_end])),
    attrs,
    calls.group(1) if calls else "",
  )


def parse_module(text: str) -> Module:
  """The Module of a compiled program's HLO text (`compiled.as_text()`)."""
  name = re.match(r"HloModule ([\w.\-]+)", text)
  if not name:
    raise ValueError("not HLO module text: it does not begin with 'HloModule NAME'")
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
      continue
    instruction = parse_instruction(line) if current is not None else None
    if instruction:
      instructions[instruction.name] = instruction
      current.append(instruction.name)
  return Module(name.group(1), instructions, computations)


def dims(shape: str) -> tuple[int, ...]:
  """The dimensions of an array shape's text: 'f32[8,16]{1,0}' -> (8, 16); 'f32[]' -> ()."""
  match = re.match(r"\w+\[([\d,]*)\]", shape)
  if not match:
    raise ValueError(f"not an array shape: {shape!r}")
  return tuple(int(d) for d in match.group(1).split(",") if d)


def _attr(attrs: str, key: str) -> str:
  match = re.search(rf"\b{key}=([^ ,]+)", attrs)
  return match.group(1) if match else ""


def op_flops(instruction: Instruction, module: Module) -> int:
  """Multiply-add FLOPs (2 per product) of one execution: a dot (2 x output elements x contracted size), a
  convolution (2 x output elements x kernel elements / output features: every tap, padding included, as
  `machine.jaxpr_flops` counts), a fusion's sum over the computation it calls; 0 for anything else."""
  shape_of = lambda name: dims(module.instructions[name].shape)
  if instruction.opcode == "dot":
    contracting = [int(d) for d in _attr(instruction.attrs, "lhs_contracting_dims").strip("{}").split(",") if d]
    lhs = shape_of(instruction.operands[0])
    return 2 * math.prod(dims(instruction.shape)) * math.prod(lhs[d] for d in contracting)
  if instruction.opcode == "convolution":
    kernel_labels = _attr(instruction.attrs, "dim_labels").split("_")[1].split("->")[0]
    kernel = shape_of(instruction.operands[1])
    return 2 * math.prod(dims(instruction.shape)) * math.prod(kernel) // kernel[kernel_labels.index("o")]
  if instruction.opcode == "fusion":
    return sum(op_flops(module.instructions[n], module) for n in module.computations[instruction.calls])
  return 0


def _opcodes(instruction: Instruction, module: Module) -> set[str]:
  """The opcodes an instruction runs: a fusion's (nested fusions included), else its own."""
  if instruction.opcode != "fusion":
    return {instruction.opcode}
  return set().union(*(_opcodes(module.instructions[n], module) for n in module.computations[instruction.calls]))


def op_kind(instruction: Instruction, module: Module) -> str:
  """One of KINDS: a fusion by what it runs (a convolution or dot first, '(YNNPACK)' where XLA:CPU hands the
  fusion to the YNNPACK library, then data movement only, then any reduction, then elementwise ops with or
  without a layout change), an unfused op by its opcode."""
  opcodes = _opcodes(instruction, module)
  for kind in ("convolution", "dot"):
    if kind in opcodes:
      return kind + (" (YNNPACK)" if "__ynn_fusion" in instruction.attrs else "")
  if opcodes <= DATA_MOVEMENT:
    return "copy/transpose"
  if instruction.opcode == "fusion" and opcodes & REDUCTIONS:
    return "fusion: reduce"
  if instruction.opcode == "fusion":
    return "fusion: elementwise" + (" + transpose" if "transpose" in opcodes else "")
  if opcodes & REDUCTIONS:
    return "reduce"
  if instruction.opcode == "custom-call":
    return "custom-call"
  if instruction.opcode in CONTROL_FLOW:
    return "while/conditional"
  return "other"


class Event(NamedTuple):
  """One executed HLO op of a trace: its name, when it started and when the thunk executor saw it done (ns).
  XLA:CPU runs some thunks asynchronously (Eigen convolutions, matmuls, copies, some loop fusions): their event
  ends when the work is handed to the thread pool, their 'end: NAME' event when it is done; the op is in flight in
  between."""

  name: str
  start_ns: float
  end_ns: float


def attributed_times(events: list[Event], background=frozenset()) -> tuple[dict[str, tuple[float, int]], float]:
  """({op name: (seconds, executions)}, idle seconds): the trace's span cut at every start and end, each piece's
  time split equally among the ops in flight then; ops named in `background` (while loops, which are in flight
  while their body runs) get time only when no other op is in flight; idle: no op in flight. The seconds and
  the idle time add up to the span from the first start to the last end."""
  seconds, executions = {}, {}
  for event in events:
    executions[event.name] = executions.get(event.name, 0) + 1
    seconds.setdefault(event.name, 0.0)
  boundaries = sorted({t for e in events for t in (e.start_ns, e.end_ns)})
  pending, active, idle_ns = sorted(events, key=lambda e: e.start_ns), [], 0.0
  for left, right in zip(boundaries, boundaries[1:]):
    while pending and pending[0].start_ns <= left:
      active.append(pending.pop(0))
    active = [e for e in active if e.end_ns > left]
    running = [e for e in active if e.name not in background] or active
    for event in running:
      seconds[event.name] += (right - left) / len(running)
    idle_ns += 0.0 if running else right - left
  return {name: (ns / 1e9, executions[name]) for name, ns in seconds.items()}, idle_ns / 1e9


def loop_names(module: Module) -> set[str]:
  """The names of `module`'s while loops, conditionals and calls: in flight while their body's ops run."""
  return {name for name, instruction in module.instructions.items() if instruction.opcode in CONTROL_FLOW}


class OpRow(NamedTuple):
  """One op's (or one kind's) totals: attributed seconds (`attributed_times`), executions, FLOPs executed."""

  name: str
  kind: str
  seconds: float
  executions: int
  flops: int


def op_rows(times: dict[str, tuple[float, int]], module: Module) -> list[OpRow]:
  """An OpRow per op of `times` (`attributed_times`), slowest first; ops missing from `module` are an error."""
  missing = sorted(set(times) - set(module.instructions))
  if missing:
    raise ValueError(f"trace ops not in module {module.name}: {missing[:5]}")
  rows = []
  for name, (seconds, executions) in times.items():
    instruction = module.instructions[name]
    flops = op_flops(instruction, module) * executions
    rows.append(OpRow(name, op_kind(instruction, module), seconds, executions, flops))
  return sorted(rows, key=lambda row: -row.seconds)


def kind_rows(rows: list[OpRow]) -> list[OpRow]:
  """One OpRow per kind of KINDS present in `rows`, in KINDS' order (name = kind)."""
  totals = []
  for kind in KINDS:
    members = [row for row in rows if row.kind == kind]
    if members:
      totals.append(
        OpRow(
          kind,
          kind,
          sum(r.seconds for r in members),
          sum(r.executions for r in members),
          sum(r.flops for r in members),
        )
      )
  return totals


def _rate_cells(row: OpRow, matmul_gflops: float) -> list[str]:
  if not row.flops:
    return ["", "", ""]
  rate = row.flops / row.seconds / 1e9 if row.seconds else float("nan")
  return [f"{row.flops / 1e9:.1f}", f"{rate:.1f}", f"{rate / matmul_gflops:.2f}"]


def kind_table(rows: list[OpRow], idle_s: float, matmul_gflops: float, wall_s: float) -> str:
  """Markdown: per op kind its seconds, share of the traced span, executions and the conv/dot rates; then the
  idle time (no op in flight) and the span (all ops and idle; `wall_s`: the call's wall time around it)."""
  kinds = kind_rows(rows)
  span = sum(row.seconds for row in kinds) + idle_s
  lines = [
    "| op kind | s | share | executions | GFLOP | GFLOP/s | of matmul rate |",
    "|---|---|---|---|---|---|---|",
  ]
  for row in kinds:
    cells = [f"{row.seconds:.3f}", f"{row.seconds / span:.3f}", str(row.executions)]
    lines.append(f"| {row.name} | " + " | ".join(cells + _rate_cells(row, matmul_gflops)) + " |")
  lines.append(f"| no op in flight | {idle_s:.3f} | {idle_s / span:.3f} | | | | |")
  summary = OpRow("all", "all", span, sum(row.executions for row in kinds), sum(row.flops for row in kinds))
  lines.append(
    f"| span (call's wall {wall_s:.3f} s) | {span:.3f} | 1.000 | {summary.executions} | "
    + " | ".join(_rate_cells(summary, matmul_gflops))
    + " |"
  )
  return "\n".join(lines)


def _shapes(name: str, module: Module) -> str:
  """'output shape' of an op; for a conv or dot (fused or not) also 'lhs x rhs' of the first one it runs."""
  instruction = module.instructions[name]
  inner = [instruction]
  if instruction.opcode == "fusion":
    inner = [module.instructions[n] for n in module.computations[instruction.calls]]
  products = [i for i in inner if i.opcode in ("convolution", "dot")]
  out = instruction.shape.split("{")[0]
  if not products:
    return out
  operands = [module.instructions[n].shape.split("{")[0] for n in products[0].operands[:2]]
  return f"{out} = {products[0].opcode}({', '.join(operands)})"


def top_table(rows: list[OpRow], module: Module, matmul_gflops: float, count: int) -> str:
  """Markdown: the `count` slowest ops with their kind, shapes, executions, seconds, share of all ops' seconds
  and rates."""
  total = sum(row.seconds for row in rows)
  lines = [
    "| op | kind | shape | executions | s | share | GFLOP/s | of matmul rate |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in rows[:count]:
    rate = _rate_cells(row, matmul_gflops)[1:]
    cells = [row.name, row.kind, _shapes(row.name, module), str(row.executions), f"{row.seconds:.3f}"]
    lines.append("| " + " | ".join(cells + [f"{row.seconds / total:.3f}", *rate]) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Tracing (jax imported here, after --setting set XLA_FLAGS).


def trace_events(call, module_name: str) -> tuple[list[Event], float]:
  """(the Events of `module_name`'s ops while `call()` runs once under jax.profiler.trace, its wall seconds)."""
  import glob

  import jax

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      call()
      wall = time.perf_counter() - start
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  starts, done = [], {}  # (name, start, end, flow id) of each op; {flow id: when its 'end:' event began}
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module") == module_name and "hlo_op" in stats:
          starts.append((stats["hlo_op"], event.start_ns, event.start_ns + event.duration_ns, stats.get("_p")))
        elif event.name.startswith("end: ") and "_c" in stats:
          done[stats["_c"]] = event.start_ns
  return [Event(name, start, max(end, done.get(flow, end))) for name, start, end, flow in starts], wall


def profile_compiled(compiled, call, matmul_gflops: float, top: int) -> str:
  """The two tables of `call()` (which runs `compiled` once), after one warm-up call."""
  module = parse_module(compiled.as_text())
  call()
  events, wall = trace_events(call, module.name)
  times, idle = attributed_times(events, loop_names(module))
  rows = op_rows(times, module)
  return kind_table(rows, idle, matmul_gflops, wall) + "\n\n" + top_table(rows, module, matmul_gflops, top)


def torch_kind(op_name: str) -> str:
  """The kind of a torch.profiler op name: convolution, matmul, batch norm, or other."""
  if "conv" in op_name:
    return "convolution"
  if op_name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
    return "matmul"
  if "batch_norm" in op_name:
    return "batch norm"
  return "other"


def torch_table(call) -> str:
  """Markdown: self CPU seconds per op kind (and the three slowest aten ops) of one `call()` after a warm-up."""
  import torch

  call()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    start = time.perf_counter()
    call()
    wall = time.perf_counter() - start
  averages = sorted(profile.key_averages(), key=lambda a: -a.self_cpu_time_total)
  total = sum(a.self_cpu_time_total for a in averages) / 1e6
  kinds: dict[str, float] = {}
  for average in averages:
    kind = torch_kind(average.key)
    kinds[kind] = kinds.get(kind, 0.0) + average.self_cpu_time_total / 1e6
  lines = ["| torch op kind | self CPU s | share |", "|---|---|---|"]
  lines += [f"| {kind} | {s:.3f} | {s / total:.3f} |" for kind, s in sorted(kinds.items(), key=lambda kv: -kv[1])]
  lines.append(f"| all (wall {wall:.3f} s) | {total:.3f} | 1.000 |")
  lines += [
    f"| slowest op: {a.key} | {a.self_cpu_time_total / 1e6:.3f} | {a.self_cpu_time_total / 1e6 / total:.3f} |"
    for a in averages[:3]
  ]
  return "\n".join(lines)


def workload_programs(args) -> dict[str, tuple]:
  """{title: (compiled, call, torch call)} of each workload of --workloads, built by bench_isa's builders."""
  from benchmarks import bench_isa
  from benchmarks import bench_vs_torch as bvt

  host_batch = bvt.random_batch(args.batch)
  programs = {}
  for workload in args.workloads.split(","):
    if workload == "prune":
      side = bench_isa.prune_side(args, "default", host_batch)
      torch_call = (
        bvt.torch_step_call(args.model, "prune", args.k, host_batch, args.attack_steps) if args.torch else None
      )
      programs[f"prune step, TRADES-{args.attack_steps}, k={args.k}"] = (side["compiled"], side["call"], torch_call)
    else:
      attack, inputs = bench_isa.apgd_attack(args, host_batch)
      compiled = bench_isa.apgd_compiled(attack, inputs, "default", args.batch)
      torch_call = bench_isa.torch_apgd_call(args, host_batch) if args.torch else None
      call = lambda compiled=compiled, inputs=inputs: compiled(*inputs).block_until_ready()
      programs[f"APGD-CE-{args.apgd_steps}"] = (compiled, call, torch_call)
  return programs


def parse_args(argv=None) -> argparse.Namespace:
  from benchmarks import bench_isa

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--attack-steps", type=int, default=2, help="TRADES attack steps of the prune step")
  parser.add_argument("--apgd-steps", type=int, default=5)
  parser.add_argument("--k", type=float, default=0.01)
  parser.add_argument("--workloads", default="prune,apgd")
  parser.add_argument("--setting", default="native", choices=list(bench_isa.SETTINGS))
  parser.add_argument("--top", type=int, default=10, help="how many of the slowest ops to list")
  parser.add_argument("--torch", action="store_true", help="also profile the PyTorch side")
  args = parser.parse_args(argv)
  unknown = set(args.workloads.split(",")) - {"prune", "apgd"}
  if unknown:
    parser.error(f"unknown workloads {sorted(unknown)}; valid: prune, apgd")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  from benchmarks import bench_isa

  for variable, value in bench_isa.SETTINGS[args.setting].items():
    if "jax" in sys.modules and os.environ.get(variable) != value:
      raise RuntimeError(f"--setting {args.setting} needs {variable}={value} before jax is imported")
    os.environ[variable] = value
  import jax

  from benchmarks import machine

  jax.config.update("jax_threefry_partitionable", False)
  if args.torch:
    import torch  # noqa: F401  (imported before describe(): the header then names its ATen ISA)
  matmul = machine.matmul_gflops()
  print(machine.header(machine.describe(), matmul), flush=True)
  print(f"{args.model}, batch {args.batch}, setting {args.setting}; one profiled call each after a warm-up")
  for title, (compiled, call, torch_call) in workload_programs(args).items():
    print(f"\n{title}\n\n{profile_compiled(compiled, call, matmul, args.top)}", flush=True)
    if torch_call is not None:
      print(f"\n{title}, PyTorch side (torch.profiler)\n\n{torch_table(torch_call)}", flush=True)


if __name__ == "__main__":
  main()
