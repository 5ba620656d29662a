"""Minimum-norm attacks and security curves: FMN (Pintor et al., "Fast Minimum-norm Adversarial Attacks through
Adaptive Norm Constraints", NeurIPS 2021), l_inf, l_2 and l_1, as a pure function of `logits_fn`.

A minimum-norm attack returns, per example, the smallest adversarial perturbation it found; robust accuracy at
any eps is then the fraction of examples whose smallest perturbation is larger than eps (`robust_curve`), the
security curve of the Adversarial Pruning Benchmark (Piras et al. 2024) and of the FMN paper, from one attack
run instead of one attack per eps.

FMN follows foolbox 3.3.4's `LInfFMNAttack` / `L2FMNAttack` / `L1FMNAttack` step for step: gradient steps on the logit
difference z_y - max_{j != y} z_j, l2-normalised, with a cosine-annealed step size (max_stepsize to
max_stepsize / 100); the norm constraint epsilon shrinks by (1 - gamma) after an adversarial iterate (never
above the best norm found), grows by (1 + gamma) after a non-adversarial one once one was found, and before
that jumps to |delta| + the linearised distance to the boundary (|margin| / the dual norm of its gradient);
gamma is cosine-annealed to 0.001. l_1 projects onto the l_1 ball by sorting (Duchi et al., ICML 2008). One
difference: foolbox 3.3.4's l_2 projection rescales by norms / norms (= 1, no projection); ours projects onto
the l_2 ball of radius epsilon, as the paper does.

Usage:

  x_adv, norms = jax.jit(lambda x, y: min_norm.fmn(logits_fn, x, y, norm='linf'))(x, y)
  eps_grid, robust = min_norm.robust_curve(norms, np.linspace(0, 16 / 255, 17))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hydra_jax import attacks

Array = jax.Array
NORMS = ("linf", "l2", "l1")
DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}


def _flat_norm(v: Array, p: str) -> Array:
  flat = v.reshape(v.shape[0], -1)
  if p == "linf":
    return jnp.max(jnp.abs(flat), axis=-1)
  if p == "l1":
    return jnp.sum(jnp.abs(flat), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))


def _logit_margin(logits: Array, labels: Array) -> Array:
  """z_y - max_{j != y} z_j per example: negative exactly when misclassified."""
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return attacks._true_logit(logits, labels) - others.max(axis=-1)


def fmn(
  logits_fn: attacks.LogitsFn,
  x: Array,
  y: Array,
  *,
  norm: str = "linf",
  steps: int = 100,
  max_stepsize: float = 1.0,
  min_stepsize: float | None = None,
  gamma: float = 0.05,
) -> tuple[Array, Array]:
  """FMN: each example's smallest adversarial perturbation found, in `norm`.

  Args:
    logits_fn: eval-mode logits function, [B, ...] -> [B, K].
    x: clean inputs [B, H, W, C] in [0, 1].
    y: labels [B] int.
    norm: 'linf', 'l2' or 'l1'.
    steps: iterations (the paper and foolbox: 100; the benchmark's HO-FMN tunes them).
    max_stepsize: initial step size of the l2-normalised gradient step, annealed to min_stepsize.
    min_stepsize: final step size (default max_stepsize / 100).
    gamma: initial rate of the epsilon updates, annealed to 0.001.

  Returns:
    (x_adv [B, H, W, C], norms [B]): the smallest misclassifying point found and its distance to x in `norm`
    (0 for an example misclassified clean, inf where none was found; x_adv = x there), gradient-stopped.
  """
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r} for fmn; valid norms: {list(NORMS)}")
  attacks._check_nonnegative(steps=steps, max_stepsize=max_stepsize, gamma=gamma)
  min_stepsize = max_stepsize / 100 if min_stepsize is None else min_stepsize
  dual = DUAL[norm]
  x = lax.stop_gradient(x)
  batch = x.shape[0]
  worst = _flat_norm(jnp.maximum(x, 1.0 - x), norm)

  def loss_and_grad(x_adv):
    def total(z):
      logits = logits_fn(z)
      margins = _logit_margin(logits, y)
      return -margins.sum(), (logits, margins)

    (_, (logits, margins)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return logits, margins, grad

  def body(i, state):
    delta, best_delta, best_norm, epsilon, found = state
    progress = i / steps
    cosine = (1 + jnp.cos(math.pi * progress)) / 2
    stepsize = min_stepsize + (max_stepsize - min_stepsize) * cosine
    rate = 0.001 + (gamma - 0.001) * cosine
    logits, margins, grad = loss_and_grad(x + delta)
    adversarial = jnp.argmax(logits, -1) != y
    size = _flat_norm(delta, norm)
    better = adversarial & (size <= best_norm)
    found = found | adversarial
    best_norm = jnp.where(better, size, best_norm)
    best_delta = jnp.where(attacks._per_example(better, x), delta, best_delta)
    to_boundary = jnp.abs(margins) / _flat_norm(grad, dual)
    epsilon = jnp.where(
      adversarial,
      jnp.minimum(epsilon * (1 - rate), _flat_norm(best_delta, norm)),
      jnp.where(found, epsilon * (1 + rate), size + to_boundary),
    )
    epsilon = jnp.minimum(epsilon, worst)
    grad_norm = _flat_norm(grad, "l2")
    step = grad / attacks._per_example(jnp.maximum(grad_norm, 1e-12), x) * stepsize
    delta = delta + step
    if norm == "linf":
      delta = jnp.clip(delta, -attacks._per_example(epsilon, x), attacks._per_example(epsilon, x))
    elif norm == "l1":
      delta = project_l1_ball(delta, epsilon)
    else:
      delta_norm = attacks._per_example(jnp.maximum(_flat_norm(delta, "l2"), 1e-12), x)
      delta = delta * jnp.minimum(1.0, attacks._per_example(epsilon, x) / delta_norm)
    delta = jnp.clip(x + delta, 0.0, 1.0) - x
    return delta, best_delta, best_norm, epsilon, found

  zeros = jnp.zeros_like(x)
  state = (zeros, zeros, worst, jnp.full((batch,), jnp.inf, x.dtype), jnp.zeros((batch,), bool))
  _, best_delta, best_norm, _, found = lax.fori_loop(0, steps, body, state)
  x_adv = x + best_delta
  norms = jnp.where(found, best_norm, jnp.inf)
  return lax.stop_gradient(x_adv), lax.stop_gradient(norms)


def project_l1_ball(delta: Array, radius: Array) -> Array:
  """The Euclidean projection of each example's delta [B, ...] onto the l_1 ball of its radius [B] (Duchi et
  al., ICML 2008): sign(delta) * max(|delta| - theta, 0), theta chosen so that the l_1 norm is the radius;
  examples already inside their ball are unchanged."""
  flat = delta.reshape(delta.shape[0], -1)
  magnitudes = jnp.abs(flat)
  descending = -jnp.sort(-magnitudes, axis=-1)
  cumulative = jnp.cumsum(descending, axis=-1)
  ranks = jnp.arange(1, flat.shape[1] + 1, dtype=flat.dtype)
  radius = radius[:, None]
  # The number of entries that stay nonzero: the largest rank r with descending[r] > (cumulative[r] - radius) / r.
  support = jnp.sum(descending * ranks > cumulative - radius, axis=-1, keepdims=True)
  support = jnp.maximum(support, 1)
  theta = (jnp.take_along_axis(cumulative, support - 1, axis=-1) - radius) / support
  projected = jnp.sign(flat) * jnp.maximum(magnitudes - theta, 0.0)
  inside = jnp.sum(magnitudes, axis=-1, keepdims=True) <= radius
  return jnp.where(inside, flat, projected).reshape(delta.shape)


def robust_curve(norms: np.ndarray, eps: np.ndarray) -> np.ndarray:
  """Robust accuracy at each eps [E] from per-example smallest adversarial norms [N] (inf: none found; 0:
  misclassified clean): the fraction of examples whose norm exceeds eps. At eps = 0 the clean accuracy."""
  norms, eps = np.asarray(norms, np.float64), np.asarray(eps, np.float64)
  return (norms[None, :] > eps[:, None]).mean(axis=1)
