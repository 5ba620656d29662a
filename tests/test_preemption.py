"""hydra_jax.preemption in this process: signals recorded, not fatal, handlers put back; a second one acts."""

import os
import signal

import pytest

from hydra_jax import preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_recorded_and_the_previous_handler_comes_back(signum):
  before = signal.getsignal(signum)
  signals = preemption.StopSignals()
  signals.install()
  try:
    assert signals.stop_signal() == 0
    os.kill(os.getpid(), signum)  # delivered to the main thread at the next bytecode boundary
    assert signals.stop_signal() == signum
  finally:
    signals.restore()
  assert signal.getsignal(signum) == before


def test_a_second_ctrl_c_interrupts_at_once():
  signals = preemption.StopSignals()
  signals.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      signal.getsignal(signal.SIGINT)  # a bytecode boundary after the signal, where Python runs its handler
  finally:
    signals.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
