"""CPU latency of ResNet-8 at several widths: how far latency follows FLOPs.

  .venv/bin/python experiments/bench_latency_widths.py

Writes experiments/results/bench_latency_widths.json (median of 3 x 30 timed batch-64 forwards,
the minimum of the three medians, per width set).
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
    # What configs/default.py ended with on a fresh clone (bash scripts/run_default.sh, 2026-11-21).
    'default_run_result': {'stage1': 16, 'stage1.block0': 8, 'stage2': 24, 'stage2.block0': 16,
                           'stage3': 48, 'stage3.block0': 24},
    'stage1_halved': {**FULL, 'stage1': 8, 'stage1.block0': 8},
    'all_halved': {k: v // 2 for k, v in FULL.items()},
}


def main():
  rows = []
  for name, widths in CANDIDATES.items():
    model = models.create('resnet8', 10, widths)
    variables = jax.jit(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))()
    ms = min(costs.latency_ms(model, variables, None, 64, (28, 28, 1), repeats=30)['median']
             for _ in range(3))
    rows.append({'widths_name': name, 'widths': widths, 'latency_ms_b64': ms,
                 'flops': costs.flops(model, (28, 28, 1))})
    print(f"{name:20s} {ms:7.2f} ms  {rows[-1]['flops'] / 1e6:.2f} M MACs", flush=True)
  out = {'device': f'{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores)',
         'command': '.venv/bin/python experiments/bench_latency_widths.py', 'rows': rows}
  path = os.path.join(ROOT, 'experiments', 'results', 'bench_latency_widths.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
