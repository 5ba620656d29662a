"""Tests of hydra_jax.export on a checkpoint written here with known weights and scores: load_run, .npz and
reference-layout .pth files (dense and subnet), the BCOO size against a hand count, and the errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import checkpoints
from hydra_jax import export
from hydra_jax import models
from tests import pipeline_helpers as ph

K = 0.25


def write_run(workdir, *, with_scores=True, stage="prune", k=K):
  """A run directory holding one checkpoint of cnn_tiny with random weights and scores, and the meta that the
  train loop records (model, classes, stage, k, the config's mask settings). Returns (params, scores) as flat
  numpy dicts."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(
    lambda: models.get_model(ph.MODEL, 10).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  )["params"]
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  scores = jax.tree_util.tree_map_with_path(
    lambda p, s: jnp.asarray(rng.normal(size=s.shape), jnp.float32) if p[-1].key == "kernel" else None, shapes
  )
  config = ph.tiny_config(stage=stage, k=k)
  meta = {
    "model": ph.MODEL,
    "num_classes": 10,
    "stage": stage,
    "k": k if with_scores else 1.0,
    "has_scores": with_scores,
    "metrics": None,
    "versions": checkpoints.versions(),
    "config": json.loads(config.to_json_best_effort()),
  }
  ckpt = checkpoints.Checkpoints(workdir, async_save=False)
  ckpt.save(
    3,
    {"model": {"params": params, "batch_stats": {}, "scores": scores if with_scores else None}},
    meta=meta,
    sparsity="{}",
  )
  ckpt.close()
  return ph.flat(params), ph.flat(scores) if with_scores else None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  params, scores = write_run(workdir)
  return workdir, params, scores


@pytest.fixture(scope="module")
def loaded(run_dir):
  """export.load_run of the run (about a second per call on CPU: the masks are computed op by op)."""
  return export.load_run(run_dir[0], config=ph.tiny_config(stage="prune"))


def masked(params, scores, k=K):
  return {
    n: np.where(ph.numpy_topk_mask(scores[n], k), w, np.float32(0)) if n in scores else w for n, w in params.items()
  }


def test_load_run_gives_masked_weights_raw_weights_scores_and_meta(run_dir, loaded):
  _, params, scores = run_dir
  run = loaded
  expected = masked(params, scores)
  for name, weight in ph.flat(run.variables["params"]).items():
    np.testing.assert_array_equal(weight, expected[name], err_msg=name)
  assert set(ph.flat(run.variables["params"])) == set(params) and "batch_stats" not in run.variables
  for name, weight in ph.flat(run.trained_params).items():
    np.testing.assert_array_equal(weight, params[name])  # as stored: pruned weights still nonzero
  assert ph.flat(run.scores).keys() == scores.keys()
  for name, score in ph.flat(run.scores).items():
    np.testing.assert_array_equal(score, scores[name])
  assert run.k == K and run.meta["stage"] == "prune"


def test_npz_export_dense_and_with_scores(run_dir, tmp_path):
  workdir, params, scores = run_dir
  config = ph.tiny_config(stage="prune")
  expected = masked(params, scores)
  dense_file, subnet_file = str(tmp_path / "dense.npz"), str(tmp_path / "subnet.npz")
  message = export.export_checkpoint(config, workdir, dense_file)
  assert message == (
    f"wrote {dense_file}: 312 of 1,248 prunable weights kept (25.00%); kernels 4,992 bytes dense, 4,896 bytes as BCOO"
  )
  arrays = np.load(dense_file)
  assert set(arrays.files) == {f"params/{n}" for n in params}
  for name, weight in expected.items():
    np.testing.assert_array_equal(arrays[f"params/{name}"], weight)
    if name in scores:
      pruned = arrays[f"params/{name}"][~ph.numpy_topk_mask(scores[name], K)]
      assert np.all(pruned == 0) and not np.any(np.signbit(pruned))  # exactly +0.0
  export.export_checkpoint(config, workdir, subnet_file, dense=False)
  arrays = np.load(subnet_file)
  assert set(arrays.files) == {f"params/{n}" for n in params} | {f"scores/{n}" for n in scores}
  for name in params:
    np.testing.assert_array_equal(arrays[f"params/{name}"], params[name])  # raw weights
  for name in scores:
    np.testing.assert_array_equal(arrays[f"scores/{name}"], scores[name])


def reference_cnn(tr):
  """The reference basic.py CNN with cnn_tiny's layers on 8x8x1 digits (keys 0.weight ... 7.bias)."""
  return tr.sequential_cnn(1, [(4, 4, 2, 1), (8, 4, 2, 1)], 2, [16], 10).eval()


def test_pth_export_loads_strictly_into_the_reference_model(run_dir, tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top  (needs torch)

  workdir, params, scores = run_dir
  config = ph.tiny_config(stage="prune")
  x = np.random.default_rng(1).uniform(size=(5, 8, 8, 1)).astype(np.float32)
  variables = {
    "params": {
      layer: {
        leaf: jnp.asarray(w)
        for leaf, w in (("kernel", masked(params, scores)[f"{layer}/kernel"]), ("bias", params[f"{layer}/bias"]))
      }
      for layer in ("0", "2", "5", "7")
    }
  }
  expected = models.get_model(ph.MODEL, 10).apply(variables, x, train=False)

  dense_file = str(tmp_path / "dense.pth")
  message = export.export_checkpoint(config, workdir, dense_file)
  assert message.endswith(
    "\nthe state dict model cnn_tiny has no class in inspire-group/hydra (its keys follow the zoo's module names)"
  )
  net = reference_cnn(tr)
  net.load_state_dict(torch.load(dense_file), strict=True)  # the reference's dense layer type
  np.testing.assert_allclose(tr.logits(net, x), expected, rtol=1e-5, atol=1e-5)
  for name, layer in (("0/kernel", net[0]), ("2/kernel", net[2]), ("5/kernel", net[5]), ("7/kernel", net[7])):
    assert int((layer.weight == 0).sum()) == scores[name].size - ph.kept_count(scores[name].size, K)

  subnet_file = str(tmp_path / "subnet.pth")
  export.export_checkpoint(config, workdir, subnet_file, dense=False)
  state_dict = torch.load(subnet_file)
  popup = {key: value for key, value in state_dict.items() if key.endswith("popup_scores")}
  assert sorted(popup) == ["0.popup_scores", "2.popup_scores", "5.popup_scores", "7.popup_scores"]
  net = reference_cnn(tr)
  net.load_state_dict({key: value for key, value in state_dict.items() if key not in popup}, strict=True)
  with torch.no_grad():  # the reference's subnet layer: weight * GetSubnet(popup_scores, k)
    for index in (0, 2, 5, 7):
      assert int((net[index].weight == 0).sum()) == 0  # raw weights in the subnet file
      net[index].weight.mul_(tr.get_subnet(popup[f"{index}.popup_scores"], K))
  np.testing.assert_allclose(tr.logits(net, x), expected, rtol=1e-5, atol=1e-5)


def test_sparse_size_counts_values_and_int32_indices_of_the_kept_weights(loaded):
  run = loaded
  # kept 16 of 64, 128 of 512, 128 of 512, 40 of 160; each costs 4 value bytes + 4 bytes per index dimension
  assert export.sparse_size(run.variables["params"]) == {
    "dense_bytes": 4 * (64 + 512 + 512 + 160),
    "bcoo_bytes": 16 * 20 + 128 * 20 + 128 * 12 + 40 * 12,
  }
  dense = export.sparse_size(run.trained_params)  # nothing pruned: every entry stored, with its indices
  assert dense == {"dense_bytes": 4992, "bcoo_bytes": 64 * 20 + 512 * 20 + 512 * 12 + 160 * 12}
  with_zero_bias = {**run.variables["params"], "7": {**run.variables["params"]["7"], "bias": jnp.zeros(10)}}
  assert export.sparse_size(with_zero_bias) == export.sparse_size(run.variables["params"])  # kernels only


def test_a_dense_run_exports_its_weights_unchanged(tmp_path):
  workdir = str(tmp_path / "pretrain")
  params, _ = write_run(workdir, with_scores=False, stage="pretrain")
  config = ph.tiny_config(stage="pretrain")
  run = export.load_run(workdir, config=config)
  assert run.scores is None and run.k == 1.0
  out = str(tmp_path / "dense.npz")
  assert "1,248 of 1,248 prunable weights kept (100.00%)" in export.export_checkpoint(config, workdir, out, dense=False)
  arrays = np.load(out)
  assert set(arrays.files) == {f"params/{n}" for n in params}  # no scores to write
  for name, weight in params.items():
    np.testing.assert_array_equal(arrays[f"params/{name}"], weight)


def test_export_errors_name_the_problem(run_dir, tmp_path):
  workdir, _, _ = run_dir
  with pytest.raises(ValueError, match="export file '.*model.onnx' must end in .npz, .pth or .pt"):
    export.export_checkpoint(ph.tiny_config(stage="prune"), workdir, str(tmp_path / "model.onnx"))
  with pytest.raises(checkpoints.CheckpointError, match="holds model 'cnn_tiny' with 10 classes.*'vgg_tiny'"):
    export.load_run(workdir, config=ph.tiny_config(stage="prune", **{"model.name": "vgg_tiny"}))
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint directory"):
    export.load_run(str(tmp_path / "nowhere"), config=ph.tiny_config(stage="prune"))
  assert not list(tmp_path.glob("model.*"))  # nothing written on error
