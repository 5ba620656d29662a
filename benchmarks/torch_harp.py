"""HARP's per-layer pruning layers re-stated in PyTorch, the independent reference for `hydra_jax.harp`'s tests.

Re-stated from intellisec/harp (read with `git show HEAD:<file>` in the reference repository):

- `utils/utils.py`: `rate_act_func` (k = sigmoid(k_score) (1 - k_min) + k_min) and `rate_init_func` (the logit of
  (k - k_min) / (1 - k_min), its argument clipped to [-1 + 1e-2, 1 - 1e-2]).
- `models/layers.py`: `GetSubnet` for weight pruning (clone, flatten, full sort, the `int((1 - k) numel)` smallest
  set to 0, the rest to 1; backward: the gradient straight through to the scores and its SUM to the rate k),
  `SubnetConv` / `SubnetLinear` (weight and bias frozen, `popup_scores` of the weight's shape, a scalar `k_score`,
  `k_min = global_k * alpha` from `set_prune_rate`, the mask recomputed from `|popup_scores|` and the rate in
  every forward).
- `utils/hw.py:hw_loss` (weight granularity): current = sum_l n_l k_l / sum_l n_l, loss = max(current / k - 1, 0),
  gamma = (epoch + 1) * gamma0 with `--gamma_dynamic`, or the frozen gamma.

Not from the reference: `TinyCNN`, hydra_jax's `cnn_tiny` wiring (conv 4x4/2 1->4, conv 4x4/2 4->8, flatten in NHWC
order, dense 32->16, dense 16->10, ReLUs) built from these layers, so that a test can load the same weights into both.

Usage:

  net = torch_harp.TinyCNN(k=0.1, alpha=0.1)
  logits = net(images_nchw)
  loss = F.cross_entropy(logits, labels) + gamma * torch_harp.hw_loss(net, k=0.1)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import torch_hydra


def rate_act_func(k_score, k_min):
  """HARP's kept fraction of a layer: sigmoid(k_score) * (1 - k_min) + k_min."""
  return torch.sigmoid(k_score) * (1 - k_min) + k_min


def rate_init_func(k, k_min):
  """HARP's initial k_score: logit((k - k_min) / (1 - k_min)), the argument clipped to [-0.99, 0.99]."""
  inv_k = torch.clip(torch.tensor((k - k_min) / (1 - k_min)), min=-1.0 + 1e-2, max=1.0 - 1e-2)
  return torch.log(inv_k / (1 - inv_k))


class GetSubnet(torch_hydra.GetSubnet):
  """torch_hydra's GetSubnet (the same sorted top-k forward) whose straight-through backward also gives the rate
  the sum of the mask's gradient (HARP's weight pruning)."""

  @staticmethod
  def backward(ctx, g):
    return g, torch.sum(g)


class _Subnet:
  """The rate parameter and pruning rate of HARP's SubnetConv / SubnetLinear."""

  def _init_subnet(self):
    self.popup_scores = nn.Parameter(torch.empty(self.weight.shape))
    nn.init.kaiming_uniform_(self.popup_scores, a=math.sqrt(5))
    self.k_score = nn.Parameter(torch.tensor(1.0))
    self.weight.requires_grad = False
    if self.bias is not None:
      self.bias.requires_grad = False
    self.k_min = 0.0

  def set_prune_rate(self, global_k, alpha):
    self.k_min = global_k * alpha

  def masked_weight(self):
    return self.weight * GetSubnet.apply(self.popup_scores.abs(), rate_act_func(self.k_score, self.k_min))


class SubnetConv(nn.Conv2d, _Subnet):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._init_subnet()

  def forward(self, x):
    return F.conv2d(x, self.masked_weight(), self.bias, self.stride, self.padding)


class SubnetLinear(nn.Linear, _Subnet):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._init_subnet()

  def forward(self, x):
    return F.linear(x, self.masked_weight(), self.bias)


class TinyCNN(nn.Module):
  """hydra_jax's cnn_tiny from HARP's layers (NCHW input, NHWC flatten as hydra_jax's)."""

  def __init__(self, k, alpha):
    super().__init__()
    self.layers = nn.ModuleList(
      [
        SubnetConv(1, 4, 4, stride=2, padding=1),
        SubnetConv(4, 8, 4, stride=2, padding=1),
        SubnetLinear(32, 16),
        SubnetLinear(16, 10),
      ]
    )
    for layer in self.layers:
      layer.set_prune_rate(k, alpha)

  def forward(self, x):
    x = F.relu(self.layers[0](x))
    x = F.relu(self.layers[1](x))
    x = x.permute(0, 2, 3, 1).flatten(1)
    x = F.relu(self.layers[2](x))
    return self.layers[3](x)


def hw_loss(model, k):
  """HARP's hardware loss of `model`'s Subnet layers: max(sum n_l k_l / sum n_l / k - 1, 0)."""
  total, survivors = 0, 0
  for m in model.modules():
    if hasattr(m, "k_score"):
      total += m.weight.numel()
      survivors = survivors + m.weight.numel() * rate_act_func(m.k_score, m.k_min)
  return torch.maximum(survivors / total / k - 1.0, torch.tensor(0.0))


def gamma(epoch, gamma0, frozen=None):
  """HARP's dynamic gamma: the frozen one, else (epoch + 1) * gamma0."""
  return frozen if frozen is not None else (epoch + 1) * gamma0
