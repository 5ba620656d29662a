"""Smoke tests of the experiment scripts at tiny sizes.

Run: python -m pytest -q tests/test_experiments.py
"""

import csv
import importlib.util
import math
import os

import pytest

from experiments import baselines
from experiments import init_ablation
from experiments import rigl_rebuttal
from experiments import table1
from hydra_jax import config as config_lib
from hydra_jax import masking
from hydra_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_robust_is_the_worst_case(rows, methods):
  """Each CSV row: 0 <= robust <= every method's accuracy <= clean <= 1 (robust is their per-example worst case),
  and robust >= clean - sum over the methods of (clean - method): a method's correct examples are clean-correct
  ones, so each method removes at most clean - method of the examples robust to all."""
  for row in rows:
    accuracies = [float(row[name]) for name in methods]
    clean, robust = float(row["clean"]), float(row["robust"])
    assert 0 <= robust <= min(accuracies) and max(accuracies) <= clean <= 1
    assert robust >= clean - sum(clean - a for a in accuracies) - 1e-9


def test_init_ablation_writes_a_finite_row_per_init_and_logged_step(tmp_path):
  init_ablation.main(
    [
      "--out",
      str(tmp_path),
      "--dataset=digits",
      "--model=cnn_tiny",
      "--objective=benign",
      "--batch_size=64",
      "--pretrain_epochs=1",
      "--prune_epochs=1",
      "--steps=4",
      "--every=2",
      "--inits=scaled,dirac",
    ]
  )
  with open(tmp_path / "init_ablation.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["init"], int(r["step"])) for r in rows] == [("scaled", 2), ("scaled", 4), ("dirac", 2), ("dirac", 4)]
  assert all(math.isfinite(float(r["loss"])) and float(r["score_grad"]) > 0 for r in rows)
  assert os.path.getsize(tmp_path / "init_ablation.png") > 0


def test_every_paper_init_is_a_registered_score_init():
  assert set(init_ablation.INITS) <= set(masking.SCORE_INITS)
  assert len(init_ablation.INITS) == 7  # the scaled init and the six it is compared with (rebuttal Fig. 1)


@pytest.mark.slow
def test_baselines_evaluates_every_trained_model_with_the_worst_case_of_its_attacks(tmp_path):
  baselines.main(
    [
      "--out",
      str(tmp_path),
      "--dataset=digits",
      "--model=cnn_tiny",
      "--objective=benign",
      "--batch_size=64",
      "--pretrain_epochs=1",
      "--prune_epochs=1",
      "--finetune_epochs=1",
      "--ks=0.5",
      "--attack_steps=2",
      "--methods=pgd_linf,apgd_ce",
    ]
  )
  with open(tmp_path / "baselines.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["method"] for r in rows] == ["dense", "hydra", "lwm", "snip", "random", "str"]
  assert_robust_is_the_worst_case(rows, ("pgd_linf", "apgd_ce"))
  assert [float(r["kept_fraction"]) for r in rows[1:5]] == pytest.approx([0.5] * 4, abs=0.01)


@pytest.mark.slow
def test_rigl_rebuttal_evaluates_the_robust_and_benign_runs_with_the_worst_case_of_its_attacks(tmp_path):
  rigl_rebuttal.main(
    [
      "--out",
      str(tmp_path),
      "--dataset=digits",
      "--model=cnn_tiny",
      "--objective=benign",
      "--batch_size=64",
      "--pretrain_epochs=1",
      "--prune_epochs=1",
      "--finetune_epochs=1",
      "--k=0.5",
      "--rigl_delta_t=5",
      "--scratch_optimizer=adam",
      "--scratch_lr=1e-3",
      "--attack_steps=2",
      "--methods=pgd_linf,apgd_ce",
    ]
  )
  with open(tmp_path / "rigl_rebuttal.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["objective"], r["method"]) for r in rows] == [
    ("benign", "dense"),
    ("benign", "hydra"),
    ("benign", "rigl"),
    ("benign", "dense"),
    ("benign", "rigl"),
    ("benign", "str"),
  ]  # --objective=benign: the "robust" runs use it too
  assert_robust_is_the_worst_case(rows, ("pgd_linf", "apgd_ce"))
  assert [float(rows[i]["kept_fraction"]) for i in (1, 2, 4)] == pytest.approx([0.5] * 3, abs=0.01)


def test_table1_networks_are_the_papers_six_and_each_has_a_width_option():
  assert set(table1.PAPER) == set(table1.NETWORKS) and len(table1.NETWORKS) == 6
  assert all(models.width_scalable(name) for name in table1.NETWORKS)


def test_table1_configs_validate_at_full_and_reduced_scale():
  full = table1.parse_args(["--out", "unused"])
  reduced = table1.parse_args(["--out", "unused", "--dataset=digits", "--width=0.25", "--eps=0.1"])
  for args in (full, reduced):
    for network in table1.NETWORKS:
      config = table1.network_config(args, network)
      config_lib.check_config(config)
      assert (config.stage, config.ks, config.baselines) == ("all", (0.01,), ("admm",))
  config = table1.network_config(full, "resnet18")
  assert (config.data.name, config.model.width, config.objective.name) == ("cifar10", 1.0, "trades")
  assert config.objective.eps == pytest.approx(8 / 255) and config.stages.admm.epochs == 100


@pytest.mark.slow
def test_table1_writes_a_row_per_network_and_method_with_the_worst_case_of_its_attacks(tmp_path):
  table1.main(
    [
      "--out",
      str(tmp_path),
      "--dataset=digits",
      "--networks=resnet_tiny",
      "--width=0.5",
      "--objective=benign",
      "--batch_size=64",
      "--pretrain_epochs=1",
      "--prune_epochs=1",
      "--finetune_epochs=1",
      "--admm_epochs=1",
      "--admm_interval_epochs=1",
      "--attack_steps=2",
      "--methods=pgd_linf,apgd_ce",
    ]
  )
  with open(tmp_path / "table1.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["network"], r["method"]) for r in rows] == [("resnet_tiny", "hydra"), ("resnet_tiny", "admm")]
  assert_robust_is_the_worst_case(rows, ("pgd_linf", "apgd_ce"))
  assert [float(row["kept_fraction"]) for row in rows] == pytest.approx([0.01, 0.01], abs=0.005)
  assert os.path.getsize(tmp_path / "config_resnet_tiny.json") > 0


def _imagenet_config(arg):
  spec = importlib.util.spec_from_file_location("imagenet", os.path.join(ROOT, "configs", "imagenet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_imagenet_smoothing_config_is_the_references_resnet50_at_90_percent_and_validates():
  config = _imagenet_config("objective=smooth")
  config_lib.check_config(config)
  assert (config.model.name, config.data.name, config.data.batch_size) == ("resnet50_imagenet", "imagenet2012", 256)
  assert (config.objective.name, config.objective.noise_std, config.ks, config.eval.methods) == (
    "smooth_imagenet",
    0.25,
    (0.1,),
    (),
  )
  stages = {
    stage: (config.stages[stage].epochs, config.stages[stage].lr) for stage in ("pretrain", "prune", "finetune")
  }
  assert stages == {"pretrain": (23, 0.1), "prune": (5, 0.1), "finetune": (23, 0.01)}
  config_lib.check_config(_imagenet_config(None))  # the free-AT default still validates


def test_apb_table_has_a_cell_per_granularity_and_sparsity_and_names_its_robust_accuracy():
  from experiments import apb  # noqa: PLC0415

  rows = [{"method": "dense", "granularity": "-", "target_k": 1.0, "clean": 0.9, "robust": 0.5}]
  for granularity, ks in apb.GRID.items():
    for k in ks:
      for method in apb.METHODS:
        if not (method == "lwm" and k == 0.1):  # a cell not run: '-'
          rows.append({"method": method, "granularity": granularity, "target_k": k, "clean": k, "robust": k / 2})
  lines = apb.markdown_table(rows, apb.robust_label(["autoattack"])).splitlines()
  assert lines[0] == "Cells: clean / robust: AutoAttack standard (%)."
  assert lines[2] == "| method | weight 90% | weight 95% | weight 99% | channel 50% | channel 75% | channel 90% |"
  assert lines[6] == "| harp | 10.0 / 5.0 | 5.0 / 2.5 | 1.0 / 0.5 | 50.0 / 25.0 | 25.0 / 12.5 | 10.0 / 5.0 |"
  assert lines[7] == "| lwm | - | 5.0 / 2.5 | 1.0 / 0.5 | 50.0 / 25.0 | 25.0 / 12.5 | - |"
  assert apb.robust_label(["pgd_linf", "apgd_ce"]) == "robust: per-example worst case of pgd_linf, apgd_ce"
