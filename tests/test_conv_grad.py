"""The per-tap matmul kernel gradient of `layers.conv2d` equals XLA's convolution in values and gradients."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from tolerances import assert_same_sums

from hydra_jax import backend_knobs
from hydra_jax.models import layers

# (batch, side, C_in, C_out, kernel, stride, padding): odd sides, strides that leave padding unused, 1x1.
SHAPES = [
  (2, 7, 3, 5, 3, 1, 1),
  (3, 9, 4, 6, 3, 2, 1),
  (2, 8, 5, 4, 1, 2, 0),
  (2, 6, 4, 3, 3, 1, 0),
  (1, 10, 2, 3, 4, 2, 1),
]


def reference_conv(x, w, stride, padding):
  """lax's convolution, written out independently of layers.xla_conv."""
  return lax.conv_general_dilated(
    x, w, (stride, stride), [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def direct_weight_grad(x, g, kernel, stride, padding):
  """dL/dW[i, j, c, d] = sum_{n, h, w} xpad[n, h s + i, w s + j, c] g[n, h, w, d], as float64 loops in numpy."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  _, ho, wo, _ = g.shape
  out = np.zeros((kernel, kernel, x.shape[-1], g.shape[-1]))
  for i in range(kernel):
    for j in range(kernel):
      tap = xp[:, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride, :]
      out[i, j] = np.einsum("nhwc,nhwd->cd", tap, g)
  return out


def _inputs(shape, seed=0):
  n, side, cin, cout, k, stride, padding = shape
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, side, side, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  out = (side + 2 * padding - k) // stride + 1
  return x, w, jax.random.normal(kg, (n, out, out, cout)), stride, padding


@pytest.mark.parametrize("shape", SHAPES)
def test_taps_weight_grad_equals_the_direct_sum(shape):
  x, w, g, stride, padding = _inputs(shape)
  got = layers.taps_weight_grad(x, g, w.shape, stride, padding)
  np.testing.assert_allclose(got, direct_weight_grad(x, g, w.shape[0], stride, padding), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_hwio_weight_grad_equals_the_direct_sum(shape):
  x, w, g, stride, padding = _inputs(shape)
  got = layers.hwio_weight_grad(x, g, w.shape, stride, padding)
  np.testing.assert_allclose(got, direct_weight_grad(x, g, w.shape[0], stride, padding), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_taps_conv_values_and_both_gradients_equal_xla(shape):
  x, w, g, stride, padding = _inputs(shape, seed=1)
  ours, our_vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride, padding, weight_grad="taps"), x, w)
  theirs, their_vjp = jax.vjp(lambda x, w: reference_conv(x, w, stride, padding), x, w)
  np.testing.assert_array_equal(ours, theirs)  # the forward is XLA's own
  (dx, dw), (ref_dx, ref_dw) = our_vjp(g), their_vjp(g)
  # The input gradient is the convolution of JAX's transpose rule with the kernel transposed explicitly: another
  # program, whose sums XLA may add in another order (tests/tolerances.py). Each entry sums kh kw C_out products.
  _, abs_vjp = jax.vjp(lambda x: reference_conv(x, jnp.abs(w), stride, padding), x)
  assert_same_sums(dx, ref_dx, abs_vjp(jnp.abs(g))[0], w.shape[0] * w.shape[1] * w.shape[3])
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(ref_dw))))


def test_conv2d_layer_gradients_agree_for_every_weight_grad_choice():
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 16))
  conv = lambda choice: layers.Conv2d(8, 3, stride=2, padding=1, weight_grad=choice)
  variables = conv("xla").init(jax.random.key(3), x)

  def grads(choice):
    loss = lambda v, x: jnp.sum(jnp.sin(conv(choice).apply(v, x)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

  reference = grads("xla")
  for choice in ("taps", "auto"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads(choice), reference)


@pytest.fixture
def avx512(monkeypatch):
  """'auto' as on an AVX-512 CPU (the backend knobs' AVX-512 row), whatever CPU runs the test."""
  monkeypatch.setattr(backend_knobs, "xla_isa", lambda: "AVX-512")


def test_auto_keeps_xla_s_kernel_gradient_where_xla_cannot_use_avx512(monkeypatch):
  monkeypatch.setattr(backend_knobs, "xla_isa", lambda: "AVX2")
  assert not layers.taps_are_faster((2, 16, 16, 32), (3, 3, 32, 64), 2, 1)  # taps on AVX-512 (next test)
  conv = layers.Conv2d(8, 3, stride=2, padding=1, weight_grad="auto", batch_chunk=0)
  x = jnp.zeros((4, 8, 8, 16))
  variables = jax.eval_shape(conv.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda v: jnp.sum(conv.apply(v, x))))(variables).jaxpr
  assert _primitive_counts(jaxpr)["dot_general"] == 0


@pytest.mark.parametrize("batch_chunk", [0, 2])
def test_conv2d_layer_gradient_holds_the_per_tap_matmuls_exactly_when_chosen(batch_chunk, avx512):
  """The kernel gradient of the `Conv2d` layer is kh * kw matmuls (one per tap) with weight_grad='taps', and with
  'auto' where `taps_are_faster` (16 input channels, stride 2); a convolution, no matmul, with 'xla' and with
  'auto' on a 3-channel stem. In one pass (batch_chunk 0) and in batch chunks."""
  expected_matmuls = {("taps", 16): 9, ("auto", 16): 9, ("xla", 16): 0, ("taps", 3): 9, ("auto", 3): 0, ("xla", 3): 0}
  for (choice, channels), matmuls in expected_matmuls.items():
    conv = layers.Conv2d(8, 3, stride=2, padding=1, weight_grad=choice, batch_chunk=batch_chunk)
    x = jnp.zeros((4, 8, 8, channels))
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(jax.grad(lambda v: jnp.sum(conv.apply(v, x))))(variables).jaxpr  # noqa: B023
    assert _primitive_counts(jaxpr)["dot_general"] == matmuls, (choice, channels)


def test_auto_uses_taps_on_cpu_only_where_measured_faster_and_is_the_default(monkeypatch, avx512):
  used = []
  monkeypatch.setattr(layers, "taps_conv", lambda *args: used.append(args[0].shape) or layers.xla_conv(*args))
  strided = jnp.zeros((2, 16, 16, 32))
  auto = functools.partial(layers.conv2d, weight_grad="auto")
  auto(strided, jnp.zeros((3, 3, 32, 64)), 2, 1)  # strided: taps
  auto(jnp.zeros((2, 32, 32, 3)), jnp.zeros((3, 3, 3, 64)), 1, 1)  # 3-channel stem: XLA
  auto(jnp.zeros((2, 32, 32, 64)), jnp.zeros((3, 3, 64, 64)), 1, 1)  # 32x32 stride 1, 64 out: XLA
  wide = jnp.zeros((2, 32, 32, 160))
  auto(wide, jnp.zeros((3, 3, 160, 160)), 1, 1)  # 32x32 stride 1, 160 out: taps
  layers.conv2d(strided, jnp.zeros((3, 3, 32, 64)), 2, 1, weight_grad="xla")
  layers.conv2d(strided, jnp.zeros((3, 3, 32, 64)), 2, 1)  # the default is 'auto'
  assert used == [strided.shape, wide.shape, strided.shape]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  auto(strided, jnp.zeros((3, 3, 32, 64)), 2, 1)
  assert len(used) == 3  # never on GPU / TPU


def test_invalid_weight_grad_choices_are_rejected():
  x, w = jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 2, 4))
  with pytest.raises(ValueError, match="valid: auto, xla, taps"):
    layers.conv2d(x, w, weight_grad="fast")
  with pytest.raises(ValueError, match="groups=1"):
    layers.conv2d(x, w, groups=2, weight_grad="taps")
  assert layers.conv2d(x, w, 1, 1, groups=2, weight_grad="auto").shape == (1, 4, 4, 4)  # grouped: XLA's


@pytest.mark.parametrize("weight_grad, groups", [("xla", 1), ("xla", 2), ("taps", 1)])
def test_batch_chunks_give_the_whole_batch_values_and_gradients(weight_grad, groups):
  """Batch 7 in chunks of 3 (3, 3, 1 images): the output and input gradient per image and the kernel gradient
  (a sum over chunks) equal the whole batch's, which lax's own convolution gives."""
  x, w, g, stride, padding = _inputs((7, 9, 4, 6, 3, 2, 1), seed=3)
  w = w[:, :, : 4 // groups]
  calls, xla_conv = [], layers.xla_conv

  def conv(x, *args):
    calls.append(x.shape[0])
    return xla_conv(x, *args)

  ours, our_vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride, padding, groups, weight_grad, 3), x, w)
  theirs, their_vjp = jax.vjp(
    lambda x, w: lax.conv_general_dilated(
      x,
      w,
      (stride, stride),
      [(padding, padding)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
    ),
    x,
    w,
  )
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)
  for got, want in zip(our_vjp(g), their_vjp(g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(layers, "xla_conv", conv)
    layers.conv2d(x, w, stride, padding, groups, "xla", 3)
    layers.conv2d(x, w, stride, padding, groups, "xla", 7)
  assert calls == [3, 1, 7]  # the whole chunks are traced once (one lax.map), then the smaller rest


def test_batch_chunk_is_32_on_cpu_and_the_whole_batch_elsewhere(monkeypatch):
  calls = []
  monkeypatch.setattr(layers, "xla_conv", lambda x, *args: calls.append(x.shape[0]) or x)
  x, w = jnp.zeros((70, 1, 1, 1)), jnp.zeros((1, 1, 1, 1))
  layers.conv2d(x, w)
  assert calls == [32, 6]  # two chunks of 32 in one lax.map, then 6
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  layers.conv2d(x, w)
  assert calls == [32, 6, 70]
  with pytest.raises(ValueError, match="batch_chunk must be >= 0"):
    layers.conv2d(x, w, batch_chunk=-1)


def _primitive_counts(jaxpr, names=("conv_general_dilated", "dot_general")) -> dict[str, int]:
  """How often each primitive of `names` appears in a jaxpr, sub-jaxprs (loop bodies, custom rules) included."""
  counts = dict.fromkeys(names, 0)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in counts:
      counts[eqn.primitive.name] += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          for name, count in _primitive_counts(inner, names).items():
            counts[name] += count
  return counts


@pytest.mark.parametrize("weight_grad", ["xla", "taps"])
def test_chunked_conv_holds_the_conv_once_with_the_whole_batch_values_and_gradients(weight_grad):
  """Batch 8 in 4 chunks of 2: the program of the conv and both its gradients holds as many convolutions and
  matmuls as in 2 chunks, and no more than the whole batch's (one chunk loop, not a copy per chunk), and gives
  the same output, input gradient and kernel gradient (the sum over the chunks)."""
  x, w, g, stride, padding = _inputs((8, 9, 16, 8, 3, 2, 1), seed=5)

  def loss(x, w, chunk):
    return jnp.vdot(layers.conv2d(x, w, stride, padding, 1, weight_grad, chunk), g)

  def value_and_grads(chunk):
    return jax.value_and_grad(loss, (0, 1))(x, w, chunk)

  def counts(chunk):
    return _primitive_counts(jax.make_jaxpr(value_and_grads, static_argnums=0)(chunk).jaxpr)

  in_four, in_two, whole = counts(2), counts(4), counts(8)
  assert in_four == in_two  # not one copy per chunk
  assert all(in_four[name] <= whole[name] for name in whole)
  assert in_four["conv_general_dilated"] >= 2  # the forward conv and the input gradient
  (ours, (our_dx, our_dw)), (theirs, (their_dx, their_dw)) = value_and_grads(2), value_and_grads(8)
  outputs = lambda chunk: layers.conv2d(x, w, stride, padding, 1, weight_grad, chunk)
  # XLA's kernel for a batch of 2 may add an output's 3 x 3 x 16 terms in another order than the batch of 8's (it
  # did on an AVX2 CPU): the same sums, within float32 summation error of each other.
  abs_conv, abs_vjp = jax.vjp(lambda x: reference_conv(x, jnp.abs(w), stride, padding), jnp.abs(x))
  assert_same_sums(outputs(2), outputs(8), abs_conv, 3 * 3 * 16)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  assert_same_sums(our_dx, their_dx, abs_vjp(jnp.abs(g))[0], 3 * 3 * 8)  # dx: C_out x the taps over it
  np.testing.assert_allclose(our_dw, their_dw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(their_dw))))


@pytest.mark.parametrize("shape", SHAPES)
def test_input_grad_equals_xla_input_gradient(shape):
  x, w, g, stride, padding = _inputs(shape, seed=4)
  _, their_vjp = jax.vjp(lambda x: reference_conv(x, w, stride, padding), x)
  np.testing.assert_allclose(layers.input_grad(g, w, x.shape, stride, padding), their_vjp(g)[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("weight_grad", ["xla", "taps"])
def test_input_gradient_in_a_loop_body_is_an_hwio_convolution(weight_grad):
  """XLA:CPU runs only NHWC x HWIO convolutions on its fast kernels and rewrites other layouts only at a program's
  top level: conv2d's input gradient inside a rolled loop must already be HWIO (dim_labels ..._01io->...)."""
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
  grad = jax.grad(lambda z: jnp.sum(jnp.square(layers.conv2d(z, w, 2, 1, weight_grad=weight_grad))))
  loop = jax.jit(lambda z: lax.fori_loop(0, 2, lambda i, z: z - 1e-3 * grad(z), z, unroll=False))
  labels = re.findall(r"dim_labels=([\w]+_[\w]+->[\w]+)", loop.lower(x).compile().as_text())
  assert len(labels) == 2 and all(label.split("_")[1].startswith("01io") for label in labels), labels


@pytest.mark.slow  # two compiles of a ResNet's gradient; each knob has its own default-run test above
def test_cpu_fast_paths_leave_a_models_loss_and_gradients_unchanged(monkeypatch):
  """Every CPU knob on (batch chunks of 2, per-tap kernel gradients) against every knob off
  (whole batch, XLA's kernel gradient): resnet_tiny's eval-mode loss and its gradients with
  respect to the weights and the input agree to float32 rounding."""
  from hydra_jax import models

  model = models.get_model("resnet_tiny", 10)
  x = jax.random.uniform(jax.random.key(0), (5, *models.input_shape("resnet_tiny")))
  y = jnp.arange(5) % 10
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params, x):
    logits = model.apply({**variables, "params": params}, x, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  def loss_and_grads(chunk, taps):
    jax.clear_caches()  # custom_vjp keeps the body it traced first
    knobs = dataclasses.replace(backend_knobs.current(), conv_batch_chunk=chunk)
    monkeypatch.setitem(backend_knobs.KNOBS, backend_knobs.row(), knobs)
    monkeypatch.setattr(layers, "taps_are_faster", lambda *args: taps)
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(variables["params"], x)

  (on_loss, on_grads), (off_loss, off_grads) = loss_and_grads(2, True), loss_and_grads(0, False)
  jax.clear_caches()
  np.testing.assert_allclose(on_loss, off_loss, rtol=1e-5)
  for on, off in zip(jax.tree.leaves(on_grads), jax.tree.leaves(off_grads)):
    np.testing.assert_allclose(on, off, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(off))))
