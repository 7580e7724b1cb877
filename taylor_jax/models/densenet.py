"""torchvision DenseNet-121 (growth 32, bn_size 4, blocks (6, 12, 24, 16), 64 initial features,
compression 0.5, no dropout).

Stem ``conv0`` (7x7/2) - ``norm0`` - ReLU - max-pool 3x3/2 (pad 1); dense layers
``denseblock{i}_denselayer{j}`` (``norm1``-ReLU-``conv1`` 1x1 (bn_size*growth) - ``norm2``-ReLU-``conv2``
3x3 (growth)) whose input is the concatenation ``[block input, new features of layer 1, ..., j-1]``
(torchvision's order); transitions ``transition{i}`` (``norm``-ReLU-``conv`` 1x1-avg-pool 2x2/2);
``norm5``-ReLU-global average pool-``classifier``.

Groups (every position of every concatenation is one group's, at an offset):

* ``conv0`` (kind ``channel``, not prunable): stem output; read by every layer of block 1 and by
  ``transition1`` (at offset 0 of their concatenated input).
* ``transition{i}`` (kind ``channel``, not prunable): transition output; read by block i+1 at offset 0.
* ``denseblock{i}.denselayer{j}.out`` (kind ``concat``, not prunable): the layer's ``growth`` new
  channels (conv2 output); read by every later layer of the block and by the transition / ``norm5`` +
  ``classifier`` at offset = block input width + widths of the earlier layers' new channels.
* ``denseblock{i}.denselayer{j}`` (kind ``channel``, prunable): the bottleneck (conv1 out, norm2,
  conv2 in). Only these are gated in the reference.

Gates: pre-activation again (BN(0) != 0), so a concatenated channel is gated where it is read: after
every consumer's BN+ReLU (norm1 of each later layer, the transition's norm, norm5), the concatenated
activation is multiplied by the concatenation of the parts' gate vectors. A bottleneck group is
gated once, after norm2+ReLU.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from taylor_jax.groups import ChannelGroup
from taylor_jax.models import common as C


def _gate_parts(y, gates, names: Sequence[str]):
  """Multiplies the concatenated channels of ``y`` by the concatenated gates of its parts.

  Gates are ``(width,)`` or per example ``(batch, width)``, as in :func:`common.gate`.
  """
  if gates is None:
    return y
  z = jnp.concatenate([gates[n].astype(y.dtype) for n in names], axis=-1)
  if z.ndim == 2:
    z = z.reshape((z.shape[0],) + (1,) * (y.ndim - 2) + (z.shape[1],))
  return y * z


def _layer(i: int, j: int) -> str:
  return f'denseblock{i}_denselayer{j}'


class DenseNet(nn.Module):
  widths: Mapping[str, int]
  num_classes: int = 1000
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  axis_name: Optional[str] = None

  @staticmethod
  def full_widths(growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                  num_init_features: int = 64, bn_size: int = 4) -> dict[str, int]:
    w, n = {'conv0': num_init_features}, num_init_features
    for i, layers in enumerate(block_config, start=1):
      for j in range(1, layers + 1):
        w[f'denseblock{i}.denselayer{j}'] = bn_size * growth_rate
        w[f'denseblock{i}.denselayer{j}.out'] = growth_rate
      n += layers * growth_rate
      if i < len(block_config):
        n //= 2
        w[f'transition{i}'] = n
    return w

  def keep_whole(self) -> tuple[str, ...]:
    """Producers whose channels the reference never gates (discovery's ``keep_whole``): only
    the bottlenecks are pruned."""
    return ('conv0', 'transition*', 'denseblock*_denselayer*/conv2')

  def groups(self) -> tuple[ChannelGroup, ...]:
    w, nblocks = self.widths, len(self.block_config)
    groups = []
    # parts of the current concatenation: (group name, producer slices) in concat order.
    parts = [('conv0', C.conv_out('conv0') + C.norm('norm0'), 'channel')]

    def close(part, consumers):
      name, producer, kind = part
      prunable = False
      gate = 'after BN+ReLU of every consumer (norm1 of later layers, transition norm / norm5)'
      groups.append(ChannelGroup(name, w[name], tuple(producer + consumers[name]), kind, gate,
                                 prunable))

    for i, layers in enumerate(self.block_config, start=1):
      consumers = {p[0]: [] for p in parts}
      for j in range(1, layers + 1):
        lay = _layer(i, j)
        off = 0
        for name, _, _ in parts:
          consumers[name] += C.norm(f'{lay}/norm1', offset=off) + C.conv_in(f'{lay}/conv1', offset=off)
          off += w[name]
        groups.append(ChannelGroup(
            f'denseblock{i}.denselayer{j}', w[f'denseblock{i}.denselayer{j}'],
            tuple(C.conv_out(f'{lay}/conv1') + C.norm(f'{lay}/norm2') + C.conv_in(f'{lay}/conv2')),
            'channel', 'after norm2+ReLU'))
        new = f'denseblock{i}.denselayer{j}.out'
        parts.append((new, C.conv_out(f'{lay}/conv2'), 'concat'))
        consumers[new] = []
      off = 0
      for name, _, _ in parts:
        if i < nblocks:
          consumers[name] += (C.norm(f'transition{i}/norm', offset=off) +
                              C.conv_in(f'transition{i}/conv', offset=off))
        else:
          consumers[name] += C.norm('norm5', offset=off) + C.dense_in('classifier', offset=off)
        off += w[name]
      for part in parts:
        close(part, consumers)
      if i < nblocks:
        parts = [(f'transition{i}', C.conv_out(f'transition{i}/conv'), 'channel')]
    return tuple(groups)

  @nn.compact
  def __call__(self, x, gates=None, train: bool = False):
    w, nblocks = self.widths, len(self.block_config)
    bn = lambda name: C.batch_norm(train, self.axis_name, name)
    x = C.conv(w['conv0'], 7, 2, name='conv0')(x)
    x = nn.relu(bn('norm0')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    feats, names = [x], ['conv0']
    for i, layers in enumerate(self.block_config, start=1):
      for j in range(1, layers + 1):
        new = DenseLayer(w[f'denseblock{i}.denselayer{j}'], w[f'denseblock{i}.denselayer{j}.out'],
                         self.axis_name, name=_layer(i, j))(
                             jnp.concatenate(feats, axis=-1), gates, tuple(names),
                             f'denseblock{i}.denselayer{j}', train)
        feats.append(new)
        names.append(f'denseblock{i}.denselayer{j}.out')
      if i < nblocks:
        t = Transition(w[f'transition{i}'], self.axis_name, name=f'transition{i}')(
            jnp.concatenate(feats, axis=-1), gates, tuple(names), train)
        feats, names = [t], [f'transition{i}']
    x = nn.relu(bn('norm5')(jnp.concatenate(feats, axis=-1)))
    x = _gate_parts(x, gates, names)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier')(x)


class DenseLayer(nn.Module):
  """norm1-ReLU-[concat gates]-conv1x1-norm2-ReLU-[bottleneck gate]-conv3x3 -> new features."""
  bottleneck: int
  growth: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, gates, in_names, mid_group: str, train: bool):
    bn = lambda name: C.batch_norm(train, self.axis_name, name)
    y = _gate_parts(nn.relu(bn('norm1')(x)), gates, in_names)
    y = C.conv(self.bottleneck, 1, name='conv1')(y)
    y = C.gate(nn.relu(bn('norm2')(y)), gates, mid_group)
    return C.conv(self.growth, 3, name='conv2')(y)


class Transition(nn.Module):
  """norm-ReLU-[concat gates]-conv1x1-avgpool 2x2/2."""
  out: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, gates, in_names, train: bool):
    y = nn.relu(C.batch_norm(train, self.axis_name, 'norm')(x))
    y = _gate_parts(y, gates, in_names)
    y = C.conv(self.out, 1, name='conv')(y)
    return nn.avg_pool(y, (2, 2), (2, 2))
