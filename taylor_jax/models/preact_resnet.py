"""Pre-activation ResNet-18 for CIFAR (He et al. 2016b, kuangliu/pytorch-cifar layout).

3x3 stem conv (64, no BN), stages 64/128/256/512 of 2 PreActBlocks each
(BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut; where the shape changes the shortcut is a 1x1 conv,
no BN, applied to the *pre-activated* input), then a final BN-ReLU, global average pool and
``linear``. (kuangliu's file has no final BN-ReLU; this one follows the original pre-activation
design and keeps it.) Module names follow kuangliu's state dict: ``conv1``, ``layer1_0/bn1``,
``layer1_0/conv1``, ``layer1_0/bn2``, ``layer1_0/conv2``, ``layer2_0/shortcut``, ``bn``, ``linear``.

Groups:

* ``layer{s}`` (kind ``residual``): the residual stream of stage ``s``: the stem conv (stage 1) or
  the stage's shortcut conv, every block's conv2 output, and every consumer (bn1 + conv1 of each
  block reading it, the next stage's first bn1/conv1/shortcut, or the final ``bn`` + ``linear``).
* ``layer{s}.{b}`` (kind ``channel``): conv1 output / bn2 / conv2 input of block ``b`` of stage s.

Gates (pre-activation: BN(0) != 0, so a stream channel is gated where it is *read*): the stream
gate of ``layer{s}`` multiplies the output of every BN+ReLU that reads that stream (bn1 of every
block fed by it and the final ``bn``), i.e. the same gate vector is applied at several sites; the
block gate multiplies the output of bn2+ReLU. A gate of 0 then makes every consumer see exactly
0 for that channel, which is what the network without it computes.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from taylor_jax.groups import ChannelGroup
from taylor_jax.models import common as C


class PreActResNet(nn.Module):
  widths: Mapping[str, int]
  num_classes: int = 10
  blocks: Sequence[int] = (2, 2, 2, 2)
  axis_name: Optional[str] = None

  @staticmethod
  def full_widths(blocks: Sequence[int] = (2, 2, 2, 2),
                  base: Sequence[int] = (64, 128, 256, 512)) -> dict[str, int]:
    w = {}
    for s, (n, c) in enumerate(zip(blocks, base), start=1):
      w[f'layer{s}'] = c
      for b in range(n):
        w[f'layer{s}.{b}'] = c
    return w

  def _has_shortcut(self, s: int, b: int) -> bool:
    # kuangliu: shortcut conv where stride != 1 or in_planes != planes (full widths: s > 1, b == 0).
    # Kept structural (not width-dependent) so a pruned network keeps the same layers.
    return b == 0 and s > 1

  def groups(self) -> tuple[ChannelGroup, ...]:
    groups, ns = [], len(self.blocks)
    for s in range(1, ns + 1):
      nb = self.blocks[s - 1]
      slices = C.conv_out('conv1') if s == 1 else C.conv_out(f'layer{s}_0/shortcut')
      for b in range(nb):
        slices += C.conv_out(f'layer{s}_{b}/conv2')
        if b > 0 or s == 1:
          slices += C.norm(f'layer{s}_{b}/bn1') + C.conv_in(f'layer{s}_{b}/conv1')
      if s < ns:
        nxt = f'layer{s + 1}_0'
        slices += C.norm(f'{nxt}/bn1') + C.conv_in(f'{nxt}/conv1') + C.conv_in(f'{nxt}/shortcut')
      else:
        slices += C.norm('bn') + C.dense_in('linear')
      groups.append(ChannelGroup(f'layer{s}', self.widths[f'layer{s}'], tuple(slices), 'residual',
                                 'after BN+ReLU of every consumer: bn1 of each block reading the '
                                 'stream (and the final bn)'))
      for b in range(nb):
        blk = f'layer{s}_{b}'
        groups.append(ChannelGroup(
            f'layer{s}.{b}', self.widths[f'layer{s}.{b}'],
            tuple(C.conv_out(f'{blk}/conv1') + C.norm(f'{blk}/bn2') + C.conv_in(f'{blk}/conv2')),
            'channel', 'after bn2+ReLU'))
    return tuple(groups)

  @nn.compact
  def __call__(self, x, gates=None, train: bool = False):
    w = self.widths
    x = C.conv(w['layer1'], 3, name='conv1')(x)
    in_group = 'layer1'
    for s in range(1, len(self.blocks) + 1):
      for b in range(self.blocks[s - 1]):
        x = PreActBlock(w[f'layer{s}.{b}'], w[f'layer{s}'], 2 if (b == 0 and s > 1) else 1,
                        self._has_shortcut(s, b), self.axis_name, name=f'layer{s}_{b}')(
                            x, gates, in_group, f'layer{s}.{b}', train)
        in_group = f'layer{s}'
    x = nn.relu(C.batch_norm(train, self.axis_name, 'bn')(x))
    x = C.gate(x, gates, in_group)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='linear')(x)


class PreActBlock(nn.Module):
  """BN-ReLU-[in gate]-conv3x3-BN-ReLU-[mid gate]-conv3x3, + shortcut (identity or 1x1 conv on
  the pre-activated input)."""
  mid: int
  out: int
  stride: int
  shortcut: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, gates, in_group: str, mid_group: str, train: bool):
    bn = lambda name: C.batch_norm(train, self.axis_name, name)
    a = C.gate(nn.relu(bn('bn1')(x)), gates, in_group)
    short = C.conv(self.out, 1, self.stride, name='shortcut')(a) if self.shortcut else x
    y = C.conv(self.mid, 3, self.stride, name='conv1')(a)
    y = C.gate(nn.relu(bn('bn2')(y)), gates, mid_group)
    y = C.conv(self.out, 3, name='conv2')(y)
    return y + short
