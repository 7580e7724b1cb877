"""A user's own model file, unknown to taylor_jax, through the main job: trained, pruned with
discovered groups, fine-tuned, reported, then evaluated in a fresh process; models the analysis
cannot follow or that hard-code a width stop before any training step with a clear error."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_NNX = '''
from flax import nnx


class Net(nnx.Module):
  def __init__(self, num_classes, *, rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 24, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(24, rngs=rngs)
    self.fc = nnx.Linear(24 * 49, 32, rngs=rngs)
    self.head = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.fc(x.reshape((x.shape[0], -1))))
    return self.head(x)
'''

USER_LINEN_BAD = '''
import jax
import jax.numpy as jnp
import flax.linen as nn


class Scale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param('w', nn.initializers.ones, (16,))  # hard-coded width


class HardCoded(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(Scale()(nn.Conv(16, (3, 3), strides=4, name='conv')(x)))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class Unknown(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=4, name='conv')(x)
    x = jnp.fft.fft(x, axis=-1).real  # a spectral layer: no discovery rule for 'fft'
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))
'''

# Every surgery recompiles the train and eval steps: 16 units a step reach the 40% FLOPs target in
# one pruning step (each conv2 unit is ~4% of the FLOPs, each conv1 unit ~5%).
SMALL = ['--config=configs/user_model.py', '--config.train.limit_examples=512',
         '--config.train.batch_size=64', '--config.train.epochs=1',
         '--config.train.limit_eval_examples=250', '--config.train.eval_batch_size=250',
         '--config.prune.frequency=4', '--config.prune.prune_per_iteration=16',
         '--config.prune.finetune_epochs=0.5', '--config.prune.eval_examples=0',
         '--config.report.latency_repeats=1', '--config.report.latency_rounds=1']


def _main(tmp_path, workdir, *extra):
  env = dict(os.environ, PYTHONPATH=f'{ROOT}:{tmp_path}')
  cmd = [sys.executable, '-m', 'taylor_jax.main', f'--workdir={workdir}', *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture()
def user_files(tmp_path):
  (tmp_path / 'user_nnx_net.py').write_text(textwrap.dedent(USER_NNX))
  (tmp_path / 'user_bad_nets.py').write_text(textwrap.dedent(USER_LINEN_BAD))
  return tmp_path


def test_user_nnx_model_trains_prunes_reports_and_evaluates(user_files, fashion_mnist_data_dir):
  workdir = str(user_files / 'run')
  proc = _main(user_files, workdir, *SMALL, '--config.model=user_nnx_net:Net',
               f'--config.data_dir={fashion_mnist_data_dir}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, 'report.json')) as f:
    rep = json.load(f)
  assert rep['pruned']['flops'] <= 0.65 * rep['baseline']['flops']  # target 40%, tolerance 5
  assert rep['pruned']['params'] < rep['baseline']['params']
  widths = rep['pruned']['widths']
  assert set(widths) == {'conv1', 'conv2', 'fc'} and widths['conv2'] < 24
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    check = [json.loads(l) for l in f if '"group_check"' in l][0]
  assert check['probe_max_rel_diff'] < 1e-5 and check['prunable'] == 3
  proc = _main(user_files, workdir, *SMALL, '--config.model=user_nnx_net:Net', '--mode=evaluate',
               f'--config.data_dir={fashion_mnist_data_dir}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert abs(float(proc.stdout.split('restored  test_accuracy=')[1].split()[0]) -
             rep['pruned']['test_accuracy']) < 1e-6


@pytest.mark.parametrize('factory,message', [
    ('HardCoded', 'hard-coded'), ('Unknown', "no rule for primitive 'fft'")])
def test_model_the_library_cannot_prune_stops_before_training(user_files, factory, message):
  workdir = str(user_files / factory)
  proc = _main(user_files, workdir, *SMALL, f'--config.model=user_bad_nets:{factory}')
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not os.path.exists(os.path.join(workdir, 'checkpoints')) or not any(
      d.isdigit() for d in os.listdir(os.path.join(workdir, 'checkpoints')))
