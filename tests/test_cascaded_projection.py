"""Cascaded Projection and the matrix surgery under it.

Checked against independent computations: BN folding by hand in numpy, the consumer conv by
``lax.conv`` on the hand-projected activations, index surgery for 0/1 matrices, the full-width
original network for full-rank projections, the reconstruction loss by its formula.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taylor_jax import engine, models, projection, surgery, train
from taylor_jax.methods import cascaded_projection as cap
from taylor_jax.models import common

SHAPE = (12, 12, 1)


def randomise(variables, seed=0):
  """BN statistics / affine params away from their init (negative scales included)."""
  rng = np.random.default_rng(seed)

  def f(path, v):
    leaf, v = path[-1].key, np.asarray(v)
    if leaf == 'mean':
      return rng.normal(0.0, 0.5, v.shape).astype(v.dtype)
    if leaf == 'var':
      return rng.uniform(0.5, 2.0, v.shape).astype(v.dtype)
    if leaf == 'scale':
      return (rng.uniform(0.5, 1.5, v.shape) * rng.choice([-1, 1, 1, 1], v.shape)).astype(v.dtype)
    if leaf == 'bias':
      return rng.normal(0.0, 0.2, v.shape).astype(v.dtype)
    return v
  return jax.tree_util.tree_map_with_path(f, variables)


@functools.lru_cache(maxsize=None)
def setup(name='resnet8', shape=SHAPE):
  model = models.create(name, 10)
  # Kernels drawn with numpy (LeCun normal, as init draws them) at init's shapes: running
  # model.init op by op compiles every initialiser (~10 s); randomise sets the rest.
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape))
  variables = jax.tree.map(
      lambda a: (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(a.dtype),
      abstract)
  return model, randomise(variables)


def images(n=4, shape=SHAPE, seed=1):
  return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


def orthonormal(rng, n, r):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return q[:, :r].astype(np.float32)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def capturing(model, paths):
  """``cap.apply_capturing`` jitted (op by op, every forward compiles each of its ops)."""
  return jax.jit(lambda v, x: cap.apply_capturing(model, v, x, paths))


def logits(model, variables, x):
  # Jitted: an op-by-op forward compiles every op separately.
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


# --- the surgery generalisation ---------------------------------------------------------------

def test_fold_norm_by_hand():
  """New BN(y A) == old BN(y) @ M for any M (not even orthonormal); var' is the variance of
  y A (exact with cov, the uncorrelated formula without)."""
  rng = np.random.default_rng(0)
  c, r, eps = 6, 4, 1e-5
  scale = rng.uniform(0.5, 1.5, c) * np.array([1, -1, 1, 1, -1, 1])
  bias, mean, var = rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 2.0, c)
  m = rng.normal(size=(c, r))
  y = rng.normal(size=(1000, c)) @ rng.normal(size=(c, c)) + mean
  u = (y - mean) * scale / np.sqrt(var + eps) + bias
  for cov in (None, np.cov(u.T, bias=True)):
    a, new = jax.device_get(projection.fold_norm(m, scale, bias, mean, var, cov, eps))
    got = (y @ a - new['mean']) * new['scale'] / np.sqrt(new['var'] + eps) + new['bias']
    assert max_diff(got, u @ m) < 1e-4
    np.testing.assert_allclose(new['mean'], mean @ a, rtol=1e-5)
    np.testing.assert_allclose(new['bias'], bias @ m, rtol=1e-5, atol=1e-6)
    if cov is not None:  # the running variance is the variance of the new producer outputs
      np.testing.assert_allclose(new['var'], np.var(y @ a, axis=0), rtol=1e-4)
  assert common.BN_EPSILON == projection.BN_EPSILON


def _random_masks(model, seed):
  rng = np.random.default_rng(seed)
  out = {}
  for g in model.groups():
    m = (rng.random(g.width) < 0.5).astype(np.float32)
    m[rng.integers(g.width)] = 1.0
    out[g.name] = m
  return out


@pytest.mark.parametrize('name,shape', [('resnet8', SHAPE), ('lenet3', (28, 28, 1))])
def test_zero_one_matrix_equals_index_surgery(name, shape):
  """Every group pruned by random masks; the matrix-capable groups by the 0/1 matrix of the same
  kept units: the variables are bit-identical (ResNet-8: BN folded; LeNet: no BN, a flattened
  dense consumer)."""
  model, variables = setup(name, shape)
  groups = model.groups()
  masks = _random_masks(model, 3)
  want = surgery.shrink_variables(groups, variables, masks)
  sel = surgery.group_selections(masks)
  for g in cap.compressed_groups(model) or [g for g in groups if g.kind == 'channel']:
    sel[g.name] = surgery.GroupSelection(projection=sel[g.name].matrix(g.width).T)
  assert any(not s.is_index for s in sel.values())
  got = projection.shrink_variables_projected(groups, variables, sel)
  jax.tree.map(np.testing.assert_array_equal, want, got)


def test_index_selections_take_the_gather_path():
  model, variables = setup()
  masks = _random_masks(model, 4)
  sels = projection.projection_axis_selections(model.groups(), variables,
                                               surgery.group_selections(masks))
  assert all(s.is_gather for v in sels.values() for _, s in v)
  want = surgery.shrink_variables(model.groups(), variables, masks)
  jax.tree.map(np.testing.assert_array_equal, want,
               surgery.apply_selections(variables, sels))


def test_matrix_refused_on_residual_stream():
  model, variables = setup()
  sel = {'stage1': surgery.GroupSelection(projection=np.eye(16, 8, dtype=np.float32))}
  with pytest.raises(ValueError, match='residual'):
    projection.shrink_variables_projected(model.groups(), variables, sel)


def test_one_projected_block_by_hand():
  """Only stage2.block0 projected with a random orthonormal (32, 12) P: its bn1 output is the
  original's u @ P, its conv2 output is the ORIGINAL conv2 applied to relu(u P) P^T (lax.conv by
  hand), everything before the block is untouched."""
  model, variables = setup()
  rng = np.random.default_rng(5)
  p = orthonormal(rng, 32, 12)
  sel = {'stage2.block0': surgery.GroupSelection(projection=p)}
  small = model.clone(widths=dict(model.widths, **{'stage2.block0': 12}))
  small_vars = projection.shrink_variables_projected(model.groups(), variables, sel)
  paths = [('stage2_block0', 'bn1'), ('stage2_block0', 'conv2')]
  x = images()
  _, orig = capturing(model, paths)(variables, x)
  _, proj = capturing(small, paths)(small_vars, x)
  u = np.asarray(orig[paths[0]])
  assert max_diff(proj[paths[0]], u @ p) < 1e-5 * max(1.0, np.abs(u).max())
  a = np.maximum(u @ p, 0) @ p.T
  k = variables['params']['stage2_block0']['conv2']['kernel']
  want = jax.lax.conv_general_dilated(a, k, (1, 1), [(1, 1), (1, 1)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision=jax.lax.Precision.HIGHEST)
  assert max_diff(proj[paths[1]], want) < 1e-5 * max(1.0, float(np.abs(want).max()))


def test_shrink_train_state_with_matrix_resets_touched_state():
  model, variables = setup()
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  state = train.create_train_state(variables, tx, widths=model.widths)
  # A non-trivial momentum: one update with random gradients.
  rng = np.random.default_rng(0)
  g = jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32), state.params)
  _, opt_state = tx.update(g, state.opt_state, state.params)
  masks = _random_masks(model, 1)
  p = orthonormal(rng, 16, 5)
  state = jax.device_get(state.replace(opt_state=opt_state, masks=masks))
  sel = {'stage1.block0': surgery.GroupSelection(projection=p)}
  small, new = projection.shrink_train_state_projected(state, model, tx, sel)
  _, by_index = surgery.shrink_train_state(state, model, tx)  # every group by its mask
  assert small.widths['stage1.block0'] == 5
  trace = lambda s: s[1][0].trace
  for mod in ('conv1', 'bn1', 'conv2'):  # touched by the matrix: reset
    for leaf, v in trace(new.opt_state)['stage1_block0'][mod].items():
      assert v.shape == new.params['stage1_block0'][mod][leaf].shape
      assert not np.any(v), (mod, leaf)
  # untouched by the matrix: as the index surgery by the masks
  jax.tree.map(np.testing.assert_array_equal, trace(new.opt_state)['stage2_block0'],
               trace(by_index.opt_state)['stage2_block0'])
  np.testing.assert_array_equal(new.masks['stage1.block0'], np.ones(5))
  np.testing.assert_array_equal(new.masks['stage2.block0'], by_index.masks['stage2.block0'])
  # the mask of the projected group is folded into the matrix: diag(mask) P
  want = projection.shrink_variables_projected(
      model.groups(), {'params': state.params, 'batch_stats': state.batch_stats},
      {**surgery.group_selections(masks), 'stage1.block0': surgery.GroupSelection(
          projection=masks['stage1.block0'][:, None] * p)})
  jax.tree.map(np.testing.assert_array_equal, want['params'], new.params)


# --- the method ---------------------------------------------------------------------------------

def test_full_rank_projections_equal_original():
  """Full rank: 'post' with ANY orthogonal P is the original network; 'pre' (ReLU in P's basis)
  with a permutation P (the orthogonal matrices that commute with ReLU)."""
  model, variables = setup()
  groups = model.groups()
  x = images()
  want = logits(model, variables, x)
  rng = np.random.default_rng(2)
  orth = {g.name: orthonormal(rng, g.width, g.width) for g in cap.compressed_groups(model)}
  assert max_diff(logits(model, cap.lifted_variables(groups, variables, orth), x), want) <= 1e-5
  perm = {k: np.eye(p.shape[0], dtype=np.float32)[:, rng.permutation(p.shape[0])]
          for k, p in orth.items()}
  got = logits(model, cap.projected_variables(groups, variables, perm), x)
  assert max_diff(got, want) <= 1e-5


def test_reconstruction_loss_formula():
  rng = np.random.default_rng(0)
  t = {('a',): rng.normal(size=(2, 3, 3, 4)), ('b',): rng.normal(size=(2, 5))}
  s = {('a',): rng.normal(size=(2, 3, 3, 4)), ('b',): t[('b',)] + 0.1}
  want = 0.5 * (np.sum((s[('a',)] - t[('a',)]) ** 2) / np.sum(t[('a',)] ** 2) +
                2 * 0.01 * 5 / np.sum(t[('b',)] ** 2))
  got = cap.reconstruction_loss({k: jnp.asarray(v) for k, v in s.items()},
                                {k: jnp.asarray(v) for k, v in t.items()})
  assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('placement', ['pre', 'post'])
def test_projections_stay_orthonormal_and_loss_is_ce_plus_recon(placement):
  model, variables = setup()
  groups = cap.compressed_groups(model)
  rng = np.random.default_rng(placement == 'post')
  ranks = {g.name: g.width // 2 for g in groups}
  proj = {k: jnp.asarray(orthonormal(rng, g.width, ranks[k])) for g in groups
          for k in [g.name]}
  small = model.clone(widths=dict(model.widths, **ranks))
  tx = cap.make_tx(0.5, 0.0, 0.0, False)  # a large step: far from orthonormal before polar
  trainable = {'proj': proj}
  opt_state = tx.init(trainable)
  step = cap.make_step(model, small, model.groups(), placement, 0.7, tx, False)
  covs = {g.name: np.eye(g.width, dtype=np.float32) for g in groups}
  batch = {'image': images(8), 'label': np.arange(8, dtype=np.int32) % 10}
  paths = sorted({p for g in groups for p in cap.consumer_modules(g)})
  capture_out = capturing(small if placement == 'pre' else model, paths)
  _, ft = capturing(model, paths)(variables, batch['image'])
  for i in range(3):
    before = trainable
    trainable, opt_state, m = step(trainable, opt_state, variables['params'],
                                   variables['batch_stats'], covs, variables, batch)
    for k, p in trainable['proj'].items():
      p = np.asarray(p)
      assert np.abs(p.T @ p - np.eye(p.shape[1])).max() <= 1e-5, (i, k)
      assert max_diff(p, before['proj'][k]) > 1e-3  # the step moved P
    assert float(m['loss']) == pytest.approx(float(m['cross_entropy']) +
                                             0.7 * float(m['reconstruction']), rel=1e-5)
    # the loss is that of the P before this step, recomputed independently
    if placement == 'pre':
      v = cap.projected_variables(model.groups(), variables, before['proj'], covs)
    else:
      v = cap.lifted_variables(model.groups(), variables, before['proj'])
    lg, fs = capture_out(v, batch['image'])
    ce = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(lg)),
                                     batch['label'][:, None], 1))
    rec = np.mean([np.sum((np.asarray(fs[p]) - np.asarray(ft[p])) ** 2) /
                   np.sum(np.asarray(ft[p]) ** 2) for p in paths])
    assert float(m['cross_entropy']) == pytest.approx(ce, rel=1e-4)
    assert float(m['reconstruction']) == pytest.approx(rec, rel=1e-4)


def test_choose_ranks_is_the_largest_that_meets_the_target():
  model, _ = setup()
  groups = cap.compressed_groups(model)
  cons = engine.Constraints(1, 1.0, 4)
  budget = 50
  ranks = cap.choose_ranks(groups, cons, 'uniform', lambda r: sum(r.values()) <= budget)
  assert sum(ranks.values()) <= budget
  assert all(r % 4 == 0 for r in ranks.values())
  # any uniform knob that keeps more misses the budget
  bigger = [cap.ranks_at(k, groups, cons, 'uniform') for k in np.linspace(0, 1, 201)]
  assert all(sum(b.values()) > budget for b in bigger
             if sum(b.values()) > sum(ranks.values()))
  with pytest.raises(ValueError, match='target is not reached'):
    cap.choose_ranks(groups, cons, 'uniform', lambda r: False)


# --- the main job ---------------------------------------------------------------------------------

def test_config_target_is_reachable():
  """The shipped ResNet-20 config: 40% and 60% fewer FLOPs reachable by block-internal ranks."""
  from configs import fashion_mnist_resnet20_cascaded_projection as cfg
  from taylor_jax import configlib, costs
  c = cfg.get_config()
  configlib.validate(c)
  model = models.create(c.model, 10)
  full = costs.flops(model, (28, 28, 1))
  groups = cap.compressed_groups(model)
  assert {g.name for g in groups} == {f'stage{s}.block{b}' for s in (1, 2, 3) for b in range(3)}
  cons = engine.Constraints(c.prune.min_width, c.prune.max_share, c.prune.align)
  for target in (0.4, 0.6):
    flops = lambda r: costs.flops(model.clone(widths=dict(model.widths, **r)), (28, 28, 1))
    ranks = cap.choose_ranks(groups, cons, 'uniform', lambda r: flops(r) <= (1 - target) * full,
                             iters=8)
    assert 1 - flops(ranks) / full >= target


def test_main_job_end_to_end(tmp_path, fashion_mnist_data_dir):
  """A few steps of every phase through ``run.run`` (ResNet-8 for time): baseline ->
  projections -> surgery -> fine-tuning -> report."""
  from configs import fashion_mnist_resnet20_cascaded_projection as cfg
  from taylor_jax import run
  c = cfg.get_config()
  c.model, c.data_dir = 'resnet8', fashion_mnist_data_dir
  c.train.limit_examples, c.train.batch_size, c.train.epochs = 256, 64, 1.0
  c.train.limit_eval_examples, c.train.eval_batch_size = 128, 128
  c.prune.eval_examples, c.prune.finetune_epochs = 128, 1.0
  o = c.prune.cascaded_projection
  o.steps, o.stat_batches, o.log_every = 3, 2, 1
  c.report.latency_repeats = c.report.latency_rounds = 1
  # The group checks before training would compile ResNet-8 twice more; they are the main job's,
  # asserted in test_any_model_e2e.py and test_checks.py, not CaP's.
  c.prune.check_groups = False
  rep = run.run(c, str(tmp_path))
  assert rep['pruned']['flops'] <= 0.6 * rep['baseline']['flops']
  assert rep['pruned']['params'] < rep['baseline']['params']
  m = rep['method']
  assert m['name'] == 'cascaded_projection' and m['max_orthonormality_error'] <= 1e-5
  assert len(m['log']) == 3
  widths, full = rep['pruned']['widths'], models.full_widths('resnet8')
  for k, w in full.items():
    assert widths[k] == (m['ranks'][k] if '.block' in k else w)
  assert np.isfinite(rep['pruned']['test_loss'])
  assert rep['pruned']['step'] == 4 + 3 + 4  # baseline + projection steps + fine-tuning
