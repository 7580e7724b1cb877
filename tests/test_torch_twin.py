"""The PyTorch twin of the CIFAR ResNet (experiments/torch_cifar_resnet.py, for the Torch-Pruning
comparison) computes what the JAX network computes, full and surgered, from the same weights."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from taylor_jax import models, surgery  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import helpers  # noqa: E402
import torch_cifar_resnet  # noqa: E402


def _random_variables(model, x, rng):
  """Random weights and BN statistics (a trained net's are not all ones and zeros)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def draw(path, s):
    name = path[-1].key
    if name == 'var':
      return (0.5 + rng.random(s.shape)).astype(np.float32)
    if name == 'scale':
      return (1.0 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = np.prod(s.shape[:-1]) if name == 'kernel' else 10.0
    return (rng.standard_normal(s.shape) * 1.5 / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize('name, surgered', [('resnet8', False), ('resnet20', True)])
def test_torch_twin_logits_match(name, surgered):
  rng = np.random.default_rng(3)
  model = models.create(name, 10)
  x = rng.standard_normal((16, 28, 28, 1)).astype(np.float32)
  variables = _random_variables(model, x[:1], rng)
  if surgered:
    masks = helpers.random_masks(model, 5, 0.6)
    variables = surgery.shrink_variables(model.groups(), variables, masks)
    model = model.clone(widths=surgery.new_widths(model.widths, masks))
  want = np.asarray(jax.jit(lambda v, xx: model.apply(v, xx, train=False))(variables, x))
  net = torch_cifar_resnet.from_jax(model, variables)
  with torch.no_grad():
    got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.abs(want).max() > 0.1  # a net whose logits say something
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)
  # The widths (the groups) are the torch modules' channel counts.
  assert net.stem[0].out_channels == model.widths['stage1']
  last = f'stage3.block{model.blocks_per_stage - 1}'
  assert net.blocks[-1].conv1.out_channels == model.widths[last]
  assert net.head.in_features == model.widths['stage3']
