"""Tests for hydra_jax.smoothing: certify / predict against closed forms (constant and linear classifiers with
known Gaussian probabilities), abstention, one compilation across chunks, the hopeless-(n, alpha) warnings,
certified accuracy by hand, the plot, and `hydra-jax certify` on a tiny trained run."""

import functools
import json
import os
import warnings

import chex
import jax
import jax.numpy as jnp
import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import export
from hydra_jax import smoothing
from tests.test_cli import hydra_jax

SHAPE = (4, 4, 1)
KEY = jax.random.PRNGKey(0)


def constant(x):
  """Always class 1 of 3, whatever the input."""
  return jnp.broadcast_to(jnp.array([0.0, 2.0, 1.0]), (x.shape[0], 3))


def halfplane(w, b, x):
  """Two classes: 0 where <w, x> + b > 0. With ||w|| = 1 and noise N(0, sigma^2 I), P(class 0 at x) is
  Phi((<w, x> + b) / sigma), so the smoothed classifier's exact radius sigma Phi^-1(p) is <w, x> + b."""
  return jnp.stack([x.reshape(x.shape[0], -1) @ w + b, jnp.zeros(x.shape[0])], axis=-1)


def linear_case(margin, seed=0):
  """A halfplane classifier (weights as Partial arguments: one compilation for all cases) and an input at
  signed distance `margin` from its boundary."""
  rng = np.random.default_rng(seed)
  w, x = rng.normal(size=SHAPE), rng.uniform(size=SHAPE).astype(np.float32)
  w = (w / np.linalg.norm(w)).reshape(-1)
  b = margin - float(w @ x.reshape(-1))
  return jax.tree_util.Partial(halfplane, jnp.asarray(w, jnp.float32), jnp.float32(b)), x


# ----------------------------------------------------------------------------------------------------------
# certify against closed forms.


def test_constant_classifier_gets_sigma_times_phi_inverse_of_alpha_root_n():
  label, radius = smoothing.certify(
    constant, np.zeros(SHAPE), key=KEY, sigma=0.5, n0=10, n=1000, alpha=0.001, batch_size=64
  )
  expected = 0.5 * stats.norm.ppf(0.001 ** (1 / 1000))  # all n votes: the Clopper-Pearson bound is alpha^(1/n)
  assert label == 1
  np.testing.assert_allclose(radius, expected, rtol=1e-12)
  np.testing.assert_allclose(smoothing.max_radius(0.5, 1000, 0.001), expected, rtol=1e-12)


def test_lower_confidence_bound_is_one_sided_clopper_pearson():
  # P(Binomial(n, p) >= count) = alpha at the bound p (the definition), checked with the binomial tail.
  for count, n, alpha in [(70, 100, 0.001), (5, 10, 0.05), (999, 1000, 0.01)]:
    p = smoothing.lower_confidence_bound(count, n, alpha)
    np.testing.assert_allclose(stats.binom.sf(count - 1, n, p), alpha, rtol=1e-6)
  assert smoothing.lower_confidence_bound(0, 10, 0.001) == 0.0


def test_linear_classifier_radius_never_exceeds_exact_and_approaches_it():
  sigma, margin = 0.25, 0.25  # p = Phi(margin / sigma) = Phi(1) = 0.841; exact radius = margin
  f, x = linear_case(margin)
  radii = [
    smoothing.certify(f, x, key=jax.random.PRNGKey(seed), sigma=sigma, n0=50, n=5000, alpha=0.001, batch_size=1000)[1]
    for seed in range(8)
  ]
  assert all(0 < r < margin for r in radii)  # each fails with probability <= alpha (a fixed seed: never)

  n, alpha = 100_000, 0.001
  label, radius = smoothing.certify(f, x, key=KEY, sigma=sigma, n0=100, n=n, alpha=alpha, batch_size=1000)
  # Spread: p_hat = p +- 4 sd (sd = sqrt(p (1 - p) / n)) and the bound sits ~z_{1-alpha} sd below p_hat, so
  # pA >= p - (z_{1-alpha} + 4) sd; its radius is the largest gap to the exact one we accept (~0.03 sigma).
  p = stats.norm.cdf(margin / sigma)
  slack = (stats.norm.ppf(1 - alpha) + 4) * np.sqrt(p * (1 - p) / n)
  tolerance = margin - sigma * stats.norm.ppf(p - slack)
  assert label == 0 and 0 < margin - radius < tolerance


def test_counts_do_not_depend_on_batch_size():
  f, x = linear_case(0.1, seed=1)
  counts = [smoothing.sample_counts(f, x, key=KEY, sigma=0.5, num=1000, batch_size=b) for b in (1000, 96)]
  assert counts[0].sum() == 1000 and 0 < counts[0][0] < 1000
  np.testing.assert_array_equal(counts[0], counts[1])


def _recording(sizes):
  """`constant`, appending the batch size of every forward pass it runs (at run time) to `sizes`."""

  def f(x):
    jax.debug.callback(functools.partial(sizes.append, x.shape[0]))
    return constant(x)

  return f


def test_certify_forwards_min_of_batch_and_remaining_samples_as_cohen_et_al():
  sizes = []
  smoothing.certify(_recording(sizes), np.zeros(SHAPE), key=KEY, sigma=0.5, n0=100, n=2500, batch_size=1000)
  assert sizes == [100, 1000, 1000, 500]  # selection: n0 = 100 in one pass; estimation: 1000 + 1000 + 500


def test_certified_correct_forwards_min_of_batch_and_remaining_samples():
  sizes = []
  f = _recording(sizes)
  x, y = np.zeros((2, *SHAPE), np.float32), jnp.array([1, 0])
  settings = dict(sigma=0.5, n0=100, n=2500, alpha=0.001, batch_size=1000)
  jax.jit(lambda x: smoothing.certified_correct(f, x, y, key=KEY, radii=(0.0,), **settings))(x)
  assert sorted(sizes) == sorted([100, 1000, 1000, 500] * 2)  # per example, as `certify`


def test_abstains_on_a_fifty_fifty_classifier():
  f, x = linear_case(0.0, seed=2)  # the input lies on the boundary: p = 1/2 exactly
  assert smoothing.certify(f, x, key=KEY, sigma=0.5, n0=100, n=10_000, batch_size=1000) == (smoothing.ABSTAIN, 0.0)
  assert smoothing.predict(f, x, key=KEY, sigma=0.5, n=10_000, alpha=0.001, batch_size=1000) == smoothing.ABSTAIN


def test_predict_returns_the_top_class_when_the_binomial_test_passes():
  f, x = linear_case(-0.25, seed=3)  # P(class 1) = Phi(1) = 0.84
  assert smoothing.predict(f, x, key=KEY, sigma=0.25, n=1000, alpha=0.001, batch_size=1000) == 1
  # P(class 1) = 0.6: at n = 100 the expected 60 / 40 split has two-sided p-value 0.057 > 0.001: abstain.
  f, x = linear_case(-0.25 * stats.norm.ppf(0.6), seed=3)
  assert smoothing.predict(f, x, key=KEY, sigma=0.25, n=100, alpha=0.001, batch_size=1000) == smoothing.ABSTAIN


def votes_by_row(classes, x):
  """Votes for classes[i] on the i-th noisy copy of a pass, whatever the noise: exact counts per pass."""
  return jax.nn.one_hot(classes[: x.shape[0]], 3)


def test_predict_tests_the_top_count_against_the_top_two_not_all_samples():
  """Three classes, counts 20 / 20 / 60 of n = 100: Hung and Fithian's test of 60 successes in 60 + 20 trials
  passes at alpha = 0.001, while 60 of all 100 would not (a third class's votes must not weaken the test)."""
  classes = jnp.asarray([0] * 20 + [1] * 20 + [2] * 60)
  f = jax.tree_util.Partial(votes_by_row, classes)
  x = np.zeros(SHAPE, np.float32)
  counts = smoothing.sample_counts(f, x, key=KEY, sigma=0.5, num=100, batch_size=100)
  np.testing.assert_array_equal(counts, [20, 20, 60])
  alpha = 0.001
  assert stats.binomtest(60, 80, p=0.5).pvalue <= alpha < stats.binomtest(60, 100, p=0.5).pvalue  # 1.5e-5, 0.057
  assert smoothing.predict(f, x, key=KEY, sigma=0.5, n=100, alpha=alpha, batch_size=100) == 2
  # 40 / 35 / 25: 40 of 75 has p-value 0.64: abstain.
  f = jax.tree_util.Partial(votes_by_row, jnp.asarray([0] * 40 + [1] * 35 + [2] * 25))
  assert stats.binomtest(40, 75, p=0.5).pvalue > alpha
  assert smoothing.predict(f, x, key=KEY, sigma=0.5, n=100, alpha=alpha, batch_size=100) == smoothing.ABSTAIN


# ----------------------------------------------------------------------------------------------------------
# Batched certification inside a compiled program (the `smooth` method of `evaluate`).


def test_min_certifying_count_is_the_first_count_whose_bound_reaches_p():
  n, alpha = 60, 0.01
  bounds = [smoothing.lower_confidence_bound(c, n, alpha) for c in range(n + 1)]  # brute force over counts
  for p in (0.5, stats.norm.cdf(0.3), 0.9, bounds[45], np.nextafter(bounds[45], 1.0)):
    expected = next((c for c in range(n + 1) if bounds[c] >= p), n + 1)
    assert smoothing.min_certifying_count(n, alpha, p) == expected
  assert smoothing.min_certifying_count(n, alpha, bounds[45]) == 45
  assert smoothing.min_certifying_count(n, alpha, alpha ** (1 / n) + 1e-9) == n + 1  # beyond n of n votes: never


def test_certified_correct_decides_as_certify_on_each_example():
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  f = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
  x = jnp.asarray(rng.uniform(size=(6, *SHAPE)), jnp.float32)
  y = jnp.array([0, 1, 2, 0, 1, 2])
  radii, settings = (0.0, 0.2, 0.4, 0.6), dict(sigma=0.5, n0=20, n=200, alpha=0.01, batch_size=64)
  got = jax.jit(lambda x, y, key: smoothing.certified_correct(f, x, y, key=key, radii=radii, **settings))(x, y, KEY)
  expected = []
  for i in range(len(y)):  # the host-side CERTIFY with scipy's Clopper-Pearson bound, example by example
    label, radius = smoothing.certify(f, x[i], key=jax.random.fold_in(KEY, i), **settings)
    expected.append([label == int(y[i]) and radius >= r for r in radii])
  assert got.shape == (6, 4) and got.dtype == jnp.bool_
  np.testing.assert_array_equal(got, np.array(expected))
  assert 0 < np.sum(expected) < np.size(expected)  # both outcomes occur: the comparison is not vacuous


# ----------------------------------------------------------------------------------------------------------
# Compilation, warnings, bad input.


def test_counting_compiles_once_per_pass_size_across_chunks_sigmas_and_inputs():
  f = chex.assert_max_traces(lambda x: constant(x) + x.sum(axis=(1, 2, 3))[:, None], n=3)
  x = np.zeros(SHAPE, np.float32)
  smoothing.certify(f, x, key=KEY, sigma=0.25, n0=128, n=1000, batch_size=64)  # passes of 64 (2 + 15) and 40
  smoothing.certify(f, x + 1, key=KEY, sigma=0.5, n0=64, n=360, batch_size=64)  # 64 (1 + 5) and 40
  smoothing.predict(f, x, key=KEY, sigma=1.0, n=77, alpha=0.01, batch_size=64)  # 64 and 13: the third program
  with pytest.raises(AssertionError):  # a new input shape is a new program: the counter sees the second trace
    smoothing.certify(f, np.zeros((2, 2, 1)), key=KEY, sigma=0.25, n0=10, n=10, batch_size=64)


def test_warns_exactly_when_n_and_alpha_can_never_certify():
  x = np.zeros(SHAPE)
  with pytest.warns(UserWarning, match="can never certify"):  # 0.001^(1/9) = 0.464 < 0.5
    assert smoothing.certify(constant, x, key=KEY, sigma=1.0, n0=5, n=9, batch_size=16) == (smoothing.ABSTAIN, 0.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # 0.001^(1/10) = 0.501: barely certifies, no warning
    label, radius = smoothing.certify(constant, x, key=KEY, sigma=1.0, n0=5, n=10, batch_size=16)
  assert label == 1 and radius == pytest.approx(stats.norm.ppf(0.001**0.1), rel=1e-9)
  with pytest.warns(UserWarning, match="always abstains"):  # two-sided p-value of 10/10 = 2^-9 > 0.001
    assert smoothing.predict(constant, x, key=KEY, sigma=1.0, n=10, alpha=0.001, batch_size=16) == -1
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # 2^-10 < 0.001
    assert smoothing.predict(constant, x, key=KEY, sigma=1.0, n=11, alpha=0.001, batch_size=16) == 1


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"x": np.zeros((1, *SHAPE))}, "one example"),
    ({"sigma": 0.0}, "sigma"),
    ({"alpha": 1.0}, "alpha"),
    ({"n": 0}, "n=0"),
    ({"batch_size": 0}, "batch_size"),
  ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, message):
  arguments = {"x": np.zeros(SHAPE), "key": KEY, "sigma": 0.25, "n0": 5, "n": 10, "alpha": 0.001, "batch_size": 8}
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=message):
    smoothing.certify(constant, **arguments)


def test_certify_checkpoint_rejects_bad_settings_before_reading_the_run(tmp_path):
  out = str(tmp_path / "certify")
  for settings, message in [({"sigma": 0.0}, "sigma=0.0"), ({"sigma": 0.25, "skip": 0}, "skip=0")]:
    with pytest.raises(ValueError, match=message):  # tmp_path holds no run: the settings are checked first
      export.certify_checkpoint(config_lib.default_config(), str(tmp_path), out, **settings)
  assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------------------
# Certified accuracy, table, plot.


def test_certified_accuracy_counts_correct_examples_at_or_beyond_each_radius():
  correct = [True, True, False, True, False]  # the last: an abstention (wrong, radius 0)
  radii = [0.5, 0.1, 0.7, 0.0, 0.0]
  at = [0.0, 0.1, 0.3, 0.5, 0.6]
  accuracy = smoothing.certified_accuracy(correct, radii, at)
  np.testing.assert_allclose(accuracy, [3 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0])
  table = smoothing.accuracy_table(at, accuracy, title="sigma=0.25").splitlines()
  assert table[0] == "sigma=0.25" and table[2].split() == ["0.000", "60.00"] and table[5].split() == ["0.500", "20.00"]
  with pytest.raises(ValueError, match="non-empty"):
    smoothing.certified_accuracy([True], [0.1, 0.2], at)


def test_plot_draws_the_certified_accuracy_curve_and_writes_it_as_a_png(tmp_path, monkeypatch):
  figures = []

  class RecordedFigure(matplotlib.figure.Figure):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      figures.append(self)

  monkeypatch.setattr(matplotlib.figure, "Figure", RecordedFigure)
  path = str(tmp_path / "certified.png")
  smoothing.plot_certified_accuracy(path, [True, False, True], [0.3, 0.0, 0.8], title="test")
  (axes,) = figures[0].axes
  ((radius, accuracy),) = [line.get_data() for line in axes.get_lines()]
  np.testing.assert_allclose(radius, 0.01 * np.arange(81), atol=1e-12)  # steps of 0.01 up to the largest radius
  # Examples 1 and 3 are certified up to 0.3, example 3 up to 0.8 (grid points compared as plotted).
  np.testing.assert_array_equal(accuracy, np.where(radius <= 0.3, 2 / 3, np.where(radius <= 0.8, 1 / 3, 0.0)))
  assert accuracy[10] == 2 / 3 and accuracy[50] == 1 / 3  # at radius 0.1 and 0.5
  assert axes.get_xlim() == (0, 0.8) and axes.get_ylim() == (0, 1) and axes.get_title() == "test"
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.image.imread(path).shape == (675, 900, 4)  # 6 x 4.5 inches at 150 dpi


# ----------------------------------------------------------------------------------------------------------
# `hydra-jax certify` on a tiny trained run.


@pytest.mark.slow  # ~45 CPU s; the default run certifies through the CLI in test_cloud.py (the files it writes)
def test_cli_certify_writes_tsv_table_json_and_plot(tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "certify")
  run = [
    "--config",
    "configs/digits_demo.py:model=cnn_tiny,objective=smooth",
    "--config.stage=pretrain",
    "--config.stop_after_steps=1",
    "--config.eval.steps=1",
    "--config.data.eval_examples=120",
    "--config.log.progress=false",
    "--workdir",
    workdir,
  ]
  hydra_jax("train", *run)
  result = hydra_jax(
    "certify",
    *run,
    "--sigma=0.5",
    "--n0=20",
    "--n=200",
    "--alpha=0.01",
    "--skip=40",
    "--max_examples=4",
    "--certify_batch=64",
    f"--out={out}",
  )
  assert "sigma=0.5, n=200, alpha=0.01, 4 examples" in result.stdout

  with open(os.path.join(out, "certify.tsv")) as f:
    header, *rows = [line.rstrip("\n").split("\t") for line in f]
  assert header == ["idx", "label", "predict", "radius", "correct", "time"]
  test_labels = data.eval_batches("digits", 360).batch_at(0)["label"]
  assert [int(r[0]) for r in rows] == [0, 40, 80, 120]
  assert [int(r[1]) for r in rows] == list(test_labels[[0, 40, 80, 120]])
  top = smoothing.max_radius(0.5, 200, 0.01)  # 0.5 * Phi^-1(0.01^(1/200)) = 0.96
  # A returned class has pA_lower > 1/2 for some count of the n = 200 votes: its radius is > 0 and is one of
  # sigma * Phi^-1(Clopper-Pearson lower bound of c of 200), c = 101 .. 200.
  possible = 0.5 * stats.norm.ppf(stats.beta.ppf(0.01, np.arange(101, 201), 200 - np.arange(101, 201) + 1))
  for _, label, predict, radius, correct, _ in rows:
    assert int(correct) == (predict == label) and -1 <= int(predict) < 10
    if int(predict) == -1:
      assert float(radius) == 0
    else:
      assert 0 < float(radius) <= top + 1e-5 and np.min(np.abs(possible - float(radius))) < 1e-5, radius
  predicted = np.array([int(r[2]) for r in rows])
  assert (predicted == -1).any() and (predicted != -1).any()  # the checks above are not vacuous

  with open(os.path.join(out, "certified_accuracy.json")) as f:
    summary = json.load(f)
  assert (summary["sigma"], summary["n0"], summary["n"], summary["alpha"], summary["skip"]) == (0.5, 20, 200, 0.01, 40)
  assert summary["radii"] == [0.0, 0.25, 0.5, 0.75]  # multiples of 0.25 up to the largest certifiable radius
  # The whole curve and the abstentions, recomputed from the TSV: correct and certified at or beyond r.
  correct, radii = np.array([r[4] == "1" for r in rows]), np.array([float(r[3]) for r in rows])
  curve = [np.mean(correct & (radii >= r)) for r in (0.0, 0.25, 0.5, 0.75)]
  np.testing.assert_allclose(summary["certified_accuracy"], curve, atol=1e-12)
  assert summary["abstained"] == np.sum(predicted == -1) and summary["num_examples"] == 4
  with open(os.path.join(out, "certified_accuracy.txt")) as f:
    table = [line.split() for line in f.read().splitlines()[2:]]
  assert [(float(r), float(a)) for r, a in table] == [(r, round(100 * a, 2)) for r, a in zip(summary["radii"], curve)]
  assert matplotlib.image.imread(os.path.join(out, "certified_accuracy.png")).shape == (675, 900, 4)

  # The same run through `hydra-jax eval --methods=smooth`: certified accuracy at the config's radii.
  settings = ["--config.eval.smooth.sigma=0.5", "--config.eval.smooth.n0=20", "--config.eval.smooth.n=200"]
  settings += ["--config.eval.smooth.alpha=0.01", "--config.eval.smooth.batch_size=64"]
  results = json.loads(hydra_jax("eval", *run, "--methods=smooth", *settings).stdout)
  at = [results[f"smooth_r{r:g}"] for r in (0, 0.25, 0.5, 0.75)]
  assert results["num_examples"] == 120 and 0 < at[0] <= 1
  assert at == sorted(at, reverse=True) and results["smooth"] == at[2]  # eps 0.5: the same decisions as r = 0.5
  assert results["settings"]["smooth"] == {
    **dict(eps=0.5, radii=[0.0, 0.25, 0.5, 0.75], norm="l2"),
    **dict(sigma=0.5, n0=20, n=200, alpha=0.01, batch_size=64),
  }  # each number is written with what produced it


def test_config_warns_when_the_smooth_method_certifies_another_sigma_than_trained():
  config = config_lib.default_config()
  config.objective = config_lib.objective_config("smooth")
  config.eval.methods = ("smooth",)
  config.objective.noise_std, config.eval.smooth.sigma = 0.5, 0.25
  with pytest.warns(UserWarning, match=r"eval.smooth.sigma=0.25 .*objective.noise_std=0.5"):
    config_lib.check_config(config)
  config.eval.smooth.sigma = 0.5
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    config_lib.check_config(config)
