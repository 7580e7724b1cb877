"""Benchmark: discovery time (jaxpr tracing + propagation) of every zoo model, at the input size
its configs use, and whether the discovered groups equal the declared ones.

  .venv/bin/python experiments/bench_discovery.py [--repeats 3]

Writes experiments/results/bench_discovery.{json,md}. The target of the any-model issue: ResNet-50
at 224x224 in at most 5 s on the project's 2-core CPU.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from taylor_jax import discovery, models  # noqa: E402
from taylor_jax.models import common  # noqa: E402

_IMAGENET = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn', 'densenet121'}
_CIFAR = {'preact_resnet18', 'vgg16_bn'}


def _shape(name):
  if name in _IMAGENET:
    return (1, 224, 224, 3)
  return (1, 32, 32, 3) if name in _CIFAR else (1, 28, 28, 1)


def _key(g, shapes):
  return frozenset((s.path, s.axis % len(shapes[s.path]), s.role, s.offset, s.repeat)
                   for s in g.slices)


def bench(name, repeats):
  shape = _shape(name)
  model = models.create(name, 10 if name not in _IMAGENET else 1000, input_shape=shape[1:])
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    with common.reference_convolutions():
      found = discovery.discover_groups(lambda v, x: model.apply(v, x), variables, x,
                                        keep_whole=getattr(model, 'keep_whole', lambda: ())())
    times.append(time.perf_counter() - t0)
  shapes = {discovery._path_keys(p): l.shape
            for p, l in jax.tree_util.tree_flatten_with_path(variables)[0]}
  same = {_key(g, shapes) for g in found.groups} == {_key(g, shapes) for g in model.groups()}
  return {'model': name, 'input': list(shape), 'groups': len(found.groups),
          'prunable': len(found.prunable), 'equal_to_declared': same,
          'seconds_min': min(times), 'seconds_max': max(times)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  rows = [bench(n, args.repeats) for n in models.names()]
  out = os.path.join(ROOT, 'experiments', 'results')
  meta = {'command': f'.venv/bin/python experiments/bench_discovery.py --repeats {args.repeats}',
          'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
          'jax': jax.__version__}
  with open(os.path.join(out, 'bench_discovery.json'), 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  lines = [f'Command: `{meta["command"]}` ({meta["machine"]}, jax {meta["jax"]}); time = '
           f'tracing + propagation, min / max of {args.repeats} runs.', '',
           '| model | input | groups | prunable | equal to declared | time (s) |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["model"]} | {"x".join(map(str, r["input"][1:]))} | {r["groups"]} | '
                 f'{r["prunable"]} | {r["equal_to_declared"]} | '
                 f'{r["seconds_min"]:.2f} / {r["seconds_max"]:.2f} |')
  with open(os.path.join(out, 'bench_discovery.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
