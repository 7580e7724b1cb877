"""A user's own numpy arrays as config.dataset (taylor_jax/data/user_data.py): a .npz runs through
the main job and evaluates to the same accuracy in a fresh process; the normalisation is computed
from the training images and saved; a 'module:function' and a .npy directory work; bad arrays and
unknown names are refused before any work with messages that name the array and the fix."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from taylor_jax import configlib, run
from taylor_jax.data import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quadrants(n: int, seed: int, size: int = 16):
  """Learnable uint8 images: class k (0..3) = quadrant k is bright, on a noisy background."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = rng.integers(0, 80, (n, size, size)).astype(np.uint8)
  half = size // 2
  for i, k in enumerate(labels):
    r, c = divmod(int(k), 2)
    images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
  return images, labels


def load_quadrants():
  """A 'module:function' dataset: {'train': (images, labels), 'test': (images, labels)}."""
  return {'train': quadrants(256, 0), 'test': quadrants(64, 1)}


def not_a_dataset():
  return quadrants(8, 0)


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _tiny_config(dataset):
  c = configlib.base_config()
  # A user's model (plain Flax, not in the zoo) on a user's arrays.
  c.model, c.dataset = 'taylor_jax.models.examples.concat_cnn:ConcatCNN', dataset
  c.train.epochs, c.train.batch_size, c.train.augment = 2.0, 32, False
  c.train.eval_batch_size, c.train.checkpoint_every_steps = 50, 1000
  c.optim.learning_rate = 0.05
  # One pruning step (each surgery recompiles), no group checks (tested elsewhere): ~35 s.
  c.prune.enabled, c.prune.target_units, c.prune.check_groups = True, 40, False
  c.prune.frequency, c.prune.prune_per_iteration = 4, 40
  # The pruning step's eval in batches of eval_batch_size: the same program as the final eval.
  c.prune.finetune_epochs, c.prune.eval_examples = 0.5, 50
  c.report.latency_repeats, c.report.latency_rounds = 1, 1
  c.train.eval_every_epochs = 1.0  # learning-curve points (checked below)
  return c


# The tests that use the session-scoped ``npz_run`` run on one pytest-xdist worker (run_tests.sh:
# --dist loadgroup), so that it is built once, not once per worker (session scope:
# not torn down and rebuilt when the worker runs another module's test in between).
SHARED = pytest.mark.xdist_group('user_data_npz_run')


@pytest.fixture(scope='session')
def npz_run(tmp_path_factory):
  d = tmp_path_factory.mktemp('user_npz')
  (xt, yt), (xe, ye) = quadrants(512, 0), quadrants(200, 1)
  ye[:30] = (ye[:30] + 1) % 4  # 15% wrong test labels: accuracy ~0.85, not a saturated 1.0
  path = _npz(d / 'quadrants.npz', x_train=xt, y_train=yt, x_test=xe, y_test=ye)
  workdir = str(d / 'run')
  result = run.run(_tiny_config(path), workdir)
  return workdir, result, xt, path


@SHARED
def test_npz_runs_the_main_job_and_learns(npz_run):
  workdir, result, _, _ = npz_run
  with open(os.path.join(workdir, 'report.json')) as f:
    rep = json.load(f)
  assert rep['pruned']['test_accuracy'] == pytest.approx(result['pruned']['test_accuracy'])
  assert 0.6 < rep['baseline']['test_accuracy'] <= 0.85  # 4 classes: chance is 0.25
  assert rep['pruned']['flops'] < rep['baseline']['flops'] and len(rep['history']) == 1


@SHARED
def test_learning_curve_points_are_test_evaluations(npz_run):
  workdir, _, _, _ = npz_run
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  curve = [r for r in records if r['phase'] == 'baseline_curve']
  assert [r['epoch'] for r in curve] == [1.0, 2.0] and [r['step'] for r in curve] == [16, 32]
  # The last point is the trained baseline on the whole test split: the baseline's own eval.
  final = [r for r in records if r['phase'] == 'baseline_eval'][0]
  assert curve[-1]['test_accuracy'] == final['accuracy']
  assert curve[-1]['test_loss'] == pytest.approx(final['loss'], rel=1e-6)
  assert curve[0]['test_accuracy'] != curve[1]['test_accuracy'] or (
      curve[0]['test_loss'] != curve[1]['test_loss'])


@SHARED
def test_saved_normalisation_is_the_training_images_statistics(npz_run):
  workdir, _, xt, _ = npz_run
  _, _, meta = run.restore(workdir)
  x = xt.astype(np.float64) / 255.0
  np.testing.assert_allclose(meta['data_mean'], [x.mean()], rtol=1e-9)
  np.testing.assert_allclose(meta['data_std'], [x.std()], rtol=1e-9)
  assert meta['num_classes'] == 4 and meta['input_shape'] == [16, 16, 1]


@SHARED
def test_evaluate_in_a_fresh_process_gives_the_reports_accuracy(npz_run):
  workdir, result, _, path = npz_run
  # Other training images now: their statistics differ, so only the saved ones reproduce the
  # report (the test split is unchanged).
  with np.load(path) as f:
    arrays = dict(f)
  arrays['x_train'] = np.full_like(arrays['x_train'], 240)
  arrays['x_train'][:, 0] = 200
  _npz(path, **arrays)
  proc = subprocess.run(
      [sys.executable, '-m', 'taylor_jax.main', f'--workdir={workdir}', '--mode=evaluate',
       '--config=configs/default.py', '--config.train.eval_batch_size=50'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('restored')][0]
  acc = float(line.split('test_accuracy=')[1].split()[0])
  assert acc == pytest.approx(result['pruned']['test_accuracy'], abs=1e-4)


def _split(name, split='train', **kw):
  return ip.create_split(name, split, batch_size=32, train=split == 'train', seed=0,
                         augment=False, process_index=0, process_count=1, **kw)


def test_module_function_dataset():
  name = 'test_user_data:load_quadrants'  # tests/ is on sys.path
  configlib.validate(_tiny_config(name), 1, 1)
  s = _split(name)
  assert s.info.num_classes == 4 and s.info.image_shape == (16, 16, 1)
  assert s.num_examples == 256 and _split(name, 'test').num_examples == 64
  batch = next(s.batches(0))
  xt, yt = load_quadrants()['train']
  idx = s.order(0)[:32]
  np.testing.assert_array_equal(batch['label'], yt[idx])
  expect = (xt[idx, :, :, None] / 255.0 - s.mean[0]) / s.std[0]
  np.testing.assert_allclose(batch['image'], expect, rtol=1e-5, atol=1e-5)


def test_npy_directory_of_float_images_and_given_statistics(tmp_path):
  rng = np.random.default_rng(3)
  arrays = {'train_images': rng.random((40, 8, 8, 3)).astype(np.float64) * 16,
            'train_labels': rng.integers(0, 3, 40), 'test_images': rng.random((10, 8, 8, 3)),
            'test_labels': rng.integers(0, 3, 10)}
  for key, value in arrays.items():
    np.save(tmp_path / f'{key}.npy', value)
  s = _split(str(tmp_path))
  x = arrays['train_images']
  np.testing.assert_allclose(s.mean, x.mean((0, 1, 2)), rtol=1e-6)  # float: as given, no /255
  np.testing.assert_allclose(s.std, x.std((0, 1, 2)), rtol=1e-6)
  given = _split(str(tmp_path), mean=(8.0,), std=(2.0, 4.0, 8.0))
  assert given.mean == (8.0,) and given.std == (2.0, 4.0, 8.0)
  batch = next(given.batches(0))
  expect = (x[given.order(0)[:32]] - 8.0) / np.array([2.0, 4.0, 8.0])
  np.testing.assert_allclose(batch['image'], expect, rtol=1e-5, atol=1e-5)
  resized = _split(str(tmp_path), 'test', image_size=12)
  assert next(resized.batches(0))['image'].shape == (32, 12, 12, 3)


def _good():
  (xt, yt), (xe, ye) = quadrants(20, 0), quadrants(10, 1)
  return dict(x_train=xt, y_train=yt, x_test=xe, y_test=ye)


def _with(**changes):
  arrays = _good()
  arrays.update(changes)
  return {k: v for k, v in arrays.items() if v is not None}


nan_images = quadrants(10, 1)[0].astype(np.float32)
nan_images[3, 2, 2] = np.nan


@pytest.mark.parametrize('arrays, message', [
    (_with(x_train=np.zeros((20, 256), np.uint8)), r"\['x_train'\]: images have shape \(20, 256\);"
                                                   r" expected \(N,H,W\) or \(N,H,W,C\)"),
    (_with(y_train=np.zeros(19, np.int64)), r"\['y_train'\]: 19 labels for 20 images"),
    (_with(y_test=np.zeros(10, np.float32)), r"\['y_test'\]: labels are float32; they must be "
                                             r"integers.*astype\(np.int32\)"),
    (_with(x_test=nan_images), r"\['x_test'\]: 1 NaN or infinite pixel value\(s\), first in "
                               r"image 3"),
    (_with(x_test=np.zeros((0, 16, 16), np.uint8), y_test=np.zeros(0, np.int64)),
     r"\['x_test'\]: the split is empty"),
    (_with(y_train=-np.ones(20, np.int64)), r"\['y_train'\]: label -1 < 0"),
    (_with(x_train=np.zeros((20, 16, 16), np.int64)), r"images are int64; use uint8"),
    (_with(x_test=np.zeros((10, 12, 12), np.uint8)), r"same image shape"),
    (_with(x_train=None, images=np.zeros((20, 16, 16), np.uint8)),
     r"holds \['images', 'x_test', 'y_test', 'y_train'\]; expected x_train, y_train, x_test, "
     r"y_test \(or train_images, train_labels, test_images, test_labels\)"),
])
def test_bad_arrays_are_refused_before_any_work(tmp_path, arrays, message):
  path = _npz(tmp_path / 'bad.npz', **arrays)
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message) as err:
    run.run(_tiny_config(path), str(workdir))
  assert str(tmp_path / 'bad.npz') in str(err.value)
  assert not workdir.exists()


def test_bad_function_and_statistics_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"module 'no_such_module_xyz' does not import"):
    ip.check_dataset_name('no_such_module_xyz:load')
  with pytest.raises(ValueError, match=r"has no function 'nope'"):
    ip.check_dataset_name('test_user_data:nope')
  with pytest.raises(ValueError, match=r"not_a_dataset\(\) returned tuple; it must return"):
    ip.check_dataset_name('test_user_data:not_a_dataset')
  path = _npz(tmp_path / 'ok.npz', **_good())
  c = _tiny_config(path)
  c.data_std = (0.5, 0.5)
  with pytest.raises(ValueError, match=r'data_std=\(0.5, 0.5\): give one finite value or one per '
                                       r'channel \(1 for'):
    configlib.validate(c, 1, 1)
  with pytest.raises(FileNotFoundError, match='no such file'):
    ip.check_dataset_name(str(tmp_path / 'missing.npz'))


def test_unknown_name_lists_the_ways_and_no_tfds_catalogue(tmp_path):
  with pytest.raises(ValueError) as err:
    run.run(_tiny_config('digits'), str(tmp_path / 'w'))
  msg = str(err.value)
  assert msg.startswith("Unknown dataset 'digits'")
  for name in ip.names():
    assert name in msg
  for way in ('.npz file', '.npy files', "'package.module:function'"):
    assert way in msg
  assert 'tfds' not in msg.lower() and 'mnist_corrupted' not in msg and 'svhn' not in msg
  assert len(msg.splitlines()) <= 6
  assert not (tmp_path / 'w').exists()


def test_runs_saved_before_the_normalisation_fields_resume_unchanged():
  saved = json.loads(configlib.base_config().to_json_best_effort())
  del saved['data_mean'], saved['data_std']
  assert configlib.result_changes(saved, configlib.base_config()) == {}
  c = configlib.base_config()
  c.data_mean = (0.5,)
  assert configlib.result_changes(saved, c) == {'data_mean': (None, [0.5])}
