"""Why run-once programs compile without LLVM optimisation, and why latency is timed with it.

Per XLA backend optimisation level (0: off; 3: XLA's default), seconds to compile and to run:
(1) ``model.init`` of ResNet-8 (28x28x1), a program the main job runs once
(``models.common.run_once``); (2) the eval forward pass of ResNet-18 at 32x32, batch 64, what
``costs.compare_latency`` times (``costs._DEPLOYED``). Fresh programs each time (no cache).

  PYTHONPATH=. .venv/bin/python experiments/bench_compile_once.py   # results/bench_compile_once.json
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from taylor_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(fn, args, level: int, runs: int = 3) -> dict[str, float]:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': level})
  t1 = time.perf_counter()
  jax.block_until_ready(compiled(*args))  # first call
  t2 = time.perf_counter()
  for _ in range(runs):
    jax.block_until_ready(compiled(*args))
  return {'compile_s': t1 - t0, 'run_s': (time.perf_counter() - t2) / runs}


def main():
  r8 = models.create('resnet8', 10)
  x8 = np.zeros((1, 28, 28, 1), np.float32)
  r18 = models.create('resnet18', 1000)
  x18 = jnp.zeros((64, 32, 32, 3))
  v18 = jax.jit(r18.init)(jax.random.key(0), x18[:1])
  out = {'machine': f'{platform.machine()}, {os.cpu_count()} cores', 'jax': jax.__version__,
         'load_average': os.getloadavg()[0], 'results': {}}
  for level in (3, 0):
    out['results'][f'resnet8_init_level{level}'] = measure(r8.init, (jax.random.key(0), x8), level)
    out['results'][f'resnet18_b64_forward_level{level}'] = measure(
        lambda v, x: r18.apply(v, x, train=False), (v18, x18), level)
  path = os.path.join(ROOT, 'experiments', 'results', 'bench_compile_once.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
