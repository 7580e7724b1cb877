"""CPU latency of ResNet-8 at several widths: how far latency follows FLOPs.

  .venv/bin/python experiments/bench_latency_widths.py

Writes experiments/results/bench_latency_widths.json with
* ``rows``: named width sets, every one timed in turn with the others (costs.compare_latency:
  5 rounds of 30 batch-64 forwards, the least disturbed round's median), so the ratios are not
  skewed by load that changes between measurements;
* ``scan``: every width set aligned to 8 with stage-1 widths in {8, 16} and 40-50% fewer FLOPs,
  timed the same way with the full network (3 rounds of 20; the spread of latency cut / FLOPs
  cut);
* ``convs``: single 3x3 convolutions (batch 64) at the sizes ResNet-8 uses, in ms;
* ``backends``: the named rows again in fresh processes under other ``XLA_FLAGS`` that change
  which convolutions XLA:CPU hands to YNNPACK (its default picks per shape), to show how much
  of the latency/FLOPs ratio is the backend's choice rather than the widths.

``--rows_only`` times only the named rows and prints them as JSON (used for ``backends``).
"""

import itertools
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from taylor_jax import costs, models  # noqa: E402

SHAPE = (28, 28, 1)
FULL = models.full_widths('resnet8')
NAMES = ('stage1', 'stage1.block0', 'stage2', 'stage2.block0', 'stage3', 'stage3.block0')
CANDIDATES = {
    'full': FULL,
    'pruned_unaligned': {'stage1': 15, 'stage1.block0': 13, 'stage2': 22, 'stage2.block0': 16,
                         'stage3': 45, 'stage3.block0': 17},
    # Also what configs/default.py ended with on a fresh clone in the third session (2026-11-21).
    'pruned_aligned8': {'stage1': 16, 'stage1.block0': 16, 'stage2': 24, 'stage2.block0': 16,
                        'stage3': 48, 'stage3.block0': 16},
    # The second session's default run (its last step overshot to -58% FLOPs).
    'default_run_session2': {'stage1': 16, 'stage1.block0': 8, 'stage2': 24, 'stage2.block0': 16,
                             'stage3': 48, 'stage3.block0': 24},
    'stage1_halved': {**FULL, 'stage1': 8, 'stage1.block0': 8},
    # Stage 3 (7x7) at a quarter of its width: -26% FLOPs.
    'stage3_quartered': {**FULL, 'stage3': 16, 'stage3.block0': 16},
    'stages23_aligned16': {'stage1': 16, 'stage1.block0': 16, 'stage2': 16, 'stage2.block0': 16,
                           'stage3': 32, 'stage3.block0': 16},
    'all_halved': {k: v // 2 for k, v in FULL.items()},
    'stage1_width1': {**FULL, 'stage1': 1, 'stage1.block0': 1},
    'stage1_mid_width1': {**FULL, 'stage1.block0': 1},
    'stages23_width1': {**FULL, 'stage2': 1, 'stage2.block0': 1, 'stage3': 1, 'stage3.block0': 1},
    'all_width1': {k: 1 for k in FULL},
}
CONVS = [(28, 16, 16), (28, 16, 8), (28, 8, 16), (28, 8, 8), (14, 32, 32), (14, 24, 16),
         (14, 16, 24), (7, 64, 64), (7, 48, 16), (7, 16, 48)]


def _time_widths(sets: dict, rounds: int = 5, repeats: int = 30) -> list[dict]:
  nets = {}
  for name, widths in sets.items():
    model = models.create('resnet8', 10, widths)
    nets[name] = (model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + SHAPE)), None)
  lat = costs.compare_latency(nets, 64, SHAPE, repeats=repeats, rounds=rounds)
  full_ms, full_flops = lat['full']['median'], costs.flops(nets['full'][0], SHAPE)
  rows = []
  for name, widths in sets.items():
    ms, flops = lat[name]['median'], costs.flops(nets[name][0], SHAPE)
    cut = 1 - flops / full_flops
    ratio = (1 - ms / full_ms) / cut if cut > 0 else None
    rows.append({'widths_name': name, 'widths': widths, 'latency_ms_b64': ms,
                 'round_medians_ms': lat[name]['round_medians'], 'flops': flops,
                 'flops_cut': cut, 'latency_cut_over_flops_cut': ratio})
    print(f"{name:34s} {ms:7.2f} ms  {flops / 1e6:.2f} M MACs  ratio {ratio}", flush=True)
  return rows


def _scan_sets() -> dict:
  full_flops = costs.flops(models.create('resnet8', 10), SHAPE)
  sets = {'full': FULL}
  for ws in itertools.product([8, 16], [8, 16], [16, 24, 32], [8, 16, 24, 32], [16, 32, 48, 64],
                              [16, 32, 48, 64]):
    w = dict(zip(NAMES, ws))
    cut = 1 - costs.flops(models.create('resnet8', 10, w), SHAPE) / full_flops
    if 0.40 <= cut <= 0.50:
      sets['/'.join(map(str, ws))] = w
  return sets


def _time_convs() -> list[dict]:
  rng = np.random.default_rng(0)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  out = []
  for hw, cin, cout in CONVS:
    x = jnp.asarray(rng.normal(size=(64, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    jax.block_until_ready(conv(x, w))
    meds = []
    for _ in range(3):
      ts = []
      for _ in range(30):
        t0 = time.perf_counter()
        jax.block_until_ready(conv(x, w))
        ts.append((time.perf_counter() - t0) * 1e3)
      meds.append(float(np.median(ts)))
    out.append({'hw': hw, 'cin': cin, 'cout': cout, 'ms': min(meds),
                'macs': 64 * hw * hw * 9 * cin * cout})
    print(f'conv 64x{hw}x{hw} {cin}->{cout}: {min(meds):.3f} ms', flush=True)
  return out


BACKEND_FLAGS = {
    'ynn_off': '--xla_cpu_experimental_ynn_fusion_type=',
    'ynn_convolutions': '--xla_cpu_experimental_ynn_fusion_type='
                        'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',
}


def _time_backends() -> dict:
  out = {}
  for name, flags in BACKEND_FLAGS.items():
    env = dict(os.environ, XLA_FLAGS=flags)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), '--rows_only'], env=env,
                         capture_output=True, text=True, check=True)
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    out[name] = {'xla_flags': flags, 'rows': rows}
    for r in rows:
      print(f"{name:18s} {r['widths_name']:28s} {r['latency_ms_b64']:7.2f} ms  ratio "
            f"{r['latency_cut_over_flops_cut']}", flush=True)
  return out


def main():
  if '--rows_only' in sys.argv:
    with open(os.devnull, 'w') as quiet:  # stdout carries only the JSON line
      real, sys.stdout = sys.stdout, quiet
      rows = _time_widths(CANDIDATES, rounds=3, repeats=20)
      sys.stdout = real
    print(json.dumps(rows))
    return
  out = {'device': f'{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores)',
         'command': '.venv/bin/python experiments/bench_latency_widths.py',
         'load_average_start': os.getloadavg()}
  out['rows'] = _time_widths(CANDIDATES)
  out['scan'] = _time_widths(_scan_sets(), rounds=3, repeats=20)
  ratios = [r['latency_cut_over_flops_cut'] for r in out['scan'] if r['widths_name'] != 'full']
  out['scan_ratio_range'] = [min(ratios), max(ratios)]
  out['scan_sets_at_or_above_0.7'] = sum(r >= 0.7 for r in ratios)
  out['convs'] = _time_convs()
  out['backends'] = _time_backends()
  out['load_average_end'] = os.getloadavg()
  print('scan ratio range', out['scan_ratio_range'], 'sets >= 0.7:',
        out['scan_sets_at_or_above_0.7'], 'of', len(ratios))
  path = os.path.join(ROOT, 'experiments', 'results', 'bench_latency_widths.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
