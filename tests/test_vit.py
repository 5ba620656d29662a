"""Tests of the zoo's NNX vision transformer: its size by hand, 8 devices = 1 device, sound IBP bounds."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hydra_jax import bounds
from hydra_jax import config as config_lib
from hydra_jax import data
from hydra_jax import export
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel
from hydra_jax import sources
from hydra_jax import train
from hydra_jax.models import vit


def _count(name, shape):
  model = models.get_model(name, 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
  return variables, sum(math.prod(v.shape) for v in jax.tree.leaves(variables))


def test_parameter_counts_equal_the_hand_formula():
  # vit_tiny on 8x8x1 digits: patch 4 -> 4 patches + class token = 5 tokens of width 16; 2 blocks, MLP 32.
  embed, cls, pos = 4 * 4 * 1 * 16 + 16, 16, 5 * 16
  block = 2 * (16 + 16) + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)  # LNs, qkv, proj, MLP
  head = 2 * 16 + 16 * 10 + 10  # final LayerNorm, dense
  variables, total = _count("vit_tiny", (8, 8, 1))
  assert total == embed + cls + pos + 2 * block + head == 5018
  assert set(variables) == {"params"}
  # vit_cifar on 32x32x3: 64 patches + 1 tokens of width 192, 6 blocks, MLP 384.
  d, m = 192, 384
  block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
  _, total = _count("vit_cifar", (32, 32, 3))
  assert total == (4 * 4 * 3 * d + d) + d + 65 * d + 6 * block + 2 * d + d * 10 + 10
  # Prunable: the patch embedding, qkv, proj, fc1, fc2 of each block and the head; not positions or LayerNorms.
  prunable = masking.prunable_paths(variables["params"])
  assert len(prunable) == 2 + 4 * 2 and "pos_embedding" not in prunable


def _prune_state(config, params, tx_steps=10):
  scores = masking.init_scores(params, "kaiming_normal", jax.random.key(2))
  tx = optim.make_optimizer(config, "prune", optim.trainable_labels(params, scores, "prune", False), tx_steps)
  opt_state = tx.init({"params": params, "scores": scores})
  return train.TrainState(jnp.int32(0), params, scores, {}, opt_state, (), jax.random.PRNGKey(0), ()), tx


@pytest.mark.slow  # 40 CPU s of compiles; the zoo's 8-device equality is covered by the default run's other models
@pytest.mark.devices(8)
def test_eight_devices_give_the_single_device_result():
  config = config_lib.default_config()
  config.model.name, config.data.name, config.k = "vit_tiny", "digits", 0.25
  config.objective = config_lib.objective_config("benign")
  params = sources.init_variables(config, jax.random.key(0))["params"]
  state, tx = _prune_state(config, params)
  batches = [data.train_batches("digits", 32, seed=0).batch_at(i) for i in range(2)]
  finals = {}
  for mode, axis in (("single", None), ("shard_map", parallel.AXIS)):
    step = functools.partial(
      train.train_step,
      apply_fn=models.make_apply_fn(sources.build_model(config, axis)),
      objective=objectives.get_objective("benign"),
      config=config,
      tx=tx,
      k=0.25,
      steps_per_epoch=10,
    )
    runner = parallel.make_runner(step, mode)
    current = runner.put_state(state)
    for batch in batches:
      current, _ = runner(current, runner.put_batch(batch))
    finals[mode] = runner.get_state(current)
  for a, b in zip(jax.tree.leaves(finals["single"].scores), jax.tree.leaves(finals["shard_map"].scores)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.scores), jax.tree.leaves(finals["single"].scores))
  )


def _inside(values, lb, ub):
  return bool(np.all(values >= np.asarray(lb) - 1e-5) and np.all(values <= np.asarray(ub) + 1e-5))


def test_ibp_through_layernorm_softmax_and_attention_contains_sampled_outputs():
  """One block (LayerNorm, softmax attention, GELU MLP, residual adds): finite IBP bounds holding its outputs at
  uniform points and corners of the box (eps 1e-4: widths up to 7)."""
  block = vit.Block(16, 2, 32, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  lo, hi = x - 1e-4, x + 1e-4
  lb, ub = jax.jit(lambda a, b: bounds.ibp(block, a, b))(lo, hi)
  assert np.all(np.isfinite(lb)) and np.all(np.isfinite(ub)) and np.max(ub - lb) < 20  # 7.2 measured
  k1, k2 = jax.random.split(jax.random.key(1))
  points = jnp.concatenate(
    [
      lo + (hi - lo) * jax.random.uniform(k1, (64, *x.shape)),
      jnp.where(jax.random.bernoulli(k2, 0.5, (64, *x.shape)), hi, lo),
    ]
  )
  assert _inside(np.asarray(jax.vmap(block)(points)), lb, ub)


@pytest.mark.slow  # about 20 s of CPU, compiling both bounds through two blocks; one block is the test above
def test_ibp_and_crown_ibp_bounds_of_the_whole_vit_contain_its_sampled_logits():
  """IBP and CROWN-IBP bounds hold vit_tiny's logits; IBP multiplies widths about 10x per product of two intervals,
  so at eps 1e-3 (and even 1e-7) the second block's LayerNorm variance reaches 0 and its logits' bounds are
  infinite."""
  model = models.get_model("vit_tiny", 10)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  f = jax.jit(lambda z: model.apply(variables, z, train=False))
  lo, hi = jnp.clip(x - 1e-3, 0, 1), jnp.clip(x + 1e-3, 0, 1)
  logits = np.asarray(jax.vmap(f)(lo + (hi - lo) * jax.random.uniform(jax.random.key(2), (64, *x.shape))))
  for method in (bounds.ibp, bounds.crown_ibp):
    lb, ub = jax.jit(functools.partial(method, f))(lo, hi)
    assert not np.any(np.isnan(lb)) and not np.any(np.isnan(ub)) and _inside(logits, lb, ub)


@pytest.mark.slow
def test_the_vit_is_pretrained_and_pruned_through_the_pipeline(tmp_path):
  config = config_lib.default_config()
  config.model.name, config.data.name = "vit_tiny", "digits"
  config.data.batch_size = config.data.eval_batch_size = config.data.eval_examples = 32
  config.data.prefetch = 0
  config.objective = config_lib.objective_config("benign")
  config.eval.methods, config.stop_after_steps, config.k = (), 2, 0.25
  config.log.progress, config.checkpoint.async_save, config.parallel.mode = False, False, "single"
  train.run_stage(config, str(tmp_path / "pretrain"))
  config.stage, config.source = "prune", str(tmp_path / "pretrain")
  summary = train.run_stage(config, str(tmp_path / "prune"))
  sizes = masking.PathFilter().check(export.load_run(str(tmp_path / "prune")).trained_params)
  assert summary["kept_fraction"] == sum(n - int(0.75 * n) for n in sizes.values()) / sum(sizes.values())
  run = export.load_run(str(tmp_path / "prune"))
  assert run(jnp.zeros((3, 8, 8, 1))).shape == (3, 10)
  with pytest.raises(ValueError, match="compact network"):
    export.load_run(str(tmp_path / "prune"), compact=True)
