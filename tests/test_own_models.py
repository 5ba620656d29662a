"""A user's own Flax Linen and NNX models, defined in a file outside the package, through the whole pipeline.

The same network (conv -> BatchNorm -> ReLU, a residual add, a channel concatenation, global pooling, dense) is
written once in Linen and once in NNX with the same parameter paths; each is pretrained, pruned and finetuned
from the command line at tiny size, read back with `load_run`, evaluated with IBP and exported; the two give the
same logits and, trained from the same weights and scores, the same masks.
"""

import functools
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import errors
from hydra_jax import export
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel
from hydra_jax import sources
from hydra_jax import train
from tests import cli_in_process

NETS = textwrap.dedent(
  """
  import flax.linen as nn
  import jax.numpy as jnp
  from flax import nnx


  class LinenNet(nn.Module):
    width: int = 4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(self.width, (3, 3), name="stem")(x)))
      x = x + nn.relu(nn.Conv(self.width, (3, 3), name="conv")(x))  # residual add
      x = jnp.concatenate([x, nn.Conv(self.width, (1, 1), name="branch")(x)], axis=-1)  # concatenation
      return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


  def linen_factory(width=4, num_classes=10):
    return LinenNet(width=width, num_classes=num_classes)


  class NnxNet(nnx.Module):
    def __init__(self, width=4, num_classes=10, in_channels=1, *, rngs):
      self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(width, rngs=rngs)
      self.conv = nnx.Conv(width, width, (3, 3), rngs=rngs)
      self.branch = nnx.Conv(width, width, (1, 1), rngs=rngs)
      self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn(self.stem(x)))
      x = x + nnx.relu(self.conv(x))
      x = jnp.concatenate([x, self.branch(x)], axis=-1)
      return self.head(x.mean(axis=(1, 2)))


  class WithDropoutRngs(nnx.Module):
    def __init__(self, num_classes=10, *, rngs):
      self.head = nnx.Linear(1, num_classes, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.head(self.dropout(x.mean(axis=(1, 2))))
  """
)

CONFIG = textwrap.dedent(
  """
  from hydra_jax import config as config_lib


  def get_config(arg):
    config = config_lib.default_config()
    config.model.name = arg
    config.model.kwargs = {"width": 4}
    config.data.name = "digits"
    config.data.batch_size = 32
    config.data.eval_batch_size = 32
    config.data.eval_examples = 32
    config.data.prefetch = 0
    config.objective = config_lib.objective_config("benign")
    config.eval.eps, config.eval.step_size, config.eval.steps = 0.02, 0.01, 2
    config.eval.methods = ()
    for stage in config_lib.STAGES:
      config.stages[stage].epochs = 1
    config.stop_after_steps = 2
    config.optimizer.name, config.optimizer.schedule = "adam", "constant"
    config.log.progress = False
    config.checkpoint.async_save = False
    config.parallel.mode = "single"
    config.k = 0.25
    return config
  """
)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
  """(nets.py, config.py) written to a directory outside the package."""
  root = tmp_path_factory.mktemp("user")
  (root / "nets.py").write_text(NETS)
  (root / "config.py").write_text(CONFIG)
  return str(root / "nets.py"), str(root / "config.py")


def cli(*args):
  status, out, err = cli_in_process.run(*args)
  assert status == 0, err
  return out, err


# About a minute of CPU each (-m slow); the default run checks both kinds' logits, masks and 8-device runs below.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["LinenNet", "NnxNet"])
def test_an_own_model_goes_through_pretrain_prune_finetune_load_run_ibp_and_export(user_files, tmp_path, name):
  nets, config_file = user_files
  common = ["--config", f"{config_file}:{nets}:{name}"]
  runs = {stage: str(tmp_path / stage) for stage in ("pretrain", "prune", "finetune")}
  cli("train", *common, "--workdir", runs["pretrain"])
  _, printed = cli(
    "train", *common, "--config.stage=prune", f"--config.source={runs['pretrain']}", "--workdir", runs["prune"]
  )
  sizes = {"branch/kernel": 16, "conv/kernel": 144, "head/kernel": 80, "stem/kernel": 36}
  assert f"prunable: 4 leaves, {sum(sizes.values())} weights" in printed
  out, _ = cli(
    "train", *common, "--config.stage=finetune", f"--config.source={runs['prune']}", "--workdir", runs["finetune"]
  )
  summary = json.loads(out)
  assert summary["step"] == 2 and summary["prunable"] == sizes
  kept = {name: n - int(0.75 * n) for name, n in sizes.items()}  # masking.num_pruned: exactly per layer
  assert summary["kept_fraction"] == sum(kept.values()) / sum(sizes.values())

  run = export.load_run(runs["finetune"])
  params = run.variables["params"]
  assert {
    f"{layer}/kernel": int(np.count_nonzero(params[layer]["kernel"])) <= kept[f"{layer}/kernel"] for layer in ("stem",)
  }
  for layer in ("stem", "conv", "branch", "head"):
    mask = np.asarray(masking.compute_masks(run.scores, 0.25)[layer]["kernel"])
    assert mask.sum() == kept[f"{layer}/kernel"]
    assert np.all(np.asarray(params[layer]["kernel"])[mask == 0] == 0)  # pruned weights exactly 0
  images = data.iterate(sources.eval_split(run.config), range(1)).__next__()["image"]
  logits = run(images)
  assert logits.shape == (32, 10) and np.all(np.isfinite(logits))

  results = run.evaluate(["ibp", "pgd_linf"])
  assert results["num_examples"] == 32
  assert 0 <= results["ibp"] <= results["pgd_linf"] <= results["clean"] <= 1  # a verified point resists PGD

  npz = str(tmp_path / "model.npz")
  assert "wrote" in cli("export", "--workdir", runs["finetune"], f"--out={npz}")[0]
  flat = dict(np.load(npz))
  for path, value in jax.tree_util.tree_flatten_with_path(run.variables)[0]:
    np.testing.assert_array_equal(flat[masking.path_name(path)], value)

  status, _, err = cli_in_process.run("export", "--workdir", runs["finetune"], f"--out={tmp_path / 'model.pth'}")
  assert status == 1 and "PyTorch export maps the zoo's models" in err and len(err.strip().splitlines()) == 1


def tiny_config(spec):
  config = config_lib.default_config()
  config.model.name = spec
  config.model.kwargs = {"width": 4}
  config.data.name, config.data.batch_size, config.data.prefetch = "digits", 32, 0
  config.objective = config_lib.objective_config("pgd_at")
  config.objective.eps, config.objective.step_size, config.objective.steps = 0.05, 0.02, 2
  config.stage, config.k = "prune", 0.25
  config.optimizer.name, config.optimizer.schedule, config.stages.prune.lr = "adam", "constant", 0.05
  return config


def test_linen_and_nnx_versions_of_one_network_give_the_same_logits_and_masks(user_files):
  nets, _ = user_files
  configs = {kind: tiny_config(f"{nets}:{cls}") for kind, cls in (("linen", "LinenNet"), ("nnx", "NnxNet"))}
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  variables = sources.init_variables(configs["linen"], jax.random.key(0))
  shapes = jax.tree.map(jnp.shape, sources.init_variables(configs["nnx"], jax.random.key(0)))
  assert shapes == jax.tree.map(jnp.shape, variables)  # the same paths and shapes
  apply_fns = {kind: models.make_apply_fn(sources.build_model(c)) for kind, c in configs.items()}
  for train_mode in (False, True):
    (a, va), (b, vb) = (jax.jit(f, static_argnums=2)(variables, x, train_mode) for f in apply_fns.values())
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), va, vb)  # BN statistics

  # Prune both from the same weights and scores for 3 steps of PGD-AT: the same scores, hence the same masks.
  params, batch_stats = variables["params"], variables["batch_stats"]
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(2))
  batches = sources.train_batches(configs["linen"])
  final = {}
  for kind, config in configs.items():
    tx = optim.make_optimizer(config, "prune", optim.trainable_labels(params, scores, "prune", False), 44)
    opt_state = tx.init({"params": params, "scores": scores})
    state = train.TrainState(jnp.int32(0), params, scores, batch_stats, opt_state, (), jax.random.PRNGKey(0), ())
    step = functools.partial(
      train.train_step,
      apply_fn=apply_fns[kind],
      objective=objectives.get_objective("pgd_at"),
      config=config,
      tx=tx,
      k=0.25,
      steps_per_epoch=44,
      axis_name=None,
    )
    step = jax.jit(step)
    for i in range(3):
      state, _ = step(state, batches.batch_at(i))
    final[kind] = state
  masks = {kind: masking.compute_masks(state.scores, 0.25) for kind, state in final.items()}
  jax.tree.map(np.testing.assert_array_equal, masks["linen"], masks["nnx"])
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, final["linen"].scores, final["nnx"].scores)
  jax.tree.map(close, final["linen"].batch_stats, final["nnx"].batch_stats)
  start = masking.compute_masks(scores, 0.25)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(masks["nnx"])))  # they moved


@pytest.mark.parametrize(
  "attribute, message",
  [
    ("nosuch_module_xyz:Net", "cannot import module 'nosuch_module_xyz'"),
    ("NETS:Missing", "has no attribute 'Missing'"),
    ("/no/such/file.py:Net", "file /no/such/file.py does not exist"),
    ("NETS:WithDropoutRngs", "NNX model WithDropoutRngs holds a"),
  ],
)
def test_a_model_path_that_is_not_there_is_one_line_naming_it(user_files, attribute, message):
  nets, _ = user_files
  config = tiny_config(attribute.replace("NETS", nets))
  config.model.kwargs = {}
  with pytest.raises(errors.ConfigError if "WithDropout" not in attribute else ValueError, match=message) as error:
    if "WithDropout" in attribute:
      sources.init_variables(config, jax.random.key(0))
    else:
      config_lib.check_config(config)
  assert "\n" not in str(error.value)


def test_a_linen_factory_builds_the_same_network_as_its_class(user_files):
  nets, _ = user_files
  x = jnp.ones((2, 8, 8, 1))
  by_class, by_factory = (
    models.get_model(f"{nets}:{name}", 10, kwargs={"width": 4}) for name in ("LinenNet", "linen_factory")
  )
  variables = by_class.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(by_class.apply(variables, x), by_factory.apply(variables, x))


@pytest.mark.devices(8)
@pytest.mark.parametrize("name", ["LinenNet", "NnxNet"])
def test_eight_devices_give_the_single_device_result_with_batchnorm_over_the_device_axis(user_files, name):
  nets, _ = user_files
  config = tiny_config(f"{nets}:{name}")
  config.objective = config_lib.objective_config("benign")
  variables = sources.init_variables(config, jax.random.key(0))
  params = variables["params"]
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(2))
  tx = optim.make_optimizer(config, "prune", optim.trainable_labels(params, scores, "prune", False), 44)
  opt_state = tx.init({"params": params, "scores": scores})
  state = train.TrainState(
    jnp.int32(0), params, scores, variables["batch_stats"], opt_state, (), jax.random.PRNGKey(0), ()
  )
  batches = [data.train_batches("digits", 32, seed=0).batch_at(i) for i in range(2)]
  finals = {}
  for mode, axis in (("single", None), ("shard_map", parallel.AXIS)):
    step = functools.partial(
      train.train_step,
      apply_fn=models.make_apply_fn(sources.build_model(config, axis)),  # BatchNorm averages over `axis`
      objective=objectives.get_objective("benign"),
      config=config,
      tx=tx,
      k=0.25,
      steps_per_epoch=44,
    )
    runner = parallel.make_runner(step, mode)
    current = runner.put_state(state)
    for batch in batches:
      current, _ = runner(current, runner.put_batch(batch))
    finals[mode] = runner.get_state(current)
  for a, b in zip(jax.tree.leaves(finals["single"]), jax.tree.leaves(finals["shard_map"])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mask_include_exclude_choose_the_scored_leaves_of_a_run(user_files):
  nets, _ = user_files
  config = tiny_config(f"{nets}:NnxNet")
  config.mask.exclude = ("^stem/", "^head/")
  params = sources.init_variables(config, jax.random.key(0))["params"]
  scores = sources.initial_scores(config, "prune", params, {}, None, jax.random.key(1), None, "single")
  scored = {masking.path_name(p) for p, s in jax.tree_util.tree_flatten_with_path(scores)[0]}
  assert scored == {"branch/kernel", "conv/kernel"}
  assert sources.prunable_leaves(config, params) == {"branch/kernel": 16, "conv/kernel": 144}
  lwm = sources.restrict_scores(config, params, jax.tree.map(jnp.abs, params))  # a baseline's scores, restricted
  assert {masking.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(lwm)[0]} == scored
  config.mask.include = ("^nothing_here",)
  with pytest.raises(errors.ConfigError, match="^config.mask.include pattern '\\^nothing_here' matches no parameter"):
    sources.prunable_leaves(config, params)
  config.mask.include, config.mask.granularity = (), "channel"
  with pytest.raises(errors.ConfigError, match="they need mask.granularity='weight'"):
    config_lib.check_config(config)
