"""Model zoo of HYDRA (reference `models/`) plus the paper's MobileNetV2 / GoogLeNet, as Flax Linen modules.

Every model is built by name with `get_model(name, num_classes, **options)` and called as
`model.apply(variables, x, train=...)` on NHWC float images in [0, 1], returning float32 logits (N, num_classes).
Variables are `{"params": ...}` plus `{"batch_stats": ...}` for models with BatchNorm. Conv / dense weights are
leaves named `kernel` (the prunable weights), biases `bias`, BatchNorm `scale` / `bias` and running `mean` / `var`.
Models contain nothing about pruning: HYDRA masks the `kernel` leaves before calling them (`hydra_jax.masking`).

Module names mirror the PyTorch state-dict keys of the reference (a numeric Sequential / ModuleList index is
joined to its parent with "_"): PyTorch `layer1.0.conv1.weight` is flax `params/layer1_0/conv1/kernel`,
`features.0.weight` is `params/features_0/kernel`, `block1.layer.0.bn1.running_mean` is
`batch_stats/block1/layer_0/bn1/mean`; `hydra_jax.convert` maps checkpoints both ways.

Options every model accepts:
  dtype: compute dtype (e.g. `jnp.bfloat16` on TPU); parameters and logits stay float32.
  bn_axis_name: name of a mapped axis (`shard_map` / `pmap`) over which BatchNorm averages its batch statistics,
    or None (also right under `jax.jit` with sharded arrays, where the batch axis is global already).
    BN-free models accept and ignore it.
`get_model`'s `width` multiplies every channel count of the ResNet, WRN, MobileNetV2 and GoogLeNet families
(e.g. `get_model("resnet18", 10, width=0.25)`: stages of 16 / 32 / 64 / 128 planes), for reduced-scale runs.

Families (`model_names()` lists every name; `input_shape(name)` gives the (H, W, C) it is meant for):
  cnn.py             mnist_model, mnist_model_large, cifar_model (alias cnn_small), cifar_model_large (cnn_large)
  vgg.py             vgg{2,4,6,8,11,13,16}[_bn]
  wrn.py             wrn_28_1, wrn_28_2, wrn_28_4, wrn_28_10, wrn_34_10, wrn_40_2
  resnet.py          resnet18, resnet34, resnet50, resnet101, resnet152 (CIFAR, no max-pool)
  resnet_imagenet.py resnet18_imagenet, resnet34_imagenet, resnet50_imagenet (aliases ResNet18/34/50; 224x224,
                     ImageNet mean/std normalisation inside the model)
  mobilenet_v2.py    mobilenet_v2 (kuangliu CIFAR)
  googlenet.py       googlenet (kuangliu CIFAR)
  vit.py             vit_cifar (a small ViT for 32x32 images, written in Flax NNX; not from the paper)
Each family also has a tiny variant for tests and demos, not from the paper: cnn_tiny, vgg_tiny, wrn_tiny,
resnet_tiny, resnet_imagenet_tiny, mobilenet_v2_tiny, googlenet_tiny, vit_tiny.
NNX models (the ViT, users' own: `own.py`) are called through the same `init` / `apply` (`own.NnxModel`).

Example:

    import jax, jax.numpy as jnp
    from hydra_jax import models

    model = models.get_model("wrn_28_4", num_classes=10)
    x = jnp.zeros((8, *models.input_shape("wrn_28_4")))         # (8, 32, 32, 3), values in [0, 1]
    variables = model.init(jax.random.key(0), x[:1], train=False)
    apply_fn = models.make_apply_fn(model)
    logits, variables = apply_fn(variables, x, True)             # train mode: BN running stats updated
    logits, _ = apply_fn(variables, x, False)                    # eval mode: variables unchanged
"""

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from hydra_jax.models import cnn
from hydra_jax.models import googlenet
from hydra_jax.models import layers
from hydra_jax.models import mobilenet_v2
from hydra_jax.models import own
from hydra_jax.models import resnet
from hydra_jax.models import resnet_imagenet
from hydra_jax.models import vgg
from hydra_jax.models import vit
from hydra_jax.models import wrn

Variables = dict[str, Any]
ApplyFn = Callable[[Variables, jax.Array, bool], tuple[jax.Array, Variables]]

_MODELS = {
  **cnn.MODELS,
  **vgg.MODELS,
  **wrn.MODELS,
  **resnet.MODELS,
  **resnet_imagenet.MODELS,
  **mobilenet_v2.MODELS,
  **googlenet.MODELS,
  **vit.MODELS,
}
_CIFAR_SHAPE = (32, 32, 3)
_INPUT_SHAPES = {
  "mnist_model": (28, 28, 1),
  "mnist_model_large": (28, 28, 1),
  **{name: (224, 224, 3) for name in resnet_imagenet.MODELS},
  "resnet_imagenet_tiny": (64, 64, 3),
}


def model_names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_MODELS)


def is_zoo(name: str) -> bool:
  """Whether `name` is a zoo model built from the zoo's Linen layers (not the NNX ViT, not an own model's
  'module:Name'): what the PyTorch export (the reference's layouts) and the compact network (a channel plan) need."""
  return name in _MODELS and name not in vit.MODELS


def _check_name(name: str) -> None:
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(model_names())}")


@dataclasses.dataclass(frozen=True)
class PlannedModel:
  """A zoo model built to a channel plan: each conv / dense layer has the plan's output channels.

  Called like the module it wraps (`init`, `apply`); its variables have the module's paths with the planned
  (smaller) shapes, e.g. the compact network of `hydra_jax.channels.compact_variables`.

  Attributes:
    module: the zoo model at its full widths (the plan keeps its structure: blocks, shortcuts, branches).
    plan: ((module path, output channels), ...), e.g. (('conv1', 40), ('layer1_0/conv1', 31), ...).
  """

  module: nn.Module
  plan: tuple[tuple[str, int], ...]

  def init(self, *args: Any, **kwargs: Any) -> Variables:
    with layers.channel_plan(dict(self.plan)):
      return self.module.init(*args, **kwargs)

  def apply(self, *args: Any, **kwargs: Any) -> Any:
    with layers.channel_plan(dict(self.plan)):
      return self.module.apply(*args, **kwargs)


def get_model(
  name: str,
  num_classes: int,
  width: float = 1.0,
  channel_plan: Mapping[str, int] | None = None,
  kwargs: Mapping[str, Any] | None = None,
  **options: Any,
) -> nn.Module | PlannedModel:
  """Builds the zoo model `name` (or the user's own model `name`) with `num_classes` outputs.

  Args:
    name: a registered name (see `model_names()`), or an own model's 'package.module:Name' or
      'path/to/file.py:Name' (a Flax Linen module class or factory, or an NNX module class; `own.build`).
    num_classes: number of logits.
    width: channel-width multiplier (1: the registered network). Every channel count is scaled by it and
      rounded (`layers.scale_width`), depth and layout unchanged; only the families with a `widened` method
      (`width_scalable`) accept width != 1.
    channel_plan: {conv / dense module path: output channels} of a network with pruned channels removed
      (`hydra_jax.channels.compact_variables`); layers absent from it keep their width. None: the full network.
    kwargs: an own model's arguments (config.model.kwargs); zoo models take none.
    **options: module attributes, typically `dtype` and `bn_axis_name` (see the module docstring).

  Returns:
    An unbound Flax module called as `model.apply(variables, x, train=...)` (a `PlannedModel` with a plan; an
    own model: `own.build`'s Linen module or its NNX adapter, with the same `init` / `apply`).

  Raises:
    ValueError: unknown name (the message lists the valid ones), num_classes < 1, width <= 0, or width != 1
      for a model without a width option.
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if own.is_spec(name):
    return _own_model(name, num_classes, width, channel_plan, kwargs, **options)
  _check_name(name)
  if kwargs:
    raise ValueError(f"model {name!r} is a zoo model and takes no kwargs (got {sorted(kwargs)})")
  if not width > 0:
    raise ValueError(f"width must be positive, got {width!r}")
  if channel_plan is not None and not is_zoo(name):
    raise ValueError(f"model {name!r} cannot be rebuilt to a channel plan; the compact network needs a Linen zoo model")
  model = _MODELS[name](num_classes=num_classes, **options)
  if width != 1:
    if not width_scalable(name):
      raise ValueError(
        f"model {name!r} has no width option (width={width!r}); the ResNet, WRN, MobileNetV2 and GoogLeNet families "
        "have"
      )
    model = model.widened(width)
  return model if channel_plan is None else PlannedModel(model, tuple(sorted(channel_plan.items())))


def _own_model(name, num_classes, width, channel_plan, kwargs, dtype=None, bn_axis_name=None):
  if width != 1:
    raise ValueError(f"own model {name!r} has no width option (width={width!r}); set its size in config.model.kwargs")
  if channel_plan is not None:
    raise ValueError(f"own model {name!r} cannot be rebuilt to a channel plan; the compact network is the zoo's only")
  return own.build(name, num_classes, kwargs, dtype=dtype, bn_axis_name=bn_axis_name)


def width_scalable(name: str) -> bool:
  """Whether model `name` accepts a width multiplier other than 1 in `get_model`."""
  _check_name(name)
  return hasattr(_MODELS[name](num_classes=1), "widened")


def input_shape(name: str) -> tuple[int, int, int]:
  """(H, W, C) of the images model `name` is meant for: 32x32x3 (CIFAR/SVHN), 28x28x1 (MNIST), 224x224x3 (ImageNet).

  The fully convolutional models accept other sizes too; the CNNs' first dense layer is sized by it.
  """
  _check_name(name)
  return _INPUT_SHAPES.get(name, _CIFAR_SHAPE)


def make_apply_fn(model: nn.Module) -> ApplyFn:
  """The model call convention of objectives and train steps: `apply_fn(variables, x, train) -> (logits, variables)`.

  `apply_fn` is pure and jit/grad/vmap friendly; `train` must be a Python bool (static).
  - train=True on a model with BatchNorm: batch statistics normalise the activations, and the returned variables
    carry the updated running statistics (`batch_stats`); all other collections are returned unchanged.
  - train=False, or a model without `batch_stats`: running statistics are used and `variables` come back as given.

  Args:
    model: a zoo module (or any module with the `__call__(x, train)` signature).

  Returns:
    apply_fn mapping (variables, x of shape (N, H, W, C), train) to ((N, num_classes) logits, variables).
  """

  def apply_fn(variables: Variables, x: jax.Array, train: bool) -> tuple[jax.Array, Variables]:
    if train and "batch_stats" in variables:
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, {**variables, **updates}
    return model.apply(variables, x, train=train), variables

  return apply_fn
