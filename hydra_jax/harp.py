"""HARP's learned per-layer pruning rates (Zhao & Wressnegger, "Holistic Adversarially Robust Pruning", ICLR 2023).

HYDRA learns which weights a layer keeps at a fixed rate; HARP also learns how many. Each prunable layer l has a
rate parameter `k_score_l` (a scalar); its kept fraction is

  k_l = sigmoid(k_score_l) * (1 - k_min) + k_min,   k_min = alpha * k          (HARP's `rate_act_func`)

and its mask keeps the top k_l fraction of |s_l| (`masking.layer_masks` with a traced per-layer k, one program for
every value). The rate's gradient is straight through the top-k, `dL/dk_l = sum(dL/dmask_l)` (HARP's
`GetSubnet.backward`, in `masking.topk_masks`). Rates and scores train by the same robust loss plus HARP's hardware
loss, which pulls the network's kept fraction down to the target k with a weight gamma growing per epoch:

  L = L_robust + gamma_e * max(sum_l n_l k_l / sum_l n_l / k - 1, 0),   gamma_e = (e + 1) * gamma   (`utils/hw.py`)

and gamma stays at its value once an epoch ends with the hardware loss at 0 (to 4 decimals; HARP's `frozen_gamma`).
After pruning, the learned rates are fixed and rounded to kept counts that meet the target exactly
(`exact_counts`: the overall count is round(k N)), which finetune uses.

  rates = harp.init_rates(params, scores, k=0.01, alpha=0.1, strategy='erk')   # a scalar per scored kernel
  masked = masking.apply_masks(params, scores, harp.layer_rates(rates, 0.01, 0.1))
  loss = robust_loss + harp.gamma(step, steps_per_epoch, 1.0, frozen) * harp.hw_loss(rates, scores, 0.01, 0.1)
  fixed_k = harp.fixed_k(rates, scores, k=0.01, alpha=0.1)   # {'layer/kernel': k_l}, overall count exact
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import PyTree
from hydra_jax import baselines
from hydra_jax import masking

STRATEGIES = ("uniform", "erk")  # initial per-layer rates (HARP's configs/strategies.json: '_uni', '_erk')
_CLIP = 1e-2  # rate_init_func's clip_dec: the initial logit's argument stays in [-1 + 1e-2, 1 - 1e-2]


def rate_act(k_score: jax.Array, k_min: float) -> jax.Array:
  """HARP's `rate_act_func`: the kept fraction sigmoid(k_score) * (1 - k_min) + k_min, in (k_min, 1)."""
  return jax.nn.sigmoid(k_score) * (1 - k_min) + k_min


def rate_init(k: float, k_min: float) -> float:
  """HARP's `rate_init_func`, the inverse of `rate_act`: logit((k - k_min) / (1 - k_min)), its argument clipped
  to [-0.99, 0.99] (so a dense layer, k = 1, starts at logit(0.99) = 4.595).

  Raises:
    ValueError: k <= k_min (the logit would be undefined; HARP gives NaN).
  """
  if not k > k_min:
    raise ValueError(f"initial rate k={k!r} must exceed k_min={k_min!r} (alpha * the target k)")
  inverse = min(max((k - k_min) / (1 - k_min), -1 + _CLIP), 1 - _CLIP)
  return math.log(inverse / (1 - inverse))


def _scored(scores: PyTree) -> list[tuple[str, Any]]:
  """(path name, score array) of every scored leaf, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(scores, is_leaf=lambda x: x is None)[0]
  return [(masking.path_name(p), s) for p, s in leaves if s is not None]


def initial_fractions(params: PyTree, scores: PyTree, k: float, strategy: str) -> dict[str, float]:
  """{'layer/kernel': k_l} of a strategy: 'uniform' (k everywhere) or 'erk' (Erdos-Renyi-Kernel, k overall)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown rate strategy '{strategy}'; valid: {', '.join(STRATEGIES)}")
  names = [name for name, _ in _scored(scores)]
  if strategy == "uniform":
    return {name: k for name in names}
  densities = baselines.erk_densities(params, k)
  return {name: densities[name] for name in names}


def init_rates(params: PyTree, scores: PyTree, *, k: float, alpha: float, strategy: str = "uniform") -> PyTree:
  """The rate tree: a float32 scalar k_score at each scored leaf of `scores` (None elsewhere), `rate_init` of the
  strategy's fraction, so that `rate_act` gives it back (up to the clip).

  Args:
    params: the 'params' collection (ERK reads the kernels' shapes).
    scores: the scores tree (weight granularity).
    k: the target fraction kept overall; alpha: k_min = alpha * k.
    strategy: a name in STRATEGIES.
  """
  fractions = initial_fractions(params, scores, k, strategy)
  k_min = alpha * k
  return jax.tree_util.tree_map_with_path(
    lambda p, s: None if s is None else jnp.float32(rate_init(fractions[masking.path_name(p)], k_min)),
    scores,
    is_leaf=lambda x: x is None,
  )


def layer_rates(rates: PyTree, k: float, alpha: float) -> PyTree:
  """The per-layer kept fractions `rate_act(k_score, alpha * k)` (a tree mirroring `rates`), for `apply_masks`."""
  return jax.tree.map(lambda r: rate_act(r, alpha * k), rates)


def kept_fraction(rates: PyTree, scores: PyTree, k: float, alpha: float) -> jax.Array:
  """The network's expected kept fraction sum_l n_l k_l / sum_l n_l (n_l: entries of layer l's scores)."""
  fractions = dict(_scored(layer_rates(rates, k, alpha)))
  sizes = {name: np.size(s) for name, s in _scored(scores)}
  return sum(sizes[name] * fractions[name] for name in sizes) / sum(sizes.values())


def hw_loss(rates: PyTree, scores: PyTree, k: float, alpha: float) -> jax.Array:
  """HARP's hardware loss (`utils/hw.py` `hw_loss`): max(kept_fraction / k - 1, 0), 0 at or below the target."""
  return jnp.maximum(kept_fraction(rates, scores, k, alpha) / k - 1.0, 0.0)


def gamma(step: jax.Array, steps_per_epoch: int, gamma0: float, frozen: jax.Array, dynamic: bool = True) -> jax.Array:
  """The hardware loss's weight at `step`: (epoch + 1) * gamma0 (epoch = step // steps_per_epoch), or `frozen`
  once it is positive (`freeze_gamma`); gamma0 throughout when not `dynamic` (HARP's `--gamma_dynamic`)."""
  if not dynamic:
    return jnp.float32(gamma0)
  growing = (step // steps_per_epoch + 1).astype(jnp.float32) * gamma0
  return jnp.where(frozen > 0, frozen, growing)


def freeze_gamma(frozen: jax.Array, loss: jax.Array, current_gamma: jax.Array, epoch_end: jax.Array) -> jax.Array:
  """HARP's frozen gamma after a step: the gamma in use, from the first epoch that ends with the hardware loss
  rounding to 0 at 4 decimals (`np.round(loss_hw, 4) == 0` in HARP's train.py); 0 until then."""
  reached = epoch_end & (jnp.round(loss, 4) == 0)
  return jnp.where((frozen <= 0) & reached, current_gamma, frozen).astype(jnp.float32)


def exact_counts(fractions: dict[str, float], sizes: dict[str, int], k: float) -> dict[str, int]:
  """Kept counts c_l, one per layer, proportional to fractions[l] * sizes[l] with sum_l c_l = round(k N) exactly.

  The learned rates meet HARP's target only up to its soft loss; the finished network must meet it exactly. The
  fractions are scaled by one factor (each count clipped to [1, n_l]) so that the real counts sum to round(k N),
  then floored, and the remaining units go to the largest fractional parts (ties: tree order).

  Raises:
    ValueError: round(k N) is below the number of layers (every layer keeps one entry).
  """
  names = list(sizes)
  n = np.asarray([sizes[name] for name in names], np.float64)
  want = np.asarray([fractions[name] for name in names], np.float64) * n
  target = int(math.floor(k * n.sum() + 0.5))
  if target < len(names):
    raise ValueError(f"k={k!r} keeps {target} of {int(n.sum())} weights: fewer than one per layer ({len(names)})")
  alloc = lambda scale: np.clip(scale * want, 1.0, n)
  lo, hi = 0.0, float(n.sum() / max(want.min(), 1e-30))  # alloc(lo) sums to L <= target, alloc(hi) to N >= target
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if alloc(mid).sum() <= target else (lo, mid)
  real = alloc(lo)
  counts = np.floor(real).astype(np.int64)
  order = np.argsort(-(real - counts), kind="stable")
  while counts.sum() < target:
    for i in order:
      if counts.sum() < target and counts[i] < n[i]:
        counts[i] += 1
  return {name: int(c) for name, c in zip(names, counts)}


def k_for_count(count: int, size: int) -> float:
  """A fraction k with `size - masking.num_pruned(size, k) == count` robustly: (count - 0.5) / size."""
  return (count - 0.5) / size


def fixed_k(rates: PyTree, scores: PyTree, *, k: float, alpha: float) -> dict[str, float]:
  """The learned rates fixed for finetune: {'layer/kernel': k_l} whose kept counts are `exact_counts` (the overall
  count is exactly round(k N)); a plain dict of floats (host values)."""
  fractions = {name: float(v) for name, v in _scored(layer_rates(rates, k, alpha))}
  sizes = {name: int(np.size(s)) for name, s in _scored(scores)}
  counts = exact_counts(fractions, sizes, k)
  return {name: k_for_count(counts[name], sizes[name]) for name in sizes}


def rate_report(rates: PyTree, scores: PyTree, *, k: float, alpha: float) -> dict[str, Any]:
  """The learned per-layer rates as JSON-able data: per layer its entries, learned k_l and fixed kept count."""
  fractions = {name: float(v) for name, v in _scored(layer_rates(rates, k, alpha))}
  sizes = {name: int(np.size(s)) for name, s in _scored(scores)}
  counts = exact_counts(fractions, sizes, k)
  layers = [{"name": name, "size": sizes[name], "learned_k": fractions[name], "kept": counts[name]} for name in sizes]
  learned = sum(sizes[n] * fractions[n] for n in sizes) / sum(sizes.values())
  return {"k": k, "alpha": alpha, "learned_kept_fraction": learned, "kept": sum(counts.values()), "layers": layers}


def plot_rates(report: dict[str, Any]) -> bytes:
  """A bar plot (PNG bytes) of the per-layer kept fractions of a `rate_report`: learned and fixed (kept / size)."""
  import io  # pylint: disable=g-import-not-at-top

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  layers = report["layers"]
  x = np.arange(len(layers))
  fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(layers) + 1), 3.2))
  ax.bar(x - 0.2, [layer["learned_k"] for layer in layers], 0.4, label="learned k_l")
  ax.bar(x + 0.2, [layer["kept"] / layer["size"] for layer in layers], 0.4, label="fixed (exact total)")
  ax.axhline(report["k"], color="k", lw=0.8, ls="--", label=f"target k={report['k']:g}")
  ax.set_xticks(x, [layer["name"].removesuffix("/kernel") for layer in layers], rotation=90, fontsize=7)
  ax.set_ylabel("fraction kept")
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  return png.getvalue()
