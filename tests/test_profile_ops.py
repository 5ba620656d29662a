"""benchmarks/profile_ops.py: HLO text parsing, FLOPs from HLO shapes, op kinds, the time of overlapping and nested
trace events, on a hand-written module and trace and on a real trace of a small jitted conv + matmul loop."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_ops as po

HLO = """HloModule jit_toy, is_scheduled=true, entry_computation_layout={(f32[2,8,8,3]{3,2,1,0})->f32[]}

%fused_dot (param_0: f32[5,6], param_1: f32[6,7]) -> f32[5,7] {
  %param_0 = f32[5,6]{1,0} parameter(0)
  %param_1 = f32[6,7]{1,0} parameter(1)
  ROOT %dot.3 = f32[5,7]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_transpose (param_0.2: f32[5,7]) -> f32[7,5] {
  %param_0.2 = f32[5,7]{1,0} parameter(0)
  ROOT %transpose.1 = f32[7,5]{1,0} transpose(%param_0.2), dimensions={1,0}
}

%add_comp (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}

%fused_scale (param_0.4: f32[3,3,3,4]) -> f32[4,3,3,3] {
  %param_0.4 = f32[3,3,3,4]{3,2,1,0} parameter(0)
  %transpose.2 = f32[4,3,3,3]{3,2,1,0} transpose(%param_0.4), dimensions={3,0,1,2}
  ROOT %tanh.2 = f32[4,3,3,3]{3,2,1,0} tanh(%transpose.2)
}

%fused_sum (param_0.3: f32[7,5]) -> f32[] {
  %param_0.3 = f32[7,5]{1,0} parameter(0)
  %c = f32[] constant(0)
  %tanh.1 = f32[7,5]{1,0} tanh(%param_0.3)
  ROOT %reduce.1 = f32[] reduce(%tanh.1, %c), dimensions={0,1}, to_apply=%add_comp
}

%body (arg: (s32[], f32[5,6], f32[6,7])) -> (s32[], f32[5,6], f32[6,7]) {
  %arg = (s32[], f32[5,6]{1,0}, f32[6,7]{1,0}) parameter(0)
  %g1 = f32[5,6]{1,0} get-tuple-element(%arg), index=1
  %g2 = f32[6,7]{1,0} get-tuple-element(%arg), index=2
  %ynn_fusion = f32[5,7] fusion(%g1, %g2), calls=%fused_dot, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %transpose_fusion = f32[7,5]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_transpose
  ROOT %tuple.1 = (s32[], f32[5,6]{1,0}, f32[6,7]{1,0}) tuple(%g0, %g1, %g2)
}

ENTRY %main (x: f32[2,8,8,3], w: f32[3,3,3,4]) -> f32[] {
  %x = f32[2,8,8,3]{3,2,1,0} parameter(0)
  %w = f32[3,3,3,4]{3,2,1,0} parameter(1)
  %conv.1 = f32[2,8,8,4]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %copy.1 = f32[3,3,3,4]{3,2,1,0} copy(%w)
  %while.1 = (s32[], f32[5,6]{1,0}, f32[6,7]{1,0}) while(%tuple), condition=%cond, body=%body
  %scale_fusion = f32[4,3,3,3]{3,2,1,0} fusion(%copy.1), kind=kLoop, calls=%fused_scale
  ROOT %sum_fusion = f32[] fusion(%transpose_fusion), kind=kInput, calls=%fused_sum
}
"""
CONV_FLOPS = 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)  # 2 x output elements x (taps x input channels)
DOT_FLOPS = 2 * (5 * 7) * 6


def test_parse_instruction_reads_tuple_shapes_operands_and_called_computation():
  line = "  %ynn_fusion = f32[5,7]{1,0} fusion(%g1, %g2), kind=kCustom, calls=%fused_dot"
  assert po.parse_instruction(line) == po.Instruction(
    "ynn_fusion", "fusion", "f32[5,7]{1,0}", ("g1", "g2"), ", kind=kCustom, calls=%fused_dot", "fused_dot"
  )
  loop = po.parse_instruction("  %while.1 = (s32[], f32[5,6]{1,0}) while(%tuple), condition=%cond, body=%body")
  assert (loop.opcode, loop.shape, loop.operands) == ("while", "(s32[], f32[5,6]{1,0})", ("tuple",))
  assert po.parse_instruction("%body (arg: f32[]) -> f32[] {") is None
  with pytest.raises(ValueError, match="HloModule"):
    po.parse_module("ENTRY %main () -> f32[] {\n}")


def test_flops_and_kinds_from_hlo_shapes():
  module = po.parse_module(HLO)
  assert module.name == "jit_toy"
  flops = {name: po.op_flops(module.instructions[name], module) for name in ("conv.1", "ynn_fusion", "copy.1")}
  assert flops == {"conv.1": CONV_FLOPS, "ynn_fusion": DOT_FLOPS, "copy.1": 0}
  kinds = {name: po.op_kind(module.instructions[name], module) for name in module.computations["main"]}
  assert kinds == {
    "x": "copy/transpose",
    "w": "copy/transpose",
    "conv.1": "convolution",
    "copy.1": "copy/transpose",
    "while.1": "while/conditional",
    "scale_fusion": "fusion: elementwise + transpose",
    "sum_fusion": "fusion: reduce",
  }
  assert po.op_kind(module.instructions["ynn_fusion"], module) == "dot (YNNPACK)"
  assert po.op_kind(module.instructions["transpose_fusion"], module) == "copy/transpose"


def test_time_is_split_among_the_ops_in_flight_and_a_loop_gets_only_the_time_its_body_leaves():
  events = [
    po.Event("conv.1", 0, 100),
    po.Event("copy.1", 50, 150),  # in flight with the conv for 50 ns: 25 ns each; then idle 150-200
    po.Event("while.1", 200, 1000),  # its body: the dot twice and the transpose, 200 + 50 + 200 ns of 800
    po.Event("ynn_fusion", 250, 450),
    po.Event("transpose_fusion", 450, 500),
    po.Event("ynn_fusion", 500, 700),
    po.Event("sum_fusion", 1000, 1060),
  ]
  times, idle = po.attributed_times(events, background={"while.1"})
  assert times == {
    "conv.1": (75e-9, 1),
    "copy.1": (75e-9, 1),
    "while.1": (350e-9, 1),
    "ynn_fusion": (400e-9, 2),
    "transpose_fusion": (50e-9, 1),
    "sum_fusion": (60e-9, 1),
  }
  assert idle == pytest.approx(50e-9)
  rows = po.op_rows(times, po.parse_module(HLO))
  assert [row.name for row in rows[:2]] == ["ynn_fusion", "while.1"]
  kinds = {row.kind: row for row in po.kind_rows(rows)}
  assert kinds["dot (YNNPACK)"].flops == 2 * DOT_FLOPS
  assert (kinds["copy/transpose"].seconds, kinds["copy/transpose"].executions) == (pytest.approx(125e-9), 2)
  table = po.kind_table(rows, idle, matmul_gflops=100.0, wall_s=2e-6)
  assert "| convolution | 0.000 | 0.071 | 1 | 0.0 | 368.6 | 3.69 |" in table  # 27648 FLOP / 75 ns; 75 / 1060 ns
  assert "| no op in flight | 0.000 | 0.047 |" in table
  with pytest.raises(ValueError, match="not in module jit_toy"):
    po.op_rows({"nowhere.7": (1.0, 1)}, po.parse_module(HLO))


def test_a_real_trace_maps_every_event_to_an_op_and_counts_the_loop_s_matmuls():
  x, w, m = jnp.ones((4, 8, 8, 8)), jnp.ones((3, 3, 8, 16)), jnp.ones((32, 32))

  def program(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ m), m)
    return jnp.tanh(y).sum() + z.sum()

  compiled = jax.jit(program).lower(x, w, m).compile()
  module = po.parse_module(compiled.as_text())
  compiled(x, w, m).block_until_ready()
  events, wall = po.trace_events(lambda: compiled(x, w, m).block_until_ready(), module.name)
  times, idle = po.attributed_times(events, po.loop_names(module))
  kinds = po.kind_rows(po.op_rows(times, module))
  flops = lambda kind: sum(row.flops for row in kinds if row.kind.startswith(kind))
  assert flops("convolution") == 2 * (4 * 8 * 8 * 16) * (3 * 3 * 8)
  assert flops("dot") == 3 * 2 * 32**3
  span = max(e.end_ns for e in events) - min(e.start_ns for e in events)
  assert sum(row.seconds for row in kinds) + idle == pytest.approx(span * 1e-9, rel=1e-9)
  assert span * 1e-9 <= wall
