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


def test_attention_heads_are_pruned_one_head_at_a_time_under_channel_alignment():
  # A 4-head group under align=4 would otherwise be frozen (its only aligned widths: 4 and 0).
  import dataclasses
  heads = engine.ChannelGroup('attn[1]', 4, (), kind='heads', gate='')
  mlp = engine.ChannelGroup('mlp', 12, (), kind='neuron', gate='')
  groups, widths = (heads, mlp), {'attn[1]': 4, 'mlp': 12}
  c = engine.Constraints(align=4)
  assert (c.align_of(heads), c.align_of(mlp)) == (1, 4)
  assert (c.floor_of(heads, 4), c.floor_of(mlp, 12)) == (1, 4)
  scores = {'attn[1]': np.array([0.1, 5., 6., 7.]), 'mlp': np.linspace(1., 2., 12)}
  new = engine.prune_lowest(scores, _ones(widths), groups, widths, 1, c)
  assert new['attn[1]'].tolist() == [0, 1, 1, 1] and new['mlp'].all()
  new = engine.prune_lowest(scores, new, groups, widths, 3, c)  # mlp goes in chunks of 4
  assert new['attn[1]'].sum() == 3 and new['mlp'].sum() == 8
  assert engine.width_grid(4, c, align=c.align_of(heads)) == [1, 2, 3, 4]
  assert engine.minimal_masks(groups, widths, c)['attn[1]'].sum() == 1
  assert engine.removable_units(groups, widths, _ones(widths), c) == 3 + 8
  # the same group as channels is aligned: 4 units under align=4 cannot be pruned
  chan = dataclasses.replace(heads, kind='channel')
  assert engine.removable_units((chan, mlp), widths, _ones(widths), c) == 8


_FLOPS_BY_WIDTHS: dict = {}


def _flops_excess(model, target):
  """Share of ``model``'s FLOPs above the target's, after ``masks``. costs.flops depends on the
  masks only through the widths they leave (it traces the surgered model), and an aligned search
  revisits the same widths many times: each distinct one is traced once (memo over examples)."""
  from taylor_jax import costs, surgery

  def flops(masks):
    widths = surgery.new_widths(model.widths, masks) if masks is not None else dict(model.widths)
    key = (type(model).__name__, model.num_classes, tuple(sorted(widths.items())))
    if key not in _FLOPS_BY_WIDTHS:
      _FLOPS_BY_WIDTHS[key] = costs.flops(model, (28, 28, 1), masks)
    return _FLOPS_BY_WIDTHS[key]

  full = flops(None)
  return lambda masks: flops(masks) / full - (1.0 - target)


def _single_chunk_options(scores, masks, groups, widths, c, excess):
  """Brute force: excess after removing each allowed next chunk from ``masks`` (one group's
  lowest-scoring live units, down to the next multiple of align)."""
  out = []
  for g in groups:
    alive = np.flatnonzero(masks[g.name])
    chunk = 1 if c.align <= 1 or widths[g.name] < c.align else (alive.size % c.align or c.align)
    if alive.size - chunk < c.min_kept(widths[g.name]):
      continue
    m = {k: v.copy() for k, v in masks.items()}
    m[g.name][alive[np.argsort(scores[g.name][alive], kind='stable')[:chunk]]] = 0
    out.append(excess(m))
  return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.floats(0.2, 0.7), tol=st.sampled_from([0.0, 0.03, 0.1]))
def test_cost_target_stops_within_tolerance_when_a_chunk_allows_it(seed, target, tol):
  model = models.create('resnet8', 10)
  groups, widths = model.groups(), dict(model.widths)
  scores = _random_scores(widths, seed)
  c = engine.Constraints(align=8)
  excess = _flops_excess(model, target)
  # Far more units than the target needs: only the target can stop the step.
  new = engine.prune_lowest(scores, _ones(widths), groups, widths, 10_000, c, excess, tol)
  # Brute force: plain greedy one chunk at a time, up to the last state short of the target.
  before = _ones(widths)
  while True:
    nxt = engine.prune_lowest(scores, before, groups, widths, 1, c)
    if excess(nxt) <= 0 or all(np.array_equal(nxt[k], before[k]) for k in nxt):
      break
    before = nxt
  assert all(np.all(new[k] <= before[k]) for k in new)  # the greedy prefix goes
  removed_after_prefix = sum(int(before[k].sum() - new[k].sum()) for k in new)
  assert removed_after_prefix <= 8  # then exactly one more chunk (or none)
  options = _single_chunk_options(scores, before, groups, widths, c, excess)
  e = excess(new)
  if any(-tol - 1e-12 <= o <= 0 for o in options):
    assert -tol - 1e-12 <= e <= 0
  elif any(o > 0 for o in options):
    assert e > 0  # falls short; the next pruning step goes on
  elif options:
    assert e == max(options)  # every option overshoots: the least


def test_cost_target_prefers_an_in_band_chunk_to_a_wide_early_one():
  """The default run's last step: the lowest-scoring chunk (half of stage 1's mid layer, ~19% of
  the FLOPs) would overshoot a 40% target from -38%; a stage-3 chunk lands within 5 points."""
  model = models.create('resnet8', 10)
  groups, widths = model.groups(), dict(model.widths)
  excess = _flops_excess(model, 0.4)
  masks = _ones(widths)
  # Widths 16/16/24/16/48/24: the default run before its last step, at -38.5% FLOPs.
  for name, keep in {'stage2': 24, 'stage2.block0': 16, 'stage3': 48, 'stage3.block0': 24}.items():
    masks[name][keep:] = 0
  assert 0 < excess(masks) < 0.02
  scores = {k: np.full(w, 10.0, np.float32) for k, w in widths.items()}
  scores['stage1.block0'][:] = 0.1  # lowest: greedy takes 8 of its 16 units
  scores['stage3.block0'][:] = 1.0
  c = engine.Constraints(align=8)
  greedy = engine.prune_lowest(scores, masks, groups, widths, 8, c, excess, tolerance=1.0)
  assert greedy['stage1.block0'].sum() == 8 and excess(greedy) < -0.1
  new = engine.prune_lowest(scores, masks, groups, widths, 8, c, excess, tolerance=0.05)
  assert new['stage1.block0'].sum() == 16 and new['stage3.block0'].sum() == 16
  assert -0.05 <= excess(new) <= 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60))
def test_cost_aware_ranking_removes_the_lowest_score_per_cost(seed, n):
  """Unaligned, with a per-unit cost per group: the removed units are the ``n`` lowest of
  score / cost over all units (brute-force sort; n is small enough that no group empties)."""
  groups, widths = _groups_and_widths()
  scores = _random_scores(widths, seed)
  cost = {k: float(c) for k, c in zip(widths, np.random.default_rng(seed + 1).uniform(
      0.1, 10.0, len(widths)))}
  new = engine.prune_lowest(scores, _ones(widths), groups, widths, n,
                            unit_cost=lambda name, width, chunk: chunk * cost[name])
  ratio = sorted((float(scores[k][u]) / cost[k], k, int(u))
                 for k, w in widths.items() for u in range(w))
  expected = {(k, u) for _, k, u in ratio[:n]}
  removed = {(k, int(u)) for k, m in new.items() for u in np.flatnonzero(m == 0)}
  assert removed == expected


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 200), align=st.sampled_from([1, 8]))
def test_uniform_unit_cost_ranks_as_plain_scores(seed, n, align):
  groups, widths = _groups_and_widths()
  scores = _random_scores(widths, seed)
  c = engine.Constraints(align=align)
  plain = engine.prune_lowest(scores, _ones(widths), groups, widths, n, c)
  uniform = engine.prune_lowest(scores, _ones(widths), groups, widths, n, c,
                                unit_cost=lambda name, width, chunk: 3.0 * chunk)
  for k in plain:
    np.testing.assert_array_equal(plain[k], uniform[k])


def test_chunk_cost_depends_on_the_live_width():
  """A latency-table-like cost: a group whose next chunk saves nothing goes after one that
  saves a lot, even with a lower score; the cost sees the width the chunk starts from."""
  groups, widths = _groups_and_widths('resnet8')
  scores = {k: np.full(w, 5.0, np.float32) for k, w in widths.items()}
  scores['stage3.block0'][:] = 1.0
  seen = []

  def cost(name, width, chunk):
    seen.append((name, width, chunk))
    return 1e-6 * chunk if name == 'stage3.block0' else 10.0 * chunk

  new = engine.prune_lowest(scores, _ones(widths), groups, widths, 8,
                            engine.Constraints(align=8), unit_cost=cost)
  assert new['stage3.block0'].sum() == widths['stage3.block0']
  assert sum(int(widths[k] - m.sum()) for k, m in new.items()) == 8
  assert ('stage3', 64, 8) in seen and ('stage1', 16, 8) in seen


def test_non_positive_unit_cost_is_refused():
  groups, widths = _groups_and_widths('resnet8')
  with pytest.raises(ValueError, match='must be > 0'):
    engine.prune_lowest(_random_scores(widths, 0), _ones(widths), groups, widths, 4,
                        unit_cost=lambda name, width, chunk: 0.0)


def test_width_grid_lists_the_reachable_widths():
  assert engine.width_grid(64, engine.Constraints(align=8)) == [8, 16, 24, 32, 40, 48, 56, 64]
  assert engine.width_grid(20, engine.Constraints(align=8)) == [8, 16, 20]
  assert engine.width_grid(16, engine.Constraints(align=8, max_share=0.5)) == [8, 16]
  assert engine.width_grid(6, engine.Constraints(align=8)) == [1, 2, 3, 4, 5, 6]
  assert engine.width_grid(64, engine.Constraints(), max_points=4) == [1, 22, 43, 64]


def _job(model, rank_by, latency_table=None):
  from types import SimpleNamespace
  from taylor_jax import run
  import helpers
  return SimpleNamespace(model=model, input_shape=(28, 28, 1), groups=model.groups(),
                         config=helpers.pruning_config(**{'prune.rank_by': rank_by}),
                         record=run.RunRecord(latency_table=latency_table))


def test_run_unit_cost_per_flop_is_the_flops_one_unit_saves():
  from taylor_jax import costs, run
  import helpers
  model = models.create('resnet8', 10)
  masks = helpers.random_masks(model, 3, keep_prob=0.7)
  cost = run._unit_cost(_job(model, 'score_per_flop'), masks)
  base = costs.flops(model, (28, 28, 1), masks)
  for g in model.groups():
    alive = np.flatnonzero(masks[g.name])
    if not g.prunable or alive.size <= 1:
      continue
    fewer = {k: v.copy() for k, v in masks.items()}
    fewer[g.name][alive[-1]] = 0
    assert cost(g.name, alive.size, 2) == 2 * (base - costs.flops(model, (28, 28, 1), fewer))


def test_run_unit_cost_per_latency_reads_the_table_and_floors_it():
  from taylor_jax import run
  import helpers
  model = models.create('resnet8', 10)
  table = {'stage3': {'16': 4.0, '32': 6.0, '64': 10.0}, 'stage1': {'8': 9.0, '16': 10.0}}
  cost = run._unit_cost(_job(model, 'score_per_latency', table), None)
  assert cost('stage3', 64, 8) == pytest.approx(10.0 - 9.0)  # 56 interpolates to 9.0
  assert cost('stage3', 24, 8) == pytest.approx(5.0 - 4.0)
  assert cost('stage1', 16, 8) == pytest.approx(1.0)
  assert cost('stage3', 16, 8) == pytest.approx(8 * 1e-6 * 10.0)  # flat below 16: the floor
