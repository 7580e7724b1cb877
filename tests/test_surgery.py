"""Surgery == masking, for every zoo model: eval outputs, one train step, optimizer state.

Property-tested over random masks (>= 1 unit kept per group, non-prunable groups whole): the
surgered network must compute what the masked network computes, and one SGD(momentum)+weight
decay (and Adam) step from the masked state and from the surgered state must give the same loss,
the same kept parameters / batch statistics and the same optimizer state at the kept positions.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from taylor_jax import models, surgery, train

import helpers  # noqa: E402  (tests/ is on sys.path)

random_masks = helpers.random_masks

NAMES = models.names()
# Big models: fewer examples (each example compiles the surgered network anew).
BIG = {'resnet34', 'resnet50', 'resnet101', 'densenet121', 'vgg11_bn', 'preact_resnet18',
       'vgg16_bn', 'resnet56', 'resnet18'}
# ImageNet-size models: each example compiles full networks (a minute or more on 2 CPU cores), so
# their tests are marked slow (run with -m slow). The default set covers the same classes and
# layer kinds through resnet18 / vgg16_bn / preact_resnet18 here and, at reduced width (ResNet-50,
# VGG11-BN, a small DenseNet), through tests/test_models.py::test_masked_equals_surgered.
HEAVY = {'resnet34', 'resnet50', 'resnet101', 'densenet121', 'vgg11_bn'}
# ResNet-20/56 are CifarResNet with 3/9 instead of 1 BasicBlock per stage: the same block code as
# ResNet-8 (an identity-shortcut block, stage 1, and projection blocks, stages 2-3), which runs
# here by default. The one group slice ResNet-8 lacks (conv1 input of a block b > 0 reading the
# stage stream) is cut by tests/test_models.py::test_masked_equals_surgered[resnet20] (eval,
# train-mode BN and running statistics), also by default. Slow here: ~70 s of compiles each.
CIFAR_DEEP = {'resnet20', 'resnet56'}
SLOW = HEAVY | CIFAR_DEEP
# The train step (gradients, momentum / Adam state, BN statistics) on the surgered network runs
# by default on ResNet-8 and LeNet-3 (what it checks is the slicing of the optimizer state, the
# same code for every model); the layouts of these three (max-pool stem, pre-activation blocks,
# a dense head) are checked by default in train mode, with running statistics, by
# tests/test_models.py::test_masked_equals_surgered. ~17 s of compiles each: slow here.
SLOW_TRAIN_STEP = SLOW | {'resnet18', 'preact_resnet18', 'vgg16_bn'}
NUM_CLASSES = 10
# No shrinking: every shrink step recompiles a network (minutes); the seed reproduces a failure.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
BATCH = 2


def input_shape(name: str) -> tuple[int, int, int]:
  return (28, 28, 1) if name == 'lenet3' else (32, 32, 3)


IMAGENET = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn', 'densenet121'}


def train_shape(name: str) -> tuple[int, int, int]:
  """Train-step inputs: 64x64 for ImageNet layouts, so the last stage's train-mode BN normalises
  over 2x2x2 values, not 2 (two values make the BN ill-conditioned: float32 round-off of the
  masked vs the surgered sum is amplified ~100x in the gradients)."""
  return (64, 64, 3) if name in IMAGENET else input_shape(name)


def examples(name: str, small: int, big: int) -> int:
  return big if name in BIG else small


@functools.lru_cache(maxsize=None)
def setup(name: str):
  """Model and its variables with randomised BN statistics / affine params and biases."""
  model = models.create(name, NUM_CLASSES)
  x = jnp.zeros((1,) + input_shape(name))
  # Drawn with numpy at init's shapes: running model.init op by op compiles every initialiser
  # (~15 s for ResNet-8). Kernels LeCun-normal, as init draws them.
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(0)

  def randomise(path, v):
    leaf = path[-1].key
    if leaf == 'mean':
      return rng.normal(0.0, 0.5, v.shape).astype(v.dtype)
    if leaf == 'var':
      return rng.uniform(0.5, 2.0, v.shape).astype(v.dtype)
    if leaf == 'scale':
      return rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
    if leaf == 'bias':
      return rng.normal(0.0, 0.2, v.shape).astype(v.dtype)
    assert leaf == 'kernel', path
    return (rng.standard_normal(v.shape) / np.sqrt(np.prod(v.shape[:-1]))).astype(v.dtype)

  variables = jax.tree_util.tree_map_with_path(randomise, abstract)
  return model, variables


def batch(name: str, seed: int, shape=None) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = input_shape(name) if shape is None else shape
  return {'image': rng.standard_normal((BATCH,) + shape).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}


def assert_close(a, b, rel, what, atol=0.0):
  """max |a - b| <= rel * max |a| + atol (float32 sums in another order differ slightly)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, f'{what}: shapes {a.shape} vs {b.shape}'
  if not a.size:
    return
  scale = np.max(np.abs(a))
  err = np.max(np.abs(a - b))
  assert err <= rel * scale + atol, (f'{what}: max |diff| {err:.3g} > {rel:g} x max|a| {scale:.3g}'
                                     f' + {atol:.3g}')


def assert_trees_close(a, b, rel, what):
  """Leafwise :func:`assert_close`, with ``atol = rel * 1e-2 * (max |x| over the tree)`` so a
  tiny leaf (e.g. one kept unit's gradient) is judged on the tree's scale."""
  la, ta = jax.tree_util.tree_flatten_with_path(jax.device_get(a))
  lb, tb = jax.tree_util.tree_flatten_with_path(jax.device_get(b))
  assert ta == tb, f'{what}: tree structures differ'
  tree_scale = max([float(np.max(np.abs(x))) for _, x in la if np.size(x)] + [0.0])
  for (path, x), (_, y) in zip(la, lb):
    assert_close(x, y, rel, f'{what} {jax.tree_util.keystr(path)}', atol=rel * 1e-2 * tree_scale)


def apply_fn(model):
  return jax.jit(lambda v, x, g: model.apply(v, x, gates=g, train=False))


@functools.lru_cache(maxsize=None)
def full_apply_fn(name: str):
  return apply_fn(setup(name)[0])


mask_args = dict(seed=st.integers(0, 2**31 - 1), keep_prob=st.sampled_from([0.05, 0.3, 0.7, 0.95]))


# --- eval: surgered output == masked output ------------------------------------------------

@pytest.mark.parametrize('name', [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else [])
                                  for n in NAMES])
def test_surgered_eval_equals_masked(name):
  model, variables = setup(name)
  x = batch(name, 1)['image']

  @settings(max_examples=examples(name, 4, 2), deadline=None, derandomize=True, phases=PHASES,
            suppress_health_check=list(HealthCheck))
  @given(**mask_args)
  def check(seed, keep_prob):
    masks = random_masks(model, seed, keep_prob)
    masked = full_apply_fn(name)(variables, x, masks)
    widths = surgery.new_widths(model.widths, masks)
    small = model.clone(widths=widths)
    small_vars = surgery.shrink_variables(model.groups(), variables, masks)
    # The shrunk variables are exactly what the smaller model expects.
    want = jax.eval_shape(small.init, jax.random.PRNGKey(0), x[:1])
    assert jax.tree.map(lambda a: a.shape, want) == jax.tree.map(np.shape, small_vars)
    out = apply_fn(small)(small_vars, x, None)
    assert_close(masked, out, 1e-5, f'{name} logits')

  check()


# --- one train step: masked state vs surgered state ----------------------------------------

MESH = train.create_mesh(jax.devices()[:1])


def sgd_tx():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))


def adam_tx():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.adam(1e-3))


def copy_tree(tree):
  # The train step donates its state: never hand it an array that is used again.
  return jax.tree.map(jnp.copy, tree)


@functools.lru_cache(maxsize=None)
def warm_state(name: str, opt: str):
  """A train state after two full-width steps (non-trivial momentum / Adam moments), its step."""
  model, variables = setup(name)
  tx = sgd_tx() if opt == 'sgd' else adam_tx()
  step = train.make_train_step(model, tx, MESH)
  state = train.replicate(MESH, train.create_train_state(variables, tx, widths=model.widths))
  for i in range(2):
    state, _ = step(state, train.shard_batch(MESH, batch(name, 10 + i, train_shape(name))))
  return tx, step, jax.device_get(state)


def check_train_step(name: str, opt: str, seed: int, keep_prob: float):
  model, _ = setup(name)
  tx, step, host_state = warm_state(name, opt)
  masks = random_masks(model, seed, keep_prob)
  rng = np.random.default_rng(seed)
  scores = {k: rng.random(v.shape).astype(np.float32) for k, v in masks.items()}
  masked = host_state.replace(masks=masks, score_sum=scores,
                              score_ema={k: 2 * v for k, v in scores.items()},
                              score_count=np.int32(3), prune_steps=np.int32(1))
  b = train.shard_batch(MESH, batch(name, 99, train_shape(name)))

  # A: step the masked network, then cut.
  state_a, metrics_a = step(train.replicate(MESH, copy_tree(masked)), b)
  _, cut_a = surgery.shrink_train_state(jax.device_get(state_a), model, tx)

  # B: cut (on replicated device arrays), then step the smaller network.
  small, state_b0 = surgery.shrink_train_state(train.replicate(MESH, copy_tree(masked)), model, tx)
  assert small.widths == surgery.new_widths(model.widths, masks)
  state_b0 = jax.device_get(state_b0)
  state_b, metrics_b = train.make_train_step(small, tx, MESH)(
      train.replicate(MESH, copy_tree(state_b0)), b)

  assert_close(metrics_a['loss'], metrics_b['loss'], 1e-4, f'{name} loss')
  assert_trees_close(cut_a.params, state_b.params, 1e-4, f'{name} params')
  assert_trees_close(cut_a.batch_stats, state_b.batch_stats, 1e-4, f'{name} batch_stats')
  assert_trees_close(cut_a.opt_state, state_b.opt_state, 1e-4, f'{name} opt_state')
  state_b = jax.device_get(state_b)
  for k in masks:
    kept = np.flatnonzero(masks[k])
    np.testing.assert_array_equal(state_b.masks[k], np.ones(kept.size, np.float32))
    np.testing.assert_array_equal(state_b0.score_sum[k], scores[k][kept])
    np.testing.assert_array_equal(state_b0.score_ema[k], 2 * scores[k][kept])
  assert int(state_b0.step) == int(masked.step) == 2
  assert int(state_b0.score_count) == 3 and int(state_b0.prune_steps) == 1


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_TRAIN_STEP else []) for n in NAMES])
def test_train_step_sgd_surgered_equals_masked(name):

  @settings(max_examples=examples(name, 3, 1), deadline=None, derandomize=True, phases=PHASES,
            suppress_health_check=list(HealthCheck))
  @given(**mask_args)
  def check(seed, keep_prob):
    check_train_step(name, 'sgd', seed, keep_prob)

  check()


@pytest.mark.parametrize('name', ['resnet8'])
def test_train_step_adam_surgered_equals_masked(name):
  @settings(max_examples=2, deadline=None, derandomize=True, phases=PHASES,
            suppress_health_check=list(HealthCheck))
  @given(**mask_args)
  def check(seed, keep_prob):
    check_train_step(name, 'adam', seed, keep_prob)

  check()


# --- host arrays, optimizer-state mapping, errors --------------------------------------------

def test_shrink_train_state_host_equals_device():
  model, _ = setup('resnet8')
  tx, _, host_state = warm_state('resnet8', 'sgd')
  masks = random_masks(model, 3, 0.5)
  host = host_state.replace(masks=masks)
  _, a = surgery.shrink_train_state(host, model, tx)
  _, b = surgery.shrink_train_state(train.replicate(MESH, copy_tree(host)), model, tx)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(a.params))
  assert_trees_close(a, b, 0.0, 'host vs device')


@pytest.mark.parametrize('make_tx', [sgd_tx, adam_tx,
                                     lambda: optax.sgd(0.1),  # no parameter-shaped state
                                     lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                                         optax.inject_hyperparams(optax.sgd)(
                                                             learning_rate=0.1, momentum=0.9)),
                                     lambda: optax.MultiSteps(optax.adam(1e-3), 4),
                                     lambda: optax.contrib.schedule_free_adamw(1e-3),
                                     # unfactored: per-element v, (1,) placeholders kept
                                     lambda: optax.adafactor(1e-3, min_dim_size_to_factor=10**6)])
def test_opt_state_shapes_follow_params(make_tx):
  model, variables = setup('lenet3')
  tx = make_tx()
  state = train.create_train_state(variables, tx, widths=model.widths)
  masks = random_masks(model, 0, 0.5)
  small, new = surgery.shrink_train_state(state.replace(masks=masks), model, tx)
  want = jax.eval_shape(tx.init, new.params)
  assert jax.tree.map(lambda a: a.shape, want) == jax.tree.map(np.shape, new.opt_state)
  want_p = jax.eval_shape(small.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params']
  assert jax.tree.map(lambda a: a.shape, want_p) == jax.tree.map(np.shape, new.params)


def test_factored_optimizer_state_is_refused_naming_the_fix():
  # Adafactor's row/column moments average over units that pruning removes: no selection of
  # them is the smaller network's state.
  model, variables = setup('lenet3')
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  state = train.create_train_state(variables, tx, widths=model.widths)
  masks = random_masks(model, 0, 0.5)
  with pytest.raises(ValueError, match=r"v_row.*factored moments.*opt_state=None"):
    surgery.shrink_train_state(state.replace(masks=masks), model, tx)


def test_emptied_group_raises():
  model, variables = setup('resnet8')
  masks = random_masks(model, 0, 0.5)
  masks['stage2.block0'] = np.zeros_like(masks['stage2.block0'])
  with pytest.raises(ValueError, match='stage2.block0'):
    surgery.shrink_variables(model.groups(), variables, masks)
  with pytest.raises(ValueError, match='stage2.block0'):
    surgery.new_widths(model.widths, masks)
  tx = sgd_tx()
  state = train.create_train_state(variables, tx, widths=model.widths).replace(masks=masks)
  with pytest.raises(ValueError, match='stage2.block0'):
    surgery.shrink_train_state(state, model, tx)


def test_selection_matrix_is_index_selection():
  sel = surgery.group_selections({'g': np.array([1, 0, 1, 1, 0], np.float32)})['g']
  v = np.arange(5.0)
  np.testing.assert_array_equal(sel.matrix(5) @ v, sel.apply_vector(v))
