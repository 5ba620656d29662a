"""Vision transformer (Dosovitskiy et al. 2021) for small images, written in Flax NNX.

Patch embedding (a p x p conv with stride p), a class token and learned position embeddings, `depth` pre-norm
blocks (LayerNorm -> multi-head self-attention -> residual; LayerNorm -> MLP with GELU -> residual), a final
LayerNorm and a dense head on the class token. No dropout (the pipeline's models are deterministic). The
prunable weights are the kernels: patch embedding, each block's `attn/qkv`, `attn/proj`, `mlp/fc1`, `mlp/fc2`,
and the head (`masking.is_prunable`); position embeddings, class token and LayerNorms are not pruned.

The model is built for the input it is first called with: `input_shape` (H, W, C) sizes the patch embedding's
input channels and the position embeddings (the zoo's NNX adapter passes it from the batch,
`own.NnxModel`). Registered names: `vit_cifar` (patch 4, width 192, depth 6, 3 heads, MLP 384: 1.8M parameters
on 32x32x3) and `vit_tiny` (patch 4, width 16, depth 2, 2 heads, MLP 32) for tests.

  model = models.get_model("vit_tiny", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  logits = model.apply(variables, x, train=False)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hydra_jax.models import own


class Attention(nnx.Module):
  """Multi-head self-attention: softmax(q k^T / sqrt(d)) v per head, then a dense projection."""

  def __init__(self, dim: int, heads: int, *, dtype: Any, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, tokens, dim = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(n, tokens, 3 * self.heads, dim // self.heads), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(dim // self.heads).astype(q.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return self.proj(out.reshape(n, tokens, dim))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x)))


class Block(nnx.Module):
  def __init__(self, dim: int, heads: int, mlp_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):
  """ViT on NHWC images in [0, 1] -> float32 logits.

  Args:
    num_classes: logits.
    input_shape: (H, W, C) of the images; H and W multiples of `patch`.
    patch, dim, depth, heads, mlp_dim: patch side, token width, blocks, attention heads, MLP hidden width.
    dtype: compute dtype (parameters stay float32).
  """

  def __init__(
    self,
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    patch: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    height, width, channels = input_shape
    if height % patch or width % patch or dim % heads:
      raise ValueError(
        f"ViT: image {height}x{width} must tile into {patch}x{patch} patches and {dim=} split in {heads=}"
      )
    tokens = (height // patch) * (width // patch) + 1
    self.embed = nnx.Conv(channels, dim, (patch, patch), strides=patch, padding="VALID", dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([Block(dim, heads, mlp_dim, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.embed(x)
    n, _, _, dim = x.shape
    cls = jnp.broadcast_to(self.cls_token.value, (n, 1, dim)).astype(x.dtype)
    x = jnp.concatenate([cls, x.reshape(n, -1, dim)], axis=1) + self.pos_embedding.value.astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0]).astype(jnp.float32)


def num_params(
  input_shape: tuple[int, int, int], num_classes: int, patch: int, dim: int, depth: int, mlp_dim: int
) -> int:
  """The ViT's parameter count by hand: embedding, class token, positions, blocks, final LayerNorm, head."""
  height, width, channels = input_shape
  tokens = (height // patch) * (width // patch) + 1
  block = (
    2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp_dim + mlp_dim) + (mlp_dim * dim + dim)
  )
  return (
    patch * patch * channels * dim
    + dim
    + dim
    + tokens * dim
    + depth * block
    + 2 * dim
    + dim * num_classes
    + num_classes
  )


CONFIGS = {
  "vit_cifar": {"patch": 4, "dim": 192, "depth": 6, "heads": 3, "mlp_dim": 384},
  "vit_tiny": {"patch": 4, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32},
}


def _build(settings: dict[str, int], num_classes: int, dtype: Any = jnp.float32, bn_axis_name: str | None = None):
  del bn_axis_name  # no BatchNorm
  return own.NnxModel(ViT, tuple(sorted({**settings, "num_classes": num_classes, "dtype": dtype}.items())))


MODELS = {name: functools.partial(_build, settings) for name, settings in CONFIGS.items()}
