"""Converged ResNet-20 baselines on Fashion-MNIST, with their learning curves.

Each run is the main job's baseline config (``configs/fashion_mnist_baseline.py``: SGD momentum
0.9, lr 0.1, weight decay 5e-4, cosine schedule, batch 128, pad-4 crop + flip) for a budget of
``E`` epochs, seed ``S``, evaluated on the whole test split after every epoch
(``train.eval_every_epochs=1``). The budget of the pruning study is read off these curves: the
smallest budget whose final test accuracy is within ``--within`` (points) of the largest
budget's, same seed.

  python experiments/converged_baselines.py --runs=15:0,30:0,chosen:1,chosen:2 \\
      --runs_dir=$HOME/taylor_jax_runs/converged

``chosen:S`` trains seed ``S`` for the budget the rule chose for the first seed of the runs
before it (decided when those have finished; a clear error if they cannot decide it).

Resumable (compare_methods.run_main: a finished run is read, an unfinished one resumes from its
last checkpoint). Writes ``converged_baselines.{csv,md,png}`` under ``--results_dir`` after every
finished run; a run still going is listed with its last curve point.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import compare_methods  # noqa: E402  (run_main: resumable runs with wall-time bookkeeping)


def workdir(runs_dir: str, epochs: float, seed: int) -> str:
  return os.path.join(runs_dir, f'resnet20_e{epochs:g}_s{seed}')


def command(epochs: float, seed: int, wd: str, extra: list[str]) -> list[str]:
  return ['--config=configs/fashion_mnist_baseline.py', f'--workdir={wd}',
          f'--config.train.epochs={epochs:g}', f'--config.seed={seed}',
          '--config.train.eval_every_epochs=1', *extra]


def curve(wd: str) -> list[dict]:
  """The ``baseline_curve`` records of a run so far (a resumed run may repeat a step: the last
  record of each step is kept)."""
  path = os.path.join(wd, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r.get('phase') == 'baseline_curve':
        by_step[r['step']] = r
  return [by_step[s] for s in sorted(by_step)]


def committed(results_dir: str) -> dict:
  """The finished runs recorded in ``converged_baselines.csv`` under ``results_dir``: their curve
  rows and wall, by ``(epochs, seed)``. A session's machine may be a fresh one, whose runs
  directory lacks the workdirs of runs finished (and committed) by earlier sessions."""
  path = os.path.join(results_dir, 'converged_baselines.csv')
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path) as f:
    for r in csv.DictReader(f):
      if r['finished'] != 'True':
        continue  # an unfinished run restarts from its workdir or from scratch
      run = out.setdefault((float(r['budget_epochs']), int(r['seed'])),
                           {'rows': [], 'run_wall_s': float(r['run_wall_s'])})
      run['rows'].append({k: (float(v) if k in ('epoch', 'test_accuracy', 'test_loss', 'wall_s')
                              else v) for k, v in r.items()})
  return out


def summarise(runs, runs_dir: str, within: float, recorded: Optional[dict] = None) -> dict:
  """Curves, finals and walls of ``runs``: from their workdirs, or, for a finished run whose
  workdir is gone, from ``recorded`` (:func:`committed`)."""
  rows, finals, walls = [], {}, {}
  for epochs, seed in runs:
    wd = workdir(runs_dir, epochs, seed)
    points = curve(wd)
    if not points and (epochs, seed) in (recorded or {}):
      old = recorded[(epochs, seed)]
      rows += [dict(r, budget_epochs=epochs, seed=seed, finished=True) for r in old['rows']]
      finals[(epochs, seed)] = old['rows'][-1]['test_accuracy']  # the report's final accuracy
      walls[(epochs, seed)] = old['run_wall_s']
      continue
    done = os.path.exists(os.path.join(wd, 'report.json'))
    wall = compare_methods.total_wall_s(wd)
    for p in points:
      rows.append({'budget_epochs': epochs, 'seed': seed, 'epoch': round(p['epoch'], 4),
                   'test_accuracy': p['test_accuracy'], 'test_loss': p['test_loss'],
                   'wall_s': round(p['wall_s'], 1), 'finished': done,
                   'run_wall_s': round(wall, 1)})
    walls[(epochs, seed)] = wall
    if done:
      with open(os.path.join(wd, 'report.json')) as f:
        finals[(epochs, seed)] = json.load(f)['baseline']['test_accuracy']
  choice = {}
  for seed in sorted({s for _, s in finals}):
    budgets = sorted(e for e, s in finals if s == seed)
    if len(budgets) >= 2:
      best = finals[(budgets[-1], seed)]
      choice[seed] = next(e for e in budgets if finals[(e, seed)] >= best - within / 100)
  return {'rows': rows, 'finals': finals, 'choice': choice, 'walls': walls}


def markdown(summary, runs, runs_dir, within, cmd) -> str:
  finals = summary['finals']
  lines = ['# Converged ResNet-20 baselines (Fashion-MNIST)', '',
           f'Command: `{cmd}`', '',
           'Recipe: configs/fashion_mnist_baseline.py (SGD 0.9, lr 0.1 cosine, wd 5e-4, batch '
           '128, pad-4 crop + flip); test accuracy on the 10,000 test images after every epoch.',
           '', '| budget (epochs) | seed | final test accuracy | best epoch (accuracy) | wall, all '
           'sessions |',
           '|---|---|---|---|---|']
  for epochs, seed in runs:
    pts = [r for r in summary['rows'] if r['budget_epochs'] == epochs and r['seed'] == seed]
    if not pts:
      lines.append(f'| {epochs:g} | {seed} | not started | | |')
      continue
    best = max(pts, key=lambda r: r['test_accuracy'])
    final = finals.get((epochs, seed))
    state = (f'{100 * final:.2f}%' if final is not None else
             f'running: epoch {pts[-1]["epoch"]:g}, {100 * pts[-1]["test_accuracy"]:.2f}%')
    lines.append(f'| {epochs:g} | {seed} | {state} | {best["epoch"]:g} '
                 f'({100 * best["test_accuracy"]:.2f}%) | '
                 f'{summary["walls"][(epochs, seed)] / 60:.0f} min |')
  by_budget = {}
  for (e, _), a in finals.items():
    by_budget.setdefault(e, []).append(a)
  if by_budget:
    lines += ['', '| budget | seeds | mean | spread (sd) |', '|---|---|---|---|']
    for e in sorted(by_budget):
      a = by_budget[e]
      sd = statistics.stdev(a) if len(a) > 1 else float('nan')
      lines.append(f'| {e:g} | {len(a)} | {100 * statistics.mean(a):.2f}% | '
                   f'{100 * sd:.2f} |')
  lines += ['', 'Wall: summed over every process of the run (resumed across sessions), on a '
            'CPU shared with other jobs, pauses included; one epoch alone took ~225 s on the '
            'machine of seed 0, ~170 s on that of seed 1.']
  lines += ['', f'Rule: the smallest budget whose final accuracy is within {within} points of the '
            'largest budget\'s (same seed).']
  for seed, e in summary['choice'].items():
    lines.append(f'- seed {seed}: **{e:g} epochs**')
  if not summary['choice']:
    lines.append('- not decided yet (needs two finished budgets of one seed)')
  lines += ['', f'Workdirs: `{runs_dir}/resnet20_e<E>_s<S>` (not committed); curves: '
            'converged_baselines.csv / .png.']
  return '\n'.join(lines) + '\n'


def plot(summary, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  keys = sorted({(r['budget_epochs'], r['seed']) for r in summary['rows']})
  for e, s in keys:
    pts = [r for r in summary['rows'] if (r['budget_epochs'], r['seed']) == (e, s)]
    ax.plot([r['epoch'] for r in pts], [100 * r['test_accuracy'] for r in pts], '.-',
            label=f'{e:g}-epoch cosine, seed {s}')
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.set_ylim(80, 95)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title('ResNet-20, Fashion-MNIST: test accuracy during training')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(summary, runs, args, cmd) -> None:
  os.makedirs(args.results_dir, exist_ok=True)
  base = os.path.join(args.results_dir, 'converged_baselines')
  with open(base + '.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, ['budget_epochs', 'seed', 'epoch', 'test_accuracy', 'test_loss',
                           'wall_s', 'finished', 'run_wall_s'])
    w.writeheader()
    w.writerows(summary['rows'])
  with open(base + '.md', 'w') as f:
    f.write(markdown(summary, runs, args.runs_dir, args.within, cmd))
  if summary['rows']:
    plot(summary, base + '.png')


def parse_runs(spec: str) -> list[tuple[Optional[float], int]]:
  """``E:S,...``; ``chosen:S`` (budget ``None``): the budget the rule chooses."""
  out = []
  for item in spec.split(','):
    try:
      e, s = item.split(':')
      out.append((None if e == 'chosen' else float(e), int(s)))
    except ValueError:
      raise SystemExit(f'--runs: {item!r} is not budget_epochs:seed or chosen:seed') from None
  if out and out[0][0] is None:
    raise SystemExit('--runs: chosen:S needs finished fixed budgets before it (e.g. 15:0,30:0,chosen:1)')
  return out


def resolve(done: list[tuple[float, int]], runs_dir: str, within: float,
            recorded: dict) -> Optional[float]:
  """The budget the rule chose for the first seed of ``done``; None while it cannot decide."""
  return summarise(done, runs_dir, within, recorded)['choice'].get(done[0][1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--runs', default='15:0,30:0', help='budget_epochs:seed,...')
  p.add_argument('--within', type=float, default=0.3, help='points of test accuracy')
  p.add_argument('--runs_dir', default=os.path.expanduser('~/taylor_jax_runs/converged'))
  p.add_argument('--results_dir', default=os.path.join(ROOT, 'experiments', 'results'))
  p.add_argument('--summarise_only', action='store_true', help='write the results, run nothing')
  args, extra = p.parse_known_args(argv)
  extra = [e for e in extra if e != '--']
  cmd = shlex.join(['python', 'experiments/converged_baselines.py',
                    *(argv if argv is not None else sys.argv[1:])])
  spec = parse_runs(args.runs)
  os.makedirs(args.runs_dir, exist_ok=True)
  recorded = committed(args.results_dir)
  runs = []  # resolved so far
  with open(os.path.join(args.runs_dir, 'commands.txt'), 'a') as log:
    for epochs, seed in spec:
      if epochs is None:
        epochs = resolve(runs, args.runs_dir, args.within, recorded)
        if epochs is None:
          if args.summarise_only:
            break
          raise SystemExit(
              f'--runs: chosen:{seed} needs two finished budgets of seed {runs[0][1]} before '
              f'it; finished: {sorted(summarise(runs, args.runs_dir, args.within, recorded)["finals"])}')
      runs.append((epochs, seed))
      wd = workdir(args.runs_dir, epochs, seed)
      if (epochs, seed) in recorded and not os.path.exists(wd):
        print(f'{epochs:g} epochs, seed {seed}: finished in an earlier session (read from '
              f'{args.results_dir}/converged_baselines.csv; its workdir {wd} is not on this '
              'machine: delete its rows there to train it again)', flush=True)
      elif not args.summarise_only:
        compare_methods.run_main(command(epochs, seed, wd, extra), wd, log)
      # Every committed run stays in the results, also those this command does not name.
      shown = runs + [k for k in recorded if k not in runs]
      write(summarise(shown, args.runs_dir, args.within, recorded), shown, args, cmd)
  print(open(os.path.join(args.results_dir, 'converged_baselines.md')).read())


if __name__ == '__main__':
  main()
