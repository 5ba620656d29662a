"""CIFAR ResNets of the reference (`models/resnet_cifar.py`, from kuangliu/pytorch-cifar).

    conv1 3x3/1 (64) -> BN -> relu -> layer1..layer4 (64/128/256/512 planes, strides 1/2/2/2)
    -> global average pool -> linear

No max-pool. Blocks are post-activation: BasicBlock (two 3x3 convs, expansion 1) or Bottleneck (1x1, 3x3 with the
stride, 1x1 to 4x planes). The shortcut is conv1x1(stride)+BN (`shortcut_0`, `shortcut_1`) when the shape
changes, else the identity. All convs are bias-free; every layer keeps PyTorch's default initialisation, as in the
reference. The reference's `avg_pool2d(4)` is a global average pool at 32x32 input; here it is a global average
pool. No input normalisation (as in the reference). `resnet_imagenet` reuses the blocks and `stages` with another
conv init and shortcut name.

Names follow the PyTorch keys: `layer2.0.shortcut.1.running_mean` is `batch_stats/layer2_0/shortcut_1/mean`.

Example:

    model = get_model("resnet18", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

import functools
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers


class _Block(nn.Module):
  """Attributes shared by the post-activation residual blocks `BasicBlock` and `Bottleneck`.

  Attributes:
    planes: channels of the block's first convs (the output has `planes * expansion` channels).
    stride: stride of the block's strided conv and of the projection shortcut.
    dtype: compute dtype; parameters stay float32.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
    kernel_init: initialiser of every conv kernel (PyTorch's default here, kaiming_normal(fan_out) in torchvision).
    shortcut_name: name prefix of the projection shortcut's conv / BN (`shortcut`; `downsample` in torchvision).
  """

  planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None
  kernel_init: layers.Initializer = layers.torch_default_init
  shortcut_name: str = "shortcut"


class BasicBlock(_Block):
  """Two 3x3 conv-BN layers with a residual connection (expansion 1)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C_in) -> (N, H / stride, W / stride, planes)."""
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    conv = _conv(self)
    out = jax.nn.relu(bn(name="bn1")(conv(self.planes, 3, self.stride, 1, name="conv1")(x), train))
    out = bn(name="bn2")(conv(self.planes, 3, 1, 1, name="conv2")(out), train)
    return jax.nn.relu(out + _shortcut(self, x, self.planes, train))


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (with the stride), 1x1 expand to 4 * planes, each with BN, plus a residual."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C_in) -> (N, H / stride, W / stride, 4 * planes)."""
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    conv = _conv(self)
    out = jax.nn.relu(bn(name="bn1")(conv(self.planes, 1, name="conv1")(x), train))
    out = jax.nn.relu(bn(name="bn2")(conv(self.planes, 3, self.stride, 1, name="conv2")(out), train))
    out = bn(name="bn3")(conv(4 * self.planes, 1, name="conv3")(out), train)
    return jax.nn.relu(out + _shortcut(self, x, 4 * self.planes, train))


def _conv(block: _Block) -> Callable[..., layers.Conv2d]:
  """Bias-free `layers.Conv2d` with the block's kernel initialiser and compute dtype."""
  return functools.partial(layers.Conv2d, use_bias=False, kernel_init=block.kernel_init, dtype=block.dtype)


def _shortcut(block: _Block, x: jax.Array, out_planes: int, train: bool) -> jax.Array:
  """Identity, or conv1x1(stride) + BN (`{shortcut_name}_0`, `{shortcut_name}_1` of `block`) on a shape change."""
  name = f"{block.shortcut_name}_0"
  if not layers.has_layer(block, name, nominal=block.stride != 1 or x.shape[-1] != out_planes):
    return x
  x = _conv(block)(out_planes, 1, block.stride, name=name)(x)
  return layers.BatchNorm(axis_name=block.bn_axis_name, dtype=block.dtype, name=f"{block.shortcut_name}_1")(x, train)


def stages(
  x: jax.Array,
  block: Callable[..., _Block],
  widths: Sequence[int],
  num_blocks: Sequence[int],
  dtype: layers.Dtype,
  bn_axis_name: str | None,
  train: bool,
) -> jax.Array:
  """The residual stages layer1..layerS, shared by the CIFAR and the ImageNet ResNets.

  Must be called inside a compact module, which becomes the blocks' parent: stage s (from 1) has `num_blocks[s-1]`
  blocks `layer{s}_{i}` of `widths[s-1]` planes, the first block of every stage after the first with stride 2.

  Args:
    x: (N, H, W, C) activations after the stem.
    block: `BasicBlock` or `Bottleneck`, or a `functools.partial` of one (e.g. with another `kernel_init`).
    widths: planes per stage.
    num_blocks: blocks per stage.
    dtype: compute dtype.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
    train: whether BatchNorm uses (and updates) batch statistics.

  Returns:
    (N, H / 2^(S-1), W / 2^(S-1), widths[-1] * expansion) activations.
  """
  for stage, (planes, blocks) in enumerate(zip(widths, num_blocks)):
    for i in range(blocks):
      stride = 2 if stage > 0 and i == 0 else 1
      x = block(planes, stride, dtype, bn_axis_name, name=f"layer{stage + 1}_{i}")(x, train)
  return x


class ResNet(nn.Module):
  """kuangliu CIFAR ResNet.

  Attributes:
    block: BasicBlock or Bottleneck.
    num_blocks: blocks per stage.
    num_classes: outputs.
    widths: planes per stage (the stem has widths[0] channels); (64, 128, 256, 512) in the reference.
    dtype: compute dtype; parameters are float32 and logits are returned as float32.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
  """

  block: type[BasicBlock] | type[Bottleneck]
  num_blocks: Sequence[int]
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, 3) images in [0, 1] to (N, num_classes) logits."""
    x = layers.Conv2d(self.widths[0], 3, 1, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    x = jax.nn.relu(layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="bn1")(x, train))
    x = stages(x, self.block, self.widths, self.num_blocks, self.dtype, self.bn_axis_name, train)
    x = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(layers.global_avg_pool(x))
    return x.astype(jnp.float32)

  def widened(self, width: float) -> "ResNet":
    """This network with every stage's planes times `width` (`layers.scale_width`); depth unchanged."""
    return self.clone(widths=tuple(layers.scale_width(planes, width) for planes in self.widths))


MODELS = {
  "resnet18": functools.partial(ResNet, block=BasicBlock, num_blocks=(2, 2, 2, 2)),
  "resnet34": functools.partial(ResNet, block=BasicBlock, num_blocks=(3, 4, 6, 3)),
  "resnet50": functools.partial(ResNet, block=Bottleneck, num_blocks=(3, 4, 6, 3)),
  "resnet101": functools.partial(ResNet, block=Bottleneck, num_blocks=(3, 4, 23, 3)),
  "resnet152": functools.partial(ResNet, block=Bottleneck, num_blocks=(3, 8, 36, 3)),
  # Not from the paper: a small member of the family for tests and demos.
  "resnet_tiny": functools.partial(ResNet, block=BasicBlock, num_blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
}
