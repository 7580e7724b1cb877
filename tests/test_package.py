"""The library installs as a package (pyproject.toml): the wheel holds every module of the
checkout, and the installed copy imports and discovers a model's groups from any directory, without PYTHONPATH."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_modules():
  out = subprocess.run(['git', 'ls-files', 'taylor_jax'], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout.split()
  return {p for p in out if p.endswith('.py')}


def test_wheel_holds_every_module_and_the_installed_copy_runs_from_anywhere(tmp_path):
  # Built from a copy: building in the checkout would leave build/ and egg-info behind.
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  shutil.copytree(os.path.join(ROOT, 'taylor_jax'), src / 'taylor_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  wheels = tmp_path / 'wheels'
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                  '-w', str(wheels), str(src)], check=True, capture_output=True, timeout=300)
  (wheel,) = wheels.glob('taylor_jax-*.whl')
  with zipfile.ZipFile(wheel) as z:
    in_wheel = {n for n in z.namelist() if n.endswith('.py')}
  missing = _tracked_modules() - in_wheel
  assert not missing, f'modules left out of the wheel (a package without __init__.py?): {missing}'

  site = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                  str(site), str(wheel)], check=True, capture_output=True, timeout=300)
  # From an empty directory, the installed copy only: discovery of a tiny CNN's groups.
  code = '''
import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
import taylor_jax
assert taylor_jax.__file__.startswith(SITE), taylor_jax.__file__
class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(3)(x.mean((1, 2)))
x = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype(np.float32)
pr = taylor_jax.Pruner(Net(), x[:2], target=taylor_jax.Target(flops=0.25),
                       tx=optax.sgd(0.1), train_kwarg=None)
import json; print(json.dumps(pr.widths))
'''.replace('SITE', repr(str(site)))
  empty = tmp_path / 'empty'
  empty.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PYTHONPATH'] = str(site)
  r = subprocess.run([sys.executable, '-c', code], cwd=empty, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  widths = json.loads(r.stdout.strip().splitlines()[-1])
  assert list(widths.values()) == [8], widths  # the conv's channels: the one prunable group
