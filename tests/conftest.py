"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the project's Fashion-MNIST prepared (array_record).

  Reuses the default data dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) when
  ``python -m taylor_jax.data.prepare`` has already prepared it there; otherwise prepares it into a
  temporary directory once per session (about 7 s). Needs Debian's ``dataset-fashion-mnist``.
  """
  from taylor_jax.data import default_data_dir
  from taylor_jax.data import prepare
  default = default_data_dir()
  if prepare.builder(default).is_prepared():
    return default
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  prepare.prepare_fashion_mnist(data_dir)
  return data_dir
