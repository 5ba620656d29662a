"""auto_LiRPA (Xu et al. 2020), the independent reference of `hydra_jax.bounds`' CROWN family, on the zoo's PyTorch
twins (tests/torch_reference.py with weights from `hydra_jax.convert`).

auto_LiRPA 0.3, the release on PyPI, pins torch < 1.13, so it is installed with `pip install --no-deps
auto-lirpa==0.3 appdirs==1.4.4` (.ci/run does; as a `test` extra pip would replace our CPU torch). On torch 2.13
and numpy 2 it needs four shims for APIs that moved, applied here before its import and touching nothing else of
ours: `numpy.lib.arraysetops.isin`, `torch.onnx.symbolic_helper._set_opset_version`, `torch._C.Node.__getitem__`
(attribute access torch's old ONNX utils installed) and the `remove_duplicate` argument torch now passes to
`nn.Module._named_members`. Convolutions are bounded in its "matrix" mode (its "patches" mode fails on 8x8 inputs).
Import only after `pytest.importorskip("torch")`; `load()` skips when auto_LiRPA is not installed.
"""

import sys
import types

import numpy as np
import pytest
import torch

from tests import torch_reference

METHODS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN", "alpha_crown": "alpha-CROWN"}


def import_auto_lirpa():
  """The auto_LiRPA module, shimmed for torch 2 / numpy 2 (ImportError if it is not installed)."""
  sys.modules.setdefault("numpy.lib.arraysetops", types.SimpleNamespace(isin=np.isin))
  import torch.onnx.symbolic_helper as symbolic_helper  # pylint: disable=g-import-not-at-top
  from torch.onnx._internal.torchscript_exporter._globals import GLOBALS  # pylint: disable=g-import-not-at-top

  if not hasattr(symbolic_helper, "_set_opset_version"):
    symbolic_helper._set_opset_version = lambda version: setattr(GLOBALS, "export_onnx_opset_version", version)
  if not hasattr(torch._C.Node, "__getitem__"):
    torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)
  import auto_LiRPA as auto_lirpa  # pylint: disable=g-import-not-at-top

  module = auto_lirpa.bound_general.BoundedModule
  if not getattr(module._named_members, "shimmed", False):
    named_members = module._named_members

    def shimmed(self, get_members, prefix="", recurse=True, remove_duplicate=True):
      del remove_duplicate  # auto_LiRPA deduplicates by itself
      return named_members(self, get_members, prefix, recurse)

    shimmed.shimmed = True
    module._named_members = shimmed
  return auto_lirpa


def load():
  """`import_auto_lirpa()`, or pytest.skip where auto_LiRPA is not installed."""
  try:
    return import_auto_lirpa()
  except ImportError as error:
    pytest.skip(f"auto_LiRPA not installed: {error}")


def scaled_twin(name, num_classes, width=1.0):
  """The PyTorch twin of zoo model `name` with every stage's channels times `width` (`get_model`'s `width`; only
  the CIFAR ResNets for width != 1)."""
  if width == 1:
    return torch_reference.build(name, num_classes)
  blocks = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
  if name not in blocks:
    raise ValueError(f"width != 1 is supported for {sorted(blocks)}, not {name!r}")
  widths = [max(1, round(planes * width)) for planes in (64, 128, 256, 512)]  # layers.scale_width
  return torch_reference.CifarResNet(torch_reference.CifarBasic, blocks[name], num_classes, widths=widths)


def _twin(name, num_classes, width):
  """`scaled_twin(name, num_classes, width)`. The WRN twin's reference head pools with a fixed 8x8 window (32x32
  inputs only); hydra_jax's pools globally, the same on 32x32 inputs: the twin pools globally too, so that the
  comparison runs on small inputs."""
  twin = scaled_twin(name, num_classes, width)
  if isinstance(twin, torch_reference.WideResNet):

    def forward(x):
      out = twin.block3(twin.block2(twin.block1(twin.conv1(x))))
      out = torch.nn.functional.adaptive_avg_pool2d(torch.relu(twin.bn1(out)), 1)
      return twin.fc(out.flatten(1))

    twin.forward = forward
  return twin


def _nchw(a):
  return torch.from_numpy(np.asarray(a, np.float32).transpose(0, 3, 1, 2).copy())


def bounds(name, variables, x, lower, upper, spec, methods, width=1.0):
  """{method: (lb, ub) numpy [B, m]} by auto_LiRPA for zoo model `name` (at channel `width`, as `get_model`'s) with
  `variables` (eval mode) on the box [lower, upper] around x (NHWC), spec [B, m, K]; methods are keys of METHODS."""
  from hydra_jax import convert  # pylint: disable=g-import-not-at-top  (import_auto_lirpa's users need no jax)

  auto_lirpa = load()
  twin = _twin(name, spec.shape[-1], width)
  twin.load_state_dict(convert.to_torch_state_dict(variables, model_name=name, as_torch=True), strict=True)
  bounded = auto_lirpa.BoundedModule(twin.eval(), _nchw(x), device="cpu", bound_opts={"conv_mode": "matrix"})
  box = auto_lirpa.PerturbationLpNorm(norm=np.inf, x_L=_nchw(lower), x_U=_nchw(upper))
  inputs = (auto_lirpa.BoundedTensor(_nchw(x), box),)
  c = torch.from_numpy(np.asarray(spec, np.float32))
  found = {}
  for method in methods:
    lb, ub = bounded.compute_bounds(x=inputs, C=c, method=METHODS[method])
    found[method] = (lb.detach().numpy(), ub.detach().numpy())
  return found
