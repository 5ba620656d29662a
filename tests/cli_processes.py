"""Many `hydra-jax` command lines, each in a process of its own, for the price of one import of the CLI.

`run(commands, cwd)` starts one fresh interpreter (none of the test process's JAX state) that imports
`hydra_jax.cli` once, then forks one child per command line. Each child sets its environment, points its stdout
and stderr at files and runs `cli.main(argv)`: what `python -m hydra_jax ARGS` runs after its imports, with the
same exit status (an uncaught exception prints its traceback and exits 1, as Python does). The import costs about
2.5 s of CPU; each command line then costs what it runs (a user error caught before any JAX work: ~0.1 s), where
separate `python -m hydra_jax` processes would pay the import each time.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # per command line


class Result(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


def run(commands, cwd, *, prefix=()):
  """Runs each command line of `commands` (argv lists after `hydra-jax`, or (argv, env) tuples) in `cwd`.

  Args:
    commands: the command lines; env: variables to set for that one.
    cwd: the working directory of every command line.
    prefix: a program that runs the interpreter (e.g. setpriv with its arguments).

  Returns:
    One `Result` per command line, in order.
  """
  cases = [c if isinstance(c, tuple) else (c, {}) for c in commands]
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  env.pop("HYDRA_JAX_TRACEBACK", None)
  done = subprocess.run(
    [*prefix, sys.executable, "-m", "tests.cli_processes"],
    input=json.dumps(cases),
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S * len(cases) + 120,
  )
  if done.returncode:
    raise AssertionError(f"the driver failed (exit {done.returncode}):\n{done.stderr}")
  return [Result(*result) for result in json.loads(done.stdout)]


def _child(argv, env, stdout_path, stderr_path):
  """Runs `hydra-jax argv` in this (forked) process and exits with its status."""
  from hydra_jax import cli  # pylint: disable=g-import-not-at-top  (imported by the parent before the fork)

  os.environ.update(env)
  for fd, path in ((1, stdout_path), (2, stderr_path)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  signal.alarm(TIMEOUT_S)
  code = 0
  try:
    sys.argv = ["hydra-jax", *argv]  # ml_collections finds the --config.KEY overrides in sys.argv
    cli.main()
  except SystemExit as exit_:
    code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    if isinstance(exit_.code, str):
      print(exit_.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except  (as the interpreter reports an uncaught exception)
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _main():
  from hydra_jax import cli  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (the one import)

  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for index, (argv, env) in enumerate(json.load(sys.stdin)):
      paths = [os.path.join(tmp, f"{index}.{stream}") for stream in ("stdout", "stderr")]
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(argv, env, *paths)
      _, status = os.waitpid(pid, 0)
      results.append([os.waitstatus_to_exitcode(status), *(open(path).read() for path in paths)])
  print(json.dumps(results))


if __name__ == "__main__":
  _main()
