"""hydra_jax.backend_knobs: the ISA facts, the table's rows, and that the layers and the attacks read the table."""

import jax
import jax.numpy as jnp

from hydra_jax import attacks
from hydra_jax import backend_knobs
from hydra_jax.backend_knobs import Knobs
from hydra_jax.models import layers

CPUINFO = """processor\t: 0
model name\t: Some CPU 9000
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw
processor\t: 1
flags\t\t: fpu
"""


def test_isa_is_the_widest_vector_extension_among_the_first_processor_s_flags():
  assert backend_knobs.isa_of_flags(backend_knobs.cpu_flags(CPUINFO)) == "AVX-512"
  assert backend_knobs.isa_of_flags({"sse4_2", "avx", "avx2", "fma"}) == "AVX2"
  assert backend_knobs.isa_of_flags({"avx2", "avx512f", "amx_tile"}) == "AMX"
  assert backend_knobs.isa_of_flags({"sse4_2"}) == "SSE4.2"
  assert backend_knobs.cpu_flags("model name\t: no flags line") == frozenset()


def test_xla_max_isa_caps_xla_code_but_never_raises_it_and_the_last_flag_counts():
  devices = "--xla_force_host_platform_device_count=8"
  assert backend_knobs.xla_isa("AVX-512", f"{devices} --xla_cpu_max_isa=AVX2") == "AVX2"
  assert backend_knobs.xla_isa("AVX-512", f"--xla_cpu_max_isa=avx512_vnni {devices}") == "AVX-512"
  assert backend_knobs.xla_isa("AVX-512", "--xla_cpu_max_isa=AMX") == "AVX-512"
  assert backend_knobs.xla_isa("AVX2", "--xla_cpu_max_isa=AVX512") == "AVX2"
  assert backend_knobs.xla_isa("AVX-512", "--xla_cpu_max_isa=AVX512 --xla_cpu_max_isa=SSE4_2") == "SSE4.2"
  assert backend_knobs.xla_isa("AVX-512", devices) == "AVX-512"
  assert backend_knobs.xla_isa("AVX-512", "--xla_cpu_max_isa=AVX3") == "AVX-512"  # unknown to XLA: no cap


def test_rows_per_backend_and_isa(monkeypatch):
  """Per-tap kernel gradients only where XLA's code may use AVX-512; CPU batch chunks on every ISA; accelerators
  get whole batches and XLA's own gradients."""
  for isa, taps in [("AMX", True), ("AVX-512", True), ("AVX2", False), ("SSE4.2", False)]:
    monkeypatch.setattr(backend_knobs, "xla_isa", lambda isa=isa: isa)
    knobs = backend_knobs.current("cpu")
    assert knobs.taps_weight_grad == taps, isa
    assert knobs.conv_batch_chunk == knobs.attack_chunk == 32 and knobs.hwio_input_grad
  assert backend_knobs.row("gpu") == ("gpu", None)
  assert backend_knobs.current("gpu") == backend_knobs.current("tpu") == Knobs(0, 0, False, False)


def _primitives(jaxpr) -> list:
  """Every equation of a jaxpr and of its sub-jaxprs (loop bodies, custom rules), depth first."""
  eqns = []
  for eqn in jaxpr.eqns:
    eqns.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          eqns += _primitives(inner)
  return eqns


def test_changing_the_table_changes_what_the_layers_and_the_attacks_do(monkeypatch):
  """One row edited: the convolution's batch chunk, the attacks' chunk, the per-tap kernel gradient and the
  explicit input gradient all follow it."""
  x, w = jnp.ones((7, 8, 8, 16)), jnp.ones((3, 3, 16, 4))

  def knobs_seen(knobs: Knobs) -> dict:
    monkeypatch.setitem(backend_knobs.KNOBS, backend_knobs.row(), knobs)
    # A new function each time (make_jaxpr caches traces per function); a shape where taps_are_faster allows taps.
    conv = lambda x, w: layers.conv2d(x, w, 2, 1)
    forward = _primitives(jax.make_jaxpr(conv)(x, w).jaxpr)
    backward = _primitives(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv(x, w))))(w).jaxpr)
    chunks = []
    attacks.in_chunks(lambda z: chunks.append(z.shape[0]) or z, 0)(x)
    return {
      "conv_batch_chunk": [e.params["length"] for e in forward if e.primitive.name == "scan"],
      "attack_chunks": chunks,
      "taps": sum(e.primitive.name == "dot_general" for e in backward),
      "custom_vjp": sum(e.primitive.name.startswith("custom_vjp") for e in forward),
    }

  whole = knobs_seen(Knobs())
  assert whole == {"conv_batch_chunk": [], "attack_chunks": [7], "taps": 0, "custom_vjp": 0}
  assert knobs_seen(Knobs(conv_batch_chunk=3, attack_chunk=5)) == {
    "conv_batch_chunk": [2],  # two chunks of 3 in one lax.map, the 7th image alone
    "attack_chunks": [5, 2],
    "taps": 0,
    "custom_vjp": 1,  # chunked_conv
  }
  assert knobs_seen(Knobs(taps_weight_grad=True))["taps"] == 9  # one matmul per tap of the 3x3 kernel
  assert knobs_seen(Knobs(hwio_input_grad=True))["custom_vjp"] == 1  # hwio_conv
