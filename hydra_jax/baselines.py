"""The paper's pruning baselines, each runnable in place of HYDRA's prune stage with any objective.

Every baseline is a transform of the parameter pytree plus, where it needs one, a loss term; trees that
mirror `params` have an array at each prunable kernel (`masking.is_prunable`) and None elsewhere, as
HYDRA's scores do (jaxpruner's convention).

  lwm     from the pretrained weights: mask = per-layer top-k of |w| (least weight magnitude, Han et al.
          2015), then the weights are trained with the mask fixed.
  snip    from a fresh initialisation: mask = top-k of |g * w|, g = dL/dw of the run's (robust) loss at
          initialisation on one or a few batches (Lee et al. 2019), then trained with the mask fixed.
  random  from a fresh initialisation: mask = a uniformly random subset of each layer at the same per-layer
          k (HYDRA's "scratch"), then trained with the mask fixed.
  admm    from the pretrained weights: ADMM-regularised robust training toward the k-sparse set (Ye et al.
          2019), hard prune (top-k of the trained |w|), then robust retraining with the mask fixed.
  str     from a fresh initialisation: no fixed mask; the model runs with w_eff = sign(w) relu(|w| - g(s)),
          g = sigmoid, s a learnable threshold per layer, and the sparsity emerges (Kusupati et al. 2020).
  rigl    from a fresh initialisation: sparse training at k with a mask that moves (Evci et al. 2020, RigL).

A mask is always given as a scores tree whose per-layer top-k (`masking.compute_masks`) is that mask, so the
mask-fixed phase is exactly HYDRA's finetune stage started from a checkpoint holding those scores
(`pipeline.run_baseline`). "scratch" trains for the pretrain stage's epochs and learning rate, "pretrained" for
the finetune stage's. STR, Adv-ADMM and RigL also change the train step itself: their `PhaseHooks` are what
`train.train_step` calls in the stages 'str', 'admm' and 'rigl' (`phase_hooks`).

RigL (stage 'rigl', or `config.baselines` containing 'rigl' in stage='all': one run per k in <workdir>/k<k>/rigl).
The run starts from fresh weights and a uniformly random mask keeping, per layer, exactly the count HYDRA's mask
keeps at `config.k` (`baseline.rigl_distribution='uniform'`), or Erdos-Renyi-Kernel densities with k of all
weights kept overall ('erk', `erk_densities`); `config.mask` (HYDRA's scope) is not read. The model runs with the
inactive weights at exactly 0 and the optimizer trains the active ones (their gradient is masked). After the
optimizer update of every step that ends at t = `baseline.rigl_delta_t` (default 100), 2 delta_t, ... below t_end
= `baseline.rigl_end_fraction` (default 0.75) of the stage's batches, each layer drops the floor(alpha_t *
n_active) active weights of smallest |w| and grows as many inactive ones of largest |dL/dw|, alpha_t = alpha/2 (1
+ cos(pi t / t_end)), alpha = `baseline.rigl_alpha` (default 0.3). dL/dw is the dense gradient of the run's
objective (any objective: benign for Evci et al.'s RigL, TRADES / PGD-AT for a robustness-aware variant) w.r.t.
the weights the model ran with at that step, averaged over devices and processes, so the mask is the same on every
device. Dropped weights are set to 0; grown ones start at exactly 0 (a weight is not regrown in the update that
drops it). The mask (`RiglState`, bool) lives in `TrainState.aux`, is checkpointed with the run and resumes
bit-identically. The update is a `lax.cond` inside the one train step: it needs the step's own dense gradient (no
second forward / backward), one compiled program serves every step, and the sorts and the gradient's all-reduce
run only on the update steps. The stage trains for `config.stages.rigl` (epochs, lr) with the run's optimizer; its
sparsity report counts the masks.

  hydra-jax train --config configs/digits_demo.py --config.stage=rigl --config.k=0.1 \
      --config.objective.name=benign --config.baseline.rigl_delta_t=10 --config.stages.rigl.epochs=15 \
      --config.optimizer.name=adam --config.stages.rigl.lr=1e-3 --workdir runs/rigl_benign

(On the demo's CNN, SGD from a fresh sparse initialisation stays at chance for 15 epochs at 10% kept; Adam
trains: experiments/RESULTS.md, "RigL and STR without the robust objective".)

Usage:
  >>> scores = baselines.magnitude_scores(params)                          # LWM
  >>> scores = baselines.snip_scores(params, baselines.mean_gradient(jax.grad(loss_fn), params, batches, key))
  >>> scores = baselines.random_scores(params, key)                        # scratch
  >>> masked = masking.apply_masks(params, scores, k=0.01)                 # scores frozen: mask fixed
  >>> thresholds = baselines.str_thresholds(params, s_init=-5.0)           # STR, trained beside params
  >>> weights = baselines.str_weights(params, thresholds)                  # what the model runs with
  >>> admm = baselines.admm_init(params, k=0.01, rho=1e-3)                 # Adv-ADMM
  >>> loss = robust_loss(params) + baselines.admm_penalty(params, admm)
  >>> admm = baselines.admm_schedule(params, admm, step, interval_steps=n, k=0.01, rho_growth=1.3)
  >>> hooks = baselines.get_baseline("str").phase(s_init=-5.0)             # the same, as train-step hooks
  >>> hooks = baselines.phase_hooks(config, "admm", steps_per_epoch=390)   # what the train step calls
  >>> rigl = baselines.rigl_init(params, key, k=0.1)                       # RigL: random masks at k
  >>> weights = baselines.rigl_weights(params, rigl)                       # inactive weights exactly 0
  >>> params, rigl = baselines.rigl_update(params, rigl, dense_grads, baselines.rigl_drop_fraction(t, 0.3, t_end))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from hydra_jax import PyTree
from hydra_jax import masking
from hydra_jax import optim

LossFn = Callable[[PyTree, Any, jax.Array], jax.Array]
GradFn = Callable[[PyTree, Any, jax.Array], PyTree]


def _at_prunable(fn: Callable[..., jax.Array], params: PyTree, *rest: PyTree) -> PyTree:
  """`fn(w, *rest_leaves)` at every prunable kernel of `params`, None at every other leaf."""

  def leaf(path, w, *others):
    return fn(w, *others) if masking.is_prunable(path, w) else None

  return jax.tree_util.tree_map_with_path(leaf, params, *rest, is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------------------------------------
# Fixed masks: LWM, SNIP, random. Each is a scores tree; `masking.compute_masks(scores, k)` is the mask.


def magnitude_scores(params: PyTree) -> PyTree:
  """|w| at each prunable kernel: its per-layer top-k is least-weight-magnitude pruning (LWM).

  The same per-layer mask as HYDRA's 'scaled' score init (a positive per-layer rescaling of w); with
  `scope='global'` it ranks the raw magnitudes across layers. Also Adv-ADMM's hard prune.
  """
  return _at_prunable(jnp.abs, params)


def channel_magnitude_scores(params: PyTree, groups: masking.ChannelGroups) -> PyTree:
  """||w_c||_1 of each output channel of each scored kernel: the channel LWM (Li et al. 2017, L1-norm filter
  pruning). A group of tied channels ranks its units by the sum of their members' norms (`masking.channel_masks`).
  """
  return masking.init_channel_scores(params, "l1_norm", jax.random.key(0), groups)  # 'l1_norm' draws nothing


def mean_gradient(grad_fn: GradFn, params: PyTree, batches: Iterable[Any], key: jax.Array) -> PyTree:
  """(1/n) sum_i grad_fn(params, batch_i, key_i) over the n `batches`, key_i = fold_in(key, i).

  Args:
    grad_fn: `(params, batch, key) -> dL/dparams`, e.g. `jax.grad` of the robust objective with BN statistics
      fixed, or a data-parallel program computing it (`sources.snip_gradients`).
    params: the weights to differentiate at (a fresh initialisation for SNIP).
    batches: one or a few batches (at least one).
    key: seeds each batch's randomness (attack starts).

  Returns:
    A tree shaped like `params`: the gradient of the mean loss over equally sized batches.
  """
  grads = [grad_fn(params, batch, jax.random.fold_in(key, i)) for i, batch in enumerate(batches)]
  if not grads:
    raise ValueError("mean_gradient needs at least one batch")
  return jax.tree.map(lambda *g: sum(g) / len(g), *grads)


def snip_scores(params: PyTree, grads: PyTree) -> PyTree:
  """SNIP connection sensitivity |g * w| at each prunable kernel (Lee et al. 2019).

  g = dL/dw of the dense network (k = 1) on the stated batches (`mean_gradient`); w * g is dL/dc, c the
  connection gates at c = 1. Lee et al. divide by sum |g * w|, a positive constant that changes no ranking,
  per layer or global. This is the reference's `snip_init`, with the run's (robust) objective.
  """
  return masking.init_scores(params, "snip", jax.random.key(0), grads=grads)  # 'snip' draws no random numbers


def random_scores(params: PyTree, key: jax.Array) -> PyTree:
  """i.i.d. uniform scores: per layer, their top-k is a uniformly random subset of exactly the top-k count.

  For HYDRA's "scratch" baseline: a random mask at the same per-layer k, trained from scratch. Use it
  with `scope='layer'` (the default): ranked globally, layers of different fan-in would get different k.
  """
  return masking.init_scores(params, "uniform", key)


# ----------------------------------------------------------------------------------------------------------
# STR: Soft Threshold Reparameterization (Kusupati et al. 2020).


def str_thresholds(params: PyTree, s_init: float) -> PyTree:
  """One learnable threshold parameter s (a float32 scalar) per prunable kernel, all `s_init`.

  The STR paper's ResNet-50 ImageNet runs use s_init = -3200 with weight decay on s (sigmoid(-3200) = 0:
  the weights start dense and weight decay pulls s toward 0, raising the threshold); a short run needs
  sigmoid(s_init) closer to the weights' scale (e.g. s_init = -5: threshold 0.0067) for any sparsity.
  """
  return _at_prunable(lambda w: jnp.asarray(s_init, jnp.float32), params)


def str_weights(
  params: PyTree, thresholds: PyTree, threshold_fn: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid
) -> PyTree:
  """The weights the model runs with: w_eff = sign(w) * relu(|w| - g(s)) at each prunable kernel.

  Kusupati et al. 2020 (their `sparseFunction`), g = sigmoid. Entries with |w| <= g(s) are exactly 0; the
  others shrink by g(s) toward 0. Gradients (autodiff, relu'(0) = 0, sign' = 0):
    dw_eff/dw = 1[|w| > g(s)],   dL/ds = -g'(s) * sum_{|w| > g(s)} sign(w) * dL/dw_eff.
  Non-prunable leaves (None in `thresholds`) are returned as is.

  Args:
    params: the 'params' collection.
    thresholds: from `str_thresholds`: a scalar at each prunable kernel, None elsewhere.
    threshold_fn: g, mapping s to the threshold on |w| (the paper's sigmoid).
  """

  def soft_threshold(w, s):
    return jnp.sign(w) * jax.nn.relu(jnp.abs(w) - threshold_fn(s).astype(w.dtype))

  return jax.tree.map(
    lambda w, s: w if s is None else soft_threshold(w, s), params, thresholds, is_leaf=lambda x: x is None
  )


def str_sparsity(params: PyTree, thresholds: PyTree) -> masking.SparsityReport:
  """Kept (nonzero) / total entries of each prunable kernel of `str_weights(params, thresholds)`."""
  return masking.sparsity_report(str_weights(params, thresholds))


# ----------------------------------------------------------------------------------------------------------
# Adv-ADMM (Ye et al. 2019): min_W L_adv(W) s.t. W in S_k, solved by ADMM with W = Z, Z in S_k.


class AdmmState(NamedTuple):
  """ADMM's auxiliary variables (scaled form), trees mirroring params (None at non-prunable leaves).

  Attributes:
    z: the k-sparse copy of the weights (each prunable kernel in its k-sparse set).
    u: the scaled dual variable, shaped like the kernels.
    rho: the penalty weight (float32 scalar).
  """

  z: PyTree
  u: PyTree
  rho: jax.Array


def project_sparse(tree: PyTree, k: Any, *, scope: str = "layer", min_layer_k: float = 0.0) -> PyTree:
  """Euclidean projection onto the k-sparse set: keep the top-k |x| of each array, zero the rest.

  For a set S of allowed supports of size n_keep, argmin_{z: supp z in S} ||z - x||^2 keeps x on the
  n_keep entries of largest |x| (the dropped entries cost sum x_i^2). Counts and ties as
  `masking.topk_mask`; `scope` / `min_layer_k` as `masking.compute_masks` (per layer by default, the
  k-sparse set of Ye et al.). `tree` has an array at each prunable kernel and None elsewhere.
  """
  masks = jax.lax.stop_gradient(masking.compute_masks(tree, k, scope=scope, min_layer_k=min_layer_k))
  return jax.tree.map(
    lambda x, m: None if x is None else jnp.where(m > 0, x, jnp.zeros_like(x)), tree, masks, is_leaf=lambda x: x is None
  )


def _kernels(params: PyTree) -> PyTree:
  return _at_prunable(lambda w: w, params)


def admm_init(params: PyTree, k: Any, rho: float, **mask_options: Any) -> AdmmState:
  """Z_0 = Pi_k(W_0), U_0 = 0, rho (Ye et al.'s `admm_initialization`; their rho default 1e-3)."""
  kernels = _kernels(params)
  return AdmmState(
    z=project_sparse(kernels, k, **mask_options),
    u=jax.tree.map(jnp.zeros_like, kernels),
    rho=jnp.asarray(rho, jnp.float32),
  )


def admm_penalty(params: PyTree, state: AdmmState) -> jax.Array:
  """rho / 2 * sum over prunable kernels of ||W - Z + U||_F^2: the term added to the robust loss.

  Its gradient rho (W - Z + U) pulls each kernel toward Z - U; Z and U are constants of the W-step.
  """
  squares = jax.tree.map(lambda w, z, u: jnp.sum(jnp.square(w - z + u)), _kernels(params), state.z, state.u)
  return 0.5 * state.rho * sum(jax.tree.leaves(squares))


def admm_update(params: PyTree, state: AdmmState, k: Any, rho_growth: float = 1.0, **mask_options: Any) -> AdmmState:
  """One ADMM Z- and U-step after the W-steps: Z' = Pi_k(W + U), U' = U + W - Z', rho' = rho_growth * rho.

  Ye et al. 2019 (their code's `admm_update`); their `multi_rho` multiplies rho by 1.3 at each update and,
  as here, does not rescale U when rho changes.
  """
  kernels = _kernels(params)
  z = project_sparse(jax.tree.map(jnp.add, kernels, state.u), k, **mask_options)
  u = jax.tree.map(lambda u, w, z: u + w - z, state.u, kernels, z)
  return AdmmState(z=z, u=u, rho=state.rho * rho_growth)


def admm_schedule(
  params: PyTree,
  state: AdmmState,
  step: jax.Array,
  *,
  interval_steps: int,
  k: Any,
  rho_growth: float = 1.0,
  **mask_options: Any,
) -> AdmmState:
  """`admm_update` when `step` (batches consumed) is a positive multiple of `interval_steps`, else `state`.

  Call it at the start of the train step, before the loss: Ye et al. update Z and U at the first batch of
  every `admm_epoch`-th epoch (20 in their CIFAR-10 config), before that batch's forward. Traceable.
  """
  due = (step > 0) & (step % interval_steps == 0)
  return jax.lax.cond(due, lambda: admm_update(params, state, k, rho_growth, **mask_options), lambda: state)


# ----------------------------------------------------------------------------------------------------------
# RigL: Rigging the Lottery (Evci et al. 2020), sparse training from scratch with a mask that moves.

RIGL_DISTRIBUTIONS = ("uniform", "erk")


class RiglState(NamedTuple):
  """RigL's mask: a bool array (True = active) at each prunable kernel, None elsewhere (mirrors params)."""

  masks: PyTree


def erk_densities(params: PyTree, k: float, power_scale: float = 1.0) -> dict[str, float]:
  """Erdos-Renyi-Kernel per-layer densities with k of all prunable weights kept overall (Evci et al. 2020).

  Layer l (kernel shape (kh, kw, in, out) or (in, out), n_l entries) gets density
  d_l = eps * (sum(shape) / prod(shape))^power_scale, eps chosen so that sum_l d_l n_l = k * sum_l n_l. A layer
  whose d_l would exceed 1 is made dense and eps solved again over the others, the largest raw ratio first (the
  RigL code's `get_sparsities_erdos_renyi`, `erk_power_scale` = 1).

  Returns:
    {'layer/kernel': density in (0, 1]} for every prunable kernel (`masking.path_name`).
  """
  shapes = {
    masking.path_name(p): w.shape
    for p, w in jax.tree_util.tree_flatten_with_path(params)[0]
    if masking.is_prunable(p, w)
  }
  sizes = {name: math.prod(shape) for name, shape in shapes.items()}
  raw = {name: (sum(shape) / sizes[name]) ** power_scale for name, shape in shapes.items()}
  dense: set[str] = set()
  while True:
    sparse = [name for name in shapes if name not in dense]
    budget = k * sum(sizes.values()) - sum(sizes[name] for name in dense)
    eps = budget / sum(raw[name] * sizes[name] for name in sparse)
    if all(eps * raw[name] <= 1 for name in sparse):
      return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
    dense.add(max(sparse, key=raw.get))


def rigl_init(params: PyTree, key: jax.Array, k: Any) -> RiglState:
  """Random masks keeping exactly `n - floor((1 - k_l) n)` entries of each prunable kernel (`masking.num_pruned`).

  Args:
    params: the fresh weights (only shapes are read).
    key: draws the masks (uniformly random subsets of each layer).
    k: fraction kept: a float (every layer) or per-layer {'layer/kernel': k_l} (`erk_densities`).
  """
  masks = masking.compute_masks(random_scores(params, key), k)
  return RiglState(masks=jax.tree.map(lambda m: None if m is None else m > 0, masks, is_leaf=lambda x: x is None))


def rigl_weights(params: PyTree, state: RiglState) -> PyTree:
  """The weights the model runs with: each prunable kernel with its inactive entries exactly 0.

  Its gradient is dL/dw_eff at the active entries and 0 at the inactive ones: the optimizer trains only the
  active weights (RigL's sparse training).
  """
  return jax.tree.map(
    lambda w, m: w if m is None else jnp.where(m, w, jnp.zeros_like(w)),
    params,
    state.masks,
    is_leaf=lambda x: x is None,
  )


def rigl_drop_fraction(step: jax.Array, alpha: float, t_end: int) -> jax.Array:
  """alpha_t = alpha / 2 (1 + cos(pi t / t_end)): RigL's cosine decay of the fraction updated (float32)."""
  return 0.5 * alpha * (1 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / t_end))


def _largest(values: jax.Array, count: jax.Array, eligible: jax.Array) -> jax.Array:
  """Bool mask of the `count` largest `values` among the `eligible` entries (ties: lowest flat index first).

  `count` may be traced (at most the number of eligible entries); one stable sort of the layer.
  """
  flat = jnp.where(eligible, values, -jnp.inf).ravel()
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))
  return (ranks < count).reshape(values.shape) & eligible


def rigl_layer_update(mask: jax.Array, w: jax.Array, g: jax.Array, drop_fraction: jax.Array) -> jax.Array:
  """One layer's new mask: drop n = floor(drop_fraction * n_active) active entries, grow n inactive ones.

  The dropped are the n active entries of smallest |w|; the grown the n entries inactive before this update of
  largest |g| (so a weight just dropped is not regrown in the same update, and the active count is unchanged).
  n is capped at the number of inactive entries.

  Args:
    mask: bool, True at the active entries.
    w: the weights, shaped like `mask`.
    g: dL/dw at every entry (the dense gradient), shaped like `mask`.
    drop_fraction: alpha_t (`rigl_drop_fraction`), float32 scalar.
  """
  n_active = jnp.sum(mask)
  n_swap = jnp.minimum(jnp.floor(drop_fraction * n_active).astype(n_active.dtype), mask.size - n_active)
  kept = _largest(jnp.abs(w), n_active - n_swap, mask)
  grown = _largest(jnp.abs(g), n_swap, ~mask)
  return kept | grown


def rigl_update(params: PyTree, state: RiglState, grads: PyTree, drop_fraction: jax.Array) -> tuple[PyTree, RiglState]:
  """Every layer's `rigl_layer_update`; the dropped weights are set to 0 and the grown start at exactly 0."""
  masks = jax.tree.map(
    lambda m, w, g: None if m is None else rigl_layer_update(m, w, g, drop_fraction),
    state.masks,
    params,
    grads,
    is_leaf=lambda x: x is None,
  )
  new = RiglState(masks=masks)
  return rigl_weights(params, new), new


def rigl_schedule(
  params: PyTree,
  state: RiglState,
  grads: Callable[[], PyTree],
  step: jax.Array,
  *,
  alpha: float,
  delta_t: int,
  t_end: int,
) -> tuple[PyTree, RiglState]:
  """After an optimizer update: inactive weights back to 0, then `rigl_update` when `step` is due.

  Due: `step` (batches consumed) is a positive multiple of `delta_t` below `t_end` (Evci et al.'s Algorithm 1,
  t mod delta_t = 0 and t < T_end). The update runs in a lax.cond, so the sorts and `grads()` (the dense
  gradient and its device average) cost only on the due steps. Zeroing every step undoes what momentum or Adam
  moments of a dropped weight would otherwise move it by.
  """
  params = rigl_weights(params, state)
  due = (step > 0) & (step % delta_t == 0) & (step < t_end)
  return jax.lax.cond(
    due,
    lambda: rigl_update(params, state, grads(), rigl_drop_fraction(step, alpha, t_end)),
    lambda: (params, state),
  )


# ----------------------------------------------------------------------------------------------------------
# Training phases that change the train step: what the one step calls for STR and Adv-ADMM.


class PhaseHooks(NamedTuple):
  """What a training phase changes in the train step; HYDRA's own stages need none of it.

  The step (`train.train_step`), with `aux` the phase's state:
    aux = before_step(params, aux, step)                      # before the loss (ADMM's Z/U update)
    loss = objective(weights(params, aux)) + penalty(params, aux)
    params = optimizer update of params (and of aux when trains_aux)
    params, aux = after_step(params, aux, weight_grads, step + 1)   # when set (RigL's mask update)
  When `trains_aux`, `aux` lives in the train state's scores slot and is optimised beside the params (STR's
  thresholds, with weight decay); otherwise it lives in `TrainState.aux` and is a constant of the gradient
  step (ADMM's Z, U, rho). `weights(params, aux)` is also what the phase evaluates and counts as its sparsity.

  Attributes:
    init: `(params, key) -> aux` at the start of the phase (`key` seeds RigL's initial masks).
    weights: `(params, aux) -> params` the model runs with.
    penalty: `(params, aux) -> scalar` added to the objective's loss.
    before_step: `(params, aux, step) -> aux`, `step` = batches consumed (traced); the train step calls it
      only for an untrained aux (STR's is the identity).
    trains_aux: whether the optimizer updates `aux`.
    after_step: None, or `(params, aux, weight_grads, step) -> (params, aux)` after the optimizer update, `step`
      = batches consumed after it; `weight_grads()` is dL/d(the weights the model ran with) at every entry,
      pruned ones included (dense), averaged over the devices, of the step's last replay. It is a thunk so that
      its device average (a params-sized all-reduce) runs only where it is called (inside RigL's lax.cond).
    kept: None (the kept weights are the nonzero entries of `weights(params, aux)`), or `(params, aux) -> tree`
      whose nonzero entries are the kept weights (RigL's masks: a weight just grown is still exactly 0).
  """

  init: Callable[[PyTree, jax.Array], PyTree]
  weights: Callable[[PyTree, PyTree], PyTree]
  penalty: Callable[[PyTree, PyTree], jax.Array]
  before_step: Callable[[PyTree, PyTree, jax.Array], PyTree]
  trains_aux: bool
  after_step: Callable[[PyTree, PyTree, Callable[[], PyTree], jax.Array], tuple[PyTree, PyTree]] | None = None
  kept: Callable[[PyTree, PyTree], PyTree] | None = None

  def phase_state(self, scores: PyTree, aux: PyTree) -> PyTree:
    """The phase's `aux` as the train state holds it: in the trained scores slot (STR) or in `aux` (ADMM)."""
    return scores if self.trains_aux else aux

  def init_state(self, params: PyTree, key: jax.Array) -> tuple[PyTree, PyTree]:
    """(scores, aux) of the train state at the phase's start: `init(params, key)` in the slot it lives in."""
    state = self.init(params, key)
    return (state, ()) if self.trains_aux else (None, state)


def str_hooks(s_init: float) -> PhaseHooks:
  """STR trained from scratch: the model runs with `str_weights`; the thresholds train with the weights.

  Weight decay on s is the run's weight decay (the STR code's default, `--st_decay` unset); it is what
  pulls a very negative s_init toward 0 and raises the threshold.
  """
  return PhaseHooks(
    init=lambda params, key: str_thresholds(params, s_init),
    weights=str_weights,
    penalty=lambda params, aux: jnp.zeros((), jnp.float32),
    before_step=lambda params, aux, step: aux,
    trains_aux=True,
  )


def admm_hooks(k: Any, rho: float, rho_growth: float, interval_steps: int, **mask_options: Any) -> PhaseHooks:
  """Adv-ADMM's W-steps: dense weights, loss + `admm_penalty`, `admm_schedule` before every step.

  Ye et al.'s CIFAR-10 config: rho 1e-3 grown x1.3 per update (`multi_rho`), an update every 20 epochs
  (`admm_epoch`) over 200 epochs at lr 0.01, PGD-10 training; then hard prune and retrain (`pipeline.run_baseline`).
  """
  return PhaseHooks(
    init=lambda params, key: admm_init(params, k, rho, **mask_options),
    weights=lambda params, aux: params,
    penalty=admm_penalty,
    before_step=lambda params, aux, step: admm_schedule(
      params, aux, step, interval_steps=interval_steps, k=k, rho_growth=rho_growth, **mask_options
    ),
    trains_aux=False,
  )


def rigl_hooks(k: Any, alpha: float, delta_t: int, t_end: int, distribution: str = "uniform") -> PhaseHooks:
  """RigL from a fresh initialisation: masked weights, the mask updated by `rigl_schedule` after every step.

  Args:
    k: fraction of the prunable weights kept: in every layer ('uniform'), or overall with ERK's per-layer
      densities ('erk', `erk_densities`).
    alpha: the initial drop fraction (Evci et al.: 0.3).
    delta_t: batches between mask updates (Evci et al.: 100).
    t_end: no update from this many batches on (Evci et al.: 75% of training).
    distribution: 'uniform' or 'erk'.
  """
  if distribution not in RIGL_DISTRIBUTIONS:
    raise ValueError(f"unknown RigL distribution {distribution!r}; valid: {list(RIGL_DISTRIBUTIONS)}")

  def init(params, key):
    return rigl_init(params, key, erk_densities(params, k) if distribution == "erk" else k)

  return PhaseHooks(
    init=init,
    weights=rigl_weights,
    penalty=lambda params, aux: jnp.zeros((), jnp.float32),
    before_step=lambda params, aux, step: aux,
    trains_aux=False,
    after_step=functools.partial(rigl_schedule, alpha=alpha, delta_t=delta_t, t_end=t_end),
    kept=lambda params, aux: aux.masks,
  )


def phase_hooks(config: ml_collections.ConfigDict, stage: str, steps_per_epoch: int) -> PhaseHooks | None:
  """The train-step hooks of `stage`: STR's for 'str', Adv-ADMM's for 'admm', RigL's for 'rigl', None for HYDRA's.

  Args:
    config: the run config; `config.baseline` holds s_init (STR), rho, rho_growth and admm_interval_epochs
      (ADMM), the rigl_* keys (RigL), and ADMM projects onto the k-sparse set of `config.k` / `config.mask`;
      RigL keeps `config.k`.
    stage: the stage being run.
    steps_per_epoch: batches per epoch: ADMM updates Z and U every admm_interval_epochs * steps_per_epoch batches;
      RigL's t_end is rigl_end_fraction of the stage's batches (`optim.stage_epochs` * steps_per_epoch).
  """
  options = config.baseline
  if stage == "str":
    return str_hooks(options.s_init)
  if stage == "rigl":
    total_steps = optim.stage_epochs(config, stage) * steps_per_epoch
    return rigl_hooks(
      config.k,
      options.rigl_alpha,
      options.rigl_delta_t,
      max(1, round(options.rigl_end_fraction * total_steps)),
      options.rigl_distribution,
    )
  if stage == "admm":
    return admm_hooks(
      config.k,
      options.rho,
      options.rho_growth,
      options.admm_interval_epochs * steps_per_epoch,
      scope=config.mask.scope,
      min_layer_k=config.mask.min_layer_k,
    )
  return None


# ----------------------------------------------------------------------------------------------------------
# The registry.


class Baseline(NamedTuple):
  """How a baseline replaces HYDRA's prune (and finetune) stages.

  Attributes:
    start: 'pretrained' (a run directory's weights; mask-fixed phase on the finetune schedule) or
      'scratch' (a fresh initialisation; mask-fixed phase on the pretrain schedule).
    mask_scores: `(params, key, grads) -> scores` whose top-k is the fixed mask, computed from the weights
      the mask-fixed phase starts from (after `phase`, if any); None: no mask-fixed phase (STR, RigL: the
      baseline is its phase, run as the stage of its name).
    needs_grads: `mask_scores` reads `grads`, the mean gradient of the run's objective (SNIP).
    phase: None, or the factory of the `PhaseHooks` of the training phase run first (`str_hooks`,
      `admm_hooks`, `rigl_hooks`): it needs the train step to call the hooks.
  """

  start: str
  mask_scores: Callable[[PyTree, jax.Array, PyTree], PyTree] | None
  needs_grads: bool = False
  phase: Callable[..., PhaseHooks] | None = None


BASELINES: dict[str, Baseline] = {
  "lwm": Baseline("pretrained", lambda params, key, grads: magnitude_scores(params)),
  "snip": Baseline("scratch", lambda params, key, grads: snip_scores(params, grads), needs_grads=True),
  "random": Baseline("scratch", lambda params, key, grads: random_scores(params, key)),
  "admm": Baseline("pretrained", lambda params, key, grads: magnitude_scores(params), phase=admm_hooks),
  "str": Baseline("scratch", None, phase=str_hooks),
  "rigl": Baseline("scratch", None, phase=rigl_hooks),
}


def baseline_names() -> list[str]:
  """The registered baseline names, sorted."""
  return sorted(BASELINES)


def get_baseline(name: str) -> Baseline:
  """The baseline registered as `name`; raises ValueError listing the valid names."""
  if name not in BASELINES:
    raise ValueError(f"unknown baseline {name!r}; valid baselines: {baseline_names()}")
  return BASELINES[name]
