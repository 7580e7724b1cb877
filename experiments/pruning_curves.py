"""Greedy pruning curves without fine-tuning (paper Fig. 3 style): which criterion removes the
units whose loss the network does not miss?

For every model (the seed-``--seed`` baselines of ``experiments/oracle_correlation.py``, trained
there or here through the main job) and every criterion: start from the trained network, then
repeatedly score the live units on a fixed scoring set (training examples, eval-mode BN), remove
the ``--chunk`` lowest-scoring ones (global ranking, ``taylor_jax.engine.prune_lowest``; no
group is emptied), and measure loss and accuracy on a fixed held-out set (the first test
examples) and the FLOPs of the surgered network (``taylor_jax.costs``). No training in between.
``oracle`` is oracle-greedy: the oracle (``mean_d |L_d - L_d(-m)|`` on the scoring set)
recomputed after every chunk.

Outputs (``--out``): ``pruning_curves.csv`` (one row per point), ``pruning_curves_units.png``
and ``pruning_curves_flops.png`` (loss and accuracy against units / FLOPs removed),
``pruning_curves.md`` (the ordering seen: mean accuracy and loss over the curve, units and
FLOPs removable within 1 and 5 points of accuracy). Curves are cached per workdir, so a killed
run resumes.

  PYTHONPATH=. .venv/bin/python experiments/pruning_curves.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import oracle_correlation as oc  # noqa: E402  (same baselines and configs)

CRITERIA = ('oracle', 'taylor_fo_bn', 'taylor_fo_weight', 'activation_taylor', 'taylor_so',
            'weight_l2', 'bn_scale', 'random')
DEFAULT_CHUNK = 'lenet3=12,resnet20=32'
CSV_COLUMNS = ('model', 'criterion', 'step', 'units_removed', 'units_kept', 'units_removed_frac',
               'flops', 'flops_removed_frac', 'loss', 'accuracy')
PAPER_ORDER = ('oracle >= Taylor FO (taylor_fo_bn, taylor_fo_weight) >= weight magnitude / BN '
               'scale >= random')


# --- one curve ------------------------------------------------------------------------------------

def criterion_scores(criterion: str, model, variables, masks, batches,
                     oracle_form: str = 'abs') -> dict[str, np.ndarray]:
  """The criterion's per-unit scores of the live units on ``batches`` (higher = keep)."""
  from taylor_jax import scoring
  if criterion == 'oracle':
    return scoring.oracle_forms(model, variables, masks, batches)[oracle_form]
  return scoring.mean_scores(criterion, model, variables, masks, batches)


def greedy_curve(criterion: str, model, variables, score_batches: Sequence[Mapping],
                 eval_batches: Sequence[Mapping], chunk: int, max_units: int,
                 input_shape: Sequence[int], oracle_form: str = 'abs') -> list[dict[str, Any]]:
  """Points (0 = unpruned) of greedy removal: re-score, drop the ``chunk`` lowest, evaluate.

  Stops after ``max_units`` units or when every group is at width 1. Each point has
  ``units_removed``, ``flops``, the held-out ``loss``/``accuracy`` and the ``removed`` units
  (group -> indices) of that chunk.
  """
  from taylor_jax import costs, engine, scoring
  groups = model.groups()
  full = {g.name: g.width for g in groups}
  total = sum(g.width for g in groups if g.prunable)
  masks = {g.name: np.ones(g.width, np.float32) for g in groups}
  flops_cache: dict[tuple, int] = {}

  def point(step, removed):
    widths = tuple(int(m.sum()) for m in masks.values())
    if widths not in flops_cache:
      flops_cache[widths] = costs.flops(model, tuple(input_shape), masks)
    kept = sum(int(masks[g.name].sum()) for g in groups if g.prunable)
    return {'step': step, 'units_removed': total - kept, 'units_kept': kept,
            'units_removed_frac': (total - kept) / total, 'flops': flops_cache[widths],
            **scoring.evaluate(model, variables, masks, eval_batches), 'removed': removed}

  points = [point(0, {})]
  constraints = engine.Constraints(min_width=1)
  while points[-1]['units_removed'] < max_units:
    n = min(chunk, max_units - points[-1]['units_removed'],
            engine.removable_units(groups, full, masks, constraints))
    if n <= 0:
      break
    scores = criterion_scores(criterion, model, variables, masks, score_batches, oracle_form)
    new = engine.prune_lowest(scores, masks, groups, full, n, constraints)
    removed = {k: np.flatnonzero((masks[k] != 0) & (new[k] == 0)).tolist() for k in masks}
    masks = {k: np.asarray(v, np.float32) for k, v in new.items()}
    points.append(point(len(points), {k: v for k, v in removed.items() if v}))
  f0 = points[0]['flops']
  for p in points:
    p['flops_removed_frac'] = 1.0 - p['flops'] / f0
  return points


# --- summaries ------------------------------------------------------------------------------------

def removable_within(points, drop: float, key: str) -> float:
  """Largest ``key`` (units or FLOPs removed share) before accuracy first falls more than
  ``drop`` below the unpruned accuracy."""
  a0 = points[0]['accuracy']
  best = 0.0
  for p in points:
    if p['accuracy'] < a0 - drop:
      break
    best = p[key]
  return best


def curve_summary(points, early: float = 0.3) -> dict[str, float]:
  """Mean held-out accuracy and loss over the curve's points (same grid for every criterion),
  mean accuracy over the points with at most ``early`` of the units removed, accuracy after
  each of the first three chunks, and the share of units / FLOPs removable within 1 and 5
  accuracy points."""
  acc = [p['accuracy'] for p in points]
  return {'mean_accuracy': float(np.mean(acc)),
          'early_accuracy': float(np.mean([p['accuracy'] for p in points
                                           if p['units_removed_frac'] <= early])),
          'chunk_accuracy': [float(a) for a in acc[1:4]],
          'mean_loss': float(np.mean([p['loss'] for p in points])),
          'units_1pt': removable_within(points, 0.01, 'units_removed_frac'),
          'units_5pt': removable_within(points, 0.05, 'units_removed_frac'),
          'flops_1pt': removable_within(points, 0.01, 'flops_removed_frac'),
          'flops_5pt': removable_within(points, 0.05, 'flops_removed_frac')}


def plot_curves(path: str, curves: Mapping[str, Mapping[str, list]], xkey: str, xlabel: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  models = list(curves)
  fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
  styles = {c: (f'C{i}', '-' if c != 'oracle' else '--') for i, c in enumerate(CRITERIA)}
  for row, model in zip(axes, models):
    for crit, pts in curves[model].items():
      color, ls = styles.get(crit, ('k', ':'))
      x = [100 * p[xkey] for p in pts]
      row[0].plot(x, [p['loss'] for p in pts], ls, color=color, marker='.', ms=3, label=crit)
      row[1].plot(x, [100 * p['accuracy'] for p in pts], ls, color=color, marker='.', ms=3,
                  label=crit)
    row[0].set_yscale('log')
    row[0].set_ylabel('held-out loss (log)')
    row[1].set_ylabel('held-out accuracy (%)')
    for ax in row:
      ax.set_xlabel(xlabel)
      ax.set_title(model)
      ax.grid(alpha=0.3)
    row[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_markdown(path, args, curves, settings, seconds) -> None:
  total = sum(sum(s['seconds'].values()) for s in settings.values())
  lines = ['# Greedy pruning curves without fine-tuning', '',
           f'Paper (Fig. 3 style, reference ordering): {PAPER_ORDER}.', '',
           'Greedy removal from the trained baseline, no training in between: after every chunk '
           'the live units are re-scored on a fixed scoring set and the lowest-scoring chunk is '
           'removed (global ranking, no group emptied); loss and accuracy on a fixed held-out '
           'set. `oracle` = oracle-greedy (`mean_d |L_d - L_d(-m)|` on the scoring set, '
           're-computed after every chunk). Mean accuracy / loss: over all points of the curve '
           '(the same removal grid for every criterion); "units@1pt" etc.: largest share of '
           'units (FLOPs) removed before held-out accuracy first falls more than 1 (5) points '
           'below the unpruned network.', '']
  for model, crits in curves.items():
    s = settings[model]
    lines += [f'## {model}', '',
              f"Baseline `{s['workdir']}` ({s['epochs']:g} epochs, seed {s['seed']}); "
              f"{s['units']} prunable units, chunk {s['chunk']} units, up to {s['max_units']} "
              f"removed; scoring set {s['score_examples']} training examples, held-out set "
              f"{s['eval_examples']} test examples; unpruned held-out accuracy "
              f"{s['accuracy0']:.2%}.", '',
              '| criterion | mean accuracy | mean accuracy, <= 30% removed | mean loss | '
              f"accuracy after {', '.join(f'{x:.0%}' for x in s['chunk_fracs'])} removed | "
              'units@1pt | units@5pt | FLOPs@1pt | FLOPs@5pt |',
              '|---|---|---|---|---|---|---|---|---|']
    summ = {c: curve_summary(p) for c, p in crits.items()}
    order = sorted(summ, key=lambda c: -summ[c]['mean_accuracy'])
    for c in order:
      v = summ[c]
      lines.append(f"| {c} | {v['mean_accuracy']:.2%} | {v['early_accuracy']:.2%} | "
                   f"{v['mean_loss']:.3f} | "
                   f"{' / '.join(f'{a:.1%}' for a in v['chunk_accuracy'])} | "
                   f"{v['units_1pt']:.0%} | {v['units_5pt']:.0%} | {v['flops_1pt']:.0%} | "
                   f"{v['flops_5pt']:.0%} |")
    early = sorted(summ, key=lambda c: -summ[c]['early_accuracy'])
    lines += ['', 'Ordering seen, by mean accuracy over the whole curve: ' + ' > '.join(order),
              '', 'By mean accuracy while at most 30% of the units are removed: ' +
              ' > '.join(early), '']
    for c in s.get('skipped', {}):
      lines.append(f"- `{c}` not run: {s['skipped'][c]}")
    if s['seconds']:
      lines.append('- wall time per curve when computed (s): ' + ', '.join(
          f'{c} {v:.0f}' for c, v in s['seconds'].items()))
    lines.append('')
  lines += ['', 'Figures: `pruning_curves_units.png`, `pruning_curves_flops.png`; all points: '
            '`pruning_curves.csv`.', f'Wall time of this invocation: {seconds / 60:.1f} min '
            '(baselines already trained and curves already cached are reused); sum of the '
            f'curves\' wall times when computed: {total / 60:.1f} min.', '',
            'Command:', '', '```',
            'PYTHONPATH=. .venv/bin/python experiments/pruning_curves.py ' +
            ' '.join(shlex.quote(a) for a in sys.argv[1:]), '```', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dataset', default='fashion_mnist')
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--image_size', type=int, default=None)
  ap.add_argument('--configs', default=None, help='as experiments/oracle_correlation.py')
  ap.add_argument('--seed', type=int, default=0, help='which baseline seed')
  ap.add_argument('--epochs', default=oc.DEFAULT_EPOCHS,
                  help='as experiments/oracle_correlation.py')
  ap.add_argument('--set', action='append', default=[], help='config override key=value')
  ap.add_argument('--workdir_root', default=None)
  ap.add_argument('--criteria', default=','.join(CRITERIA))
  ap.add_argument('--chunk', default=DEFAULT_CHUNK,
                  help="units removed per step: 'model=units,...' or one number")
  ap.add_argument('--max_removed_frac', type=float, default=0.9,
                  help='stop after this share of the prunable units')
  ap.add_argument('--score_examples', type=int, default=256, help='training examples scored')
  ap.add_argument('--batch_size', type=int, default=128, help='scoring minibatch size')
  ap.add_argument('--eval_examples', type=int, default=1000, help='held-out test examples')
  ap.add_argument('--eval_batch_size', type=int, default=250)
  ap.add_argument('--oracle_form', choices=('abs', 'squared', 'signed'), default='abs')
  ap.add_argument('--out', default=oc.RESULTS)
  ap.add_argument('--prefix', default='pruning_curves')
  return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  from taylor_jax import scoring
  t0 = time.time()
  configs = (args.configs.split(',') if args.configs else
             list(oc.DEFAULT_CONFIGS.get(args.dataset, oc.DEFAULT_CONFIGS['fashion_mnist'])))
  chunks = oc.parse_epochs(args.chunk)  # same 'model=value' syntax
  os.makedirs(args.out, exist_ok=True)
  curves, settings, rows = {}, {}, []
  for path in configs:
    c = oc.baseline_config(path, args, args.seed)
    wd = oc.workdir_for(args, c)
    print(f'{c.model}: baseline in {wd}', flush=True)
    scoring.train_baseline(c, wd)
    model, variables, _, meta = scoring.restore_network(wd)
    score_b = scoring.fixed_batches(c.dataset, 'train', args.score_examples, args.batch_size,
                                    c.data_dir, c.image_size)
    eval_b = scoring.fixed_batches(c.dataset, 'test', args.eval_examples, args.eval_batch_size,
                                   c.data_dir, c.image_size)
    units = sum(g.width for g in model.groups() if g.prunable)
    chunk = int(chunks.get(c.model, chunks.get('*', max(1, units // 20))))
    max_units = int(args.max_removed_frac * units)
    key = (f'{args.score_examples}_{args.batch_size}_{args.eval_examples}_{chunk}_{max_units}_'
           f'{args.oracle_form}')
    cache_path = os.path.join(wd, 'pruning_curves.json')
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    cache.setdefault(key, {})
    settings[c.model] = {'workdir': os.path.relpath(wd, ROOT), 'epochs': c.train.epochs,
                         'seed': args.seed, 'units': units, 'chunk': chunk,
                         'max_units': max_units, 'score_examples': sum(
                             int(b['label'].shape[0]) for b in score_b),
                         'eval_examples': sum(int(b['label'].shape[0]) for b in eval_b),
                         'skipped': {}}
    curves[c.model] = {}
    settings[c.model]['seconds'] = cache[key].get('_seconds', {})
    for crit in args.criteria.split(','):
      if crit not in cache[key]:
        t = time.time()
        try:
          pts = greedy_curve(crit, model, variables, score_b, eval_b, chunk, max_units,
                             meta['input_shape'], args.oracle_form)
        except ValueError as e:  # a criterion that does not apply (bn_scale on LeNet3)
          settings[c.model]['skipped'][crit] = str(e)
          continue
        cache[key][crit] = pts
        cache[key].setdefault('_seconds', {})[crit] = time.time() - t
        with open(cache_path + '.tmp', 'w') as f:
          json.dump(cache, f)
        os.replace(cache_path + '.tmp', cache_path)
        print(f'  {c.model} {crit}: {len(pts)} points, {time.time() - t:.0f}s, final accuracy '
              f"{pts[-1]['accuracy']:.3f}", flush=True)
      curves[c.model][crit] = cache[key][crit]
      rows += [{'model': c.model, 'criterion': crit, **p} for p in cache[key][crit]]
    first = next(iter(curves[c.model].values()))
    settings[c.model]['accuracy0'] = first[0]['accuracy']
    settings[c.model]['chunk_fracs'] = [p['units_removed_frac'] for p in first[1:4]]
  out = lambda suffix: os.path.join(args.out, args.prefix + suffix)
  oc.write_csv(out('.csv'), rows, CSV_COLUMNS)
  plot_curves(out('_units.png'), curves, 'units_removed_frac', 'prunable units removed (%)')
  plot_curves(out('_flops.png'), curves, 'flops_removed_frac', 'FLOPs removed (%)')
  write_markdown(out('.md'), args, curves, settings, time.time() - t0)
  print(open(out('.md')).read())
  return {'curves': curves, 'settings': settings}


if __name__ == '__main__':
  main()
