"""`hydra-jax ARGS` run in the test's process: the command line's own code, without a fresh process's start-up
and compiles."""

import contextlib
import io
import sys
import unittest.mock

from absl import flags

from hydra_jax import cli


def run(*args):
  """Runs `cli.main(["hydra-jax", *args])` here; returns (exit status (0 when main returns), stdout, stderr).

  absl's flags are process-wide: each call clears the last one's values and ml_collections' `--config.KEY`
  override flags (registered anew when a config is parsed), and sets sys.argv, where ml_collections finds the
  overrides.
  """
  argv = ["hydra-jax", *args]
  for name in [name for name in flags.FLAGS if name.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), unittest.mock.patch.object(sys, "argv", argv):
    try:
      cli.main(argv)
      status = 0
    except SystemExit as stop:
      status = 0 if stop.code is None else stop.code
  return status, out.getvalue(), err.getvalue()
