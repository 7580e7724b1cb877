"""Every estimator against an independent computation of its formula (float64, small models)."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import estimators as E
from taylor_jax import losses, masking, models, train

import helpers  # noqa: E402  (tests/ is on sys.path)

TINY_ITEMS = (('stage1', 4), ('stage1.block0', 3), ('stage2', 5), ('stage2.block0', 4),
              ('stage3', 6), ('stage3.block0', 3))
TINY = {'stage1': 4, 'stage1.block0': 3, 'stage2': 5, 'stage2.block0': 4, 'stage3': 6,
        'stage3.block0': 3}
MICRO = {'stage1': 2, 'stage1.block0': 2, 'stage2': 3, 'stage2.block0': 2, 'stage3': 3,
         'stage3.block0': 2}


# The suite compiles with --xla_backend_optimization_level=0 (tests/conftest.py): compile time
# is most of its wall time. LeNet-3's float64 Hessians / many HVPs are the exception (252 gates
# at 20x20): unoptimised they run 10-40x slower (OBD, 64 probes: 2.3 s vs 0.06 s a call; the
# 252x252 gate Hessian: 9.6 s vs 0.6 s), which costs more than the ~1.3x longer compile. ResNet-8's
# (25 gates; all parameters in test_so_weights_equals_explicit_hessian) are compile-bound: O0.
jit_o2 = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 2})


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def random_variables(model, x, seed):
  """Variables of ``model`` drawn with numpy (``model.init`` compiles for ~20 s on this CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(a.shape[:-1]))
      return rng.normal(size=a.shape) * 1.4 / np.sqrt(fan_in)
    if name == 'scale':
      return 1.0 + 0.3 * rng.normal(size=a.shape)
    if name == 'var':
      return 0.5 + rng.random(a.shape)
    return 0.2 * rng.normal(size=a.shape)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _make_ctx(name, train_mode, batch, widths, dtype, seed):
  if name == 'resnet8':
    model = models.create('resnet8', 10, widths=dict(widths or TINY_ITEMS))
    side = 8
  else:
    model = models.create(name, 10, image_size=20)
    side = 20
  rng = np.random.default_rng(seed + 100)
  x = jnp.asarray(rng.normal(size=(batch, side, side, 1)), dtype)
  y = jnp.asarray(np.arange(batch) % 10)
  v = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_variables(model, x, seed))
  groups = model.groups()
  masks = {g.name: jnp.ones((g.width,), dtype) for g in groups}
  return E.ScoreContext(model, groups, v['params'], v.get('batch_stats', {}), masks,
                        {'image': x, 'label': y}, train=train_mode)


def make_ctx(name, train_mode=True, batch=4, widths=None, dtype=jnp.float64, seed=0):
  widths = tuple(sorted(widths.items())) if widths else None
  return fresh(_make_ctx(name, train_mode, batch, widths, jnp.dtype(dtype), seed))


def fresh(ctx, **kw):
  import dataclasses
  return dataclasses.replace(ctx, cache={}, **kw)


_JIT_CACHE = {}


def jitted(name, ctx, **opts):
  """The estimator as a jitted function of a context's arrays (cached per model/mode/options)."""
  key = (name, tuple(sorted(opts.items())), id(ctx.model), ctx.train)
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = _jitted(name, ctx, **opts)
  return _JIT_CACHE[key]


def _jitted(name, ctx, **opts):
  def f(params, batch_stats, masks, batch, step):
    return E.get(name, **opts)(fresh(ctx, params=params, batch_stats=batch_stats, masks=masks,
                                     batch=batch, step=step))
  f = jax.jit(f)
  return lambda c: jax.tree.map(np.asarray, f(c.params, c.batch_stats, dict(c.masks),
                                              dict(c.batch), c.step))


def jitted_many(names, ctx):
  def f(params, batch_stats, masks, batch):
    c = fresh(ctx, params=params, batch_stats=batch_stats, masks=masks, batch=batch)
    return {n: E.get(n)(c) for n in names}
  f = jax.jit(f)
  return lambda c: jax.tree.map(np.asarray, f(c.params, c.batch_stats, dict(c.masks), dict(c.batch)))


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
  @jax.jit
  def example_grad(batch):  # dL_b/dz with L_b = l_b / B
    one = fresh(ctx, batch=batch)
    return jax.grad(lambda z: one.loss(one.params, z) / B)(dict(ctx.masks))
  for b in range(B):
    g = example_grad({k: v[b:b + 1] for k, v in ctx.batch.items()})
    for k in want:
      want[k] += np.asarray(g[k]) ** 2
  for k in want:
    np.testing.assert_allclose(scores[k], want[k], rtol=1e-9, atol=1e-20)
  # and the sum of the per-example gradients is the minibatch gradient (FO-BN) -- FG >= FO/B.
  fo = run('taylor_fo_bn', ctx)
  for k in want:
    assert np.all(scores[k] * B >= fo[k] * (1 - 1e-9))


# --- Taylor SO ------------------------------------------------------------------------------

@pytest.mark.parametrize('name,train_mode', [('lenet3', False), ('resnet8', True)])
def test_so_gates_equals_explicit_hessian(x64, name, train_mode):
  ctx = make_ctx(name, train_mode)
  ctx = fresh(ctx, masks=half_mask(ctx))
  scores = run('taylor_so', ctx)
  flat, unravel = jax.flatten_util.ravel_pytree(dict(ctx.masks))
  f = lambda v: ctx.loss(ctx.params, unravel(v))
  jit = jit_o2 if name == 'lenet3' else jax.jit  # see jit_o2
  g, H = map(np.asarray, jit(lambda v: (jax.grad(f)(v), jax.hessian(f)(v)))(flat))
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
  g, H = map(np.asarray, jax.jit(lambda v: (jax.grad(f)(v), jax.hessian(f)(v)))(flat))
  w = np.asarray(flat)
  t = unravel(jnp.asarray(g * w - 0.5 * w * (H @ w)))
  want = explicit_per_unit(ctx.groups, ({'params': t},), lambda a: a, masking.ALL_ROLES)
  scores = run('taylor_so', ctx, on='weights')
  for k in want:
    np.testing.assert_allclose(scores[k], want[k] ** 2, rtol=1e-8, atol=1e-20)


# --- OBD --------------------------------------------------------------------------------------

def test_obd_exact_and_hutchinson_convergence(x64):
  ctx = make_ctx('lenet3', False, batch=4)
  flat, unravel = jax.flatten_util.ravel_pytree(dict(ctx.masks))
  # obd_exact == 1/2 z^2 diag(H) from an explicit Hessian (with pruned units -> 0); both in one
  # program (see jit_o2).
  exact, H = jax.device_get(jit_o2(lambda params, masks: (
      E.get('obd_exact')(fresh(ctx, params=params, masks=masks)),
      jax.hessian(lambda v: ctx.loss(params, unravel(v)))(flat)))(ctx.params, dict(ctx.masks)))
  want = unravel(jnp.asarray(0.5 * np.diag(H)))
  for k in want:
    np.testing.assert_allclose(exact[k], np.asarray(want[k]), rtol=1e-9, atol=1e-20)
  exact_flat = np.concatenate([exact[k] for k in sorted(exact)])

  probes, seeds = [4, 16, 64], 16

  # OBD at every probe count in one program, compiled once (see jit_o2).
  @jit_o2
  def estimates(params, masks, step):
    return [E.get('obd', num_probes=p)(fresh(ctx, params=params, masks=masks, step=step))
            for p in probes]

  errs = np.zeros((len(probes), seeds))
  for s in range(seeds):
    for i, est in enumerate(jax.device_get(
        estimates(ctx.params, dict(ctx.masks), jnp.asarray(s, jnp.int32)))):
      est = np.concatenate([np.asarray(est[k]) for k in sorted(est)])
      errs[i, s] = np.sum((est - exact_flat) ** 2)
  rms = list(np.sqrt(np.mean(errs, axis=1)))
  slope = np.polyfit(np.log(probes), np.log(rms), 1)[0]
  assert -0.62 < slope < -0.38, (slope, rms)
  assert rms[-1] < rms[0] / 4


# --- weight / BN criteria by hand ----------------------------------------------------------------

@pytest.mark.parametrize('name', ['lenet3', 'resnet8'])
def test_weight_and_bn_forms_by_hand(x64, name):
  ctx = make_ctx(name, True)
  grads = jax.jit(jax.grad(lambda p: ctx.loss(p, dict(ctx.masks))))(ctx.params)
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
  every = jitted_many(list(hand), ctx)(ctx)  # one compile for all criteria
  for crit, want in hand.items():
    got = every[crit]
    for k in want:
      assert np.count_nonzero(want[k]) > want[k].size // 2, (crit, k)
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
  sites = ('conv1', 'conv2', 'fc1', 'fc2')

  # The four splits' activations and gradients in one jitted program (eager autodiff compiles
  # every op separately).
  @jax.jit
  def a_and_g(params, x, y):
    out = {}
    for site in sites:
      prefix, suffix = _lenet_split(params, x, site)
      a = prefix(x)
      out[site] = a, jax.grad(lambda h: jnp.mean(losses.cross_entropy(suffix(h), y)))(a)
    return out

  split = jax.device_get(a_and_g(ctx.params, x, y))
  for site in sites:
    a, g = split[site]
    want = np.mean(np.abs(a * g).reshape(-1, a.shape[-1]), axis=0)
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

def _one_train_step(ctx, estimator):
  """One jitted train step on ``ctx``'s batch with half the units masked, accumulating
  ``estimator``; returns ``(state, masks, autodiff dL/dgate at those masks)``."""
  import ml_collections
  masks = jax.tree.map(np.asarray, half_mask(ctx))
  variables = {'params': ctx.params, 'batch_stats': ctx.batch_stats}
  tx = train.create_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, momentum=0.9, weight_decay=0.0, schedule='constant')), 10, 10)
  state = train.create_train_state(jax.tree.map(jnp.array, variables), tx, masks=masks)
  mesh = train.create_mesh(jax.devices()[:1])
  step = train.make_train_step(ctx.model, tx, mesh, estimator=estimator)
  # Jitted: eager autodiff would compile every op of the forward and backward separately.
  want = jax.jit(jax.grad(lambda z: ctx.loss(ctx.params, z)))(jax.tree.map(jnp.asarray, masks))
  state, _ = step(state, train.shard_batch(mesh, jax.tree.map(np.asarray, ctx.batch)))
  return state, masks, want

def test_custom_estimator_by_name_in_train_step():
  @E.register('mine_abs_gate_grad')
  def mine(ctx, power=1.0):
    """|dL/dz|^power from the step's own (device-averaged) gate gradients."""
    return {k: jnp.abs(g) ** power for k, g in ctx.gate_grads().items()}

  assert 'mine_abs_gate_grad' in E.names()
  ctx = make_ctx('lenet3', True, batch=8, dtype=jnp.float32)
  state, masks, want = _one_train_step(ctx, E.get('mine_abs_gate_grad', power=2.0))
  assert int(state.score_count) == 1
  for k, g in want.items():
    np.testing.assert_allclose(np.asarray(state.score_sum[k]),
                               np.asarray(g) ** 2 * np.asarray(masks[k]), rtol=2e-4, atol=1e-10)
  with pytest.raises(ValueError, match='unknown estimator'):
    E.get('no_such_estimator')


# --- gate gradients from BatchNorm gradients (what the train step uses) -------------------------

def _quarter(name):
  return {k: max(1, w // 4) for k, w in models.full_widths(name).items()}


@pytest.mark.parametrize('name,shape,widths', [
    ('resnet8', (2, 8, 8, 1), dict(TINY)),
    # CifarResNet with 3 blocks a stage: ResNet-8 (same block and group code) covers it.
    pytest.param('resnet20', (2, 16, 16, 3), None, marks=pytest.mark.slow),
    # Quarter width: the flags and the identity do not depend on width; full width in float64
    # ran unoptimised convolutions of up to 512 channels (10 s).
    ('vgg16_bn', (2, 32, 32, 3), 'quarter'), ('resnet18', (2, 64, 64, 3), 'quarter'),
    ('resnet50', (2, 64, 64, 3), 'quarter'), ('vgg11_bn', (2, 32, 32, 3), 'quarter')])
def test_gate_grads_from_norm_equal_autodiff_at_live_units(x64, name, shape, widths):
  """Every group flagged ``gate_after_norm`` satisfies dL/dz = gamma g_gamma + beta g_beta at
  live units (so a wrong flag in a model fails here); the flagged groups are the BN'd channels."""
  model = models.create(name, 10, widths=_quarter(name) if widths == 'quarter' else widths)
  groups = model.groups()
  flagged = {g.name for g in groups if g.gate_after_norm}
  assert flagged == {g.name for g in groups if g.kind == 'channel'}
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape))
  v = random_variables(model, x, 3)
  masks = {k: jnp.asarray(m, jnp.float64) for k, m in helpers.random_masks(model, 3, 0.7).items()}
  ctx = E.ScoreContext(model, groups, v['params'], v['batch_stats'], masks,
                       {'image': x, 'label': jnp.arange(shape[0]) % 10}, train=True)
  gp, gz = jax.jit(jax.grad(ctx.loss, argnums=(0, 1)))(ctx.params, masks)
  derived = masking.gate_grads_from_norm(groups, ctx.params, gp)
  assert set(derived) == flagged
  for k in flagged:
    live = np.asarray(masks[k]) > 0
    np.testing.assert_allclose(np.asarray(derived[k])[live], np.asarray(gz[k])[live],
                               rtol=1e-9, atol=1e-14, err_msg=f'{name} {k}')


def test_models_without_bn_after_gate_flag_nothing():
  for name in ('lenet3', 'preact_resnet18', 'densenet121'):
    assert not any(g.gate_after_norm for g in models.create(name, 10).groups()), name


def test_train_step_fo_bn_scores_equal_autodiff_gate_grads():
  """The step mixes derived (after-BN) and differentiated (residual) gate gradients."""
  ctx = make_ctx('resnet8', True, batch=8, dtype=jnp.float32)
  state, masks, want = _one_train_step(ctx, E.get('taylor_fo_bn'))
  assert {g.name for g in ctx.groups if g.gate_after_norm} and \
      {g.name for g in ctx.groups if not g.gate_after_norm}
  for k, g in want.items():
    expect = np.asarray(g) ** 2 * np.asarray(masks[k])
    # float32: the two paths sum in different orders; tiny scores get an absolute tolerance.
    np.testing.assert_allclose(np.asarray(state.score_sum[k]), expect, rtol=2e-4,
                               atol=1e-4 * expect.max(), err_msg=k)
