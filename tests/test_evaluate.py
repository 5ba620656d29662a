"""Tests for hydra_jax.evaluate: exact robust accuracy of a linear model, padding masks, the per-example
worst case, configuration errors and compilation reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import attacks
from hydra_jax import evaluate
from hydra_jax import smoothing
from tests import robust_helpers as helpers

SHAPE = helpers.LINEAR_SHAPE
FAST = {
  "pgd_linf": {"steps": 10},
  "apgd_ce": {"steps": 20},
  "apgd_dlr": {"steps": 20},
  "apgd_t": {"steps": 10, "num_targets": 3},
  "pgd_l2": {"steps": 10},
}


def test_linear_model_robust_accuracy_is_exact():
  eps = 0.05
  model, variables, x, y = helpers.linear_problem(eps=eps)
  exact = helpers.exact_linf_robust(variables, x, y, eps)
  config = evaluate.default_config(linf_eps=eps)
  for name, overrides in FAST.items():
    config[name].update(overrides)
  results = evaluate.evaluate(
    helpers.make_apply_fn(model),
    variables,
    helpers.linear_batches(x, y, 16),
    key=helpers.key(0),
    methods=("pgd_linf", "apgd_ce", "apgd_dlr", "apgd_t"),
    config=config,
    progress=False,
  )
  assert 0.2 < exact.mean() < 0.8
  dense = variables["params"]["Dense_0"]
  numpy_logits = x.reshape(len(x), -1) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  np.testing.assert_allclose(results["clean"], np.mean(numpy_logits.argmax(-1) == y))
  # Sound (no certified example is broken) and tight (targeted APGD finds every break of a linear model).
  np.testing.assert_allclose(results["apgd_t"], exact.mean())
  np.testing.assert_allclose(results["robust"], exact.mean())
  for name in ("pgd_linf", "apgd_ce", "apgd_dlr"):
    assert exact.mean() <= results[name] <= results["clean"]
  assert results["robust_linf"] == results["robust"] and results["num_examples"] == len(y)


# Without random starts each example's result does not depend on how the examples are batched.
SMALL_CONFIG = {"pgd_linf": {"steps": 3, "random_start": False}, "pgd_l2": {"steps": 3, "random_start": False}}


def test_padding_does_not_count():
  model, variables, x, y = helpers.linear_problem(n=48)
  apply_fn = helpers.make_apply_fn(model)
  run = lambda batches: evaluate.evaluate(
    apply_fn,
    variables,
    batches,
    key=helpers.key(1),
    methods=("pgd_linf", "pgd_l2"),
    config=SMALL_CONFIG,
    progress=False,
  )
  padded = run(helpers.linear_batches(x, y, 12, pad_to=16))  # every batch: 12 real rows and 4 padded ones
  plain = run(helpers.linear_batches(x, y, 16))
  assert padded["num_examples"] == plain["num_examples"] == 48
  for name in ("clean", "pgd_linf", "pgd_l2", "robust", "robust_linf", "robust_l2"):
    np.testing.assert_allclose(padded[name], plain[name], err_msg=name)
  assert padded["robust"] <= min(padded["robust_linf"], padded["robust_l2"])


def _identity(logits_fn, x, y, *, key, eps, norm):
  return x


def _fool_rows(logits_fn, x, y, *, key, eps, norm, residue):
  """Fools rows i % 3 == residue of a linear model: a long step raising the runner-up logit above z_y."""
  logits = logits_fn(x)
  runner_up = jnp.argmax(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)
  pick = lambda z, c: jnp.take_along_axis(z, c[:, None], -1).sum()
  grad = jax.grad(lambda z: pick(logits_fn(z), runner_up) - pick(logits_fn(z), y))(x)
  rows = (jnp.arange(x.shape[0]) % 3 == residue)[:, None, None, None]
  return jnp.where(rows, x + 1e3 * grad, x)


evaluate.register_method("test_identity", _identity, {"norm": "linf", "eps": 0.0})
evaluate.register_method("test_fool_0", _fool_rows, {"norm": "linf", "eps": 0.0, "residue": 0})
evaluate.register_method("test_fool_1", _fool_rows, {"norm": "l2", "eps": 0.0, "residue": 1})


def test_robust_is_the_per_example_worst_case():
  model, variables, x, y = helpers.linear_problem(n=30, seed=2)
  logits_fn = lambda z: model.apply(variables, z, train=False)
  results = evaluate.evaluate(
    logits_fn,
    None,
    helpers.linear_batches(x, y, 10),
    key=helpers.key(0),
    methods=("test_identity", "test_fool_0", "test_fool_1"),
    progress=False,
  )
  clean = np.asarray(logits_fn(x)).argmax(-1) == y
  row = np.arange(30) % 10 % 3  # position inside each batch of 10, modulo 3
  expected = {
    "clean": clean,
    "test_identity": clean,
    "test_fool_0": clean & (row != 0),
    "test_fool_1": clean & (row != 1),
    "robust": clean & (row == 2),
    "robust_linf": clean & (row != 0),
    "robust_l2": clean & (row != 1),
  }
  for name, correct in expected.items():
    np.testing.assert_allclose(results[name], correct.mean(), err_msg=name)
  assert 0 < results["robust"] < min(results["test_fool_0"], results["test_fool_1"])


def test_configuration_errors_name_the_problem():
  model, variables, x, y = helpers.linear_problem(n=8)
  apply_fn = helpers.make_apply_fn(model)
  with pytest.raises(ValueError, match=r"unknown evaluation method 'fgsm'.*apgd_ce"):
    evaluate.evaluate(apply_fn, variables, helpers.linear_batches(x, y, 8), key=helpers.key(0), methods=("fgsm",))
  with pytest.raises(ValueError, match=r"unknown settings \['stepsize'\].*step_size"):
    evaluate.evaluate(
      apply_fn,
      variables,
      helpers.linear_batches(x, y, 8),
      key=helpers.key(0),
      methods=("pgd_linf",),
      config={"pgd_linf": {"stepsize": 0.1}},
    )
  with pytest.raises(ValueError, match="already registered"):
    evaluate.register_method("apgd_ce", _identity, {"norm": "linf", "eps": 0.1})


def test_default_config_sets_eps_per_norm():
  config = evaluate.default_config(linf_eps=0.1, l2_eps=1.0)
  assert (config.pgd_linf.eps, config.pgd_linf.step_size, config.apgd_t.eps) == (0.1, 0.025, 0.1)
  assert (config.pgd_l2.eps, config.pgd_l2.step_size) == (1.0, 0.25)


_TRACES = []


def _counted_identity(logits_fn, x, y, *, key, eps, norm):
  _TRACES.append(x.shape)  # runs once per trace (compilation), not per call
  return x


evaluate.register_method("test_counted", _counted_identity, {"norm": "linf", "eps": 0.0})


def test_each_batch_shape_compiles_once_across_calls():
  model, variables, x, y = helpers.linear_problem(n=32)
  apply_fn = helpers.make_apply_fn(model)
  run = lambda batch_size: evaluate.evaluate(
    apply_fn,
    variables,
    helpers.linear_batches(x, y, batch_size),
    key=helpers.key(0),
    methods=("test_counted",),
    progress=False,
  )
  first = run(16)
  assert _TRACES == [(16, *SHAPE)]  # one trace for the two batches of 16
  assert run(16) == first and _TRACES == [(16, *SHAPE)]  # a second call reuses it
  run(8)
  assert _TRACES == [(16, *SHAPE), (8, *SHAPE)]  # a new shape compiles once more


def _certify_margin(logits_fn, x, y, *, key, eps, norm, margin):
  """A toy verifier: certifies the examples whose top-1 logit margin exceeds `margin`."""
  top2 = jax.lax.top_k(logits_fn(x), 2)[0]
  return top2[:, 0] - top2[:, 1] > margin


evaluate.register_method("test_margin", _certify_margin, {"norm": "linf", "eps": 0.0, "margin": 0.1}, kind="verifier")


def test_verifiers_and_top5_count_per_example():
  model, variables, x, y = helpers.linear_problem(n=40, seed=3)
  logits_fn = lambda z: model.apply(variables, z, train=False)
  results = evaluate.evaluate(
    logits_fn,
    None,
    helpers.linear_batches(x, y, 8),
    key=helpers.key(0),
    methods=("test_margin", "test_fool_0"),
    progress=False,
  )
  logits = np.asarray(logits_fn(x))
  clean = logits.argmax(-1) == y
  top5 = (np.argsort(-logits, axis=-1)[:, :5] == y[:, None]).any(-1)
  ordered = np.sort(logits, axis=-1)
  certified = clean & (ordered[:, -1] - ordered[:, -2] > 0.1)
  fooled_rows = np.arange(40) % 8 % 3 == 0
  np.testing.assert_allclose(results["clean_top5"], top5.mean())
  np.testing.assert_allclose(results["test_margin"], certified.mean())
  np.testing.assert_allclose(results["robust"], (certified & ~fooled_rows).mean())
  assert 0 < results["robust"] < results["test_margin"] < results["clean"] < results["clean_top5"]
  with pytest.raises(ValueError, match="kind 'bound'"):
    evaluate.register_method("test_bad_kind", _certify_margin, {"norm": "linf", "eps": 0.0}, kind="bound")


def test_counts_are_summed_over_eight_devices():
  model, variables, x, y = helpers.linear_problem(n=48)
  apply_fn = helpers.make_apply_fn(model)
  run = lambda mode: evaluate.evaluate(
    apply_fn,
    variables,
    helpers.linear_batches(x, y, 12, pad_to=16),
    key=helpers.key(1),
    methods=("pgd_linf", "pgd_l2"),
    config=SMALL_CONFIG,
    progress=False,
    mode=mode,
  )
  single = run("single")
  for mode in ("shard_map", "pmap"):  # the key is a typed PRNG key (jax.random.key), replicated as one
    sharded = run(mode)
    assert sharded["num_examples"] == 48
    for name, value in single.items():
      np.testing.assert_allclose(sharded[name], value, err_msg=f"{mode}: {name}")


def test_per_example_results_are_each_examples_in_order_on_any_number_of_devices():
  """Padding dropped, split order kept, every column averaging to its accuracy; each example's verdict the
  closed-form one, the same on 1 and 8 devices."""
  model, variables, x, y = helpers.linear_problem(n=44)
  eps = 0.05
  apply_fn = helpers.make_apply_fn(model)
  config = {"pgd_linf": {"steps": 3, "random_start": False, "eps": eps}, "crown_ibp": {"eps": eps}}
  run = lambda mode: evaluate.evaluate_per_example(
    apply_fn,
    variables,
    helpers.linear_batches(x, y, 12, pad_to=16),
    key=helpers.key(1),
    methods=("pgd_linf", "crown_ibp"),
    config=config,
    progress=False,
    mode=mode,
  )
  accuracies, examples = run("single")
  assert list(examples) == ["index", "label", "clean", "clean_top5", "pgd_linf", "crown_ibp", "robust_linf", "robust"]
  np.testing.assert_array_equal(examples["index"], np.arange(44))
  np.testing.assert_array_equal(examples["label"], y)
  dense = variables["params"]["Dense_0"]
  logits = x.reshape(len(x), -1) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  np.testing.assert_array_equal(examples["clean"], logits.argmax(-1) == y)
  # The margin bound of a linear model is exact: its verdict is the closed-form one.
  np.testing.assert_array_equal(examples["crown_ibp"], helpers.exact_linf_robust(variables, x, y, eps))
  np.testing.assert_array_equal(examples["robust"], examples["clean"] & examples["pgd_linf"] & examples["crown_ibp"])
  for name, column in examples.items():
    if name not in ("index", "label"):
      assert column.dtype == bool and column.mean() == accuracies[name], name
  for mode in ("shard_map", "pmap"):
    _, sharded = run(mode)
    for name, column in examples.items():
      np.testing.assert_array_equal(sharded[name], column, err_msg=f"{mode}: {name}")


def _coin(logits_fn, x, y, *, key, eps, norm):
  """A 'verifier' that certifies each example with probability 1/2, drawn from its key."""
  del logits_fn, y, eps, norm
  return attacks.draw(jax.random.uniform, key, (x.shape[0],), jnp.float32) < 0.5


evaluate.register_method("test_coin", _coin, {"norm": "linf", "eps": 0.0}, kind="verifier")


def test_random_draws_of_methods_do_not_depend_on_the_device_count():
  model, variables, x, y = helpers.linear_problem(n=32)
  # Example i of a batch of 16 weighs 2^i: the weighted count is the per-example outcome pattern, in binary.
  batches = [{"image": x[s : s + 16], "label": y[s : s + 16], "mask": 2.0 ** np.arange(16)} for s in range(0, 32, 16)]
  run = lambda mode: evaluate.evaluate(
    helpers.make_apply_fn(model),
    variables,
    batches,
    key=jax.random.key(2),  # threefry: rbg draws under vmap depend on the batch shape
    methods=("test_coin",),
    progress=False,
    mode=mode,
  )
  single = run("single")
  assert 0.05 < single["test_coin"] < 0.95
  for mode in ("shard_map", "pmap"):
    assert run(mode)["test_coin"] == single["test_coin"], mode


def test_run_settings_apply_the_threat_model_to_the_methods_of_its_norm():
  eval_config = {
    "methods": ("pgd_linf", "apgd_ce", "pgd_l2"),
    "norm": "linf",
    "eps": 0.1,
    "step_size": 0.02,
    "steps": 3,
    "restarts": 2,
  }
  settings = evaluate.config_settings(eval_config)
  assert {k: settings["pgd_linf"][k] for k in ("eps", "step_size", "steps", "restarts")} == {
    "eps": 0.1,
    "step_size": 0.02,
    "steps": 3,
    "restarts": 2,
  }
  assert (settings["apgd_ce"]["eps"], settings["apgd_ce"]["steps"]) == (0.1, 100)  # eps only: APGD keeps 100 steps
  assert settings["pgd_l2"] == dict(evaluate.get_method("pgd_l2").defaults)  # the other norm keeps its defaults


@pytest.mark.parametrize("verifier", ["ibp", "crown_ibp", "crown", "alpha_crown", "symbolic"])
def test_verifiers_give_the_exact_verified_accuracy_of_a_linear_model(verifier):
  # For f(x) = x W + b every margin (e_y - e_j) . f is affine, so its minimum over the box [x - eps, x + eps]
  # clipped to [0, 1] is attained coordinate-wise at a corner: the exact verified set, computed in numpy.
  rng = np.random.default_rng(0)
  w, b = rng.normal(size=(12, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
  x = rng.uniform(size=(64, 2, 2, 3)).astype(np.float32)
  y = np.argmax(x.reshape(64, -1) @ w + b, axis=-1)
  y[:8] = (y[:8] + 1) % 4  # some misclassified examples: never verified
  eps = 0.05
  low, high = np.clip(x - eps, 0, 1).reshape(64, -1), np.clip(x + eps, 0, 1).reshape(64, -1)
  exact = []
  for i in range(64):
    rows = [w[:, y[i]] - w[:, j] for j in range(4) if j != y[i]]
    biases = [b[y[i]] - b[j] for j in range(4) if j != y[i]]
    exact.append(all(np.minimum(r * low[i], r * high[i]).sum() + c > 0 for r, c in zip(rows, biases, strict=True)))
  logits_fn = lambda images: images.reshape(images.shape[0], -1) @ w + b
  batch = {"image": x, "label": y.astype(np.int32), "mask": np.ones(64, np.float32)}
  results = evaluate.evaluate(
    logits_fn, None, [batch], key=jax.random.key(0), methods=[verifier], config={verifier: {"eps": eps}}, progress=False
  )
  assert 0 < np.mean(exact) < 1
  np.testing.assert_allclose(results[verifier], np.mean(exact), atol=1e-6)
  np.testing.assert_allclose(results["robust"], np.mean(exact), atol=1e-6)


def test_smooth_certifies_a_constant_classifier_up_to_its_largest_radius():
  # f always predicts class 1: all n votes, so CERTIFY returns class 1 with radius sigma Phi^-1(alpha^(1/n))
  # (0.85 here) on every example. Certified accuracy: the share of label 1 up to that radius, 0 beyond.
  sigma, n, alpha = 0.5, 100, 0.01
  top = smoothing.max_radius(sigma, n, alpha)
  constant = lambda x: jnp.broadcast_to(jnp.array([0.0, 2.0, 1.0]), (x.shape[0], 3))
  x, y = np.zeros((12, *SHAPE), np.float32), np.array([1, 0, 2] * 4, np.int32)
  y[:5] = 1
  eval_config = {"methods": ("smooth",), "norm": "linf", "eps": 0.1}
  eval_config["smooth"] = dict(eps=0.8, radii=(0.0, 0.8, top - 1e-3, top + 1e-3), sigma=sigma, n0=10, n=n, alpha=alpha)
  eval_config["smooth"]["batch_size"] = 32
  results = evaluate.evaluate(
    constant,
    None,
    helpers.linear_batches(x, y, 6),
    key=helpers.key(0),
    methods=("smooth",),
    config=evaluate.config_settings(eval_config),
    progress=False,
  )
  share = np.mean(y == 1)
  expected = {"smooth": share, "smooth_r0": share, "smooth_r0.8": share, f"smooth_r{top - 1e-3:g}": share}
  assert {name: results[name] for name in expected} == pytest.approx(expected)
  assert results[f"smooth_r{top + 1e-3:g}"] == 0.0
  assert results["robust"] == results["clean"] == share  # the smoothed classifier's numbers stand apart
  assert "robust_l2" not in results
