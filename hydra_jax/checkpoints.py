"""Orbax checkpoints of a run: the last N train states, the best one by robust accuracy, and their metadata.

Layout of a workdir:

  <workdir>/checkpoints/<step>/{<items>, meta, sparsity, checksums}  last `keep` saves (atomic: orbax renames
                                                                     a finished temporary directory into place)
  <workdir>/best/<step>/{<items>, meta, sparsity, checksums}         the save with the highest `best_metric`

A save holds named pytree items (the train loop saves 'model' = params, batch_stats and scores, and 'train'
= step, optimizer state, carry and rng), so a later stage can read 'model' alone.

`meta` is JSON with the fully resolved config, the model name / classes, the stage, k, the metrics at that
step and the jax / jaxlib / flax / orbax versions; `sparsity` is `masking.SparsityReport.to_json()` computed
from the exported weights. A state is restored against an explicit target structure (from `jax.eval_shape`),
so a checkpoint of another model fails with an error that names the mismatch, before anything is written.

`checksums` is JSON with the CRC-32 of every saved array (by its path, e.g. 'model/params/conv/kernel', with its
dtype and shape) and of the `meta` and `sparsity` JSON (the config, and the step and rng of the 'train' item
that position the data pipeline). It is an item of the same orbax save, so it lands atomically with the step.
Every read (`restore`, `read_meta`) checks what it read against it: a difference is `CheckpointDamaged`, one
line naming the step and the array. Steps written before checksums existed (no `checksums` item, and none
named in orbax's `_CHECKPOINT_METADATA`) are read unchecked.

Read failures are classified (`read_failure`): proven damage (`CheckpointDamaged`: a checksum mismatch,
unparseable metadata or manifest, a missing file), a read error that says nothing about the files
(`CheckpointReadError`: permission, I/O, network, timeout), or a checkpoint of another state (plain
`CheckpointError`). A resume (`Checkpoints.restore_intact`) sets aside only proven damage; read errors are
retried with backoff and then stop the run, moving nothing.

Multi-host: every process calls `save` with the same host-local values and `restore` returns them on every
process. The arrays are stored as global arrays with one copy per process (`parallel.one_copy_per_process`;
process 0's is written), so a checkpoint saved by any number of processes and devices restores on any other;
the run directory must be on a file system that every host sees.

Example:
  >>> ckpt = Checkpoints('/tmp/run', keep=3)
  >>> ckpt.save(step, {'model': model, 'train': train}, meta={...}, sparsity=report.to_json(),
  ...           metrics={'robust': 0.41})
  >>> ckpt.wait()                                    # async saves: wait before reading or exiting
  >>> items, meta = ckpt.restore({'model': abstract_model, 'train': abstract_train})   # latest step
  >>> items, meta = restore('/tmp/run', {'model': abstract_model})                    # one item only
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
import warnings
import zlib
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from hydra_jax import PyTree
from hydra_jax import errors
from hydra_jax import parallel
from hydra_jax import paths


def versions() -> dict[str, str]:
  """Library versions recorded beside every checkpoint."""
  import jaxlib  # pylint: disable=g-import-not-at-top

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "orbax": ocp.__version__}


class CheckpointError(errors.UserError):
  """A checkpoint is missing, corrupt, or does not match the model or stage that reads it."""


class CheckpointDamaged(CheckpointError):
  """A step whose files are proven damaged: a checksum mismatch, unparseable metadata or manifest, a missing file."""


class CheckpointReadError(CheckpointError):
  """A step that could not be read for a reason that says nothing about its files: permission, I/O, network,
  timeout. A resume retries it and then stops; it is never set aside."""


CHECKSUMS = "checksums"
# What a resume waits between attempts at a read error (seconds; 4 attempts in all). TensorStore's gs:// driver
# also retries 429 / 5xx answers by itself before an error reaches here.
READ_RETRY_DELAYS_S = (1.0, 2.0, 4.0)


def _manager(directory: str, keep: int, async_save: bool, best_metric: str | None) -> ocp.CheckpointManager:
  # Both managers of a run save the same steps at once: their multi-host barriers need names of their own.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    enable_async_checkpointing=async_save,
    best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
    best_mode="max",
    multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=os.path.basename(directory)),
  )
  return ocp.CheckpointManager(paths.path(directory), options=options)


class Checkpoints:
  """The checkpoints of one run directory (see the module docstring)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, best_metric: str | None = "robust"):
    self.workdir = workdir
    self.best_metric = best_metric
    self._last = _manager(paths.join(workdir, "checkpoints"), keep, async_save, None)
    self._best = _manager(paths.join(workdir, "best"), 1, async_save, best_metric) if best_metric else None

  def latest_step(self) -> int | None:
    return self._last.latest_step()

  def save(
    self,
    step: int,
    items: dict[str, PyTree],
    *,
    meta: dict[str, Any],
    sparsity: str,
    metrics: dict[str, float] | None = None,
  ) -> None:
    """Saves the pytree `items` at `step`, and as best if it is.

    Every process of a run calls it with the same host-local values (numpy or single-device arrays).
    """
    meta, sparsity_tree = _canonical_json(meta), json.loads(sparsity)
    args = ocp.args.Composite(
      meta=ocp.args.JsonSave(meta),
      sparsity=ocp.args.JsonSave(sparsity_tree),
      **{CHECKSUMS: ocp.args.JsonSave(checksums(items, meta, sparsity_tree))},
      **{name: ocp.args.StandardSave(parallel.one_copy_per_process(item)) for name, item in items.items()},
    )
    self._last.save(step, args=args)
    if self._best is not None and metrics and self.best_metric in metrics:
      self._best.save(step, args=args, metrics=metrics)

  def wait(self) -> None:
    """Blocks until async saves are on disk; re-raises their errors."""
    for manager in (self._last, self._best):
      if manager is not None:
        manager.wait_until_finished()
        manager.check_for_errors()

  def restore(self, abstract_items: dict[str, PyTree], step: int | None = None) -> tuple[dict, dict[str, Any]]:
    """The items at `step` (default: latest) shaped like `abstract_items`, and the meta."""
    return restore(self._last, abstract_items, step)

  def restore_intact(
    self, abstract_items: dict[str, PyTree], retry_delays_s: tuple[float, ...] = READ_RETRY_DELAYS_S
  ) -> tuple[dict, dict[str, Any]]:
    """The items and meta of the latest step that reads back intact, for a resume.

    Newer steps proven damaged (`CheckpointDamaged`) are moved aside to `<workdir>/unreadable_checkpoint_<step>`
    with one warning each on stderr, so that the run saves those steps again. A read error
    (`CheckpointReadError`: permission, I/O, network, timeout) is retried after each of `retry_delays_s` and
    then raised, and a step of another state (plain `CheckpointError`) is raised at once: both move nothing.
    With several processes, every process reads each step and they agree on its verdict (the worst of theirs)
    before any moves on, so that they resume from the same step or all stop. When no step reads, the newest
    step's error is raised and nothing is moved.
    """
    newest_first = sorted(self._last.all_steps(), reverse=True)
    damaged = {}
    for step in newest_first:
      result, error = self._read(abstract_items, step, retry_delays_s)
      verdict, process = _agree(_VERDICTS[type(error)])
      if verdict == _VERDICTS[type(None)]:
        for bad, reason in damaged.items():
          print(f"warning: {reason}; resuming from step {step}, the latest readable one", file=sys.stderr)
          self._set_aside(bad)
        return result
      if error is None:  # another process failed to read what this one read
        error = CheckpointError(
          f"checkpoint {self._last.directory} step {step} could not be read by process {process} (its log names the "
          "error); nothing was moved"
        )
      if verdict != _VERDICTS[CheckpointDamaged]:
        raise error
      damaged[step] = error
    raise damaged[newest_first[0]]

  def _read(self, abstract_items, step, retry_delays_s):
    """(restored, None) or (None, the CheckpointError of the last attempt); read errors are retried."""
    for attempt in range(len(retry_delays_s) + 1):
      try:
        return restore(self._last, abstract_items, step), None
      except CheckpointReadError as error:
        if attempt == len(retry_delays_s):
          return None, CheckpointReadError(
            f"{error} after {attempt + 1} attempts; nothing was moved: make the checkpoint readable (or wait for "
            "the storage to answer) and rerun to resume"
          )
        time.sleep(retry_delays_s[attempt])
      except CheckpointError as error:
        return None, error
    raise AssertionError("unreachable")

  def _set_aside(self, step: int) -> None:
    """Moves the unreadable `step` out of the managed steps (process 0; the others wait for it)."""
    if jax.process_index() == 0:
      target = paths.path(self.workdir) / f"unreadable_checkpoint_{step}"
      (paths.path(self.workdir) / "checkpoints" / str(step)).rename(target)
      print(f"warning: moved the unreadable step {step} to {target}", file=sys.stderr)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"hydra_jax_set_aside_{step}")
    self._last.reload()

  def close(self) -> None:
    self.wait()
    self._last.close()
    if self._best is not None:
      self._best.close()


def read_meta(directory: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, meta) of the latest (or given) save under `directory` (a workdir or its checkpoints/), checked
  against the step's checksums."""
  manager = _open_for_reading(directory)
  step = _pick_step(manager, directory, step)
  step_dir = _step_dir(manager, step)
  _drop_reads_answering_a_closed_loop()
  try:
    checked = _has_checksums(step_dir)
    args = {"meta": ocp.args.JsonRestore(), **({CHECKSUMS: ocp.args.JsonRestore()} if checked else {})}
    restored = _read_step(step_dir, ocp.args.Composite(**args))
  except Exception as error:  # orbax raises many types for damaged files
    kind = read_failure(error)
    raise kind(
      f"cannot read the metadata of checkpoint {directory} step {step} ({step_dir}): {_first_line(error)}"
    ) from error
  if checked:
    _check_json(restored[CHECKSUMS], "meta", restored.meta, directory, step)
  return step, restored.meta


def restore(
  directory_or_manager: str | ocp.CheckpointManager, abstract_items: dict[str, PyTree], step: int | None = None
) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """Restores the named items shaped like `abstract_items` (e.g. from `jax.eval_shape`), and the meta, checked
  against the step's checksums.

  The items come back as this process's single-device copies, whatever process and device counts saved them.

  Raises:
    CheckpointDamaged: a checksum mismatch (naming the array), unparseable metadata, a missing file.
    CheckpointReadError: permission, I/O, network or timeout errors.
    CheckpointError: no checkpoint, or a structure or shape mismatch (naming the first differing entry).
  """
  if isinstance(directory_or_manager, str):
    manager, where = _open_for_reading(directory_or_manager), directory_or_manager
  else:
    manager, where = directory_or_manager, str(directory_or_manager.directory)
  step = _pick_step(manager, where, step)
  step_dir = _step_dir(manager, step)
  _drop_reads_answering_a_closed_loop()
  try:
    checked = _has_checksums(step_dir)
    extra = {"sparsity": ocp.args.JsonRestore(), CHECKSUMS: ocp.args.JsonRestore()} if checked else {}
    args = ocp.args.Composite(
      meta=ocp.args.JsonRestore(),
      **extra,
      **{
        name: ocp.args.StandardRestore(parallel.abstract_one_copy_per_process(item))
        for name, item in abstract_items.items()
      },
    )
    restored = _read_step(step_dir, args)
  except Exception as error:  # orbax raises ValueError/KeyError/FileNotFoundError/... for mismatches
    kind = read_failure(error)
    problem = {
      CheckpointDamaged: "is unreadable: its files are damaged",
      CheckpointReadError: f"cannot be read ({step_dir})",
    }.get(kind, "does not match the expected state")
    raise kind(f"checkpoint {where} step {step} {problem} ({_first_line(error)})") from error
  items = {name: parallel.local_copy(restored[name]) for name in abstract_items}
  if checked:
    sums = restored[CHECKSUMS]
    _check_json(sums, "meta", restored.meta, where, step)
    _check_json(sums, "sparsity", restored.sparsity, where, step)
    _check_arrays(sums, items, where, step)
  return items, restored.meta


def checksums(items: dict[str, PyTree], meta: Any, sparsity: Any) -> dict[str, Any]:
  """The `checksums` item of a save: {'algorithm', 'arrays': {path: {'crc32', 'dtype', 'shape'}}, 'meta',
  'sparsity'} for host-local `items` and the JSON trees `meta` and `sparsity`."""
  return {
    "algorithm": "crc32",
    "arrays": {path: _array_record(x) for path, x in _named_leaves(items)},
    "meta": _json_crc(meta),
    "sparsity": _json_crc(sparsity),
  }


def _named_leaves(items: dict[str, PyTree]) -> list[tuple[str, Any]]:
  """[(path, leaf)] of every array of `items`, the path as 'model/params/conv/kernel' (None leaves skipped)."""
  return [
    ("/".join([name, *(_key_name(key) for key in path)]), x)
    for name, item in items.items()
    for path, x in jax.tree_util.tree_flatten_with_path(item)[0]
  ]


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _array_record(x: Any) -> dict[str, Any]:
  array = np.ascontiguousarray(np.asarray(x))
  return {"crc32": zlib.crc32(array.reshape(-1).view(np.uint8)), "dtype": str(array.dtype), "shape": list(array.shape)}


def _canonical_json(tree: Any) -> Any:
  """`tree` as JSON reads it back (tuples as lists, keys as strings): what its checksum is computed on."""
  return json.loads(json.dumps(tree))


def _json_crc(tree: Any) -> int:
  return zlib.crc32(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode())


def _check_json(sums: dict[str, Any], name: str, tree: Any, where: str, step: int) -> None:
  if _json_crc(tree) != sums.get(name):
    raise CheckpointDamaged(f"checkpoint {where} step {step} is damaged: its {name} does not match its checksum")


def _check_arrays(sums: dict[str, Any], items: dict[str, PyTree], where: str, step: int) -> None:
  stored = sums.get("arrays", {})
  for path, x in _named_leaves(items):
    record = stored.get(path)
    if record is None:
      raise CheckpointDamaged(f"checkpoint {where} step {step} is damaged: array {path} has no checksum")
    read = _array_record(x)
    if read != record:
      raise CheckpointDamaged(
        f"checkpoint {where} step {step} is damaged: array {path} does not match its checksum "
        f"(crc32 {read['crc32']:#010x} read, {record['crc32']:#010x} saved)"
      )


def _drop_reads_answering_a_closed_loop() -> None:
  """Silences the reports of TensorStore reads that finish after a restore failed.

  Orbax runs a restore's reads concurrently on an asyncio loop that it closes as soon as one read fails (the
  failure is then raised, and named in one line by `restore`). The other reads still finish: those that
  deliver a result to the closed loop from TensorStore's threads print `RuntimeError: Event loop is closed`
  through `sys.unraisablehook`, and those that fail too are logged by asyncio as "Task / Future exception was
  never retrieved" with their 40-line TensorStore spec (seven tracebacks, 54 lines, on a resume past one damaged
  step). Only exactly these are dropped: a RuntimeError raised by asyncio's `_check_closed`, and asyncio's
  never-retrieved reports of an orbax deserialization or a TensorStore error, and the "never awaited" warning of
  orbax's array-metadata read that the closed loop never ran; every other report goes on as before. Installed once
  per process, before the first read.
  """
  previous = sys.unraisablehook
  if getattr(previous, "hydra_jax_closed_loop_filter", False):
    return

  def hook(unraisable):
    error, frames, tb = unraisable.exc_value, [], unraisable.exc_traceback
    while tb is not None:
      frames.append(tb.tb_frame.f_code.co_name)
      tb = tb.tb_next
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and frames[-1:] == ["_check_closed"]:
      return
    previous(unraisable)

  hook.hydra_jax_closed_loop_filter = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_abandoned_read_filter)
  warnings.filterwarnings(
    "ignore", message=r"coroutine 'Store\._get_array_metadatas' was never awaited", category=RuntimeWarning
  )


def _abandoned_read_filter(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  abandoned = "exception was never retrieved" in message
  return not (abandoned and ("async_deserialize" in message or "tensorstore_spec" in message))


def _read_step(step_dir, args: ocp.args.Composite) -> Any:
  """The items `args` asks for from the finished step in `step_dir`, read by this process alone.

  Orbax's `CheckpointManager.restore` ends in a barrier of all processes, which a process whose read failed never
  reaches: the others would wait there (and every later collective would pair with the wrong one). The handler
  reads without it; `Checkpoints.restore_intact` lets the processes agree afterwards.
  """
  handler = ocp.CompositeCheckpointHandler()
  try:
    return handler.restore(step_dir, args=args)
  finally:
    handler.close()


def _step_dir(manager: ocp.CheckpointManager, step: int):
  return paths.path(str(manager.directory)) / str(step)


def _has_checksums(step_dir) -> bool:
  """Whether the step was saved with checksums: its `checksums` item, or (it is missing) orbax's record of it."""
  if (step_dir / CHECKSUMS).exists():
    return True
  record = step_dir / "_CHECKPOINT_METADATA"
  if not record.exists():
    return False  # a save of an orbax too old to record its items: written before checksums existed
  if CHECKSUMS in json.loads(record.read_text()).get("item_handlers", {}):
    raise FileNotFoundError(f"{step_dir / CHECKSUMS} is missing")
  return False


# Status codes in TensorStore's / gRPC's error messages that say the storage did not answer (the files may be fine).
_READ_ERROR_CODES = (
  "PERMISSION_DENIED",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "RESOURCE_EXHAUSTED",
  "UNAUTHENTICATED",
  "ABORTED",
  "CANCELLED",
  "UNKNOWN: ",
)
# ... and the messages that say the files are damaged or missing (DATA_LOSS: a CRC-32C of an OCDBT manifest or
# b-tree node that does not hold; the others: metadata that does not parse, a file that is not there).
_DAMAGE_CODES = ("NOT_FOUND", "Failed to parse", "Error parsing", "Expecting value")


def read_failure(error: BaseException) -> type[CheckpointError]:
  """The class of a read failure: CheckpointReadError (permission, I/O, network, timeout; retry, move nothing),
  CheckpointDamaged (a checksum that does not hold, unparseable or missing files: set aside on resume) or
  CheckpointError (a step of another state, or an error of unknown kind: never set aside)."""
  chain, seen = [], error
  while seen is not None and len(chain) < 16:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  if any(isinstance(e, CheckpointError) for e in chain):
    return next(type(e) for e in chain if isinstance(e, CheckpointError))
  text = " ".join(str(e) for e in chain)
  if "DATA_LOSS" in text:
    return CheckpointDamaged
  for e in chain:
    if isinstance(e, (PermissionError, TimeoutError, ConnectionError)):
      return CheckpointReadError
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno not in (None, errno.ENOENT):
      return CheckpointReadError
  if any(code in text for code in _READ_ERROR_CODES):
    return CheckpointReadError
  if any(isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)) for e in chain):
    return CheckpointDamaged
  if any(code in text for code in _DAMAGE_CODES):
    return CheckpointDamaged
  return CheckpointError


_VERDICTS = {type(None): 0, CheckpointDamaged: 1, CheckpointError: 2, CheckpointReadError: 3}


def _agree(verdict: int) -> tuple[int, int]:
  """(the worst verdict of all processes, the first process with it); this process's alone on one process."""
  if jax.process_count() == 1:
    return verdict, 0
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  verdicts = np.asarray(multihost_utils.process_allgather(np.int32(verdict))).reshape(-1)
  return int(verdicts.max()), int(np.argmax(verdicts))


def _first_line(error: Exception, limit: int = 240) -> str:
  """The first line of an orbax / TensorStore error (they run to 40 lines with the whole TensorStore spec)."""
  lines = str(error).strip().splitlines()
  line = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return line if len(line) <= limit else line[: limit - 3] + "..."


def _open_for_reading(directory: str) -> ocp.CheckpointManager:
  subdir = paths.path(directory) / "checkpoints"
  path = subdir if subdir.is_dir() else paths.path(directory)
  if not path.is_dir():
    raise CheckpointError(f"no checkpoint directory at {directory}")
  # A plain manager that never saves (read_only=True would log three warnings per open).
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))


def _pick_step(manager: ocp.CheckpointManager, where: str, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no finished checkpoint in {where}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointError(f"checkpoint {where} has no step {step}; it has {sorted(steps)}")
  return step


def check_resumable(workdir: str, threefry_partitionable: bool) -> None:
  """Raises CheckpointError when `workdir` holds a checkpoint drawn under the other PRNG setting."""
  if not (paths.path(workdir) / "checkpoints").is_dir():
    return
  try:
    _, meta = read_meta(workdir)
  except CheckpointError:
    return  # nothing finished to resume from
  recorded = meta.get("threefry_partitionable")
  if recorded is not None and recorded != threefry_partitionable:
    raise CheckpointError(
      f"the checkpoint in {workdir} was written with threefry_partitionable={recorded}, but this run has "
      f"{threefry_partitionable}: its random draws would differ. Rerun with "
      f"--config.threefry_partitionable={str(recorded).lower()}, or use a new workdir"
    )


def write_config(config_json: str, workdir: str) -> None:
  """`workdir`/config.json of the first run there (each checkpoint's meta holds its own config); process 0 only."""
  path = paths.path(workdir) / "config.json"
  if jax.process_index() == 0 and not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_json)
