"""Prepares the project's TFDS dataset(s) (idempotent: a fast no-op when already prepared).

  python -m taylor_jax.data.prepare [--data_dir=DIR] [--force]

Data dir: ``--data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``. The IDX files are
read from ``$TAYLOR_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import sys
import time

from taylor_jax.data import default_data_dir


def builder(data_dir: str | None = None, idx_dir: str | None = None):
  """The (possibly unprepared) Fashion-MNIST builder in ``data_dir``."""
  from taylor_jax.data import fashion_mnist_debian
  return fashion_mnist_debian.FashionMnistDebian(
      data_dir=default_data_dir(data_dir), idx_dir=idx_dir, file_format='array_record')


def prepare_fashion_mnist(data_dir: str | None = None, *, idx_dir: str | None = None,
                          force: bool = False, verbose: bool = False):
  """Prepares Fashion-MNIST to array_record in ``data_dir``; returns the builder."""
  import tensorflow_datasets as tfds
  b = builder(data_dir, idx_dir)
  if b.is_prepared() and not force:
    if verbose:
      print(f'[prepare] fashion_mnist already prepared in {b.data_dir}')
    return b
  from taylor_jax.data import fashion_mnist_debian
  fashion_mnist_debian.check_idx_files(idx_dir)  # Clear error naming the fix before TFDS starts.
  t0 = time.time()
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not force
          else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  b.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  if verbose:
    print(f'[prepare] fashion_mnist prepared in {b.data_dir} in {time.time() - t0:.1f} s')
  return b


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: $TFDS_DATA_DIR '
                      'or ~/tensorflow_datasets)')
  parser.add_argument('--force', action='store_true', help='prepare again even if prepared')
  args = parser.parse_args(argv)
  try:
    prepare_fashion_mnist(args.data_dir, force=args.force, verbose=True)
  except FileNotFoundError as e:
    print(f'[prepare] error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
