"""Data parallelism for per-device step functions: `jax.pmap`, or `jax.jit` + `jax.shard_map` over a Mesh.

A step is written once, for one device's share of the batch, with the mapped axis named `AXIS` ("batch"):
it `lax.pmean`s gradients and metrics over `AXIS`, and BatchNorm takes `bn_axis_name=AXIS`. The runners here
turn it into a function of global, host-side values:

  runner = parallel.make_runner(step_fn, 'shard_map', carry_fields=('carry',))
  state = runner.put_state(state)                  # replicate the state (the carry is split by example)
  state, metrics = runner(state, runner.put_batch(host_batch))
  state = runner.get_state(state)                  # plain single-device arrays, e.g. to checkpoint

`mode='single'` runs the step under `jax.jit` on one device with `axis_name=None` (no collectives), the
reference the parallel runners are tested against. Every device gets batch_size / device_count examples;
the batch must divide evenly. Multi-host: call `init_distributed()` first; each host passes only its own
slice of the global batch (`data.train_batches(..., process_index=...)` yields it), and the runners build
the global arrays from the local slices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hydra_jax import PyTree

AXIS = "batch"
MODES = ("single", "pmap", "shard_map")

StepFn = Callable[..., tuple[PyTree, PyTree]]


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """`jax.distributed.initialize` (arguments auto-detected on TPU VMs / SLURM when None)."""
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def resolve_mode(mode: str) -> str:
  """`mode`, with 'auto' resolved: 'single' on one device, else 'shard_map'."""
  if mode != "auto":
    return mode
  return "single" if jax.device_count() == 1 else "shard_map"


def check_batch_divides(batch_size: int, device_count: int) -> None:
  """Raises ValueError unless `batch_size` splits evenly over `device_count` devices."""
  if batch_size % device_count:
    raise ValueError(f"batch size {batch_size} does not divide by the {device_count} devices; "
                     f"use a multiple of {device_count}")


def _split_fields(state: Any, fields: Sequence[str]) -> Any:
  """A tree shaped like `state`: True at the leaves of the per-example `fields` of a dataclass state."""
  not_split = jax.tree.map(lambda _: False, state)
  if not fields:
    return not_split
  return dataclasses.replace(not_split, **{f: jax.tree.map(lambda _: True, getattr(state, f)) for f in fields})


@dataclasses.dataclass(frozen=True)
class Runner:
  """A step compiled for one parallel mode, with the helpers that move values in and out of it.

  Attributes:
    mode: 'single', 'pmap' or 'shard_map'.
    devices: the devices the step runs on (all of `jax.devices()` for the parallel modes).
    run: `(state, batch) -> (state, metrics)` on values from `put_state` / `put_batch`.
    carry_fields: names of the state fields whose leaves are split by example over devices (leading axis =
      local batch), not replicated: e.g. free adversarial training's perturbation.
  """

  mode: str
  devices: tuple[Any, ...]
  run: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]
  carry_fields: tuple[str, ...] = ()

  def __call__(self, state: PyTree, batch: PyTree) -> tuple[PyTree, PyTree]:
    return self.run(state, batch)

  @property
  def mesh(self) -> Mesh:
    return Mesh(np.asarray(self.devices), (AXIS,))

  def put_batch(self, batch: PyTree) -> PyTree:
    """Places this host's slice of the global batch (numpy, leading axis = examples) for `run`."""
    local = len([d for d in self.devices if d.process_index == jax.process_index()])
    for x in jax.tree.leaves(batch):
      check_batch_divides(np.shape(x)[0], local)
    if self.mode == "single":
      return jax.device_put(batch, self.devices[0])
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.reshape(x, (local, -1) + np.shape(x)[1:]), batch)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def put_state(self, state: PyTree) -> PyTree:
    """Replicates `state` on the devices; the carry fields are split by example instead."""
    if self.mode == "single":
      return jax.device_put(state, self.devices[0])
    split = _split_fields(state, self.carry_fields)
    if self.mode == "pmap":  # stacked [local devices, ...] host values; pmap places one slice per device
      local = len([d for d in self.devices if d.process_index == jax.process_index()])
      return jax.tree.map(
          lambda x, s: np.reshape(x, (local, -1) + x.shape[1:]) if s else np.broadcast_to(x, (local, *x.shape)),
          jax.device_get(state), split)
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(self.mesh, P(AXIS) if s else P())), state, split)

  def get_state(self, state: PyTree) -> PyTree:
    """The inverse of `put_state`: host-local single-device arrays (carry fields re-joined over examples)."""
    if self.mode == "single":
      return state
    split = _split_fields(state, self.carry_fields)
    if self.mode == "pmap":
      return jax.tree.map(lambda x, s: jnp.reshape(x, (-1,) + x.shape[2:]) if s else x[0], state, split)
    return jax.tree.map(
        lambda x, s: jnp.asarray(multihost_utils.process_allgather(x, tiled=True)) if s
        else jnp.asarray(x.addressable_data(0)), state, split)


def make_runner(step_fn: StepFn, mode: str, *, carry_fields: Sequence[str] = (),
                devices: Sequence[Any] | None = None, donate_state: bool = False) -> Runner:
  """Compiles `step_fn(state, batch, axis_name=...) -> (state, metrics)` for `mode`.

  Args:
    step_fn: the per-device step. It must pmean its gradients and metrics over `axis_name` when that is not
      None, so that the replicated state stays identical on every device.
    mode: 'single' (jit on one device, axis_name=None), 'pmap' or 'shard_map' (axis_name=AXIS).
    carry_fields: state fields split by example (see `Runner`); they need a leading example axis.
    devices: default: `jax.devices()[:1]` for 'single', all devices otherwise.
    donate_state: donate the input state buffers (saves memory; the caller must not reuse them).

  Returns:
    A `Runner`; metrics come back replicated (pmap: one copy per local device; take [0]).
  """
  if mode not in MODES:
    raise ValueError(f"unknown parallel mode '{mode}'; valid: {', '.join(MODES)}")
  devices = tuple(devices or (jax.devices()[:1] if mode == "single" else jax.devices()))
  donate = (0,) if donate_state else ()
  if mode == "single":
    run = jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=donate)
  elif mode == "pmap":
    run = jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS, donate_argnums=donate,
                   devices=[d for d in devices if d.process_index == jax.process_index()])
  else:
    run = _shard_map_step(step_fn, Mesh(np.asarray(devices), (AXIS,)), carry_fields, donate)
  return Runner(mode, devices, run, tuple(carry_fields))


def _shard_map_step(step_fn: StepFn, mesh: Mesh, carry_fields: Sequence[str], donate: tuple[int, ...]):
  """jit(shard_map(step)) with specs derived from the state's structure on the first call."""
  compiled = {}

  def run(state, batch):
    treedef = jax.tree.structure(state)
    if treedef not in compiled:
      state_specs = jax.tree.map(lambda s: P(AXIS) if s else P(), _split_fields(state, carry_fields))
      # check_vma=False: pmap's semantics, where gradients of replicated values are per-device and the
      # step's own pmean averages them (with it, JAX would already psum them, and the pmean would not divide).
      mapped = jax.shard_map(functools.partial(step_fn, axis_name=AXIS), mesh=mesh,
                             in_specs=(state_specs, P(AXIS)), out_specs=(state_specs, P()), check_vma=False)
      compiled[treedef] = jax.jit(mapped, donate_argnums=donate)
    return compiled[treedef](state, batch)

  return run
