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
the batch must divide evenly.

Multi-host (one process per host, all running the same program): every process calls `init_distributed()`
(or `init_from_config(config.parallel)`) before any other JAX call, then `check_processes_agree(settings)`;
each host passes only its own slice of the global batch (`data.train_batches(..., process_index=...)` yields
it), and the runners build the global arrays from the local slices. Checkpoints hold one copy of the
(replicated) state per process (`one_copy_per_process`), written by process 0 and readable by any number
of processes and devices (`abstract_one_copy_per_process`, then `local_copy`).

  parallel.init_distributed("10.0.0.1:1234", num_processes=2, process_id=0)   # on host 0; 1 on host 1
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys
import threading
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed  # the coordinator's key-value store: JAX has no public API for it
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hydra_jax import PyTree
from hydra_jax import errors

AXIS = "batch"
MODES = ("single", "pmap", "shard_map")

StepFn = Callable[..., tuple[PyTree, PyTree]]


# ----------------------------------------------------------------------------------------------------------
# Multi-host: joining the processes of a run, and checking that they agree.

DEFAULT_TIMEOUT_S = 300


def distributed_args(
  coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, int | None, int | None]:
  """(coordinator 'host:port', number of processes, this process's id) of a multi-host run.

  A given value ("", 0 and -1 mean unset) wins over its environment variable (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID); what is still unset is None, left to JAX's auto-detection (TPU VMs,
  SLURM, Open MPI, Kubernetes).

  Raises:
    ValueError: an environment variable that is not an integer, or a process id outside [0, processes).
  """
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes > 0 else _env_int(environ, "JAX_NUM_PROCESSES")
  index = process_id if process_id >= 0 else _env_int(environ, "JAX_PROCESS_ID")
  if count is not None and count < 1:
    raise errors.ConfigError(f"the number of processes must be positive, got {count}")
  if count is not None and index is not None and not 0 <= index < count:
    raise errors.ConfigError(f"process id {index} is not in [0, {count}): ids run from 0 to num_processes - 1")
  return address, count, index


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
  """Joins this process to a multi-host run (`jax.distributed.initialize`); a no-op once joined.

  Args:
    coordinator_address: 'host:port' of process 0, reachable from every host; None: auto-detected.
    num_processes: processes in the run; None: auto-detected (TPU VM, SLURM, Open MPI, Kubernetes).
    process_id: this process, in [0, num_processes); None: auto-detected.
    timeout_s: seconds to wait for every process to join.

  Raises:
    ValueError: the arguments are missing and cannot be auto-detected here.

  If not every process joins within `timeout_s`, this prints what it waited for and exits the process with
  status 1 (JAX would abort it with a message about a dead task instead).
  """
  if jax.distributed.is_initialized():
    return
  who = "this process" if process_id is None else f"process {process_id}"
  count = "" if num_processes is None else f" {num_processes}"
  where = coordinator_address or "the auto-detected coordinator"
  message = (
    f"hydra_jax: error: {who} waited {timeout_s:g} s for all{count} processes of the run to join "
    f"{where}; a process was not started, died, or was given another "
    f"coordinator address or process count. Start every process with the same coordinator address and "
    f"number of processes and a distinct process id."
  )
  with _deadline(timeout_s, message):
    try:
      jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=int(timeout_s) + 60
      )
    except ValueError as error:
      raise errors.ConfigError(
        f"cannot start a multi-host run: {error} Set --config.parallel.coordinator_address, num_processes and "
        f"process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); they are only "
        f"auto-detected on TPU VMs, SLURM, Open MPI and Kubernetes."
      ) from error


def init_from_config(parallel_config: Mapping[str, Any]) -> bool:
  """`init_distributed` from a config's `parallel` section, when the run is multi-host; True if it is.

  A run is multi-host when `distributed` is true or a coordinator address or process count is set; unset
  keys come from the environment or auto-detection (`distributed_args`).
  """
  get = parallel_config.get
  if not (get("distributed") or get("coordinator_address") or get("num_processes", 0) > 0):
    return False
  args = distributed_args(get("coordinator_address", ""), get("num_processes", 0), get("process_id", -1))
  init_distributed(*args, timeout_s=get("timeout_s", DEFAULT_TIMEOUT_S))
  return True


@contextlib.contextmanager
def _deadline(seconds: float, message: str):
  """Exits the process with `message` on stderr unless the block ends within `seconds`.

  For blocking C++ calls that Python cannot interrupt (a watchdog thread; they release the GIL).
  """
  done = threading.Event()

  def watch():
    if not done.wait(seconds):
      print(message, file=sys.stderr, flush=True)
      os._exit(1)

  threading.Thread(target=watch, daemon=True).start()
  try:
    yield
  finally:
    done.set()


_rounds = itertools.count()  # each check publishes under its own keys; every process makes the same calls


def check_processes_agree(settings: Mapping[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Raises ValueError naming each setting (or local device count) in which a process differs from process 0.

  Every process publishes its flattened `settings` (JSON-able nested mappings) and its local device count
  in the coordinator's key-value store and compares everyone's with process 0's, so all processes raise the
  same error. No-op in a single-process run.

  Raises:
    ValueError: the processes disagree.
    TimeoutError: a process did not publish within `timeout_s` seconds (it died or runs other code).
  """
  if jax.process_count() == 1:
    return
  client = distributed.global_state.client
  prefix = f"hydra_jax/settings/{next(_rounds)}"
  mine = {"local device count": jax.local_device_count(), **_flatten(settings)}
  client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(mine, sort_keys=True, default=str))
  everyone = [_published(client, f"{prefix}/{p}", p, timeout_s) for p in range(jax.process_count())]
  problems = [
    f"process {p} has {key}={values.get(key)!r} where process 0 has {everyone[0].get(key)!r}"
    for p, values in enumerate(everyone[1:], 1)
    for key in sorted(set(values) | set(everyone[0]))
    if values.get(key) != everyone[0].get(key)
  ]
  if problems:
    raise errors.ConfigError(
      "the processes of this multi-host run disagree: "
      + "; ".join(problems[:8])
      + ("; ..." if len(problems) > 8 else "")
      + ". Start every process with the same config."
    )


def _published(client: Any, key: str, process: int, timeout_s: float) -> dict[str, Any]:
  try:
    return json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
  except Exception as error:  # XlaRuntimeError: DEADLINE_EXCEEDED
    raise TimeoutError(
      f"process {process} did not publish its settings within {timeout_s:g} s: it died "
      f"or runs another program ({error})"
    ) from error


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{name}."))
    else:
      flat[f"{prefix}{name}"] = value
  return flat


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one copy of a replicated state per process.


def process_sharding() -> NamedSharding:
  """Replicated over the first local device of every process: one copy per host, a valid global array."""
  firsts = [
    min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(jax.process_count())
  ]
  return NamedSharding(Mesh(np.asarray(firsts), ("process",)), P())


def one_copy_per_process(tree: PyTree) -> PyTree:
  """Host-local values, equal on every process (numpy or single-device arrays), as global jax.Arrays.

  Orbax saves only global arrays in a multi-host run; these have one replica per process (process 0's is
  written) and no trace of the device mesh, so they restore on any number of processes and devices.
  """
  sharding = process_sharding()
  device = next(iter(sharding.addressable_devices))
  return jax.tree.map(
    lambda x: jax.make_array_from_single_device_arrays(np.shape(x), sharding, [jax.device_put(x, device)]), tree
  )


def abstract_one_copy_per_process(abstract: PyTree) -> PyTree:
  """`jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`) with `process_sharding()`: a restore target."""
  sharding = process_sharding()
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def local_copy(tree: PyTree) -> PyTree:
  """This process's copy of every replicated global array in `tree` (single-device arrays)."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


# ----------------------------------------------------------------------------------------------------------
# Positions in the global batch: per-example random draws are keyed by them, so that a run's results do not
# depend on its device or process count.


def with_positions(batch: dict[str, jax.Array], axis_name: str | None) -> dict[str, jax.Array]:
  """`batch` (this device's share, leading axis B) with 'index' (int32 [B], the examples' positions in the
  global batch) and 'global_batch_size' (int32 scalar), inside a per-device step.

  Device d of `axis_name` holds rows d*B .. (d+1)*B - 1 of the global batch: the layout `put_batch` makes
  from the hosts' slices, in the order of the processes and their devices.
  """
  size = batch["image"].shape[0]
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * size
  index = (offset + jnp.arange(size)).astype(jnp.int32)
  return {**batch, "index": index, "global_batch_size": jnp.int32(size * devices)}


# ----------------------------------------------------------------------------------------------------------
# Runners.


def resolve_mode(mode: str) -> str:
  """`mode`, with 'auto' resolved: 'single' on one device, else 'shard_map'."""
  if mode != "auto":
    return mode
  return "single" if jax.device_count() == 1 else "shard_map"


def check_batch_divides(batch_size: int, device_count: int) -> None:
  """Raises ValueError unless `batch_size` splits evenly over `device_count` devices."""
  if batch_size % device_count:
    raise errors.ConfigError(
      f"batch size {batch_size} does not divide by the {device_count} devices; use a multiple of {device_count}"
    )


def _split_fields(state: Any, fields: Sequence[str]) -> Any:
  """A tree shaped like `state`: True at the leaves of the per-example `fields` of a dataclass state."""
  not_split = jax.tree.map(lambda _: False, state)
  if not fields:
    return not_split
  return dataclasses.replace(not_split, **{f: jax.tree.map(lambda _: True, getattr(state, f)) for f in fields})


def _replicas(x: Any, count: int) -> Any:
  """`count` copies of x stacked on a new leading axis; typed PRNG keys (`jax.random.key`) stay keys."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jnp.broadcast_to(x, (count, *x.shape))
  return np.broadcast_to(x, (count, *np.shape(x)))


def _local_copy(stacked: Any) -> jax.Array:
  """A replicated pmap value [devices, ...] -> this process's first copy [...]. Indexing `stacked[0]` instead is
  a global computation that every process must run in step: with several processes it deadlocked against the
  next program (seen in a 2-process pmap resume)."""
  if not isinstance(stacked, jax.Array):
    return jnp.asarray(stacked[0])
  return jnp.reshape(stacked.addressable_data(0), stacked.shape[1:])


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

  def _local_positions(self) -> list[int]:
    """Indices in `devices` of this process's devices."""
    return [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]

  def put_batch(self, batch: PyTree) -> PyTree:
    """Places this host's slice of the global batch (numpy, leading axis = examples) for `run`."""
    local = len(self._local_positions())
    for x in jax.tree.leaves(batch):
      check_batch_divides(np.shape(x)[0], local)
    if self.mode == "single":
      return jax.device_put(batch, self.devices[0])
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.reshape(x, (local, -1) + np.shape(x)[1:]), batch)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def put_state(self, state: PyTree) -> PyTree:
    """Replicates `state` on the devices; the carry fields (global rows, e.g. the global batch's) are split by
    example instead, device d of `devices` holding its d-th block of rows (as it holds the batch's)."""
    if self.mode == "single":
      return jax.device_put(state, self.devices[0])
    split = _split_fields(state, self.carry_fields)
    if self.mode == "pmap":  # stacked [local devices, ...] host values; pmap places one slice per device
      mine = self._local_positions()
      return jax.tree.map(
        lambda x, s: np.reshape(x, (len(self.devices), -1) + x.shape[1:])[mine] if s else _replicas(x, len(mine)),
        jax.device_get(state),
        split,
      )
    return jax.tree.map(lambda x, s: _global_array(x, NamedSharding(self.mesh, P(AXIS) if s else P())), state, split)

  def get_state(self, state: PyTree) -> PyTree:
    """The inverse of `put_state`: host-local single-device arrays, the carry fields re-joined over the examples
    of every process (a collective: every process calls it)."""
    if self.mode == "single":
      return state
    split = _split_fields(state, self.carry_fields)
    if self.mode == "pmap":
      return jax.tree.map(lambda x, s: _all_rows(x) if s else _local_copy(x), state, split)
    return jax.tree.map(
      lambda x, s: (
        jnp.asarray(multihost_utils.process_allgather(x, tiled=True)) if s else jnp.asarray(x.addressable_data(0))
      ),
      state,
      split,
    )


def _all_rows(stacked: jax.Array) -> jax.Array:
  """A split pmap value [local devices, rows, ...] -> the rows of every process's devices, in device order."""
  if isinstance(stacked, jax.Array):  # this process's shards only (np.asarray would need all processes')
    shards = sorted(stacked.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    local = np.concatenate([np.asarray(shard.data).reshape((-1,) + stacked.shape[2:]) for shard in shards])
  else:
    local = np.reshape(stacked, (-1,) + np.shape(stacked)[2:])
  if jax.process_count() == 1:
    return jnp.asarray(local)
  return jnp.asarray(multihost_utils.process_allgather(local, tiled=True))


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host-local value equal on every process: each process fills its own devices.

  (`jax.device_put` of a committed single-device array onto other hosts' devices would need a cross-host
  transfer, which CPU backends lack.)
  """
  return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])


def make_runner(
  step_fn: StepFn,
  mode: str,
  *,
  carry_fields: Sequence[str] = (),
  devices: Sequence[Any] | None = None,
  donate_state: bool = False,
) -> Runner:
  """Compiles `step_fn(state, batch, axis_name=...) -> (state, metrics)` for `mode`.

  Args:
    step_fn: the per-device step. It must pmean its gradients and metrics over `axis_name` when that is not
      None, so that the replicated state stays identical on every device.
    mode: 'single' (jit on one device, axis_name=None), 'pmap' or 'shard_map' (axis_name=AXIS).
    carry_fields: state fields split by example (see `Runner`); they need a leading example axis.
    devices: default: `jax.devices()[:1]` for 'single', all devices otherwise.
    donate_state: donate the input state buffers (saves memory; the caller must not reuse them).

  Returns:
    A `Runner`; metrics come back replicated (pmap: one copy per local device; take [0]). Its 'single' and
    'shard_map' steps compile with `compiler_options` of the devices' platform.
  """
  if mode not in MODES:
    raise errors.ConfigError(f"unknown parallel mode '{mode}'; valid: {', '.join(MODES)}")
  if mode == "single" and jax.process_count() > 1:
    raise errors.ConfigError(
      f"parallel mode 'single' runs on one device, but this run has {jax.process_count()} "
      f"processes: use 'shard_map' or 'pmap'"
    )
  devices = tuple(devices or (jax.devices()[:1] if mode == "single" else jax.devices()))
  donate = (0,) if donate_state else ()
  options = compiler_options(devices[0].platform)
  if mode == "single":
    run = jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=donate, compiler_options=options)
  elif mode == "pmap":  # jax.pmap takes no compiler options
    run = jax.pmap(
      functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS, donate_argnums=donate, devices=list(devices)
    )  # all processes' devices (pmap maps over the local ones)
  else:
    run = _shard_map_step(step_fn, Mesh(np.asarray(devices), (AXIS,)), carry_fields, donate, options)
  return Runner(mode, devices, run, tuple(carry_fields))


# XLA:CPU's default scheduler orders a program for concurrency, keeping more buffers alive at once. The
# memory-optimized one plans 27% less for the ResNet-18 TRADES-10 prune step at batch 128 (1460 MB instead of
# 2009; the same at batch 32), with bitwise equal results and no slower steps (`benchmarks/RESULTS.md`).
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(platform: str) -> dict[str, str] | None:
  """XLA options the runners compile steps with on `platform` ('cpu', 'gpu', 'tpu'): `CPU_COMPILER_OPTIONS` on
  CPU, None (XLA's defaults) elsewhere."""
  return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


def _shard_map_step(
  step_fn: StepFn, mesh: Mesh, carry_fields: Sequence[str], donate: tuple[int, ...], options: dict | None
):
  """jit(shard_map(step)) with specs derived from the state's structure on the first call."""
  compiled = {}

  def run(state, batch):
    treedef = jax.tree.structure(state)
    if treedef not in compiled:
      state_specs = jax.tree.map(lambda s: P(AXIS) if s else P(), _split_fields(state, carry_fields))
      # check_vma=False: pmap's semantics, where gradients of replicated values are per-device and the
      # step's own pmean averages them (with it, JAX would already psum them, and the pmean would not divide).
      mapped = jax.shard_map(
        functools.partial(step_fn, axis_name=AXIS),
        mesh=mesh,
        in_specs=(state_specs, P(AXIS)),
        out_specs=(state_specs, P()),
        check_vma=False,
      )
      compiled[treedef] = jax.jit(mapped, donate_argnums=donate, compiler_options=options)
    return compiled[treedef](state, batch)

  return run


def mode_devices(mode: str, batch_sizes: Mapping[str, int]) -> list[Any]:
  """The devices a run in `mode` uses; raises ConfigError unless every batch size (by config key) divides."""
  devices = jax.devices()[:1] if mode == "single" else jax.devices()
  for key, size in batch_sizes.items():
    try:
      check_batch_divides(size, len(devices))
    except ValueError as error:
      raise errors.ConfigError(f"config.{key}: {error}") from None
  return devices
