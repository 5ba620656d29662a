"""A run directory whose newest checkpoint is damaged or cannot be read, used as a user would (issue 26): every
reader (`eval`, `export`, `certify`, `load_run`) refuses flipped array bytes in one line naming the step and the
array; `train` resumes from the latest intact step, setting the damaged one aside; a permission error moves
nothing and stops the run in one line.

One tiny run (cnn_tiny on 10% of the digits at 8x8, 2 steps per epoch, saved at steps 2, 4 and 6), trained once
in this process by the command line's own code (`cli_in_process`) and copied for each test.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import hydra_jax
from hydra_jax import checkpoints
from tests.cli_in_process import run as run_in_process
from tests.test_checkpoints import UNPRIVILEGED
from tests.test_checkpoints import flip_largest_file
from tests.test_checkpoints import tree_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [
  "train",
  "--config",
  os.path.join(ROOT, "configs", "digits_demo.py") + ":model=cnn_tiny,objective=benign",
  "--config.stage=pretrain",
  "--config.data.image_size=8",
  "--config.data.data_fraction=0.1",
  "--config.eval.every_epochs=1000",
  "--config.log.progress=false",
  "--config.checkpoint.every_steps=2",
  "--config.checkpoint.keep=3",
  "--config.checkpoint.async_save=false",
  "--config.parallel.mode=single",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("damage") / "run")
  status, _, err = run_in_process(*TRAIN, "--config.stop_after_steps=6", "--workdir", workdir)
  assert status == 0, err
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4", "6"]
  return workdir


@pytest.fixture
def damaged(run, tmp_path):
  """A copy of the run whose newest step (6) has 16 bytes flipped in the middle of its largest array file."""
  workdir = shutil.copytree(run, str(tmp_path / "run"))
  largest = flip_largest_file(os.path.join(workdir, "checkpoints", "6"))
  assert f"{os.sep}d{os.sep}" in largest  # OCDBT array data
  return workdir


DAMAGED = (
  r"checkpoint {workdir} step 6 is damaged: array model/params/\S+ does not match its checksum "
  r"\(crc32 \S+ read, \S+ saved\)"
)


@pytest.mark.parametrize(
  "command", [["eval"], ["export", "--out", "{tmp}/model.npz"], ["certify", "--n=10", "--max_examples=1"]]
)
def test_every_command_refuses_flipped_array_bytes_in_one_line(damaged, tmp_path, command):
  before = tree_digest(damaged)
  args = [part.format(tmp=tmp_path) for part in command]
  status, out, err = run_in_process(*args, "--workdir", damaged)
  assert status == 1 and out == ""
  expected = DAMAGED.format(workdir=re.escape(damaged))
  assert re.fullmatch(rf"hydra-jax {args[0]}: error: {expected}\n", err), err
  assert tree_digest(damaged) == before
  assert sorted(os.listdir(tmp_path)) == ["run"]  # no export, no certify folder


def test_load_run_refuses_flipped_array_bytes_and_reads_the_intact_steps(damaged):
  with pytest.raises(checkpoints.CheckpointDamaged, match=DAMAGED.format(workdir=re.escape(damaged))):
    hydra_jax.load_run(damaged)
  assert hydra_jax.load_run(damaged, 4).step == 4


def test_train_resumes_from_the_latest_intact_step_and_sets_the_damaged_one_aside(damaged):
  status, out, err = run_in_process(*TRAIN, "--config.stop_after_steps=8", "--workdir", damaged)
  assert status == 0, err
  lines = err.splitlines()
  assert len(lines) == 2, err  # the two documented warnings and nothing else
  assert re.fullmatch(
    "warning: "
    + DAMAGED.format(workdir=re.escape(os.path.join(damaged, "checkpoints")))
    + "; resuming from step 4, the latest readable one",
    lines[0],
  ), lines[0]
  assert lines[1] == f"warning: moved the unreadable step 6 to {os.path.join(damaged, 'unreadable_checkpoint_6')}"
  assert json.loads(out)["step"] == 8
  assert sorted(os.listdir(os.path.join(damaged, "checkpoints")), key=int) == ["4", "6", "8"]  # 6 saved again
  assert "unreadable_checkpoint_6" in os.listdir(damaged)
  assert hydra_jax.load_run(damaged).step == 8


def test_train_stops_on_a_permission_error_and_moves_nothing(run, tmp_path):
  """`../shared/repro/damaged_permission.sh`: a good newest step with a file this process may not read."""
  workdir = shutil.copytree(run, str(tmp_path / "run"))
  manifest = os.path.join(workdir, "checkpoints", "6", "model", "manifest.ocdbt")
  os.chmod(manifest, 0)
  before = tree_digest(workdir)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run(
    [*UNPRIVILEGED, sys.executable, "-m", "hydra_jax", *TRAIN, "--config.stop_after_steps=8", "--workdir", workdir],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr
  step_dir = os.path.join(workdir, "checkpoints", "6")
  assert re.fullmatch(
    rf"hydra-jax train: error: checkpoint {re.escape(os.path.join(workdir, 'checkpoints'))} step 6 cannot be read "
    rf"\({re.escape(step_dir)}\) \(ValueError: PERMISSION_DENIED: .*\) after 4 attempts; nothing was moved: make "
    r"the checkpoint readable \(or wait for the storage to answer\) and rerun to resume\n",
    result.stderr,
  ), result.stderr
  assert tree_digest(workdir) == before  # step 6 stays, nothing written (no rewind to step 4)
  os.chmod(manifest, 0o644)
  assert hydra_jax.load_run(workdir).step == 6  # it was a good step
