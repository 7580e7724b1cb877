"""Issue 16's speed changes keep the numbers: ``common.one_channel_conv`` (kernel gradient as
matmuls) against ``nn.Conv``/``lax.conv_general_dilated``, forward, gradients and
forward-over-reverse, in float64; the train step compiled with the CPU options against XLA's
defaults and plain convolutions, in float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from taylor_jax import models, train
from taylor_jax.models import common


def _max_abs(a, b):
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b)))


@pytest.mark.parametrize('kernel,stride,pad,bias', [
    (3, 1, 1, False), (3, 1, 1, True), (3, 2, 1, False), (1, 2, 0, False), (5, 1, 0, True),
    (7, 2, 3, False), (3, 1, 0, False), (4, 3, 2, True)])
def test_one_channel_conv_equals_lax_conv_forward_and_gradients(kernel, stride, pad, bias):
  cin = 1
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 13, 11, cin), jnp.float64)
    kw = dict(padding=[(pad, pad), (pad, pad)], use_bias=bias, param_dtype=jnp.float64)
    fast = common.Conv(5, (kernel, kernel), (stride, stride), **kw)
    ref = nn.Conv(5, (kernel, kernel), (stride, stride), **kw)
    v = jax.jit(ref.init)(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.25, v)
    assert jax.tree.structure(jax.eval_shape(fast.init, jax.random.key(1), x)) == \
        jax.tree.structure(v)
    # one_channel_conv is on the path (not a silent fallback to nn.Conv)
    assert 'custom_jvp_call' in str(jax.make_jaxpr(lambda v: fast.apply(v, x))(v))

    def loss(m):
      return lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))

    # Forward, gradients and forward-over-reverse (the estimators' Hessian-vector products) of
    # one module in one jitted program: op-by-op autodiff compiles every op separately.
    def outputs(m):
      def f(v, x):
        hvp = jax.jvp(lambda v: jax.grad(loss(m))(v, x), (v,), (v,))[1]
        return m.apply(v, x), jax.grad(loss(m), argnums=(0, 1))(v, x), hvp
      return jax.jit(f)(v, x)

    y_fast, g_fast, hvp_fast = outputs(fast)
    y_ref, g_ref, hvp_ref = outputs(ref)
    np.testing.assert_allclose(y_fast, y_ref, rtol=0, atol=1e-12)
    assert _max_abs(g_fast, g_ref) < 1e-11
    assert _max_abs(hvp_fast, hvp_ref) < 1e-10
    with common.reference_convolutions():
      jaxpr = str(jax.make_jaxpr(lambda v: fast.apply(v, x))(v))
    assert 'conv_general_dilated' in jaxpr and 'custom_jvp_call' not in jaxpr


def test_multi_channel_conv_is_plain_nn_conv():
  x = jnp.ones((2, 8, 8, 3))
  m = common.Conv(4, (3, 3), (1, 1), padding=[(1, 1), (1, 1)])
  v = m.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(lambda v: m.apply(v, x))(v))
  assert 'conv_general_dilated' in jaxpr and 'custom_jvp_call' not in jaxpr


def _steps(model, options, n=2):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 28, 28, 1), np.float32)
  y = rng.integers(0, 10, 16).astype(np.int32)
  # Drawn with numpy at init's shapes (running model.init op by op compiles every initialiser);
  # the same draw for both runs compared.
  init_rng = np.random.default_rng(1)

  def draw(path, a):
    leaf = path[-1].key
    if leaf == 'kernel':
      return (init_rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(a.dtype)
    if leaf in ('scale', 'var'):
      return init_rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
    return init_rng.normal(0.0, 0.2, a.shape).astype(a.dtype)

  variables = jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(model.init, jax.random.key(0), x[:1]))
  optim = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9,
                                         nesterov=True, weight_decay=5e-4, schedule='constant'))
  tx = train.create_optimizer(optim, 10, 100)
  mesh = train.create_mesh()
  state = train.replicate(mesh, train.create_train_state(variables, tx, widths=model.widths))
  step = train.make_train_step(model, tx, mesh, xla_options=options)
  batch = train.shard_batch(mesh, {'image': x, 'label': y})
  losses = []
  for _ in range(n):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  return losses, jax.device_get(state.params)


def test_train_step_same_numbers_with_cpu_options_and_fast_conv():
  """The step as compiled now (fast_conv, CPU compiler options) against plain lax convolutions
  and XLA's default options: the same losses and parameters within float32 rounding."""
  model = models.create('resnet8', 10)
  losses, params = _steps(model, 'auto')
  with common.reference_convolutions():
    ref_losses, ref_params = _steps(model, None)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
