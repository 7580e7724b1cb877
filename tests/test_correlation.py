"""Correlation tools against closed-form small cases."""

from __future__ import annotations

import numpy as np
import pytest

from taylor_jax import correlation
from taylor_jax.groups import ChannelGroup


def test_monotone_transform_is_rank_perfect():
  a = {'g1': np.array([0.1, 2.0, 0.5, 3.0]), 'g2': np.array([1.0, 4.0, 9.0])}
  b = {k: np.exp(3 * v) for k, v in a.items()}  # strictly increasing, nonlinear
  r = correlation.correlations(a, b)
  assert r['global']['spearman'] == pytest.approx(1.0)
  assert r['global']['kendall'] == pytest.approx(1.0)
  assert r['global']['pearson'] < 0.999  # not linear
  assert r['global']['n'] == 7
  for k in a:
    assert r['per_group'][k]['spearman'] == pytest.approx(1.0)


def test_reversed_and_linear():
  a = {'g': np.array([1.0, 2.0, 3.0, 4.0, 5.0])}
  r = correlation.correlations(a, {'g': -2 * a['g'] + 7})
  for m in correlation.METRICS:
    assert r['global'][m] == pytest.approx(-1.0)
  r = correlation.correlations(a, {'g': 3 * a['g'] + 1})
  assert r['global']['pearson'] == pytest.approx(1.0)


def test_hand_computed_values():
  # x = 1..4, y = (1, 3, 2, 4): one discordant pair of 6 -> tau = (5 - 1) / 6;
  # rank differences d = (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8;
  # pearson: cov = sum (x-2.5)(y-2.5) = 2.25+(-0.25)+(-0.25)+2.25 = 4, var = 5 -> 0.8.
  r = correlation.correlations({'g': [1.0, 2.0, 3.0, 4.0]}, {'g': [1.0, 3.0, 2.0, 4.0]})
  assert r['global']['kendall'] == pytest.approx(4 / 6)
  assert r['global']['spearman'] == pytest.approx(0.8)
  assert r['global']['pearson'] == pytest.approx(0.8)


def test_masks_and_non_prunable_groups_are_left_out():
  a = {'g': np.array([1.0, 2.0, 3.0, 100.0]), 'h': np.array([5.0, 1.0])}
  b = {'g': np.array([1.0, 2.0, 3.0, -100.0]), 'h': np.array([1.0, 5.0])}
  masks = {'g': np.array([1, 1, 1, 0]), 'h': np.array([1, 1])}
  groups = [ChannelGroup('g', 4, (), 'channel', ''), ChannelGroup('h', 2, (), 'channel', '',
                                                                 prunable=False)]
  r = correlation.correlations(a, b, masks=masks, groups=groups)
  assert list(r['per_group']) == ['g']
  assert r['global']['n'] == 3 and r['global']['spearman'] == pytest.approx(1.0)
  # a constant vector has no defined correlation
  r = correlation.correlations({'g': [1.0, 1.0, 1.0]}, {'g': [1.0, 2.0, 3.0]})
  assert r['global']['spearman'] is None
  assert 'global' in correlation.format_table(r)
