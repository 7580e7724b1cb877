"""Checkpoints: orbax ``CheckpointManager`` (async, atomic), state + JSON metadata.

The metadata holds what a fresh process needs to rebuild the (possibly pruned) model without a
template from the user: model name, number of classes, the current widths, the phase of the run,
and the config. Restoring reads the metadata first, rebuilds the model at those widths, and
restores the state against an abstract tree from ``jax.eval_shape``.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save (even SIGKILL) leaves the previous checkpoints intact and restorable. A complete
checkpoint can still be damaged afterwards (a full disk, a bad copy): :func:`restore_newest`
falls back to the newest one that restores completely and names the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
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
  return read_meta(mngr, step)


class DamagedCheckpointError(RuntimeError):
  """No checkpoint of a workdir restores; the message lists each one and why."""


@dataclasses.dataclass
class Restored:
  step: int
  meta: dict[str, Any]
  state: Any
  # (step, checkpoint directory, why) of each newer checkpoint that did not restore.
  damaged: list[tuple[int, str, str]]


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  # The manager is built with orbax's default step names (the bare step number).
  return str(ocp.step.build_step_path(mngr.directory, ocp.step.standard_name_format(), step))


def _why(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {first[:300]}'


class _DropLeftoverReadErrors(logging.Filter):
  """asyncio's 'Task exception was never retrieved' for reads of the damaged checkpoints: the
  same error restore_newest reports once (with the step and what to do)."""

  def __init__(self):
    super().__init__()
    self.dirs: list[str] = []

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else '')
    return not any(d in text for d in self.dirs)


_LEFTOVER_FILTER = _DropLeftoverReadErrors()
_hook_installed = False


def _quiet_leftover_reads() -> None:
  """A failed orbax restore leaves tensorstore reads of the damaged checkpoint pending; each that
  finishes calls back into orbax's closed event loop, and Python prints every one as a
  'RuntimeError: Event loop is closed' traceback (dozens, interleaved with the run's log).
  Those are dropped (they only ever come from such leftovers; other errors still print), as
  is asyncio's log of the read error of a checkpoint already reported (``_LEFTOVER_FILTER``)."""
  global _hook_installed
  if _hook_installed:
    return
  _hook_installed = True
  logging.getLogger('asyncio').addFilter(_LEFTOVER_FILTER)
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)

  sys.unraisablehook = hook


def restore_newest(mngr: ocp.CheckpointManager, template_fn: Callable[[dict[str, Any]], Any],
                   check_meta: Optional[Callable[[dict[str, Any]], None]] = None
                   ) -> Optional[Restored]:
  """The newest checkpoint whose metadata and state both restore; None when there is none.

  ``template_fn(meta)`` builds the state's structure from that checkpoint's metadata (traced,
  see :func:`restore_state`). ``check_meta(meta)`` may refuse a checkpoint (its exception
  propagates: an incompatible run is not a damaged file). Damaged checkpoints are reported in
  ``Restored.damaged`` and left in place (:func:`set_aside` moves them); if none restores,
  :class:`DamagedCheckpointError` lists every one.
  """
  failures = []
  _quiet_leftover_reads()
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = read_meta(mngr, step)
    except Exception as e:  # noqa: any reader error means this checkpoint cannot be used
      failures.append((step, step_dir(mngr, step), f'metadata ({_why(e)})'))
      continue
    if check_meta is not None:
      check_meta(meta)
    try:
      state = restore_state(mngr, lambda: template_fn(meta), step=step)
    except Exception as e:  # noqa: as above
      failures.append((step, step_dir(mngr, step), f'state ({_why(e)})'))
      _LEFTOVER_FILTER.dirs.append(step_dir(mngr, step))
      continue
    return Restored(step, meta, state, failures)
  if failures:
    listed = '\n  '.join(f'step {s} ({d}): {why}' for s, d, why in failures)
    raise DamagedCheckpointError(
        f'none of the {len(failures)} checkpoint(s) in {mngr.directory} restores:\n  {listed}\n'
        f'Nothing was changed. Move {mngr.directory} elsewhere to start the run afresh, or '
        'restore the files from a copy.')
  return None


def set_aside(mngr: ocp.CheckpointManager, workdir: str, steps: list[int]) -> list[str]:
  """Moves the checkpoints of ``steps`` to ``<workdir>/checkpoints_damaged/`` (kept for
  inspection, out of the manager's sight, which would otherwise keep returning them and count
  them against ``max_to_keep``); returns the new paths."""
  out = []
  dest_root = os.path.join(os.path.abspath(workdir), 'checkpoints_damaged')
  for step in steps:
    src = step_dir(mngr, step)
    dest, n = os.path.join(dest_root, os.path.basename(src)), 1
    while os.path.exists(dest):  # an earlier damaged checkpoint of the same step
      dest, n = os.path.join(dest_root, f'{os.path.basename(src)}.{n}'), n + 1
    if jax.process_index() == 0:
      os.makedirs(dest_root, exist_ok=True)
      shutil.move(src, dest)
    out.append(dest)
  if jax.process_count() > 1:  # every process sees the move before it lists the steps again
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('taylor_jax.checkpoint.set_aside')
  mngr.reload()
  return out


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
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
