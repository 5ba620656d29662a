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

At channel granularity (structured HYDRA) each channel group learns a rate (kept fraction of its channels, at its
`ChannelGroup.name`), and the hardware loss counts FLOPs (HARP's `hw_flops_loss`: `FlopModel`, `channel_budget`)
against structured HYDRA's FLOPs at k; the fixed counts stay within those FLOPs (`flop_counts`).

  budget = harp.channel_budget(wiring, params)             # wiring: channels.trace_wiring of the model
  rates = harp.init_rates(params, scores, k=0.5, alpha=0.1, groups=wiring.groups)
  loss = robust_loss + gamma * harp.hw_loss(rates, scores, 0.5, 0.1, budget)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import PyTree
from hydra_jax import baselines
from hydra_jax import masking

# Initial per-layer rates (HARP's configs/strategies.json): '_uni', '_erk' (weights) and 'original' (channels: every
# layer dense, rate_init(1) = logit(0.99)).
STRATEGIES = ("uniform", "erk", "dense")
CHANNEL_STRATEGIES = ("uniform", "dense")
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


def initial_fractions(
  params: PyTree, scores: PyTree, k: float, strategy: str, groups: masking.ChannelGroups | None = None
) -> dict[str, float]:
  """{'layer/kernel': k_l} of a strategy: 'uniform' (k everywhere), 'erk' (Erdos-Renyi-Kernel, k overall; weights
  only) or 'dense' (1 everywhere). With channel `groups`: one entry per group, at its `ChannelGroup.name`."""
  valid = STRATEGIES if groups is None else CHANNEL_STRATEGIES
  if strategy not in valid:
    raise ValueError(f"unknown rate strategy '{strategy}' at this granularity; valid: {', '.join(valid)}")
  names = [name for name, _ in _scored(scores)] if groups is None else group_names(groups)
  if strategy != "erk":
    return {name: k if strategy == "uniform" else 1.0 for name in names}
  densities = baselines.erk_densities(params, k)
  return {name: densities[name] for name in names}


def init_rates(
  params: PyTree,
  scores: PyTree,
  *,
  k: float,
  alpha: float,
  strategy: str = "uniform",
  groups: masking.ChannelGroups | None = None,
) -> PyTree:
  """The rate tree: a float32 scalar k_score at each scored leaf of `scores` (None elsewhere), `rate_init` of the
  strategy's fraction, so that `rate_act` gives it back (up to the clip). With channel `groups` one rate per group,
  at the group's `ChannelGroup.name` (its first kernel; None at the other kernels of the group).

  Args:
    params: the 'params' collection (ERK reads the kernels' shapes).
    scores: the scores tree (weight or channel granularity).
    k: the target fraction kept overall; alpha: k_min = alpha * k.
    strategy: a name in STRATEGIES (CHANNEL_STRATEGIES with groups).
    groups: None (weight granularity) or the model's channel groups.
  """
  fractions = initial_fractions(params, scores, k, strategy, groups)
  k_min = alpha * k
  return jax.tree_util.tree_map_with_path(
    lambda p, s: (
      jnp.float32(rate_init(fractions[masking.path_name(p)], k_min))
      if s is not None and masking.path_name(p) in fractions
      else None
    ),
    scores,
    is_leaf=lambda x: x is None,
  )


def group_names(groups: masking.ChannelGroups) -> list[str]:
  """The groups' `ChannelGroup.name`s (where their rates live), in group order.

  Raises:
    ValueError: two groups share their first kernel (no zoo model does), so their rates could not be told apart.
  """
  names = [group.name for group in groups]
  if len(set(names)) != len(names):
    shared = sorted({name for name in names if names.count(name) > 1})
    raise ValueError(f"channel groups share their first kernel {shared}: no per-group rate can be kept there")
  return names


def layer_rates(rates: PyTree, k: float, alpha: float) -> PyTree:
  """The per-layer kept fractions `rate_act(k_score, alpha * k)` (a tree mirroring `rates`), for `apply_masks`."""
  return jax.tree.map(lambda r: rate_act(r, alpha * k), rates)


@dataclasses.dataclass(frozen=True, eq=False)
class FlopModel:
  """HARP's FLOP count of a network whose channel groups keep fractions f_g (`utils/hw.py` `count_flops_conv` /
  `count_flops_dense`, bias and activation counted): a conv / dense layer l with P_l output positions per example,
  R_l kernel taps per input channel and c_in, c_out kept input and output channels costs

    F_l = P_l c_out (2 R_l c_in - 1) + P_l c_out + P_l c_out = P_l c_out (2 R_l c_in + 1),

  with c = fixed + sum_g n_lg f_g on each axis (n_lg: the axis's channels in group g; fixed: those no group prunes,
  e.g. the image's channels, the classes, a depthwise kernel's one input per group). HARP's chain of layers is a
  special case; here the channels of each axis are read from the traced wiring, so residual groups, depthwise
  convs, concatenations and flattened dense inputs count exactly.

  Attributes:
    layers: the kernels' paths; positions, taps, in_fixed, out_fixed: (L,) per layer; in_groups, out_groups:
      (L, G) channels of each group on the layer's input / output axis.
  """

  layers: tuple[str, ...]
  positions: np.ndarray
  taps: np.ndarray
  in_fixed: np.ndarray
  out_fixed: np.ndarray
  in_groups: np.ndarray
  out_groups: np.ndarray

  def flops(self, fractions: Any) -> Any:
    """Total FLOPs per example at per-group kept fractions (G,): float64 numpy for host values, else jnp (traced)."""
    xp = np if isinstance(fractions, (np.ndarray, list, tuple)) else jnp
    fractions = xp.asarray(fractions, np.float64 if xp is np else jnp.float32)
    c_in = self.in_fixed + self.in_groups @ fractions
    c_out = self.out_fixed + self.out_groups @ fractions
    return xp.sum(self.positions * c_out * (2 * self.taps * c_in + 1))

  @property
  def total(self) -> float:
    """FLOPs per example of the unpruned network."""
    return float(self.flops(np.ones(self.in_groups.shape[1])))


def flop_model(wiring: Any, params: PyTree) -> FlopModel:
  """The `FlopModel` of every conv / dense kernel of a traced `channels.Wiring`, its groups in `wiring.groups` order.

  Args:
    wiring: `channels.trace_wiring` of the model (its `positions` and each kernel's input / output labels).
    params: the 'params' collection (or its shapes): the kernels' shapes.
  """
  shapes = {masking.path_name(p): tuple(w.shape) for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}
  group_of = {}  # unit (root label) -> its group's index
  for g, group in enumerate(wiring.groups):
    name, index = group.members[0]
    labels = wiring.axes["params/" + name][-1][1]
    group_of.update({wiring.root[labels[channel]]: g for channel in index})

  def count(labels):  # (channels no group prunes, (G,) channels of each group)
    per_group = np.zeros(len(wiring.groups))
    for label in labels:
      if (g := group_of.get(wiring.root[label])) is not None:
        per_group[g] += 1
    return len(labels) - per_group.sum(), per_group

  rows = []
  for path, positions in wiring.positions.items():
    shape, axes = shapes[path.removeprefix("params/")], dict(wiring.axes[path])
    out_fixed, out_groups = count(axes[len(shape) - 1])
    in_labels = axes.get(len(shape) - 2)
    in_fixed, in_groups = count(in_labels) if in_labels is not None else (shape[-2], np.zeros(len(wiring.groups)))
    rows.append(
      (path.removeprefix("params/"), positions, math.prod(shape[:-2]), in_fixed, out_fixed, in_groups, out_groups)
    )
  layers, positions, taps, in_fixed, out_fixed, in_groups, out_groups = zip(*rows)
  as_f64 = lambda values: np.asarray(values, np.float64)
  return FlopModel(
    tuple(layers),
    as_f64(positions),
    as_f64(taps),
    as_f64(in_fixed),
    as_f64(out_fixed),
    as_f64(in_groups),
    as_f64(out_groups),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class Budget:
  """What HARP's hardware loss counts: the kept weights (weight granularity, `utils/hw.py` `hw_loss`) or, with a
  `FlopModel`, the FLOPs of the kept channels (channel granularity, `hw_flops_loss`).

  Attributes:
    names: the rates' names in order (kernels, or the channel groups' `ChannelGroup.name`).
    sizes: (R,) entries of each rate's layer: weights, or channels (units) of the group.
    flops: None (count weights) or the network's `FlopModel` (its groups in `names` order).
  """

  names: tuple[str, ...]
  sizes: np.ndarray
  flops: FlopModel | None = None

  def fraction(self, fractions: Any) -> Any:
    """The network's kept fraction at per-rate fractions (R,): sum_l n_l k_l / sum_l n_l of the weights, or of the
    FLOPs F(k) / F(1) (HARP's `current_rate`)."""
    if self.flops is None:
      return jnp.sum(self.sizes * jnp.asarray(fractions)) / self.sizes.sum()
    return self.flops.flops(fractions) / self.flops.total

  def target(self, k: float) -> float:
    """The kept fraction the hardware loss aims at: k of the weights, or the FLOPs fraction of structured HYDRA at k
    (every group keeping `ChannelGroup.kept(k)` of its channels)."""
    if self.flops is None:
      return k
    kept = np.asarray([n - masking.num_pruned(int(n), k) for n in self.sizes], np.float64)
    return float(self.flops.flops(kept / self.sizes)) / self.flops.total

  def counts(self, fractions: dict[str, float], k: float) -> dict[str, int]:
    """Kept entries per rate meeting the target exactly: `exact_counts` (weights) or `flop_counts` (FLOPs)."""
    sizes = dict(zip(self.names, (int(n) for n in self.sizes)))
    return exact_counts(fractions, sizes, k) if self.flops is None else flop_counts(self, fractions, k)


def weight_budget(scores: PyTree) -> Budget:
  """The `Budget` of weight granularity: one rate per scored kernel of `scores`."""
  scored = _scored(scores)
  return Budget(tuple(name for name, _ in scored), np.asarray([np.size(s) for _, s in scored], np.float64))


def channel_budget(wiring: Any, params: PyTree) -> Budget:
  """The `Budget` of channel granularity: one rate per group of `wiring.groups`, HARP's FLOP count (`flop_model`)."""
  sizes = np.asarray([group.size for group in wiring.groups], np.float64)
  return Budget(tuple(group_names(wiring.groups)), sizes, flop_model(wiring, params))


def _fraction_vector(rates: PyTree, budget: Budget, k: float, alpha: float) -> jax.Array:
  """(R,) the learned kept fractions `rate_act`, in the budget's order."""
  fractions = dict(_scored(layer_rates(rates, k, alpha)))
  return jnp.stack([fractions[name] for name in budget.names])


def kept_fraction(rates: PyTree, scores: PyTree, k: float, alpha: float, budget: Budget | None = None) -> jax.Array:
  """The network's expected kept fraction under the learned rates: of the weights, sum_l n_l k_l / sum_l n_l (n_l:
  entries of layer l's scores), or of the FLOPs with a channel `budget` (`Budget.fraction`)."""
  budget = weight_budget(scores) if budget is None else budget
  return budget.fraction(_fraction_vector(rates, budget, k, alpha))


def hw_loss(rates: PyTree, scores: PyTree, k: float, alpha: float, budget: Budget | None = None) -> jax.Array:
  """HARP's hardware loss (`utils/hw.py` `hw_loss`, `hw_flops_loss` with a channel `budget`): max(kept_fraction /
  target - 1, 0), 0 at or below the target (k, or the FLOPs fraction of structured HYDRA at k)."""
  budget = weight_budget(scores) if budget is None else budget
  return jnp.maximum(kept_fraction(rates, scores, k, alpha, budget) / budget.target(k) - 1.0, 0.0)


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


@dataclasses.dataclass(frozen=True, eq=False)
class Learning:
  """What the train step does with HARP's rates where prune learns them (`train.train_step`): the masks use the
  learned fractions, the loss adds gamma times the hardware loss, and after each step gamma may freeze.

  Attributes:
    k, alpha: the target fraction kept and k_min = alpha * k.
    gamma0, dynamic: the hardware loss's weight and whether it grows per epoch (`gamma`).
    steps_per_epoch: batches per epoch (gamma's epoch).
    budget: what the hardware loss counts (`weight_budget` or `channel_budget`).
  """

  k: float
  alpha: float
  gamma0: float
  dynamic: bool
  steps_per_epoch: int
  budget: Budget

  def layer_k(self, rates: PyTree) -> PyTree:
    """The masks' per-layer (per-group) fractions: `layer_rates`."""
    return layer_rates(rates, self.k, self.alpha)

  def gamma(self, step: jax.Array, aux: dict[str, jax.Array]) -> jax.Array:
    """The hardware loss's weight at `step` (`gamma`; aux: the train state's {'frozen_gamma'})."""
    return gamma(step, self.steps_per_epoch, self.gamma0, aux["frozen_gamma"], self.dynamic)

  def loss(self, rates: PyTree) -> jax.Array:
    """The hardware loss of `rates` (`hw_loss` with the budget)."""
    return hw_loss(rates, None, self.k, self.alpha, self.budget)

  def after_step(
    self, rates: PyTree, aux: dict[str, jax.Array], step: jax.Array, current_gamma: jax.Array
  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(aux with gamma frozen where the epoch ending at `step` + 1 reached the target, the step's HARP metrics:
    'hw_loss', 'hw_gamma' and 'rate_kept_fraction', the kept fraction of the budget: weights or FLOPs)."""
    loss = self.loss(rates)
    epoch_end = (step + 1) % self.steps_per_epoch == 0
    frozen = freeze_gamma(aux["frozen_gamma"], loss, current_gamma, epoch_end)
    kept = kept_fraction(rates, None, self.k, self.alpha, self.budget)
    return {"frozen_gamma": frozen}, {"hw_loss": loss, "hw_gamma": current_gamma, "rate_kept_fraction": kept}


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


def flop_counts(budget: Budget, fractions: dict[str, float], k: float) -> dict[str, int]:
  """Kept channels c_g per group, proportional to fractions[g] * n_g, whose FLOPs meet structured HYDRA's at k:
  F(c) <= F(kept(k)) (`Budget.target`), and no group can keep one channel more without exceeding it.

  FLOPs are not linear in the counts, so the target cannot in general be met with equality: the learned fractions
  are scaled by one factor (each count clipped to [1, n_g]), the largest whose FLOPs stay within the target, and
  floored; then, largest fractional part first (ties: group order), groups gain one channel at a time while the
  FLOPs stay within the target, until none can. (FLOPs of whole channels are integers: compared to within 0.5.)
  """
  n = budget.sizes
  want = np.asarray([fractions[name] for name in budget.names], np.float64) * n
  flops = lambda counts: float(budget.flops.flops(counts / n))
  target = budget.target(k) * budget.flops.total + 0.5
  alloc = lambda scale: np.clip(scale * want, 1.0, n)
  lo, hi = 0.0, float(np.max(n / np.maximum(want, 1e-30)))  # alloc(lo): one per group (<= target), alloc(hi): all
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if flops(alloc(mid)) <= target else (lo, mid)
  real = alloc(lo)
  counts = np.floor(real)
  order = np.argsort(-(real - counts), kind="stable")
  grown = True
  while grown:
    grown = False
    for g in order:
      more = counts.copy()
      more[g] += 1
      if more[g] <= n[g] and flops(more) <= target:
        counts, grown = more, True
  return {name: int(c) for name, c in zip(budget.names, counts)}


def _host_fractions(rates: PyTree, k: float, alpha: float) -> dict[str, float]:
  return {name: float(v) for name, v in _scored(layer_rates(rates, k, alpha))}


def fixed_k(rates: PyTree, scores: PyTree, *, k: float, alpha: float, budget: Budget | None = None) -> dict[str, float]:
  """The learned rates fixed for finetune: {rate name: k_l} whose kept counts meet the target exactly (`Budget.counts`:
  overall round(k N) weights, or with a channel `budget` the FLOPs of structured HYDRA at k); a plain dict of floats
  (host values), keyed by kernel (weights) or `ChannelGroup.name` (channels: `masking.channel_masks`' per-group k)."""
  budget = weight_budget(scores) if budget is None else budget
  counts = budget.counts(_host_fractions(rates, k, alpha), k)
  return {name: k_for_count(counts[name], int(size)) for name, size in zip(budget.names, budget.sizes)}


def rate_report(
  rates: PyTree, scores: PyTree, *, k: float, alpha: float, budget: Budget | None = None
) -> dict[str, Any]:
  """The learned per-layer rates as JSON-able data: per rate its entries (weights, or a group's channels), learned
  k_l and fixed kept count; overall the learned and fixed kept fractions (with a channel `budget`, of the FLOPs,
  beside the target's: `flops_target`, `flops_learned`, `flops_kept`, fractions of the unpruned network's)."""
  budget = weight_budget(scores) if budget is None else budget
  fractions = _host_fractions(rates, k, alpha)
  counts = budget.counts(fractions, k)
  sizes = dict(zip(budget.names, (int(n) for n in budget.sizes)))
  layers = [{"name": name, "size": sizes[name], "learned_k": fractions[name], "kept": counts[name]} for name in sizes]
  learned = np.asarray([fractions[name] for name in budget.names], np.float64)
  report = {
    "k": k,
    "alpha": alpha,
    "granularity": "weight" if budget.flops is None else "channel",
    "learned_kept_fraction": float(np.sum(budget.sizes * learned) / budget.sizes.sum()),
    "kept": sum(counts.values()),
    "layers": layers,
  }
  if budget.flops is not None:
    kept = np.asarray([counts[name] for name in budget.names], np.float64) / budget.sizes
    total = budget.flops.total
    report |= {
      "flops_total": total,
      "flops_target": budget.target(k),
      "flops_learned": float(budget.flops.flops(learned)) / total,
      "flops_kept": float(budget.flops.flops(kept)) / total,
    }
  return report


def plot_rates(report: dict[str, Any]) -> bytes:
  """A bar plot (PNG bytes) of the per-layer (per-group) kept fractions of a `rate_report`: learned and fixed."""
  import io  # pylint: disable=g-import-not-at-top

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  layers = report["layers"]
  x = np.arange(len(layers))
  fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(layers) + 1), 3.2))
  ax.bar(x - 0.2, [layer["learned_k"] for layer in layers], 0.4, label="learned k_l")
  fixed = "fixed (within HYDRA's FLOPs)" if report.get("granularity") == "channel" else "fixed (exact total)"
  ax.bar(x + 0.2, [layer["kept"] / layer["size"] for layer in layers], 0.4, label=fixed)
  ax.axhline(report["k"], color="k", lw=0.8, ls="--", label=f"target k={report['k']:g}")
  ax.set_xticks(x, [layer["name"].removesuffix("/kernel") for layer in layers], rotation=90, fontsize=7)
  ax.set_ylabel("fraction kept")
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  return png.getvalue()
