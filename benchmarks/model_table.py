"""Prints the model zoo as a markdown table: parameters, prunable weights and input size of every model.

Counts come from `jax.eval_shape` of each model's init (nothing is allocated). Parameters are conv/dense weights and
biases plus BatchNorm scale/shift (not running statistics, not scores); prunable weights are the conv/dense
`kernel` leaves that HYDRA masks. Both equal the PyTorch reference definitions (tests/test_models.py).

Run: python benchmarks/model_table.py [--num_classes 10]
"""

import argparse
import math
import re

import jax
import jax.numpy as jnp

from hydra_jax import models

_ALIASES = {
  "cnn_small": "cifar_model",
  "cnn_large": "cifar_model_large",
  "ResNet18": "resnet18_imagenet",
  "ResNet34": "resnet34_imagenet",
  "ResNet50": "resnet50_imagenet",
}


def counts(name: str, num_classes: int) -> tuple[int, int]:
  """(parameters, prunable weights) of zoo model `name`."""
  model = models.get_model(name, num_classes)
  x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = sum(math.prod(v.shape) for _, v in leaves)
  prunable = sum(math.prod(v.shape) for p, v in leaves if p[-1].key == "kernel")
  return total, prunable


def table(num_classes: int) -> str:
  """The markdown table, one row per registered name (aliases noted, not repeated)."""
  aliases = {}
  for alias, name in _ALIASES.items():
    aliases.setdefault(name, []).append(alias)
  rows = ["| model | parameters | prunable weights | input (H x W x C) |", "|---|---:|---:|---|"]
  natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
  for name in sorted(models.model_names(), key=natural):
    if name in _ALIASES:
      continue
    total, prunable = counts(name, num_classes)
    h, w, c = models.input_shape(name)
    label = f"`{name}`" + "".join(f" / `{a}`" for a in aliases.get(name, []))
    rows.append(f"| {label} | {total:,} | {prunable:,} | {h} x {w} x {c} |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_classes", type=int, default=10)
  print(table(parser.parse_args().num_classes))


if __name__ == "__main__":
  main()
