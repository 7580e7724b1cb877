"""Where the time of the jitted train step goes on XLA:CPU: per-op timing from a ``jax.profiler``
trace, joined with the optimized HLO (which backend runs each op, at which shape, for which
layer).

  PYTHONPATH=. .venv/bin/python experiments/profile_train_step.py --model resnet20
  PYTHONPATH=. .venv/bin/python experiments/profile_train_step.py --model resnet8 --reference

Prints a table of categories (ms per step summed over ops; ops on the two XLA worker threads can
overlap, so the sum can exceed the step's wall time) and the slowest ops; ``--out`` writes both
as JSON. ``--reference`` traces the model with ``common.reference_convolutions()`` (every conv a
plain ``lax.conv``). Times are inflated by the profiler and by other load on the machine: read
them as shares, not as absolute step times.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DUMP = tempfile.mkdtemp(prefix='tj_hlo_')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_dump_to={DUMP} --xla_dump_hlo_as_text'
                           ' --xla_dump_hlo_module_re=.*per_device.*')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from taylor_jax import models, train  # noqa: E402
from taylor_jax.models import common  # noqa: E402

_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) (\w[\w-]*)\((.*)$')


def parse_hlo(path):
  """name -> dict(opcode, shape, root opcode of a fusion, conv window/labels, op_name, backend)."""
  comps, cur, info = {}, None, {}
  for line in open(path):
    m = re.match(r'^(?:ENTRY )?%(\S+) \(', line)
    if m:
      cur = m.group(1)
      comps[cur] = []
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      name, shape, op, rest = m.groups()
      shape = re.sub(r'\{[^}]*\}', '', shape)
      comps[cur].append((name, shape, op, rest, line.startswith('  ROOT') or ' ROOT ' in line[:8]))
  by_name = {}
  for comp, instrs in comps.items():
    for name, shape, op, rest, is_root in instrs:
      by_name[name] = (comp, shape, op, rest, is_root)
  for name, (comp, shape, op, rest, _) in by_name.items():
    d = {'opcode': op, 'shape': shape}
    called = re.search(r'calls=%(\S+?)[,\s]', rest + ' ')
    body = comps.get(called.group(1), []) if called else []
    root = next((i for i in body if i[4]), body[-1] if body else None)
    d['root'] = root[2] if root else op
    conv = [i for i in body if i[2] == 'convolution'] or ([(name, shape, op, rest, True)]
                                                          if op == 'convolution' else [])
    if conv:
      c = conv[0]
      d['conv'] = ' '.join(re.findall(r'(window=\{[^}]*\}|dim_labels=\S+?),', c[3]))
      d['conv_shape'] = c[1]
    d['has_dot'] = op == 'dot' or any(i[2] == 'dot' for i in body)
    names = re.findall(r'op_name="([^"]*)"', rest)
    if not names:
      for i in body[::-1]:
        names = re.findall(r'op_name="([^"]*)"', i[3])
        if names:
          break
    d['op_name'] = names[0] if names else ''
    if '__ynn_fusion' in rest:
      d['backend'] = 'YNNPACK'
    elif '__onednn' in rest or 'onednn' in rest.lower():
      d['backend'] = 'oneDNN'
    elif op == 'convolution':
      d['backend'] = 'XLA conv (Eigen)'
    elif op == 'dot':
      d['backend'] = 'XLA dot (Eigen)'
    elif op == 'fusion':
      d['backend'] = 'XLA emitter'
    else:
      d['backend'] = f'XLA {op}'
    info[name] = d
  return info


def _numel(shape):
  dims = re.findall(r'\[([\d,]*)\]', shape)
  n = 1
  for x in (dims[0].split(',') if dims and dims[0] else []):
    n *= int(x)
  return n


def classify(d, batch):
  on = d['op_name']
  bwd = 'transpose(' in on
  shape = d.get('conv_shape', d['shape'])
  if 'conv' in d:
    dims = [int(v) for v in re.findall(r'\[([\d,]*)\]', shape)[0].split(',')]
    if dims[0] != batch:
      return 'conv weight gradient'
    return 'conv input gradient' if bwd else 'conv forward'
  if d['has_dot']:
    return 'dense / im2col matmuls'
  n = _numel(d['shape'])
  if n >= batch * 49 * 16:
    if d['root'] in ('transpose', 'copy') or 'transpose' in d.get('root', ''):
      return 'layout transposes (for conv gradients)'
    if 'stem_conv' in on:
      return 'stem conv (shifted multiply-adds) ' + ('backward' if bwd else 'forward')
    return 'elementwise on activations ' + ('backward' if bwd else 'forward') + \
        ' (BN apply, ReLU, gates, adds)'
  if d['root'] in ('reduce',) or 'reduce' in on:
    return 'BN statistics / bias-grad reductions'
  if 'CifarResNet' in on or 'jvp' in on or 'cross_entropy' in on or 'log_softmax' in on:
    return 'small model ops (BN stat updates, head, loss)'
  return 'optimizer, gate grads, metrics, other small ops'


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--model', default='resnet20')
  ap.add_argument('--batch_size', type=int, default=128)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--reference', action='store_true')
  ap.add_argument('--top', type=int, default=25)
  ap.add_argument('--xla_defaults', action='store_true',
                  help="compile with XLA's default options, not train.CPU_COMPILER_OPTIONS")
  ap.add_argument('--out', default=None)
  a = ap.parse_args()
  model = models.create(a.model, 10)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((a.batch_size, 28, 28, 1), np.float32)
  y = rng.integers(0, 10, a.batch_size).astype(np.int32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1]))()
  optim = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9,
                                         nesterov=True, weight_decay=5e-4, schedule='cosine'))
  tx = train.create_optimizer(optim, 100, 1000)
  mesh = train.create_mesh()
  state = train.replicate(mesh, train.create_train_state(variables, tx, widths=model.widths))
  import contextlib
  ctx = common.reference_convolutions() if a.reference else contextlib.nullcontext()
  with ctx:
    step = train.make_train_step(model, tx, mesh,
                                 xla_options=None if a.xla_defaults else 'auto')
    batch = train.shard_batch(mesh, {'image': x, 'label': y})
    for _ in range(3):
      state, m = step(state, batch)
      jax.block_until_ready(m)
  walls = []
  for _ in range(5):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    walls.append(time.perf_counter() - t0)
  trace_dir = tempfile.mkdtemp(prefix='tj_trace_')
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  t0 = time.perf_counter()
  for _ in range(a.steps):
    state, m = step(state, batch)
    jax.block_until_ready(m)
  traced_wall = (time.perf_counter() - t0) / a.steps
  jax.profiler.stop_trace()

  hlo = sorted(glob.glob(f'{DUMP}/*per_device*cpu_after_optimizations.txt'))[-1]
  info = parse_hlo(hlo)
  tf = glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)[0]
  ev = json.load(gzip.open(tf))
  ev = ev['traceEvents'] if isinstance(ev, dict) else ev
  dur, threads = collections.defaultdict(float), collections.defaultdict(set)
  for e in ev:
    if e.get('ph') == 'X' and e['name'] in info:
      dur[e['name']] += e['dur'] / 1e3 / a.steps
      threads[e['name']].add(e['tid'])
  cats = collections.defaultdict(lambda: [0.0, 0, set()])
  for name, ms in dur.items():
    c = cats[classify(info[name], a.batch_size)]
    c[0] += ms
    c[1] += 1
    c[2].add(info[name]['backend'])
  total = sum(dur.values())
  rows = sorted(cats.items(), key=lambda kv: -kv[1][0])
  print(f'model {a.model} batch {a.batch_size} reference={a.reference} step wall (untraced, '
        f'median of 5) {np.median(walls) * 1e3:.1f} ms, traced {traced_wall * 1e3:.1f} ms, '
        f'sum over ops {total:.1f} ms, load {os.getloadavg()}')
  print('| category | ms/step (sum over ops) | share | ops | backends |')
  print('|---|---|---|---|---|')
  for k, (ms, n, be) in rows:
    print(f'| {k} | {ms:.1f} | {ms / total:.0%} | {n} | {", ".join(sorted(be))} |')
  print('\nslowest ops:')
  print('| op | ms/step | threads | backend | shape | conv | layer |')
  print('|---|---|---|---|---|---|---|')
  top = sorted(dur.items(), key=lambda kv: -kv[1])[:a.top]
  for name, ms in top:
    d = info[name]
    layer = re.sub(r'jit\(per_device\)/', '', d['op_name'])[:70]
    print(f"| {name} | {ms:.2f} | {len(threads[name])} | {d['backend']} | "
          f"{d.get('conv_shape', d['shape'])} | {d.get('conv', '')} | {layer} |")
  if a.out:
    with open(a.out, 'w') as f:
      json.dump({'model': a.model, 'batch_size': a.batch_size, 'reference': a.reference,
                 'step_wall_ms': float(np.median(walls) * 1e3),
                 'traced_wall_ms': traced_wall * 1e3, 'sum_ops_ms': total,
                 'loadavg': os.getloadavg(),
                 'categories': {k: {'ms': v[0], 'ops': v[1], 'backends': sorted(v[2])}
                                for k, v in rows},
                 'ops': {n: dict(info[n], ms=ms, threads=len(threads[n])) for n, ms in
                         sorted(dur.items(), key=lambda kv: -kv[1])}}, f, indent=1)


if __name__ == '__main__':
  main()
