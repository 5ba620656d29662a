"""CIFAR MobileNetV2 of kuangliu/pytorch-cifar (`models/mobilenetv2.py`), one of the paper's Table 1 networks.

The reference HYDRA repo has no MobileNetV2; this follows kuangliu's CIFAR variant exactly:

    conv1 3x3/1 (32) -> BN -> relu -> 17 inverted-residual blocks -> conv2 1x1 (1280) -> BN -> relu
    -> global average pool -> linear

Block (expansion t, out c, stride s): conv1x1 to t * in -> BN -> relu -> depthwise 3x3/s -> BN -> relu -> conv1x1 to
c -> BN (linear bottleneck). A stride-1 block adds a residual: the input itself when in == c, otherwise
conv1x1+BN (`shortcut_0`, `shortcut_1`); stride-2 blocks have none. Stage configuration (t, c, n, s):
(1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) (the CIFAR strides). All convs are
bias-free; PyTorch default initialisation everywhere; no input normalisation. The `avg_pool2d(4)` of the original is
a global average pool at 32x32 input.

Names follow the PyTorch keys: `layers.3.conv2.weight` is `params/layers_3/conv2/kernel`.

Example:

    model = get_model("mobilenet_v2", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers

CIFAR_CONFIG = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise 3x3 -> project (1x1), with a residual on stride-1 blocks."""

  expansion: int
  out_planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    conv = functools.partial(layers.Conv2d, use_bias=False, dtype=self.dtype)
    planes = self.expansion * x.shape[-1]
    out = jax.nn.relu(bn(name="bn1")(conv(planes, 1, name="conv1")(x), train))
    out = conv(planes, 3, self.stride, 1, groups=planes, name="conv2")(out)
    out = jax.nn.relu(bn(name="bn2")(out, train))
    out = bn(name="bn3")(conv(self.out_planes, 1, name="conv3")(out), train)
    if self.stride != 1:
      return out
    if layers.has_layer(self, "shortcut_0", nominal=x.shape[-1] != self.out_planes):
      x = bn(name="shortcut_1")(conv(self.out_planes, 1, name="shortcut_0")(x), train)
    return out + x


class MobileNetV2(nn.Module):
  """kuangliu CIFAR MobileNetV2.

  Attributes:
    num_classes: outputs.
    config: per stage (expansion, out_planes, num_blocks, first stride).
    stem_width: channels of conv1 (32).
    head_width: channels of the final 1x1 conv (1280).
    dtype: compute dtype; parameters are float32 and logits are returned as float32.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
  """

  num_classes: int
  config: Sequence[tuple[int, int, int, int]] = CIFAR_CONFIG
  stem_width: int = 32
  head_width: int = 1280
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, 3) images in [0, 1] to (N, num_classes) logits."""
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    x = layers.Conv2d(self.stem_width, 3, 1, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)
    x = jax.nn.relu(bn(name="bn1")(x, train))
    index = 0
    for expansion, out_planes, num_blocks, stride in self.config:
      for i in range(num_blocks):
        x = InvertedResidual(
          expansion, out_planes, stride if i == 0 else 1, self.dtype, self.bn_axis_name, name=f"layers_{index}"
        )(x, train)
        index += 1
    x = layers.Conv2d(self.head_width, 1, use_bias=False, dtype=self.dtype, name="conv2")(x)
    x = jax.nn.relu(bn(name="bn2")(x, train))
    x = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(layers.global_avg_pool(x))
    return x.astype(jnp.float32)

  def widened(self, width: float) -> "MobileNetV2":
    """This network with the stem, every stage's out_planes and the head times `width`; expansions unchanged."""
    return self.clone(
      config=tuple((e, layers.scale_width(planes, width), n, s) for e, planes, n, s in self.config),
      stem_width=layers.scale_width(self.stem_width, width),
      head_width=layers.scale_width(self.head_width, width),
    )


MODELS = {
  "mobilenet_v2": MobileNetV2,
  # Not from the paper: a small member of the family for tests and demos.
  "mobilenet_v2_tiny": functools.partial(
    MobileNetV2, config=((1, 8, 1, 1), (2, 16, 2, 2), (2, 24, 1, 1)), stem_width=8, head_width=32
  ),
}
