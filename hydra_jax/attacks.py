"""White-box attacks on a pure logits function: PGD, Auto-PGD and the TRADES inner maximisation.

Every attack takes `logits_fn(x) -> logits`, a pure closure over already-masked parameters with BatchNorm
in eval mode (the reference runs its training-time attacks in `model.eval()` too), and returns adversarial
inputs with `stop_gradient` applied. Inputs are NHWC floats in [0, 1]; `eps` and step sizes are in the same
pixel units (8/255 is eight grey levels). Attacks are batched and free of Python-level iteration at run
time: call them inside `jax.jit` and each compiles into one program. Their loops are `lax.fori_loop`s whose
`unroll` argument chooses between a rolled loop and straight-line code (see `DEFAULT_UNROLL`).

Examples do not interact in eval mode, so a caller may hand the attacks `in_chunks(logits_fn, size)`, which runs
the forward and backward passes on batch chunks (the training objectives and `evaluate` do, 32 examples per
chunk on CPU, where it is faster: `hydra_jax.backend_knobs`, the table of speed-only choices per backend that
this module shares with the layers, and the one module of the project it imports).

Attacks are composed from small pieces, in the style of deepmind-research `adversarial_robustness`:
per-example losses (`cross_entropy`, `dlr`, `targeted_dlr`, `kl_divergence`), steps (`sign_step`,
`l2_step`), projections (`linf_ball`, `l2_ball`, `clip_box`, `projection`) and a shared ascent loop
(`iterate`).

Usage:

  logits_fn = lambda x: apply_fn(variables, x, False)[0]   # eval mode, masked params
  attack = jax.jit(lambda x, y, key: attacks.pgd(
      logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=10))
  x_adv = attack(images, labels, jax.random.key(0))

CIFAR settings: training PGD uses eps 8/255, step 2/255, 10 steps (the reference's defaults); evaluation
uses more steps and restarts (e.g. PGD-50 with restarts) and Auto-PGD (`apgd`, `apgd_targeted`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hydra_jax import backend_knobs

Array = jax.Array
LogitsFn = Callable[[Array], Array]
# A per-example loss: (logits [B, K], target) -> [B]. `target` is labels [B] or any pytree the loss reads.
LossFn = Callable[[Array, Any], Array]

# Chosen by measurement (`python -m benchmarks.bench_attacks`, 2-core CPU, flax's nn.Conv models): PGD-10 as
# straight-line code ran 3.8x (small CNN, batch 64) and 6.6x (narrow ResNet-18, batch 16) faster than as a
# rolled while loop. The cause is XLA:CPU: it moves a convolution onto its fast (Eigen) kernels only in the HWIO
# kernel layout and rewrites other layouts into it only at a program's top level, and autodiff's input gradient
# of a convolution has swapped kernel labels. hydra_jax's `layers.conv2d` writes that gradient in the HWIO layout
# (`layers.input_grad`), so for the zoo's models rolled loops run at the unrolled rate (ResNet-18, batch 32:
# PGD-3 rolled 1.42 s, unrolled 1.52 s; before: 6.66 vs 1.96 s) with the same results; `apgd`, `apgd_targeted`
# and evaluation's PGD (`evaluate`) use rolled loops, whose compile time does not grow with the steps. Training
# attacks (TRADES-10, PGD-10) keep this default, as measured for models built from flax's own layers.
DEFAULT_UNROLL = True
NORMS = ("linf", "l2")


# ----------------------------------------------------------------------------------------------------------
# Losses: per-example, to be maximised by the attacker.


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy, [B, K] x [B] -> [B] (nats)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _true_logit(logits: Array, labels: Array) -> Array:
  return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _check_classes(logits: Array, needed: int, loss: str) -> None:
  if logits.shape[-1] < needed:
    raise ValueError(f"loss {loss!r} needs at least {needed} classes, got {logits.shape[-1]}")


def dlr(logits: Array, labels: Array) -> Array:
  """Difference-of-logits-ratio loss (Croce & Hein 2020, eq. 5), [B, K] x [B] -> [B].

  DLR = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), with z_pi the logits sorted in decreasing order.
  Positive exactly when the example is misclassified; invariant to shifting and scaling the logits.
  """
  _check_classes(logits, 3, "dlr")
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  top = jnp.sort(logits, axis=-1)
  margin = _true_logit(logits, labels) - others.max(axis=-1)
  return -margin / (top[:, -1] - top[:, -3] + 1e-12)


def targeted_dlr(logits: Array, labels: Array, target_labels: Array) -> Array:
  """Targeted DLR loss (Croce & Hein 2020, eq. 6), [B, K] x [B] x [B] -> [B].

  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): pushes the target logit z_t above the true one.
  """
  _check_classes(logits, 4, "targeted_dlr")
  top = jnp.sort(logits, axis=-1)
  margin = _true_logit(logits, labels) - _true_logit(logits, target_labels)
  return -margin / (top[:, -1] - 0.5 * (top[:, -3] + top[:, -4]) + 1e-12)


def kl_divergence(logits: Array, target_probs: Array) -> Array:
  """KL(p || softmax(logits)) per example, [B, K] x [B, K] -> [B] (nats).

  This is what PyTorch's `KLDivLoss(log_softmax(logits), p)` sums, i.e. the TRADES robust loss with
  p = softmax(f(x)) and logits = f(x_adv).
  """
  log_q = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jax.scipy.special.xlogy(target_probs, target_probs) - target_probs * log_q, axis=-1)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "dlr": dlr}


def get_loss(loss: str | LossFn) -> LossFn:
  """Returns the per-example loss named `loss` ('ce' or 'dlr'); a callable is returned unchanged."""
  if callable(loss):
    return loss
  if loss not in LOSSES:
    raise ValueError(f"unknown attack loss {loss!r}; valid names: {sorted(LOSSES)}")
  return LOSSES[loss]


# ----------------------------------------------------------------------------------------------------------
# Random keys: one for the batch, or one per example.
#
# Every attack takes `key`: a PRNG key, whose draws cover the batch at once, or one key per example [B]
# (`example_keys`), whose example i draws only from key[i]. With per-example keys derived from positions in
# the global batch, an example's random start does not depend on the batch it is in: not on the device
# count of a data-parallel step, nor on chunking. (This holds for threefry keys, JAX's default and
# `jax.random.PRNGKey`'s; the 'rbg' implementation draws differently under vmap than alone.)


def example_keys(key: Array, positions: Array) -> Array:
  """One key per example: fold_in(key, positions[i]) for int positions [B] (e.g. in the global batch)."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, positions)


def _is_per_example(key: Array) -> bool:
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)


def fold_in(key: Array, data: int | Array) -> Array:
  """`jax.random.fold_in` of a key, or of each of the per-example keys [B]."""
  if _is_per_example(key):
    return jax.vmap(jax.random.fold_in, (0, None))(key, data)
  return jax.random.fold_in(key, data)


def split(key: Array) -> tuple[Array, Array]:
  """Two keys from one (`jax.random.split`), or two sets of per-example keys from per-example keys."""
  if _is_per_example(key):
    return fold_in(key, 0), fold_in(key, 1)
  first, second = jax.random.split(key)
  return first, second


def draw(sampler: Callable[..., Array], key: Array, shape: tuple[int, ...], dtype: Any, *args: Any) -> Array:
  """`sampler(key, shape, dtype, *args)` (e.g. jax.random.normal) for a batch [B, ...]: at once from one
  key, or example i's row [...] from key[i] when the keys are per example."""
  if _is_per_example(key):
    return jax.vmap(lambda k: sampler(k, shape[1:], dtype, *args))(key)
  return sampler(key, shape, dtype, *args)


# ----------------------------------------------------------------------------------------------------------
# Norms, steps and projections. Every function works per example on [B, ...] arrays.


def _per_example(values: Array, x: Array) -> Array:
  """Reshapes per-example values [B] to broadcast against x [B, ...]."""
  return values.reshape((-1,) + (1,) * (x.ndim - 1))


def l2_norm(v: Array) -> Array:
  """Per-example l2 norm over all non-batch axes, [B, ...] -> [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))))


def linf_norm(v: Array) -> Array:
  """Per-example l_inf norm over all non-batch axes, [B, ...] -> [B]."""
  return jnp.max(jnp.abs(v), axis=tuple(range(1, v.ndim)))


def sign_step(x_adv: Array, grad: Array, step_size: float | Array) -> Array:
  """Steepest l_inf ascent step: x + step_size * sign(grad)."""
  return x_adv + step_size * jnp.sign(grad)


def l2_step(x_adv: Array, grad: Array, step_size: float | Array, key: Array | None = None) -> Array:
  """Steepest l2 ascent step: x + step_size * grad / ||grad||_2 per example.

  A zero gradient gives a zero step, or, when `key` is given, a step along a standard-normal draw (the
  reference TRADES l_2 attack replaces zero-norm gradients by N(0, I) so that the step never divides by 0).
  """
  norm = _per_example(l2_norm(grad), grad)
  direction = jnp.where(norm > 0, grad / jnp.where(norm > 0, norm, 1.0), 0.0)
  if key is not None:
    direction = jnp.where(norm > 0, direction, draw(jax.random.normal, key, grad.shape, grad.dtype))
  return x_adv + step_size * direction


def linf_ball(x_adv: Array, x: Array, eps: float) -> Array:
  """Projects x_adv onto the l_inf ball of radius eps around x."""
  return x + jnp.clip(x_adv - x, -eps, eps)


def l2_ball(x_adv: Array, x: Array, eps: float) -> Array:
  """Projects x_adv onto the l2 ball of radius eps around x (per-example rescaling of x_adv - x)."""
  delta = x_adv - x
  norm = _per_example(l2_norm(delta), delta)
  return x + delta * jnp.minimum(1.0, eps / jnp.maximum(norm, 1e-12))


def clip_box(x: Array, low: float = 0.0, high: float = 1.0) -> Array:
  """Clips to the valid pixel box [low, high]."""
  return jnp.clip(x, low, high)


def projection(norm: str, eps: float, *, box_first: bool = False) -> Callable[[Array, Array], Array]:
  """Returns `project(x_adv, x)`: onto the `norm` ball of radius eps and the [0, 1] box.

  The ball is applied first unless `box_first` (the reference TRADES l_2 attack clamps first, then
  renormalises). Either order lands in the intersection: clipping only shrinks |x_adv - x| coordinate-wise
  and shrinking x_adv - x keeps a point between x and a point of the box.
  """
  ball = {"linf": linf_ball, "l2": l2_ball}[_check_norm(norm)]
  if box_first:
    return lambda x_adv, x: ball(clip_box(x_adv), x, eps)
  return lambda x_adv, x: clip_box(ball(x_adv, x, eps))


def _check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; valid norms: {list(NORMS)}")
  return norm


def _check_nonnegative(**values: float) -> None:
  """Checks Python numbers (traced values, e.g. an eps passed through jit, are not checked)."""
  for name, value in values.items():
    if isinstance(value, (int, float, np.number)) and value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Batch chunks.


def auto_chunk_size(chunk_size: int, backend: str | None = None) -> int:
  """`chunk_size` itself when positive; for 0 the `attack_chunk` of `backend`'s knobs (default: JAX's backend;
  `backend_knobs.current`), 0 (the whole batch) if none."""
  if chunk_size < 0:
    raise ValueError(f"chunk_size must be >= 0 (0: chosen per backend), got {chunk_size}")
  if chunk_size:
    return chunk_size
  return backend_knobs.current(backend).attack_chunk


def in_chunks(logits_fn: LogitsFn, chunk_size: int) -> LogitsFn:
  """`logits_fn` applied to consecutive chunks of `chunk_size` examples (the last may be smaller), concatenated.

  For a per-example `logits_fn` (BatchNorm in eval mode, as every attack here sees it) the logits and their
  gradients, which autodiff also splits by chunk, are those of `logits_fn` on the whole batch up to float
  rounding. On CPU, XLA's convolutions run faster on chunks of 16-32 images than on a batch of 128 (see
  `backend_knobs.KNOBS`). chunk_size=0 picks `auto_chunk_size`; a chunk as large as the batch changes nothing.
  The whole chunks run as one `lax.map` (one copy of the model in the program, so compile time does not grow
  with the number of chunks), a smaller last chunk as one more call.

  Args:
    logits_fn: [B, ...] -> [B, K], per example.
    chunk_size: examples per chunk (> 0), or 0 for the backend's default.

  Returns:
    The chunked function, [B, ...] -> [B, K].
  """
  size = auto_chunk_size(chunk_size)

  def chunked(x: Array) -> Array:
    if not size or size >= x.shape[0]:
      return logits_fn(x)
    whole = x.shape[0] // size * size
    chunks = x[:whole].reshape((whole // size, size) + x.shape[1:])
    logits = lax.map(logits_fn, chunks)
    logits = logits.reshape((whole,) + logits.shape[2:])
    return logits if whole == x.shape[0] else jnp.concatenate([logits, logits_fn(x[whole:])])

  return chunked


# ----------------------------------------------------------------------------------------------------------
# Random starts.


def uniform_linf_start(key: Array, x: Array, eps: float) -> Array:
  """x + U(-eps, eps), not clipped (the reference's `pgd_whitebox` start, clipped by its first step)."""
  return x + draw(jax.random.uniform, key, x.shape, x.dtype, -eps, eps)


def uniform_l2_start(key: Array, x: Array, eps: float) -> Array:
  """x + r * d, d a uniform random unit direction and r ~ U(0, eps), clipped to the [0, 1] box."""
  dir_key, radius_key = split(key)
  direction = draw(jax.random.normal, dir_key, x.shape, x.dtype)
  direction = direction / _per_example(jnp.maximum(l2_norm(direction), 1e-12), x)
  radius = draw(jax.random.uniform, radius_key, (x.shape[0],), x.dtype, 0.0, eps)
  return clip_box(x + _per_example(radius, x) * direction)


# ----------------------------------------------------------------------------------------------------------
# The shared ascent loop.


def loss_and_grad(logits_fn: LogitsFn, loss_fn: LossFn, x_adv: Array, target: Any):
  """Per-example losses [B], logits [B, K] and d(sum of losses)/d x_adv [B, ...] at x_adv.

  Examples do not interact (BN runs in eval mode), so the gradient of the sum is per-example.
  """

  def total(z):
    logits = logits_fn(z)
    losses = loss_fn(logits, target)
    return losses.sum(), (losses, logits)

  (_, (losses, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
  return losses, logits, grad


def eot_loss_and_grad(random_logits_fn, loss_fn: LossFn, x_adv: Array, target: Any, *, key: Array, draws: int):
  """Expectation over transformation (Athalye et al., ICML 2018) for a randomised model: the gradient of the
  summed losses averaged over `draws` draws of the model, as AutoAttack's `eot_iter` computes it.

  Args:
    random_logits_fn: `(x, key) -> logits`, a model that draws its randomness (noise, dropout, ...) from
      `key` (one key or per-example keys [B], as the attack was given; draw with `draw` so that both work).
    loss_fn, x_adv, target: as `loss_and_grad`.
    key: the draws use fold_in(key, d), d < draws.
    draws: number of draws (AutoAttack's rand version: 20).

  Returns:
    (losses [B] and logits [B, K] of the last draw, as the authors' APGD keeps them; the mean of the draws'
    input gradients [B, ...]).
  """
  at = lambda d: loss_and_grad(lambda z: random_logits_fn(z, fold_in(key, d)), loss_fn, x_adv, target)

  def body(d, state):
    _, _, grad_sum = state
    losses, logits, grad = at(d)
    return losses, logits, grad_sum + grad

  losses, logits, grad_sum = lax.fori_loop(1, draws, body, at(0))
  return losses, logits, grad_sum / draws


def iterate(
  logits_fn: LogitsFn,
  x: Array,
  target: Any,
  x_init: Array,
  *,
  loss_fn: LossFn,
  step: Callable[[Array, Array, Array], Array],
  project: Callable[[Array, Array], Array],
  steps: int,
  key: Array,
  unroll: bool = DEFAULT_UNROLL,
) -> Array:
  """Runs `steps` iterations of x_adv <- project(step(x_adv, grad loss(x_adv), key_i), x).

  Args:
    logits_fn: eval-mode logits function.
    x: clean inputs [B, ...], the centre of the projection.
    target: what `loss_fn` compares the logits with (labels [B] or target probabilities [B, K]).
    x_init: starting point [B, ...].
    loss_fn: per-example loss to ascend.
    step: `(x_adv, grad, key) -> x_adv`, e.g. `lambda x, g, k: sign_step(x, g, 2 / 255)`.
    project: `(x_adv, x) -> x_adv`, e.g. `projection('linf', 8 / 255)`.
    steps: number of gradient steps (static).
    key: folded with the step index to give each step its own key.
    unroll: straight-line code (True) or a rolled loop (False).

  Returns:
    The last iterate [B, ...] (no projection is applied when steps == 0).
  """

  def body(i, x_adv):
    _, _, grad = loss_and_grad(logits_fn, loss_fn, x_adv, target)
    return project(step(x_adv, grad, fold_in(key, i)), x)

  return lax.fori_loop(0, steps, body, x_init, unroll=unroll)


def keep_stronger(best: tuple[Array, Array, Array], new: tuple[Array, Array, Array]):
  """Merges two attack results (x_adv [B, ...], loss [B], fooled [B] bool) per example.

  A misclassifying result beats a non-misclassifying one; otherwise the higher loss wins (ties keep `best`).
  """
  best_x, best_loss, best_fooled = best
  new_x, new_loss, new_fooled = new
  better = (new_fooled & ~best_fooled) | ((new_fooled == best_fooled) & (new_loss > best_loss))
  return (
    jnp.where(_per_example(better, best_x), new_x, best_x),
    jnp.where(better, new_loss, best_loss),
    best_fooled | new_fooled,
  )


def _scored(logits_fn, loss_fn, x_adv, y):
  """(x_adv, loss [B], fooled [B]): an attack result in the form `keep_stronger` merges."""
  logits = logits_fn(x_adv)
  return x_adv, loss_fn(logits, y), jnp.argmax(logits, axis=-1) != y


def _best_of_restarts(run: Callable[[Array], tuple], key: Array, restarts: int, unroll: bool) -> Array:
  """Runs `run(key_r)` for r < restarts and keeps per example the strongest result (`keep_stronger`)."""
  first = run(fold_in(key, 0))
  body = lambda r, best: keep_stronger(best, run(fold_in(key, r)))
  return lax.fori_loop(1, restarts, body, first, unroll=unroll)[0]


# ----------------------------------------------------------------------------------------------------------
# PGD.


def pgd(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  step_size: float,
  steps: int,
  norm: str = "linf",
  random_start: bool = True,
  restarts: int = 1,
  loss: str | LossFn = "ce",
  unroll: bool = DEFAULT_UNROLL,
) -> Array:
  """Projected gradient ascent on a per-example loss (Madry et al. 2018).

  l_inf: x <- clip(proj_eps(x + step_size * sign(grad))) with the reference's random start x + U(-eps, eps)
  (unclipped; the first step clips). l_2: x <- clip(proj_eps(x + step_size * grad / ||grad||)), starting at
  a uniformly random direction scaled by U(0, eps). With restarts the perturbation kept per example is a
  misclassifying one if any restart found one, else the one with the highest loss.

  Args:
    logits_fn: eval-mode logits function, [B, ...] -> [B, K].
    x: clean inputs [B, H, W, C] in [0, 1].
    y: labels [B] int.
    key: PRNG key for the random starts.
    eps: radius of the threat model in pixel units (CIFAR l_inf: 8/255).
    step_size: step length per iteration (CIFAR l_inf training: 2/255).
    steps: iterations per restart (static; training 10, evaluation 20-100).
    norm: 'linf' or 'l2'.
    random_start: start at a random point of the ball (required for restarts > 1).
    restarts: independent runs; the strongest result is kept.
    loss: 'ce', 'dlr' or a per-example loss `(logits, y) -> [B]`.
    unroll: straight-line steps and restarts (True) or rolled loops; compile time grows with
      steps x restarts when unrolled.

  Returns:
    x_adv [B, H, W, C] with ||x_adv - x|| <= eps and 0 <= x_adv <= 1, gradient-stopped.
  """
  _check_norm(norm)
  _check_nonnegative(eps=eps, step_size=step_size, steps=steps)
  if restarts < 1 or (restarts > 1 and not random_start):
    raise ValueError(f"restarts must be 1, or > 1 with random_start=True; got restarts={restarts}")
  loss_fn = get_loss(loss)
  if norm == "linf":
    start, step = uniform_linf_start, lambda x_adv, g, _: sign_step(x_adv, g, step_size)
  else:
    start, step = uniform_l2_start, lambda x_adv, g, _: l2_step(x_adv, g, step_size)
  project = projection(norm, eps)

  def run(run_key):
    x_init = start(run_key, x, eps) if random_start else x
    if steps == 0:  # the l_inf start is only clipped by the first step
      return project(x_init, x)
    return iterate(
      logits_fn, x, y, x_init, loss_fn=loss_fn, step=step, project=project, steps=steps, key=run_key, unroll=unroll
    )

  if restarts == 1:  # the same first run as with restarts, without the scoring forward
    return lax.stop_gradient(run(fold_in(key, 0)))
  scored_run = lambda run_key: _scored(logits_fn, loss_fn, run(run_key), y)
  return lax.stop_gradient(_best_of_restarts(scored_run, key, restarts, unroll))


# ----------------------------------------------------------------------------------------------------------
# TRADES inner maximisation.


def trades_attack(
  logits_fn: LogitsFn,
  x: Array,
  *,
  key: Array,
  eps: float,
  step_size: float,
  steps: int,
  norm: str = "linf",
  init_std: float = 0.001,
  unroll: bool = DEFAULT_UNROLL,
) -> Array:
  """The TRADES attack (Zhang et al. 2019) as in the reference's `trades_loss`: maximise KL(f(x) || f(x')).

  Starts at x + init_std * N(0, I) (unclipped) and ascends the summed KL(softmax f(x) || softmax f(x'))
  with p = softmax f(x) fixed:
    l_inf: x' <- clip(proj_eps(x' + step_size * sign(grad))).
    l_2: normalised-gradient SGD with learning rate 2 * eps / steps (`step_size` is not used, as in the
      reference), zero-norm gradients replaced by N(0, I), then clamp to the box and renormalise the
      perturbation to ||x' - x||_2 <= eps.
  The result is clipped to [0, 1].

  Args:
    logits_fn: eval-mode logits function (the reference attacks in `model.eval()`).
    x: clean inputs [B, H, W, C] in [0, 1].
    key: PRNG key for the Gaussian start (and the l_2 zero-gradient replacement).
    eps: perturbation radius (CIFAR l_inf 8/255).
    step_size: l_inf step length (CIFAR 2/255).
    steps: number of ascent steps (static; reference default 10).
    norm: 'linf' or 'l2'.
    init_std: standard deviation of the Gaussian start.
    unroll: straight-line steps (True) or a rolled loop.

  Returns:
    x_adv [B, H, W, C], gradient-stopped.
  """
  _check_norm(norm)
  _check_nonnegative(eps=eps, step_size=step_size, steps=steps)
  init_key, step_key = split(key)
  probs = jax.nn.softmax(lax.stop_gradient(logits_fn(x)), axis=-1)
  x_init = x + init_std * draw(jax.random.normal, init_key, x.shape, x.dtype)
  if norm == "linf":
    step = lambda x_adv, g, _: sign_step(x_adv, g, step_size)
  else:
    learning_rate = 2 * eps / max(steps, 1)
    step = lambda x_adv, g, k: l2_step(x_adv, g, learning_rate, key=k)
  project = projection(norm, eps, box_first=norm == "l2")
  x_adv = iterate(
    logits_fn,
    x,
    probs,
    x_init,
    loss_fn=kl_divergence,
    step=step,
    project=project,
    steps=steps,
    key=step_key,
    unroll=unroll,
  )
  return lax.stop_gradient(clip_box(x_adv))


# ----------------------------------------------------------------------------------------------------------
# Auto-PGD (Croce & Hein, ICML 2020).


def apgd_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Checkpoints of APGD's step-size schedule.

  The paper's checkpoints are w_j = ceil(p_j * N) with p_0 = 0, p_1 = 0.22 and
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); in integers (as in the authors' code) the first window
  is max(int(0.22 N), 1) steps and each next one is max(int(0.03 N), 1) shorter, down to max(int(0.06 N), 1).

  Returns:
    is_checkpoint [steps] bool (the check runs after step i) and window [steps] int (steps since the
    previous checkpoint, 0 elsewhere).
  """
  window = max(int(0.22 * steps), 1)
  shortest, shrink = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
  is_checkpoint, windows = np.zeros(steps, bool), np.zeros(steps, np.int32)
  since = 0
  for i in range(steps):
    since += 1
    if since == window:
      is_checkpoint[i], windows[i], since = True, window, 0
      window = max(window - shrink, shortest)
  return is_checkpoint, windows


def _apgd_start(key: Array, x: Array, eps: float, norm: str) -> Array:
  """x + eps * t / ||t||, t ~ U(-1, 1) (l_inf) or N(0, I) (l_2), clipped to the box."""
  if norm == "linf":
    t = draw(jax.random.uniform, key, x.shape, x.dtype, -1.0, 1.0)
    return clip_box(x + eps * t / _per_example(linf_norm(t) + 1e-12, x))
  t = draw(jax.random.normal, key, x.shape, x.dtype)
  return clip_box(x + eps * t / _per_example(l2_norm(t) + 1e-12, x))


def _apgd_run(logits_fn, x, y, key, *, eps, norm, steps, loss_fn, rho, unroll, eot_iter=1):
  """One APGD run. Returns (x_out, best loss, fooled): x_out misclassifies where fooled, else maximises loss.

  With eot_iter > 1, logits_fn is `(x, key) -> logits` and each gradient is `eot_loss_and_grad` over eot_iter
  draws (the start's draws from fold_in(key, 1), step i's from fold_in(key, i + 2)).

  Per example: momentum 0.75 (none on the first step); step size 2 * eps, halved at a checkpoint when
  (1) at most rho * window of the steps since the previous checkpoint increased the loss, or (2) the step
  size was not halved at the previous checkpoint and the best loss did not improve since; on halving, the
  iterate restarts from the best point. Condition (1) compares the first step of the first window with the
  starting point as in the paper.
  """
  project = projection(norm, eps)
  step = (lambda x_adv, g, size: sign_step(x_adv, g, size)) if norm == "linf" else l2_step
  is_checkpoint, windows = apgd_schedule(steps)
  is_checkpoint, windows = jnp.asarray(is_checkpoint), jnp.asarray(windows)

  def losses_and_grad(x_adv, i):
    if eot_iter == 1:
      return loss_and_grad(logits_fn, loss_fn, x_adv, y)
    return eot_loss_and_grad(logits_fn, loss_fn, x_adv, y, key=fold_in(key, i + 2), draws=eot_iter)

  x0 = _apgd_start(key, x, eps, norm)
  loss0, logits0, grad0 = losses_and_grad(x0, -1)
  if steps == 0:  # the random start alone (the loop below would index an empty schedule)
    return x0, loss0, jnp.argmax(logits0, -1) != y
  batch = x.shape[0]
  state = dict(
    x=x0,
    x_prev=x0,
    grad=grad0,
    x_best=x0,
    grad_best=grad0,
    loss_best=loss0,
    x_fooling=x0,
    fooled=jnp.argmax(logits0, -1) != y,
    step_size=jnp.full((batch,), 2.0 * eps, x.dtype),
    losses=jnp.zeros((steps + 1, batch), loss0.dtype).at[0].set(loss0),
    loss_best_at_check=loss0,
    halved_at_check=jnp.ones((batch,), bool),
  )

  def body(i, s):
    momentum = jnp.where(i > 0, 0.75, 1.0)
    z = project(step(s["x"], s["grad"], _per_example(s["step_size"], x)), x)
    x_new = project(s["x"] + momentum * (z - s["x"]) + (1 - momentum) * (s["x"] - s["x_prev"]), x)
    loss, logits, grad = losses_and_grad(x_new, i)
    wrong = jnp.argmax(logits, -1) != y
    improved = loss > s["loss_best"]
    loss_best = jnp.where(improved, loss, s["loss_best"])
    x_best = jnp.where(_per_example(improved, x), x_new, s["x_best"])
    grad_best = jnp.where(_per_example(improved, x), grad, s["grad_best"])
    losses = s["losses"].at[i + 1].set(loss)

    # Checkpoint conditions (paper section 3.2), evaluated every step and applied only at checkpoints.
    window = windows[i]
    in_window = (jnp.arange(steps) <= i) & (jnp.arange(steps) > i - window)
    increases = jnp.sum((losses[1:] > losses[:-1]) & in_window[:, None], axis=0)
    oscillating = increases <= window * rho
    stalled = ~s["halved_at_check"] & (s["loss_best_at_check"] >= loss_best)
    halve = is_checkpoint[i] & (oscillating | stalled)
    return dict(
      x=jnp.where(_per_example(halve, x), x_best, x_new),
      x_prev=s["x"],
      grad=jnp.where(_per_example(halve, x), grad_best, grad),
      x_best=x_best,
      grad_best=grad_best,
      loss_best=loss_best,
      x_fooling=jnp.where(_per_example(wrong, x), x_new, s["x_fooling"]),
      fooled=s["fooled"] | wrong,
      step_size=jnp.where(halve, s["step_size"] / 2, s["step_size"]),
      losses=losses,
      loss_best_at_check=jnp.where(is_checkpoint[i], loss_best, s["loss_best_at_check"]),
      halved_at_check=jnp.where(is_checkpoint[i], halve, s["halved_at_check"]),
    )

  s = lax.fori_loop(0, steps, body, state, unroll=unroll)
  x_out = jnp.where(_per_example(s["fooled"], x), s["x_fooling"], s["x_best"])
  return x_out, s["loss_best"], s["fooled"]


def apgd(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str = "linf",
  steps: int = 100,
  loss: str | LossFn = "ce",
  restarts: int = 1,
  rho: float = 0.75,
  unroll: bool = False,
  eot_iter: int = 1,
) -> Array:
  """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness...", ICML 2020).

  PGD with momentum 0.75 and a step size (initially 2 * eps) that is halved, per example, at checkpoints
  where progress stalled, restarting from the best point found; see `_apgd_run` and `apgd_schedule`.
  Restarts draw new random starts and keep per example a misclassifying point if any run found one, else
  the highest-loss point. For the targeted DLR version see `apgd_targeted`.

  Args:
    logits_fn: eval-mode logits function, [B, ...] -> [B, K].
    x: clean inputs [B, H, W, C] in [0, 1].
    y: labels [B] int.
    key: PRNG key for the random starts.
    eps: radius of the threat model (CIFAR l_inf 8/255, l_2 0.5).
    norm: 'linf' or 'l2'.
    steps: iterations per run (AutoAttack: 100).
    loss: 'ce', 'dlr' (needs >= 3 classes) or a per-example loss `(logits, y) -> [B]`.
    restarts: independent random starts.
    rho: fraction of loss increases below which a window counts as oscillating.
    unroll: straight-line steps (True; ~2 minutes of compilation for 100 steps on CPU) or a rolled loop
      (default; as fast per step for the zoo's models, see `DEFAULT_UNROLL`).
    eot_iter: for a randomised model: with eot_iter > 1, `logits_fn` is `(x, key) -> logits` and every
      gradient is the mean over eot_iter draws of the model (`eot_loss_and_grad`; AutoAttack's rand version:
      20); the loss and the misclassification checks read one draw, as in the authors' code.

  Returns:
    x_adv [B, H, W, C] inside the eps-ball and the [0, 1] box, gradient-stopped.
  """
  _check_norm(norm)
  _check_nonnegative(eps=eps, steps=steps)
  if restarts < 1 or eot_iter < 1:
    raise ValueError(f"restarts and eot_iter must be >= 1, got {restarts} and {eot_iter}")
  loss_fn = get_loss(loss)
  run = lambda run_key: _apgd_run(
    logits_fn,
    x,
    y,
    run_key,
    eps=eps,
    norm=norm,
    steps=steps,
    loss_fn=loss_fn,
    rho=rho,
    unroll=unroll,
    eot_iter=eot_iter,
  )
  return lax.stop_gradient(_best_of_restarts(run, key, restarts, unroll=False))


def apgd_targeted(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str = "linf",
  steps: int = 100,
  num_targets: int = 9,
  restarts: int = 1,
  rho: float = 0.75,
  unroll: bool = False,
) -> Array:
  """Targeted APGD-DLR (APGD-T of AutoAttack): APGD on `targeted_dlr` towards each of the top classes.

  For r = 1..num_targets the target is the class with the (r+1)-th largest clean logit; each target gets
  `restarts` runs and the strongest result per example is kept (misclassifying, else highest loss).
  Needs >= 4 classes; num_targets is capped at K - 1.

  Args: as `apgd`, plus num_targets (AutoAttack standard: 9).

  Returns:
    x_adv [B, H, W, C] inside the eps-ball and the [0, 1] box, gradient-stopped.
  """
  _check_norm(norm)
  _check_nonnegative(eps=eps, steps=steps)
  if restarts < 1 or num_targets < 1:
    raise ValueError(f"restarts and num_targets must be >= 1, got {restarts} and {num_targets}")
  clean_logits = lax.stop_gradient(logits_fn(x))
  _check_classes(clean_logits, 4, "targeted_dlr")
  ranked = jnp.argsort(-clean_logits, axis=-1)
  num_targets = min(num_targets, clean_logits.shape[-1] - 1)

  def run(run_key, rank):
    target_labels = lax.dynamic_index_in_dim(ranked, rank, axis=1, keepdims=False)
    loss_fn = lambda logits, labels: targeted_dlr(logits, labels, target_labels)
    return _apgd_run(logits_fn, x, y, run_key, eps=eps, norm=norm, steps=steps, loss_fn=loss_fn, rho=rho, unroll=unroll)

  def run_index(j):  # j enumerates (target rank, restart) pairs.
    return run(fold_in(key, j), 1 + j // restarts)

  first = run_index(0)
  body = lambda j, best: keep_stronger(best, run_index(j))
  x_adv = lax.fori_loop(1, num_targets * restarts, body, first)[0]
  return lax.stop_gradient(x_adv)
