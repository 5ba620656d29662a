"""CIFAR GoogLeNet of kuangliu/pytorch-cifar (`models/googlenet.py`), one of the paper's Table 1 networks.

The reference HYDRA repo has no GoogLeNet; this follows kuangliu's CIFAR variant exactly:

    pre_layers: conv 3x3 (192) -> BN -> relu
    a3 -> b3 -> max-pool 3x3/2 -> a4 -> b4 -> c4 -> d4 -> e4 -> max-pool 3x3/2 -> a5 -> b5
    -> global average pool -> linear (1024 -> num_classes)

Inception(n1, r3, n3, r5, n5, pool): four branches concatenated on channels in this order: b1 conv1x1(n1); b2
conv1x1(r3) -> conv3x3(n3); b3 conv1x1(r5) -> conv3x3(n5) -> conv3x3(n5) (kuangliu's "5x5" branch is two 3x3s);
b4 max-pool 3x3/1 -> conv1x1(pool). Every conv has a bias and is followed by BN and relu. PyTorch default
initialisation everywhere; no input normalisation. Differences from kuangliu: the classifier honours
`num_classes` (kuangliu hard-codes 10), and its `AvgPool2d(8)` is a global average pool (equal at 32x32 input).

Names follow the PyTorch keys: `a3.b3.3.weight` is `params/a3/b3_3/kernel`, `pre_layers.1.running_var` is
`batch_stats/pre_layers_1/var`.

Example:

    model = get_model("googlenet", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers

# (name, (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes)); a max-pool 3x3/2 follows b3 and e4.
INCEPTIONS = (
  ("a3", (64, 96, 128, 16, 32, 32)),
  ("b3", (128, 128, 192, 32, 96, 64)),
  ("a4", (192, 96, 208, 16, 48, 64)),
  ("b4", (160, 112, 224, 24, 64, 64)),
  ("c4", (128, 128, 256, 24, 64, 64)),
  ("d4", (112, 144, 288, 32, 64, 64)),
  ("e4", (256, 160, 320, 32, 128, 128)),
  ("a5", (256, 160, 320, 32, 128, 128)),
  ("b5", (384, 192, 384, 48, 128, 128)),
)


class Inception(nn.Module):
  """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1) concatenated on channels."""

  planes: tuple[int, int, int, int, int, int]
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    n1, r3, n3, r5, n5, pool_planes = self.planes
    b1 = self._branch(x, "b1", (n1,), train)
    b2 = self._branch(x, "b2", (r3, n3), train)
    b3 = self._branch(x, "b3", (r5, n5, n5), train)
    b4 = self._branch(layers.max_pool(x, 3, 1, 1), "b4", (pool_planes,), train, first_index=1)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)

  def _branch(self, x: jax.Array, name: str, widths: Sequence[int], train: bool, first_index: int = 0) -> jax.Array:
    """conv-BN-relu per width; submodules named like the branch's nn.Sequential indices (b2_0, b2_1, b2_3, ...)."""
    for i, width in enumerate(widths):
      index = first_index + 3 * i
      kernel_size = 1 if i == 0 else 3
      x = layers.Conv2d(width, kernel_size, padding=kernel_size // 2, dtype=self.dtype, name=f"{name}_{index}")(x)
      x = layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name=f"{name}_{index + 1}")(x, train)
      x = jax.nn.relu(x)
    return x


class GoogLeNet(nn.Module):
  """kuangliu CIFAR GoogLeNet.

  Attributes:
    num_classes: outputs.
    inceptions: (name, planes) of the Inception modules, in order (the nine of kuangliu by default).
    pool_after: names of the Inception modules followed by a 3x3/2 max-pool.
    stem_width: channels of the first conv (192).
    dtype: compute dtype; parameters are float32 and logits are returned as float32.
    bn_axis_name: mapped axis for cross-device BatchNorm statistics, or None.
  """

  num_classes: int
  inceptions: Sequence[tuple[str, tuple[int, ...]]] = INCEPTIONS
  pool_after: Sequence[str] = ("b3", "e4")
  stem_width: int = 192
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, 3) images in [0, 1] to (N, num_classes) logits."""
    x = layers.Conv2d(self.stem_width, 3, padding=1, dtype=self.dtype, name="pre_layers_0")(x)
    x = jax.nn.relu(layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="pre_layers_1")(x, train))
    for name, planes in self.inceptions:
      x = Inception(planes, self.dtype, self.bn_axis_name, name=name)(x, train)
      if name in self.pool_after:
        x = layers.max_pool(x, 3, 2, 1)
    x = layers.Linear(self.num_classes, dtype=self.dtype, name="linear")(layers.global_avg_pool(x))
    return x.astype(jnp.float32)

  def widened(self, width: float) -> "GoogLeNet":
    """This network with the stem and every Inception branch's planes times `width`; the modules unchanged."""
    return self.clone(
      inceptions=tuple((name, tuple(layers.scale_width(p, width) for p in planes)) for name, planes in self.inceptions),
      stem_width=layers.scale_width(self.stem_width, width),
    )


MODELS = {
  "googlenet": GoogLeNet,
  # Not from the paper: a small member of the family for tests and demos: four of the Inception modules
  # (a3, b3, pool, e4, pool, a5) with every width / 16.
  "googlenet_tiny": functools.partial(
    GoogLeNet,
    stem_width=12,
    inceptions=tuple(
      (name, tuple(p // 16 for p in planes)) for name, planes in INCEPTIONS if name in ("a3", "b3", "e4", "a5")
    ),
  ),
}
