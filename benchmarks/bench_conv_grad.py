"""Kernel-gradient convolutions on every conv shape of the zoo's CIFAR ResNet-18 / WRN-28-x: XLA's vs matmuls.

Run from the repository root:

  python -m benchmarks.bench_conv_grad                               # batch 128, resnet18 + wrn_28_4 + wrn_28_10
  python -m benchmarks.bench_conv_grad --models resnet18 --batch 32 --repeats 5

For each distinct conv shape (input side, C_in -> C_out, kernel, stride) of the models it times, alternating
the candidates `--repeats` times after a warm-up (median seconds, each jitted alone):
  fwd      the forward convolution (XLA), for scale;
  xla      XLA's own kernel gradient (`jax.vjp` of `lax.conv_general_dilated` in the kernel);
  taps     `layers.taps_weight_grad`: one (N H' W', C_in)^T x (N H' W', C_out) matmul per kernel offset;
  im2col   the kernel offsets concatenated along channels, then one (N H' W', kh kw C_in)^T x G matmul;
and checks that taps and im2col equal XLA's gradient (relative max error printed). `auto` says what
`layers.conv2d(weight_grad='auto')` picks on CPU for the shape (`layers.taps_are_faster`); `taps roof` is the
taps gradient's rate (2 N H' W' kh kw C_in C_out FLOPs) over the float32 matmul rate measured in the same run
(`benchmarks/machine.py`, printed first with the CPU model and ISA).
"""

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import machine
from hydra_jax import models
from hydra_jax.models import layers


def conv_shapes(model_names: list[str], batch: int) -> dict[tuple, int]:
  """{(side, C_in, C_out, kernel, stride, padding): number of such convs} over the models' layers.Conv2d calls."""
  shapes = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, layers.Conv2d) and context.method_name == "__call__":
      x = args[0]
      key = (x.shape[1], x.shape[3], module.features, module.kernel_size, module.stride, module.padding)
      shapes[key] = shapes.get(key, 0) + 1
    return next_fun(*args, **kwargs)

  for name in model_names:
    model = models.get_model(name, 10)
    with nn.intercept_methods(record):
      jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((batch, 32, 32, 3)))
  return shapes


def xla_weight_grad(x, g, kernel, stride, padding):
  """XLA's kernel gradient: the VJP of its convolution in the kernel."""
  _, vjp = jax.vjp(lambda w: layers.xla_conv(x, w, stride, padding), kernel)
  return vjp(g)[0]


def im2col_weight_grad(x, g, kernel_shape, stride, padding):
  """All kernel offsets of the padded input side by side (N H' W', kh kw C_in), then one matmul with G."""
  kh, kw, cin, cout = kernel_shape
  n, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  cols = jnp.concatenate(
    [
      lax.slice(
        xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin), (1, stride, stride, 1)
      )
      for i in range(kh)
      for j in range(kw)
    ],
    axis=-1,
  )
  return lax.dot_general(cols.reshape(-1, kh * kw * cin), g.reshape(-1, cout), (((0,), (0,)), ((), ()))).reshape(
    kernel_shape
  )


def candidates(stride: int, padding: int) -> dict:
  """name -> jitted f(x, g, kernel) for each formulation (fwd returns the conv output)."""
  return {
    "fwd": jax.jit(lambda x, g, w: layers.xla_conv(x, w, stride, padding)),
    "xla": jax.jit(lambda x, g, w: xla_weight_grad(x, g, w, stride, padding)),
    "taps": jax.jit(lambda x, g, w: layers.taps_weight_grad(x, g, w.shape, stride, padding)),
    "im2col": jax.jit(lambda x, g, w: im2col_weight_grad(x, g, w.shape, stride, padding)),
  }


def measure(shape: tuple, batch: int, repeats: int) -> dict:
  """Median seconds of every candidate on one conv shape (interleaved), and taps / im2col relative errors."""
  side, cin, cout, k, stride, padding = shape
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, side, side, cin))
  w = jax.random.normal(keys[1], (k, k, cin, cout)) / (k * k * cin) ** 0.5
  out = (side + 2 * padding - k) // stride + 1
  g = jax.random.normal(keys[2], (batch, out, out, cout))
  fns = candidates(stride, padding)
  reference = fns["xla"](x, g, w)
  scale = float(jnp.max(jnp.abs(reference)))
  result = {
    f"{name}_err": float(jnp.max(jnp.abs(fns[name](x, g, w) - reference))) / scale for name in ("taps", "im2col")
  }
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(x, g, w).block_until_ready()
      times[name].append(time.perf_counter() - start)
  result.update({name: statistics.median(t) for name, t in times.items()})
  result["auto"] = "taps" if layers.taps_are_faster(x.shape, w.shape, stride, 1) else "xla"
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet18,wrn_28_4,wrn_28_10")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  shapes = conv_shapes(args.models.split(","), args.batch)
  matmul = machine.matmul_gflops()
  print(machine.header(machine.describe(), matmul))
  print(f"backend {jax.default_backend()}, batch {args.batch}, median of {args.repeats} interleaved calls (ms)")
  print(
    f"{'side':>4} {'C_in':>4} {'C_out':>5} {'k':>1} {'s':>1} {'count':>5} {'fwd':>8} {'xla':>8} {'taps':>8} "
    f"{'im2col':>8} {'xla/taps':>8} {'xla/im2col':>10} {'max rel err':>11} {'auto':>4} {'taps roof':>9}"
  )
  for shape, count in sorted(shapes.items(), key=lambda item: (-item[0][0], item[0][1:])):
    r = measure(shape, args.batch, args.repeats)
    side, cin, cout, k, stride, padding = shape
    out = (side + 2 * padding - k) // stride + 1
    flops = 2 * args.batch * out * out * k * k * cin * cout
    print(
      f"{side:>4} {cin:>4} {cout:>5} {k:>1} {stride:>1} {count:>5} {1e3 * r['fwd']:>8.1f} {1e3 * r['xla']:>8.1f} "
      f"{1e3 * r['taps']:>8.1f} {1e3 * r['im2col']:>8.1f} {r['xla'] / r['taps']:>7.2f}x "
      f"{r['xla'] / r['im2col']:>9.2f}x {max(r['taps_err'], r['im2col_err']):>11.1e} {r['auto']:>4} "
      f"{machine.roofline_fraction(flops, r['taps'], matmul):>9.2f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
