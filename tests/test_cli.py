"""The command line: bad keys and values are rejected by name; train -> eval -> export works end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_in_process import run as run_in_process
from flax import traverse_util

import hydra_jax as hydra_jax_lib
from hydra_jax import checkpoints
from hydra_jax import export
from hydra_jax import models
from hydra_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hydra_jax(*args, check=True, env=None, python_code=None):
  """Runs the CLI (or `python -c python_code ARGS`) in a fresh single-device process."""
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  command = ["-c", python_code] if python_code else ["-m", "hydra_jax"]
  result = subprocess.run(
    [sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  if check and result.returncode:
    raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result


def test_unknown_command_prints_usage():
  result = hydra_jax("fit", check=False)
  assert result.returncode == 2 and "usage: hydra-jax {train,eval,export,certify}" in result.stderr


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--config.optimiser.lr=0.1", "optimiser"),
    ("--config.k=2.0", "config.k=2.0 must lie in (0, 1]"),
    ("--config.model.name=resnet9", "Unknown model 'resnet9'"),
    ("--config.objective.attack_chunk_size=-1", "config.objective.attack_chunk_size must be >= 0"),
  ],
)
def test_bad_config_is_rejected_by_name(tmp_path, flag, message):
  result = hydra_jax(
    "train", "--config", "configs/digits_demo.py", flag, "--workdir", str(tmp_path / "run"), check=False
  )
  assert result.returncode != 0 and message in result.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_train_eval_export_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  tiny = [
    "--config",
    "configs/digits_demo.py:model=cnn_tiny",
    "--config.stage=pretrain",
    "--config.data.image_size=8",
    "--config.stages.pretrain.epochs=1",
    "--config.eval.steps=1",
    "--config.log.progress=false",
    "--workdir",
    workdir,
  ]
  summary = json.loads(hydra_jax("train", *tiny).stdout)
  assert summary["stage"] == "pretrain" and summary["step"] == summary["total_steps"] == 1437 // 64

  results = json.loads(hydra_jax("eval", *tiny, "--methods=pgd_linf").stdout)
  assert results["num_examples"] == 360
  assert 0 <= results["robust"] <= results["pgd_linf"] <= results["clean"] <= 1
  assert abs(results["clean"] - summary["clean"]) < 1e-6  # same model, same test split

  # Prune one step from that run, then export it: the file must hold the checkpoint's weights, masked.
  prune_dir = str(tmp_path / "prune")
  prune = [
    *tiny[:-1],
    prune_dir,
    "--config.stage=prune",
    f"--config.source={workdir}",
    "--config.k=0.1",
    "--config.stop_after_steps=1",
    "--config.objective.name=benign",
  ]
  assert json.loads(hydra_jax("train", *prune).stdout)["step"] == 1
  out = str(tmp_path / "model.npz")
  assert "wrote" in hydra_jax("export", *prune, f"--out={out}").stdout
  arrays = dict(np.load(out))
  trained, scores = restore_model(prune_dir)
  assert set(arrays) == {f"params/{name}" for name in trained}  # every variable, no scores (dense export)
  for name, weight in trained.items():
    exported = arrays[f"params/{name}"]
    if name not in scores:  # biases: as trained
      np.testing.assert_array_equal(exported, weight)
      continue
    kept = numpy_topk_mask(scores[name], 0.1).astype(bool)
    assert kept.sum() == weight.size - int(0.9 * weight.size)
    np.testing.assert_array_equal(exported[kept], weight[kept])  # kept entries: the trained weights
    assert np.all(exported[~kept] == 0) and not np.any(np.signbit(exported[~kept]))  # pruned: exactly +0.0
    assert np.count_nonzero(exported) == np.count_nonzero(weight[kept])


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--config.nosuch=1"], "--config.nosuch: the config has no key 'nosuch'"),
    (
      [
        "--config.stage=pretrain",
        "--config.data.name=cifar10",
        "--config.data.image_size=0",
        "--config.data.data_dir=/nonexistent",
      ],
      "data_dir='/nonexistent' is not a folder",
    ),
    (["--config.stage=pretrain", "--config.data.name=cifar10"], "image_size 16 of 'cifar10' must be a positive"),
    (
      [
        "--config.stage=pretrain",
        "--config.data.name=cifar10",
        "--config.data.image_size=0",
        "--config.data.data_dir=",
      ],
      "TFDS dataset 'cifar10' (split 'train') is not prepared in ArrayRecord format",
    ),
    (
      ["--config.eval.methods=('smooth',)", "--config.eval.smooth.sigma=-0.5"],
      "config.eval: smoothing: sigma=-0.5 must be positive",
    ),
  ],
)
def test_user_errors_are_a_short_message_and_write_nothing(tmp_path, flags, message):
  workdir = str(tmp_path / "run")
  args = ["train", "--config", "configs/digits_demo.py", *flags, "--workdir", workdir]
  result = hydra_jax(*args, check=False)
  assert result.returncode == 1 and message in result.stderr, result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr
  assert not os.path.exists(workdir)
  shown = hydra_jax(*args, check=False, env={"HYDRA_JAX_TRACEBACK": "1"})
  assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_eval_names_an_unknown_method_in_one_line_before_reading_the_run(tmp_path):
  args = ["eval", "--config", "configs/digits_demo.py", "--workdir", str(tmp_path / "none"), "--methods=pgd_linf,fgsm"]
  result = hydra_jax(*args, check=False)
  assert result.returncode == 1 and "unknown evaluation method 'fgsm'; valid methods:" in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_an_internal_key_error_keeps_its_traceback(tmp_path):
  code = (
    "import sys\nfrom hydra_jax import cli, pipeline\n"
    "pipeline.train_and_evaluate = lambda config, workdir: {}['internal']\n"
    "cli.main(['hydra-jax', 'train', '--config', 'configs/digits_demo.py', '--workdir', sys.argv[1]])"
  )
  result = hydra_jax(str(tmp_path / "run"), check=False, python_code=code)
  assert result.returncode != 0 and "Traceback" in result.stderr and "KeyError: 'internal'" in result.stderr


def hydra_jax_in_process(*args):
  """Runs the CLI's `main` in this process, as the console script does; asserts exit 0."""
  status, _, err = run_in_process(*args)
  assert status == 0, err


def test_the_command_line_and_the_library_give_the_same_run(tmp_path):
  """The CLI only parses and calls the library: in one process (so one set of compiled programs, which makes equal
  inputs give equal bits), its run equals the library's, although the library call happens under the other PRNG
  flavour (the library decides it for the run)."""
  overrides = {
    "stage": "pretrain",
    "stop_after_steps": 2,
    "parallel.mode": "single",
    "log.progress": False,
    "checkpoint.async_save": False,
  }
  spec = os.path.join(ROOT, "configs/digits_demo.py") + ":model=cnn_tiny,objective=benign"
  cli_dir, library_dir = str(tmp_path / "cli"), str(tmp_path / "library")
  flags_ = [f"--config.{key}={str(value).lower()}" for key, value in overrides.items()]
  hydra_jax_in_process("train", "--config", spec, *flags_, "--workdir", cli_dir)
  config = hydra_jax_lib.load_config(spec)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    (config[parents[0]] if parents else config)[leaf] = value
  with open(os.path.join(cli_dir, "config.json")) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())  # load_config + overrides = the CLI's config
  with jax.threefry_partitionable(True):  # a notebook's JAX default; the library decides for the run
    pipeline.train_and_evaluate(config, library_dir)
  from_cli, from_library = export.load_run(cli_dir, config=config), export.load_run(library_dir, config=config)
  assert from_cli.meta["threefry_partitionable"] is False
  for a, b in zip(jax.tree.leaves(from_cli.trained_params), jax.tree.leaves(from_library.trained_params)):
    np.testing.assert_array_equal(a, b)


def numpy_topk_mask(scores, k):
  """The reference's GetSubnet in numpy: stable ascending sort of |s|, the first int((1 - k) n) get 0."""
  flat = np.abs(scores).ravel()
  mask = np.ones(flat.size)
  mask[np.argsort(flat, kind="stable")[: int((1 - k) * flat.size)]] = 0
  return mask.reshape(scores.shape)


def restore_model(workdir):
  """({'0/kernel': array, ...} of the trained params, {'0/kernel': scores} of the prunable kernels), read from
  the latest checkpoint with orbax directly (cnn_tiny on 8x8x1 digits)."""
  params = jax.eval_shape(
    lambda: models.get_model("cnn_tiny", 10).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  )["params"]
  scores = jax.tree_util.tree_map_with_path(lambda p, w: w if p[-1].key == "kernel" else None, params)
  items, _ = checkpoints.restore(workdir, {"model": {"params": params, "batch_stats": {}, "scores": scores}})
  flat = lambda tree: {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items() if v is not None}
  return flat(items["model"]["params"]), flat(items["model"]["scores"])


def test_a_missing_config_file_is_named_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  for extra in ([], ["--config.k=0.5"]):
    result = hydra_jax(
      "train", "--config", "configs/nosuch.py:model=cnn_tiny", *extra, "--workdir", workdir, check=False
    )
    assert result.returncode == 1, result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert first == "hydra-jax train: error: config file configs/nosuch.py does not exist", result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(workdir)


@pytest.mark.parametrize(
  "command, own, foreign, says",
  [
    ("train", ["--config", "--workdir"], ["--methods", "--out", "--sigma", "--per_example"], "created or resumed"),
    ("eval", ["--config", "--workdir", "--methods", "--per_example"], ["--out", "--sigma", "--dense"], "worst case"),
    ("export", ["--config", "--workdir", "--out", "--dense"], ["--methods", "--sigma", "--per_example"], ".pth"),
    (
      "certify",
      ["--config", "--workdir", "--out", "--sigma", "--n0", "--n", "--alpha"],
      ["--methods"],
      "Output directory",
    ),
  ],
)
def test_help_lists_the_commands_own_flags_and_the_config_syntax(command, own, foreign, says):
  from hydra_jax import cli  # pylint: disable=g-import-not-at-top  (defines absl flags)

  text = cli.command_help(command)
  assert text.startswith(f"usage: hydra-jax {command} ") and "--config FILE[:ARG]" in text.splitlines()[0], text
  flag_lines = [line.split()[0] for line in text.split("config:\n")[0].splitlines() if line.startswith("  --")]
  assert set(own) <= set(flag_lines) and not set(foreign) & set(flag_lines), flag_lines
  assert says in text
  assert "--config.KEY=VALUE" in text and "get_config(ARG)" in text and "docs/configuration.md" in text


def test_help_is_the_commands_own_from_the_command_line():
  from hydra_jax import cli  # pylint: disable=g-import-not-at-top

  result = hydra_jax("eval", "--workdir", "x", "--help")
  assert result.stdout.strip() == cli.command_help("eval") and "Try --helpfull" not in result.stdout
