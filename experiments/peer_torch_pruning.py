"""Torch-Pruning side by side with taylor_jax, from identical weights and data (issue 15).

For taylor_jax pruning runs of one baseline (main-job workdirs started with
``train.init_checkpoint=BASELINE``, e.g. compare_methods.py's ``taylor_fo_bn_r40_s0``), this:

1. converts the baseline to the PyTorch twin (``experiments/torch_cifar_resnet.py``) and stops
   unless its logits on 1,000 test images agree with JAX's within 1e-4;
2. prunes the twin with Torch-Pruning (``MetaPruner``, global) at the JAX run's rate
   (``prune_per_iteration`` units every ``prune.frequency`` SGD steps at ``prune.learning_rate``)
   in ``--finer`` times smaller steps (the gradient of the last minibatch before a step feeds
   the Taylor importance), until its MACs (``costs.flops`` of the twin's widths: the count
   taylor_jax reports) reach the JAX run's; the optimizer is rebuilt after each step (its
   momentum is lost: Torch-Pruning replaces the pruned parameters);
3. fine-tunes with the run's fine-tuning optimizer and cosine schedule for as many SGD steps as
   the JAX run took from the baseline in all (pruning periods + fine-tuning), on the same batches
   (taylor_jax's input pipeline: same seed, order, crops and flips);
4. reports test accuracy, MACs, parameters, batch-64 latency (torch at the best of 1 and 2
   threads; JAX's networks timed in turn with ``costs.compare_latency``), latency cut per MACs
   cut, and wall times of pruning and fine-tuning.

  .venv/bin/pip install -r requirements-bench.txt
  PYTHONPATH=. .venv/bin/python experiments/peer_torch_pruning.py RUN_DIR [RUN_DIR ...] \\
      [--importances=taylor,magnitude,bn_scale] [--out=experiments/results/peer_torch_pruning]

Writes ``<out>.csv`` and ``<out>.md``; rows accumulate there over sessions (a run whose JAX
workdir is not on this machine keeps the rows an earlier session measured). Resumable: state
under ``--work`` (one folder per run and importance: the finished row, the pruned network, the
fine-tuning every 200 steps), so a killed study re-run with the same command continues where it
stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import compare_methods  # noqa: E402
import torch_cifar_resnet  # noqa: E402
from taylor_jax import costs, run  # noqa: E402
from taylor_jax.data import input_pipeline  # noqa: E402

# Torch-Pruning's importance classes by this script's name for them (imported where used, so the
# row bookkeeping below loads, and is tested, without the bench-only torch-pruning).
IMPORTANCES = {'taylor': 'GroupTaylorImportance', 'magnitude': 'GroupMagnitudeImportance',
               'bn_scale': 'BNScaleImportance'}


def _nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def widths_of(net: torch_cifar_resnet.CifarResNet, blocks_per_stage: int) -> dict[str, int]:
  """The zoo's group widths of a (pruned) twin."""
  w, i = {'stage1': net.stem[0].out_channels}, 0
  for s in (1, 2, 3):
    for b in range(blocks_per_stage):
      w[f'stage{s}.block{b}'] = net.blocks[i].conv1.out_channels
      w[f'stage{s}'] = net.blocks[i].conv2.out_channels
      i += 1
  return w


def splits(c, meta):
  kw = dict(data_dir=c.data_dir, mean=meta.get('data_mean'), std=meta.get('data_std'),
            process_index=0, process_count=1)
  train = input_pipeline.create_split(
      c.dataset, 'train', batch_size=c.train.batch_size, train=True, seed=c.seed,
      augment=c.train.augment, crop_pad=c.train.crop_pad, limit=c.train.limit_examples, **kw)
  test = input_pipeline.create_split(
      c.dataset, 'test', batch_size=c.train.eval_batch_size, train=False, seed=c.seed,
      limit=c.train.limit_eval_examples, **kw)
  return train, test


def batches_from(split, step: int):
  """The run's minibatches from global step ``step`` on (run._Job.batches_from's order)."""
  epoch, k = divmod(step, split.steps_per_epoch)
  while True:
    yield from split.batches(epoch, k)
    epoch, k = epoch + 1, 0


def accuracy(net, test) -> float:
  net.eval()
  correct = total = 0.0
  with torch.no_grad():
    for b in test.batches(0):
      w = np.asarray(b['weight'])
      pred = net(_nchw(b['image'])).argmax(1).numpy()
      correct += float(((pred == np.asarray(b['label'])) * w).sum())
      total += float(w.sum())
  return correct / total


def check_conversion(model, variables, net, test, tol: float = 1e-4) -> float:
  import jax
  f = jax.jit(lambda v, x: model.apply(v, x, train=False))
  worst, seen = 0.0, 0
  net.eval()
  for b in test.batches(0):
    with torch.no_grad():
      got = net(_nchw(b['image'])).numpy()
    worst = max(worst, float(np.abs(got - np.asarray(f(variables, b['image']))).max()))
    seen += len(got)
    if seen >= 1000:
      break
  if worst > tol:
    raise SystemExit(f'the PyTorch twin differs from the JAX baseline by {worst:.2e} > {tol}')
  return worst


def sgd(net, lr, c):
  return torch.optim.SGD(net.parameters(), lr=lr, momentum=c.optim.momentum,
                         weight_decay=c.optim.weight_decay,
                         nesterov=bool(c.optim.get('nesterov', False)))


def train_steps(net, opt, it, n, sched=None, after_step=None):
  """``n`` SGD steps on the next minibatches of ``it``; ``after_step(k)`` runs after step ``k``
  with its gradients still in place, and returns a new optimizer when it pruned (Torch-Pruning
  replaces the pruned parameters: the old optimizer, momentum included, no longer holds them)."""
  net.train()
  for k in range(n):
    b = next(it)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(_nchw(b['image'])),
                                             torch.from_numpy(np.asarray(b['label'])).long())
    loss.backward()
    opt.step()
    if sched is not None:
      sched.step()
    if after_step is not None:
      opt = after_step(k) or opt
  return opt


def torch_latencies(nets: dict, input_shape, batch=64, repeats=20, rounds=5) -> dict:
  """``{threads: {name: ms}}`` of eval forward passes of ``batch`` images, for 1 and 2 threads:
  the networks timed in turn, round after round (as costs.compare_latency), each network's
  median in its least disturbed round."""
  x = torch.randn(batch, input_shape[2], input_shape[0], input_shape[1])
  out = {}
  for net in nets.values():
    net.eval()
  for threads in (1, 2):
    torch.set_num_threads(threads)
    medians = {name: [] for name in nets}
    with torch.no_grad():
      for net in nets.values():
        for _ in range(3):
          net(x)
      for _ in range(rounds):
        for name, net in nets.items():
          times = []
          for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append((time.perf_counter() - t0) * 1e3)
          medians[name].append(float(np.median(times)))
    out[threads] = {name: min(m) for name, m in medians.items()}
  torch.set_num_threads(2)
  return out


def _save(obj, path: str) -> None:
  """Atomically: an interruption leaves the previous file or the new one, never half of one."""
  torch.save(obj, path + '.tmp')
  os.replace(path + '.tmp', path)


def _load(path: str):
  # The whole pruned module (Torch-Pruning changed its layers' shapes), not only a state dict.
  return torch.load(path, weights_only=False) if os.path.exists(path) else None


def side_by_side(run_dir: str, importance: str, iterative_steps, finer: int,
                 work: str, save_every: int = 200) -> dict:
  """One row; resumable from ``work``: the finished row, the network after pruning, and the
  fine-tuning every ``save_every`` SGD steps (network, optimizer, schedule, step) are saved
  there atomically. An interrupted pruning phase restarts (it is the short part)."""
  import torch_pruning as tp
  os.makedirs(work, exist_ok=True)
  options = {'run_dir': os.path.abspath(run_dir), 'importance': importance,
             'iterative_steps': iterative_steps, 'finer': finer}
  opt_path = os.path.join(work, 'options.json')
  if os.path.exists(opt_path):  # state saved under other options must not be resumed
    with open(opt_path) as f:
      before = json.load(f)
    if before != options:
      raise SystemExit(f'--work: {work} holds a run with {before}, not {options}: pass another '
                       '--work, or delete that folder to start this one afresh')
  else:
    with open(opt_path, 'w') as f:
      json.dump(options, f)
  row_path = os.path.join(work, 'row.json')
  if os.path.exists(row_path):
    with open(row_path) as f:
      return json.load(f)
  with open(os.path.join(run_dir, 'report.json')) as f:
    rep = json.load(f)
  import ml_collections
  c = ml_collections.ConfigDict(rep['config'])
  base_dir = c.train.init_checkpoint
  model, state, meta = run.restore(base_dir)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  shape = tuple(meta['input_shape'])
  train, test = splits(c, meta)
  net = torch_cifar_resnet.from_jax(model, variables)
  diff = check_conversion(model, variables, net, test)
  full_macs = costs.flops(model, shape)
  target = rep['pruned']['flops']
  base_step = rep['baseline']['step']
  total_steps = rep['pruned']['step'] - base_step
  it = batches_from(train, base_step)

  # Pruning: a Torch-Pruning step after every `frequency` SGD steps, until the JAX run's MACs.
  torch.manual_seed(c.seed)
  # Torch-Pruning removes units at the JAX run's rate (prune_per_iteration every frequency
  # steps) in `finer` times smaller steps, so that it stops within a small step of the MACs.
  period = max(1, c.prune.frequency // finer)
  if iterative_steps is None:
    units = sum(model.widths[g.name] for g in model.groups() if g.prunable)
    iterative_steps = max(1, round(0.9 * units / c.prune.prune_per_iteration * c.prune.frequency
                                   / period))
  pruner = tp.pruner.MetaPruner(net, torch.zeros((1, shape[2], shape[0], shape[1])),
                                importance=getattr(tp.importance, IMPORTANCES[importance])(),
                                global_pruning=True,
                                pruning_ratio=0.9, iterative_steps=iterative_steps,
                                ignored_layers=[net.head])
  saved = _load(os.path.join(work, 'pruned.pt'))
  macs, steps = [full_macs], [0]

  def after_step(k):
    steps[0] += 1
    if (k + 1) % period or macs[-1] <= target:
      return None
    pruner.step()  # Taylor: this minibatch's gradients (still in .grad) times the weights
    macs.append(costs.flops(model.clone(widths=widths_of(net, model.blocks_per_stage)), shape))
    return sgd(net, c.prune.learning_rate, c)

  if saved is None:
    t0 = time.time()
    opt = sgd(net, c.prune.learning_rate, c)
    while (macs[-1] > target and steps[0] < total_steps and
           pruner.current_step < iterative_steps):
      opt = train_steps(net, opt, it, period, after_step=after_step)
    saved = {'net': net, 'macs': macs, 'prune_steps': steps[0],
             'prune_wall': time.time() - t0}
    _save(saved, os.path.join(work, 'pruned.pt'))
  net, macs, prune_steps, prune_wall = (saved['net'], saved['macs'], saved['prune_steps'],
                                        saved['prune_wall'])

  # Fine-tuning: the rest of the JAX run's SGD steps, its fine-tuning lr with a cosine schedule.
  n_ft = max(total_steps - prune_steps, 0)
  ft = _load(os.path.join(work, 'finetune.pt'))
  net = net if ft is None else ft['net']
  opt = sgd(net, c.prune.finetune_learning_rate, c)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, n_ft) / max(n_ft, 1))))
  done, ft_wall = 0, 0.0
  if ft is not None:
    opt.load_state_dict(ft['opt'])
    sched.load_state_dict(ft['sched'])
    done, ft_wall = ft['done'], ft['wall']
    torch.set_rng_state(ft['rng'])
  it = batches_from(train, base_step + prune_steps + done)
  while done < n_ft:
    n = min(save_every, n_ft - done)
    t0 = time.time()
    train_steps(net, opt, it, n, sched=sched)
    done, ft_wall = done + n, ft_wall + time.time() - t0
    _save({'net': net, 'opt': opt.state_dict(), 'sched': sched.state_dict(), 'done': done,
           'wall': ft_wall, 'rng': torch.get_rng_state()}, os.path.join(work, 'finetune.pt'))

  full_net = torch_cifar_resnet.from_jax(model, variables)
  lat = torch_latencies({'full': full_net, 'pruned': net}, shape)
  best = min((1, 2), key=lambda t: lat[t]['full'] + lat[t]['pruned'])
  small_model, small_state, _ = run.restore(run_dir)
  jax_lat = costs.compare_latency(
      {'full': (model, variables, None),
       'pruned': (small_model, {'params': small_state.params,
                                'batch_stats': small_state.batch_stats}, None)},
      64, shape, repeats=20, rounds=3)
  jax_cut = 1 - jax_lat['pruned']['median'] / jax_lat['full']['median']
  torch_cut = 1 - lat[best]['pruned'] / lat[best]['full']
  jm, tm = 1 - target / full_macs, 1 - macs[-1] / full_macs
  row = {
      'run': os.path.basename(run_dir.rstrip('/')), 'importance': importance,
      'conversion_max_logit_diff': diff,
      'jax_accuracy': rep['pruned']['test_accuracy'], 'torch_accuracy': accuracy(net, test),
      'baseline_accuracy': rep['baseline']['test_accuracy'],
      'jax_macs_cut': jm, 'torch_macs_cut': tm,
      'jax_params': rep['pruned']['params'],
      'torch_params': int(sum(p.numel() for p in net.parameters())),
      'jax_latency_cut_per_macs_cut': jax_cut / jm, 'torch_latency_cut_per_macs_cut': torch_cut / tm,
      'jax_latency_ms_b64': [jax_lat['full']['median'], jax_lat['pruned']['median']],
      'torch_latency_ms_b64': [lat[best]['full'], lat[best]['pruned']],
      'torch_threads': best, 'torch_iterative_steps': iterative_steps,
      'jax_sgd_steps': total_steps,
      'torch_sgd_steps': prune_steps + n_ft, 'torch_prune_steps': len(macs) - 1,
      'jax_prune_wall_s': rep['timing']['prune_wall_s'],
      'jax_finetune_wall_s': rep['timing']['finetune_wall_s'],
      'torch_prune_wall_s': prune_wall, 'torch_finetune_wall_s': ft_wall,
      'jax_widths': rep['pruned']['widths'],
      'torch_widths': widths_of(net, model.blocks_per_stage)}
  with open(row_path + '.tmp', 'w') as f:
    json.dump(row, f)
  os.replace(row_path + '.tmp', row_path)
  return row


def paired_test(run_dir: str, work: str) -> dict:
  """McNemar's exact test of the two pruned, fine-tuned networks on the same test images: how
  many each gets right that the other gets wrong, and the two-sided p-value of that split
  (scipy.stats.binomtest); an accuracy gap within one test set's noise has a large p."""
  import jax
  import ml_collections
  from scipy import stats
  with open(os.path.join(run_dir, 'report.json')) as f:
    rep = json.load(f)
  c = ml_collections.ConfigDict(rep['config'])
  small_model, small_state, meta = run.restore(run_dir)
  _, test = splits(c, meta)
  ft = _load(os.path.join(work, 'finetune.pt'))
  net = (ft or _load(os.path.join(work, 'pruned.pt')))['net']
  net.eval()
  f = jax.jit(lambda v, x: small_model.apply(v, x, train=False))
  v = {'params': small_state.params, 'batch_stats': small_state.batch_stats}
  jax_only = torch_only = 0
  for b in test.batches(0):
    keep = np.asarray(b['weight']) > 0
    label = np.asarray(b['label'])
    j = np.asarray(f(v, b['image'])).argmax(1) == label
    with torch.no_grad():
      t = net(_nchw(b['image'])).argmax(1).numpy() == label
    jax_only += int((j & ~t & keep).sum())
    torch_only += int((t & ~j & keep).sum())
  p = stats.binomtest(jax_only, jax_only + torch_only, 0.5).pvalue if jax_only + torch_only else 1.0
  return {'jax_only_right': jax_only, 'torch_only_right': torch_only, 'mcnemar_p': float(p)}


def committed_rows(out: str) -> dict:
  """Rows of ``<out>.csv`` by ``(run, importance)``: a session's machine may be a fresh one,
  without the JAX runs and torch networks an earlier session measured (never committed)."""
  if not os.path.exists(out + '.csv'):
    return {}
  rows = {}
  with open(out + '.csv') as f:
    for r in csv.DictReader(f):
      for k, v in r.items():
        try:
          r[k] = json.loads(v)
        except ValueError:
          pass  # a plain string (run, importance)
      rows[(r['run'], r['importance'])] = r
  return rows


def _name(run_dir: str) -> str:
  return os.path.basename(run_dir.rstrip('/'))


def plan(runs, importances, done_before: dict, out: str, work: str):
  """What to measure here, what to read back, and what cannot be measured, before any work.

  Returns ``(todo, rows, unmeasurable)``: ``todo`` the (run_dir, importance) pairs to measure on
  this machine (a finished pair resumes from its row under --work); ``rows`` by (run,
  importance), every row of ``<out>.csv`` (rows an earlier command measured stay, so a command
  naming fewer runs or importances loses none); ``unmeasurable`` the pairs asked for whose JAX
  run is not on this machine and that were never measured. A run that is neither here nor in
  ``<out>.csv`` at all is an error: nothing of it can be reported.
  """
  todo, rows, unmeasurable = [], dict(done_before), []
  for run_dir in runs:
    name = _name(run_dir)
    if os.path.exists(os.path.join(run_dir, 'report.json')):
      for imp in importances:
        if (name, imp) in done_before and not os.path.exists(
            os.path.join(work, f'{name}_{imp}', 'row.json')):
          print(f'{name}, {imp}: measured again, replacing the row of {out}.csv (an earlier '
                f'session measured a run of that name this machine does not hold)', flush=True)
        todo.append((run_dir, imp))
      continue
    if not any(run == name for run, _ in done_before):
      raise SystemExit(f'{run_dir}: no finished pruning run there (report.json) and no row of '
                       f'it in {out}.csv; run it first (compare_methods.py) or drop it')
    for imp in importances:
      if (name, imp) in done_before:
        print(f'{name}, {imp}: read from {out}.csv (measured by an earlier session; '
              f'{run_dir} is not on this machine)', flush=True)
      else:
        unmeasurable.append((name, imp))
        print(f'{name}, {imp}: NOT measured: {run_dir} is not on this machine and no earlier '
              f'session measured it (the table says so)', flush=True)
  return todo, rows, unmeasurable


def mean_lines(rows) -> list[str]:
  """Per importance measured on more than one run (seeds): the mean accuracies and the mean
  and spread of the JAX - torch gap."""
  import statistics
  lines = []
  for imp in dict.fromkeys(r['importance'] for r in rows):
    rs = [r for r in rows if r['importance'] == imp]
    if len(rs) < 2:
      continue
    gap = [100 * (r['jax_accuracy'] - r['torch_accuracy']) for r in rs]
    lines.append(f"| mean of {len(rs)} | {imp} | "
                 f"{statistics.mean(100 * r['jax_accuracy'] for r in rs):.2f} | "
                 f"{statistics.mean(100 * r['torch_accuracy'] for r in rs):.2f} | JAX - TP: "
                 f"{statistics.mean(gap):+.2f} +- {statistics.stdev(gap):.2f} points | "
                 f"{statistics.mean(100 * r['jax_macs_cut'] for r in rs):.1f}% / "
                 f"{statistics.mean(100 * r['torch_macs_cut'] for r in rs):.1f}% | | | | |")
  return lines


def markdown(rows, cmd, unmeasurable=()) -> str:
  lines = ['# taylor_jax and Torch-Pruning from identical weights', '', f'Command: `{cmd}`', '',
           '| run | TP importance | acc JAX | acc TP | right only in JAX / TP (McNemar p) | '
           'MACs cut JAX / TP | params JAX / TP | '
           'latency cut / MACs cut JAX / TP | SGD steps JAX / TP | wall JAX run / TP prune+ft (s) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['importance']} | {100 * r['jax_accuracy']:.2f} | "
        f"{100 * r['torch_accuracy']:.2f} | {r['jax_only_right']} / {r['torch_only_right']} "
        f"({r['mcnemar_p']:.2f}) | {100 * r['jax_macs_cut']:.1f}% / "
        f"{100 * r['torch_macs_cut']:.1f}% | {r['jax_params']:,} / {r['torch_params']:,} | "
        f"{r['jax_latency_cut_per_macs_cut']:.2f} / {r['torch_latency_cut_per_macs_cut']:.2f} | "
        f"{r['jax_sgd_steps']} / {r['torch_sgd_steps']} | "
        f"{r['jax_run_wall_s']:.0f} / "
        f"{r['torch_prune_wall_s'] + r['torch_finetune_wall_s']:.0f} |")
  lines += mean_lines(rows)
  lines += ['', 'McNemar: test images only one of the two networks classifies right, and the '
            'exact two-sided p of that split (one seed: an accuracy gap with a large p is '
            'within one test set\'s noise). JAX wall: the pruning run summed over its processes '
            '(compare_methods.total_wall_s; pruning, fine-tuning, checks, latency timing). '
            'MACs of both frameworks counted by `taylor_jax.costs.flops` of the widths; '
            'torch latency at its best thread count (1 or 2); the twin\'s logits agree with '
            'JAX\'s within 1e-4 before anything runs (per row: conversion_max_logit_diff in '
            'the csv); widths per row in the csv.']
  if unmeasurable:
    lines += ['', 'Not measured (the JAX run and its baseline are not on the machine that ran '
              'this, and no earlier session measured them): '
              + ', '.join(f'{run} with {imp}' for run, imp in unmeasurable) + '.']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('runs', nargs='+')
  p.add_argument('--importances', default='taylor,magnitude,bn_scale')
  p.add_argument('--iterative_steps', type=int, default=None,
                 help='Torch-Pruning steps to a 90%% channel ratio (default: each step removes '
                      'about as many channels as the JAX run\'s prune.prune_per_iteration)')
  p.add_argument('--finer', type=int, default=4,
                 help='Torch-Pruning steps per JAX pruning period (same units per SGD step)')
  p.add_argument('--work', default=os.path.expanduser('~/taylor_jax_runs/peer_torch_pruning'),
                 help='resumable state, one folder per run and importance (not committed)')
  p.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results',
                                               'peer_torch_pruning'))
  args = p.parse_args(argv)
  cmd = shlex.join(['python', 'experiments/peer_torch_pruning.py',
                    *(argv if argv is not None else sys.argv[1:])])
  importances = args.importances.split(',')
  unknown = sorted(set(importances) - set(IMPORTANCES))
  if unknown:
    p.error(f'--importances: unknown {unknown}; choose from {sorted(IMPORTANCES)}')
  done_before = committed_rows(args.out)
  todo, rows, unmeasurable = plan(args.runs, importances, done_before, args.out, args.work)
  torch.set_num_threads(2)
  for run_dir, imp in todo:
    work = os.path.join(args.work, f'{_name(run_dir)}_{imp}')
    row = side_by_side(run_dir, imp, args.iterative_steps, args.finer, work)
    # Recomputed, not cached with the row: cheap, and added after the first rows were saved.
    rows[(row['run'], imp)] = {**row, **paired_test(run_dir, work),
                               'jax_run_wall_s': compare_methods.total_wall_s(run_dir)}
    print(json.dumps(rows[(row['run'], imp)]), flush=True)
  order = list(IMPORTANCES)
  rows = [rows[k] for k in sorted(rows, key=lambda k: (order.index(k[1]), k[0]))]
  with open(args.out + '.csv', 'w', newline='') as f:
    # Rows measured by earlier versions of this script may lack later columns.
    w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)), restval='')
    w.writeheader()
    for r in rows:
      w.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})
  with open(args.out + '.md', 'w') as f:
    f.write(markdown(rows, cmd, unmeasurable))
  print(markdown(rows, cmd, unmeasurable))


if __name__ == '__main__':
  main()
