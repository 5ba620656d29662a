"""Metric writing (JSON lines, optional TensorBoard scalars) and the stage loop's cadence: after which step to log
(with a finiteness check), evaluate and save.

  writer = metrics.MetricWriter(workdir, tensorboard=False)
  writer.write(step, 'train', metrics.mean_metrics(history))   # history: per-step metric dicts
  writer.close()

Only process 0 writes; the other processes' writers do nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np

from hydra_jax import paths


class MetricWriter:
  """`metrics.jsonl` ({'step', 'split', **metrics} per line) and `tensorboard/` (with tensorboardX)."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.active = jax.process_index() == 0
    self._jsonl = paths.Appender(paths.join(workdir, "metrics.jsonl")) if self.active else None
    self._tb = None
    if self.active and tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (optional dependency)

      paths.register_tensorboard_writers()
      self._tb = tensorboardX.SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Appends one line (and TensorBoard scalars '<split>/<name>') for `step`."""
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", value, step)

  def close(self) -> None:
    """Closes the files (idempotent)."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Host floats averaged over the steps of `history` (pmap: each value is per device; they are equal).

  Args:
    history: one dict of scalar (or [devices]) metrics per step, all with the same names.

  Returns:
    {name: mean over steps (and devices)}.
  """
  fetched = jax.device_get(history)
  return {name: float(np.mean([np.mean(m[name]) for m in fetched])) for name in fetched[0]}


class Cadence(NamedTuple):
  """What happens after a step: log the mean train metrics (and check they are finite), evaluate, save."""

  log: bool
  evaluate: bool
  save: bool


def cadence(
  done: int,
  *,
  steps_per_epoch: int,
  total_steps: int,
  stop: int,
  log_every: int,
  eval_every_epochs: int,
  save_every: int,
) -> Cadence:
  """The actions after the step that completes `done` steps of a stage (pure; tested without training).

  Args:
    done: steps completed, 1 <= done <= stop.
    steps_per_epoch: batches per epoch.
    total_steps: the stage's length in steps.
    stop: where this run ends (total_steps, or earlier with config.stop_after_steps).
    log_every: config.log.every_steps.
    eval_every_epochs: config.eval.every_epochs.
    save_every: config.checkpoint.every_steps (0: only at epoch ends and at `stop`).

  Returns:
    A `Cadence`. Epoch ends log and save, and evaluate every `eval_every_epochs` epochs and at the end; every
    save also logs, so that no checkpoint ever holds a state whose train metrics are not finite.
  """
  epoch_end = done % steps_per_epoch == 0 or done == total_steps
  evaluate = epoch_end and ((done // steps_per_epoch) % eval_every_epochs == 0 or done == total_steps)
  save = epoch_end or done == stop or bool(save_every and done % save_every == 0)
  log = save or done % log_every == 0  # every save is preceded by a finite check of the train metrics
  return Cadence(log=log, evaluate=evaluate, save=save)


def check_finite(values: Mapping[str, float], step: int, last_checkpoint: int | None, workdir: str) -> None:
  """Raises FloatingPointError naming the metrics and the checkpoint to resume from when a value is not finite."""
  if not all(math.isfinite(value) for value in values.values()):
    last = last_checkpoint
    kept = (
      f"The last checkpoint (step {last}) in {workdir} is untouched: lower the learning rate or check "
      f"the data, then rerun to resume from it."
      if last is not None
      else "No checkpoint was saved: lower the learning rate or check the data."
    )
    raise FloatingPointError(
      f"non-finite training metrics {dict(values)} before step {step}; stopping without saving. {kept}"
    )
