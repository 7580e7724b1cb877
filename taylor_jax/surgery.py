"""Index surgery: rebuild a smaller network from masks, so a pruned network is really smaller.

Speaks in channel groups (:mod:`taylor_jax.groups`). Structure: a group's selection
(:class:`GroupSelection`) becomes one :class:`AxisSelection` per (array path, axis), and
:func:`apply_selections` applies those to any tree that mirrors the variables (params,
batch_stats, every parameter-shaped part of an optax state).

**Index selection** (the kept units, from masks; what every pruning step of every method does):
every (array, axis) slice of every group drops the positions of the removed units. An array
indexed by several groups (a conv kernel: input axis of one group, output axis of another; a
DenseNet consumer whose input axis is a concatenation of several groups) is gathered once per
axis with the union of all groups' kept positions. Optimizer state is gathered with the params.

Matrix selections (a projection ``M`` per group, Cascaded Projection) are built on these types by
:mod:`taylor_jax.projection`: an :class:`AxisSelection` may also contract an axis with a matrix
or set an array's new values, and :func:`apply_selections` / :func:`shrink_opt_state` /
:func:`rebuild_train_state` apply those too.

:func:`shrink_train_state` applies this to a whole :class:`~taylor_jax.train.TrainState`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

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
  """What survives of one group: an index selection or a projection matrix (exactly one).

  Attributes:
    units: sorted indices of the kept units; the shrunk group's unit ``j`` is old unit
      ``units[j]`` (order kept).
    projection: ``(width, new_width)`` matrix M; the shrunk group's unit ``j`` is
      ``sum_c M[c, j] * unit c`` (:mod:`taylor_jax.projection` applies it and says what is
      exact). May be a jax array (also a tracer: the surgery is differentiable in M).
    cov: optional ``(width, width)`` covariance of the group's pre-activations (BN output) for a
      matrix selection through a BatchNorm: makes the new running variance exact.
  """
  units: Any = None
  projection: Any = None
  cov: Any = None

  def __post_init__(self):
    if (self.units is None) == (self.projection is None):
      raise ValueError('a GroupSelection takes exactly one of units and projection')
    if self.projection is not None and len(np.shape(self.projection)) != 2:
      raise ValueError(f'projection must be (width, new_width), got {np.shape(self.projection)}')

  @property
  def is_index(self) -> bool:
    return self.units is not None

  @property
  def width(self) -> int:
    return int(np.size(self.units)) if self.is_index else int(np.shape(self.projection)[1])

  def matrix(self, old_width: int) -> Any:
    """The ``(width, old_width)`` selection matrix S (new = S @ old); ``projection.T`` for a
    matrix selection, one-hot rows at ``units`` for an index selection."""
    if not self.is_index:
      return self.projection.T
    return _one_hot(self.units, old_width).T

  def apply_vector(self, v: Any) -> Any:
    """A per-unit vector (scores, masks) of the group in the new units: the kept entries, or
    ``v @ projection``."""
    if self.is_index:
      return _take(v, self.units, 0)
    return v @ self.projection


@dataclasses.dataclass(frozen=True)
class AxisSelection:
  """What becomes of one axis of one array (exactly one field set).

  Attributes:
    positions: sorted kept positions (a gather).
    matrix: ``(old_len, new_len)``: the axis is contracted with it (``x -> x @ matrix`` there).
    values: the new array itself (the folded BatchNorm leaves of a matrix selection).
  """
  positions: Any = None
  matrix: Any = None
  values: Any = None

  @property
  def is_gather(self) -> bool:
    return self.positions is not None

  def new_len(self) -> int:
    if self.positions is not None:
      return int(np.size(self.positions))
    return int(np.shape(self.matrix if self.matrix is not None else self.values)[-1])

  def apply(self, x: Any, axis: int) -> Any:
    """Numpy in (and numpy selection) -> numpy out; otherwise jax (traceable)."""
    if self.positions is not None:
      return _take(x, self.positions, axis)
    xp = _xp(x, self.matrix, self.values)
    if self.values is not None:
      return xp.asarray(self.values, x.dtype)
    kw = {} if xp is np else {'precision': jax.lax.Precision.HIGHEST}
    y = xp.tensordot(x, xp.asarray(self.matrix).astype(x.dtype), ([axis], [0]), **kw)
    return xp.moveaxis(y, -1, axis)


def _xp(*arrays: Any):
  """numpy when every given array is a host (numpy) array or None, else jax.numpy: host surgery
  stays in numpy (fast, no compilation), jax arrays and tracers stay in jax (differentiable)."""
  host = all(a is None or isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays)
  return np if host else jnp


def _take(x: Any, idx: np.ndarray, axis: int) -> Any:
  """Gather with host (numpy) indices; numpy in -> numpy out, jax array in -> jax array out.

  A concrete jax array is gathered on the host: an eager ``jnp.take`` compiles one program per
  array shape, and surgery meets new shapes at every pruning step. Tracers stay in jax."""
  if isinstance(x, jax.core.Tracer):
    return jnp.take(x, jnp.asarray(idx), axis=axis)
  out = np.take(np.asarray(x), idx, axis=axis)
  return out if isinstance(x, np.ndarray) or np.isscalar(x) else jnp.asarray(out)


def group_selections(masks: Mapping[str, Any]) -> dict[str, GroupSelection]:
  """Group name -> its selection (the units whose mask is nonzero); raises on an emptied group."""
  out = {k: GroupSelection(u) for k, u in kept_units(masks).items()}
  empty = [k for k, g in out.items() if g.width == 0]
  if empty:
    raise ValueError(f'masks remove every unit of groups {empty}; a group needs >= 1 unit')
  return out


def _one_hot(units: np.ndarray, width: int) -> np.ndarray:
  """``(width, len(units))`` 0/1 matrix: column ``j`` picks unit ``units[j]``."""
  m = np.zeros((width, np.size(units)), np.float32)
  m[units, np.arange(np.size(units))] = 1.0
  return m


def gather_selections(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                      units: Mapping[str, np.ndarray]
                      ) -> dict[Path, tuple[tuple[int, AxisSelection], ...]]:
  """Array path -> ((axis, gather of the kept positions), ...) for every array of ``tree`` that
  a group of ``units`` (group name -> kept unit indices) slices."""
  out: dict[Path, list[tuple[int, AxisSelection]]] = {}
  for (path, axis), pos in slice_positions(groups, _shapes(tree), units).items():
    out.setdefault(path, []).append((axis, AxisSelection(pos)))
  return sort_axes(out)


def sort_axes(sels: Mapping[Path, Sequence[tuple[int, AxisSelection]]]
              ) -> dict[Path, tuple[tuple[int, AxisSelection], ...]]:
  """Each array's ``(axis, selection)`` pairs as a tuple sorted by axis."""
  return {k: tuple(sorted(v, key=lambda a: a[0])) for k, v in sels.items()}


def axis_selections(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                    masks: Mapping[str, Any]
                    ) -> dict[Path, tuple[tuple[int, AxisSelection], ...]]:
  """Array path -> ((axis, selection), ...) for every array of ``tree`` a group slices: every
  axis a gather of the positions of the units whose mask is nonzero. (Matrix selections:
  :func:`taylor_jax.projection.projection_axis_selections`.)"""
  group_selections(masks)  # validates (no emptied group)
  return gather_selections(groups, tree, kept_units(masks))


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
  """The variables (``{'params': ..., 'batch_stats': ...}``) with the masked units removed.
  (Matrix selections: :func:`taylor_jax.projection.shrink_variables_projected`.)"""
  return apply_selections(variables, axis_selections(groups, variables, masks))


def shrink_masks(masks: Mapping[str, Any]) -> dict[str, Any]:
  """Masks of the shrunk network: all ones, one entry per kept unit."""
  return {k: m[np.flatnonzero(np.asarray(m))] for k, m in masks.items()}


def _reset_leaf(x: Any, sels: tuple[tuple[int, AxisSelection], ...]) -> Any:
  """Zeros of the selected shape (optimizer state of an array a matrix selection touches)."""
  shape = list(np.shape(x))
  for axis, sel in sels:
    if sel.values is not None:
      shape = list(np.shape(sel.values))
    else:
      shape[axis] = sel.new_len()
  return (np.zeros if isinstance(x, np.ndarray) else jnp.zeros)(tuple(shape), x.dtype)


def _select_state_leaf(x: Any, sels: tuple[tuple[int, AxisSelection], ...]) -> Any:
  if all(sel.is_gather for _, sel in sels):
    return _select_leaf(x, sels)
  return _reset_leaf(x, sels)


def shrink_opt_state(tx: optax.GradientTransformation, opt_state: Any, params: Mapping[str, Any],
                     sels: Mapping[Path, tuple[tuple[int, AxisSelection], ...]]) -> Any:
  """Every parameter-shaped part of an optax state (momentum trace, Adam mu/nu, ...) shrunk.

  Uses :func:`optax.tree_map_params`: ``tx.init`` on a placeholder tells which parts of the
  state are copies of the parameter tree; everything else (counts, schedules' state) is kept.
  ``sels`` are keyed by variable paths (``('params', ...)``). Arrays that only gathers touch
  keep their state at the kept positions; arrays a matrix selection touches get zeros.
  """
  sel_tree = _selection_tree(params, sels, ('params',))
  # A part shaped unlike its parameter is not a per-element copy of it: Adafactor's (1,)
  # placeholders stay as they are; its factored row/column moments (averages over units that
  # are removed) cannot be shrunk exactly and fail the check below.
  new = optax.tree_map_params(
      tx, lambda x, s, p: _select_state_leaf(x, s.sels) if np.shape(x) == np.shape(p) else x,
      opt_state, sel_tree, params, transform_non_params=lambda x: x)
  # Check against what ``tx.init`` makes for the shrunk params: a parameter-shaped part of the
  # state that tree_map_params did not recognise would keep its old shape.
  new_params = apply_selections({'params': params}, sels)['params']
  want_tree = jax.eval_shape(tx.init, new_params)
  want = jax.tree.map(lambda a: tuple(a.shape), want_tree)
  got = jax.tree.map(lambda a: tuple(np.shape(a)), new)
  if want != got:
    wrong = [(jax.tree_util.keystr(k), np.shape(g), tuple(w.shape)) for (k, g), w in zip(
        jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(want_tree))
        if np.shape(g) != tuple(w.shape)]
    raise ValueError(
        f'the shrunk optimizer state does not match tx.init of the shrunk params '
        f'({len(wrong)} part(s), e.g. {wrong[:2]}: path, shape kept, shape needed). Either '
        f'opt_state is not the state of this tx, or it holds statistics shared across units '
        f'(e.g. Adafactor\'s factored moments), which no selection makes exact: use an optimizer '
        f'with per-element state (SGD, Adam, Lion, ...), or prune without it '
        f'(Pruner.step(..., opt_state=None)) and start a new one with tx.init(new params).')
  return new


def rebuild_train_state(state, model, tx: optax.GradientTransformation, widths: Mapping[str, int],
                        sels: Mapping[Path, tuple[tuple[int, AxisSelection], ...]], *,
                        masks: Mapping[str, Any], scores: Callable[[Mapping[str, Any]], Any]):
  """``(model.clone(widths=widths), state)`` with ``sels`` applied to params, batch_stats and the
  optimizer state, ``masks`` as the new masks and ``scores`` (a function of a group -> vector
  dict) applied to ``score_sum`` / ``score_ema``; everything else of the state is kept."""
  new_vars = apply_selections({'params': state.params, 'batch_stats': state.batch_stats}, sels)
  new_state = state.replace(
      params=new_vars['params'], batch_stats=new_vars['batch_stats'],
      opt_state=shrink_opt_state(tx, state.opt_state, state.params, sels),
      masks=masks, score_sum=scores(state.score_sum), score_ema=scores(state.score_ema))
  return model.clone(widths=widths), new_state


def shrink_train_state(state, model, tx: optax.GradientTransformation):
  """Physically removes the masked units of a :class:`~taylor_jax.train.TrainState`.

  Returns ``(new_model, new_state)``: ``new_model`` is ``model.clone(widths=new_widths(...))``;
  params, batch_stats and the parameter-shaped parts of the optimizer state keep only the kept
  positions; masks become all ones of the new widths; ``score_sum`` / ``score_ema`` keep the
  kept units' entries; ``step``, ``score_count``, ``prune_steps`` and the optimizer's other state
  are unchanged. Works on host (numpy) and on (replicated) jax arrays: indices are numpy, the
  results are ordinary arrays that the caller places again (e.g. ``train.replicate``).
  (Matrix selections: :func:`taylor_jax.projection.shrink_train_state_projected`.)

  Raises:
    ValueError: when a mask removes every unit of a group.
  """
  masks = jax.device_get(state.masks)
  widths = new_widths(model.widths, masks)
  gsel = group_selections(masks)
  sels = axis_selections(tuple(model.groups()),
                         {'params': state.params, 'batch_stats': state.batch_stats}, masks)
  scores = lambda tree: {k: gsel[k].apply_vector(v) if k in gsel else v for k, v in tree.items()}
  return rebuild_train_state(state, model, tx, widths, sels, masks=shrink_masks(state.masks),
                             scores=scores)
