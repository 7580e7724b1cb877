"""An NNX model no test has seen (residual blocks, dropout, GELU, 1x1 conv), pruned end to end by
taylor_jax.Pruner in a hand-written loop on random data (a generality check, not a benchmark):

  PYTHONPATH=. .venv/bin/python experiments/unseen_nnx_resnetish.py

2026-11-30: 4 pruning steps to -31.9% FLOPs; the residual stream (group stem) kept whole by the
ranking; the NNX object after pruner.load computes what the pruned network computes (max diff 0.0).
"""
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import taylor_jax
class Block(nnx.Module):
  def __init__(self, c, rngs):
    self.c1 = nnx.Conv(c, c, (3, 3), rngs=rngs); self.n1 = nnx.BatchNorm(c, rngs=rngs)
    self.c2 = nnx.Conv(c, c, (3, 3), rngs=rngs); self.n2 = nnx.BatchNorm(c, rngs=rngs)
  def __call__(self, x):
    return nnx.relu(x + self.n2(self.c2(nnx.relu(self.n1(self.c1(x))))))
class ResNetish(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 24, (3, 3), strides=2, rngs=rngs); self.bn = nnx.BatchNorm(24, rngs=rngs)
    self.b1, self.b2 = Block(24, rngs), Block(24, rngs)
    self.up = nnx.Conv(24, 40, (1, 1), rngs=rngs)
    self.drop = nnx.Dropout(0.0, rngs=rngs)
    self.head = nnx.Linear(40, 10, rngs=rngs)
  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = self.b2(self.b1(x))
    x = nnx.gelu(self.up(x))
    return self.head(x.mean((1, 2)))
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 16, 16, 1)).astype(np.float32); y = rng.integers(0, 10, 32)
model = ResNetish(nnx.Rngs(0))
tx = optax.sgd(0.05, momentum=0.9)
pr = taylor_jax.Pruner(model, x[:2], target=taylor_jax.Target(flops=0.3), tx=tx, frequency=2, units_per_step=6)
print([(g.name, g.width, g.prunable, g.reason[:40]) for g in pr.groups])
v = taylor_jax.pruner.nnx_variables(model); opt = tx.init(v['params']); ps = pr.init()
@jax.jit
def step(v, opt, ps, x, y):
  def lf(p):
    o, n = pr.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(o, y).mean(), n
  (l, n), g = jax.value_and_grad(lf, has_aux=True)(v['params'])
  ps = pr.accumulate(ps, v['params'], g)
  u, opt = tx.update(g, opt, v['params'])
  return {**n, 'params': optax.apply_updates(v['params'], u)}, opt, ps, l
while not pr.done:
  v, opt, ps, l = step(v, opt, ps, x, y)
  r = pr.step(ps, v, opt)
  if r: v, opt, ps = r.variables, r.opt_state, r.state
print(pr.summary()); print(pr.widths, float(l))
pr.load(v); model.eval()
print('in-place max diff', float(jnp.abs(model(x) - pr.apply(v, x)).max()))
