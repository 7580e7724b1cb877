"""Tests of the Fashion-MNIST TFDS builder and the input pipeline (real data, numpy only)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from taylor_jax.data import fashion_mnist_debian
from taylor_jax.data import input_pipeline as ip
from taylor_jax.data import prepare

FM_MEAN, FM_STD = 0.2860, 0.3530


def _split(data_dir, split='train', **kw):
  kw.setdefault('batch_size', 64)
  kw.setdefault('train', split == 'train')
  kw.setdefault('seed', 0)
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  return ip.create_split('fashion_mnist', split, data_dir=data_dir, **kw)


def _equal_batches(a, b) -> bool:
  return len(a) == len(b) and all(
      set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """Undo the Fashion-MNIST normalisation."""
  return np.rint((images * FM_STD + FM_MEAN) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The builder.


def test_builder_reads_all_real_examples(fashion_mnist_data_dir):
  builder = prepare.builder(fashion_mnist_data_dir)
  assert builder.is_prepared()
  assert builder.name == 'fashion_mnist_debian' and str(builder.version) == '1.0.0'
  rng = np.random.default_rng(0)
  for split, n, per_class in (('train', 60_000, 6_000), ('test', 10_000, 1_000)):
    idx_images, idx_labels = fashion_mnist_debian.read_split(split)
    source = builder.as_data_source(split=split)
    assert len(source) == n
    some = np.sort(rng.choice(n, 200, replace=False))
    items = source.__getitems__([int(i) for i in some])
    assert all(it['image'].shape == (28, 28, 1) and it['image'].dtype == np.uint8 for it in items)
    np.testing.assert_array_equal(np.stack([it['image'] for it in items]), idx_images[some])
    # All n examples, read through the same data source by the pipeline (cached for later tests).
    images, labels = ip._load_arrays('fashion_mnist', split, fashion_mnist_data_dir, n, None)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    # Same data, same order as Debian's IDX files.
    np.testing.assert_array_equal(images, idx_images)
    np.testing.assert_array_equal(labels, idx_labels)
    assert 0.25 < images.mean() / 255 < 0.32  # Fashion-MNIST's mean intensity is 0.286.


def test_prepare_is_idempotent(fashion_mnist_data_dir):
  builder = prepare.builder(fashion_mnist_data_dir)
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  assert prepare.main([f'--data_dir={fashion_mnist_data_dir}']) == 0
  assert sorted(os.listdir(builder.data_dir)) == files
  assert [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files] == mtimes


# ---------------------------------------------------------------------------------------------
# Determinism and resume.


def test_same_seed_same_batches_other_seed_other_order(fashion_mnist_data_dir):
  take = lambda s, epoch=0: [b for _, b in zip(range(5), s.batches(epoch))]
  a = take(_split(fashion_mnist_data_dir, seed=3))
  b = take(_split(fashion_mnist_data_dir, seed=3))
  c = take(_split(fashion_mnist_data_dir, seed=4))
  assert _equal_batches(a, b)
  assert not np.array_equal(a[0]['label'], c[0]['label'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  # Another epoch is another order.
  d = take(_split(fashion_mnist_data_dir, seed=3), epoch=1)
  assert not np.array_equal(a[0]['image'], d[0]['image'])
  s = _split(fashion_mnist_data_dir, seed=3)
  assert not np.array_equal(s.order(0), s.order(1))
  np.testing.assert_array_equal(np.sort(s.order(0)), np.arange(60_000))


def test_start_step_resume_equals_skipping(fashion_mnist_data_dir):
  s = _split(fashion_mnist_data_dir, seed=7, limit=1000, batch_size=64)
  assert s.steps_per_epoch == 1000 // 64
  full = list(s.batches(2))
  assert len(full) == s.steps_per_epoch
  for k in (0, 1, 5, s.steps_per_epoch - 1, s.steps_per_epoch):
    resumed = list(_split(fashion_mnist_data_dir, seed=7, limit=1000, batch_size=64).batches(
        2, start_step=k))
    assert _equal_batches(resumed, full[k:]), k
  with pytest.raises(ValueError):
    next(s.batches(0, start_step=s.steps_per_epoch + 1))


def _prefetch_threads() -> set:
  return {t for t in threading.enumerate() if t.name == 'taylor_jax-prefetch' and t.is_alive()}


def _assert_stopped(threads, timeout=10.0) -> None:
  for t in threads:
    t.join(timeout)
  assert not [t for t in threads if t.is_alive()], 'the prefetch thread still runs'


def test_breaking_out_of_batches_early_stops_the_prefetch_thread(fashion_mnist_data_dir):
  # 937 batches of 64 per epoch: a prefetch thread that were not told to stop would block on
  # its full queue for the rest of the process instead of finishing.
  s = _split(fashion_mnist_data_dir)
  before = _prefetch_threads()
  for i, _ in enumerate(s.batches(0)):
    if i == 0:
      started = _prefetch_threads() - before
      assert len(started) == 1  # the iteration runs one prefetch thread...
    if i == 3:
      break
  _assert_stopped(started)  # ...that has stopped once the consumer broke out of the loop
  # The same with an explicit close() of a half-consumed iterator.
  it = s.batches(1)
  next(it)
  started = _prefetch_threads() - before
  assert len(started) == 1
  it.close()
  _assert_stopped(started)
  # And the split still gives batches afterwards.
  assert len(list(zip(range(3), s.batches(0)))) == 3
  _assert_stopped(_prefetch_threads() - before)


# ---------------------------------------------------------------------------------------------
# Multi-process sharding.


@pytest.mark.parametrize('augment', [False, True])
def test_process_shards_are_disjoint_and_cover(fashion_mnist_data_dir, augment):
  kw = dict(seed=11, batch_size=64, limit=1000, augment=augment)
  one = _split(fashion_mnist_data_dir, **kw)
  p0 = _split(fashion_mnist_data_dir, process_index=0, process_count=2, **kw)
  p1 = _split(fashion_mnist_data_dir, process_index=1, process_count=2, **kw)
  assert p0.local_batch_size == p1.local_batch_size == 32
  assert p0.steps_per_epoch == p1.steps_per_epoch == one.steps_per_epoch == 15
  seen = []
  for step in range(one.steps_per_epoch):
    i0, w0 = p0.indices(1, step)
    i1, w1 = p1.indices(1, step)
    ig, wg = one.indices(1, step)
    assert len(i0) == len(i1) == 32 and not set(i0) & set(i1)
    np.testing.assert_array_equal(np.concatenate([i0, i1]), ig)
    assert w0.all() and w1.all() and wg.all()
    seen.extend(ig)
  # The epoch covers the split minus the dropped remainder (1000 - 15 * 64 = 40), each once.
  assert len(seen) == len(set(seen)) == 15 * 64 and set(seen) <= set(range(1000))
  # The data (augmented too) of the two shards put together is the single-process batch.
  for b0, b1, b in zip(p0.batches(1), p1.batches(1), one.batches(1)):
    assert b0['image'].shape == (32, 28, 28, 1)
    for k in ('image', 'label', 'weight'):
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), b[k])


def test_batch_not_divisible_by_process_count(fashion_mnist_data_dir):
  with pytest.raises(ValueError, match='process_count'):
    _split(fashion_mnist_data_dir, batch_size=63, process_count=2, process_index=0)


# ---------------------------------------------------------------------------------------------
# Eval batches.


def test_eval_batches_padded_and_each_example_once(fashion_mnist_data_dir):
  s = _split(fashion_mnist_data_dir, 'test', batch_size=128, train=False)
  assert s.steps_per_epoch == 79  # ceil(10000 / 128)
  batches = list(s.batches(0))
  assert len(batches) == 79
  for b in batches:
    assert b['image'].shape == (128, 28, 28, 1) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['weight'].dtype == np.float32
  weights = np.concatenate([b['weight'] for b in batches])
  assert weights[:10_000].all() and not weights[10_000:].any()
  assert weights.sum() == 10_000 and batches[-1]['weight'].sum() == 10_000 - 78 * 128
  real = weights > 0
  images = np.concatenate([b['image'] for b in batches])[real]
  labels = np.concatenate([b['label'] for b in batches])[real]
  idx_images, idx_labels = fashion_mnist_debian.read_split('test')
  np.testing.assert_array_equal(labels, idx_labels)  # In order, each exactly once.
  np.testing.assert_array_equal(_to_uint8(images), idx_images)
  # Eval order does not depend on the seed or epoch.
  other = _split(fashion_mnist_data_dir, 'test', batch_size=128, train=False, seed=5)
  assert _equal_batches(batches[:2], [b for _, b in zip(range(2), other.batches(3))])


def test_normalisation(fashion_mnist_data_dir):
  s = _split(fashion_mnist_data_dir, batch_size=1000, augment=False)
  images = np.concatenate([b['image'] for _, b in zip(range(20), s.batches(0))])
  assert abs(images.mean()) < 0.05 and abs(images.std() - 1.0) < 0.05


# ---------------------------------------------------------------------------------------------
# Augmentation.


def test_augmentation_changes_images_reproducibly(fashion_mnist_data_dir):
  plain = next(_split(fashion_mnist_data_dir, seed=2, augment=False).batches(0))
  aug1 = next(_split(fashion_mnist_data_dir, seed=2).batches(0))
  aug2 = next(_split(fashion_mnist_data_dir, seed=2).batches(0))
  assert aug1['image'].shape == plain['image'].shape == (64, 28, 28, 1)
  assert aug1['image'].dtype == np.float32
  np.testing.assert_array_equal(aug1['label'], plain['label'])  # Same examples...
  changed = [not np.array_equal(a, p) for a, p in zip(aug1['image'], plain['image'])]
  assert sum(changed) > 48  # ...mostly moved or flipped (P(unchanged) = 1/81 * 1/2 per image).
  np.testing.assert_array_equal(aug1['image'], aug2['image'])
  # Each augmented image is a zero-padded shift (and maybe a flip) of the original.
  orig, auged = _to_uint8(plain['image']), _to_uint8(aug1['image'])
  padded = np.pad(orig, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(8):
    candidates = [padded[i, y:y + 28, x:x + 28] for y in range(9) for x in range(9)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.array_equal(auged[i], c) for c in candidates)
  # Another step or epoch draws other augmentations for the same example.
  s = _split(fashion_mnist_data_dir, seed=2)
  assert not np.array_equal(s._augment_rng(0, 0).random(4), s._augment_rng(0, 1).random(4))


# ---------------------------------------------------------------------------------------------
# Missing data and bad names.


def test_missing_idx_files_error_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist_debian.IDX_DIR_ENV, str(tmp_path / 'no_idx_here'))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    prepare.prepare_fashion_mnist(str(tmp_path / 'data'))
  assert prepare.main([f'--data_dir={tmp_path / "data"}']) == 1
  assert not prepare.builder(str(tmp_path / 'data')).is_prepared()


def test_unprepared_data_dir_error_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='taylor_jax.data.prepare'):
    _split(str(tmp_path))


def test_cifar10_empty_data_dir_error_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build cifar10'):
    ip.create_split('cifar10', 'train', batch_size=8, train=True, seed=0, data_dir=str(tmp_path),
                    process_index=0, process_count=1)


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match='fashion_mnist'):
    ip.dataset_info('mnist_of_my_dreams')
  with pytest.raises(ValueError, match='cifar10'):
    ip.create_split('nope', 'train', batch_size=8, train=True, seed=0, process_index=0,
                    process_count=1)


def test_dataset_info():
  info = ip.dataset_info('fashion_mnist')
  assert info == ip.DatasetInfo('fashion_mnist', 10, (28, 28, 1), 60_000, 10_000)
  assert ip.dataset_info('cifar10').image_shape == (32, 32, 3)
  assert ip.dataset_info('imagenet2012').num_classes == 1000


# ---------------------------------------------------------------------------------------------
# Synthetic data.


def test_synthetic_dataset():
  kw = dict(batch_size=16, train=True, seed=1, image_size=40, process_index=0, process_count=1,
            limit=100)
  s = ip.create_split('synthetic', 'train', **kw)
  assert s.info.image_shape == (40, 40, 3) and s.steps_per_epoch == 6
  a = list(s.batches(0))
  b = list(ip.create_split('synthetic', 'train', **kw).batches(0))
  assert _equal_batches(a, b)
  assert a[0]['image'].shape == (16, 40, 40, 3) and a[0]['image'].dtype == np.float32
  assert a[0]['label'].min() >= 0 and a[0]['label'].max() < 10
  ev = ip.create_split('synthetic', 'test', batch_size=64, train=False, seed=0, process_index=0,
                       process_count=1, limit=100)
  assert [x['weight'].sum() for x in ev.batches(0)] == [64, 36]


# ---------------------------------------------------------------------------------------------
# ImageNet-style per-image processing (no ImageNet here: random images).


def test_imagenet_example_processing():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 450, 3), dtype=np.uint8)
  train1 = ip._imagenet_example(image, 64, True, True, np.random.default_rng([1, 2]))
  train2 = ip._imagenet_example(image, 64, True, True, np.random.default_rng([1, 2]))
  assert train1.shape == (64, 64, 3) and train1.dtype == np.uint8
  np.testing.assert_array_equal(train1, train2)
  ev = ip._imagenet_example(image[:, :, :1], 64, False, False, None)  # Grayscale -> RGB.
  assert ev.shape == (64, 64, 3)
  # Eval = resize the shorter side to 64/0.875 then center-crop 64: the box is centred.
  assert ip._center_crop_box(300, 450, 64) == (225 - 131.25, 150 - 131.25, 225 + 131.25,
                                               150 + 131.25)
  for _ in range(100):
    left, top, right, bottom = ip._random_resized_crop_box(300, 450, rng)
    assert 0 <= left < right <= 450 and 0 <= top < bottom <= 300
    assert (right - left) * (bottom - top) >= 0.08 * 300 * 450 * 0.9


def test_crop_pad_zero_is_flip_only(fashion_mnist_data_dir):
  kw = dict(batch_size=64, train=True, seed=3, data_dir=fashion_mnist_data_dir, limit=256)
  plain = next(ip.create_split('fashion_mnist', 'train', augment=False, **kw).batches(0))
  flip = next(ip.create_split('fashion_mnist', 'train', crop_pad=0, **kw).batches(0))
  same = np.all(flip['image'] == plain['image'], axis=(1, 2, 3))
  flipped = np.all(flip['image'] == plain['image'][:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | flipped) and flipped.sum() > 10 and (same & ~flipped).sum() > 10
