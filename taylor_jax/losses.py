"""The training loss: per-example softmax cross-entropy, shared by the train step, the
estimators' :class:`~taylor_jax.estimators.ScoreContext`, the oracle and the methods."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-example softmax cross-entropy times ``weights`` (0 for padding examples)."""
  # At least float32 (bf16 logits are upcast; float64 stays float64 for exact tests).
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss if weights is None else loss * weights
