"""PyTorch-compatible building blocks for the model zoo: Conv2d, Linear, BatchNorm, pooling, initialisers.

The layers compute on NHWC activations with HWIO / (in, out) kernels, but reproduce PyTorch's numerics and
initialisation so that HYDRA's reference checkpoints load one-to-one (see `hydra_jax.convert`):

- `Conv2d` / `Linear` take symmetric integer padding like `torch.nn.Conv2d` and, by default, draw weight *and* bias
  from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's `kaiming_uniform_(a=sqrt(5))` default; flax has no
  fan-in-aware bias initialiser, hence these two small layers).
- `Conv2d(weight_grad="taps" | "auto")` computes its kernel gradient as one matmul per kernel offset (`conv2d`);
  values and gradients equal XLA's own to float rounding. The default, 'auto', does so on CPU for the convs
  where it was faster alone (`taps_are_faster`) where the backend's knobs allow it (AVX-512 CPUs,
  `backend_knobs`), and keeps XLA's own elsewhere and on GPU / TPU.
- On CPU (`backend_knobs`) the input gradient of `Conv2d` / `conv2d` (groups 1) is an explicit NHWC x HWIO
  convolution (`input_grad`), the layout XLA:CPU's fast kernels need: inside loop bodies (rolled attack loops,
  `lax.map`) XLA does not rewrite the swapped-label form of autodiff's own, which then ran 3-4x slower.
- `Conv2d` / `conv2d` run the batch in chunks of `batch_chunk` images, by default 32 on CPU
  (`backend_knobs.current().conv_batch_chunk`),
  where XLA's convolutions are faster on chunks, and the whole batch on GPU / TPU. The chunks are one `lax.map`
  (the conv appears once in the program; `chunked_conv`), the backward pass one scan whose carry sums the
  kernel gradient; per image the result is the same.
- `BatchNorm` has PyTorch semantics: batch statistics with the biased variance for normalising, running variance
  updated with the unbiased one, `momentum=0.9` in the flax convention (= torch momentum 0.1), `epsilon=1e-5`.

The speed-only choices per backend and ISA (batch chunks, per-tap gradients) are one table shared with the
attacks, `hydra_jax.backend_knobs`: the one module of the project this one imports (that module imports none).

Parameters are always float32; `dtype` is the compute dtype (e.g. `jnp.bfloat16` on TPU).

Example:

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool):
        x = Conv2d(8, kernel_size=3, padding=1, use_bias=False, name="conv1")(x)
        x = jax.nn.relu(BatchNorm(name="bn1")(x, train))
        return Linear(10, name="fc")(global_avg_pool(x))
"""

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hydra_jax import backend_knobs

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]
Dtype = Any


def _fan_in(shape: Sequence[int]) -> int:
  """Fan-in of an HWIO conv kernel or an (in, out) dense kernel (PyTorch's definition, per group)."""
  return math.prod(shape[:-1])


def torch_default_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
  """PyTorch's default conv/linear weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(_fan_in(shape))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv/linear bias init U(+-1/sqrt(fan_in)), fan_in being that of the weight."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def kaiming_normal_fan_out(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
  """N(0, 2 / (kh * kw * out_channels)) for an HWIO kernel.

  This is both `kaiming_normal_(mode="fan_out", nonlinearity="relu")` (VGG, ImageNet ResNet) and the
  `normal_(0, sqrt(2 / n))`, n = kh * kw * out_channels, of the WRN and basic.py CNNs.
  """
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return math.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, dtype)


WEIGHT_GRADS = ("auto", "xla", "taps")


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1) -> jax.Array:
  """XLA's convolution: (N, H, W, C_in) x (kh, kw, C_in / groups, C_out) -> (N, H', W', C_out)."""
  pad = ((padding, padding), (padding, padding))
  return lax.conv_general_dilated(
    x, kernel, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
  )


def taps_weight_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], stride: int, padding: int) -> jax.Array:
  """dL/dW of y = xla_conv(x, W) (groups 1) as one matmul per kernel offset ("tap").

  W[i, j] = X_ij^T G, where X_ij (N H' W', C_in) is the padded input at offset (i, j) with the stride and
  G (N H' W', C_out) the output gradient; accumulated in float32.

  Args:
    x: (N, H, W, C_in) input.
    g: (N, H', W', C_out) gradient of the loss with respect to the conv output.
    kernel_shape: (kh, kw, C_in, C_out).
    stride: square stride.
    padding: zero padding on every spatial side.

  Returns:
    (kh, kw, C_in, C_out) float32 kernel gradient.
  """
  kh, kw, cin, cout = kernel_shape
  n, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  g2 = g.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      end = (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, cin)
      x_tap = lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1)).reshape(-1, cin)
      taps.append(lax.dot_general(x_tap, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kernel_shape)


def hwio_weight_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], stride: int, padding: int) -> jax.Array:
  """dL/dW of y = xla_conv(x, W) (groups 1) as one NHWC x HWIO convolution: the input with batch and channels
  swapped (C_in, H, W, N) convolved with the output gradient as kernel (H', W', N, C_out), dilated by the stride.

  The values are XLA's kernel gradient (the same sums), written in the layout XLA:CPU's fast convolutions take
  so that it stays fast inside a loop body (see `input_grad`), where XLA's own form does not.

  Args:
    x: (N, H, W, C_in) input.
    g: (N, H', W', C_out) gradient of the loss with respect to the conv output.
    kernel_shape: (kh, kw, C_in, C_out).
    stride: square stride.
    padding: zero padding on every spatial side.

  Returns:
    (kh, kw, C_in, C_out) kernel gradient.
  """
  kh, kw = kernel_shape[:2]
  grad = lax.conv_general_dilated(
    x.transpose(3, 1, 2, 0),
    g.transpose(1, 2, 0, 3),
    (1, 1),
    ((padding, padding), (padding, padding)),
    rhs_dilation=(stride, stride),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return grad[:, :kh, :kw].transpose(1, 2, 0, 3)


def input_grad(g: jax.Array, kernel: jax.Array, x_shape: Sequence[int], stride: int, padding: int) -> jax.Array:
  """dL/dx of y = xla_conv(x, W) (groups 1): g, dilated by the stride, convolved with W flipped in space and with
  its in / out channels swapped, written as an NHWC x HWIO convolution.

  This is the convolution JAX's own transpose rule emits, but with the kernel transposed explicitly instead of by
  swapped dimension labels (HWOI). XLA:CPU's fast (Eigen) convolutions take the HWIO layout, and XLA rewrites
  other layouts into it at a program's top level but, as observed in the optimized HLO, not inside a loop body
  (`lax.fori_loop`, `lax.map`): there the swapped-label input gradient stayed as it was and a rolled attack loop
  took 3-4x its unrolled time (benchmarks/RESULTS.md, "Evaluation speed"). The values are equal.

  Args:
    g: (N, H', W', C_out) gradient of the loss with respect to the conv output.
    kernel: (kh, kw, C_in, C_out).
    x_shape: (N, H, W, C_in), the input's shape.
    stride: square stride.
    padding: zero padding on every spatial side.

  Returns:
    (N, H, W, C_in), the gradient with respect to the input.
  """
  pads = []
  for size, out_size, k in zip(x_shape[1:3], g.shape[1:3], kernel.shape[:2]):
    before = k - 1 - padding
    pads.append((before, size + k - 1 - ((out_size - 1) * stride + 1) - before))
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  return lax.conv_general_dilated(
    g, flipped, (1, 1), pads, lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def taps_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`xla_conv` (groups 1) whose kernel gradient is `taps_weight_grad` and input gradient `input_grad`."""
  return xla_conv(x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
  return xla_conv(x, kernel, stride, padding), (x, kernel)


def _taps_conv_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  dx = input_grad(g, kernel, x.shape, stride, padding)
  return dx, taps_weight_grad(x, g, kernel.shape, stride, padding).astype(kernel.dtype)


taps_conv.defvjp(_conv_fwd, _taps_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def hwio_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`xla_conv` (groups 1) whose input gradient is `input_grad`; the kernel gradient stays XLA's."""
  return xla_conv(x, kernel, stride, padding)


def _hwio_conv_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  _, kernel_vjp = jax.vjp(lambda kernel: xla_conv(x, kernel, stride, padding), kernel)
  return input_grad(g, kernel, x.shape, stride, padding), kernel_vjp(g)[0]


hwio_conv.defvjp(_conv_fwd, _hwio_conv_bwd)


def taps_are_faster(x_shape: Sequence[int], kernel_shape: Sequence[int], stride: int, groups: int) -> bool:
  """Whether `taps_weight_grad` beat XLA's kernel gradient on CPU for this conv alone (bench_conv_grad.py).

  Measured on every conv of the CIFAR ResNet-18 and WRN-28-4 / 28-10 at batch 128 on AVX-512 CPUs: 1x1 and
  strided convs 1.1-27x faster, 3x3 stride-1 convs 1.35-5.5x, except on 32x32 inputs with at most 64 output
  channels (ResNet-18's layer1: a tie or slower) and the 3-channel stems. Isolated convs only: see `conv2d`.
  Never where the backend's knobs rule per-tap gradients out (`backend_knobs.current().taps_weight_grad`: only
  where XLA's code may use AVX-512; with XLA capped at AVX2, `--xla_cpu_max_isa=AVX2`, XLA's own kernel gradients
  made the ResNet-18 prune step (batch 64) 1.45x faster, measured under load: benchmarks/bench_isa.py).
  """
  if groups != 1 or x_shape[-1] < 16 or not backend_knobs.current().taps_weight_grad:
    return False
  return not (stride == 1 and kernel_shape[0] > 1 and x_shape[1] >= 32 and kernel_shape[-1] <= 64)


def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  stride: int = 1,
  padding: int = 0,
  groups: int = 1,
  weight_grad: str = "auto",
  batch_chunk: int = 0,
) -> jax.Array:
  """2-D convolution, NHWC x HWIO -> NHWC, with a choice of how its kernel gradient is computed.

  The batch runs in chunks of `batch_chunk` images, one convolution each in a `lax.map` (`chunked_conv`): per
  image the same result and input gradient; the kernel gradient is the sum of the chunks', accumulated in a
  scan (equal to the whole batch's up to float rounding).

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in / groups, C_out) kernel.
    stride: square stride.
    padding: zero padding on every spatial side.
    groups: feature groups.
    weight_grad: 'xla' (XLA's own), 'taps' (`taps_conv`; groups 1 only) or 'auto': 'taps' on CPU where
      `taps_are_faster`, else 'xla' (GPU and TPU always use XLA's). 'auto' is the default: the ResNet-18
      TRADES-10 prune step at batch 128 took 26.9 s with it against 28.5 s with 'xla' on the idle 2-core CPU
      (batch chunks of 32; benchmarks/RESULTS.md).
    batch_chunk: images per convolution (> 0), or 0 for the backend's `backend_knobs.current().conv_batch_chunk`
      (32 on CPU, the whole batch elsewhere).

  Returns:
    (N, H', W', C_out) with H' = (H + 2 padding - kh) // stride + 1; equal for every `weight_grad`.
  """
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f"weight_grad={weight_grad!r}; valid: {', '.join(WEIGHT_GRADS)}")
  if batch_chunk < 0:
    raise ValueError(f"batch_chunk must be >= 0 (0: chosen per backend), got {batch_chunk}")
  if weight_grad == "auto":
    weight_grad = "taps" if taps_are_faster(x.shape, kernel.shape, stride, groups) else "xla"
  if weight_grad == "taps" and groups != 1:
    raise ValueError("weight_grad='taps' needs groups=1")
  knobs = backend_knobs.current()
  size = batch_chunk or knobs.conv_batch_chunk
  if size and x.shape[0] > size:
    return chunked_conv(x, kernel, stride, padding, groups, weight_grad, size)
  if weight_grad == "taps":
    return taps_conv(x, kernel, stride, padding)
  if groups == 1 and knobs.hwio_input_grad:
    return hwio_conv(x, kernel, stride, padding)
  return xla_conv(x, kernel, stride, padding, groups)


def map_batch_chunks(fn: Callable[[Any], jax.Array], x: Any, size: int) -> jax.Array:
  """`fn` (per example) on consecutive chunks of `size` examples of x, concatenated; size 0: the whole batch.

  The whole chunks run as one `lax.map`, so `fn` appears once in the program however many chunks there are
  (Python-unrolled chunks made the ResNet-18 prune step compile longer); a smaller last chunk is one more call.

  Args:
    fn: (n, ...) -> (n, ...), per example; takes a pytree of arrays like x.
    x: a pytree of (N, ...) arrays.
    size: examples per chunk, or 0.

  Returns:
    fn's output for all N examples, (N, ...).
  """
  n = jax.tree.leaves(x)[0].shape[0]
  if not size or n <= size:
    return fn(x)
  whole = n // size * size
  y = lax.map(fn, jax.tree.map(lambda a: a[:whole].reshape((whole // size, size) + a.shape[1:]), x))
  y = y.reshape((whole,) + y.shape[2:])
  return y if whole == n else jnp.concatenate([y, fn(jax.tree.map(lambda a: a[whole:], x))])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def chunked_conv(
  x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int, weight_grad: str, size: int
) -> jax.Array:
  """`xla_conv` on batch chunks of `size` images in one `lax.map` (`map_batch_chunks`), gradients in one scan.

  The backward pass is one `lax.scan` over the same chunks: per chunk the input gradient (`input_grad`) and
  the kernel gradient ('taps': `taps_weight_grad`, 'xla': `hwio_weight_grad`, both in the layout XLA:CPU's
  fast kernels take), the kernel gradient summed over the chunks in the scan's carry (in float32, chunk order).
  XLA's own kernel gradient inside a loop body ran 50x slower (3x3 64->64 conv at 32x32, batch 128 in chunks
  of 32: 14.0 s against 0.26 s as Python-unrolled chunks). Groups > 1: XLA's input gradient per chunk and its
  kernel gradient on the whole batch after the loop.
  """
  return map_batch_chunks(lambda images: xla_conv(images, kernel, stride, padding, groups), x, size)


def _chunked_conv_fwd(x, kernel, stride, padding, groups, weight_grad, size):
  return chunked_conv(x, kernel, stride, padding, groups, weight_grad, size), (x, kernel)


def _chunked_conv_bwd(stride, padding, groups, weight_grad, size, residuals, g):
  x, kernel = residuals
  if groups != 1:
    conv_vjp = lambda images, w: jax.vjp(lambda a, b: xla_conv(a, b, stride, padding, groups), images, w)[1]
    dx = map_batch_chunks(lambda xg: conv_vjp(xg[0], kernel)(xg[1])[0], (x, g), size)
    return dx, conv_vjp(x, kernel)(g)[1]
  kernel_grad = taps_weight_grad if weight_grad == "taps" else hwio_weight_grad

  def chunk_grads(images, grads):
    dw = kernel_grad(images, grads, kernel.shape, stride, padding).astype(jnp.float32)
    return input_grad(grads, kernel, images.shape, stride, padding), dw

  def body(dw, chunk):
    dx, dw_chunk = chunk_grads(*chunk)
    return dw + dw_chunk, dx

  n = x.shape[0]
  whole = n // size * size
  chunks = [a[:whole].reshape((whole // size, size) + a.shape[1:]) for a in (x, g)]
  dw, dx = lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), chunks)
  dx = dx.reshape((whole,) + dx.shape[2:])
  if whole < n:
    dx_rest, dw_rest = chunk_grads(x[whole:], g[whole:])
    dx, dw = jnp.concatenate([dx, dx_rest]), dw + dw_rest
  return dx, dw.astype(kernel.dtype)


chunked_conv.defvjp(_chunked_conv_fwd, _chunked_conv_bwd)


# ----------------------------------------------------------------------------------------------------------
# Channel plans: the widths of a network with pruned channels removed (hydra_jax.channels.compact_variables).

_CHANNEL_PLAN: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("channel_plan", default=None)


@contextlib.contextmanager
def channel_plan(plan: dict[str, int] | None):
  """Within it, `Conv2d` / `Linear` at module path P ('layer1_0/conv1') have `plan[P]` output channels.

  Used by `models.get_model(..., channel_plan=plan)` around `init` / `apply` (so at trace time); the plan of a
  network whose pruned channels are removed, with one entry per conv / dense layer.
  """
  token = _CHANNEL_PLAN.set(None if plan is None else dict(plan))
  try:
    yield
  finally:
    _CHANNEL_PLAN.reset(token)


def _module_path(module: nn.Module) -> str:
  return "/".join(str(part) for part in module.path)


def planned_features(module: nn.Module, features: int) -> int:
  """The output channels of conv / dense `module`: the current channel plan's, else `features`."""
  plan = _CHANNEL_PLAN.get()
  return features if plan is None else plan.get(_module_path(module), features)


def has_layer(parent: nn.Module, name: str, nominal: bool) -> bool:
  """Whether the conv / dense `name` under `parent` exists: in the current plan if any, else `nominal`.

  For structure decided from channel counts (a projection shortcut when in != out channels): a compact network
  keeps the full network's structure, whatever its kept counts.
  """
  plan = _CHANNEL_PLAN.get()
  return nominal if plan is None else "/".join([*map(str, parent.path), name]) in plan


class Conv2d(nn.Module):
  """2-D convolution with PyTorch's padding and initialisation, NHWC in and out.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    stride: square stride.
    padding: zero padding on every spatial side (PyTorch `padding=p`).
    groups: feature groups (`groups=in_channels` gives a depthwise conv).
    use_bias: whether to add a bias.
    kernel_init: initialiser of the (kh, kw, in/groups, out) kernel.
    bias_init: initialiser of the bias; None means PyTorch's U(+-1/sqrt(fan_in)).
    dtype: compute dtype; parameters stay float32.
    weight_grad: how the kernel gradient is computed: 'auto' (default), 'xla' or 'taps' (see `conv2d`).
    batch_chunk: images per convolution call, 0 for the backend's default (see `conv2d`).
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  use_bias: bool = True
  kernel_init: Initializer = torch_default_init
  bias_init: Initializer | None = None
  dtype: Dtype = jnp.float32
  weight_grad: str = "auto"
  batch_chunk: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps (N, H, W, C_in) to (N, H', W', features), H' = (H + 2p - k) // s + 1."""
    in_features, features = x.shape[-1], planned_features(self, self.features)
    groups = features if 1 < self.groups == self.features else self.groups  # depthwise stays depthwise
    if in_features % groups:
      raise ValueError(f"{in_features} input channels are not divisible by groups={groups}")
    shape = (self.kernel_size, self.kernel_size, in_features // groups, features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    y = conv2d(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      self.stride,
      self.padding,
      groups,
      self.weight_grad,
      self.batch_chunk,
    )
    if self.use_bias:
      bias_init = self.bias_init or torch_default_bias_init(_fan_in(shape))
      y = y + self.param("bias", bias_init, (features,), jnp.float32).astype(self.dtype)
    return y


class Linear(nn.Module):
  """Fully connected layer with PyTorch's initialisation; kernel shape (in, out).

  Attributes:
    features: output features.
    kernel_init: initialiser of the (in, out) kernel.
    bias_init: initialiser of the bias; None means PyTorch's U(+-1/sqrt(in)).
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  kernel_init: Initializer = torch_default_init
  bias_init: Initializer | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps (N, in) to (N, features)."""
    shape = (x.shape[-1], planned_features(self, self.features))
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    bias = self.param("bias", self.bias_init or torch_default_bias_init(shape[0]), shape[1:], jnp.float32)
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class BatchNorm(nn.Module):
  """`torch.nn.BatchNorm2d` over the last axis, with optional cross-device statistics.

  Train mode normalises with the batch mean and biased variance (over all axes but the last, and over
  `axis_name` devices when given) and, outside `init`, updates the running statistics as
  `r <- momentum * r + (1 - momentum) * stat`, using the *unbiased* batch variance for `var` like PyTorch.
  Eval mode normalises with the running statistics. Statistics are computed in float32.

  Attributes:
    momentum: weight of the old running value (flax convention; 0.9 equals torch's momentum=0.1).
    epsilon: added to the variance (torch default 1e-5).
    axis_name: mapped axis (shard_map / pmap) over which batch statistics are averaged, or None.
    dtype: output dtype.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Normalises (..., C) activations per channel; returns the same shape in `dtype`."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    x = x.astype(jnp.float32)
    if train:
      mean, var = self._batch_stats(x)
      if not self.is_initializing():
        count = math.prod(x.shape[:-1])
        if self.axis_name is not None:
          count *= lax.axis_size(self.axis_name)
        unbiased_var = var * count / max(count - 1, 1)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased_var
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)

  def _batch_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance of x, averaged over `axis_name` (equal per-device batches)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    if self.axis_name is not None:
      mean = lax.pmean(mean, self.axis_name)
    var = jnp.square(x - mean).mean(axes)
    if self.axis_name is not None:
      var = lax.pmean(var, self.axis_name)
    return mean, var


def scale_width(channels: int, width: float) -> int:
  """`channels` times the width multiplier `width`, rounded to the nearest integer and at least 1."""
  return max(1, round(channels * width))


def max_pool(x: jax.Array, kernel_size: int, stride: int, padding: int = 0) -> jax.Array:
  """`torch.nn.MaxPool2d(kernel_size, stride, padding)` on NHWC (padding counts as -inf)."""
  pad = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (kernel_size, kernel_size), (stride, stride), pad)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: (N, H, W, C) -> (N, C)."""
  return x.mean(axis=(1, 2))


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """`torch.nn.AdaptiveAvgPool2d(output_size)` on NHWC.

  Bin i along an axis of length L covers [floor(i * L / n), ceil((i + 1) * L / n)), as in PyTorch; when L == n
  this is the identity.
  """
  if x.shape[1:3] == tuple(output_size):
    return x
  x = jnp.concatenate(_adaptive_bins(x, axis=1, n=output_size[0]), axis=1)
  return jnp.concatenate(_adaptive_bins(x, axis=2, n=output_size[1]), axis=2)


def _adaptive_bins(x: jax.Array, axis: int, n: int) -> list[jax.Array]:
  """The n PyTorch adaptive-pooling bin means of x along `axis`, each kept as a length-1 axis."""
  length = x.shape[axis]
  bins = []
  for i in range(n):
    start, stop = (i * length) // n, -((-(i + 1) * length) // n)
    bins.append(lax.slice_in_dim(x, start, stop, axis=axis).mean(axis=axis, keepdims=True))
  return bins


def flatten(x: jax.Array) -> jax.Array:
  """(N, ...) -> (N, prod(...)) in NHWC order (PyTorch flattens NCHW; `hydra_jax.convert` permutes for that)."""
  return x.reshape(x.shape[0], -1)
