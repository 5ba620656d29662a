"""CIFAR ResNets of the reference (`models/resnet_cifar.py`, from kuangliu/pytorch-cifar).

    conv1 3x3/1 (64) -> BN -> relu -> layer1..layer4 (64/128/256/512 planes, strides 1/2/2/2)
    -> global average pool -> linear

No max-pool. Blocks are post-activation: BasicBlock (two 3x3 convs, expansion 1) or Bottleneck (1x1, 3x3 with the
stride, 1x1 to 4x planes). The shortcut is conv1x1(stride)+BN (`shortcut_0`, `shortcut_1`) when the shape
changes, else the identity. All convs are bias-free; every layer keeps PyTorch's default initialisation, as in the
reference. The reference's `avg_pool2d(4)` is a global average pool at 32x32 input; here it is a global average
pool. No input normalisation (as in the reference).

Names follow the PyTorch keys: `layer2.0.shortcut.1.running_mean` is `batch_stats/layer2_0/shortcut_1/mean`.

Example:

    model = get_model("resnet18", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a residual connection (expansion 1)."""

  planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    out = layers.Conv2d(self.planes, 3, self.stride, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    out = jax.nn.relu(bn(name="bn1")(out, train))
    out = layers.Conv2d(self.planes, 3, 1, 1, use_bias=False, dtype=self.dtype, name="conv2")(out)
    out = bn(name="bn2")(out, train)
    return jax.nn.relu(out + _shortcut(self, x, self.planes, train))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (with the stride), 1x1 expand to 4 * planes, each with BN, plus a residual."""

  planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    out = layers.Conv2d(self.planes, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    out = jax.nn.relu(bn(name="bn1")(out, train))
    out = layers.Conv2d(self.planes, 3, self.stride, 1, use_bias=False, dtype=self.dtype, name="conv2")(out)
    out = jax.nn.relu(bn(name="bn2")(out, train))
    out = layers.Conv2d(4 * self.planes, 1, use_bias=False, dtype=self.dtype, name="conv3")(out)
    out = bn(name="bn3")(out, train)
    return jax.nn.relu(out + _shortcut(self, x, 4 * self.planes, train))


def _shortcut(block: nn.Module, x: jax.Array, out_planes: int, train: bool) -> jax.Array:
  """Identity, or conv1x1(stride) + BN (`shortcut_0`, `shortcut_1` of `block`) when the shape changes."""
  if block.stride == 1 and x.shape[-1] == out_planes:
    return x
  x = layers.Conv2d(out_planes, 1, block.stride, use_bias=False, dtype=block.dtype, name="shortcut_0")(x)
  return layers.BatchNorm(axis_name=block.bn_axis_name, dtype=block.dtype, name="shortcut_1")(x, train)


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
    for stage, (planes, blocks) in enumerate(zip(self.widths, self.num_blocks)):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = self.block(planes, stride, self.dtype, self.bn_axis_name, name=f"layer{stage + 1}_{i}")(x, train)
    x = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(layers.global_avg_pool(x))
    return x.astype(jnp.float32)


MODELS = {
    "resnet18": functools.partial(ResNet, block=BasicBlock, num_blocks=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, block=BasicBlock, num_blocks=(3, 4, 6, 3)),
    "resnet50": functools.partial(ResNet, block=Bottleneck, num_blocks=(3, 4, 6, 3)),
    "resnet101": functools.partial(ResNet, block=Bottleneck, num_blocks=(3, 4, 23, 3)),
    "resnet152": functools.partial(ResNet, block=Bottleneck, num_blocks=(3, 8, 36, 3)),
    # Not from the paper: a small member of the family for tests and demos.
    "resnet_tiny": functools.partial(ResNet, block=BasicBlock, num_blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
}
