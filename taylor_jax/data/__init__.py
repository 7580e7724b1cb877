"""Datasets: a TFDS builder for Debian's Fashion-MNIST and a numpy input pipeline.

Kept light on purpose (no TFDS/JAX import here); see :mod:`taylor_jax.data.input_pipeline`.
"""

from __future__ import annotations

import os


def default_data_dir(data_dir: str | None = None) -> str:
  """The TFDS data dir: ``data_dir`` if given, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  if data_dir:
    return os.path.expanduser(str(data_dir))
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')
