"""Shared fixtures-in-code for the attack, objective and evaluation tests: digits data, tiny models, a driver.

The driver (`train`) is the reference for the train-step contract of `hydra_jax.objectives`: value_and_grad
over (params, carry) in one backward pass, an optax update, then `update_carry`, `replays(config)` times
per batch, with the carry reset by `init_carry` at each epoch start.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from hydra_jax import objectives

PAD = ((1, 1), (1, 1))  # explicit padding, so that a PyTorch port with padding=1 matches exactly


class TinyCNN(nn.Module):
  """conv3x3(8) [BN] relu, conv3x3/2(16) relu, dense(32) relu, dense(10); for 8x8x1 digits."""

  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), padding=PAD)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, padding=PAD)(x))
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class Linear(nn.Module):
  """Logits W x + b on the flattened input, optionally after a BatchNorm of the input."""

  num_classes: int = 10
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@functools.cache
def make_apply_fn(model: nn.Module):
  """`apply_fn(variables, x, train) -> (logits, variables)` following the hydra_jax convention.

  Cached per (hashable) module, so that jit caches keyed on the function are reused across tests.
  """

  def apply_fn(variables, x, train):
    if train and "batch_stats" in variables:
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return logits, {**variables, **updates}
    return model.apply(variables, x, train=train), variables

  return apply_fn


def key(seed: int) -> jax.Array:
  """A PRNG key with the 'rbg' implementation: on this CPU its sampling compiles in ~0.4 s against ~1.2 s
  for the default threefry, which dominates the compile time of small test attacks."""
  return jax.random.key(seed, impl="rbg")


def init_variables(model: nn.Module, input_shape, seed=0):
  """Variables of `model` for inputs of `input_shape`, drawn in numpy: kernels N(0, 1/fan_in), biases 0,
  BN scale 1 and running stats (0, 1). Avoids compiling `model.init` (seconds per model on this CPU)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(input_shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def digits():
  """(x_train [1297, 8, 8, 1], y_train, x_test [500, 8, 8, 1], y_test), pixels scaled to [0, 1]."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  return x[:-500], y[:-500], x[-500:], y[-500:]


def train(model, objective_name, config, *, steps, batch_size=64, learning_rate=1e-2, seed=0, variables=None):
  """Trains `model` on digits with a registered objective; returns (variables, last metrics).

  `steps` counts optimizer steps (batches x replays). An epoch is one pass over a fixed batch order.
  """
  x_train, y_train, _, _ = digits()
  objective = objectives.get_objective(objective_name)
  apply_fn = make_apply_fn(model)
  rng_key = key(seed)
  if variables is None:
    variables = init_variables(model, x_train[:2].shape, seed)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  stateful = objective.init_carry is not None

  @jax.jit
  def step(params, opt_state, rest, carry, batch, key):
    def loss(p, c):
      extra = (c,) if stateful else ()
      return objective.loss_fn(apply_fn, {"params": p, **rest}, batch, key, config, *extra)

    (_, (metrics, new_variables)), (grad_p, grad_c) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      params, carry
    )
    updates, opt_state = tx.update(grad_p, opt_state, params)
    params = optax.apply_updates(params, updates)
    carry = objective.update_carry(carry, grad_c, config) if stateful else carry
    rest = {k: v for k, v in new_variables.items() if k != "params"}
    return params, opt_state, rest, carry, metrics

  batches_per_epoch = len(y_train) // batch_size
  replays = objective.replays(config)
  done, metrics = 0, None
  while done < steps:
    carry = objective.init_carry((batch_size, *x_train.shape[1:]), config) if stateful else None
    for b in range(batches_per_epoch):
      sl = slice(b * batch_size, (b + 1) * batch_size)
      batch = {"image": jnp.asarray(x_train[sl]), "label": jnp.asarray(y_train[sl])}
      for _ in range(replays):
        params, opt_state, rest, carry, metrics = step(
          params, opt_state, rest, carry, batch, jax.random.fold_in(rng_key, done)
        )
        done += 1
        if done == steps:
          return {"params": params, **rest}, metrics
  return {"params": params, **rest}, metrics


def objective_config(name, eps=None):
  """The objective's default config; with eps, attack settings eps, step eps / 3 and 5 steps."""
  config = objectives.default_config(name)
  if eps is not None:
    config.update({k: v for k, v in dict(eps=eps, step_size=eps / 3, steps=5).items() if k in config})
  return config


@functools.cache
def trained_cnn(objective_name="benign", steps=300, eps=None):
  """A TinyCNN (no BN) trained on digits, cached for the session: (model, variables)."""
  model = TinyCNN()
  variables, _ = train(model, objective_name, objective_config(objective_name, eps), steps=steps)
  return model, variables


def accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(jnp.asarray(x)), -1) == jnp.asarray(y)))


# The 10-class linear problem whose l_inf robust accuracy has a closed form (test_evaluate, test_autoattack).
LINEAR_SHAPE = (4, 4, 1)


def linear_problem(n=48, eps=0.05, seed=0):
  """A 10-class linear model with inputs eps-away from the box edges, so the box never binds."""
  model = Linear(num_classes=10)
  rng = np.random.default_rng(seed)
  x = rng.uniform(eps + 0.01, 1 - eps - 0.01, (n, *LINEAR_SHAPE)).astype(np.float32)
  variables = init_variables(model, x[:1].shape, seed)
  logits = np.asarray(model.apply(variables, x, train=False))
  y = logits.argmax(-1).astype(np.int32)
  y[: n // 6] = (y[: n // 6] + 1) % 10  # some examples misclassified clean
  return model, variables, x, y


def exact_linf_robust(variables, x, y, eps):
  """Robust iff min_{||d||_inf <= eps} z_y - z_j = (z_y - z_j)(x) - eps ||w_y - w_j||_1 > 0 for all j != y."""
  w = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
  logits = x.reshape(len(x), -1) @ w + b
  worst = logits[np.arange(len(y)), y][:, None] - logits - eps * np.abs(w[:, y].T[:, :, None] - w[None]).sum(1)
  worst[np.arange(len(y)), y] = np.inf
  return worst.min(1) > 0


def linear_batches(x, y, batch_size, pad_to=None):
  for start in range(0, len(y), batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    batch = {"image": xb, "label": yb}
    if pad_to is not None and len(yb) < pad_to:
      extra = pad_to - len(yb)
      batch = {
        "image": np.concatenate([xb, np.full((extra, *LINEAR_SHAPE), 0.5, np.float32)]),
        "label": np.concatenate([yb, np.zeros(extra, np.int32)]),
        "mask": np.concatenate([np.ones(len(yb)), np.zeros(extra)]),
      }
    yield batch
