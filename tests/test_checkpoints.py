"""Tests of hydra_jax.checkpoints: round trips of train-state items, metadata, the last-N and best managers,
and clear errors (missing, mismatched, corrupt) that leave what was saved untouched."""

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_items(scale=1.0):
  """Items shaped like the train loop's: model (params, batch_stats, scores with None leaves) and train."""
  return {
    "model": {
      "params": {
        "conv": {"kernel": scale * jnp.arange(24.0).reshape(2, 3, 2, 2), "bias": jnp.ones(2)},
        "bn": {"scale": jnp.full(2, scale), "bias": jnp.zeros(2)},
      },
      "batch_stats": {"bn": {"mean": jnp.array([0.5, -0.5]), "var": jnp.array([1.5, 2.5])}},
      "scores": {
        "conv": {"kernel": -scale * jnp.ones((2, 3, 2, 2)), "bias": None},
        "bn": {"scale": None, "bias": None},
      },
    },
    "train": {"step": jnp.int32(7), "rng": jax.random.PRNGKey(3), "opt_state": (jnp.zeros(3), jnp.int32(2))},
  }


def save_steps(workdir, steps, *, keep=3, accuracies=None, async_save=False):
  ckpt = checkpoints.Checkpoints(workdir, keep=keep, async_save=async_save)
  for i, step in enumerate(steps):
    metrics = None if accuracies is None else {"robust": accuracies[i]}
    ckpt.save(
      step,
      make_items(scale=float(step)),
      meta={"stage": "prune", "k": 0.1, "step": step},
      sparsity=json.dumps({"kept": step, "total": 100}),
      metrics=metrics,
    )
  ckpt.close()


def abstract(items=None):
  return jax.eval_shape(lambda: items or make_items())


def tree_digest(directory):
  """A hash of every file's path and bytes under `directory`."""
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def assert_items_equal(restored, expected):
  flat_restored = jax.tree_util.tree_flatten_with_path(restored, is_leaf=lambda x: x is None)[0]
  flat_expected = jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: x is None)[0]
  assert [p for p, _ in flat_restored] == [p for p, _ in flat_expected]
  for (path, a), (_, b) in zip(flat_restored, flat_expected):
    if b is None:
      assert a is None, path
    else:
      assert a.dtype == b.dtype and a.shape == b.shape, path
      np.testing.assert_array_equal(a, b, err_msg=str(path))


@pytest.mark.parametrize("async_save", [False, True])
def test_saved_items_restore_exactly_with_their_metadata(tmp_path, async_save):
  workdir = str(tmp_path)
  save_steps(workdir, [5], async_save=async_save)
  items, meta = checkpoints.restore(workdir, abstract())
  assert_items_equal(items, make_items(scale=5.0))  # None score leaves stay None; dtypes (int32, uint32) kept
  assert meta == {"stage": "prune", "k": 0.1, "step": 5}
  assert checkpoints.read_meta(workdir) == (5, meta)
  with open(os.path.join(workdir, "checkpoints", "5", "sparsity", "metadata")) as f:
    assert json.load(f) == {"kept": 5, "total": 100}


def test_one_item_restores_alone(tmp_path):
  save_steps(str(tmp_path), [1])
  items, _ = checkpoints.restore(str(tmp_path), {"model": abstract()["model"]})
  assert set(items) == {"model"}
  assert_items_equal(items["model"], make_items(scale=1.0)["model"])


def test_only_the_last_keep_saves_remain_and_any_of_them_restores(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2, 3, 4, 5], keep=2)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5"]
  ckpt = checkpoints.Checkpoints(workdir, keep=2, async_save=False)
  assert ckpt.latest_step() == 5  # a new manager on the same run sees the saves
  items, meta = ckpt.restore(abstract(), step=4)
  assert_items_equal(items, make_items(scale=4.0))
  assert meta["step"] == 4 and checkpoints.read_meta(workdir, step=4)[1]["step"] == 4
  ckpt.close()


def test_best_keeps_the_save_with_the_highest_robust_accuracy(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2, 3, 4], keep=1, accuracies=[0.3, 0.5, 0.4, 0.45])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["2"]
  step, meta = checkpoints.read_meta(os.path.join(workdir, "best"))
  assert (step, meta["step"]) == (2, 2)
  items, _ = checkpoints.restore(os.path.join(workdir, "best"), abstract())
  assert_items_equal(items, make_items(scale=2.0))


def test_saves_without_metrics_never_become_best(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2])
  assert not os.path.exists(os.path.join(workdir, "best")) or not os.listdir(os.path.join(workdir, "best"))
  assert checkpoints.Checkpoints(workdir, best_metric=None, async_save=False).latest_step() == 2


def test_an_existing_step_is_never_overwritten(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [3])
  before = tree_digest(os.path.join(workdir, "checkpoints"))
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  ckpt.save(3, make_items(scale=-1.0), meta={"stage": "other"}, sparsity="{}")
  ckpt.close()
  assert tree_digest(os.path.join(workdir, "checkpoints")) == before
  items, meta = checkpoints.restore(workdir, abstract())
  assert_items_equal(items, make_items(scale=3.0))
  assert meta["stage"] == "prune"


def test_missing_checkpoints_raise_checkpoint_errors(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint directory at .*nowhere"):
    checkpoints.read_meta(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(checkpoints.CheckpointError, match="no finished checkpoint in"):
    checkpoints.restore(str(tmp_path / "empty"), abstract())
  save_steps(str(tmp_path / "run"), [4, 5])
  with pytest.raises(checkpoints.CheckpointError, match=r"has no step 3; it has \[4, 5\]"):
    checkpoints.read_meta(str(tmp_path / "run"), step=3)
  assert issubclass(checkpoints.CheckpointError, ValueError)


def test_a_mismatched_structure_names_the_problem_and_changes_nothing(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1])
  before = tree_digest(workdir)
  wrong_shape = make_items()
  wrong_shape["model"]["params"]["conv"]["kernel"] = jnp.zeros((3, 3, 2, 2))
  with pytest.raises(checkpoints.CheckpointError, match=r"step 1 does not match the expected state.*\(2, 3, 2, 2\)"):
    checkpoints.restore(workdir, abstract(wrong_shape))
  with pytest.raises(checkpoints.CheckpointError, match="does not match the expected state"):
    checkpoints.restore(workdir, {"model": {"params": abstract()["model"]["params"]}})  # a leaf is missing
  assert tree_digest(workdir) == before


def test_corrupt_files_raise_checkpoint_errors(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1])
  step_dir = os.path.join(workdir, "checkpoints", "1")
  for item in ("model", "meta"):
    for root, _, files in os.walk(os.path.join(step_dir, item)):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  before = tree_digest(workdir)
  with pytest.raises(checkpoints.CheckpointError, match="cannot read the metadata of checkpoint .* step 1"):
    checkpoints.read_meta(workdir)
  with pytest.raises(checkpoints.CheckpointError, match="step 1 (does not match the expected state|is unreadable)"):
    checkpoints.restore(workdir, {"model": abstract()["model"]})
  assert tree_digest(workdir) == before


def flip_array_bytes(step_dir):
  """Flips 8 bytes in the middle of every array data file of the step's 'model' item (orbax's merged OCDBT)."""
  data_dir = os.path.join(step_dir, "model", "d")
  for name in os.listdir(data_dir):
    with open(os.path.join(data_dir, name), "r+b") as f:
      data = bytearray(f.read())
      middle = len(data) // 2
      data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
      f.seek(0)
      f.write(data)


def test_a_damaged_step_is_named_in_one_line(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2])
  flip_array_bytes(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore(workdir, abstract())
  message = str(error.value)
  assert message.startswith(f"checkpoint {workdir} step 2 is unreadable: its files are damaged (ValueError: DATA_LOSS")
  assert "\n" not in message and len(message) < 400


def test_a_resume_skips_damaged_steps_to_the_latest_readable_one_with_a_warning(tmp_path, capsys):
  workdir = str(tmp_path)
  save_steps(workdir, [1, 2, 3])
  for step in (2, 3):
    flip_array_bytes(os.path.join(workdir, "checkpoints", str(step)))
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  items, meta = ckpt.restore_intact(abstract())
  assert meta["step"] == 1
  assert_items_equal(items, make_items(scale=1.0))
  warnings = capsys.readouterr().err
  assert "step 3 is unreadable" in warnings and "step 2 is unreadable" in warnings
  assert "resuming from step 1, the latest readable one" in warnings
  # The damaged steps are kept aside, so that the resumed run saves steps 2 and 3 again.
  assert ckpt.latest_step() == 1
  assert sorted(n for n in os.listdir(workdir) if n.startswith("unreadable")) == [
    "unreadable_checkpoint_2",
    "unreadable_checkpoint_3",
  ]
  ckpt.save(2, make_items(scale=-2.0), meta={"step": 2}, sparsity="{}")
  ckpt.close()
  assert checkpoints.read_meta(workdir)[0] == 2


def test_a_resume_with_no_readable_step_raises_and_moves_nothing(tmp_path):
  workdir = str(tmp_path)
  save_steps(workdir, [1])
  flip_array_bytes(os.path.join(workdir, "checkpoints", "1"))
  before = tree_digest(workdir)
  with pytest.raises(checkpoints.CheckpointError, match="step 1 is unreadable"):
    checkpoints.Checkpoints(workdir, async_save=False).restore_intact(abstract())
  assert tree_digest(workdir) == before


def test_versions_name_the_libraries_that_wrote_the_checkpoint():
  """The installed distributions' versions, as pip reports them (package metadata, not the modules)."""
  distributions = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "orbax": "orbax-checkpoint"}
  expected = {name: importlib.metadata.version(dist) for name, dist in distributions.items()}
  assert checkpoints.versions() == expected


# ----------------------------------------------------------------------------------------------------------
# Checksums (issue 26 item 1) and what a resume does with each failure (item 2).


def big_items(scale):
  """A model item with one 128 x 128 kernel of Gaussian noise (64 KiB, mostly incompressible): the largest file
  of its step is that kernel's OCDBT array data, and bytes flipped in its middle land in the kernel's values."""
  kernel = scale * np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)
  return {
    "model": {"params": {"dense": {"kernel": kernel, "bias": np.full(128, scale, np.float32)}}},
    "train": {"step": np.int32(scale), "rng": np.array([0, int(scale)], np.uint32)},
  }


def save_big_steps(workdir, steps):
  ckpt = checkpoints.Checkpoints(workdir, keep=len(steps), async_save=False)
  for step in steps:
    ckpt.save(step, big_items(float(step)), meta={"step": step, "k": 0.5}, sparsity=json.dumps({"kept": step}))
  ckpt.close()


def flip_largest_file(step_dir, count=16):
  """Flips `count` bytes in the middle of the largest file of the step's 'model' item, as a failing disk would."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "model")) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    f.seek(0)
    f.write(data)
  return largest


def test_flipped_array_bytes_are_refused_naming_the_step_and_the_array(tmp_path):
  workdir = str(tmp_path)
  save_big_steps(workdir, [1, 2])
  largest = flip_largest_file(os.path.join(workdir, "checkpoints", "2"))
  assert os.sep + "d" + os.sep in largest  # OCDBT array data, not a manifest or metadata file
  before = tree_digest(workdir)
  with pytest.raises(checkpoints.CheckpointDamaged) as error:
    checkpoints.restore(workdir, abstract(big_items(1.0)))
  message = str(error.value)
  assert re.fullmatch(
    rf"checkpoint {re.escape(workdir)} step 2 is damaged: array model/params/dense/kernel does not match its "
    r"checksum \(crc32 0x[0-9a-f]{8} read, 0x[0-9a-f]{8} saved\)",
    message,
  ), message
  items, _ = checkpoints.restore(workdir, abstract(big_items(1.0)), step=1)  # the other step still reads
  assert_items_equal(items, jax.tree.map(jnp.asarray, big_items(1.0)))
  assert tree_digest(workdir) == before


def test_a_changed_number_in_the_meta_is_refused(tmp_path):
  """The meta (the config of the step) is JSON: a damaged digit still parses, so only its checksum sees it."""
  workdir = str(tmp_path)
  save_big_steps(workdir, [1])
  path = os.path.join(workdir, "checkpoints", "1", "meta", "metadata")
  with open(path) as f:
    text = f.read()
  assert '"k": 0.5' in text
  with open(path, "w") as f:
    f.write(text.replace('"k": 0.5', '"k": 0.7'))
  with pytest.raises(checkpoints.CheckpointDamaged, match=r"step 1 is damaged: its meta does not match its checksum"):
    checkpoints.read_meta(workdir)
  with pytest.raises(checkpoints.CheckpointDamaged, match=r"step 1 is damaged: its meta does not match its checksum"):
    checkpoints.restore(workdir, abstract(big_items(1.0)))


def test_a_resume_goes_back_to_the_latest_intact_step_when_only_the_newest_is_damaged(tmp_path, capfd):
  workdir = str(tmp_path)
  save_big_steps(workdir, [1, 2, 3])
  flip_largest_file(os.path.join(workdir, "checkpoints", "3"))
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  items, meta = ckpt.restore_intact(abstract(big_items(1.0)))
  assert meta["step"] == 2  # the latest intact step, not the oldest
  assert_items_equal(items, jax.tree.map(jnp.asarray, big_items(2.0)))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  assert sorted(n for n in os.listdir(workdir) if n.startswith("unreadable")) == ["unreadable_checkpoint_3"]
  err = capfd.readouterr().err.splitlines()  # the documented two warnings, nothing else (no asyncio tracebacks)
  assert len(err) == 2, err
  assert err[0].startswith(f"warning: checkpoint {os.path.join(workdir, 'checkpoints')} step 3 is damaged: array ")
  assert err[0].endswith("resuming from step 2, the latest readable one")
  assert err[1] == f"warning: moved the unreadable step 3 to {os.path.join(workdir, 'unreadable_checkpoint_3')}"
  ckpt.close()


def test_a_step_missing_its_checksums_is_damage_but_a_step_saved_before_checksums_reads(tmp_path):
  workdir = str(tmp_path)
  save_big_steps(workdir, [1, 2, 3])
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3", "checksums"))  # orbax's record still names the item
  with pytest.raises(checkpoints.CheckpointDamaged, match=r"step 3 is unreadable: its files are damaged .*missing"):
    checkpoints.restore(workdir, abstract(big_items(1.0)))
  # A step as this package wrote it before checksums: no checksums item and none in orbax's record of the items.
  step_dir = os.path.join(workdir, "checkpoints", "2")
  shutil.rmtree(os.path.join(step_dir, "checksums"))
  with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
    record = json.load(f)
  del record["item_handlers"]["checksums"]
  with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
    json.dump(record, f)
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  items, meta = ckpt.restore_intact(abstract(big_items(1.0)))
  assert meta["step"] == 2
  assert_items_equal(items, jax.tree.map(jnp.asarray, big_items(2.0)))
  assert os.listdir(workdir).count("unreadable_checkpoint_3") == 1
  ckpt.close()


def test_a_checkpoint_of_another_state_stops_a_resume_and_moves_nothing(tmp_path):
  """A newest step of another shape (another model saved in the same workdir) is no proof of damage: the resume
  stops with its error instead of setting it aside and rewinding to the older step that matches."""
  workdir = str(tmp_path)
  save_big_steps(workdir, [1])
  other = big_items(2.0)
  other["model"]["params"]["dense"]["kernel"] = np.zeros((64, 128), np.float32)
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  ckpt.save(2, other, meta={"step": 2}, sparsity="{}")
  ckpt.close()
  before = tree_digest(workdir)
  with pytest.raises(checkpoints.CheckpointError, match="step 2 does not match the expected state") as error:
    checkpoints.Checkpoints(workdir, async_save=False).restore_intact(abstract(big_items(1.0)))
  assert type(error.value) is checkpoints.CheckpointError
  assert tree_digest(workdir) == before


# Reads the run in argv[1] as a resume would, with short retry delays; prints the step or the one-line error.
_RESUME = """
import sys, time
import jax
from hydra_jax import checkpoints
from tests.test_checkpoints import abstract, big_items
start = time.monotonic()
try:
  _, meta = checkpoints.Checkpoints(sys.argv[1], async_save=False).restore_intact(abstract(big_items(1.0)), (0.3, 0.3))
  print("step", meta["step"])
except checkpoints.CheckpointError as error:
  print(f"{type(error).__name__}: {error}")
  print(f"{time.monotonic() - start:.2f} s")
"""

# Runs without CAP_DAC_OVERRIDE when root, so that a file of mode 000 is unreadable to it (as to any other user).
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def run_python(code, *args, prefix=()):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run(
    [*prefix, sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


def test_a_permission_error_on_resume_is_retried_then_stops_and_moves_nothing(tmp_path):
  """A good newest step with one file this process may not read: retried, then one line naming the path and the
  error; the step stays where it is (before, it was moved aside and the run rewound)."""
  workdir = str(tmp_path)
  save_big_steps(workdir, [1, 2])
  manifest = os.path.join(workdir, "checkpoints", "2", "model", "manifest.ocdbt")
  os.chmod(manifest, 0)
  before = tree_digest(workdir)
  result = run_python(_RESUME, workdir, prefix=UNPRIVILEGED)
  assert result.returncode == 0, result.stderr
  message, seconds = result.stdout.strip().splitlines()
  assert message.startswith(
    f"CheckpointReadError: checkpoint {os.path.join(workdir, 'checkpoints')} step 2 cannot be read "
    f"({os.path.join(workdir, 'checkpoints', '2')}) (ValueError: PERMISSION_DENIED"
  ), message
  assert message.endswith(
    "after 3 attempts; nothing was moved: make the checkpoint readable (or wait for the storage "
    "to answer) and rerun to resume"
  )
  assert float(seconds.split()[0]) >= 0.6  # both retry delays were waited
  assert tree_digest(workdir) == before
  assert sorted(os.listdir(workdir)) == ["best", "checkpoints"]
  os.chmod(manifest, 0o644)
  assert checkpoints.restore(workdir, abstract(big_items(1.0)))[1]["step"] == 2  # it was a good step


# Saves two steps of 64 arrays in argv[1], damages the newest one's OCDBT index (DATA_LOSS when read) and resumes
# ten copies of the run: orbax closes a restore's event loop at the first failed read while TensorStore still
# answers the 63 others, which printed `RuntimeError: Event loop is closed` tracebacks about every other time.
_RESUME_PAST_DAMAGE = """
import os, shutil, sys
import jax
import numpy as np
from hydra_jax import checkpoints
from tests.test_checkpoints import flip_array_bytes
root = sys.argv[1]
items = {"model": {f"layer{i}": np.full((8, 8), i, np.float32) for i in range(64)}}
ckpt = checkpoints.Checkpoints(os.path.join(root, "run"), async_save=False)
for step in (1, 2):
  ckpt.save(step, items, meta={"step": step}, sparsity="{}")
ckpt.close()
flip_array_bytes(os.path.join(root, "run", "checkpoints", "2"))
for copy in range(10):
  workdir = shutil.copytree(os.path.join(root, "run"), os.path.join(root, str(copy)))
  _, meta = checkpoints.Checkpoints(workdir, async_save=False).restore_intact(jax.eval_shape(lambda: items))
  assert meta["step"] == 1
"""


def test_a_resume_past_a_damaged_step_prints_its_two_warnings_and_nothing_else(tmp_path):
  result = run_python(_RESUME_PAST_DAMAGE, str(tmp_path))
  assert result.returncode == 0, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 20, result.stderr[:3000]
  for copy in range(10):
    damaged, moved = lines[2 * copy : 2 * copy + 2]
    assert damaged.startswith(f"warning: checkpoint {tmp_path / str(copy) / 'checkpoints'} step 2 is unreadable: ")
    assert damaged.endswith("; resuming from step 1, the latest readable one")
    assert moved == f"warning: moved the unreadable step 2 to {tmp_path / str(copy) / 'unreadable_checkpoint_2'}"


# Process argv[3] of 2 joins the run at argv[2] and resumes the run in argv[1]; prints the step or the error.
_RESUME_TOGETHER = """
import sys
from hydra_jax import checkpoints, parallel
from tests.test_checkpoints import abstract, big_items
workdir, address, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
parallel.init_distributed(address, 2, process_id, timeout_s=60)
try:
  _, meta = checkpoints.Checkpoints(workdir, async_save=False).restore_intact(abstract(big_items(1.0)), (0.2,))
  print("step", meta["step"])
except checkpoints.CheckpointError as error:
  print(f"{type(error).__name__}: {error}")
"""


def test_two_processes_agree_on_the_step_to_resume_from(tmp_path):
  """Damage seen by both: both resume from the latest intact step (process 0 moves the damaged one aside). A
  permission error on one process only (process 1 runs without root's override): both stop, nothing moved,
  neither is left waiting in a collective (before, process 1 set the step aside alone and waited for process 0)."""
  import portpicker  # pylint: disable=g-import-not-at-top

  damaged, denied = str(tmp_path / "damaged"), str(tmp_path / "denied")
  for workdir in (damaged, denied):
    save_big_steps(workdir, [1, 2])
  flip_largest_file(os.path.join(damaged, "checkpoints", "2"))
  os.chmod(os.path.join(denied, "checkpoints", "2", "model", "manifest.ocdbt"), 0)
  before = tree_digest(denied)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = {}
  for workdir in (damaged, denied):
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    for index in range(2):
      prefix = UNPRIVILEGED if workdir == denied and index == 1 else []
      procs[workdir, index] = subprocess.Popen(
        [*prefix, sys.executable, "-c", _RESUME_TOGETHER, workdir, address, str(index)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
  try:
    outputs = {key: proc.communicate(timeout=120) for key, proc in procs.items()}  # a process left waiting: timeout
  finally:
    for proc in procs.values():
      proc.kill()
  assert [proc.returncode for proc in procs.values()] == [0] * 4, outputs
  printed = {key: out.strip().splitlines()[-1] for key, (out, _) in outputs.items()}
  assert printed[damaged, 0] == printed[damaged, 1] == "step 1", printed
  assert sorted(os.listdir(damaged)) == ["best", "checkpoints", "unreadable_checkpoint_2"]
  assert printed[denied, 1].startswith(
    f"CheckpointReadError: checkpoint {os.path.join(denied, 'checkpoints')} step 2 cannot be read"
  ), printed
  assert "PERMISSION_DENIED" in printed[denied, 1] and printed[denied, 1].endswith("and rerun to resume")
  assert printed[denied, 0] == (
    f"CheckpointError: checkpoint {os.path.join(denied, 'checkpoints')} step 2 could not be read by process 1 "
    "(its log names the error); "
    "nothing was moved"
  ), printed
  assert tree_digest(denied) == before


@pytest.mark.parametrize(
  "error, kind",
  [
    (OSError(5, "Input/output error"), checkpoints.CheckpointReadError),  # EIO from a failing disk or FUSE mount
    (PermissionError(13, "Permission denied"), checkpoints.CheckpointReadError),
    (TimeoutError("timed out"), checkpoints.CheckpointReadError),
    (ValueError('UNAVAILABLE: Error reading "gs://b/run/checkpoints/6/model/manifest.ocdbt": HTTP 503'), "read"),
    (ValueError("DEADLINE_EXCEEDED: while reading"), "read"),
    (ValueError("DATA_LOSS: Error decoding b-tree node: CRC-32C checksum verification failed"), "damaged"),
    (json.JSONDecodeError("Expecting value", "{", 1), "damaged"),
    (FileNotFoundError(2, "No such file or directory"), "damaged"),
    (ValueError("Requested shape (3, 3, 2, 2) does not match the stored shape (2, 3, 2, 2)"), "other"),
  ],
)
def test_read_failures_are_classified_as_read_errors_damage_or_another_state(error, kind):
  expected = {
    "read": checkpoints.CheckpointReadError,
    "damaged": checkpoints.CheckpointDamaged,
    "other": checkpoints.CheckpointError,
  }.get(kind, kind)
  assert checkpoints.read_failure(error) is expected
  try:  # the same error as the cause of orbax's own exception
    try:
      raise error
    except Exception as cause:
      raise RuntimeError("restore failed") from cause
  except RuntimeError as wrapped:
    assert checkpoints.read_failure(wrapped) is expected
