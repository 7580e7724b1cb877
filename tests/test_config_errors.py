"""Bad input gets a clear error before any data is read or anything is written."""

import os
import subprocess
import sys

import pytest

from taylor_jax import configlib, run

import helpers  # noqa: E402  (tests/ is on sys.path)

_config = helpers.pruning_config
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('overrides, message', [
    ({'model': 'resnet9000'}, "unknown model 'resnet9000'"),
    ({'dataset': 'mnist_fancy'}, "Unknown dataset 'mnist_fancy'"),
    ({'train.batch_size': 0}, 'train.batch_size=0'),
    ({'optim.learning_rate': -0.1}, 'optim.learning_rate=-0.1'),
    ({'optim.schedule': 'linear'}, "optim.schedule='linear'"),
    ({'prune.estimator': 'nope'}, "unknown estimator 'nope'"),
    ({'prune.target_flops_reduction': 1.5}, 'prune.target_flops_reduction=1.5'),
    ({'prune.target_flops_reduction': None}, 'no target'),
    ({'prune.target_units': 10}, 'set one pruning target, not 2'),
    ({'prune.min_width': 0}, 'prune.min_width=0'),
    ({'prune.max_share': 2.0}, 'prune.max_share=2.0'),
    ({'prune.max_share_per_group': 'stage1:0.5'}, 'entries are name=share'),
    ({'prune.align': 0}, 'prune.align=0'),
    ({'prune.target_tolerance': -0.1}, 'prune.target_tolerance=-0.1'),
    ({'prune.rank_by': 'latency'}, "prune.rank_by='latency'"),
    ({'prune.scope': 'regional'}, "prune.scope='regional'"),
    ({'prune.scope': 'local', 'prune.rank_by': 'score_per_flop'}, "prune.scope='local' ranks"),
])
def test_invalid_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    run.run(_config(**overrides), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize('overrides, message', [
    ({'prune.target_flops_reduction': None, 'prune.target_units': 10_000}, 'removes 10000 units'),
    ({'prune.max_share': 0.2, 'prune.target_flops_reduction': 0.6}, 'fewer FLOPs'),
    ({'prune.min_width': 60, 'prune.target_flops_reduction': 0.5}, 'fewer FLOPs'),
    ({'prune.max_share_per_group': 'stage9*=0.5'}, r"\['stage9\*'\] match no channel group"),
])
def test_unreachable_targets_are_refused_before_training(tmp_path, fashion_mnist_data_dir,
                                                         overrides, message):
  c = _config(**overrides)
  c.data_dir = fashion_mnist_data_dir
  with pytest.raises(ValueError, match=message):
    run.run(c, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'checkpoints').exists() or \
      not os.listdir(tmp_path / 'w' / 'checkpoints')


def test_missing_fashion_mnist_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv('TAYLOR_JAX_FASHION_MNIST_DIR', str(tmp_path / 'no_idx_here'))
  c = _config()
  c.data_dir = str(tmp_path / 'empty_tfds')
  with pytest.raises((FileNotFoundError, ValueError), match='setup.sh|prepare|apt-get'):
    run.run(c, str(tmp_path / 'w'))


def test_a_target_field_that_does_not_exist_is_named_with_the_real_ones(tmp_path):
  workdir = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, '-m', 'taylor_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', '--config.prune.target_latency=0.3'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert "--config.prune.target_latency: prune has no field 'target_latency'" in proc.stderr
  assert 'target_flops_reduction' in proc.stderr and 'target_units' in proc.stderr
  assert not workdir.exists()
