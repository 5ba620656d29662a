"""Tests of the model zoo: registry, parameter counts against PyTorch re-statements, forwards, BatchNorm semantics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from zoo_helpers import random_variables as _init

from hydra_jax import convert
from hydra_jax import models
from hydra_jax.models import layers

ALIASES = {"cnn_small", "cnn_large", "ResNet18", "ResNet34", "ResNet50"}
NAMES = [n for n in models.model_names() if n not in ALIASES]
LINEN_NAMES = [n for n in NAMES if models.is_zoo(n)]  # with a PyTorch reference (the NNX ViT has none)
DEEP = {"resnet101", "resnet152", "wrn_34_10"}  # same code as resnet50 / wrn_28_10, only slower to trace
TINY = [
  "cnn_tiny",
  "vgg_tiny",
  "wrn_tiny",
  "resnet_tiny",
  "resnet_imagenet_tiny",
  "mobilenet_v2_tiny",
  "googlenet_tiny",
]
BIG_FORWARD = [
  "mnist_model",
  "mnist_model_large",
  "cifar_model",
  "cifar_model_large",
  "vgg16_bn",
  "vgg16",
  "wrn_28_4",
  "resnet18",
  "resnet50",
  "resnet50_imagenet",
  "mobilenet_v2",
  "googlenet",
]


@pytest.fixture(scope="module")
def tr():
  """The PyTorch re-statements of the reference models (skips when torch is absent)."""
  pytest.importorskip("torch")
  import torch_reference  # pylint: disable=g-import-not-at-top

  return torch_reference


@functools.lru_cache
def _shapes(name, num_classes=10, **options):
  model = models.get_model(name, num_classes, **options)
  x = jax.ShapeDtypeStruct((2, *models.input_shape(name)), jnp.float32)
  return model, x, jax.eval_shape(lambda x: model.init(jax.random.key(0), x[:1], train=False), x)


def _count(tree, leaf_name=None):
  flat = jax.tree_util.tree_leaves_with_path(tree)
  return sum(math.prod(v.shape) for p, v in flat if leaf_name is None or p[-1].key == leaf_name)


# ------------------------------------------------------------------------------------------------ registry
def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"'resnet19'.*resnet18.*wrn_28_4"):
    models.get_model("resnet19", 10)
  with pytest.raises(ValueError, match="resnet19"):
    models.input_shape("resnet19")


@pytest.mark.parametrize("num_classes", [0, -3, 2.0])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("cnn_tiny", num_classes)


def test_aliases_build_the_same_architecture():
  for alias, name in [
    ("cnn_small", "cifar_model"),
    ("cnn_large", "cifar_model_large"),
    ("ResNet50", "resnet50_imagenet"),
  ]:
    assert models.get_model(alias, 10) == models.get_model(name, 10)


@pytest.mark.parametrize("name", ["resnet_tiny", "wrn_tiny", "mobilenet_v2_tiny", "googlenet_tiny"])
def test_width_scales_the_output_channels_of_every_conv_and_keeps_the_layout(name):
  full, narrow = _kernel_shapes(name), _kernel_shapes(name, width=0.5)
  assert full.keys() == narrow.keys() and models.width_scalable(name)
  for path, shape in full.items():  # conv kernels (h, w, in / groups, out), the classifier (in, classes)
    if len(shape) == 4:
      assert narrow[path][:2] == shape[:2] and narrow[path][-1] == layers.scale_width(shape[-1], 0.5), path
    else:
      assert len(narrow[path]) == 2 and narrow[path][-1] == 10, path


def test_width_one_is_the_registered_network_and_other_widths_need_a_scalable_family():
  assert models.get_model("resnet18", 10, width=1.0) == models.get_model("resnet18", 10)
  assert not models.width_scalable("cnn_small")
  with pytest.raises(ValueError, match="no width option"):
    models.get_model("cnn_small", 10, width=0.5)
  with pytest.raises(ValueError, match="width must be positive"):
    models.get_model("resnet18", 10, width=0.0)


def _kernel_shapes(name, **options):
  """{path: shape} of the conv / dense kernels of model `name`."""
  flat = jax.tree_util.tree_leaves_with_path(_shapes(name, **options)[2]["params"])
  return {jax.tree_util.keystr(p): v.shape for p, v in flat if p[-1].key == "kernel"}


# ------------------------------------------------------------------------------------------------ parameter counts
def test_counts_given_in_the_spec():
  """Prunable (conv + linear) weight counts stated in the reference spec, section 6."""
  assert _count(_shapes("vgg16_bn")[2]["params"], "kernel") == 15_302_848
  assert _count(_shapes("cifar_model")[2]["params"], "kernel") == 214_760
  assert _count(_shapes("cifar_model_large")[2]["params"], "kernel") == 2_465_632


@pytest.mark.parametrize("name", LINEN_NAMES)
def test_param_counts_equal_pytorch_reference(name, tr):
  import torch  # pylint: disable=g-import-not-at-top

  with torch.device("meta"):
    reference = tr.build(name, 10)
  params = _shapes(name)[2]["params"]
  assert _count(params) == tr.count_params(reference)
  assert _count(params, "kernel") == tr.count_weights(reference)


# ------------------------------------------------------------------------------------------------ forwards
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in NAMES])
def test_output_shapes_train_and_eval(name):
  """Abstract (eval_shape) forwards of every model in both modes, with 7 classes."""
  model, x, variables = _shapes(name, num_classes=7)
  apply_fn = models.make_apply_fn(model)
  for train in (False, True):
    logits, new_vars = jax.eval_shape(lambda v, x, train=train: apply_fn(v, x, train), variables, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert jax.tree.structure(new_vars) == jax.tree.structure(variables)
  assert set(variables) == (
    {"params"}
    if name.startswith(("cnn", "cifar", "mnist", "vit"))
    or name.startswith("vgg")
    and not name.endswith(("_bn", "tiny"))
    else {"params", "batch_stats"}
  )


@pytest.mark.parametrize("name", TINY)
def test_tiny_train_mode_matches_pytorch(name, tr):
  """Real train-mode forwards: logits and updated running statistics equal PyTorch's train mode.

  This checks BatchNorm's PyTorch semantics in every family: batch mean / biased variance for normalising, running
  variance updated with the unbiased one, momentum 0.1. (Eval-mode parity is in test_convert.py.)
  """
  reference = tr.build_random(name)
  variables, _ = convert.from_torch_state_dict(reference.state_dict(), name, 10)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, *models.input_shape(name))), jnp.float32)
  eval_logits = tr.logits(reference, x)
  reference.train()
  expected = tr.logits(reference, x)
  logits, new_vars = jax.jit(models.make_apply_fn(models.get_model(name, 10)), static_argnums=2)(variables, x, True)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, new_vars["params"], variables["params"])
  if "batch_stats" in variables:
    assert not np.allclose(expected, eval_logits, atol=1e-2)  # the batch statistics made a difference
    updated, _ = convert.from_torch_state_dict(reference.state_dict(), name, 10)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
      new_vars["batch_stats"],
      updated["batch_stats"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG_FORWARD)
def test_big_forward_train_and_eval(name):
  model, x, variables = _init(name, batch=2)
  apply_fn = models.make_apply_fn(model)
  for train in (False, True):
    logits, _ = apply_fn(variables, x, train)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_apply_fn_is_pure_under_jit_grad_vmap():
  model, x, variables = _init("vgg_tiny", batch=4)
  apply_fn = models.make_apply_fn(model)
  eval_logits, same = apply_fn(variables, x, False)
  assert same is variables and eval_logits.shape == (4, 10) and np.all(np.isfinite(eval_logits))

  def loss(params):
    logits, new_vars = apply_fn({**variables, "params": params}, x, True)
    return logits.sum(), new_vars

  grads, new_vars = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert _count(grads) == _count(variables["params"])
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(
    new_vars["batch_stats"]["features_1"]["mean"],
    apply_fn(variables, x, True)[1]["batch_stats"]["features_1"]["mean"],
    rtol=1e-5,
    atol=1e-7,
  )
  per_example = jax.jit(jax.vmap(lambda xi: apply_fn(variables, xi[None], False)[0][0]))(x)
  np.testing.assert_allclose(
    per_example, jax.jit(apply_fn, static_argnums=2)(variables, x, False)[0], rtol=1e-5, atol=1e-6
  )


def test_cnn_jaxpr_is_sequential_conv_dense_relu():
  """The BN-free CNNs stay traceable by jaxpr-based bound propagation: conv, dense, bias add, relu, reshape only;
  on CPU a conv (explicit input gradient, per-tap kernel gradients where faster) is a custom_vjp_call around one
  conv."""
  model, x, variables = _init("cifar_model_large")
  jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(x)
  primitives = set()
  convs = [kernel for kernel in jax.tree.leaves(variables["params"]) if kernel.ndim == 4]
  assert len(convs) == [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns].count("custom_vjp_call") == 4  # each conv
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "custom_vjp_call":
      assert [inner.primitive.name for inner in eqn.params["call_jaxpr"].jaxpr.eqns] == ["conv_general_dilated"]
    primitives.add("conv_general_dilated" if eqn.primitive.name == "custom_vjp_call" else eqn.primitive.name)
  assert primitives == {
    "conv_general_dilated",
    "dot_general",
    "add",
    "broadcast_in_dim",
    "custom_jvp_call",
    "reshape",
  }


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model32, x, variables = _init("vgg_tiny")
  model16 = models.get_model("vgg_tiny", 10, dtype=jnp.bfloat16)
  variables16 = jax.eval_shape(lambda x: model16.init(jax.random.key(0), x, train=False), x[:1])
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables16))
  logits16 = model16.apply(variables, x, train=False)
  logits32 = model32.apply(variables, x, train=False)
  assert logits16.dtype == jnp.float32
  assert not np.allclose(logits16, logits32, rtol=1e-5)  # bf16 rounding shows: the compute dtype took effect
  np.testing.assert_allclose(logits16, logits32, atol=0.03 * np.abs(logits32).max())


# ------------------------------------------------------------------------------------------------ initialisation
def _init_params(*names):
  """Real inits of the named models, in one jit compile (an rbg key compiles much faster than threefry on CPU)."""

  def init_all(key):
    return [
      models.get_model(name, 10).init(key, jnp.zeros((1, *models.input_shape(name))), train=False)["params"]
      for name in names
    ]

  return jax.jit(init_all)(jax.random.key(1, impl="rbg"))


def test_initialisations_follow_the_reference():
  vgg, wrn, res, cnn = _init_params("vgg_tiny", "wrn_tiny", "resnet_tiny", "cnn_tiny")
  conv = vgg["features_4"]["kernel"]  # 3x3, 8 -> 16: kaiming_normal fan_out, std sqrt(2 / (9 * 16))
  assert conv.shape == (3, 3, 8, 16)
  np.testing.assert_allclose(conv.std(), math.sqrt(2 / (9 * 16)), rtol=0.1)
  np.testing.assert_allclose(vgg["classifier_0"]["kernel"].std(), 0.01, rtol=0.1)
  assert not np.any(vgg["classifier_0"]["bias"]) and np.all(vgg["features_1"]["scale"] == 1)

  np.testing.assert_allclose(wrn["block3"]["layer_0"]["conv2"]["kernel"].std(), math.sqrt(2 / (9 * 64)), rtol=0.05)
  fc = wrn["fc"]  # PyTorch default weight U(+-1/sqrt(64)), zero bias
  assert 0.9 / 8 < np.abs(fc["kernel"]).max() <= 1 / 8 and not np.any(fc["bias"])

  w = res["layer4_0"]["conv2"]["kernel"]  # PyTorch default: U(+-1/sqrt(9 * 64)), std = bound / sqrt(3)
  bound = 1 / math.sqrt(9 * 64)
  assert np.abs(w).max() <= bound
  np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.03)
  b = res["linear"]["bias"]  # PyTorch default bias: U(+-1/sqrt(fan_in))
  assert 0.5 / 8 < np.abs(b).max() <= 1 / 8  # 10 draws

  # reference cifar CNNs: convs N(0, 2 / (k * k * out)) with zero bias
  np.testing.assert_allclose(cnn["2"]["kernel"].std(), math.sqrt(2 / (16 * 8)), rtol=0.1)
  assert not np.any(cnn["2"]["bias"])


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.devices(8)
def test_batchnorm_cross_device_statistics_equal_full_batch():
  """With axis_name, 8 devices x 2 examples normalise and update exactly like one batch of 16."""
  bn = layers.BatchNorm(axis_name="batch")
  x = jax.random.normal(jax.random.key(0), (16, 3, 3, 5)) * 2 + 1
  variables = layers.BatchNorm().init(jax.random.key(1), x, train=True)
  full_y, full_vars = layers.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
  def sharded(variables, x):
    return bn.apply(variables, x, train=True, mutable=["batch_stats"])

  y, new_vars = sharded(variables, x)
  np.testing.assert_allclose(y, full_y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), new_vars, full_vars)
  # Per-device statistics (no axis_name) would differ.
  local_y, _ = layers.BatchNorm().apply(variables, x[:2], train=True, mutable=["batch_stats"])
  assert not np.allclose(local_y, full_y[:2], atol=1e-3)


def test_batchnorm_by_hand():
  x = jnp.array([[1.0], [3.0], [5.0], [7.0]])  # mean 4, biased var 5, unbiased var 20/3
  bn = layers.BatchNorm(epsilon=0.0)
  variables = bn.init(jax.random.key(0), x, train=True)
  y, new_vars = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y[:, 0], (np.array([1, 3, 5, 7]) - 4) / math.sqrt(5), rtol=1e-6)
  np.testing.assert_allclose(new_vars["batch_stats"]["mean"], [0.1 * 4], rtol=1e-6)
  np.testing.assert_allclose(new_vars["batch_stats"]["var"], [0.9 + 0.1 * 20 / 3], rtol=1e-6)
  y_eval = bn.apply({**variables, **new_vars}, x, train=False)
  np.testing.assert_allclose(y_eval[:, 0], (np.array([1, 3, 5, 7]) - 0.4) / math.sqrt(0.9 + 2 / 3), rtol=1e-6)


@pytest.mark.parametrize("size", [(2, 2), (5, 7), (8, 3)])
def test_adaptive_avg_pool_matches_pytorch(size, tr):
  import torch  # pylint: disable=g-import-not-at-top

  x = np.random.default_rng(0).normal(size=(2, 3, *size)).astype(np.float32)
  expected = torch.nn.AdaptiveAvgPool2d((2, 2))(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(
    layers.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), (2, 2)), expected, rtol=1e-6, atol=1e-7
  )


def test_conv_padding_and_groups_match_pytorch(tr):
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  conv = torch.nn.Conv2d(6, 4, 4, stride=2, padding=1, groups=2)
  x = torch.rand(1, 6, 9, 9)
  params = {
    "kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
    "bias": jnp.asarray(conv.bias.detach().numpy()),
  }
  y = layers.Conv2d(4, 4, 2, 1, groups=2).apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(y, conv(x).detach().numpy().transpose(0, 2, 3, 1), atol=1e-6)
  with pytest.raises(ValueError, match="groups=4"):
    layers.Conv2d(4, 3, groups=4).init(jax.random.key(0), jnp.zeros((1, 5, 5, 6)))


def test_vgg_and_cnn_accept_other_input_sizes():
  """VGG's adaptive pooling makes 64x64 inputs work with the same parameters; the CNNs size their dense by input."""
  model, _, variables = _init("vgg_tiny")
  logits = jax.eval_shape(lambda x: model.apply(variables, x, train=False), jnp.zeros((1, 64, 64, 3)))
  assert logits.shape == (1, 10)
  cnn = models.get_model("mnist_model", 10)
  shapes = jax.eval_shape(lambda x: cnn.init(jax.random.key(0), x, train=False), jnp.zeros((1, 28, 28, 1)))
  assert shapes["params"]["5"]["kernel"].shape == (32 * 7 * 7, 100)
