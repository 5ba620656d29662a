"""Your own model through the HYDRA pipeline: the same small network written in Flax Linen and in Flax NNX, and the
config that pretrains, prunes (k=0.1) and finetunes it on digits, with the LWM baseline beside (docs/own_models.md).

Run:
  hydra-jax train --config configs/own_model.py:model=LinenNet --workdir runs/own_linen
  hydra-jax train --config configs/own_model.py:model=NnxNet --workdir runs/own_nnx

`config.model.name = "configs/own_model.py:LinenNet"` names a class in a file ("my_package.my_module:MyNet" names
an importable one) and `config.model.kwargs` its arguments; nothing in the package changes. Each network has
BatchNorm, a residual add and a channel concatenation, so its channels can be pruned too
(--config.mask.granularity=channel). Arguments: model (LinenNet or NnxNet), width (default 8).
"""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from hydra_jax import config as config_lib


class LinenNet(nn.Module):
  """conv-BN-ReLU, a residual conv, a 1x1 branch concatenated on channels, global average pooling, dense."""

  width: int = 8
  num_classes: int = 10  # filled in from the dataset when the config does not set it

  @nn.compact
  def __call__(self, x, train=False):  # NHWC images in [0, 1] -> logits; train: BatchNorm's batch statistics
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(self.width, (3, 3), name="stem")(x)))
    x = x + nn.relu(nn.Conv(self.width, (3, 3), name="conv")(x))
    x = jnp.concatenate([x, nn.Conv(self.width, (1, 1), name="branch")(x)], axis=-1)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class NnxNet(nnx.Module):
  """LinenNet in NNX, with the same parameter paths. `input_shape` (H, W, C) is passed in from the data."""

  def __init__(self, input_shape, width=8, num_classes=10, *, rngs):
    self.stem = nnx.Conv(input_shape[-1], width, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    self.conv = nnx.Conv(width, width, (3, 3), rngs=rngs)
    self.branch = nnx.Conv(width, width, (1, 1), rngs=rngs)
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, x):  # train / eval mode is set on the module (nnx's train() / eval()) before each call
    x = nnx.relu(self.bn(self.stem(x)))
    x = x + nnx.relu(self.conv(x))
    x = jnp.concatenate([x, self.branch(x)], axis=-1)
    return self.head(x.mean(axis=(1, 2)))


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, model="LinenNet", width=8, choices={"model": ("LinenNet", "NnxNet")})
  config = config_lib.default_config()
  config.stage, config.ks, config.baselines = "all", (0.1,), ("lwm",)
  config.model.name = f"configs/own_model.py:{args.model}"
  config.model.kwargs = {"width": args.width}
  config.data.name, config.data.batch_size, config.data.eval_batch_size = "digits", 64, 120
  config.objective = config_lib.objective_config("trades")
  for section in (config.objective, config.eval):
    section.eps, section.step_size, section.steps = 0.1, 0.025, 10
  config.stages.pretrain.epochs, config.stages.prune.epochs, config.stages.finetune.epochs = 10, 5, 5
  config.eval.every_epochs = 5
  return config
