"""Train-step throughput (images/s) of zoo models on synthetic data, data-parallel step as used
by the main job (masks as gates, optional estimator accumulation).

  .venv/bin/python experiments/bench_throughput.py --model resnet20 --image_size 28 --channels 1
  .venv/bin/python experiments/bench_throughput.py --model resnet50 --image_size 224 --steps 3

Appends one JSON record per run to experiments/results/bench_throughput.jsonl.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from taylor_jax import estimators, models, train  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--model', default='resnet20')
  ap.add_argument('--image_size', type=int, default=28)
  ap.add_argument('--channels', type=int, default=None)
  ap.add_argument('--num_classes', type=int, default=None)
  ap.add_argument('--batch_size', type=int, default=128)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--estimator', default=None)
  ap.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results',
                                                'bench_throughput.jsonl'))
  a = ap.parse_args()
  imagenet = a.model in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn',
                         'densenet121')
  channels = a.channels or (3 if imagenet else 1)
  classes = a.num_classes or (1000 if imagenet else 10)
  model = models.create(a.model, classes)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((a.batch_size, a.image_size, a.image_size, channels), np.float32)
  y = rng.integers(0, classes, a.batch_size).astype(np.int32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1]))()
  optim = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9,
                                         nesterov=True, weight_decay=5e-4, schedule='cosine'))
  tx = train.create_optimizer(optim, 100, 1000)
  mesh = train.create_mesh()
  state = train.replicate(mesh, train.create_train_state(variables, tx, widths=model.widths))
  step = train.make_train_step(model, tx, mesh,
                               estimators.get(a.estimator) if a.estimator else None)
  batch = train.shard_batch(mesh, {'image': x, 'label': y})
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  rec = {'model': a.model, 'image_size': a.image_size, 'channels': channels,
         'batch_size': a.batch_size, 'estimator': a.estimator, 'steps': a.steps,
         'median_step_s': med, 'images_per_s': a.batch_size / med, 'first_step_s': compile_s,
         'device': f'{jax.devices()[0].device_kind} x{jax.device_count()}',
         'host': f'{platform.machine()}, {os.cpu_count()} cores',
         'command': ' '.join(['.venv/bin/python'] + sys.argv)}
  print(json.dumps(rec))
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, 'a') as f:
    f.write(json.dumps(rec) + '\n')


if __name__ == '__main__':
  main()
