"""Zoo models: shapes, parameter counts, channel groups, and the masking == surgery invariant.

Cheap on 2 CPU cores: full-size ImageNet models only through ``jax.eval_shape``; forward passes of
ImageNet models use 32x32 / 64x64 inputs, batch 2, and reduced (1/4) widths.
"""

from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import models, surgery
from taylor_jax.groups import check_groups, get_path, total_units
from taylor_jax.models import common as model_common
from taylor_jax.models.densenet import DenseNet
from taylor_jax.models.vgg import adaptive_pool_matrix

CIFAR = {'resnet8', 'resnet20', 'resnet56', 'preact_resnet18', 'vgg16_bn'}
IMAGENET = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn', 'densenet121'}
ALL = sorted(CIFAR | IMAGENET | {'lenet3'})

# Exact trainable-parameter counts. ImageNet ones (1000 classes) are the published torchvision
# counts; CIFAR ones (10 classes) are what these definitions give (projection shortcuts for the
# CIFAR ResNets; kuangliu's VGG16 with BN has 14,728,266; kuangliu's PreActResNet18 has 11,171,146,
# +1,024 for the final BN kept here).
PARAM_COUNTS = {
    'lenet3': 85_822,
    'resnet8': 78_042,
    'resnet20': 272_474,
    'resnet56': 855_770,
    'preact_resnet18': 11_172_170,
    'vgg16_bn': 14_728_266,
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'vgg11_bn': 132_868_840,
    'densenet121': 7_978_856,
}
# Sanity ranges (published / paper figures) for the counts above.
PARAM_RANGES = {'resnet20': (0.26e6, 0.28e6), 'resnet56': (0.84e6, 0.87e6),
                'preact_resnet18': (11.1e6, 11.3e6), 'vgg16_bn': (14.7e6, 14.8e6)}


def num_classes(name: str) -> int:
  return 1000 if name in IMAGENET else 10


def input_shape(name: str, small: bool = True) -> tuple[int, ...]:
  if name == 'lenet3':
    return (2, 28, 28, 1)
  if name in IMAGENET:
    if not small:
      return (1, 224, 224, 3)
    # 64px for VGG11: the 2x2 feature map exercises the adaptive 7x7 pooling's overlapping bins.
    return (2, 64, 64, 3) if name == 'vgg11_bn' else (2, 32, 32, 3)
  return (2, 32, 32, 3)


def abstract_variables(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def n_params(variables) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params']))


# --- shapes, counts, groups at full width -------------------------------------------------------

@pytest.mark.parametrize('name', ALL)
def test_output_shape_and_param_count(name):
  nc = num_classes(name)
  model = models.create(name, nc)
  big = input_shape(name, small=False)
  v = abstract_variables(model, big)
  assert n_params(v) == PARAM_COUNTS[name]
  if name in PARAM_RANGES:
    lo, hi = PARAM_RANGES[name]
    assert lo <= n_params(v) <= hi
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v, jax.ShapeDtypeStruct(big, jnp.float32))
  assert out.shape == (big[0], nc)
  small = input_shape(name)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables(model, small),
                       jax.ShapeDtypeStruct(small, jnp.float32))
  assert out.shape == (small[0], nc)


@pytest.mark.parametrize('name', ALL)
def test_groups_describe_full_model(name):
  model = models.create(name, num_classes(name))
  groups = model.groups()
  assert [g.name for g in groups] and {g.name for g in groups} == set(models.full_widths(name))
  assert {g.kind for g in groups} <= {'channel', 'residual', 'neuron', 'concat'}
  check_groups(abstract_variables(model, input_shape(name)), groups)


def test_reference_gate_counts():
  # The reference's gate counts for the bottleneck ResNets (REFERENCE.md section 1).
  assert total_units(models.create('resnet50', 1000).groups()) == 11_392
  assert total_units(models.create('resnet101', 1000).groups()) == 20_096
  dn = models.create('densenet121', 1000).groups()
  assert {g.kind for g in dn if g.prunable} == {'channel'}
  assert total_units(dn) == 58 * 128  # only bottlenecks are prunable


def _random_widths(name, rng, low_fraction=0.0):
  return {k: int(rng.integers(max(1, int(w * low_fraction)), w + 1))
          for k, w in models.full_widths(name).items()}


@pytest.mark.parametrize('name', ALL)
def test_smaller_model_shapes_match_groups(name):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  widths = _random_widths(name, rng)
  model = models.create(name, num_classes(name), widths=widths)
  v = abstract_variables(model, input_shape(name))
  groups = model.groups()
  check_groups(v, groups)
  # Every (array, axis) named by a slice has exactly the length its groups predict.
  expected: dict = {}
  for g in groups:
    assert g.width == widths[g.name]
    for s in g.slices:
      arr = get_path(v, s.path)
      key = (s.path, s.axis % arr.ndim)
      expected[key] = expected.get(key, 0) + g.width * s.repeat
      if s.role == 'out':  # a producer's output axis holds exactly its group
        assert arr.shape[key[1]] == g.width * s.repeat, (g.name, s.path)
  for (path, axis), n in expected.items():
    assert get_path(v, path).shape[axis] == n, (path, axis)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v,
                       jax.ShapeDtypeStruct(input_shape(name), jnp.float32))
  assert out.shape == (input_shape(name)[0], num_classes(name))


# --- adaptive pooling ---------------------------------------------------------------------------

def test_adaptive_pool_matches_torch_bins():
  np.testing.assert_allclose(adaptive_pool_matrix(1, 7), np.ones((7, 1)))
  np.testing.assert_allclose(adaptive_pool_matrix(7, 7), np.eye(7))
  np.testing.assert_allclose(adaptive_pool_matrix(14, 7), np.kron(np.eye(7), [[0.5, 0.5]]))
  # torch: start = floor(i*2/7), end = ceil((i+1)*2/7)
  np.testing.assert_allclose(adaptive_pool_matrix(2, 7), np.array(
      [[1, 0], [1, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1], [0, 1]]))
  m = adaptive_pool_matrix(5, 7)
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)


# --- masking == surgery -------------------------------------------------------------------------

# Compiling these deep nets takes 30-90 s each on 2 CPU cores; their code paths are the same as
# resnet20 / resnet18 / resnet50 / densenet_mini (same classes, more blocks), which always run.
SLOW_INVARIANT = {'resnet34', 'resnet56', 'resnet101', 'densenet121'}
# A DenseNet-121 with fewer layers per block: every code path of DenseNet-121, cheap to compile.
MINI = {'densenet_mini': dict(block_config=(2, 3, 2, 2))}


def _build(name, widths=None):
  """(model, full widths before scaling) for a zoo name or a MINI variant."""
  if name in MINI:
    full = DenseNet.full_widths(**MINI[name])
    return DenseNet(widths=widths or full, num_classes=1000, **MINI[name]), full
  return models.create(name, num_classes(name), widths=widths), models.full_widths(name)


def _invariant_shape(name):
  if name == 'lenet3':
    return (2, 28, 28, 1)
  if name in IMAGENET or name in MINI:
    # 64px: 2x2 maps in the last stage. With 1x1 maps and batch 2, train-mode BN normalises two
    # values per channel and amplifies float32 rounding by orders of magnitude.
    return (2, 64, 64, 3)
  return (2, 32, 32, 3)


def _random_variables(abstract, rng):
  """Variables with random weights, BN scale/bias/statistics and biases (BN(0) != 0, so dead
  channels matter), as numpy arrays (cheap: no init compile)."""
  def leaf(path, a):
    last = path[-1].key
    if last in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
    if last in ('bias', 'mean'):
      return rng.normal(0, 0.3, a.shape).astype(np.float32)
    fan_in = int(np.prod(a.shape[:-1]))
    return (rng.normal(size=a.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _max_rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


def _eval_and_train(model):
  def f(variables, x, gates):
    y_eval = model.apply(variables, x, gates=gates)
    if 'batch_stats' not in variables:
      return y_eval, None, None
    y_train, upd = model.apply(variables, x, gates=gates, train=True, mutable=['batch_stats'])
    return y_eval, y_train, upd['batch_stats']
  return jax.jit(f)


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_INVARIANT else [])
    for n in ALL + sorted(MINI)])
def test_masked_equals_surgered(name):
  """Gate 0 == unit physically removed, in eval and train mode (and the running statistics)."""
  rng = np.random.default_rng(1 + zlib.crc32(name.encode()))
  _, full = _build(name)
  # ImageNet-size nets at 1/4 width to keep the forwards cheap on CPU.
  scale = 4 if (name in IMAGENET or name in MINI) else 1
  widths = {k: max(1, w // scale) for k, w in full.items()}
  model, _ = _build(name, widths)
  shape = _invariant_shape(name)
  x = rng.normal(size=shape).astype(np.float32)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x), rng)
  groups = model.groups()
  check_groups(variables, groups)
  # Random masks over every group (prunable or not: all must honour the invariant).
  masks = {}
  for g in groups:
    m = (rng.random(g.width) < 0.6).astype(np.float32)
    m[rng.integers(g.width)] = 1.0
    masks[g.name] = m
  small_vars = surgery.shrink_variables(groups, variables, masks)
  small, _ = _build(name, surgery.new_widths(widths, masks))
  check_groups(small_vars, small.groups())
  expect = jax.eval_shape(small.init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(small_vars) == jax.tree.structure(expect)
  for a, b in zip(jax.tree.leaves(small_vars), jax.tree.leaves(expect)):
    assert a.shape == b.shape

  run = _eval_and_train(model)
  ev, tr, stats = run(variables, x, masks)
  ev_s, tr_s, stats_s = _eval_and_train(small)(small_vars, x, surgery.shrink_masks(masks))
  assert ev.shape == ev_s.shape == (shape[0], model.num_classes)
  assert _max_rel_err(ev, ev_s) < 1e-5
  ones = jax.tree.map(np.ones_like, masks)
  assert _max_rel_err(run(variables, x, ones)[0], ev) > 1e-4  # masks matter
  if tr is None:
    return
  # Train-mode BN on batch-2 inputs amplifies float32 rounding (with float64 the difference is
  # ~1e-13), hence the looser bound; ResNet-101's 33 blocks of batch statistics need a bit more.
  tol = 5e-4 if name == 'resnet101' else 1e-4
  assert _max_rel_err(tr, tr_s) < tol
  shrunk = surgery.shrink_variables(groups, {'params': variables['params'],
                                             'batch_stats': jax.device_get(stats)}, masks)
  for a, b in zip(jax.tree.leaves(shrunk['batch_stats']), jax.tree.leaves(stats_s)):
    assert _max_rel_err(a, b) < tol


@pytest.mark.parametrize('name', ['lenet3', 'resnet8'])
def test_masks_change_output_and_ones_are_identity(name):
  """Gates are really applied (a mask changes the output) and all-ones gates change nothing."""
  rng = np.random.default_rng(7)
  model, full = _build(name)
  if name in MINI:
    model, _ = _build(name, {k: max(1, w // 4) for k, w in full.items()})
  shape = _invariant_shape(name)
  x = rng.normal(size=shape).astype(np.float32)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x), rng)
  ones = {g.name: np.ones(g.width, np.float32) for g in model.groups()}
  f = jax.jit(lambda v, x, g: model.apply(v, x, gates=g))
  y = f(variables, x, ones)
  np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-5, atol=1e-5)
  for g in model.groups():
    half = dict(ones)
    half[g.name] = (np.arange(g.width) % 2).astype(np.float32)
    if g.width > 1:
      assert _max_rel_err(f(variables, x, half), y) > 1e-6, g.name


@pytest.mark.parametrize('kernel,stride,pad,bias', [(3, 1, 1, False), (5, 1, 0, True),
                                                    (7, 2, 3, False), (3, 2, 1, True)])
def test_single_channel_conv_fast_path_equals_lax_conv(kernel, stride, pad, bias):
  """The grayscale-stem fast path (shifted multiply-adds) computes nn.Conv's output, float64."""
  import flax.linen as nn
  from taylor_jax.models import common
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 13, 11, 1), jnp.float64)
    kw = dict(padding=[(pad, pad), (pad, pad)], use_bias=bias, param_dtype=jnp.float64)
    fast = common.Conv(4, (kernel, kernel), (stride, stride), **kw)
    ref = nn.Conv(4, (kernel, kernel), (stride, stride), **kw)
    variables = ref.init(jax.random.key(1), x)
    if bias:  # a non-zero bias, so that adding it is checked too
      variables = jax.tree.map(lambda a: a + 0.5, variables)
    assert (jax.tree.structure(fast.init(jax.random.key(1), x)) ==
            jax.tree.structure(variables))
    want = ref.apply(variables, x)
    np.testing.assert_allclose(fast.apply(variables, x), want, rtol=0, atol=1e-12)
    with common.reference_convolutions():
      jaxpr = jax.make_jaxpr(lambda v: fast.apply(v, x))(variables)
    assert 'conv_general_dilated' in str(jaxpr)
    assert 'conv_general_dilated' not in str(jax.make_jaxpr(lambda v: fast.apply(v, x))(variables))


def test_run_once_computes_what_jit_computes_and_traces_along():
  """run_once (initialisation without LLVM optimisation) gives jit's values up to rounding,
  and under a transformation (the checkpoint template's eval_shape) is traced, not compiled."""
  model = models.create('resnet8', 10)
  x = np.zeros((1, 32, 32, 3), np.float32)
  a = model_common.run_once(model.init, jax.random.key(3), x)
  b = jax.jit(model.init)(jax.random.key(3), x)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
  shapes = jax.eval_shape(lambda k: model_common.run_once(model.init, k, x), jax.random.key(3))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, a)
