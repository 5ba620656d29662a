"""Randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019): certify, predict, certified accuracy.

The smoothed classifier of a base classifier f is

  g(x) = argmax_c P(f(x + eps) = c),   eps ~ N(0, sigma^2 I).

If the top class has probability p_A >= 1/2, g is constant on the l2 ball of radius sigma * Phi^-1(p_A)
around x (Cohen et al. 2019, Theorem 1, with p_B = 1 - p_A). `certify` estimates a lower bound of p_A by
Monte Carlo: with probability at least 1 - alpha over the noise draws, the class it returns is g(x) and g
is constant within the returned radius. Every guarantee here is for the smoothed classifier g, NEVER for the
base classifier f, which may change its prediction arbitrarily close to x.

Usage:

  logits_fn = jax.tree_util.Partial(lambda variables, x: apply_fn(variables, x, False)[0], variables)
  label, radius = smoothing.certify(logits_fn, image, key=key, sigma=0.25, n0=100, n=100_000,
                                    alpha=0.001, batch_size=1000)       # (-1, 0.0) when it abstains
  label = smoothing.predict(logits_fn, image, key=key, sigma=0.25, n=10_000, alpha=0.001, batch_size=1000)
  ok = smoothing.certified_correct(logits_fn, images, labels, key=key, sigma=0.25, radii=(0.0, 0.5))  # [B, 2],
                                                                  # jit-traceable: CERTIFY's decisions per radius
  accuracy = smoothing.certified_accuracy(correct, radii, at=[0.0, 0.25, 0.5])
  print(smoothing.accuracy_table([0.0, 0.25, 0.5], accuracy))
  smoothing.plot_certified_accuracy('certified.png', correct, radii)

`f` maps a batch [B, H, W, C] to logits [B, classes]. Pass it as a `jax.tree_util.Partial` holding the
weights, so that they are arguments of the compiled program rather than constants baked into it; a plain
function works too. Noise is added in input space and not clipped, as in Cohen et al.'s code.
"""

import functools
import warnings
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

Array = jax.Array
LogitsFn = Callable[[Array], Array]

ABSTAIN = -1


def _stats():
  """scipy.stats, imported on first use: its ~0.6 s import is paid only by code that certifies or predicts."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  return stats


def _as_pytree(f: LogitsFn) -> jax.tree_util.Partial:
  """f as a pytree: its arrays become jit arguments; the function itself keys the compilation cache."""
  return f if isinstance(f, jax.tree_util.Partial) else jax.tree_util.Partial(f)


def check_settings(sigma: float, alpha: float | None = None, **sizes: int) -> None:
  """Raises ValueError naming the first invalid setting: sigma > 0, 0 < alpha < 1, every size (a count) >= 1."""
  if not sigma > 0:
    raise ValueError(f"smoothing: sigma={sigma} must be positive")
  if alpha is not None and not 0 < alpha < 1:
    raise ValueError(f"smoothing: alpha={alpha} must lie in (0, 1)")
  for name, value in sizes.items():
    if value < 1:
      raise ValueError(f"smoothing: {name}={value} must be >= 1")


def _chunk_votes(f, x, key, start, sigma, size):
  """Votes [classes] of f on the `size` noise samples start .. start + size - 1 (one forward pass).

  Sample i's noise is N(0, I) drawn from fold_in(key, i), so the counts do not depend on batch_size.
  """
  index = start + jnp.arange(size)
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype))(index)
  logits = f(x[None] + sigma * noise)
  return jnp.sum(jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.int32), axis=0)


_chunk_counts = jax.jit(_chunk_votes, static_argnames=("size",))


def sample_counts(
  f: LogitsFn, x: Array, *, key: Array, sigma: float, num: int, batch_size: int, progress: bool = False
) -> np.ndarray:
  """How often f predicts each class at x + eps over `num` draws of eps ~ N(0, sigma^2 I).

  Runs ceil(num / batch_size) forward passes of min(batch_size, remaining) samples, as Cohen et al. do (so
  n0 = 100 selection samples cost 100 forwards, not batch_size); the counting program compiles once per
  (f, x shape, pass size): at most two sizes per num.

  Args:
    f: logits function, [B, H, W, C] -> [B, classes].
    x: one input [H, W, C] (pixel units, e.g. [0, 1]).
    key: PRNG key; sample i uses fold_in(key, i), so the result is independent of batch_size.
    sigma: noise standard deviation, in the units of x.
    num: number of noise samples.
    batch_size: samples per forward pass of f.
    progress: show a tqdm progress bar over the samples.

  Returns:
    int64 [classes] counts summing to num.
  """
  if np.ndim(x) != 3:
    raise ValueError(f"smoothing: x must be one example [H, W, C], got shape {np.shape(x)}")
  check_settings(sigma, batch_size=batch_size, num=num)
  f, x = _as_pytree(f), jnp.asarray(x, jnp.float32)
  counts = None
  with tqdm(total=num, unit="sample", desc="noise", disable=not progress, leave=False) as bar:
    for start in range(0, num, batch_size):
      size = min(batch_size, num - start)
      chunk = _chunk_counts(f, x, key, start, jnp.float32(sigma), size)
      counts = chunk if counts is None else counts + chunk
      if progress:
        counts.block_until_ready()
        bar.update(size)
  return np.asarray(counts, np.int64)


def lower_confidence_bound(count: int, n: int, alpha: float) -> float:
  """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion from `count` of `n`.

  It is the alpha quantile of Beta(count, n - count + 1) (0 when count = 0), i.e. Cohen et al.'s
  `proportion_confint(count, n, alpha=2 * alpha, method='beta')[0]`; for count = n it equals alpha^(1/n).
  """
  return float(_stats().beta.ppf(alpha, count, n - count + 1)) if count > 0 else 0.0


def max_radius(sigma: float, n: int, alpha: float) -> float:
  """Largest radius `certify` can return: sigma * Phi^-1(alpha^(1/n)), all n votes for one class.

  Negative when (n, alpha) can never certify (alpha^(1/n) < 1/2, i.e. n < log2(1 / alpha)).
  """
  return sigma * float(_stats().norm.ppf(alpha ** (1 / n)))


def certify(
  f: LogitsFn,
  x: Array,
  *,
  key: Array,
  sigma: float,
  n0: int = 100,
  n: int = 100_000,
  alpha: float = 0.001,
  batch_size: int,
  progress: bool = False,
) -> tuple[int, float]:
  """Cohen et al. (2019) CERTIFY: the smoothed classifier's class at x and an l2 radius where it is constant.

  cA = the most frequent class of f over n0 selection samples; nA = votes for cA over n fresh estimation
  samples; pA = `lower_confidence_bound(nA, n, alpha)`. If pA < 1/2 it abstains, else returns
  (cA, sigma * Phi^-1(pA)). With probability >= 1 - alpha over the noise, a returned class is g(x) and
  g(x + delta) = g(x) for every ||delta||_2 < radius. The guarantee is for the smoothed classifier g, not for
  the base classifier f. Warns when (n, alpha) can never certify (see `max_radius`).

  Args:
    f: base classifier's logits function, [B, H, W, C] -> [B, classes].
    x: one input [H, W, C].
    key: PRNG key (split into selection and estimation keys).
    sigma: noise standard deviation (units of x); the radius is in the same units (l2 norm).
    n0: selection samples.
    n: estimation samples.
    alpha: failure probability.
    batch_size: samples per forward pass.
    progress: progress bars over the samples.

  Returns:
    (class index, radius), or (ABSTAIN = -1, 0.0).
  """
  check_settings(sigma, alpha, batch_size=batch_size, n0=n0, n=n)
  if max_radius(sigma, n, alpha) < 0:
    warnings.warn(
      f"certify: n={n}, alpha={alpha} can never certify: even n of n votes give a lower bound "
      f"alpha^(1/n) = {alpha ** (1 / n):.4f} < 0.5; use n >= log2(1/alpha) = {np.log2(1 / alpha):.1f}",
      stacklevel=2,
    )
  select_key, estimate_key = jax.random.split(key)
  sample = functools.partial(sample_counts, f, x, sigma=sigma, batch_size=batch_size, progress=progress)
  guess = int(np.argmax(sample(key=select_key, num=n0)))
  p_lower = lower_confidence_bound(int(sample(key=estimate_key, num=n)[guess]), n, alpha)
  if p_lower < 0.5:
    return ABSTAIN, 0.0
  return guess, sigma * float(_stats().norm.ppf(p_lower))


def min_certifying_count(n: int, alpha: float, p: float) -> int:
  """Smallest vote count c in [0, n] with `lower_confidence_bound(c, n, alpha) >= p`; n + 1 when none.

  The Clopper-Pearson bound increases with c, so `certify` returns a radius >= r exactly when the top class
  has at least `min_certifying_count(n, alpha, Phi(r / sigma))` of the n estimation votes (r = 0: p = 1/2,
  the abstention threshold). Found by bisection with scipy in float64.
  """
  low, high = 0, n + 1  # invariant: count `high` certifies (n + 1 stands for 'none'), count `low - 1` does not
  while low < high:
    middle = (low + high) // 2
    if lower_confidence_bound(middle, n, alpha) >= p:
      high = middle
    else:
      low = middle + 1
  return low


def _certify_votes(f, x, key, *, sigma, n0, n, batch_size):
  """(class, votes) of CERTIFY for one example x [H, W, C], traceable: the n0-sample guess and its n votes.

  Draws exactly the noise of `certify(f, x, key=key, ...)` (same key split, same per-sample folds).
  """
  select_key, estimate_key = jax.random.split(key)

  def counts(key, num):  # num // batch_size full passes, then one of the remaining samples (as `sample_counts`)
    size, full = min(batch_size, num), num // min(batch_size, num)
    first = _chunk_votes(f, x, key, 0, sigma, size)
    step = lambda chunk, total: total + _chunk_votes(f, x, key, chunk * size, sigma, size)
    total = jax.lax.fori_loop(1, full, step, first)
    rest = num - full * size
    return total + _chunk_votes(f, x, key, full * size, sigma, rest) if rest else total

  guess = jnp.argmax(counts(select_key, n0))
  return guess, counts(estimate_key, n)[guess]


def certified_correct(
  f: LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  sigma: float,
  radii: Sequence[float],
  n0: int = 100,
  n: int = 10_000,
  alpha: float = 0.001,
  batch_size: int = 1000,
) -> Array:
  """Whether `certify` returns the true label with a radius >= r, for a batch and each radius r; jit-traceable.

  Example i is certified exactly as `certify(f, x[i], key=fold_in(key, i), ...)` would (same noise, same
  Clopper-Pearson decision: its class equals y[i] and its votes reach `min_certifying_count` for
  p = Phi(r / sigma), computed on the host in float64 when traced). The examples run one after another
  (`lax.map`), each in chunks of `batch_size` noise samples. The guarantee is for the smoothed classifier.

  Args:
    f: base classifier's logits function, [B, H, W, C] -> [B, classes].
    x: inputs [B, H, W, C]; y: int labels [B].
    key: PRNG key, example i using fold_in(key, i); or per-example keys [B], example i using key[i].
    sigma, n0, n, alpha, batch_size: as in `certify`.
    radii: [R] l2 radii, in the units of x.

  Returns:
    bool [B, R].
  """
  check_settings(sigma, alpha, batch_size=batch_size, n0=n0, n=n)
  thresholds = jnp.array([min_certifying_count(n, alpha, float(_stats().norm.cdf(r / sigma))) for r in radii])
  certify_one = functools.partial(_certify_votes, f, sigma=sigma, n0=n0, n=n, batch_size=batch_size)
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  per_example = key.ndim == (1 if typed else 2)
  keys = key if per_example else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
  guess, votes = jax.lax.map(lambda args: certify_one(*args), (x, keys))
  return (guess == y)[:, None] & (votes[:, None] >= thresholds[None, :])


def predict(
  f: LogitsFn, x: Array, *, key: Array, sigma: float, n: int, alpha: float, batch_size: int, progress: bool = False
) -> int:
  """Cohen et al. (2019) PREDICT: the smoothed classifier's class at x, or ABSTAIN.

  Counts f's votes over n noise samples; with n1 >= n2 the two largest counts, returns the top class when
  the two-sided binomial test of n1 successes in n1 + n2 trials at p = 1/2 has p-value <= alpha (Hung and
  Fithian's test), else abstains. With probability >= 1 - alpha a returned class is g(x) (for the smoothed
  classifier g, not the base classifier f). Warns when even n of n votes cannot pass the test
  (2 * 2^-n > alpha, e.g. n = 10 at alpha = 0.001).

  Args:
    f, x, key, sigma, n, alpha, batch_size, progress: as in `certify` (n: all samples).

  Returns:
    The class index, or ABSTAIN = -1.
  """
  check_settings(sigma, alpha, batch_size=batch_size, n=n)
  best_p_value = _stats().binomtest(n, n, p=0.5).pvalue
  if best_p_value > alpha:
    warnings.warn(
      f"predict: n={n}, alpha={alpha} always abstains: n of n votes have p-value {best_p_value:.4g} > alpha",
      stacklevel=2,
    )
  counts = sample_counts(f, x, key=key, sigma=sigma, num=n, batch_size=batch_size, progress=progress)
  first, second = np.argsort(-counts, kind="stable")[:2]
  top, runner_up = int(counts[first]), int(counts[second])
  if _stats().binomtest(top, top + runner_up, p=0.5).pvalue > alpha:
    return ABSTAIN
  return int(first)


def certified_accuracy(correct: Sequence[bool], radii: Sequence[float], at: Sequence[float]) -> np.ndarray:
  """Fraction of examples certified correct at each radius r: mean(correct and radius >= r).

  As Cohen et al.'s analysis (`ApproximateAccuracy`): an abstention counts as wrong, and this is the
  accuracy of the smoothed classifier g, which holds for each example with probability >= 1 - alpha.

  Args:
    correct: [N] whether `certify` returned the true label.
    radii: [N] certified l2 radii (0 on abstention).
    at: [R] radii to report.

  Returns:
    float64 [R] certified accuracies in [0, 1].
  """
  correct, radii, at = np.asarray(correct, bool), np.asarray(radii, np.float64), np.asarray(at, np.float64)
  if correct.ndim != 1 or correct.shape != radii.shape or correct.size == 0:
    raise ValueError(
      f"certified_accuracy: correct {correct.shape} and radii {radii.shape} must be equal, non-empty [N] arrays"
    )
  return np.mean(correct[None, :] & (radii[None, :] >= at[:, None]), axis=1)


def accuracy_table(at: Sequence[float], accuracies: Sequence[float], *, title: str = "") -> str:
  """Text table, one row per radius: 'radius  certified acc %', under an optional title line."""
  lines = [title] if title else []
  lines.append(f"{'radius':>8}  {'certified acc %':>15}")
  lines += [f"{r:>8.3f}  {100 * a:>15.2f}" for r, a in zip(at, accuracies, strict=True)]
  return "\n".join(lines)


def plot_certified_accuracy(
  path: str,
  correct: Sequence[bool],
  radii: Sequence[float],
  *,
  max_radius_plotted: float | None = None,
  step: float = 0.01,
  title: str = "",
) -> None:
  """Writes a PNG of certified accuracy against radius, as Cohen et al.'s `plot_certified_accuracy`.

  Args:
    path: output file (PNG whatever the extension).
    correct, radii: per-example results as in `certified_accuracy`.
    max_radius_plotted: right end of the x axis (default: the largest radius, at least `step`).
    step: spacing of the radii the curve is evaluated at.
    title: figure title (e.g. the sigma, n and alpha used).
  """
  top = max_radius_plotted or max(float(np.max(radii)), step)
  grid = np.arange(0.0, top + step, step)
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  # only plotting pays its import

  figure = Figure(figsize=(6, 4.5))  # no pyplot: no global state, no interactive backend
  axes = figure.subplots()
  axes.plot(grid, certified_accuracy(correct, radii, grid))
  axes.set(xlim=(0, top), ylim=(0, 1), xlabel="l2 radius", ylabel="certified accuracy")
  axes.set_title(title, fontsize="medium")
  axes.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, format="png", dpi=150)
