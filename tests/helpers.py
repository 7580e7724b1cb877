"""Small builders shared by several test files (imported as ``import helpers``)."""

from __future__ import annotations

import os

import numpy as np

from taylor_jax import configlib


def random_masks(model, seed: int, keep_prob: float = 0.5) -> dict[str, np.ndarray]:
  """0/1 masks: prunable groups keep each unit with ``keep_prob`` (>= 1 kept), others whole."""
  rng = np.random.default_rng(seed)
  masks = {}
  for g in model.groups():
    m = np.ones(g.width, np.float32)
    if g.prunable:
      m = (rng.random(g.width) < keep_prob).astype(np.float32)
      m[rng.integers(g.width)] = 1.0
    masks[g.name] = m
  return masks


def pruning_config(**overrides):
  """ResNet-8 with pruning to -40% FLOPs, then ``overrides`` by dotted key ('prune.align': 8)."""
  c = configlib.base_config()
  c.model = 'resnet8'
  c.prune.enabled = True
  c.prune.target_flops_reduction = 0.4
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def xla_flags(*flags: str) -> str:
  """The suite's ``XLA_FLAGS`` (conftest.py) with ``flags`` added, for a subprocess's env."""
  return ' '.join([os.environ.get('XLA_FLAGS', ''), *flags]).strip()
