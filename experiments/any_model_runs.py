"""Models that are not in the zoo, pruned end to end by the main job with discovered groups.

Runs ``python -m taylor_jax.main --config=configs/fashion_mnist_<name>.py`` for every example
model (plain Flax code in taylor_jax/models/examples/, Linen and NNX) and writes
``experiments/results/any_model.{json,md}``: groups found, prunable, marked (normalised over
their channels), the surgered-vs-masked probe before training, FLOPs cut, accuracy change and
latency. Resumable: a run whose workdir holds report.json is read, an unfinished one resumes.

  python experiments/any_model_runs.py [--names concat_cnn,...] [--runs_dir DIR] [-- extra flags]

Extra flags after ``--`` go to every run (e.g. ``--config.train.limit_examples=2000`` for a smoke
run into another ``--runs_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('concat_cnn', 'mobilenet_v2_linen', 'mobilenet_v2_nnx', 'vit_tiny_linen', 'vit_tiny_nnx')


def _read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_one(name, runs_dir, extra):
  workdir = os.path.join(runs_dir, name)
  report = os.path.join(workdir, 'report.json')
  if not os.path.exists(report):
    cmd = [sys.executable, '-m', 'taylor_jax.main', f'--config=configs/fashion_mnist_{name}.py',
           f'--workdir={workdir}', *extra]
    print('+', shlex.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, 'wall_s.json'), 'a') as f:
      f.write(json.dumps({'wall_s': time.time() - t0}) + '\n')
  with open(report) as f:
    rep = json.load(f)
  metrics = _read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  check = [m for m in metrics if m.get('phase') == 'group_check']
  walls = _read_jsonl(os.path.join(workdir, 'wall_s.json'))
  b, p = rep['baseline'], rep['pruned']
  return {'name': name, 'model': rep['config']['model'],
          'groups': check[0]['groups'] if check else None,
          'prunable': check[0]['prunable'] if check else None,
          'marked': check[0]['marked'] if check else None,
          'probe_max_rel_diff': check[0]['probe_max_rel_diff'] if check else None,
          'baseline_accuracy': b['test_accuracy'], 'pruned_accuracy': p['test_accuracy'],
          'flops_cut': 1 - p['flops'] / b['flops'], 'params_cut': 1 - p['params'] / b['params'],
          'latency_b64_ms': [b.get('latency_ms_b64'), p.get('latency_ms_b64')],
          'widths': p.get('widths'),
          'epochs': [rep['config']['train']['epochs'], rep['config']['prune']['finetune_epochs']],
          # every invocation of a resumed run (the runner's own record misses killed ones)
          'wall_s': max([m['wall_s'] for m in metrics if 'wall_s' in m]
                        + [sum(w['wall_s'] for w in walls)])}


def remeasure_latency(rows, runs_dir, repeats: int = 30, rounds: int = 5) -> None:
  """Re-times every run's full and pruned network at batch 64 here, in one process, in turn
  (costs.compare_latency: ``rounds`` rounds of ``repeats``, the least disturbed round's median):
  the runs timed theirs while other jobs shared the CPU, and the earliest ones before latency was
  compiled with XLA's default optimisation (commit 05e7451). Latency depends on the widths only,
  so the full network runs freshly initialised."""
  import jax
  import numpy as np
  from taylor_jax import costs, models, run
  from taylor_jax.models import common
  for r in rows:
    model, state, meta = run.restore(os.path.join(runs_dir, r['name']))
    shape = tuple(meta['input_shape'])
    full = models.create(meta['model'], meta['num_classes'], None, input_shape=shape)
    nets = {'full': (full, common.run_once(full.init, jax.random.key(0),
                                           np.zeros((1,) + shape, np.float32)), None),
            'pruned': (model, {'params': state.params, 'batch_stats': state.batch_stats},
                       None if all(np.all(np.asarray(m) == 1) for m in
                                   jax.device_get(state.masks).values()) else state.masks)}
    lat = costs.compare_latency(nets, 64, shape, repeats=repeats, rounds=rounds)
    r['latency_b64_ms'] = [lat['full']['median'], lat['pruned']['median']]
    r['latency_remeasured'] = True
    print(f"{r['name']}: {r['latency_b64_ms'][0]:.2f} -> {r['latency_b64_ms'][1]:.2f} ms",
          flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--names', default=','.join(NAMES))
  ap.add_argument('--runs_dir', default=os.path.expanduser('~/taylor_jax_runs/any_model'))
  ap.add_argument('--results_dir', default=os.path.join(ROOT, 'experiments', 'results'))
  ap.add_argument('--remeasure_latency', action='store_true',
                  help='after the runs, re-time every full and pruned network here in turn')
  args, extra = ap.parse_known_args()
  extra = [e for e in extra if e != '--']
  command = shlex.join(['python', 'experiments/any_model_runs.py', *sys.argv[1:]])
  rows = []
  for name in args.names.split(','):  # results rewritten after every run: a long study resumes
    rows.append(run_one(name, args.runs_dir, extra))
    write(rows, command, args.results_dir)
  if args.remeasure_latency:
    remeasure_latency(rows, args.runs_dir)
    write(rows, command, args.results_dir)


def write(rows, command, results_dir):
  args = argparse.Namespace(results_dir=results_dir)
  with open(os.path.join(args.results_dir, 'any_model.json'), 'w') as f:
    json.dump({'command': command, 'rows': rows}, f, indent=1)
  remeasured = any(r.get('latency_remeasured') for r in rows)
  lines = [f'Command: `{command}`', '',
           'Latency: batch 64, ' + ('full and pruned network re-timed in turn after the runs, in '
           'one process (costs.compare_latency, 5 rounds of 30, least disturbed round)'
           if remeasured else 'as each run measured it at its end (shared CPU)') + '. Wall: '
           'every invocation of the run, pauses and CPU sharing with other jobs included.', '',
           '| model | groups | prunable | marked | probe diff | baseline acc | pruned acc | '
           'FLOPs cut | params cut | latency b64 (ms) | epochs (base+ft) | wall (s) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lat = r['latency_b64_ms']
    lines.append(
        f"| {r['model'].split('.')[-1]} | {r['groups']} | {r['prunable']} | "
        f"{len(r['marked'] or [])} | {r['probe_max_rel_diff']:.1e} | "
        f"{100 * r['baseline_accuracy']:.2f} | {100 * r['pruned_accuracy']:.2f} | "
        f"{100 * r['flops_cut']:.1f}% | {100 * r['params_cut']:.1f}% | "
        f"{lat[0]:.2f} -> {lat[1]:.2f} | {r['epochs'][0]:g}+{r['epochs'][1]:g} | "
        f"{r['wall_s']:.0f} |")
  with open(os.path.join(args.results_dir, 'any_model.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
