"""Masks and gates as scalings of the parameter tree: no gate in the model code.

A group's *mask* (``(width,)`` 0/1) zeroes every slice of the group (producer outputs, norm
parameters, consumer inputs): a masked unit then computes exactly what a removed unit computes,
as long as no normalisation over the channel axis sits in between (discovery marks those
groups). :func:`apply_masks` does it inside the jitted step, so masks stay pytree state.

A group's *gate* ``z`` scales the group's gate site: its norms' scale and bias when it has
norms (``z * (gamma * xhat + beta)``), else its producers' output slices (``z * (W x + b)``).
For a post-activation chain (conv -> BN -> ReLU) this is the reference's gate after BN; for a
residual stream it scales the whole stream once (every producer by ``z``; ReLU is positively
homogeneous), which is NOT the reference's shared skip gate that multiplies the stream again
after every block. At ``z = 1`` the gate gradient comes from the parameter gradients the step
already has (:func:`gate_grads_from_params`):
``dL/dz = sum over gate-site slices of (p * dL/dp)``, summed over the unit's positions
(:func:`gate_grads_from_norm`: the same from the BatchNorm gradients of a gate right after a BN).

Every reduction of a parameter-shaped array or tree to one value per unit lives here:
:func:`per_unit` (one slice) and :func:`per_unit_sum` (a function of one or more trees over the
groups' slices of chosen roles, what the weight criteria of :mod:`taylor_jax.estimators` use).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taylor_jax.groups import ChannelGroup, Path, Slice, get_path


def gate_site(group: ChannelGroup, collection: str | None = 'params') -> tuple[Slice, ...]:
  """The slices a gate scales: the group's trainable norm slices (scale, bias) if it has any,
  else its producer ('out') slices. ``collection``: keep only slices under it (Linen's
  ``'params'``; None for NNX-style trees without collections)."""
  def trainable(s):
    return collection is None or s.path[0] == collection
  norms = [s for s in group.slices if s.role == 'norm' and trainable(s) and
           s.path[-1] not in ('mean', 'var')]
  return tuple(norms or [s for s in group.slices if s.role == 'out' and trainable(s)])


def _vectors(groups: Sequence[ChannelGroup], tree: Mapping[str, Any],
             values: Mapping[str, jax.Array], slices_of, prefix: Path) -> dict:
  """(path, axis) -> ``(axis_len,)`` multiplier: ``values[g]`` at the group's positions, 1
  elsewhere."""
  out: dict[tuple[Path, int], jax.Array] = {}
  for g in groups:
    if g.name not in values:
      continue
    v = jnp.asarray(values[g.name])
    for s in slices_of(g):
      if s.path[:len(prefix)] != prefix:
        continue
      rel = s.path[len(prefix):]
      arr = get_path(tree, rel)
      axis = s.axis % arr.ndim
      n = arr.shape[axis]
      key = (rel, axis)
      if key not in out:
        out[key] = jnp.ones((n,), v.dtype)
      pos = s.positions(np.arange(g.width), n)
      out[key] = out[key].at[pos].set(jnp.tile(v, s.repeat))
  return out


def _scale_tree(tree: Any, vectors: Mapping[tuple[Path, int], jax.Array], path: Path = ()) -> Any:
  if isinstance(tree, Mapping):
    return {k: _scale_tree(v, vectors, path + (k,)) for k, v in tree.items()}
  out = tree
  for (p, axis), vec in vectors.items():
    if p == path:
      shape = [1] * tree.ndim
      shape[axis] = vec.shape[0]
      out = out * vec.reshape(shape).astype(tree.dtype)
  return out


def apply_masks(tree: Any, groups: Sequence[ChannelGroup], masks: Mapping[str, jax.Array],
                prefix: Path = ()) -> Any:
  """``tree`` with every slice of every group multiplied by the group's mask.

  Args:
    tree: a variables tree, or the part of it under ``prefix`` (e.g. ``params`` with
      ``prefix=('params',)``); slices outside ``prefix`` are skipped.
    masks: group name -> ``(width,)`` multipliers (groups not listed are left alone).
  """
  return _scale_tree(tree, _vectors(groups, tree, masks, lambda g: g.slices, prefix))


def apply_gates(tree: Any, groups: Sequence[ChannelGroup], gates: Mapping[str, jax.Array],
                prefix: Path = ('params',)) -> Any:
  """``tree`` with each group's gate site (:func:`gate_site`) scaled by its gate: the model then
  computes what the zoo's gated model computes with these gates (differentiable in ``gates``)."""
  collection = prefix[0] if prefix else None
  return _scale_tree(tree, _vectors(groups, tree, gates,
                                    lambda g: gate_site(g, collection), prefix))


def gate_grads_from_params(groups: Sequence[ChannelGroup], params: Any, grads: Any,
                           prefix: Path = ('params',)) -> dict[str, jax.Array]:
  """``dL/dz`` of every group's gate at ``z = 1`` from the parameter gradients:
  ``sum over gate-site slices of p * dL/dp``, reduced to ``(width,)`` per unit."""
  collection = prefix[0] if prefix else None
  out = {}
  for g in groups:
    total = jnp.zeros((g.width,), jnp.float32)
    for s in gate_site(g, collection):
      if s.path[:len(prefix)] != prefix:
        continue
      rel = s.path[len(prefix):]
      p, gr = get_path(params, rel), get_path(grads, rel)
      total = total + per_unit(p * gr, s, g.width)  # float64 stays float64 (exact tests)
    out[g.name] = total
  return out


def per_unit(x: jax.Array, s: Slice, width: int) -> jax.Array:
  """Sum of ``x`` (shaped like the array of slice ``s``) over everything but the slice's units:
  ``(width,)`` (a unit's positions along a flattened axis summed, :meth:`Slice.unit_view`)."""
  axis = s.axis % x.ndim
  x = jnp.sum(x, axis=tuple(i for i in range(x.ndim) if i != axis))  # (axis_len,)
  return s.unit_view(x, width).sum(0)


# --- per-unit reduction of variable-shaped trees ----------------------------------------------

PRODUCER_ROLES = ('out',)
ALL_ROLES = ('out', 'norm', 'in')


def per_unit_sum(groups: Sequence[ChannelGroup], tree: Any,
                 fn: Optional[Callable[..., jax.Array]] = None,
                 roles: Sequence[str] = PRODUCER_ROLES,
                 leaves: Optional[Sequence[str]] = None,
                 prefix: Path = ()) -> dict[str, jax.Array]:
  """Sums an elementwise function of variable-shaped trees into one number per unit.

  For every group and every slice of it whose role is in ``roles`` (and whose last path element
  is in ``leaves``, when given), ``fn`` is applied elementwise to the slice's array(s) and the
  result is reduced to the group's units by :func:`per_unit` (summed over every axis except the
  slice axis, a unit's ``repeat`` flattened positions summed). The per-slice results are added up.

  Args:
    groups: the channel groups.
    tree: a variables-like tree (collection first: ``{'params': ...}``), or the part of it under
      ``prefix`` (e.g. ``params`` with ``prefix=('params',)``), or a tuple of such trees with
      the same structure (e.g. ``(params, grads)``); slices outside ``prefix``, and slices whose
      first path element under ``prefix`` is absent from the (first) tree, are skipped (e.g.
      the BatchNorm ``batch_stats`` slices of a gradient tree).
    fn: ``fn(*arrays) -> array`` (elementwise, same shape); default identity on one tree.
    roles: slice roles to include (``'out'`` producer, ``'norm'`` BatchNorm, ``'in'`` consumer).
    leaves: if given, only slices whose array name (``path[-1]``) is one of these.
    prefix: the path of ``tree`` inside the variables.

  Returns:
    group name -> ``(width,)``; groups without a matching slice get zeros.
  """
  trees = tree if isinstance(tree, tuple) else (tree,)
  if fn is None:
    fn = lambda x: x
  out = {}
  for g in groups:
    total = None
    for s in g.slices:
      if s.role not in roles or (leaves is not None and s.path[-1] not in leaves):
        continue
      rel = s.path[len(prefix):]
      if s.path[:len(prefix)] != prefix or rel[0] not in trees[0]:
        continue
      red = per_unit(fn(*[get_path(t, rel) for t in trees]), s, g.width)
      total = red if total is None else total + red
    out[g.name] = jnp.zeros((g.width,), jnp.float32) if total is None else total
  return out


def gate_grads_from_norm(groups: Sequence[ChannelGroup], params: Any,
                         param_grads: Any) -> dict[str, jax.Array]:
  """``dL/dz`` of every ``gate_after_norm`` group from its BatchNorm's gradients.

  ``z * (gamma * xhat + beta)`` gives ``dL/dz = sum_{b,h,w} dL/dy (gamma xhat + beta) =
  gamma dL/dgamma + beta dL/dbeta`` where ``z = 1`` (the BN gradients carry a factor ``z``, so
  pruned units get 0 here instead of their gate gradient; scores of pruned units are zeroed
  anyway). Costs a few ``(width,)`` products instead of a reduction over the activations.
  """
  after_norm = [g for g in groups if g.gate_after_norm]
  return per_unit_sum(after_norm, (params, param_grads), lambda w, g: w * g, roles=('norm',),
                      leaves=('scale', 'bias'), prefix=('params',))
