"""The command line: bad keys and values are rejected by name; train -> eval -> export works end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hydra_jax(*args, check=True):
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "hydra_jax", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result


def test_unknown_command_prints_usage():
  result = hydra_jax("fit", check=False)
  assert result.returncode == 2 and "usage: hydra-jax {train,eval,export,certify}" in result.stderr


@pytest.mark.parametrize("flag, message", [
    ("--config.optimiser.lr=0.1", "optimiser"),
    ("--config.k=2.0", "config.k=2.0 must lie in (0, 1]"),
    ("--config.model.name=resnet9", "Unknown model 'resnet9'"),
])
def test_bad_config_is_rejected_by_name(tmp_path, flag, message):
  result = hydra_jax("train", "--config", "configs/digits_demo.py", flag, "--workdir", str(tmp_path / "run"),
                     check=False)
  assert result.returncode != 0 and message in result.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_train_eval_export_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  tiny = ["--config", "configs/digits_demo.py:model=cnn_tiny", "--config.stage=pretrain",
          "--config.stages.pretrain.epochs=1", "--config.eval.steps=1", "--config.log.progress=false",
          "--workdir", workdir]
  summary = json.loads(hydra_jax("train", *tiny).stdout)
  assert summary["stage"] == "pretrain" and summary["step"] == summary["total_steps"] == 1437 // 64

  results = json.loads(hydra_jax("eval", *tiny, "--methods=pgd_linf").stdout)
  assert results["num_examples"] == 360
  assert 0 <= results["robust"] <= results["pgd_linf"] <= results["clean"] <= 1
  assert abs(results["clean"] - summary["clean_accuracy"]) < 1e-6  # same model, same test split

  out = str(tmp_path / "model.npz")
  assert "wrote" in hydra_jax("export", *tiny, f"--out={out}").stdout
  arrays = np.load(out)
  assert {"params/0/kernel", "params/0/bias"} <= set(arrays.files)
