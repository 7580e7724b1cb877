"""Nothing wrong runs silently (issue 14): damaged checkpoints, config drift on resume, NaN,
device divisibility, wrong estimator output, alignment wider than a group, corrupt weight files
and a missing config file each stop with a message that names the problem, before any training
step where the problem is known then. Runs are LeNet3 on 256 examples (seconds)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import traceback

import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from taylor_jax import checkpoint, configlib, convert, estimators, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(data_dir, **overrides):
  """LeNet3, 256 training examples in batches of 64 (4 steps an epoch), a checkpoint every 2."""
  c = configlib.base_config()
  c.model, c.data_dir, c.train.crop_pad = 'lenet3', data_dir, 0
  c.train.limit_examples, c.train.batch_size, c.train.epochs = 256, 64, 1.0
  c.train.checkpoint_every_steps = c.train.log_every_steps = 2
  c.train.limit_eval_examples = c.train.eval_batch_size = 100
  c.report.latency_repeats = c.report.latency_rounds = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _pruning(**overrides):
  return {'prune.enabled': True, 'prune.target_units': 10, 'prune.frequency': 2,
          'prune.prune_per_iteration': 5, 'prune.finetune_epochs': 0.5,
          'prune.eval_examples': 100, **overrides}


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


# The tests that use the session-scoped ``finished`` run on one pytest-xdist worker (run_tests.sh:
# --dist loadgroup), so that it is built once, not once per worker (session scope:
# not torn down and rebuilt when the worker runs another module's test in between).
SHARED = pytest.mark.xdist_group('reliability_finished')


@pytest.fixture(scope='session')
def finished(tmp_path_factory, fashion_mnist_data_dir):
  """A finished baseline-only run; its checkpoints are steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  result = run.run(_tiny(fashion_mnist_data_dir), workdir)
  assert _steps(workdir) == [2, 4]
  return workdir, result


def _copy(finished, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(finished[0], workdir)
  os.remove(os.path.join(workdir, 'report.json'))
  return workdir


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def _damage(workdir, step, item):
  d = os.path.join(workdir, 'checkpoints', str(step))
  if item == 'state':  # the OCDBT data file of the arrays
    data = os.path.join(d, 'state', 'd')
    for name in os.listdir(data):
      _truncate(os.path.join(data, name))
  else:
    _truncate(os.path.join(d, 'meta', 'metadata'))


# --- 1. damaged checkpoints ---------------------------------------------------------------------

@SHARED
@pytest.mark.parametrize('item', ['state', 'meta'])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    finished, tmp_path, fashion_mnist_data_dir, caplog, item):
  workdir = _copy(finished, tmp_path)
  _damage(workdir, 4, item)
  with caplog.at_level(logging.WARNING):
    result = run.run(_tiny(fashion_mnist_data_dir), workdir)
  warning = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  assert len(warning) == 1 and 'step 4' in warning[0] and 'resuming from step 2' in warning[0]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '4', item))
  # Steps 3-4 trained again from step 2: the same result, bit for bit.
  for key in ('test_accuracy', 'test_loss', 'params', 'flops'):
    assert result['baseline'][key] == finished[1]['baseline'][key], key


@SHARED
def test_no_restorable_checkpoint_lists_each_and_moves_nothing(finished, tmp_path,
                                                               fashion_mnist_data_dir):
  workdir = _copy(finished, tmp_path)
  _damage(workdir, 4, 'state')
  _damage(workdir, 2, 'meta')
  with pytest.raises(RuntimeError) as e:  # checkpoint.DamagedCheckpointError
    run.run(_tiny(fashion_mnist_data_dir), workdir)
  msg = str(e.value)
  assert isinstance(e.value, checkpoint.DamagedCheckpointError)
  assert 'step 4' in msg and 'step 2' in msg and 'metadata (JSONDecodeError' in msg
  assert 'state (' in msg and 'start the run afresh' in msg
  assert _steps(workdir) == [2, 4] and not os.path.exists(
      os.path.join(workdir, 'checkpoints_damaged'))


# --- 2. config drift on resume --------------------------------------------------------------------

def _fingerprint(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted((root, f, os.path.getmtime(os.path.join(root, f)))
                for root, _, files in os.walk(d) for f in files)


@pytest.mark.parametrize('overrides, field', [
    ({'train.epochs': 2.0}, "train.epochs: 1.0 saved, 2.0 now"),
    ({'optim.learning_rate': 0.2}, 'optim.learning_rate: 0.1 saved, 0.2 now'),
    (_pruning(), 'prune.enabled: False saved, True now'),
])
@SHARED
def test_resume_with_a_result_changing_field_is_refused(finished, tmp_path,
                                                        fashion_mnist_data_dir, overrides, field):
  workdir = _copy(finished, tmp_path)
  before = _fingerprint(workdir)
  with pytest.raises(ValueError) as e:  # run.ConfigChangedError
    run.run(_tiny(fashion_mnist_data_dir, **overrides), workdir)
  assert field in str(e.value) and '--allow_config_change' in str(e.value)
  assert _fingerprint(workdir) == before


@SHARED
def test_resume_with_neutral_changes_goes_on_and_allowed_changes_are_recorded(
    finished, tmp_path, fashion_mnist_data_dir):
  workdir = _copy(finished, tmp_path)
  neutral = {'train.log_every_steps': 7, 'train.checkpoint_every_steps': 3,
             'report.latency_repeats': 2}
  result = run.run(_tiny(fashion_mnist_data_dir, **neutral), workdir)
  assert 'config_changes' not in result
  result = run.run(_tiny(fashion_mnist_data_dir, **{'train.epochs': 2.0}), workdir,
                   allow_config_change=True)
  assert result['config_changes'] == [{'step': 4, 'changes': {'train.epochs': [1.0, 2.0]}}]


# --- 3. NaN ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    ({'prune.learning_rate': float('nan')}, 'prune.learning_rate=nan: must be a finite number'),
    ({'prune.finetune_learning_rate': 0.0}, 'prune.finetune_learning_rate=0.0: must be > 0'),
    ({'prune.learning_rate': -0.01}, 'prune.learning_rate=-0.01: must be > 0'),
    ({'optim.learning_rate': float('inf')}, 'optim.learning_rate=inf: must be a finite number'),
    ({'optim.weight_decay': float('inf')}, 'optim.weight_decay=inf: must be a finite number'),
    ({'prune.finetune_epochs': float('inf')}, 'prune.finetune_epochs=inf'),
    ({'optim.warmup_epochs': float('nan')}, 'optim.warmup_epochs=nan'),
    ({'train.checkpoint_every_steps': 0}, 'train.checkpoint_every_steps=0'),
    ({'report.latency_repeats': 0}, 'report.latency_repeats=0'),
])
def test_non_finite_and_out_of_range_numbers_are_refused(overrides, message):
  c = _tiny(None, **_pruning(**overrides))
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    configlib.validate(c)


def test_nan_loss_stops_the_run_naming_step_and_phase(tmp_path, fashion_mnist_data_dir):
  workdir = str(tmp_path / 'w')
  # No BatchNorm in LeNet3: a learning rate of 1e8 overflows within a few steps.
  c = _tiny(fashion_mnist_data_dir, **{'optim.learning_rate': 1e8, 'train.epochs': 4.0})
  # run.NonFiniteError
  with pytest.raises(FloatingPointError, match=r"at step (\d+) \(phase 'baseline'\)") as e:
    run.run(c, workdir)
  step = int(str(e.value).split('at step ')[1].split()[0])
  assert 'optim.learning_rate' in str(e.value)
  assert all(s < step for s in _steps(workdir))  # nothing saved from the NaN step on
  assert not os.path.exists(os.path.join(workdir, 'report.json'))


@estimators.register('test_nan_from_step_5')
def _nan_from_step_5(ctx):
  return {k: jnp.where(ctx.step >= 5, jnp.nan, 1.0) * jnp.ones_like(v)
          for k, v in ctx.masks.items()}


def test_nan_scores_stop_the_run_at_the_pruning_step(tmp_path, fashion_mnist_data_dir):
  workdir = str(tmp_path / 'w')
  # No group checks: they would compile LeNet3 twice more before training, and are not what
  # stops this run (test_checks.py, test_any_model_e2e.py).
  c = _tiny(fashion_mnist_data_dir, **_pruning(**{'prune.estimator': 'test_nan_from_step_5',
                                                  'prune.check_groups': False}))
  with pytest.raises(FloatingPointError, match="'test_nan_from_step_5'.*non-finite") as e:
    run.run(c, workdir)
  assert "at step 6 (phase 'prune')" in str(e.value)
  assert max(_steps(workdir)) <= 5
  assert not os.path.exists(os.path.join(workdir, 'report.json'))


# --- 4. device divisibility -------------------------------------------------------------------------

@pytest.mark.parametrize('flag, message', [
    ('--config.train.eval_batch_size=251', 'train.eval_batch_size=251: must be a multiple of 2'),
    ('--config.train.batch_size=63', 'train.batch_size=63: must be a multiple of 2'),
])
def test_batch_sizes_the_devices_do_not_divide_are_refused_up_front(tmp_path, flag, message,
                                                                    fashion_mnist_data_dir):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=helpers.xla_flags('--xla_force_host_platform_device_count=2'))
  workdir = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, '-m', 'taylor_jax.main', f'--workdir={workdir}',
       '--config=configs/fashion_mnist_lenet3_baseline.py',
       f'--config.data_dir={fashion_mnist_data_dir}', '--config.train.limit_examples=256',
       '--config.train.batch_size=64', '--config.train.epochs=1',
       '--config.train.limit_eval_examples=100', flag],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not workdir.exists()


# --- 5. estimator output -----------------------------------------------------------------------------

@estimators.register('test_half_width')
def _half_width(ctx):
  return {k: jnp.ones(v.shape[0] // 2) for k, v in ctx.masks.items()}


@estimators.register('test_no_conv2')
def _no_conv2(ctx):
  return {k: jnp.ones_like(v) for k, v in ctx.masks.items() if k != 'conv2'}


@pytest.mark.parametrize('name, message', [
    ('test_half_width', "estimator 'test_half_width' (prune.estimator) returned scores of shape "
                        "(8,) (float32) for group 'conv1' on the first batch (checked before "
                        "training): expected shape (16,)"),
    ('test_no_conv2', "estimator 'test_no_conv2' (prune.estimator) returned no scores for group "
                      "'conv2' on the first batch (checked before training): expected shape (32,)"),
])
def test_wrong_estimator_output_is_refused_before_training(tmp_path, fashion_mnist_data_dir,
                                                           name, message):
  workdir = str(tmp_path / 'w')
  with pytest.raises(ValueError) as e:  # estimators.EstimatorError
    run.run(_tiny(fashion_mnist_data_dir, **_pruning(**{'prune.estimator': name})), workdir)
  assert message in str(e.value)
  assert _steps(workdir) == [] and not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


# --- 6. alignment wider than a group --------------------------------------------------------------

def test_align_wider_than_a_group_is_refused(tmp_path, fashion_mnist_data_dir):
  workdir = tmp_path / 'w'
  c = _tiny(fashion_mnist_data_dir, **_pruning(**{'prune.align': 24}))
  with pytest.raises(ValueError, match=r"prune\.align=24 is wider than 1 prunable group\(s\): "
                                       r"'conv1' \(16 units\)"):
    run.run(c, str(workdir))
  assert not workdir.exists()


# --- 7. corrupt weight files --------------------------------------------------------------------------

def _weight_files(tmp_path):
  np.savez(tmp_path / 'ok.npz', **{'conv1.weight': np.ones((64, 3, 7, 7), np.float32)})
  data = (tmp_path / 'ok.npz').read_bytes()
  (tmp_path / 'truncated.npz').write_bytes(data[:len(data) // 2])
  (tmp_path / 'pickle.npz').write_bytes(b'\x80\x04' + os.urandom(500))
  (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
  (tmp_path / 'pickle.pth').write_bytes(b'\x80\x02' + os.urandom(500))


@pytest.mark.parametrize('name', ['truncated.npz', 'pickle.npz', 'truncated.pth', 'pickle.pth'])
def test_corrupt_weight_file_is_named_without_unsafe_advice(tmp_path, name):
  pytest.importorskip('torch')
  _weight_files(tmp_path)
  path = str(tmp_path / name)
  with pytest.raises(ValueError) as e:  # convert.ConversionError
    convert.convert('resnet18', path)
  assert str(e.value).startswith(f'{path!r} is not a readable')
  shown = ''.join(traceback.format_exception(e.value))  # what a user's traceback prints
  for advice in ('allow_pickle', 'weights_only', 'pickle.load', 'trusted source'):
    assert advice not in shown, advice


# --- 8. missing config file -------------------------------------------------------------------------

def test_missing_config_file_is_one_line_naming_it(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'taylor_jax.main', '--config=configs/no_such_config.py',
       f'--workdir={tmp_path / "w"}', '--config.train.epochs=3'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'FATAL: --config=configs/no_such_config.py: no such file')
  assert 'Traceback' not in proc.stderr
