"""BN-free sequential CNNs of verified training (reference `models/basic.py`): CNN-small/large, MNIST variants.

Each network is a plain chain conv -> relu -> ... -> flatten -> dense -> relu -> ... -> dense, so its jaxpr
contains only conv (on CPU, where its per-tap kernel gradient is faster, wrapped in a custom_vjp_call), dense
(dot_general + add), relu, and reshape: what IBP/CROWN/symbolic-interval bounds propagate through. Submodules
are named by their index in the reference `nn.Sequential` ("0", "2", ... for convs, then the denses), so the
flax path `params/5/kernel` is the PyTorch key `5.weight`.

Differences from the reference, by design:
- The reference hard-codes 10 outputs and ignores num_classes; here the last layer has `num_classes` outputs
  (use 10 to load a reference checkpoint).
- The flatten is NHWC; `hydra_jax.convert` permutes the first dense kernel's rows to read PyTorch checkpoints.

Example:

    model = get_model("cifar_model", num_classes=10)          # CNN-small
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    logits = model.apply(variables, images, train=False)      # (N, 10)
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers


class SequentialCNN(nn.Module):
  """conv/relu stack, flatten, dense/relu stack, dense classifier (no BatchNorm).

  Attributes:
    convs: per conv layer (out_channels, kernel_size, stride, padding).
    hidden: widths of the hidden dense layers.
    num_classes: outputs of the last dense layer.
    he_init: conv weights N(0, 2 / (k * k * out)) and zero biases, as the reference's cifar models; if False,
      PyTorch's default init (the reference's mnist models). Dense layers always use PyTorch's default.
    dtype: compute dtype; parameters are float32 and logits are returned as float32.
    bn_axis_name: unused (there is no BatchNorm); accepted so that every zoo model takes the same options.
  """

  convs: Sequence[tuple[int, int, int, int]]
  hidden: Sequence[int]
  num_classes: int
  he_init: bool = True
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, C) images in [0, 1] to (N, num_classes) logits; `train` has no effect."""
    del train  # No BatchNorm or dropout.
    conv_init = dict(kernel_init=layers.kaiming_normal_fan_out, bias_init=nn.initializers.zeros) if self.he_init else {}
    index = 0
    for features, kernel_size, stride, padding in self.convs:
      x = layers.Conv2d(features, kernel_size, stride, padding, dtype=self.dtype, name=str(index), **conv_init)(x)
      x = jax.nn.relu(x)
      index += 2
    x = layers.flatten(x)
    index += 1
    for width in self.hidden:
      x = jax.nn.relu(layers.Linear(width, dtype=self.dtype, name=str(index))(x))
      index += 2
    x = layers.Linear(self.num_classes, dtype=self.dtype, name=str(index))(x)
    return x.astype(jnp.float32)

  def flattened_map(self, input_shape: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]]:
    """Name of the dense layer that reads the flattened feature map, and that map's (H, W, C).

    Args:
      input_shape: (H, W, C) of one input image.
    """
    height, width = input_shape[:2]
    for _, kernel_size, stride, padding in self.convs:
      height = (height + 2 * padding - kernel_size) // stride + 1
      width = (width + 2 * padding - kernel_size) // stride + 1
    return str(2 * len(self.convs) + 1), (height, width, self.convs[-1][0])


_SMALL_CONVS = ((16, 4, 2, 1), (32, 4, 2, 1))
_LARGE_CONVS = ((32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1))

MODELS = {
  "mnist_model": functools.partial(SequentialCNN, convs=_SMALL_CONVS, hidden=(100,), he_init=False),
  "mnist_model_large": functools.partial(SequentialCNN, convs=_LARGE_CONVS, hidden=(512, 512), he_init=False),
  "cifar_model": functools.partial(SequentialCNN, convs=_SMALL_CONVS, hidden=(100,)),
  "cifar_model_large": functools.partial(SequentialCNN, convs=_LARGE_CONVS, hidden=(512, 512)),
  # Not from the paper: a small member of the family for tests and demos.
  "cnn_tiny": functools.partial(SequentialCNN, convs=((4, 4, 2, 1), (8, 4, 2, 1)), hidden=(16,)),
}
MODELS["cnn_small"] = MODELS["cifar_model"]
MODELS["cnn_large"] = MODELS["cifar_model_large"]
