"""Benchmark: cost of importance estimation inside the train step, and the fast oracle.

ResNet-20 on Fashion-MNIST-shaped inputs (28x28x1, 10 classes), batch 128, on this machine:

* median step time of the plain train step vs the step that also accumulates Taylor-FO-BN
  (target overhead <= 5%) or Taylor-SO on the gates (target <= 3x plain); the three steps are
  interleaved (A B C A B C ...) and each measurement is the median of ``--rounds``;
* the oracle of every unit on 1,000 examples (4 minibatches of 250, eval-mode BN): the fast
  vmapped/chunked oracle vs the naive loop (one full forward per unit); the naive loop's cost per
  unit is the same for every unit, so it is timed on a sample of units per group and scaled to
  all units; the max relative difference is taken over the sampled units.

Usage: PYTHONPATH=. .venv/bin/python experiments/bench_estimators.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from taylor_jax import estimators as E
from taylor_jax import models, oracle, train

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def load_images(n, seed=0):
  """The first ``n`` Fashion-MNIST test images (normalised) through the input pipeline."""
  from taylor_jax.data import input_pipeline
  split = input_pipeline.create_split('fashion_mnist', 'test', batch_size=n, train=False,
                                      seed=seed, limit=n)
  batch = next(split.batches(0))
  return batch['image'], batch['label'], 'fashion_mnist test (taylor_jax.data.input_pipeline)'


def he_init(model, x, seed=0):
  """He-normal (fan-out) kernels, BN at identity, as ``model.init`` but drawn with numpy."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name == 'kernel':
      fan_out = int(np.prod(a.shape[:-2])) * a.shape[-1] if len(a.shape) == 4 else a.shape[0]
      return (rng.normal(size=a.shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)
    if name in ('scale', 'var'):
      return np.ones(a.shape, np.float32)
    return np.zeros(a.shape, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def time_steps(model, variables, masks, batch, rounds, steps_per_round,
               variants=('plain', 'taylor_fo_bn', 'taylor_so'), deadline=None):
  """Per-step seconds of the data-parallel train step with each estimator of ``variants``
  ('plain': none), interleaved round by round, and compile + first step seconds of each.
  ``deadline`` (a ``time.perf_counter()`` value): no new round starts after it (one always
  runs), so a caller with a time budget gets fewer rounds instead of overrunning."""
  tx = train.create_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.01, momentum=0.9, weight_decay=1e-4, schedule='constant')),
      100, 100)
  mesh = train.create_mesh()
  gbatch = train.shard_batch(mesh, batch)
  variants = {name: None if name == 'plain' else E.get(name) for name in variants}
  steps, states, compile_s = {}, {}, {}
  for name, est in variants.items():
    steps[name] = train.make_train_step(model, tx, mesh, estimator=est)
    states[name] = train.replicate(mesh, train.create_train_state(variables, tx, masks=masks))
    t = time.perf_counter()
    states[name], m = steps[name](states[name], gbatch)
    jax.block_until_ready(m)
    compile_s[name] = time.perf_counter() - t
  times = {k: [] for k in variants}
  for r in range(rounds):  # interleaved: plain, fo, so, plain, fo, so, ...
    if r and deadline is not None and time.perf_counter() > deadline:
      break
    for name in variants:
      t = time.perf_counter()
      for _ in range(steps_per_round):
        states[name], m = steps[name](states[name], gbatch)
      jax.block_until_ready((states[name].score_sum, m))
      times[name].append((time.perf_counter() - t) / steps_per_round)
  return times, compile_s


def time_oracle(model, variables, masks, batches, chunk_size=64, naive_units_per_group=2):
  """The fast oracle of every prunable unit over ``batches`` against the naive loop (timed on
  ``naive_units_per_group`` sampled units per group, extrapolated to all units: its cost per
  unit is the same for every unit), their MAC bound and agreement; ``oracle_*`` keys."""
  groups = model.groups()
  total_units = sum(g.width for g in groups if g.prunable)
  t = time.perf_counter()
  fast = oracle.oracle_scores(model, variables, masks, batches, chunk_size=chunk_size)
  fast_cold = time.perf_counter() - t
  # warm: the same compiled functions on one minibatch, scaled to all of them
  t = time.perf_counter()
  oracle.oracle_scores(model, variables, masks, batches[:1], chunk_size=chunk_size)
  fast_warm = (time.perf_counter() - t) * len(batches)
  print(json.dumps({'fast_cold_s': fast_cold, 'fast_warm_s': fast_warm}), flush=True)

  macs = oracle.oracle_macs(model, variables, masks, batches[0], chunk_size=chunk_size)
  rng = np.random.default_rng(0)
  sample = {g.name: np.sort(rng.choice(g.width, naive_units_per_group, replace=False))
            for g in groups if g.prunable}
  n_sample = sum(len(v) for v in sample.values())
  oracle.oracle_naive(model, variables, masks, batches[:1], units={groups[0].name: [0]})  # compile
  t = time.perf_counter()
  naive = oracle.oracle_naive(model, variables, masks, batches, units=sample)
  naive_sample_s = time.perf_counter() - t
  naive_per_unit = naive_sample_s / n_sample
  naive_total = naive_per_unit * total_units
  a = np.concatenate([fast[k][u] for k, u in sample.items()])
  b = np.concatenate([naive[k][u] for k, u in sample.items()])
  gmax = max(float(np.max(v)) for v in fast.values())
  big = b >= 1e-3 * gmax
  return {
      'oracle_examples': sum(len(b['label']) for b in batches),
      'oracle_minibatch': len(batches[0]['label']), 'oracle_units': total_units,
      'oracle_chunk_size': chunk_size,
      'oracle_fast_s_cold_incl_compile': fast_cold, 'oracle_fast_s_warm': fast_warm,
      'oracle_naive_units_timed': n_sample, 'oracle_naive_s_timed': naive_sample_s,
      'oracle_naive_s_per_unit': naive_per_unit, 'oracle_naive_s_all_units_extrapolated': naive_total,
      'oracle_speedup': naive_total / fast_warm,
      'oracle_speedup_cold_incl_compile': naive_total / fast_cold,
      'oracle_fast_macs_per_minibatch': macs['fast'], 'oracle_naive_macs_per_minibatch':
      macs['naive'], 'oracle_mac_bound': macs['bound'],
      'oracle_mac_bound_note': 'naive / fast conv+dot MACs (oracle.oracle_macs): the speedup '
                               'prefix reuse gives at equal MACs per second',
      # NaN when no sampled unit scores that high (a tiny network can have none)
      'oracle_max_rel_diff': (float(np.max(np.abs(a[big] - b[big]) / b[big])) if big.any()
                              else float('nan')),
      'oracle_max_rel_diff_note': 'over the naively timed units whose score >= 1e-3 x the max '
                                  'score (smaller ones are float32 rounding of L differences)',
      'oracle_max_abs_diff_over_max_score': float(np.max(np.abs(a - b)) / gmax),
      'oracle_max_score': gmax}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--rounds', type=int, default=7)
  ap.add_argument('--steps_per_round', type=int, default=3)
  ap.add_argument('--oracle_examples', type=int, default=1000)
  ap.add_argument('--oracle_batch', type=int, default=250)
  ap.add_argument('--chunk_size', type=int, default=64)
  ap.add_argument('--naive_units_per_group', type=int, default=2)
  ap.add_argument('--skip_steps', action='store_true')
  ap.add_argument('--skip_oracle', action='store_true')
  ap.add_argument('--macs_only', action='store_true',
                  help='only count the oracle MACs (fast vs naive), write oracle_mac_bound.json')
  args = ap.parse_args()

  model = models.create('resnet20', 10)
  groups = model.groups()
  images, labels, data_source = load_images(max(128, args.oracle_examples))
  variables = he_init(model, images[:2])
  masks = {g.name: np.ones((g.width,), np.float32) for g in groups}
  res = {'command': 'PYTHONPATH=. .venv/bin/python experiments/bench_estimators.py ' +
                    ' '.join(sys.argv[1:]),
         'device': f'{jax.devices()[0].device_kind} x{len(jax.devices())} '
                   f'({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)',
         'jax': jax.__version__, 'model': 'resnet20', 'input': '28x28x1, 10 classes',
         'data': data_source, 'weights': 'He-normal init (untrained), BN at identity',
         'load_average_start': os.getloadavg()}

  if args.macs_only:
    n, bs = args.oracle_examples, args.oracle_batch
    macs = oracle.oracle_macs(model, variables, masks,
                              {'image': images[:bs], 'label': labels[:bs]},
                              chunk_size=args.chunk_size)
    out = {'command': res['command'], 'model': 'resnet20', 'minibatch': bs,
           'chunk_size': args.chunk_size, 'oracle_fast_macs_per_minibatch': macs['fast'],
           'oracle_naive_macs_per_minibatch': macs['naive'], 'oracle_mac_bound': macs['bound']}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, 'oracle_mac_bound.json'), 'w') as f:
      json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return
  if not args.skip_steps:
    batch = {'image': images[:128], 'label': labels[:128]}
    times, compile_s = time_steps(model, variables, masks, batch, args.rounds,
                                  args.steps_per_round)
    med = {k: float(np.median(v)) for k, v in times.items()}
    res.update({
        'batch_size': 128, 'rounds': args.rounds, 'steps_per_round': args.steps_per_round,
        'step_time_s': med, 'step_times_s': times, 'compile_plus_first_step_s': compile_s,
        'fo_overhead': med['taylor_fo_bn'] / med['plain'] - 1.0,
        'so_ratio': med['taylor_so'] / med['plain'],
        'images_per_s_plain': 128 / med['plain']})
    print(json.dumps({k: res[k] for k in ('step_time_s', 'fo_overhead', 'so_ratio')}), flush=True)

  if args.skip_oracle:
    print(json.dumps(res, indent=1))
    return
  # --- oracle -------------------------------------------------------------------------------
  n, bs = args.oracle_examples, args.oracle_batch
  batches = [{'image': images[i:i + bs], 'label': labels[i:i + bs]} for i in range(0, n, bs)]
  res.update(time_oracle(model, variables, masks, batches, args.chunk_size,
                         args.naive_units_per_group))
  res['load_average_end'] = os.getloadavg()
  total_units, n_sample = res['oracle_units'], res['oracle_naive_units_timed']
  fast_warm, fast_cold = res['oracle_fast_s_warm'], res['oracle_fast_s_cold_incl_compile']
  naive_total = res['oracle_naive_s_all_units_extrapolated']
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'bench_estimators.json'), 'w') as f:
    json.dump(res, f, indent=1)
  fmt = lambda v: f'{v:.4g}'
  lines = ['# Estimator and oracle benchmark', '',
           f"ResNet-20, {res['input']}, data: {res['data']}; device: {res['device']}; "
           f"jax {res['jax']}; load average at start {res['load_average_start']}.", '',
           '| measurement | value | target |', '|---|---|---|']
  if 'fo_overhead' in res:
    lines += [f"| plain train step (batch 128), median s | {fmt(res['step_time_s']['plain'])} | |",
              f"| + taylor_fo_bn, median s | {fmt(res['step_time_s']['taylor_fo_bn'])} | |",
              f"| + taylor_so, median s | {fmt(res['step_time_s']['taylor_so'])} | |",
              f"| fo_overhead | {res['fo_overhead']:+.2%} | <= 5% |",
              f"| so_ratio | {fmt(res['so_ratio'])}x | <= 3x |"]
  lines += [f"| oracle fast, {total_units} units x {n} examples, warm s | {fmt(fast_warm)} | |",
            f"| oracle fast, cold incl. compile s | {fmt(fast_cold)} | |",
            f"| oracle naive (extrapolated from {n_sample} units) s | {fmt(naive_total)} | |",
            f"| oracle_speedup (warm) | {fmt(res['oracle_speedup'])}x | >= 5x |",
            f"| oracle MAC bound (naive MACs / fast MACs) | {fmt(res['oracle_mac_bound'])}x | |",
            f"| oracle speedup incl. compile | {fmt(res['oracle_speedup_cold_incl_compile'])}x | |",
            f"| oracle_max_rel_diff (float32) | {res['oracle_max_rel_diff']:.2e} | <= 1e-5 |",
            f"| oracle max abs diff / max score | {res['oracle_max_abs_diff_over_max_score']:.2e} | |",
            '', f"Command: `{res['command']}`", '']
  with open(os.path.join(RESULTS, 'bench_estimators.md'), 'w') as f:
    f.write('\n'.join(lines))
  print(json.dumps(res, indent=1))


if __name__ == '__main__':
  main()
