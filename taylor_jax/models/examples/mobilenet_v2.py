"""A small MobileNetV2 for 28x28x1 inputs (Fashion-MNIST), in Linen and in NNX.

A stride-2 stem (28 -> 14 -> 7 -> 4 pixels over the network) keeps it cheap: XLA:CPU runs
depthwise convolutions (and the backward pass of strided ones) several times slower than dense
3x3 convolutions of the same width.

Written as a plain Flax user would write it: nothing here knows about pruning.

Inverted residual block: 1x1 expand conv + BN + relu6 (skipped when expand == 1), 3x3 depthwise
conv (``feature_group_count`` = channels) + BN + relu6, 1x1 project conv + BN, and an identity
residual when stride is 1 and the block keeps its width.

The residual decision comes from the constructor arguments (``residual`` below). Deciding it at
run time from shapes (``if x.shape[-1] == y.shape[-1]``) would silently change the network after
pruning, e.g. add a shortcut that the trained network never had once a block's output width
happens to match its input width (a pitfall a pruning library must catch).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

# (expand ratio, output channels, stride) per block; widths stay <= 64.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1),
    (3, 24, 2),
    (2, 24, 1),
    (2, 32, 2),
    (2, 32, 1),
)
STEM = 16
STEM_STRIDE = 2  # 28x28 -> 14x14: depthwise convs are slow on XLA:CPU
LAST = 64


class InvertedResidualLinen(nn.Module):
  in_channels: int
  out_channels: int
  stride: int
  expand: int

  @property
  def residual(self) -> bool:
    # From the configuration, not from `x.shape[-1] == y.shape[-1]` at run time: after pruning
    # the run-time widths can match (or differ) where the trained network's did not.
    return self.stride == 1 and self.in_channels == self.out_channels

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = self.in_channels * self.expand
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = x
    if self.expand != 1:
      y = nn.Conv(hidden, (1, 1), use_bias=False, name='expand')(y)
      y = nn.relu6(bn('expand_bn')(y))
    y = nn.Conv(hidden, (3, 3), strides=self.stride, padding=1, feature_group_count=hidden,
                use_bias=False, name='depthwise')(y)
    y = nn.relu6(bn('depthwise_bn')(y))
    y = nn.Conv(self.out_channels, (1, 1), use_bias=False, name='project')(y)
    y = bn('project_bn')(y)
    return x + y if self.residual else y


class MobileNetV2Linen(nn.Module):
  num_classes: int = 10
  blocks: Sequence[tuple[int, int, int]] = BLOCKS

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(STEM, (3, 3), strides=STEM_STRIDE, padding=1, use_bias=False, name='stem')(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='stem_bn')(x))
    in_ch = STEM
    for i, (t, c, s) in enumerate(self.blocks):
      x = InvertedResidualLinen(in_ch, c, s, t, name=f'block{i}')(x, train)
      in_ch = c
    x = nn.Conv(LAST, (1, 1), use_bias=False, name='last')(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


class InvertedResidualNNX(nnx.Module):

  def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int, *,
               rngs: nnx.Rngs):
    hidden = in_channels * expand
    # Decided once, from the configuration (see the module docstring).
    self.residual = stride == 1 and in_channels == out_channels
    if expand != 1:
      self.expand = nnx.Conv(in_channels, hidden, (1, 1), use_bias=False, rngs=rngs)
      self.expand_bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    else:
      self.expand = None
      self.expand_bn = None
    self.depthwise = nnx.Conv(hidden, hidden, (3, 3), strides=stride, padding=1,
                              feature_group_count=hidden, use_bias=False, rngs=rngs)
    self.depthwise_bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.project = nnx.Conv(hidden, out_channels, (1, 1), use_bias=False, rngs=rngs)
    self.project_bn = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    y = x
    if self.expand is not None:
      y = nnx.relu6(self.expand_bn(self.expand(y)))
    y = nnx.relu6(self.depthwise_bn(self.depthwise(y)))
    y = self.project_bn(self.project(y))
    return x + y if self.residual else y


class MobileNetV2NNX(nnx.Module):

  def __init__(self, num_classes: int = 10, blocks: Sequence[tuple[int, int, int]] = BLOCKS, *,
               rngs: nnx.Rngs):
    self.stem = nnx.Conv(1, STEM, (3, 3), strides=STEM_STRIDE, padding=1, use_bias=False,
                         rngs=rngs)
    self.stem_bn = nnx.BatchNorm(STEM, momentum=0.9, rngs=rngs)
    layers = []
    in_ch = STEM
    for t, c, s in blocks:
      layers.append(InvertedResidualNNX(in_ch, c, s, t, rngs=rngs))
      in_ch = c
    self.blocks = nnx.List(layers)
    self.last = nnx.Conv(in_ch, LAST, (1, 1), use_bias=False, rngs=rngs)
    self.last_bn = nnx.BatchNorm(LAST, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(LAST, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu6(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    x = nnx.relu6(self.last_bn(self.last(x)))
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x)
