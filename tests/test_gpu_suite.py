"""The one-shot GPU suite (experiments/gpu_suite.py) at its smoke sizes, end to end, so it never
goes stale: every section runs, every measurement is a finite number, both files are written."""

from __future__ import annotations

import json
import math

import jax
import pytest

from experiments import gpu_suite


def _numbers(tree, path=()):
  if isinstance(tree, bool):
    return
  if isinstance(tree, (int, float)):
    yield path, tree
  elif isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, path + (k,))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _numbers(v, path + (i,))


def test_smoke_writes_every_section(tmp_path):
  gpu_suite.main(['--smoke', f'--out={tmp_path}'])
  res = json.loads((tmp_path / 'gpu_suite.json').read_text())
  assert res['mode'] == 'smoke' and res['jax'] == jax.__version__ and res['devices']
  sections = res['sections']
  assert list(sections) == [name for name, _ in gpu_suite.SECTIONS]
  for name, sec in sections.items():
    nums = list(_numbers(sec))
    assert nums, name
    bad = [(p, v) for p, v in nums if not math.isfinite(v)]
    assert not bad, (name, bad)
    assert sec['wall_s'] > 0
  assert set(sections['throughput']['median_step_s']) == {'plain', 'taylor_fo_bn'}
  assert set(sections['estimators']['median_step_s']) == {'plain', 'taylor_fo_bn', 'taylor_so'}
  assert sections['oracle']['oracle_speedup'] > 0
  pruned = sections['latency']['pruned']
  assert [r['align'] for r in pruned.values()] == list(gpu_suite.SMOKE['aligns'])
  for r in pruned.values():  # the FLOPs target was reached within its tolerance, widths aligned
    assert 0.4 <= r['flops_cut'] <= 0.4 + gpu_suite.SMOKE['tolerance'] + 1e-9, r
    assert r['widths_aligned'], r
  assert sections['discovery']['equal_to_declared']
  md = (tmp_path / 'gpu_suite.md').read_text()
  for heading in ('Train-step throughput', 'Estimator overhead', 'Oracle', 'Latency after surgery',
                  'Discovery'):
    assert heading in md
  assert '<= 5%' in md and '>= 5x' in md and '<= 3x' in md


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='checks the refusal on a CPU machine')
def test_full_mode_refuses_without_gpu(tmp_path):
  with pytest.raises(SystemExit, match='no GPU'):
    gpu_suite.main([f'--out={tmp_path}'])
  assert not list(tmp_path.iterdir())
