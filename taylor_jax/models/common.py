"""Building blocks shared by the zoo: gated layers and the slice helpers that describe groups.

Every zoo model is a Linen module with the fields ``widths`` (group name -> units),
``num_classes`` and ``axis_name`` (the mesh axis BatchNorm synchronises its batch statistics over
inside the data-parallel train step; None outside it), a ``groups()`` method returning its
:class:`~taylor_jax.groups.ChannelGroup` s, and ``__call__(x, gates=None, train=False)``
where ``gates`` maps group name -> ``(width,)`` multipliers (None: all ones).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from taylor_jax.groups import Slice

Array = Any

# torchvision's BatchNorm2d defaults (momentum 0.1 == flax 0.9, eps 1e-5) so converted
# checkpoints and the reference's training behave the same.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def gate(x: Array, gates: Optional[Mapping[str, Array]], name: str) -> Array:
  """Multiplies the channel (last) axis of ``x`` by the gate of group ``name``.

  A gate is ``(width,)`` (shared by the batch) or ``(batch, width)`` (one gate per example, for
  per-example gradients in one backward pass).
  """
  if gates is None:
    return x
  z = gates[name].astype(x.dtype)
  if z.ndim == 2:
    z = z.reshape((z.shape[0],) + (1,) * (x.ndim - 2) + (z.shape[1],))
  return x * z


def batch_norm(train: bool, axis_name: Optional[str], name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      axis_name=axis_name if train else None, name=name)


def conv_kernel_init():
  # He normal, fan-out: torchvision's ResNet/VGG init.
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel: int, stride: int = 1, name: str = None, use_bias: bool = False,
         padding: Any = None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad), (pad, pad)],
                 use_bias=use_bias, kernel_init=conv_kernel_init(), name=name)


# --- slice helpers: paths are module paths inside 'params' / 'batch_stats' -------------------

def _p(*path: str) -> tuple[str, ...]:
  return tuple(p for part in path for p in part.split('/'))


def conv_out(module: str, bias: bool = False) -> list[Slice]:
  s = [Slice(('params',) + _p(module, 'kernel'), -1, 'out')]
  if bias:
    s.append(Slice(('params',) + _p(module, 'bias'), 0, 'out'))
  return s


def conv_in(module: str, offset: int = 0) -> list[Slice]:
  return [Slice(('params',) + _p(module, 'kernel'), -2, 'in', offset=offset)]


def norm(module: str, offset: int = 0) -> list[Slice]:
  return ([Slice(('params',) + _p(module, leaf), 0, 'norm', offset=offset)
           for leaf in ('scale', 'bias')] +
          [Slice(('batch_stats',) + _p(module, leaf), 0, 'norm', offset=offset)
           for leaf in ('mean', 'var')])


def dense_out(module: str) -> list[Slice]:
  return [Slice(('params',) + _p(module, 'kernel'), -1, 'out'),
          Slice(('params',) + _p(module, 'bias'), 0, 'out')]


def dense_in(module: str, repeat: int = 1, offset: int = 0) -> list[Slice]:
  return [Slice(('params',) + _p(module, 'kernel'), 0, 'in', offset=offset, repeat=repeat)]
