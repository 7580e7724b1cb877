"""Models of token ids (integer input through an embedding), Linen and NNX: discovered, their
FLOPs counted and the surgered network equal to the masked one with integer inputs, and
pruned to a target through the Pruner."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import taylor_jax
from taylor_jax import checks, costs
from taylor_jax import pruner as pruner_lib

TOKENS = np.random.default_rng(0).integers(0, 50, (16, 12)).astype(np.int32)
Y = np.arange(16) % 3


class LinenTokNet(nn.Module):
  @nn.compact
  def __call__(self, t):
    h = nn.Embed(50, 32)(t)
    h = h + nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(h))))
    return nn.Dense(3)(h.mean(1))


class NNXTokNet(nnx.Module):
  def __init__(self, *, rngs):
    self.embed = nnx.Embed(50, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.up, self.down = nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 32, rngs=rngs)
    self.head = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, t):
    h = self.embed(t)
    h = h + self.down(nnx.gelu(self.up(self.norm(h))))
    return self.head(h.mean(1))


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_a_token_model_is_discovered_checked_counted_and_pruned(api):
  if api == 'linen':
    module = LinenTokNet()
    variables = module.init(jax.random.key(0), TOKENS[:2])
  else:
    module = NNXTokNet(rngs=nnx.Rngs(0))
    variables = pruner_lib.nnx_variables(module)
  tx = optax.adam(1e-2)
  pr = taylor_jax.Pruner(module, TOKENS[:2], target=taylor_jax.Target(flops=0.2), tx=tx,
                         train_kwarg=None, frequency=1, units_per_step=8)
  groups = {g.name: g for g in pr.groups}
  hidden = [g for g in groups.values() if g.width == 64]
  assert len(hidden) == 1 and hidden[0].prunable  # the MLP's hidden units
  assert all(not g.prunable for g in groups.values() if g.width == 32)  # the LayerNorm stream
  # MACs per sequence of 12 tokens: the two MLP matmuls and the head (the embedding is a gather).
  assert costs.flops(pr.model, (12,)) == 12 * (32 * 64 + 64 * 32) + 32 * 3
  # Masked == surgered at random widths, on integer ids.
  assert checks.probe_surgery(pr.model, variables, (12,)) < 1e-5

  opt_state, pstate = tx.init(variables['params']), pr.init()
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      pr.apply({**variables, 'params': p}, TOKENS), Y).mean()
  for _ in range(4):
    grads = jax.grad(loss)(variables['params'])
    pstate = pr.accumulate(pstate, variables['params'], grads)
    updates, opt_state = tx.update(grads, opt_state, variables['params'])
    variables = {**variables, 'params': optax.apply_updates(variables['params'], updates)}
    res = pr.step(pstate, variables, opt_state)
    if res:
      variables, opt_state, pstate = res.variables, res.opt_state, res.state
    if pr.done:
      break
  assert pr.done and 1 - pr.history[-1]['flops_ratio'] >= 0.2
  assert jax.tree.map(jnp.shape, pr.abstract_variables()) == jax.tree.map(jnp.shape, variables)
  assert np.isfinite(np.asarray(pr.apply(variables, TOKENS))).all()
