"""Shared pytest fixtures, and the suite's compilation settings.

The suite's programs are tiny and compiled once each, so XLA compile time, not run time, is most
of its wall time. At import (before JAX starts, in the controller; xdist workers and the
subprocesses tests start inherit the environment) this sets, unless already set:

* ``XLA_FLAGS=--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false``: LLVM
  without its optimisation passes (about 1.7x faster compiles), and loop fusions emitted by
  XLA:CPU's older element-wise emitter instead of its MLIR fusion emitters (another 1.3-1.4x:
  38.7 / 43.7 s against 30.5 / 30.9 s, twice each, for three compile-heavy tests). The HLO passes
  (fusion decisions, layout, the CPU runtime's library calls) are the same; what the tests compare
  (masked vs surgered, one device vs two, resumed vs uninterrupted) is compared under the same
  flags. ``TAYLOR_JAX_TEST_XLA_FLAGS=`` (empty) runs the suite with XLA's defaults.
* ``JAX_COMPILATION_CACHE_DIR``: a fresh, empty directory for this session only (deleted at
  exit), so a program compiled by one worker or subprocess (the kill-and-resume runs repeat the
  uninterrupted run's steps) is not compiled again. Nothing from an earlier session is reused.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

if 'PYTEST_XDIST_WORKER' not in os.environ:  # the controller (or a plain, serial pytest)
  _flags = os.environ.get('TAYLOR_JAX_TEST_XLA_FLAGS',
                          '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flags}".strip()
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _cache = tempfile.mkdtemp(prefix='taylor_jax_test_xla_cache_')
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')


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


# The longest tests (or xdist groups) first: xdist hands out work in collection order, and a long
# test started last leaves the other worker idle at the end.
LONG_FIRST = ('test_notebook.py', 'test_main_job.py', 'test_imagenet_mock.py', 'test_pruner.py',
              'test_cascaded_projection.py', 'test_surgery.py', 'test_any_model.py',
              'test_gpu_suite.py', 'test_any_model_e2e.py', 'test_estimators_data_parallel.py')


_UNGROUPED: set[str] = set()  # xdist_group-marked tests that --dist loadgroup left ungrouped


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which names the groups
def pytest_collection_modifyitems(config, items):
  """Orders the long tests first; notes the ``xdist_group``-marked tests that ``--dist
  loadgroup`` did not group (pytest-xdist 3.8 under pytest 9 ignores the marks silently: the
  shared end-to-end fixtures would be built once per worker), which then fail (below)."""
  rank = {name: i for i, name in enumerate(LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
  if getattr(config.option, 'loadgroup', False):  # set on xdist workers by --dist loadgroup
    _UNGROUPED.update(i.nodeid for i in items
                      if i.get_closest_marker('xdist_group') and '@' not in i.nodeid)


@pytest.fixture(autouse=True)
def _grouped_as_marked(request):
  # A failing test, not a collection error: xdist's controller hides a worker's collection error
  # behind an INTERNALERROR, this message reaches the report.
  if request.node.nodeid in _UNGROUPED:
    pytest.fail('--dist loadgroup did not group this xdist_group-marked test: this pytest / '
                'pytest-xdist pair ignores the marks; install the versions pinned in '
                'requirements.txt (bash scripts/setup.sh --test)', pytrace=False)
