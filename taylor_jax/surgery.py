"""Surgery: rebuild a smaller network from masks or selection matrices, so a pruned (or
projected) network is really smaller.

Speaks in channel groups (:mod:`taylor_jax.groups`). Structure: a group's selection
(:class:`GroupSelection`) becomes one :class:`AxisSelection` per (array path, axis), and
:func:`apply_selections` applies those to any tree that mirrors the variables (params,
batch_stats, every parameter-shaped part of an optax state).

**Index selection** (the kept units, from masks): every (array, axis) slice of every group drops
the positions of the removed units. An array indexed by several groups (a conv kernel: input axis
of one group, output axis of another; a DenseNet consumer whose input axis is a concatenation of
several groups) is gathered once per axis with the union of all groups' kept positions.

**Matrix selection** (``projection`` M of shape ``(width, new_width)``; an index selection is the
special case of 0/1 columns ``M[units[j], j] = 1``): new unit ``j`` is the combination
``sum_c M[c, j] * unit c``. Each slice is contracted with a matrix along its axis
(``x -> x @ M`` on that axis, the block matrix assembled from the slices' positions when several
groups share the axis):

* consumer slices (role ``in``): with M, i.e. ``W' = M^T W`` on the input axis: a consumer reads
  the ``new_width`` new activations ``a'`` exactly as the old consumer reads ``a' M^T``;
* producer slices (role ``out``: kernel output axis, bias): with M when the group has no norm;
  with a BatchNorm between producer and nonlinearity (the zoo's conv -> BN -> ReLU -> conv
  ``channel`` groups) the BN is folded through (:func:`fold_norm`): the producer gets
  ``A = diag(s) M diag(1 / s')`` (``s = gamma / sqrt(var + eps)``, ``s'`` the new units' scales)
  and the new BN's scale/bias/mean/var are computed, not selected.

What is exact (eval mode, any M): the group's new pre-activations (after the new BN) are
``u @ M``, ``u`` the old pre-activations; a consumer's output given its input. What is not: the
nonlinearity (and a pooling between producer and consumer) acts on ``u @ M`` instead of ``u``;
``relu(u @ M) != relu(u) @ M`` unless M's columns are 0/1 selections of distinct units, so a
general matrix selection gives a smaller network of the same architecture that approximates the
old one (Cascaded Projection trains M for it). Train-mode BN normalises the new channels with
their batch statistics; the new running statistics are the projected channels' mean (exact) and
variance (exact with ``cov``, the old pre-activations' covariance; otherwise channels are taken
as uncorrelated), so train and eval mode agree as they did before.

Optimizer state: gathered with the params for index-selected arrays; every array a matrix
selection touches (producer kernel/bias, BN leaves, consumer kernel) gets its parameter-shaped
state RESET to zeros (what ``tx.init`` gives for momentum and Adam moments): a momentum could be
contracted with M, a second moment cannot, and the folded BN leaves are not linear in the old.

Matrix selections are refused for ``residual`` and ``concat`` groups (an identity shortcut or a
concatenation reads the channels without weights a matrix could be folded into) and for a group
with more than one producer or BatchNorm.

:func:`shrink_train_state` applies this to a whole :class:`~taylor_jax.train.TrainState`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylor_jax.groups import ChannelGroup, Path, get_path, slice_positions


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


# Epsilon of the zoo's BatchNorm (models.common.BN_EPSILON; a test checks they agree). Not
# imported: the models package imports every model module.
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class GroupSelection:
  """What survives of one group: an index selection or a projection matrix (exactly one).

  Attributes:
    units: sorted indices of the kept units; the shrunk group's unit ``j`` is old unit
      ``units[j]`` (order kept).
    projection: ``(width, new_width)`` matrix M; the shrunk group's unit ``j`` is
      ``sum_c M[c, j] * unit c`` (see the module doc for what is exact). May be a jax array
      (also a tracer: the surgery is differentiable in M).
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
    m = np.zeros((self.width, old_width), np.float32)
    m[np.arange(self.width), self.units] = 1.0
    return m

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


def selection_widths(widths: Mapping[str, int],
                     selections: Mapping[str, GroupSelection]) -> dict[str, int]:
  """Widths after the selections (groups without one keep their width)."""
  out = {k: selections[k].width if k in selections else int(w) for k, w in widths.items()}
  empty = [k for k, w in out.items() if w == 0]
  if empty:
    raise ValueError(f'selections remove every unit of groups {empty}; a group needs >= 1 unit')
  return out


def fold_norm(projection: Any, scale: Any, bias: Any, mean: Any, var: Any, cov: Any = None,
              eps: float = BN_EPSILON) -> tuple[Any, dict[str, Any]]:
  """A matrix selection through ``producer -> BN``: the producer's matrix and the new BN.

  With ``s = scale / sqrt(var + eps)`` (old BN, eval: ``u = (y - mean) s + bias``) and M the
  ``(C, r)`` projection, the new producer outputs are ``y' = y A``, ``A = diag(s) M diag(1/s')``,
  and the new BN gives ``(y' - mean') s' + bias' = u M`` exactly for any M and any nonzero
  ``s'``. Choices (all reduce to the old unit's values for a 0/1 column):
  ``s'_j = sum_c M_cj^2 s_c / sum_c M_cj^2`` (floored at a tenth of the RMS to stay away from
  0 when signs cancel); ``mean' = mean A`` (the mean of ``y'``); ``var'`` = the variance of
  ``y'`` (``diag(M^T cov M) / s'^2`` with ``cov`` of u, else ``sum_c M_cj^2 s_c^2 var_c / s'^2``:
  channels uncorrelated); ``scale' = s' sqrt(var' + eps)``; ``bias' = bias M``.

  Returns:
    ``(A, {'scale', 'bias', 'mean', 'var'})``: numpy for numpy inputs, else jax arrays
    (differentiable in M).
  """
  xp = _xp(projection, scale, bias, mean, var, cov)
  m = xp.asarray(projection)
  if m.dtype.kind != 'f':
    m = m.astype(np.float32)
  scale, bias, mean, var = (xp.asarray(a, m.dtype) for a in (scale, bias, mean, var))
  # Contractions over c as elementwise sums, not matmuls: exact (0/1 columns reproduce the old
  # values bit for bit) and free of reduced-precision GPU matmuls.
  dot = lambda v, mat: xp.sum(v[:, None] * mat, 0)
  s = scale / xp.sqrt(var + eps)
  w2 = m * m
  n = xp.maximum(xp.sum(w2, 0), 1e-30)
  s_mean = dot(s, w2) / n
  floor = xp.maximum(0.1 * xp.sqrt(dot(s * s, w2) / n), 1e-12)
  s_new = xp.where(xp.abs(s_mean) >= floor, s_mean, floor).astype(m.dtype)
  ratio = _ratio(xp, s[:, None], s_new[None, :])  # (C, r); 1 where a 0/1 column picks unit c
  a = m * ratio
  if cov is None:
    var_new = xp.sum(w2 * var[:, None] * ratio * ratio, 0)
  else:
    c = xp.asarray(cov, m.dtype)
    var_new = xp.sum(m * xp.sum(c[:, :, None] * m[None, :, :], 1), 0) / (s_new * s_new)
  root = xp.sqrt(var_new + eps)
  # scale' = s' * root, written as sum_c M_cj^2 scale_c root_j / sqrt(var_c + eps) / n_j where s'
  # is not floored, so a 0/1 column gives back scale_c itself, not a rounding of it.
  scale_new = xp.where(s_new == s_mean,
                       dot(scale, w2 * _ratio(xp, root[None, :], xp.sqrt(var + eps)[:, None])) / n,
                       s_new * root)
  return a, {'scale': scale_new, 'bias': dot(bias, m), 'mean': dot(mean, a), 'var': var_new}


def _ratio(xp, x: Any, y: Any) -> Any:
  """``x / y`` (broadcast), exactly 1 where ``x == y`` (XLA's CPU broadcast division can be off
  by an ulp there), with the gradient of ``x / y`` everywhere."""
  r = x / y
  if xp is np:
    return np.where(x == y, np.ones_like(r), r)
  # Sterbenz: 1 - r is exact for r near 1, so r + (1 - r) is exactly 1.
  return r + jax.lax.stop_gradient(jnp.where(x == y, jnp.ones_like(r), r) - r)


def _full_selections(groups: Sequence[ChannelGroup],
                     selections: Mapping[str, GroupSelection]) -> dict[str, GroupSelection]:
  """Every group's selection: the given ones, the identity index selection for the others."""
  unknown = set(selections) - {g.name for g in groups}
  if unknown:
    raise ValueError(f'selections for unknown groups {sorted(unknown)}')
  return {g.name: selections.get(g.name, GroupSelection(np.arange(g.width))) for g in groups}


def _module(path: Path) -> Path:
  return path[1:-1]


def _check_matrix_group(g: ChannelGroup, sel: GroupSelection) -> None:
  """Raises unless a matrix selection of group ``g`` has a well-defined surgery (module doc)."""
  if g.kind not in ('channel', 'neuron'):
    raise ValueError(f'group {g.name!r} (kind {g.kind!r}): matrix selections are for channel / '
                     'neuron groups (a residual add or a concatenation has no weights to fold '
                     'a projection into)')
  if np.shape(sel.projection)[0] != g.width:
    raise ValueError(f'group {g.name!r}: projection of shape {np.shape(sel.projection)}, '
                     f'expected ({g.width}, new_width)')
  for role in ('out', 'norm'):
    ss = [s for s in g.slices if s.role == role]
    if len({_module(s.path) for s in ss}) > 1 or any(s.offset or s.repeat != 1 for s in ss):
      raise ValueError(f'group {g.name!r}: a matrix selection needs one producer and at most one '
                       f'BatchNorm (whole axes); its {role!r} slices are '
                       f'{[("/".join(s.path), s.offset, s.repeat) for s in ss]}')
  norm_leaves = sorted(s.path[-1] for s in g.slices if s.role == 'norm')
  if norm_leaves and norm_leaves != ['bias', 'mean', 'scale', 'var']:
    raise ValueError(f'group {g.name!r}: cannot fold a norm with leaves {norm_leaves}')


def _group_matrices(g: ChannelGroup, sel: GroupSelection, tree: Mapping[str, Any],
                    eps: float) -> tuple[dict[str, Any], dict[Path, Any]]:
  """Role -> matrix for the slices of a matrix-selected group, and the new norm leaves."""
  _check_matrix_group(g, sel)
  m = sel.projection
  norm = {s.path[-1]: s.path for s in g.slices if s.role == 'norm'}
  if not norm:
    return {'out': m, 'in': m}, {}
  try:
    leaves = {k: get_path(tree, p) for k, p in norm.items()}
  except (KeyError, TypeError) as e:
    raise ValueError(f'group {g.name!r}: folding its BatchNorm needs {sorted(norm.values())} '
                     '(pass the variables with params and batch_stats)') from e
  a, new = fold_norm(m, leaves['scale'], leaves['bias'], leaves['mean'], leaves['var'], sel.cov,
                     eps)
  return {'out': a, 'in': m}, {norm[k]: new[k] for k in norm}


def _axis_matrix(entries: Sequence[tuple[Any, Any]], old_len: int) -> Any:
  """``(old_len, new_len)`` block matrix of one axis from ``(slice, (width, new) matrix)``
  entries: the new axis lays the groups out by offset (and by spatial position for a flattened
  axis), the order an index selection's sorted positions give."""
  reps = {s.repeat for s, _ in entries}
  if len(reps) != 1:
    raise ValueError(f'slices of one axis disagree on repeat: {sorted(reps)}')
  rep = reps.pop()
  stride = old_len // rep
  entries = sorted(entries, key=lambda e: e[0].offset)
  new_stride = sum(int(np.shape(mat)[1]) for _, mat in entries)
  xp = _xp(*[mat for _, mat in entries])
  dtype = xp.result_type(*[mat for _, mat in entries])
  big = xp.zeros((old_len, rep * new_stride), dtype)
  new_off = 0
  for s, mat in entries:
    w, r = np.shape(mat)
    rows = (np.arange(rep)[:, None] * stride + s.offset + np.arange(w))[:, :, None]
    cols = (np.arange(rep)[:, None] * new_stride + new_off + np.arange(r))[:, None, :]
    block = xp.broadcast_to(xp.asarray(mat, dtype), (rep, w, r))
    if xp is np:
      big[rows, cols] = block
    else:
      big = big.at[rows, cols].set(block)
    new_off += r
  return big


def _one_hot(units: np.ndarray, width: int) -> np.ndarray:
  m = np.zeros((width, np.size(units)), np.float32)
  m[units, np.arange(np.size(units))] = 1.0
  return m


def _matrix_axis_selections(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                            gsel: Mapping[str, GroupSelection], eps: float
                            ) -> dict[Path, list[tuple[int, AxisSelection]]]:
  """Axis selections when some group has a matrix selection: axes that only index selections
  touch stay gathers; the others are contracted with a block matrix; folded BN leaves are set."""
  shapes = _shapes(tree)
  per_axis: dict[tuple[Path, int], list] = {}
  values: dict[Path, Any] = {}
  for g in groups:
    sel = gsel[g.name]
    mats = None if sel.is_index else _group_matrices(g, sel, tree, eps)
    if mats is not None:
      values.update(mats[1])
    for s in g.slices:
      if s.path not in shapes:
        continue
      axis = s.axis % len(shapes[s.path])
      if mats is not None and s.path in mats[1]:
        continue
      per_axis.setdefault((s.path, axis), []).append((g, s, None if mats is None else
                                                      mats[0]['in' if s.role == 'in' else 'out']))
  out: dict[Path, list[tuple[int, AxisSelection]]] = {}
  for (path, axis), entries in per_axis.items():
    n = shapes[path][axis]
    if all(mat is None for _, _, mat in entries):
      pos = np.sort(np.concatenate([s.positions(gsel[g.name].units, n) for g, s, _ in entries]))
      sel = AxisSelection(positions=pos)
    else:
      sel = AxisSelection(matrix=_axis_matrix(
          [(s, _one_hot(gsel[g.name].units, g.width) if mat is None else mat)
           for g, s, mat in entries], n))
    out.setdefault(path, []).append((axis, sel))
  for path, v in values.items():
    if path in shapes:
      out.setdefault(path, []).append((0, AxisSelection(values=v)))
  return out


def axis_selections(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                    masks: Mapping[str, Any] = None, *,
                    selections: Mapping[str, GroupSelection] = None,
                    norm_epsilon: float = BN_EPSILON
                    ) -> dict[Path, tuple[tuple[int, AxisSelection], ...]]:
  """Array path -> ((axis, selection), ...) for every array of ``tree`` a group slices.

  Give ``masks`` (index selections of the nonzero units) or ``selections`` (group ->
  :class:`GroupSelection`; groups without one are kept whole). Only index selections: every
  axis is a gather of the kept positions. ``norm_epsilon``: the BatchNorm epsilon used to fold
  a matrix selection through a BN.
  """
  if selections is None:
    group_selections(masks)  # validates (no emptied group)
    out: dict[Path, list[tuple[int, AxisSelection]]] = {}
    for (path, axis), pos in keep_positions(groups, tree, masks).items():
      out.setdefault(path, []).append((axis, AxisSelection(pos)))
  else:
    gsel = _full_selections(groups, selections)
    selection_widths({g.name: g.width for g in groups}, gsel)  # validates (no emptied group)
    if all(s.is_index for s in gsel.values()):
      units = {k: np.asarray(s.units) for k, s in gsel.items()}
      out = {}
      for (path, axis), pos in slice_positions(groups, _shapes(tree), units).items():
        out.setdefault(path, []).append((axis, AxisSelection(pos)))
    else:
      out = _matrix_axis_selections(groups, tree, gsel, norm_epsilon)
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
                     masks: Mapping[str, Any] = None, *,
                     selections: Mapping[str, GroupSelection] = None) -> dict[str, Any]:
  """The variables (``{'params': ..., 'batch_stats': ...}``) with the masked units removed, or
  with ``selections`` applied (see :func:`axis_selections`)."""
  return apply_selections(variables,
                          axis_selections(groups, variables, masks, selections=selections))


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
  new = optax.tree_map_params(tx, lambda x, s: _select_state_leaf(x, s.sels), opt_state, sel_tree,
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


def _selections_with_masks(groups: Sequence[ChannelGroup], selections: Mapping[str, GroupSelection],
                           masks: Mapping[str, Any]) -> dict[str, GroupSelection]:
  """Every group's selection: the given ones (a matrix selection folds its mask in:
  ``diag(mask) M``, as the gate multiplies the pre-activations M acts on), the masks' kept units
  for the others."""
  out = group_selections({k: m for k, m in masks.items() if k not in selections})
  for k, sel in selections.items():
    if not sel.is_index and k in masks:
      mask = np.asarray(masks[k], np.float32)
      if not np.all(mask == 1):
        sel = dataclasses.replace(sel, projection=mask[:, None] * sel.projection)
    out[k] = sel
  return _full_selections(groups, out)


def shrink_train_state(state, model, tx: optax.GradientTransformation,
                       selections: Mapping[str, GroupSelection] = None):
  """Physically removes the masked units of a :class:`~taylor_jax.train.TrainState`.

  Returns ``(new_model, new_state)``: ``new_model`` is ``model.clone(widths=new_widths(...))``;
  params, batch_stats and the parameter-shaped parts of the optimizer state keep only the kept
  positions; masks become all ones of the new widths; ``score_sum`` / ``score_ema`` keep the
  kept units' entries; ``step``, ``score_count``, ``prune_steps`` and the optimizer's other state
  are unchanged. Works on host (numpy) and on (replicated) jax arrays: indices are numpy, the
  results are ordinary arrays that the caller places again (e.g. ``train.replicate``).

  With ``selections`` (group -> :class:`GroupSelection`), those groups are shrunk by them
  instead (the others by their masks); a matrix-selected group gets all-ones masks, zero
  scores and a reset optimizer state on the arrays it touches (module doc).

  Raises:
    ValueError: when a mask removes every unit of a group.
  """
  masks = jax.device_get(state.masks)
  groups = tuple(model.groups())
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if selections is None:
    widths = new_widths(model.widths, masks)
    gsel = group_selections(masks)
    sels = axis_selections(groups, variables, masks)
  else:
    gsel = _selections_with_masks(groups, selections, masks)
    widths = selection_widths(model.widths, gsel)
    sels = axis_selections(groups, variables, selections=gsel)
  new_vars = apply_selections(variables, sels)

  def per_unit(tree, fill):
    out = {}
    for k, v in tree.items():
      if k not in gsel:
        out[k] = v
      elif gsel[k].is_index:
        out[k] = gsel[k].apply_vector(v)
      else:
        out[k] = fill(gsel[k].width, v)
    return out

  ones = lambda n, v: (np.ones if isinstance(v, np.ndarray) else jnp.ones)((n,), v.dtype)
  zeros = lambda n, v: (np.zeros if isinstance(v, np.ndarray) else jnp.zeros)((n,), v.dtype)
  new_state = state.replace(
      params=new_vars['params'], batch_stats=new_vars['batch_stats'],
      opt_state=shrink_opt_state(tx, state.opt_state, state.params, sels),
      masks=shrink_masks(state.masks) if selections is None else per_unit(state.masks, ones),
      score_sum=per_unit(state.score_sum, zeros), score_ema=per_unit(state.score_ema, zeros))
  return model.clone(widths=widths), new_state
