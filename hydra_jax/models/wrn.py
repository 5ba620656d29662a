"""Wide ResNets of the reference (`models/wrn_cifar.py`, the standard / TRADES WRN-depth-width).

Channels (16, 16w, 32w, 64w) (16: `base_width`) with n = (depth - 4) / 6 pre-activation blocks per group
(strides 1, 2, 2):

    conv1 3x3 -> block1 -> block2 -> block3 -> BN -> relu -> global average pool -> fc

Block (reference `BasicBlock`, dropout 0): BN-relu, then conv3x3(stride)-BN-relu-conv3x3; the residual is the
input itself when in == out channels, otherwise a 1x1 conv (`convShortcut`, same stride) applied to the
*pre-activated* input. All convs are bias-free with weights N(0, 2 / (k * k * out)); BN 1 / 0; fc PyTorch
default weights with zero bias.

The reference also builds a `sub_block1` (a copy of block1's shapes) that its forward never uses; it is not
built here and does not count in the parameters (`hydra_jax.convert` skips / fills it in checkpoints). The
reference's `avg_pool2d(8)` is a global average pool at 32x32 input; here it is a global average pool.

Names follow the PyTorch keys: `block2.layer.0.convShortcut.weight` is `params/block2/layer_0/convShortcut/kernel`.

Example:

    model = get_model("wrn_28_4", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers

_conv3x3 = functools.partial(
  layers.Conv2d, kernel_size=3, padding=1, use_bias=False, kernel_init=layers.kaiming_normal_fan_out
)


class WideBasicBlock(nn.Module):
  """Pre-activation basic block (reference `BasicBlock`)."""

  out_planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C_in) -> (N, H / stride, W / stride, out_planes)."""
    bn = functools.partial(layers.BatchNorm, axis_name=self.bn_axis_name, dtype=self.dtype)
    pre = jax.nn.relu(bn(name="bn1")(x, train))
    out = _conv3x3(self.out_planes, stride=self.stride, dtype=self.dtype, name="conv1")(pre)
    out = jax.nn.relu(bn(name="bn2")(out, train))
    out = _conv3x3(self.out_planes, dtype=self.dtype, name="conv2")(out)
    if not layers.has_layer(self, "convShortcut", nominal=x.shape[-1] != self.out_planes):
      return x + out
    shortcut = layers.Conv2d(
      self.out_planes,
      1,
      self.stride,
      use_bias=False,
      kernel_init=layers.kaiming_normal_fan_out,
      dtype=self.dtype,
      name="convShortcut",
    )(pre)
    return shortcut + out


class NetworkBlock(nn.Module):
  """A group of `num_layers` blocks; the first one has the stride (reference `NetworkBlock`)."""

  num_layers: int
  out_planes: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_layers):
      x = WideBasicBlock(
        self.out_planes, self.stride if i == 0 else 1, self.dtype, self.bn_axis_name, name=f"layer_{i}"
      )(x, train)
    return x


class WideResNet(nn.Module):
  """WRN-depth-widen_factor for 32x32 inputs.

  Attributes:
    depth: total depth, 6n + 4.
    widen_factor: width multiplier w.
    num_classes: outputs.
    base_width: channels of conv1, b; the groups have (b w, 2 b w, 4 b w). 16 in the reference.
    dtype: compute dtype; parameters are float32 and logits are returned as float32.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
  """

  depth: int
  widen_factor: int
  num_classes: int
  base_width: int = 16
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, 3) images in [0, 1] to (N, num_classes) logits."""
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}")
    n = (self.depth - 4) // 6
    b, w = self.base_width, self.widen_factor
    x = _conv3x3(b, dtype=self.dtype, name="conv1")(x)
    for i, (planes, stride) in enumerate([(b * w, 1), (2 * b * w, 2), (4 * b * w, 2)]):
      x = NetworkBlock(n, planes, stride, self.dtype, self.bn_axis_name, name=f"block{i + 1}")(x, train)
    x = jax.nn.relu(layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="bn1")(x, train))
    fc = layers.Linear(self.num_classes, bias_init=nn.initializers.zeros, dtype=self.dtype, name="fc")
    return fc(layers.global_avg_pool(x)).astype(jnp.float32)

  def widened(self, width: float) -> "WideResNet":
    """This network with every group's channels times `width` (via `base_width`); depth and w unchanged."""
    return self.clone(base_width=layers.scale_width(self.base_width, width))


MODELS = {
  "wrn_28_1": functools.partial(WideResNet, depth=28, widen_factor=1),
  # Not in the reference repo; WRN-28-2 is in the paper's Table 1.
  "wrn_28_2": functools.partial(WideResNet, depth=28, widen_factor=2),
  "wrn_28_4": functools.partial(WideResNet, depth=28, widen_factor=4),
  "wrn_28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
  "wrn_34_10": functools.partial(WideResNet, depth=34, widen_factor=10),
  "wrn_40_2": functools.partial(WideResNet, depth=40, widen_factor=2),
  # Not from the paper: a small member of the family (WRN-10-1) for tests and demos.
  "wrn_tiny": functools.partial(WideResNet, depth=10, widen_factor=1),
}
