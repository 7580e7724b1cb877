"""Scoring a trained network outside the train step: fixed minibatches, any estimator, the oracle.

What the experiments (oracle correlation, greedy pruning curves) and notebooks share:

* :func:`train_baseline` trains (or resumes, or reuses) a baseline through the main job;
* :func:`restore_network` loads a workdir's network as ``(model, variables, masks, meta)``;
* :func:`fixed_batches` the first ``n`` examples of a split, unaugmented, as minibatches;
* :func:`mean_scores` an estimator's per-unit scores averaged over minibatches (as the engine
  averages a pruning period), one compiled function per estimator and model;
* :func:`oracle_forms` the oracle on the SAME minibatches, in its ``abs`` and ``squared`` forms
  from one pass over the removals;
* :func:`evaluate` mean loss and accuracy of the (masked) network on minibatches.

BatchNorm mode: ``train=False`` (running statistics) by default everywhere, so that an
estimator's gradient is that of exactly the loss the oracle measures.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from taylor_jax import estimators, losses, oracle
from taylor_jax.data import input_pipeline

Scores = dict[str, np.ndarray]


# --- the baseline ------------------------------------------------------------------------------

def baseline_done(workdir: str) -> bool:
  """True when ``workdir`` holds a finished baseline-only run (its report is written)."""
  path = os.path.join(workdir, 'report.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return 'baseline' in json.load(f)


def train_baseline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the baseline of ``config`` (pruning off) in ``workdir`` through the main job.

  Resumes an interrupted run; a finished one is reused without touching it. Returns the report's
  ``baseline`` entry (test accuracy, loss, params, FLOPs, ...).
  """
  if not baseline_done(workdir):
    from taylor_jax import run  # deferred: the main job pulls in orbax, tqdm, ...
    config = ml_collections.ConfigDict(config.to_dict())
    config.prune.enabled = False
    run.run(config, workdir)
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)['baseline']


def restore_network(workdir: str):
  """``(model, variables, masks, meta)`` of the newest checkpoint in ``workdir``."""
  from taylor_jax import run
  model, state, meta = run.restore(workdir)  # built for meta['input_shape'] (LeNet3's flatten)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  masks = {k: np.asarray(v, np.float32) for k, v in jax.device_get(state.masks).items()}
  return model, variables, masks, meta


# --- data ----------------------------------------------------------------------------------------

def fixed_batches(dataset: str, split: str, n: int, batch_size: int,
                  data_dir: Optional[str] = None, image_size: Optional[int] = None
                  ) -> list[dict[str, jax.Array]]:
  """The first ``n`` examples of ``split`` (in order, unaugmented) as full minibatches.

  ``n`` is rounded down to a multiple of ``batch_size`` (a padded last batch would change the
  minibatch-mean loss the estimators and the oracle see); at least one batch.
  """
  batch_size = min(batch_size, n)
  n = max(batch_size, n // batch_size * batch_size)
  s = input_pipeline.create_split(dataset, split, batch_size=batch_size, train=False, seed=0,
                                  data_dir=data_dir, image_size=image_size, limit=n,
                                  process_index=0, process_count=1, prefetch=0)
  out = []
  for b in s.batches(0):
    if float(np.min(b['weight'])) < 1:  # the split had fewer than n examples
      break
    out.append({'image': jnp.asarray(b['image']), 'label': jnp.asarray(b['label'])})
  return out


# --- estimators and the oracle ------------------------------------------------------------------

class _Key:
  """Hashable by identity, so that (unhashable) Linen modules can key the jit caches."""

  def __init__(self, model):
    self.model = model

  def __hash__(self):
    return id(self.model)

  def __eq__(self, other):
    return isinstance(other, _Key) and other.model is self.model


@functools.lru_cache(maxsize=128)
def _score_fn(key: _Key, name: str, options: tuple, train: bool):
  model = key.model
  est = estimators.get(name, **dict(options))
  groups = tuple(model.groups())

  def fn(variables, masks, batch, step):
    ctx = estimators.ScoreContext(model, groups, variables['params'], variables['batch_stats'],
                                  masks, batch, train=train, step=step)
    return est(ctx)
  return jax.jit(fn)


def mean_scores(name: str, model, variables: Mapping[str, Any], masks: Mapping[str, Any],
                batches: Sequence[Mapping[str, Any]], train: bool = False,
                **options: Any) -> Scores:
  """Estimator ``name``'s scores, the mean over ``batches`` (float64 numpy, 0 at pruned units).

  Each minibatch gets its index as ``step`` (randomised estimators draw anew per minibatch).
  Raises what the estimator raises (e.g. ValueError for a BN criterion on a model without BN).
  """
  fn = _score_fn(_Key(model), name, tuple(sorted(options.items())), train)
  masks_j = {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
  total = None
  for i, b in enumerate(batches):
    s = fn(variables, masks_j, b, jnp.int32(i))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  live = {k: np.asarray(v) != 0 for k, v in masks.items()}
  return {k: np.asarray(v, np.float64) / len(batches) * live[k] for k, v in total.items()}


def oracle_forms(model, variables, masks, batches, train: bool = False,
                 chunk_size: int = 64) -> dict[str, Scores]:
  """The oracle's ``abs`` (``mean_d |L_d - L_d(-m)|``, reference id 40) and ``squared``
  (``mean_d (L_d - L_d(-m))^2``, the paper's definition) forms from one evaluation of every
  removal on ``batches``; also ``signed`` (``mean_d L_d(-m) - L_d``: > 0 when removing ``m``
  hurts). Pruned units score 0."""
  base, removed = oracle.oracle_losses(model, variables, masks, batches, chunk_size, train)
  out = {'abs': {}, 'squared': {}, 'signed': {}}
  for name, rows in removed.items():
    d = rows - base[:, None]
    live = np.asarray(masks[name]) != 0
    for form, v in (('abs', np.abs(d)), ('squared', np.square(d)), ('signed', d)):
      s = np.mean(v, axis=0)
      out[form][name] = np.where(np.isnan(s), 0.0, s) * live
  return out


@functools.lru_cache(maxsize=32)
def _eval_fn(key: _Key):
  model = key.model

  def fn(variables, masks, batch):
    logits = model.apply(variables, batch['image'], gates=masks, train=False)
    loss = jnp.sum(losses.cross_entropy(logits, batch['label']))
    correct = jnp.sum(jnp.argmax(logits, -1) == batch['label'])
    return loss, correct
  return jax.jit(fn)


def evaluate(model, variables, masks, batches) -> dict[str, float]:
  """Mean loss and accuracy (eval-mode BN) of the network with ``masks`` as gates."""
  fn = _eval_fn(_Key(model))
  masks_j = {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
  outs = [fn(variables, masks_j, b) for b in batches]
  n = sum(int(b['label'].shape[0]) for b in batches)
  return {'loss': float(sum(float(l) for l, _ in outs)) / n,
          'accuracy': float(sum(int(c) for _, c in outs)) / n}
