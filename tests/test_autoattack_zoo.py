"""`hydra-jax eval`'s AutoAttack and FMN (security curve) paths on every zoo family at tiny size (random weights,
BatchNorm in eval mode): invariants of the per-attack columns, every reported adversarial example checked against
the model itself, and the same verdicts on 1 and 8 devices."""

import csv
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import attacks
from hydra_jax import autoattack
from hydra_jax import evaluate
from hydra_jax import min_norm
from hydra_jax import models
from tests import zoo_helpers
from tests.cli_in_process import run as run_in_process
from tests.test_autoattack import FAST_AA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [name for name in models.model_names() if name.endswith("_tiny")]  # one per family


def _families(default=()):
  """TINY as test parameters, those not in `default` marked slow."""
  return [name if name in default else pytest.param(name, marks=pytest.mark.slow) for name in TINY]


# FAST_AA with 10 APGD steps: with 5, APGD-CE breaks none of mobilenet_v2_tiny's examples at the median FMN norm
# (10 steps: 8 of 14).
ZOO_AA = {**FAST_AA, "apgd_steps": 10}
EXAMPLES = 16  # one batch: 2 per device on 8 devices
FMN_SETTINGS = {"steps": 10}
STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")
# A point counts as misclassified by the model when its margin z_y - max_{j != y} z_j is at most this fraction of
# the largest |logit|: FMN and FAB stop just past the decision boundary, and the check below is another compiled
# program than the attack's, whose float32 sums may round the other way there (a few ulps of the logits).
MARGIN_RTOL = 1e-5
# x_adv - x of a point clipped to the eps-ball exceeds eps by the rounding of x + delta in [0, 1]: under an ulp of 1.
BALL_ATOL = float(np.finfo(np.float32).eps)


@functools.cache
def _family(name):
  """(apply_fn, variables, x [16, H, W, C], y [16]) for zoo family `name` with random weights: y is the model's
  own prediction except for the first two examples (misclassified clean)."""
  model, x, variables = zoo_helpers.random_variables(name, batch=EXAMPLES, seed=0)
  apply_fn = models.make_apply_fn(model)  # one object per family: evaluate's compilations are cached on it
  y = np.asarray(jnp.argmax(apply_fn(variables, x, False)[0], -1)).astype(np.int32)
  y[:2] = (y[:2] + 1) % 10
  return apply_fn, variables, np.asarray(x), y


def _batches(name):
  _, _, x, y = _family(name)
  return [{"image": x, "label": y}]


def _margins(name, x_adv):
  """z_y - max_{j != y} z_j [N] of the model at x_adv, and the largest |logit|."""
  apply_fn, variables, _, y = _family(name)
  logits = apply_fn(variables, jnp.asarray(x_adv), False)[0]
  return np.asarray(autoattack.margin(logits, jnp.asarray(y))), float(jnp.abs(logits).max())


@functools.cache
def _min_norms(name, mode="single"):
  apply_fn, variables, _, _ = _family(name)
  return evaluate.min_norms(
    apply_fn, variables, _batches(name), norm="linf", settings=FMN_SETTINGS, progress=False, mode=mode
  )


@functools.cache
def _eps(name):
  """The l_inf eps of the AutoAttack tests: the median of FMN's smallest norms over the examples correct clean, a
  scale at which the attacks break examples (a random network's margins differ by family)."""
  found = _min_norms(name)
  return float(np.median(found["min_norm"][found["clean"]]))


@functools.cache
def _autoattack(name, mode="single"):
  apply_fn, variables, _, _ = _family(name)
  config = {"autoattack": dict(eps=_eps(name), **ZOO_AA)}
  return evaluate.evaluate_per_example(
    apply_fn,
    variables,
    _batches(name),
    key=jax.random.key(0),
    methods=("autoattack",),
    config=config,
    progress=False,
    mode=mode,
  )


# FMN compiles in about 2 CPU seconds per family; AutoAttack (the evaluation program and the direct call) in
# about 20 for cnn_tiny, the cheapest: those tests are slow.
@pytest.mark.parametrize("name", _families(default=("cnn_tiny", "resnet_tiny")))
def test_fmn_min_norms_on_a_zoo_family(name):
  """evaluate.min_norms (`hydra-jax eval --curve`'s numbers): clean is the model's top-1, a norm is 0 exactly for
  the examples misclassified clean, FMN (the same call outside the evaluation program) finds its adversarial
  points at those norms, misclassified by the model and in the [0, 1] box; the curve falls from the clean accuracy."""
  apply_fn, variables, x, y = _family(name)
  found = _min_norms(name)
  clean = np.asarray(jnp.argmax(apply_fn(variables, x, False)[0], -1)) == y
  np.testing.assert_array_equal(found["clean"], clean)
  norms = found["min_norm"]
  assert np.all(norms >= 0) and np.all((norms == 0) == ~clean)
  broken = clean & np.isfinite(norms)
  assert broken.sum() >= clean.sum() // 2  # FMN finds adversarial points for most examples

  f = lambda z: apply_fn(variables, z, False)[0]
  x_adv, direct = jax.jit(lambda x, y: min_norm.fmn(f, x, y, norm="linf", **FMN_SETTINGS))(x, y)
  x_adv, direct = np.asarray(x_adv), np.asarray(direct)
  np.testing.assert_allclose(norms[clean], direct[clean], rtol=1e-4)  # FMN is deterministic; rounding only
  margins, scale = _margins(name, x_adv)
  assert np.all(margins[broken] <= MARGIN_RTOL * scale)
  distance = np.abs(x_adv - x).reshape(len(x), -1).max(1)
  np.testing.assert_allclose(distance[broken], direct[broken], rtol=1e-5, atol=1e-7)
  assert x_adv.min() >= 0 and x_adv.max() <= 1

  grid = np.linspace(0, 2 * _eps(name), 9)
  curve = evaluate.robust_curve(norms, grid)
  assert curve[0] == clean.mean() and np.all(np.diff(curve) <= 0) and curve[-1] < curve[0]


@pytest.mark.parametrize("name", _families())
def test_autoattack_on_a_zoo_family(name):
  """`hydra-jax eval --methods=autoattack`'s per-example columns: each stage keeps a subset of the previous one's
  robust examples, the result is the last stage, masking is what Square alone broke. The same sequence called
  directly with the evaluation's keys (`eval_step`: fold_in of the batch number, then the example's position, then
  the method's number) gives the same verdicts, and its adversarial points are misclassified by the model, inside
  the eps-ball and the box; the examples it left robust keep their clean input."""
  apply_fn, variables, x, y = _family(name)
  eps = _eps(name)
  accuracies, examples = _autoattack(name)
  columns = [examples["clean"], *(examples[f"autoattack_{stage}"] for stage in STAGES)]
  for earlier, later in zip(columns, columns[1:]):
    assert np.all(later <= earlier)
  np.testing.assert_array_equal(examples["autoattack"], columns[-1])
  np.testing.assert_array_equal(examples["robust"], columns[-1])
  assert np.all(examples["autoattack_masking"] <= (examples["autoattack_fab_t"] & ~examples["autoattack_square"]))
  assert accuracies["autoattack"] <= accuracies["autoattack_apgd_ce"] <= accuracies["clean"]
  assert examples["autoattack"].sum() < examples["clean"].sum()  # it breaks examples (vit_tiny: all) to check below

  f = lambda z: apply_fn(variables, z, False)[0]
  keys = attacks.fold_in(attacks.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(len(y))), 0)
  run = jax.jit(lambda x, y, k: autoattack.autoattack(f, x, y, key=k, eps=eps, **ZOO_AA))
  x_adv, robust = run(x, y, keys)
  x_adv = np.asarray(x_adv)
  for stage in STAGES:
    np.testing.assert_array_equal(examples["clean"] & np.asarray(robust[stage]), examples[f"autoattack_{stage}"])
  broken = examples["clean"] & ~examples["autoattack"]
  margins, scale = _margins(name, x_adv)
  assert np.all(margins[broken] <= MARGIN_RTOL * scale)
  assert np.all(np.abs(x_adv - x).reshape(len(x), -1).max(1) <= eps + BALL_ATOL)
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  np.testing.assert_array_equal(x_adv[~broken], x[~broken])


@pytest.mark.devices(8)
@pytest.mark.parametrize("name", _families())
def test_autoattack_and_min_norms_do_not_depend_on_the_device_count(name):
  """On 8 devices (2 examples each, shard_map) the per-example verdicts and FMN norms of one device: the random
  draws are per example, so only the float rounding of the model on 2 instead of 16 examples may differ (FMN's
  norms by about 1e-6, relative). Such a rounding could flip one accept / reject of APGD or Square and with it
  the verdict of an example at the edge, so each column may differ in one example (measured: none, on every
  family); a key that depended on the device would change every example's random draws."""
  single, sharded = _autoattack(name), _autoattack(name, "shard_map")
  np.testing.assert_array_equal(sharded[1]["label"], single[1]["label"])
  for column, values in single[1].items():
    assert np.sum(sharded[1][column] != values) <= 1, column
  np.testing.assert_allclose(_min_norms(name, "shard_map")["min_norm"], _min_norms(name)["min_norm"], rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The command line on a run of a BatchNorm, residual family.

RESNET_RUN = [
  "--config",
  os.path.join(ROOT, "configs", "digits_demo.py") + ":model=resnet_tiny,objective=benign",
  "--config.stage=pretrain",
  "--config.data.image_size=8",
  "--config.data.data_fraction=0.1",
  "--config.data.eval_examples=16",
  "--config.data.eval_batch_size=16",
  "--config.eval.every_epochs=1000",
  "--config.eval.eps=0.05",
  "--config.log.progress=false",
  "--config.checkpoint.async_save=false",
  *(f"--config.eval.autoattack.{key}={value}" for key, value in FAST_AA.items()),
]


@pytest.mark.slow
def test_eval_autoattack_and_curve_on_a_resnet_run(tmp_path):
  """`hydra-jax eval --methods=autoattack` of a resnet_tiny run trained 2 steps: the JSON's per-attack accuracies
  only fall and name the counts and seed, each --per_example row is a subset chain whose means are the JSON's;
  `--curve` writes the PNG / CSV / JSON, a curve falling from the run's clean accuracy. (`hydra-jax eval` runs on
  one device whatever config.parallel.mode says; 8 devices: test_autoattack_and_min_norms_do_not_depend_on_...)"""
  workdir = str(tmp_path / "run")
  status, _, err = run_in_process("train", *RESNET_RUN, "--config.stop_after_steps=2", "--workdir", workdir)
  assert status == 0, err
  out = str(tmp_path / "examples.csv")
  status, printed, err = run_in_process(
    "eval", *RESNET_RUN, "--methods=autoattack", f"--per_example={out}", "--workdir", workdir
  )
  assert status == 0, err
  with open(out) as f:
    rows = list(csv.DictReader(f))
  results = json.loads(printed)
  chain = ["clean", *(f"autoattack_{stage}" for stage in STAGES)]
  assert all(results[a] >= results[b] for a, b in zip(chain, chain[1:])) and results["autoattack"] == results[chain[-1]]
  assert results["settings"]["autoattack"] == {
    "norm": "linf",
    "eps": 0.05,
    "version": "standard",
    "p_init": 0.8,
    **FAST_AA,
  }
  assert results["seed"] == 1234 and results["num_examples"] == 16
  for row in rows:
    assert all(int(row[a]) >= int(row[b]) for a, b in zip(chain, chain[1:]))
  for name in [*chain, "autoattack", "autoattack_masking"]:
    assert sum(int(row[name]) for row in rows) / len(rows) == results[name], name

  png = str(tmp_path / "curve.png")
  status, printed, err = run_in_process("eval", *RESNET_RUN, f"--curve={png}", "--workdir", workdir)
  assert status == 0, err
  curve = json.loads(printed)
  robust = curve["runs"][workdir]["robust"]
  assert all(os.path.getsize(path) > 0 for path in curve["files"]) and curve["files"][0] == png
  assert robust[0] == curve["runs"][workdir]["clean"] == results["clean"]
  assert np.all(np.diff(robust) <= 0) and np.isclose(curve["eps"][-1], 0.1)
