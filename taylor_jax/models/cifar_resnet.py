"""CIFAR-style ResNets (He et al. 2016, section 4.2): ResNet-8/20/56, 3 stages of basic blocks.

Projection shortcuts (1x1 conv + BN) where the width or resolution changes. Groups:

* ``stage{s}`` (kind ``residual``): the residual stream of stage ``s``: the stem (stage 1), every
  block's conv2/bn2 and projection, every consumer (conv1 and projection of the next stage, the
  classifier). Gate after the add and the final ReLU of every block of the stage (and after the
  stem's ReLU for stage 1), shared by all of them, as the reference's "skip" gates.
* ``stage{s}.block{b}`` (kind ``channel``): conv1 output / bn1 / conv2 input; gate after bn1.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from taylor_jax.groups import ChannelGroup
from taylor_jax.models import common as C


class CifarResNet(nn.Module):
  widths: Mapping[str, int]
  num_classes: int = 10
  blocks_per_stage: int = 3
  axis_name: Optional[str] = None

  @staticmethod
  def full_widths(blocks_per_stage: int = 3, base: Sequence[int] = (16, 32, 64)) -> dict[str, int]:
    w = {}
    for s, c in enumerate(base, start=1):
      w[f'stage{s}'] = c
      for b in range(blocks_per_stage):
        w[f'stage{s}.block{b}'] = c
    return w

  def _needs_projection(self, s: int, b: int) -> bool:
    return b == 0 and s > 1

  def groups(self) -> tuple[ChannelGroup, ...]:
    nb, groups = self.blocks_per_stage, []
    for s in (1, 2, 3):
      slices = []
      if s == 1:
        slices += C.conv_out('stem_conv') + C.norm('stem_bn')
      for b in range(nb):
        blk = f'stage{s}_block{b}'
        slices += C.conv_out(f'{blk}/conv2') + C.norm(f'{blk}/bn2')
        if self._needs_projection(s, b):
          slices += C.conv_out(f'{blk}/proj_conv') + C.norm(f'{blk}/proj_bn')
        if b > 0:
          slices += C.conv_in(f'{blk}/conv1')
      if s == 1:
        slices += C.conv_in('stage1_block0/conv1')
      if s < 3:
        slices += C.conv_in(f'stage{s + 1}_block0/conv1') + C.conv_in(f'stage{s + 1}_block0/proj_conv')
      else:
        slices += C.dense_in('head')
      groups.append(ChannelGroup(f'stage{s}', self.widths[f'stage{s}'], tuple(slices), 'residual',
                                 'after the add and ReLU of every block of the stage'))
      for b in range(nb):
        blk = f'stage{s}_block{b}'
        groups.append(ChannelGroup(
            f'stage{s}.block{b}', self.widths[f'stage{s}.block{b}'],
            tuple(C.conv_out(f'{blk}/conv1') + C.norm(f'{blk}/bn1') + C.conv_in(f'{blk}/conv2')),
            'channel', 'after bn1, before ReLU', gate_after_norm=True))
    return tuple(groups)

  @nn.compact
  def __call__(self, x, gates=None, train: bool = False):
    w = self.widths
    x = C.conv(w['stage1'], 3, name='stem_conv')(x)
    x = C.gate(nn.relu(C.batch_norm(train, self.axis_name, 'stem_bn')(x)), gates, 'stage1')
    for s in (1, 2, 3):
      for b in range(self.blocks_per_stage):
        x = BasicBlock(w[f'stage{s}.block{b}'], w[f'stage{s}'], 2 if (b == 0 and s > 1) else 1,
                       self._needs_projection(s, b), self.axis_name, name=f'stage{s}_block{b}')(
                           x, gates, f'stage{s}.block{b}', f'stage{s}', train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


class BasicBlock(nn.Module):
  """conv3x3-BN-[gate]-ReLU-conv3x3-BN, + shortcut, ReLU, [stream gate]."""
  mid: int
  out: int
  stride: int
  projection: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, gates, mid_group: str, out_group: str, train: bool):
    bn = lambda name: C.batch_norm(train, self.axis_name, name)
    y = C.conv(self.mid, 3, self.stride, name='conv1')(x)
    y = nn.relu(C.gate(bn('bn1')(y), gates, mid_group))
    y = bn('bn2')(C.conv(self.out, 3, name='conv2')(y))
    if self.projection:
      x = bn('proj_bn')(C.conv(self.out, 1, self.stride, name='proj_conv')(x))
    return C.gate(nn.relu(x + y), gates, out_group)
