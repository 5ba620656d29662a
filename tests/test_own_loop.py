"""Tests of hydra_jax.own_loop: HYDRA's scores, masks and straight-through gradient in a user's own loop."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from hydra_jax import data
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import own_loop
from tests.test_masking import numpy_topk_mask

K = 0.2


def _digits(n=3):
  stream = data.train_batches("digits", 16, seed=0)
  return [stream.batch_at(i) for i in range(n)]


def test_a_prune_step_moves_the_scores_by_the_straight_through_gradient_and_keeps_the_weights():
  model = models.get_model("vgg_tiny", 10)  # conv + BatchNorm + dense
  batch = _digits(1)[0]
  variables = model.init(jax.random.key(0), batch["image"][:1], train=False)
  apply_fn, variables = own_loop.apply_fn_of(model, variables)
  trainable = own_loop.init(variables["params"], jax.random.key(1), score_init="kaiming_normal")
  lr = 0.5
  tx = own_loop.wrap_optax(optax.sgd(lr), "prune", freeze_bn=True)
  loss_fn = own_loop.robust_loss(apply_fn, "benign", k=K)
  (_, (_, batch_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    trainable, variables["batch_stats"], batch, jax.random.key(2)
  )
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  new = optax.apply_updates(trainable, updates)

  # Independently: the gradient of the loss with respect to the weights the model ran with (w * mask).
  masks = jax.tree.map(lambda s: numpy_topk_mask(s, K), trainable["scores"])
  effective = jax.tree.map(
    lambda w, m: w if m is None else w * m, trainable["params"], masks, is_leaf=lambda x: x is None
  )

  def dense_loss(weights):
    logits, _ = apply_fn({"params": weights, "batch_stats": variables["batch_stats"]}, batch["image"], True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  g = jax.jit(jax.grad(dense_loss))(effective)
  for path, s in jax.tree_util.tree_flatten_with_path(trainable["scores"])[0]:
    name = masking.path_name(path)
    w = _at(trainable["params"], name)
    expected = s - lr * np.sign(s) * w * _at(g, name)  # Eq. 4: dL/ds = sign(s) w dL/dw_eff
    np.testing.assert_allclose(_at(new["scores"], name), expected, rtol=1e-4, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new["params"], trainable["params"])  # weights (and BN: frozen) stay
  assert jax.tree.structure(batch_stats) == jax.tree.structure(variables["batch_stats"])


def _at(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return np.asarray(tree)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


@pytest.mark.slow  # 35 CPU s; the straight-through step of the default run checks wrap_optax and the mask
def test_trades_prune_then_finetune_in_your_own_loop_on_an_nnx_model():
  apply_fn, variables = own_loop.apply_fn_of(NnxNet(nnx.Rngs(0)))
  assert set(variables) == {"params", "batch_stats"}
  trainable = own_loop.init(variables["params"], jax.random.key(0))
  loss_fn = own_loop.robust_loss(apply_fn, "trades", k=K, eps=0.1, step_size=0.05, steps=2)

  def run(trainable, tx, batch_stats):
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, batch_stats, batch, key):
      (loss, (_, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch_stats, batch, key)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, batch_stats, loss

    for i, batch in enumerate(_digits()):
      trainable, opt_state, batch_stats, loss = step(trainable, opt_state, batch_stats, batch, jax.random.key(i))
      assert np.isfinite(loss)
    return trainable, batch_stats

  pruned, batch_stats = run(trainable, own_loop.wrap_optax(optax.adam(0.05), "prune"), variables["batch_stats"])
  assert not np.array_equal(pruned["scores"]["conv"]["kernel"], trainable["scores"]["conv"]["kernel"])
  np.testing.assert_array_equal(pruned["params"]["conv"]["kernel"], trainable["params"]["conv"]["kernel"])
  assert not np.array_equal(batch_stats["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])  # train-mode BN

  start = {"params": own_loop.export(pruned, K), "scores": pruned["scores"]}
  tuned, _ = run(start, own_loop.wrap_optax(optax.adam(0.05), "finetune"), batch_stats)
  for layer in ("conv", "head"):
    kept = numpy_topk_mask(pruned["scores"][layer]["kernel"], K).astype(bool)
    weights = np.asarray(tuned["params"][layer]["kernel"])
    assert np.all(weights[~kept] == 0) and not np.array_equal(
      weights[kept], np.asarray(start["params"][layer]["kernel"])[kept]
    )
  jax.tree.map(np.testing.assert_array_equal, tuned["scores"], pruned["scores"])  # the mask is fixed


def test_bad_arguments_are_one_line_errors():
  with pytest.raises(ValueError, match="objective 'trades' has no setting 'epsilon'; its settings: "):
    own_loop.robust_loss(lambda v, x, t: (x, v), "trades", k=0.1, epsilon=0.1)
  with pytest.raises(ValueError, match="stage 'pretrain' is not 'prune' or 'finetune'"):
    own_loop.wrap_optax(optax.sgd(0.1), "pretrain")
  with pytest.raises(ValueError, match="a Linen module and its variables"):
    own_loop.apply_fn_of(models.get_model("cnn_tiny", 10))
