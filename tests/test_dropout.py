"""Models with dropout: the pruner API and the main job's train step give them a key per step
(Linen: the 'dropout' stream; NNX: every RNG stream, reseeded), equal to what the user's own
model computes with that key, and they prune and shrink like any other model."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest
from flax import nnx

import taylor_jax
from taylor_jax import pruner as pruner_lib
from taylor_jax import train
from taylor_jax.engine import Target
from taylor_jax.models import any_model

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 8, 8, 1)).astype(np.float32)
Y = RNG.integers(0, 4, 32).astype(np.int32)


class LinenDropNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(12, (3, 3))(x)))
    return nn.Dense(4)(x.mean((1, 2)))


class NNXDropNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.conv2 = nnx.Conv(8, 12, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(12, rngs=rngs)
    self.head = nnx.Linear(12, 4, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.conv1(x)))
    return self.head(nnx.relu(self.bn2(self.conv2(x))).mean((1, 2)))


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_dropout_models_train_with_a_key_per_step_and_prune(api):
  key = jax.random.key(7)
  if api == 'linen':
    model = LinenDropNet()
    variables = model.init(jax.random.key(0), X[:2])
    own = lambda v, k: model.apply(v, X, train=True, rngs={'dropout': k},
                                   mutable=['batch_stats'])[0]
  else:
    model = NNXDropNet(rngs=nnx.Rngs(0))
    variables = pruner_lib.nnx_variables(model)

    def own(v, k):  # the user's model itself, its one RNG stream seeded as the adapter does
      (tag,) = {n.key.tag for _, n in nnx.iter_graph(model) if isinstance(n, nnx.RngStream)}
      nnx.reseed(model, **{tag: jax.random.fold_in(k, 0)})
      model.train()
      return model(X)
  tx = optax.sgd(0.05)
  pr = taylor_jax.Pruner(model, X[:2], target=Target(units=6), frequency=1, units_per_step=3,
                         tx=tx)
  train_out = lambda v, k: pr.apply(v, X, train=True, mutable=['batch_stats'], rngs=k)[0]
  # The same dropout as the user's model with that key; another key, another mask.
  np.testing.assert_allclose(train_out(variables, key), own(variables, key), atol=1e-5)
  assert np.abs(train_out(variables, key) - train_out(variables, jax.random.key(8))).max() > 1e-3
  if api == 'nnx':
    with pytest.raises(ValueError, match='rngs=key'):
      pr.apply(variables, X, train=True, mutable=['batch_stats'])

  @jax.jit
  def step(variables, opt_state, pstate, k):
    def loss_fn(params):
      out, new = pr.apply({**variables, 'params': params}, X, train=True,
                          mutable=['batch_stats'], rngs=k)
      return optax.softmax_cross_entropy_with_integer_labels(out, Y).mean(), new
    (_, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    pstate = pr.accumulate(pstate, variables['params'], grads)
    updates, opt_state = tx.update(grads, opt_state, variables['params'])
    return {**variables, **new, 'params': optax.apply_updates(variables['params'], updates)}, \
        opt_state, pstate

  opt_state, pstate, i = tx.init(variables['params']), pr.init(), 0
  while not pr.done and i < 10:
    variables, opt_state, pstate = step(variables, opt_state, pstate, jax.random.fold_in(key, i))
    res = pr.step(pstate, variables, opt_state)
    if res:
      variables, opt_state, pstate = res.variables, res.opt_state, res.state
    i += 1
  assert pr.done and pr.history[-1]['units_kept'] == 20 - 6
  out = train_out(variables, key)  # the smaller network still takes its key
  assert out.shape == (len(X), 4) and np.isfinite(np.asarray(out)).all()
  if api == 'nnx':
    pr.load(variables)
    model.eval()
    np.testing.assert_allclose(model(X), pr.apply(variables, X), atol=1e-5)


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_main_job_train_step_draws_a_new_dropout_key_every_step(api):
  if api == 'linen':
    module = LinenDropNet()
    model = any_model.LinenModel(module, X[:2])
    variables = module.init(jax.random.key(0), X[:2])

    def own_loss(v, k):
      out = module.apply(v, X, train=True, rngs={'dropout': k}, mutable=['batch_stats'])[0]
      return optax.softmax_cross_entropy_with_integer_labels(out, Y).mean()
  else:
    user = NNXDropNet(rngs=nnx.Rngs(0))
    model = any_model.NNXModel(lambda rngs: NNXDropNet(rngs=rngs), X[:2])
    variables = pruner_lib.nnx_variables(user)

    def own_loss(v, k):
      nnx.reseed(user, default=jax.random.fold_in(k, 0))
      user.train()
      return optax.softmax_cross_entropy_with_integer_labels(user(X), Y).mean()
  tx = optax.sgd(0.05)
  mesh = train.create_mesh(jax.devices()[:1])
  step = train.make_train_step(model, tx, mesh, dropout_seed=5)
  batch = train.shard_batch(mesh, {'image': X, 'label': Y})
  losses = []
  for s in (0, 1):  # the step donates its state: a fresh one each time
    state = train.create_train_state(jax.tree.map(np.array, variables), tx, widths=model.widths)
    _, metrics = step(train.replicate(mesh, state.replace(step=jnp.asarray(s, jnp.int32))), batch)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), s), 0)  # step s, device 0
    np.testing.assert_allclose(metrics['loss'], own_loss(variables, key), rtol=1e-5)
    losses.append(float(metrics['loss']))
  assert losses[0] != losses[1]  # another step, another mask


def test_an_estimator_that_reruns_the_model_sees_the_steps_dropout_key():
  module = LinenDropNet()
  variables = module.init(jax.random.key(0), X[:2])
  pr = taylor_jax.Pruner(module, X[:2], target=Target(units=6), estimator='taylor_so')
  grads = jax.tree.map(jnp.ones_like, variables['params'])
  score = lambda k: pr.scores(variables['params'], grads, batch_stats=variables['batch_stats'],
                              batch={'image': X, 'label': Y}, rngs=k)
  a, b, c = score(jax.random.key(1)), score(jax.random.key(1)), score(jax.random.key(2))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert any(np.abs(a[k] - c[k]).max() > 0 for k in a)  # the key reaches the re-run
