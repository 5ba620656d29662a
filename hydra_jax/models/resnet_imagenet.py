"""ImageNet ResNets of the reference (`models/resnet.py`, torchvision layout), with input normalisation inside.

    normalise -> conv1 7x7/2 (64) -> BN -> relu -> max-pool 3x3/2 -> layer1..layer4 (strides 1/2/2/2)
    -> global average pool -> fc

Bottleneck blocks put the stride on the 3x3 conv (torchvision "ResNet v1.5"); the first block of a stage gets a
`downsample` conv1x1(stride)+BN when the shape changes. Convs are bias-free with kaiming_normal(fan_out) weights,
BN 1 / 0, fc PyTorch default (zero_init_residual=False). The blocks and the stage loop are those of `resnet.py`
with that init and the `downsample` name.

Normalisation: the reference trains and evaluates ImageNet on [0, 1] inputs and normalises them with
mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225) inside its free-adversarial training loop. Here that
normalisation is the first operation of the model, so the model takes [0, 1] images like every other zoo model
(attack budgets stay in [0, 1] pixel units). It has no parameters, so checkpoints map one-to-one.

Names follow the PyTorch keys: `layer1.0.downsample.0.weight` is `params/layer1_0/downsample_0/kernel`.

Example:

    model = get_model("resnet50_imagenet", num_classes=1000)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
"""

import functools
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import layers
from hydra_jax.models import resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's blocks are the CIFAR ones (`resnet.py`) with kaiming_normal(fan_out) convs and `downsample_0/1`.
BasicBlock = functools.partial(resnet.BasicBlock, kernel_init=layers.kaiming_normal_fan_out, shortcut_name="downsample")
Bottleneck = functools.partial(resnet.Bottleneck, kernel_init=layers.kaiming_normal_fan_out, shortcut_name="downsample")


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

  block: Callable[..., resnet.BasicBlock | resnet.Bottleneck]
  num_blocks: Sequence[int]
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: layers.Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, H, W, 3) images in [0, 1] (224x224 for ImageNet) to (N, num_classes) logits."""
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    x = layers.Conv2d(
      self.widths[0], 7, 2, 3, use_bias=False, kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype, name="conv1"
    )(x)
    x = jax.nn.relu(layers.BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype, name="bn1")(x, train))
    x = layers.max_pool(x, 3, 2, 1)
    x = resnet.stages(x, self.block, self.widths, self.num_blocks, self.dtype, self.bn_axis_name, train)
    x = layers.Linear(self.num_classes, dtype=self.dtype, name="fc")(layers.global_avg_pool(x))
    return x.astype(jnp.float32)


MODELS = {
  "resnet18_imagenet": functools.partial(ImageNetResNet, block=BasicBlock, num_blocks=(2, 2, 2, 2)),
  "resnet34_imagenet": functools.partial(ImageNetResNet, block=BasicBlock, num_blocks=(3, 4, 6, 3)),
  "resnet50_imagenet": functools.partial(ImageNetResNet, block=Bottleneck, num_blocks=(3, 4, 6, 3)),
  # Not from the paper: a small member of the family for tests and demos (64x64 inputs suit it).
  "resnet_imagenet_tiny": functools.partial(
    ImageNetResNet, block=Bottleneck, num_blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64)
  ),
}
# The reference's own names (the "arch" entry of its checkpoints).
MODELS.update(
  ResNet18=MODELS["resnet18_imagenet"], ResNet34=MODELS["resnet34_imagenet"], ResNet50=MODELS["resnet50_imagenet"]
)
