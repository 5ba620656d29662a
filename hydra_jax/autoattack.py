"""The rest of AutoAttack (Croce & Hein, ICML 2020): the Square attack, FAB-T, and the standard sequence.

`square` (Andriushchenko et al., ECCV 2020) is a score-based black-box attack: random search over square
patches, using only the logits. `fab_targeted` (Croce & Hein, ICML 2020) is the targeted fast adaptive
boundary attack. `autoattack` runs APGD-CE -> APGD-T -> FAB-T -> Square, each attack only on the examples
that the earlier ones left robust (by masking: shapes stay static, an example already broken keeps its
adversarial point), with the counts of the "standard", "plus" and "rand" versions of the authors' code.

Like `hydra_jax.attacks`, everything here is a pure function of `logits_fn(x) -> logits` (eval mode), batched,
with NHWC inputs in [0, 1], and takes `key` as one PRNG key or per-example keys (`attacks.example_keys`):
with per-example keys an example's result does not depend on the batch it is in. Loops are rolled
(`lax.while_loop` / `lax.fori_loop`), so a call compiles into one program whose size does not grow with the
query or iteration count.

Differences from the reference implementations (torchattacks 3.5.1, a port of the authors' code): random
draws are per example (the reference draws one square position per iteration for the whole batch), so the
two agree in distribution, not draw for draw; Square's loss is the margin loss (AutoAttack's choice).

Usage:

  x_adv = jax.jit(lambda x, y, key: autoattack.square(logits_fn, x, y, key=key, eps=8 / 255))(x, y, key)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hydra_jax import attacks

Array = jax.Array
_pe = attacks._per_example


# ----------------------------------------------------------------------------------------------------------
# Square attack.


def square_p_schedule(queries: int, p_init: float, *, rescale: bool = True) -> np.ndarray:
  """The fraction p of pixels a square covers at each query i < `queries` (the authors' `p_selection`).

  p_init, halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 queries (of a 10000-query budget;
  with `rescale` the iteration is first mapped to int(i / queries * 10000), AutoAttack's default).
  """
  bounds = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
  p = np.empty(queries)
  for i in range(queries):
    it = int(i / queries * 10000) if rescale else i
    p[i] = p_init / 2 ** sum(it > b for b in bounds)
  return p


def square_sizes(queries: int, p_init: float, height: int, width: int, norm: str) -> np.ndarray:
  """int32 [queries]: the side of the square at each query, round(sqrt(p * H * W)), at least 1 (l_inf) or an
  odd number of at least 3 (l_2), and at most min(H, W)."""
  sizes = []
  for p in square_p_schedule(queries, p_init):
    s = int(round(math.sqrt(p * height * width)))
    if norm == "linf":
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += s % 2 == 0
    sizes.append(min(s, height, width))
  return np.asarray(sizes, np.int32)


def _eta_rectangles(rows: int, cols: int) -> np.ndarray:
  """Concentric rectangles of weights 1 / (n + 1)^2 around the centre, l2-normalised (the authors' shape)."""
  delta = np.zeros((rows, cols))
  centre_r, centre_c = rows // 2, cols // 2
  for n in range(max(rows // 2 + 1, cols // 2 + 1)):
    r0, c0 = centre_r - n, centre_c - n
    delta[max(r0, 0) : min(r0 + 2 * n + 1, rows), max(c0, 0) : min(c0 + 2 * n + 1, cols)] += 1.0 / (n + 1) ** 2
  norm = np.sqrt(np.sum(delta**2))
  return delta / norm if norm > 0 else delta


def square_eta(size: int) -> np.ndarray:
  """[size, size]: the l_2 Square attack's update shape, +rectangles on the top half and -rectangles on the
  bottom half, l2-normalised (transposed at random by the caller)."""
  delta = np.zeros((size, size))
  delta[: size // 2] = _eta_rectangles(size // 2, size)
  delta[size // 2 :] = -_eta_rectangles(size - size // 2, size)
  return delta / np.sqrt(np.sum(delta**2))


def _window(start_r: Array, start_c: Array, size: Array, height: int, width: int) -> Array:
  """float [B, H, W, 1]: 1 on the size x size squares with top-left corners (start_r, start_c) [B], else 0."""
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_r = (rows[None] >= start_r[:, None]) & (rows[None] < start_r[:, None] + size)
  in_c = (cols[None] >= start_c[:, None]) & (cols[None] < start_c[:, None] + size)
  return (in_r[:, :, None] & in_c[:, None, :])[..., None].astype(jnp.float32)


def _random_corner(key: Array, batch: int, limit: Array) -> Array:
  """int [B]: floor(U(0, 1) * limit), the reference's `random_int(0, limit)`, one draw per example."""
  return jnp.floor(attacks.draw(jax.random.uniform, key, (batch,), jnp.float32) * limit).astype(jnp.int32)


def _random_signs(key: Array, shape: tuple[int, ...], dtype) -> Array:
  return jnp.where(attacks.draw(jax.random.uniform, key, shape, jnp.float32) < 0.5, 1.0, -1.0).astype(dtype)


def _coin(key: Array, batch: int) -> Array:
  """bool [B]: a fair coin per example."""
  return attacks.draw(jax.random.uniform, key, (batch,), jnp.float32) < 0.5


def margin(logits: Array, labels: Array) -> Array:
  """z_y - max_{i != y} z_i per example [B]: <= 0 exactly when the example is misclassified."""
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return attacks._true_logit(logits, labels) - others.max(axis=-1)


def _square_l2_start(key: Array, x: Array, eps: float) -> Array:
  """The l_2 start: a grid of tiles of side H // 5, each an `square_eta` (transposed at random) with a random
  sign per channel, scaled to l2 norm eps."""
  batch, height, width, channels = x.shape
  size = max(height // 5, 1)
  corner = (height - size * 5) // 2
  eta = square_eta(size)
  # Static layout: each pixel's tile (-1 outside every tile) and its offsets inside the tile.
  starts_r = [r for r in range(corner, corner + size * (height // size), size) if r + size <= height]
  starts_c = [c for c in range(corner, corner + size * (width // size), size) if c + size <= width]
  tile, plain, transposed = np.full((height, width), -1), np.zeros((height, width)), np.zeros((height, width))
  for i, r in enumerate(starts_r):
    for j, c in enumerate(starts_c):
      tile[r : r + size, c : c + size] = i * len(starts_c) + j
      plain[r : r + size, c : c + size] = eta
      transposed[r : r + size, c : c + size] = eta.T
  tiles = len(starts_r) * len(starts_c)
  flip_key, sign_key = attacks.split(key)
  flips = attacks.draw(jax.random.uniform, flip_key, (batch, tiles), jnp.float32) < 0.5
  signs = _random_signs(sign_key, (batch, tiles, channels), x.dtype)
  index = jnp.asarray(np.maximum(tile, 0))
  inside = jnp.asarray(tile >= 0)[None, :, :, None]
  shape = jnp.where(flips[:, index], jnp.asarray(transposed, x.dtype), jnp.asarray(plain, x.dtype))  # [B, H, W]
  delta = jnp.where(inside, shape[..., None] * signs[:, index], 0.0)
  delta = delta / _pe(attacks.l2_norm(delta) + 1e-12, x)
  return attacks.clip_box(x + eps * delta)


def _square_run(logits_fn, x, y, key, active, *, eps, norm, queries, p_init):
  """One Square run from a random start on the examples where `active` [B]; returns (x_best, fooled [B]).

  Each query changes one random square per active example and keeps it when the margin loss decreases
  (or the point misclassifies); an example stops (is masked) once misclassified, and the loop ends when
  every example stopped or after `queries` queries (the start counts as one, as in the reference).
  """
  batch, height, width, channels = x.shape
  sizes_np = square_sizes(queries, p_init, height, width, norm)
  sizes = jnp.asarray(sizes_np)
  start_key, key = attacks.split(key)
  if norm == "linf":
    stripes = _random_signs(start_key, (batch, 1, width, channels), x.dtype)
    x_best = attacks.clip_box(x + eps * stripes)
  else:
    distinct = np.unique(sizes_np)
    side = max(height, width)
    table = np.zeros((len(distinct), side, side))
    for j, s in enumerate(distinct):
      table[j, :s, :s] = square_eta(int(s))
    table = jnp.asarray(table, x.dtype)
    size_index = jnp.asarray(np.searchsorted(distinct, sizes_np), jnp.int32)
    x_best = _square_l2_start(start_key, x, eps)
  margin_best = jnp.where(active, margin(logits_fn(x_best), y), -jnp.inf)

  def linf_candidate(i, k, x_best):
    size = sizes[i]
    corner_key, sign_key = attacks.split(k)
    r_key, c_key = attacks.split(corner_key)
    window = _window(
      _random_corner(r_key, batch, height - size), _random_corner(c_key, batch, width - size), size, height, width
    )
    signs = _random_signs(sign_key, (batch, 1, 1, channels), x.dtype)
    return attacks.clip_box(attacks.linf_ball(x_best + window * 2.0 * eps * signs, x, eps))

  def l2_candidate(i, k, x_best):
    size = sizes[i]
    keys = [attacks.fold_in(k, j) for j in range(6)]
    r1, c1 = _random_corner(keys[0], batch, height - size), _random_corner(keys[1], batch, width - size)
    r2, c2 = _random_corner(keys[2], batch, height - size), _random_corner(keys[3], batch, width - size)
    window1, window2 = _window(r1, c1, size, height, width), _window(r2, c2, size, height, width)
    delta = x_best - x
    window_norm = jnp.sqrt(jnp.sum(jnp.square(delta * window1), axis=(1, 2), keepdims=True))  # per channel
    image_norm = _pe(attacks.l2_norm(delta), x)
    windows_norm = _pe(attacks.l2_norm(delta * jnp.maximum(window1, window2)), x)
    eta = table[size_index[i]]  # [side, side], the shape in its top-left corner
    flip = _coin(keys[4], batch)

    def placed(r0, c0, flipped):
      rr = jnp.clip(jnp.arange(height) - r0, 0, side - 1)
      cc = jnp.clip(jnp.arange(width) - c0, 0, side - 1)
      return jnp.where(flipped, eta[cc[None, :], rr[:, None]], eta[rr[:, None], cc[None, :]])

    shape = jax.vmap(placed)(r1, c1, flip)[..., None] * window1  # [B, H, W, 1]
    signs = _random_signs(keys[5], (batch, 1, 1, channels), x.dtype)
    new = shape * signs + delta * window1 / (1e-12 + window_norm)
    new_norm = jnp.sqrt(jnp.sum(jnp.square(new), axis=(1, 2), keepdims=True))
    budget = jnp.sqrt(jnp.maximum(eps**2 - jnp.square(image_norm), 0.0) / channels + jnp.square(windows_norm))
    new = new / (1e-12 + new_norm) * budget
    delta = delta * (1.0 - window2)
    delta = delta * (1.0 - window1) + new * window1
    return attacks.clip_box(x + eps * delta / _pe(attacks.l2_norm(delta) + 1e-12, x))

  candidate = linf_candidate if norm == "linf" else l2_candidate

  def cond(state):
    i, _, margin_best = state
    return (i < queries) & jnp.any(margin_best > 0)

  def body(state):
    i, x_best, margin_best = state
    x_new = candidate(i, attacks.fold_in(key, i), x_best)
    m = margin(logits_fn(x_new), y)
    searching = margin_best > 0
    accept = searching & ((m < margin_best) | (m <= 0))
    return i + 1, jnp.where(_pe(accept, x), x_new, x_best), jnp.where(accept, m, margin_best)

  _, x_best, margin_best = lax.while_loop(cond, body, (jnp.int32(0), x_best, margin_best))
  return x_best, active & (margin_best <= 0)


def square(
  logits_fn: attacks.LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str = "linf",
  queries: int = 5000,
  p_init: float = 0.8,
  restarts: int = 1,
) -> Array:
  """The Square attack (Andriushchenko et al., ECCV 2020), score-based: it queries only the logits.

  Random search on the margin loss z_y - max_{i != y} z_i. l_inf: starts at x + eps * (random sign per
  column and channel) and each query sets a random square of side ~sqrt(p H W) to x +- eps (one sign per
  channel); l_2: starts from a grid of `square_eta` tiles and each query moves the mass of one square to
  another. p starts at p_init and is halved on the authors' schedule (`square_p_schedule`). A change is kept
  when it lowers the margin; an example stops once misclassified. Examples misclassified clean are not
  attacked. Restarts run only on the examples not yet broken.

  Args:
    logits_fn: eval-mode logits function, [B, ...] -> [B, K] (only called forward).
    x: clean inputs [B, H, W, C] in [0, 1].
    y: labels [B] int.
    key: PRNG key or per-example keys [B].
    eps: radius (CIFAR l_inf 8/255, l_2 0.5).
    norm: 'linf' or 'l2'.
    queries: queries per restart (AutoAttack: 5000).
    p_init: initial fraction of pixels a square covers (AutoAttack: 0.8).
    restarts: independent runs (AutoAttack standard: 1).

  Returns:
    x_adv [B, H, W, C] in the eps-ball and the [0, 1] box: a misclassified point where the attack succeeded,
    else x; gradient-stopped.
  """
  attacks._check_norm(norm)
  attacks._check_nonnegative(eps=eps, queries=queries)
  if restarts < 1 or not 0 < p_init <= 1:
    raise ValueError(f"square needs restarts >= 1 and 0 < p_init <= 1, got restarts={restarts}, p_init={p_init}")
  x = lax.stop_gradient(x)
  fooled = jnp.argmax(logits_fn(x), -1) != y  # misclassified clean: nothing to attack
  searching = ~fooled
  x_adv = x
  for r in range(restarts):
    x_run, fooled_run = _square_run(
      logits_fn, x, y, attacks.fold_in(key, r), searching, eps=eps, norm=norm, queries=queries, p_init=p_init
    )
    x_adv = jnp.where(_pe(fooled_run, x), x_run, x_adv)
    searching = searching & ~fooled_run
  return lax.stop_gradient(x_adv)


__all__ = ["margin", "square", "square_eta", "square_p_schedule", "square_sizes"]
