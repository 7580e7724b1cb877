"""One-shot GPU suite: the project's speed targets measured in one command, in at most 8 minutes.

On the machine with a GPU (H100/H200), from the repository root:

  PYTHONPATH=. .venv/bin/python experiments/gpu_suite.py

writes experiments/results/gpu/gpu_suite.json (every measurement, per-section wall times, the
device and the jax version) and experiments/results/gpu/gpu_suite.md (one table per section, with
the targets). Sections, in order:

* ``throughput``: train-step images/s of ResNet-50 at 224x224 (synthetic data, batch 128), plain
  vs accumulating Taylor-FO-BN (the data-parallel step of the main job, steps interleaved);
* ``estimators``: the same on ResNet-20 (28x28x1, batch 128), plain vs Taylor-FO-BN vs Taylor-SO:
  FO overhead (target <= 5%) and SO / plain (target <= 3x);
* ``oracle``: the fast oracle of every ResNet-20 unit on 1,000 examples vs the naive loop of one
  forward per unit (target: naive / fast >= 5x);
* ``latency``: ResNet-50 pruned to 40% fewer FLOPs (random scores ranked globally, the engine's
  FLOPs-target step) with width alignment 1, 8 and 64, surgered, and timed against the full
  network (eval forward, batch 64): latency cut / FLOPs cut;
* ``discovery``: time to discover ResNet-50's channel groups from its jaxpr (224x224).

Weights are He-normal draws (untrained) and data is Gaussian noise: every measured quantity here
depends on shapes only. ``--smoke`` runs every section through the same code at tiny sizes
(ResNet-8 in place of both ResNet-20 and ResNet-50, batch 8, one timed step per variant) into
``--out`` (default: a fresh temporary directory), so it checks the suite on a CPU in well under
a minute without touching the GPU results. The full mode refuses to run without a GPU unless
``--allow_cpu`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import bench_discovery, bench_estimators  # noqa: E402
from taylor_jax import costs, engine, models, pruner, surgery  # noqa: E402

RESULTS = os.path.join(ROOT, 'experiments', 'results', 'gpu')
TOTAL_BUDGET_S = 480.0

# Sizes per mode. Smoke keeps every key and code path; only models and counts shrink. It uses
# ResNet-8 in both model slots: compiling the train steps is most of its time (a ResNet-50 step at
# 1/16 width takes ~25 s to compile on the 2-core CPU, a ResNet-18 one ~10 s), and with one model
# and one batch shape the throughput section's programs are the estimators section's too (the
# test suite's compilation cache then compiles them once).
FULL = dict(
    big='resnet50', big_width_div=1, big_shape=(224, 224, 3), big_classes=1000,
    big_batch=128, big_rounds=5, big_steps_per_round=3,
    small='resnet20', small_shape=(28, 28, 1), small_classes=10, small_batch=128,
    small_rounds=7, small_steps_per_round=3,
    oracle_examples=1000, oracle_batch=250, oracle_chunk=64, naive_units_per_group=2,
    # the main job's default tolerance: a FLOPs target lands in [40%, 45%]
    flops_cut=0.4, tolerance=pruner.Schedule().tolerance, aligns=(1, 8, 64),
    latency_batch=64, latency_rounds=5, latency_repeats=20, discovery_repeats=3,
    # seconds; a section's timed loops stop early past its budget (compiles cannot)
    budgets=dict(throughput=140, estimators=80, oracle=90, latency=140, discovery=20))
SMOKE = dict(
    big='resnet8', big_width_div=1, big_shape=(28, 28, 1), big_classes=10,
    big_batch=8, big_rounds=1, big_steps_per_round=1,
    small='resnet8', small_shape=(28, 28, 1), small_classes=10, small_batch=8,
    small_rounds=1, small_steps_per_round=1,
    oracle_examples=8, oracle_batch=8, oracle_chunk=32, naive_units_per_group=1,
    flops_cut=0.4, tolerance=pruner.Schedule().tolerance, aligns=(1, 8, 64),
    latency_batch=4, latency_rounds=1, latency_repeats=2, discovery_repeats=1,
    budgets=dict(throughput=12, estimators=12, oracle=8, latency=8, discovery=2))

TARGETS = {'fo_overhead': 0.05, 'so_ratio': 3.0, 'oracle_speedup': 5.0}


def _synthetic(n, shape, classes, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n,) + tuple(shape)).astype(np.float32),
          rng.integers(0, classes, n).astype(np.int32))


def _net(name, classes, shape, width_div=1):
  """A zoo model (widths divided by ``width_div``), its variables and all-ones masks."""
  widths = {k: max(1, v // width_div) for k, v in models.full_widths(name).items()}
  model = models.create(name, classes, widths)
  variables = bench_estimators.he_init(model, np.zeros((1,) + tuple(shape), np.float32))
  masks = {g.name: np.ones((g.width,), np.float32) for g in model.groups()}
  return model, variables, masks


def _step_times(model, variables, masks, x, y, rounds, steps_per_round, variants, deadline):
  times, compile_s = bench_estimators.time_steps(
      model, variables, masks, {'image': x, 'label': y}, rounds, steps_per_round,
      variants=variants, deadline=deadline)
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {'batch_size': len(y), 'rounds_run': len(times['plain']),
          'steps_per_round': steps_per_round, 'median_step_s': med,
          'images_per_s': {k: len(y) / v for k, v in med.items()},
          'compile_plus_first_step_s': compile_s,
          'fo_overhead': med['taylor_fo_bn'] / med['plain'] - 1.0}


def section_throughput(cfg, deadline):
  model, variables, masks = _net(cfg['big'], cfg['big_classes'], cfg['big_shape'],
                                 cfg['big_width_div'])
  x, y = _synthetic(cfg['big_batch'], cfg['big_shape'], cfg['big_classes'])
  out = {'model': cfg['big'], 'width_div': cfg['big_width_div'], 'input': list(cfg['big_shape'])}
  out.update(_step_times(model, variables, masks, x, y, cfg['big_rounds'],
                         cfg['big_steps_per_round'], ('plain', 'taylor_fo_bn'), deadline))
  return out


def section_estimators(cfg, deadline):
  model, variables, masks = _net(cfg['small'], cfg['small_classes'], cfg['small_shape'])
  x, y = _synthetic(cfg['small_batch'], cfg['small_shape'], cfg['small_classes'])
  out = {'model': cfg['small'], 'input': list(cfg['small_shape'])}
  out.update(_step_times(model, variables, masks, x, y, cfg['small_rounds'],
                         cfg['small_steps_per_round'], ('plain', 'taylor_fo_bn', 'taylor_so'),
                         deadline))
  out['so_ratio'] = out['median_step_s']['taylor_so'] / out['median_step_s']['plain']
  return out


def section_oracle(cfg, deadline):
  del deadline  # the oracle is one pass; its size is set by cfg
  model, variables, masks = _net(cfg['small'], cfg['small_classes'], cfg['small_shape'])
  x, y = _synthetic(cfg['oracle_examples'], cfg['small_shape'], cfg['small_classes'], seed=1)
  bs = cfg['oracle_batch']
  batches = [{'image': x[i:i + bs], 'label': y[i:i + bs]} for i in range(0, len(y), bs)]
  out = {'model': cfg['small'], 'input': list(cfg['small_shape'])}
  out.update(bench_estimators.time_oracle(model, variables, masks, batches, cfg['oracle_chunk'],
                                          cfg['naive_units_per_group']))
  return out


def _prune_to_flops(model, shape, scores, cut, constraints, tolerance, flops):
  """Masks with ``cut`` fewer FLOPs (within ``tolerance``), lowest ``scores`` first: the main
  job's cost-target step (engine.prune_lowest) with every removable unit allowed at once.
  ``flops``: masks -> MACs of the surgered network."""
  groups, full_widths = model.groups(), dict(model.widths)
  masks = {k: np.ones((w,), np.float32) for k, w in full_widths.items()}
  full_flops = flops(masks)
  excess = lambda m: flops(m) / full_flops - (1.0 - cut)
  for _ in range(10):  # a step ends short of the target when no chunk lands in the band
    if excess(masks) <= 0:
      break
    n = engine.removable_units(groups, full_widths, masks, constraints)
    masks = engine.prune_lowest(scores, masks, groups, full_widths, n, constraints,
                                excess=excess, tolerance=tolerance)
  if excess(masks) > 0:
    raise RuntimeError(f'pruning {model.__class__.__name__} to {cut:.0%} fewer FLOPs under '
                       f'{constraints} stopped at {1 - flops(masks) / full_flops:.1%}: the '
                       'constraints leave too few removable units')
  return masks, 1.0 - flops(masks) / full_flops


def section_latency(cfg, deadline):
  del deadline  # compare_latency's rounds are fixed by cfg
  shape = cfg['big_shape']
  model, variables, _ = _net(cfg['big'], cfg['big_classes'], shape, cfg['big_width_div'])
  groups = model.groups()
  # One random score per unit, the same for every alignment, so the width sets differ by the
  # alignment alone (latency depends on the widths, not on which units go).
  rng = np.random.default_rng(0)
  scores = {g.name: rng.random(g.width).astype(np.float32) for g in groups}
  cache: dict = {}

  def flops(masks):  # the step's bisection asks for the same width sets again; tracing is slow
    key = tuple(sorted(surgery.new_widths(model.widths, masks).items()))
    if key not in cache:
      cache[key] = costs.flops(model, shape, masks)
    return cache[key]

  nets = {'full': (model, variables, None)}
  rows = {}
  for align in cfg['aligns']:
    t, evals = time.perf_counter(), len(cache)
    masks, cut = _prune_to_flops(model, shape, scores, cfg['flops_cut'],
                                 engine.Constraints(align=align), cfg['tolerance'], flops)
    evals = len(cache) - evals
    small = model.clone(widths=surgery.new_widths(model.widths, masks))
    nets[f'align{align}'] = (small, surgery.shrink_variables(groups, variables, masks), None)
    rows[f'align{align}'] = {'align': align, 'flops_cut': cut, 'widths': dict(small.widths),
                             'width_search_s': time.perf_counter() - t, 'flops_evaluations': evals,
                             'widths_aligned': all(w % align == 0 for k, w in small.widths.items()
                                                   if model.widths[k] >= align)}
  lat = costs.compare_latency(nets, cfg['latency_batch'], shape, repeats=cfg['latency_repeats'],
                              rounds=cfg['latency_rounds'])
  full_ms = lat['full']['median']
  for name, row in rows.items():
    ms = lat[name]['median']
    row.update({'latency_ms': ms, 'latency_cut': 1.0 - ms / full_ms,
                'latency_cut_over_flops_cut': (1.0 - ms / full_ms) / row['flops_cut'],
                'round_medians_ms': lat[name]['round_medians']})
  return {'model': cfg['big'], 'width_div': cfg['big_width_div'], 'input': list(shape),
          'batch_size': cfg['latency_batch'], 'rounds': cfg['latency_rounds'],
          'repeats': cfg['latency_repeats'], 'target_flops_cut': cfg['flops_cut'],
          'full_latency_ms': full_ms, 'full_round_medians_ms': lat['full']['round_medians'],
          'full_flops': flops({k: np.ones((w,)) for k, w in model.widths.items()}),
          'pruned': rows}


def section_discovery(cfg, deadline):
  del deadline
  return {**bench_discovery.bench(cfg['big'], cfg['discovery_repeats']),
          'repeats': cfg['discovery_repeats']}


SECTIONS: list[tuple[str, Callable[[dict, float], dict]]] = [
    ('throughput', section_throughput), ('estimators', section_estimators),
    ('oracle', section_oracle), ('latency', section_latency), ('discovery', section_discovery)]


def run(smoke: bool, command: Optional[str] = None) -> dict:
  """Every section in order; each section's dict gains ``wall_s`` and ``budget_s``."""
  cfg = SMOKE if smoke else FULL
  t0 = time.perf_counter()
  devices = jax.devices()
  res: dict[str, Any] = {
      'mode': 'smoke' if smoke else 'full',
      'command': command or f'gpu_suite.run(smoke={smoke})',
      'backend': jax.default_backend(), 'devices': [str(d) for d in devices],
      'device_kind': devices[0].device_kind, 'jax': jax.__version__,
      'host': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cpus',
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_average_start': os.getloadavg(),
      'total_budget_s': TOTAL_BUDGET_S if not smoke else float(sum(cfg['budgets'].values())),
      'sections': {}}
  for name, fn in SECTIONS:
    budget = cfg['budgets'][name]
    start = time.perf_counter()
    print(f'[gpu_suite] {name} (budget {budget} s)', flush=True)
    out = fn(cfg, start + budget)
    out['wall_s'] = time.perf_counter() - start
    out['budget_s'] = budget
    res['sections'][name] = out
    print(f'[gpu_suite] {name}: {out["wall_s"]:.1f} s', flush=True)
  res['total_wall_s'] = time.perf_counter() - t0
  res['load_average_end'] = os.getloadavg()
  return res


def _f(v, spec='.4g'):
  return 'n/a' if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _mark(ok):
  return 'met' if ok else 'NOT met'


def markdown(res: dict) -> str:
  s = res['sections']
  lines = ['# GPU suite' + (' (smoke: tiny sizes, numbers are not the targets\' measurements)'
                            if res['mode'] == 'smoke' else ''), '',
           f"Device: {res['device_kind']} ({res['backend']}, {len(res['devices'])} device(s)); "
           f"host {res['host']}; jax {res['jax']}. Total wall {res['total_wall_s']:.0f} s "
           f"(budget {res['total_budget_s']:.0f} s). Command: `{res['command']}`.", '',
           'Synthetic data (Gaussian images, random labels), He-normal untrained weights: every '
           'number below depends on shapes only.', '',
           '| section | wall s | budget s |', '|---|---|---|']
  lines += [f"| {k} | {v['wall_s']:.1f} | {v['budget_s']} |" for k, v in s.items()]

  t = s['throughput']
  lines += ['', f"## Train-step throughput: {t['model']} at {'x'.join(map(str, t['input']))}, "
                f"batch {t['batch_size']}", '',
            '| step | median s | images/s | compile + first step s |', '|---|---|---|---|']
  for k in t['median_step_s']:
    lines.append(f"| {k} | {_f(t['median_step_s'][k])} | {_f(t['images_per_s'][k], '.1f')} | "
                 f"{_f(t['compile_plus_first_step_s'][k], '.1f')} |")
  lines += ['', f"Taylor-FO-BN overhead: {t['fo_overhead']:+.2%} (target <= 5%: "
                f"{_mark(t['fo_overhead'] <= TARGETS['fo_overhead'])}); "
                f"{t['rounds_run']} interleaved rounds of {t['steps_per_round']} steps."]

  e = s['estimators']
  lines += ['', f"## Estimator overhead: {e['model']} at {'x'.join(map(str, e['input']))}, "
                f"batch {e['batch_size']}", '',
            '| measurement | value | target |', '|---|---|---|']
  for k in e['median_step_s']:
    lines.append(f"| {k} step, median s | {_f(e['median_step_s'][k])} | |")
  lines += [f"| FO overhead | {e['fo_overhead']:+.2%} | <= 5% "
            f"({_mark(e['fo_overhead'] <= TARGETS['fo_overhead'])}) |",
            f"| SO / plain | {_f(e['so_ratio'])}x | <= 3x "
            f"({_mark(e['so_ratio'] <= TARGETS['so_ratio'])}) |"]

  o = s['oracle']
  lines += ['', f"## Oracle: {o['model']}, {o['oracle_units']} units x {o['oracle_examples']} "
                f"examples (minibatch {o['oracle_minibatch']})", '',
            '| measurement | value | target |', '|---|---|---|',
            f"| fast, warm s | {_f(o['oracle_fast_s_warm'])} | |",
            f"| fast, cold incl. compile s | {_f(o['oracle_fast_s_cold_incl_compile'])} | |",
            f"| naive, extrapolated from {o['oracle_naive_units_timed']} units s | "
            f"{_f(o['oracle_naive_s_all_units_extrapolated'])} | |",
            f"| naive / fast (warm) | {_f(o['oracle_speedup'])}x | >= 5x "
            f"({_mark(o['oracle_speedup'] >= TARGETS['oracle_speedup'])}) |",
            f"| naive / fast incl. compile | {_f(o['oracle_speedup_cold_incl_compile'])}x | |",
            f"| MAC bound (naive MACs / fast MACs) | {_f(o['oracle_mac_bound'])}x | |",
            f"| max relative difference fast vs naive | {_f(o['oracle_max_rel_diff'], '.2e')} | |"]

  la = s['latency']
  lines += ['', f"## Latency after surgery: {la['model']} at {'x'.join(map(str, la['input']))}, "
                f"{la['target_flops_cut']:.0%} fewer FLOPs, eval batch {la['batch_size']}", '',
            f"Full network: {_f(la['full_latency_ms'])} ms. Random scores ranked globally "
            f"(engine.prune_lowest with the FLOPs target), then surgery; "
            f"{la['rounds']} rounds of {la['repeats']} calls, every network in turn.", '',
            '| alignment | FLOPs cut | latency ms | latency cut | latency cut / FLOPs cut |',
            '|---|---|---|---|---|']
  for r in la['pruned'].values():
    lines.append(f"| {r['align']} | {r['flops_cut']:.1%} | {_f(r['latency_ms'])} | "
                 f"{r['latency_cut']:.1%} | {_f(r['latency_cut_over_flops_cut'], '.2f')} |")

  d = s['discovery']
  lines += ['', f"## Discovery: {d['model']} at {'x'.join(map(str, d['input'][1:]))}", '',
            f"{d['groups']} groups ({d['prunable']} prunable), equal to the declared ones: "
            f"{d['equal_to_declared']}; tracing + propagation {_f(d['seconds_min'], '.2f')} s "
            f"(min of {d['repeats']} runs; max {_f(d['seconds_max'], '.2f')} s).", '']
  return '\n'.join(lines)


def write(res: dict, out_dir: str) -> tuple[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = (os.path.join(out_dir, 'gpu_suite.json'), os.path.join(out_dir, 'gpu_suite.md'))
  with open(paths[0], 'w') as f:
    json.dump(res, f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(markdown(res))
  return paths


def main(argv: Optional[list[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--smoke', action='store_true', help='tiny sizes, for the CPU test suite')
  ap.add_argument('--out', default=None, help='output directory (default: experiments/results/'
                  'gpu; with --smoke a fresh temporary directory)')
  ap.add_argument('--allow_cpu', action='store_true',
                  help='run the full sizes without a GPU (slow; the numbers are not the targets)')
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  if not args.smoke and jax.default_backend() == 'cpu' and not args.allow_cpu:
    raise SystemExit(f'gpu_suite: no GPU (jax sees {jax.devices()}). The full suite is sized '
                     'for an H100/H200; use --smoke for a check on a CPU, or --allow_cpu to run '
                     'the full sizes here anyway.')
  out_dir = args.out or (tempfile.mkdtemp(prefix='gpu_suite_smoke_') if args.smoke else RESULTS)
  res = run(args.smoke, ' '.join(['PYTHONPATH=. .venv/bin/python experiments/gpu_suite.py'] +
                                 argv))
  for p in write(res, out_dir):
    print('[gpu_suite] wrote', p, flush=True)
  return res


if __name__ == '__main__':
  main()
