"""Every fenced code block of README.md and docs/*.md runs, at tiny size, as a reader would paste it.

The convention (docs/README.md states it for authors):
- ```python blocks of one page run in order in one namespace (a later block uses an earlier one's names);
- ```bash blocks (also sh, shell, console) run command by command: `hydra-jax ...` and `python -m hydra_jax ...`
  call the CLI in this process, `python -m MODULE ...` runs the module in this process; the install and test
  commands (`python3 -m venv`, `. .venv/bin/activate`, `pip install`, `ruff`, `python -m pytest`) are what this
  session itself ran, so they are not run again (the README's test command is checked against .ci/run instead);
  shell syntax beyond `&&`, `;` and line continuations (loops, pipes, `&`, variables) is an error;
- ```text blocks and blocks without a language show output or a file: not run;
- a block that cannot run here (a TPU VM, real Cloud Storage, a download, a full-size benchmark, several
  processes) is preceded by the line `<!-- not run: REASON -->`. Keep those rare: prefer a tiny command that runs.
Each page runs in a scratch directory of its own (its working directory) that holds `configs/` (the repository's)
and the README's main job in `runs/digits_demo` (run once, before any page), so a page may use that run.
Tiny size: while the blocks run, the library's entry points (`pipeline.train_and_evaluate`,
`export.evaluate_checkpoint`, `export.certify_checkpoint`, `export.export_*`) get their config through `tiny`
(cnn_tiny, or the page's own model, on two batches of digits, one epoch per stage, attacks of one step on 32 test
images) and certify its smallest sample counts. New pages and blocks are picked up without changes here; the pages
of SLOW_PAGES (30-60 CPU seconds each at tiny size) run with -m slow.

Run: python -m pytest -q tests/test_docs.py
"""

import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import sys
import unittest.mock

import cli_in_process
import pytest

from hydra_jax import evaluate
from hydra_jax import export
from hydra_jax import models
from hydra_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# Pages whose blocks compile many programs of their own (verified training, smoothing, every evaluation method,
# channel runs, every baseline, own models, HARP runs): 30-60 CPU seconds each even at tiny size, so they run with
# -m slow; the others by default.
SLOW_PAGES = {
  "README.md",  # its main job (tiny) runs by default as every page's runs/digits_demo; its other blocks: 55 CPU s
  "docs/pipeline.md",
  "docs/bounds_and_smoothing.md",
  "docs/evaluation.md",
  "docs/structured.md",
  "docs/own_models.md",
  "docs/harp.md",
}
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "bash"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
MAIN_JOB = "hydra-jax train --config configs/digits_demo.py --workdir runs/digits_demo"
SETUP = ("pip", "pip3", "ruff", ".", "source")  # installs and the test command: what this session already ran

# Keys set on every config a block trains or evaluates with: cnn_tiny on two batches of 32 16x16 digits per stage,
# one epoch, attacks of one step, evaluation on the first 32 test images, one device, no background threads. One
# threat model and input shape for every page, so that the pages share compiled programs (a persistent-cache hit
# costs a fraction of a compile).
TINY = {
  "model.name": "cnn_tiny",
  "model.width": 1.0,
  "data.name": "digits",
  "data.data_dir": "",
  "data.format": "auto",
  "data.image_size": 16,
  "data.batch_size": 32,
  "data.eval_batch_size": 32,
  "data.eval_examples": 32,
  "data.data_fraction": 0.05,
  "data.prefetch": 0,
  "objective.norm": "linf",
  "objective.eps": 0.1,
  "objective.step_size": 0.025,
  "objective.steps": 1,
  "eval.norm": "linf",
  "eval.eps": 0.1,
  "eval.step_size": 0.025,
  "eval.steps": 1,
  "eval.every_epochs": 1,
  "eval.smooth.n0": 8,
  "eval.smooth.n": 32,
  **{f"eval.autoattack.{k}": v for k, v in dict(apgd_steps=2, fab_steps=2, square_queries=20, num_targets=2).items()},
  "log.progress": False,
  "checkpoint.async_save": False,
  "parallel.mode": "single",
}


class Block:
  """One fenced code block: page, first line number, language, code, and the reason it is not run (or None)."""

  def __init__(self, page, line, language, code, not_run):
    self.page, self.line, self.language, self.code, self.not_run = page, line, language, code, not_run

  def __repr__(self):
    return f"{self.page}:{self.line} ({self.language or 'no language'})"


def blocks(page):
  """The fenced code blocks of a page, in order."""
  with open(os.path.join(ROOT, page)) as f:
    lines = f.read().splitlines()
  found, i = [], 0
  while i < len(lines):
    fence = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
    if not fence:
      i += 1
      continue
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
    before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
    marker = NOT_RUN.search(before)
    found.append(Block(page, i + 1, fence.group(1).lower(), "\n".join(lines[i + 1 : end]), marker and marker.group(1)))
    i = end + 1
  return found


def tiny(config):
  """A copy of `config` at tiny size (TINY), the other keys as they were."""
  config = config.copy_and_resolve_references()
  own_model = models.own.is_spec(config.model.name)  # a user's own model (docs/own_models.md) stays, at its size
  with config.unlocked():
    for key, value in TINY.items():
      if own_model and key.startswith("model."):
        continue
      *parents, leaf = key.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    for stage in config.stages:
      config.stages[stage].epochs = 1
    config.ks = tuple(config.ks)[:1]  # stage='all': one branch
  return config


def _tiny_entry(original, **clamped):
  def call(config, *args, **kwargs):
    for name, most in clamped.items():
      kwargs[name] = min(kwargs.get(name, most), most)
    return original(tiny(config), *args, **kwargs)

  return call


@contextlib.contextmanager
def tiny_library():
  """The library's entry points, for as long as the context lasts, run their configs at tiny size."""
  with contextlib.ExitStack() as stack:
    for module, name, clamped in [
      (pipeline, "train_and_evaluate", {}),
      (export, "evaluate_checkpoint", {}),
      (export, "export_checkpoint", {}),
      (export, "export_compact", {}),
      (export, "certify_checkpoint", {"n0": 8, "n": 32, "batch_size": 32, "max_examples": 2}),
    ]:
      stack.enter_context(unittest.mock.patch.object(module, name, _tiny_entry(getattr(module, name), **clamped)))
    yield


def commands(code):
  """The simple commands of a bash block (argv lists): continuation lines joined, comments dropped, split at
  `&&` and `;`."""
  found = []
  for line in code.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    for word in words:
      if word in ("|", "&", "||", ">", "<", ">>", "for", "do", "done", "then", "fi") or "$" in word:
        raise AssertionError(f"shell syntax {word!r}: write plain commands, or mark the block <!-- not run: ... -->")
    command = []
    for word in [*words, ";"]:
      if word in ("&&", ";"):
        found += [command] if command else []
        command = []
      else:
        command.append(word)
  return found


def is_setup(argv):
  """An install step or the test command (venv, activate, pip, ruff, pytest): what this session already ran."""
  module = argv[2] if len(argv) > 2 and argv[1] == "-m" else None
  return argv[0] in SETUP or module in ("venv", "pip", "pytest")


def run_command(argv):
  """Runs one command of a bash block in this process; returns what it printed."""
  if argv[0] == "hydra-jax" or argv[:3] in (["python", "-m", "hydra_jax"], ["python3", "-m", "hydra_jax"]):
    status, out, err = cli_in_process.run(*argv[3 if argv[0].startswith("python") else 1 :])
  elif argv[0] in ("python", "python3") and argv[1] == "-m":
    status, out, err = _run_module(argv[2:])
  else:
    raise AssertionError(f"{shlex.join(argv)}: not a command this test runs (hydra-jax, python -m MODULE)")
  assert status == 0, f"{shlex.join(argv)}: exit status {status}\n{err[-2000:]}"
  return out


def _run_module(args):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), unittest.mock.patch.object(sys, "argv", args):
    try:
      runpy.run_module(args[0], run_name="__main__", alter_sys=True)
      status = 0
    except SystemExit as stop:
      status = 0 if stop.code is None else stop.code
  return status, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def working_directory(path):
  before = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(before)


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
  """A directory holding configs/ and the README's main job (tiny) in runs/digits_demo."""
  path = tmp_path_factory.mktemp("main_job")
  os.symlink(os.path.join(ROOT, "configs"), path / "configs")
  with working_directory(path), tiny_library():
    run_command(shlex.split(MAIN_JOB))
  return path / "runs" / "digits_demo"


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in PAGES])
def test_every_code_block_of_the_page_runs(page, main_job, tmp_path):
  """The page's blocks in order, in a directory of its own that holds configs/ and runs/digits_demo."""
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  (tmp_path / "runs").mkdir()
  os.symlink(main_job, tmp_path / "runs" / "digits_demo")
  namespace = {"__name__": "__main__"}
  with (
    working_directory(tmp_path),
    tiny_library(),
    unittest.mock.patch.dict(evaluate._METHODS),  # a page may register methods: forgotten afterwards
  ):
    for block in blocks(page):
      if block.not_run is not None or block.language not in RUN:
        continue
      try:
        if RUN[block.language] == "python":
          with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block.code, f"{block!r}", "exec"), namespace)  # noqa: S102  (the docs' own examples)
        else:
          for argv in commands(block.code):
            if not is_setup(argv):
              run_command(argv)
      except Exception as error:
        raise AssertionError(f"{block!r} failed: {type(error).__name__}: {error}") from error


def test_not_run_blocks_say_why():
  for page in PAGES:
    for block in blocks(page):
      assert block.not_run is None or len(block.not_run) > 10, f"{block!r}: say why it cannot run here"


def test_the_readme_main_job_and_test_command_are_what_ci_and_this_test_run():
  """The README's main-job command is the one this test runs (tiny); .ci/run runs the README's test command."""
  readme = [block for block in blocks("README.md") if RUN.get(block.language) == "bash"]
  assert any(shlex.split(MAIN_JOB) in commands(block.code) for block in readme)
  (test_block,) = [block for block in readme if any("pytest" in argv for argv in commands(block.code))]
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [shlex.split(line, comments=True) for line in f]
  normal = lambda argv: [w for w in (argv[2:] if argv[:3] == ["python", "-m", "pip"] else argv) if w != "-q"]
  ci_commands = [normal(argv) for argv in ci]
  for argv in commands(test_block.code):
    if argv[:3] != ["python3", "-m", "venv"] and argv[0] != ".":
      assert normal(argv) in ci_commands, f"README's {shlex.join(argv)} is not in .ci/run"
