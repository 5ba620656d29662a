"""A trained run used from Python and the command line: `hydra_jax.load_run` (logits of the masked model, its
config and step, the same accuracies as `hydra-jax eval`), `hydra-jax eval --per_example`, and their errors."""

import csv
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

import hydra_jax
from hydra_jax import checkpoints
from hydra_jax import evaluate
from hydra_jax import export
from hydra_jax import models
from hydra_jax import pipeline
from hydra_jax import sources
from tests import pipeline_helpers as ph
from tests.cli_in_process import run as run_in_process
from tests.test_cli import hydra_jax as run_cli
from tests.test_export import write_run

K = 0.25
METHODS = ("pgd_linf", "ibp")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
  """A prune run of one epoch (11 steps of 128) at k=0.25 from random dense weights (`test_export.write_run`),
  saved every 5 steps and evaluated (best/) at its end."""
  root = tmp_path_factory.mktemp("use_run")
  pretrain_dir, prune_dir = str(root / "pretrain"), str(root / "prune")
  write_run(pretrain_dir, with_scores=False, stage="pretrain")
  config = ph.tiny_config(stage="prune", source=pretrain_dir, k=K, **{"data.batch_size": 128})
  config.checkpoint.every_steps, config.data.eval_examples = 5, 40  # 40 = one full batch and one padded one
  pipeline.train_and_evaluate(config, prune_dir)
  return config, prune_dir


@pytest.fixture(scope="module")
def best_before_last(pruned, tmp_path_factory):
  """A copy of the pruned run continued by a step 12 whose evaluation is worse than step 11's: every weight
  negated and a lower robust accuracy recorded, saved as the train loop saves. Its best/ stays step 11, its latest
  is step 12."""
  config, workdir = pruned
  copy = shutil.copytree(workdir, str(tmp_path_factory.mktemp("best_before_last") / "prune"))
  params, batch_stats, scores = sources.load_source(ph.override(config.copy_and_resolve_references(), source=copy))
  step, meta = checkpoints.read_meta(copy)
  assert step == 11 and os.listdir(os.path.join(copy, "best")) == ["11"]
  metrics = {**meta["metrics"], "robust": meta["metrics"]["robust"] - 0.5}
  with open(os.path.join(copy, "checkpoints", "11", "sparsity", "metadata")) as f:
    sparsity = f.read()
  ckpt = checkpoints.Checkpoints(copy, keep=3, async_save=False)
  worse = {"params": jax.tree.map(lambda w: -w, params), "batch_stats": batch_stats, "scores": scores}
  ckpt.save(12, {"model": worse}, meta={**meta, "metrics": metrics}, sparsity=sparsity, metrics=metrics)
  ckpt.close()
  return copy


def test_the_best_checkpoint_is_the_best_evaluation_not_the_latest(pruned, best_before_last):
  config, original = pruned
  workdir = best_before_last
  assert os.listdir(os.path.join(workdir, "best")) == ["11"]
  best, latest = hydra_jax.load_run(workdir, "best"), hydra_jax.load_run(workdir)
  assert (best.step, latest.step) == (11, 12)
  step_11 = hydra_jax.load_run(original)  # the run's own step 11, read from the run that was copied
  assert step_11.step == 11
  flat = lambda tree: jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
  assert [p for p, _ in flat(best.variables)] == [p for p, _ in flat(step_11.variables)]
  for (path, a), (_, b) in zip(flat(best.variables), flat(step_11.variables)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(flat(latest.variables), flat(best.variables)))
  x, y = eval_images(config)
  best_clean, latest_clean = (np.mean(np.argmax(m(x), axis=-1) == y) for m in (step_11, latest))
  assert best_clean != latest_clean
  status, out, err = run_in_process("eval", "--best", "--methods=", "--workdir", workdir)
  assert status == 0, err
  assert json.loads(out)["clean"] == best_clean
  status, out, err = run_in_process("eval", "--methods=", "--workdir", workdir)
  assert status == 0, err
  assert json.loads(out)["clean"] == latest_clean


def eval_images(config):
  split = sources.eval_split(config)
  batches = [split.batch_at(i) for i in range(split.num_steps)]
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  return tuple(np.concatenate([b[key] for b in batches])[keep] for key in ("image", "label"))


def test_load_run_maps_images_to_the_masked_models_logits(pruned):
  config, workdir = pruned
  model = hydra_jax.load_run(workdir)
  assert model.step == 11 and model.k == K and model.meta["stage"] == "prune"
  with open(os.path.join(workdir, "config.json")) as f:
    assert model.config.to_dict() == json.load(f)  # the run's own resolved config
  # Independent expectation: the checkpoint read with orbax, masked with the reference's GetSubnet in numpy.
  params, _, scores = ph.restore_model(workdir)
  masked = {n: np.where(ph.numpy_topk_mask(scores[n], K), w, 0) if n in scores else w for n, w in params.items()}
  x, _ = eval_images(config)
  flax_params = {}
  for name, value in masked.items():
    layer, leaf = name.split("/")
    flax_params.setdefault(layer, {})[leaf] = value
  expected = models.get_model(ph.MODEL, 10).apply({"params": flax_params}, x, train=False)
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
  # The evaluation path's logits: the apply_fn and variables evaluate.evaluate gets (called eagerly here, jitted
  # by the model: the same sums, rounded in another order at most).
  np.testing.assert_allclose(model(x), model.apply_fn(model.variables, x, False)[0], rtol=1e-5, atol=1e-5)
  # Differentiable in x, as an attack library needs.
  assert np.all(np.isfinite(jax.grad(lambda x: model(x).sum())(x)))
  earlier = hydra_jax.load_run(workdir, checkpoint=5)
  assert earlier.step == 5 and not np.allclose(earlier(x), model(x))
  best = hydra_jax.load_run(workdir, checkpoint="best")
  assert best.step == 11 and best.meta["metrics"]["robust"] >= 0


def conv_hwio(x, kernel, stride, padding):
  """Cross-correlation of NHWC x with an HWIO kernel (as torch.nn.Conv2d and lax.conv), in numpy."""
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  taps = [
    x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride] @ kernel[i, j]
    for i in range(kh)
    for j in range(kw)
  ]
  return np.sum(taps, axis=0)


def ibp_margins(params, x, y, eps):
  """Per example, the lowest margin z_y - z_j (j != y) that interval bound propagation proves for cnn_tiny on the
  l_inf eps-ball clipped to [0, 1], in float64 numpy: intervals through each conv / dense layer as center +- |W|
  radius and through ReLU, the margin rows e_y - e_j merged into the last layer (as IBP with a specification)."""
  weights = {layer: {leaf: np.asarray(v, np.float64) for leaf, v in leaves.items()} for layer, leaves in params.items()}
  lower, upper = np.clip(x - eps, 0, 1).astype(np.float64), np.clip(x + eps, 0, 1).astype(np.float64)
  affine = [lambda h, w: conv_hwio(h, w, 2, 1)] * 2 + [lambda h, w: h.reshape(len(h), -1) @ w]
  for layer, apply in zip(("0", "2", "5"), affine, strict=True):
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    kernel, bias = weights[layer]["kernel"], weights[layer]["bias"]
    center, radius = apply(center, kernel) + bias, apply(radius, np.abs(kernel))
    lower, upper = np.maximum(center - radius, 0), np.maximum(center + radius, 0)
  kernel, bias = weights["7"]["kernel"], weights["7"]["bias"]
  rows = kernel[:, y].T[:, None, :] - kernel.T[None]  # [N, classes, hidden]: row j is w_y - w_j
  center, radius = (upper + lower) / 2, (upper - lower) / 2
  margins = (
    np.einsum("nch,nh->nc", rows, center) + (bias[y][:, None] - bias) - np.einsum("nch,nh->nc", np.abs(rows), radius)
  )
  margins[np.arange(len(y)), y] = np.inf  # j = y is no constraint
  return margins.min(axis=1)


@pytest.mark.devices(8)
def test_eval_runs_in_the_runs_parallel_mode_and_gives_the_one_device_verdicts(pruned, monkeypatch):
  """`load_run(...).evaluate` (= `hydra-jax eval`) evaluates as the run's training did: 'auto' over the 8
  devices, 'single' on one. Per-example keys make the verdicts the same; one example per column may flip by
  float rounding between the two programs (none did on the machines this ran on)."""
  config, workdir = pruned
  calls, original = [], evaluate.evaluate_per_example

  def recorded(*args, **kwargs):
    calls.append((kwargs["mode"], len(kwargs["devices"])))
    return original(*args, **kwargs)

  monkeypatch.setattr(evaluate, "evaluate_per_example", recorded)
  examples = {}
  for mode in ("auto", "single"):
    run_config = config.copy_and_resolve_references()
    run_config.parallel.mode = mode
    examples[mode] = hydra_jax.load_run(workdir, config=run_config).evaluate_per_example(("pgd_linf",))[1]
  assert calls == [("shard_map", 8), ("single", 1)]
  for name, column in examples["single"].items():
    assert np.sum(examples["auto"][name] != column) <= (0 if name in ("index", "label") else 1), name


def test_load_run_accuracies_equal_hydra_jax_eval_and_the_per_example_file_adds_up_to_them(pruned, tmp_path):
  config, workdir = pruned
  csv_path = str(tmp_path / "examples.csv")
  printed = json.loads(
    run_cli("eval", "--workdir", workdir, f"--methods={','.join(METHODS)}", f"--per_example={csv_path}").stdout
  )
  model = hydra_jax.load_run(workdir)
  from_python, examples = model.evaluate_per_example(METHODS)
  assert json.loads(json.dumps(from_python)) == printed  # the same numbers and settings
  x, y = eval_images(config)
  assert printed["num_examples"] == len(y) == 40
  assert printed["clean"] == np.mean(np.argmax(model(x), axis=-1) == y)
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  columns = {name: np.array([int(row[name]) for row in rows]) for name in rows[0]}
  assert list(columns)[:3] == ["index", "label", "clean"]
  np.testing.assert_array_equal(columns["index"], np.arange(40))
  np.testing.assert_array_equal(columns["label"], y)
  accuracies = {
    name: value
    for name, value in printed.items()
    if name not in ("num_examples", "k", "stage", "seed", "settings", "warnings")
  }
  assert set(accuracies) == set(columns) - {"index", "label"} >= {"clean", "robust", *METHODS}
  for name, accuracy in accuracies.items():
    assert columns[name].sum() / len(rows) == accuracy, name  # exactly what eval prints
  # Row by row (a shift of the rows would keep every mean): clean is the model's top-1, ibp the bound computed here.
  np.testing.assert_array_equal(columns["clean"], np.argmax(model(x), axis=-1) == y)
  margins = ibp_margins(model.variables["params"], x, y, config.eval.eps)
  decided = np.abs(margins) > 1e-4  # verdicts float32 rounding in the library's bounds cannot flip
  assert decided.mean() > 0.9 and 0 < np.sum(margins > 0) < len(y)
  np.testing.assert_array_equal(columns["ibp"][decided], (margins > 0)[decided])
  worst = columns["clean"] & columns["pgd_linf"] & columns["ibp"]
  np.testing.assert_array_equal(columns["robust"], worst)
  npz_path = str(tmp_path / "examples.npz")
  export.write_per_example(npz_path, examples)
  with np.load(npz_path) as arrays:
    assert sorted(arrays.files) == sorted(columns)
    for name, values in columns.items():
      np.testing.assert_array_equal(arrays[name].astype(int), values)


def test_a_workdir_without_a_run_is_one_line_naming_it(tmp_path, pruned):
  empty = tmp_path / "empty"
  empty.mkdir()
  for workdir in (str(tmp_path / "nowhere"), str(empty)):
    with pytest.raises(checkpoints.CheckpointError, match=rf"^no [a-z ]*checkpoint[a-z ]* {re.escape(workdir)}$"):
      hydra_jax.load_run(workdir)
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint in .*; the runs under it: pretrain, prune$"):
    hydra_jax.load_run(os.path.dirname(pruned[1]))  # the parent of two runs, as the top of a stage='all' run
  with pytest.raises(checkpoints.CheckpointError, match=r"has no step 4; it has \[5, 10, 11\]"):
    hydra_jax.load_run(pruned[1], checkpoint=4)
  with pytest.raises(checkpoints.CheckpointError, match="'newest' must be 'latest', 'best' or a step number"):
    hydra_jax.load_run(pruned[1], checkpoint="newest")
  with pytest.raises(ValueError, match="per-example file 'x.json' must end in .npz or .csv"):
    export.evaluate_checkpoint(pruned[0], pruned[1], per_example="x.json")


def test_a_models_evaluation_data_is_its_configs(pruned):
  """load_run(config=...) builds the model and data for that config (e.g. another eval_examples)."""
  config, workdir = pruned
  config = ph.override(ph.tiny_config(stage="prune", source="x", k=K), **{"data.eval_examples": 32})
  model = hydra_jax.load_run(workdir, config=config)
  assert model.config is config and model.evaluate(())["num_examples"] == 32


def test_security_curve_writes_the_runs_curves_from_their_smallest_adversarial_norms(pruned, tmp_path, monkeypatch):
  """`hydra-jax eval --curve`'s library call: PNG, CSV and JSON with one curve per run, from each run's FMN norms.
  On the real run: at eps 0 the clean accuracy of its evaluation, the grid up to twice eval.eps. With the norms
  fixed by hand (the random-weight run's few correct examples resist FMN): the hand-counted curve."""
  config, workdir = pruned
  out = str(tmp_path / "curve.png")
  result = export.security_curve(config, [workdir], out, settings={"steps": 5}, progress=False)
  assert all(os.path.getsize(path) > 0 for path in result["files"]) and result["files"][0] == out
  curve = result["runs"][workdir]["robust"]
  assert curve[0] == hydra_jax.load_run(workdir, config=config).evaluate([])["clean"]
  assert result["eps"][0] == 0 and np.isclose(result["eps"][-1], 2 * config.eval.eps) and len(curve) == 41
  with open(tmp_path / "curve.json") as f:
    assert json.load(f)["settings"]["fmn"]["steps"] == 5

  hand = {"min_norm": np.array([0.0, 0.01, 0.05, np.inf]), "clean": np.array([False, True, True, True])}
  monkeypatch.setattr(export.RunModel, "min_norms", lambda self, norm, settings=None, progress=False: hand)
  result = export.security_curve(config, [workdir, workdir], out, max_eps=0.1, progress=False)
  expected = [0.75 if e < 0.01 else 0.5 if e < 0.05 else 0.25 for e in np.linspace(0, 0.1, 41)]
  np.testing.assert_allclose(result["runs"][workdir]["robust"], expected)
  assert np.isclose(result["runs"][workdir]["median_min_norm"], 0.03)
  with open(tmp_path / "curve.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["eps", workdir, workdir] and len(rows) == 42
  np.testing.assert_allclose([float(r[1]) for r in rows[1:]], expected)
  np.testing.assert_allclose([float(r[0]) for r in rows[1:]], np.linspace(0, 0.1, 41))
