"""Multi-host training with real processes: 2 processes x 2 CPU devices on localhost against 1 process x 1 device
(pgd_at with its random start: a run's results do not depend on its process or device count).

Every run is the command line (`python -m hydra_jax train`) on configs/digits_demo.py's pretrain stage, shrunk
to a few steps: 10% of the digits (143 images) in batches of 64 is 2 steps per epoch, 3 epochs = 6 steps,
evaluated and saved at every epoch end. The processes join through `jax.distributed` (gloo collectives) on a
free port. Both rounds of launches run their jobs concurrently to keep the suite short.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from hydra_jax import checkpoints
from hydra_jax import export
from hydra_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/digits_demo.py:model=vgg_tiny,objective=pgd_at"
TINY = [
  "--config.stage=pretrain",
  "--config.data.image_size=8",
  "--config.data.data_fraction=0.1",
  "--config.stages.pretrain.epochs=3",
  "--config.stages.pretrain.lr=0.2",
  "--config.eval.every_epochs=1",
  "--config.eval.steps=1",
  "--config.objective.steps=1",
  "--config.log.progress=false",
  "--config.log.every_steps=1",
  "--config.checkpoint.keep=3",
]
TOTAL_STEPS = 6


class Job:
  """One run of `hydra_jax train`: `processes` processes with `devices` CPU devices each (or one count each).

  `process_flags[i]` are extra flags of process i. Output goes to files beside the workdir, or beside `logs`
  for a URL workdir (pipes could fill up and stall a process, and with it the whole run).
  """

  def __init__(self, workdir, processes, devices, *flags, cache=None, process_flags=None, config=CONFIG, logs=None):
    port = portpicker.pick_unused_port()
    self.workdir, self.procs, self.logs = str(workdir), [], []
    counts = [devices] * processes if isinstance(devices, int) else devices
    for index, count in enumerate(counts):
      multihost = (
        [
          f"--config.parallel.coordinator_address=127.0.0.1:{port}",
          f"--config.parallel.num_processes={processes}",
          f"--config.parallel.process_id={index}",
          "--config.parallel.timeout_s=120",
        ]
        if processes > 1
        else []
      )
      own = process_flags[index] if process_flags else []
      env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
      }
      if cache:  # relaunches compile the same programs: share them
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
      files = [f"{logs or self.workdir}.{index}.{stream}" for stream in ("stdout", "stderr")]
      with open(files[0], "w") as out, open(files[1], "w") as err:
        self.procs.append(
          subprocess.Popen(
            [
              sys.executable,
              "-m",
              "hydra_jax",
              "train",
              "--config",
              config,
              *TINY,
              *multihost,
              *flags,
              *own,
              "--workdir",
              self.workdir,
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
          )
        )
      self.logs.append(files)

  def wait(self, check=True, timeout=600):
    """[(returncode, stdout, stderr)] per process; with `check`, raises unless every process succeeded."""
    deadline = time.monotonic() + timeout
    codes = [p.wait(max(deadline - time.monotonic(), 1)) for p in self.procs]
    results = [(code, *(open(path).read() for path in logs)) for code, logs in zip(codes, self.logs)]
    if check and any(codes):
      raise AssertionError(
        "\n".join(f"process {i}: exit {code}\n{out}\n{err[-3000:]}" for i, (code, out, err) in enumerate(results))
      )
    return results


def wait_all(*jobs):
  return [job.wait() for job in jobs]


def config(objective="pgd_at"):
  """The config the jobs run, built the way the CLI builds it (to read their checkpoints back)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("digits_demo", os.path.join(ROOT, "configs/digits_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"model=vgg_tiny,objective={objective}")
  c.stage, c.data.image_size = "pretrain", 8
  return c


def final_variables(workdir, objective="pgd_at"):
  """The weights and BN statistics of the latest checkpoint in `workdir`."""
  return export.load_run(workdir, config=config(objective)).variables


def metrics(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {line["step"]: line for line in lines if line["split"] == split}


def assert_same_params(got, want):
  leaves = jax.tree.leaves(want)
  assert leaves and len(jax.tree.leaves(got)) == len(leaves)
  for a, b in zip(jax.tree.leaves(got), leaves):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Round 1: 1 x 1 uninterrupted, 1 x 4 and 2 x 2 stopped after 3 steps. Round 2: resume 2 x 2 in 2 x 2 (the
  resumes on another number of processes are `other_counts`, slow)."""
  base = tmp_path_factory.mktemp("multihost")
  cache = base / "cache"
  wait_all(
    Job(base / "one", 1, 1, cache=cache),  # one device: 2 x 2 must equal it (draws keyed by global position)
    Job(base / "one_stopped", 1, 4, "--config.stop_after_steps=3", cache=cache),
    Job(base / "two_stopped", 2, 2, "--config.stop_after_steps=3", cache=cache),
  )
  stopped = {name: final_variables(str(base / name)) for name in ("one_stopped", "two_stopped")}
  shutil.copytree(base / "two_stopped", base / "two_then_two")
  results = wait_all(Job(base / "two_then_two", 2, 2, cache=cache))
  return {
    "base": base,
    "dir": {name: str(base / name) for name in ("one", "two_then_two")},
    "stopped": stopped,
    "stdout": results[0][0][1],
  }


@pytest.fixture(scope="module")
def other_counts(runs):
  """The stopped runs of `runs` resumed on another number of processes: 2 x 2 in 1 x 4, and 1 x 4 in 2 x 2 with
  pmap (whose collectives must span both processes)."""
  base, cache = runs["base"], runs["base"] / "cache"
  shutil.copytree(base / "two_stopped", base / "two_then_one")
  shutil.copytree(base / "one_stopped", base / "one_then_two")
  wait_all(
    Job(base / "two_then_one", 1, 4, cache=cache),
    Job(base / "one_then_two", 2, 2, "--config.parallel.mode=pmap", cache=cache),
  )
  return {name: str(base / name) for name in ("two_then_one", "one_then_two")}


# With the next: 50 CPU s of 2 + 1 processes (-m slow); test_preemption and test_checkpoints start 2 by default.
@pytest.mark.slow
def test_two_processes_train_evaluate_and_save_as_one_process_with_one_device(runs):
  one, two = runs["dir"]["one"], runs["dir"]["two_then_two"]
  assert_same_params(final_variables(two), final_variables(one))
  # Evaluation counts are summed over both processes: the same accuracies as on one process, every epoch.
  assert sorted(metrics(two, "eval")) == sorted(metrics(one, "eval")) == [2, 4, 6]
  for split in ("eval", "train"):
    for step, want in metrics(one, split).items():
      for name, value in want.items():
        assert metrics(two, split)[step][name] == pytest.approx(value, abs=1e-6), (split, step, name)
  # Written once, by process 0.
  with open(os.path.join(two, "metrics.jsonl")) as f:
    assert len(f.readlines()) == TOTAL_STEPS + 3  # a train line per step, 3 evaluations: none twice
  assert json.load(open(os.path.join(two, "summary.json")))["step"] == TOTAL_STEPS
  printed = json.loads(runs["stdout"][runs["stdout"].index("{") :])  # after gloo's connection lines
  assert printed["clean"] == metrics(one, "eval")[TOTAL_STEPS]["clean"]


@pytest.mark.slow  # shares the fixture above
def test_a_stopped_two_process_run_resumes_to_the_uninterrupted_params(runs):
  assert_same_params(final_variables(runs["dir"]["two_then_two"]), final_variables(runs["dir"]["one"]))
  # The stopped run really stopped part-way: its weights are not the final ones.
  with pytest.raises(AssertionError):
    assert_same_params(runs["stopped"]["two_stopped"], final_variables(runs["dir"]["one"]))


@pytest.mark.slow  # 3 more processes (about 40 CPU s); the default run resumes a 2-process run on 2 processes
@pytest.mark.parametrize("resumed", ["two_then_one", "one_then_two"])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, other_counts, resumed):
  assert_same_params(final_variables(other_counts[resumed]), final_variables(runs["dir"]["one"]))
  assert metrics(other_counts[resumed], "eval")[TOTAL_STEPS] == pytest.approx(
    metrics(runs["dir"]["one"], "eval")[TOTAL_STEPS], abs=1e-6
  )


@pytest.mark.slow
def test_killed_processes_resume_to_the_uninterrupted_params(runs, tmp_path):
  workdir = tmp_path / "run"
  job = Job(workdir, 2, 2, "--config.checkpoint.every_steps=1")  # no compilation cache: step 2 compiles the eval
  while not (workdir / "checkpoints" / "1").is_dir() and all(p.poll() is None for p in job.procs):
    time.sleep(0.05)
  for proc in job.procs:
    proc.send_signal(signal.SIGKILL)
  job.wait(check=False)
  saved = checkpoints.read_meta(str(workdir))[0]
  assert 1 <= saved < TOTAL_STEPS, "the kill came after the run had ended"
  Job(workdir, 2, 2).wait()
  assert_same_params(final_variables(str(workdir)), final_variables(runs["dir"]["one"]))


def test_processes_that_disagree_fail_naming_the_differences(tmp_path):
  job = Job(tmp_path / "run", 2, (2, 1), process_flags=[[], ["--config.data.batch_size=32"]])
  for code, _, err in job.wait(check=False, timeout=300):
    assert code == 1, err
    assert "process 1 has config.data.batch_size=32 where process 0 has 64" in err
    assert "process 1 has local device count=1 where process 0 has 2" in err
  assert not os.path.exists(tmp_path / "run")  # failed before writing anything


def test_a_process_whose_peers_never_join_stops_with_a_message(tmp_path):
  job = Job(
    tmp_path / "run",
    1,
    2,
    "--config.parallel.num_processes=2",
    "--config.parallel.process_id=0",
    "--config.parallel.timeout_s=3",
    f"--config.parallel.coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}",
  )
  ((code, _, err),) = job.wait(check=False, timeout=120)
  assert code == 1
  assert "waited 3 s for all 2 processes of the run to join 127.0.0.1:" in err


def test_distributed_without_a_coordinator_names_the_settings_to_give(tmp_path):
  job = Job(tmp_path / "run", 1, 1, "--config.parallel.distributed=true")
  ((code, _, err),) = job.wait(check=False, timeout=120)
  assert code == 1
  assert "Set --config.parallel.coordinator_address, num_processes and process_id" in err


def test_distributed_args_take_config_values_over_environment_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert parallel.distributed_args(environ=env) == ("10.0.0.1:1234", 4, 3)
  assert parallel.distributed_args("host:5", 2, 0, environ=env) == ("host:5", 2, 0)
  assert parallel.distributed_args(environ={}) == (None, None, None)  # left to JAX's auto-detection
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    parallel.distributed_args(environ={"JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
    parallel.distributed_args(num_processes=2, process_id=2, environ={})


@pytest.mark.slow
def test_two_processes_run_rigl_with_the_masks_of_one_process(tmp_path):
  rigl = ["--config.stage=rigl", "--config.stages.rigl.epochs=3", "--config.baseline.rigl_delta_t=2", "--config.k=0.25"]
  one, two = Job(tmp_path / "one", 1, 4, *rigl), Job(tmp_path / "two", 2, 2, *rigl)
  wait_all(one, two)  # 6 steps, t_end = 4: the mask moves at step 2
  rigl_config = config()
  rigl_config.stage = "rigl"
  got, want = (export.load_run(job.workdir, config=rigl_config).trained_params for job in (two, one))
  assert_same_params(got, want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a) != 0, np.asarray(b) != 0)  # the same support in every layer
  assert checkpoints.read_meta(two.workdir)[1]["stage"] == "rigl"


FREE = "configs/digits_demo.py:model=vgg_tiny,objective=free"
FREE_FLAGS = ["--config.objective.replays=2"]


@pytest.fixture(scope="module")
def free_runs(tmp_path_factory):
  """Free adversarial training (a per-example carry, split over devices): uninterrupted on 1 process x 1 device,
  and on 2 x 2 with pmap stopped after 3 steps (mid-epoch: the carry is in the checkpoint), then resumed."""
  base = tmp_path_factory.mktemp("free")
  cache = base / "cache"
  flags = [*FREE_FLAGS, "--config.parallel.mode=pmap"]
  wait_all(
    Job(base / "one", 1, 1, *FREE_FLAGS, config=FREE, cache=cache),
    Job(base / "pmap", 2, 2, *flags, "--config.stop_after_steps=3", config=FREE, cache=cache),
  )
  assert checkpoints.read_meta(str(base / "pmap"))[0] == 3
  Job(base / "pmap", 2, 2, *flags, config=FREE, cache=cache).wait()
  return {name: str(base / name) for name in ("one", "pmap")}


@pytest.mark.slow  # 85 s of two processes; the default run's 2-process test covers training, evaluation and saving
def test_free_adversarial_training_with_pmap_on_two_processes_resumes_to_the_one_device_result(free_runs):
  assert_same_params(final_variables(free_runs["pmap"], "free"), final_variables(free_runs["one"], "free"))


@pytest.mark.slow
def test_free_adversarial_training_with_shard_map_on_two_processes_resumes_on_one(free_runs, tmp_path):
  workdir, flags = tmp_path / "run", [*FREE_FLAGS, "--config.parallel.mode=shard_map"]
  Job(workdir, 2, 2, *flags, "--config.stop_after_steps=3", config=FREE).wait()
  Job(workdir, 1, 2, *flags, config=FREE).wait()
  assert_same_params(final_variables(str(workdir), "free"), final_variables(free_runs["one"], "free"))
