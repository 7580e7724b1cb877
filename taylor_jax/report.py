"""The pruning report: JSON, a Markdown table (before / after) and a PNG of the pruning run."""

from __future__ import annotations

import json
import os
from typing import Any

ROWS = (('test_accuracy', 'test accuracy', '{:.2%}'), ('test_top5_accuracy', 'test top-5', '{:.2%}'),
        ('test_loss', 'test loss', '{:.4f}'), ('params', 'parameters', '{:,}'),
        ('flops', 'FLOPs (MACs)', '{:,}'), ('latency_ms_b1', 'latency batch 1 (ms)', '{:.3f}'),
        ('latency_ms_b64', 'latency batch 64 (ms)', '{:.3f}'))


def markdown(result: dict[str, Any]) -> str:
  cols = [k for k in ('baseline', 'pruned') if k in result]
  lines = ['| metric | ' + ' | '.join(cols) + (' | change |' if len(cols) == 2 else ' |'),
           '|---' * (len(cols) + 1 + (len(cols) == 2)) + '|']
  for key, label, fmt in ROWS:
    vals = [result[c].get(key) for c in cols]
    if any(v is None for v in vals):
      continue
    row = f'| {label} | ' + ' | '.join(fmt.format(v) for v in vals)
    if len(cols) == 2:
      a, b = vals
      change = (f'{(b - a) * 100:+.2f} points' if 'accuracy' in key
                else f'{(b / a - 1):+.1%}' if a else 'n/a')
      row += f' | {change}'
    lines.append(row + ' |')
  return '\n'.join(lines) + '\n'


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  hist = result.get('history', [])
  if not hist:
    return
  steps = [h['prune_step'] for h in hist]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, [h['flops_ratio'] * 100 for h in hist], 'C0-o', ms=3, label='FLOPs kept (%)')
  ax.set_xlabel('pruning step')
  ax.set_ylabel('FLOPs kept (%)', color='C0')
  if 'eval_accuracy' in hist[0]:
    ax2 = ax.twinx()
    ax2.plot(steps, [h['eval_accuracy'] * 100 for h in hist], 'C1-s', ms=3,
             label='test accuracy (subset, %)')
    ax2.axhline(result['baseline']['test_accuracy'] * 100, color='C1', ls=':', lw=1)
    ax2.set_ylabel('test accuracy on subset (%); dotted: baseline', color='C1')
  prune = result['config']['prune']
  how = prune['estimator'] if prune.get('method', 'taylor') == 'taylor' else prune['method']
  ax.set_title(f"{result['config']['model']} / {result['config']['dataset']}: {how} pruning")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(workdir: str, result: dict[str, Any]) -> None:
  """Writes report.json, report.md and (after pruning) pruning.png into ``workdir``."""
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(f"# {result['config']['model']} on {result['config']['dataset']}\n\n")
    f.write(markdown(result))
    for change in result.get('config_changes', []):
      listed = ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in change['changes'].items())
      f.write(f"\nResumed at step {change['step']} under a changed config: {listed}.\n")
  plot(result, os.path.join(workdir, 'pruning.png'))
