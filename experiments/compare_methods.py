"""The CVPR'19 methods side by side on Fashion-MNIST ResNet-20: methods x FLOPs reductions x seeds.

Every run is the main job (``python -m taylor_jax.main``) with a method's config
(``configs/fashion_mnist_resnet20_<method>.py``). Methods that start from a trained network
(taylor_fo_bn, bn_scale_grad, kernel_budget, cascaded_projection) share ONE baseline per seed
(``configs/fashion_mnist_baseline.py``, ``--epochs``) through ``train.init_checkpoint`` and then
fine-tune for ``--finetune_epochs``; SNIP and variational train from scratch for the same total,
``epochs + finetune_epochs`` (SNIP: all of it after pruning at init; variational: all but one
epoch (at most) of variational training, then that epoch of fine-tuning).

Resumable: a run whose workdir holds report.json is skipped; an unfinished one is re-run with the
same command, which resumes from its last checkpoint. Wall time per run (summed over the
invocations that ran it) is kept in ``<workdir>/wall_s.json``; where a run was paused or shared
the CPU, a corrected ``wall_s`` and a ``note`` saying why go there by hand, and the table lists
the notes.

Writes ``<results_dir>/methods_comparison.csv`` (``method,flops_reduction,seed,test_accuracy,
params,flops,latency_ms_b64,wall_s``; the baselines as method ``baseline``, reduction 0),
``methods_comparison.md`` (mean and spread over seeds, and the exact command) and
``methods_comparison.png`` (test accuracy vs FLOPs).

The full comparison (about 2 CPU-days on the 2-core machine at ~300 images/s; fewer epochs or
``--limit_examples`` for less)::

  python experiments/compare_methods.py --epochs=15 --finetune_epochs=3

Variants of a method are tokens ``METHOD+key=value+...`` (config overrides of that method's runs
only) and ``estimator/NAME`` is the Taylor engine (``taylor_fo_bn``'s config) with another
registered estimator; e.g. the criteria and stream normalisations on converged baselines
(experiments/converged_baselines.py) written to their own results::

  python experiments/compare_methods.py --baseline_dir='~/taylor_jax_runs/converged/resnet20_e15_s{seed}' \\
      --epochs=15 --methods=taylor_fo_bn,estimator/weight_l2,estimator/bn_scale,estimator/random \\
      --reductions=0.25,0.4,0.6 --seeds=0 --results_name=methods_converged

A smoke run::

  python experiments/compare_methods.py --methods=snip --reductions=0.4 --seeds=0 --epochs=0.1 \\
      --finetune_epochs=0.1 --limit_examples=1024 --runs_dir=/tmp/cmp --results_dir=/tmp/cmp
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FROM_TRAINED = ('taylor_fo_bn', 'bn_scale_grad', 'kernel_budget', 'cascaded_projection')
FROM_SCRATCH = ('snip', 'variational')
ALL = ('taylor_fo_bn', 'bn_scale_grad', 'variational', 'snip', 'kernel_budget',
       'cascaded_projection')
COLUMNS = ('method', 'flops_reduction', 'seed', 'test_accuracy', 'params', 'flops',
           'latency_ms_b64', 'wall_s')


def parse_method(token: str) -> tuple[str, list[str]]:
  """``(config method, extra flags)`` of a method token: ``taylor_fo_bn``,
  ``taylor_fo_bn+prune.normalize=l2`` (overrides for this method's runs) or
  ``estimator/weight_l2`` (the Taylor engine with another registered estimator)."""
  base, *overrides = token.split('+')
  flags = [f'--config.{o}' for o in overrides]
  if base.startswith('estimator/'):
    flags.insert(0, f'--config.prune.estimator={base.split("/", 1)[1]}')
    base = 'taylor_fo_bn'
  for o in overrides:
    if '=' not in o:
      raise ValueError(f'method {token!r}: override {o!r} is not key=value')
  return base, flags


def available_methods(requested):
  """``requested`` without the methods that have no config or registration here."""
  from taylor_jax import estimators
  from taylor_jax import methods as registry
  names = set(registry.names())
  out = []
  for token in requested:
    m, flags = parse_method(token)
    registered = m in names or m in ('taylor_fo_bn', 'bn_scale_grad')
    est = [f.split('=', 1)[1] for f in flags if f.startswith('--config.prune.estimator=')]
    if est and est[0] not in estimators.names():
      raise ValueError(f'method {token!r}: no estimator {est[0]!r}; registered: '
                       f'{estimators.names()}')
    if registered and os.path.exists(os.path.join(ROOT, config_path(m))):
      out.append(token)
    else:
      print(f'skipping {token}: not registered or no {config_path(m)}', file=sys.stderr)
  return out


def config_path(method: str) -> str:
  return f'configs/fashion_mnist_resnet20_{method}.py'


def run_name(token: str) -> str:
  """A workdir name for a method token (``/`` and ``=`` are not safe in every shell use)."""
  return token.replace('/', '-').replace('+', '_').replace('=', '-')


def common_flags(args, seed: int) -> list[str]:
  flags = [f'--config.seed={seed}']
  if args.limit_examples:
    flags.append(f'--config.train.limit_examples={args.limit_examples}')
  if args.limit_eval_examples:
    flags.append(f'--config.train.limit_eval_examples={args.limit_eval_examples}')
  if args.data_dir:
    flags.append(f'--config.data_dir={args.data_dir}')
  return flags + [f'--config.{o}' for o in args.override]


def baseline_command(args, seed: int, workdir: str) -> list[str]:
  return ['--config=configs/fashion_mnist_baseline.py', f'--workdir={workdir}',
          f'--config.train.epochs={args.epochs}', *common_flags(args, seed)]


def method_command(args, token: str, reduction: float, seed: int, workdir: str,
                   baseline_dir: str) -> list[str]:
  method, extra = parse_method(token)
  cmd = [f'--config={config_path(method)}', f'--workdir={workdir}',
         f'--config.prune.target_flops_reduction={reduction}', *common_flags(args, seed), *extra]
  total = args.epochs + args.finetune_epochs
  if method in FROM_TRAINED:
    cmd += [f'--config.train.init_checkpoint={baseline_dir}',
            f'--config.prune.finetune_epochs={args.finetune_epochs}']
  elif method == 'snip':
    cmd += ['--config.train.epochs=0', f'--config.prune.finetune_epochs={total}']
  elif method == 'variational':
    tune = min(1.0, args.finetune_epochs)
    cmd += ['--config.train.epochs=0', f'--config.prune.variational.epochs={total - tune}',
            f'--config.prune.finetune_epochs={tune}']
  return cmd


def _same_value(have, flag: str) -> bool:
  if isinstance(have, bool):
    return flag.lower() in ('true', '1') if have else flag.lower() in ('false', '0')
  if isinstance(have, (int, float)):
    try:
      return abs(float(flag) - have) <= 1e-9 * max(1.0, abs(have))
    except ValueError:
      return False
  if isinstance(have, str):
    return flag == have
  return True  # tuples, dicts: not compared (no flag of these scripts sets one)


def check_same_run(flags: list[str], workdir: str) -> None:
  """Refuses a workdir that holds a run made with other flags: finished runs are read, not
  re-run, so another ``--baseline_dir`` or ``--epochs`` over the same ``--runs_dir`` would
  otherwise report the old run as the new one. Checks the flags recorded at the run's start
  (``flags.json``) and, for a finished run, every ``--config.a.b=v`` against its report."""
  recorded = os.path.join(workdir, 'flags.json')
  if os.path.exists(recorded):
    with open(recorded) as f:
      before = json.load(f)
    if before != flags:
      raise SystemExit(f'{workdir} holds a run started with\n  {shlex.join(before)}\nnot\n  '
                       f'{shlex.join(flags)}\nPass another --runs_dir (or delete that workdir).')
  report = os.path.join(workdir, 'report.json')
  if not os.path.exists(report):
    return
  with open(report) as f:
    config = json.load(f).get('config', {})
  for flag in flags:
    if not flag.startswith('--config.') or '=' not in flag:
      continue
    key, value = flag[len('--config.'):].split('=', 1)
    have = config
    for part in key.split('.'):
      have = have.get(part, None) if isinstance(have, dict) else None
    if have is not None and not _same_value(have, value):
      raise SystemExit(f'{workdir} holds a finished run with {key}={have!r}, not {value!r} '
                       '(this command\'s flag): pass another --runs_dir (or delete that workdir).')


def run_main(flags: list[str], workdir: str, log) -> None:
  """Runs (or resumes) one main job unless it has finished; adds its wall time. A workdir of a
  run with other flags is refused (:func:`check_same_run`)."""
  check_same_run(flags, workdir)
  if os.path.exists(os.path.join(workdir, 'report.json')):
    return
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(os.path.join(workdir, 'flags.json')):
    with open(os.path.join(workdir, 'flags.json'), 'w') as f:
      json.dump(flags, f)
  cmd = [sys.executable, '-m', 'taylor_jax.main', *flags]
  log.write(shlex.join(['python', '-m', 'taylor_jax.main', *flags]) + '\n')
  log.flush()
  print('running:', shlex.join(cmd[1:]), flush=True)
  t0 = time.time()
  with open(os.path.join(workdir, 'main.log'), 'a') as out:
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=out,
                          stderr=subprocess.STDOUT)
  wall_file = os.path.join(workdir, 'wall_s.json')
  prev = json.load(open(wall_file))['wall_s'] if os.path.exists(wall_file) else 0.0
  with open(wall_file, 'w') as f:
    json.dump({'wall_s': prev + time.time() - t0}, f)
  if proc.returncode != 0:
    raise RuntimeError(f'{shlex.join(cmd[1:])} failed (exit {proc.returncode}); see '
                       f'{workdir}/main.log. Re-running this script resumes it.')


def total_wall_s(wd: str) -> float:
  """Wall seconds of a run over all its processes: each process's ``wall_s`` counts from its own
  start, so the run's total is the sum of the last value before each restart (time a process was
  stopped, or shared the CPU, included)."""
  path = os.path.join(wd, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0.0
  total, last = 0.0, 0.0
  with open(path) as f:
    for line in f:
      w = json.loads(line).get('wall_s')
      if w is None:
        continue
      if w < last:  # a new process
        total += last
      last = w
  return total + last


def record_path(results_dir: str, workdir: str) -> str:
  """Where a finished run's row is kept with the results: ``runs/<runs dir>/<run>.json``."""
  workdir = os.path.normpath(workdir)
  return os.path.join(results_dir, 'runs', os.path.basename(os.path.dirname(workdir)),
                      os.path.basename(workdir) + '.json')


def read_record(results_dir: str, workdir: str, flags: list[str], base: str) -> dict | None:
  """The committed row of a finished run whose workdir this machine lacks (a session's machine
  may be a fresh one: checkpoints are never committed, rows are); None if there is none or the
  workdir is here. Refused: a record of a run made with other flags (as check_same_run does),
  and one pruned from another training of its baseline than the one in ``base`` here (XLA:CPU
  training is not bit-reproducible across machines: a re-trained seed is another network)."""
  path = record_path(results_dir, workdir)
  if os.path.exists(os.path.join(workdir, 'report.json')) or not os.path.exists(path):
    return None
  with open(path) as f:
    rec = json.load(f)
  if rec['flags'] != flags:
    raise SystemExit(f'{path} records a run made with\n  {shlex.join(rec["flags"])}\nnot\n  '
                     f'{shlex.join(flags)}\nPass another --runs_dir (or delete that record).')
  here = os.path.join(base, 'report.json')
  if workdir != base and os.path.exists(here):
    with open(here) as f:
      now = json.load(f)['baseline']
    was = rec['row'].get('_baseline_eval')
    if was is None or was[0] != now['test_accuracy'] or abs(was[1] - now['test_loss']) > 1e-5:
      raise SystemExit(
          f'{path} was pruned from a baseline evaluated at {was}, but {base} here is another '
          f'training of it ([{now["test_accuracy"]}, {now["test_loss"]}]): its rows cannot be '
          'mixed with runs from this one. Move the old records away (they stay in git) or '
          'pass another --runs_dir.')
  return rec['row']


def write_record(results_dir: str, workdir: str, flags: list[str], r: dict) -> None:
  path = record_path(results_dir, workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump({'flags': flags, 'row': r}, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def row(method: str, reduction: float, seed: int, workdir: str, key: str) -> dict:
  with open(os.path.join(workdir, 'report.json')) as f:
    rep = json.load(f)
  r = rep[key]
  wall_file = os.path.join(workdir, 'wall_s.json')
  wall = json.load(open(wall_file)) if os.path.exists(wall_file) else {'wall_s': float('nan')}
  # wall_s.json is written when the process returns: a run killed and resumed misses the killed
  # processes' time there, not in its metrics.
  if not wall.get('note'):
    seen = [v for v in (wall['wall_s'], total_wall_s(workdir)) if v == v and v > 0]
    wall['wall_s'] = max(seen) if seen else float('nan')
  return {'method': method, 'flops_reduction': reduction, 'seed': seed, '_wall_note': wall.get('note'),
          'test_accuracy': r['test_accuracy'], 'params': r['params'], 'flops': r['flops'],
          'latency_ms_b64': r.get('latency_ms_b64', float('nan')), 'wall_s': wall['wall_s'],
          '_full_flops': rep['baseline']['flops'], '_widths': r.get('widths'),
          # Which training of the baseline this run started from (read_record).
          '_baseline_eval': [rep['baseline']['test_accuracy'], rep['baseline']['test_loss']],
          '_model': rep['config']['model']}


def remeasure_latency(rows, repeats: int = 30, rounds: int = 3) -> None:
  """Replaces every row's batch-64 latency by one measured here, in one process, every width
  set timed in turn with the others (costs.compare_latency: ``rounds`` rounds of ``repeats``,
  the least disturbed round's median): the runs' own latencies were taken while other jobs
  shared the CPU. Latency depends on the widths only, so random weights are used."""
  import jax
  import jax.numpy as jnp
  from taylor_jax import costs, models
  shape = (28, 28, 1)
  nets, key_of = {}, []
  for r in rows:
    widths = r['_widths'] or models.full_widths(r['_model'])  # the baseline's: full widths
    key = f"{r['_model']}:{sorted(widths.items())}"
    key_of.append(key)
    if key not in nets:
      model = models.create(r['_model'], 10, dict(widths))
      variables = jax.jit(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1,) + shape)))()
      nets[key] = (model, variables, None)
  lat = costs.compare_latency(nets, 64, shape, repeats=repeats, rounds=rounds)
  for r, key in zip(rows, key_of):
    r['latency_ms_b64'] = lat[key]['median']


def _mean_spread(values):
  if len(values) == 1:
    return values[0], 0.0
  return statistics.mean(values), statistics.stdev(values)


def _cell(values, digits: int) -> str:
  """Mean +- spread over seeds; one seed has no spread to show (not 0), an untimed run no value."""
  timed = [v for v in values if not math.isnan(v)]
  if not timed:
    return 'not timed'
  of = f' ({len(timed)} of {len(values)} timed)' if len(timed) < len(values) else ''
  if len(timed) == 1:
    return f'{timed[0]:.{digits}f}{of}'
  m, sd = _mean_spread(timed)
  return f'{m:.{digits}f} +- {sd:.{digits}f}{of}'


def stream_widths(rows) -> str:
  """Mean widths of the residual-stream groups (ResNet: ``stageN``, no block in the name) over
  ``rows``, e.g. ``16/24/48``; the baseline's (no widths recorded) are the full ones."""
  from taylor_jax import models
  per_row = [r['_widths'] or models.full_widths(r['_model']) for r in rows]
  names = sorted(k for k in per_row[0] if k.startswith('stage') and '.' not in k)
  if not names:
    return '-'
  return '/'.join(f'{statistics.mean(w[n] for w in per_row):.0f}' for n in names)


def markdown(rows, command: str, args, missing=()) -> str:
  lines = ['# CVPR\'19 methods on Fashion-MNIST ResNet-20', '',
           f'Command: `{command}`', '',
           f'Budget: baseline {args.epochs} epochs + {args.finetune_epochs} fine-tuning epochs '
           f'(from-scratch methods: {args.epochs + args.finetune_epochs} epochs in all)'
           + (f', {args.limit_examples} training examples' if args.limit_examples else '')
           + '. Mean +- standard deviation over seeds (one seed: its value); FLOPs are MACs of '
           'one example; wall time of the run itself (the shared baseline not included). Latency: '
           + ('every width set re-timed after the runs, one after another in one process '
              '(--remeasure_latency; costs.compare_latency: 3 rounds of 30 batch-64 forwards, '
              'the least disturbed round)'
              if args.remeasure_latency else 'as measured at the end of each run') + '.'
           + ' Residual streams: the widths of the groups that are whole residual streams '
           '(ResNet: `stageN`).'
           + (f' Baselines: `{args.baseline_dir}`.' if args.baseline_dir else ''), '',
           '| method | target | seeds | test accuracy (%) | FLOPs reduction (%) | params | '
           'residual streams (mean widths) | latency b64 (ms) | wall (s) |',
           '|---|---|---|---|---|---|---|---|---|']
  keys = sorted({(r['method'], r['flops_reduction']) for r in rows},
                key=lambda k: (k[1], k[0] != 'baseline', k[0]))
  for method, red in keys:
    rs = [r for r in rows if r['method'] == method and r['flops_reduction'] == red]
    par = statistics.mean(r['params'] for r in rs)
    wall = statistics.mean(r['wall_s'] for r in rs)
    lines.append(f"| {method} | {red:.0%} | {len(rs)} | "
                 f"{_cell([100 * r['test_accuracy'] for r in rs], 2)} | "
                 f"{_cell([100 * (1 - r['flops'] / r['_full_flops']) for r in rs], 1)} | "
                 f"{par:,.0f} | {stream_widths(rs)} | "
                 f"{_cell([r['latency_ms_b64'] for r in rs], 2)} | {wall:.0f} |")
  notes = sorted({f"{r['method']} {r['flops_reduction']:.0%} seed {r['seed']}: {r['_wall_note']}"
                  for r in rows if r.get('_wall_note')})
  if notes:
    lines += ['', 'Wall-time corrections (wall_s.json of the run says why):', '']
    lines += [f'- {n}' for n in notes]
  if missing:
    lines += ['', 'Not measured (--recorded_only: neither recorded nor finished on the machine '
              'that wrote this table; the means above are over the seeds measured):', '',
              ', '.join(f'{label} {red:.0%} seed {seed}' for label, red, seed in missing) + '.']
  return '\n'.join(lines) + '\n'


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, method in enumerate(sorted({r['method'] for r in rows})):
    pts = {}
    for r in rows:
      if r['method'] == method:
        pts.setdefault(r['flops_reduction'], []).append(r)
    xs, ys, xe, ye = [], [], [], []
    for red in sorted(pts):
      f = _mean_spread([r['flops'] / 1e6 for r in pts[red]])
      a = _mean_spread([100 * r['test_accuracy'] for r in pts[red]])
      xs.append(f[0]), xe.append(f[1]), ys.append(a[0]), ye.append(a[1])
    style = {'fmt': 'k*'} if method == 'baseline' else {'fmt': 'o-', 'color': f'C{i}'}
    ax.errorbar(xs, ys, xerr=xe, yerr=ye, ms=7, capsize=3, label=method, **style)
  ax.set_xlabel('FLOPs (M MACs per example)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('Fashion-MNIST ResNet-20: accuracy vs FLOPs (mean +- std over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--methods', default=','.join(ALL))
  p.add_argument('--reductions', default='0.4,0.6')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--other_seeds', default=None,
                 help='seeds of every method after the first (default: --seeds); a CPU budget '
                 'cuts the seeds of the compared criteria before those of the studied one')
  p.add_argument('--epochs', type=float, default=15.0, help='baseline training epochs')
  p.add_argument('--finetune_epochs', type=float, default=3.0)
  p.add_argument('--limit_examples', type=int, default=None, help='training examples used')
  p.add_argument('--limit_eval_examples', type=int, default=None)
  p.add_argument('--data_dir', default=None)
  p.add_argument('--override', action='append', default=[],
                 help='extra config override for every run, e.g. --override=train.batch_size=64')
  p.add_argument('--remeasure_latency', action='store_true',
                 help='re-time every result\'s widths here, one after another (quiet machine)')
  p.add_argument('--runs_dir', default=os.path.join(ROOT, 'runs', 'compare_methods'))
  p.add_argument('--baseline_dir', default=None,
                 help='finished baseline workdirs to start from, with {seed} (e.g. '
                      'experiments/converged_baselines.py\'s); default: trained in --runs_dir')
  p.add_argument('--recorded_only', action='store_true',
                 help='run nothing: write the tables from the runs finished (recorded under '
                      '<results_dir>/runs, or finished here) and list the others as not measured')
  p.add_argument('--results_dir', default=os.path.join(ROOT, 'experiments', 'results'))
  p.add_argument('--results_name', default='methods_comparison',
                 help='results are written to <results_dir>/<results_name>.{csv,md,png}')
  args = p.parse_args(argv)
  command = shlex.join(['python', 'experiments/compare_methods.py', *(argv or sys.argv[1:])])
  methods = available_methods([m for m in args.methods.split(',') if m])
  reductions = [float(r) for r in args.reductions.split(',')]
  seeds = [int(s) for s in args.seeds.split(',')]
  other_seeds = seeds if args.other_seeds is None else [int(s) for s in args.other_seeds.split(',')]
  seeds_of = {m: (seeds if i == 0 else other_seeds) for i, m in enumerate(methods)}
  seeds = sorted(set(seeds) | set(other_seeds))
  os.makedirs(args.runs_dir, exist_ok=True)
  os.makedirs(args.results_dir, exist_ok=True)
  base_of = {seed: (os.path.expanduser(args.baseline_dir.format(seed=seed)) if args.baseline_dir
                    else os.path.join(args.runs_dir, f'baseline_s{seed}')) for seed in seeds}
  plan = []  # (label, reduction, seed, flags, workdir, report key), in running order
  for seed in seeds:
    base = base_of[seed]
    if any(parse_method(m)[0] in FROM_TRAINED for m in methods):
      plan.append(('baseline', 0.0, seed, baseline_command(args, seed, base), base, 'baseline'))
    for method in methods:
      for red in (reductions if seed in seeds_of[method] else []):
        wd = os.path.join(args.runs_dir, f'{run_name(method)}_r{round(red * 100)}_s{seed}')
        plan.append((method, red, seed, method_command(args, method, red, seed, wd, base), wd,
                     'pruned'))
  # Rows of finished runs committed by an earlier session whose workdirs are not on this machine.
  recorded = {wd: read_record(args.results_dir, wd, flags, base_of[seed])
              for _, _, seed, flags, wd, _ in plan}
  missing = []
  if args.recorded_only:  # e.g. runs whose baseline was lost with a machine: listed, not run
    def finished(wd):
      return recorded[wd] is not None or os.path.exists(os.path.join(wd, 'report.json'))
    missing = [(label, red, seed) for label, red, seed, _, wd, _ in plan if not finished(wd)]
    plan = [x for x in plan if finished(x[4])]
  seeds_to_run = {seed for _, _, seed, _, wd, _ in plan if recorded[wd] is None}
  if args.baseline_dir:  # checked before any run starts: a typo must not cost hours
    for seed in sorted(seeds_to_run):
      base = base_of[seed]
      if not os.path.exists(os.path.join(base, 'report.json')):
        raise SystemExit(f'--baseline_dir: {base} has no report.json (finish that baseline '
                         'first, e.g. with experiments/converged_baselines.py)')
      with open(os.path.join(base, 'report.json')) as f:
        epochs = json.load(f)['config']['train']['epochs']
      if abs(epochs - args.epochs) > 1e-9:
        raise SystemExit(f'--baseline_dir: {base} was trained {epochs:g} epochs, --epochs='
                         f'{args.epochs:g}: pass --epochs={epochs:g} (SNIP and variational '
                         'train from scratch for epochs + finetune_epochs)')
  # A --baseline_dir run is another script's (converged_baselines.py: its own flags), checked
  # above by its report; the workdirs this script runs are checked before the first run starts.
  external = {base_of[s] for s in seeds} if args.baseline_dir else set()
  for *_, flags, wd, _ in plan:
    if wd not in external:
      check_same_run(flags, wd)
  rows = []
  with open(os.path.join(args.runs_dir, 'commands.txt'), 'a') as log:
    for label, red, seed, flags, wd, key in plan:
      if recorded[wd] is not None:
        rows.append(recorded[wd])
        continue
      if wd not in external:
        run_main(flags, wd, log)
      rows.append(row(label, red, seed, wd, key))
      write_record(args.results_dir, wd, flags, rows[-1])
  if args.remeasure_latency:
    remeasure_latency(rows)
  csv_path = os.path.join(args.results_dir, f'{args.results_name}.csv')
  with open(csv_path, 'w', newline='') as f:
    w = csv.DictWriter(f, COLUMNS, extrasaction='ignore')
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(args.results_dir, f'{args.results_name}.md'), 'w') as f:
    f.write(markdown(rows, command, args, missing))
  plot(rows, os.path.join(args.results_dir, f'{args.results_name}.png'))
  print(open(os.path.join(args.results_dir, f'{args.results_name}.md')).read())


if __name__ == '__main__':
  main()
