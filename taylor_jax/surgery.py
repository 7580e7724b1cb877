"""Surgery: rebuild a smaller network from masks, so a pruned network is really smaller.

Speaks in channel groups (:mod:`taylor_jax.groups`): for every group, the kept units are the
nonzero entries of its mask; every (array, axis) slice of every group drops the positions of
the removed units. An array indexed by several groups (a conv kernel: input axis of one group,
output axis of another; a DenseNet consumer whose input axis is a concatenation of several
groups) is gathered once per axis with the union of all groups' kept positions.

Structure: a group's selection (:class:`GroupSelection`, today the kept unit indices) becomes one
:class:`AxisSelection` per (array path, axis) (today a gather of the kept positions), and
:func:`apply_selections` applies those to any tree that mirrors the variables (params,
batch_stats, every parameter-shaped part of an optax state). A per-group *selection matrix*
(``new_width x width``, e.g. merging units instead of dropping them) fits the same structure: a
:class:`GroupSelection` with a matrix becomes an :class:`AxisSelection` whose ``apply`` is a
``tensordot`` with the block matrix assembled from the slices' positions; index selection is the
special case of one-hot rows, implemented as a gather because it is exact and cheap.

:func:`shrink_train_state` applies this to a whole :class:`~taylor_jax.train.TrainState`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylor_jax.groups import ChannelGroup, Path, slice_positions


def kept_units(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Group name -> sorted indices of the units whose mask is nonzero."""
  return {k: np.flatnonzero(np.asarray(m)) for k, m in masks.items()}


def new_widths(widths: Mapping[str, int], masks: Mapping[str, Any]) -> dict[str, int]:
  kept = kept_units(masks)
  out = {k: int(kept[k].size) if k in kept else int(w) for k, w in widths.items()}
  empty = [k for k, w in out.items() if w == 0]
  if empty:
    raise ValueError(f'masks remove every unit of groups {empty}; a group needs >= 1 unit')
  return out


def _shapes(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, tuple[int, ...]]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_shapes(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(v.shape)
  return out


def keep_positions(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                   masks: Mapping[str, Any]) -> dict[tuple[Path, int], np.ndarray]:
  """Per (array path, axis) of ``tree``: the positions to keep."""
  return slice_positions(groups, _shapes(tree), kept_units(masks))


@dataclasses.dataclass(frozen=True)
class GroupSelection:
  """What survives of one group: ``units`` (sorted indices of the kept units).

  The shrunk group's unit ``j`` is the old unit ``units[j]`` (order kept). A future per-group
  selection matrix ``(new_width, width)`` generalises this (rows one-hot at ``units`` here).
  """
  units: np.ndarray

  @property
  def width(self) -> int:
    return int(self.units.size)

  def matrix(self, old_width: int) -> np.ndarray:
    """The ``(width, old_width)`` selection matrix this selection is a special case of."""
    m = np.zeros((self.width, old_width), np.float32)
    m[np.arange(self.width), self.units] = 1.0
    return m

  def apply_vector(self, v: Any) -> Any:
    """Selects the kept entries of a per-unit vector (scores, masks) of the group."""
    return _take(v, self.units, 0)


@dataclasses.dataclass(frozen=True)
class AxisSelection:
  """What survives along one axis of one array: the sorted kept ``positions``."""
  positions: np.ndarray

  def apply(self, x: Any, axis: int) -> Any:
    return _take(x, self.positions, axis)


def _take(x: Any, idx: np.ndarray, axis: int) -> Any:
  """Gather with host (numpy) indices; numpy in -> numpy out, jax array in -> jax array out."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np.take(x, idx, axis=axis)
  return jnp.take(x, jnp.asarray(idx), axis=axis)


def group_selections(masks: Mapping[str, Any]) -> dict[str, GroupSelection]:
  """Group name -> its selection (the units whose mask is nonzero); raises on an emptied group."""
  out = {k: GroupSelection(u) for k, u in kept_units(masks).items()}
  empty = [k for k, g in out.items() if g.width == 0]
  if empty:
    raise ValueError(f'masks remove every unit of groups {empty}; a group needs >= 1 unit')
  return out


def axis_selections(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                    masks: Mapping[str, Any]) -> dict[Path, tuple[tuple[int, AxisSelection], ...]]:
  """Array path -> ((axis, selection), ...) for every array of ``tree`` a group slices."""
  group_selections(masks)  # validates (no emptied group)
  out: dict[Path, list[tuple[int, AxisSelection]]] = {}
  for (path, axis), pos in keep_positions(groups, tree, masks).items():
    out.setdefault(path, []).append((axis, AxisSelection(pos)))
  return {k: tuple(sorted(v, key=lambda a: a[0])) for k, v in out.items()}


def _select_leaf(x: Any, sels: tuple[tuple[int, AxisSelection], ...]) -> Any:
  for axis, sel in sels:
    x = sel.apply(x, axis)
  return x


def apply_selections(tree: Mapping[str, Any],
                     sels: Mapping[Path, tuple[tuple[int, AxisSelection], ...]],
                     prefix: Path = ()) -> dict[str, Any]:
  """``tree`` (nested mappings of arrays, paths as in ``sels``) with every selection applied."""
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, Mapping):
      out[k] = apply_selections(v, sels, path)
    else:
      out[k] = _select_leaf(v, sels.get(path, ()))
  return out


def _selection_tree(tree: Mapping[str, Any], sels: Mapping[Path, Any], prefix: Path) -> dict:
  """A tree shaped like ``tree`` whose leaves are the selections of the corresponding arrays
  (looked up under ``prefix + path``), for ``jax.tree.map`` over parameter-shaped trees."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out[k] = _selection_tree(v, sels, prefix + (k,))
    else:
      out[k] = _LeafSelection(sels.get(prefix + (k,), ()))
  return out


class _LeafSelection:
  """An opaque pytree leaf holding one array's selections."""
  __slots__ = ('sels',)

  def __init__(self, sels):
    self.sels = sels


def shrink_variables(groups: Sequence[ChannelGroup], variables: Mapping[str, Any],
                     masks: Mapping[str, Any]) -> dict[str, Any]:
  """The variables (``{'params': ..., 'batch_stats': ...}``) with the masked units removed."""
  return apply_selections(variables, axis_selections(groups, variables, masks))


def shrink_masks(masks: Mapping[str, Any]) -> dict[str, Any]:
  """Masks of the shrunk network: all ones, one entry per kept unit."""
  return {k: m[np.flatnonzero(np.asarray(m))] for k, m in masks.items()}


def shrink_opt_state(tx: optax.GradientTransformation, opt_state: Any, params: Mapping[str, Any],
                     sels: Mapping[Path, tuple[tuple[int, AxisSelection], ...]]) -> Any:
  """Every parameter-shaped part of an optax state (momentum trace, Adam mu/nu, ...) shrunk.

  Uses :func:`optax.tree_map_params`: ``tx.init`` on a placeholder tells which parts of the
  state are copies of the parameter tree; everything else (counts, schedules' state) is kept.
  ``sels`` are keyed by variable paths (``('params', ...)``).
  """
  sel_tree = _selection_tree(params, sels, ('params',))
  new = optax.tree_map_params(tx, lambda x, s: _select_leaf(x, s.sels), opt_state, sel_tree,
                              transform_non_params=lambda x: x)
  # Check against what ``tx.init`` makes for the shrunk params: a parameter-shaped part of the
  # state that tree_map_params did not recognise would keep its old shape.
  new_params = apply_selections({'params': params}, sels)['params']
  want = jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(tx.init, new_params))
  got = jax.tree.map(lambda a: tuple(np.shape(a)), new)
  if want != got:
    raise ValueError('the shrunk optimizer state does not match tx.init of the shrunk params; '
                     'is opt_state the state of this tx?')
  return new


def shrink_train_state(state, model, tx: optax.GradientTransformation):
  """Physically removes the masked units of a :class:`~taylor_jax.train.TrainState`.

  Returns ``(new_model, new_state)``: ``new_model`` is ``model.clone(widths=new_widths(...))``;
  params, batch_stats and the parameter-shaped parts of the optimizer state keep only the kept
  positions; masks become all ones of the new widths; ``score_sum`` / ``score_ema`` keep the
  kept units' entries; ``step``, ``score_count``, ``prune_steps`` and the optimizer's other state
  are unchanged. Works on host (numpy) and on (replicated) jax arrays: indices are numpy, the
  results are ordinary arrays that the caller places again (e.g. ``train.replicate``).

  Raises:
    ValueError: when a mask removes every unit of a group.
  """
  masks = jax.device_get(state.masks)
  widths = new_widths(model.widths, masks)
  gsel = group_selections(masks)
  groups = tuple(model.groups())
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  sels = axis_selections(groups, variables, masks)
  new_vars = apply_selections(variables, sels)

  def per_unit(tree):
    return {k: gsel[k].apply_vector(v) if k in gsel else v for k, v in tree.items()}

  new_state = state.replace(
      params=new_vars['params'], batch_stats=new_vars['batch_stats'],
      opt_state=shrink_opt_state(tx, state.opt_state, state.params, sels),
      masks=shrink_masks(state.masks),
      score_sum=per_unit(state.score_sum), score_ema=per_unit(state.score_ema))
  return model.clone(widths=widths), new_state
