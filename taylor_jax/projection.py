"""Projection surgery: rebuild a smaller network from selection matrices (Cascaded Projection).

Built on the index surgery of :mod:`taylor_jax.surgery` (its :class:`~taylor_jax.surgery.
GroupSelection`, :class:`~taylor_jax.surgery.AxisSelection` and :func:`~taylor_jax.surgery.
apply_selections`); this module adds what a matrix selection needs.

**Matrix selection** (``projection`` M of shape ``(width, new_width)``; an index selection is the
special case of 0/1 columns ``M[units[j], j] = 1``): new unit ``j`` is the combination
``sum_c M[c, j] * unit c``. Each slice is contracted with a matrix along its axis
(``x -> x @ M`` on that axis, the block matrix assembled from the slices' positions when several
groups share the axis; axes that only index selections touch stay gathers):

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

:func:`projection_axis_selections`, :func:`shrink_variables_projected` and
:func:`shrink_train_state_projected` are the index surgery's ``axis_selections``,
``shrink_variables`` and ``shrink_train_state`` with ``selections`` (group ->
:class:`~taylor_jax.surgery.GroupSelection`, index or matrix) in place of masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylor_jax.groups import ChannelGroup, Path, get_path
from taylor_jax.surgery import (AxisSelection, GroupSelection, _one_hot, _shapes, _xp,
                                apply_selections, gather_selections, group_selections,
                                rebuild_train_state, sort_axes)

# Epsilon of the zoo's BatchNorm (models.common.BN_EPSILON; a test checks they agree). Not
# imported: the models package imports every model module.
BN_EPSILON = 1e-5



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
  entries = sorted(entries, key=lambda e: e[0].offset)
  new_len = rep * sum(int(np.shape(mat)[1]) for _, mat in entries)
  xp = _xp(*[mat for _, mat in entries])
  dtype = xp.result_type(*[mat for _, mat in entries])
  big = xp.zeros((old_len, new_len), dtype)
  new_off = 0
  for s, mat in entries:
    w, r = np.shape(mat)
    rows = s.positions(np.arange(w), old_len).reshape(rep, w)[:, :, None]
    new_slice = dataclasses.replace(s, offset=new_off)  # the group's place in the new axis
    cols = new_slice.positions(np.arange(r), new_len).reshape(rep, r)[:, None, :]
    block = xp.broadcast_to(xp.asarray(mat, dtype), (rep, w, r))
    if xp is np:
      big[rows, cols] = block
    else:
      big = big.at[rows, cols].set(block)
    new_off += r
  return big


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


def projection_axis_selections(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
                               selections: Mapping[str, GroupSelection], *,
                               norm_epsilon: float = BN_EPSILON
                               ) -> dict[Path, tuple[tuple[int, AxisSelection], ...]]:
  """Array path -> ((axis, selection), ...) for every array of ``tree`` a group slices.

  ``selections``: group -> :class:`~taylor_jax.surgery.GroupSelection` (index or matrix; groups
  without one are kept whole). Only index selections: every axis is a gather of the kept
  positions, as :func:`taylor_jax.surgery.axis_selections`. ``norm_epsilon``: the BatchNorm
  epsilon used to fold a matrix selection through a BN.
  """
  gsel = _full_selections(groups, selections)
  selection_widths({g.name: g.width for g in groups}, gsel)  # validates (no emptied group)
  if all(s.is_index for s in gsel.values()):
    return gather_selections(groups, tree, {k: np.asarray(s.units) for k, s in gsel.items()})
  return sort_axes(_matrix_axis_selections(groups, tree, gsel, norm_epsilon))


def shrink_variables_projected(groups: Sequence[ChannelGroup], variables: Mapping[str, Any],
                               selections: Mapping[str, GroupSelection]) -> dict[str, Any]:
  """The variables (``{'params': ..., 'batch_stats': ...}``) with ``selections`` applied (see
  :func:`projection_axis_selections`)."""
  return apply_selections(variables, projection_axis_selections(groups, variables, selections))


def shrink_train_state_projected(state, model, tx: optax.GradientTransformation,
                                 selections: Mapping[str, GroupSelection]):
  """:func:`taylor_jax.surgery.shrink_train_state` with ``selections`` (group ->
  :class:`~taylor_jax.surgery.GroupSelection`): those groups are shrunk by them, the others by
  their masks. A matrix-selected group gets all-ones masks, zero scores and a reset optimizer
  state on the arrays it touches (module doc); an index-selected one keeps its kept units'
  mask and score entries.

  Returns ``(new_model, new_state)``.

  Raises:
    ValueError: when a mask or selection removes every unit of a group.
  """
  masks = jax.device_get(state.masks)
  groups = tuple(model.groups())
  gsel = _selections_with_masks(groups, selections, masks)
  widths = selection_widths(model.widths, gsel)
  sels = projection_axis_selections(
      groups, {'params': state.params, 'batch_stats': state.batch_stats}, gsel)

  def per_unit(fill):
    def one(k, v):
      if k not in gsel:
        return v
      if gsel[k].is_index:
        return gsel[k].apply_vector(v)
      return (np.full if isinstance(v, np.ndarray) else jnp.full)((gsel[k].width,), fill, v.dtype)
    return lambda tree: {k: one(k, v) for k, v in tree.items()}

  return rebuild_train_state(state, model, tx, widths, sels, masks=per_unit(1)(state.masks),
                             scores=per_unit(0))
