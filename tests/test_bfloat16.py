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
