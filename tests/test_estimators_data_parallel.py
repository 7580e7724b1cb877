"""Scores accumulated inside the 2-device data-parallel train step equal one-device accumulation.

The 2-device run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX starts,
so both runs happen in subprocesses (this file is also the worker: ``python THIS OUT NDEV``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ESTIMATORS = ('taylor_fo_bn', 'taylor_fo_bn_fg', 'taylor_so')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = {'stage1': 4, 'stage1.block0': 3, 'stage2': 5, 'stage2.block0': 4, 'stage3': 6,
          'stage3.block0': 3}


def worker(out_path: str, ndev: int) -> None:
  import jax
  import ml_collections
  from taylor_jax import estimators as E
  from taylor_jax import models, train
  assert len(jax.devices()) == ndev, jax.devices()
  model = models.create('resnet8', 10, widths=WIDTHS)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
              'label': rng.integers(0, 10, size=8).astype(np.int32)} for _ in range(3)]
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batches[0]['image'])

  def draw(path, a):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=a.shape) * 1.4 / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
    if name in ('scale', 'var'):
      return (1.0 + 0.2 * rng.random(a.shape)).astype(np.float32)
    return (0.1 * rng.normal(size=a.shape)).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  masks = {g.name: (np.arange(g.width) % 3 != 1).astype(np.float32) for g in model.groups()}
  tx = train.create_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.05, momentum=0.9, weight_decay=1e-4, schedule='constant')),
      10, 10)
  mesh = train.create_mesh()
  out = {}
  for name in ESTIMATORS:
    state = train.replicate(mesh, train.create_train_state(variables, tx, masks=masks))
    step = train.make_train_step(model, tx, mesh, estimator=E.get(name))
    for b in batches:
      state, _ = step(state, train.shard_batch(mesh, b))
    for k, v in state.score_sum.items():
      out[f'{name}/{k}'] = np.asarray(v)
    out[f'{name}/count'] = np.asarray(state.score_count)
  np.savez(out_path, **out)


def test_two_devices_equal_one(tmp_path):
  import helpers
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = helpers.xla_flags()
  procs, paths = [], {}
  for ndev in (1, 2):
    paths[ndev] = str(tmp_path / f'dev{ndev}.npz')
    e = dict(env)
    if ndev > 1:
      e['XLA_FLAGS'] = helpers.xla_flags(f'--xla_force_host_platform_device_count={ndev}')
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), paths[ndev],
                                   str(ndev)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for p in procs:
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-4000:]
  one, two = np.load(paths[1]), np.load(paths[2])
  assert sorted(one.files) == sorted(two.files)
  for name in ESTIMATORS:
    assert int(one[f'{name}/count']) == int(two[f'{name}/count']) == 3
    keys = [k for k in one.files if k.startswith(name + '/') and not k.endswith('/count')]
    scale = max(float(np.max(np.abs(one[k]))) for k in keys)
    assert scale > 0
    for k in keys:
      assert np.all(one[k][np.arange(one[k].size) % 3 == 1] == 0)  # pruned units
      np.testing.assert_allclose(two[k], one[k], rtol=2e-4, atol=2e-5 * scale, err_msg=k)


if __name__ == '__main__':
  worker(sys.argv[1], int(sys.argv[2]))
