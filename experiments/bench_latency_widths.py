"""CPU latency of ResNet-8 at several widths: how far latency follows FLOPs.

  .venv/bin/python experiments/bench_latency_widths.py

Writes experiments/results/bench_latency_widths.json: every width set is timed in turn with the
others (costs.compare_latency: 5 rounds of 30 batch-64 forwards each, the least disturbed round's
median), so the ratios are not skewed by load that changes between measurements.
"""

import json
import os
import platform
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from taylor_jax import costs, models  # noqa: E402

FULL = models.full_widths('resnet8')
CANDIDATES = {
    'full': FULL,
    'pruned_unaligned': {'stage1': 15, 'stage1.block0': 13, 'stage2': 22, 'stage2.block0': 16,
                         'stage3': 45, 'stage3.block0': 17},
    'pruned_aligned8': {'stage1': 16, 'stage1.block0': 16, 'stage2': 24, 'stage2.block0': 16,
                        'stage3': 48, 'stage3.block0': 16},
    # What configs/default.py ended with on a fresh clone (bash scripts/run_default.sh, 2026-11-21):
    # the second session's (last step overshooting to -58% FLOPs), and the third session's.
    'default_run_session2': {'stage1': 16, 'stage1.block0': 8, 'stage2': 24, 'stage2.block0': 16,
                             'stage3': 48, 'stage3.block0': 24},
    'default_run_session3': {'stage1': 16, 'stage1.block0': 16, 'stage2': 24,
                             'stage2.block0': 16, 'stage3': 48, 'stage3.block0': 16},
    'stage1_halved': {**FULL, 'stage1': 8, 'stage1.block0': 8},
    'all_halved': {k: v // 2 for k, v in FULL.items()},
}


def main():
  nets = {}
  for name, widths in CANDIDATES.items():
    model = models.create('resnet8', 10, widths)
    nets[name] = (model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))), None)
  lat = costs.compare_latency(nets, 64, (28, 28, 1), repeats=30, rounds=5)
  full_ms, full_flops = lat['full']['median'], costs.flops(nets['full'][0], (28, 28, 1))
  rows = []
  for name, widths in CANDIDATES.items():
    ms, flops = lat[name]['median'], costs.flops(nets[name][0], (28, 28, 1))
    cut = 1 - flops / full_flops
    ratio = (1 - ms / full_ms) / cut if cut > 0 else None
    rows.append({'widths_name': name, 'widths': widths, 'latency_ms_b64': ms,
                 'round_medians_ms': lat[name]['round_medians'], 'flops': flops,
                 'flops_cut': cut, 'latency_cut_over_flops_cut': ratio})
    print(f"{name:22s} {ms:7.2f} ms  {flops / 1e6:.2f} M MACs  ratio {ratio}", flush=True)
  out = {'device': f'{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores)',
         'command': '.venv/bin/python experiments/bench_latency_widths.py',
         'load_average_end': os.getloadavg(), 'rows': rows}
  path = os.path.join(ROOT, 'experiments', 'results', 'bench_latency_widths.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
