"""Surgery: rebuild a smaller network from masks, so a pruned network is really smaller.

Speaks in channel groups (:mod:`taylor_jax.groups`): for every group, the kept units are the
nonzero entries of its mask; every (array, axis) slice of every group drops the positions of
the removed units. An array indexed by several groups (a conv kernel: input axis of one group,
output axis of another; a DenseNet consumer whose input axis is a concatenation of several
groups) is gathered once per axis with the union of all groups' kept positions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

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


def _gather_tree(tree: Mapping[str, Any], keep: Mapping[tuple[Path, int], np.ndarray],
                 prefix: Path = ()) -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, Mapping):
      out[k] = _gather_tree(v, keep, path)
      continue
    for axis in range(np.ndim(v)):
      if (path, axis) in keep:
        v = jax.numpy.take(v, keep[(path, axis)], axis=axis)
    out[k] = v
  return out


def shrink_variables(groups: Sequence[ChannelGroup], variables: Mapping[str, Any],
                     masks: Mapping[str, Any]) -> dict[str, Any]:
  """The variables (``{'params': ..., 'batch_stats': ...}``) with the masked units removed."""
  return _gather_tree(variables, keep_positions(groups, variables, masks))


def shrink_masks(masks: Mapping[str, Any]) -> dict[str, Any]:
  """Masks of the shrunk network: all ones, one entry per kept unit."""
  return {k: m[np.flatnonzero(np.asarray(m))] for k, m in masks.items()}
