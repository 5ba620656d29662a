"""benchmarks/machine.py: the header (CPU model, `backend_knobs`' ISA facts), FLOP counts, the roofline fraction."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import machine
from hydra_jax import backend_knobs
from hydra_jax.models import layers

CPUINFO = """processor\t: 0
model name\t: Some CPU 9000
processor\t: 1
"""


def test_the_header_reads_the_cpu_flags_and_xla_cap_the_library_s_knobs_read(monkeypatch):
  monkeypatch.setattr(backend_knobs, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX")
  info = machine.describe()
  assert (info["cpu_isa"], info["xla_isa"]) == ("AVX2", "AVX")
  assert machine.cpu_model(CPUINFO) == "Some CPU 9000"


def test_flops_of_a_matmul_are_2mnk():
  m, n, k = 8, 5, 12
  assert machine.jit_flops(jnp.dot, jnp.ones((m, k)), jnp.ones((k, n))) == 2 * m * n * k


def test_roofline_fraction_is_achieved_rate_over_matmul_rate():
  assert machine.roofline_fraction(4e9, 2.0, 4.0) == pytest.approx(0.5)
  assert machine.header(machine.describe(), 40.0).count("|") >= 4


def test_jaxpr_flops_count_loops_times_their_trip_count():
  a, b = jnp.ones((6, 4)), jnp.ones((4, 3))
  assert machine.jaxpr_flops(jnp.dot, a, b) == 2 * 6 * 4 * 3
  ten_times = lambda a, b: jax.lax.fori_loop(0, 10, lambda i, c: c + a @ b, jnp.zeros((6, 3)))
  assert machine.jaxpr_flops(ten_times, a, b) == 10 * 2 * 6 * 4 * 3
  assert machine.jaxpr_flops(jax.jit(ten_times), a, b) == 10 * 2 * 6 * 4 * 3


def test_jaxpr_flops_count_only_what_the_outputs_need():
  # The gradient of sum(a @ w) in a: the traced jaxpr also holds the forward product, which the gradient (ones @ w.T,
  # 6x3 by 3x4) does not need and XLA drops.
  a, w = jnp.ones((6, 4)), jnp.ones((4, 3))
  input_grad = jax.grad(lambda a, w: jnp.sum(a @ w), argnums=0)
  assert machine.jaxpr_flops(input_grad, a, w) == 2 * 6 * 3 * 4
  assert machine.jaxpr_flops(lambda a, w: (a @ w, a.sum())[1], a, w) == 0  # a product nothing returns


def test_jaxpr_flops_of_convolutions_match_xla_and_do_not_depend_on_batch_chunks():
  x, w = jnp.ones((8, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
  valid = lambda x, w: layers.xla_conv(x, w, 1, 0)  # no padding: XLA's count (taps on real pixels) is the same
  assert machine.jaxpr_flops(valid, x, w) == 2 * 8 * 4 * 4 * 5 * 3 * 3 * 3 == machine.jit_flops(valid, x, w)
  conv = lambda x, w: layers.xla_conv(x, w, 1, 1)
  expected = 2 * 8 * 6 * 6 * 5 * 3 * 3 * 3  # every tap, padding included
  assert machine.jaxpr_flops(conv, x, w) == expected
  chunked = lambda x, w: layers.conv2d(x, w, 1, 1, batch_chunk=2)
  assert machine.jaxpr_flops(chunked, x, w) == expected
  assert machine.jit_flops(chunked, x, w) < expected  # XLA counts the 4-chunk loop's body once
  grouped = lambda x, w: layers.xla_conv(x, w, 1, 1, groups=3)
  assert machine.jaxpr_flops(grouped, jnp.ones((8, 6, 6, 6)), jnp.ones((3, 3, 2, 6))) == 2 * 8 * 6 * 6 * 6 * 9 * 2
