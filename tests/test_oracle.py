"""The fast (vmapped, chunked) oracle against the explicit loop that zeroes one unit at a time."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import losses, models, oracle

TINY = {'stage1': 4, 'stage1.block0': 3, 'stage2': 5, 'stage2.block0': 4, 'stage3': 6,
        'stage3.block0': 3}


def random_variables(model, x, seed):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=a.shape) * 1.4 / np.sqrt(int(np.prod(a.shape[:-1])))
    if name == 'scale':
      return 1.0 + 0.3 * rng.normal(size=a.shape)
    if name == 'var':
      return 0.5 + rng.random(a.shape)
    return 0.2 * rng.normal(size=a.shape)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def setup(name, dtype):
  if name == 'resnet8':
    model, side = models.create('resnet8', 10, widths=TINY), 8
  else:
    model, side = models.create('lenet3', 10, image_size=20), 20
  rng = np.random.default_rng(1)
  batches = [{'image': rng.normal(size=(6, side, side, 1)).astype(dtype),
              'label': rng.integers(0, 10, size=6)} for _ in range(3)]
  variables = jax.tree.map(lambda a: np.asarray(a, dtype),
                           random_variables(model, jnp.asarray(batches[0]['image']), 0))
  masks = {g.name: (np.arange(g.width) % 4 != 2).astype(dtype) for g in model.groups()}
  return model, variables, masks, batches


def explicit_loop(model, variables, masks, batches, train):
  """One unit at a time, written out: zero its gate, recompute every minibatch's mean loss.
  Returns the mean absolute and the mean squared loss changes."""
  def loss(m, b):
    kw = {'mutable': ['batch_stats']} if train else {}
    out = model.apply(variables, b['image'], gates=m, train=train, **kw)
    logits = out[0] if train else out
    return jnp.mean(losses.cross_entropy(logits, b['label']))

  # Every one-unit-zeroed mask set, stacked; lax.map runs the full network once per set, one
  # after the other (no vmapping, no shared prefix: the oracle's tricks), all in one program
  # compiled once (a Python call per unit and batch cost ~1 ms dispatch each).
  units = [(g.name, c) for g in model.groups() for c in range(g.width) if masks[g.name][c] != 0]
  stacked = {k: np.repeat(v[None], len(units), axis=0) for k, v in masks.items()}
  for i, (k, c) in enumerate(units):
    stacked[k][i, c] = 0
  losses_j = jax.jit(lambda ms, b: (loss(masks, b), jax.lax.map(lambda m: loss(m, b), ms)))
  d = []
  for b in batches:
    base, zeroed = jax.device_get(losses_j(stacked, b))
    d.append(base - zeroed)
  d = np.asarray(d)  # (batches, units)
  out = {g.name: np.zeros(g.width) for g in model.groups()}
  out_sq = {g.name: np.zeros(g.width) for g in model.groups()}
  for i, (k, c) in enumerate(units):
    out[k][c] = np.mean(np.abs(d[:, i]))
    out_sq[k][c] = np.mean(np.square(d[:, i]))
  return out, out_sq


@pytest.mark.parametrize('name,train', [('resnet8', False), ('resnet8', True), ('lenet3', False)])
def test_oracle_equals_explicit_loop_float64(name, train):
  with jax.enable_x64(True):
    model, variables, masks, batches = setup(name, np.float64)
    want, want_sq = explicit_loop(model, variables, masks, batches, train)
    got = oracle.oracle_scores(model, variables, masks, batches, chunk_size=4, train=train)
    got_sq = oracle.oracle_scores(model, variables, masks, batches, squared=True, chunk_size=4,
                                  train=train)
  for k in want:
    live = masks[k] != 0
    assert np.all(got[k][~live] == 0) and np.all(got_sq[k][~live] == 0)
    assert np.count_nonzero(want[k][live]) > 0.5 * live.sum()
    np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=0)
    np.testing.assert_allclose(got_sq[k], want_sq[k], rtol=1e-10, atol=0)


def test_oracle_fast_equals_naive_float32():
  model, variables, masks, batches = setup('resnet8', np.float32)
  fast = oracle.oracle_scores(model, variables, masks, batches, chunk_size=3)
  naive = oracle.oracle_naive(model, variables, masks, batches)
  scale = max(float(np.max(v)) for v in naive.values())
  for k in naive:
    assert np.all(fast[k][masks[k] == 0] == 0)
    np.testing.assert_allclose(fast[k], naive[k], rtol=1e-5, atol=1e-5 * scale, err_msg=k)


def test_oracle_subset_of_units():
  model, variables, masks, batches = setup('lenet3', np.float32)
  units = {'fc1': [0, 1, 2, 3], 'conv2': [5]}  # unit 2 of fc1 is pruned
  got = oracle.oracle_scores(model, variables, masks, batches, units=units)
  full = oracle.oracle_scores(model, variables, masks, batches)
  assert set(np.flatnonzero(got['fc1'])) <= {0, 1, 3}
  assert set(np.flatnonzero(got['conv2'])) <= {5}
  assert not np.any(got['conv1']) and not np.any(got['fc2'])
  np.testing.assert_allclose(got['fc1'][[0, 1, 3]], full['fc1'][[0, 1, 3]], rtol=1e-5, atol=1e-6)
  # float32: the subset and the full oracle are differently compiled programs (summation order).
  np.testing.assert_allclose(got['conv2'][5], full['conv2'][5], rtol=1e-5, atol=1e-6)
  assert full['conv2'][5] > 0


def test_oracle_macs_count_prefix_once_and_suffix_per_unit():
  """LeNet3 by hand: per chunk of k units the layers before the gate run once, those after k
  times (padded chunks included); the naive loop runs the whole net once per unit."""
  from taylor_jax import costs
  model = models.create('lenet3', 10)
  c1, c2, f1, f2, f3 = [m for _, m in costs.conv_dot_ops(model, (28, 28, 1))]
  b = 3
  x = jnp.zeros((b, 28, 28, 1))
  # Costs depend on shapes only: zeros at init's shapes (an eager init compiles every op).
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                           jax.eval_shape(model.init, jax.random.key(0), x))
  masks = {g.name: np.ones((g.width,), np.float32) for g in model.groups()}
  got = oracle.oracle_macs(model, variables, masks, {'image': x, 'label': jnp.zeros(b, jnp.int32)},
                           chunk_size=64)
  want_fast = b * ((c1 + 16 * (c2 + f1 + f2 + f3)) + (c1 + c2 + 32 * (f1 + f2 + f3)) +
                   2 * (c1 + c2 + f1 + 64 * (f2 + f3)) + 2 * (c1 + c2 + f1 + f2 + 64 * f3))
  assert got['fast'] == want_fast
  assert got['naive'] == b * (16 + 32 + 120 + 84) * (c1 + c2 + f1 + f2 + f3)
