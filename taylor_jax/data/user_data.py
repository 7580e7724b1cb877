"""A user's own numpy arrays as a dataset of the main job (``config.dataset``), in one of three forms:

- a ``.npz`` file holding ``x_train, y_train, x_test, y_test`` (or ``train_images,
  train_labels, test_images, test_labels``);
- a directory holding those arrays as ``.npy`` files (``x_train.npy``, ...);
- ``'package.module:function'``: a function (no arguments) returning
  ``{'train': (images, labels), 'test': (images, labels)}``.

Images are ``(N,H,W)`` or ``(N,H,W,C)``, uint8 or float; labels integers ``(N,)``. The number of
classes is the largest label + 1, the image shape that of the arrays. Everything is checked when
the data is first loaded (``configlib.validate``, before any training), with an error naming the
file or key and the fix. Normalisation statistics: per channel over the training images, uint8
divided by 255 first (as the built-in datasets' constants); float images as given.

:func:`load` caches per process; :mod:`taylor_jax.data.input_pipeline` feeds the arrays to its
``Split`` like the built-in in-memory datasets.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import threading

import numpy as np

KEY_SETS = (('x_train', 'y_train', 'x_test', 'y_test'),
            ('train_images', 'train_labels', 'test_images', 'test_labels'))
_FUNCTION = re.compile(r'^[A-Za-z_][\w.]*:[A-Za-z_]\w*$')


@dataclasses.dataclass(frozen=True)
class UserData:
  train: tuple[np.ndarray, np.ndarray]  # (images (N,H,W,C) uint8 or float32, labels int32)
  test: tuple[np.ndarray, np.ndarray]
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]  # of the training images (uint8: divided by 255)
  std: tuple[float, ...]
  scale: float  # pixel value that mean/std call 1.0: 255 for uint8, 1 for float


def ways(builtin: list[str]) -> str:
  """The built-in names and the three ways to bring data, for error messages."""
  return (f'Built-in datasets: {", ".join(builtin)}. Or bring your own data as config.dataset =\n'
          f'  - a .npz file holding {", ".join(KEY_SETS[0])} (or {", ".join(KEY_SETS[1])}), '
          'e.g. --config.dataset=/path/to/digits.npz\n'
          '  - a directory holding those arrays as .npy files (x_train.npy, ...), '
          'e.g. --config.dataset=/path/to/digits_dir\n'
          "  - 'package.module:function', a function returning {'train': (images, labels), "
          "'test': (images, labels)}, e.g. --config.dataset=my_package.my_data:load\n"
          'Images (N,H,W) or (N,H,W,C), uint8 or float; labels integers (N,) from 0 to the '
          'number of classes - 1.')


def kind(name: str) -> str | None:
  """'function', 'dir' or 'file' for what ``name`` looks like; None for a plain (unknown) name."""
  if ':' in name and not os.path.exists(name) and _FUNCTION.match(name):
    return 'function'
  if os.path.isdir(name):
    return 'dir'
  if os.path.isfile(name) or name.endswith(('.npz', '.npy')) or os.sep in name:
    return 'file'
  return None


def _bad(msg: str) -> ValueError:
  return ValueError(f'dataset: {msg}')


def _read_arrays(name: str, how: str) -> dict[str, tuple[tuple[np.ndarray, str], ...]]:
  """``{'train': ((images, where), (labels, where)), 'test': ...}`` as stored, ``where`` naming
  the file/key of each array for error messages."""
  if how == 'function':
    return _call_function(name)
  path = os.path.abspath(os.path.expanduser(name))
  if how == 'dir':
    found = sorted(f[:-4] for f in os.listdir(path) if f.endswith('.npy'))
    where = lambda key: os.path.join(path, key + '.npy')
    read = lambda key: np.load(where(key), allow_pickle=False)
    what = f'directory {path}'
  else:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'dataset: {path}: no such file or directory (config.dataset='
                              f'{name!r}). Give an existing .npz file or directory of .npy files.')
    try:
      archive = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise _bad(f'{path} does not read as a .npz file ({type(e).__name__}: {e}). Write it '
                 f'with np.savez({os.path.basename(path)!r}, x_train=..., y_train=..., '
                 'x_test=..., y_test=...).') from e
    if not hasattr(archive, 'files'):
      raise _bad(f'{path} holds a single array, not a .npz archive of {", ".join(KEY_SETS[0])}; '
                 'write one with np.savez, or give a directory of .npy files.')
    found = sorted(archive.files)
    where = lambda key: f'{path}[{key!r}]'
    read = lambda key: archive[key]
    what = f'file {path}'
  for keys in KEY_SETS:
    if set(keys) <= set(found):
      arrays = [(read(k), where(k)) for k in keys]
      return {'train': tuple(arrays[:2]), 'test': tuple(arrays[2:])}
  raise _bad(f'{what} holds {found or "no arrays"}; expected {", ".join(KEY_SETS[0])} (or '
             f'{", ".join(KEY_SETS[1])}){" as .npy files" if how == "dir" else ""}.')


def _call_function(spec: str):
  module_name, fn_name = spec.split(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise _bad(f'{spec!r}: module {module_name!r} does not import ({e}); put it on PYTHONPATH.'
               ) from e
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise _bad(f'{spec!r}: module {module_name!r} has no function {fn_name!r}.')
  out = fn()
  shape = "{'train': (images, labels), 'test': (images, labels)}"
  if not isinstance(out, dict) or not {'train', 'test'} <= set(out):
    raise _bad(f'{spec}() returned {type(out).__name__}'
               f'{" with keys " + str(sorted(out)) if isinstance(out, dict) else ""}; '
               f'it must return {shape}.')
  arrays = {}
  for split in ('train', 'test'):
    pair = out[split]
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise _bad(f"{spec}()['{split}'] is not an (images, labels) pair; return {shape}.")
    arrays[split] = tuple((np.asarray(a), f"{spec}()['{split}'][{i}] ({what})")
                          for i, (a, what) in enumerate(zip(pair, ('images', 'labels'))))
  return arrays


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
  """(N,H,W,C) uint8 or float32, or a ValueError naming ``where`` and the fix."""
  if images.ndim not in (3, 4):
    raise _bad(f'{where}: images have shape {images.shape}; expected (N,H,W) or (N,H,W,C) '
               '(one image per row; reshape e.g. flat 64-pixel rows with .reshape(-1, 8, 8)).')
  if len(images) == 0:
    raise _bad(f'{where}: the split is empty (0 images); give at least one example.')
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise _bad(f'{where}: images are {images.dtype}; use uint8 (0..255) or float: '
               'images.astype(np.uint8) or images.astype(np.float32).')
  images = images.astype(np.float32)
  bad = ~np.isfinite(images)
  if bad.any():
    first = int(np.flatnonzero(bad.reshape(len(images), -1).any(1))[0])
    raise _bad(f'{where}: {int(bad.sum())} NaN or infinite pixel value(s), first in image '
               f'{first}; remove or repair those images.')
  return images


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
  if labels.ndim != 1:
    raise _bad(f'{where}: labels have shape {labels.shape}; expected ({n},), one integer per '
               'image (e.g. labels.reshape(-1), or labels.argmax(1) for one-hot rows).')
  if len(labels) != n:
    raise _bad(f'{where}: {len(labels)} labels for {n} images; give one label per image.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise _bad(f'{where}: labels are {labels.dtype}; they must be integers (class indices '
               '0, 1, ...): labels.astype(np.int32) if they are whole numbers.')
  if labels.min() < 0:
    raise _bad(f'{where}: label {int(labels.min())} < 0; classes are numbered from 0.')
  return labels.astype(np.int32)


def channel_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of ``images / scale`` over all images and pixels (float64 sums over
  chunks, so no float64 copy of the whole array)."""
  c = images.shape[-1]
  total, squares, count = np.zeros(c), np.zeros(c), 0
  for start in range(0, len(images), 4096):
    x = images[start:start + 4096].reshape(-1, c).astype(np.float64) / scale
    total += x.sum(0)
    squares += np.square(x).sum(0)
    count += len(x)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _validate(name: str, arrays) -> UserData:
  checked = {}
  for split in ('train', 'test'):
    (images, iwhere), (labels, lwhere) = arrays[split]
    images = _check_images(np.asarray(images), iwhere)
    checked[split] = (images, _check_labels(np.asarray(labels), len(images), lwhere))
  (train_x, train_y), (test_x, test_y) = checked['train'], checked['test']
  iwhere, twhere = arrays['train'][0][1], arrays['test'][0][1]
  if train_x.shape[1:] != test_x.shape[1:]:
    raise _bad(f'{iwhere} images are {train_x.shape[1:]} (H,W,C), {twhere} images '
               f'{test_x.shape[1:]}; both splits need the same image shape.')
  if train_x.dtype != test_x.dtype:
    raise _bad(f'{iwhere} images are {train_x.dtype}, {twhere} images {test_x.dtype}; give '
               'both splits the same dtype (uint8, or float in the same range).')
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  if num_classes < 2:
    raise _bad(f'{arrays["train"][1][1]}: every label is 0; a classifier needs at least two '
               'classes.')
  scale = 255.0 if train_x.dtype == np.uint8 else 1.0
  mean, std = channel_stats(train_x, scale)
  if min(std) == 0:
    raise _bad(f'{iwhere}: channel {std.index(0.0)} is constant over the training images '
               f'(std 0) and cannot be normalised; set config.data_mean and config.data_std '
               f'(config.dataset={name!r}).')
  return UserData(checked['train'], checked['test'], num_classes, tuple(train_x.shape[1:]),
                  mean, std, scale)


_CACHE: dict[tuple, UserData] = {}
_LOCK = threading.Lock()


def _stamp(name: str, how: str) -> tuple:
  """What changes when the data on disk changes (a function's data: its name only)."""
  if how == 'function':
    return ()
  path = os.path.abspath(os.path.expanduser(name))
  files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith('.npy')]
           if how == 'dir' else [path] if os.path.isfile(path) else [])
  return tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)


def load(name: str, builtin: list[str]) -> UserData:
  """The validated data ``config.dataset=name`` names (cached per process); a name that is
  none of the three forms raises a ValueError listing ``builtin`` and the ways to bring data."""
  how = kind(name)
  if how is None:
    raise ValueError(f'Unknown dataset {name!r}. {ways(builtin)}')
  key = (name, how, _stamp(name, how))
  with _LOCK:
    if key not in _CACHE:
      _CACHE[key] = _validate(name, _read_arrays(name, how))
    return _CACHE[key]
