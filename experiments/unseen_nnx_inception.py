"""An NNX model no test has seen (inception-style: three branches concatenated, 1x1 / 3x3 /
pool-projection, a second concatenating block, average pooling, a two-layer head), pruned end to
end by taylor_jax.Pruner in a hand-written SGD loop on random data (a generality check of
discovery's concatenation offsets and of in-place NNX surgery, not a benchmark):

  PYTHONPATH=. .venv/bin/python experiments/unseen_nnx_inception.py

At every pruning step the NNX object itself is loaded with the smaller weights and must compute
what the pruner's apply computes; the optimizer state must have the shrunk shapes.

2026-11-30: 10 groups found, all prunable (each branch's convolution its own group, joined at the
concatenation's BatchNorm by offsets); 5 pruning steps to -30.9% FLOPs (670,016 -> 462,856
MACs); the NNX object equal to pruner.apply (max |diff| 0.0) after every step; block2's
BatchNorm now normalises 46 = 16 + 22 + 8 channels.
"""
import jax
import numpy as np
import optax
from flax import nnx

import taylor_jax


class Branches(nnx.Module):
  def __init__(self, cin, a, b, c, *, rngs):
    self.a = nnx.Conv(cin, a, (1, 1), rngs=rngs)
    self.b1, self.b2 = nnx.Conv(cin, b, (1, 1), rngs=rngs), nnx.Conv(b, b, (3, 3), rngs=rngs)
    self.c = nnx.Conv(cin, c, (1, 1), rngs=rngs)
    self.bn = nnx.BatchNorm(a + b + c, rngs=rngs)

  def __call__(self, x):
    pooled = nnx.max_pool(x, (3, 3), (1, 1), padding='SAME')
    y = jax.numpy.concatenate([self.a(x), self.b2(nnx.relu(self.b1(x))), self.c(pooled)], -1)
    return nnx.relu(self.bn(y))


class Net(nnx.Module):
  def __init__(self, *, rngs):
    self.stem = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.stem_bn = nnx.BatchNorm(16, rngs=rngs)
    self.block1 = Branches(16, 8, 16, 8, rngs=rngs)
    self.block2 = Branches(32, 16, 24, 8, rngs=rngs)
    self.fc = nnx.Linear(48, 32, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = self.block2(nnx.max_pool(self.block1(x), (2, 2), (2, 2)))
    return self.out(nnx.relu(self.fc(x.mean((1, 2)))))


rng = np.random.default_rng(0)
x = rng.standard_normal((32, 12, 12, 1)).astype(np.float32)
y = rng.integers(0, 10, 32).astype(np.int32)
model = Net(rngs=nnx.Rngs(0))
tx = optax.sgd(0.05, momentum=0.9)
pr = taylor_jax.Pruner(model, x[:2], target=taylor_jax.Target(flops=0.3), tx=tx, frequency=2,
                       units_per_step=8)
for g in pr.groups:
  print(f'{g.name:28s} {g.width:3d} prunable={g.prunable} {g.reason}')


@jax.jit
def step(v, opt, ps, x, y):
  def loss(p):
    o, n = pr.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(o, y).mean(), n
  (l, n), g = jax.value_and_grad(loss, has_aux=True)(v['params'])
  ps = pr.accumulate(ps, v['params'], g)
  u, opt = tx.update(g, opt, v['params'])
  return {**n, 'params': optax.apply_updates(v['params'], u)}, opt, ps, l


v = taylor_jax.pruner.nnx_variables(model)
opt, ps = tx.init(v['params']), pr.init()
while not pr.done:
  v, opt, ps, l = step(v, opt, ps, x, y)
  res = pr.step(ps, v, opt)
  if res:
    v, opt, ps = res.variables, res.opt_state, res.state
    assert jax.tree.map(np.shape, opt) == jax.tree.map(np.shape, tx.init(v['params']))
    pr.load(v)
    model.eval()
    diff = float(np.max(np.abs(model(x) - pr.apply(v, x, train=False))))
    model.train()
    assert diff < 1e-5, diff
    print(f"prune step {res.record['prune_step']}: FLOPs cut {1 - res.record['flops_ratio']:.1%}, "
          f"NNX object vs pruner.apply max |diff| {diff:.1e}")
print(pr.summary())
print('widths:', pr.widths, 'block2.bn features:', model.block2.bn.num_features)
