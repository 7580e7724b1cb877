"""The main job: baseline training -> iterative pruning (interleaved with SGD) -> fine-tuning.

One batch's path: :mod:`taylor_jax.data.input_pipeline` yields this process's numpy slice of a
global batch -> :func:`train.shard_batch` makes it a global array sharded over the ``data``
mesh axis -> the jitted :func:`train.make_train_step` runs forward with the masks as gates,
backward, updates, and adds the estimator's per-unit scores to ``state.score_sum`` -> every
``prune.frequency`` steps :mod:`taylor_jax.engine` turns the period's scores into new masks ->
:mod:`taylor_jax.surgery` rebuilds the smaller network (and its optimizer state) and the steps
are re-jitted on the new shapes -> after fine-tuning, :mod:`taylor_jax.report` writes the table.

The run is a sequence of phases over one global step counter (``state.step``), which also
fixes the data position (epoch, batch), so a run killed at any point resumes from its last
checkpoint and finishes exactly as an uninterrupted run: 'baseline' -> 'prune' -> 'finetune'
-> 'done'. The JSON metadata of each checkpoint carries the phase, the widths (a pruned model
restores without a template), the pruning history and the baseline results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import tqdm

from taylor_jax import checkpoint, checks, configlib, costs, engine, estimators, methods, models
from taylor_jax import report
from taylor_jax import surgery
from taylor_jax import train
from taylor_jax.data import input_pipeline

ARCH_KEYS = ('model', 'dataset')


class IncompatibleCheckpointError(ValueError):
  pass


class ConfigChangedError(IncompatibleCheckpointError):
  """A workdir's run resumed with a config whose result-changing fields differ."""


class NonFiniteError(FloatingPointError):
  """A training loss, gradient or importance score became NaN or infinite."""


# --- helpers ---------------------------------------------------------------------------------

def _log_metrics(workdir: str, record: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')


def _check_compatible(meta: dict[str, Any], config: ml_collections.ConfigDict, workdir: str,
                      allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
  """Refuses a checkpoint of another model, dataset or seed; with ``allow_change`` returns the
  other result-changing fields that differ (configlib.result_changes), else refuses them too."""
  saved = meta.get('config', {})
  for key in ARCH_KEYS:
    if key in saved and saved[key] != config[key]:
      raise IncompatibleCheckpointError(
          f'{workdir} holds a checkpoint of {key}={saved[key]!r}, but the config asks for '
          f'{key}={config[key]!r}. Use another --workdir (nothing in {workdir} was changed), or '
          f'--config.{key}={saved[key]} to resume that run.')
  if saved.get('seed', config.seed) != config.seed:
    raise IncompatibleCheckpointError(
        f'{workdir} holds a run with seed={saved["seed"]}, the config asks for seed={config.seed}; '
        'resuming would mix two runs. Use another --workdir (nothing was changed).')
  changes = {k: v for k, v in configlib.result_changes(saved, config).items()
             if k not in ARCH_KEYS + ('seed',)}
  if changes and not allow_change:
    listed = '\n  '.join(f'{k}: {old!r} saved, {new!r} now' for k, (old, new) in changes.items())
    back = ' '.join(f'--config.{k}={old}' for k, (old, _) in changes.items()
                    if old != '<absent>')
    raise ConfigChangedError(
        f'{workdir} holds a run saved with another config; '
        f'{len(changes)} field(s) that change the result differ:\n  {listed}\n'
        f'Resume it as saved ({back}), or pass --allow_config_change to go on under the new '
        f'values (recorded in the report as config_changes), or use another --workdir to start '
        f'afresh. Nothing in {workdir} was changed.')
  return changes


def _check_align(groups, full_widths, align: int) -> None:
  """Refuses an alignment wider than a prunable group: such a group could only be pruned unit by
  unit (engine.Constraints), i.e. its widths would not be aligned at all."""
  narrow = [(g.name, full_widths[g.name]) for g in groups
            if g.prunable and full_widths[g.name] < align]
  if align > 1 and narrow:
    listed = ', '.join(f'{n!r} ({w} units)' for n, w in narrow[:8])
    more = f' and {len(narrow) - 8} more' if len(narrow) > 8 else ''
    raise ValueError(
        f'invalid config: prune.align={align} is wider than {len(narrow)} prunable group(s): '
        f'{listed}{more}; they cannot keep widths aligned to {align}. Use prune.align <= '
        f'{min(w for _, w in narrow)} (1: no alignment).')


def _lr_field(phase: str) -> str:
  return {'baseline': 'optim.learning_rate', 'prune': 'prune.learning_rate'}.get(
      phase, 'prune.finetune_learning_rate')


def _stop_nonfinite(job, what: str, step: int, phase: str, fix: str) -> None:
  """Raises NonFiniteError once the last good checkpoint is on disk (an async save may be in
  flight); nothing is saved after ``step - 1``."""
  job.mngr.wait_until_finished()
  last = job.mngr.latest_step()
  kept = (f'the newest checkpoint, step {last}, was saved before it and is kept'
          if last is not None else 'no checkpoint was saved')
  raise NonFiniteError(
      f'{what} at step {step} (phase {phase!r}); the run stops: {kept}. {fix} Re-running resumes '
      'from that checkpoint (with a changed config: pass --allow_config_change).')


def _check_estimator(job, state, name: str) -> None:
  """The configured estimator's output on the first training batch (estimators.probe)."""
  host = jax.device_get(state)
  it = job.train_split.batches(0)
  try:
    first = next(it)
  finally:
    it.close()  # stops its prefetch thread now
  # A few examples suffice to check shapes and finiteness (and keep this compile small).
  batch = {k: np.asarray(v)[:8] for k, v in first.items() if k in ('image', 'label')}
  estimators.probe(name, job.estimator, job.model, job.groups, host.params, host.batch_stats,
                   host.masks, batch, step=int(host.step))


def _target_excess(target: engine.Target, model, input_shape, full_flops: int, full_params: int):
  """``target.excess`` for ``model`` (the current, possibly surgered one)."""
  return target.excess(lambda masks: costs.flops(model, input_shape, masks) / full_flops,
                       lambda masks: costs.params(model, input_shape, masks) / full_params)


def _latency_table(job) -> dict[str, dict[str, float]]:
  """``{group: {str(width): ms}}`` (JSON keys) of the current model, batch-64 latency with one
  group at a time at each width up to its current one that the constraints let it reach
  (costs.latency_table)."""
  grid = {g.name: [w for w in engine.width_grid(job.full_widths[g.name], job.constraints)
                   if w <= job.widths[g.name]]
          for g in job.groups if g.prunable}
  rep = job.config.report
  table = costs.latency_table(job.model, job.input_shape, grid, batch_size=64,
                              repeats=rep.latency_repeats, rounds=rep.latency_rounds)
  return {k: {str(w): ms for w, ms in t.items()} for k, t in table.items()}


def _unit_cost(config, job, masks, extra) -> Optional[engine.UnitCost]:
  """What ``engine.prune_lowest`` divides scores by under ``prune.rank_by`` (None: plain
  scores): FLOPs (MACs) one unit of each group saves now, or the milliseconds a chunk saves
  according to the latency table (floored at a millionth of the network's latency per unit,
  so chunks that save nothing go last rather than never)."""
  rank_by = config.prune.rank_by
  if rank_by == 'score':
    return None
  if rank_by == 'score_per_flop':
    base = costs.flops(job.model, job.input_shape, masks)
    per_unit = {}
    for g in job.groups:
      alive = np.flatnonzero(np.asarray(masks[g.name]))
      if not g.prunable or alive.size <= 1:
        continue
      fewer = {k: np.asarray(v, np.float32).copy() for k, v in masks.items()}
      fewer[g.name][alive[0]] = 0.0
      per_unit[g.name] = max(base - costs.flops(job.model, job.input_shape, fewer), 1)
    return lambda name, width, chunk: chunk * per_unit.get(name, 1)
  table = {k: {int(w): ms for w, ms in t.items()} for k, t in extra['latency_table'].items()}
  whole = max(max(t.values()) for t in table.values())
  floor = 1e-6 * whole
  return lambda name, width, chunk: max(
      costs.interpolate(table[name], width) - costs.interpolate(table[name], width - chunk),
      chunk * floor)


def _check_target_feasible(config, groups, full_widths, constraints, model, input_shape,
                           full_flops, full_params) -> None:
  """Refuses, before any training, targets the constraints cannot reach."""
  p, target = config.prune, engine.Target.from_config(config.prune)
  full_units = sum(full_widths[g.name] for g in groups if g.prunable)
  removable = engine.removable_units(groups, full_widths, {g.name: np.ones(full_widths[g.name])
                                                           for g in groups}, constraints)
  need = None if target is None else target.units_to_remove(full_units, full_units)
  if need is not None and need > removable:
    raise ValueError(
        f'invalid config: the target removes {need} units but only {removable} of the '
        f'{full_units} prunable units can go under prune.min_width={p.min_width}, '
        f'prune.max_share={p.max_share}, prune.align={p.align}. Lower the target or relax them.')
  if p.target_flops_reduction is not None or p.target_params_reduction is not None:
    minimal = engine.minimal_masks(groups, full_widths, constraints)
    small_model = model.clone(widths=surgery.new_widths(full_widths, minimal))
    if p.target_flops_reduction is not None:
      best = 1 - costs.flops(small_model, input_shape) / full_flops
      what, want = 'FLOPs', p.target_flops_reduction
    else:
      best = 1 - costs.params(small_model, input_shape) / full_params
      what, want = 'parameters', p.target_params_reduction
    if best < want:
      raise ValueError(
          f'invalid config: the target asks for {want:.0%} fewer {what}, but pruning every group '
          f'to its minimum under the constraints (min_width={p.min_width}, '
          f'max_share={p.max_share}, align={p.align}) removes only {best:.1%}. Lower the target '
          'or relax the constraints.')


class _Job:
  """State of one run of the main job; methods are its phases."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    os.makedirs(workdir, exist_ok=True)
    self.mesh = train.create_mesh()
    c = config
    self.train_split = input_pipeline.create_split(
        c.dataset, 'train', batch_size=c.train.batch_size, train=True, seed=c.seed,
        data_dir=c.data_dir, image_size=c.image_size, augment=c.train.augment,
        limit=c.train.limit_examples, crop_pad=c.train.crop_pad,
        mean=c.data_mean, std=c.data_std)
    self.info = self.train_split.info
    self.test_split = input_pipeline.create_split(
        c.dataset, 'test', batch_size=c.train.eval_batch_size, train=False, seed=c.seed,
        data_dir=c.data_dir, image_size=c.image_size, limit=c.train.limit_eval_examples,
        mean=c.data_mean, std=c.data_std)
    n_prune_eval = min(c.prune.eval_examples, self.info.test_size)
    # One batch when they fit, padded to a multiple of the devices (padding weighs 0).
    n_dev = jax.device_count()
    prune_eval_batch = min(c.train.eval_batch_size, -(-n_prune_eval // n_dev) * n_dev)
    self.prune_eval_split = (input_pipeline.create_split(
        c.dataset, 'test', batch_size=prune_eval_batch, train=False,
        seed=c.seed, data_dir=c.data_dir, image_size=c.image_size, limit=n_prune_eval,
        mean=c.data_mean, std=c.data_std)
                             if n_prune_eval > 0 else None)
    self.input_shape = tuple(self.info.image_shape)
    self.spe = self.train_split.steps_per_epoch
    self.baseline_steps = int(round(c.train.epochs * self.spe))
    self.finetune_steps = int(round(c.prune.finetune_epochs * self.spe))
    self.full_widths = models.full_widths(c.model, self.info.num_classes, self.input_shape)
    self.constraints = engine.Constraints(c.prune.min_width, c.prune.max_share, c.prune.align)
    self.estimator = estimators.get(c.prune.estimator, **c.prune.estimator_options.to_dict()) \
        if c.prune.enabled else None
    self.mngr = checkpoint.manager(workdir)
    self.wall_start = time.time()
    self.structure = None  # primitives of the full network's forward pass (checks.structure)

  # -- model / optimizer per phase -----------------------------------------------------------
  def tx_for(self, phase: str):
    c = self.config
    if phase == 'baseline':
      return train.create_optimizer(c.optim, self.spe, max(self.baseline_steps, 1))
    optim = ml_collections.ConfigDict(c.optim.to_dict())
    if phase == 'prune':
      optim.learning_rate, optim.schedule, optim.warmup_epochs = c.prune.learning_rate, 'constant', 0.
    else:
      optim.learning_rate, optim.schedule, optim.warmup_epochs = (
          c.prune.finetune_learning_rate, c.prune.get('finetune_schedule', 'cosine'), 0.)
    return train.create_optimizer(optim, self.spe, max(self.finetune_steps, 1))

  def build(self, widths, phase: str) -> None:
    self.widths = dict(widths)
    self.model = models.create(self.config.model, self.info.num_classes, self.widths,
                               input_shape=self.input_shape)
    if self.config.prune.check_groups:
      # Every surgery: the smaller network must run the same computation (checks module doc).
      if self.structure is None:
        self.structure = checks.structure(
            self.model.clone(widths=self.full_widths), self.input_shape)
      checks.check_structure(self.structure, self.model, self.input_shape)
    self.groups = self.model.groups()
    self.tx = self.tx_for(phase)
    self.train_step = train.make_train_step(
        self.model, self.tx, self.mesh, self.estimator if phase == 'prune' else None, self.groups)
    self.eval_step = train.make_eval_step(self.model, self.mesh)

  def fresh_state(self, widths, phase: str, seed: int):
    model = models.create(self.config.model, self.info.num_classes, widths,
                          input_shape=self.input_shape)
    variables = model.init(jax.random.key(seed), np.zeros((1,) + self.input_shape, np.float32))
    return train.create_train_state(variables, self.tx_for(phase), widths=widths)

  def meta(self, phase: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {'phase': phase, 'widths': self.widths, 'num_classes': self.info.num_classes,
            'model': self.config.model, 'input_shape': list(self.input_shape),
            'config': json.loads(self.config.to_json_best_effort()), 'extra': extra,
            # The normalisation trained with (a user dataset's: from its training images), so that
            # evaluate_workdir normalises the test images the same way.
            'data_mean': list(self.train_split.mean), 'data_std': list(self.train_split.std)}

  def save(self, state, phase: str, extra: dict[str, Any], force: bool = False) -> None:
    if force:
      # A phase boundary that took no step (SNIP, 0 fine-tuning epochs, ...) lands on the step of
      # the previous checkpoint, and orbax refuses two saves at one step: the new one replaces it
      # (killed in between, the run resumes from the one before and redoes the phase).
      self.mngr.wait_until_finished()
      if int(state.step) in self.mngr.all_steps():
        self.mngr.delete(int(state.step))
    checkpoint.save(self.mngr, int(state.step), state, self.meta(phase, extra), force=force)

  def evaluate(self, state, split) -> dict[str, float]:
    return train.evaluate(self.eval_step, state, self.mesh, split.batches(0))

  def costs_of(self, state) -> dict[str, float]:
    masks = jax.device_get(state.masks)
    small = self.model.clone(widths=surgery.new_widths(self.widths, masks))
    variables = surgery.shrink_variables(
        self.groups, {'params': state.params, 'batch_stats': state.batch_stats}, masks)
    return {'params': costs.count_params(variables['params']),
            'flops': costs.flops(small, self.input_shape)}

  def latencies(self, state, with_full: bool = False):
    """``(current, full)``: batch-1 and batch-64 latency (ms) of the current network and, with
    ``with_full``, of the unpruned architecture timed in turn with it (costs.compare_latency),
    so that their ratio is not skewed by load that differs between two moments of the run.
    Latency depends on the widths only: the unpruned one runs with freshly initialised weights."""
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    masks = jax.device_get(state.masks)
    # A surgered network (all gates 1) runs without gates: that is what deployment runs.
    gates = None if all(np.all(np.asarray(m) == 1) for m in masks.values()) else masks
    nets = {'current': (self.model, variables, gates)}
    if with_full:
      full = self.model.clone(widths=dict(self.full_widths))
      x = np.zeros((1,) + tuple(self.input_shape), np.float32)
      nets['full'] = (full, jax.jit(lambda: full.init(jax.random.key(0), x))(), None)
    out = {name: {} for name in nets}
    for b in (1, 64):
      lat = costs.compare_latency(nets, b, self.input_shape,
                                  repeats=self.config.report.latency_repeats,
                                  rounds=self.config.report.latency_rounds)
      for name in nets:
        out[name][f'latency_ms_b{b}'] = lat[name]['median']
    return out['current'], out.get('full')

  # -- training over a step range ----------------------------------------------------------------
  def batches_from(self, step: int):
    epoch, k = divmod(step, self.spe)
    while True:
      for local in self.train_split.batches(epoch, k):
        yield train.shard_batch(self.mesh, local)
      epoch, k = epoch + 1, 0


def _method_context(job: _Job, state, full_flops: int, full_params: int,
                    full_units: int) -> methods.MethodContext:
  """What a registered method gets from the job (see taylor_jax/methods/__init__.py)."""
  c = job.config
  target = engine.Target.from_config(c.prune)

  def costs_fn(model, masks):
    small = model.clone(widths=surgery.new_widths(model.widths, masks))
    shapes = jax.eval_shape(lambda: small.init(jax.random.key(0),
                                               np.zeros((1,) + job.input_shape, np.float32)))
    return {'flops': costs.flops(small, job.input_shape),
            'params': costs.count_params(shapes['params'])}

  def target_reached(model, masks):
    if target is None:
      return False
    cst = costs_fn(model, masks)
    return target.reached(full_units, methods.units_kept(model.groups(), masks),
                          cst['flops'] / full_flops, cst['params'] / full_params)

  def evaluate(model, host_state):
    if job.prune_eval_split is None:
      return None
    return train.evaluate(train.make_eval_step(model, job.mesh),
                          train.replicate(job.mesh, host_state), job.mesh,
                          job.prune_eval_split.batches(0))

  return methods.MethodContext(
      config=c, workdir=job.workdir, model=job.model, state=jax.device_get(state),
      full_widths=job.full_widths, constraints=job.constraints, input_shape=job.input_shape,
      num_classes=job.info.num_classes, steps_per_epoch=job.spe,
      train_size=job.train_split.num_examples, mesh=job.mesh, full_flops=full_flops,
      full_params=full_params, batches=job.batches_from, evaluate=evaluate, costs=costs_fn,
      target_reached=target_reached, log=lambda rec: _log_metrics(job.workdir, rec))


def _run_method(job: _Job, state, extra: dict[str, Any], full_flops: int, full_params: int,
                full_units: int):
  """The 'prune' phase of a registered method: one call, then on to 'finetune' as after the
  'taylor' engine (fresh optimizer, checkpoint). Returns the replicated fine-tuning state."""
  t0 = time.time()
  method = methods.get(job.config.prune.method)
  res = method.fn(_method_context(job, state, full_flops, full_params, full_units))
  widths = dict(res.model.widths)
  host = jax.device_get(res.state)
  # Normalise the per-unit bookkeeping to the new widths so the checkpoint restores from them.
  ones = {k: np.ones((w,), np.float32) for k, w in widths.items()}
  zeros = {k: np.zeros((w,), np.float32) for k, w in widths.items()}
  job.build(widths, 'finetune')
  host = host.replace(masks=ones, score_sum=zeros, score_ema=dict(zeros),
                      score_count=np.zeros((), np.int32),
                      prune_steps=np.asarray(len(res.history), np.int32),
                      opt_state=job.tx.init(host.params))
  for rec in res.history:
    _log_metrics(job.workdir, {'phase': 'prune_step', **rec})
  extra['history'].extend(res.history)
  extra['method'] = {'name': method.name, **res.extra}
  extra['prune_end_step'] = int(host.step)
  extra['prune_wall_s'] = time.time() - t0
  state = train.replicate(job.mesh, host)
  job.save(state, 'finetune', extra, force=True)
  return state


def _init_from_torchvision(job: _Job):
  """A fresh full-width state whose params + BN statistics come from train.init_torchvision."""
  from taylor_jax import convert  # noqa: deferred, torch is optional
  c, w = job.config, job.full_widths
  variables = convert.convert(c.model, c.train.init_torchvision, job.info.num_classes)
  job.build(w, 'baseline')
  # No model.init: un-jitted random initialisation of a full ImageNet model takes ~25 s on CPU.
  return train.create_train_state(variables, job.tx, widths=w)


def _check_groups_before_training(job: _Job, host_state, seed: int) -> None:
  """The groups the run will prune describe the model (checks.check_coverage) and surgery at
  random widths computes what masking computes (checks.probe_surgery); raises naming the group."""
  t0 = time.time()
  checks.check_coverage(job.model, job.input_shape)
  variables = {'params': host_state.params, 'batch_stats': host_state.batch_stats}
  diff = checks.probe_surgery(job.model, variables, job.input_shape, seed=seed)
  rec = {'phase': 'group_check', 'groups': len(job.groups),
         'prunable': sum(g.prunable for g in job.groups),
         'marked': [g.name for g in job.groups if g.marked],
         'kept_whole': {g.name: g.reason for g in job.groups if not g.prunable},
         'probe_max_rel_diff': diff, 'seconds': time.time() - t0}
  _log_metrics(job.workdir, rec)
  logging.info('groups checked: %s', rec)


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the main job in ``workdir``; returns the report dict.

  A resumed run's config must equal the saved one on every field that changes the result
  (configlib.result_changes) unless ``allow_config_change``; the changes are then recorded.
  """
  configlib.validate(config)
  c = config
  info = input_pipeline.dataset_info(c.dataset, c.data_dir, c.image_size)
  input_shape = tuple(info.image_shape)
  full_model = models.create(c.model, info.num_classes, input_shape=input_shape)
  full_flops = costs.flops(full_model, input_shape)
  full_params = costs.params(full_model, input_shape)
  if c.prune.enabled:  # refuse unreachable targets before any data is read or file written
    _check_align(full_model.groups(), dict(full_model.widths), c.prune.align)
    _check_target_feasible(c, full_model.groups(), dict(full_model.widths),
                           engine.Constraints(c.prune.min_width, c.prune.max_share, c.prune.align),
                           full_model, input_shape, full_flops, full_params)
  job = _Job(config, workdir)
  changes = {}

  def check_meta(meta):
    changes.clear()
    changes.update(_check_compatible(meta, c, workdir, allow_config_change))

  restored = checkpoint.restore_newest(
      job.mngr, lambda m: job.fresh_state(m['widths'], m['phase'], c.seed), check_meta)
  if restored is not None:
    if restored.damaged:
      moved = checkpoint.set_aside(job.mngr, workdir, [d[0] for d in restored.damaged])
      for (step, _, why), dest in zip(restored.damaged, moved):
        logging.warning('checkpoint step %d of %s does not restore: %s. Moved to %s (kept, not '
                        'deleted); resuming from step %d.', step, workdir, why, dest,
                        restored.step)
    meta = restored.meta
    phase, extra = meta['phase'], dict(meta.get('extra', {}))
    job.build(meta['widths'], phase)
    state = restored.state
    if changes:
      logging.warning('resuming %s at step %d under a changed config (--allow_config_change): %s',
                      workdir, restored.step, changes)
      extra['config_changes'] = extra.get('config_changes', []) + [
          {'step': restored.step, 'changes': {k: list(v) for k, v in changes.items()}}]
    logging.info('resumed %s at step %d (phase %s)', workdir, int(state.step), phase)
  else:
    extra = {'history': []}
    if c.train.init_checkpoint:
      init_mngr = checkpoint.manager(c.train.init_checkpoint)
      init = checkpoint.restore_newest(
          init_mngr, lambda m: job.fresh_state(m['widths'], 'baseline', c.seed),
          lambda m: _check_compatible(m, c, c.train.init_checkpoint, allow_change=True))
      if init is None:
        raise FileNotFoundError(f'train.init_checkpoint={c.train.init_checkpoint!r} holds no '
                                'checkpoint; run its config first')
      for step, _, why in init.damaged:
        logging.warning('train.init_checkpoint: checkpoint step %d does not restore (%s); '
                        'starting from step %d instead.', step, why, init.step)
      w = init.meta['widths']
      job.widths = w
      fresh = job.fresh_state(w, 'baseline', c.seed)
      state = fresh.replace(params=init.state.params, batch_stats=init.state.batch_stats)
      phase = 'baseline_done'
      job.build(w, 'baseline')
    elif c.train.get('init_torchvision'):
      state, phase = _init_from_torchvision(job), 'baseline_done'
    else:
      phase = 'baseline'
      job.build(job.full_widths, phase)
      state = job.fresh_state(job.full_widths, phase, c.seed)
  if c.prune.enabled and c.prune.method == methods.TAYLOR and phase in (
      'baseline', 'baseline_done', 'prune'):
    _check_estimator(job, state, c.prune.estimator)
  if c.prune.enabled and restored is None and c.prune.check_groups:
    _check_groups_before_training(job, jax.device_get(state), c.seed)
  state = train.replicate(job.mesh, state)
  full_units = sum(job.full_widths[g.name] for g in job.groups if g.prunable)

  bar = tqdm.tqdm(total=job.baseline_steps + job.finetune_steps, initial=int(state.step),
                  desc=phase, mininterval=5.0, disable=jax.process_index() != 0)
  log_every, ckpt_every = c.train.log_every_steps, c.train.checkpoint_every_steps

  def train_until(state, stop_step: int, phase: str, on_step=None):
    """Trains to ``stop_step`` (or until ``on_step`` returns a new phase); checkpoints."""
    it = job.batches_from(int(state.step))
    losses = []
    while int(state.step) < stop_step:
      state, metrics = job.train_step(state, next(it))
      step = int(state.step)
      # The loop waits for every step anyway (int(state.step)); a NaN is caught at its step,
      # before anything computed from it is saved.
      m = jax.device_get(metrics)
      if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])
              and m['params_finite']):
        lr = _lr_field(phase)
        section, field = lr.split('.')
        _stop_nonfinite(job, f'the training loss is {m["loss"]} (gradient norm {m["grad_norm"]}'
                             f'{"" if m["params_finite"] else ", weights not finite after it"})',
                        step, phase, f'Lower {lr} (now {c[section][field]}).')
      bar.update(1)
      losses.append(metrics)
      if step % log_every == 0:
        m = jax.device_get(losses)
        rec = {'step': step, 'phase': phase,
               'train_loss': float(np.mean([x['loss'] for x in m])),
               'train_accuracy': float(np.mean([x['accuracy'] for x in m])),
               'wall_s': time.time() - job.wall_start}
        _log_metrics(workdir, rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_accuracy']:.3f}")
        losses = []
      if on_step is not None:
        state, new_phase = on_step(state)
        if new_phase is not None:
          return state, new_phase
      if step % ckpt_every == 0:
        job.save(state, phase, extra)
    return state, None

  # -- baseline ------------------------------------------------------------------------------
  if phase == 'baseline':
    bar.set_description('baseline')
    state, _ = train_until(state, job.baseline_steps, 'baseline')
    phase = 'baseline_done'
  if phase == 'baseline_done':
    if 'baseline' not in extra:
      ev = job.evaluate(state, job.test_split)
      extra['baseline'] = {'test_accuracy': ev['accuracy'], 'test_loss': ev['loss'],
                           'test_top5_accuracy': ev['top5_accuracy'], **job.costs_of(state),
                           'step': int(state.step),
                           'wall_s': time.time() - job.wall_start}
      _log_metrics(workdir, {'step': int(state.step), 'phase': 'baseline_eval', **ev})
      logging.info('baseline: %s', extra['baseline'])
    phase = 'prune' if c.prune.enabled else 'done'
    extra['prune_start_step'] = int(state.step)
    if phase == 'prune':
      job.build(job.widths, 'prune')
      state = train.replicate(job.mesh, jax.device_get(state).replace(
          opt_state=job.tx.init(jax.device_get(state.params))))
    job.save(state, phase, extra, force=True)

  # -- a registered method's pruning (taylor_jax/methods) -------------------------------------------
  if phase == 'prune' and c.prune.method != methods.TAYLOR:
    bar.set_description(c.prune.method)
    state = _run_method(job, state, extra, full_flops, full_params, full_units)
    phase = 'finetune'

  # -- iterative pruning ---------------------------------------------------------------------------
  if phase == 'prune':
    bar.set_description('prune')
    freq = c.prune.frequency
    target = engine.Target.from_config(c.prune)
    t_prune = time.time()
    if c.prune.rank_by == 'score_per_latency' and 'latency_table' not in extra:
      # Measured once, before the first pruning step, and kept in the checkpoint metadata: a
      # resumed run ranks with the same table (timings differ from one measurement to the next).
      extra['latency_table'] = _latency_table(job)
      _log_metrics(workdir, {'phase': 'latency_table', 'table': extra['latency_table']})

    def on_step(state):
      if int(state.score_count) < freq:
        return state, None
      host = jax.device_get(state)
      masks = {k: np.asarray(v) for k, v in host.masks.items()}
      bad = [k for k, v in host.score_sum.items() if not np.all(np.isfinite(v))]
      if bad:
        _stop_nonfinite(job, f'estimator {c.prune.estimator!r} (prune.estimator) gave non-finite '
                             f'importance scores for group(s) {bad} in the pruning period ending',
                        int(host.step), 'prune',
                        f'(pruning step {int(host.prune_steps) + 1}; training losses were finite.) '
                        'Check the estimator for divisions by zero or overflow.')
      first = int(host.prune_steps) == 0
      ema = engine.period_mean_and_ema(host.score_sum, int(host.score_count), host.score_ema,
                                       masks, first, c.prune.ema_momentum, c.prune.normalize)
      # Surgery drops removed units from widths and masks, so live units == sum of masks.
      kept = sum(int(masks[g.name].sum()) for g in job.groups if g.prunable)
      n = target.units_this_step(c.prune.prune_per_iteration, full_units, kept)
      new_masks = engine.prune_lowest(
          ema, masks, job.groups, job.full_widths, n, job.constraints,
          excess=_target_excess(target, job.model, job.input_shape, full_flops, full_params),
          tolerance=c.prune.target_tolerance, unit_cost=_unit_cost(c, job, masks, extra))
      host = host.replace(masks={k: np.asarray(v) for k, v in new_masks.items()},
                          score_ema={k: np.asarray(v) for k, v in ema.items()},
                          score_sum=jax.device_get(train.zeros_like_masks(new_masks)),
                          score_count=np.zeros((), np.int32),
                          prune_steps=host.prune_steps + 1)
      cst = job.costs_of(host)
      rec = {'prune_step': int(host.prune_steps), 'step': int(host.step),
             'units_kept': int(sum(int(np.asarray(new_masks[g.name]).sum())
                                   for g in job.groups if g.prunable)),
             'flops': cst['flops'], 'params': cst['params'],
             'flops_ratio': cst['flops'] / full_flops, 'params_ratio': cst['params'] / full_params,
             'wall_s': time.time() - job.wall_start}
      done = (target.reached(full_units, rec['units_kept'], rec['flops_ratio'],
                             rec['params_ratio'])
              or int(host.prune_steps) >= c.prune.max_pruning_iterations)
      if c.prune.surgery and (int(host.prune_steps) % c.prune.surgery_every == 0 or done):
        new_model, host = surgery.shrink_train_state(host, job.model, job.tx)
        job.build(new_model.widths, 'prune')
      if job.prune_eval_split is not None:
        ev = train.evaluate(job.eval_step, host, job.mesh, job.prune_eval_split.batches(0))
        rec['eval_accuracy'], rec['eval_loss'] = ev['accuracy'], ev['loss']
      extra['history'].append(rec)
      _log_metrics(workdir, {'phase': 'prune_step', **rec})
      new_state = train.replicate(job.mesh, host)
      if done:
        extra['prune_end_step'] = int(host.step)
        return new_state, 'finetune'
      job.save(new_state, 'prune', extra)
      return new_state, None

    state, new_phase = train_until(state, 2**62, 'prune', on_step)
    extra['prune_wall_s'] = time.time() - t_prune
    phase = 'finetune'
    job.build(job.widths, 'finetune')
    host = jax.device_get(state)
    state = train.replicate(job.mesh, host.replace(opt_state=job.tx.init(host.params)))
    job.save(state, phase, extra, force=True)

  # -- fine-tuning --------------------------------------------------------------------------------
  if phase == 'finetune':
    bar.set_description('finetune')
    t_finetune = time.time()
    state, _ = train_until(state, extra['prune_end_step'] + job.finetune_steps, 'finetune')
    extra['finetune_wall_s'] = time.time() - t_finetune
    phase = 'done'
    job.save(state, phase, extra, force=True)
  bar.close()
  job.mngr.wait_until_finished()

  # -- report -------------------------------------------------------------------------------------
  ev = job.evaluate(state, job.test_split)
  latency, full_latency = job.latencies(state, with_full=c.prune.enabled)
  final = {'test_accuracy': ev['accuracy'], 'test_loss': ev['loss'],
           'test_top5_accuracy': ev['top5_accuracy'], **job.costs_of(state),
           **latency, 'step': int(state.step), 'widths': job.widths}
  _log_metrics(workdir, {'step': int(state.step), 'phase': 'final_eval', **ev})
  result = {'baseline': extra.get('baseline', final)}
  if c.prune.enabled:
    # Baseline latency: the unpruned architecture, timed in turn with the pruned one just now.
    result['baseline'] = {**result['baseline'], **full_latency}
    result['pruned'] = final
    result['history'] = extra['history']
    # Wall time of the phases as run by the processes that ran them (a resumed run counts the
    # time after its restart only).
    result['timing'] = {k: extra[k] for k in ('prune_wall_s', 'finetune_wall_s') if k in extra}
    if 'method' in extra:
      result['method'] = extra['method']
    if 'latency_table' in extra:
      result['latency_table'] = extra['latency_table']
  result['config'] = json.loads(c.to_json_best_effort())
  if 'config_changes' in extra:  # resumed under --allow_config_change: the saved values differ
    result['config_changes'] = extra['config_changes']
  result['wall_s_this_process'] = time.time() - job.wall_start
  if jax.process_index() == 0:
    report.write(workdir, result)
  return result


def restore(workdir: str):
  """Rebuilds the (possibly pruned) model saved in ``workdir`` in a fresh process.

  Returns ``(model, state, meta)`` of the newest checkpoint that restores (a damaged newer one
  is named in a warning and left in place); the widths come from the checkpoint's metadata, so
  the user supplies no shapes.
  """
  mngr = checkpoint.manager(workdir, async_save=False)

  def model_of(meta):
    return models.create(meta['model'], meta['num_classes'], meta['widths'],
                         input_shape=meta['input_shape'])

  def template(meta):
    input_shape = tuple(meta['input_shape'])
    variables = model_of(meta).init(jax.random.key(0),
                                    np.zeros((1,) + input_shape, np.float32))
    optim = ml_collections.ConfigDict(dict(meta['config'])['optim'])
    if meta['phase'] != 'baseline':
      optim.schedule = 'constant'
    tx = train.create_optimizer(optim, 1, 1)
    return train.create_train_state(variables, tx, widths=meta['widths'])

  restored = checkpoint.restore_newest(mngr, template)
  if restored is None:
    raise FileNotFoundError(f'{workdir} holds no checkpoint (expected {workdir}/checkpoints)')
  for step, _, why in restored.damaged:
    logging.warning('checkpoint step %d of %s does not restore (%s); using step %d instead.',
                    step, workdir, why, restored.step)
  return model_of(restored.meta), restored.state, restored.meta


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the workdir's model (pruned or not) and evaluates it on the test split."""
  configlib.check_devices(config)  # the eval batch comes from the command line's config
  model, state, meta = restore(workdir)
  c = ml_collections.ConfigDict(meta['config'])
  mesh = train.create_mesh()
  split = input_pipeline.create_split(c.dataset, 'test', batch_size=config.train.eval_batch_size,
                                      train=False, seed=c.seed, data_dir=config.data_dir,
                                      image_size=c.image_size,
                                      limit=c.train.get('limit_eval_examples'),
                                      mean=meta.get('data_mean'), std=meta.get('data_std'))
  state = train.replicate(mesh, state)
  ev = train.evaluate(train.make_eval_step(model, mesh), state, mesh, split.batches(0))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return {'restored': {'test_accuracy': ev['accuracy'], 'test_loss': ev['loss'],
                       'test_top5_accuracy': ev['top5_accuracy'],
                       'params': costs.count_params(state.params),
                       'flops': costs.flops(model, tuple(meta['input_shape'])),
                       'widths': meta['widths'], 'phase': meta['phase'],
                       'step': int(state.step)}}


def summary(result: dict[str, Any]) -> str:
  lines = []
  for key in ('baseline', 'pruned', 'restored'):
    if key in result:
      r = result[key]
      lines.append(f"{key:9s} test_accuracy={r['test_accuracy']:.4f} params={r['params']:,} "
                   f"flops={r['flops']:,}" +
                   (f" latency_ms_b64={r['latency_ms_b64']:.2f}" if 'latency_ms_b64' in r else ''))
  return '\n'.join(lines)
