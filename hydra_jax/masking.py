"""HYDRA's pruning primitive: top-k score masks with a straight-through gradient.

Pruning is a transform on the parameter pytree, not a layer. Every prunable weight `w` (each conv or dense
`kernel`, first and last layer and 1x1 shortcuts included; never a bias or BatchNorm parameter) has an
importance score `s` of the same shape. The forward pass uses `w * mask`, where the mask keeps the top-k
fraction of `|s|` in each layer, and the gradient reaches `s` straight through the mask (Sehwag et al. 2020,
Eq. 4, after Ramanujan et al. 2020): `dL/ds = sign(s) * w * dL/dw_eff`.

`k` is always the fraction KEPT: a layer of `n` weights keeps exactly `n - floor((1 - k) * n)` of them
(k=0.01 is 99% pruning; any k > 0 keeps at least one), the `floor((1 - k) * n)` smallest `|s|` are
dropped, and ties are dropped in flat-index order, as a stable ascending sort would.

Example:
  >>> params = model.init(key, x, train=False)['params']
  >>> scores = init_scores(params, 'scaled', key)            # None at non-prunable leaves
  >>> masked = apply_masks(params, scores, k=0.01)            # once per training step
  >>> logits = model.apply({'params': masked, ...}, x, train=False)
  >>> print(sparsity_report(export_dense(params, scores, 0.01)).table())

Masks are computed once per step on the whole tree; attacks then close over the masked params, so no mask
is ever recomputed inside an attack loop.

Channel granularity (structured HYDRA, docs/structured.md): with `groups` (a model's `ChannelGroup`s, traced
by `hydra_jax.channels`) each scored kernel has one score per output channel, and `apply_masks(params,
scores, k, groups=groups)` keeps the top-k fraction of every group of tied channels, masking its kernels'
output channels, conv biases and BatchNorm scale / shift together (`channel_masks`), with the same top-k and
straight-through gradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import PyTree

Path = tuple[Any, ...]

_BISECTION_STEPS = 31  # Keys of [0, inf] lie in [0, 0x7F800000] (< 2**31 values): 31 halvings pin one.
_PACK_WIDTH = 1024  # keys per row of a pack at most (`_Packing`)
_PACK_ROWS = 2048  # rows per pack at least, unless all layers fit in fewer (8 MB of keys: cache-sized)
_PAD_KEY = np.iinfo(np.int32).max  # pads the rows: above every threshold (<= the key of +inf)


# ----------------------------------------------------------------------------------------------------------
# Which leaves are prunable.


def path_name(path: Path) -> str:
  """'layer1_0/conv1/kernel' for a `jax.tree_util` key path."""
  return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def is_prunable(path: Path, leaf: Any) -> bool:
  """Conv and dense weights are prunable: leaves named `kernel` with at least 2 dims (Flax convention)."""
  return bool(path) and path_name(path[-1:]) == "kernel" and np.ndim(leaf) >= 2


@dataclasses.dataclass(frozen=True)
class PathFilter:
  """Which weights are prunable, chosen by regular expressions over parameter paths ('layer1_0/conv1/kernel').

  A leaf is prunable when it has at least 2 dims and its path matches one of `include` (none given: the
  default, `is_prunable`: conv and dense kernels) and none of `exclude`; `re.search` semantics, so 'conv1'
  matches 'layer1_0/conv1/kernel' and '^conv1/' only the stem. Hashable, usable wherever a
  `prunable(path, leaf)` predicate is taken (`init_scores`, `sparsity_report`).

  Example (keep the first conv and the classifier dense, as many papers do):
    prunable = PathFilter(exclude=(r'^conv1/', r'^linear/'))
    scores = init_scores(params, 'scaled', key, prunable=prunable)
  """

  include: tuple[str, ...] = ()
  exclude: tuple[str, ...] = ()

  def __call__(self, path: Path, leaf: Any) -> bool:
    name = path_name(path)
    if self.include:
      chosen = np.ndim(leaf) >= 2 and any(re.search(p, name) for p in self.include)
    else:
      chosen = is_prunable(path, leaf)
    return chosen and not any(re.search(p, name) for p in self.exclude)

  def check(self, params: PyTree) -> dict[str, int]:
    """{path: size} of the prunable leaves of `params`, in tree order.

    Raises:
      ValueError: a pattern that does not compile or matches no leaf it could act on (include: a leaf of 2 dims
        or more; exclude: a leaf the default or `include` chose), or no leaf left to prune.
    """
    for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
      for pattern in patterns:
        try:
          re.compile(pattern)
        except re.error as error:
          raise ValueError(f"mask.{kind} pattern {pattern!r} is not a regular expression ({error})") from None
    leaves = [(path_name(p), p, w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0]]
    base = PathFilter(self.include)
    for kind, patterns, names in (
      ("include", self.include, [name for name, _, w in leaves if np.ndim(w) >= 2]),
      ("exclude", self.exclude, [name for name, p, w in leaves if base(p, w)]),
    ):
      for pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
          what = "prunable parameter" if kind == "exclude" else "parameter of 2 dims or more"
          raise ValueError(f"mask.{kind} pattern {pattern!r} matches no {what} path")
    chosen = {name: int(np.size(w)) for name, p, w in leaves if self(p, w)}
    if not chosen:
      raise ValueError("mask.include / mask.exclude leave no weight to prune")
    return chosen


def prunable_paths(params: PyTree, prunable: Callable[[Path, Any], bool] = is_prunable) -> list[str]:
  """Names of the prunable leaves of `params`, in tree order."""
  return [path_name(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if prunable(p, leaf)]


def _check_scores(params: PyTree, scores: PyTree) -> None:
  """Raises ValueError naming the first leaf where `scores` does not mirror `params`."""
  param_leaves = dict((path_name(p), w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0])
  score_leaves = jax.tree_util.tree_flatten_with_path(scores, is_leaf=lambda x: x is None)[0]
  score_names = {path_name(p) for p, _ in score_leaves}
  for name in param_leaves:
    if name not in score_names:
      raise ValueError(f"scores do not mirror params: no entry for param '{name}'")
  for path, s in score_leaves:
    name = path_name(path)
    if name not in param_leaves:
      raise ValueError(f"scores do not mirror params: score '{name}' has no param")
    if s is not None and np.shape(s) != np.shape(param_leaves[name]):
      raise ValueError(f"score '{name}' has shape {np.shape(s)} but its param has shape {np.shape(param_leaves[name])}")


# ----------------------------------------------------------------------------------------------------------
# The exact top-k mask of one array.


def check_k(k: Any, what: str = "k") -> None:
  """Raises ValueError unless a concrete `k` lies in (0, 1]; traced values are not checked."""
  if isinstance(k, jax.core.Tracer):
    return
  if not np.all((np.asarray(k) > 0) & (np.asarray(k) <= 1)):
    raise ValueError(f"{what}={k!r} must lie in (0, 1]: it is the fraction of weights KEPT")


def num_pruned(n: int, k: float | jax.Array) -> int | jax.Array:
  """floor((1 - k) * n), capped at n - 1 so that any k > 0 keeps one entry.

  A Python `k` is rounded in double precision exactly as the reference's `int((1 - k) * numel)`; a traced
  `k` is rounded in the default float precision.
  """
  if isinstance(k, (int, float, np.floating)):
    return min(int((1 - k) * n), n - 1)
  return jnp.minimum(jnp.floor((1 - jnp.asarray(k)) * n).astype(jnp.int32), n - 1)


def _order_key(values: jax.Array) -> jax.Array:
  """int32 keys with the same order as the non-negative float `values` (IEEE bit order)."""
  return jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Packing:
  """Where L layers' flat keys lie in packs of equal shape (rows, width), each layer in whole rows of one pack.

  width = min(_PACK_WIDTH, the largest layer's size). Layers share packs by first fit, largest first (a pack
  has the rows of the largest layer, at least _PACK_ROWS unless all layers fit in fewer), so that the
  bisection, run pack after pack, passes over a cache-sized block of keys, and small layers pad little.

  Attributes:
    sizes: (L,) entries per layer.
    width: keys per row.
    pack: (L,) the pack of each layer; first_row: (L,) its first row there.
    row_slot: (packs, rows) the slot of each row's layer, ascending (padding rows, whose keys never count: the last).
    row_start: (packs, rows) the flat index within its layer of each row's first entry.
    layer: (packs, slots) the layer in each slot of a pack (-1: empty slot).
  """

  sizes: tuple[int, ...]
  width: int
  pack: np.ndarray
  first_row: np.ndarray
  row_slot: np.ndarray
  row_start: np.ndarray
  layer: np.ndarray

  @classmethod
  def of(cls, sizes: list[int]) -> _Packing:
    width = min(_PACK_WIDTH, max(sizes))
    layer_rows = [-(-n // width) for n in sizes]
    rows = max(*layer_rows, min(_PACK_ROWS, sum(layer_rows)))
    pack, first_row, slot = [0] * len(sizes), [0] * len(sizes), [0] * len(sizes)
    used, slots = [], []  # per pack: rows filled, layers held
    for index in sorted(range(len(sizes)), key=lambda i: -layer_rows[i]):  # first fit, largest layers first
      p = next((p for p, filled in enumerate(used) if filled + layer_rows[index] <= rows), len(used))
      if p == len(used):
        used.append(0)
        slots.append(0)
      pack[index], first_row[index], slot[index] = p, used[p], slots[p]
      used[p] += layer_rows[index]
      slots[p] += 1
    row_slot = np.repeat(np.asarray(slots, np.int32)[:, None] - 1, rows, axis=1)  # padding: the last slot
    row_start = np.zeros((len(slots), rows), np.int32)
    layer = np.full((len(slots), max(slots)), -1, np.int32)
    for index, (p, r, s, n_rows) in enumerate(zip(pack, first_row, slot, layer_rows)):
      row_slot[p, r : r + n_rows] = s
      row_start[p, r : r + n_rows] = np.arange(n_rows) * width
      layer[p, s] = index
    return cls(
      tuple(sizes), width, np.asarray(pack, np.int32), np.asarray(first_row, np.int32), row_slot, row_start, layer
    )

  def pack_keys(self, keys: list[jax.Array]) -> jax.Array:
    """(packs, rows, width) int32: each layer's flat keys in its rows, padded with _PAD_KEY."""
    packs, rows = self.row_slot.shape
    flat = []
    for members in self.layer:  # in slot order, which is row order
      padded = [jnp.pad(keys[i], (0, -keys[i].size % self.width), constant_values=_PAD_KEY) for i in members if i >= 0]
      flat += padded + [jnp.full(rows * self.width - sum(k.size for k in padded), _PAD_KEY, jnp.int32)]
    return jnp.concatenate(flat).reshape(packs, rows, self.width)

  def per_slot(self, per_layer: jax.Array) -> jax.Array:
    """(packs, slots): an (L,) vector's entry for each slot's layer (0 in empty slots)."""
    return jnp.where(self.layer >= 0, per_layer[np.maximum(self.layer, 0)], 0)

  def unpack(self, packed: jax.Array) -> list[jax.Array]:
    """The L flat arrays of a (packs, rows, width) array laid out as `pack_keys`'s."""
    return [
      packed[p, r : r + -(-n // self.width)].ravel()[:n] for p, r, n in zip(self.pack, self.first_row, self.sizes)
    ]


def _bisect(reached: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array, steps: int) -> jax.Array:
  """Per layer, the smallest int t in (lo, hi] with `reached(t)`, for a `reached` monotone in t (elementwise).

  Args:
    reached: (L,) int32 -> (L,) bool, False at `lo` and True at `hi` in every layer.
    lo, hi: (L,) int32 bounds; `steps` halvings must bring every `hi - lo` down to 1 (more are no-ops).
  """

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = reached(mid)
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  return jax.lax.fori_loop(0, steps, halve, (lo, hi))[1]


def _hard_topk(values: tuple[jax.Array, ...], n_pruned: jax.Array) -> tuple[jax.Array, ...]:
  """0/1 masks dropping the `n_pruned[l]` smallest of each non-negative `values[l]` (ties: lowest flat index first).

  Every layer's keys go into packs of one shape (`_Packing`); one loop over the packs (`lax.map`) runs, per
  pack, one bisection finding all its layers' thresholds at once (per-layer counts: a segment sum over rows),
  and, only when some layer must drop some of its tied entries, a second bisection over flat indices. The
  masks thus compile into one loop body whatever the depth, and each pack stays in cache over its passes.

  Args:
    values: L non-negative float arrays of any shapes.
    n_pruned: (L,) int, each in [0, values[l].size).
  """
  packing = _Packing.of([v.size for v in values])
  keys = packing.pack_keys([_order_key(v).ravel() for v in values])
  n_pruned = packing.per_slot(jnp.asarray(n_pruned, jnp.int32))
  sizes = packing.per_slot(jnp.asarray(packing.sizes, jnp.int32))
  tie_steps = max(packing.sizes).bit_length()

  def one_pack(pack):
    keys, row_slot, row_start, n_pruned, sizes = pack
    rows = lambda per_slot: per_slot[row_slot][:, None]
    counts = lambda hits: jax.ops.segment_sum(
      jnp.sum(hits, axis=1, dtype=jnp.int32), row_slot, n_pruned.size, indices_are_sorted=True
    )
    flat_index = row_start[:, None] + jax.lax.iota(jnp.int32, packing.width)[None, :]
    # Per layer the smallest key t with #{keys <= t} > n_pruned (#{keys <= -1} = 0).
    lo, hi = jnp.full_like(n_pruned, -1), jnp.full_like(n_pruned, _order_key(jnp.float32(jnp.inf)))
    thresholds = _bisect(lambda t: counts(keys <= rows(t)) > n_pruned, lo, hi, _BISECTION_STEPS)
    at_threshold = keys == rows(thresholds)
    ties_to_drop = n_pruned - counts(keys < rows(thresholds))

    def tie_cutoffs(at_threshold, ties_to_drop):  # the smallest p with #{tied entries before p} >= ties_to_drop
      tied_before = lambda p: counts(at_threshold & (flat_index < rows(p)))
      # #{tied before 0} = 0 < ties <= #{tied before size} where ties > 0; other slots are discarded.
      cutoffs = _bisect(lambda p: tied_before(p) >= ties_to_drop, jnp.zeros_like(sizes), sizes, tie_steps)
      return jnp.where(ties_to_drop > 0, cutoffs, 0)

    no_cutoffs = lambda at_threshold, ties_to_drop: jnp.zeros_like(ties_to_drop)
    cutoffs = jax.lax.cond(jnp.any(ties_to_drop > 0), tie_cutoffs, no_cutoffs, at_threshold, ties_to_drop)
    return (keys > rows(thresholds)) | (at_threshold & (flat_index >= rows(cutoffs)))

  keep = jax.lax.map(one_pack, (keys, packing.row_slot, packing.row_start, n_pruned, sizes))
  return tuple(m.reshape(v.shape).astype(v.dtype) for m, v in zip(packing.unpack(keep), values))


@jax.custom_vjp
def _topk_of_abs(abs_scores: tuple[jax.Array, ...], n_pruned: jax.Array) -> tuple[jax.Array, ...]:
  return _hard_topk(abs_scores, n_pruned)


def _topk_of_abs_fwd(abs_scores, n_pruned):
  return _hard_topk(abs_scores, n_pruned), None


def _topk_of_abs_bwd(_, mask_cotangents):
  return mask_cotangents, None  # straight through: d mask / d|s| := identity (GetSubnet.backward)


_topk_of_abs.defvjp(_topk_of_abs_fwd, _topk_of_abs_bwd)


@jax.custom_vjp
def _rated_topk_of_abs(abs_scores: tuple[jax.Array, ...], n_pruned: jax.Array, ks: jax.Array) -> tuple[jax.Array, ...]:
  """`_topk_of_abs`, whose (L,) float32 `ks` (the fractions that gave `n_pruned`) also get a gradient."""
  return _hard_topk(abs_scores, n_pruned)


def _rated_topk_of_abs_fwd(abs_scores, n_pruned, ks):
  return _hard_topk(abs_scores, n_pruned), None


def _rated_topk_of_abs_bwd(_, mask_cotangents):
  # HARP's GetSubnet.backward: the mask gets the cotangent straight through and each layer's rate k the sum of
  # its mask's cotangent, dL/dk_l = sum_i dL/dm_l,i (a kept fraction grows where the masked weights help).
  k_cotangent = jnp.stack([jnp.sum(g, dtype=jnp.float32) for g in mask_cotangents])  # ks are float32
  return mask_cotangents, None, k_cotangent


_rated_topk_of_abs.defvjp(_rated_topk_of_abs_fwd, _rated_topk_of_abs_bwd)


def _magnitude(scores: jax.Array) -> jax.Array:
  """|scores| whose derivative is sign(scores), zero at 0 as torch.abs's (jnp.abs's is 1 there)."""
  return scores * jnp.sign(scores)


def _n_pruned_vector(sizes: list[int], ks: list[Any]) -> jax.Array:
  """(L,) int32: `num_pruned(sizes[l], ks[l])` for each layer (Python or traced ks)."""
  return jnp.stack([jnp.asarray(num_pruned(n, k), jnp.int32) for n, k in zip(sizes, ks)])


def topk_masks(scores: list[jax.Array], ks: list[Any]) -> list[jax.Array]:
  """`topk_mask(scores[l], ks[l])` for every l, ranked in one bisection loop (one program, not L).

  Differentiable in the ks too, as HARP's learned rates (Zhao & Wressnegger 2023, `GetSubnet.backward`):
  `dL/dk_l = sum(dL/dmask_l)`, the rounding to a count of entries skipped straight through. A traced k gives
  one program for every value of k (no recompilation); it is rounded to a count in float32.

  Args:
    scores: L arrays of any shapes and float dtypes (one per layer).
    ks: L fractions kept, each in (0, 1]; Python floats or traced scalars.
  """
  if len(ks) != len(scores):
    raise ValueError(f"topk_masks: {len(scores)} score arrays but {len(ks)} values of k (one k per array)")
  for k in ks:
    check_k(k)
  if not scores:
    return []
  n_pruned = _n_pruned_vector([s.size for s in scores], ks)
  k_vector = jnp.stack([jnp.asarray(k, jnp.float32) for k in ks])
  return list(_rated_topk_of_abs(tuple(_magnitude(s) for s in scores), n_pruned, k_vector))


def topk_mask(scores: jax.Array, k: float | jax.Array) -> jax.Array:
  """Float 0/1 mask keeping the top-k fraction of `|scores|`, with a straight-through gradient.

  Args:
    scores: array of any shape and float dtype (one layer's scores).
    k: fraction kept, in (0, 1]; a Python float or a traced scalar.

  Returns:
    mask of `scores`' shape and dtype with exactly `n - floor((1 - k) * n)` ones, n = scores.size.
    Its gradient is `sign(scores) * upstream` (straight through the top-k, then autodiff through abs).
  """
  return topk_masks([scores], [k])[0]


# ----------------------------------------------------------------------------------------------------------
# Masks for a whole parameter tree.


def _per_layer_k(k: Any) -> Any:
  """A uniform `k` as is; a per-layer tree or {'path/kernel': k} dict as a flat {path name: k} dict."""
  if not isinstance(k, Mapping):
    return k
  return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(k)[0]}


def _k_for_layer(k: Any, name: str) -> Any:
  if isinstance(k, dict):
    if name not in k:
      raise ValueError(f"per-layer k has no entry for prunable layer '{name}'; it has {sorted(k)}")
    check_k(k[name], f"k['{name}']")
    return k[name]
  return k


def layer_masks(scores: PyTree, k: Any) -> PyTree:
  """Per-layer top-k masks (the reference's rule): the tree of `topk_mask(s, k_layer)`, None where None.

  Every layer is ranked in one bisection loop (`topk_masks`), so the masks compile as one loop for any depth.

  Args:
    scores: pytree with an array at each prunable leaf and None elsewhere.
    k: a float (uniform over layers, as the reference) or per-layer: a tree mirroring `scores` with a
      float at each prunable leaf, or a dict {'layer1_0/conv1/kernel': k, ...} naming every prunable leaf.
  """
  flat_k = _per_layer_k(k)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(scores, is_leaf=lambda x: x is None)
  scored = [(path_name(path), s) for path, s in leaves if s is not None]
  masks = iter(topk_masks([s for _, s in scored], [_k_for_layer(flat_k, name) for name, _ in scored]))
  return jax.tree_util.tree_unflatten(treedef, [None if s is None else next(masks) for _, s in leaves])


def global_masks(scores: PyTree, k: float | jax.Array, min_layer_k: float = 0.0) -> PyTree:
  """Masks keeping the top-k fraction of `|scores|` ranked jointly over all layers (beyond the reference).

  Each layer first keeps its own top `min_layer_k` fraction (so no layer can be pruned away entirely), then
  the remaining budget goes to the largest `|s|` anywhere. Total kept = max(N - floor((1 - k) N), the
  layers' guaranteed counts), N = all prunable entries; ties are broken by flat index over the leaves in
  tree order. The gradient is straight-through to every score, as in `topk_mask`.
  """
  check_k(k)
  if not 0.0 <= min_layer_k <= 1.0:
    raise ValueError(f"min_layer_k={min_layer_k!r} must lie in [0, 1]")
  leaves, treedef = jax.tree_util.tree_flatten(scores, is_leaf=lambda x: x is None)
  arrays = [s for s in leaves if s is not None]
  abs_flat = jnp.concatenate([_magnitude(s).ravel() for s in arrays])
  if min_layer_k > 0:
    arrays_abs = tuple(jnp.abs(s) for s in jax.lax.stop_gradient(arrays))
    own_top = _hard_topk(arrays_abs, _n_pruned_vector([s.size for s in arrays], [min_layer_k] * len(arrays)))
    guaranteed = jnp.concatenate([m.ravel() > 0 for m in own_top])
    # Guaranteed entries rank above every other (+inf); the identity-plus-constant keeps d/d|s| = 1.
    abs_flat = abs_flat + jax.lax.stop_gradient(jnp.where(guaranteed, jnp.inf, abs_flat) - abs_flat)
    n_pruned = jnp.minimum(num_pruned(abs_flat.size, k), abs_flat.size - jnp.sum(guaranteed))
  else:
    n_pruned = num_pruned(abs_flat.size, k)
  (flat_mask,) = _topk_of_abs((abs_flat,), jnp.reshape(n_pruned, (1,)).astype(jnp.int32))
  splits = np.cumsum([s.size for s in arrays])[:-1]
  masks = iter(m.reshape(s.shape) for m, s in zip(jnp.split(flat_mask, splits), arrays))
  return jax.tree_util.tree_unflatten(treedef, [None if s is None else next(masks) for s in leaves])


def compute_masks(scores: PyTree, k: Any, *, scope: str = "layer", min_layer_k: float = 0.0) -> PyTree:
  """The mask tree for `scores`: `scope='layer'` (reference) or `'global'` (see `global_masks`)."""
  if scope == "layer":
    return layer_masks(scores, k)
  if scope == "global":
    return global_masks(scores, k, min_layer_k)
  raise ValueError(f"unknown mask scope '{scope}'; valid: 'layer', 'global'")


def apply_masks(
  params: PyTree,
  scores: PyTree,
  k: Any,
  *,
  scope: str = "layer",
  min_layer_k: float = 0.0,
  groups: ChannelGroups | None = None,
) -> PyTree:
  """Params whose prunable kernels are `w * topk_mask(s, k)`; every other leaf is returned as is.

  Differentiable in both arguments: `dL/dw = mask * dL/dw_eff` (pruned weights get zero gradient, so they
  stay put when finetuning) and `dL/ds = sign(s) * w * dL/dw_eff` (straight through). Compute it once per
  training step and close attacks over the result.

  Args:
    params: the model's 'params' collection.
    scores: a tree mirroring `params`, an array at each prunable kernel and None at every other leaf.
    k: fraction kept: float, per-layer tree/dict (see `layer_masks`), or, with scope='global', a float.
    scope: 'layer' ranks each layer alone (the reference); 'global' ranks across layers.
    min_layer_k: with scope='global', the fraction every layer keeps at least.
    groups: None (weight granularity), or the model's `ChannelGroups` (channel granularity: see
      `channel_masks`; scores are then (C_out,) per scored kernel, and k a float per group).
  """
  if groups is not None:
    _check_channel_options(scope)
    masks = channel_masks(params, scores, k, groups)
    return _map_with_names(lambda name, w: w * masks[name] if name in masks else w, params)
  _check_scores(params, scores)
  masks = compute_masks(scores, k, scope=scope, min_layer_k=min_layer_k)
  return jax.tree.map(lambda w, m: w if m is None else w * m, params, masks, is_leaf=lambda x: x is None)


def export_dense(
  params: PyTree, scores: PyTree, k: Any, *, groups: ChannelGroups | None = None, **mask_options
) -> PyTree:
  """Plain params with every pruned weight exactly +0.0 (no scores needed to use them).

  With channel `groups`, every leaf of a pruned channel (kernel slice, conv bias, BatchNorm scale and shift)
  is exactly +0.0.
  """
  if groups is not None:
    _check_channel_options(mask_options.get("scope", "layer"))
    masks = jax.lax.stop_gradient(channel_masks(params, scores, k, groups))
    return _map_with_names(
      lambda name, w: jnp.where(masks[name] > 0, w, 0).astype(w.dtype) if name in masks else w, params
    )
  _check_scores(params, scores)
  masks = jax.lax.stop_gradient(compute_masks(scores, k, **mask_options))
  return jax.tree.map(
    lambda w, m: w if m is None else jnp.where(m > 0, w, jnp.zeros_like(w)), params, masks, is_leaf=lambda x: x is None
  )


# ----------------------------------------------------------------------------------------------------------
# Channel granularity: one score per output channel, one decision per group of tied channels.

GRANULARITIES = ("weight", "channel")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Channels of one or more param leaves that are kept or pruned together, one decision per unit.

  A unit is one channel of every member: channels that a residual addition ties together (or a depthwise
  conv ties to its input) form one unit. Members are prunable kernels (their (C_out,) scores rank the units;
  masked on the last, output axis) and per-channel vectors (conv bias, BatchNorm scale and shift: masked
  only), so that a pruned unit outputs exactly zero everywhere.

  Attributes:
    members: ((param path, channel index of each unit along the leaf's last axis), ...).
  """

  members: tuple[tuple[str, tuple[int, ...]], ...]

  @property
  def size(self) -> int:
    """Number of units (channels) in the group."""
    return len(self.members[0][1])

  def kept(self, k: float) -> int:
    """Units kept at fraction `k`: size - floor((1 - k) * size), at least one (`num_pruned`)."""
    return self.size - num_pruned(self.size, k)

  @property
  def name(self) -> str:
    """The group's first kernel member ('layer1_0/conv2/kernel'): the key of its entry in a per-group k (and of
    HARP's learned rate of the group, `hydra_jax.harp`)."""
    return next(name for name, _ in self.members if name.rsplit("/", 1)[-1] == "kernel")


ChannelGroups = tuple[ChannelGroup, ...]


def _check_channel_options(scope: str) -> None:
  if scope != "layer":
    raise ValueError(f"mask scope {scope!r} is not available with channel granularity; use scope='layer'")


def _map_with_names(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_name(path), leaf), tree)


def _named_scores(scores: PyTree) -> dict[str, jax.Array]:
  flat = jax.tree_util.tree_flatten_with_path(scores, is_leaf=lambda x: x is None)[0]
  return {path_name(p): s for p, s in flat if s is not None}


def _gather(values: jax.Array, index: tuple[int, ...]) -> jax.Array:
  """values[index]; the identity when `index` is every channel in order (the common case: no gather op)."""
  return values if index == tuple(range(values.shape[-1])) else values[np.asarray(index)]


def _scatter(mask: jax.Array, index: tuple[int, ...], units: jax.Array) -> jax.Array:
  """mask with mask[index] = units; `units` itself when `index` covers every channel in order."""
  return units if index == tuple(range(mask.shape[-1])) else mask.at[np.asarray(index)].set(units)


def channel_masks(params: PyTree, scores: PyTree, k: Any, groups: ChannelGroups) -> dict[str, jax.Array]:
  """Per-leaf 0/1 channel masks: each group keeps the top-k fraction of its units, ranked by summed |scores|.

  A unit's score is the sum of |s| over the scored kernels of its group (one shared decision); the group keeps
  `group.kept(k)` units (ties: lowest unit first, as `topk_mask`). The gradient is straight through, as for
  weights (Eq. 4): a member's mask cotangent is its unit's, `dL/ds_c = sign(s_c) * sum over the tensors the
  unit masks of w * dL/dw_eff` (for a lone conv without bias: its kernel slice [..., c]); a traced per-group k
  gets HARP's `dL/dk_g = sum_c dL/dunit_mask_g,c` (as `topk_masks`).

  Args:
    params: the 'params' collection (gives each member's channel count).
    scores: a tree with a (C_out,) array at each scored kernel and None elsewhere (`init_channel_scores`).
    k: fraction of units kept per group, in (0, 1]: a float or a traced scalar (every group), or per group a
      {group.name: k} dict or a tree with a value at each group's `ChannelGroup.name` (HARP's rates).
    groups: the model's channel groups (`hydra_jax.channels.channel_groups`).

  Returns:
    {param path: float mask of shape (C,) over the leaf's last axis}, for every member of a group.
  """
  flat_k = _per_layer_k(k)
  if not isinstance(flat_k, dict):
    check_k(flat_k)
  ks = [_k_for_layer(flat_k, group.name) for group in groups]
  named_scores, named_params = _named_scores(scores), dict(_named_leaves(params))
  unit_scores = []
  for group in groups:
    scored = [(named_scores[name], index) for name, index in group.members if name in named_scores]
    if not scored:
      raise ValueError(f"channel group of {[name for name, _ in group.members]} has no scores")
    unit_scores.append(sum(_gather(_magnitude(s), index) for s, index in scored))
  group_units = ()
  if groups:  # every group in one loop
    n_pruned = _n_pruned_vector([group.size for group in groups], ks)
    k_vector = jnp.stack([jnp.asarray(k, jnp.float32) for k in ks])
    group_units = _rated_topk_of_abs(tuple(unit_scores), n_pruned, k_vector)
  masks: dict[str, jax.Array] = {}
  for group, units in zip(groups, group_units):
    for name, index in group.members:
      channels = named_params[name].shape[-1]
      masks[name] = _scatter(masks.get(name, jnp.ones(channels, units.dtype)), index, units)
  return masks


def _named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  return [(path_name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def scored_kernels(groups: ChannelGroups) -> set[str]:
  """Paths of the kernels that carry channel scores: every kernel member (leaf named 'kernel') of a group."""
  return {name for group in groups for name, _ in group.members if name.rsplit("/", 1)[-1] == "kernel"}


def _channel_l1(w: jax.Array) -> jax.Array:
  """(C_out,) L1 norm of each output channel's slice w[..., c]."""
  return jnp.sum(jnp.abs(w), axis=tuple(range(w.ndim - 1)))


CHANNEL_SCORE_INITS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  # HYDRA's scaled init per channel: sqrt(6 / fan_in) * ||w_c||_1 / max_c ||w_c||_1 (the initial mask is then
  # the channel LWM's in every one-layer group).
  "scaled": lambda w, key: math.sqrt(6.0 / fans(w.shape)[0]) * _channel_l1(w) / jnp.max(_channel_l1(w)),
  # L1-norm filter pruning (Li et al. 2017): the channel LWM.
  "l1_norm": lambda w, key: _channel_l1(w),
  "kaiming_normal": lambda w, key: math.sqrt(2.0 / fans(w.shape)[0]) * jax.random.normal(key, w.shape[-1:], w.dtype),
  "uniform": lambda w, key: jax.random.uniform(key, w.shape[-1:], w.dtype, -1.0, 1.0) / math.sqrt(fans(w.shape)[0]),
}


def init_channel_scores(params: PyTree, method: str, key: jax.Array, groups: ChannelGroups) -> PyTree:
  """A channel scores tree: a (C_out,) array at each scored kernel of `groups`, None at every other leaf.

  Methods: 'scaled' (HYDRA's, per-channel L1 norms), 'l1_norm' (the channel LWM's raw norms),
  'kaiming_normal' N(0, 2 / fan_in), 'uniform' U(+-1 / sqrt(fan_in)), one value per output channel.

  Args:
    params: the 'params' collection (pretrained weights for 'scaled' and 'l1_norm').
    method: a name in CHANNEL_SCORE_INITS.
    key: PRNG key, split per leaf.
    groups: the model's channel groups; kernels outside every group (the classifier) get None.
  """
  if method not in CHANNEL_SCORE_INITS:
    raise ValueError(f"unknown channel score init '{method}'; valid: {sorted(CHANNEL_SCORE_INITS)}")
  scored = scored_kernels(groups)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(flat))
  init = CHANNEL_SCORE_INITS[method]
  leaves = [init(jnp.asarray(w), k) if path_name(p) in scored else None for (p, w), k in zip(flat, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def channel_sparsity_report(params: PyTree, groups: ChannelGroups) -> SparsityReport:
  """Kept (nonzero) and total output channels of each scored kernel of `params` (e.g. `export_dense`'s)."""
  scored = scored_kernels(groups)
  layers = tuple(
    (name, int(np.count_nonzero(np.any(np.asarray(w).reshape(-1, w.shape[-1]) != 0, axis=0))), int(w.shape[-1]))
    for name, w in _named_leaves(params)
    if name in scored
  )
  return SparsityReport(layers)


# ----------------------------------------------------------------------------------------------------------
# Score initialisations.


def fans(kernel_shape: tuple[int, ...]) -> tuple[int, int]:
  """(fan_in, fan_out) of a Flax kernel: conv (..., H, W, in, out) or dense (in, out), as PyTorch counts."""
  receptive = math.prod(kernel_shape[:-2])
  return kernel_shape[-2] * receptive, kernel_shape[-1] * receptive


def _scaled(w, key, **_):
  fan_in, _ = fans(w.shape)
  return math.sqrt(6.0 / fan_in) * w / jnp.max(jnp.abs(w))


def _kaiming_normal(w, key, **_):
  return math.sqrt(2.0 / fans(w.shape)[0]) * jax.random.normal(key, w.shape, w.dtype)


def _uniform_bound(bound):
  return lambda w, key: jax.random.uniform(key, w.shape, w.dtype, -bound(w.shape), bound(w.shape))


def _xavier_std(shape):
  return math.sqrt(2.0) * math.sqrt(2.0 / sum(fans(shape)))


def _dirac(w, key, **_):
  """torch.nn.init.dirac_: 1 at the spatial centre of tap (i, i) for i < min(in, out); eye for dense."""
  *spatial, n_in, n_out = w.shape
  eye = jnp.eye(n_in, n_out, dtype=w.dtype)
  centre = jnp.zeros(spatial, w.dtype).at[tuple(d // 2 for d in spatial)].set(1)
  return centre[..., None, None] * eye


def _orthogonal(w, key, **_):
  """torch.nn.init.orthogonal_ with the ReLU gain sqrt(2): (fan_in, out) kernel with orthonormal columns."""
  return jax.nn.initializers.orthogonal(scale=math.sqrt(2.0))(key, w.shape, w.dtype)


def _snip(w, key, *, grads, **_):
  """SNIP sensitivity |w * dL/dw| (Lee et al. 2019); `grads` = dL/dw at this leaf on one batch, k=1."""
  return jnp.abs(w * grads)


SCORE_INITS: dict[str, Callable[..., jax.Array]] = {
  "scaled": _scaled,
  "kaiming_normal": _kaiming_normal,
  "kaiming_uniform": lambda w, key, **_: _uniform_bound(lambda s: math.sqrt(6.0 / fans(s)[0]))(w, key),
  "xavier_normal": lambda w, key, **_: _xavier_std(w.shape) * jax.random.normal(key, w.shape, w.dtype),
  "xavier_uniform": lambda w, key, **_: _uniform_bound(lambda s: math.sqrt(3.0) * _xavier_std(s))(w, key),
  "dirac": _dirac,
  "orthogonal": _orthogonal,
  "uniform": lambda w, key, **_: _uniform_bound(lambda s: 1.0 / math.sqrt(fans(s)[0]))(w, key),
  "snip": _snip,
}


def init_scores(
  params: PyTree,
  method: str,
  key: jax.Array,
  *,
  prunable: Callable[[Path, Any], bool] = is_prunable,
  **per_leaf: PyTree,
) -> PyTree:
  """A scores tree mirroring `params`: an array at each prunable kernel, None at every other leaf.

  Methods (fan_in/fan_out as PyTorch counts them: in*kh*kw / out*kh*kw):
    scaled          HYDRA's: sqrt(6 / fan_in) * w / max|w| per layer (the initial mask is then LWM).
    kaiming_normal  N(0, 2 / fan_in).                kaiming_uniform  U(+-sqrt(6 / fan_in)).
    xavier_normal   N(0, 2 * 2 / (fan_in + fan_out)).  xavier_uniform   U(+-sqrt(2) * sqrt(6 / (fan_in + fan_out))).
    dirac           torch's dirac_ (eye for dense).    orthogonal       orthonormal columns, gain sqrt(2).
    uniform         U(+-1 / sqrt(fan_in)): the reference layers' default.
    snip            |w * dL/dw|; pass `grads=` (a tree mirroring params: dL/dw on one batch with k=1).
  The ReLU gain sqrt(2) is applied as in the reference's `--scores_init_type`. Register more in
  `SCORE_INITS` as `fn(w, key, **per_leaf) -> scores`.

  Args:
    params: the 'params' collection (pretrained weights for 'scaled' and 'snip').
    method: a name in SCORE_INITS.
    key: PRNG key, split per prunable leaf.
    prunable: `(path, leaf) -> bool`, default: leaves named 'kernel' with ndim >= 2.
    **per_leaf: trees mirroring `params` whose leaves are passed by keyword to the init (e.g. grads).
  """
  if method not in SCORE_INITS:
    raise ValueError(f"unknown score init '{method}'; valid: {sorted(SCORE_INITS)}")
  init = SCORE_INITS[method]
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  extra = {name: treedef.flatten_up_to(tree) for name, tree in per_leaf.items()}
  keys = iter(jax.random.split(key, len(flat)))
  leaves = []
  for i, (path, w) in enumerate(flat):
    leaf_key = next(keys)
    leaves.append(init(jnp.asarray(w), leaf_key, **{n: v[i] for n, v in extra.items()}) if prunable(path, w) else None)
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------------------------------------
# Sparsity accounting.


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Kept (nonzero) and total counts of each prunable kernel, measured on the weights themselves."""

  layers: tuple[tuple[str, int, int], ...]  # (path, kept, total)

  @property
  def kept(self) -> int:
    return sum(kept for _, kept, _ in self.layers)

  @property
  def total(self) -> int:
    return sum(total for _, _, total in self.layers)

  def table(self) -> str:
    """A fixed-width text table: one row per layer, then the total."""
    width = max([len(name) for name, _, _ in self.layers] + [5])
    rows = [f"{'layer':<{width}}  {'kept':>10}  {'total':>10}  {'kept %':>7}"]
    for name, kept, total in self.layers + (("TOTAL", self.kept, self.total),):
      rows.append(f"{name:<{width}}  {kept:>10,d}  {total:>10,d}  {100 * kept / max(total, 1):>7.2f}")
    return "\n".join(rows)

  def to_json(self) -> str:
    return json.dumps(
      {
        "layers": [{"name": n, "kept": k, "total": t} for n, k, t in self.layers],
        "kept": self.kept,
        "total": self.total,
      }
    )


def sparsity_report(params: PyTree, prunable: Callable[[Path, Any], bool] = is_prunable) -> SparsityReport:
  """Counts the nonzero entries of every prunable kernel of `params` (e.g. the output of export_dense)."""
  layers = tuple(
    (path_name(p), int(np.count_nonzero(np.asarray(w))), int(np.size(w)))
    for p, w in jax.tree_util.tree_flatten_with_path(params)[0]
    if prunable(p, w)
  )
  return SparsityReport(layers)
