"""A short verified-training run on scikit-learn's digits (offline): verified accuracy of a CNN-small.

Run: python benchmarks/verified_digits.py [--objective crown_ibp] [--eps 0.05] [--epochs 60] [--schedule-length 30]

Trains cnn_small (8x8x1 inputs, no BatchNorm) from its init with the `crown_ibp` or `ibp` objective (Adam lr
1e-3, batch 64, no augmentation, eps ramped from 0 over --schedule-length epochs), then prints clean accuracy
and the verified accuracy (`bounds.verified_correct`) of IBP, CROWN-IBP and symbolic intervals at eps / 2
and eps on the 360 test images. The train pipeline (`hydra-jax train`) is the place for real runs; this
script only shows that the objectives and bounds work end to end.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hydra_jax import bounds
from hydra_jax import data
from hydra_jax import models
from hydra_jax import objectives


def train(objective: str, eps: float, epochs: int, schedule_length: int, batch_size: int = 64, seed: int = 0):
  """Returns (eval-mode logits function of the trained cnn_small, train seconds)."""
  source = data.load_source("digits", "train")
  model = models.get_model("cnn_small", 10)
  apply_fn = models.make_apply_fn(model)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  config = objectives.default_config(objective)
  config.update(eps=eps, schedule_length=schedule_length)
  loss_fn = objectives.get_objective(objective).loss_fn
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, batch, epoch):
    grad_fn = jax.grad(lambda p: loss_fn(apply_fn, {"params": p}, batch, None, config, epoch=epoch)[0])
    updates, opt_state = tx.update(grad_fn(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state, rng, steps = tx.init(params), np.random.default_rng(seed), len(source) // batch_size
  start = time.perf_counter()
  for epoch in range(epochs):
    order = rng.permutation(len(source))
    for i in range(steps):
      index = order[i * batch_size : (i + 1) * batch_size]
      batch = {"image": jnp.asarray(source.images[index]), "label": jnp.asarray(source.labels[index])}
      params, opt_state = step(params, opt_state, batch, jnp.float32(epoch + i / steps))
  jax.block_until_ready(params)
  return (lambda x: apply_fn({"params": params}, x, False)[0]), time.perf_counter() - start


def verified_table(f, eps: float) -> list[tuple[str, float, float]]:
  """[(method, eps, accuracy %)] on the digits test split; method 'clean' has eps 0."""
  test = data.load_source("digits", "test")
  x, y = jnp.asarray(test.images), jnp.asarray(test.labels)
  rows = [("clean", 0.0, 100 * float(jnp.mean(jnp.argmax(f(x), -1) == y)))]
  for radius in (eps / 2, eps):
    for method in bounds.METHODS:
      check = jax.jit(lambda a, b, m=method, r=radius: bounds.verified_correct(f, a, b, eps=r, method=m))
      correct = np.concatenate([check(x[i : i + 60], y[i : i + 60]) for i in range(0, len(y), 60)])
      rows.append((method, radius, 100 * float(correct.mean())))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--objective", default="crown_ibp", choices=("crown_ibp", "ibp"))
  parser.add_argument("--eps", type=float, default=0.05)
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--schedule-length", type=int, default=30)
  args = parser.parse_args(argv)
  f, seconds = train(args.objective, args.eps, args.epochs, args.schedule_length)
  print(
    f"cnn_small on digits, objective {args.objective}, eps {args.eps}, {args.epochs} epochs "
    f"(ramp {args.schedule_length}), trained in {seconds:.0f} s"
  )
  print(f"{'verifier':<10} {'eps':>6} {'acc %':>7}")
  for method, radius, accuracy in verified_table(f, args.eps):
    print(f"{method:<10} {radius:>6.3f} {accuracy:>7.2f}")


if __name__ == "__main__":
  main()
