"""Discovery from the jaxpr: the zoo's hand-written groups come out slice for slice, and the rules
for the primitives a plain Flax model uses (concatenation, flatten, depthwise and grouped convs,
attention heads, LayerNorm, scan, shared sub-jaxprs) give the groups a person would write."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import discovery, models
from taylor_jax.models import common
from taylor_jax.discovery import DiscoveryError, discover_groups

_IMAGENET = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn', 'densenet121'}
_CIFAR = {'preact_resnet18', 'vgg16_bn'}


def _input_shape(name):
  if name in _IMAGENET:
    return (1, 224, 224, 3)
  return (1, 32, 32, 3) if name in _CIFAR else (1, 28, 28, 1)


def _abstract(module, shape):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))


def _key(slices, shapes):
  return frozenset((s.path, s.axis % len(shapes[s.path]), s.role, s.offset, s.repeat)
                   for s in slices)


def _shapes(variables):
  return {discovery._path_keys(p): leaf.shape
          for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


@pytest.mark.parametrize('name', models.names())
def test_zoo_groups_equal_declared_slice_for_slice(name):
  shape = _input_shape(name)
  model = models.create(name, 10, input_shape=shape[1:])
  variables = _abstract(model, shape)
  keep = model.keep_whole() if hasattr(model, 'keep_whole') else ()
  with common.reference_convolutions():  # the grayscale stems' multiply-adds, as one conv
    found = discover_groups(lambda v, x: model.apply(v, x), variables,
                            jax.ShapeDtypeStruct(shape, jnp.float32), keep_whole=keep)
  shapes = _shapes(variables)
  declared = {_key(g.slices, shapes): g for g in model.groups()}
  discovered = {_key(g.slices, shapes): g for g in found.groups}
  assert set(declared) == set(discovered)
  for key, g in declared.items():
    assert (discovered[key].width, discovered[key].prunable) == (g.width, g.prunable), g.name


# --- small plain models ------------------------------------------------------------------------

class ConcatFlatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Conv(6, (3, 3), name='a')(x))
    b = nn.relu(nn.Conv(5, (1, 1), name='b')(x))
    y = jnp.concatenate([a, b], axis=-1)
    y = nn.relu(nn.Conv(7, (3, 3), strides=2, name='c')(y))
    y = y.reshape((y.shape[0], -1))
    return nn.Dense(3, name='head')(nn.relu(nn.Dense(9, name='fc')(y)))


def _discover(module, shape=(2, 8, 8, 1), **kw):
  v = _abstract(module, shape)
  return discover_groups(lambda v, x: module.apply(v, x), v,
                         jax.ShapeDtypeStruct(shape, jnp.float32), **kw)


def _by_producer(found):
  return {g.name: g for g in found.groups}


def test_concatenation_gives_offsets_and_flatten_gives_repeats():
  g = _by_producer(_discover(ConcatFlatten()))
  assert set(g) == {'a', 'b', 'c', 'fc'}
  a_in_c = [s for s in g['a'].slices if s.path == ('params', 'c', 'kernel')]
  b_in_c = [s for s in g['b'].slices if s.path == ('params', 'c', 'kernel')]
  assert (a_in_c[0].offset, b_in_c[0].offset) == (0, 6)
  flat = [s for s in g['c'].slices if s.path == ('params', 'fc', 'kernel')][0]
  assert (flat.role, flat.repeat, flat.offset) == ('in', 16, 0)
  assert all(x.prunable for x in g.values())


class Depthwise(nn.Module):
  groups_: int = 0  # 0: depthwise

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.BatchNorm(use_running_average=True, name='bn0')(nn.Conv(8, (1, 1), name='expand')(x)))
    g = self.groups_ or 8
    y = nn.Conv(8, (3, 3), feature_group_count=g, name='dw')(y)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name='bn1')(y))
    y = nn.Conv(4, (1, 1), name='project')(y)
    return nn.Dense(2, name='head')(y.mean(axis=(1, 2)))


def test_depthwise_conv_passes_channels_through():
  g = _by_producer(_discover(Depthwise()))
  expand = g['expand']
  paths = {(s.path, s.role) for s in expand.slices}
  assert (('params', 'dw', 'kernel'), 'out') in paths
  assert (('params', 'project', 'kernel'), 'in') in paths
  assert (('params', 'bn0', 'scale'), 'norm') in paths and (('batch_stats', 'bn1', 'mean'), 'norm') in paths
  assert expand.prunable and expand.width == 8


def test_grouped_conv_is_kept_whole_with_a_reason():
  g = _by_producer(_discover(Depthwise(groups_=2)))
  assert not g['expand'].prunable and 'grouped convolution' in g['expand'].reason
  assert not g['dw'].prunable


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name='embed')(x.reshape((x.shape[0], 4, -1)))
    y = nn.LayerNorm(name='ln')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, name='attn')(y)
    h = nn.gelu(nn.Dense(32, name='mlp_in')(x))
    x = x + nn.Dense(16, name='mlp_out')(h)
    return nn.Dense(3, name='head')(x.mean(axis=1))


def test_attention_heads_head_dims_and_layernorm_stream():
  found = _discover(Attention(), shape=(2, 4, 4, 1))
  g = _by_producer(found)
  q = g['attn/query[1]']  # the heads axis of the q kernel (in, heads, head_dim)
  assert q.width == 4 and q.prunable
  assert {s.path[-2] for s in q.slices} >= {'query', 'key', 'value', 'out'}
  qk_dim = g['attn/query[2]']
  assert {s.path[-2] for s in qk_dim.slices} == {'query', 'key'}
  v_dim = g['attn/value[2]']
  assert {s.path[-2] for s in v_dim.slices} == {'value', 'out'}
  assert g['mlp_in'].prunable and g['mlp_in'].width == 32
  stream = g['embed']
  assert stream.kind == 'residual' and stream.marked and not stream.prunable
  forced = _by_producer(_discover(Attention(), shape=(2, 4, 4, 1), prune_marked=True))
  assert forced['embed'].prunable and forced['embed'].marked


class TwoRelus(nn.Module):
  """Both relu calls share one cached sub-jaxpr: the two layers must stay separate groups."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    y = nn.relu(nn.Dense(5, name='d1')(x))
    z = nn.relu(nn.Dense(5, name='d2')(y))
    return nn.Dense(2, name='head')(z)


def test_shared_subjaxpr_does_not_merge_call_sites():
  g = _by_producer(_discover(TwoRelus(), shape=(2, 3, 3, 1)))
  assert set(g) == {'d1', 'd2'}


class ScanMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6, name='inp')(x.reshape((x.shape[0], -1)))
    w = self.param('w', nn.initializers.lecun_normal(), (6, 6))

    def body(c, _):
      return jnp.tanh(c @ w), None
    x, _ = jax.lax.scan(body, x, None, length=3)
    return nn.Dense(2, name='head')(x)


def test_scan_carry_joins_its_iterations():
  g = _by_producer(_discover(ScanMLP(), shape=(2, 2, 2, 1)))
  (grp,) = g.values()
  assert {s.path[1] for s in grp.slices} == {'inp', 'w', 'head'}


def test_io_channels_are_never_groups():
  found = _discover(TwoRelus(), shape=(2, 3, 3, 1))
  assert any('head' in e and e.endswith('[1]') for e in found.excluded)
  assert all(s.path[1] != 'head' or s.role == 'in' for g in found.groups for s in g.slices)


class Unknown(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.Dense(4, name='d')(x.reshape((x.shape[0], -1)))
    y = jax.lax.cumlogsumexp(y, axis=0)
    y = jax.lax.population_count(y.astype(jnp.int32)).astype(jnp.float32)
    return nn.Dense(2, name='head')(y)


def test_unknown_primitive_is_an_error_naming_it_and_what_to_do():
  with pytest.raises(DiscoveryError, match=r"population_count.*d/kernel.*keep_whole"):
    _discover(Unknown(), shape=(2, 2, 2, 1))
  found = _discover(Unknown(), shape=(2, 2, 2, 1), unknown_primitives='keep_whole')
  g = _by_producer(found)
  assert 'population_count' in g['d'].reason
  assert not any(x.prunable for x in found.groups)


def test_model_that_does_not_trace_is_a_clear_error():
  class Bad(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.Dense(2)(x)
      return y if self.is_initializing() else y * float(x.sum())
  with pytest.raises(DiscoveryError, match='does not trace'):
    _discover(Bad(), shape=(2, 3))


def test_keep_whole_names_the_module():
  g = _by_producer(_discover(ConcatFlatten(), keep_whole=['a']))
  assert not g['a'].prunable and 'keep_whole' in g['a'].reason and g['b'].prunable


def test_nnx_model_paths_have_no_collection():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
      self.layers = nnx.List([nnx.Linear(8, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)])

    def __call__(self, x):
      x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
      return self.layers[1](nnx.relu(self.layers[0](x)))

  model = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  pure = state.to_pure_dict()

  def apply(v, x):
    s = nnx.State(state)
    s.replace_by_pure_dict(v)
    return nnx.merge(graphdef, s)(x)

  found = discover_groups(apply, pure, jnp.zeros((2, 6, 6, 1)))
  g = _by_producer(found)
  assert set(g) == {'conv', 'layers/0'}
  assert {(s.path, s.role) for s in g['conv'].slices} >= {
      (('bn', 'mean'), 'norm'), (('layers', 0, 'kernel'), 'in'), (('conv', 'bias'), 'out')}
  np.testing.assert_equal(g['layers/0'].width, 6)
