"""Tests of PyTorch checkpoint import/export: logit parity with PyTorch re-statements, round trips, errors, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from zoo_helpers import random_variables

from hydra_jax import convert
from hydra_jax import masking
from hydra_jax import models
from hydra_jax.models import resnet

TINY = [
  "cnn_tiny",
  "vgg_tiny",
  "wrn_tiny",
  "resnet_tiny",
  "resnet_imagenet_tiny",
  "mobilenet_v2_tiny",
  "googlenet_tiny",
]
# The families' full-size networks, or their tiny variants where the full one is slow (see PARITY_SLOW).
# resnet_imagenet_tiny is the ImageNet bottleneck family, vgg2 the plain (BN-free) VGG family; the CIFAR bottleneck
# family has its own tiny test below.
PARITY = [
  "cifar_model",
  "cifar_model_large",
  "mnist_model",
  "mnist_model_large",
  "vgg16_bn",
  "vgg2",
  "wrn_28_4",
  "resnet18",
  "resnet_imagenet_tiny",
  "mobilenet_v2_tiny",
  "googlenet_tiny",
]
PARITY_SLOW = [
  "resnet50_imagenet",
  "mobilenet_v2",
  "googlenet",
  "vgg16",
  "resnet50",
  "wrn_40_2",
  "cnn_tiny",
  "vgg_tiny",
  "wrn_tiny",
  "resnet_tiny",
]


@pytest.fixture(scope="module")
def tr():
  """The PyTorch re-statements of the reference models (skips when torch is absent)."""
  pytest.importorskip("torch")
  import torch_reference  # pylint: disable=g-import-not-at-top

  return torch_reference


def _our_logits(name, variables, x, num_classes=10):
  model = models.get_model(name, num_classes)
  return jax.jit(model.apply, static_argnames="train")(variables, x, train=False)


def _inputs(name, batch=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, *models.input_shape(name))), jnp.float32)


def _with_scores(state_dict, seed=0):
  """A copy of `state_dict` with distinct random `popup_scores` next to every conv / linear weight."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  out = dict(state_dict)
  for key, value in state_dict.items():
    if key.endswith(".weight") and value.ndim >= 2:
      out[key.removesuffix("weight") + "popup_scores"] = torch.randn(value.shape, generator=gen)
  return out


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a, is_leaf=lambda x: x is None) == jax.tree.structure(b, is_leaf=lambda x: x is None)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------------------------------ logit parity
def _check_parity(tr, name):
  reference = tr.build_random(name)
  x = _inputs(name)
  expected = tr.logits(reference, x)
  variables, scores = convert.from_torch_state_dict(reference.state_dict(), name, 10)
  assert scores is None  # a dense checkpoint
  assert expected.std() > 1e-2  # the comparison is not between near-zero logits
  np.testing.assert_allclose(_our_logits(name, variables, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PARITY)
def test_eval_logits_equal_pytorch(name, tr):
  _check_parity(tr, name)


def test_cifar_bottleneck_resnet_logits_equal_pytorch(tr, monkeypatch):
  """resnet50/101/152's block (1x1 -> 3x3 -> 1x1 x4, projection and identity shortcuts) at tiny widths."""
  monkeypatch.setitem(
    models._MODELS,
    "resnet_bottleneck_tiny",
    functools.partial(resnet.ResNet, block=resnet.Bottleneck, num_blocks=(2, 1, 1, 1), widths=(4, 8, 8, 8)),
  )
  monkeypatch.setitem(
    tr.BUILDERS,
    "resnet_bottleneck_tiny",
    lambda c: tr.CifarResNet(tr.CifarBottleneck, [2, 1, 1, 1], c, widths=(4, 8, 8, 8)),
  )
  _check_parity(tr, "resnet_bottleneck_tiny")
  shapes = jax.eval_shape(
    lambda: models.get_model("resnet_bottleneck_tiny", 10).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
    )
  )["params"]
  assert "shortcut_0" in shapes["layer1_0"] and "shortcut_0" not in shapes["layer1_1"]  # both shortcut kinds
  assert shapes["layer1_1"]["conv3"]["kernel"].shape == (1, 1, 4, 16)  # expansion 4


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY_SLOW)
def test_eval_logits_equal_pytorch_big(name, tr):
  _check_parity(tr, name)


@pytest.mark.parametrize("name", ["cifar_model", "vgg_tiny", "wrn_tiny", "mobilenet_v2_tiny"])
def test_export_loads_strictly_into_pytorch_with_equal_logits(name, tr):
  """Our random variables, exported, load with strict=True into the reference layout and give the same logits."""
  model, x, variables = random_variables(name)
  reference = tr.build(name, 10).eval()
  reference.load_state_dict(convert.to_torch_state_dict(variables, model_name=name, as_torch=True), strict=True)
  np.testing.assert_allclose(_our_logits(name, variables, x), tr.logits(reference, x), atol=1e-4, rtol=1e-4)
  del model


# ------------------------------------------------------------------------------------------------ scores
def test_scores_get_the_weight_layout(tr):
  """popup_scores equal to the weights convert to exactly the kernels (incl. the flatten permutation)."""
  reference = tr.build_random("cifar_model")
  state_dict = reference.state_dict()
  state_dict.update(
    {k.removesuffix("weight") + "popup_scores": v.clone() for k, v in state_dict.items() if k.endswith("weight")}
  )
  variables, scores = convert.from_torch_state_dict(state_dict, "cifar_model", 10)
  expected = jax.tree_util.tree_map_with_path(lambda p, v: v if p[-1].key == "kernel" else None, variables["params"])
  _assert_trees_equal(scores, expected)


def test_scores_are_none_at_non_prunable_leaves(tr):
  variables, scores = convert.from_torch_state_dict(
    _with_scores(tr.build_random("resnet_tiny").state_dict()), "resnet_tiny", 10
  )
  flat_scores = traverse_util.flatten_dict(scores)
  assert flat_scores.keys() == traverse_util.flatten_dict(variables["params"]).keys()
  for path, value in flat_scores.items():
    assert (value is not None) == (path[-1] == "kernel"), path


@pytest.mark.parametrize("name", ["cifar_model", "vgg_tiny"])
def test_masks_and_masked_forward_equal_reference_getsubnet(name, tr):
  """Reference GetSubnet on the torch scores gives our topk_mask on the converted scores, and masked forwards agree."""
  import torch  # pylint: disable=g-import-not-at-top

  k = 0.3
  reference = tr.build_random(name)
  state_dict = _with_scores(reference.state_dict())
  variables, scores = convert.from_torch_state_dict(state_dict, name, 10)
  torch_masks = {
    key.removesuffix("popup_scores") + "weight": tr.get_subnet(value, k)
    for key, value in state_dict.items()
    if key.endswith("popup_scores")
  }

  @jax.jit
  def masks_and_masked_params(params, scores):
    masks = jax.tree.map(lambda s: None if s is None else masking.topk_mask(s, k), scores, is_leaf=lambda s: s is None)
    return masks, masking.apply_masks(params, scores, k)

  our_masks, masked = masks_and_masked_params(variables["params"], scores)
  exported = convert.to_torch_state_dict(variables, our_masks, model_name=name)  # masks in the popup_scores slots
  for key, mask in torch_masks.items():
    if not key.startswith("sub_block1."):  # unused by the WRN (and exported as a copy of block1)
      np.testing.assert_array_equal(exported[key.removesuffix("weight") + "popup_scores"], mask.numpy(), err_msg=key)
  with torch.no_grad():
    for key, mask in torch_masks.items():
      reference.get_parameter(key).mul_(mask)
  x = _inputs(name)
  np.testing.assert_allclose(
    _our_logits(name, {**variables, "params": masked}, x), tr.logits(reference, x), atol=1e-4, rtol=1e-4
  )


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", TINY + ["cifar_model", "mnist_model"])
def test_round_trip_from_our_variables_is_identity(name):
  _, _, variables = random_variables(name)
  scores = jax.tree_util.tree_map_with_path(lambda p, v: -v if p[-1].key == "kernel" else None, variables["params"])
  state_dict = convert.to_torch_state_dict(variables, scores, model_name=name)
  assert all(isinstance(v, np.ndarray) for v in state_dict.values())
  back, back_scores = convert.from_torch_state_dict(state_dict, name, 10)
  _assert_trees_equal(back, variables)
  _assert_trees_equal(back_scores, scores)


@pytest.mark.parametrize("name", ["cifar_model", "vgg_tiny", "wrn_tiny", "resnet_imagenet_tiny"])
def test_round_trip_from_a_torch_checkpoint_is_identity(name, tr):
  state_dict = _with_scores(tr.build_random(name).state_dict())
  variables, scores = convert.from_torch_state_dict(state_dict, name, 10)
  back = convert.to_torch_state_dict(variables, scores, model_name=name, as_torch=True)
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    if key.startswith("sub_block1."):  # The WRN's unused block is exported as a copy of block1.
      np.testing.assert_array_equal(back[key].numpy(), state_dict[key.removeprefix("sub_")].numpy(), err_msg=key)
    else:
      np.testing.assert_array_equal(back[key].numpy(), value.numpy(), err_msg=key)


def test_torch_key_rule():
  assert convert.torch_key(("params", "layer1_0", "conv1", "kernel")) == "layer1.0.conv1.weight"
  assert convert.torch_key(("params", "features_0", "kernel")) == "features.0.weight"
  assert convert.torch_key(("batch_stats", "block1", "layer_0", "bn1", "var")) == "block1.layer.0.bn1.running_var"
  assert convert.torch_key(("params", "pre_layers_1", "scale")) == "pre_layers.1.weight"
  assert convert.torch_key(("params", "5", "bias")) == "5.bias"


def test_dataparallel_prefix_and_wrn_sub_block1_are_accepted(tr):
  state_dict = tr.build_random("wrn_tiny").state_dict()
  assert any(k.startswith("sub_block1.") for k in state_dict)
  variables, _ = convert.from_torch_state_dict(state_dict, "wrn_tiny", 10)
  prefixed, _ = convert.from_torch_state_dict({"module." + k: v for k, v in state_dict.items()}, "wrn_tiny", 10)
  _assert_trees_equal(prefixed, variables)


def test_import_copies_instead_of_aliasing_torch_memory(tr):
  import torch  # pylint: disable=g-import-not-at-top

  reference = tr.build_random("resnet_tiny")
  variables, _ = convert.from_torch_state_dict(reference.state_dict(), "resnet_tiny", 10)
  before = np.array(variables["batch_stats"]["bn1"]["mean"])
  with torch.no_grad():
    reference.bn1.running_mean.add_(1.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], before)


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def resnet_tiny_state_dict():
  _, _, variables = random_variables("resnet_tiny")
  return convert.to_torch_state_dict(variables, model_name="resnet_tiny")


def test_wrong_model_names_the_key(resnet_tiny_state_dict):
  with pytest.raises(
    ValueError,
    match=r"fit model 'wrn_tiny': missing keys \['block1\.layer\.0\.bn1\.bias', .*"
    r"not used by the model \['layer1\.0\.bn1\.bias', .*\(57 in all\)$",
  ):
    convert.from_torch_state_dict(resnet_tiny_state_dict, "wrn_tiny", 10)
  state_dict = {k: v[:, :, :2] if k == "layer3.0.conv2.weight" else v for k, v in resnet_tiny_state_dict.items()}
  with pytest.raises(
    ValueError,
    match=r"'layer3\.0\.conv2\.weight' has shape \(32, 32, 2, 3\), the model expects "
    r"\(32, 32, 3, 3\)",
  ):
    convert.from_torch_state_dict(state_dict, "resnet_tiny", 10)


def test_missing_key_is_named(resnet_tiny_state_dict):
  state_dict = {k: v for k, v in resnet_tiny_state_dict.items() if k != "layer2.0.shortcut.1.running_var"}
  with pytest.raises(ValueError, match=r"missing keys \['layer2\.0\.shortcut\.1\.running_var'\]$"):
    convert.from_torch_state_dict(state_dict, "resnet_tiny", 10)


def test_wrong_number_of_classes_is_named(resnet_tiny_state_dict):
  with pytest.raises(ValueError, match=r"'linear\.(weight|bias)' has shape \((10, 64|10,)\)"):
    convert.from_torch_state_dict(resnet_tiny_state_dict, "resnet_tiny", 5)


def test_unused_keys_are_named(resnet_tiny_state_dict):
  state_dict = {
    **resnet_tiny_state_dict,
    "fc.weight": np.zeros((10, 64), np.float32),
    "sub_block1.layer.0.bn1.weight": np.ones(8, np.float32),
  }
  with pytest.raises(ValueError, match=r"not used by the model \['fc\.weight', 'sub_block1\.layer\.0\.bn1\.weight'\]$"):
    convert.from_torch_state_dict(state_dict, "resnet_tiny", 10)


def test_partial_scores_name_the_missing_score(resnet_tiny_state_dict):
  state_dict = {**resnet_tiny_state_dict, "conv1.popup_scores": np.ones((8, 3, 3, 3), np.float32)}
  with pytest.raises(ValueError, match=r"missing keys \[.*'layer1\.0\.conv1\.popup_scores'.*\(12 in all\)"):
    convert.from_torch_state_dict(state_dict, "resnet_tiny", 10)


def test_unknown_model_name(resnet_tiny_state_dict):
  with pytest.raises(ValueError, match="valid names"):
    convert.from_torch_state_dict(resnet_tiny_state_dict, "resnet_small", 10)


@pytest.mark.parametrize(
  "name, input_shape, changed",
  [
    ("cifar_model", (16, 16, 1), {"0", "5"}),  # CNN-small on the demo's digits: 1 channel, Linear(512, 100)
    ("wrn_28_1", (16, 16, 1), {"conv1"}),
    ("mnist_model", (28, 28, 1), set()),  # the input the reference's class is written for
  ],
)
def test_reference_model_names_the_class_and_every_layer_shape_the_export_needs(name, input_shape, changed):
  torch = pytest.importorskip("torch")
  import re  # pylint: disable=g-import-not-at-top

  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top  (needs torch)

  model = models.get_model(name, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  exported = convert.to_torch_state_dict(variables, model_name=name, input_shape=input_shape)
  text = convert.reference_model(name, 10, input_shape, subnet=False)
  file = {"cifar_model": "basic.py", "wrn_28_1": "wrn_cifar.py", "mnist_model": "basic.py"}[name]
  assert f"inspire-group/hydra models/{file} {name}(nn.Conv2d, nn.Linear, " in text
  stated = re.findall(r"([\w.]+): (Conv2d|Linear)\((\d+), (\d+)(?:, kernel_size=(\d+))?\) \(written: ", text)
  assert {module for module, *_ in stated} == changed, text
  for module, kind, fan_in, fan_out, size in stated:  # the stated layer has the exported tensor's shape
    shape = (int(fan_out), int(fan_in), *((int(size),) * 2 if kind == "Conv2d" else ()))
    assert exported[f"{module}.weight"].shape == shape
  # Every other weight already has the shape of the reference's class as written (a PyTorch re-statement).
  written = {k: tuple(v.shape) for k, v in tr.build(name, 10).state_dict().items()}
  assert {k for k, v in exported.items() if written[k] != v.shape} == {f"{m}.weight" for m in changed}
  assert "permute(0, 3, 1, 2).contiguous()" in text and isinstance(torch.__version__, str)
