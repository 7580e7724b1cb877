"""Kernel-statistics layer redundancy (the seed notes' experiment): per-group pruning budgets from
the statistics of the group's filters, then a within-group criterion picks which units go.

1. Redundancy of a group (numpy only, from the trained weights). The group's filters are the rows
   of each of its producer kernels (every ``'out'`` kernel slice: the conv producing the channel;
   for a residual stream the stem, every block's conv2 and the projections), reshaped to
   ``(units, fan_in)``. Per kernel ``W``:

   * ``statistic='effective_rank'`` (default): ``1 - erank(W) / min(units, fan_in)``, with the
     effective rank of Roy & Vetterli (2007) ``erank = exp(H(p))``, ``p_i = s_i / sum_j s_j`` over
     the singular values ``s`` and ``H`` the Shannon entropy (nats): 0 when the filters span their
     space evenly, close to 1 when a few directions explain them.
   * ``statistic='cosine'``: the mean absolute cosine similarity of distinct filters (1: all
     parallel, 0: orthogonal).

   A group's redundancy ``r_g`` is the mean over its producer kernels.
2. Budgets: a global number ``N`` of units to remove is shared out in proportion to ``r_g *
   live_width_g`` (the group's estimated number of redundant units): greedily, the next unit (or
   aligned chunk, the engine's rule) goes to the group furthest below its share ``N * w_g / sum
   w``, never taking a group below ``Constraints.min_kept``. With ``align = 1`` the budgets sum to
   exactly ``N``; with ``align = k`` to at most ``N + k - 1``. ``N`` comes from ``prune.target_units``
   / ``target_keep_share``; for a FLOPs / parameter target it grows by ``prune.prune_per_iteration``
   until the target is reached.
3. Within each group the ``n_g`` units with the lowest ``prune.kernel_budget.criterion`` score go:
   any registered estimator (default ``taylor_fo_bn``, averaged over ``num_batches`` training
   minibatches; ``weight_l2`` needs no data). One shot, then surgery and fine-tuning.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from taylor_jax import engine, estimators, methods
from taylor_jax.groups import ChannelGroup, get_path

OPTIONS = {'statistic': 'effective_rank', 'criterion': 'taylor_fo_bn', 'num_batches': 16}
STATISTICS = ('effective_rank', 'cosine')


def _validate(c) -> None:
  o = c.prune.kernel_budget
  if o.statistic not in STATISTICS:
    raise ValueError(f'invalid config: prune.kernel_budget.statistic={o.statistic!r}: use one of '
                     f'{list(STATISTICS)}')
  estimators.get(o.criterion)
  if o.num_batches < 1:
    raise ValueError(f'invalid config: prune.kernel_budget.num_batches={o.num_batches}: must be '
                     '>= 1')


# --- statistics ------------------------------------------------------------------------------------

def effective_rank(matrix: np.ndarray) -> float:
  """Roy & Vetterli's effective rank ``exp(-sum p log p)``, ``p = s / sum(s)`` (singular values)."""
  s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
  if s.sum() <= 0:
    return 0.0
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def mean_abs_cosine(matrix: np.ndarray) -> float:
  """Mean ``|cos|`` between distinct rows (zero rows count as orthogonal to everything)."""
  m = np.asarray(matrix, np.float64)
  n = m.shape[0]
  if n < 2:
    return 0.0
  norms = np.linalg.norm(m, axis=1)
  unit = m / np.where(norms > 0, norms, 1.0)[:, None]
  cos = np.abs(unit @ unit.T)
  return float((cos.sum() - np.trace(cos)) / (n * (n - 1)))


def kernel_redundancy(matrix: np.ndarray, statistic: str = 'effective_rank') -> float:
  """Redundancy in [0, 1] of one ``(units, fan_in)`` filter matrix (see the module doc)."""
  if statistic == 'effective_rank':
    return 1.0 - effective_rank(matrix) / min(matrix.shape)
  if statistic == 'cosine':
    return mean_abs_cosine(matrix)
  raise ValueError(f'unknown statistic {statistic!r}; use one of {list(STATISTICS)}')


def producer_matrices(group: ChannelGroup, variables: Mapping[str, Any],
                      units: np.ndarray) -> list[np.ndarray]:
  """``(len(units), fan_in)`` filters of each producer kernel (role 'out', leaf 'kernel')."""
  out = []
  for s in group.slices:
    if s.role != 'out' or s.path[-1] != 'kernel':
      continue
    w = np.asarray(get_path(variables, s.path))
    axis = s.axis % w.ndim
    rows = np.moveaxis(np.take(w, s.positions(units, w.shape[axis]), axis=axis), axis, 0)
    out.append(rows.reshape(rows.shape[0], -1))
  return out


def group_redundancy(groups: Sequence[ChannelGroup], variables: Mapping[str, Any],
                     masks: Mapping[str, Any], statistic: str = 'effective_rank'
                     ) -> dict[str, float]:
  """Prunable group -> mean redundancy of its producer kernels over the live units (0 without
  producer kernels or with fewer than 2 live units)."""
  red = {}
  for g in groups:
    if not g.prunable:
      continue
    units = np.flatnonzero(np.asarray(masks[g.name]))
    mats = [m for m in producer_matrices(g, variables, units) if min(m.shape) >= 2]
    red[g.name] = float(np.mean([kernel_redundancy(m, statistic) for m in mats])) if mats else 0.0
  return red


# --- budgets ---------------------------------------------------------------------------------------

def allocate_budgets(redundancy: Mapping[str, float], live: Mapping[str, int],
                     full_widths: Mapping[str, int], constraints: engine.Constraints,
                     total: int, aligns: Optional[Mapping[str, int]] = None) -> dict[str, int]:
  """Units each group loses so that they sum to ``total`` (see the module doc, step 2).

  Args:
    redundancy: group -> ``r_g`` in [0, 1] (prunable groups only).
    live: group -> live units now.
    full_widths: unpruned widths (``constraints.min_kept`` is relative to them).
    total: units to remove in all.
    aligns: group -> its alignment (``constraints.align_of``); default ``constraints.align``.

  Raises:
    ValueError: when the constraints allow fewer than ``total`` removals.
  """
  names = sorted(redundancy)
  weight = {k: max(redundancy[k], 0.0) * live[k] + 1e-12 for k in names}
  wsum = sum(weight.values())
  share = {k: total * weight[k] / wsum for k in names}
  align = {k: (aligns or {}).get(k, constraints.align) for k in names}
  floor = {k: constraints.min_kept(full_widths[k], align[k]) for k in names}
  taken = {k: 0 for k in names}
  removed = 0
  while removed < total:
    best, best_gap, best_chunk = None, None, 0
    for k in names:
      width = live[k] - taken[k]
      chunk = engine.next_chunk(width, full_widths[k], align[k])
      if width - chunk < floor[k]:
        continue
      gap = share[k] - taken[k]
      if best is None or gap > best_gap:
        best, best_gap, best_chunk = k, gap, chunk
    if best is None:
      raise ValueError(f'the constraints allow removing only {removed} units, not {total}; '
                       'lower the target or relax prune.min_width / max_share / align')
    taken[best] += best_chunk
    removed += best_chunk
  return taken


def masks_from_budgets(scores: Mapping[str, Any], masks: Mapping[str, Any],
                       budgets: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Each group loses its ``budgets[g]`` live units with the lowest scores (ties: lower index)."""
  new = {k: np.asarray(m, np.float32).copy() for k, m in masks.items()}
  for k, n in budgets.items():
    alive = np.flatnonzero(new[k])
    order = alive[np.argsort(np.asarray(scores[k], np.float64)[alive], kind='stable')]
    new[k][order[:n]] = 0.0
  return new


@methods.register('kernel_budget', options=OPTIONS, validate=_validate)
def kernel_budget(ctx: methods.MethodContext) -> methods.MethodResult:
  """Per-group budgets from kernel redundancy, within-group criterion, one shot + surgery."""
  o = ctx.options
  model, state = ctx.model, ctx.state
  groups = tuple(model.groups())
  masks = {k: np.asarray(v, np.float32) for k, v in state.masks.items()}
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  red = group_redundancy(groups, variables, masks, o.statistic)
  scores = methods.estimator_scores(ctx, model, state, estimators.get(o.criterion),
                                    o.num_batches)
  live = {k: int(masks[k].sum()) for k in red}
  aligns = {g.name: ctx.constraints.align_of(g) for g in groups}
  full_units = sum(ctx.full_widths[g.name] for g in groups if g.prunable)
  need = engine.Target.from_config(ctx.config.prune).units_to_remove(
      full_units, methods.units_kept(groups, masks))
  if need is not None:
    budgets = allocate_budgets(red, live, ctx.full_widths, ctx.constraints, max(need, 0), aligns)
    new = masks_from_budgets(scores, masks, budgets)
  else:
    step, total = ctx.config.prune.prune_per_iteration, 0
    while True:
      total += step
      budgets = allocate_budgets(red, live, ctx.full_widths, ctx.constraints, total, aligns)
      new = masks_from_budgets(scores, masks, budgets)
      if ctx.target_reached(model, new):
        break
  rec = methods.history_record(ctx, 1, int(state.step), model, new, state,
                               units_removed=int(sum(budgets.values())))
  small, small_state = methods.shrink(model, state, new)
  return methods.MethodResult(small, small_state, [rec],
                              {'redundancy': red, 'budgets': budgets, 'statistic': o.statistic,
                               'criterion': o.criterion})
