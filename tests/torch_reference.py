"""PyTorch re-statements of the reference architectures (HYDRA `models/`, kuangliu/pytorch-cifar), for tests only.

Plain `torch.nn` modules whose state-dict keys are those of the originals, written independently of hydra_jax
from the reference definitions. They are the independent source for parameter counts and for logit parity of
`hydra_jax.convert`. Import only after `pytest.importorskip("torch")`.

`build(name, num_classes)` mirrors `hydra_jax.models.get_model` for every registered name.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import torch_bounds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- basic.py CNNs
SMALL, LARGE = torch_bounds.CNNS["cnn_small"][0], torch_bounds.CNNS["cnn_large"][0]
sequential_cnn = torch_bounds.sequential_cnn


# ----------------------------------------------------------------------------------------------- vgg_cifar.py
VGG_CFGS = {
  "2": [64, "M", 64, "M"],
  "4": [64, 64, "M", 128, 128, "M"],
  "6": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
  "8": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"],
  "11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
  "13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
  "16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class VGG(nn.Module):
  def __init__(self, cfg, batch_norm, num_classes, hidden=256):
    super().__init__()
    modules, channels = [], 3
    for v in cfg:
      if v == "M":
        modules.append(nn.MaxPool2d(2, 2))
        continue
      modules.append(nn.Conv2d(channels, v, 3, padding=1, bias=False))
      if batch_norm:
        modules.append(nn.BatchNorm2d(v))
      modules.append(nn.ReLU())
      channels = v
    self.features = nn.Sequential(*modules)
    self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    self.classifier = nn.Sequential(
      nn.Linear(4 * channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ----------------------------------------------------------------------------------------------- wrn_cifar.py
class WideBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.equal = cin == cout
    if not self.equal:
      self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return (x if self.equal else self.convShortcut(act)) + out


class NetworkBlock(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """With `sub_block1=True` it also builds the reference's unused `sub_block1` (in the state dict, not in forward)."""

  def __init__(self, depth, widen, num_classes, sub_block1=True):
    super().__init__()
    n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
    if sub_block1:
      self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1)
    self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
    self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
    self.bn1 = nn.BatchNorm2d(ch[3])
    self.fc = nn.Linear(ch[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
    return self.fc(out.flatten(1))


# ----------------------------------------------------------------------------------------------- resnet_cifar.py
class CifarBasic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + self.shortcut(x))


class CifarBottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != 4 * planes:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
  def __init__(self, block, num_blocks, num_classes, widths=(64, 128, 256, 512)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for stage, (planes, blocks) in enumerate(zip(widths, num_blocks)):
      layer = []
      for i in range(blocks):
        layer.append(block(cin, planes, 2 if stage > 0 and i == 0 else 1))
        cin = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------------------------- resnet.py (ImageNet)
class TvBasic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TvBottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(nn.Module):
  """torchvision layout; `forward` normalises [0, 1] inputs like the reference's freeadv loop does before the model."""

  def __init__(self, block, num_blocks, num_classes, widths=(64, 128, 256, 512)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = widths[0]
    for stage, (planes, blocks) in enumerate(zip(widths, num_blocks)):
      stride = 1 if stage == 0 else 2
      downsample = None
      if stride != 1 or cin != planes * block.expansion:
        downsample = nn.Sequential(
          nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * block.expansion)
        )
      layer = [block(cin, planes, stride, downsample)]
      cin = planes * block.expansion
      layer += [block(cin, planes, 1, None) for _ in range(1, blocks)]
      setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------- kuangliu MobileNetV2
MOBILENET_CFG = [
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
]


class MbBlock(nn.Module):
  def __init__(self, cin, cout, expansion, stride):
    super().__init__()
    self.stride = stride
    planes = expansion * cin
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride == 1 and cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
  def __init__(self, num_classes, cfg=MOBILENET_CFG, stem=32, head=1280):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    blocks, cin = [], stem
    for expansion, cout, n, stride in cfg:
      for i in range(n):
        blocks.append(MbBlock(cin, cout, expansion, stride if i == 0 else 1))
        cin = cout
    self.layers = nn.Sequential(*blocks)
    self.conv2 = nn.Conv2d(cin, head, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(head)
    self.linear = nn.Linear(head, num_classes)

  def forward(self, x):
    out = self.layers(F.relu(self.bn1(self.conv1(x))))
    out = F.relu(self.bn2(self.conv2(out)))
    return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------------------------- kuangliu GoogLeNet
GOOGLENET_CFG = [
  ("a3", (64, 96, 128, 16, 32, 32)),
  ("b3", (128, 128, 192, 32, 96, 64)),
  ("a4", (192, 96, 208, 16, 48, 64)),
  ("b4", (160, 112, 224, 24, 64, 64)),
  ("c4", (128, 128, 256, 24, 64, 64)),
  ("d4", (112, 144, 288, 32, 64, 64)),
  ("e4", (256, 160, 320, 32, 128, 128)),
  ("a5", (256, 160, 320, 32, 128, 128)),
  ("b5", (384, 192, 384, 48, 128, 128)),
]


def _cbr(cin, cout, k):
  return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(True)]


class Inception(nn.Module):
  def __init__(self, cin, n1, r3, n3, r5, n5, pool):
    super().__init__()
    self.b1 = nn.Sequential(*_cbr(cin, n1, 1))
    self.b2 = nn.Sequential(*_cbr(cin, r3, 1), *_cbr(r3, n3, 3))
    self.b3 = nn.Sequential(*_cbr(cin, r5, 1), *_cbr(r5, n5, 3), *_cbr(n5, n5, 3))
    self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_cbr(cin, pool, 1))

  def forward(self, x):
    return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
  def __init__(self, num_classes, cfg=GOOGLENET_CFG, stem=192):
    super().__init__()
    self.pre_layers = nn.Sequential(*_cbr(3, stem, 3))
    self.names, cin = [name for name, _ in cfg], stem
    for name, planes in cfg:
      setattr(self, name, Inception(cin, *planes))
      cin = planes[0] + planes[2] + planes[4] + planes[5]
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    out = self.pre_layers(x)
    for name in self.names:
      out = getattr(self, name)(out)
      if name in ("b3", "e4"):
        out = self.maxpool(out)
    return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------------------------- registry
def _tiny_googlenet_cfg():
  return [(name, tuple(p // 16 for p in planes)) for name, planes in GOOGLENET_CFG if name in ("a3", "b3", "e4", "a5")]


_TINY = (8, 16, 32, 64)
BUILDERS = {
  "mnist_model": lambda c: sequential_cnn(1, SMALL, 7, [100], c),
  "mnist_model_large": lambda c: sequential_cnn(1, LARGE, 7, [512, 512], c),
  "cifar_model": lambda c: sequential_cnn(3, SMALL, 8, [100], c),
  "cifar_model_large": lambda c: sequential_cnn(3, LARGE, 8, [512, 512], c),
  "cnn_tiny": lambda c: torch_bounds.cnn("cnn_tiny", c),
  **{f"vgg{d}": functools.partial(VGG, cfg, False) for d, cfg in VGG_CFGS.items()},
  **{f"vgg{d}_bn": functools.partial(VGG, cfg, True) for d, cfg in VGG_CFGS.items()},
  "vgg_tiny": lambda c: VGG([8, "M", 16, "M"], True, c, hidden=32),
  "wrn_28_1": lambda c: WideResNet(28, 1, c),
  "wrn_28_2": lambda c: WideResNet(28, 2, c),
  "wrn_28_4": lambda c: WideResNet(28, 4, c),
  "wrn_28_10": lambda c: WideResNet(28, 10, c),
  "wrn_34_10": lambda c: WideResNet(34, 10, c),
  "wrn_40_2": lambda c: WideResNet(40, 2, c),
  "wrn_tiny": lambda c: WideResNet(10, 1, c),
  "resnet18": lambda c: CifarResNet(CifarBasic, [2, 2, 2, 2], c),
  "resnet34": lambda c: CifarResNet(CifarBasic, [3, 4, 6, 3], c),
  "resnet50": lambda c: CifarResNet(CifarBottleneck, [3, 4, 6, 3], c),
  "resnet101": lambda c: CifarResNet(CifarBottleneck, [3, 4, 23, 3], c),
  "resnet152": lambda c: CifarResNet(CifarBottleneck, [3, 8, 36, 3], c),
  "resnet_tiny": lambda c: CifarResNet(CifarBasic, [1, 1, 1, 1], c, widths=_TINY),
  "resnet18_imagenet": lambda c: ImageNetResNet(TvBasic, [2, 2, 2, 2], c),
  "resnet34_imagenet": lambda c: ImageNetResNet(TvBasic, [3, 4, 6, 3], c),
  "resnet50_imagenet": lambda c: ImageNetResNet(TvBottleneck, [3, 4, 6, 3], c),
  "resnet_imagenet_tiny": lambda c: ImageNetResNet(TvBottleneck, [1, 1, 1, 1], c, widths=_TINY),
  "mobilenet_v2": lambda c: MobileNetV2(c),
  "mobilenet_v2_tiny": lambda c: MobileNetV2(c, cfg=[(1, 8, 1, 1), (2, 16, 2, 2), (2, 24, 1, 1)], stem=8, head=32),
  "googlenet": lambda c: GoogLeNet(c),
  "googlenet_tiny": lambda c: GoogLeNet(c, cfg=_tiny_googlenet_cfg(), stem=12),
}
ALIASES = {
  "cnn_small": "cifar_model",
  "cnn_large": "cifar_model_large",
  "ResNet18": "resnet18_imagenet",
  "ResNet34": "resnet34_imagenet",
  "ResNet50": "resnet50_imagenet",
}


def build(name, num_classes):
  """The PyTorch re-statement of zoo model `name`."""
  return BUILDERS[ALIASES.get(name, name)](num_classes)


def build_random(name, num_classes=10, seed=0):
  """`build(name)` in eval mode, seeded, with random BN affine parameters and running statistics (not 1/0/0/1)."""
  torch.manual_seed(seed)
  module = build(name, num_classes)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return module.eval()


def logits(module, x):
  """Logits of `module` for NHWC inputs x (numpy / jax array), as numpy."""
  with torch.no_grad():
    return module(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()


def count_params(module):
  """Parameters used in forward: everything except the WRN's unused sub_block1."""
  return sum(p.numel() for key, p in module.named_parameters() if not key.startswith("sub_block1."))


def count_weights(module):
  """Conv/linear weights (the prunable tensors), excluding sub_block1."""
  return sum(
    m.weight.numel()
    for key, m in module.named_modules()
    if isinstance(m, (nn.Conv2d, nn.Linear)) and not key.startswith("sub_block1")
  )


def get_subnet(scores, k):
  """Reference GetSubnet forward: sort |scores| ascending, zero the first int((1 - k) * n), keep the rest."""
  flat = scores.abs().flatten()
  mask = torch.ones_like(flat)
  mask[flat.sort().indices[: int((1 - k) * flat.numel())]] = 0
  return mask.view_as(scores)
