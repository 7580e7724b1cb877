"""A TFDS builder for the real Fashion-MNIST shipped by Debian's package ``dataset-fashion-mnist``.

The stock TFDS ``fashion_mnist`` builder rejects Debian's IDX files (their gzip checksums differ from
its registry), so we read them ourselves. Features are plain ``tfds.features.Tensor`` so that preparing
(to ``array_record``) and reading (``builder.as_data_source()``) need no TensorFlow.

The IDX directory is ``$TAYLOR_JAX_FASHION_MNIST_DIR`` if set, else :data:`DEFAULT_IDX_DIR`; a builder
instance may also be given ``idx_dir=...``.
"""

from __future__ import annotations

import gzip
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
IDX_DIR_ENV = 'TAYLOR_JAX_FASHION_MNIST_DIR'
NAME = 'fashion_mnist_debian'

_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_NUM_EXAMPLES = {'train': 60_000, 'test': 10_000}

CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')

FIX_HINT = ('install Debian\'s package with `sudo apt-get install dataset-fashion-mnist` '
            '(or run `bash scripts/setup.sh`), or point ${env} at a directory holding the '
            'four Fashion-MNIST IDX .gz files').replace('{env}', IDX_DIR_ENV)


def idx_dir() -> str:
  """The directory the IDX files are read from (env var, else Debian's location)."""
  return os.environ.get(IDX_DIR_ENV) or DEFAULT_IDX_DIR


def check_idx_files(directory: str | None = None) -> str:
  """Returns the IDX directory; raises FileNotFoundError naming the fix if a file is missing."""
  directory = directory or idx_dir()
  missing = [f for pair in _FILES.values() for f in pair
             if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found in {directory!r} (missing: {", ".join(missing)}). '
        f'To fix: {FIX_HINT}.')
  return directory


def _read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (unsigned byte data) into a numpy array."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f'{path}: not an unsigned-byte IDX file (magic {data[:4]!r})')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(shape)):
    raise ValueError(f'{path}: expected {np.prod(shape)} values for shape {shape}, got {arr.size}')
  return arr.reshape(shape)


def read_split(split: str, directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N,28,28,1), labels int64 (N,)) straight from the IDX files."""
  directory = check_idx_files(directory)
  img_file, lbl_file = _FILES[split]
  images = _read_idx(os.path.join(directory, img_file))[..., None]
  labels = _read_idx(os.path.join(directory, lbl_file)).astype(np.int64)
  if images.shape != (_NUM_EXAMPLES[split], 28, 28, 1) or labels.shape != (_NUM_EXAMPLES[split],):
    raise ValueError(f'Fashion-MNIST {split}: unexpected shapes {images.shape}, {labels.shape}')
  return images, labels


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Zalando) read from Debian's ``dataset-fashion-mnist`` IDX files."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: Debian IDX files, Tensor features.'}
  # Nothing is downloaded, so there are no checksums to look up. (The base class's lookup finds this
  # file through `importlib_resources`, a package our environment does not need otherwise.)
  code_path = None
  url_infos = None

  def __init__(self, *, idx_dir: str | None = None, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST from Debian\'s dataset-fashion-mnist package (IDX files).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        # Keep the IDX order: example i of a split is example i of the original files.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files come from a Debian package.
    directory = check_idx_files(self._idx_dir)
    return {split: self._generate_examples(split, directory) for split in _FILES}

  def _generate_examples(self, split: str, directory: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_split(split, directory)
    for i in range(len(labels)):
      yield i, {'image': images[i], 'label': labels[i]}
