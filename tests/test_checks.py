"""The checks run before training and at every surgery catch what used to run silently: a wrong
concatenation offset, a missing slice, a group with no producer, a block whose structure
depends on its widths."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylor_jax import checks, models
from taylor_jax.models import any_model
from taylor_jax.models.examples import concat_cnn

SHAPE = (28, 28, 1)


class _Corrupted(any_model.LinenModel):
  """The concat CNN with its groups changed by ``edit`` (a wrongly declared group)."""
  edit = None

  def groups(self):
    return tuple(self.edit(g) for g in super().groups())

  def clone(self, **kw):
    out = super().clone(**kw)
    out.__class__ = type(self)
    return out


def _concat_model(edit):
  cls = type('Corrupted', (_Corrupted,), {'edit': staticmethod(edit)})
  return cls(concat_cnn.ConcatCNN(num_classes=10), jnp.zeros((2,) + SHAPE))


def _variables(model):
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE)))
  return jax.tree_util.tree_map_with_path(
      lambda p, a: (np.abs(rng.standard_normal(a.shape)) + 0.5 if 'var' in str(p[-1]) else
                    rng.standard_normal(a.shape) * 0.3).astype(np.float32), abstract)


def test_correct_groups_pass():
  model = models.create('taylor_jax.models.examples.concat_cnn:ConcatCNN', 10, input_shape=SHAPE)
  checks.check_coverage(model, SHAPE)
  assert checks.probe_surgery(model, _variables(model), SHAPE) < 1e-4


def test_wrong_concat_offset_is_caught_naming_the_group():
  def edit(g):
    if g.name != 'conv1':
      return g
    return dataclasses.replace(g, slices=tuple(
        dataclasses.replace(s, offset=0) if s.path[1] == 'mix' else s for s in g.slices))
  model = _concat_model(edit)
  with pytest.raises(checks.GroupCheckError):
    checks.check_coverage(model, SHAPE)


def test_missing_consumer_slice_is_caught_by_coverage():
  def edit(g):
    if g.name != 'mix':
      return g
    return dataclasses.replace(g, slices=tuple(s for s in g.slices if s.path[1] != 'fc'))
  with pytest.raises(checks.GroupCheckError, match='fc/kernel'):
    checks.check_coverage(_concat_model(edit), SHAPE)


def test_group_without_producer_is_refused():
  def edit(g):
    if g.name != 'fc':
      return g
    return dataclasses.replace(g, slices=tuple(s for s in g.slices if s.role != 'out'))
  with pytest.raises(checks.GroupCheckError, match="'fc'.*no producer"):
    checks.check_coverage(_concat_model(edit), SHAPE)


def test_probe_names_the_group_whose_surgery_differs():
  # The consumer's slice of conv1 points at conv3's positions: coverage still adds up (both
  # groups claim distinct positions of 'mix'), only the probe sees the swapped inputs.
  def edit(g):
    if g.name not in ('conv1', 'conv3'):
      return g
    off = {'conv1': 0, 'conv3': 8}[g.name]
    return dataclasses.replace(g, slices=tuple(
        dataclasses.replace(s, offset=off) if s.path[1] == 'mix' else s for s in g.slices))
  model = _concat_model(edit)
  checks.check_coverage(model, SHAPE)
  with pytest.raises(checks.GroupCheckError, match=r"conv1|conv3"):
    checks.probe_surgery(model, _variables(model), SHAPE)


class WidthDependentBlock(nn.Module):
  """A residual added only when widths match: pruning can make them match."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name='a')(x))
    y = nn.relu(nn.Conv(6, (3, 3), name='b')(x))
    if x.shape[-1] == y.shape[-1]:
      y = x + y
    return nn.Dense(10, name='head')(y.mean(axis=(1, 2)))


def test_structure_that_changes_with_widths_is_refused():
  model = any_model.LinenModel(WidthDependentBlock(), jnp.zeros((2,) + SHAPE))
  ref = checks.structure(model, SHAPE)
  checks.check_structure(ref, model.clone(widths={'a': 7, 'b': 6}), SHAPE)
  with pytest.raises(checks.GroupCheckError, match='shortcut'):
    checks.check_structure(ref, model.clone(widths={'a': 6, 'b': 6}), SHAPE)


class _LiteralHeads(nn.Module):
  """Attention written with literal head counts: its value head channels are prunable, but
  `reshape(B, L, 4, 8)` cannot follow them; with -1 in their place it can."""
  literal: bool = True

  @nn.compact
  def __call__(self, h):
    b, n, _ = h.shape
    split = (lambda t: t.reshape(b, n, 4, 8)) if self.literal else (
        lambda t: t.reshape(b, n, 4, -1))
    q, k, v = (split(nn.Dense(32, name=name)(h)) for name in ('q', 'k', 'v'))
    w = jax.nn.softmax(jnp.einsum('blhd,bmhd->bhlm', q, k), -1)
    return nn.Dense(3)(jnp.einsum('bhlm,bmhd->blhd', w, v).reshape(b, n, -1).mean(1))


def test_a_width_written_into_the_code_is_named_before_training():
  x = np.zeros((2, 10, 16), np.float32)
  model = any_model.LinenModel(_LiteralHeads(), x, train_kwarg=None)
  with pytest.raises(checks.GroupCheckError, match=r"'v': 'TypeError: cannot reshape.*let -1"):
    checks.check_runs_narrower(model, x.shape[1:])
  fixed = any_model.LinenModel(_LiteralHeads(literal=False), x, train_kwarg=None)
  checks.check_runs_narrower(fixed, x.shape[1:])
  variables = fixed.init(jax.random.key(0), x)
  assert checks.probe_surgery(fixed, variables, x.shape[1:]) < 1e-5
