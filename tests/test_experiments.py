"""Smoke tests of the experiment scripts at tiny sizes.

Run: python -m pytest -q tests/test_experiments.py
"""

import csv
import math
import os

import pytest

from experiments import baselines
from experiments import init_ablation
from hydra_jax import masking


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
  for row in rows:
    attacks = [float(row["pgd_linf"]), float(row["apgd_ce"])]
    assert 0 <= float(row["robust"]) <= min(attacks) and max(attacks) <= float(row["clean"]) <= 1
  assert [float(r["kept_fraction"]) for r in rows[1:5]] == pytest.approx([0.5] * 4, abs=0.01)
