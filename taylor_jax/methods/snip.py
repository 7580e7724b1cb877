"""Structured SNIP (Lee et al., ICLR 2019): connection sensitivity at initialisation, per unit.

SNIP scores every weight by its connection sensitivity ``|w dL/dw|`` on one minibatch at
initialisation, normalised by the sum over all weights, and prunes BEFORE training. Here the unit
is a channel group (:mod:`taylor_jax.groups`):

* ``criterion='weights'`` (default): ``s_c = sum over every parameter slice of the group (its
  producer kernels/biases, BatchNorm scale/bias and consumer input slices) of |w dL/dw|`` at the
  positions of unit ``c``, divided by ``sum |w dL/dw|`` over ALL parameters of the network.
  (Removing unit ``c`` removes all those weights, so its saliency is their summed sensitivity.)
* ``criterion='gate'``: ``s_c = |z_c dL/dz_c|`` at the gate (``z = 1`` at initialisation),
  divided by the sum over all units.

``L`` is the minibatch-mean cross-entropy with BatchNorm in train mode (batch statistics), the
gradient averaged over ``prune.snip.num_batches`` training minibatches (1: SNIP's one minibatch).
Units are ranked globally and removed to the target under the engine's constraints
(:func:`taylor_jax.methods.prune_to_target`), the network is surgered, and the smaller network is
trained in the 'finetune' phase: give it the training budget with ``prune.finetune_epochs`` and
``prune.finetune_learning_rate`` (``train.epochs`` must be 0: the scores are taken at init).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taylor_jax import estimators, masking, methods
from taylor_jax.groups import ChannelGroup

OPTIONS = {'criterion': 'weights', 'num_batches': 1}


def _validate(c) -> None:
  o = c.prune.snip
  if o.criterion not in ('weights', 'gate'):
    raise ValueError(f"invalid config: prune.snip.criterion={o.criterion!r}: use 'weights' "
                     "(sum of |w dL/dw| over the unit's slices) or 'gate' (|z dL/dz|)")
  if o.num_batches < 1:
    raise ValueError(f'invalid config: prune.snip.num_batches={o.num_batches}: must be >= 1')
  if c.train.epochs != 0 or c.train.init_checkpoint:
    raise ValueError(
        f'invalid config: prune.method=snip scores connection sensitivity at initialisation, but '
        f'train.epochs={c.train.epochs}, train.init_checkpoint={c.train.init_checkpoint!r}. Set '
        'train.epochs=0 and no init_checkpoint, and give the training budget to '
        'prune.finetune_epochs (with prune.finetune_learning_rate).')


def sensitivity(groups: Sequence[ChannelGroup], params: Any, grads: Any,
                gate_grads: Mapping[str, Any], masks: Mapping[str, Any],
                criterion: str = 'weights') -> dict[str, jax.Array]:
  """Normalised structured connection sensitivity per unit (see the module doc)."""
  if criterion == 'gate':
    s = {k: jnp.abs(masks[k] * gate_grads[k]) for k in gate_grads}
    total = sum(jnp.sum(v) for v in s.values())
  else:
    s = masking.per_unit_sum(groups, (params, grads), lambda w, g: jnp.abs(w * g),
                             roles=masking.ALL_ROLES, prefix=('params',))
    total = sum(jnp.sum(jnp.abs(w * g)) for w, g in
                zip(jax.tree.leaves(params), jax.tree.leaves(grads)))
  return {k: v / total for k, v in s.items()}


def mean_grads(model, groups, state, batches, num_batches: int):
  """``(dL/dparams, dL/dgates)`` averaged over ``num_batches`` minibatches (BN in train mode)."""
  @jax.jit
  def grads(params, batch_stats, masks, batch):
    ctx = estimators.ScoreContext(model, groups, params, batch_stats, masks, batch, train=True)
    return ctx.param_grads(), ctx.gate_grads()

  total = None
  for _ in range(num_batches):
    g = grads(state.params, state.batch_stats, state.masks, next(batches))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda x: np.asarray(x) / num_batches, jax.device_get(total))


@methods.register('snip', options=OPTIONS, validate=_validate)
def snip(ctx: methods.MethodContext) -> methods.MethodResult:
  """Structured SNIP at initialisation; prune to the target, surgery (train in 'finetune')."""
  o = ctx.options
  model, state = ctx.model, ctx.state
  groups = tuple(model.groups())
  g_params, g_gates = mean_grads(model, groups, state, ctx.batches(int(state.step)),
                                 o.num_batches)
  scores = jax.device_get(sensitivity(groups, state.params, g_params, g_gates, state.masks,
                                      o.criterion))
  masks = methods.prune_to_target(ctx, model, scores)
  rec = methods.history_record(ctx, 1, int(state.step), model, masks, state)
  small, small_state = methods.shrink(model, state, masks)
  return methods.MethodResult(small, small_state, [rec],
                              {'criterion': o.criterion, 'num_batches': o.num_batches})
