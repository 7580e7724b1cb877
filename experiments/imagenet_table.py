"""The paper's Table 3 (ImageNet pruning results) from finished runs of the main job.

  .venv/bin/python experiments/imagenet_table.py runs/imagenet_resnet50_* [--out=PREFIX]

Reads each workdir's ``report.json``; prints a Markdown table and, with ``--out``, writes
``PREFIX.md`` and ``PREFIX.csv``. One 'no pruning' row per network (the first run's baseline),
then one row per run: top-1 / top-5 error on the evaluated split (%), parameters (10^7), FLOPs
(10^9 multiply-adds, the paper's unit), and measured latency (ms, batch 1 and 64) on the machine
that ran the job. Pruned rows give the change against their network's baseline in parentheses.
The method label is the estimator and the share of prunable units (gates) kept, as the paper's
'Taylor-FO-BN-72%'.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from taylor_jax import models  # noqa: E402

NETWORKS = {'resnet18': 'ResNet-18', 'resnet34': 'ResNet-34', 'resnet50': 'ResNet-50',
            'resnet101': 'ResNet-101', 'vgg11_bn': 'VGG11-BN', 'densenet121': 'DenseNet-121'}
# The paper's names (Tables 1-3); other estimators keep their registry name.
ESTIMATORS = {'taylor_fo_bn': 'Taylor-FO-BN', 'taylor_fo_bn_fg': 'Taylor-FO-BN-FG',
              'taylor_so': 'Taylor-SO', 'taylor_fo_weight': 'Taylor-FO-Weight',
              'bn_scale': 'BN-scale', 'random': 'Random'}
# (column, header, format of the value)
COLUMNS = (('network', 'Network', '{}'), ('method', 'Method', '{}'),
           ('top1_err', 'Top-1 err. (%)', '{:.2f}'), ('top5_err', 'Top-5 err. (%)', '{:.2f}'),
           ('params_1e7', 'Params (10^7)', '{:.2f}'), ('gflops', 'FLOPs (10^9)', '{:.2f}'),
           ('latency_ms_b1', 'Latency b1 (ms)', '{:.2f}'),
           ('latency_ms_b64', 'Latency b64 (ms)', '{:.1f}'))
DELTA = ('top1_err', 'top5_err', 'params_1e7', 'gflops', 'latency_ms_b1', 'latency_ms_b64')


def _metrics(r: dict) -> dict:
  """Table columns of one report entry ('baseline' or 'pruned')."""
  return {'top1_err': 100 * (1 - r['test_accuracy']),
          'top5_err': 100 * (1 - r['test_top5_accuracy']),
          'params_1e7': r['params'] / 1e7, 'gflops': r['flops'] / 1e9,
          'latency_ms_b1': r.get('latency_ms_b1'), 'latency_ms_b64': r.get('latency_ms_b64')}


def kept_share(model: str, widths: dict) -> float:
  """Share of the prunable units (gates) of ``model`` that ``widths`` keeps."""
  groups = [g for g in models.create(model, 1000).groups() if g.prunable]
  full = models.full_widths(model)
  return sum(widths[g.name] for g in groups) / sum(full[g.name] for g in groups)


def rows(workdirs: list[str]) -> list[dict]:
  """Table rows (dicts keyed by COLUMNS' names, plus 'workdir'), baselines first per network."""
  reports = []
  for w in workdirs:
    path = os.path.join(w, 'report.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{w} has no report.json: the run has not finished (re-run its '
                              'command to resume it)')
    with open(path) as f:
      reports.append((w, json.load(f)))
  out, seen = [], []
  for w, rep in reports:
    cfg = rep['config']
    model = cfg['model']
    net = NETWORKS.get(model, model)
    if model not in seen:
      seen.append(model)
      out.append({'network': net, 'method': 'no pruning', 'workdir': w,
                  **_metrics(rep['baseline'])})
    if 'pruned' not in rep:
      continue
    keep = kept_share(model, rep['pruned']['widths'])
    est = cfg['prune'].get('estimator', '')
    label = f"{ESTIMATORS.get(est, est)}-{100 * keep:.0f}%"
    out.append({'network': net, 'method': label, 'workdir': w, **_metrics(rep['pruned'])})
  order = {m: i for i, m in enumerate(NETWORKS.get(s, s) for s in seen)}
  return sorted(out, key=lambda r: (order[r['network']], r['method'] != 'no pruning'))


def _cell(row: dict, base: dict | None, key: str, fmt: str) -> str:
  v = row.get(key)
  if v is None:
    return 'n/a'
  s = fmt.format(v)
  if base is not None and key in DELTA and base.get(key) is not None:
    d = v - base[key]
    s += f' ({"+" if d >= 0 else "-"}{fmt.format(abs(d))})'
  return s


def _baselines(table: list[dict]) -> dict[str, dict]:
  return {r['network']: r for r in table if r['method'] == 'no pruning'}


def markdown(table: list[dict]) -> str:
  base = _baselines(table)
  lines = ['| ' + ' | '.join(h for _, h, _ in COLUMNS) + ' |', '|---' * len(COLUMNS) + '|']
  for r in table:
    b = None if r['method'] == 'no pruning' else base.get(r['network'])
    lines.append('| ' + ' | '.join(_cell(r, b, k, f) for k, _, f in COLUMNS) + ' |')
  return '\n'.join(lines) + '\n'


def to_csv(table: list[dict]) -> str:
  """One line per row, raw numbers (no deltas), plus the workdir."""
  buf = io.StringIO()
  keys = [k for k, _, _ in COLUMNS] + ['workdir']
  writer = csv.DictWriter(buf, fieldnames=keys, lineterminator='\n')
  writer.writeheader()
  for r in table:
    writer.writerow({k: r.get(k) for k in keys})
  return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdirs', nargs='+', help='finished run workdirs (with report.json)')
  parser.add_argument('--out', default=None, help='write PREFIX.md and PREFIX.csv')
  args = parser.parse_args(argv)
  table = rows(args.workdirs)
  md = markdown(table)
  print(md, end='')
  if args.out:
    with open(args.out + '.md', 'w') as f:
      f.write('# ImageNet pruning (paper Table 3 format)\n\n' + md)
    with open(args.out + '.csv', 'w') as f:
      f.write(to_csv(table))
  return 0


if __name__ == '__main__':
  sys.exit(main())
