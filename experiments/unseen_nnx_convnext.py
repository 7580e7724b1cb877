"""An NNX model no test has seen, written as NNX users write it (ConvNeXt-style: a patchify stem,
blocks of depthwise 7x7 conv -> LayerNorm -> 4x MLP with GELU -> dropout -> residual, a
downsampling layer, a LayerNorm head), pruned end to end in an idiomatic NNX loop: ``nnx.jit``
over the model and an ``nnx.Optimizer`` (AdamW), ``pruner.accumulate(pstate, model, grads)``,
``pruner.step(pstate, model, optimizer)``, dropout keys through the model's own RNG stream
reseeded by the pruner. A generality check of the NNX-native API, not a benchmark:

  PYTHONPATH=. .venv/bin/python experiments/unseen_nnx_convnext.py

Checked at the end: the target is reached; the NNX object (pruned in place, eval mode) computes
what ``pruner.apply`` computes; the optimizer's state has the pruned shapes (its next update
runs); at random widths the surgered network computes what the masked one does
(``checks.probe_surgery``).

2026-11-30: 6 groups found; the two residual streams (16, 32 channels) kept whole (LayerNorm
normalises over them), the four MLP hidden layers prunable; 11 pruning steps in 22 training
steps to -30.1% FLOPs (635,488 -> 443,968 MACs), hidden widths 64/64/128/128 -> 44/35/82/62; the
NNX object equal to pruner.apply (max |diff| 0.0); surgery probe 0.0; the shrunk AdamW state
updated once more.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import taylor_jax
from taylor_jax import checks


class Block(nnx.Module):
  def __init__(self, dim, *, rngs):
    self.dw = nnx.Conv(dim, dim, (7, 7), feature_group_count=dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    h = self.down(nnx.gelu(self.up(self.norm(self.dw(x)))))
    return x + self.drop(h)


class ConvNeXtTiny(nnx.Module):
  def __init__(self, num_classes=10, dims=(16, 32), *, rngs):
    self.stem = nnx.Conv(1, dims[0], (4, 4), strides=4, rngs=rngs)
    self.stem_norm = nnx.LayerNorm(dims[0], rngs=rngs)
    self.stage1 = nnx.List([Block(dims[0], rngs=rngs) for _ in range(2)])
    self.down_norm = nnx.LayerNorm(dims[0], rngs=rngs)
    self.down = nnx.Conv(dims[0], dims[1], (2, 2), strides=2, rngs=rngs)
    self.stage2 = nnx.List([Block(dims[1], rngs=rngs) for _ in range(2)])
    self.head_norm = nnx.LayerNorm(dims[1], rngs=rngs)
    self.head = nnx.Linear(dims[1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem_norm(self.stem(x))
    for b in self.stage1:
      x = b(x)
    x = self.down(self.down_norm(x))
    for b in self.stage2:
      x = b(x)
    return self.head(self.head_norm(x.mean((1, 2))))


def main():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, 64).astype(np.int32)
  model = ConvNeXtTiny(rngs=nnx.Rngs(params=0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  pruner = taylor_jax.Pruner(model, x[:2], target=taylor_jax.Target(flops=0.3), frequency=2,
                             units_per_step=16)
  print(pruner.summary())

  @nnx.jit
  def train_step(model, optimizer, pstate, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    pstate = pruner.accumulate(pstate, model, grads)
    optimizer.update(model, grads)
    return loss, pstate

  pstate, steps = pruner.init(), 0
  while not pruner.done and steps < 100:
    model.train()  # dropout on: the model's own 'dropout' stream (NNX draws and advances it)
    idx = rng.permutation(64)[:32]
    loss, pstate = train_step(model, optimizer, pstate, x[idx], y[idx])
    pruned = pruner.step(pstate, model, optimizer)
    if pruned:
      pstate = pruned.state
    steps += 1
  assert pruner.done, pruner.summary()
  loss, pstate = train_step(model, optimizer, pstate, x[:32], y[:32])  # the shrunk optimizer runs
  model.eval()
  variables = taylor_jax.pruner.nnx_variables(model)
  diff = float(jnp.abs(model(x[:8]) - pruner.apply(variables, x[:8])).max())
  probe = checks.probe_surgery(pruner.model, variables, x.shape[1:])
  print(pruner.summary())
  last = pruner.history[-1]
  print(f'{len(pruner.history)} pruning steps in {steps} training steps; FLOPs cut '
        f'{1 - last["flops_ratio"]:.1%}; loss {float(loss):.3f}; NNX object vs pruner.apply '
        f'max |diff| {diff:.1e}; surgery probe {probe:.1e}')
  assert diff < 1e-5 and probe < 1e-4


if __name__ == '__main__':
  main()
