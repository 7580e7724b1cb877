"""VGG with BatchNorm: VGG-16-BN for CIFAR and VGG-11-BN for ImageNet (torchvision layout).

``features_{i}`` are named by their index in torchvision's ``features`` Sequential (conv at ``i``,
its BatchNorm at ``i + 1``; ReLU and max-pool take indices too), conv layers with bias as in
torchvision / kuangliu.

* ``head='cifar'`` (kuangliu/pytorch-cifar VGG): after the 5th max-pool (1x1 for 32x32 inputs) a
  global average pool (== kuangliu's flatten for 32x32 inputs) and one ``classifier`` Linear(512, classes).
* ``head='imagenet'`` (torchvision): adaptive average pool to 7x7 (exactly torchvision's
  ``AdaptiveAvgPool2d`` bins, so a 1x1 map is replicated), NHWC flatten, then ``classifier_0``
  Linear(512*49, 4096)-ReLU-``classifier_3`` Linear(4096, 4096)-ReLU-``classifier_6``
  Linear(4096, classes). **Dropout is omitted** (identity, i.e. torchvision's eval behaviour) so that
  every zoo model has the same ``apply`` signature and needs no 'dropout' rng.

Groups:

* ``conv{k}`` (kind ``channel``, k = 1..): the k-th conv's output (kernel + bias), its BN and the next
  conv's input (or the classifier input; through the 7x7 NHWC flatten a ``repeat=49`` slice).
  Gate after BN, before ReLU.
* ``fc1``, ``fc2`` (ImageNet head, kind ``neuron``): hidden units of the first two Linear layers;
  gate after ReLU.
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from taylor_jax.groups import ChannelGroup
from taylor_jax.models import common as C

CFGS = {
    'vgg11': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'vgg13': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'vgg16': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'),
    'vgg19': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
              512, 512, 512, 512, 'M'),
}

POOL_SIDE = 7  # torchvision's AdaptiveAvgPool2d((7, 7))


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging matrix of torch's adaptive average pooling along one axis.

  Bin i covers [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)).
  """
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, side: int):
  """NHWC adaptive average pooling to ``side x side``, bin-exact with torch's AdaptiveAvgPool2d."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == (side, side):
    return x
  ph = jnp.asarray(adaptive_pool_matrix(h, side), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(w, side), x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', ph, x, pw)


def _conv_indices(cfg) -> list[int]:
  """torchvision ``features`` index of each conv (conv, BN, ReLU take 3 indices, a pool 1)."""
  idx, out = 0, []
  for v in cfg:
    if v == 'M':
      idx += 1
    else:
      out.append(idx)
      idx += 3
  return out


class VGG(nn.Module):
  widths: Mapping[str, int]
  num_classes: int = 10
  cfg: str = 'vgg16'
  head: str = 'cifar'  # 'cifar' (one Linear) or 'imagenet' (7x7 pool + 3 Linear)
  axis_name: Optional[str] = None

  @staticmethod
  def full_widths(cfg: str = 'vgg16', head: str = 'cifar') -> dict[str, int]:
    w = {f'conv{k}': c for k, c in enumerate((v for v in CFGS[cfg] if v != 'M'), start=1)}
    if head == 'imagenet':
      w.update(fc1=4096, fc2=4096)
    return w

  def groups(self) -> tuple[ChannelGroup, ...]:
    w, idx = self.widths, _conv_indices(CFGS[self.cfg])
    n, groups = len(idx), []
    for k, i in enumerate(idx, start=1):
      slices = C.conv_out(f'features_{i}', bias=True) + C.norm(f'features_{i + 1}')
      if k < n:
        slices += C.conv_in(f'features_{idx[k]}')
      elif self.head == 'imagenet':
        slices += C.dense_in('classifier_0', repeat=POOL_SIDE * POOL_SIDE)
      else:
        slices += C.dense_in('classifier')
      groups.append(ChannelGroup(f'conv{k}', w[f'conv{k}'], tuple(slices), 'channel',
                                 'after BN, before ReLU', gate_after_norm=True))
    if self.head == 'imagenet':
      groups.append(ChannelGroup('fc1', w['fc1'],
                                 tuple(C.dense_out('classifier_0') + C.dense_in('classifier_3')),
                                 'neuron', 'after ReLU'))
      groups.append(ChannelGroup('fc2', w['fc2'],
                                 tuple(C.dense_out('classifier_3') + C.dense_in('classifier_6')),
                                 'neuron', 'after ReLU'))
    return tuple(groups)

  @nn.compact
  def __call__(self, x, gates=None, train: bool = False):
    w, idx, k = self.widths, 0, 0
    for v in CFGS[self.cfg]:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2))
        idx += 1
        continue
      k += 1
      x = C.conv(w[f'conv{k}'], 3, name=f'features_{idx}', use_bias=True)(x)
      x = C.batch_norm(train, self.axis_name, f'features_{idx + 1}')(x)
      x = nn.relu(C.gate(x, gates, f'conv{k}'))
      idx += 3
    if self.head == 'imagenet':
      x = adaptive_avg_pool(x, POOL_SIDE)
      x = x.reshape((x.shape[0], -1))
      x = C.gate(nn.relu(nn.Dense(w['fc1'], name='classifier_0')(x)), gates, 'fc1')
      x = C.gate(nn.relu(nn.Dense(w['fc2'], name='classifier_3')(x)), gates, 'fc2')
      return nn.Dense(self.num_classes, name='classifier_6')(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier')(x)
