"""Building blocks shared by the zoo: gated layers and the slice helpers that describe groups.

Every zoo model is a Linen module with the fields ``widths`` (group name -> units),
``num_classes`` and ``axis_name`` (the mesh axis BatchNorm synchronises its batch statistics over
inside the data-parallel train step; None outside it), a ``groups()`` method returning its
:class:`~taylor_jax.groups.ChannelGroup` s, and ``__call__(x, gates=None, train=False)``
where ``gates`` maps group name -> ``(width,)`` multipliers (None: all ones).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from taylor_jax.groups import Slice

Array = Any

# torchvision's BatchNorm2d defaults (momentum 0.1 == flax 0.9, eps 1e-5) so converted
# checkpoints and the reference's training behave the same.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# XLA options for a program that runs once: on CPU, LLVM's optimisation passes cost seconds per
# program and win milliseconds on one run (ResNet-8 ``init``: 4.0 s to compile and 1 ms to run
# at XLA's default level, 0.9 s and 6 ms unoptimised: experiments/bench_compile_once.py).
_RUN_ONCE_OPTIONS = {'xla_backend_optimization_level': 0}


def run_once(fn, *args):
  """``fn(*args)``, jitted; on CPU compiled without LLVM optimisation: for initialisation and
  one-off checks, never for a step that runs in a loop. ``args``: pytrees of arrays (traced,
  e.g. under ``jax.eval_shape``: ``fn`` is traced along)."""
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
    return fn(*args)
  if jax.default_backend() != 'cpu':  # measured on CPU only; elsewhere XLA's defaults
    return jax.jit(fn)(*args)
  return jax.jit(fn).lower(*args).compile(compiler_options=_RUN_ONCE_OPTIONS)(*args)


def input_dtype(model) -> Any:
  """The dtype of the model's input: a user model's example input's (token ids: int32), else
  float32 (images)."""
  return getattr(model, 'input_dtype', jnp.float32)


def example_input(model, input_shape, batch: int = 1, rng=None) -> Any:
  """A batch for the model: abstract (``jax.ShapeDtypeStruct``) without ``rng``; with a numpy
  ``rng``, standard normal values, or for integer inputs ids 0 and 1 (valid for any
  vocabulary of two or more)."""
  shape, dtype = (batch,) + tuple(input_shape), input_dtype(model)
  if rng is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.asarray(rng.integers(0, 2, shape), dtype)
  return jnp.asarray(rng.standard_normal(shape), dtype)


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


_REFERENCE_CONV = [False]


@contextlib.contextmanager
def reference_convolutions() -> Iterator[None]:
  """Traces :class:`Conv` as plain ``lax.conv`` inside the block, e.g. so that cost counting
  sees every convolution as one (same parameters and values either way)."""
  _REFERENCE_CONV.append(True)
  try:
    yield
  finally:
    _REFERENCE_CONV.pop()


def _window_slices(x: Array, kh: int, kw: int, strides, padding) -> list[Array]:
  """The ``kh*kw`` strided windows of the padded input, each ``(B, Ho, Wo, Cin)``: window
  ``(i, j)`` is what kernel tap ``(i, j)`` multiplies."""
  sh, sw = strides
  x = jnp.pad(x, ((0, 0),) + tuple(tuple(p) for p in padding) + ((0, 0),))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def one_channel_conv(x: Array, kernel: Array, strides: tuple, padding: tuple) -> Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO) of a one-channel input, as shifted multiply-adds,
  with a kernel gradient that runs as matmuls.

  Forward: XLA's CPU convolution has a floor of about 2.5 ms per 64x28x28 batch whatever the
  channel count; for a grayscale stem that floor is most of a pruned ResNet-8's latency, while
  the ``kh*kw`` broadcast products take 0.25 ms (experiments/bench_latency_widths.py).
  Gradient: differentiating the multiply-adds made XLA materialise one broadcast copy of the input
  at the output's width per tap (nine ``(128, 28, 28, 16)`` arrays for the 3x3 stem), 6-15% of
  the train step (experiments/results/profile_train_step.md); the tangent below writes the kernel
  term as one matmul per tap, whose transpose is ``window^T @ dy`` (K = batch x pixels, no
  broadcast). A custom JVP, not a VJP, so that forward-over-reverse (the estimators' Hessian-
  vector products) keeps working; values equal ``lax.conv`` up to float rounding.
  """
  kh, kw = kernel.shape[:2]
  wins = _window_slices(x, kh, kw, strides, padding)
  return sum(wins[i * kw + j] * kernel[i, j, 0] for i in range(kh) for j in range(kw))


@one_channel_conv.defjvp
def _one_channel_conv_jvp(strides, padding, primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  kh, kw = kernel.shape[:2]
  y = one_channel_conv(x, kernel, strides, padding)
  dx_wins = _window_slices(dx, kh, kw, strides, padding)
  wins = _window_slices(x, kh, kw, strides, padding)
  dy = sum(dx_wins[t] * kernel[t // kw, t % kw, 0] +
           jax.lax.dot_general(wins[t], dkernel[t // kw, t % kw], (((3,), (0,)), ((), ())))
           for t in range(kh * kw))
  return y, dy


class Conv(nn.Conv):
  """``nn.Conv`` (same parameters, same result) whose one-input-channel case runs as
  :func:`one_channel_conv` (shifted multiply-adds, kernel gradient as matmuls).

  Only ungrouped, undilated 2-D convolutions with explicit padding take this path; inside
  :func:`reference_convolutions` every convolution is a plain ``nn.Conv``.
  """

  @nn.compact
  def __call__(self, inputs):
    simple = (inputs.ndim == 4 and inputs.shape[-1] == 1 and self.feature_group_count == 1 and
              not isinstance(self.padding, (str, int)) and len(self.padding) == 2 and
              all(len(p) == 2 for p in self.padding) and self.kernel_dilation in (None, 1) and
              self.input_dilation in (None, 1) and self.precision is None)
    if not simple or _REFERENCE_CONV[-1]:
      return super().__call__(inputs)
    kh, kw = self.kernel_size
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else (self.strides or (1, 1))
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = one_channel_conv(inputs, kernel, tuple(strides),
                         tuple(tuple(p) for p in self.padding))
    return y if bias is None else y + bias


def conv(features: int, kernel: int, stride: int = 1, name: str = None, use_bias: bool = False,
         padding: Any = None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return Conv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad), (pad, pad)],
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
