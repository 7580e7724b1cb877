"""The data-parallel train step computes what one device computes on the whole batch:
2 simulated CPU devices in one process, and 2 processes on localhost (jax.distributed)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'workers', 'train_steps.py')


def _env(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = helpers.xla_flags(f'--xla_force_host_platform_device_count={devices}')
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Every test here uses the session-scoped ``single_device``: one pytest-xdist worker runs them all
# (run_tests.sh: --dist loadgroup), so that it is built once, not once per worker (session scope:
# not torn down and rebuilt when the worker runs another module's test in between).
pytestmark = pytest.mark.xdist_group('data_parallel_single_device')


@pytest.fixture(scope='session')
def single_device(tmp_path_factory):
  out = tmp_path_factory.mktemp('dp') / 'one.npz'
  subprocess.run([sys.executable, WORKER, str(out)], env=_env(1), check=True, cwd=ROOT,
                 timeout=300)
  return dict(np.load(out))


def _assert_same(a: dict, b: dict) -> None:
  keys = sorted(k for k in a if k != 'devices')
  assert keys == sorted(k for k in b if k != 'devices')
  assert any('batch_stats' in k or 'mean' in k for k in keys)
  for k in keys:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_two_simulated_devices_match_one(single_device, tmp_path):
  out = tmp_path / 'two.npz'
  subprocess.run([sys.executable, WORKER, str(out)], env=_env(2), check=True, cwd=ROOT,
                 timeout=300)
  two = dict(np.load(out))
  assert int(two['devices']) == 2 and int(single_device['devices']) == 1
  _assert_same(single_device, two)


def test_two_processes_match_one(single_device, tmp_path):
  out = tmp_path / 'mp.npz'
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(out), '--processes', '2',
                             '--process_id', str(i), '--port', str(port)],
                            env=_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  multi = dict(np.load(out))
  assert int(multi['devices']) == 2
  _assert_same(single_device, multi)
