"""A deterministic, seedable, resumable numpy input pipeline over TFDS data sources.

Datasets (by name): ``'fashion_mnist'`` (the project's builder for Debian's IDX files; see
:mod:`taylor_jax.data.fashion_mnist_debian`), ``'cifar10'`` and ``'imagenet2012'`` (stock TFDS builders,
read from an already prepared ``array_record`` data dir), and ``'synthetic'`` (seeded random data for
benchmarks). A user's own numpy arrays come as a ``.npz`` path, a directory of ``.npy`` files or a
``'package.module:function'`` (see :mod:`taylor_jax.data.user_data`); they go through the same
:class:`Split`, normalised by per-channel statistics of their training images unless given.

Order: epoch ``e`` of a training split visits ``np.random.default_rng([seed, e]).permutation(n)``;
global batch ``i`` is ``perm[i*B:(i+1)*B]`` and process ``p`` takes the contiguous slice
``[p*b:(p+1)*b]`` of it (``b = B // process_count``). Every process computes the same permutation, so
shards are disjoint and cover the global batch. ``batches(epoch, start_step=k)`` starts at batch ``k``
directly (resume). Augmentation is drawn from ``(seed, epoch, step)`` for the whole global batch, so it
is reproducible after a resume and independent of the number of processes.

Eval splits (``train=False``) go in order, unaugmented, and the last batch is padded to the full
batch size with ``weight == 0`` so that every batch has the same shape.

No JAX or TensorFlow is imported here (JAX only when ``process_index``/``process_count`` are not given).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Any, Iterator

import numpy as np

from taylor_jax.data import default_data_dir

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  test_size: int


@dataclasses.dataclass(frozen=True)
class _Spec:
  info: DatasetInfo
  mean: tuple[float, ...]
  std: tuple[float, ...]
  tfds_name: str | None            # None: synthetic.
  splits: dict[str, str]           # Our split name -> TFDS split name.
  in_memory: bool                  # Small images: load the whole split once.
  scale: float = 255.0             # Pixel value of 1.0 in mean/std units (1: float user images).


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_SPECS: dict[str, _Spec] = {
    'fashion_mnist': _Spec(
        DatasetInfo('fashion_mnist', 10, (28, 28, 1), 60_000, 10_000),
        (0.2860,), (0.3530,), 'fashion_mnist_debian', {'train': 'train', 'test': 'test'}, True),
    'cifar10': _Spec(
        DatasetInfo('cifar10', 10, (32, 32, 3), 50_000, 10_000),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 'cifar10',
        {'train': 'train', 'test': 'test'}, True),
    'imagenet2012': _Spec(
        DatasetInfo('imagenet2012', 1000, (224, 224, 3), 1_281_167, 50_000),
        _IMAGENET_MEAN, _IMAGENET_STD, 'imagenet2012',
        {'train': 'train', 'test': 'validation'}, False),
    'synthetic': _Spec(
        DatasetInfo('synthetic', 10, (32, 32, 3), 50_000, 10_000),
        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None, {'train': 'train', 'test': 'test'}, True),
}

DEFAULT_DATASET = 'fashion_mnist'
IMAGENET_CROP_FRACTION = 0.875
_SYNTHETIC_POOL = 256  # Distinct random images the synthetic dataset cycles through.


def names() -> list[str]:
  return sorted(_SPECS)


def _spec(name: str) -> _Spec:
  if name in _SPECS:
    return _SPECS[name]
  from taylor_jax.data import user_data  # Raises naming the built-in names and the 3 ways.
  data = user_data.load(name, names())
  info = DatasetInfo(name, data.num_classes, data.image_shape, len(data.train[1]),
                     len(data.test[1]))
  return _Spec(info, data.mean, data.std, None, {'train': 'train', 'test': 'test'}, True,
               data.scale)


def _with_image_size(info: DatasetInfo, image_size: int | None) -> DatasetInfo:
  if image_size is None:
    return info
  return dataclasses.replace(info, image_shape=(int(image_size), int(image_size),
                                                info.image_shape[2]))


def dataset_info(name: str, data_dir: str | None = None, image_size: int | None = None
                 ) -> DatasetInfo:
  """Static facts about a dataset (no data is read; ``data_dir`` is accepted for symmetry)."""
  del data_dir
  return _with_image_size(_spec(name).info, image_size)


# ----------------------------------------------------------------------------------------------
# Data sources.


def _fix_hint(name: str, data_dir: str) -> str:
  if name == 'fashion_mnist':
    return (f'run `python -m taylor_jax.data.prepare --data_dir={data_dir}` '
            '(or `bash scripts/setup.sh` for the default data dir)')
  return (f'prepare it where TensorFlow is installed with `tfds build {_spec(name).tfds_name} '
          f'--data_dir={data_dir} --file_format=array_record` (the stock builder needs TensorFlow '
          'to prepare, and this pipeline reads the array_record format)')


def _builder(name: str, data_dir: str):
  """The prepared TFDS builder for ``name``; raises FileNotFoundError naming the fix otherwise."""
  spec = _spec(name)
  if name == 'fashion_mnist':
    from taylor_jax.data import fashion_mnist_debian
    builder = fashion_mnist_debian.FashionMnistDebian(data_dir=data_dir)
  else:
    import tensorflow_datasets as tfds
    try:
      builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise FileNotFoundError(f'Could not open dataset {name!r} in {data_dir!r} ({e}). To fix: '
                              f'{_fix_hint(name, data_dir)}.') from e
  if not builder.is_prepared():
    raise FileNotFoundError(f'Dataset {name!r} is not prepared in {data_dir!r}. To fix: '
                            f'{_fix_hint(name, data_dir)}.')
  fmt = getattr(builder.info, 'file_format', None)
  fmt = str(getattr(fmt, 'value', fmt) or '').lower()
  if fmt and 'array_record' not in fmt:
    raise FileNotFoundError(
        f'Dataset {name!r} in {data_dir!r} is prepared as {fmt}, but random access needs '
        f'array_record. To fix: {_fix_hint(name, data_dir)} (or convert it with '
        f'`tfds convert_format --dataset_version_dir=... --out_file_format=array_record`).')
  return builder


def _data_source(name: str, split: str, data_dir: str):
  spec = _spec(name)
  return _builder(name, data_dir).as_data_source(split=spec.splits[split])


def _get_items(source, indices: np.ndarray) -> list[dict[str, Any]]:
  indices = [int(i) for i in indices]
  if hasattr(source, '__getitems__'):
    return source.__getitems__(indices)
  return [source[i] for i in indices]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a uint8 or float32 (N,H,W,C) array to (N,size,size,C) (PIL)."""
  from PIL import Image
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  out = np.empty((n, size, size, c), images.dtype)
  for i in range(n):
    if images.dtype == np.uint8 and c in (1, 3):
      img = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
      out[i] = np.asarray(img.resize((size, size), Image.BILINEAR)).reshape(size, size, c)
      continue
    for ch in range(c):  # PIL's 32-bit float mode, one channel at a time.
      img = Image.fromarray(images[i, :, :, ch].astype(np.float32), mode='F')
      res = np.asarray(img.resize((size, size), Image.BILINEAR))
      out[i, :, :, ch] = np.clip(np.rint(res), 0, 255) if images.dtype == np.uint8 else res
  return out


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()


def _load_arrays(name: str, split: str, data_dir: str, n: int, image_size: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` examples of a small split as (images, int32 labels), cached per process;
  images are uint8, or float32 for a user's float arrays."""
  if name not in _SPECS:  # A user's arrays: user_data caches them and notices a changed file.
    from taylor_jax.data import user_data
    images, labels = getattr(user_data.load(name, names()), split)
    return (images[:n] if image_size is None else _resize(images[:n], int(image_size)),
            labels[:n])
  with _CACHE_LOCK:
    for key, (images, labels) in _CACHE.items():
      if key[:4] == (name, split, data_dir, image_size) and key[4] >= n:
        return images[:n], labels[:n]
    if name == 'synthetic':
      images, labels = _synthetic_arrays(split, n, image_size)
    else:
      source = _data_source(name, split, data_dir)
      n = min(n, len(source))
      images = np.empty((n,) + _spec(name).info.image_shape, np.uint8)
      labels = np.empty((n,), np.int32)
      chunk = 8192
      for start in range(0, n, chunk):
        items = _get_items(source, np.arange(start, min(n, start + chunk)))
        images[start:start + len(items)] = np.stack(
            [np.asarray(it['image'], np.uint8).reshape(images.shape[1:]) for it in items])
        labels[start:start + len(items)] = [int(it['label']) for it in items]
      if image_size is not None:
        images = _resize(images, int(image_size))
    _CACHE[(name, split, data_dir, image_size, len(labels))] = (images, labels)
    return images, labels


def _synthetic_arrays(split: str, n: int, image_size: int | None):
  """Seeded random data: images cycle through a fixed pool, labels uniform over 10 classes."""
  info = _with_image_size(_SPECS['synthetic'].info, image_size)
  split_id = 0 if split == 'train' else 1
  rng = np.random.default_rng([1234, split_id])
  pool = rng.integers(0, 256, (min(_SYNTHETIC_POOL, n),) + info.image_shape, dtype=np.uint8)
  labels = rng.integers(0, info.num_classes, n).astype(np.int32)
  images = pool[np.arange(n) % len(pool)]
  return images, labels


# ----------------------------------------------------------------------------------------------
# Augmentation (numpy, seeded).


def crop_flip_params(rng: np.random.Generator, batch: int, pad: int = 4
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random (row offset, column offset, flip) for ``batch`` images."""
  oy = rng.integers(0, 2 * pad + 1, batch)
  ox = rng.integers(0, 2 * pad + 1, batch)
  flip = rng.random(batch) < 0.5
  return oy, ox, flip


def pad_crop_flip(images: np.ndarray, params: tuple[np.ndarray, np.ndarray, np.ndarray],
                  pad: int = 4) -> np.ndarray:
  """Zero-pad by ``pad``, crop back to (H,W) at the given offsets, flip horizontally where asked.

  One padded copy of the batch, then a slice per image (faster than fancy indexing, 0.3 ms for
  128 Fashion-MNIST images).
  """
  oy, ox, flip = params
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for i in range(b):
    window = padded[i, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
    out[i] = window[:, ::-1] if flip[i] else window
  return out


def _random_resized_crop_box(h: int, w: int, rng: np.random.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (left, top, right, bottom)."""
  area = h * w
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return left, top, left + cw, top + ch
  in_ratio = w / h  # Fallback: central crop.
  if in_ratio < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    ch, cw = h, int(round(h * max(ratio)))
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return left, top, left + cw, top + ch


def _center_crop_box(h: int, w: int, size: int) -> tuple[float, float, float, float]:
  """Box equal to: resize shorter side to size/0.875, then center-crop size x size."""
  side = min(h, w) * IMAGENET_CROP_FRACTION
  top, left = (h - side) / 2, (w - side) / 2
  return left, top, left + side, top + side


def _imagenet_example(image: np.ndarray, size: int, train: bool, augment: bool,
                      rng: np.random.Generator | None) -> np.ndarray:
  from PIL import Image
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  h, w = image.shape[:2]
  if train and augment:
    box = _random_resized_crop_box(h, w, rng)
    flip = rng.random() < 0.5
  else:
    box, flip = _center_crop_box(h, w, size), False
  out = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box)
  out = np.asarray(out, np.uint8)
  return out[:, ::-1] if flip else out


# ----------------------------------------------------------------------------------------------
# Split.


def _prefetch(iterator: Iterator[Batch], size: int) -> Iterator[Batch]:
  """Runs ``iterator`` in a background thread, ``size`` items ahead."""
  if size <= 0:
    yield from iterator
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def worker():
    try:
      for item in iterator:
        if not put(item):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Raised(e))

  thread = threading.Thread(target=worker, daemon=True, name='taylor_jax-prefetch')
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()


@dataclasses.dataclass
class _Raised:
  error: BaseException


class Split:
  """One split of a dataset, batched for one process. Build with :func:`create_split`."""

  def __init__(self, name: str, split: str, *, batch_size: int, train: bool, seed: int,
               data_dir: str | None, image_size: int | None, process_index: int,
               process_count: int, augment: bool, drop_remainder: bool, limit: int | None,
               prefetch: int = 2, num_workers: int | None = None, crop_pad: int = 4,
               mean=None, std=None):
    spec = _spec(name)
    if crop_pad < 0:
      raise ValueError(f'crop_pad={crop_pad} must be >= 0 (0: flip only).')
    self.crop_pad = crop_pad
    if split not in spec.splits:
      raise ValueError(f'Unknown split {split!r}; use one of {sorted(spec.splits)}.')
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} must be a positive multiple of '
                       f'process_count={process_count}.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
    if name == 'imagenet2012' and image_size is None:
      image_size = spec.info.image_shape[0]
    self.name, self.split, self.train, self.seed = name, split, train, seed
    self.data_dir = default_data_dir(data_dir)
    self.info: DatasetInfo = _with_image_size(spec.info, image_size)
    self.batch_size = batch_size
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self.augment = augment and train
    self.drop_remainder = drop_remainder
    self.prefetch = prefetch
    # The statistics used (the dataset's own unless given): stored with a checkpoint, so that
    # evaluation in another process normalises the same way (run.py).
    self.mean, self.std = normalization(name, self.info.image_shape[2], mean, std)
    self._mean = np.asarray(self.mean, np.float32) * spec.scale
    self._inv_std = 1.0 / (np.asarray(self.std, np.float32) * spec.scale)
    self._shift = self._mean * self._inv_std  # (x - mean) / std == x * inv_std - shift.

    full = self.info.train_size if split == 'train' else self.info.test_size
    n = full if limit is None else min(int(limit), full)
    if spec.in_memory:
      load_size = image_size
      if name != 'synthetic' and image_size == spec.info.image_shape[0]:
        load_size = None  # Native size: no resize.
      self._images, self._labels = _load_arrays(name, split, self.data_dir, n, load_size)
      n = len(self._labels)
      self._source = None
    else:
      self._source = _data_source(name, split, self.data_dir)
      n = min(n, len(self._source))
      workers = num_workers or min(16, os.cpu_count() or 1)
      self._pool = concurrent.futures.ThreadPoolExecutor(workers)
    self.num_examples = n
    if drop_remainder:
      self.steps_per_epoch = n // batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(f'{name}/{split}: {n} examples are fewer than one batch of {batch_size} '
                         '(use drop_remainder=False or a smaller batch).')
    else:
      self.steps_per_epoch = -(-n // batch_size)

  # Order and indices -------------------------------------------------------------------------

  def order(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch`` (the same on every process)."""
    if not self.train:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def global_indices(self, order: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) of global batch ``step``, padded with weight 0 to the full batch."""
    idx = order[step * self.batch_size:(step + 1) * self.batch_size]
    weight = np.ones(self.batch_size, np.float32)
    if len(idx) < self.batch_size:
      weight[len(idx):] = 0.0
      idx = np.concatenate([idx, np.zeros(self.batch_size - len(idx), idx.dtype)])
    return idx, weight

  def local_slice(self) -> slice:
    """This process's part of a global batch."""
    lo = self.process_index * self.local_batch_size
    return slice(lo, lo + self.local_batch_size)

  def indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, weights) of this process's part of batch ``step`` of ``epoch``."""
    idx, weight = self.global_indices(self.order(epoch), step)
    return idx[self.local_slice()], weight[self.local_slice()]

  # Batches -----------------------------------------------------------------------------------

  def _augment_rng(self, epoch: int, step: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, epoch, step, 0xA06])

  def _make_batch(self, order: np.ndarray, epoch: int, step: int) -> Batch:
    gidx, gweight = self.global_indices(order, step)
    local = self.local_slice()
    lo, hi = local.start, local.stop
    idx, weight = gidx[local], gweight[local]
    if self._source is None:
      images, labels = self._images[idx], self._labels[idx]
      if self.augment:
        # Draw the parameters for the whole global batch and keep this process's part, so that an
        # example's augmentation does not depend on the number of processes.
        params = crop_flip_params(self._augment_rng(epoch, step), self.batch_size, self.crop_pad)
        images = pad_crop_flip(images, tuple(p[lo:hi] for p in params), self.crop_pad)
    else:
      items = _get_items(self._source, idx)
      size = self.info.image_shape[0]

      def one(j: int) -> np.ndarray:
        rng = (np.random.default_rng([self.seed, epoch, step, lo + j]) if self.augment else None)
        return _imagenet_example(items[j]['image'], size, self.train, self.augment, rng)

      images = np.stack(list(self._pool.map(one, range(len(items)))))
      labels = np.asarray([int(it['label']) for it in items], np.int32)
    images = images.astype(np.float32)
    images *= self._inv_std
    images -= self._shift
    return {'image': images, 'label': labels.astype(np.int32), 'weight': weight}

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """This process's part of global batches ``start_step..steps_per_epoch-1`` of ``epoch``."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f'start_step={start_step} not in [0, {self.steps_per_epoch}].')
    order = self.order(epoch)

    def gen():
      for step in range(start_step, self.steps_per_epoch):
        yield self._make_batch(order, epoch, step)

    yield from _prefetch(gen(), self.prefetch)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def __repr__(self) -> str:
    return (f'Split({self.name}/{self.split}, n={self.num_examples}, batch={self.batch_size}, '
            f'local={self.local_batch_size}, steps={self.steps_per_epoch}, train={self.train}, '
            f'process={self.process_index}/{self.process_count})')


def create_split(name: str, split: str, *, batch_size: int, train: bool, seed: int,
                 data_dir: str | None = None, image_size: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 augment: bool = True, drop_remainder: bool | None = None,
                 limit: int | None = None, prefetch: int = 2, crop_pad: int = 4,
                 mean=None, std=None) -> Split:
  """A :class:`Split` of dataset ``name``; ``batch_size`` is the GLOBAL batch size.

  ``mean``/``std``: per-channel normalisation (in units where a uint8 255 is 1.0), one value or
  one per channel; None: the dataset's own (a user dataset's: of its training images).

  ``crop_pad``: zero padding before the random crop of 28/32 px datasets (0: flip only).
  ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``;
  ``drop_remainder`` defaults to ``train``; ``limit`` keeps only the first ``limit`` examples.
  """
  _spec(name)
  if process_index is None or process_count is None:
    import jax  # Only when needed: keeps this module fast to import.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if drop_remainder is None:
    drop_remainder = train
  return Split(name, split, batch_size=batch_size, train=train, seed=seed, data_dir=data_dir,
               image_size=image_size, process_index=process_index, process_count=process_count,
               augment=augment, drop_remainder=drop_remainder, limit=limit, prefetch=prefetch,
               crop_pad=crop_pad, mean=mean, std=std)


def normalization(name: str, channels: int, mean=None, std=None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) that dataset ``name`` is normalised with: ``mean``/``std`` where given (checked:
  one finite value or one per channel, std > 0), else the dataset's own."""
  spec = _spec(name)
  out = []
  for key, given, own in (('data_mean', mean, spec.mean), ('data_std', std, spec.std)):
    if given is None:
      out.append(tuple(float(v) for v in own))
      continue
    values = tuple(float(v) for v in np.atleast_1d(np.asarray(given, np.float64)))
    if len(values) not in (1, channels) or not all(np.isfinite(values)) or (
        key == 'data_std' and min(values) <= 0):
      raise ValueError(
          f'invalid config: {key}={given}: give one finite value or one per channel '
          f'({channels} for {name!r}){", each > 0" if key == "data_std" else ""} '
          '(None: computed from the training images)')
    out.append(values)
  return out[0], out[1]


def check_dataset_name(name: str, image_size: int | None = None, mean=None, std=None) -> None:
  """Raises ValueError when ``name`` is neither a built-in dataset nor a user's data that loads
  and validates (the message lists the built-in names and the ways to bring data), or when the
  given normalisation does not fit it."""
  info = dataset_info(name, image_size=image_size)
  normalization(name, info.image_shape[2], mean, std)
