"""taylor_jax against PyTorch eager on this CPU, measured interleaved in one run.

One worker process per *kind* (``jax``: the jitted data-parallel train step as the main job and
``bench_throughput.py`` build it, masks as gates, no estimator; ``torch``: a PyTorch eager twin
of the same network, same optimizer; ``torch1``: PyTorch on one thread; ``jax_ref``: jax with
``common.reference_convolutions()``: every convolution a plain ``lax.conv``; ``jax_xladefault``:
XLA's default compiler options instead of ``train.compiler_options()``; ``KIND+FLAG=V``:
KIND with ``--FLAG=V`` added to ``XLA_FLAGS``). Every worker builds and
warms up everything first; then, round by round, the driver asks each kind in turn for
``--steps`` timed steps of each task (train step at ``--train_batch``, inference at
``--infer_batch``, ResNet-8 and ResNet-20 on 28x28x1). Reported per task: images/s of each kind
(median over rounds) and the median over rounds of the per-round ratio jax / torch. The load
average is recorded every round (the machine is shared).

  PYTHONPATH=. .venv/bin/python experiments/bench_vs_torch.py --rounds 5

torch is a test/benchmark-only dependency (requirements-test.txt). Writes
experiments/results/bench_vs_torch.{json,md} (``--out`` prefix).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {'resnet8': 1, 'resnet20': 3}  # blocks per stage


# --- workers ------------------------------------------------------------------------------------

def _jax_worker(kind, a):
  sys.path.insert(0, ROOT)
  import contextlib
  import jax
  import ml_collections
  import numpy as np
  from taylor_jax import models, train
  from taylor_jax.models import common

  kind = kind.split('+')[0]
  # jax: the train step as the library compiles it (train.compiler_options(): XLA options for
  # CPU), and inference under the same options; jax_xladefault: XLA's default options for both.
  opts = (None if kind == 'jax_xladefault' or not hasattr(train, 'compiler_options')
          else train.compiler_options())
  ctx = lambda: (common.reference_convolutions() if kind == 'jax_ref'
                 else contextlib.nullcontext())
  rng = np.random.default_rng(0)
  tasks = {}
  optim = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9,
                                         nesterov=True, weight_decay=5e-4, schedule='cosine'))
  mesh = train.create_mesh()
  for name in a.models:
    model = models.create(name, 10)
    x = rng.standard_normal((a.train_batch, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, a.train_batch).astype(np.int32)
    variables = jax.tree.map(np.asarray, jax.jit(
        lambda: model.init(jax.random.key(0), x[:1]))())
    tx = train.create_optimizer(optim, 100, 1000)
    state = train.replicate(mesh, train.create_train_state(variables, tx, widths=model.widths))
    batch = train.shard_batch(mesh, {'image': x, 'label': y})
    with ctx():
      step = (train.make_train_step(model, tx, mesh, xla_options=opts)
              if hasattr(train, 'compiler_options') else train.make_train_step(model, tx, mesh))
      state, m = step(state, batch)
      jax.block_until_ready(m)
      xi = jax.device_put(rng.standard_normal((a.infer_batch, 28, 28, 1), np.float32))
      infer = jax.jit(lambda v, xx, model=model: model.apply(v, xx, train=False),
                      compiler_options=opts)
      jax.block_until_ready(infer(variables, xi))
    box = {'state': state}

    def run_train(n, step=step, batch=batch, box=box):
      st = box['state']
      for _ in range(n):
        st, m = step(st, batch)
      jax.block_until_ready((st, m))
      box['state'] = st

    def run_infer(n, infer=infer, variables=variables, xi=xi):
      for _ in range(n):
        out = infer(variables, xi)
      jax.block_until_ready(out)

    tasks[f'train/{name}'] = run_train
    tasks[f'infer/{name}'] = run_infer
  return tasks, {'jax': jax.__version__, 'devices': str(jax.devices())}


def _torch_resnet(blocks):
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.proj is None else self.proj(x)))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU())
      layers, cin = [], 16
      for s, c in enumerate((16, 32, 64)):
        for b in range(blocks):
          layers.append(Block(cin, c, 2 if (b == 0 and s > 0) else 1))
          cin = c
      self.layers = nn.Sequential(*layers)
      self.head = nn.Linear(64, 10)

    def forward(self, x):
      return self.head(self.layers(self.stem(x)).mean((2, 3)))

  return Net()


def _torch_worker(kind, a):
  import numpy as np
  import torch
  if kind == 'torch1':
    torch.set_num_threads(1)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  tasks = {}
  for name in a.models:
    net = _torch_resnet(MODELS[name])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x = torch.from_numpy(rng.standard_normal((a.train_batch, 1, 28, 28), np.float32))
    y = torch.from_numpy(rng.integers(0, 10, a.train_batch))
    xi = torch.from_numpy(rng.standard_normal((a.infer_batch, 1, 28, 28), np.float32))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run_train(n, net=net, opt=opt, x=x, y=y):
      net.train()
      for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
      loss.item()

    def run_infer(n, net=net, xi=xi):
      net.eval()
      with torch.no_grad():
        for _ in range(n):
          out = net(xi)
      float(out[0, 0])

    run_train(2)
    run_infer(2)
    tasks[f'train/{name}'] = run_train
    tasks[f'infer/{name}'] = run_infer
  return tasks, {'torch': torch.__version__, 'threads': torch.get_num_threads()}


def worker(kind, a):
  tasks, info = (_torch_worker if kind.startswith('torch') else _jax_worker)(kind, a)
  print(json.dumps({'ready': kind, 'info': info}), flush=True)
  for line in sys.stdin:
    task, n = line.split()
    tasks[task](1)  # one untimed call: the caches of this process after the others ran
    t0, c0 = time.perf_counter(), time.process_time()
    tasks[task](int(n))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({'wall': wall, 'cpu': cpu}), flush=True)


# --- driver -------------------------------------------------------------------------------------

def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--kinds', default='jax,torch')
  ap.add_argument('--models', default='resnet8,resnet20')
  ap.add_argument('--tasks', default='train,infer')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--steps', type=int, default=5, help='timed train steps per round and kind')
  ap.add_argument('--infer_steps', type=int, default=20)
  ap.add_argument('--train_batch', type=int, default=128)
  ap.add_argument('--infer_batch', type=int, default=64)
  ap.add_argument('--worker', default=None)
  ap.add_argument('--rewrite', default=None, help='a results .json: rewrite its summary and .md')
  ap.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results', 'bench_vs_torch'))
  a = ap.parse_args()
  a.models = a.models.split(',')
  if a.worker:
    return worker(a.worker, a)
  if a.rewrite:
    rec = json.load(open(a.rewrite))
    rec.setdefault('kinds', list(next(iter(rec['rounds'].values()))))
    rec.setdefault('tasks', list(rec['rounds']))
    return write(rec, a.rewrite[:-len('.json')])
  kinds = a.kinds.split(',')
  procs, infos = {}, {}
  for k in kinds:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', k, '--models',
           ','.join(a.models), '--train_batch', str(a.train_batch), '--infer_batch',
           str(a.infer_batch)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    if '+' in k:  # e.g. jax+xla_cpu_experimental_ynn_fusion_type=: extra XLA flags
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --' +
                          ' --'.join(k.split('+')[1:])).strip()
    procs[k] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env=env, stderr=open(f'{a.out}.worker{len(procs)}.log', 'w'))
  for k, p in procs.items():  # workers build and compile concurrently, then wait
    while True:
      line = p.stdout.readline()
      if not line:
        raise RuntimeError(f'worker {k} exited, see {a.out}.worker{kinds.index(k)}.log')
      if line.startswith('{'):
        infos[k] = json.loads(line)['info']
        break
  tasks = [f'{t}/{m}' for t in a.tasks.split(',') for m in a.models]
  rows = {t: {k: [] for k in kinds} for t in tasks}
  loads = []
  for r in range(a.rounds):
    loads.append(os.getloadavg())
    for t in tasks:
      n = a.steps if t.startswith('train') else a.infer_steps
      batch = a.train_batch if t.startswith('train') else a.infer_batch
      order = kinds if r % 2 == 0 else kinds[::-1]
      for k in order:
        procs[k].stdin.write(f'{t} {n}\n')
        procs[k].stdin.flush()
        res = json.loads(procs[k].stdout.readline())
        rows[t][k].append({'images_per_s': batch * n / res['wall'],
                           'cpu_per_wall': res['cpu'] / res['wall']})
    print(f'round {r + 1}/{a.rounds} load {loads[-1]}', flush=True)
  for p in procs.values():
    p.stdin.close()
    p.wait()

  rec = {'command': ' '.join(['PYTHONPATH=. .venv/bin/python', 'experiments/bench_vs_torch.py'] +
                             sys.argv[1:]),
         'date': time.strftime('%Y-%m-%d %H:%M'), 'host': f'{platform.machine()}, '
         f'{os.cpu_count()} cores', 'loadavg_per_round': loads, 'versions': infos,
         'args': {k: v for k, v in vars(a).items() if k != 'worker'}, 'kinds': kinds,
         'tasks': tasks, 'rounds': rows}
  write(rec, a.out)


def write(rec, out):
  """Adds the summary to ``rec`` and writes ``out``.json / .md: per task, images/s of every kind
  (median over rounds, min-max) and, for every jax kind against every torch kind, the median
  over rounds of the per-round ratio of images/s."""
  import numpy as np
  kinds, tasks, rows, loads = rec['kinds'], rec['tasks'], rec['rounds'], rec['loadavg_per_round']
  jk = [k for k in kinds if not k.startswith('torch')]
  tk = [k for k in kinds if k.startswith('torch')]
  pairs = [(j, t) for j in jk for t in tk]
  summary = {}
  for t in tasks:
    s = {}
    for k in kinds:
      ips = [v['images_per_s'] for v in rows[t][k]]
      s[k] = {'images_per_s_median': float(np.median(ips)), 'min': float(min(ips)),
              'max': float(max(ips)),
              'cpu_per_wall': float(np.median([v['cpu_per_wall'] for v in rows[t][k]]))}
    for j, r in pairs:
      ratios = [u['images_per_s'] / v['images_per_s'] for u, v in zip(rows[t][j], rows[t][r])]
      s[f'{j}/{r}'] = {'median': float(np.median(ratios)),
                       'rounds': [round(x, 3) for x in ratios]}
    summary[t] = s
  rec['summary'] = summary
  lines = [f"`{rec['command']}` ({rec['date']}, {rec['host']}, load average per round "
           f"{', '.join(f'{l[0]:.1f}' for l in loads)})", '',
           '| task | ' + ' | '.join(f'{k} images/s' for k in kinds) + ' | ' +
           ' | '.join(f'{j} / {r}' for j, r in pairs) + ' |',
           '|---' * (1 + len(kinds) + len(pairs)) + '|']
  for t in tasks:
    s = summary[t]
    lines.append(f'| {t} | ' + ' | '.join(
        f"{s[k]['images_per_s_median']:.0f} ({s[k]['min']:.0f}-{s[k]['max']:.0f})"
        for k in kinds) + ' | ' + ' | '.join(
        f"**{s[f'{j}/{r}']['median']:.2f}** ({min(s[f'{j}/{r}']['rounds']):.2f}-"
        f"{max(s[f'{j}/{r}']['rounds']):.2f})" for j, r in pairs) + ' |')
  lines += ['', 'images/s: median over rounds (min-max); ratios: median over rounds of the '
            'per-round ratio (min-max); cpu/wall of each kind in the json.']
  md = '\n'.join(lines) + '\n'
  print(md)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + '.json', 'w') as f:
    json.dump(rec, f, indent=1)
  with open(out + '.md', 'w') as f:
    f.write(md)


if __name__ == '__main__':
  main()
