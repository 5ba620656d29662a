"""Test setup: 8 simulated CPU devices, set before JAX initialises its backend."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# The partitionable threefry PRNG (JAX's default) takes seconds to compile per random op on this CPU; the
# classic one compiles in a fraction of a second. Tests check behaviour, not particular random streams.
jax.config.update("jax_threefry_partitionable", False)
# Programs recompiled by several tests (the same train step in another run, say) load from a per-session
# persistent cache instead of compiling again: XLA compilation dominates this suite's time on CPU. The pytest-xdist
# workers of one run share it (one run id), so what one worker compiled the other loads.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
jax.config.update(
  "jax_compilation_cache_dir", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hydra_jax_test_cache_{_SESSION}")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def gcs():
  """A local Cloud Storage emulator with bucket `bucket` (tests/gcs_emulator.py), one per session: gcsfs keeps
  one client per process, bound to the first endpoint it sees."""
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top

  with gcs_emulator.emulator() as url:
    yield url
