"""Costs: parameter counts, MACs (by hand, vs XLA's cost analysis, masked == surgered), latency."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from taylor_jax import costs, models, surgery
from taylor_jax.models.densenet import DenseNet

import helpers  # noqa: E402  (tests/ is on sys.path)

random_masks = helpers.random_masks

NAMES = models.names()
# DenseNet-121 with fewer layers a dense block: every code path of DenseNet-121 (the same class),
# at a fifth of its trace/lower time. It stands in for DenseNet-121 where that is slow.
MINI_BLOCKS = {'densenet_mini': (2, 3, 2, 2)}
CIFAR = {'lenet3', 'resnet8', 'resnet20', 'resnet56', 'preact_resnet18', 'vgg16_bn'}


def input_shape(name: str) -> tuple[int, int, int]:
  if name == 'lenet3':
    return (28, 28, 1)
  return (32, 32, 3) if name in CIFAR else (64, 64, 3)  # ImageNet models: small inputs


@functools.lru_cache(maxsize=None)
def variables_of(name: str):
  """The model and zero variables of the right shapes (costs depend on shapes only; an eager
  init of the big models takes minutes on CPU)."""
  if name in MINI_BLOCKS:
    blocks = MINI_BLOCKS[name]
    model = DenseNet(widths=DenseNet.full_widths(block_config=blocks), num_classes=10,
                     block_config=blocks)
  else:
    model = models.create(name, 10)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + input_shape(name)))
  return model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# --- parameters --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['lenet3', 'resnet20', 'vgg11_bn'])
def test_count_params(name):
  model, variables = variables_of(name)
  want = sum(int(x.size) for x in jax.tree.leaves(variables['params']))
  assert costs.count_params(variables) == want
  assert costs.count_params(variables['params']) == want
  s = costs.summary(model, variables, input_shape(name))
  assert s == {'params': want, 'flops': costs.flops(model, input_shape(name))}


# --- MACs by hand ------------------------------------------------------------------------------

def lenet3_macs(w, side=28, classes=10):
  """conv5x5 VALID - pool2 - conv5x5 VALID - pool2 - fc - fc - head (MACs per example)."""
  s1 = side - 4
  s2 = s1 // 2 - 4
  flat = (s2 // 2) ** 2 * w['conv2']
  return (s1 * s1 * w['conv1'] * 25 * 1 + s2 * s2 * w['conv2'] * 25 * w['conv1'] +
          flat * w['fc1'] + w['fc1'] * w['fc2'] + w['fc2'] * classes)


def resnet20_macs(w, blocks=3, classes=10, count_padding=True):
  """CIFAR ResNet: 3x3 stem, 3 stages of basic blocks (3x3 convs, 1x1/2 projection where the
  stage starts at s > 1), global pool, dense head. Without padding, a 3x3 'same' conv on an n-long
  axis has 3n - 2 valid taps (stride 1) or 3n - 1 (stride 2 from 2n to n)."""
  def conv3(n, cin, cout, stride=1):
    if count_padding:
      return n * n * 9 * cin * cout
    taps = 3 * n - 2 if stride == 1 else 3 * n - 1
    return taps * taps * cin * cout

  total = conv3(32, 3, w['stage1'])
  prev = w['stage1']
  for s, n in zip((1, 2, 3), (32, 16, 8)):
    for b in range(blocks):
      mid, out = w[f'stage{s}.block{b}'], w[f'stage{s}']
      stride = 2 if (s > 1 and b == 0) else 1
      total += conv3(n, prev, mid, stride) + conv3(n, mid, out)
      if s > 1 and b == 0:
        total += n * n * prev * out  # 1x1 stride 2 projection: every tap valid
      prev = out
  return total + prev * classes


def test_lenet3_macs_by_hand():
  model = models.create('lenet3', 10)
  assert costs.flops(model, (28, 28, 1)) == lenet3_macs(model.widths) == 1_121_960
  # No padding in LeNet: both conventions agree.
  assert costs.flops(model, (28, 28, 1), count_padding=False) == 1_121_960
  masks = random_masks(model, 1)
  assert costs.flops(model, (28, 28, 1), masks) == lenet3_macs(
      surgery.new_widths(model.widths, masks))


def test_resnet20_macs_by_hand():
  model = models.create('resnet20', 10)
  # 40.55M (He et al.'s ResNet-20 with zero-padding shortcuts) + two 1x1 projections (2 x 131k).
  assert costs.flops(model, (32, 32, 3)) == resnet20_macs(model.widths) == 40_813_184
  assert costs.flops(model, (32, 32, 3), count_padding=False) == resnet20_macs(
      model.widths, count_padding=False)
  for seed in range(3):
    masks = random_masks(model, seed, keep_prob=0.3 + 0.3 * seed)
    w = surgery.new_widths(model.widths, masks)
    assert costs.flops(model, (32, 32, 3), masks) == resnet20_macs(w)
    assert costs.flops(model, (32, 32, 3), masks, count_padding=False) == resnet20_macs(
        w, count_padding=False)


# --- vs XLA --------------------------------------------------------------------------------------

_ELEMENTWISE = {'add', 'sub', 'mul', 'div', 'max', 'min', 'neg', 'abs', 'sign', 'select_n',
                'ge', 'gt', 'lt', 'le', 'eq', 'ne', 'and', 'or', 'not', 'integer_pow'}


def elementwise_flops(jaxpr) -> int:
  """XLA's count of the non-conv/dot work: 1 flop per output element of an elementwise op,
  ``input - output`` elements of a reduction, ``output * (window - 1)`` of a pooling window
  (transcendentals such as rsqrt are counted apart by XLA, not in 'flops')."""
  total = 0
  for e in jaxpr.eqns:
    n, out = e.primitive.name, math.prod(e.outvars[0].aval.shape)
    if n in _ELEMENTWISE:
      total += out
    elif n in ('reduce_sum', 'reduce_max', 'reduce_min'):
      total += math.prod(e.invars[0].aval.shape) - out
    elif n.startswith('reduce_window'):
      total += out * (math.prod(e.params['window_dimensions']) - 1)
    for sub in jcore.jaxprs_in_params(e.params):
      total += elementwise_flops(sub)
  return total


# Deeper members of a model class run the same block code as a shallower one kept here:
# ResNet-56 (CifarResNet, 9 blocks a stage) as ResNet-8/20; ResNet-34 (ImageNetResNet,
# BasicBlock) as ResNet-18; ResNet-101 (ImageNetResNet, Bottleneck) as ResNet-50; DenseNet-121
# as densenet_mini. Slow: each traces and lowers its whole forward twice (5-12 s).
FLOPS_SLOW = {'resnet56', 'resnet34', 'resnet101', 'densenet121'}


def _slow_if(names, slow):
  return [pytest.param(n, marks=[pytest.mark.slow] if n in slow else []) for n in names]


@pytest.mark.parametrize('name', _slow_if(NAMES + sorted(MINI_BLOCKS), FLOPS_SLOW))
def test_flops_agree_with_xla(name):
  """Our MACs (from widths) x 2 vs XLA's HloCostAnalysis, for every zoo model.

  1. conv/dot ops alone (each lowered on its own): XLA == 2 x MACs (XLA's convention: taps over
     padding excluded, 2 flops per MAC), within 2% (exact in practice).
  2. the whole eval forward pass as one XLA module, unsubtracted: XLA == 2 x MACs within 2%
     (the remainder is BN/ReLU/add/pool work) ...
  3. ... and that remainder is exactly the elementwise work (so nothing conv/dot-like is missed).
  """
  model, variables = variables_of(name)
  shape = input_shape(name)
  ours = costs.flops(model, shape, count_padding=False)
  per_op = costs.xla_conv_dot_flops(model, shape)
  assert abs(per_op - 2 * ours) <= 0.02 * per_op, (name, per_op, 2 * ours)
  whole = costs.xla_flops(model, variables, shape, optimized=False)
  assert 2 * ours <= whole <= 2 * ours * 1.02, (name, whole / (2 * ours) - 1)
  rest = elementwise_flops(costs._eval_jaxpr(model, shape).jaxpr)
  assert abs(whole - (2 * ours + rest)) <= 1e-3 * whole, (name, whole, 2 * ours + rest)
  # Padded taps only add work: the papers' convention counts at least as much.
  assert costs.flops(model, shape) >= ours


@pytest.mark.parametrize('name', ['lenet3', 'resnet8', 'vgg16_bn'])
def test_flops_agree_with_compiled_xla(name):
  """The compiled (optimised) module too; XLA's fusion can duplicate cheap elementwise work into
  several consumers (a few % on deep ResNets), so it is checked on models where it does not."""
  model, variables = variables_of(name)
  shape = input_shape(name)
  ours = costs.flops(model, shape, count_padding=False)
  whole = costs.xla_flops(model, variables, shape)
  assert 2 * ours <= whole <= 2 * ours * 1.02, (name, whole / (2 * ours) - 1)


# --- masked == surgered ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', _slow_if(['lenet3', 'resnet20', 'preact_resnet18', 'vgg11_bn',
                                           'densenet121', 'densenet_mini'], {'densenet121'}))
def test_masked_flops_equal_surgered_flops(name):
  model, variables = variables_of(name)
  shape = input_shape(name)
  masks = random_masks(model, 7, keep_prob=0.4)
  small_vars = surgery.shrink_variables(model.groups(), variables, masks)
  small = model.clone(widths=surgery.new_widths(model.widths, masks))
  masked = costs.flops(model, shape, masks)
  summ = costs.summary(small, small_vars, shape)
  assert summ['flops'] == masked
  assert summ['params'] == costs.count_params(small_vars) < costs.count_params(variables)
  # all-ones masks cost what the full model costs, more than the masked one.
  ones = {k: np.ones_like(v) for k, v in masks.items()}
  assert costs.flops(model, shape, ones) > masked


def test_masks_emptying_a_group_raise():
  model = models.create('resnet8', 10)
  masks = random_masks(model, 0)
  masks['stage1'][:] = 0
  with pytest.raises(ValueError, match='stage1'):
    costs.flops(model, (32, 32, 3), masks)


# --- latency ----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['lenet3', 'resnet8'])
def test_latency_positive(name):
  model, variables = variables_of(name)
  shape = input_shape(name)
  masks = random_masks(model, 0)
  for m, v, g in [(model, variables, None), (model, variables, masks),
                  (model.clone(widths=surgery.new_widths(model.widths, masks)),
                   surgery.shrink_variables(model.groups(), variables, masks), None)]:
    t = costs.latency_ms(m, v, g, batch_size=2, input_shape=shape, repeats=3, warmup=1)
    assert t['repeats'] == 3 and t['batch_size'] == 2
    for k in ('median', 'p10', 'p90', 'mean', 'min'):
      assert np.isfinite(t[k]) and t[k] > 0, (k, t)


def test_latency_is_timed_on_xla_default_optimisation(monkeypatch):
  """The suite compiles at LLVM level 0 (conftest.py); latency must still time the program a
  deployment runs: every timed network is compiled at XLA's default level 3."""
  import jax.stages
  seen = []
  compile_ = jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kw):
    seen.append(compiler_options)
    return compile_(self, compiler_options=compiler_options, **kw)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', spy)
  model, variables = variables_of('lenet3')
  costs.compare_latency({'a': (model, variables, None), 'b': (model, variables, None)}, 2,
                        input_shape('lenet3'), repeats=1, rounds=1, warmup=1)
  assert seen == [{'xla_backend_optimization_level': 3}] * 2


def test_counts_are_kept_per_widths_and_fields():
  model, _ = variables_of('resnet8')
  masks = random_masks(model, 0)
  small = model.clone(widths=surgery.new_widths(model.widths, masks))
  want = (costs.flops(small, (32, 32, 3)), costs.params(small, (32, 32, 3)))
  assert (costs.flops(model, (32, 32, 3), masks), costs.params(model, (32, 32, 3), masks)) == want
  assert costs.flops(model, (32, 32, 3)) > want[0]  # the full model is not the kept small one
  assert costs.flops(small, (32, 32, 3), count_padding=False) < want[0]
  assert costs.flops(small, (16, 16, 3)) < want[0]
  # A field other than the widths (the classes) changes the key too.
  assert costs.params(small.clone(num_classes=3), (32, 32, 3)) < want[1]


class _FakeClock:
  """Stands in for ``time`` in costs: the k-th timed call lasts ``durations_ms[k]``."""

  def __init__(self, durations_ms):
    self.durations = list(durations_ms)
    self.now, self.calls = 1000.0, 0

  def perf_counter(self):
    if self.calls % 2:  # the end of a timed call
      self.now += self.durations[self.calls // 2] / 1e3
    self.calls += 1
    return self.now


def test_latency_statistics_of_a_known_distribution(monkeypatch):
  model, variables = variables_of('lenet3')
  # 20 timed calls: 1..20 ms in a shuffled order (0.5 ms steps would do as well).
  durations = np.random.default_rng(0).permutation(np.arange(1.0, 21.0))
  clock = _FakeClock(durations)
  monkeypatch.setattr(costs, 'time', clock)
  t = costs.latency_ms(model, variables, None, batch_size=2, input_shape=(28, 28, 1),
                       repeats=20, warmup=1)
  assert clock.calls == 40  # warm-up calls are not timed
  assert t['repeats'] == 20 and t['batch_size'] == 2
  assert t['median'] == pytest.approx(10.5)
  assert t['p10'] == pytest.approx(2.9) and t['p90'] == pytest.approx(18.1)  # numpy's linear
  assert t['mean'] == pytest.approx(10.5) and t['min'] == pytest.approx(1.0)


def test_compare_latency_times_every_net_in_rounds(monkeypatch):
  # Two LeNet3s (what is timed does not matter here: the clock is fake; test_latency_positive
  # times real networks).
  big, big_vars = variables_of('lenet3')
  small = big.clone(widths={k: max(1, w // 2) for k, w in big.widths.items()})
  shapes = jax.eval_shape(small.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  nets = {'small': (small, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), None),
          'big': (big, big_vars, None)}
  # Order of the timed calls: round 0 (small x3, big x3), round 1 (small x3, big x3). small is
  # least disturbed in round 1, big in round 0: each net's statistics come from its own best round.
  rounds = {('small', 0): [5, 9, 7], ('big', 0): [20, 10, 12],
            ('small', 1): [4, 1, 6], ('big', 1): [30, 31, 13]}
  clock = _FakeClock([d for r in (0, 1) for n in ('small', 'big') for d in rounds[(n, r)]])
  monkeypatch.setattr(costs, 'time', clock)
  out = costs.compare_latency(nets, 4, (28, 28, 1), repeats=3, rounds=2, warmup=1)
  assert clock.calls == 2 * 12
  want = {'small': (1, [7.0, 4.0]), 'big': (0, [12.0, 30.0])}
  for name, (best, medians) in want.items():
    r, d = out[name], np.asarray(rounds[(name, best)], float)
    assert r['round_medians'] == pytest.approx(medians) and r['repeats'] == 3
    assert r['batch_size'] == 4
    for k, v in (('median', np.median(d)), ('min', d.min()), ('mean', d.mean()),
                 ('p10', np.percentile(d, 10)), ('p90', np.percentile(d, 90))):
      assert r[k] == pytest.approx(v), (name, k)


def test_latency_table_times_one_group_at_a_time():
  model = models.create('resnet8', 10)
  grid = {'stage1.block0': [8, 16], 'stage3': [16, 40, 64]}
  table = costs.latency_table(model, (28, 28, 1), grid, batch_size=2, repeats=2, rounds=1)
  assert {k: sorted(t) for k, t in table.items()} == grid
  # The unchanged width is the one measurement of the model as it is, shared by every group.
  assert table['stage1.block0'][16] == table['stage3'][64]
  assert all(np.isfinite(ms) and ms > 0 for t in table.values() for ms in t.values())


def test_interpolate_is_piecewise_linear_and_flat_outside():
  t = {8: 1.0, 16: 3.0, 32: 4.0}
  assert costs.interpolate(t, 12) == pytest.approx(2.0)
  assert costs.interpolate(t, 24) == pytest.approx(3.5)
  assert costs.interpolate(t, 16) == 3.0
  assert costs.interpolate(t, 4) == 1.0 and costs.interpolate(t, 40) == 4.0
