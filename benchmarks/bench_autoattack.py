"""Full AutoAttack: hydra_jax's `autoattack` method against torchattacks 3.5.1 on the same model, same process.

Run from the repository root (torch and torchattacks are benchmark-only extras):

  python -m benchmarks.bench_autoattack --run runs/digits_demo/k0.05/finetune     # the README main job's HYDRA model
  python -m benchmarks.bench_autoattack --model resnet18 --batch 128 --examples 128  # random ResNet-18, CIFAR size
  python -m benchmarks.bench_autoattack --tiny                                      # toy counts, a minute on a CPU

Any count can be set (--apgd_steps, --fab_steps, --square_queries, --num_targets; the same on both sides), e.g.
for a speed row at reduced counts on a slow CPU.

The model: a finished run (`--run`; its eval split, eps and norm) or a zoo model with random weights on random
CIFAR-shaped inputs (`--model`; the speed comparison of issue 28). It is exported to PyTorch through
`convert.to_torch_state_dict` into the independent re-statement of the reference architectures
(`tests/torch_reference.py`; the basic CNNs at the run's input size), and the logits of the two are compared
first. Then, on the first --examples test images, in batches of --batch:

  hydra_jax   `evaluate.evaluate_per_example(..., methods=('autoattack',))`: APGD-CE -> APGD-T -> FAB-T -> Square,
              each on the examples still robust, in one program per batch (what `hydra-jax eval --methods=autoattack`
              runs); the time includes compilation (reported separately: a second, compiled pass).
  torchattacks the same sequence as torchattacks' MultiAttack runs it (each attack on the examples still robust):
              APGD(loss='ce'), APGDT, FAB(multi_targeted=True), Square, at the same counts. torchattacks'
              `AutoAttack(version='standard')` itself builds its APGD, APGDT and FAB with their default steps=10,
              not the paper's 100, so the benchmark builds the sequence with the counts written out.

Reported: robust accuracy after each stage on each side, the final difference in points (issue 28 asks that
hydra_jax be no weaker: at most +0.2 points above torchattacks), and the seconds of each side.

With --square_seeds N the torchattacks sequence is replaced by a comparison of Square alone over seeds 0..N-1:
on the examples that hydra_jax's white-box stages (APGD-CE, APGD-T, FAB-T) left robust, hydra_jax's `square` and
torchattacks' `Square` at the same queries, each seed on both sides; reported: the robust count per seed, the
mean and standard deviation of each side, and how often each side broke each example. A gap in the final
number that is within the seed-to-seed spread of Square is the luck of the random draw, not a weaker attack:

  python -m benchmarks.bench_autoattack --run runs/digits_demo/k0.05/finetune --examples 360 --square_seeds 5

With --against_whole_batch the torchattacks side is replaced by hydra_jax's own former way: every attack on the
whole batch, the examples already broken masked (`autoattack(chunk_size=batch)`), against the default, each
attack on the robust examples gathered into chunks with the empty chunks skipped; alternating, --repeats timed
passes each, and the verdicts per example compared:

  python -m benchmarks.bench_autoattack --run runs/digits_demo/k0.05/finetune --examples 360 --batch 120 \
      --against_whole_batch --repeats 2

With --each_on_all the sequence is replaced by the speed comparison of each attack alone on all the examples
correct clean, on both sides: in the sequence, later attacks see only what earlier ones left robust (on a model
that APGD-CE breaks, nothing), so the sequence's seconds say little about FAB-T or Square. The two sides run
attack by attack (hydra_jax's, then torchattacks'; --stages picks some). Per attack: the robust count after it
on each side, the seconds, the ratio, the seconds per step (APGD-T and FAB-T: per target and iteration; Square:
per query of --square_queries), hydra_jax's compilation separately (`jit(...).lower(...).compile()`, the run
then timed once), the FLOPs counted from the program's jaxpr and their rate over the matmul rate measured just
before the run (the roofline fraction; not for Square, whose query loop is a while loop that stops early), and
an extrapolation to the paper's counts (seconds per step x 100 APGD-CE iterations, 9 x 100 for APGD-T and
FAB-T, 5000 Square queries): each attack on every example, an upper bound of the sequence at the paper's
counts. Both sides stop Square per example once misclassified (torchattacks runs each query on the examples
still searching; hydra_jax masks them and ends the loop when none is left), so its seconds per query hold for
a model that Square does not break early. The speed row of issue 28:

  python -m benchmarks.bench_autoattack --model resnet18 --batch 128 --examples 128 --each_on_all \\
      --apgd_steps 10 --fab_steps 10 --num_targets 1 --square_queries 100
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine
from hydra_jax import attacks
from hydra_jax import autoattack
from hydra_jax import convert
from hydra_jax import evaluate
from hydra_jax import masking
from hydra_jax import models

STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")
FULL = dict(apgd_steps=100, fab_steps=100, square_queries=5000, num_targets=9)
TINY = dict(apgd_steps=5, fab_steps=5, square_queries=50, num_targets=3)


def cpu() -> str:
  """The CPU's model name and widest vector ISA, its core count and the load average (`machine.describe`): where
  the seconds come from."""
  info = machine.describe()
  load = ", ".join(f"{v:.1f}" for v in info["load_average"]) if info["load_average"] else "?"
  return f"{info['cpu']} ({info['cpu_isa']}), {info['cpu_count']} cores, load average {load}"


def _torch_model(name, variables, input_shape, num_classes):
  """The PyTorch re-statement of zoo model `name` with the exported weights, in eval mode."""
  import torch

  from benchmarks import torch_bounds

  if name in torch_bounds.CNNS:  # basic CNNs: the flattened width follows the input size (two halvings)
    convs, hidden = torch_bounds.CNNS[name]
    net = torch_bounds.sequential_cnn(input_shape[2], convs, input_shape[0] // 4, hidden, num_classes)
  else:
    from tests import torch_reference

    net = torch_reference.build(name, num_classes)
  state = convert.to_torch_state_dict(variables, model_name=name, input_shape=input_shape, as_torch=True)
  net.load_state_dict(state, strict=True)
  return net.eval().to(torch.float32)


def _source(args):
  """(apply_fn, variables, model name, images, labels, eps, norm) of the run or of a random zoo model."""
  if args.run:
    from hydra_jax import data
    from hydra_jax import export
    from hydra_jax import sources

    run = export.load_run(args.run)
    batches = sources.eval_split(run.config)
    images, labels = [], []
    for batch in data.iterate(batches, range(batches.num_steps)):
      kept = np.asarray(batch.get("mask", np.ones(len(batch["label"])))) > 0
      images.append(np.asarray(batch["image"])[kept])
      labels.append(np.asarray(batch["label"])[kept])
    x, y = np.concatenate(images)[: args.examples], np.concatenate(labels)[: args.examples]
    eps = run.config.eval.eps if args.eps is None else args.eps
    return run.apply_fn, run.variables, run.config.model.name, x, y, eps, run.config.eval.norm
  model = models.get_model(args.model, 10)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(args.examples, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  scores = masking.init_scores(variables["params"], "scaled", jax.random.key(1))
  variables = {**variables, "params": masking.export_dense(variables["params"], scores, args.k)}
  apply_fn = models.make_apply_fn(model)
  y = np.asarray(jnp.argmax(apply_fn(variables, x, False)[0], -1)).astype(np.int32)  # all correct clean
  return apply_fn, variables, args.model, x, y, 8 / 255 if args.eps is None else args.eps, "linf"


def _torch_attacks(net, eps, norm, counts, seed):
  """torchattacks' APGD(loss='ce'), APGDT, FAB(multi_targeted=True) and Square at `counts`, in STAGES' order.
  The targets: the classes of the 2nd .. (num_targets + 1)-th largest logits, as in hydra_jax."""
  import torchattacks

  torch_norm = {"linf": "Linf", "l2": "L2"}[norm]
  targets = counts["num_targets"]
  return [
    torchattacks.APGD(net, norm=torch_norm, eps=eps, steps=counts["apgd_steps"], n_restarts=1, loss="ce", seed=seed),
    torchattacks.APGDT(
      net, norm=torch_norm, eps=eps, steps=counts["apgd_steps"], n_restarts=1, n_classes=targets + 1, seed=seed
    ),
    torchattacks.FAB(
      net,
      norm=torch_norm,
      eps=eps,
      steps=counts["fab_steps"],
      n_restarts=1,
      multi_targeted=True,
      n_classes=targets + 1,
      seed=seed,
    ),
    torchattacks.Square(net, norm=torch_norm, eps=eps, n_queries=counts["square_queries"], n_restarts=1, seed=seed),
  ]


def attack_steps(counts: dict) -> dict:
  """Gradient steps (APGD, FAB: targets x iterations) or queries (Square) of each stage at `counts`."""
  return {
    "apgd_ce": counts["apgd_steps"],
    "apgd_t": counts["num_targets"] * counts["apgd_steps"],
    "fab_t": counts["num_targets"] * counts["fab_steps"],
    "square": counts["square_queries"],
  }


def _jax_stage(logits_fn, images, labels, keys, name, s, eps, norm, counts) -> dict:
  """Stage `name` (the s-th of the standard sequence) alone on the batch, as `evaluate` runs it: the robust
  count, the seconds of one compiled run, the compilation seconds, and the FLOPs counted from the jaxpr with
  their fraction of the matmul rate measured just before the run (none for Square, whose query loop is a while
  loop)."""
  attack = autoattack._stage_attack(name, 1, eps=eps, norm=norm, p_init=0.8, eot_iter=1, **counts)
  fn = lambda images, labels, keys: attack(logits_fn, images, labels, attacks.fold_in(keys, s))
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(images, labels, keys).compile()
  compile_s = time.perf_counter() - start
  matmul = machine.matmul_gflops()  # the roofline at this moment: the load of a shared machine drifts
  start = time.perf_counter()
  x_adv = compiled(images, labels, keys).block_until_ready()
  seconds = time.perf_counter() - start
  robust = int(jnp.sum(jnp.argmax(logits_fn(x_adv), -1) == labels))
  flops = machine.jaxpr_flops(fn, images, labels, keys) if name != "square" else 0
  return dict(
    robust=robust,
    seconds=seconds,
    compile_s=compile_s,
    flops=flops,
    matmul_gflops=matmul,
    roofline=machine.roofline_fraction(flops, seconds, matmul),
  )


def _torch_stage(attack, net, images, labels) -> dict:
  """torchattacks' `attack` on the batch: the robust count and the seconds."""
  import torch

  start = time.perf_counter()
  adv = attack(images, labels)
  seconds = time.perf_counter() - start
  with torch.no_grad():
    return dict(robust=int((net(adv).argmax(1) == labels).sum()), seconds=seconds)


def _time_each(apply_fn, variables, net, x, y, eps, norm, counts, seed, stages) -> tuple[dict, dict]:
  """Each of `stages` alone on all of (x, y), one batch, hydra_jax then torchattacks attack by attack (so that a
  change of the machine's load falls on both sides of a ratio): ({stage: `_jax_stage` row}, {stage:
  `_torch_stage` row}). hydra_jax sees the model in `attacks.in_chunks` of the backend's size with per-example
  keys, as in `evaluate`; torchattacks runs after one warm-up forward and backward."""
  import torch

  logits_fn = attacks.in_chunks(lambda images: apply_fn(variables, images, False)[0], 0)
  keys = attacks.example_keys(jax.random.PRNGKey(seed), jnp.arange(len(y)))
  images, labels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()
  torch.nn.functional.cross_entropy(net(images.clone().requires_grad_(True)), labels).backward()
  ours, theirs = {}, {}
  for s, (name, attack) in enumerate(zip(STAGES, _torch_attacks(net, eps, norm, counts, seed))):
    if name not in stages:
      continue
    ours[name] = _jax_stage(logits_fn, jnp.asarray(x), jnp.asarray(y), keys, name, s, eps, norm, counts)
    theirs[name] = _torch_stage(attack, net, images, labels)
    print(f"  {name}: hydra_jax {ours[name]}, torchattacks {theirs[name]}", flush=True)
  return ours, theirs


def _report_each(ours, theirs, counts, n) -> dict:
  """Print and return the per-attack seconds of both sides, their ratio, the seconds per step and the
  extrapolation to the paper's counts."""
  steps, paper = attack_steps(counts), attack_steps(FULL)
  table = {}
  for name in ours:
    mine, ref = ours[name], theirs[name]
    table[name] = dict(
      steps=steps[name],
      robust_hydra_jax=mine["robust"],
      robust_torchattacks=ref["robust"],
      hydra_jax_s=mine["seconds"],
      torchattacks_s=ref["seconds"],
      speedup=ref["seconds"] / mine["seconds"],
      hydra_jax_step_s=mine["seconds"] / steps[name],
      torchattacks_step_s=ref["seconds"] / steps[name],
      hydra_jax_paper_s=mine["seconds"] / steps[name] * paper[name],
      torchattacks_paper_s=ref["seconds"] / steps[name] * paper[name],
      compile_s=mine["compile_s"],
      gflops=mine["flops"] / 1e9,
      roofline=mine["roofline"],
      matmul_gflops=mine["matmul_gflops"],
    )
  print(f"Each attack alone on all {n} examples (counts {counts}); roofline: over the f32 matmul rate just before")
  print(
    f"{'attack':8s} {'steps':>5s} {'robust ours/ref':>15s} {'ours s':>8s} {'ref s':>8s} {'ratio':>6s} "
    f"{'ours s/step':>11s} {'ref s/step':>10s} {'compile s':>9s} {'GFLOP':>7s} {'matmul GFLOP/s':>14s} "
    f"{'roofline':>8s} "
    f"{'extrapolated ours/ref s at paper counts':>40s}"
  )
  for name, r in table.items():
    roofline = f"{100 * r['roofline']:7.1f}%" if r["gflops"] else f"{'-':>8s}"
    extrapolated = f"{r['hydra_jax_paper_s']:.0f} / {r['torchattacks_paper_s']:.0f} ({paper[name]} steps)"
    print(
      f"{name:8s} {r['steps']:5d} {r['robust_hydra_jax']:>7d}/{r['robust_torchattacks']:<7d} "
      f"{r['hydra_jax_s']:8.1f} {r['torchattacks_s']:8.1f} {r['speedup']:5.2f}x {r['hydra_jax_step_s']:11.3f} "
      f"{r['torchattacks_step_s']:10.3f} {r['compile_s']:9.1f} {r['gflops']:7.0f} {r['matmul_gflops']:14.1f} "
      f"{roofline} "
      f"{extrapolated:>40s}"
    )
  total_ours = sum(r["hydra_jax_s"] for r in table.values())
  total_ref = sum(r["torchattacks_s"] for r in table.values())
  paper_ours = sum(r["hydra_jax_paper_s"] for r in table.values())
  paper_ref = sum(r["torchattacks_paper_s"] for r in table.values())
  print(
    f"all {len(table)}: hydra_jax {total_ours:.1f} s (+{sum(r['compile_s'] for r in table.values()):.1f} compile), "
    f"torchattacks {total_ref:.1f} s, {total_ref / total_ours:.2f}x; extrapolated to the paper's counts, each "
    f"attack on every example: {paper_ours:.0f} s against {paper_ref:.0f} s"
  )
  return dict(
    per_attack=table, total_speedup=total_ref / total_ours, paper_hydra_jax_s=paper_ours, paper_torchattacks_s=paper_ref
  )


def _torch_sequence(net, x, y, eps, norm, counts, seed):
  """Robust counts after each stage of torchattacks' attacks run as MultiAttack runs them (on the examples still
  robust), and the seconds."""
  import torch

  stages = _torch_attacks(net, eps, norm, counts, seed)
  images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  labels = torch.from_numpy(y).long()
  start = time.perf_counter()
  with torch.no_grad():
    robust = net(images).argmax(1) == labels
  after = []
  for attack in stages:
    index = robust.nonzero().flatten()
    if len(index):
      adv = attack(images[index], labels[index])
      with torch.no_grad():
        robust[index] = net(adv).argmax(1) == labels[index]
    after.append(int(robust.sum()))
  return after, time.perf_counter() - start


def _square_seeds(apply_fn, variables, net, x, y, eps, norm, queries, seeds):
  """Square alone on (x, y) with each seed on both sides: (robust [seeds, N] of hydra_jax, of torchattacks)."""
  import torch
  import torchattacks

  logits_fn = lambda images: apply_fn(variables, images, False)[0]
  attack = jax.jit(
    lambda images, labels, key: autoattack.square(
      logits_fn, images, labels, key=key, eps=eps, norm=norm, queries=queries
    )
  )
  images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  labels = torch.from_numpy(y).long()
  ours, theirs = [], []
  for seed in seeds:
    keys = attacks.example_keys(jax.random.PRNGKey(seed), jnp.arange(len(y)))
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), keys)
    ours.append(np.asarray(jnp.argmax(logits_fn(x_adv), -1)) == y)
    torch_norm = {"linf": "Linf", "l2": "L2"}[norm]
    adv = torchattacks.Square(net, norm=torch_norm, eps=eps, n_queries=queries, n_restarts=1, seed=seed)(images, labels)
    with torch.no_grad():
      theirs.append((net(adv).argmax(1) == labels).numpy())
  return np.stack(ours), np.stack(theirs)


def _report_square_seeds(ours, theirs, examples, seeds) -> dict:
  """Print and return the per-seed robust counts of Square alone on both sides."""
  row = {
    "examples": examples,
    "seeds": list(seeds),
    "hydra_jax": [int(r.sum()) for r in ours],
    "torchattacks": [int(r.sum()) for r in theirs],
  }
  for side, robust in (("hydra_jax", ours), ("torchattacks", theirs)):
    counts = robust.sum(axis=1)
    row[f"{side}_mean"], row[f"{side}_std"] = float(counts.mean()), float(counts.std(ddof=1)) if len(seeds) > 1 else 0.0
  broken_ours, broken_theirs = (~ours).sum(axis=0), (~theirs).sum(axis=0)
  row["broken_by_some_seed"] = {
    "hydra_jax": int((broken_ours > 0).sum()),
    "torchattacks": int((broken_theirs > 0).sum()),
  }
  row["broken_only_by"] = {
    "hydra_jax": [int(i) for i in np.flatnonzero((broken_ours > 0) & (broken_theirs == 0))],
    "torchattacks": [int(i) for i in np.flatnonzero((broken_theirs > 0) & (broken_ours == 0))],
  }
  print(f"Square alone on the {examples} examples hydra_jax's white-box stages left robust, seeds {list(seeds)}:")
  print(f"{'side':13s} {'robust per seed':>30s} {'mean':>7s} {'std':>5s} {'broken by >= 1 seed':>20s}")
  for side in ("hydra_jax", "torchattacks"):
    per_seed = " ".join(str(c) for c in row[side])
    print(
      f"{side:13s} {per_seed:>30s} {row[f'{side}_mean']:7.2f} {row[f'{side}_std']:5.2f} "
      f"{row['broken_by_some_seed'][side]:20d}"
    )
  print(f"broken by one side only (example positions in this set): {row['broken_only_by']}")
  return row


def _report_gathered(seconds: dict[str, list[float]], robust: dict[str, dict[str, int]], examples: int) -> dict:
  """The --against_whole_batch row: median seconds of each variant, the speed-up of gathering, and whether the
  robust counts per stage agree (the per-example verdicts are compared by the caller)."""
  median = {variant: float(np.median(times)) for variant, times in seconds.items()}
  return dict(
    examples=examples,
    seconds=median,
    speedup=median["whole batch"] / median["gathered"],
    robust=robust,
    same_counts=robust["gathered"] == robust["whole batch"],
  )


def _gathered_vs_whole(args, apply_fn, variables, x, y, eps, norm, counts) -> dict:
  """--against_whole_batch: hydra_jax's sequence with each attack on the gathered robust examples (the default)
  against each attack on the whole batch (masked, `chunk_size` = the batch), alternating, --repeats timed passes
  each after a compiling one; the verdicts per example must be equal."""
  logits_fn = attacks.in_chunks(lambda z: apply_fn(variables, z, False)[0], 0)
  programs = {
    variant: jax.jit(
      lambda x, y, k, chunk=chunk: autoattack.autoattack(
        logits_fn, x, y, key=k, eps=eps, norm=norm, chunk_size=chunk, **counts
      )[1]
    )
    for variant, chunk in (("whole batch", args.batch), ("gathered", 0))
  }
  keys = attacks.example_keys(jax.random.key(args.seed), jnp.arange(len(y)))
  batches = [
    (x[s : s + args.batch], y[s : s + args.batch], keys[s : s + args.batch]) for s in range(0, len(y), args.batch)
  ]

  def timed(program):
    start = time.perf_counter()
    out = [jax.block_until_ready(program(*batch)) for batch in batches]
    return time.perf_counter() - start, {k: np.concatenate([np.asarray(o[k]) for o in out]) for k in out[0]}

  print(machine.header(machine.describe(), machine.matmul_gflops()))
  verdicts = {variant: timed(program)[1] for variant, program in programs.items()}  # compiles
  seconds = {variant: [] for variant in programs}
  for _ in range(args.repeats):
    for variant, program in programs.items():
      elapsed, verdicts[variant] = timed(program)
      seconds[variant].append(elapsed)
  robust = {variant: {k: int(v.sum()) for k, v in sorted(out.items())} for variant, out in verdicts.items()}
  row = _report_gathered(seconds, robust, len(y))
  row["same_verdicts"] = all(
    np.array_equal(verdicts["gathered"][k], verdicts["whole batch"][k]) for k in robust["gathered"]
  )
  print(
    f"AutoAttack standard on {args.run or args.model}: {len(y)} examples in batches of {args.batch}, counts {counts}"
  )
  for variant in programs:
    print(f"{variant:12s} {row['seconds'][variant]:8.1f} s  robust after each stage {robust[variant]}")
  print(
    f"gathered robust examples: {row['speedup']:.2f}x the whole batch; "
    f"same verdicts per example: {row['same_verdicts']}"
  )
  return row


def _each_on_all(args, apply_fn, variables, net, x, y, eps, norm, counts, parity) -> dict:
  """The --each_on_all comparison: the header, then `_report_each`'s table; returns its row."""
  import torch

  if len(y) > args.batch:
    raise ValueError(f"--each_on_all times one batch: --examples ({len(y)}) must be <= --batch ({args.batch})")
  matmul = machine.matmul_gflops()
  print(machine.header(machine.describe(), matmul))
  print(f"CPU: {cpu()}; torch threads {torch.get_num_threads()}")
  print(f"logits hydra_jax vs PyTorch export: max |diff| {parity:.2e}; {norm} eps {eps:.4g}")
  stages = args.stages.split(",")
  ours, theirs = _time_each(apply_fn, variables, net, x, y, eps, norm, counts, args.seed, stages)
  row = dict(model=args.run or f"{args.model} (random, k={args.k:g})", examples=len(y), norm=norm, eps=eps)
  row.update(counts=counts, logit_parity_max_abs=parity, cpu=cpu(), torch_threads=torch.get_num_threads())
  row.update(_report_each(ours, theirs, counts, len(y)))
  return row


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", default=None, help="a finished run directory (default: a random --model)")
  parser.add_argument("--model", default="resnet18", help="zoo model with random weights when no --run")
  parser.add_argument("--k", type=float, default=0.05, help="--model: fraction of weights kept (HYDRA's scaled init)")
  parser.add_argument("--examples", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--eps", type=float, default=None, help="default: the run's eval.eps, or 8/255")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true", help=f"toy counts {TINY} on 32 examples of cnn_tiny")
  parser.add_argument("--json", default=None, help="also write the row to this file")
  for name in FULL:
    parser.add_argument(f"--{name}", type=int, default=None, help=f"default {FULL[name]} (--tiny: {TINY[name]})")
  parser.add_argument(
    "--square_seeds", type=int, default=0, help="instead of torchattacks' sequence: Square alone, seeds 0..N-1"
  )
  parser.add_argument(
    "--each_on_all", action="store_true", help="instead of the sequence: each attack alone on every example, timed"
  )
  parser.add_argument("--stages", default=",".join(STAGES), help="--each_on_all: the attacks to time, comma-separated")
  parser.add_argument(
    "--against_whole_batch",
    action="store_true",
    help="instead of torchattacks: hydra_jax's sequence on the gathered robust examples against the whole batch",
  )
  parser.add_argument("--repeats", type=int, default=1, help="--against_whole_batch: timed passes of each variant")
  args = parser.parse_args(argv)
  if unknown := set(args.stages.split(",")) - set(STAGES):
    raise ValueError(f"unknown --stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
  counts = dict(FULL)
  if args.tiny:
    counts = dict(TINY)
    args.examples, args.batch = min(args.examples, 32), min(args.batch, 32)
    if not args.run:
      args.model = "cnn_tiny"
  counts.update({name: getattr(args, name) for name in FULL if getattr(args, name) is not None})
  row = _row(args, counts)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(row, f, indent=2)
  return [row]


def _row(args: argparse.Namespace, counts: dict) -> dict:
  """The row of the comparison `args` asks for (see the module docstring), printed as it goes."""
  apply_fn, variables, name, x, y, eps, norm = _source(args)
  if args.against_whole_batch:
    return _gathered_vs_whole(args, apply_fn, variables, x, y, eps, norm, counts)
  import torch

  num_classes = int(apply_fn(variables, x[:1], False)[0].shape[-1])
  counts["num_targets"] = min(counts["num_targets"], num_classes - 1)
  net = _torch_model(name, variables, x.shape[1:], num_classes)
  with torch.no_grad():
    torch_logits = net(torch.from_numpy(x[:16]).permute(0, 3, 1, 2).contiguous()).numpy()
  parity = float(np.abs(torch_logits - np.asarray(apply_fn(variables, x[:16], False)[0])).max())

  if args.each_on_all:
    return _each_on_all(args, apply_fn, variables, net, x, y, eps, norm, counts, parity)
  method = "autoattack" if norm == "linf" else "autoattack_l2"
  config = {method: dict(eps=eps, **counts)}
  batches = lambda: [
    {"image": x[s : s + args.batch], "label": y[s : s + args.batch]} for s in range(0, len(y), args.batch)
  ]
  run = lambda: evaluate.evaluate_per_example(
    apply_fn, variables, batches(), key=jax.random.PRNGKey(args.seed), methods=(method,), config=config, progress=False
  )
  start = time.perf_counter()
  results, per_example = run()
  jax_first_s = time.perf_counter() - start
  if args.square_seeds:
    left = per_example[f"{method}_fab_t"]
    seeds = range(args.square_seeds)
    ours, theirs = _square_seeds(apply_fn, variables, net, x[left], y[left], eps, norm, counts["square_queries"], seeds)
    row = _report_square_seeds(ours, theirs, int(left.sum()), seeds)
    row["autoattack_hydra_jax"] = results[method]
    return row
  start = time.perf_counter()
  run()
  jax_s = time.perf_counter() - start
  torch_after, torch_s = _torch_sequence(net, x, y, eps, norm, counts, args.seed)

  n = len(y)
  row = {
    "model": args.run or f"{name} (random, k={args.k:g})",
    "examples": n,
    "batch": args.batch,
    "norm": norm,
    "eps": eps,
    "counts": counts,
    "logit_parity_max_abs": parity,
    "clean": results["clean"],
    "hydra_jax": {stage: results[f"{method}_{stage}"] for stage in STAGES},
    "torchattacks": {stage: count / n for stage, count in zip(STAGES, torch_after)},
    "masking": results[f"{method}_masking"],
    "jax_s": jax_s,
    "jax_compile_s": jax_first_s - jax_s,
    "torch_s": torch_s,
    "speedup": torch_s / jax_s,
    "cpu": cpu(),
    "torch_threads": torch.get_num_threads(),
  }
  row["difference_points"] = 100 * (row["hydra_jax"]["square"] - row["torchattacks"]["square"])
  print(machine.header(machine.describe(), machine.matmul_gflops()))
  print(f"AutoAttack standard on {row['model']}: {n} examples, {norm} eps {eps:.4g}, counts {counts}")
  print(f"CPU: {row['cpu']}; torch threads {row['torch_threads']}")
  print(f"logits hydra_jax vs PyTorch export: max |diff| {parity:.2e}; clean {row['clean']:.4f}")
  print(f"{'stage':10s} {'hydra_jax':>10s} {'torchattacks':>13s}")
  for stage in STAGES:
    print(f"{stage:10s} {row['hydra_jax'][stage]:10.4f} {row['torchattacks'][stage]:13.4f}")
  print(
    f"difference {row['difference_points']:+.2f} points (hydra_jax - torchattacks); masking {row['masking']:.4f}; "
    f"seconds: hydra_jax {jax_s:.1f} (+{row['jax_compile_s']:.1f} compile), torchattacks {torch_s:.1f}, "
    f"speedup {row['speedup']:.2f}x"
  )
  return row


if __name__ == "__main__":
  main()
