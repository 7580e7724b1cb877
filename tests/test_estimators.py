"""Every estimator against an independent computation of its formula (float64, small models)."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import estimators as E
from taylor_jax import models, train

TINY = {'stage1': 4, 'stage1.block0': 3, 'stage2': 5, 'stage2.block0': 4, 'stage3': 6,
        'stage3.block0': 3}
MICRO = {'stage1': 2, 'stage1.block0': 2, 'stage2': 3, 'stage2.block0': 2, 'stage3': 3,
         'stage3.block0': 2}


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def make_ctx(name, train_mode=True, batch=4, widths=None, dtype=jnp.float64, masks=None,
             seed=0):
  if name == 'resnet8':
    model = models.create('resnet8', 10, widths=widths or TINY)
  else:
    model = models.create(name, 10)
  kx, ki, ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, 28, 28, 1), dtype)
  y = jnp.arange(batch) % 10
  v = model.init(ki, x)
  v = jax.tree.map(lambda a: a.astype(dtype), v)
  if 'batch_stats' in v:  # non-trivial running statistics and BN affine params
    leaves, tdef = jax.tree.flatten(v['batch_stats'])
    keys = jax.random.split(ks, len(leaves))
    leaves = [jnp.abs(jax.random.normal(k, a.shape, dtype)) * 0.5 + 0.5 for k, a in zip(keys, leaves)]
    v = dict(v, batch_stats=jax.tree.unflatten(tdef, leaves))
  params = jax.tree.map(lambda a: a * 1.3 + 0.05, v['params'])  # non-trivial gamma/beta
  groups = model.groups()
  if masks is None:
    masks = {g.name: jnp.ones((g.width,), dtype) for g in groups}
  return E.ScoreContext(model, groups, params, v.get('batch_stats', {}), masks,
                        {'image': x, 'label': y}, train=train_mode)


def fresh(ctx, **kw):
  import dataclasses
  return dataclasses.replace(ctx, cache={}, **kw)


def jitted(name, ctx, **opts):
  """The estimator as a jitted function of a context's arrays."""
  def f(params, batch_stats, masks, batch, step):
    return E.get(name, **opts)(fresh(ctx, params=params, batch_stats=batch_stats, masks=masks,
                                     batch=batch, step=step))
  f = jax.jit(f)
  return lambda c: jax.tree.map(np.asarray, f(c.params, c.batch_stats, dict(c.masks),
                                              dict(c.batch), c.step))


def run(name, ctx, **opts):
  return jitted(name, ctx, **opts)(ctx)


def half_mask(ctx):
  """Masks with every third unit pruned."""
  return {k: jnp.asarray((np.arange(m.shape[0]) % 3 != 1), m.dtype) for k, m in ctx.masks.items()}


CASES = [('lenet3', False), ('resnet8', True), ('resnet8', False)]


# --- Taylor-FO-BN ----------------------------------------------------------------------------

@pytest.mark.parametrize('name,train_mode', CASES)
def test_fo_bn_equals_squared_central_difference(x64, name, train_mode):
  ctx = make_ctx(name, train_mode)
  scores = run('taylor_fo_bn', ctx)
  loss = jax.jit(lambda z: ctx.loss(ctx.params, z))
  eps = 1e-5
  for g in ctx.groups:
    for c in {0, g.width // 2, g.width - 1}:
      zp = {k: m.at[c].add(eps) if k == g.name else m for k, m in ctx.masks.items()}
      zm = {k: m.at[c].add(-eps) if k == g.name else m for k, m in ctx.masks.items()}
      fd = (float(loss(zp)) - float(loss(zm))) / (2 * eps)
      np.testing.assert_allclose(scores[g.name][c], fd ** 2, rtol=1e-6, atol=1e-14)


# --- FG: per-example gradients in one backward pass -----------------------------------------

@pytest.mark.parametrize('name', ['lenet3', 'resnet8'])
def test_fg_equals_loop_over_examples(x64, name):
  ctx = make_ctx(name, train_mode=False, batch=5)
  ctx = fresh(ctx, masks=half_mask(ctx))
  scores = run('taylor_fo_bn_fg', ctx)
  B = ctx.batch['image'].shape[0]
  want = {k: np.zeros(m.shape) for k, m in ctx.masks.items()}
  for b in range(B):
    one = fresh(ctx, batch={k: v[b:b + 1] for k, v in ctx.batch.items()})
    g = jax.grad(lambda z: one.loss(one.params, z) / B)(dict(ctx.masks))  # dL_b/dz, L_b = l_b/B
    for k in want:
      want[k] += np.asarray(g[k]) ** 2
  for k in want:
    np.testing.assert_allclose(scores[k], want[k], rtol=1e-9, atol=1e-20)
  # and the sum of the per-example gradients is the minibatch gradient (FO-BN) -- FG >= FO/B.
  fo = run('taylor_fo_bn', ctx)
  for k in want:
    assert np.all(scores[k] * B >= fo[k] * (1 - 1e-9))


# --- Taylor SO ------------------------------------------------------------------------------

@pytest.mark.parametrize('name,train_mode', CASES)
def test_so_gates_equals_explicit_hessian(x64, name, train_mode):
  ctx = make_ctx(name, train_mode)
  ctx = fresh(ctx, masks=half_mask(ctx))
  scores = run('taylor_so', ctx)
  flat, unravel = jax.flatten_util.ravel_pytree(dict(ctx.masks))
  f = lambda v: ctx.loss(ctx.params, unravel(v))
  g = np.asarray(jax.jit(jax.grad(f))(flat))
  H = np.asarray(jax.jit(jax.hessian(f))(flat))
  z = np.asarray(flat)
  want = unravel(jnp.asarray((g * z - 0.5 * z * (H @ z)) ** 2))
  for k in want:
    np.testing.assert_allclose(scores[k], np.asarray(want[k]), rtol=1e-8, atol=1e-20)
    assert np.all(scores[k][np.asarray(ctx.masks[k]) == 0] == 0)


def explicit_per_unit(groups, trees, fn, roles, leaves=None):
  """Independent per-unit sums: an explicit loop over units and slices (numpy)."""
  out = {}
  for g in groups:
    acc = np.zeros(g.width)
    for c in range(g.width):
      for s in g.slices:
        if s.role not in roles or (leaves and s.path[-1] not in leaves) or s.path[0] not in trees[0]:
          continue
        arrs = []
        for t in trees:
          for key in s.path:
            t = t[key]
          arrs.append(np.asarray(t))
        n = arrs[0].shape[s.axis]
        idx = np.arange(s.repeat) * (n // s.repeat) + s.offset + c
        acc[c] += np.sum(fn(*[np.take(a, idx, axis=s.axis) for a in arrs]))
    out[g.name] = acc
  return out


def test_so_weights_equals_explicit_hessian(x64):
  ctx = make_ctx('resnet8', True, batch=3, widths=MICRO)
  flat, unravel = jax.flatten_util.ravel_pytree(ctx.params)
  assert flat.size < 1500
  f = lambda v: ctx.loss(unravel(v), dict(ctx.masks))
  g = np.asarray(jax.jit(jax.grad(f))(flat))
  H = np.asarray(jax.jit(jax.hessian(f))(flat))
  w = np.asarray(flat)
  t = unravel(jnp.asarray(g * w - 0.5 * w * (H @ w)))
  want = explicit_per_unit(ctx.groups, ({'params': t},), lambda a: a, E.ALL_ROLES)
  scores = run('taylor_so', ctx, on='weights')
  for k in want:
    np.testing.assert_allclose(scores[k], want[k] ** 2, rtol=1e-8, atol=1e-20)


# --- OBD --------------------------------------------------------------------------------------

def test_obd_exact_and_hutchinson_convergence(x64):
  ctx = make_ctx('lenet3', False, batch=4)
  exact = run('obd_exact', ctx)
  # obd_exact == 1/2 z^2 diag(H) from an explicit Hessian (with pruned units -> 0).
  flat, unravel = jax.flatten_util.ravel_pytree(dict(ctx.masks))
  H = np.asarray(jax.jit(jax.hessian(lambda v: ctx.loss(ctx.params, unravel(v))))(flat))
  want = unravel(jnp.asarray(0.5 * np.diag(H)))
  for k in want:
    np.testing.assert_allclose(exact[k], np.asarray(want[k]), rtol=1e-9, atol=1e-20)
  exact_flat = np.concatenate([exact[k] for k in sorted(exact)])

  probes, seeds = [4, 16, 64, 256], 12
  rms = []
  for p in probes:
    fn = jitted('obd', ctx, num_probes=p)
    errs = []
    for s in range(seeds):
      est = fn(fresh(ctx, step=jnp.asarray(s, jnp.int32)))
      est = np.concatenate([np.asarray(est[k]) for k in sorted(est)])
      errs.append(np.sum((est - exact_flat) ** 2))
    rms.append(np.sqrt(np.mean(errs)))
  slope = np.polyfit(np.log(probes), np.log(rms), 1)[0]
  assert -0.62 < slope < -0.38, (slope, rms)
  assert rms[-1] < rms[0] / 4


# --- weight / BN criteria by hand ----------------------------------------------------------------

@pytest.mark.parametrize('name', ['lenet3', 'resnet8'])
def test_weight_and_bn_forms_by_hand(x64, name):
  ctx = make_ctx(name, True)
  grads = jax.grad(lambda p: ctx.loss(p, dict(ctx.masks)))(ctx.params)
  P, G = {'params': ctx.params}, {'params': grads}
  hand = {
      'taylor_fo_weight': explicit_per_unit(ctx.groups, (P, G), lambda w, g: (w * g) ** 2, ('out',)),
      'taylor_fo_weight_exact': {k: v ** 2 for k, v in explicit_per_unit(
          ctx.groups, (P, G), lambda w, g: w * g, ('out', 'norm', 'in')).items()},
      'weight_l2': explicit_per_unit(ctx.groups, (P,), np.square, ('out',)),
      'weight_l1': explicit_per_unit(ctx.groups, (P,), np.abs, ('out',)),
  }
  if name == 'resnet8':
    hand['bn_scale'] = explicit_per_unit(ctx.groups, (P,), np.abs, ('norm',), ('scale',))
    hand['bn_taylor'] = {k: v ** 2 for k, v in explicit_per_unit(
        ctx.groups, (P, G), lambda w, g: w * g, ('norm',), ('scale', 'bias')).items()}
    hand['bn_scale_grad'] = {k: np.abs(v) for k, v in explicit_per_unit(
        ctx.groups, (P, G), lambda w, g: w * g, ('norm',), ('scale',)).items()}
  else:
    for crit in ('bn_scale', 'bn_taylor', 'bn_scale_grad'):
      with pytest.raises(ValueError, match='no BatchNorm'):
        E.get(crit)(fresh(ctx))
  for crit, want in hand.items():
    got = run(crit, ctx)
    for k in want:
      assert np.all(want[k] != 0), (crit, k)
      np.testing.assert_allclose(got[k], want[k], rtol=1e-10, err_msg=f'{crit} {k}')


def test_bn_taylor_is_fo_bn_for_a_gate_right_after_bn(x64):
  # z multiplies gamma*xhat + beta, so dL/dz = gamma dL/dgamma + beta dL/dbeta.
  ctx = make_ctx('resnet8', True)
  a, b = run('bn_taylor', ctx), run('taylor_fo_bn', ctx)
  for k in ('stage1.block0', 'stage2.block0', 'stage3.block0'):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-9)


# --- activation Taylor (ICLR'17) --------------------------------------------------------------

def _lenet_split(params, x, site):
  """Explicit LeNet3 forward split at a gate site: (prefix(x) -> a, suffix(a) -> logits)."""
  def conv(p, h):
    y = jax.lax.conv_general_dilated(h, p['kernel'], (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + p['bias']
  pool = lambda h: jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  dense = lambda p, h: h @ p['kernel'] + p['bias']
  stages = [lambda h: pool(jax.nn.relu(conv(params['conv1'], h))),
            lambda h: pool(jax.nn.relu(conv(params['conv2'], h))).reshape(h.shape[0], -1),
            lambda h: jax.nn.relu(dense(params['fc1'], h)),
            lambda h: jax.nn.relu(dense(params['fc2'], h)),
            lambda h: dense(params['head'], h)]
  k = {'conv1': 1, 'conv2': 2, 'fc1': 3, 'fc2': 4}[site]
  def prefix(h):
    for f in stages[:k]:
      h = f(h)
    return h
  def suffix(h):
    if site == 'conv2':  # the gate sits before the flatten
      h = h.reshape(h.shape[0], -1)
    for f in stages[k:]:
      h = f(h)
    return h
  if site == 'conv2':
    pre = lambda h: pool(jax.nn.relu(conv(params['conv2'], stages[0](h))))
    return pre, suffix
  return prefix, suffix


def test_activation_taylor_by_explicit_split(x64):
  ctx = make_ctx('lenet3', False, batch=3)
  got = run('activation_taylor', ctx, normalize=False)
  got_n = run('activation_taylor', ctx)
  x, y = ctx.batch['image'], ctx.batch['label']
  for site in ('conv1', 'conv2', 'fc1', 'fc2'):
    prefix, suffix = _lenet_split(ctx.params, x, site)
    a = prefix(x)
    g = jax.grad(lambda h: jnp.mean(E.cross_entropy(suffix(h), y)))(a)
    want = np.mean(np.abs(np.asarray(a * g)).reshape(-1, a.shape[-1]), axis=0)
    np.testing.assert_allclose(got[site], want, rtol=1e-9, atol=1e-20)
    np.testing.assert_allclose(got_n[site], want / np.linalg.norm(want), rtol=1e-9)


# --- random -------------------------------------------------------------------------------------

def test_random_is_seeded_uniform():
  ctx = make_ctx('resnet8', True, dtype=jnp.float32)
  a = run('random', fresh(ctx, step=jnp.asarray(3)), seed=1)
  b = run('random', fresh(ctx, step=jnp.asarray(3)), seed=1)
  c = run('random', fresh(ctx, step=jnp.asarray(4)), seed=1)
  allv = np.concatenate(list(a.values()))
  assert allv.min() >= 0 and allv.max() < 1 and allv.std() > 0.1
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a[k], c[k])


# --- registry + train step ----------------------------------------------------------------------

def test_custom_estimator_by_name_in_train_step():
  @E.register('mine_abs_gate_grad')
  def mine(ctx, power=1.0):
    """|dL/dz|^power from the step's own (device-averaged) gate gradients."""
    return {k: jnp.abs(g) ** power for k, g in ctx.gate_grads().items()}

  assert 'mine_abs_gate_grad' in E.names()
  ctx = make_ctx('resnet8', True, batch=8, dtype=jnp.float32)
  masks = half_mask(ctx)
  variables = {'params': ctx.params, 'batch_stats': ctx.batch_stats}
  import ml_collections
  tx = train.create_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, momentum=0.9, weight_decay=0.0, schedule='constant')), 10, 10)
  state = train.create_train_state(variables, tx, masks=masks)
  mesh = train.create_mesh(jax.devices()[:1])
  step = train.make_train_step(ctx.model, tx, mesh, estimator=E.get('mine_abs_gate_grad', power=2.0))
  want = jax.grad(lambda z: fresh(ctx).loss(ctx.params, z))(dict(masks))
  state, _ = step(state, train.shard_batch(mesh, jax.tree.map(np.asarray, ctx.batch)))
  assert int(state.score_count) == 1
  for k, g in want.items():
    np.testing.assert_allclose(np.asarray(state.score_sum[k]),
                               np.asarray(g) ** 2 * np.asarray(masks[k]), rtol=2e-4, atol=1e-10)
  with pytest.raises(ValueError, match='unknown estimator'):
    E.get('no_such_estimator')
