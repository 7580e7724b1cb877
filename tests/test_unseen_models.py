"""Plain Flax models that no other test has seen (nn.Sequential, a depthwise residual with a
spatial LayerNorm, DenseGeneral heads, nn.scan over nn.remat blocks, NNX GroupNorm and
nnx.Sequential): discovery, the coverage check and the surgery probe all pass, and what must be
kept whole is."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from taylor_jax import checks
from taylor_jax.models import any_model


class SeqNet(nn.Module):
  """Linen: nn.Sequential, avg_pool, Dropout (deterministic), gelu, DenseGeneral head."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Sequential([nn.Conv(12, (3, 3)), nn.BatchNorm(use_running_average=not train), nn.gelu])(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    y = nn.Conv(12, (3, 3), feature_group_count=12)(x)  # depthwise, residual on it
    x = nn.silu(x + nn.LayerNorm(use_scale=False, use_bias=False, reduction_axes=(1, 2))(y))
    x = nn.Dropout(0.1, deterministic=True)(x)
    x = jnp.max(x, axis=(1, 2))
    x = nn.DenseGeneral(features=(2, 8))(x)        # two heads of 8 units
    x = nn.tanh(x).reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.relu(nn.Dense(24, name='fc1')(x))
    return x + nn.Dense(x.shape[-1], name='fc2')(h), None


class ScanMLP(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
    Blocks = nn.scan(nn.remat(ScanBlock), variable_axes={'params': 0}, split_rngs={'params': True},
                     length=3)
    x, _ = Blocks(name='blocks')(x, None)
    return nn.Dense(self.num_classes)(nn.relu(x))


class GNNet(nnx.Module):
  def __init__(self, num_classes, *, rngs):
    self.c1 = nnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
    self.gn = nnx.GroupNorm(16, num_groups=4, rngs=rngs)
    self.c2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.seq = nnx.Sequential(nnx.Linear(32, 20, rngs=rngs), nnx.relu, nnx.Linear(20, num_classes, rngs=rngs))

  def __call__(self, x):
    x = nnx.relu(self.gn(self.c1(x)))
    x = nnx.relu(self.bn(self.c2(x)))
    return self.seq(x.mean(axis=(1, 2)))


@pytest.mark.parametrize('factory,expect', [
    (SeqNet, {'Conv_0': True, 'DenseGeneral_0[1]': False, 'DenseGeneral_0[2]': True}),
    (ScanMLP, {'Dense_0': True, 'blocks/fc1': False}),
    (GNNet, {'c1': False, 'c2': True, 'seq/layers/0': True}),
])
def test_unseen_model_prunes_and_keeps_whole_what_it_must(factory, expect):
  if 'rngs' in factory.__init__.__code__.co_varnames:
    model = any_model.NNXModel(lambda rngs: factory(10, rngs=rngs), jnp.zeros((2, 28, 28, 1)))
  else:
    model = any_model.LinenModel(factory(), jnp.zeros((2, 28, 28, 1)))
  prunable = {g.name: g.prunable for g in model.groups()}
  assert {k: prunable[k] for k in expect} == expect
  checks.check_coverage(model, (28, 28, 1))
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))()
  assert checks.probe_surgery(model, variables, (28, 28, 1)) < 1e-5
