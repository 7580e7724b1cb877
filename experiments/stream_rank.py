"""Why Taylor-FO-BN rarely thins ResNet-20's residual streams: where each group's units rank.

Reads the per-unit scores and oracle of ``experiments/oracle_correlation.py`` runs (their
``oracle_correlation_scores.json``; nothing is recomputed) and writes, per seed and group, the
percentile that the group's median unit takes among all prunable units, for the oracle
(squared loss change, one unit removed), Taylor-FO-BN and its stream variant.

  python experiments/stream_rank.py ~/taylor_jax_runs/oracle_correlation/resnet20_e1_seed{0,1,2}

Writes ``experiments/results/stream_rank.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERIES = (('oracle', lambda d: d['oracle']['squared']),
          ('taylor_fo_bn', lambda d: d['estimators']['taylor_fo_bn']),
          ('taylor_fo_bn_stream', lambda d: d['estimators']['taylor_fo_bn_stream']))


def percentiles(scores: dict) -> dict[str, float]:
  """Group -> share of all units scoring below the group's median unit."""
  everything = np.concatenate([np.asarray(v, np.float64) for v in scores.values()])
  return {g: float((everything < np.median(v)).mean()) for g, v in scores.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results', 'stream_rank.md'))
  args = p.parse_args(argv)
  cmd = shlex.join(['python', 'experiments/stream_rank.py',
                    *[w.replace(os.path.expanduser('~'), '~') for w in args.workdirs]])
  per_seed = []
  for wd in args.workdirs:
    with open(os.path.join(wd, 'oracle_correlation_scores.json')) as f:
      entry = next(iter(json.load(f).values()))
    per_seed.append({name: percentiles(get(entry)) for name, get in SERIES})
  groups = list(per_seed[0]['oracle'])
  lines = ['# Where each group\'s median unit ranks among all units (ResNet-20)', '',
           f'Command: `{cmd}`', '',
           'Percentile of the group\'s median unit among all prunable units (1.0: above every '
           'unit), mean over the runs (min-max). Streams (`stageN`) are the residual streams; '
           '`stageN.blockK` the units inside a block.', '',
           '| group | ' + ' | '.join(n for n, _ in SERIES) + ' |',
           '|---|' + '---|' * len(SERIES)]
  for g in groups:
    cells = []
    for name, _ in SERIES:
      v = [s[name][g] for s in per_seed]
      cells.append(f'{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})')
    lines.append(f'| {g} | ' + ' | '.join(cells) + ' |')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  sys.exit(main())
