"""The rest of AutoAttack (Croce & Hein, ICML 2020): the Square attack, FAB-T, and the standard sequence.

`square` (Andriushchenko et al., ECCV 2020) is a score-based black-box attack: random search over square
patches, using only the logits. `fab_targeted` (Croce & Hein, ICML 2020) is the targeted fast adaptive
boundary attack. `autoattack` runs APGD-CE -> APGD-T -> FAB-T -> Square, each attack only on the examples
that the earlier ones left robust (gathered into chunks, chunks without one skipped: shapes stay static and
the work follows the robust count; an example already broken keeps its adversarial point), with the counts of
the "standard", "plus" and "rand" versions of the authors' code.

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
from collections.abc import Callable

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


# ----------------------------------------------------------------------------------------------------------
# FAB (fast adaptive boundary attack).


def _project_linf(t: Array, w: Array, b: Array) -> Array:
  """One example: the smallest l_inf step d with w . (t + d) = b and t + d in [0, 1]^D (flat [D] vectors).

  Where the box does not reach the hyperplane, the step to the box corner that goes furthest towards it.
  The authors' sort-and-bisect algorithm (FAB's `projection_linf`).
  """
  dim = t.shape[0]
  sign = jnp.where(jnp.dot(w, t) - b >= 0, 1.0, -1.0)
  w, b = w * sign, b * sign
  a = (w < 0).astype(t.dtype)
  nonzero = (w != 0).astype(t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2 * a - 1)  # distance to the box face the step moves towards
  order = jnp.argsort(p)
  b = b - jnp.dot(w, t)
  b0 = jnp.dot(w, d)
  descending = order[::-1]
  ws = w[descending]
  s = jnp.cumsum(jnp.abs(ws))
  sb = jnp.cumsum(-ws * d[descending]) + b0
  b2 = sb[-1] - s[-1] * p[order[0]]
  whole = b - b2 > 0
  partial = (b - b0 > 0) & ~whole

  def bisect(_, bounds):
    lb, ub = bounds
    mid = jnp.floor((lb + ub) / 2).astype(jnp.int32)
    current = order[dim - 1 - mid]
    c = b - (sb[mid] - s[mid] * p[current]) > 0
    return jnp.where(c, mid, lb), jnp.where(c, ub, mid)

  lb, _ = lax.fori_loop(0, math.ceil(math.log2(dim)), bisect, (jnp.int32(0), jnp.int32(dim - 1)))
  lam_whole = jnp.maximum((b - sb[-1]) / -s[-1], 0.0)
  lam_partial = jnp.maximum((b - sb[lb]) / -s[lb], 0.0)
  d_whole = (2 * a - 1) * lam_whole
  d_partial = jnp.minimum(lam_partial, d) * a + jnp.maximum(-lam_partial, d) * (1 - a)
  d = jnp.where(whole, d_whole, jnp.where(partial, d_partial, d))
  return d * nonzero


def _project_l2(t: Array, w: Array, b: Array) -> Array:
  """One example: the smallest l_2 step d with w . (t + d) = b and t + d in [0, 1]^D (flat [D] vectors), or
  the box's best effort where it does not reach the hyperplane (FAB's `projection_l2`)."""
  dim = t.shape[0]
  big = 1e12
  c = jnp.dot(w, t) - b
  sign = jnp.where(c >= 0, 1.0, -1.0)
  w, c = w * sign, c * sign
  nonzero = jnp.abs(w) > 1e-8
  safe_w = jnp.where(nonzero, w, 1.0)
  r = jnp.clip(jnp.maximum(t / safe_w, (t - 1) / safe_w), -big, big)
  r = jnp.where(nonzero & (r != -big), r, big)
  order = jnp.argsort(r)
  rs = r[order]
  rs2 = jnp.concatenate([rs[1:], jnp.zeros((1,), r.dtype)])
  rs, rs2 = jnp.where(rs == big, 0.0, rs), jnp.where(rs2 == big, 0.0, rs2)
  w3s = jnp.square(w)[order]
  w5 = jnp.sum(w3s)
  ws = w5 - jnp.cumsum(w3s)
  d = jnp.where(nonzero, -(r * w), 0.0)
  s = jnp.concatenate([-w5 * rs[:1], jnp.cumsum((rs - rs2) * ws) - w5 * rs[0]])
  c4 = s[0] + c < 0
  c3 = jnp.dot(d, w) + c > 0
  c2 = ~(c4 | c3)

  def bisect(_, bounds):
    lb, ub = bounds
    mid = jnp.floor((lb + ub) / 2).astype(jnp.int32)
    above = s[mid] + c > 0
    return jnp.where(above, mid, lb), jnp.where(above, ub, mid)

  lb, _ = lax.fori_loop(0, math.ceil(math.log2(dim)), bisect, (jnp.int32(0), jnp.int32(dim - 1)))
  d_c4 = -(c / w5) * w
  alpha = jnp.where(ws[lb] == 0, 0.0, (s[lb] + c) / jnp.where(ws[lb] == 0, 1.0, ws[lb]) + rs[lb])
  d_c2 = jnp.where(alpha > r, d, -alpha * w)
  d = jnp.where(c4, d_c4, jnp.where(c2, d_c2, d))
  return jnp.where(nonzero, d, 0.0)


_PROJECTIONS = {"linf": _project_linf, "l2": _project_l2}
_FLAT_NORMS = {"linf": lambda v: jnp.max(jnp.abs(v), axis=-1), "l2": lambda v: jnp.sqrt(jnp.sum(jnp.square(v), -1))}
_DUAL_NORMS = {"linf": lambda v: jnp.sum(jnp.abs(v), axis=-1), "l2": _FLAT_NORMS["l2"]}


def _fab_linearisation(logits_fn, x1, y, target):
  """df [B, K'] and dg [B, K', D]: differences of logits to the true one and their gradients, for every class
  (target None; the true class gets df = 1e10) or for the target class only (K' = 1)."""
  batch = x1.shape[0]
  if target is not None:

    def diff(z):
      logits = logits_fn(z)
      values = attacks._true_logit(logits, target) - attacks._true_logit(logits, y)
      return values.sum(), values

    grad, df = jax.grad(diff, has_aux=True)(x1)
    return df[:, None], grad.reshape(batch, 1, -1)
  logits, vjp = jax.vjp(logits_fn, x1)
  classes = logits.shape[-1]
  grads = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(jnp.eye(classes, dtype=logits.dtype))
  grads = jnp.moveaxis(grads.reshape(classes, batch, -1), 0, 1)  # [B, K, D]
  df = logits - attacks._true_logit(logits, y)[:, None]
  dg = grads - jnp.take_along_axis(grads, y[:, None, None], axis=1)
  df = jnp.where(jax.nn.one_hot(y, classes, dtype=bool), 1e10, df)
  return df, dg


def _fab_run(logits_fn, x, y, target, key, active, *, norm, eps, steps, alpha_max, eta, beta, random_start):
  """One FAB run (from x, or from a random point at eps / 2 where the traced bool `random_start`) on the
  examples where `active`; returns (x_adv, the smallest adversarial norm found [B],
  1e10 where none). Masked examples are computed but never change."""
  batch = x.shape[0]
  flat = x.reshape(batch, -1)
  project = jax.vmap(_PROJECTIONS[norm])
  size = _FLAT_NORMS[norm]
  if norm == "linf":
    t = attacks.draw(jax.random.uniform, key, flat.shape, x.dtype, -1.0, 1.0)
  else:
    t = attacks.draw(jax.random.normal, key, flat.shape, x.dtype)
  x1 = jnp.where(random_start, jnp.clip(flat + 0.5 * eps * t / size(t)[:, None], 0.0, 1.0), flat)
  shape = x.shape

  def body(_, state):
    x1, adv, best = state
    df, dg = _fab_linearisation(logits_fn, x1.reshape(shape), y, target)
    dist = jnp.abs(df) / (1e-12 + _DUAL_NORMS[norm](dg))
    closest = jnp.argmin(dist, axis=1)
    w = jnp.take_along_axis(dg, closest[:, None, None], axis=1)[:, 0]
    df_closest = jnp.take_along_axis(df, closest[:, None], axis=1)[:, 0]
    b = -df_closest + jnp.sum(w * x1, axis=-1)
    d1, d2 = project(x1, w, b), project(flat, w, b)
    a1, a2 = jnp.maximum(size(d1), 1e-8), jnp.maximum(size(d2), 1e-8)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x_new = jnp.clip((x1 + eta * d1) * (1 - alpha) + (flat + eta * d2) * alpha, 0.0, 1.0)
    wrong = active & (jnp.argmax(logits_fn(x_new.reshape(shape)), -1) != y)
    distance = size(x_new - flat)
    better = wrong & (distance < best)
    adv = jnp.where(better[:, None], x_new, adv)
    best = jnp.where(better, distance, best)
    x_new = jnp.where(wrong[:, None], flat + (x_new - flat) * beta, x_new)
    return jnp.where(active[:, None], x_new, x1), adv, best

  state = (x1, flat, jnp.full((batch,), 1e10, x.dtype))
  _, adv, best = lax.fori_loop(0, steps, body, state)
  return adv.reshape(shape), best


def fab(
  logits_fn: attacks.LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str = "linf",
  steps: int = 100,
  num_targets: int = 9,
  targeted: bool = True,
  restarts: int = 1,
  alpha_max: float = 0.1,
  eta: float = 1.05,
  beta: float = 0.9,
) -> Array:
  """FAB (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack",
  ICML 2020); targeted (FAB-T, AutoAttack's) by default.

  Each step linearises the decision boundary towards the target class (FAB-T) or the closest class (FAB),
  projects both the iterate and the clean point onto it inside the [0, 1] box (`_project_linf` /
  `_project_l2`), and moves to a convex combination of the two (weight at most alpha_max on the clean
  side), extrapolated by eta; after a misclassifying step the iterate is pulled back towards x by beta.
  FAB-T runs once per target, the classes of the 2nd to (num_targets + 1)-th largest clean logit, each only
  on the examples still robust; restart r > 0 starts at a random point at eps / 2. An example counts as
  broken when the smallest misclassifying point found is within eps.

  Args:
    logits_fn: eval-mode logits function, [B, ...] -> [B, K].
    x: clean inputs [B, H, W, C] in [0, 1].
    y: labels [B] int.
    key: PRNG key or per-example keys [B] (used by restarts after the first).
    eps: the threat model's radius.
    norm: 'linf' or 'l2'.
    steps: iterations per run (AutoAttack: 100).
    num_targets: target classes for FAB-T (AutoAttack: 9), capped at K - 1.
    targeted: FAB-T (True) or the untargeted FAB, which linearises every class (K backward passes a step).
    restarts: runs per target (AutoAttack standard: 1; plus: 5 for the untargeted FAB).
    alpha_max, eta, beta: the authors' step parameters (0.1, 1.05, 0.9).

  Returns:
    x_adv [B, H, W, C]: the smallest misclassifying point found where it lies in the eps-ball, else x;
    gradient-stopped.
  """
  attacks._check_norm(norm)
  attacks._check_nonnegative(eps=eps, steps=steps)
  if restarts < 1 or num_targets < 1:
    raise ValueError(f"fab needs restarts and num_targets >= 1, got {restarts} and {num_targets}")
  x = lax.stop_gradient(x)
  clean_logits = logits_fn(x)
  searching = jnp.argmax(clean_logits, -1) == y
  ranked = jnp.argsort(-clean_logits, axis=-1)
  runs = min(num_targets, clean_logits.shape[-1] - 1) * restarts if targeted else restarts

  def body(j, state):
    x_adv, searching = state
    target = lax.dynamic_index_in_dim(ranked, 1 + j // restarts, axis=1, keepdims=False) if targeted else None
    run_adv, distance = _fab_run(
      logits_fn,
      x,
      y,
      target,
      attacks.fold_in(key, j),
      searching,
      norm=norm,
      eps=eps,
      steps=steps,
      alpha_max=alpha_max,
      eta=eta,
      beta=beta,
      random_start=(j % restarts) > 0,
    )
    broken = searching & (distance <= eps)
    return jnp.where(_pe(broken, x), run_adv, x_adv), searching & ~broken

  x_adv, _ = lax.fori_loop(0, runs, body, (x, searching))
  return lax.stop_gradient(x_adv)


# ----------------------------------------------------------------------------------------------------------
# The AutoAttack sequence.

# The attacks of each version of the authors' AutoAttack (`autoattack.py`, `set_version`), in their order, and
# their restarts. 'rand' is for randomised defences: the authors run APGD with EOT over 20 draws of the model,
# which `autoattack(..., eot_iter=20)` does for a randomised `logits_fn(x, key)`; hydra_jax's eval-mode models
# are deterministic, where that average is the gradient itself, so the evaluation methods run one draw.
VERSIONS = {
  "standard": (("apgd_ce", 1), ("apgd_t", 1), ("fab_t", 1), ("square", 1)),
  "plus": (("apgd_ce", 5), ("apgd_dlr", 5), ("fab", 5), ("square", 1), ("apgd_t", 1), ("fab_t", 1)),
  "rand": (("apgd_ce", 1), ("apgd_dlr", 1)),
}
BLACK_BOX = ("square",)
# The per-example columns of a run, in reading order: the stages as in the standard sequence, then 'masking'.
COLUMN_ORDER = {
  name: i for i, name in enumerate(("apgd_ce", "apgd_dlr", "apgd_t", "fab", "fab_t", "square", "masking"))
}


def version_attacks(version: str) -> tuple[tuple[str, int], ...]:
  """The (attack, restarts) sequence of an AutoAttack `version`; raises ValueError listing the versions."""
  if version not in VERSIONS:
    raise ValueError(f"unknown AutoAttack version {version!r}; valid versions: {sorted(VERSIONS)}")
  return VERSIONS[version]


def _stage_attack(name, restarts, *, eps, norm, apgd_steps, fab_steps, square_queries, num_targets, p_init, eot_iter):
  """`attack(logits_fn, x, y, key) -> x_adv` for one stage of the sequence."""
  common = dict(eps=eps, norm=norm)
  if name in ("apgd_ce", "apgd_dlr"):
    loss = name.removeprefix("apgd_")
    return lambda f, x, y, k: attacks.apgd(
      f, x, y, key=k, steps=apgd_steps, loss=loss, restarts=restarts, eot_iter=eot_iter, **common
    )
  if name == "apgd_t":
    return lambda f, x, y, k: attacks.apgd_targeted(
      f, x, y, key=k, steps=apgd_steps, num_targets=num_targets, restarts=restarts, **common
    )
  if name in ("fab", "fab_t"):
    return lambda f, x, y, k: fab(
      f, x, y, key=k, steps=fab_steps, num_targets=num_targets, targeted=name == "fab_t", restarts=restarts, **common
    )
  return lambda f, x, y, k: square(f, x, y, key=k, queries=square_queries, p_init=p_init, restarts=restarts, **common)


def _on_robust_chunks(
  run: Callable[[Array, Array, Array], Array], x: Array, y: Array, key: Array, robust: Array, chunk: int
) -> Array:
  """`run(x, y, key) -> x_adv` on the examples where `robust` [B] only, in chunks of `chunk` examples.

  The robust examples go first (in batch order) and a chunk with no robust example is skipped (`lax.cond`), so
  with R robust examples the attack runs on ceil(R / chunk) chunks instead of the whole batch, as the
  reference drops broken examples between attacks. The result for an example that is not robust is
  unspecified. Needs per-example keys (the attack's result for an example then does not depend on its chunk);
  a chunk of 0 or at least the batch runs the whole batch, skipped when no example is robust.

  Args:
    run: the attack, [b, H, W, C], [b], keys -> [b, H, W, C], traced once for the chunk's shape.
    x, y, key: inputs [B, H, W, C], labels [B], per-example keys [B] (or one key when unchunked).
    robust: bool [B].
    chunk: examples per chunk.

  Returns:
    x_adv [B, H, W, C].
  """
  batch = x.shape[0]
  if not chunk or chunk >= batch:
    return lax.cond(jnp.any(robust), lambda: run(x, y, key), lambda: x)
  chunks = -(-batch // chunk)
  order = jnp.argsort(~robust, stable=True)  # robust first
  padding = chunks * chunk - batch
  index = jnp.concatenate([order, jnp.broadcast_to(order[-1], (padding,))])  # padded with a non-robust one
  active = jnp.concatenate([robust[order], jnp.zeros((padding,), bool)])
  grouped = lambda a: a[index].reshape((chunks, chunk) + a.shape[1:])

  def one(operands):
    xc, yc, kc, ac = operands
    return lax.cond(jnp.any(ac), lambda: run(xc, yc, kc), lambda: xc)

  x_adv = lax.map(one, (grouped(x), grouped(y), grouped(key), active.reshape(chunks, chunk)))
  return jnp.zeros_like(x).at[order].set(x_adv.reshape((chunks * chunk,) + x.shape[1:])[:batch])


def autoattack(
  logits_fn: attacks.LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str = "linf",
  version: str = "standard",
  apgd_steps: int = 100,
  fab_steps: int = 100,
  square_queries: int = 5000,
  num_targets: int = 9,
  p_init: float = 0.8,
  eot_iter: int = 1,
  chunk_size: int = 0,
) -> tuple[Array, dict[str, Array]]:
  """AutoAttack (Croce & Hein, ICML 2020): its `version`'s attacks in sequence, each only on the examples that
  every earlier one left robust.

  standard: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), one run each, 100
  iterations; plus: APGD-CE and APGD-DLR with 5 restarts, FAB with 5, Square, APGD-T, FAB-T; rand: APGD-CE,
  APGD-DLR (see `VERSIONS`). An example's adversarial point is taken from the first attack that misclassifies
  it; later attacks skip it, as the reference's do, and so do all attacks for an example misclassified clean:
  each attack runs on the examples still robust, gathered first, in chunks of `chunk_size`, and a chunk with
  none is skipped (`lax.cond`), so the work follows the robust count (`_on_robust_chunks`). An example's result
  depends only on its own key (one key is turned into per-example keys by `attacks.example_keys` when the batch
  is chunked). Stage s draws from fold_in(key, s).

  Args:
    logits_fn: eval-mode logits function, [B, ...] -> [B, K].
    x: clean inputs [B, H, W, C] in [0, 1].
    y: labels [B] int.
    key: PRNG key or per-example keys [B].
    eps: radius (CIFAR l_inf 8/255, l_2 0.5).
    norm: 'linf' or 'l2'.
    version: 'standard', 'plus' or 'rand'.
    apgd_steps, fab_steps, square_queries, num_targets, p_init: the paper's counts by default (100, 100,
      5000, 9, 0.8); smaller values for quick checks.
    eot_iter: for a randomised defence (version 'rand', whose attacks are APGD only): with eot_iter > 1,
      `logits_fn` is `(x, key) -> logits` drawing its randomness from key (one key or per-example keys, as
      given here; see `attacks.draw`), APGD averages each gradient over eot_iter draws (the authors: 20), and
      the clean and per-stage misclassification checks read one draw each.
    chunk_size: examples per chunk of the robust examples each attack runs on (0: the backend's attack chunk,
      `backend_knobs`: 32 on CPU, the whole batch elsewhere). A chunk as large as the batch runs the attack on
      the whole batch, skipped only when no example is robust.

  Returns:
    (x_adv [B, H, W, C], robust): robust maps each stage's name to bool [B], correct clean and under every
    attack up to and including that stage, and 'masking' to bool [B], the examples a black-box stage broke
    that every white-box stage before it left robust (the symptom of gradient masking).
  """
  attacks._check_norm(norm)
  stages = version_attacks(version)
  if eot_iter < 1:
    raise ValueError(f"eot_iter must be >= 1, got {eot_iter}")
  if eot_iter > 1 and any(not name.startswith("apgd_") or name == "apgd_t" for name, _ in stages):
    raise ValueError(f"eot_iter > 1 needs an APGD-CE/DLR-only version ('rand'), got version {version!r}")
  chunk = attacks.auto_chunk_size(chunk_size)
  if chunk and chunk < x.shape[0] and not attacks._is_per_example(key):
    key = attacks.example_keys(key, jnp.arange(x.shape[0]))  # an example's draws must follow it into its chunk
  check_key = attacks.fold_in(key, len(stages))  # the misclassification checks' draws
  if eot_iter > 1:
    random_logits_fn = logits_fn
    predict = lambda z, s: jnp.argmax(random_logits_fn(z, attacks.fold_in(check_key, s)), -1)
  else:
    predict = lambda z, s: jnp.argmax(logits_fn(z), -1)
  x = lax.stop_gradient(x)
  robust = predict(x, len(stages)) == y
  x_adv, results = x, {}
  masking = jnp.zeros_like(robust)
  for s, (name, restarts) in enumerate(stages):
    attack = _stage_attack(
      name,
      restarts,
      eps=eps,
      norm=norm,
      apgd_steps=apgd_steps,
      fab_steps=fab_steps,
      square_queries=square_queries,
      num_targets=num_targets,
      p_init=p_init,
      eot_iter=eot_iter,
    )
    run = lambda x, y, k, attack=attack: attack(logits_fn, x, y, k)
    candidate = _on_robust_chunks(run, x, y, attacks.fold_in(key, s), robust, chunk)
    broken = robust & (predict(candidate, s) != y)
    if name in BLACK_BOX:
      masking = masking | broken
    x_adv = jnp.where(_pe(broken, x), candidate, x_adv)
    robust = robust & ~broken
    results[name] = robust
  results["masking"] = masking
  return lax.stop_gradient(x_adv), results
