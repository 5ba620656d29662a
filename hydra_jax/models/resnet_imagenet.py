"""ImageNet ResNets of the reference (`models/resnet.py`, torchvision layout), with input normalisation inside.

    normalise -> conv1 7x7/2 (64) -> BN -> relu -> max-pool 3x3/2 -> layer1..layer4 (strides 1/2/2/2)
    -> global average pool -> fc

Bottleneck blocks put the stride on the 3x3 conv (torchvision "ResNet v1.5"); the first block of a stage gets a
`downsample` conv1x1(stride)+BN when the shape changes. Convs are bias-free with kaiming_normal(fan_out) weights,
BN 1 / 0, fc PyTorch default (zero_init_residual=False).

Normalisation: the reference trains and evaluates ImageNet on [0, 1] inputs and normalises them with
mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225) inside its free-adversarial training loop. Here that
normalisation is the first operation of the model, so the model takes [0, 1] images like every other zoo model
(attack budgets stay in [0, 1] pixel units). It has no parameters, so checkpoints map one-to-one.

Names follow the PyTorch keys: `layer1.0.downsample.0.weight` is `params/layer1_0/downsample_0/kernel`.

Example:

    model = get_model("resnet50_imagenet", num_classes=1000)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_conv = functools.partial(layers.Conv2d, use_bias=False, kernel_init=layers.kaiming_normal_fan_out)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 conv-BN layers plus a residual (expansion 1)."""

  planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    out = _conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
    out = jax.nn.relu(bn(name="bn1")(out, train))
    out = bn(name="bn2")(_conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out), train)
    return jax.nn.relu(out + _downsample(self, x, self.planes, train))


class Bottleneck(nn.Module):
  """torchvision Bottleneck (stride on the 3x3 conv), output 4 * planes."""

  planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    out = jax.nn.relu(bn(name="bn1")(_conv(self.planes, 1, dtype=self.dtype, name="conv1")(x), train))
    out = _conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv2")(out)
    out = jax.nn.relu(bn(name="bn2")(out, train))
    out = bn(name="bn3")(_conv(4 * self.planes, 1, dtype=self.dtype, name="conv3")(out), train)
    return jax.nn.relu(out + _downsample(self, x, 4 * self.planes, train))


def _downsample(block: nn.Module, x: jax.Array, out_planes: int, train: bool) -> jax.Array:
  """Identity, or conv1x1(stride) + BN (`downsample_0`, `downsample_1` of `block`) when the shape changes."""
  if block.stride == 1 and x.shape[-1] == out_planes:
    return x
  x = _conv(out_planes, 1, block.stride, dtype=block.dtype, name="downsample_0")(x)
  return layers.BatchNorm(axis_name=block.bn_axis_name, dtype=block.dtype, name="downsample_1")(x, train)


class ImageNetResNet(nn.Module):
  """torchvision-style ResNet taking [0, 1] images and normalising them with the ImageNet mean/std.

  Attributes:
    block: BasicBlock or Bottleneck.
    num_blocks: blocks per stage.
    num_classes: outputs (1000 for ImageNet).
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
    """Maps (N, H, W, 3) images in [0, 1] (224x224 for ImageNet) to (N, num_classes) logits."""
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    x = _conv(self.widths[0], 7, 2, 3, dtype=self.dtype, name="conv1")(x)
    x = jax.nn.relu(layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="bn1")(x, train))
    x = layers.max_pool(x, 3, 2, 1)
    for stage, (planes, blocks) in enumerate(zip(self.widths, self.num_blocks)):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = self.block(planes, stride, self.dtype, self.bn_axis_name, name=f"layer{stage + 1}_{i}")(x, train)
    x = layers.Linear(self.num_classes, dtype=self.dtype, name="fc")(layers.global_avg_pool(x))
    return x.astype(jnp.float32)


MODELS = {
    "resnet18_imagenet": functools.partial(ImageNetResNet, block=BasicBlock, num_blocks=(2, 2, 2, 2)),
    "resnet34_imagenet": functools.partial(ImageNetResNet, block=BasicBlock, num_blocks=(3, 4, 6, 3)),
    "resnet50_imagenet": functools.partial(ImageNetResNet, block=Bottleneck, num_blocks=(3, 4, 6, 3)),
    # Not from the paper: a small member of the family for tests and demos (64x64 inputs suit it).
    "resnet_imagenet_tiny": functools.partial(
        ImageNetResNet, block=Bottleneck, num_blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
}
# The reference's own names (the "arch" entry of its checkpoints).
MODELS.update(ResNet18=MODELS["resnet18_imagenet"], ResNet34=MODELS["resnet34_imagenet"],
              ResNet50=MODELS["resnet50_imagenet"])
