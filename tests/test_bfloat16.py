"""bfloat16 compute (`config.model.dtype='bfloat16'`): the model computes in bfloat16, while masks, scores, their
gradients, the optimizer state, BatchNorm statistics and the loss stay float32.

The tolerance of the logits: bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through the
few layers of vgg_tiny on 8x8 digits the measured difference is ~1% of the logits' scale, and the bound below
(3% of that scale) leaves room for other seeds and backends.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import pipeline
from hydra_jax import sources
from hydra_jax import train
from tests import test_cloud
from tests import tolerances

K = 0.5
LOGIT_TOLERANCE = 0.03  # of max |float32 logit|


def prune_setup(dtype):
  """The prune stage of test_multihost's run in `dtype`: config, apply_fn, float32 params / scores / BN stats."""
  config = test_cloud.tiny_config(**{"model.dtype": dtype, "stage": "prune", "source": "unused", "k": K})
  config.objective.name = "benign"  # the masks and the dtypes are what is tested; PGD would only add compile time
  variables = sources.init_variables(config, jax.random.PRNGKey(0))
  scores = masking.init_scores(variables["params"], "uniform", jax.random.PRNGKey(1))
  apply_fn = models.make_apply_fn(sources.build_model(config))
  return config, apply_fn, variables["params"], variables["batch_stats"], scores


def score_loss_grad(apply_fn):
  """jit((scores, params, batch_stats, batch) -> ((cross-entropy, logits), d loss / d scores)) of the masked model."""

  def loss(scores, params, batch_stats, batch):
    weights = sources.masked_params(params, scores, K)
    logits, _ = apply_fn(sources.model_variables(weights, batch_stats), batch["image"], True)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["label"]]), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_a_bfloat16_prune_step_keeps_masks_scores_state_and_loss_in_float32():
  config, apply_fn, params, batch_stats, scores = prune_setup("bfloat16")
  batch = sources.train_batches(config).batch_at(0)
  (loss, logits), score_grads = score_loss_grad(apply_fn)(scores, params, batch_stats, batch)
  assert loss.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(score_grads))
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(masking.compute_masks(scores, K)))
  # The same masked model in float32: the bfloat16 logits differ (it computes in bfloat16), but little.
  _, float32_apply, *_ = prune_setup("float32")
  (_, float32_logits), _ = score_loss_grad(float32_apply)(scores, params, batch_stats, batch)
  scale = float(jnp.max(jnp.abs(float32_logits)))
  difference = float(jnp.max(jnp.abs(logits - float32_logits)))
  assert 0 < difference <= LOGIT_TOLERANCE * scale, (difference, scale)
  # One real train step of the prune stage: every float in the state stays float32, and the scores train.
  labels = optim.trainable_labels(params, scores, "prune", config.freeze_bn)
  tx = optim.make_optimizer(config, "prune", labels, 2)
  state = train.TrainState(
    step=jnp.int32(0),
    params=params,
    scores=scores,
    batch_stats=batch_stats,
    opt_state=tx.init({"params": params, "scores": scores}),
    carry=(),
    rng=jax.random.PRNGKey(2),
    aux=(),
  )
  step = functools.partial(
    train.train_step,
    apply_fn=apply_fn,
    objective=objectives.get_objective(config.objective.name),
    config=config,
    tx=tx,
    k=K,
    steps_per_epoch=2,
    axis_name=None,
  )
  new_state, metrics = jax.jit(step)(state, batch)
  floats = [x for x in jax.tree.leaves(new_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert all(m.dtype == jnp.float32 and np.isfinite(m) for m in metrics.values())
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.scores), jax.tree.leaves(scores)))
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(batch_stats))
  )


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_in_bfloat16(tmp_path):
  config = test_cloud.tiny_config(**{"model.dtype": "bfloat16", "stage": "all", "ks": (0.5,), "baselines": ("lwm",)})
  rows = pipeline.train_and_evaluate(config, str(tmp_path))
  assert [row["method"] for row in rows] == ["dense", "hydra (prune only)", "hydra", "lwm"]
  for row in rows:
    assert 0 <= row["robust"] <= row["clean"] <= 1
  assert rows[2]["kept_fraction"] == pytest.approx(K, abs=0.01)


def test_batchnorm_statistics_of_a_bfloat16_model_are_float32_sums_of_its_bfloat16_activations():
  """A train-mode call of resnet_tiny in bfloat16: each BN's new running mean / variance is the float32 statistic
  of the bfloat16 activations it received (its conv's output, captured), checked against float64 numpy.

  Each statistic is a mean of n values per channel (8 x 8 x 8 at the stem); float32 computes it within 2 gamma_n
  (at most 6e-5) of the sum of |terms| (tests/tolerances.py); statistics computed in bfloat16 are off by up to 2^-9
  (0.2%)."""
  model = models.get_model("resnet_tiny", 10, dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  _, new = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True)
  checked = 0
  for path, mean in jax.tree_util.tree_flatten_with_path(new["batch_stats"])[0]:
    if path[-1].key != "mean":
      continue
    *module, _ = [p.key for p in path]
    conv = [*module[:-1], module[-1].replace("bn", "conv").replace("shortcut_1", "shortcut_0")]
    activations = functools.reduce(lambda tree, name: tree[name], conv, new["intermediates"])["__call__"][0]
    assert activations.dtype == jnp.bfloat16
    a = np.asarray(activations, np.float64).reshape(-1, activations.shape[-1])
    n = len(a)
    var = functools.reduce(lambda tree, name: tree[name], module, new["batch_stats"])["var"]
    want_mean, want_var = 0.1 * a.mean(0), 0.9 + 0.1 * a.var(0) * n / (n - 1)
    assert mean.dtype == var.dtype == jnp.float32
    tolerances.assert_same_sums(mean, want_mean, 0.1 * np.abs(a).mean(0), n, err_msg=str(module))
    tolerances.assert_same_sums(var, want_var, 0.9 + 0.1 * a.var(0) * n / (n - 1), n, err_msg=str(module))
    checked += 1
  assert checked == 12  # the stem's, two per block (4 blocks) and three projection shortcuts'
