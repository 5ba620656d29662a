"""Channel structure of a model, traced from its jaxpr, and the physically smaller (compact) network.

Structured HYDRA prunes whole output channels. Which channels must go together is read from the model
itself: `trace_wiring` interprets the jaxpr of `model.apply` in eval mode and labels every channel (last axis)
of every activation. A conv / dense kernel creates new labels; a residual addition (and any other elementwise
op of two activations) merges the labels of its operands channel by channel; a depthwise conv merges each
output channel with its input channel; a concatenation on channels concatenates labels; a flatten repeats
them. A per-channel vector applied to an activation (conv bias, BatchNorm scale / shift / running statistics)
is recorded with the labels it touches. The merged labels are the units of `masking.ChannelGroup`s. Channels
that reach the output (the classifier's logits), that come from the input, or that an unknown primitive
touches are never pruned.

  wiring = channels.trace_wiring(model, variables, (1, 32, 32, 3))
  groups = wiring.groups                                     # masking.ChannelGroups: apply_masks(groups=...)
  plan, small = channels.compact(wiring, variables, masked)  # the kept slices of every leaf, its widths
  logits = models.get_model(name, classes, channel_plan=plan).apply(small, x, train=False)

A pruned unit outputs exactly zero in the masked network (its kernels, bias and BatchNorm scale / shift are
masked), so dropping it from every tensor it flows into gives the same logits (eval mode): `compact`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend  # jax.extend.core.Literal
import jax.numpy as jnp
import numpy as np

from hydra_jax import PyTree
from hydra_jax import errors
from hydra_jax import masking

Labels = tuple[int, ...]

# Primitives that map each channel to the same channel (elementwise, or acting on other axes only when
# `_keeps_last_axis` says so); the call-like primitives whose body is interpreted, by the param holding it.
_ELEMENTWISE = {
  "add", "sub", "mul", "div", "max", "min", "pow", "select_n", "neg", "exp", "log", "log1p", "rsqrt", "sqrt",
  "abs", "sign", "tanh", "logistic", "integer_pow", "convert_element_type", "copy", "copy_p", "stop_gradient",
  "square", "erf", "clamp", "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not", "exp2",
}  # fmt: skip
_AXIS_OPS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_sum", "pad", "slice"}
_CALLS = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
  "remat": "jaxpr",
  "checkpoint": "jaxpr",
}


class UnsupportedModelError(errors.UserError):
  """A model whose channel structure cannot be traced (e.g. a grouped, non-depthwise conv); the message names the
  operation (one line on the command line)."""


@dataclasses.dataclass(frozen=True)
class _Act:
  labels: Labels  # one label per channel of the last axis


@dataclasses.dataclass(frozen=True)
class _Leaf:
  names: tuple[str, ...]  # variables paths ('params/bn1/scale', ...) this value is computed from, elementwise
  kernel: bool  # a conv / dense kernel (possibly cast)
  size: int  # entries of the leaves

  @property
  def name(self) -> str:
    return self.names[0]


@dataclasses.dataclass(frozen=True)
class Wiring:
  """A model's channels: which labels each variable leaf's axes carry, and the groups they form.

  Attributes:
    axes: {variables path: ((axis, labels of that axis's entries), ...)}: kernels carry their output axis
      (and input axis, except depthwise kernels), per-channel vectors their only axis.
    root: {label: its unit} (the merged classes).
    pinned: units that are never pruned (reach the output or come from the input or an unknown primitive).
    groups: `masking.ChannelGroups` of the prunable units, over 'params' paths (without the 'params/' prefix).
    positions: {kernel path: output positions per example} of every traced conv / dense kernel (H_out * W_out
      of a conv, 1 of a dense layer on a vector): what HARP's FLOP count multiplies by (`harp.FlopModel`).
  """

  axes: dict[str, tuple[tuple[int, Labels], ...]]
  root: dict[int, int]
  pinned: frozenset[int]
  groups: masking.ChannelGroups
  positions: dict[str, int] = dataclasses.field(default_factory=dict)


class _Tracer:
  """Interprets a jaxpr on channel labels (see the module docstring); merges labels with union-find."""

  def __init__(self):
    self.parent: list[int] = []
    self.pinned: set[int] = set()
    self.axes: dict[str, dict[int, Labels]] = {}
    self.positions: dict[str, int] = {}

  def new(self, n: int) -> Labels:
    start = len(self.parent)
    self.parent.extend(range(start, start + n))
    return tuple(range(start, start + n))

  def find(self, a: int) -> int:
    while self.parent[a] != a:
      self.parent[a] = self.parent[self.parent[a]]
      a = self.parent[a]
    return a

  def merge(self, a: Labels, b: Labels) -> Labels:
    if len(a) != len(b):
      self.pin(a), self.pin(b)
      return a
    for x, y in zip(a, b):
      self.parent[self.find(x)] = self.find(y)
    return a

  def pin(self, labels: Labels) -> None:
    self.pinned.update(labels)

  def record(self, name: str, axis: int, labels: Labels) -> None:
    self.axes.setdefault(name, {})[axis] = labels

  # ------------------------------------------------------------------------------------------------------
  def run(self, jaxpr: Any, inputs: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = dict(zip(jaxpr.invars, inputs))
    read = lambda v: None if isinstance(v, jax.extend.core.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      outs = self.eqn(eqn, [read(v) for v in eqn.invars])
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
    name, shapes = eqn.primitive.name, [getattr(v.aval, "shape", ()) for v in eqn.invars]
    out_shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name in _CALLS:
      body = eqn.params[_CALLS[name]]
      body = body.jaxpr if hasattr(body, "jaxpr") else body
      return self.run(body, ins)
    if name == "conv_general_dilated":
      return [self.conv(eqn, *ins[:2])]
    if name == "dot_general":
      return [self.dense(eqn, *ins[:2])]
    if name in _ELEMENTWISE:
      return [self.elementwise(ins, shapes, out_shape)] * len(eqn.outvars)
    if name in ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose") or name in _AXIS_OPS:
      return [self.shape_op(eqn, ins[0], shapes[0], out_shape)]
    if name == "concatenate":
      return [self.concatenate(eqn, ins, shapes)]
    for value in ins:  # unknown primitive: its channels are never pruned
      if isinstance(value, _Act):
        self.pin(value.labels)
    return [None] * len(eqn.outvars)

  def conv(self, eqn, x, kernel) -> _Act:
    dims = eqn.params["dimension_numbers"]
    rank = len(eqn.invars[0].aval.shape)
    if not isinstance(kernel, _Leaf) or dims.out_spec[1] != rank - 1 or dims.rhs_spec[0] != rank - 1:
      raise UnsupportedModelError(
        "channel granularity: conv_general_dilated whose kernel is not a parameter or not NHWC / HWIO stops the "
        "channel tracing; use mask.granularity='weight'"
      )
    x = x if isinstance(x, _Act) else _Act(self.input_labels(eqn.invars[0].aval.shape[-1]))
    out_channels, groups = eqn.outvars[0].aval.shape[-1], eqn.params["feature_group_count"]
    if groups == 1:
      self.record(kernel.name, rank - 2, x.labels)
      labels = self.new(out_channels)
    elif groups == len(x.labels) == out_channels:  # depthwise: output channel c is input channel c
      labels = x.labels
    else:
      raise UnsupportedModelError(
        f"channel granularity: grouped conv '{kernel.name}' ({groups} groups) is neither dense nor depthwise; use "
        "mask.granularity='weight'"
      )
    self.record(kernel.name, rank - 1, labels)
    self.positions[kernel.name] = _positions(eqn)
    return _Act(labels)

  def dense(self, eqn, x, kernel) -> _Act | None:
    (contract_x, contract_k), batch = eqn.params["dimension_numbers"]
    x_rank = len(eqn.invars[0].aval.shape)
    plain = contract_x == (x_rank - 1,) and contract_k == (0,) and batch == ((), ())
    if not (isinstance(kernel, _Leaf) and kernel.kernel and plain):
      if isinstance(x, _Act):
        self.pin(x.labels)
      return None
    x = x if isinstance(x, _Act) else _Act(self.input_labels(eqn.invars[0].aval.shape[-1]))
    self.record(kernel.name, 0, x.labels)
    labels = self.new(eqn.outvars[0].aval.shape[-1])
    self.record(kernel.name, 1, labels)
    self.positions[kernel.name] = _positions(eqn)
    return _Act(labels)

  def input_labels(self, n: int) -> Labels:
    labels = self.new(n)
    self.pin(labels)
    return labels

  def elementwise(self, ins: list[Any], shapes: list[tuple], out_shape: tuple) -> Any:
    acts = [(v, s) for v, s in zip(ins, shapes) if isinstance(v, _Act) and s and s[-1:] == out_shape[-1:]]
    if not acts:
      leaves = [v for v in ins if isinstance(v, _Leaf)]
      if not leaves or len({leaf.size for leaf in leaves}) > 1:
        return None
      names = tuple(dict.fromkeys(name for leaf in leaves for name in leaf.names))
      return _Leaf(names, any(leaf.kernel for leaf in leaves), leaves[0].size)
    labels = acts[0][0].labels
    for act, _ in acts[1:]:
      labels = self.merge(labels, act.labels)
    for value in ins:
      if isinstance(value, _Leaf) and not value.kernel and value.size == len(labels):
        for name in value.names:  # a per-channel vector (bias, BN scale / shift / statistics)
          self.record(name, 0, labels)
    return _Act(labels)

  def shape_op(self, eqn, value, in_shape: tuple, out_shape: tuple) -> Any:
    if not isinstance(value, _Act):  # a vector broadcast or reshaped along the channel axis stays one
      return value if isinstance(value, _Leaf) and out_shape[-1:] == in_shape[-1:] else None
    if out_shape and in_shape[-1] == out_shape[-1] and _keeps_last_axis(eqn, len(in_shape)):
      return value
    if eqn.primitive.name == "reshape" and len(out_shape) >= 1 and in_shape[0] == out_shape[0]:
      channel = np.broadcast_to(np.arange(in_shape[-1]), in_shape[1:]).reshape(out_shape[1:])
      rows = channel.reshape(-1, out_shape[-1])
      if (rows == rows[:1]).all():  # each position of the new last axis reads one channel (a flatten)
        return _Act(tuple(value.labels[c] for c in rows[0]))
    self.pin(value.labels)
    return None

  def concatenate(self, eqn, ins: list[Any], shapes: list[tuple]) -> Any:
    rank, axis = len(shapes[0]), eqn.params["dimension"]
    acts = [v if isinstance(v, _Act) else _Act(self.input_labels(s[-1])) for v, s in zip(ins, shapes)]
    if axis == rank - 1:
      return _Act(tuple(label for act in acts for label in act.labels))
    labels = acts[0].labels
    for act in acts[1:]:  # batch chunks of one activation
      labels = self.merge(labels, act.labels)
    return _Act(labels)


def _positions(eqn: Any) -> int:
  """Output positions per example of a conv / dense equation: the product of its output's middle axes."""
  return int(np.prod(eqn.outvars[0].aval.shape[1:-1], dtype=np.int64))


def _keeps_last_axis(eqn: Any, rank: int) -> bool:
  """Whether a shape op leaves the last (channel) axis alone: not reduced, padded, sliced, moved or pooled."""
  params, last = eqn.params, rank - 1
  name = eqn.primitive.name
  if name in ("reduce_sum", "reduce_max", "reduce_min"):
    return last not in params["axes"]
  if name in ("reduce_window_max", "reduce_window_sum"):
    return params["window_dimensions"][last] == 1 and params["window_strides"][last] == 1
  if name == "pad":
    return tuple(params["padding_config"][last]) == (0, 0, 0)
  if name == "slice":
    return params["start_indices"][last] == 0 and (params["strides"] or (1,) * rank)[last] == 1
  if name == "transpose":
    return params["permutation"][-1] == last
  if name == "broadcast_in_dim":
    return params["broadcast_dimensions"][-1:] == (len(eqn.outvars[0].aval.shape) - 1,)
  return True  # reshape / squeeze / expand_dims with the same last dimension


def trace_wiring(model: Any, variables: PyTree, input_shape: tuple[int, ...]) -> Wiring:
  """The channel wiring of `model.apply(variables, x, train=False)` for inputs of `input_shape` (N, H, W, C).

  Args:
    model: a Flax module (zoo model) called as `model.apply(variables, x, train=False)`.
    variables: its variables, or their `jax.eval_shape` (no values are read).
    input_shape: shape of an input batch; one image is enough.

  Returns:
    The `Wiring`, whose `groups` are the prunable channel groups (`masking.apply_masks(groups=...)`).
  """
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.float32), variables)
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(abstract, x)
  tracer = _Tracer()
  names = [masking.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  leaves = [
    _Leaf((name,), name.endswith("/kernel") and len(v.shape) >= 2, int(np.prod(v.shape)))
    for name, v in zip(names, jax.tree.leaves(abstract))
  ]
  outputs = tracer.run(closed.jaxpr, [*leaves, _Act(tracer.input_labels(input_shape[-1]))])
  for out in outputs:
    if isinstance(out, _Act):
      tracer.pin(out.labels)
  return _wiring(tracer)


def _wiring(tracer: _Tracer) -> Wiring:
  root = {label: tracer.find(label) for label in range(len(tracer.parent))}
  pinned = frozenset(root[label] for label in tracer.pinned)
  axes = {name: tuple(sorted(by_axis.items())) for name, by_axis in tracer.axes.items()}
  return Wiring(axes, root, pinned, _groups(axes, root, pinned), dict(tracer.positions))


def _groups(axes: dict[str, tuple[tuple[int, Labels], ...]], root: dict[int, int], pinned: frozenset[int]):
  """Prunable units grouped by the set of 'params' leaves they span; members index each leaf's last axis."""
  members_of: dict[int, list[tuple[str, int]]] = {}
  for name, by_axis in axes.items():
    if not name.startswith("params/"):
      continue
    _, labels = by_axis[-1]  # the last axis: a kernel's outputs, a vector's channels
    for channel, label in enumerate(labels):
      if root[label] not in pinned:
        members_of.setdefault(root[label], []).append((name.removeprefix("params/"), channel))
  by_span: dict[tuple[str, ...], list[list[tuple[str, int]]]] = {}
  for unit in members_of.values():
    unit = sorted(unit)
    by_span.setdefault(tuple(name for name, _ in unit), []).append(unit)
  groups = []
  for span, units in sorted(by_span.items()):
    if not any(name.endswith("/kernel") for name in span):
      continue  # no kernel produces it (cannot be scored)
    units.sort(key=lambda unit: unit[0][1])
    groups.append(masking.ChannelGroup(tuple((name, tuple(u[i][1] for u in units)) for i, name in enumerate(span))))
  return tuple(groups)


# ----------------------------------------------------------------------------------------------------------
# The compact network.


def pruned_units(wiring: Wiring, masks: dict[str, jax.Array]) -> set[int]:
  """Units whose channel mask is 0 (`masking.channel_masks`); every other unit stays."""
  pruned = set()
  for group in wiring.groups:
    name, index = group.members[0]
    mask, labels = np.asarray(masks[name]), wiring.axes["params/" + name][-1][1]
    pruned.update(wiring.root[labels[channel]] for channel in index if mask[channel] == 0)
  return pruned


def compact_variables(wiring: Wiring, variables: PyTree, pruned: set[int]) -> tuple[PyTree, dict[str, int]]:
  """Every leaf of `variables` without the `pruned` units' entries on each wired axis, and the channel plan.

  Returns:
    (compact variables, plan): the plan maps each conv / dense module path ('layer1_0/conv1') to its kept
    output channels, what `models.get_model(..., channel_plan=plan)` builds.
  """
  plan: dict[str, int] = {}

  def slice_leaf(path, leaf):
    name = masking.path_name(path)
    leaf = np.asarray(leaf)
    for axis, labels in wiring.axes.get(name, ()):
      if leaf.shape[axis] != len(labels):
        continue  # a depthwise kernel's input axis has one entry per group
      keep = np.array([wiring.root[label] not in pruned for label in labels])
      leaf = np.compress(keep, leaf, axis=axis)
    if name.startswith("params/") and name.endswith("/kernel"):
      plan[name.removeprefix("params/").removesuffix("/kernel")] = int(leaf.shape[-1])
    return leaf

  return jax.tree_util.tree_map_with_path(slice_leaf, variables), plan
