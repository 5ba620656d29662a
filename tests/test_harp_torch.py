"""hydra_jax's HARP against HARP's layers re-stated in PyTorch (benchmarks/torch_harp.py) on cnn_tiny: the same
masks, logits, hardware loss and gradients of the scores and rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_harp  # noqa: E402  (needs torch)
from hydra_jax import harp  # noqa: E402
from hydra_jax import masking  # noqa: E402
from hydra_jax import models  # noqa: E402

NAMES = ("0", "2", "5", "7")  # cnn_tiny's kernels in order
K, ALPHA, GAMMA = 0.2, 0.1, 3.0


def _to_torch(kernel):
  """A Flax kernel (kh, kw, in, out) or (in, out) as PyTorch's (out, in, kh, kw) or (out, in)."""
  kernel = np.asarray(kernel)
  return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T))


def _from_torch(array):
  array = array.detach().numpy()
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


@pytest.fixture(scope="module")
def both():
  model = models.get_model("cnn_tiny", 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(1))
  rng = np.random.default_rng(2)
  rates = jax.tree.map(lambda _: jnp.float32(rng.normal()), harp.init_rates(params, scores, k=K, alpha=ALPHA))
  net = torch_harp.TinyCNN(K, ALPHA)
  with torch.no_grad():
    for layer, name in zip(net.layers, NAMES):
      layer.weight.copy_(_to_torch(params[name]["kernel"]))
      layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
      layer.popup_scores.copy_(_to_torch(scores[name]["kernel"]))
      layer.k_score.copy_(torch.tensor(float(rates[name]["kernel"])))
  x = np.random.default_rng(3).uniform(size=(16, 8, 8, 1)).astype(np.float32)
  y = np.arange(16) % 10
  return model, params, scores, rates, net, x, y


def test_masks_logits_and_hardware_loss_match_the_pytorch_restatement(both):
  model, params, scores, rates, net, x, y = both

  @jax.jit
  def masks_and_logits(scores, rates):
    masks = masking.compute_masks(scores, harp.layer_rates(rates, K, ALPHA))
    masked = masking.apply_masks(params, scores, harp.layer_rates(rates, K, ALPHA))
    return masks, model.apply({"params": masked}, x, train=False)

  masks, logits = masks_and_logits(scores, rates)
  for layer, name in zip(net.layers, NAMES):
    k = torch_harp.rate_act_func(layer.k_score, layer.k_min)
    theirs = torch_harp.GetSubnet.apply(layer.popup_scores.abs(), k)
    np.testing.assert_array_equal(masks[name]["kernel"], _from_torch(theirs))
  theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
  np.testing.assert_allclose(logits, theirs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(harp.hw_loss(rates, scores, K, ALPHA), torch_harp.hw_loss(net, K).item(), rtol=1e-6)


def test_gradients_of_scores_and_rates_match_the_pytorch_restatement(both):
  model, params, scores, rates, net, x, y = both

  def loss_fn(scores, rates):
    masked = masking.apply_masks(params, scores, harp.layer_rates(rates, K, ALPHA))
    logits = model.apply({"params": masked}, x, train=False)
    robust = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return robust + GAMMA * harp.hw_loss(rates, scores, K / 4, ALPHA * 4)  # a loss above 0: both terms count

  # The hardware loss with target K / 4 and alpha * 4 has the same k_min (alpha k) and is positive.
  score_grads, rate_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(scores, rates)
  net.zero_grad()
  logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + GAMMA * torch_harp.hw_loss(net, K / 4)
  loss.backward()
  for layer, name in zip(net.layers, NAMES):
    np.testing.assert_allclose(score_grads[name]["kernel"], _from_torch(layer.popup_scores.grad), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(rate_grads[name]["kernel"], layer.k_score.grad.item(), rtol=1e-4, atol=1e-7)
  assert all(abs(float(g)) > 1e-6 for g in jax.tree.leaves(rate_grads))


def test_rate_init_and_gamma_match_the_pytorch_restatement():
  for k, k_min in ((0.1, 0.01), (1.0, 0.001), (0.05, 0.04)):
    np.testing.assert_allclose(harp.rate_init(k, k_min), torch_harp.rate_init_func(k, k_min).item(), rtol=1e-6)
  frozen = jnp.float32(0)
  for epoch in range(3):
    assert float(harp.gamma(jnp.int32(epoch * 5), 5, 0.5, frozen)) == torch_harp.gamma(epoch, 0.5)
  assert float(harp.gamma(jnp.int32(20), 5, 0.5, jnp.float32(1.5))) == torch_harp.gamma(4, 0.5, 1.5)
