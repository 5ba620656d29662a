"""The PyTorch HYDRA baseline of `bench_vs_torch.py`: the reference code re-stated, for timing only.

Re-stated from inspire-group/hydra at 9d41c93 (read with `git show HEAD:<file>` in the reference repository):

- `models/layers.py`: `GetSubnet` (clone, flatten, full `torch.sort`, scatter 0/1, straight-through backward),
  `SubnetConv` / `SubnetLinear` (weight and bias frozen at construction, `popup_scores` of the weight's
  shape, mask recomputed from `|popup_scores|` in EVERY forward; `SubnetLinear` always has a bias).
- `models/resnet_cifar.py` (kuangliu ResNet-18, post-activation BasicBlock, conv1x1 + BN shortcut) and
  `models/wrn_cifar.py` (pre-activation WideResNet, including the unused `sub_block1`, which holds scores
  but is never run), every conv and linear a Subnet layer (`get_layers("subnet")`).
- `utils/model.py:prepare_model`: prune = scores and BatchNorm train, weights and biases frozen; finetune =
  weights, biases and BatchNorm train, scores frozen.
- `utils/adv.py:trades_loss` (l_inf): `model.eval()`, start x + 0.001 N(0, I); each attack step forwards
  x_adv AND x_natural (the natural logits are recomputed at every step, inside `enable_grad`), KL, input
  gradient, sign step, projection; then `model.train()` and the loss forwards x, x_adv, x.
- `trainer/adv.py:train`: per batch an extra train-mode logging forward `output = model(images)` (with
  its autograd graph), `trades_loss`, `loss.item()`, `zero_grad`, `backward`, `optimizer.step()`; SGD with
  momentum 0.9 and weight decay 1e-4 over the parameters that require gradients.
- `utils/adv.py:pgd_whitebox`: uniform start, CE steps of `step_size * sign(grad)`, projection, clamp. The
  reference calls `loss.backward()`, which also accumulates the gradients of every trainable parameter;
  here only the input gradient is taken (`torch.autograd.grad`), which can only make the baseline faster.

- `utils/smoothing.py:Smooth._sample_noise` (Cohen et al.'s code): per chunk `x.repeat`, `randn_like * sigma`,
  forward, argmax, counted into a numpy array one prediction at a time (`_count_arr`), under `no_grad`.

Not in the reference: `apgd_ce` (the reference evaluated with AutoAttack, outside its code). It is Auto-PGD
with CE (Croce & Hein 2020): one forward + input gradient per step, momentum 0.75, step size halved at the
paper's checkpoints when progress stalls, best point kept per example; the model masks in every forward.

Usage:

  model = torch_hydra.build("resnet18", num_classes=10)
  torch_hydra.prepare(model, stage="prune", k=0.01)
  step = torch_hydra.trades_train_step(model, torch_hydra.sgd(model))
  loss = step(images_nchw, labels)
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class GetSubnet(torch.autograd.Function):
  """0/1 mask of the top (1 - floor((1 - k) n)) entries of `scores` by a full sort; straight-through backward."""

  @staticmethod
  def forward(ctx, scores, k):
    out = scores.clone()
    _, idx = scores.flatten().sort()
    j = int((1 - k) * scores.numel())
    flat_out = out.flatten()
    flat_out[idx[:j]] = 0
    flat_out[idx[j:]] = 1
    return out

  @staticmethod
  def backward(ctx, g):
    return g, None


class SubnetConv(nn.Conv2d):
  """Conv2d whose weight is multiplied by GetSubnet(|popup_scores|, k) in every forward."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
    super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
    self.popup_scores = nn.Parameter(torch.empty(self.weight.shape))
    nn.init.kaiming_uniform_(self.popup_scores, a=math.sqrt(5))
    self.weight.requires_grad = False
    if self.bias is not None:
      self.bias.requires_grad = False
    self.k = 1.0

  def forward(self, x):
    w = self.weight * GetSubnet.apply(self.popup_scores.abs(), self.k)
    return F.conv2d(x, w, self.bias, self.stride, self.padding)


class SubnetLinear(nn.Linear):
  """Linear (always with a bias) whose weight is multiplied by GetSubnet(|popup_scores|, k) in every forward."""

  def __init__(self, in_features, out_features):
    super().__init__(in_features, out_features, bias=True)
    self.popup_scores = nn.Parameter(torch.empty(self.weight.shape))
    nn.init.kaiming_uniform_(self.popup_scores, a=math.sqrt(5))
    self.weight.requires_grad = False
    self.bias.requires_grad = False
    self.k = 1.0

  def forward(self, x):
    return F.linear(x, self.weight * GetSubnet.apply(self.popup_scores.abs(), self.k), self.bias)


class BasicBlock(nn.Module):
  """kuangliu post-activation BasicBlock with Subnet convs."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = SubnetConv(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = SubnetConv(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(SubnetConv(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
  """kuangliu CIFAR ResNet with BasicBlocks (ResNet-18: blocks (2, 2, 2, 2), widths (64, 128, 256, 512))."""

  def __init__(self, num_blocks, widths, num_classes):
    super().__init__()
    self.conv1 = SubnetConv(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    layers, in_planes = [], widths[0]
    for i, (planes, blocks) in enumerate(zip(widths, num_blocks)):
      strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
      stage = []
      for stride in strides:
        stage.append(BasicBlock(in_planes, planes, stride))
        in_planes = planes
      layers.append(nn.Sequential(*stage))
    self.layers = nn.Sequential(*layers)
    self.linear = SubnetLinear(widths[-1], num_classes)

  def forward(self, x):
    out = self.layers(F.relu(self.bn1(self.conv1(x))))
    return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
  """Pre-activation WRN BasicBlock (dropout 0) with Subnet convs."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = SubnetConv(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = SubnetConv(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.conv_shortcut = None if self.equal_in_out else SubnetConv(in_planes, out_planes, 1, stride, 0, bias=False)

  def forward(self, x):
    if self.equal_in_out:
      out = F.relu(self.bn1(x))
    else:
      x = F.relu(self.bn1(x))
      out = x
    out = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return (x if self.equal_in_out else self.conv_shortcut(x)) + out


def _wide_group(n, in_planes, out_planes, stride):
  return nn.Sequential(
    *[WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
  )


class WideResNet(nn.Module):
  """The reference WRN-depth-widen, unused `sub_block1` included (it holds scores, never runs)."""

  def __init__(self, depth, widen, num_classes):
    super().__init__()
    channels = [16, 16 * widen, 32 * widen, 64 * widen]
    n = (depth - 4) // 6
    self.conv1 = SubnetConv(3, channels[0], 3, 1, 1, bias=False)
    self.block1 = _wide_group(n, channels[0], channels[1], 1)
    self.sub_block1 = _wide_group(n, channels[0], channels[1], 1)
    self.block2 = _wide_group(n, channels[1], channels[2], 2)
    self.block3 = _wide_group(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.fc = SubnetLinear(channels[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1))


def build(name, num_classes=10):
  """The reference model `name` with Subnet layers: resnet18, resnet_tiny, wrn_<depth>_<widen>, wrn_tiny.

  The `_tiny` names mirror hydra_jax's tiny zoo variants (for the benchmark's quick test).
  """
  if name == "resnet18":
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)
  if name == "resnet_tiny":
    return ResNet((1, 1, 1, 1), (8, 16, 32, 64), num_classes)
  if name == "wrn_tiny":
    return WideResNet(10, 1, num_classes)
  if name.startswith("wrn_"):
    _, depth, widen = name.split("_")
    return WideResNet(int(depth), int(widen), num_classes)
  raise ValueError(f"no PyTorch re-statement of {name!r}; valid: resnet18, resnet_tiny, wrn_<depth>_<widen>, wrn_tiny")


def prepare(model, stage, k):
  """`prepare_model` + `set_prune_rate_model`: what trains in `stage` ('prune' or 'finetune'), and k everywhere."""
  for module in model.modules():
    if isinstance(module, (SubnetConv, SubnetLinear)):
      module.k = k
      module.popup_scores.requires_grad = stage == "prune"
      module.weight.requires_grad = stage == "finetune"
      if module.bias is not None:
        module.bias.requires_grad = stage == "finetune"
    elif isinstance(module, nn.BatchNorm2d):
      module.weight.requires_grad = module.bias.requires_grad = True
  return model


def sgd(model, lr=0.1):
  """The reference optimizer: SGD(momentum 0.9, weight decay 1e-4) over the parameters that require grad."""
  return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)


def trades_loss(model, x_natural, y, step_size=2 / 255, epsilon=8 / 255, perturb_steps=10, beta=6.0):
  """The reference `utils/adv.py:trades_loss`, l_inf branch, clip [0, 1]."""
  criterion_kl = nn.KLDivLoss(reduction="sum")
  model.eval()
  x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, device=x_natural.device)
  for _ in range(perturb_steps):
    x_adv.requires_grad_()
    with torch.enable_grad():
      loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
    grad = torch.autograd.grad(loss_kl, [x_adv])[0]
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
  model.train()
  x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
  logits = model(x_natural)
  loss_natural = F.cross_entropy(logits, y)
  loss_robust = (1.0 / len(x_natural)) * criterion_kl(
    F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
  )
  return loss_natural + beta * loss_robust


def trades_train_step(model, optimizer, perturb_steps=10):
  """`step(images, labels) -> loss float`: one iteration of the reference's `trainer/adv.py` loop body."""

  def step(images, target):
    model.train()
    output = model(images)  # the trainer's logging forward, graph kept as in the reference
    loss = trades_loss(model, images, target, perturb_steps=perturb_steps)
    _ = (output.argmax(1) == target).float().mean()
    value = loss.item()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return value

  return step


def _input_grad(model, x, y):
  x = x.detach().requires_grad_()
  with torch.enable_grad():
    losses = F.cross_entropy(model(x), y, reduction="none")
  return losses.detach(), torch.autograd.grad(losses.sum(), [x])[0]


def pgd_whitebox(model, x, y, epsilon=8 / 255, num_steps=50, step_size=2 / 255):
  """The reference `pgd_whitebox` (random start; input gradient only, see the module docstring)."""
  model.eval()
  x_pgd = x + torch.empty_like(x).uniform_(-epsilon, epsilon)
  for _ in range(num_steps):
    _, grad = _input_grad(model, x_pgd, y)
    x_pgd = x_pgd + step_size * grad.sign()
    x_pgd = torch.clamp(x + torch.clamp(x_pgd - x, -epsilon, epsilon), 0.0, 1.0)
  return x_pgd.detach()


def _apgd_checkpoints(steps):
  """Iterations at which APGD may halve its step size (Croce & Hein 2020, Sec. 3.2)."""
  p, checkpoints = [0.0, 0.22], [0, math.ceil(0.22 * steps)]
  while checkpoints[-1] < steps:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    checkpoints.append(math.ceil(p[-1] * steps))
  return checkpoints[1:]


def apgd_ce(model, x, y, epsilon=8 / 255, steps=100, rho=0.75, alpha=0.75):
  """Auto-PGD with CE, l_inf, one restart: `steps` forwards + input gradients; returns the best point."""
  model.eval()
  project = lambda z: torch.clamp(x + torch.clamp(z - x, -epsilon, epsilon), 0.0, 1.0)
  x_adv = project(x + epsilon * (2 * torch.rand_like(x) - 1))
  loss, grad = _input_grad(model, x_adv, y)
  best_x, best_loss = x_adv.clone(), loss.clone()
  eta = torch.full((len(x), 1, 1, 1), 2 * epsilon, device=x.device)
  x_prev, successes, last_check = x_adv, torch.zeros_like(loss), 0
  loss_at_check, eta_at_check = best_loss.clone(), eta.clone()
  checkpoints = _apgd_checkpoints(steps)
  for i in range(steps - 1):
    z = project(x_adv + eta * grad.sign())
    momentum = alpha if i > 0 else 1.0
    x_new = project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev))
    x_prev, x_adv = x_adv, x_new
    new_loss, grad = _input_grad(model, x_adv, y)
    successes += (new_loss > loss).float()
    loss = new_loss
    improved = loss > best_loss
    best_x[improved], best_loss[improved] = x_adv[improved], loss[improved]
    if i + 1 in checkpoints:
      window = i + 1 - last_check
      halve = (successes < rho * window) | ((eta.flatten() == eta_at_check.flatten()) & (best_loss == loss_at_check))
      eta_at_check, loss_at_check = eta.clone(), best_loss.clone()
      eta[halve] /= 2
      x_adv[halve] = best_x[halve]
      successes.zero_()
      last_check = i + 1
  return best_x.detach()


def sample_noise(model, x, num, batch_size, sigma=0.25, num_classes=10):
  """`Smooth._sample_noise`: class counts [num_classes] of `model` on `num` noisy copies of x [C, H, W]."""
  with torch.no_grad():
    counts = np.zeros(num_classes, dtype=int)
    for _ in range(math.ceil(num / batch_size)):
      this_batch_size = min(batch_size, num)
      num -= this_batch_size
      batch = x.repeat((this_batch_size, 1, 1, 1))
      predictions = model(batch + torch.randn_like(batch) * sigma).argmax(1)
      for index in predictions.cpu().numpy():
        counts[index] += 1
    return counts
