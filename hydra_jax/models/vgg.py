"""CIFAR VGG family of the reference (`models/vgg_cifar.py`): vgg2 ... vgg16, each with and without BatchNorm.

Features: 3x3 convs (padding 1, no bias), each followed by BatchNorm (the `_bn` variants) and relu, with 2x2
max-pools at the "M" entries of the configuration. The reference configurations have at most four pools, so a
32x32 input reaches the AdaptiveAvgPool2d((2, 2)) already at 2x2 (identity). Classifier: flatten (4 * C) ->
256 -> relu -> 256 -> relu -> num_classes, no dropout.

Note: the reference "vgg11"/"vgg13"/"vgg16" configurations omit the final pool of torchvision's VGG; they are
kept as in the reference. Initialisation as the reference `initialize_weights` with init_type="kaiming_normal":
conv N(0, 2 / (9 * out)), dense N(0, 0.01^2) with zero bias, BatchNorm 1 / 0.

Submodule names follow the reference `nn.Sequential` indices: `features_0` (conv), `features_1` (BN), ...,
`classifier_0`, `classifier_2`, `classifier_4`; i.e. PyTorch `features.0.weight` is `params/features_0/kernel`.

Example:

    model = get_model("vgg16_bn", num_classes=10, bn_axis_name=None)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers

CONFIGS = {
  "2": (64, "M", 64, "M"),
  "4": (64, 64, "M", 128, 128, "M"),
  "6": (64, 64, "M", 128, 128, "M", 256, 256, "M"),
  "8": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"),
  "11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
  "13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
  "16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
}


class VGG(nn.Module):
  """VGG with the reference's 2x2 adaptive pooling and three-layer classifier.

  Attributes:
    cfg: conv widths, "M" for a 2x2/2 max-pool.
    batch_norm: BatchNorm after every conv.
    num_classes: outputs.
    hidden: width of the two hidden classifier layers (256 in the reference).
    dtype: compute dtype; parameters are float32 and logits are returned as float32.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
  """

  cfg: Sequence[int | str]
  batch_norm: bool
  num_classes: int
  hidden: int = 256
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, 3) images in [0, 1] to (N, num_classes) logits."""
    index = 0
    for v in self.cfg:
      if v == "M":
        x = layers.max_pool(x, 2, 2)
        index += 1
        continue
      x = layers.Conv2d(
        v,
        3,
        padding=1,
        use_bias=False,
        kernel_init=layers.kaiming_normal_fan_out,
        dtype=self.dtype,
        name=f"features_{index}",
      )(x)
      index += 1
      if self.batch_norm:
        x = layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"features_{index}")(x, train)
        index += 1
      x = jax.nn.relu(x)
      index += 1
    x = layers.flatten(layers.adaptive_avg_pool(x, (2, 2)))
    dense = functools.partial(
      layers.Linear, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros, dtype=self.dtype
    )
    x = jax.nn.relu(dense(self.hidden, name="classifier_0")(x))
    x = jax.nn.relu(dense(self.hidden, name="classifier_2")(x))
    return dense(self.num_classes, name="classifier_4")(x).astype(jnp.float32)

  def flattened_map(self, input_shape: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]]:
    """Name of the dense layer that reads the flattened feature map, and that map's (H, W, C)."""
    del input_shape  # The adaptive pooling always gives 2x2.
    return "classifier_0", (2, 2, [v for v in self.cfg if v != "M"][-1])


MODELS = {
  **{f"vgg{depth}": functools.partial(VGG, cfg=cfg, batch_norm=False) for depth, cfg in CONFIGS.items()},
  **{f"vgg{depth}_bn": functools.partial(VGG, cfg=cfg, batch_norm=True) for depth, cfg in CONFIGS.items()},
  # Not from the paper: a small member of the family for tests and demos.
  "vgg_tiny": functools.partial(VGG, cfg=(8, "M", 16, "M"), batch_norm=True, hidden=32),
}
