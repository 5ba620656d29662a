"""Import / export of PyTorch HYDRA checkpoints (inspire-group/hydra state dicts) for the zoo models.

The zoo names its modules after the PyTorch state-dict keys (`hydra_jax.models`), so a key maps to a variable
path by rule: split the module path on "." and join each numeric index to its parent with "_", then

    weight (conv / linear)  <-> params/.../kernel      OIHW -> HWIO, (out, in) -> (in, out)
    weight / bias (BN)      <-> params/.../scale, bias
    bias                    <-> params/.../bias
    running_mean / _var     <-> batch_stats/.../mean, var
    popup_scores            <-> scores/.../kernel       (same layout change as the weight)
    num_batches_tracked     ignored on import; exported as 0

e.g. `layer1.0.conv1.weight` <-> `params/layer1_0/conv1/kernel`, `0.weight` <-> `params/0/kernel`.

The dense layer that reads a flattened conv map (the CNNs' first dense, VGG's `classifier_0`) also gets its rows
permuted: PyTorch flattens (C, H, W), we flatten (H, W, C).

Scores mirror `variables["params"]`: the score array at every `kernel` leaf and None at every other leaf, exactly
the tree `hydra_jax.masking` takes. A dense checkpoint (no `popup_scores` keys) gives `scores=None`.

The WideResNets of the reference build a `sub_block1` that their forward never uses: its keys are skipped on
import, and on export it is filled with a copy of `block1` so that the result loads with `strict=True` into the
reference model (the copy is never used there either).

Example:

    ckpt = torch.load("model_best.pth.tar", map_location="cpu")
    variables, scores = from_torch_state_dict(ckpt["state_dict"], "wrn_28_4", num_classes=10)
    ...  # prune / finetune in JAX
    state_dict = to_torch_state_dict(variables, scores, model_name="wrn_28_4", as_torch=True)
    torch_model.load_state_dict(state_dict)  # e.g. the reference model, for AutoAttack / RobustBench
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hydra_jax import models
from hydra_jax import paths
from hydra_jax.models import cnn
from hydra_jax.models import vgg
from hydra_jax.models import wrn

_TO_TORCH = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_SCORES = "popup_scores"
_UNUSED_WRN_PREFIX = "sub_block1."


def torch_key(path: tuple[str, ...]) -> str:
  """PyTorch state-dict key of a flattened variable path such as ("params", "layer1_0", "conv1", "kernel")."""
  *modules, leaf = path[1:]
  if leaf not in _TO_TORCH:
    raise ValueError(f"No PyTorch counterpart for variable {'/'.join(path)!r}")
  modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join([*modules, _TO_TORCH[leaf]])


def _to_numpy(value: Any) -> np.ndarray:
  """A copy of a torch tensor (via .detach().cpu()) or array-like as a numpy array; torch itself is not imported.

  The copy matters: `state_dict()` tensors share memory with the live torch module, and jax may wrap host numpy
  memory without copying, so later in-place updates in torch (e.g. BN running stats) would leak into our arrays.
  """
  if hasattr(value, "detach"):
    value = value.detach().cpu()
  return np.array(value, copy=True)


def _flattened_map(model, input_shape) -> tuple[str, tuple[int, int, int]] | None:
  """(name, (H, W, C)) of the dense layer reading a flattened conv map, or None if the model has none."""
  if isinstance(model, (cnn.SequentialCNN, vgg.VGG)):
    return model.flattened_map(input_shape)
  return None


def _torch_to_flax(array: np.ndarray, path: tuple[str, ...], flat_map) -> np.ndarray:
  """Layout change of one PyTorch tensor into the leaf at `path` (kernels only; the rest is unchanged)."""
  if path[-1] != "kernel":
    return array
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  array = array.T
  if flat_map is not None and path[1:-1] == (flat_map[0],):
    h, w, c = flat_map[1]
    array = array.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
  return array


def _flax_to_torch(array: np.ndarray, path: tuple[str, ...], flat_map) -> np.ndarray:
  """Inverse of `_torch_to_flax`."""
  if path[-1] != "kernel":
    return array
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if flat_map is not None and path[1:-1] == (flat_map[0],):
    h, w, c = flat_map[1]
    array = array.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
  return array.T


def _torch_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
  """PyTorch shape of the tensor stored at a leaf of the given flax shape."""
  if path[-1] != "kernel":
    return tuple(shape)
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])


def _model_and_shapes(model_name: str, num_classes: int, input_shape):
  """The zoo model, its (H, W, C) input, and its flattened variable shapes (no allocation)."""
  model = models.get_model(model_name, num_classes)
  input_shape = tuple(input_shape or models.input_shape(model_name))
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return model, input_shape, traverse_util.flatten_dict(shapes)


def _normalise(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Drops DataParallel's "module." prefix and `num_batches_tracked` entries; converts values to numpy."""
  out = {}
  for key, value in state_dict.items():
    key = key.removeprefix("module.")
    if not key.endswith("num_batches_tracked"):
      out[key] = _to_numpy(value)
  return out


def from_torch_state_dict(
  state_dict: Mapping[str, Any], model_name: str, num_classes: int, input_shape: tuple[int, int, int] | None = None
) -> tuple[dict, dict | None]:
  """Loads a reference HYDRA state dict into the variables (and scores) of zoo model `model_name`.

  Args:
    state_dict: key -> torch tensor or numpy array, e.g. `torch.load(path)["state_dict"]` of a reference
      checkpoint (subnet with `popup_scores`, or dense); keys may carry DataParallel's "module." prefix.
    model_name: registered zoo name (e.g. "vgg16_bn", "wrn_28_4", "cifar_model").
    num_classes: outputs of the checkpoint's model (10 for the reference's basic.py CNNs).
    input_shape: (H, W, C) the model was trained on; default `models.input_shape(model_name)`. Only the CNNs'
      first dense layer depends on it.

  Returns:
    (variables, scores): variables `{"params": ..., "batch_stats": ...}` (float32 jax arrays; no batch_stats for
    BN-free models); scores mirroring `variables["params"]` with the score at each `kernel` leaf and None
    elsewhere, or None if the state dict has no `popup_scores`.

  Raises:
    ValueError: keys the model needs are missing (scores count as needed for every weight once any is present),
      the state dict has keys the model does not use, or a tensor has the wrong shape; the message names the
      keys. Only `num_batches_tracked` and the WRN's unused `sub_block1.*` are skipped.
  """
  model, input_shape, shapes = _model_and_shapes(model_name, num_classes, input_shape)
  flat_map = _flattened_map(model, input_shape)
  given = _normalise(state_dict)
  if isinstance(model, wrn.WideResNet):
    given = {k: v for k, v in given.items() if not k.startswith(_UNUSED_WRN_PREFIX)}
  has_scores = any(key.endswith("." + _SCORES) for key in given)
  keys = {path: torch_key(path) for path in shapes}
  score_keys = {
    path[1:]: keys[path].removesuffix("weight") + _SCORES for path in shapes if has_scores and path[-1] == "kernel"
  }
  _check_keys(given, {*keys.values(), *score_keys.values()}, model_name)
  variables = {path: _convert(given[key], shapes[path], path, key, flat_map) for path, key in keys.items()}
  scores = {path[1:]: None for path in shapes if path[0] == "params"}
  scores.update(
    {
      path: _convert(given[key], shapes[("params", *path)], ("params", *path), key, flat_map)
      for path, key in score_keys.items()
    }
  )
  variables = traverse_util.unflatten_dict(variables)
  return variables, traverse_util.unflatten_dict(scores) if has_scores else None


TORCH_SUFFIXES = (".pth", ".tar", ".pt")  # file names `load_torch_checkpoint` reads


def load_torch_checkpoint(
  path: str, model_name: str, num_classes: int, input_shape: tuple[int, int, int] | None = None
) -> tuple[dict, dict | None]:
  """Reads a reference HYDRA checkpoint file (`.pth`, `.pth.tar`, `.pt`; needs torch) into variables and scores.

  Args:
    path: a file written by `torch.save`: the reference's {'state_dict': ..., 'epoch': ...} dict or a bare
      state dict.
    model_name, num_classes, input_shape: as in `from_torch_state_dict`.

  Returns:
    (variables, scores or None), as `from_torch_state_dict`.
  """
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency)

  with paths.path(path).open("rb") as f:  # a local file or a gs:// URL
    checkpoint = torch.load(f, map_location="cpu", weights_only=False)
  return from_torch_state_dict(checkpoint.get("state_dict", checkpoint), model_name, num_classes, input_shape)


def _check_keys(given: Mapping[str, Any], expected: set[str], model_name: str) -> None:
  """Raises ValueError listing the missing and the unused keys, if any."""
  missing, unused = sorted(expected - given.keys()), sorted(given.keys() - expected)
  problems = [
    f"{what} {_preview(keys)}"
    for what, keys in [("missing keys", missing), ("keys not used by the model", unused)]
    if keys
  ]
  if problems:
    raise ValueError(f"State dict does not fit model {model_name!r}: " + "; ".join(problems))


def _preview(keys: list[str], limit: int = 8) -> str:
  return str(keys) if len(keys) <= limit else f"{keys[:limit]} ... ({len(keys)} in all)"


def _convert(array: np.ndarray, leaf, path, key: str, flat_map) -> jax.Array:
  """Checks `array`'s PyTorch shape against the model's leaf and converts it to the flax layout."""
  expected = _torch_shape(leaf.shape, path)
  if array.shape != expected:
    raise ValueError(f"State dict key {key!r} has shape {array.shape}, the model expects {expected}")
  return jnp.asarray(_torch_to_flax(array, path, flat_map), dtype=leaf.dtype)


# The reference's (inspire-group/hydra) file of each zoo family it has, and its names for our aliases.
_REFERENCE_FILES = (
  (r"(cifar|mnist)_model(_large)?$", "models/basic.py"),
  (r"vgg\d+(_bn)?$", "models/vgg_cifar.py"),
  (r"wrn_\d+_\d+$", "models/wrn_cifar.py"),
  (r"resnet\d+$", "models/resnet_cifar.py"),
  (r"ResNet\d+$", "models/resnet.py"),
)
_REFERENCE_NAMES = {
  "cnn_small": "cifar_model",
  "cnn_large": "cifar_model_large",
  **{f"resnet{depth}_imagenet": f"ResNet{depth}" for depth in (18, 34, 50)},
}
_REFERENCE_FORWARD_NOTES = {  # what the reference's forward assumes beyond the state dict's shapes
  "models/wrn_cifar.py": "its forward's avg_pool2d(8) expects 32x32 inputs (ours pools globally)",
  "models/resnet_cifar.py": "its forward's avg_pool2d(4) expects 32x32 inputs (ours pools globally)",
  "models/resnet.py": "normalise inputs with the ImageNet mean/std first (our model does it inside)",
}


def _torch_module(key: str, shape: tuple[int, ...]) -> str:
  """'5: Linear(512, 100)' for the PyTorch weight `key` of `shape` (out, in) or (out, in, kh, kw)."""
  module = key.removesuffix(".weight")
  if len(shape) == 4:
    return f"{module}: Conv2d({shape[1]}, {shape[0]}, kernel_size={shape[2]})"
  return f"{module}: Linear({shape[1]}, {shape[0]})"


def _weight_shapes(model_name: str, num_classes: int, input_shape) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape of every conv / linear weight of the zoo model built for `input_shape` (H, W, C)."""
  _, _, shapes = _model_and_shapes(model_name, num_classes, input_shape)
  return {torch_key(p): _torch_shape(v.shape, p) for p, v in shapes.items() if p[-1] == "kernel"}


def reference_model(model_name: str, num_classes: int, input_shape: tuple[int, int, int], *, subnet: bool) -> str:
  """Which reference (inspire-group/hydra) class loads `to_torch_state_dict`'s output, and how to build it.

  The reference's classes are written for one input (CIFAR 32x32x3, MNIST 28x28x1, ImageNet 224x224x3) and
  basic.py's for 10 classes; every conv / linear layer whose shape differs for `input_shape` and `num_classes`
  is named with the shape it needs (e.g. CNN-small on 16x16x1 digits: '0: Conv2d(1, 16, kernel_size=4)' and
  '5: Linear(512, 100)').

  Args:
    model_name: registered zoo name.
    num_classes: the model's outputs.
    input_shape: (H, W, C) the model was trained on.
    subnet: the state dict has `popup_scores` (the reference's `--layer-type subnet`), else dense weights.

  Returns:
    One paragraph of text.
  """
  arch = _REFERENCE_NAMES.get(model_name, model_name)
  file = next((f for pattern, f in _REFERENCE_FILES if re.match(pattern, arch)), None)
  if file is None:
    return f"model {model_name} has no class in inspire-group/hydra (its keys follow the zoo's module names)"
  layers = "SubnetConv, SubnetLinear" if subnet else "nn.Conv2d, nn.Linear"
  text = (
    f"loads (strict=True) into inspire-group/hydra {file} {arch}({layers}, 'kaiming_normal', num_classes={num_classes})"
  )
  written_classes = 10 if file == "models/basic.py" else num_classes  # basic.py ignores num_classes
  written = _weight_shapes(model_name, written_classes, models.input_shape(model_name))
  needed = _weight_shapes(model_name, num_classes, input_shape)
  changed = [key for key in needed if needed[key] != written.get(key)]
  if changed:
    size = "x".join(map(str, input_shape))
    text += f" with, for {size} inputs and {num_classes} classes, " + ", ".join(
      f"{_torch_module(key, needed[key])} (written: {_torch_module(key, written[key]).split(': ')[1]})"
      for key in changed
    )
  note = _REFERENCE_FORWARD_NOTES.get(file)
  notes = [note] if note and not ("32x32" in note and tuple(input_shape[:2]) == (32, 32)) else []
  notes.append("it takes NCHW images: torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()")
  return f"{text}; {'; '.join(notes)}"


def to_torch_state_dict(
  variables: Mapping[str, Any],
  scores: Mapping[str, Any] | None = None,
  *,
  model_name: str,
  input_shape: tuple[int, int, int] | None = None,
  as_torch: bool = False,
) -> dict[str, Any]:
  """Exports zoo variables (and scores) as a reference-layout PyTorch state dict; inverse of `from_torch_state_dict`.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of zoo model `model_name`.
    scores: optional tree like `variables["params"]` with arrays at `kernel` leaves (None elsewhere), exported as
      `popup_scores` for the reference's subnet layers. For a dense PyTorch model, export masked weights
      instead (e.g. `hydra_jax.masking.apply_masks`) with scores=None.
    model_name: registered zoo name.
    input_shape: (H, W, C) the model was built for; default `models.input_shape(model_name)`.
    as_torch: return torch tensors (requires torch) instead of numpy arrays.

  Returns:
    key -> float32 array (int64 zero for `num_batches_tracked`), loadable with `load_state_dict(strict=True)` into
    the reference model (WRNs include a `sub_block1` copy of block1, see the module docstring).
  """
  # The flattened map does not depend on the number of classes.
  model = models.get_model(model_name, num_classes=1)
  flat_map = _flattened_map(model, tuple(input_shape or models.input_shape(model_name)))
  out = {}
  for path, value in traverse_util.flatten_dict(dict(variables)).items():
    key = torch_key(path)
    out[key] = _flax_to_torch(np.array(value, np.float32), path, flat_map)
    if path[-1] == "scale":
      out[key.removesuffix("weight") + "num_batches_tracked"] = np.zeros((), np.int64)
  for path, value in traverse_util.flatten_dict(dict(scores or {})).items():
    if value is not None:
      path = ("params", *path)
      out[torch_key(path).removesuffix("weight") + _SCORES] = _flax_to_torch(
        np.array(value, np.float32), path, flat_map
      )
  if isinstance(model, wrn.WideResNet):
    out.update({"sub_" + k: v.copy() for k, v in out.items() if k.startswith("block1.")})
  if as_torch:
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)

    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
  return out
