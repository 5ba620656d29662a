"""hydra_jax.preemption: signals recorded, not fatal, handlers put back; a second one acts; with two processes
(jax.distributed on localhost, gloo), a signal to one is seen by both after the same step."""

import json
import os
import signal
import subprocess
import sys
import threading

import portpicker
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
  # From the handler a Python program starts with (an earlier test or library in this worker may have left another,
  # e.g. SIG_IGN, which the second Ctrl-C would then rightly hand the signal to).
  original = signal.signal(signal.SIGINT, signal.default_int_handler)
  signals = preemption.StopSignals()
  signals.install()
  # Sent to the main thread itself (os.kill may wake another thread of this process, e.g. one left by TensorStore;
  # the main thread then runs the handler later, and two such signals can coalesce into one call of it).
  main = threading.main_thread().ident
  try:
    signal.pthread_kill(main, signal.SIGINT)
    assert signals.stop_signal() == signal.SIGINT  # the first Ctrl-C is recorded: no exception
    with pytest.raises(KeyboardInterrupt):
      signal.pthread_kill(main, signal.SIGINT)
      signal.getsignal(signal.SIGINT)  # a bytecode boundary after the signal, where Python runs its handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signals.restore()
    signal.signal(signal.SIGINT, original)


# Process `id` of 2 joins the run at `address`, installs the handlers and calls stop_signal() 6 times, process 1
# sending itself SIGTERM just before its third call; prints what each call returned. No training, no devices used.
_CALLS = """
import json, os, signal, sys
from hydra_jax import parallel, preemption
address, process_id = sys.argv[1], int(sys.argv[2])
parallel.init_distributed(address, 2, process_id, timeout_s=60)
signals = preemption.StopSignals()
signals.install()
seen = []
for call in range(1, 7):
  if call == 3 and process_id == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  seen.append(signals.stop_signal())
print(json.dumps(seen))
"""


def test_two_processes_see_a_signal_to_one_of_them_after_the_same_call():
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _CALLS, address, str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [proc.communicate(timeout=120) for proc in procs]  # a process left waiting in a collective: timeout
  finally:
    for proc in procs:
      proc.kill()
  assert [proc.returncode for proc in procs] == [0, 0], outputs
  seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert seen == [[0, 0, signal.SIGTERM, signal.SIGTERM, signal.SIGTERM, signal.SIGTERM]] * 2, seen
