"""Models that are not in the zoo, Linen and NNX, pruned unchanged: the surgered network computes
what the masked network computes (random masks), one train step (optimizer state included)
matches, and the groups through a LayerNorm are marked."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from taylor_jax import models, surgery, train

EX = 'taylor_jax.models.examples.'
SPECS = [EX + 'mobilenet_v2:MobileNetV2Linen', EX + 'mobilenet_v2:MobileNetV2NNX',
         EX + 'concat_cnn:ConcatCNN', EX + 'vit_tiny:ViTTinyLinen', EX + 'vit_tiny:ViTTinyNNX']
HYP = settings(max_examples=2, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _model(spec):
  return models.create(spec, 10, input_shape=(28, 28, 1))


@functools.lru_cache(maxsize=None)
def _masked_apply(spec):
  """The full network's gated forward, jitted once per model for all hypothesis examples."""
  model = _model(spec)
  return jax.jit(lambda v, x, m: model.apply(v, x, gates=m))


def _variables(model, seed=0):
  """Numpy values of the model's shapes (no random-init compile): weights ~ N(0, 1/fan_in),
  BN statistics and affine parameters away from their identity values."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))

  def fill(path, a):
    leaf = str(path[-1])
    if 'var' in leaf:
      return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 4
    return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def _random_masks(model, draw_seed):
  rng = np.random.default_rng(draw_seed)
  masks = {}
  for g in model.groups():
    m = np.ones(g.width, np.float32)
    if g.prunable:
      m = (rng.random(g.width) > rng.uniform(0.2, 0.8)).astype(np.float32)
      m[rng.integers(g.width)] = 1.0
    masks[g.name] = m
  return masks


@pytest.mark.parametrize('spec', SPECS)
@HYP
@given(seed=st.integers(0, 2 ** 16))
def test_surgered_equals_masked_eval(spec, seed):
  model = _model(spec)
  variables = _variables(model)
  x = np.random.default_rng(1).standard_normal((4, 28, 28, 1)).astype(np.float32)
  masks = _random_masks(model, seed)
  masked = _masked_apply(spec)(variables, x, masks)
  small = model.clone(widths=surgery.new_widths(model.widths, masks))
  out = jax.jit(lambda v: small.apply(v, x))(
      surgery.shrink_variables(model.groups(), variables, masks))
  assert float(jnp.max(jnp.abs(out - masked))) <= 1e-5


@pytest.mark.parametrize('spec', [SPECS[1], SPECS[2], SPECS[3]])
def test_one_train_step_with_optimizer_state_matches(spec):
  model = _model(spec)
  variables = _variables(model, 3)
  masks = _random_masks(model, 7)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
  mesh = train.create_mesh(jax.devices()[:1])
  rng = np.random.default_rng(2)
  batches = [{'image': rng.standard_normal((8, 28, 28, 1)).astype(np.float32),
              'label': rng.integers(0, 10, 8).astype(np.int32)} for _ in range(2)]
  # Masked run: two steps (the second sees a non-zero momentum), then surgery.
  # Replicated first: the second step then reuses the first one's traced program.
  state = train.replicate(mesh, train.create_train_state(variables, tx, masks=masks))
  step = train.make_train_step(model, tx, mesh)
  state, _ = step(state, train.shard_batch(mesh, batches[0]))
  small_model, small = surgery.shrink_train_state(jax.device_get(state), model, tx)
  state, m_masked = step(state, train.shard_batch(mesh, batches[1]))
  _, expect = surgery.shrink_train_state(jax.device_get(state), model, tx)
  # Surgered run: the second step on the smaller network.
  small_step = train.make_train_step(small_model, tx, mesh)
  got, m_small = small_step(small, train.shard_batch(mesh, batches[1]))
  np.testing.assert_allclose(m_small['loss'], m_masked['loss'], rtol=1e-5, atol=1e-6)
  flat = lambda t: jax.tree_util.tree_leaves(jax.device_get(t))
  for a, b in zip(flat((got.params, got.batch_stats, got.opt_state)),
                  flat((expect.params, expect.batch_stats, expect.opt_state))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_layernorm_streams_are_marked_and_heads_and_mlp_prunable():
  for spec in (SPECS[3], SPECS[4]):
    groups = _model(spec).groups()
    marked = [g for g in groups if g.marked]
    assert marked and all(not g.prunable for g in marked)
    stream = max(marked, key=lambda g: len(g.slices))
    assert stream.width == 64 and 'reduce_sum' in stream.marked
    kinds = {g.kind for g in groups if g.prunable}
    assert 'heads' in kinds and 'neuron' in kinds


def test_depthwise_group_shrinks_feature_group_count():
  model = _model(SPECS[0])
  expand = [g for g in model.groups() if g.name == 'block1/expand'][0]
  assert any(s.path[-2] == 'depthwise' and s.role == 'out' for s in expand.slices)
  small = model.clone(widths={**model.widths, 'block1/expand': 20})
  v = jax.eval_shape(lambda: small.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  assert v['params']['block1']['depthwise']['kernel'].shape == (3, 3, 1, 20)
  out = jax.eval_shape(lambda v: small.apply(v, jnp.zeros((2, 28, 28, 1))), v)
  assert out.shape == (2, 10)
