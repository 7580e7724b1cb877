"""The pruning engine: global ranking under constraints, and the reference's score schedule."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from taylor_jax import engine, models


def _groups_and_widths(name='resnet20'):
  model = models.create(name, 10)
  return model.groups(), dict(model.widths)


def _random_scores(widths, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.exponential(size=w).astype(np.float32) for k, w in widths.items()}


def _ones(widths):
  return {k: np.ones(w, np.float32) for k, w in widths.items()}


def test_removes_exactly_the_globally_lowest_units():
  groups, widths = _groups_and_widths()
  scores = _random_scores(widths, 0)
  new = engine.prune_lowest(scores, _ones(widths), groups, widths, 40)
  removed = [(k, u) for k, m in new.items() for u in np.flatnonzero(m == 0)]
  assert len(removed) == 40
  threshold = max(scores[k][u] for k, u in removed)
  kept_scores = [scores[k][u] for k, m in new.items() for u in np.flatnonzero(m)]
  assert min(kept_scores) >= threshold


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 700), min_width=st.integers(1, 6))
def test_never_empties_a_group_and_keeps_min_width(seed, n, min_width):
  groups, widths = _groups_and_widths()
  c = engine.Constraints(min_width=min_width)
  new = engine.prune_lowest(_random_scores(widths, seed), _ones(widths), groups, widths, n, c)
  for g in groups:
    assert new[g.name].sum() >= min(min_width, widths[g.name])
  removable = engine.removable_units(groups, widths, _ones(widths), c)
  assert sum(widths.values()) - sum(m.sum() for m in new.values()) == min(n, removable)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 600),
       share=st.sampled_from([0.1, 0.3, 0.5, 0.75]))
def test_max_share_holds_under_global_ranking(seed, n, share):
  groups, widths = _groups_and_widths()
  # Skewed scores: one stage scores far lower, so global ranking alone would empty it.
  scores = _random_scores(widths, seed)
  scores['stage3'] = scores['stage3'] * 1e-6
  new = engine.prune_lowest(scores, _ones(widths), groups, widths, n,
                            engine.Constraints(max_share=share))
  for g in groups:
    assert widths[g.name] - new[g.name].sum() <= share * widths[g.name] + 1e-9


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 500), align=st.sampled_from([2, 4, 8, 16]))
def test_alignment_gives_multiples_of_k(seed, n, align):
  groups, widths = _groups_and_widths()
  scores = _random_scores(widths, seed)
  new = engine.prune_lowest(scores, _ones(widths), groups, widths, n,
                            engine.Constraints(align=align))
  removed = sum(widths.values()) - sum(int(m.sum()) for m in new.values())
  assert removed >= n or all(new[g.name].sum() == align for g in groups)  # progress
  assert removed < n + align
  for g in groups:
    kept = int(new[g.name].sum())
    assert kept % align == 0, (g.name, kept)
    assert kept >= 1
    # Within a group the highest-scoring units are the ones kept.
    s = scores[g.name]
    if 0 < kept < widths[g.name]:
      assert s[new[g.name] == 1].min() >= s[new[g.name] == 0].max()


def test_pruned_units_stay_pruned_and_non_prunable_groups_are_untouched():
  groups, widths = _groups_and_widths('densenet121')
  scores = _random_scores(widths, 1)
  masks = engine.prune_lowest(scores, _ones(widths), groups, widths, 500)
  masks2 = engine.prune_lowest(scores, masks, groups, widths, 500)
  for g in groups:
    assert np.all(masks2[g.name] <= masks[g.name])
    if not g.prunable:
      assert masks2[g.name].all()


def test_period_mean_then_ema_as_the_reference():
  masks = {'a': np.array([1, 1, 0], np.float32)}
  first = engine.period_mean_and_ema({'a': np.array([3., 6., 9.])}, 3, {'a': np.zeros(3)}, masks,
                                     first=True)
  np.testing.assert_allclose(first['a'], [1., 2., 0.])
  second = engine.period_mean_and_ema({'a': np.array([30., 0., 9.])}, 3, first, masks,
                                      first=False, momentum=0.9)
  np.testing.assert_allclose(second['a'], [0.9 * 1 + 0.1 * 10, 0.9 * 2 + 0.1 * 0, 0.], rtol=1e-6)
  normed = engine.period_mean_and_ema({'a': np.array([3., 4., 0.])}, 1, first, masks, first=True,
                                      normalize='l2')
  np.testing.assert_allclose(normed['a'], [0.6, 0.8, 0.], rtol=1e-6)


def test_min_kept_respects_every_constraint():
  assert engine.Constraints().min_kept(64) == 1
  assert engine.Constraints(max_share=0.25).min_kept(64) == 48
  assert engine.Constraints(min_width=3, align=8).min_kept(64) == 8
  assert engine.Constraints(align=8).min_kept(6) == 1  # narrower than k: left unaligned
  with pytest.raises(ValueError, match='min_width'):
    engine.Constraints(min_width=0)
