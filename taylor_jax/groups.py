"""Channel groups: the one model of which parameter slices share a channel index.

A *group* is a set of units (filters, channels, neurons) that must be pruned together: removing
unit ``c`` of a group removes index ``c`` from every (array, axis) slice of the group, e.g. the
producing conv's output axis, its BatchNorm scale/bias/mean/var, every consumer's input axis
(also through a flatten or a concatenation) and, for a residual stream, every layer tied by the add.

Every group owns one *gate*: a per-unit multiplier vector ``z`` (shape ``(width,)``) that the model
multiplies into the activations where the group's channels are read (after BN, before the
non-linearity; after the add for a residual stream; after every consumer's BN+ReLU in
pre-activation networks). A gate of 0 makes the network compute exactly what the network with
that unit physically removed computes. Masks (0/1) are passed as gates; the Taylor-FO-BN
importance is ``(dL/dz)^2`` at the gate.

Ranking (estimators, engine), masking (train step) and surgery all speak in these groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Slice:
  """The part of one array that holds a group's channels.

  Attributes:
    path: path into the variables dict, collection first, e.g.
      ``('params', 'stage1_block0', 'conv1', 'kernel')``.
    axis: the array axis that indexes channels (negative allowed).
    role: ``'out'`` (producer: conv/dense output axis, bias), ``'norm'`` (BatchNorm
      scale/bias/mean/var), or ``'in'`` (consumer input axis).
    offset: the group's first position along ``axis`` within one spatial position, for
      concatenations (DenseNet); 0 otherwise.
    repeat: number of spatial positions when the axis is a flattened NHWC feature axis
      (``index = position * channels_per_position + offset + c``); 1 otherwise.
  """

  path: Path
  axis: int
  role: str
  offset: int = 0
  repeat: int = 1

  def unit_view(self, x: Any, width: int) -> Any:
    """The group's part of ``x`` (numpy or jax; its FIRST axis is the slice's axis), as
    ``(repeat, width, *x.shape[1:])``: entry ``[r, u]`` is ``x[r * (len(x) // repeat) + offset
    + u]``, unit ``u`` at flattened position ``r``. The one place that knows the layout
    (:meth:`positions` is this view of the positions)."""
    return x.reshape((self.repeat, -1) + tuple(x.shape[1:]))[:, self.offset:self.offset + width]

  def positions(self, units: np.ndarray, axis_len: int) -> np.ndarray:
    """Positions along ``axis`` (length ``axis_len``) that hold the given units of the group,
    position-major (all units at flattened position 0, then at 1, ...)."""
    units = np.asarray(units, dtype=np.int64)
    width = int(units.max()) + 1 if units.size else 0
    return self.unit_view(np.arange(axis_len, dtype=np.int64), width)[:, units].reshape(-1)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Units pruned together, with the slices they occupy and where their gate sits.

  Attributes:
    name: key of this group in ``widths``, gates and masks.
    width: number of units.
    slices: every (array, axis) slice that indexes the group's units.
    kind: ``'channel'`` (conv channels inside a block), ``'residual'`` (a stage's residual
      stream), ``'neuron'`` (dense units), or ``'concat'`` (DenseNet feature channels).
    gate: where the gate multiplies the activations (for humans and reports).
    prunable: False for groups the model keeps whole (pruning them is refused).
    gate_after_norm: the gate multiplies the output of the group's one BatchNorm directly
      (``z * (gamma * xhat + beta)``), so at a live unit (``z = 1``)
      ``dL/dz = gamma * dL/dgamma + beta * dL/dbeta`` and the train step gets the gate gradient
      from the BN gradients it computes anyway (:func:`taylor_jax.masking.gate_grads_from_norm`).
    reason: why the group is not prunable (empty when it is), for reports.
    marked: non-empty when a normalisation or reduction runs over the group's own channels
      (LayerNorm, GroupNorm, a mean over features): zeroing a unit there is not the same as
      removing it. Says where.
  """

  name: str
  width: int
  slices: tuple[Slice, ...]
  kind: str
  gate: str
  prunable: bool = True
  gate_after_norm: bool = False
  reason: str = ''
  marked: str = ''


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def group_by_name(groups: Sequence[ChannelGroup]) -> dict[str, ChannelGroup]:
  return {g.name: g for g in groups}


def check_groups(variables: Mapping[str, Any], groups: Sequence[ChannelGroup]) -> None:
  """Raises ValueError unless the groups describe ``variables`` exactly.

  Checks that every slice exists, that its axis holds ``repeat * (channels per position)``
  entries with the group's units inside, that no two groups claim the same position of one axis,
  and that the groups of one (array, axis) together cover it completely.
  """
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f'duplicate group names: {sorted(n for n in names if names.count(n) > 1)}')
  claimed: dict[tuple[Path, int], np.ndarray] = {}
  for g in groups:
    if g.width < 1:
      raise ValueError(f'group {g.name!r} has width {g.width}; every group needs >= 1 unit')
    for s in g.slices:
      try:
        arr = get_path(variables, s.path)
      except (KeyError, TypeError) as e:
        raise ValueError(f'group {g.name!r}: no array at {"/".join(s.path)}') from e
      axis = s.axis % arr.ndim
      n = arr.shape[axis]
      if n % s.repeat:
        raise ValueError(f'group {g.name!r}: axis {axis} of {"/".join(s.path)} has {n} entries, '
                         f'not a multiple of repeat={s.repeat}')
      if s.offset + g.width > n // s.repeat:
        raise ValueError(f'group {g.name!r} (width {g.width}, offset {s.offset}) does not fit axis '
                         f'{axis} of {"/".join(s.path)} with shape {arr.shape}')
      key = (s.path, axis)
      if key not in claimed:
        claimed[key] = np.zeros(n, dtype=np.int32)
      claimed[key][s.positions(np.arange(g.width), n)] += 1
  for (path, axis), count in claimed.items():
    if (count != 1).any():
      bad = np.flatnonzero(count != 1)[:5]
      raise ValueError(f'axis {axis} of {"/".join(path)}: positions {bad.tolist()} are claimed by '
                       f'{count[bad].tolist()} groups (each position needs exactly one)')


def slice_positions(groups: Sequence[ChannelGroup], shapes: Mapping[Path, tuple[int, ...]],
                    units: Mapping[str, np.ndarray]) -> dict[tuple[Path, int], np.ndarray]:
  """Sorted positions, per (array path, axis), of the given units of each group.

  Args:
    groups: the model's groups.
    shapes: shape of every array that a slice names.
    units: group name -> unit indices (e.g. the kept units).
  """
  out: dict[tuple[Path, int], list[np.ndarray]] = {}
  for g in groups:
    if g.name not in units:
      continue
    for s in g.slices:
      shape = shapes[s.path]
      axis = s.axis % len(shape)
      out.setdefault((s.path, axis), []).append(s.positions(units[g.name], shape[axis]))
  return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def total_units(groups: Iterable[ChannelGroup], prunable_only: bool = True) -> int:
  return sum(g.width for g in groups if g.prunable or not prunable_only)
