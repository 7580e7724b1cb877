"""Checks of a model's channel groups, run before the first training step and at every surgery.

Four independent checks, each an error that names the group and says what to do:

* :func:`check_coverage`: the groups describe the variables (``groups.check_groups``) and every
  array axis whose length changes with the widths is claimed by a group (a parameter the groups
  miss would keep its old shape after surgery);
* :func:`check_runs_narrower`: the network still runs (abstractly) with each group narrower: a
  width written into the model's code (a reshape to a literal head count) fails here, named;
* :func:`probe_surgery`: at random masks, the surgered network computes what the masked network
  computes (eval mode); on a mismatch each group is probed alone to name the culprit;
* :func:`structure` / :func:`check_structure`: the sequence of primitives of the forward pass is
  the same at every width (a block that adds a shortcut ``if in_ch == out_ch`` changes its
  computation when pruning makes the widths equal).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from taylor_jax import surgery
from taylor_jax.groups import ChannelGroup, check_groups
from taylor_jax.models import common as model_common


class GroupCheckError(ValueError):
  """The groups do not describe the model: pruning it would change what it computes."""


def abstract_init(model, input_shape):
  """``model.init`` as ``jax.ShapeDtypeStruct`` s (nothing computed)."""
  x = model_common.example_input(model, input_shape)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def check_runs_narrower(model, input_shape: Sequence[int]) -> None:
  """The forward pass traces (``jax.eval_shape``, nothing computed) with every prunable group
  one unit narrower; if not, each group is tried alone and the error names those that fail."""
  shrinkable = [g for g in model.groups() if g.prunable and g.width > 1]

  def failure(narrow):
    small = model.clone(widths={**model.widths, **{g.name: g.width - 1 for g in narrow}})
    try:
      jax.eval_shape(lambda v, x: small.apply(v, x, train=False),
                     abstract_init(small, input_shape),
                     model_common.example_input(small, input_shape, 2))
    except Exception as e:  # noqa: whatever the user's code raises is reported below
      return f'{type(e).__name__}: {e}'.split('\n')[0][:300]
    return None

  if not shrinkable or failure(shrinkable) is None:
    return
  bad = {g.name: err for g in shrinkable if (err := failure([g])) is not None}
  raise GroupCheckError(
      f'the model does not run with these groups narrower: {bad or "none alone (only together)"}. '
      'A width is fixed in its code (a reshape to a literal number of heads or head '
      'channels, a layer whose features do not follow its parameters): let -1 stand for the '
      'pruned dimension (x.reshape(B, L, num_heads, -1) when head channels are pruned), or keep '
      'those groups whole (keep_whole=[...]).')


def check_coverage(model, input_shape: Sequence[int]) -> None:
  """``check_groups`` on the model's variables, and: with every prunable group one unit
  narrower, each axis that shrinks shrinks by exactly what its claiming groups lose."""
  groups = model.groups()
  full = abstract_init(model, input_shape)
  try:
    check_groups(full, groups)
  except ValueError as e:
    raise GroupCheckError(f'the channel groups do not describe the model: {e}') from e
  for g in groups:
    if g.prunable and not any(s.role == 'out' for s in g.slices):
      raise GroupCheckError(
          f'group {g.name!r} is prunable but has no producer slice (role "out"): nothing would '
          'remove its units from the layer that computes them. Add the producing kernel\'s '
          'output axis to the group, or declare it prunable=False.')
  shrinkable = [g for g in groups if g.prunable and g.width > 1]
  if not shrinkable:
    return
  narrower = {**model.widths, **{g.name: g.width - 1 for g in shrinkable}}
  small = surgery._shapes(abstract_init(model.clone(widths=narrower), input_shape))
  expected: dict[tuple, list[int]] = {}
  for path, shape in surgery._shapes(full).items():
    expected[path] = list(shape)
  for g in shrinkable:
    for s in g.slices:
      axis = s.axis % len(expected[s.path])
      expected[s.path][axis] -= s.repeat
  for path, shape in surgery._shapes(full).items():
    if path not in small:
      raise GroupCheckError(f'{"/".join(map(str, path))} disappears when the model is narrower')
    if tuple(expected[path]) != small[path]:
      claimed = sorted({g.name for g in shrinkable for s in g.slices if s.path == path})
      raise GroupCheckError(
          f'{"/".join(map(str, path))} has shape {small[path]} when every prunable group is one '
          f'unit narrower, but the groups ({claimed or "none"}) account for '
          f'{tuple(expected[path])} (full: {shape}): a group misses this array or claims it '
          'wrongly. Declare the slice in the group, or keep the layer whole.')


def _max_diff(model, variables, x, masks) -> float:
  masked = model_common.run_once(lambda v, xx: model.apply(v, xx, gates=masks, train=False),
                                 variables, x)
  if not bool(jnp.all(jnp.isfinite(masked))):
    raise GroupCheckError('the model\'s logits are not finite at its initial variables, so '
                          'surgery cannot be checked: check the initialisation')
  small = model.clone(widths=surgery.new_widths(model.widths, masks))
  shrunk = model_common.run_once(lambda v, xx: small.apply(v, xx, train=False),
                                 surgery.shrink_variables(model.groups(), variables, masks), x)
  scale = max(1.0, float(jnp.max(jnp.abs(masked))))
  return float(jnp.max(jnp.abs(shrunk - masked))) / scale


def probe_surgery(model, variables: Mapping[str, Any], input_shape: Sequence[int], *,
                  seed: int = 0, batch: int = 2, tolerance: float = 1e-4,
                  groups: Optional[Sequence[ChannelGroup]] = None) -> float:
  """Relative max logit difference between the masked and the surgered network at random masks
  (about a third of every prunable group's units removed); raises :class:`GroupCheckError`
  naming the groups whose surgery alone differs when it exceeds ``tolerance``."""
  groups = model.groups() if groups is None else groups
  rng = np.random.default_rng(seed)
  x = model_common.example_input(model, input_shape, batch, rng)
  ones = {g.name: np.ones(g.width, np.float32) for g in groups}
  masks = dict(ones)
  for g in groups:
    if g.prunable and g.width > 1:
      m = (rng.random(g.width) > 0.33).astype(np.float32)
      m[rng.integers(g.width)] = 1.0
      masks[g.name] = m
  with model_common.reference_convolutions():
    diff = _max_diff(model, variables, x, masks)
    if diff <= tolerance:
      return diff
    bad = [g.name for g in groups if g.prunable and (masks[g.name] == 0).any() and
           _max_diff(model, variables, x, {**ones, g.name: masks[g.name]}) > tolerance]
  raise GroupCheckError(
      f'surgery changes what the network computes (relative max logit difference {diff:.2e} '
      f'between the masked and the surgered network at random widths); groups whose removal alone '
      f'differs: {bad or "none alone (an interaction of several)"}. A slice of these groups is '
      'missing or wrong, or a layer ignores its parameters\' widths. Keep these groups whole '
      '(keep_whole=[...]) or fix their declaration.')


def structure(model, input_shape: Sequence[int]) -> tuple[str, ...]:
  """The primitives of one eval forward pass, in order (nested jaxprs included)."""
  x = model_common.example_input(model, input_shape)
  variables = abstract_init(model, input_shape)
  with model_common.reference_convolutions():
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  out: list[str] = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      out.append(eqn.primitive.name)
      for sub in jex.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(closed.jaxpr)
  return tuple(out)


def check_structure(reference: Sequence[str], model, input_shape: Sequence[int]) -> None:
  """Raises when ``model`` (at its current widths) runs other primitives than ``reference``."""
  now = structure(model, input_shape)
  if tuple(now) == tuple(reference):
    return
  k = next((i for i, (a, b) in enumerate(zip(reference, now)) if a != b),
           min(len(reference), len(now)))
  raise GroupCheckError(
      f'the model computes something else at widths {dict(model.widths)}: its forward pass '
      f'runs {len(now)} primitives instead of {len(reference)}, first different at #{k} '
      f'({reference[k] if k < len(reference) else "end"} -> {now[k] if k < len(now) else "end"}). '
      'A layer decides its structure from its widths (e.g. a shortcut added when in_ch == '
      'out_ch); decide it from the configuration instead, or keep that block\'s groups whole.')
