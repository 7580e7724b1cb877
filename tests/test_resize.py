"""taylor_jax.resize: unchanged Linen / NNX model code runs on a sliced parameter tree.

The check throughout: removing units by slicing (and running through ``linen_apply`` or an NNX
model pruned in place by ``nnx_load_state``) computes the same logits as the full model with
those units zeroed (producer out slice, bias, BN scale/bias, consumer in slice).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st

from taylor_jax import resize
from taylor_jax.groups import Slice
from taylor_jax.models.examples import concat_cnn, mobilenet_v2, vit_tiny

HYP = settings(max_examples=2, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


# --- helpers -----------------------------------------------------------------------------------

def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _np_tree(tree):
  """A mutable nested dict of numpy arrays."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: _np_tree(v) for k, v in tree.items()}
  return np.array(tree)


def remove(tree, slices: Sequence[Slice], units: Sequence[int]):
  """(masked, sliced) copies of ``tree``: the units zeroed in every slice (running mean/var
  kept), or deleted from every slice."""
  masked, sliced = _np_tree(tree), _np_tree(tree)
  units = np.asarray(sorted(units))
  for s in slices:
    arr = _get(masked, s.path)
    axis = s.axis % arr.ndim
    pos = s.positions(units, arr.shape[axis])
    if s.path[-1] not in ('mean', 'var'):
      idx = [slice(None)] * arr.ndim
      idx[axis] = pos
      arr[tuple(idx)] = 0.0
    _set(sliced, s.path, np.delete(_get(sliced, s.path), pos, axis=axis))
  return masked, sliced


def _random_leaf(rng: np.random.Generator, name: Any, shape: tuple[int, ...], dtype: Any):
  if not np.issubdtype(dtype, np.floating):
    return np.zeros(shape, dtype)
  n = rng.standard_normal(shape).astype(dtype)
  if name == 'scale':
    return 1 + 0.1 * n
  if name == 'var':
    return rng.uniform(0.5, 1.5, shape).astype(dtype)
  if name in ('mean', 'bias', 'cls', 'pos_embedding'):
    return 0.1 * n
  return n / np.sqrt(max(1, int(np.prod(shape[:-1]))))


def random_like(abstract, seed=0):
  """Random numpy values for an abstract variables tree (fast: no jax random, no compile)."""
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  leaves = [_random_leaf(rng, getattr(p[-1], 'key', None), tuple(a.shape), a.dtype)
            for p, a in flat]
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def linen_init(model, *args, seed=0):
  """Random variables of a Linen model (``jax.eval_shape`` of ``init``, numpy values)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
  return random_like(jax.tree.map(lambda x: x, dict(abstract)), seed)


def nnx_init(make, seed=0):
  """An NNX model with random numpy-drawn values (built abstractly: no random init compile)."""
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      a = var.get_value()
      var.set_value(jnp.asarray(_random_leaf(rng, path[-1], tuple(a.shape), a.dtype)))
  return model


# The full and the sliced forward each as one jitted program (Linen modules hash by their fields,
# so the full model's compiles once for all hypothesis examples): run eagerly, every op of them
# compiled on its own.
_apply = jax.jit(lambda model, v, x: model.apply(v, x), static_argnums=0)
_linen_apply = jax.jit(lambda model, v, x: resize.linen_apply(model, v, x), static_argnums=0)


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def shapes(tree):
  return jax.tree.map(np.shape, tree)


X = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))


def conv_bn(module, bn, prefix=('params',), stats=('batch_stats',), bias=False):
  """Slices of a conv's output channels and its BatchNorm."""
  s = [Slice(prefix + module + ('kernel',), -1, 'out')]
  if bias:
    s.append(Slice(prefix + module + ('bias',), 0, 'out'))
  s += [Slice(prefix + bn + (leaf,), 0, 'norm') for leaf in ('scale', 'bias')]
  s += [Slice(stats + bn + (leaf,), 0, 'norm') for leaf in ('mean', 'var')]
  return s


# --- Linen example models ----------------------------------------------------------------------

SMALL_BLOCKS = mobilenet_v2.BLOCKS[:3]  # block1 has a 16 -> 48 -> 24 hidden width


def mobilenet_linen():
  model = mobilenet_v2.MobileNetV2Linen(blocks=SMALL_BLOCKS)
  return model, linen_init(model, X)


def mobilenet_hidden_slices(block='block1', prefix=('params',), stats=('batch_stats',)):
  """An inverted block's hidden channels: expand out + BN, depthwise out + BN, project in."""
  b = (block,)
  return (conv_bn(b + ('expand',), b + ('expand_bn',), prefix, stats) +
          conv_bn(b + ('depthwise',), b + ('depthwise_bn',), prefix, stats) +
          [Slice(prefix + b + ('project', 'kernel'), -2, 'in')])


@HYP
@given(st.sets(st.integers(0, 47), min_size=1, max_size=40))
def test_mobilenet_linen_sliced_hidden_channels_match_zeroed_in_eval_mode(units):
  model, variables = mobilenet_linen()
  masked, sliced = remove(variables, mobilenet_hidden_slices(), units)
  assert sliced['params']['block1']['depthwise']['kernel'].shape[-1] == 48 - len(units)
  close(_apply(model, masked, X), _linen_apply(model, sliced, X))


def test_mobilenet_linen_train_mode_writes_smaller_batch_stats_and_matches_zeroed():
  model, variables = mobilenet_linen()
  units = [0, 5, 6, 30]
  masked, sliced = remove(variables, mobilenet_hidden_slices(), units)
  y_m, upd_m = model.apply(masked, X, train=True, mutable=['batch_stats'])
  y_s, upd_s = resize.linen_apply(model, sliced, X, train=True, mutable=['batch_stats'])
  close(y_m, y_s)
  assert shapes(upd_s['batch_stats']) == shapes(sliced['batch_stats'])
  keep = np.delete(np.arange(48), units)
  for bn in ('expand_bn', 'depthwise_bn'):
    for leaf in ('mean', 'var'):
      close(np.asarray(upd_m['batch_stats']['block1'][bn][leaf])[keep],
            upd_s['batch_stats']['block1'][bn][leaf])


def test_linen_apply_updates_depthwise_feature_group_count():
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if context.module.name == 'depthwise' and context.method_name == '__call__':
      seen[context.module.path] = context.module.feature_group_count
    return next_fun(*args, **kwargs)

  model, variables = mobilenet_linen()
  _, sliced = remove(variables, mobilenet_hidden_slices(), [1, 2, 3])
  # The resize interceptor is registered first, so the spy sees the resized field.
  with resize.resizing(), nn.intercept_methods(spy):
    model.apply(sliced, X)
  assert seen[('block1', 'depthwise')] == 45
  assert seen[('block2', 'depthwise')] == 48
  # The user's module is unchanged afterwards.
  assert model.blocks == SMALL_BLOCKS


def test_linen_grouped_conv_keeps_group_count_when_units_leave_every_group():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (1, 1), name='a')(x)
      x = nn.Conv(8, (3, 3), feature_group_count=2, name='g')(x)
      return nn.Conv(3, (1, 1), name='c')(x)

  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  v = linen_init(Net(), x)
  # Unit 1 of each group: a's outputs 1 and 5, position 1 of g's 4 inputs per group; then g's
  # outputs 1 and 5 (one per group: 4 -> 3 outputs per group) and c's inputs 1 and 5.
  masked, sliced = v, v
  for group, units in (([Slice(('params', 'a', 'kernel'), -1, 'out'),
                         Slice(('params', 'a', 'bias'), 0, 'out')], [1, 5]),
                       ([Slice(('params', 'g', 'kernel'), 2, 'in')], [1]),
                       ([Slice(('params', 'g', 'kernel'), -1, 'out'),
                         Slice(('params', 'g', 'bias'), 0, 'out'),
                         Slice(('params', 'c', 'kernel'), 2, 'in')], [1, 5])):
    masked, _ = remove(masked, group, units)
    _, sliced = remove(sliced, group, units)
  assert sliced['params']['g']['kernel'].shape == (3, 3, 3, 6)
  close(Net().apply(masked, x), resize.linen_apply(Net(), sliced, x))


def vit_linen():
  model = vit_tiny.ViTTinyLinen(depth=2)
  return model, linen_init(model, X)


def head_slices(attn, head, prefix=('params',)):
  s = []
  for n in ('query', 'key', 'value'):
    s += [Slice(prefix + attn + (n, 'kernel'), 1, 'out'), Slice(prefix + attn + (n, 'bias'), 0, 'out')]
  return s + [Slice(prefix + attn + ('out', 'kernel'), 0, 'in')]


def mlp_slices(block, prefix=('params',)):
  return [Slice(prefix + block + ('mlp1', 'kernel'), -1, 'out'),
          Slice(prefix + block + ('mlp1', 'bias'), 0, 'out'),
          Slice(prefix + block + ('mlp2', 'kernel'), 0, 'in')]


@HYP
@given(st.integers(0, 3), st.sets(st.integers(0, 127), min_size=1, max_size=100))
def test_vit_linen_removed_head_and_mlp_units_match_zeroed(head, units):
  model, v = vit_linen()
  masked, sliced = remove(v, head_slices(('block0', 'attn'), head), [head])
  m2, _ = remove(masked, mlp_slices(('block1',)), units)
  _, s2 = remove(sliced, mlp_slices(('block1',)), units)
  assert s2['params']['block0']['attn']['query']['kernel'].shape == (64, 3, 16)
  close(_apply(model, m2, X), _linen_apply(model, s2, X))


def test_linen_attention_reads_num_heads_from_the_query_kernel_and_value_head_dim_may_differ():
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.MultiHeadDotProductAttention):
      seen[context.module.path] = (context.module.num_heads, context.module.qkv_features)
    return next_fun(*args, **kwargs)

  model, v = vit_linen()
  masked, sliced = remove(v, head_slices(('block1', 'attn'), 2), [2])
  # value/out head_dim units 0 and 7 of every remaining head (q/k keep 16 per head).
  a = ('params', 'block1', 'attn')
  vslices = [Slice(a + ('value', 'kernel'), 2, 'out'), Slice(a + ('value', 'bias'), 1, 'out'),
             Slice(a + ('out', 'kernel'), 1, 'in')]
  masked, _ = remove(masked, vslices, [0, 7])
  _, sliced = remove(sliced, vslices, [0, 7])
  with resize.resizing(), nn.intercept_methods(spy):
    y = model.apply(sliced, X)
  assert seen[('block1', 'attn')] == (3, 48)
  assert seen[('block0', 'attn')] == (4, 64)
  close(model.apply(masked, X), y)


def concat_linen():
  model = concat_cnn.ConcatCNN()
  return model, linen_init(model, X)


@HYP
@given(st.sets(st.integers(0, 7), min_size=1, max_size=7),
       st.sets(st.integers(0, 31), min_size=1, max_size=31))
def test_concat_cnn_branch_channels_through_concat_and_flatten_match_zeroed(branch, mid):
  model, v = concat_linen()
  # Branch 2 (conv1) sits at offset 16 of the concatenation that `mix` reads.
  g1 = conv_bn(('conv1',), ('bn1',), bias=True) + [Slice(('params', 'mix', 'kernel'), -2, 'in',
                                                         offset=16)]
  # `mix` channels reach `fc` through a flatten of 7x7 positions.
  g2 = conv_bn(('mix',), ('mix_bn',), bias=True) + [Slice(('params', 'fc', 'kernel'), 0, 'in',
                                                          repeat=49)]
  masked, sliced = remove(v, g1, branch)
  masked, _ = remove(masked, g2, mid)
  _, sliced = remove(sliced, g2, mid)
  assert sliced['params']['fc']['kernel'].shape[0] == 49 * (32 - len(mid))
  close(_apply(model, masked, X), _linen_apply(model, sliced, X))


def test_concat_cnn_train_mode_matches_zeroed_and_writes_smaller_batch_stats():
  model, v = concat_linen()
  g1 = conv_bn(('conv1',), ('bn1',), bias=True) + [Slice(('params', 'mix', 'kernel'), -2, 'in',
                                                         offset=16)]
  masked, sliced = remove(v, g1, [0, 6])
  y_m, _ = model.apply(masked, X, train=True, mutable=['batch_stats'])
  y_s, upd = resize.linen_apply(model, sliced, X, train=True, mutable=['batch_stats'])
  close(y_m, y_s)
  assert upd['batch_stats']['bn1']['mean'].shape == (6,)
  assert shapes(upd['batch_stats']) == shapes(sliced['batch_stats'])


# --- other Linen layers ------------------------------------------------------------------------

def test_linen_embed_dense_general_conv_transpose_and_project_conv_subclass():
  from taylor_jax.models.common import conv as zoo_conv

  class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens, img):
      e = nn.Embed(10, 8, name='embed')(tokens)                   # (B, T, 8)
      d = nn.DenseGeneral((2, 4), name='dg')(e)                   # (B, T, 2, 4)
      d = nn.DenseGeneral(3, axis=(-2, -1), name='dg_out')(d)     # (B, T, 3)
      c = zoo_conv(6, 3, name='stem', use_bias=True)(img)         # 1 input channel: fast path
      c = nn.ConvTranspose(5, (2, 2), strides=(2, 2), name='up')(c)
      c = nn.Dense(3, name='c_out')(c)
      return d.sum(1) + c.mean((1, 2))

  tok = jnp.array([[1, 2, 3], [4, 5, 9]])
  img = jax.random.normal(jax.random.key(3), (2, 5, 5, 1))
  v = linen_init(Net(), tok, img)
  slices = [Slice(('params', 'embed', 'embedding'), 1, 'out'), Slice(('params', 'dg', 'kernel'), 0, 'in')]
  masked, sliced = remove(v, slices, [0, 3, 7])
  dg = [Slice(('params', 'dg', 'kernel'), 2, 'out'), Slice(('params', 'dg', 'bias'), 1, 'out'),
        Slice(('params', 'dg_out', 'kernel'), 1, 'in')]
  stem = [Slice(('params', 'stem', 'kernel'), -1, 'out'), Slice(('params', 'stem', 'bias'), 0, 'out'),
          Slice(('params', 'up', 'kernel'), -2, 'in')]
  up = [Slice(('params', 'up', 'kernel'), -1, 'out'), Slice(('params', 'up', 'bias'), 0, 'out'),
        Slice(('params', 'c_out', 'kernel'), 0, 'in')]
  for group, units in ((dg, [1]), (stem, [0, 4]), (up, [2])):
    masked, _ = remove(masked, group, units)
    _, sliced = remove(sliced, group, units)
  close(Net().apply(masked, tok, img), resize.linen_apply(Net(), sliced, tok, img))


def test_linen_group_norm_keeps_num_groups_and_rejects_a_width_it_does_not_divide():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, name='d')(x)
      return nn.Dense(2, name='o')(nn.GroupNorm(num_groups=4, name='gn')(x))

  x = jax.random.normal(jax.random.key(4), (3, 5))
  v = linen_init(Net(), x)
  g = [Slice(('params', 'd', 'kernel'), -1, 'out'), Slice(('params', 'd', 'bias'), 0, 'out'),
       Slice(('params', 'gn', 'scale'), 0, 'norm'), Slice(('params', 'gn', 'bias'), 0, 'norm'),
       Slice(('params', 'o', 'kernel'), 0, 'in')]
  _, ok = remove(v, g, [0, 2, 4, 6])  # one unit per group of 2
  assert resize.linen_apply(Net(), ok, x).shape == (3, 2)
  _, bad = remove(v, g, [0, 1, 2])
  with pytest.raises(resize.ResizeError, match=r'/gn .*GroupNorm.*num_groups=4'):
    resize.linen_apply(Net(), bad, x)


def test_linen_layer_norm_and_rms_norm_take_the_pruned_width_from_their_input():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.RMSNorm(name='rms')(nn.LayerNorm(name='ln')(nn.Dense(8, name='d')(x)))
      return nn.Dense(2, name='o')(x)

  x = jax.random.normal(jax.random.key(4), (3, 5))
  v = linen_init(Net(), x)
  g = [Slice(('params', 'd', 'kernel'), -1, 'out'), Slice(('params', 'd', 'bias'), 0, 'out'),
       Slice(('params', 'ln', 'scale'), 0, 'norm'), Slice(('params', 'ln', 'bias'), 0, 'norm'),
       Slice(('params', 'rms', 'scale'), 0, 'norm'), Slice(('params', 'o', 'kernel'), 0, 'in')]
  _, sliced = remove(v, g, [1, 6])
  # Not the zeroed network's function (the norms divide by the width), but it runs smaller.
  assert resize.linen_apply(Net(), sliced, x).shape == (3, 2)


def test_linen_depthwise_conv_with_outputs_not_matching_its_input_raises_clear_error():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (1, 1), name='a')(x)
      return nn.Conv(8, (3, 3), feature_group_count=8, name='dw')(x)

  x = jnp.ones((1, 5, 5, 2))
  v = linen_init(Net(), x)
  # Channels removed from the depthwise conv only, not from its input.
  _, sliced = remove(v, [Slice(('params', 'dw', 'kernel'), -1, 'out'),
                         Slice(('params', 'dw', 'bias'), 0, 'out')], [0, 1])
  with pytest.raises(resize.ResizeError, match=r'/dw \(Conv\): grouped conv with 8 input '
                     r'channels .* 6 output channels, not a multiple of 8 groups'):
    resize.linen_apply(Net(), sliced, x)


class HardcodedScale(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return x * self.param('w', nn.initializers.ones, (self.width,))


class InputScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param('w', nn.initializers.ones, (x.shape[-1],))


class CustomNet(nn.Module):
  scale: Callable[[], nn.Module]

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name='d')(x)
    x = self.scale()(x)
    return nn.Dense(2, name='o')(x)


def _custom_slices(name):
  return [Slice(('params', 'd', 'kernel'), -1, 'out'), Slice(('params', 'd', 'bias'), 0, 'out'),
          Slice(('params', name, 'w'), 0, 'out'), Slice(('params', 'o', 'kernel'), 0, 'in')]


def test_linen_custom_layer_with_hardcoded_width_raises_clear_error():
  x = jnp.ones((2, 3))
  net = CustomNet(lambda: HardcodedScale(8, name='scale'))
  v = linen_init(net, x)
  _, sliced = remove(v, _custom_slices('scale'), [1, 2])
  with pytest.raises(resize.HardcodedWidthError) as e:
    resize.linen_apply(net, sliced, x)
  msg = str(e.value)
  assert "'w'" in msg and "'/scale'" in msg and 'HardcodedScale' in msg
  assert 'hard-coded' in msg and 'not prunable' in msg and 'x.shape[-1]' in msg


def test_linen_custom_layer_deriving_width_from_input_runs_smaller():
  x = jax.random.normal(jax.random.key(5), (2, 3))
  net = CustomNet(lambda: InputScale(name='scale'))
  v = linen_init(net, x)
  masked, sliced = remove(v, _custom_slices('scale'), [1, 2])
  close(net.apply(masked, x), resize.linen_apply(net, sliced, x))


# --- NNX ---------------------------------------------------------------------------------------

def mobilenet_nnx():
  model = nnx_init(lambda: mobilenet_v2.MobileNetV2NNX(blocks=SMALL_BLOCKS, rngs=nnx.Rngs(0)))
  model.eval()
  return model


@HYP
@given(st.sets(st.integers(0, 47), min_size=1, max_size=40))
def test_mobilenet_nnx_in_place_pruning_matches_zeroed_and_updates_depthwise_groups(units):
  full = mobilenet_nnx()
  pruned = nnx.clone(full)
  slices = mobilenet_hidden_slices(1, prefix=('blocks',), stats=('blocks',))
  masked, sliced = remove(resize.nnx_pure_state(full), slices, units)
  resize.nnx_load_state(full, masked)
  with warnings.catch_warnings():
    warnings.simplefilter('error', resize.StaleAttributeWarning)
    resize.nnx_load_state(pruned, sliced, example_input=X)
  new = 48 - len(units)
  blk = pruned.blocks[1]
  assert (blk.depthwise.feature_group_count, blk.depthwise.in_features,
          blk.depthwise.out_features) == (new, new, new)
  assert blk.depthwise.kernel.shape == (3, 3, 1, new) and blk.depthwise.kernel_shape == (3, 3, 1, new)
  assert (blk.expand.out_features, blk.project.in_features) == (new, new)
  assert blk.expand_bn.num_features == blk.depthwise_bn.num_features == new
  assert pruned.blocks[2].depthwise.feature_group_count == 48
  close(full(X), pruned(X))


def test_mobilenet_nnx_train_mode_after_pruning_updates_smaller_batch_stats():
  full = mobilenet_nnx()
  pruned = nnx.clone(full)
  units = [3, 4, 40]
  masked, sliced = remove(resize.nnx_pure_state(full), mobilenet_hidden_slices(
      1, prefix=('blocks',), stats=('blocks',)), units)
  resize.nnx_load_state(full, masked)
  resize.nnx_load_state(pruned, sliced)
  full.train()
  pruned.train()
  close(full(X), pruned(X))
  keep = np.delete(np.arange(48), units)
  for bn in ('expand_bn', 'depthwise_bn'):
    new_mean = getattr(pruned.blocks[1], bn).mean.get_value()
    assert new_mean.shape == (45,)
    close(np.asarray(getattr(full.blocks[1], bn).mean.get_value())[keep], new_mean)


@HYP
@given(st.integers(0, 3), st.sets(st.integers(0, 127), min_size=1, max_size=100))
def test_vit_nnx_removed_head_and_mlp_units_match_zeroed_and_attention_attributes_update(
    head, units):
  full = nnx_init(lambda: vit_tiny.ViTTinyNNX(depth=2, rngs=nnx.Rngs(0)))
  full.eval()
  pruned = nnx.clone(full)
  state = resize.nnx_pure_state(full)
  masked, sliced = remove(state, head_slices(('blocks', 0, 'attn'), head, prefix=()), [head])
  masked, _ = remove(masked, mlp_slices(('blocks', 1), prefix=()), units)
  _, sliced = remove(sliced, mlp_slices(('blocks', 1), prefix=()), units)
  resize.nnx_load_state(full, masked)
  with warnings.catch_warnings():
    warnings.simplefilter('error', resize.StaleAttributeWarning)
    resize.nnx_load_state(pruned, sliced)
  attn = pruned.blocks[0].attn
  assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.qkv_features) == (3, 3, 16, 48)
  assert (attn.in_features, attn.out_features) == (64, 64)
  assert attn.out.in_features == (3, 16) and attn.query.out_features == (3, 16)
  assert pruned.blocks[1].attn.num_heads == 4
  assert pruned.blocks[1].mlp1.out_features == pruned.blocks[1].mlp2.in_features == 128 - len(units)
  close(full(X), pruned(X))


def test_nnx_linear_general_embed_conv_transpose_group_norm_attributes():
  class Net(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.embed = nnx.Embed(10, 8, rngs=rngs)
      self.lg = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
      self.up = nnx.ConvTranspose(1, 6, (2, 2), strides=(2, 2), rngs=rngs)
      self.gn = nnx.GroupNorm(6, num_groups=3, rngs=rngs)

  net = nnx_init(Net)
  state = resize.nnx_pure_state(net)
  _, s = remove(state, [Slice(('embed', 'embedding'), 1, 'out'), Slice(('lg', 'kernel'), 0, 'in')],
                [0, 1])
  _, s = remove(s, [Slice(('lg', 'kernel'), 2, 'out'), Slice(('lg', 'bias'), 1, 'out')], [3])
  _, s = remove(s, [Slice(('up', 'kernel'), -1, 'out'), Slice(('up', 'bias'), 0, 'out'),
                    Slice(('gn', 'scale'), 0, 'norm'), Slice(('gn', 'bias'), 0, 'norm')], [0, 2, 4])
  resize.nnx_load_state(net, s)
  assert (net.embed.num_embeddings, net.embed.features) == (10, 6)
  assert (net.lg.in_features, net.lg.out_features) == ((6,), (2, 3))
  assert (net.up.in_features, net.up.out_features, net.up.kernel_shape) == (1, 3, (2, 2, 1, 3))
  assert (net.gn.num_groups, net.gn.group_size) == (3, 1)
  e = net.embed(jnp.array([[1, 2]]))
  assert net.lg(e).shape == (1, 2, 2, 3)
  assert net.gn(net.up(jnp.ones((1, 3, 3, 1)))).shape == (1, 6, 6, 3)


def test_nnx_grouped_conv_keeps_group_count_when_units_leave_every_group():
  conv = nnx_init(lambda: nnx.Conv(8, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
  s = resize.nnx_pure_state(conv)
  _, s = remove(s, [Slice(('kernel',), 2, 'in')], [1])          # 4 -> 3 inputs per group
  _, s = remove(s, [Slice(('kernel',), 3, 'out'), Slice(('bias',), 0, 'out')], [0, 3])
  resize.nnx_load_state(conv, s)
  assert (conv.feature_group_count, conv.in_features, conv.out_features) == (2, 6, 4)
  assert conv(jnp.ones((1, 5, 5, 6))).shape == (1, 5, 5, 4)


class NNXScale(nnx.Module):
  """Custom module whose width follows its variable: keeps working."""

  def __init__(self, width, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (width,)))

  def __call__(self, x):
    return x * self.w[...]


class NNXStale(nnx.Module):
  """Custom module that keeps its width as an attribute and uses it: goes stale."""

  def __init__(self, width, rngs):
    self.width = width
    self.w = nnx.Param(jax.random.normal(rngs.params(), (width,)))

  def __call__(self, x):
    return (x * self.w[...]).reshape(x.shape[0], self.width)


class NNXNet(nnx.Module):
  def __init__(self, custom):
    rngs = nnx.Rngs(0)
    self.d = nnx.Linear(3, 8, rngs=rngs)
    self.custom = custom(8, rngs)
    self.o = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.o(self.custom(self.d(x)))


def _nnx_custom_slices():
  return [Slice(('d', 'kernel'), -1, 'out'), Slice(('d', 'bias'), 0, 'out'),
          Slice(('custom', 'w'), 0, 'out'), Slice(('o', 'kernel'), 0, 'in')]


def test_nnx_custom_module_whose_width_follows_its_variables_keeps_working():
  x = jax.random.normal(jax.random.key(6), (2, 3))
  full = nnx_init(lambda: NNXNet(NNXScale))
  pruned = nnx.clone(full)
  masked, sliced = remove(resize.nnx_pure_state(full), _nnx_custom_slices(), [0, 5])
  resize.nnx_load_state(full, masked)
  with warnings.catch_warnings():
    warnings.simplefilter('error', resize.StaleAttributeWarning)
    resize.nnx_load_state(pruned, sliced, example_input=x)
  close(full(x), pruned(x))


def test_nnx_custom_module_with_stale_width_warns_and_fails_naming_the_module():
  x = jax.random.normal(jax.random.key(6), (2, 3))
  _, sliced = remove(resize.nnx_pure_state(nnx_init(lambda: NNXNet(NNXStale))), _nnx_custom_slices(), [0, 5])
  with pytest.warns(resize.StaleAttributeWarning, match=r'custom \(NNXStale\).*width=8'):
    with pytest.raises(resize.ResizeError, match=r'fails in module custom \(NNXStale\)'):
      resize.nnx_load_state(nnx_init(lambda: NNXNet(NNXStale)), sliced, example_input=x)
  # The attribute can be set by hand.
  net = resize.nnx_load_state(nnx_init(lambda: NNXNet(NNXStale)), sliced, overrides={'custom': {'width': 6}})
  assert net(x).shape == (2, 2)


def test_nnx_apply_fn_runs_pure_dicts_of_the_pruned_shapes():
  net = nnx_init(lambda: NNXNet(NNXScale))
  x = jnp.ones((2, 3))
  _, sliced = remove(resize.nnx_pure_state(net), _nnx_custom_slices(), [1])
  resize.nnx_load_state(net, sliced)
  fn = jax.jit(resize.nnx_apply_fn(net))
  close(fn(resize.nnx_pure_state(net), x), net(x))


def test_nnx_load_state_rejects_unknown_paths_and_growth():
  net = nnx_init(lambda: NNXNet(NNXScale))
  with pytest.raises(resize.ResizeError, match='not variables'):
    resize.nnx_load_state(net, {'d': {'nope': np.zeros(3)}})
  with pytest.raises(resize.ResizeError, match='larger'):
    resize.nnx_load_state(net, {'d': {'bias': np.zeros(9)}})


def test_nnx_load_state_error_leaves_the_model_as_it_was():
  conv = nnx_init(lambda: nnx.Conv(8, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
  s = resize.nnx_pure_state(conv)
  _, s = remove(s, [Slice(('kernel',), 2, 'in')], [1])           # 4 -> 3 inputs per group
  _, s = remove(s, [Slice(('kernel',), 3, 'out'), Slice(('bias',), 0, 'out')], [0])  # 5 outputs
  with pytest.raises(resize.ResizeError, match=r'grouped conv .*feature_group_count=2'):
    resize.nnx_load_state(conv, s)
  assert conv.kernel.shape == (3, 3, 4, 6) and conv.bias.shape == (6,)
  assert (conv.feature_group_count, conv.in_features, conv.out_features) == (2, 8, 6)
  assert conv(jnp.ones((1, 4, 4, 8))).shape == (1, 4, 4, 6)


def test_nnx_attention_refuses_a_value_head_dim_that_differs_from_query_head_dim():
  # nnx.dot_product_attention without dropout is jax.nn.dot_product_attention (one head_dim);
  # Linen's attention accepts it (see the Linen attention test above).
  mha = nnx_init(lambda: nnx.MultiHeadAttention(2, 6, qkv_features=8, decode=False,
                                                rngs=nnx.Rngs(0)))
  _, s = remove(resize.nnx_pure_state(mha), [
      Slice(('value', 'kernel'), 2, 'out'), Slice(('value', 'bias'), 1, 'out'),
      Slice(('out', 'kernel'), 1, 'in')], [0])
  with pytest.raises(resize.ResizeError, match='head_dim 4 != value head_dim 3'):
    resize.nnx_load_state(mha, s)
  assert mha.value.kernel.shape == (6, 2, 4)
