"""Stopping a run cleanly on SIGTERM (a preempted or stopped VM) and SIGINT (Ctrl-C), on every process together.

Between `StopSignals.install()` and `restore()`, SIGTERM and SIGINT only record that a stop was asked; the train
loop asks `stop_signal()` after each step, saves a checkpoint at that step and raises `Preempted`. With several
processes (multi-host), `stop_signal()` is a collective: every process learns after the same step that one of them
got a signal, so all save the same step and stop together, even when only one process was signalled. A second signal
while stopping acts as if no handler were installed (a second Ctrl-C ends the process at once).

  signals = preemption.StopSignals()
  signals.install()
  try:
    for step in ...:
      state = train_step(state, batch)
      if (signum := signals.stop_signal()):
        save(step); raise preemption.Preempted(signum, step, ...)
  finally:
    signals.restore()
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818  (not an error: the run stopped where it was asked to)
  """The run stopped on a signal after saving a checkpoint; rerunning the same command resumes it.

  Attributes:
    signum: the signal (SIGTERM 15, SIGINT 2); the command line exits with 128 + signum.
    step: the step the checkpoint holds.
  """

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(message)
    self.signum, self.step = signum, step


class StopSignals:
  """Records SIGTERM / SIGINT instead of dying, from `install()` to `restore()` (main thread only; elsewhere the
  signals keep their handlers)."""

  def __init__(self):
    self.signum = 0
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum:  # the second signal: let it do what it would have done
      self.restore()
      signal.raise_signal(signum)
      return
    self.signum = signum

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

  def restore(self) -> None:
    """Puts the previous handlers back (idempotent)."""
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # None: a handler set from C
    self._previous = {}

  def stop_signal(self) -> int:
    """The signal to stop on (0: none), the same on every process: a collective when there are several."""
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))
