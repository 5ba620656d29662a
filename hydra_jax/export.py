"""Evaluate and export a finished run: credible robust accuracy, dense / PyTorch / sparse weight files.

  model = export.load_run(config, 'runs/k0.01/finetune')           # latest checkpoint ('best=True': best)
  export.evaluate_checkpoint(config, 'runs/k0.01/finetune', methods=['pgd_linf', 'apgd_ce', 'apgd_dlr'])
  export.export_checkpoint(config, 'runs/k0.01/finetune', 'wrn.pth')   # reference-layout PyTorch state dict

Exported weights are dense arrays with the pruned entries exactly 0 (`masking.export_dense`). Masking does not
make inference faster by itself: a dense kernel full of zeros costs what it did. `sparse_size` reports what a
compressed (BCOO) copy of the kept weights would occupy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import sparse

from hydra_jax import checkpoints
from hydra_jax import convert
from hydra_jax import data
from hydra_jax import evaluate
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import train

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RunModel:
  """A trained model read back from a run directory.

  Attributes:
    variables: {'params': weights the model runs with (pruned entries exactly 0), 'batch_stats': ...}.
    trained_params: the params as stored (in a prune run the pruned weights are still there).
    scores: the scores tree, or None for a dense (pretrain) run.
    k: fraction kept (1.0 for dense runs).
    meta: the checkpoint's metadata (config, stage, metrics, versions).
  """

  variables: dict[str, PyTree]
  trained_params: PyTree
  scores: PyTree | None
  k: float
  meta: dict[str, Any]


def load_run(config: ml_collections.ConfigDict, workdir: str, *, best: bool = False) -> RunModel:
  """The latest (or best) checkpoint of the run in `workdir`, built for `config.model` / `config.data`."""
  directory = os.path.join(workdir, "best") if best else workdir
  _, meta = checkpoints.read_meta(directory)
  params, batch_stats, scores = train.load_source(train.stage_config(config, config.stage, source=directory))
  weights = train.exported_params(params, scores, meta["k"], meta["config"]["mask"])
  variables = {"params": weights, "batch_stats": batch_stats} if batch_stats else {"params": weights}
  return RunModel(variables, params, scores, meta["k"], meta)


def evaluation_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Attack settings of every evaluation method at the run's threat model (config.eval.eps for its norm)."""
  l2_eps = config.eval.eps if config.eval.norm == "l2" else 0.5
  linf_eps = config.eval.eps if config.eval.norm == "linf" else 8 / 255
  return evaluate.default_config(linf_eps=linf_eps, l2_eps=l2_eps)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, methods: Sequence[str],
                        best: bool = False, progress: bool = True) -> dict[str, float]:
  """Clean accuracy, each attack's robust accuracy and their per-example worst case ('robust') on the eval split.

  Methods: names registered in `hydra_jax.evaluate` (pgd_linf, pgd_l2, apgd_ce, apgd_dlr, apgd_t); 'clean'
  is always reported and may be listed.
  """
  run = load_run(config, workdir, best=best)
  apply_fn = models.make_apply_fn(train.build_model(config))
  batches = data.eval_batches(config.data.name, config.data.eval_batch_size, data_dir=config.data.data_dir or None,
                              data_format=config.data.format, image_size=config.data.image_size or None)
  attack_names = [name for name in methods if name != "clean"]
  results = evaluate.evaluate(apply_fn, run.variables, data.iterate(batches, range(train.eval_steps(config, batches))),
                              key=jax.random.PRNGKey(config.seed), methods=attack_names,
                              config=evaluation_config(config), progress=progress)
  return {**results, "k": run.k, "stage": run.meta.get("stage")}


def sparse_size(params: PyTree) -> dict[str, int]:
  """Bytes of the prunable kernels stored dense vs as BCOO (int32 indices + float values of nonzeros)."""
  kernels = [jnp.asarray(w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0] if masking.is_prunable(p, w)]
  bcoo = [sparse.BCOO.fromdense(w) for w in kernels]
  return {"dense_bytes": sum(w.nbytes for w in kernels),
          "bcoo_bytes": sum(m.data.nbytes + m.indices.nbytes for m in bcoo)}


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str, out: str, *, dense: bool = True) -> str:
  """Writes the run's model to `out` and returns a one-line description.

  `.npz`: flattened '/'-joined variable paths -> arrays ('scores/...' too when dense=False). `.pth`/`.pt`:
  a reference-layout PyTorch state dict (needs torch) that loads with strict=True into the reference model
  (dense=True: masked weights and no scores, for the reference's `dense` layer type; dense=False: raw
  weights plus `popup_scores` for its `subnet` layers).
  """
  if not out.endswith((".pth", ".pt", ".npz")):
    raise ValueError(f"export file '{out}' must end in .npz, .pth or .pt")
  run = load_run(config, workdir)
  variables, scores = run.variables, None
  if not dense and run.scores is not None:
    variables, scores = {**run.variables, "params": run.trained_params}, run.scores
  if out.endswith((".pth", ".pt")):
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
    state_dict = convert.to_torch_state_dict(variables, scores, model_name=config.model.name,
                                             input_shape=train.image_shape(config), as_torch=True)
    torch.save(state_dict, out)
  else:
    tree = {**variables, **({"scores": scores} if scores is not None else {})}
    flat = {masking.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    np.savez(out, **flat)
  size = sparse_size(run.variables["params"])
  report = masking.sparsity_report(run.variables["params"])
  return (f"wrote {out}: {report.kept:,} of {report.total:,} prunable weights kept "
          f"({100 * report.kept / report.total:.2f}%); kernels {size['dense_bytes']:,} bytes dense, "
          f"{size['bcoo_bytes']:,} bytes as BCOO")
