"""Orbax checkpoints of a run: the last N train states, the best one by robust accuracy, and their metadata.

Layout of a workdir:

  <workdir>/checkpoints/<step>/{<items>, meta, sparsity}  last `keep` saves (atomic: orbax renames a
                                                          finished temporary directory into place)
  <workdir>/best/<step>/{<items>, meta, sparsity}         the save with the highest `best_metric`

A save holds named pytree items (the train loop saves 'model' = params, batch_stats and scores, and 'train'
= step, optimizer state, carry and rng), so a later stage can read 'model' alone.

`meta` is JSON with the fully resolved config, the model name / classes, the stage, k, the metrics at that
step and the jax / jaxlib / flax / orbax versions; `sparsity` is `masking.SparsityReport.to_json()` computed
from the exported weights. A state is restored against an explicit target structure (from `jax.eval_shape`),
so a checkpoint of another model fails with an error that names the mismatch, before anything is written.

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

import json
import os
import sys
from typing import Any

import flax
import jax
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
    args = ocp.args.Composite(
      meta=ocp.args.JsonSave(meta),
      sparsity=ocp.args.JsonSave(json.loads(sparsity)),
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

  def restore_intact(self, abstract_items: dict[str, PyTree]) -> tuple[dict, dict[str, Any]]:
    """The items and meta of the latest step that reads back, for a resume.

    Newer steps that cannot be read (damaged files) are moved aside to `<workdir>/unreadable_checkpoint_<step>`
    with a warning on stderr, so that the run saves those steps again; when no step reads, the newest step's
    error is raised and nothing is moved.
    """
    newest_first = sorted(self._last.all_steps(), reverse=True)
    errors_by_step = {}
    for step in newest_first:
      try:
        result = restore(self._last, abstract_items, step)
      except CheckpointError as error:
        errors_by_step[step] = error
        continue
      for bad, error in errors_by_step.items():
        print(f"warning: {error}; resuming from step {step}, the latest readable one", file=sys.stderr)
        self._set_aside(bad)
      return result
    raise errors_by_step[newest_first[0]]

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
  """(step, meta) of the latest (or given) save under `directory` (a workdir or its checkpoints/)."""
  manager = _open_for_reading(directory)
  step = _pick_step(manager, directory, step)
  try:
    return step, manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as error:  # orbax raises many types for damaged files
    raise CheckpointError(
      f"cannot read the metadata of checkpoint {directory} step {step}: {_first_line(error)}"
    ) from error


def restore(
  directory_or_manager: str | ocp.CheckpointManager, abstract_items: dict[str, PyTree], step: int | None = None
) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """Restores the named items shaped like `abstract_items` (e.g. from `jax.eval_shape`), and the meta.

  The items come back as this process's single-device copies, whatever process and device counts saved them.

  Raises:
    CheckpointError: no checkpoint, a structure or shape mismatch (naming the first differing entry), or
      unreadable files.
  """
  if isinstance(directory_or_manager, str):
    manager, where = _open_for_reading(directory_or_manager), directory_or_manager
  else:
    manager, where = directory_or_manager, str(directory_or_manager.directory)
  step = _pick_step(manager, where, step)
  args = ocp.args.Composite(
    meta=ocp.args.JsonRestore(),
    **{
      name: ocp.args.StandardRestore(parallel.abstract_one_copy_per_process(item))
      for name, item in abstract_items.items()
    },
  )
  try:
    restored = manager.restore(step, args=args)
  except Exception as error:  # orbax raises ValueError/KeyError/FileNotFoundError/... for mismatches
    problem = (
      "is unreadable: its files are damaged" if "DATA_LOSS" in str(error) else "does not match the expected state"
    )
    raise CheckpointError(f"checkpoint {where} step {step} {problem} ({_first_line(error)})") from error
  return {name: parallel.local_copy(restored[name]) for name in abstract_items}, restored.meta


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
