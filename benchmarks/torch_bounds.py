"""PyTorch re-statement of the reference's bound computations: the baseline of `bench_vs_torch`'s `bounds`
workload and the expectation of `hydra_jax.bounds`' agreement tests.

Written from HYDRA's `crown/bound_layers.py` (BoundSequential.interval_range and backward_range with the
trainer's bound_opts: adaptive lower slope) and `symbolic_interval/` (Interval_network with a
Symbolic_interval, `worst_case`), for an `nn.Sequential` of Conv2d / Linear / ReLU / Flatten in NCHW, with the
reference's own numerics (clamps with 1e-8, error rows only for unstable neurons). `cnn(name)` builds the
reference's `cifar_model_large` (cnn_large) or the tiny test CNN as such a Sequential. Import only where torch
is installed (tests: after `pytest.importorskip("torch")`).
"""

import torch
import torch.nn.functional as F
from torch import nn

CNNS = {  # name: (convs as (out_channels, kernel, stride, padding), hidden widths), inputs 3 x 32 x 32
  "cnn_large": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512]),
  "cnn_small": ([(16, 4, 2, 1), (32, 4, 2, 1)], [100]),
  "cnn_tiny": ([(4, 4, 2, 1), (8, 4, 2, 1)], [16]),
}


def sequential_cnn(in_channels, convs, flat_hw, hidden, num_classes):
  """conv/ReLU..., Flatten, Linear/ReLU..., Linear as one nn.Sequential (keys 0.weight, 2.weight, ...)."""
  modules, channels = [], in_channels
  for out, kernel, stride, padding in convs:
    modules += [nn.Conv2d(channels, out, kernel, stride=stride, padding=padding), nn.ReLU()]
    channels = out
  modules.append(nn.Flatten())
  features = channels * flat_hw * flat_hw
  for width in hidden:
    modules += [nn.Linear(features, width), nn.ReLU()]
    features = width
  modules.append(nn.Linear(features, num_classes))
  return nn.Sequential(*modules)


def cnn(name, num_classes=10):
  """The reference's basic CIFAR CNN `name` (see CNNS) on 3 x 32 x 32 inputs (each conv pair halves twice: 8 x 8)."""
  convs, hidden = CNNS[name]
  return sequential_cnn(3, convs, 8, hidden, num_classes)


def _layers(seq):
  layers = list(seq)
  for layer in layers:
    if not isinstance(layer, (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)):
      raise NotImplementedError(type(layer))
  return layers


def interval_range(seq, x_l, x_u, c):
  """IBP (interval_range): center/radius through conv/linear, ReLU on both bounds, C merged into the last linear.

  Returns (ub, lb, pre_activation_bounds) with pre-activation bounds [(l, u)] of every ReLU, in order.
  """
  h_l, h_u, pre = x_l, x_u, []
  layers = _layers(seq)
  for index, layer in enumerate(layers):
    if isinstance(layer, nn.ReLU):
      pre.append((h_l, h_u))
      h_l, h_u = F.relu(h_l), F.relu(h_u)
    elif isinstance(layer, nn.Flatten):
      h_l, h_u = h_l.flatten(1), h_u.flatten(1)
    else:
      mid, diff = (h_u + h_l) / 2, (h_u - h_l) / 2
      if isinstance(layer, nn.Conv2d):
        center = F.conv2d(mid, layer.weight, layer.bias, layer.stride, layer.padding)
        deviation = F.conv2d(diff, layer.weight.abs(), None, layer.stride, layer.padding)
      elif index == len(layers) - 1 and c is not None:
        weight, bias = c.matmul(layer.weight), c.matmul(layer.bias)
        center = weight.matmul(mid.unsqueeze(-1)).squeeze(-1) + bias
        deviation = weight.abs().matmul(diff.unsqueeze(-1)).squeeze(-1)
      else:
        center = torch.addmm(layer.bias, mid, layer.weight.t())
        deviation = diff.matmul(layer.weight.abs().t())
      h_l, h_u = center - deviation, center + deviation
  return h_u, h_l, pre


def _relu_backward(last_a, lower, upper, upper_bound):
  lb_r = lower.clamp(max=0)
  ub_r = torch.max(upper.clamp(min=0), lb_r + 1e-8)
  upper_d = ub_r / (ub_r - lb_r)
  upper_b = -lb_r * upper_d
  upper_d = upper_d.unsqueeze(1)
  lower_d = (upper_d > 0.5).float()
  pos, neg = last_a.clamp(min=0), last_a.clamp(max=0)
  if upper_bound:
    new_a, bias_part = upper_d * pos + lower_d * neg, pos
  else:
    new_a, bias_part = upper_d * neg + lower_d * pos, neg
  bias = bias_part.view(last_a.size(0), last_a.size(1), -1).matmul(upper_b.view(upper_b.size(0), -1, 1)).squeeze(-1)
  return new_a, bias


def backward_range(seq, x_l, x_u, c, upper_bound=False):
  """CROWN (backward_range) with IBP intermediate bounds: lower (or upper) bound of C @ seq(x) over the box."""
  layers = _layers(seq)
  _, _, pre = interval_range(seq, x_l, x_u, None)
  shapes, h = [], x_l
  for layer in layers:
    shapes.append(h.shape[1:])
    h = layer(h)
  a, sum_b, relu_index = c, 0, len(pre)
  for layer, in_shape in zip(reversed(layers), reversed(shapes)):
    if isinstance(layer, nn.ReLU):
      relu_index -= 1
      a, bias = _relu_backward(a, *pre[relu_index], upper_bound)
    elif isinstance(layer, nn.Flatten):
      a, bias = a.view(a.size(0), a.size(1), *in_shape), 0
    elif isinstance(layer, nn.Linear):
      a, bias = a.matmul(layer.weight), a.matmul(layer.bias)
    else:
      bias = (a.sum((3, 4)) * layer.bias).sum(2)
      out_shape = a.shape[2:]
      pad = [
        int(in_shape[i + 1])
        - (int(out_shape[i + 1]) - 1) * layer.stride[i]
        + 2 * layer.padding[i]
        - layer.weight.size(2 + i)
        for i in range(2)
      ]
      flat = F.conv_transpose2d(
        a.reshape(-1, *out_shape), layer.weight, None, layer.stride, layer.padding, output_padding=pad
      )
      a = flat.view(a.size(0), a.size(1), *flat.shape[1:])
    sum_b = sum_b + bias
  a = a.reshape(a.size(0), a.size(1), -1)
  center = ((x_u + x_l) / 2).reshape(x_l.size(0), -1, 1)
  diff = ((x_u - x_l) / 2).reshape(x_l.size(0), -1, 1)
  sign = 1 if upper_bound else -1
  return a.bmm(center).squeeze(-1) + sign * a.abs().bmm(diff).squeeze(-1) + sum_b


class _Symbolic:
  """Symbolic_interval: c [B, n], idep [B or 1, n_in, n], error rows edep [m, n] owned by example edep_ind [m, B]."""

  def __init__(self, lower, upper):
    self.c, self.e = (lower + upper) / 2, (upper - lower) / 2
    self.shape, self.batch = list(lower.shape[1:]), lower.shape[0]
    self.n_in = self.c[0].numel()
    self.idep = torch.eye(self.n_in).unsqueeze(0)
    self.edep, self.edep_ind = [], []

  def extend(self):
    n = self.c[0].numel()
    self.c = self.c.reshape(self.batch, n)
    self.idep = self.idep.reshape(-1, self.n_in, n)
    self.edep = [e.reshape(-1, n) for e in self.edep]

  def shrink(self):
    self.c = self.c.reshape([-1] + self.shape)
    self.idep = self.idep.reshape([-1] + self.shape)
    self.edep = [e.reshape([-1] + self.shape) for e in self.edep]

  def concretize(self):
    self.extend()
    err = (self.idep * self.e.reshape(self.batch, self.n_in, 1)).abs().sum(1)
    for rows, ind in zip(self.edep, self.edep_ind):
      err = err + ind.t().mm(rows.abs())
    self.l, self.u = self.c - err, self.c + err

  def linear(self, fn, fn_nobias):
    self.c = fn(self.c)
    self.idep = fn_nobias(self.idep)
    self.edep = [fn_nobias(e) for e in self.edep]
    self.shape = list(self.c.shape[1:])
    self.concretize()

  def relu(self):
    lower, upper = self.l.clamp(max=0), self.u.clamp(min=0)
    upper = torch.max(upper, lower + 1e-8)
    mask = upper / (upper - lower)
    unstable = (self.l < 0) & (self.u > 0)
    n = self.c.shape[1]
    appr_err = mask * (-lower) / 2
    index = unstable.view(-1, n).nonzero()
    rows = torch.zeros(index.size(0), n).scatter_(1, index[:, 1:2], appr_err[unstable][:, None])
    owner = torch.zeros(index.size(0), self.batch).scatter_(1, index[:, 0:1], 1)
    self.c = self.c * mask + appr_err * unstable.float()
    self.edep = [e * ind.mm(mask) for e, ind in zip(self.edep, self.edep_ind)]
    self.idep = self.idep * mask.view(self.batch, 1, n)
    if index.size(0):
      self.edep.append(rows)
      self.edep_ind.append(owner)

  def worst_case(self, y, classes):
    kk = torch.eye(classes, dtype=torch.bool)[y]
    self.c = self.c - self.c.masked_select(kk).unsqueeze(1)
    self.idep = self.idep - self.idep.masked_select(kk.view(self.batch, 1, classes)).view(self.batch, self.n_in, 1)
    self.edep = [e - e.masked_select(ind.mm(kk.float()).bool()).view(-1, 1) for e, ind in zip(self.edep, self.edep_ind)]
    self.concretize()
    return self.u


def sym_worst_case(seq, x_l, x_u, y, classes):
  """The reference's "sym" analysis: wc [B, classes], wc_j = upper bound of z_j - z_y (0 at y)."""
  ix = _Symbolic(x_l, x_u)
  for layer in _layers(seq):
    if isinstance(layer, nn.ReLU):
      ix.relu()
    elif isinstance(layer, nn.Flatten):
      ix.extend()
    elif isinstance(layer, nn.Linear):
      ix.linear(lambda v, m=layer: F.linear(v, m.weight, m.bias), lambda v, m=layer: F.linear(v, m.weight))
    else:
      ix.shrink()
      ix.linear(
        lambda v, m=layer: F.conv2d(v, m.weight, m.bias, m.stride, m.padding),
        lambda v, m=layer: F.conv2d(v, m.weight, None, m.stride, m.padding),
      )
  return ix.worst_case(y, classes)
