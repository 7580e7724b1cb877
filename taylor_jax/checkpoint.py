"""Checkpoints: orbax ``CheckpointManager`` (async, atomic), state + JSON metadata.

The metadata holds what a fresh process needs to rebuild the (possibly pruned) model without a
template from the user: model name, number of classes, the current widths, the phase of the run,
and the config. Restoring reads the metadata first, rebuilds the model at those widths, and
restores the state against an abstract tree from ``jax.eval_shape``.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save (even SIGKILL) leaves the previous checkpoints intact and restorable.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import flax
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save),
      item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
         force: bool = False) -> None:
  """Saves ``state`` (a pytree, e.g. TrainState) and JSON ``meta`` at ``step`` (async)."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
      meta=ocp.args.JsonSave(meta)), force=force)


def latest_meta(mngr: ocp.CheckpointManager) -> Optional[dict[str, Any]]:
  """Metadata of the newest complete checkpoint, or None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def restore_state(mngr: ocp.CheckpointManager, template_fn: Callable[[], Any],
                  step: Optional[int] = None) -> Any:
  """Restores the newest (or ``step``) state into the structure ``template_fn()`` builds.

  ``template_fn`` is traced with ``jax.eval_shape``, so nothing is allocated for the template.
  """
  step = mngr.latest_step() if step is None else step
  abstract = jax.eval_shape(template_fn)
  target = flax.serialization.to_state_dict(abstract)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  return flax.serialization.from_state_dict(abstract, restored)
