"""LeNet3 of the reference code (no BatchNorm): conv5x5(16)-ReLU-pool, conv5x5(32)-ReLU-pool,
fc(120)-ReLU, fc(84)-ReLU, fc(classes). Gates after each pooled conv and after each hidden ReLU.

The flatten between conv2 and fc1 is NHWC, so conv2's group occupies ``fc1/kernel`` rows
``position * 32 + c`` (a slice with ``repeat = H * W`` positions).
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn

from taylor_jax.groups import ChannelGroup
from taylor_jax.models import common as C


class LeNet3(nn.Module):
  widths: Mapping[str, int]
  num_classes: int = 10
  image_size: int = 28
  axis_name: Optional[str] = None  # unused: no BatchNorm

  @staticmethod
  def full_widths() -> dict[str, int]:
    return {'conv1': 16, 'conv2': 32, 'fc1': 120, 'fc2': 84}

  def _flat_positions(self) -> int:
    side = ((self.image_size - 4) // 2 - 4) // 2
    return side * side

  def groups(self) -> tuple[ChannelGroup, ...]:
    w = self.widths
    return (
        ChannelGroup('conv1', w['conv1'], tuple(C.conv_out('conv1', bias=True) + C.conv_in('conv2')),
                     'channel', 'after ReLU and max-pool'),
        ChannelGroup('conv2', w['conv2'],
                     tuple(C.conv_out('conv2', bias=True) +
                           C.dense_in('fc1', repeat=self._flat_positions())),
                     'channel', 'after ReLU and max-pool'),
        ChannelGroup('fc1', w['fc1'], tuple(C.dense_out('fc1') + C.dense_in('fc2')), 'neuron',
                     'after ReLU'),
        ChannelGroup('fc2', w['fc2'], tuple(C.dense_out('fc2') + C.dense_in('head')), 'neuron',
                     'after ReLU'),
    )

  @nn.compact
  def __call__(self, x, gates=None, train: bool = False):
    w = self.widths
    pool = lambda y: nn.max_pool(y, (2, 2), (2, 2))
    x = C.gate(pool(nn.relu(C.Conv(w['conv1'], (5, 5), padding=[(0, 0), (0, 0)], name='conv1')(x))),
               gates, 'conv1')
    x = C.gate(pool(nn.relu(nn.Conv(w['conv2'], (5, 5), padding='VALID', name='conv2')(x))),
               gates, 'conv2')
    x = x.reshape((x.shape[0], -1))
    x = C.gate(nn.relu(nn.Dense(w['fc1'], name='fc1')(x)), gates, 'fc1')
    x = C.gate(nn.relu(nn.Dense(w['fc2'], name='fc2')(x)), gates, 'fc2')
    return nn.Dense(self.num_classes, name='head')(x)
