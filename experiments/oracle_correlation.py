"""How well does each importance estimator rank units like the oracle? (paper Table 1 / Sec. 4.1)

For every model and seed: train (or resume, or reuse) a baseline through the main job, one
workdir per (model, budget, seed); then on the SAME fixed minibatches of training examples
(unaugmented, eval-mode BatchNorm) compute every registered estimator (mean over the minibatches,
as the engine averages a pruning period) and the oracle (``taylor_jax.oracle``: the loss change
when one unit is removed, per minibatch, averaged), and their Spearman, Kendall and Pearson
correlations over all units (global ranking) and per layer (group).

Outputs (``--out``, default experiments/results; ``PREFIX`` = ``oracle_correlation`` on
Fashion-MNIST, ``oracle_correlation_<dataset>`` otherwise):

* ``PREFIX.csv``: ``model,estimator,seed,spearman,kendall,pearson`` against the squared oracle
  ``(L - L(-m))^2`` (the paper's definition of importance); ``PREFIX_abs.csv`` the same against
  ``|L - L(-m)|`` (the reference code's oracle, id 40);
* ``PREFIX_per_layer.csv``: both oracles, every group;
* ``PREFIX.md``: mean +- std over seeds next to the paper's claim, budget, command;
* ``PREFIX_scatter.png``: Taylor-FO-BN against the oracle, per model (first seed).

Scores are cached per workdir (``oracle_correlation_scores.json``), so a killed run resumes.

Fashion-MNIST (default: LeNet3 and ResNet-20, seeds 0,1,2, the budget in ``DEFAULT_EPOCHS``):
  PYTHONPATH=. .venv/bin/python experiments/oracle_correlation.py
CIFAR-10 as in the paper (LeNet3 and pre-activation ResNet-18, the configs' epochs):
  PYTHONPATH=. .venv/bin/python experiments/oracle_correlation.py --dataset=cifar10 --data_dir=DIR
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import os
import shlex
import sys
import time
from typing import Any, Optional

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results')

DEFAULT_CONFIGS = {
    'fashion_mnist': ('configs/fashion_mnist_lenet3_baseline.py',
                      'configs/fashion_mnist_baseline.py'),
    'cifar10': ('configs/cifar10_lenet3_baseline.py',
                'configs/cifar10_preact_resnet18_baseline.py'),
}
# The default budget (epochs per model) on Fashion-MNIST: all six baselines plus scoring in
# about 25 minutes of this 2-core CPU. Models not listed train for their config's epochs.
DEFAULT_EPOCHS = 'lenet3=1,resnet20=1'
PAPER_CLAIM = ('Abstract: "> 93% correlation" between the Taylor estimates and the oracle '
               '(Spearman/Kendall/Pearson tables on CIFAR-10 LeNet3 / ResNet-18 and ImageNet; '
               'exact table values unverified here, see /work/shared/REFERENCE.md).')
HEADLINE = 'taylor_fo_bn'
CSV_COLUMNS = ('model', 'estimator', 'seed', 'spearman', 'kendall', 'pearson')
METRICS = ('spearman', 'kendall', 'pearson')


# --- configs and baselines -----------------------------------------------------------------------

def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (path relative to the repository root or absolute)."""
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  spec = importlib.util.spec_from_file_location(
      'cfg_' + os.path.basename(full)[:-3], full)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def set_field(config: ml_collections.ConfigDict, key: str, value: str) -> None:
  """``config.a.b = value`` for ``key='a.b'``; ``value`` parsed as a Python literal if it is one."""
  try:
    v = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    v = value
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = v


def parse_epochs(spec: str) -> dict[str, float]:
  """``'lenet3=3,resnet20=1'`` -> per-model epochs; a bare number applies to every model."""
  out: dict[str, float] = {}
  for part in filter(None, (s.strip() for s in spec.split(','))):
    if '=' in part:
      k, v = part.split('=', 1)
      out[k.strip()] = float(v)
    else:
      out['*'] = float(part)
  return out


def baseline_config(path: str, args, seed: int) -> ml_collections.ConfigDict:
  """The config file's baseline, with the command line's dataset, budget, seed and overrides."""
  c = load_config(path)
  if args.dataset:
    c.dataset = args.dataset
  if args.data_dir:
    c.data_dir = args.data_dir
  if args.image_size:
    c.image_size = args.image_size
  epochs = parse_epochs(args.epochs)
  if c.model in epochs or '*' in epochs:
    c.train.epochs = epochs.get(c.model, epochs.get('*'))
  c.seed = seed
  c.prune.enabled = False
  for kv in args.set:
    set_field(c, *kv.split('=', 1))
  return c


def workdir_for(args, c: ml_collections.ConfigDict) -> str:
  if args.baseline_dir:
    return os.path.expanduser(args.baseline_dir.format(model=c.model, epochs=c.train.epochs,
                                                       seed=c.seed))
  root = args.workdir_root or os.path.join(ROOT, 'runs', 'oracle_correlation', c.dataset)
  return os.path.join(root, f'{c.model}_e{c.train.epochs:g}_seed{c.seed}')


# --- scoring -------------------------------------------------------------------------------------

def estimator_list(args) -> list[str]:
  from taylor_jax import estimators
  names = args.estimators.split(',') if args.estimators else estimators.names()
  return [n for n in names if n not in set(filter(None, args.skip.split(',')))]


def score_network(workdir: str, c: ml_collections.ConfigDict, args) -> dict[str, Any]:
  """Every estimator's and the oracle's scores of the workdir's network on the fixed scoring
  minibatches; cached in the workdir (keyed by the scoring settings)."""
  from taylor_jax import scoring
  key = f'n{args.examples}_b{args.batch_size}_bn{args.bn_mode}'
  cache_path = os.path.join(workdir, 'oracle_correlation_scores.json')
  cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
  entry = cache.get(key, {'estimators': {}, 'skipped': {}, 'seconds': {}})
  model, variables, masks, meta = scoring.restore_network(workdir)
  batches = scoring.fixed_batches(c.dataset, 'train', args.examples, args.batch_size,
                                  c.data_dir, c.image_size)
  train_bn = args.bn_mode == 'train'
  units = sum(g.width for g in model.groups() if g.prunable)

  def save():
    cache[key] = entry
    with open(cache_path + '.tmp', 'w') as f:
      json.dump(cache, f)
    os.replace(cache_path + '.tmp', cache_path)

  if 'oracle' not in entry:
    t = time.time()
    forms = scoring.oracle_forms(model, variables, masks, batches, train_bn, args.chunk_size)
    entry['oracle'] = {f: {k: v.tolist() for k, v in s.items()} for f, s in forms.items()}
    entry['seconds']['oracle'] = time.time() - t
    save()
  for name in estimator_list(args):
    if name in entry['estimators'] or name in entry['skipped']:
      continue
    if name == 'obd_exact' and units > args.max_exact_hessian_units:
      entry['skipped'][name] = (f'exact gate Hessian of {units} units (> '
                                f'--max_exact_hessian_units={args.max_exact_hessian_units}); '
                                '`obd` is its Hutchinson estimate')
      save()
      continue
    t = time.time()
    try:
      # The random floor draws anew per baseline seed (its default seed is fixed).
      options = {'seed': c.seed} if name == 'random' else {}
      s = scoring.mean_scores(name, model, variables, masks, batches, train_bn, **options)
    except ValueError as e:  # a criterion that does not apply (BN criteria on LeNet3)
      entry['skipped'][name] = str(e)
      save()
      continue
    entry['estimators'][name] = {k: v.tolist() for k, v in s.items()}
    entry['seconds'][name] = time.time() - t
    save()
    print(f'  {c.model} seed {c.seed}: {name} {time.time() - t:.1f}s', flush=True)
  entry['num_examples'] = len(batches) * batches[0]['label'].shape[0]
  entry['groups'] = [g.name for g in model.groups() if g.prunable]
  save()
  return entry


def correlation_rows(model_name: str, seed: int, entry: dict[str, Any]):
  """(global rows, per-layer rows) of every estimator against both oracle forms."""
  from taylor_jax import correlation
  glob, per = [], []
  for form in ('squared', 'abs'):
    oracle = {k: np.asarray(v) for k, v in entry['oracle'][form].items()}
    for name, s in sorted(entry['estimators'].items()):
      r = correlation.correlations({k: np.asarray(v) for k, v in s.items()}, oracle)
      glob.append({'oracle': form, 'model': model_name, 'estimator': name, 'seed': seed,
                   **{m: _num(r['global'][m]) for m in METRICS}})
      for layer, lr in r['per_group'].items():
        per.append({'model': model_name, 'estimator': name, 'seed': seed, 'oracle': form,
                    'layer': layer, 'n': lr['n'], **{m: _num(lr[m]) for m in METRICS}})
  return glob, per


def _num(v: Optional[float]) -> float:
  return float('nan') if v is None else float(v)


# --- outputs -------------------------------------------------------------------------------------

def write_csv(path: str, rows: list[dict[str, Any]], columns) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
    w.writeheader()
    for r in rows:
      w.writerow({k: (f'{v:.6f}' if isinstance(v, float) else v) for k, v in r.items()})


def summary_table(rows: list[dict[str, Any]], models_order: list[str]) -> list[str]:
  """Markdown: mean +- std over seeds per model x estimator, sorted by mean Spearman."""
  lines = ['| model | estimator | seeds | Spearman | Kendall | Pearson |',
           '|---|---|---|---|---|---|']
  for model in models_order:
    by_est: dict[str, list] = {}
    for r in rows:
      if r['model'] == model:
        by_est.setdefault(r['estimator'], []).append(r)
    ranked = sorted(by_est.items(), key=lambda kv: -np.nanmean([r['spearman'] for r in kv[1]]))
    for name, rs in ranked:
      cells = []
      for m in METRICS:
        v = np.asarray([r[m] for r in rs], np.float64)
        cells.append(f'{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}' if np.isfinite(v).any() else '-')
      label = f'**{name}**' if name == HEADLINE else name
      lines.append(f'| {model} | {label} | {len(rs)} | ' + ' | '.join(cells) + ' |')
  return lines


def scatter_plot(path: str, per_model: dict[str, dict[str, Any]]) -> None:
  """Taylor-FO-BN against the squared oracle, log-log, one panel per model, colour per layer."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from taylor_jax import correlation
  fig, axes = plt.subplots(1, len(per_model), figsize=(5.2 * len(per_model), 4.4), squeeze=False)
  for ax, (model, (seed, entry)) in zip(axes[0], per_model.items()):
    est = entry['estimators'].get(HEADLINE)
    if est is None:
      continue
    for i, g in enumerate(entry['groups']):
      x = np.asarray(entry['oracle']['squared'][g])
      y = np.asarray(est[g])
      ok = (x > 0) & (y > 0)
      ax.scatter(x[ok], y[ok], s=7, alpha=0.7, color=plt.cm.tab20(i % 20), label=g)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('oracle (L - L without unit)^2, mean over minibatches')
    ax.set_ylabel('Taylor-FO-BN (dL/dz)^2, mean over minibatches')
    rho = correlation.correlations(est, entry['oracle']['squared'])['global']['spearman']
    ax.set_title(f'{model}, seed {seed}: Spearman {rho:.3f}')
    if len(entry['groups']) <= 12:
      ax.legend(fontsize=6, markerscale=1.5, loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_markdown(path: str, args, glob_rows, per_rows, models_order, baselines, entries,
                   seconds) -> None:
  prefix = os.path.basename(path)[:-3]
  train_s = sum(b.get('wall_s', 0.0) for b, _, _ in baselines.values())
  score_s = sum(sum(e['seconds'].values()) for e in entries.values())
  sq = [r for r in glob_rows if r['oracle'] == 'squared']
  ab = [r for r in glob_rows if r['oracle'] == 'abs']
  lines = [f'# Correlation of importance estimators with the oracle ({args.dataset or "config"} '
           'dataset)', '',
           f'Paper: {PAPER_CLAIM}', '',
           'Estimator scores and the oracle are computed on the SAME '
           f'{args.examples // args.batch_size * args.batch_size} training examples '
           f'(first ones of the split, unaugmented, minibatches of {args.batch_size}, '
           f'{args.bn_mode}-mode BatchNorm), each the mean over the minibatches; correlations are '
           'over all units of all prunable groups (global ranking). Mean ± std over seeds.', '',
           '## Against the squared oracle `mean_d (L_d - L_d(-m))^2` (paper\'s definition)', '']
  lines += summary_table(sq, models_order)
  lines += ['', '## Against the absolute oracle `mean_d |L_d - L_d(-m)|` (reference id 40)', '']
  lines += summary_table(ab, models_order)
  lines += ['', f'## Per layer: `{HEADLINE}` against the squared oracle (mean over seeds)', '',
            '| model | layer | units | Spearman | Kendall | Pearson |', '|---|---|---|---|---|---|']
  for model in models_order:
    layers: dict[str, list] = {}
    for r in per_rows:
      if r['model'] == model and r['estimator'] == HEADLINE and r['oracle'] == 'squared':
        layers.setdefault(r['layer'], []).append(r)
    for layer, rs in layers.items():
      lines.append(f"| {model} | {layer} | {rs[0]['n']} | " + ' | '.join(
          f"{np.nanmean([r[m] for r in rs]):.3f}" for m in METRICS) + ' |')
  dead = {}
  for (model, seed), e in entries.items():
    zero = sum(int(np.sum(np.asarray(v) == 0)) for v in e['oracle']['squared'].values())
    dead.setdefault(model, []).append(zero)
  per_seed = '; '.join(f"{m}: {', '.join(map(str, v))}" for m, v in dead.items())
  lines += ['', 'Units whose removal does not change the loss at all (oracle exactly 0, e.g. dead '
            f'ReLUs), per seed: {per_seed}.']
  skipped = {}
  for (model, seed), e in entries.items():
    for name, why in e['skipped'].items():
      skipped.setdefault((model, name), why)
  if skipped:
    lines += ['', 'Not computed:', '']
    lines += [f'- {model} / `{name}`: {why}' for (model, name), why in sorted(skipped.items())]
  lines += ['', '## Baselines (the main job, baseline phase)', '',
            '| model | seed | epochs | test accuracy | test loss | workdir |',
            '|---|---|---|---|---|---|']
  for (model, seed), (b, epochs, wd) in sorted(baselines.items()):
    lines.append(f"| {model} | {seed} | {epochs:g} | {b['test_accuracy']:.2%} | "
                 f"{b['test_loss']:.4f} | `{os.path.relpath(wd, ROOT)}` |")
  lines += ['', f'Budget: {_budget_text(baselines)}. The paper trains its CIFAR-10 networks to '
            'convergence before measuring; this budget is far shorter, so these networks are '
            'less converged than the paper\'s.', '',
            f'Per-layer correlations: `{prefix}_per_layer.csv`; scatter plot of Taylor-FO-BN: '
            f'`{prefix}_scatter.png`.', '',
            f'Wall time of the work, as measured when it was done: baseline training '
            f'{train_s / 60:.1f} min, scoring (estimators + oracle) {score_s / 60:.1f} min; this '
            f'invocation {seconds / 60:.1f} min (it reuses trained baselines and cached scores).',
            '',
            'Command:', '', '```', _command(), '```', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def _budget_text(baselines) -> str:
  per = {}
  for (model, _), (_, epochs, _) in baselines.items():
    per.setdefault(model, epochs)
  return ', '.join(f'{m} {e:g} epoch(s) SGD' for m, e in per.items())


def _command() -> str:
  return 'PYTHONPATH=. .venv/bin/python experiments/oracle_correlation.py ' + ' '.join(
      shlex.quote(a) for a in sys.argv[1:])


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--dataset', default='fashion_mnist',
                  help="fashion_mnist | cifar10 | synthetic (overrides the configs' dataset)")
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--image_size', type=int, default=None)
  ap.add_argument('--configs', default=None,
                  help='comma-separated baseline config files, one per model (default: '
                       'LeNet3 + ResNet-20 on Fashion-MNIST, LeNet3 + preact ResNet-18 on '
                       'CIFAR-10)')
  ap.add_argument('--seeds', default='0,1,2')
  ap.add_argument('--epochs', default=DEFAULT_EPOCHS,
                  help="training budget: 'model=epochs,...' or one number ('' = the configs')")
  ap.add_argument('--set', action='append', default=[],
                  help='config override key=value, e.g. train.limit_examples=512 (repeatable)')
  ap.add_argument('--examples', type=int, default=1024, help='scoring examples (training split)')
  ap.add_argument('--batch_size', type=int, default=128, help='scoring minibatch size')
  ap.add_argument('--bn_mode', choices=('eval', 'train'), default='eval',
                  help='BatchNorm statistics while scoring (the oracle uses the same)')
  ap.add_argument('--estimators', default='', help='comma-separated (default: all registered)')
  ap.add_argument('--skip', default='', help='comma-separated estimators to leave out')
  ap.add_argument('--max_exact_hessian_units', type=int, default=300,
                  help='obd_exact (a full gate Hessian) only on models with at most this many '
                       'units')
  ap.add_argument('--chunk_size', type=int, default=64, help='oracle units per compiled call')
  ap.add_argument('--workdir_root', default=None, help='default runs/oracle_correlation/DATASET')
  ap.add_argument('--baseline_dir', default=None,
                  help='finished baselines to score instead of training them, a template with '
                       '{model}, {epochs}, {seed} (e.g. experiments/converged_baselines.py\'s '
                       '~/taylor_jax_runs/converged/resnet20_e{epochs:g}_s{seed})')
  ap.add_argument('--out', default=RESULTS)
  ap.add_argument('--prefix', default=None)
  return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  t0 = time.time()
  configs = (args.configs.split(',') if args.configs else
             list(DEFAULT_CONFIGS.get(args.dataset, DEFAULT_CONFIGS['fashion_mnist'])))
  seeds = [int(s) for s in args.seeds.split(',')]
  prefix = args.prefix or ('oracle_correlation' if args.dataset == 'fashion_mnist'
                           else f'oracle_correlation_{args.dataset}')
  os.makedirs(args.out, exist_ok=True)
  glob_rows, per_rows, baselines, entries, models_order = [], [], {}, {}, []
  from taylor_jax import scoring
  if args.baseline_dir:  # before any scoring: a wrong template must not cost an hour
    for path in configs:
      for seed in seeds:
        wd = workdir_for(args, baseline_config(path, args, seed))
        if not scoring.baseline_done(wd):
          raise SystemExit(f'--baseline_dir: no finished baseline in {wd} (train it first, '
                           'e.g. with experiments/converged_baselines.py)')
  for path in configs:
    for seed in seeds:
      c = baseline_config(path, args, seed)
      wd = workdir_for(args, c)
      print(f'{c.model} seed {seed}: baseline in {wd}', flush=True)
      baselines[(c.model, seed)] = (scoring.train_baseline(c, wd), c.train.epochs, wd)
      entry = score_network(wd, c, args)
      entries[(c.model, seed)] = entry
      g, p = correlation_rows(c.model, seed, entry)
      glob_rows += g
      per_rows += p
      if c.model not in models_order:
        models_order.append(c.model)
  out = lambda suffix: os.path.join(args.out, prefix + suffix)
  write_csv(out('.csv'), [r for r in glob_rows if r['oracle'] == 'squared'], CSV_COLUMNS)
  write_csv(out('_abs.csv'), [r for r in glob_rows if r['oracle'] == 'abs'], CSV_COLUMNS)
  write_csv(out('_per_layer.csv'), per_rows,
            ('model', 'estimator', 'seed', 'oracle', 'layer', 'n') + METRICS)
  first = {}
  for (model, seed), e in entries.items():
    first.setdefault(model, (seed, e))
  scatter_plot(out('_scatter.png'), first)
  write_markdown(out('.md'), args, glob_rows, per_rows, models_order, baselines, entries,
                 time.time() - t0)
  print(open(out('.md')).read())
  return {'rows': glob_rows, 'per_layer': per_rows, 'prefix': prefix}


if __name__ == '__main__':
  main()
