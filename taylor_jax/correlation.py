"""Rank and linear correlation between two importance score dicts (e.g. an estimator vs the oracle).

Only units that are live (``masks`` != 0, when given) of prunable groups present in both dicts
are compared. ``global`` concatenates every such unit of every group (the paper's global
ranking); ``per_group`` compares within each group (None where a group has < 2 units or a
constant score vector, for which the coefficients are undefined).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import scipy.stats

METRICS = ('spearman', 'kendall', 'pearson')


def _coefficients(a: np.ndarray, b: np.ndarray) -> dict[str, Optional[float]]:
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return {m: None for m in METRICS} | {'n': int(a.size)}
  return {'spearman': float(scipy.stats.spearmanr(a, b).statistic),
          'kendall': float(scipy.stats.kendalltau(a, b).statistic),
          'pearson': float(scipy.stats.pearsonr(a, b).statistic),
          'n': int(a.size)}


def correlations(scores_a: Mapping[str, Any], scores_b: Mapping[str, Any],
                 masks: Optional[Mapping[str, Any]] = None,
                 groups: Optional[Sequence[Any]] = None) -> dict[str, Any]:
  """Spearman, Kendall (tau-b) and Pearson correlations between two score dicts.

  Args:
    scores_a, scores_b: group -> ``(width,)`` scores.
    masks: optional group -> 0/1; pruned units are left out.
    groups: optional ChannelGroups; non-prunable ones are left out (default: every group name
      the two dicts share, in sorted order).

  Returns:
    ``{'global': {spearman, kendall, pearson, n}, 'per_group': {name: {...}}}``.
  """
  if groups is not None:
    names = [g.name for g in groups if g.prunable and g.name in scores_a and g.name in scores_b]
  else:
    names = sorted(set(scores_a) & set(scores_b))
  va, vb, per = [], [], {}
  for k in names:
    a = np.asarray(scores_a[k], np.float64).reshape(-1)
    b = np.asarray(scores_b[k], np.float64).reshape(-1)
    if a.shape != b.shape:
      raise ValueError(f'group {k!r}: score shapes differ {a.shape} vs {b.shape}')
    if masks is not None:
      live = np.asarray(masks[k]).reshape(-1) != 0
      a, b = a[live], b[live]
    va.append(a)
    vb.append(b)
    per[k] = _coefficients(a, b)
  glob = _coefficients(np.concatenate(va) if va else np.zeros(0),
                       np.concatenate(vb) if vb else np.zeros(0))
  return {'global': glob, 'per_group': per}


def format_table(result: Mapping[str, Any]) -> str:
  """A small markdown table of :func:`correlations`' result."""
  fmt = lambda v: '-' if v is None else f'{v:.3f}'
  rows = ['| group | n | spearman | kendall | pearson |', '|---|---|---|---|---|']
  for name, r in [('global', result['global'])] + list(result['per_group'].items()):
    rows.append(f"| {name} | {r['n']} | " + ' | '.join(fmt(r[m]) for m in METRICS) + ' |')
  return '\n'.join(rows)
