"""Test helpers for the model zoo: random non-trivial variables without compiling an init (fast on CPU)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hydra_jax import models


def random_variables(name, num_classes=10, batch=2, seed=0, **options):
  """(model, x, variables) with He-scaled random kernels, random biases and non-trivial BN scale/shift/statistics.

  Shapes come from `jax.eval_shape(model.init)`, values from numpy, so nothing is compiled. x is uniform [0, 1]
  of shape (batch, *models.input_shape(name)).
  """
  model = models.get_model(name, num_classes, **options)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(size=(batch, *models.input_shape(name))), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x[:1])
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    if path[-1] == "kernel":
      value = rng.normal(size=leaf.shape) * math.sqrt(2 / math.prod(leaf.shape[:-1]))
    elif path[-1] in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:  # bias, BN shift, running mean
      value = rng.normal(size=leaf.shape) * 0.1
    flat[path] = jnp.asarray(value, jnp.float32)
  return model, x, traverse_util.unflatten_dict(flat)
