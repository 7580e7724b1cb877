"""The notebooks run top to bottom in a kernel of this environment's Python."""

from __future__ import annotations

import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'new_estimator.ipynb')
PRUNE_OWN = os.path.join(ROOT, 'notebooks', 'prune_your_own_model.ipynb')


def _kernel_env(optimised: bool) -> dict:
  """The kernel's environment: the suite's (conftest.py: XLA's LLVM optimisation off, for many
  small compiles), or with XLA's default optimisation for a notebook that runs hundreds of
  train steps (prune_your_own_model: 37 s optimised, 42 s not; new_estimator, compile-bound:
  52 s optimised, 48 s not)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if optimised:
    flags = flags.replace('--xla_backend_optimization_level=0', '')
  return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=flags.strip())


@pytest.mark.parametrize('path', [NOTEBOOK, PRUNE_OWN])
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None


def test_new_estimator_notebook_runs(fashion_mnist_data_dir, monkeypatch):
  monkeypatch.setenv('TAYLOR_JAX_DATA_DIR', fashion_mnist_data_dir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # kernel 'python3' with argv 'python ...': jupyter_client starts it with sys.executable, i.e.
  # the interpreter running this test (the .venv's); the first cell prints it, checked below.
  client = NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}})
  client.execute(env=_kernel_env(optimised=False))  # raises CellExecutionError if any cell fails
  printed = ''.join(o.get('text', '') for o in nb.cells[1].outputs if o.output_type == 'stream')
  assert f'python: {sys.executable}' in printed
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 2


def test_prune_your_own_model_notebook_reaches_its_target():
  """An NNX model in plain Flax, numpy arrays, a hand-written loop: the pruner takes it to 40%
  fewer FLOPs, the NNX object ends up pruned in place (the notebook asserts it), one plot."""
  nb = nbformat.read(PRUNE_OWN, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': ROOT}}).execute(env=_kernel_env(optimised=True))
  text = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.outputs if o.output_type == 'stream')
  cut = float(re.search(r'FLOPs cut (\d+\.\d)%, parameters', text).group(1))
  assert 40.0 <= cut <= 45.0, text[-2000:]
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 1
