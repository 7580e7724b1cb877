"""A small two-branch CNN for 28x28x1 inputs (Linen), written as a plain Flax user would write
it: a 3x3 branch and a 1x1 branch (conv + BN + relu each) concatenated on the channel axis, a
strided conv + BN + relu, max pooling, a flatten and two Dense layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class ConcatCNN(nn.Module):
  num_classes: int = 10
  branch3: int = 16
  branch1: int = 8
  mid: int = 32
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    a = nn.relu(bn('bn3')(nn.Conv(self.branch3, (3, 3), padding=1, name='conv3')(x)))
    b = nn.relu(bn('bn1')(nn.Conv(self.branch1, (1, 1), name='conv1')(x)))
    x = jnp.concatenate([a, b], axis=-1)
    x = nn.Conv(self.mid, (3, 3), strides=2, padding=1, name='mix')(x)  # 14x14
    x = nn.relu(bn('mix_bn')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 7x7
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name='fc')(x))
    return nn.Dense(self.num_classes, name='head')(x)
