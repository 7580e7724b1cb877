"""A tiny Vision Transformer for 28x28x1 inputs (Fashion-MNIST), in Linen and in NNX.

Written as a plain Flax user would write it: nothing here knows about pruning. Patch 4 (7x7 = 49
patches) embedded by a strided conv, a class token, a learned position embedding, pre-norm
encoder blocks (LayerNorm -> multi-head self-attention -> residual add; LayerNorm -> MLP ->
residual add), a final LayerNorm and a Dense head on the class token.

The Linen version creates the class token and position embedding with the width of the input
(as google-research/vision_transformer does); the NNX version creates them at construction.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

PATCH = 4
DIM = 64
HEADS = 4
DEPTH = 4
MLP = 128


class EncoderBlockLinen(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name='attn')(y, y)
    x = x + y
    y = nn.LayerNorm(name='ln2')(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, name='mlp1')(y))
    y = nn.Dense(x.shape[-1], name='mlp2')(y)
    return x + y


class ViTTinyLinen(nn.Module):
  num_classes: int = 10
  dim: int = DIM
  depth: int = DEPTH
  num_heads: int = HEADS
  mlp_dim: int = MLP

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.dim, (PATCH, PATCH), strides=PATCH, padding='VALID', name='patch')(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], c))
    x = x + pos
    for i in range(self.depth):
      x = EncoderBlockLinen(self.num_heads, self.mlp_dim, name=f'block{i}')(x)
    x = nn.LayerNorm(name='ln')(x)
    return nn.Dense(self.num_classes, name='head')(x[:, 0])


class EncoderBlockNNX(nnx.Module):

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=dim, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.mlp2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x):
    y = self.ln1(x)
    x = x + self.attn(y)
    y = self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))
    return x + y


class ViTTinyNNX(nnx.Module):

  def __init__(self, num_classes: int = 10, dim: int = DIM, depth: int = DEPTH,
               num_heads: int = HEADS, mlp_dim: int = MLP, *, rngs: nnx.Rngs):
    n = (28 // PATCH) ** 2 + 1
    self.patch = nnx.Conv(1, dim, (PATCH, PATCH), strides=PATCH, padding='VALID', rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, n, dim)))
    self.blocks = nnx.List([EncoderBlockNNX(dim, num_heads, mlp_dim, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.patch(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = jnp.broadcast_to(self.cls[...], (b, 1, c))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x)[:, 0])
