"""Metric writing: JSON lines (always) and TensorBoard scalars (optional) in a run directory.

  writer = metrics.MetricWriter(workdir, tensorboard=False)
  writer.write(step, 'train', metrics.mean_metrics(history))   # history: per-step metric dicts
  writer.close()

Only process 0 writes; the other processes' writers do nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np


class MetricWriter:
  """`metrics.jsonl` ({'step', 'split', **metrics} per line) and `tensorboard/` (with tensorboardX)."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.active = jax.process_index() == 0
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.active else None
    self._tb = None
    if self.active and tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (optional dependency)

      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    """Appends one line (and TensorBoard scalars '<split>/<name>') for `step`."""
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    self._jsonl.flush()
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
