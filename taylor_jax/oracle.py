"""The oracle importance (reference id 40): the true change of the loss when one unit is removed.

For every live unit ``m`` of every prunable group and every given minibatch ``d``,
``I_m(d) = |L_d(masks) - L_d(masks with unit m set to 0)|`` (or its square), ``L_d`` the
minibatch-MEAN cross-entropy; the oracle is the mean of ``I_m(d)`` over the minibatches (as the
reference: per minibatch, then averaged). Pruned units score 0.

:func:`oracle_scores` is the fast one. For one group it evaluates a whole chunk of
"one unit removed" gate vectors in one compiled call, ``jax.vmap`` over the group's gate vector
(``chunk_size`` units at a time bounds the memory). Everything the network computes before the
group's first gate site does not depend on that gate, so ``vmap`` leaves it unbatched: the prefix
is computed once per call (per chunk), not once per unit, and only the suffix from the first
gate site on (for a residual stream: from its first site, the stem or the stage's first block) is
evaluated per unit. :func:`oracle_naive` is the explicit loop, one full forward per unit.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taylor_jax.losses import cross_entropy

Scores = dict[str, np.ndarray]


def _mean_loss(model, variables, gates, batch, train):
  if train:
    logits, _ = model.apply(variables, batch['image'], gates=gates, train=True,
                            mutable=['batch_stats'])
  else:
    logits = model.apply(variables, batch['image'], gates=gates, train=False)
  return jnp.mean(cross_entropy(logits, batch['label']))


def _prepare(model, masks, batches, groups, units):
  groups = tuple(model.groups()) if groups is None else tuple(groups)
  groups = [g for g in groups if g.prunable]
  masks = {k: np.asarray(v) for k, v in masks.items()}
  live = {}
  for g in groups:
    u = np.flatnonzero(masks[g.name] != 0)
    if units is not None:
      u = np.intersect1d(u, np.asarray(units.get(g.name, []), np.int64))
    live[g.name] = u
  batches = [{k: jnp.asarray(v) for k, v in b.items() if k in ('image', 'label')}
             for b in batches]
  if not batches:
    raise ValueError('oracle needs at least one minibatch')
  return groups, masks, live, batches


def _finish(groups, masks, sums, nbatches):
  return {g.name: sums[g.name] / nbatches if g.name in sums else
          np.zeros(masks[g.name].shape, np.float64) for g in groups}


@functools.lru_cache(maxsize=32)
def _loss_fn_keyed(key: '_Key', train: bool):
  model = key.model
  return jax.jit(lambda variables, masks, batch: _mean_loss(model, variables, masks, batch, train))


class _Key:
  """Hashable wrapper so that (unhashable) Linen modules can key the jit caches by identity."""

  def __init__(self, model):
    self.model = model

  def __hash__(self):
    return id(self.model)

  def __eq__(self, other):
    return isinstance(other, _Key) and other.model is self.model


def oracle_losses(model, variables, masks, batches, chunk_size: int = 64, train: bool = False,
                  groups=None, units: Optional[Mapping[str, Sequence[int]]] = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Raw oracle losses: ``(L_all (D,), {group: (D, width) loss with that unit removed})``
  over ``D`` minibatches (NaN at units not evaluated: pruned or outside ``units``)."""
  groups, masks_np, live, batches = _prepare(model, masks, batches, groups, units)
  key = _Key(model)
  masks_j = {k: jnp.asarray(v) for k, v in masks_np.items()}
  base = jnp.stack([_loss_fn_keyed(key, train)(variables, masks_j, b) for b in batches])
  out = {}
  for g in groups:
    u = live[g.name]
    rows = np.full((len(batches), g.width), np.nan)
    if len(u):
      fn = _removed_losses_fn_keyed(key, g.name, train)
      k = min(chunk_size, len(u))
      per_batch = []
      for b in batches:
        res = []
        for start in range(0, len(u), k):
          chunk = u[start:start + k]
          pad = np.concatenate([chunk, np.repeat(chunk[-1:], k - len(chunk))])
          gv = np.repeat(masks_np[g.name][None], k, axis=0)
          gv[np.arange(k), pad] = 0
          res.append(fn(variables, masks_j, b, jnp.asarray(gv, masks_j[g.name].dtype))[:len(chunk)])
        per_batch.append(jnp.concatenate(res))
      rows[:, u] = np.asarray(jnp.stack(per_batch), np.float64)
    out[g.name] = rows
  return np.asarray(base, np.float64), out


@functools.lru_cache(maxsize=64)
def _removed_losses_fn_keyed(key: _Key, group: str, train: bool):
  model = key.model

  def f(variables, masks, batch, group_gates):
    def one(gv):
      return _mean_loss(model, variables, {**masks, group: gv}, batch, train)
    return jax.vmap(one)(group_gates)
  return jax.jit(f)


def _scores_from_losses(groups, masks, base, removed, squared):
  out = {}
  for g in groups:
    rows = removed[g.name]
    d = rows - base[:, None]
    d = np.square(d) if squared else np.abs(d)
    s = np.mean(d, axis=0)
    out[g.name] = np.where(np.isnan(s), 0.0, s) * (masks[g.name] != 0)
  return out


def oracle_scores(model, variables, masks, batches: Iterable[Mapping[str, Any]],
                  squared: bool = False, chunk_size: int = 64, train: bool = False,
                  groups=None, units: Optional[Mapping[str, Sequence[int]]] = None) -> Scores:
  """Oracle importance of every live unit of every prunable group (fast, vmapped).

  Args:
    model: a zoo model; ``variables``: ``{'params', 'batch_stats'}``.
    masks: group -> ``(width,)`` 0/1; pruned units score 0 and are not evaluated.
    batches: minibatches ``{'image', 'label'}``; the loss is each minibatch's mean.
    squared: ``(L_all - L_without)^2`` instead of ``|L_all - L_without|``.
    chunk_size: units evaluated per compiled call (memory ~ chunk_size x the suffix's activations).
    train: BatchNorm with batch statistics (default: running averages, as for evaluation).
    groups: the groups to score (default ``model.groups()``; non-prunable ones are skipped).
    units: optional group -> unit indices to evaluate (others score 0).

  Returns:
    group -> ``(width,)`` float64 numpy scores (mean over the minibatches).
  """
  groups_p, masks_np, _, _ = _prepare(model, masks, [{}], groups, units)
  base, removed = oracle_losses(model, variables, masks, batches, chunk_size, train, groups, units)
  return _scores_from_losses(groups_p, masks_np, base, removed, squared)


def oracle_macs(model, variables, masks, batch: Mapping[str, Any], chunk_size: int = 64,
                train: bool = False, groups=None) -> dict[str, int]:
  """Conv/dot MACs of the oracle of every live unit on one minibatch, counted from the jaxprs.

  Returns ``{'fast': ..., 'naive': ..., 'bound': naive / fast}``: ``fast`` is what
  :func:`oracle_scores` computes (per group and chunk: the prefix once, the suffix once per unit,
  padded chunks included), ``naive`` one full forward per unit. ``bound`` is the speedup the
  prefix reuse can give at equal MACs per second.
  """
  from taylor_jax import costs
  from taylor_jax.models import common
  groups, masks_np, live, (batch,) = _prepare(model, masks, [batch], groups, None)
  masks_j = {k: jnp.asarray(v) for k, v in masks_np.items()}
  key = _Key(model)
  with common.reference_convolutions():
    full = costs.jaxpr_macs(jax.make_jaxpr(
        lambda v, m, b: _mean_loss(model, v, m, b, train))(variables, masks_j, batch))
    fast = naive = 0
    for g in groups:
      n = len(live[g.name])
      if not n:
        continue
      k = min(chunk_size, n)
      gv = jnp.ones((k, g.width), masks_j[g.name].dtype)
      call = costs.jaxpr_macs(jax.make_jaxpr(_removed_losses_fn_keyed(key, g.name, train))(
          variables, masks_j, batch, gv))
      fast += call * -(-n // k)
      naive += full * n
  return {'fast': int(fast), 'naive': int(naive), 'bound': naive / fast}


def oracle_naive(model, variables, masks, batches: Iterable[Mapping[str, Any]],
                 squared: bool = False, train: bool = False, groups=None,
                 units: Optional[Mapping[str, Sequence[int]]] = None) -> Scores:
  """The same as :func:`oracle_scores` by the explicit loop: one full forward per unit and
  minibatch (one compiled function, masks as arguments)."""
  groups, masks_np, live, batches = _prepare(model, masks, batches, groups, units)
  fn = _loss_fn_keyed(_Key(model), train)
  masks_j = {k: jnp.asarray(v) for k, v in masks_np.items()}
  base = np.asarray(jnp.stack([fn(variables, masks_j, b) for b in batches]), np.float64)
  removed = {}
  for g in groups:
    rows = np.full((len(batches), g.width), np.nan)
    cols = {}
    for c in live[g.name]:
      m = dict(masks_j)
      m[g.name] = jnp.asarray(np.where(np.arange(g.width) == c, 0, masks_np[g.name]),
                              masks_j[g.name].dtype)
      cols[c] = [fn(variables, m, b) for b in batches]  # async: read back once per group
    for c, vals in cols.items():
      rows[:, c] = np.asarray(jnp.stack(vals), np.float64)
    removed[g.name] = rows
  return _scores_from_losses(groups, masks_np, base, removed, squared)
