"""Test setup: simulated CPU devices (8, or HYDRA_JAX_TEST_DEVICES), set before JAX initialises its backend.

`HYDRA_JAX_TEST_DEVICES=1 python -m pytest -q` runs the suite on one device: tests marked `devices(n)` (they
compare n devices with one) are then skipped. Subprocesses inherit the count through XLA_FLAGS.
"""

import importlib.metadata
import os

DEVICES = int(os.environ.get("HYDRA_JAX_TEST_DEVICES", "8"))
# XLA:CPU's compilation is most of this suite's CPU time (tiny models, many programs). LLVM at -O1 and XLA's loop
# emitters instead of its newer fusion emitters compile faster than they lose in run time: test_train.py took 112
# CPU s instead of 198 (jaxlib 0.10.2, AMD EPYC, load 8-10). Only where the flags were measured: XLA aborts on a flag
# it does not know. No test compares bits of two programs compiled differently, so the codegen cannot change a
# verdict; the library itself (the CLI, benchmarks, users, and the tests' subprocesses that set XLA_FLAGS) compiles
# with XLA's defaults.
_FAST_COMPILE = (
  " --xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
  if importlib.metadata.version("jaxlib").startswith("0.10.")
  else ""
)
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}{_FAST_COMPILE}")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", DEVICES)
# The partitionable threefry PRNG (JAX's default) takes seconds to compile per random op on this CPU; the
# classic one compiles in a fraction of a second. Tests check behaviour, not particular random streams.
jax.config.update("jax_threefry_partitionable", False)
# Programs recompiled by several tests (the same train step in another run, say) load from a per-session
# persistent cache instead of compiling again: XLA compilation dominates this suite's time on CPU. The pytest-xdist
# workers of one run share it (one run id), so what one worker compiled the other loads, and so do the command-line
# subprocesses the tests start (through the environment, which they inherit).
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
_CACHE = {
  "jax_compilation_cache_dir": os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hydra_jax_test_cache_{_SESSION}"),
  "jax_persistent_cache_min_compile_time_secs": 0.2,
  "jax_persistent_cache_min_entry_size_bytes": 0,
}
for _name, _value in _CACHE.items():
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)


def pytest_runtest_setup(item):
  for marker in item.iter_markers(name="devices"):
    if jax.device_count() < marker.args[0]:
      pytest.skip(f"needs {marker.args[0]} devices, has {jax.device_count()} (HYDRA_JAX_TEST_DEVICES)")


@pytest.fixture(scope="session")
def gcs():
  """A local Cloud Storage emulator with bucket `bucket` (tests/gcs_emulator.py), one per session: gcsfs keeps
  one client per process, bound to the first endpoint it sees."""
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top

  with gcs_emulator.emulator() as url:
    yield url
