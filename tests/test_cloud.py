"""Runs on Cloud Storage (a real local GCS emulator, tests/gcs_emulator.py) and runs stopped by a signal.

The runs are configs/digits_demo.py's pretrain stage shrunk to a few steps (vgg_tiny on 8x8 digits, PGD-1 AT),
as in tests/test_multihost.py. Checkpoints on the bucket go through orbax's own gs:// support (TensorStore);
everything else through hydra_jax.paths (gcsfs).
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import google_crc32c
import jax
import numpy as np
import pytest
from etils import epath
from tensorboardX.proto import event_pb2

from hydra_jax import checkpoints
from hydra_jax import data_formats
from hydra_jax import export
from hydra_jax import paths
from hydra_jax import pipeline
from tests import test_data_formats
from tests import test_multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = test_multihost.TOTAL_STEPS  # 3 epochs of 2 steps


def tiny_config(**overrides):
  """test_multihost's run (the CLI flags TINY) as a config, for runs inside this process."""
  config = test_multihost.config()
  config.data.data_fraction, config.stages.pretrain.epochs, config.stages.pretrain.lr = 0.1, 3, 0.2
  config.eval.every_epochs, config.eval.steps, config.objective.steps = 1, 1, 1
  config.log.progress, config.log.every_steps, config.checkpoint.keep = False, 1, 3
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  return config


def assert_bitwise_equal(got, want):
  leaves = jax.tree.leaves(want)
  assert leaves and len(jax.tree.leaves(got)) == len(leaves)
  for a, b in zip(jax.tree.leaves(got), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def masked_crc32c(data):
  """TFRecord's checksum: crc32c, rotated right by 15 bits, plus a constant (tensorflow/core/lib/hash/crc32c.h)."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def event_scalars(data):
  """{(tag, step): value} of a TensorBoard event file, read record by record from its TFRecord framing (uint64
  length, masked crc32c of the length, the Event proto, masked crc32c of the proto), every checksum checked."""
  scalars, offset = {}, 0
  while offset < len(data):
    header, (header_crc,) = data[offset : offset + 8], struct.unpack_from("<I", data, offset + 8)
    (length,) = struct.unpack("<Q", header)
    payload = data[offset + 12 : offset + 12 + length]
    (payload_crc,) = struct.unpack_from("<I", data, offset + 12 + length)
    assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), f"record at byte {offset}"
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      assert (value.tag, event.step) not in scalars, (value.tag, event.step)
      scalars[value.tag, event.step] = np.float32(value.simple_value)
    offset += 16 + length
  return scalars


def test_a_run_on_a_bucket_resumes_and_equals_the_same_run_on_local_disk(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a path mistaken for local would appear here as gs:/...
  local, url = str(tmp_path / "local"), "gs://bucket/digits"
  pipeline.train_and_evaluate(tiny_config(), local)
  assert pipeline.train_and_evaluate(tiny_config(stop_after_steps=3), url)["step"] == 3
  summary = pipeline.train_and_evaluate(tiny_config(**{"log.tensorboard": True}), url)
  assert summary["step"] == TOTAL_STEPS and checkpoints.read_meta(url)[0] == TOTAL_STEPS

  config = tiny_config()
  assert_bitwise_equal(export.load_run(url, config=config).variables, export.load_run(local, config=config).variables)
  run = epath.Path(url)
  lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if line["split"] == "train"] == list(range(1, TOTAL_STEPS + 1))
  assert json.loads((run / "summary.json").read_text()) == summary
  assert json.loads((run / "config.json").read_text())["seed"] == config.seed
  (events,) = (run / "tensorboard").iterdir()  # the resumed run's TensorBoard file: one scalar per logged value
  assert events.name.startswith("events.out.tfevents")
  logged = {
    (f"{line['split']}/{name}", line["step"]): np.float32(value)
    for line in lines
    if line["step"] > 3  # the first 3 steps ran without TensorBoard
    for name, value in line.items()
    if name not in ("step", "split")
  }
  assert len(logged) > 10 and event_scalars(events.read_bytes()) == logged

  evaluated = export.evaluate_checkpoint(config, url, methods=["pgd_linf"], progress=False)
  assert evaluated["clean"] == summary["clean"]  # the run's own last evaluation, of the same weights
  export.export_checkpoint(config, url, f"{url}/model.npz")
  export.export_checkpoint(config, local, str(tmp_path / "model.npz"))
  with (run / "model.npz").open("rb") as f, np.load(f) as remote, np.load(tmp_path / "model.npz") as here:
    assert sorted(remote) == sorted(here) and all(np.array_equal(remote[k], here[k]) for k in here)
  settings = dict(sigma=0.25, n0=10, n=100, batch_size=100, max_examples=2, progress=False)
  certified = export.certify_checkpoint(config, url, f"{url}/certify", **settings)
  assert len((run / "certify" / "certify.tsv").read_text().splitlines()) == 1 + 2
  assert json.loads((run / "certify" / "certified_accuracy.json").read_text())["num_examples"] == 2
  assert certified["num_examples"] == 2
  assert (run / "certify" / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(os.listdir(tmp_path)) == ["local", "model.npz"]  # nothing named after a URL


@pytest.mark.parametrize(
  "key, location, env, message",
  [
    ("workdir", "s5://bucket/run", {}, "s5://bucket/run: unknown URL scheme 's5://'"),
    ("workdir", "gs://nosuch/run", {}, "gs://nosuch/run: bucket gs://nosuch does not exist"),
    ("data.data_dir", "gs://nosuch/data", {}, "gs://nosuch/data: bucket gs://nosuch does not exist"),
    (
      "workdir",
      "gs://bucket/run",
      {"STORAGE_EMULATOR_HOST": None, "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"},
      "gs://bucket/run: no Google Cloud credentials",
    ),
  ],
)
def test_unreachable_paths_are_one_line_errors_that_create_nothing(
  gcs, tmp_path, monkeypatch, key, location, env, message
):
  monkeypatch.chdir(tmp_path)
  for name, value in env.items():
    monkeypatch.delenv(name) if value is None else monkeypatch.setenv(name, value)
  config = tiny_config(**({"data.data_dir": location} if key != "workdir" else {}))
  with pytest.raises(paths.PathError, match=message) as error:
    pipeline.train_and_evaluate(config, location if key == "workdir" else str(tmp_path / "run"))
  assert "\n" not in str(error.value)
  assert os.listdir(tmp_path) == []


def cli(*args, cwd, env=None, **popen):
  """`python -m hydra_jax ARGS` (single device), as a Popen."""
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.Popen([sys.executable, "-m", "hydra_jax", *args], cwd=cwd, env=env, text=True, **popen)


# A stage long enough to be stopped part-way: all 1437 digits in batches of 64, 22 steps, one epoch (saved at
# its end only), a train log line per step; plain training (the signal handling does not depend on the objective).
LONG = [
  "--config", os.path.join(ROOT, "configs/digits_demo.py:model=vgg_tiny,objective=benign"),
  "--config.stage=pretrain", "--config.data.image_size=8", "--config.stages.pretrain.epochs=1",
  "--config.eval.steps=1", "--config.log.progress=false", "--config.log.every_steps=1",
]  # fmt: skip
LONG_STEPS = 1437 // 64


def train_lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return sum('"train"' in line for line in open(path)) if os.path.exists(path) else 0


def signal_after_two_steps(procs, workdir, signum):
  """Sends `signum` to `procs` once the run has logged 2 steps; returns the time it was sent."""
  while train_lines(workdir) < 2:
    assert all(p.poll() is None for p in procs), "the run ended before the signal"
    time.sleep(0.02)
  for proc in procs:
    proc.send_signal(signum)
  return time.monotonic()


def test_sigterm_saves_the_step_reached_and_the_rerun_ends_with_the_uninterrupted_params(tmp_path):
  stopped, whole = str(tmp_path / "stopped"), str(tmp_path / "whole")
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  # The uninterrupted run first: it fills the compilation cache the other two load from (run side by side, both
  # compiled every program).
  uninterrupted = cli("train", *LONG, "--workdir", whole, cwd=tmp_path, env=cache, stdout=subprocess.DEVNULL)
  assert uninterrupted.wait(300) == 0
  proc = cli(
    "train", *LONG, "--workdir", stopped, cwd=tmp_path, env=cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE
  )
  sent = signal_after_two_steps([proc], stopped, signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert time.monotonic() - sent < 30
  assert proc.returncode == 128 + signal.SIGTERM, err
  step, meta = checkpoints.read_meta(stopped)
  assert 2 <= step < LONG_STEPS and meta["stage"] == "pretrain"
  assert f"stopped by SIGTERM after step {step} of {LONG_STEPS} of stage pretrain" in err.splitlines()[-1]
  assert "rerun the same command to resume" in err.splitlines()[-1]
  assert train_lines(stopped) == step  # every step it ran was logged, nothing after the save
  rerun = cli("train", *LONG, "--workdir", stopped, cwd=tmp_path, env=cache, stdout=subprocess.DEVNULL)
  assert rerun.wait(300) == 0
  config = test_multihost.config()
  assert_bitwise_equal(
    export.load_run(stopped, config=config).variables, export.load_run(whole, config=config).variables
  )


@pytest.mark.slow
def test_two_processes_stop_together_when_only_process_1_is_signalled(tmp_path):
  flags = ["--config.data.data_fraction=1.0", "--config.stages.pretrain.epochs=1"]
  whole = test_multihost.Job(tmp_path / "whole", 2, 2, *flags)
  job = test_multihost.Job(tmp_path / "stopped", 2, 2, *flags)
  signal_after_two_steps(job.procs[1:], str(tmp_path / "stopped"), signal.SIGTERM)
  results = job.wait(check=False, timeout=300)
  assert [code for code, _, _ in results] == [128 + signal.SIGTERM] * 2, results
  step = checkpoints.read_meta(str(tmp_path / "stopped"))[0]
  assert all(f"after step {step} of {LONG_STEPS}" in err for _, _, err in results)
  test_multihost.Job(tmp_path / "stopped", 2, 2, *flags).wait()
  whole.wait()
  config = test_multihost.config()
  assert_bitwise_equal(
    export.load_run(str(tmp_path / "stopped"), config=config).variables,
    export.load_run(str(tmp_path / "whole"), config=config).variables,
  )


@pytest.mark.slow
def test_two_processes_write_to_a_bucket_and_resume_from_it(gcs, tmp_path):
  url = "gs://bucket/multihost"
  local = test_multihost.Job(tmp_path / "local", 2, 2)
  test_multihost.Job(url, 2, 2, "--config.stop_after_steps=3", logs=tmp_path / "gs").wait()
  assert checkpoints.read_meta(url)[0] == 3
  test_multihost.Job(url, 2, 2, logs=tmp_path / "gs").wait()
  local.wait()
  config = test_multihost.config()
  assert checkpoints.read_meta(url)[0] == TOTAL_STEPS
  assert_bitwise_equal(
    export.load_run(url, config=config).variables, export.load_run(str(tmp_path / "local"), config=config).variables
  )


def upload(local_root, url):
  """Copies every file under `local_root` to `url` (through the path layer)."""
  for folder, _, names in os.walk(local_root):
    for name in names:
      relative = os.path.relpath(os.path.join(folder, name), local_root)
      (epath.Path(url) / relative).write_bytes(open(os.path.join(folder, name), "rb").read())


@pytest.mark.parametrize(
  "dataset, split, write",
  [
    ("cifar10", "train", lambda root: test_data_formats._write_cifar10(os.path.join(root, "cifar-10-batches-py"))),
    ("svhn_cropped", "test", lambda root: test_data_formats._write_svhn(root, "test", 7)),
    ("imagenet2012", "train", lambda root: test_data_formats._write_tree(root, "train", ["b", "a"])),
    ("cifar10", "test", test_data_formats._write_tfds_cifar10),  # TFDS ArrayRecord files (cifar10/3.0.2/)
  ],
)
def test_dataset_files_read_from_a_bucket_equal_the_local_files(gcs, tmp_path, monkeypatch, dataset, split, write):
  monkeypatch.setenv("HYDRA_JAX_CACHE", str(tmp_path / "cache"))  # where TFDS's files are copied to
  local, url = str(tmp_path / "data"), f"gs://bucket/{tmp_path.name}"  # one folder per case
  write(local)
  upload(local, url)
  formats = [data_formats.resolve("auto", dataset, where) for where in (local, url)]
  assert formats[0][0] == formats[1][0] and formats[1][1].startswith(url)
  here, there = (data_formats.load(fmt, root, dataset, split) for fmt, root in formats)
  assert len(here) == len(there) > 0
  for index in range(len(here)):
    assert there[index]["label"] == here[index]["label"]
    np.testing.assert_array_equal(there[index]["image"], here[index]["image"])


def test_tfds_files_in_a_bucket_are_read_from_one_local_copy_of_the_split(gcs, tmp_path, monkeypatch):
  cache, url = tmp_path / "cache", "gs://bucket/tensorflow_datasets"
  monkeypatch.setenv("HYDRA_JAX_CACHE", str(cache))
  test_data_formats._write_tfds_cifar10(tmp_path / "data")
  upload(tmp_path / "data", url)
  assert data_formats.resolve("auto", "cifar10", url) == ("tfds", url)
  source = data_formats.load("tfds", url, "cifar10", "train")
  copy = cache / "gs" / "bucket" / "tensorflow_datasets" / "cifar10" / "3.0.2"
  names = ["cifar10-train.array_record-00000-of-00001", "dataset_info.json", "features.json"]
  assert sorted(os.listdir(copy)) == names  # the train split's files and the metadata, not the test split's
  shard = copy / names[0]
  assert shard.read_bytes() == (tmp_path / "data" / "cifar10" / "3.0.2" / names[0]).read_bytes()

  before = {name: (copy / name).stat().st_mtime_ns for name in names}
  assert len(data_formats.load("tfds", url, "cifar10", "train")) == len(source) == 6
  assert {name: (copy / name).stat().st_mtime_ns for name in names} == before  # reused, not copied again
  original, info = shard.read_bytes(), copy / "dataset_info.json"
  shard.write_bytes(original[:100])  # a damaged copy (another size) is copied again,
  info_inode = info.stat().st_ino
  os.utime(info, (0, 0))  # and so is one with another modification time than the object's
  reread = data_formats.load("tfds", url, "cifar10", "train")
  assert [example["id"] for example in reread] == [example["id"] for example in source]
  assert shard.read_bytes() == original and info.stat().st_mtime_ns == before["dataset_info.json"]
  assert info.stat().st_ino != info_inode
  assert sorted(os.listdir(copy)) == names  # no temporary file left behind


def test_a_dataset_missing_from_the_bucket_says_how_to_prepare_it_and_copies_nothing(gcs, tmp_path, monkeypatch):
  monkeypatch.setenv("HYDRA_JAX_CACHE", str(tmp_path / "cache"))
  url = "gs://bucket/no_tfds_here"
  (epath.Path(url) / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")  # another dataset only
  with pytest.raises(
    ValueError,
    match=r"^TFDS dataset 'cifar10' \(split 'train'\) is not prepared in ArrayRecord format under "
    r"data_dir='gs://bucket/no_tfds_here'\. Prepare it with `tfds build cifar10 --file_format=array_record "
    r"--data_dir=gs://bucket/no_tfds_here`",
  ):
    data_formats.load(*data_formats.resolve("tfds", "cifar10", url), "cifar10", "train")
  with pytest.raises(ValueError, match=r"no cifar10 files in data_dir='gs://bucket/no_tfds_here'.*tfds build cifar10"):
    data_formats.resolve("auto", "cifar10", url)
  assert not (tmp_path / "cache").exists()
