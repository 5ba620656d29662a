"""Users' own models: a Flax Linen or NNX module named by an import or file path, converted once to the zoo's form.

`config.model.name = "my_package.my_module:MyNet"` (an importable module) or `"path/to/file.py:MyNet"` (a file),
with `config.model.kwargs` for its arguments, names

  - a Flax Linen module class, or a factory returning a Linen module (`MyNet(**kwargs)`), called as the zoo's
    models are: `module.apply(variables, x, train=...)`; or
  - a Flax NNX module class, built as `MyNet(**kwargs, rngs=nnx.Rngs(key))` and called as `module(x)` (with
    `train=` too when its `__call__` takes it) after `train()` / `eval()` mode is set on it.

`build` turns either into an object with the zoo's `init(key, x, train=False) -> variables` and
`apply(variables, x, train=..., mutable=[...])`: variables are `{'params': ...}` plus `{'batch_stats': ...}`
(NNX: `nnx.Param` and `nnx.BatchStat` state, split and merged with `nnx.split` / `nnx.merge` at every call), so
`models.make_apply_fn` gives the pure `apply_fn(variables, x, train)` of every stage, objective and evaluation
and nothing further in knows which kind of module it runs. Arguments the class (or factory) takes and `kwargs`
does not set are filled in: `num_classes` (the dataset's) and `dtype` (config.model.dtype). On several devices
every BatchNorm averages its batch statistics over the device axis (as the zoo's `bn_axis_name` does).

  model = own.build("tests_models.py:LinenNet", num_classes=10, kwargs={"width": 8})
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

Variables = dict[str, Any]
_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def is_spec(name: str) -> bool:
  """Whether a model name is an own model's 'module:Attribute' or 'file.py:Attribute' (zoo names hold no ':')."""
  return ":" in name


@functools.lru_cache(maxsize=32)
def _load_file(path: str):
  name = "hydra_jax_own_" + hashlib.sha1(path.encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses (Linen modules) look their module up there
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def resolve(spec: str) -> Any:
  """The object `spec` ('pkg.module:Name' or 'path/to/file.py:Name') names.

  Raises:
    ValueError: one line naming the module, file or attribute that is not there.
  """
  where, _, attr = spec.rpartition(":")
  if not where or not attr:
    raise ValueError(f"model {spec!r} is not 'package.module:Name' or 'path/to/file.py:Name'")
  if where.endswith(".py"):
    if not os.path.isfile(where):
      raise ValueError(f"model {spec!r}: file {where} does not exist")
    module = _load_file(os.path.abspath(where))
  else:
    try:
      module = importlib.import_module(where)
    except ImportError as error:
      raise ValueError(f"model {spec!r}: cannot import module {where!r} ({error})") from None
  if not hasattr(module, attr):
    raise ValueError(f"model {spec!r}: {where} has no attribute {attr!r}")
  return getattr(module, attr)


def _accepts(fn: Any, name: str) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _arguments(target: Any, kwargs: Mapping[str, Any], num_classes: int, dtype: Any) -> dict[str, Any]:
  """`kwargs`, with num_classes and dtype (when not float32) added where `target` takes them and kwargs lacks them."""
  arguments = dict(kwargs)
  if "num_classes" not in arguments and _accepts(target, "num_classes"):
    arguments["num_classes"] = num_classes
  if dtype is not None and jnp.dtype(dtype) != jnp.float32 and "dtype" not in arguments:
    if not _accepts(target, "dtype"):
      raise ValueError(f"model {getattr(target, '__name__', target)!r} takes no dtype argument (config.model.dtype)")
    arguments["dtype"] = dtype
  return arguments


def build(
  spec: str,
  num_classes: int,
  kwargs: Mapping[str, Any] | None = None,
  dtype: Any = None,
  bn_axis_name: str | None = None,
) -> Any:
  """The own model `spec` as an object with the zoo's `init` / `apply` (see the module docstring).

  Args:
    spec: 'pkg.module:Name' or 'path/to/file.py:Name' naming a Linen module class or factory or an NNX class.
    num_classes: passed as `num_classes=` where the class takes it and `kwargs` does not set it.
    kwargs: the class's (factory's) arguments (config.model.kwargs).
    dtype: compute dtype (config.model.dtype), passed as `dtype=` when it is not float32.
    bn_axis_name: the mapped device axis every BatchNorm averages its statistics over, or None.

  Raises:
    ValueError: one line naming what is missing or is not a Flax module.
  """
  target = resolve(spec)
  arguments = _arguments(target, kwargs or {}, num_classes, dtype)
  if isinstance(target, type) and issubclass(target, nnx.Module):
    return NnxModel(target, tuple(sorted(arguments.items())), bn_axis_name)
  if not callable(target):
    raise ValueError(f"model {spec!r} is a {type(target).__name__}, not a Flax module class or factory")
  module = target(**arguments)
  if not isinstance(module, nn.Module):
    raise ValueError(
      f"model {spec!r} gave a {type(module).__name__}; it must be a Flax Linen module (class or factory) or an "
      "NNX module class"
    )
  return module if bn_axis_name is None else LinenOnAxis(module, bn_axis_name)


@dataclasses.dataclass(frozen=True)
class LinenOnAxis:
  """A Linen module whose every `nn.BatchNorm` averages its batch statistics over `axis_name` (a mapped axis)."""

  module: nn.Module
  axis_name: str

  def _interceptor(self, next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.module.axis_name is None:
      object.__setattr__(context.module, "axis_name", self.axis_name)  # this call's bound copy only
    return next_fun(*args, **kwargs)

  def init(self, *args: Any, **kwargs: Any) -> Variables:
    return self.module.init(*args, **kwargs)

  def apply(self, *args: Any, **kwargs: Any) -> Any:
    with nn.intercept_methods(self._interceptor):
      return self.module.apply(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class NnxModel:
  """An NNX module class called through the zoo's pure `init` / `apply` (`nnx.split` / `nnx.merge`).

  A class whose `__init__` takes `input_shape` is given the (H, W, C) of the batch it is called on (NNX modules
  size their layers when built, e.g. a conv's input channels or a ViT's position embeddings).

  Attributes:
    cls: the NNX module class, built as `cls(**dict(arguments), rngs=nnx.Rngs(key))`.
    arguments: its keyword arguments, as sorted (name, value) pairs.
    bn_axis_name: the mapped axis every `nnx.BatchNorm` averages its statistics over, or None.
  """

  cls: type
  arguments: tuple[tuple[str, Any], ...]
  bn_axis_name: str | None = None
  _templates: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def _build(self, key: jax.Array, input_shape: tuple[int, ...]) -> nnx.Module:
    shaped = {"input_shape": tuple(input_shape)} if _accepts(self.cls.__init__, "input_shape") else {}
    return self.cls(**dict(self.arguments), **shaped, rngs=nnx.Rngs(key))

  def _template(self, input_shape: tuple[int, ...]) -> tuple[Any, dict[str, nnx.State]]:
    """(graphdef, {collection: abstract State}) of the module for inputs of `input_shape`, from an abstract build."""
    if input_shape not in self._templates:
      module = nnx.eval_shape(lambda: self._build(jax.random.key(0), input_shape))
      self._templates[input_shape] = _split(module, self.cls.__name__)
    return self._templates[input_shape]

  def init(self, key: jax.Array, x: jax.Array, train: bool = False) -> Variables:
    """{'params': ..., 'batch_stats': ...} (no batch_stats without BatchNorm) of a module built with `key` for
    inputs shaped like `x`."""
    del train
    _, states = _split(self._build(key, tuple(x.shape[1:])), self.cls.__name__)
    return {name: _pure(state) for name, state in states.items() if name == "params" or _pure(state)}

  def apply(self, variables: Variables, x: jax.Array, train: bool = False, mutable: Any = False) -> Any:
    """Logits of the module merged from `variables`; with `mutable`, also the updated {'batch_stats': ...}."""
    graphdef, templates = self._template(tuple(x.shape[1:]))
    return _apply(graphdef, templates, self.cls.__name__, self.bn_axis_name, variables, x, train, mutable)


@dataclasses.dataclass(frozen=True)
class NnxInstance:
  """A built NNX module (its graph and abstract state, `split_nnx`) called through the zoo's pure `apply`."""

  graphdef: Any
  templates: dict[str, nnx.State]
  name: str
  bn_axis_name: str | None = None

  def apply(self, variables: Variables, x: jax.Array, train: bool = False, mutable: Any = False) -> Any:
    return _apply(self.graphdef, self.templates, self.name, self.bn_axis_name, variables, x, train, mutable)


def split_nnx(module: nnx.Module) -> tuple[NnxInstance, Variables]:
  """(model with the zoo's `apply`, its variables {'params', 'batch_stats'}) of a built NNX module, for your own
  loop: `models.make_apply_fn(model)` is then its pure `apply_fn(variables, x, train)`."""
  name = type(module).__name__
  graphdef, states = _split(module, name)
  variables = {kind: _pure(state) for kind, state in states.items() if kind == "params" or _pure(state)}
  return NnxInstance(graphdef, states, name), variables  # the states: templates whose values each call replaces


def _apply(graphdef, templates, name, bn_axis_name, variables, x, train, mutable):
  states = [_state(templates[kind], variables.get(kind, {})) for kind in templates]
  module = nnx.merge(graphdef, *states)
  module.set_attributes(deterministic=not train, use_running_average=not train, raise_if_not_found=False)
  if bn_axis_name is not None:
    for _, sub in module.iter_modules():
      if isinstance(sub, nnx.BatchNorm) and sub.axis_name is None:
        sub.axis_name = bn_axis_name
  call = module.__call__
  logits = call(x, train=train) if _accepts(call, "train") else call(x)
  if not mutable:
    return logits
  _, new = _split(module, name)
  return logits, {"batch_stats": _pure(new["batch_stats"])}


def _split(module: nnx.Module, name: str) -> tuple[Any, dict[str, nnx.State]]:
  graphdef, params, batch_stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  leftover = list(nnx.to_flat_state(rest))
  if leftover:
    path, variable = leftover[0]
    raise ValueError(
      f"NNX model {name} holds a {type(variable).__name__} at {'/'.join(map(str, path))}; the pipeline carries "
      "only nnx.Param (params) and nnx.BatchStat (batch_stats) state"
    )
  return graphdef, {"params": params, "batch_stats": batch_stats}


def _pure(state: nnx.State) -> dict[str, Any]:
  """The nested dict of a State's values with string keys ('layers/0/kernel'), as the zoo's variables have."""
  out: dict[str, Any] = {}
  for path, variable in nnx.to_flat_state(state):
    node = out
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = variable.value
  return out


def _state(template: nnx.State, pure: Mapping[str, Any]) -> nnx.State:
  """`template` (a State) with the values of the string-keyed dict `pure`."""
  flat = []
  for path, variable in nnx.to_flat_state(template):
    value = pure
    for key in path:
      value = value[str(key)]
    flat.append((path, variable.replace(value)))
  return nnx.from_flat_state(flat)
