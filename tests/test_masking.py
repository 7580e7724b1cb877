"""Masks and gates as parameter scalings (no gate in the model code), checked against the zoo's
gated forward pass: masked == gated with 0/1 gates, and Taylor-FO-BN from parameter gradients
== the gate gradient of the zoo's gates where the two definitions coincide (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import discovery, estimators, losses, masking, models
from taylor_jax.models import common


def _setup(name, shape, dtype=jnp.float32):
  model = models.create(name, 10, input_shape=shape[1:])
  x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  # Drawn with numpy at init's shapes: compiling model.init (its random initialisers) costs more
  # than the checks. Init's values (LeCun-normal kernels, zero biases/means, unit scales/variances)
  # plus 0.1 * U[0, 1): non-trivial BN statistics and affine parameters, so no identity hides a bug.
  rng = np.random.default_rng(0)

  def draw(path, a):
    leaf = path[-1].key
    base = np.zeros(a.shape)
    if leaf == 'kernel':
      base = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif leaf in ('scale', 'var'):
      base = np.ones(a.shape)
    return jnp.asarray(base + 0.1 * rng.random(a.shape), dtype)

  variables = jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  with common.reference_convolutions():
    found = discovery.discover_groups(lambda v, x: model.apply(v, x), variables, x)
  shapes = {discovery._path_keys(p): l.shape
            for p, l in jax.tree_util.tree_flatten_with_path(variables)[0]}
  key = lambda g: frozenset((s.path, s.axis % len(shapes[s.path]), s.role, s.offset, s.repeat)
                            for s in g.slices)
  declared = {key(g): g for g in model.groups()}
  pairs = [(declared[key(g)], g) for g in found.groups]  # (zoo group, discovered group)
  return model, variables, x, pairs


@pytest.mark.parametrize('name,shape', [('lenet3', (4, 28, 28, 1)), ('resnet8', (4, 28, 28, 1)),
                                        ('preact_resnet18', (2, 32, 32, 3))])
def test_masked_params_compute_what_zero_gates_compute(name, shape):
  model, variables, x, pairs = _setup(name, shape)
  rng = np.random.default_rng(0)
  masks_zoo, masks_disc = {}, {}
  for zoo_g, g in pairs:
    m = (rng.random(g.width) > 0.4).astype(np.float32)
    m[rng.integers(g.width)] = 1.0
    masks_zoo[zoo_g.name], masks_disc[g.name] = m, m
  groups = [g for _, g in pairs]
  # One jitted program for both forwards (eager application compiles every op separately).
  gated, masked = jax.jit(lambda v, mz, md: (
      model.apply(v, x, gates=mz, train=False),
      model.apply(masking.apply_masks(v, groups, md), x, train=False)))(
          variables, masks_zoo, masks_disc)
  np.testing.assert_allclose(masked, gated, atol=2e-5, rtol=1e-5)


def _loss(model, variables, x, labels, gates=None):
  logits, _ = model.apply(variables, x, gates=gates, train=True, mutable=['batch_stats'])
  return jnp.mean(losses.cross_entropy(logits, labels))


@pytest.mark.parametrize('name,shape', [('lenet3', (4, 28, 28, 1)), ('resnet8', (4, 28, 28, 1))])
def test_taylor_fo_bn_from_param_grads_equals_gate_grads_float64(name, shape):
  with jax.enable_x64(True):
    model, variables, x, pairs = _setup(name, shape, jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    labels = jnp.arange(shape[0]) % 10
    groups = [g for _, g in pairs]
    ones_zoo = {zg.name: jnp.ones((zg.width,), jnp.float64) for zg, _ in pairs}
    ones = {g.name: jnp.ones((g.width,), jnp.float64) for g in groups}

    # The three gradients in one jitted program (eager autodiff compiles every op separately).
    @jax.jit
    def three_grads(variables, ones_zoo, ones):
      grads = jax.grad(lambda v: _loss(model, v, x, labels))(variables)
      from_params = masking.gate_grads_from_params(groups, variables['params'], grads['params'])
      zoo = jax.grad(lambda z: _loss(model, variables, x, labels, z))(ones_zoo)
      by_scaling = jax.grad(lambda z: _loss(
          model, {**variables, 'params': masking.apply_gates(variables['params'], groups, z)},
          x, labels))(ones)
      return from_params, zoo, by_scaling

    from_params, zoo, by_scaling = jax.device_get(three_grads(variables, ones_zoo, ones))
    # The parameter formula is the derivative of the parameter-scaling gate, for every group.
    for zg, g in pairs:
      np.testing.assert_allclose(from_params[g.name], by_scaling[g.name], rtol=1e-9, atol=1e-12)
      if zg.kind != 'residual':  # the definitions coincide: one gate right after its norm/ReLU
        np.testing.assert_allclose(from_params[g.name], zoo[zg.name], rtol=1e-9, atol=1e-12)
    # Stream scaling != the reference's shared skip gate where a stream is gated more than once
    # (ResNet-8's stage 1: after the stem and after block 0; see taylor_jax.masking).
    residual = [(zg, g) for zg, g in pairs if zg.kind == 'residual']
    assert all(np.allclose(from_params[g.name], zoo[zg.name], rtol=1e-6) ==
               (zg.name != 'stage1') for zg, g in residual)


def test_per_unit_reads_offsets_and_repeats():
  from taylor_jax.groups import Slice
  x = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12)  # axis 1: 3 positions x 4 channels
  s = Slice(('k',), 1, 'in', offset=1, repeat=3)
  expect = np.zeros(2)
  for c in range(2):
    expect[c] = sum(float(x[r, p * 4 + 1 + c]) for r in range(2) for p in range(3))
  np.testing.assert_allclose(masking.per_unit(x, s, 2), expect)


def test_stream_estimator_is_the_parameter_gate_squared():
  model, variables, x, pairs = _setup('resnet8', (2, 28, 28, 1))
  groups = [zg for zg, _ in pairs]
  labels = jnp.arange(2) % 10

  # One jitted program for both estimators and the reference gradient (eager autodiff compiles
  # every op separately).
  @jax.jit
  def scores_and_want(params, batch_stats):
    ctx = estimators.ScoreContext(model, groups, params, batch_stats,
                                  {g.name: jnp.ones(g.width) for g in groups},
                                  {'image': x, 'label': labels}, train=True)
    got = estimators.get('taylor_fo_bn_stream')(ctx)
    fo_bn = estimators.get('taylor_fo_bn')(ctx)
    grads = jax.grad(lambda p: _loss(model, {'params': p, 'batch_stats': batch_stats}, x,
                                     labels))(params)
    return got, fo_bn, masking.gate_grads_from_params(groups, params, grads)

  got, fo_bn, want = jax.device_get(scores_and_want(variables['params'],
                                                    variables['batch_stats']))
  for g in groups:
    np.testing.assert_allclose(got[g.name], np.square(want[g.name]), rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(got['stage1.block0'], fo_bn['stage1.block0'], rtol=1e-4, atol=1e-10)
