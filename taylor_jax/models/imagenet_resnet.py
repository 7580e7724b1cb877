"""torchvision ImageNet ResNets: ResNet-18/34 (BasicBlock) and ResNet-50/101 (Bottleneck, v1.5:
stride on conv2).

7x7 stride-2 stem ``conv1`` + ``bn1`` + ReLU + 3x3/2 max-pool (pad 1), four stages ``layer{s}_{b}``
(submodules ``conv1``/``bn1``/``conv2``/``bn2``[/``conv3``/``bn3``] and, in the first block of a stage
whose shape changes, ``downsample_conv`` (1x1) + ``downsample_bn``), global average pool, ``fc``.

Groups (as the reference's gates, see REFERENCE.md section 1):

* ``layer{s}`` (kind ``residual``): the residual stream of stage s (R18/34: 64/128/256/512,
  R50/101: 256/512/1024/2048): the last conv/BN of every block, the downsample conv/BN, and every
  consumer (each block's conv1, the next stage's conv1 and downsample, ``fc``). One gate shared by
  all blocks of the stage, after the add and the final ReLU of every block. For R18/34 layer1 has no
  downsample, so the stem output belongs to ``layer1`` too (gate after the stem's max-pool).
* ``stem`` (kind ``channel``, R50/101 only, ``prunable=False``): ``conv1``/``bn1`` output, read by
  layer1_0's conv1 and downsample; gate after ``bn1``, before ReLU. Not prunable because the
  reference has no stem gate: without it the prunable units are exactly the reference's gate counts
  (ResNet-50: 11,392; ResNet-101: 20,096). Its gate still works (masking == surgery).
* ``layer{s}.{b}.bn1`` (kind ``channel``): conv1 out / bn1 / conv2 in; gate after bn1, before ReLU.
* ``layer{s}.{b}.bn2`` (kind ``channel``, Bottleneck only): conv2 out / bn2 / conv3 in; gate after
  bn2, before ReLU.

Note: the reference also puts a gate after a BasicBlock's bn2 (before the add); those channels are
the stream's, and a per-block gate on them does not correspond to removing a channel, so here a
BasicBlock's bn2 channels are pruned only through the stage's ``layer{s}`` group.
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from taylor_jax.groups import ChannelGroup
from taylor_jax.models import common as C

# depth -> (block kind, blocks per stage)
DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
BASE = (64, 128, 256, 512)


class ImageNetResNet(nn.Module):
  widths: Mapping[str, int]
  num_classes: int = 1000
  depth: int = 50
  axis_name: Optional[str] = None

  @staticmethod
  def full_widths(depth: int = 50) -> dict[str, int]:
    kind, blocks = DEPTHS[depth]
    exp = 4 if kind == 'bottleneck' else 1
    w = {'stem': 64} if kind == 'bottleneck' else {}
    for s, (n, c) in enumerate(zip(blocks, BASE), start=1):
      w[f'layer{s}'] = c * exp
      for b in range(n):
        w[f'layer{s}.{b}.bn1'] = c
        if kind == 'bottleneck':
          w[f'layer{s}.{b}.bn2'] = c
    return w

  @property
  def _bottleneck(self) -> bool:
    return DEPTHS[self.depth][0] == 'bottleneck'

  def _has_downsample(self, s: int, b: int) -> bool:
    # torchvision: stride != 1 or inplanes != planes * expansion (structural, at full widths).
    return b == 0 and (s > 1 or self._bottleneck)

  def keep_whole(self) -> tuple[str, ...]:
    """Producers kept whole (discovery's ``keep_whole``): the bottleneck nets' stem, which the
    reference does not gate."""
    return ('conv1',) if self._bottleneck else ()

  def groups(self) -> tuple[ChannelGroup, ...]:
    blocks, bott = DEPTHS[self.depth][1], self._bottleneck
    last = 'conv3' if bott else 'conv2'
    last_bn = 'bn3' if bott else 'bn2'
    groups = []
    if bott:
      groups.append(ChannelGroup(
          'stem', self.widths['stem'],
          tuple(C.conv_out('conv1') + C.norm('bn1') + C.conv_in('layer1_0/conv1') +
                C.conv_in('layer1_0/downsample_conv')),
          'channel', 'after stem bn1, before ReLU', prunable=False, gate_after_norm=True))
    for s, n in enumerate(blocks, start=1):
      slices = [] if bott or s > 1 else C.conv_out('conv1') + C.norm('bn1')
      for b in range(n):
        blk = f'layer{s}_{b}'
        slices += C.conv_out(f'{blk}/{last}') + C.norm(f'{blk}/{last_bn}')
        if self._has_downsample(s, b):
          slices += C.conv_out(f'{blk}/downsample_conv') + C.norm(f'{blk}/downsample_bn')
        if b > 0 or (s == 1 and not bott):
          slices += C.conv_in(f'{blk}/conv1')
      if s < len(blocks):
        slices += C.conv_in(f'layer{s + 1}_0/conv1') + C.conv_in(f'layer{s + 1}_0/downsample_conv')
      else:
        slices += C.dense_in('fc')
      groups.append(ChannelGroup(
          f'layer{s}', self.widths[f'layer{s}'], tuple(slices), 'residual',
          'after the add and ReLU of every block of the stage' +
          ('' if bott or s > 1 else ' and after the stem max-pool')))
      for b in range(n):
        blk = f'layer{s}_{b}'
        groups.append(ChannelGroup(
            f'layer{s}.{b}.bn1', self.widths[f'layer{s}.{b}.bn1'],
            tuple(C.conv_out(f'{blk}/conv1') + C.norm(f'{blk}/bn1') + C.conv_in(f'{blk}/conv2')),
            'channel', 'after bn1, before ReLU', gate_after_norm=True))
        if bott:
          groups.append(ChannelGroup(
              f'layer{s}.{b}.bn2', self.widths[f'layer{s}.{b}.bn2'],
              tuple(C.conv_out(f'{blk}/conv2') + C.norm(f'{blk}/bn2') + C.conv_in(f'{blk}/conv3')),
              'channel', 'after bn2, before ReLU', gate_after_norm=True))
    return tuple(groups)

  @nn.compact
  def __call__(self, x, gates=None, train: bool = False):
    w, bott = self.widths, self._bottleneck
    blocks = DEPTHS[self.depth][1]
    stem_group = 'stem' if bott else 'layer1'
    x = C.conv(w[stem_group], 7, 2, name='conv1')(x)
    x = C.batch_norm(train, self.axis_name, 'bn1')(x)
    if bott:
      x = C.gate(x, gates, 'stem')
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    if not bott:
      x = C.gate(x, gates, 'layer1')
    for s, n in enumerate(blocks, start=1):
      for b in range(n):
        stride = 2 if (b == 0 and s > 1) else 1
        mids = ((w[f'layer{s}.{b}.bn1'], w[f'layer{s}.{b}.bn2']) if bott
                else (w[f'layer{s}.{b}.bn1'],))
        cls = Bottleneck if bott else BasicBlock
        x = cls(mids, w[f'layer{s}'], stride, self._has_downsample(s, b), self.axis_name,
                name=f'layer{s}_{b}')(x, gates, f'layer{s}.{b}', f'layer{s}', train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc')(x)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-[gate]-ReLU-conv3x3-BN, + shortcut, ReLU, [stream gate]."""
  mids: tuple
  out: int
  stride: int
  downsample: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, gates, prefix: str, out_group: str, train: bool):
    bn = lambda name: C.batch_norm(train, self.axis_name, name)
    y = C.conv(self.mids[0], 3, self.stride, name='conv1')(x)
    y = nn.relu(C.gate(bn('bn1')(y), gates, f'{prefix}.bn1'))
    y = bn('bn2')(C.conv(self.out, 3, name='conv2')(y))
    if self.downsample:
      x = bn('downsample_bn')(C.conv(self.out, 1, self.stride, name='downsample_conv')(x))
    return C.gate(nn.relu(x + y), gates, out_group)


class Bottleneck(nn.Module):
  """conv1x1-BN-[gate]-ReLU-conv3x3(stride)-BN-[gate]-ReLU-conv1x1-BN, + shortcut, ReLU, [stream
  gate] (torchvision v1.5)."""
  mids: tuple
  out: int
  stride: int
  downsample: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, gates, prefix: str, out_group: str, train: bool):
    bn = lambda name: C.batch_norm(train, self.axis_name, name)
    y = C.conv(self.mids[0], 1, name='conv1')(x)
    y = nn.relu(C.gate(bn('bn1')(y), gates, f'{prefix}.bn1'))
    y = C.conv(self.mids[1], 3, self.stride, name='conv2')(y)
    y = nn.relu(C.gate(bn('bn2')(y), gates, f'{prefix}.bn2'))
    y = bn('bn3')(C.conv(self.out, 1, name='conv3')(y))
    if self.downsample:
      x = bn('downsample_bn')(C.conv(self.out, 1, self.stride, name='downsample_conv')(x))
    return C.gate(nn.relu(x + y), gates, out_group)
