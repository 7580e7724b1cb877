"""The CVPR'19 methods of taylor_jax/methods against independent computations: the variational
KL (closed form vs integration, Monte Carlo and float64 formula), the fold of the posterior mean
(vs an interceptor that scales every BatchNorm output) and surgery, structured SNIP (vs per-weight
products summed over the groups' slices by hand), effective rank / cosine and the budgets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from taylor_jax import configlib, engine, methods, models, run
from taylor_jax.groups import get_path
from taylor_jax.methods import kernel_budget as KB
from taylor_jax.methods import snip as SN
from taylor_jax.methods import variational as V

import helpers  # noqa: E402  (tests/ is on sys.path)

_config = helpers.pruning_config

WIDTHS = {'stage1': 4, 'stage1.block0': 3, 'stage2': 5, 'stage2.block0': 4, 'stage3': 6,
          'stage3.block0': 3}


def _tiny(seed=0, batch=6, side=8):
  """A small ResNet-8, numpy-drawn variables (model.init compiles slowly here), a batch."""
  model = models.create('resnet8', 10, widths=WIDTHS)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, side, side, 1)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def draw(path, a):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=a.shape) * 1.4 / np.sqrt(np.prod(a.shape[:-1]))
    if name in ('scale', 'var'):
      return 0.5 + rng.random(a.shape)
    return 0.2 * rng.normal(size=a.shape)

  v = jax.tree_util.tree_map_with_path(lambda p, a: np.asarray(draw(p, a), np.float32), shapes)
  return model, v, x, np.arange(batch) % 10


# --- variational: KL ---------------------------------------------------------------------------------

CASES = [(0.7, 0.3, 0.1), (-0.05, 0.08, 0.1), (0.0, 0.1, 0.1), (1.5, 0.02, 0.5)]


@pytest.mark.parametrize('mu, sigma, prior', CASES)
def test_kl_matches_float64_formula_and_numerical_integration(mu, sigma, prior):
  with jax.enable_x64(True):
    got = float(V.kl_normal(jnp.float64(mu), jnp.log(jnp.float64(sigma)), prior))
  # The textbook form 1/2 (tr + quad - k + log det ratio), k = 1.
  want = 0.5 * (sigma ** 2 / prior ** 2 + mu ** 2 / prior ** 2 - 1 + np.log(prior ** 2 / sigma ** 2))
  assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
  q, p = scipy.stats.norm(mu, sigma), scipy.stats.norm(0, prior)
  integral, err = scipy.integrate.quad(lambda t: q.pdf(t) * (q.logpdf(t) - p.logpdf(t)),
                                       mu - 12 * sigma, mu + 12 * sigma, limit=200)
  assert got == pytest.approx(integral, rel=1e-7, abs=1e-9)


def test_kl_matches_monte_carlo_and_total_sums_units():
  rng = np.random.default_rng(0)
  mu, sigma, prior = 0.4, 0.15, 0.1
  t = rng.normal(mu, sigma, size=2_000_000)
  samples = scipy.stats.norm.logpdf(t, mu, sigma) - scipy.stats.norm.logpdf(t, 0, prior)
  stderr = samples.std() / np.sqrt(samples.size)
  got = float(V.kl_normal(jnp.float32(mu), jnp.log(jnp.float32(sigma)), prior))
  assert abs(got - samples.mean()) < 5 * stderr + 1e-4 * abs(got)
  post = {'mu': {'a': jnp.array([0.1, 0.2]), 'b': jnp.array([1.0])},
          'log_sigma': {'a': jnp.log(jnp.array([0.1, 0.3])), 'b': jnp.log(jnp.array([0.05]))}}
  want = sum(float(V.kl_normal(m, jnp.log(s), prior)) for m, s in
             [(0.1, 0.1), (0.2, 0.3), (1.0, 0.05)])
  assert float(V.total_kl(post, prior)) == pytest.approx(want, rel=1e-6)


# --- variational: fold and surgery ---------------------------------------------------------------

def _bn_output_scaler(groups, params, z):
  """An interceptor multiplying each BatchNorm's OUTPUT by the saliency of its channels: the
  variational layer as the paper writes it, independent of how the method edits parameters."""
  factor = {}
  for g in groups:
    for s in g.slices:
      if s.role == 'norm' and s.path[0] == 'params' and s.path[-1] == 'scale':
        n = get_path({'params': params}, s.path).shape[0]
        f = factor.setdefault(s.path[1:-1], np.ones(n, np.float32))
        f[s.positions(np.arange(g.width), n)] = np.asarray(z[g.name])

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      y = y * factor[tuple(context.module.scope.path)]
    return y
  return interceptor


def test_fold_equals_variational_eval_output_and_surgery_keeps_it():
  model, v, x, _ = _tiny()
  groups = model.groups()
  rng = np.random.default_rng(1)
  mu = {g.name: rng.normal(0.5, 0.6, size=g.width).astype(np.float32) for g in groups}
  with nn.intercept_methods(_bn_output_scaler(groups, v['params'], mu)):
    want = model.apply(v, x, train=False)
  scale0 = V.frozen_scales(groups, v['params'])
  folded = V.apply_saliency(groups, v['params'], scale0, mu)
  got = model.apply({'params': folded, 'batch_stats': v['batch_stats']}, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Prune: a few units of every group (z = 0), fold, surgery.
  masks = {g.name: (np.arange(g.width) % 3 != 1).astype(np.float32) for g in groups}
  z = {k: mu[k] * masks[k] for k in mu}
  with nn.intercept_methods(_bn_output_scaler(groups, v['params'], z)):
    want = model.apply(v, x, train=False)
  from taylor_jax import surgery
  pv = {'params': V.apply_saliency(groups, v['params'], scale0, z),
        'batch_stats': v['batch_stats']}
  small = surgery.shrink_variables(groups, pv, masks)
  small_model = model.clone(widths=surgery.new_widths(model.widths, masks))
  got = small_model.apply(small, x, train=False)
  assert small_model.widths['stage3'] < model.widths['stage3']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_threshold_masks_honour_min_width_and_alignment():
  model = models.create('resnet20', 10)
  groups = model.groups()
  full = models.full_widths('resnet20')
  rng = np.random.default_rng(0)
  mu = {g.name: np.where(rng.random(g.width) < 0.6, 0.01, 1.0) for g in groups}
  sigma = {g.name: np.full(g.width, 0.1) for g in groups}
  sigma['stage1'][:] = 0.5  # too uncertain: nothing of stage1 goes
  cons = engine.Constraints(min_width=4, max_share=1.0, align=8)
  masks = V.threshold_masks(mu, sigma, groups, full, cons, 0.05, 0.04)
  assert masks['stage1'].sum() == 16
  for g in groups:
    kept = int(masks[g.name].sum())
    near = int(((np.abs(mu[g.name]) < 0.05) & (sigma[g.name] ** 2 < 0.04)).sum())
    assert kept % 8 == 0 and kept >= 8
    assert kept >= g.width - near  # only near-zero units go
    # every removed unit is near zero
    assert np.all(np.abs(mu[g.name][masks[g.name] == 0]) < 0.05)


# --- SNIP ------------------------------------------------------------------------------------------

def _brute_sensitivity(groups, params, grads):
  """Per unit: sum of |w g| over every params slice of the group, unit by unit, normalised."""
  total = sum(np.abs(np.asarray(w, np.float64) * np.asarray(g, np.float64)).sum()
              for w, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads)))
  out = {}
  for grp in groups:
    s = np.zeros(grp.width)
    for sl in grp.slices:
      if sl.path[0] != 'params':
        continue
      w = np.asarray(get_path({'params': params}, sl.path), np.float64)
      g = np.asarray(get_path({'params': grads}, sl.path), np.float64)
      axis = sl.axis % w.ndim
      for c in range(grp.width):
        pos = sl.positions(np.array([c]), w.shape[axis])
        s[c] += np.abs(np.take(w, pos, axis=axis) * np.take(g, pos, axis=axis)).sum()
    out[grp.name] = s / total
  return out


def test_snip_scores_equal_per_weight_products_by_hand():
  model, v, x, y = _tiny(seed=3)
  groups = model.groups()

  def loss(params, gates):  # minibatch-mean cross-entropy, BatchNorm in train mode
    logits, _ = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x, gates=gates,
                            train=True, mutable=['batch_stats'])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  ones = {g.name: np.ones(g.width, np.float32) for g in groups}
  gp, gz = jax.jit(jax.grad(loss, argnums=(0, 1)))(v['params'], ones)
  from taylor_jax import train
  state = train.TrainState(step=np.int32(0), params=v['params'], batch_stats=v['batch_stats'],
                           opt_state=(), masks=ones, score_sum=ones, score_count=np.int32(0),
                           score_ema=ones, prune_steps=np.int32(0))
  got_p, got_z = SN.mean_grads(model, groups, state, iter([{'image': x, 'label': y}]), 1)
  tot = sum(np.abs(np.asarray(a, np.float64)).sum() for a in gz.values())
  hand = {'weights': _brute_sensitivity(groups, v['params'], gp),
          'gate': {k: np.abs(np.asarray(a, np.float64)) / tot for k, a in gz.items()}}
  for crit, want in hand.items():
    got = SN.sensitivity(groups, v['params'], got_p, got_z, ones, crit)
    for k in want:
      assert np.count_nonzero(want[k]) == want[k].size, (crit, k)
      np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-4, err_msg=f'{crit} {k}')
  assert sum(float(np.sum(s)) for s in SN.sensitivity(
      groups, v['params'], got_p, got_z, ones, 'gate').values()) == pytest.approx(1.0, rel=1e-5)


# --- kernel statistics and budgets -------------------------------------------------------------------

def test_effective_rank_and_cosine_by_hand():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  w, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  m = u[:, :3] @ np.diag([3.0, 1.0, 0.0]) @ w[:, :3].T  # singular values 3, 1, 0
  # p = (3/4, 1/4): H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623351446..., erank = e^H
  assert KB.effective_rank(m) == pytest.approx(1.7547654, rel=1e-6)
  assert KB.effective_rank(np.eye(6)) == pytest.approx(6.0)
  assert KB.kernel_redundancy(m, 'effective_rank') == pytest.approx(1 - 1.7547654 / 4, rel=1e-6)
  rows = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
  # |cos| of the pairs: 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3
  assert KB.mean_abs_cosine(rows) == pytest.approx(np.sqrt(2) / 3)


def test_producer_matrices_are_the_groups_filters():
  model, v, _, _ = _tiny()
  g = {x.name: x for x in model.groups()}['stage2']
  mats = KB.producer_matrices(g, v, np.arange(5))
  k = np.asarray(v['params']['stage2_block0']['conv2']['kernel'])  # (3, 3, 4, 5)
  assert len(mats) == 2  # conv2 and the projection
  np.testing.assert_array_equal(mats[0], k.reshape(-1, 5).T)


@pytest.mark.parametrize('align, total', [(1, 100), (1, 37), (8, 100), (4, 61)])
def test_budgets_sum_to_target_and_respect_constraints(align, total):
  full = models.full_widths('resnet20')
  rng = np.random.default_rng(align + total)
  red = {k: float(rng.random()) for k in full}
  cons = engine.Constraints(min_width=4, max_share=0.9, align=align)
  b = KB.allocate_budgets(red, full, full, cons, total)
  assert total <= sum(b.values()) <= total + align - 1
  if align == 1:
    assert sum(b.values()) == total
  for k, n in b.items():
    kept = full[k] - n
    assert kept >= cons.min_kept(full[k])
    assert kept % align == 0
  # More redundant groups of one width lose at least as many units (up to one chunk).
  same = [k for k in full if full[k] == 64]
  for a in same:
    for c in same:
      if red[a] > red[c] and full[a] - b[a] > cons.min_kept(64):
        assert b[a] >= b[c] - align
  with pytest.raises(ValueError, match='allow removing only'):
    KB.allocate_budgets(red, full, full, cons, 10_000)


def test_masks_from_budgets_remove_lowest_scores():
  scores = {'a': np.array([5.0, 1.0, 3.0, 0.5]), 'b': np.array([2.0, 1.0])}
  masks = {'a': np.ones(4), 'b': np.array([1.0, 0.0])}
  new = KB.masks_from_budgets(scores, masks, {'a': 2, 'b': 0})
  np.testing.assert_array_equal(new['a'], [1, 0, 1, 0])
  np.testing.assert_array_equal(new['b'], [1, 0])


# --- registry and config errors ---------------------------------------------------------------------

def test_registry_lists_the_methods():
  assert {'taylor', 'variational', 'snip', 'kernel_budget'} <= set(methods.names())
  c = configlib.base_config()
  assert c.prune.method == 'taylor'
  assert c.prune.variational.kl_weight > 0 and c.prune.snip.criterion == 'weights'


@pytest.mark.parametrize('overrides, message', [
    ({'prune.method': 'obs'}, "prune.method='obs' is not a registered method"),
    ({'prune.method': 'snip', 'train.epochs': 3.0}, 'Set train.epochs=0'),
    ({'prune.method': 'snip', 'train.epochs': 0.0, 'prune.snip.criterion': 'hessian'},
     "prune.snip.criterion='hessian'"),
    ({'prune.method': 'variational', 'model': 'lenet3'}, 'prunable groups without one'),
    ({'prune.method': 'variational', 'prune.variational.prior_sigma': 0.0},
     'prune.variational.prior_sigma=0.0'),
    ({'prune.method': 'variational', 'prune.variational.rule': 'target',
      'prune.target_flops_reduction': None}, "rule='target' but no prune.target_"),
    ({'prune.method': 'kernel_budget', 'prune.kernel_budget.statistic': 'entropy'},
     "prune.kernel_budget.statistic='entropy'"),
    ({'prune.method': 'kernel_budget', 'prune.kernel_budget.criterion': 'nope'},
     "unknown estimator 'nope'"),
    ({'prune.method': 'snip', 'train.epochs': 0.0, 'prune.target_flops_reduction': None},
     'no target'),
])
def test_bad_method_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    run.run(_config(**overrides), str(workdir))
  assert not workdir.exists()


def test_variational_needs_no_target():
  configlib.validate(_config(**{'prune.method': 'variational',
                                'prune.target_flops_reduction': None}))
