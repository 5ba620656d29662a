"""Tests of the whole pipeline (stage='all'): the prune / finetune / LWM branches, their sources and masks, the
summary rows, in-training evaluation against `evaluate.evaluate`, score inits in `initial_state`, the global mask
scope, a reference-format `.pth.tar` source, and the optimizers against torch.optim."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import evaluate
from hydra_jax import export
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import optim
from hydra_jax import pipeline as pipeline_lib
from hydra_jax import train
from tests import pipeline_helpers as ph

K = 0.25


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """stage='all' with one k: pretrain, prune, finetune and LWM, one epoch (44 steps) each."""
  workdir = str(tmp_path_factory.mktemp("all"))
  config = ph.tiny_config(stage="all", ks=(K,), baselines=("lwm",))
  rows = pipeline_lib.train_and_evaluate(config, workdir)
  return config, workdir, rows


def branch(workdir, name):
  if name == "pretrain":
    return os.path.join(workdir, "pretrain")
  return os.path.join(workdir, f"k{K:g}", name, *(("train",) if name == "lwm" else ()))


def test_stage_all_runs_every_branch_and_returns_one_row_per_model(pipeline):
  _, workdir, rows = pipeline
  assert [(r["method"], r["stage"]) for r in rows] == [
    ("dense", "pretrain"),
    ("hydra (prune only)", "prune"),
    ("hydra", "finetune"),
    ("lwm", "finetune"),
  ]
  total = sum(np.prod(s) for s in ph.KERNEL_SHAPES.values())
  kept = sum(ph.kept_count(np.prod(s), K) for s in ph.KERNEL_SHAPES.values())  # 16 + 128 + 128 + 40 of 1248
  assert (kept, total) == (312, 1248)
  assert [r["kept_fraction"] for r in rows] == [1.0, kept / total, kept / total, kept / total]
  for row in rows:
    assert row["step"] == row["total_steps"] == ph.STEPS_PER_EPOCH
    assert 0 <= row["robust"] == row["pgd_linf"] <= row["clean"] <= 1
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == rows
  for name, row in zip(("pretrain", "prune", "finetune", "lwm"), rows):
    with open(os.path.join(branch(workdir, name), "summary.json")) as f:
      assert json.load(f) == {key: value for key, value in row.items() if key != "method"}
  lines = pipeline_lib.summary_table(rows).splitlines()
  assert len(lines) == 5
  assert lines[4].split() == [
    "lwm",
    "finetune",
    "25.00",
    f"{100 * rows[3]['clean']:.2f}",
    f"{100 * rows[3]['robust']:.2f}",
  ]


def test_prune_starts_from_the_pretrained_weights_and_finetune_from_the_pruned_scores(pipeline):
  _, workdir, _ = pipeline
  pre, _, _ = ph.restore_model(branch(workdir, "pretrain"), with_scores=False)
  pruned, _, pruned_scores = ph.restore_model(branch(workdir, "prune"))
  tuned, _, tuned_scores = ph.restore_model(branch(workdir, "finetune"))
  for name, weight in pre.items():  # prune trains only scores (cnn_tiny has no BatchNorm)
    np.testing.assert_array_equal(pruned[name], weight, err_msg=name)
  for name, scores in pruned_scores.items():
    initial = ph.scaled_scores(pre[name])
    assert not np.allclose(scores, initial)  # the scores trained...
    np.testing.assert_array_equal(tuned_scores[name], scores)  # ...and finetune kept them frozen
    mask = ph.numpy_topk_mask(scores, K)
    assert np.all(tuned[name][~mask] == 0) and np.any(tuned[name][mask] != pruned[name][mask])


def test_lwm_keeps_exactly_the_layerwise_largest_pretrained_weights(pipeline):
  _, workdir, _ = pipeline
  pre, _, _ = ph.restore_model(branch(workdir, "pretrain"), with_scores=False)
  lwm, _, lwm_scores = ph.restore_model(branch(workdir, "lwm"))
  for name, shape in ph.KERNEL_SHAPES.items():
    np.testing.assert_array_equal(lwm_scores[name], np.abs(pre[name]))  # magnitude scores, frozen since init
    magnitude = ph.numpy_topk_mask(pre[name], K)  # layer-wise magnitude pruning of the pretrained weights
    assert magnitude.sum() == ph.kept_count(np.prod(shape), K)
    assert np.all(lwm[name][~magnitude] == 0), name
    assert np.count_nonzero(lwm[name][magnitude]) == magnitude.sum()  # every kept weight is still there
    threshold = np.sort(np.abs(pre[name]).ravel())[::-1][magnitude.sum() - 1]
    assert np.all(np.abs(pre[name][magnitude]) >= threshold)


def eval_batches(config):
  batches = data.eval_batches("digits", config.data.eval_batch_size)
  return list(data.iterate(batches, range(config.data.eval_examples // config.data.eval_batch_size), prefetch=0))


@pytest.mark.parametrize("name", ["pretrain", "prune"])
def test_in_training_evaluation_agrees_with_evaluate_on_the_masked_weights(pipeline, name):
  config, workdir, rows = pipeline
  row = rows[["pretrain", "prune"].index(name)]
  params, _, scores = ph.restore_model(branch(workdir, name), with_scores=name == "prune")
  if scores:  # the weights the model ran with: each layer's top-k by |score|, numpy rule
    params = {n: np.where(ph.numpy_topk_mask(scores[n], K), w, 0) if n in scores else w for n, w in params.items()}
  variables = {
    "params": {
      layer: {leaf: jnp.asarray(params[f"{layer}/{leaf}"]) for leaf in ("kernel", "bias")}
      for layer in ("0", "2", "5", "7")
    }
  }
  apply_fn = models.make_apply_fn(models.get_model(ph.MODEL, 10))
  settings = {"eps": config.eval.eps, "step_size": config.eval.step_size, "steps": config.eval.steps, "restarts": 1}
  results = {
    eps: evaluate.evaluate(
      apply_fn,
      variables,
      eval_batches(config),
      key=jax.random.key(5),
      methods=("pgd_linf",),
      config={"pgd_linf": {**settings, "eps": eps}},
      progress=False,
    )
    for eps in (config.eval.eps, 0.3)
  }
  assert results[0.1]["num_examples"] == 64
  assert row["clean"] == results[0.1]["clean"]  # the same 64 images, the same weights: exact
  # PGD starts at random points, drawn from other keys by the two paths: equal up to a few examples (PGD-5 here
  # moved by up to 3 of 64 examples over 8 keys).
  assert abs(row["pgd_linf"] - results[0.1]["pgd_linf"]) <= 3 / 64
  assert row["robust"] == row["pgd_linf"]
  assert results[0.1]["clean"] > 0.3 and results[0.1]["pgd_linf"] < results[0.1]["clean"] - 3 / 64  # not at chance
  assert results[0.3]["pgd_linf"] < results[0.1]["pgd_linf"] - 3 / 64  # the tolerance is sharper than eps


def test_best_checkpoint_evaluates_to_its_recorded_metrics(pipeline):
  config, workdir, rows = pipeline
  prune_dir = branch(workdir, "prune")
  best_steps = os.listdir(os.path.join(prune_dir, "best"))
  assert best_steps == [str(ph.STEPS_PER_EPOCH)]  # one evaluation, so it is the best
  result = export.evaluate_checkpoint(
    config_lib.stage_config(config, "prune", k=K), prune_dir, methods=["clean"], best=True, progress=False
  )
  assert result["clean"] == rows[1]["clean"] and result["num_examples"] == 64
  assert (result["k"], result["stage"]) == (K, "prune")


def test_initial_state_scores_for_each_score_init(pipeline):
  config, workdir, _ = pipeline
  pre, _, _ = ph.restore_model(branch(workdir, "pretrain"), with_scores=False)
  _, _, pruned_scores = ph.restore_model(branch(workdir, "prune"))
  shape = (32, 8, 8, 1)

  def scores_of(stage, source, score_init):
    state, _ = train.initial_state(
      config_lib.stage_config(config, stage, source=source, k=K, **{f"stages.{stage}.score_init": score_init}),
      stage,
      steps_per_epoch=2,
      batch_shape=shape,
    )
    return ph.flat(state.params), ph.flat(state.scores)

  params, scaled = scores_of("prune", branch(workdir, "pretrain"), "scaled")
  for name in ph.KERNEL_SHAPES:  # HYDRA's init, written out
    np.testing.assert_allclose(scaled[name], ph.scaled_scores(pre[name]), rtol=1e-6)
    np.testing.assert_array_equal(params[name], pre[name])
  _, kept = scores_of("prune", branch(workdir, "prune"), "source")  # continue from the source's scores
  for name in ph.KERNEL_SHAPES:
    np.testing.assert_array_equal(kept[name], pruned_scores[name])
  params, lwm = scores_of("finetune", branch(workdir, "pretrain"), "scaled")  # LWM: magnitude mask
  for name in ph.KERNEL_SHAPES:
    mask = ph.numpy_topk_mask(pre[name], K)
    np.testing.assert_array_equal(params[name], np.where(mask, pre[name], 0))
    np.testing.assert_allclose(lwm[name], ph.scaled_scores(pre[name]), rtol=1e-6)
  _, uniform = scores_of("prune", branch(workdir, "pretrain"), "uniform")
  for name, shape_ in ph.KERNEL_SHAPES.items():
    bound = 1 / np.sqrt(np.prod(shape_[:-1]))
    assert np.abs(uniform[name]).max() <= bound and np.abs(uniform[name]).max() > 0.8 * bound
  with pytest.raises(ValueError, match="score_init='source' but source .* has no scores"):
    scores_of("prune", branch(workdir, "pretrain"), "source")


def test_global_mask_scope_in_training_and_export(pipeline, tmp_path):
  config, workdir, _ = pipeline
  run_dir = str(tmp_path / "global")
  # One step (stop_after_steps ends the run before the epoch's evaluation: no eval program to compile).
  summary = train.run_stage(
    config_lib.stage_config(
      config,
      "prune",
      source=branch(workdir, "pretrain"),
      k=K,
      mask={"scope": "global", "min_layer_k": 0.0},
      stop_after_steps=1,
    ),
    run_dir,
  )
  assert summary["step"] == 1
  _, _, scores = ph.restore_model(run_dir)
  masks = ph.numpy_global_mask(scores, K)
  assert sum(m.sum() for m in masks.values()) == 312  # int(0.75 * 1248) of 1248 pruned over all layers
  assert summary["kept_fraction"] == 312 / 1248
  per_layer = {name: m.mean() for name, m in masks.items()}
  assert len(set(np.round(list(per_layer.values()), 6))) > 1  # global ranking: layers keep different fractions
  run = export.load_run(run_dir, config=config_lib.stage_config(config, "prune"))
  exported = ph.flat(run.variables["params"])
  for name, mask in masks.items():
    np.testing.assert_array_equal(exported[name] != 0, mask & (ph.flat(run.trained_params)[name] != 0), name)
  out = str(tmp_path / "global.npz")
  export.export_checkpoint(config_lib.stage_config(config, "prune"), run_dir, out)
  arrays = np.load(out)
  for name, mask in masks.items():
    np.testing.assert_array_equal(arrays[f"params/{name}"], np.where(mask, exported[name], 0))


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_adam_and_rmsprop_follow_torch_optim(name):
  torch = pytest.importorskip("torch")
  config = ph.tiny_config(
    **{
      "optimizer.name": name,
      "optimizer.schedule": "constant",
      "stages.pretrain.lr": 0.01,
      "optimizer.weight_decay": 0.1,
    }
  )
  labels = {"params": {"w": "train", "frozen": "freeze"}, "scores": None}
  tx = optim.make_optimizer(config, "pretrain", labels, steps_per_epoch=1)
  w0 = np.array([1.0, -2.0, 0.5], np.float32)
  trainable = {"params": {"w": jnp.asarray(w0), "frozen": jnp.ones(2)}, "scores": None}
  state = tx.init(trainable)
  weight = torch.nn.Parameter(torch.tensor(w0))
  if name == "adam":  # torch's weight_decay is L2 added to the gradient, as docs/differences.md states for hydra_jax
    reference = torch.optim.Adam([weight], lr=0.01, weight_decay=0.1)
  else:
    reference = torch.optim.RMSprop([weight], lr=0.01, alpha=0.99, eps=1e-8, momentum=0.9, weight_decay=0.1)
  rng = np.random.default_rng(0)
  for _ in range(5):
    grad = rng.normal(size=3).astype(np.float32)
    updates, state = tx.update(
      {"params": {"w": jnp.asarray(grad), "frozen": jnp.ones(2)}, "scores": None}, state, trainable
    )
    trainable = optax.apply_updates(trainable, updates)
    weight.grad = torch.tensor(grad)
    reference.step()
  np.testing.assert_allclose(trainable["params"]["w"], weight.detach().numpy(), rtol=1e-5, atol=1e-7)
  assert not np.allclose(trainable["params"]["w"], w0)
  np.testing.assert_array_equal(trainable["params"]["frozen"], np.ones(2))  # frozen leaves never move


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
  """A checkpoint as the reference's train.py saves it: {'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}
  with subnet layers (a `popup_scores` beside every conv / linear weight), for vgg_tiny; and the torch module."""
  torch = pytest.importorskip("torch")
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top  (needs torch)

  reference = tr.build_random("vgg_tiny", seed=3)
  state_dict = dict(reference.state_dict())
  generator = torch.Generator().manual_seed(4)
  scores = {
    key.removesuffix("weight") + "popup_scores": torch.randn(value.shape, generator=generator)
    for key, value in state_dict.items()
    if key.endswith(".weight") and value.ndim >= 2
  }
  path = str(tmp_path_factory.mktemp("reference") / "checkpoint.pth.tar")
  torch.save(
    {
      "epoch": 20,
      "arch": "vgg16_bn",
      "state_dict": {**state_dict, **scores},
      "best_prec1": 41.5,
      "optimizer": torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9).state_dict(),
    },
    path,
  )
  return path, reference, scores, tr


def reference_state(path, stage, score_init, k=0.3):
  config = ph.tiny_config(**{"model.name": "vgg_tiny", "data.name": "cifar10"})
  config = config_lib.stage_config(config, stage, source=path, k=k, **{f"stages.{stage}.score_init": score_init})
  return train.initial_state(config, stage, steps_per_epoch=1, batch_shape=(2, 32, 32, 3))[0]


@pytest.fixture(scope="module")
def reference_prune_state(reference_checkpoint):
  """The prune stage's initial state from the reference checkpoint, keeping its scores."""
  return reference_state(reference_checkpoint[0], "prune", "source")


def test_a_reference_pth_tar_source_runs_the_reference_subnet(reference_checkpoint, reference_prune_state):
  _, reference, scores, tr = reference_checkpoint
  import torch  # pylint: disable=g-import-not-at-top

  state = reference_prune_state
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  # The reference's subnet forward: every weight times GetSubnet(popup_scores, k), BN in eval mode.
  masked = tr.build("vgg_tiny", 10)
  masked.load_state_dict(reference.state_dict())
  with torch.no_grad():
    for key, score in scores.items():
      module = masked.get_submodule(key.removesuffix(".popup_scores"))
      module.weight.mul_(tr.get_subnet(score, 0.3))
  expected = tr.logits(masked.eval(), x)
  model = models.get_model("vgg_tiny", 10)
  logits = jax.jit(
    lambda params, scores, batch_stats: model.apply(
      {"params": masking.apply_masks(params, scores, 0.3), "batch_stats": batch_stats}, x, train=False
    )
  )(state.params, state.scores, state.batch_stats)
  assert np.std(expected) > 1e-3
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_lwm_from_a_reference_pth_tar_keeps_the_layerwise_largest_weights(reference_checkpoint, reference_prune_state):
  path, _, _, _ = reference_checkpoint
  raw = ph.flat(reference_prune_state.params)  # the checkpoint's weights (their forward is checked above)
  lwm = ph.flat(reference_state(path, "finetune", "scaled").params)
  for name, weight in raw.items():
    if name.endswith("kernel"):
      np.testing.assert_array_equal(lwm[name], np.where(ph.numpy_topk_mask(weight, 0.3), weight, 0), name)
