"""The pruning engine: turns accumulated importance into new masks, in channel groups.

Reference schedule (Molchanov et al. 2019, NVlabs/Taylor_pruning): scores are accumulated every
minibatch; every ``frequency`` minibatches their plain mean over the period is smoothed across
pruning steps with an EMA (momentum 0.9, the first step takes the mean), and the
``prune_per_iteration`` live units with the lowest score are removed, ranked globally across
groups without per-layer normalisation. Pruned units score 0 and are never revived.

Constraints the reference lacks: a minimum width per group (default 1: no group is ever emptied),
a maximum pruned share per group (relative to the unpruned width; overridable per group), and alignment of the kept
widths to a multiple of ``align`` (GPUs pay for odd channel counts). Alignment is of channel
counts: a group of attention heads (``kind='heads'``) is never aligned, since each head is
``head_dim`` channels and any head count keeps the layer's channel count a multiple of them.

Cost-aware ranking (optional, not in the reference): units ranked by score per unit of cost they
save (FLOPs, or measured milliseconds as HALP does), the greedy rule of a knapsack whose budget is
the cost: under a FLOPs or latency target it keeps more importance per unit of cost.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from taylor_jax.groups import ChannelGroup


@dataclasses.dataclass(frozen=True)
class Constraints:
  """Per-group limits. ``min_width``: units every group keeps; ``max_share``: largest share of a
  group's unpruned width that may be pruned; ``align``: kept widths rounded to a multiple of it
  (1: off); ``max_share_per_group``: ``{group name or fnmatch pattern: share}`` overriding
  ``max_share`` (the first matching entry; Torch-Pruning's ``pruning_ratio_dict``), also given
  as ``'stage1=0.2,stage3.*=0.5'``. A pattern that matches no group is an error
  (:meth:`check_patterns`)."""
  min_width: int = 1
  max_share: float = 1.0
  align: int = 1
  max_share_per_group: Any = ()

  def __post_init__(self):
    if self.min_width < 1:
      raise ValueError(f'prune.min_width={self.min_width}: must be >= 1 (a group cannot be empty)')
    if not 0.0 <= self.max_share <= 1.0:
      raise ValueError(f'prune.max_share={self.max_share}: must be in [0, 1]')
    if self.align < 1:
      raise ValueError(f'prune.align={self.align}: must be >= 1')
    per = self.max_share_per_group
    if isinstance(per, str):
      items = [p.strip() for p in per.split(',') if p.strip()]
      bad = [p for p in items if p.count('=') != 1]
      if bad:
        raise ValueError(f'prune.max_share_per_group={per!r}: entries are name=share, e.g. '
                         f"'stage1=0.2,stage3.*=0.5' (bad: {bad})")
      per = [p.split('=') for p in items]
    elif isinstance(per, Mapping):
      per = list(per.items())
    try:
      per = tuple((str(k).strip(), float(v)) for k, v in per)
    except (TypeError, ValueError):
      raise ValueError(f'max_share_per_group={self.max_share_per_group!r}: give '
                       '{group name or pattern: share in [0, 1]}') from None
    for k, v in per:
      if not 0.0 <= v <= 1.0:
        raise ValueError(f'max_share_per_group[{k!r}]={v}: must be in [0, 1]')
    object.__setattr__(self, 'max_share_per_group', per)

  @classmethod
  def from_config(cls, prune) -> 'Constraints':
    """The constraints of a ``config.prune`` section."""
    return cls(prune.min_width, prune.max_share, prune.align,
               prune.get('max_share_per_group', ''))

  def max_share_of(self, group: ChannelGroup) -> float:
    """``group``'s largest prunable share: its ``max_share_per_group`` entry, else ``max_share``."""
    for pattern, share in self.max_share_per_group:
      if fnmatch.fnmatchcase(group.name, pattern):
        return share
    return self.max_share

  def check_patterns(self, groups: Sequence[ChannelGroup]) -> None:
    """Raises naming every ``max_share_per_group`` entry that matches no group."""
    names = [g.name for g in groups]
    unused = [p for p, _ in self.max_share_per_group
              if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
      raise ValueError(f'max_share_per_group entries {unused} match no channel group; the '
                       f'groups are {names}')

  def align_of(self, group: ChannelGroup) -> int:
    """The alignment of ``group``'s kept width: ``align``, or 1 for attention heads (a head is
    ``head_dim`` channels: aligning head counts to a channel multiple would freeze a 4-head
    layer at ``align=4``)."""
    return 1 if group.kind == 'heads' else self.align

  def min_kept(self, full_width: int, align: Optional[int] = None,
               max_share: Optional[float] = None) -> int:
    """Fewest units a group of unpruned width ``full_width`` may keep (``align``, ``max_share``:
    the group's, :meth:`align_of`, :meth:`max_share_of`; default ``self.align``,
    ``self.max_share``)."""
    align = self.align if align is None else align
    max_share = self.max_share if max_share is None else max_share
    floor = max(self.min_width, math.ceil(full_width * (1.0 - max_share) - 1e-9))
    if align > 1 and full_width >= align:
      floor = math.ceil(floor / align) * align
    return min(full_width, floor)

  def floor_of(self, group: ChannelGroup, full_width: int) -> int:
    """Fewest units ``group`` (unpruned width ``full_width``) may keep."""
    return self.min_kept(full_width, self.align_of(group), self.max_share_of(group))


def period_mean_and_ema(score_sum: Mapping[str, Any], score_count: int,
                        score_ema: Mapping[str, Any], masks: Mapping[str, Any], first: bool,
                        momentum: float = 0.9, normalize: Optional[str] = None
                        ) -> dict[str, np.ndarray]:
  """New EMA of the period means (``first``: the mean itself); pruned units get 0.

  ``normalize='l2'`` divides each group's period mean by its L2 norm first (the reference's
  optional per-layer normalisation, off by default).
  """
  if score_count <= 0:
    raise ValueError('no scores were accumulated in this pruning period: the train step must '
                     'add each minibatch\'s scores (Pruner.accumulate inside it, its returned '
                     'state passed to Pruner.step)')
  out = {}
  for k, s in score_sum.items():
    mean = np.asarray(s, np.float64) / score_count
    if normalize == 'l2':
      mean = mean / max(np.linalg.norm(mean), 1e-30)
    elif normalize not in (None, 'none'):
      raise ValueError(f"unknown prune.normalize {normalize!r}: use 'none' or 'l2'")
    ema = mean if first else momentum * np.asarray(score_ema[k], np.float64) + (1 - momentum) * mean
    out[k] = (ema * (np.asarray(masks[k]) > 0)).astype(np.float32)
  return out


def width_grid(full_width: int, constraints: Constraints, max_points: int = 8,
               align: Optional[int] = None, max_share: Optional[float] = None) -> list[int]:
  """The widths a group can reach, for cost tables: every multiple of ``align`` (the group's,
  default ``constraints.align``) from the smallest allowed width up (aligned groups), else at
  most ``max_points`` evenly spaced ones; ``full_width`` always included."""
  align = constraints.align if align is None else align
  lo = constraints.min_kept(full_width, align, max_share)
  if align > 1 and full_width >= align:
    return sorted(set(range(lo, full_width + 1, align)) | {full_width})
  return sorted({int(round(w)) for w in np.linspace(lo, full_width, max(2, max_points))})


# Cost of a chunk: ``unit_cost(group, live width, chunk size)`` -> cost saved by going from that
# width to ``width - chunk`` (> 0).
UnitCost = Callable[[str, int, int], float]


def next_chunk(width: int, full_width: int, align: int) -> int:
  """Units the next removal from a group of ``width`` live units takes: 1 without alignment
  (or when the group is narrower than ``align``), else down to the next multiple of ``align``."""
  return 1 if (align <= 1 or full_width < align) else (width % align or align)


def _chunk_candidates(scores, order, taken, full_widths, floor, k,
                      unit_cost: Optional[UnitCost] = None) -> list[tuple[float, str, int]]:
  """``(key, group, chunk size)`` of every chunk the constraints allow next, lowest key first;
  the key is the chunk's mean score, divided by its cost saved per unit with ``unit_cost``."""
  out = []
  for name, units in order.items():
    width = units.size - taken[name]
    chunk = next_chunk(width, full_widths[name], k[name])
    if width - chunk < floor[name]:
      continue
    mean = float(np.mean(np.asarray(scores[name], np.float64)[
        units[taken[name]:taken[name] + chunk]]))
    if unit_cost is not None:
      saved = float(unit_cost(name, width, chunk))
      if not saved > 0:
        raise ValueError(f'unit_cost({name!r}, {width}, {chunk}) = {saved}: must be > 0 (floor it)')
      mean /= saved / chunk
    out.append((mean, name, chunk))
  out.sort(key=lambda c: c[0])
  return out


def _masks_after(masks, order, taken) -> dict[str, np.ndarray]:
  new = {k: np.asarray(m, np.float32).copy() for k, m in masks.items()}
  for name, t in taken.items():
    new[name][order[name][:t]] = 0.0
  return new


def local_keys(scores: Mapping[str, Any], masks: Mapping[str, Any],
               groups: Sequence[ChannelGroup], full_widths: Mapping[str, int]
               ) -> dict[str, np.ndarray]:
  """Keys that make the global ranking local: a group's j-th lowest-scoring live unit (j = 1,
  2, ...) gets the share of its unpruned width the group has lost once that unit goes, so
  :func:`prune_lowest` takes units from every group in step (Torch-Pruning's
  ``global_pruning=False``), each group's lowest-scoring first."""
  out = {}
  for g in groups:
    s = np.asarray(scores[g.name], np.float64)
    if not g.prunable:
      out[g.name] = s
      continue
    alive = np.flatnonzero(np.asarray(masks[g.name]))
    keys = np.zeros_like(s)
    gone = full_widths[g.name] - len(alive)
    keys[alive[np.argsort(s[alive], kind='stable')]] = (
        gone + 1 + np.arange(len(alive))) / full_widths[g.name]
    out[g.name] = keys
  return out


def prune_lowest(scores: Mapping[str, Any], masks: Mapping[str, Any],
                 groups: Sequence[ChannelGroup], full_widths: Mapping[str, int], num_units: int,
                 constraints: Constraints = Constraints(),
                 excess: Optional[Callable[[Mapping[str, np.ndarray]], float]] = None,
                 tolerance: float = 0.0,
                 unit_cost: Optional[UnitCost] = None) -> dict[str, np.ndarray]:
  """Masks with (about) ``num_units`` of the lowest-scoring live units removed, ranked globally.

  Units whose removal would break a constraint are skipped (the next-lowest goes instead). With
  ``align = k > 1``, units go in chunks that keep every group's width a multiple of ``k`` (the
  first chunk of a misaligned group takes it down to the next multiple; groups narrower than
  ``k`` lose single units): the chunk with the lowest MEAN score goes first, so the ranking stays
  global, at least ``num_units`` are removed when the constraints allow it, and each group loses
  its lowest-scoring units.

  Cost targets (FLOPs, parameters): ``excess(masks)`` is how far ``masks`` are from the target
  (> 0: not reached; e.g. FLOPs ratio - (1 - target)) and decreases as units go. The step stops
  at the first chunk that reaches the target. If that chunk overshoots by more than
  ``tolerance`` (a wide aligned chunk in an early layer can remove a fifth of the FLOPs at
  once), the lowest-scoring chunk that lands within ``[-tolerance, 0]`` goes instead; if none
  does, the lowest-scoring chunk that falls short (the next step goes on from there), else the
  one that overshoots least.

  ``unit_cost``: rank chunks by mean score per unit of cost saved instead (see module doc).
  """
  floor = {g.name: constraints.floor_of(g, full_widths[g.name]) for g in groups}
  k = {g.name: constraints.align_of(g) for g in groups}
  # Per prunable group: its live units in increasing score order, and how many are gone.
  order = {}
  for g in groups:
    if g.prunable:
      alive = np.flatnonzero(np.asarray(masks[g.name]))
      s = np.asarray(scores[g.name], np.float64)[alive]
      order[g.name] = alive[np.argsort(s, kind='stable')]
  taken = {name: 0 for name in order}
  removed, sequence = 0, []  # sequence: the greedy chunks, in the order they go
  while removed < num_units:
    cands = _chunk_candidates(scores, order, taken, full_widths, floor, k, unit_cost)
    if not cands:
      break
    _, name, chunk = cands[0]
    taken[name] += chunk
    removed += chunk
    sequence.append((name, chunk))
  if excess is None or excess(_masks_after(masks, order, taken)) > 0:
    return _masks_after(masks, order, taken)

  # The target is reached within this step: keep the shortest greedy prefix that does not reach
  # it (bisection; excess falls along the sequence), then choose the last chunk.
  def taken_after(n):
    t = {name: 0 for name in order}
    for name, chunk in sequence[:n]:
      t[name] += chunk
    return t

  lo, hi = 0, len(sequence)  # excess(prefix lo) > 0 (or lo == 0), excess(prefix hi) <= 0
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if excess(_masks_after(masks, order, taken_after(mid))) > 0:
      lo = mid
    else:
      hi = mid
  if lo == 0 and excess(masks) <= 0:
    return _masks_after(masks, order, taken_after(0))
  taken = taken_after(lo)
  trials = []  # (excess after, name, chunk) in score order
  for _, name, chunk in _chunk_candidates(scores, order, taken, full_widths, floor, k,
                                          unit_cost):
    t = dict(taken)
    t[name] += chunk
    e = excess(_masks_after(masks, order, t))
    trials.append((e, name, chunk))
    if -tolerance - 1e-12 <= e <= 0:
      break
  if not trials:
    return _masks_after(masks, order, taken)
  in_band = [t for t in trials if -tolerance - 1e-12 <= t[0] <= 0]
  short = [t for t in trials if t[0] > 0]
  pick = in_band[0] if in_band else short[0] if short else max(trials, key=lambda t: t[0])
  taken[pick[1]] += pick[2]
  return _masks_after(masks, order, taken)


def removable_units(groups: Sequence[ChannelGroup], full_widths: Mapping[str, int],
                    masks: Mapping[str, Any], constraints: Constraints) -> int:
  """How many more units the constraints allow removing."""
  return sum(max(0, int(np.asarray(masks[g.name]).sum()) - constraints.floor_of(g, full_widths[g.name]))
             for g in groups if g.prunable)


def minimal_masks(groups: Sequence[ChannelGroup], full_widths: Mapping[str, int],
                  constraints: Constraints) -> dict[str, np.ndarray]:
  """Masks with every prunable group at its smallest allowed width (for target checks)."""
  out = {}
  for g in groups:
    m = np.zeros(g.width, np.float32)
    m[:constraints.floor_of(g, full_widths[g.name]) if g.prunable else g.width] = 1.0
    out[g.name] = m
  return out


# --- the pruning target --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
  """Where pruning stops: exactly one of

  * ``flops``: share of the unpruned network's FLOPs (MACs) to remove, in (0, 1);
  * ``params``: share of its parameters to remove, in (0, 1);
  * ``keep_share``: share of the prunable units to keep, in (0, 1);
  * ``units``: number of prunable units to remove (>= 1).

  Cost targets are met by ``prune_lowest`` through :meth:`excess` (within a tolerance); unit
  targets exactly, by :meth:`units_this_step`.
  """
  flops: Optional[float] = None
  params: Optional[float] = None
  keep_share: Optional[float] = None
  units: Optional[int] = None

  def __post_init__(self):
    given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if len(given) != 1:
      raise ValueError(
          f'a pruning target needs exactly one of flops, params, keep_share, units; got '
          f'{given or "none"} (config: prune.target_flops_reduction, target_params_reduction, '
          'target_keep_share, target_units)')
    for k in ('flops', 'params', 'keep_share'):
      v = given.get(k)
      if v is not None and not 0.0 < v < 1.0:
        raise ValueError(f'Target({k}={v}): must be a share in (0, 1)')
    if self.units is not None and (int(self.units) != self.units or self.units < 1):
      raise ValueError(f'Target(units={self.units}): must be an integer >= 1')

  @classmethod
  def from_config(cls, prune) -> Optional['Target']:
    """The target of a ``config.prune`` section (None when it sets none)."""
    fields = dict(flops=prune.target_flops_reduction, params=prune.target_params_reduction,
                  keep_share=prune.target_keep_share, units=prune.target_units)
    if all(v is None for v in fields.values()):
      return None
    return cls(**fields)

  @property
  def is_cost(self) -> bool:
    return self.flops is not None or self.params is not None

  def units_to_remove(self, full_units: int, kept_units: int) -> Optional[int]:
    """Units still to remove under a unit target (None under a cost target)."""
    if self.keep_share is not None:
      return kept_units - int(math.floor(self.keep_share * full_units + 1e-9))
    if self.units is not None:
      return self.units - (full_units - kept_units)
    return None

  def units_this_step(self, per_step: int, full_units: int, kept_units: int) -> int:
    """Units one pruning step removes: ``per_step``, capped at what a unit target still needs."""
    need = self.units_to_remove(full_units, kept_units)
    return max(per_step if need is None else min(per_step, need), 0)

  def reached(self, full_units: int, kept_units: int, flops_ratio: float,
              params_ratio: float) -> bool:
    """Whether a network with these kept units and cost ratios (pruned / unpruned) meets it."""
    if self.flops is not None:
      return 1.0 - flops_ratio >= self.flops - 1e-9
    if self.params is not None:
      return 1.0 - params_ratio >= self.params - 1e-9
    return self.units_to_remove(full_units, kept_units) <= 0

  def excess(self, flops_ratio: Callable[[Mapping[str, Any]], float],
             params_ratio: Callable[[Mapping[str, Any]], float]
             ) -> Optional[Callable[[Mapping[str, Any]], float]]:
    """``masks -> cost ratio - (1 - target)`` (> 0: not reached) for ``prune_lowest``, from
    ``masks -> ratio`` functions; None under a unit target."""
    if self.flops is not None:
      return lambda masks: flops_ratio(masks) - (1.0 - self.flops)
    if self.params is not None:
      return lambda masks: params_ratio(masks) - (1.0 - self.params)
    return None

  def describe(self) -> str:
    if self.flops is not None:
      return f'{self.flops:.0%} fewer FLOPs'
    if self.params is not None:
      return f'{self.params:.0%} fewer parameters'
    if self.keep_share is not None:
      return f'{self.keep_share:.0%} of the prunable units kept'
    return f'{self.units} units removed'
