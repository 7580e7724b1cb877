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

import dataclasses
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
from taylor_jax import pruner, report
from taylor_jax import surgery
from taylor_jax import train
from taylor_jax.data import input_pipeline
from taylor_jax.models import common as model_common

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
  unit (engine.Constraints), i.e. its widths would not be aligned at all. Attention heads are not
  aligned (engine.Constraints.align_of)."""
  narrow = [(g.name, full_widths[g.name]) for g in groups
            if g.prunable and g.kind != 'heads' and full_widths[g.name] < align]
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


def _latency_table(job) -> dict[str, dict[str, float]]:
  """``{group: {str(width): ms}}`` (JSON keys) of the current model, batch-64 latency with one
  group at a time at each width up to its current one that the constraints let it reach
  (costs.latency_table)."""
  grid = {g.name: [w for w in engine.width_grid(job.full_widths[g.name], job.constraints,
                                                align=job.constraints.align_of(g),
                                                max_share=job.constraints.max_share_of(g))
                   if w <= job.widths[g.name]]
          for g in job.groups if g.prunable}
  rep = job.config.report
  table = costs.latency_table(job.model, job.input_shape, grid, batch_size=64,
                              repeats=rep.latency_repeats, rounds=rep.latency_rounds)
  return {k: {str(w): ms for w, ms in t.items()} for k, t in table.items()}


def _unit_cost(job, masks) -> Optional[engine.UnitCost]:
  """What ``engine.prune_lowest`` divides scores by under ``prune.rank_by`` (None: plain
  scores): FLOPs (MACs) one unit of each group saves now, or the milliseconds a chunk saves
  according to the latency table (floored at a millionth of the network's latency per unit,
  so chunks that save nothing go last rather than never)."""
  rank_by = job.config.prune.rank_by
  if rank_by == 'score':
    return None
  if rank_by == 'score_per_flop':
    return pruner.flops_unit_cost(job.model, job.input_shape, masks)
  table = {k: {int(w): ms for w, ms in t.items()} for k, t in job.record.latency_table.items()}
  whole = max(max(t.values()) for t in table.values())
  floor = 1e-6 * whole
  return lambda name, width, chunk: max(
      costs.interpolate(table[name], width) - costs.interpolate(table[name], width - chunk),
      chunk * floor)


def _full_size(config) -> tuple[pruner.FullSize, tuple[int, ...]]:
  """The unpruned network's size, and the input shape; refuses, before any data is read or file
  written, targets the constraints cannot reach."""
  c = config
  info = input_pipeline.dataset_info(c.dataset, c.data_dir, c.image_size)
  input_shape = tuple(info.image_shape)
  full_model = models.create(c.model, info.num_classes, input_shape=input_shape)
  target = engine.Target.from_config(c.prune)
  if c.prune.enabled:
    _check_align(full_model.groups(), dict(full_model.widths), c.prune.align)
  if c.prune.enabled and target is not None:
    try:
      pruner.check_target_feasible(
          target, full_model, input_shape,
          engine.Constraints.from_config(c.prune))
    except ValueError as e:
      raise ValueError(f'invalid config: {e} (prune.target_*, prune.min_width, '
                       'prune.max_share, prune.align)') from None
  return pruner.FullSize.of(full_model, input_shape), input_shape


@dataclasses.dataclass
class RunRecord:
  """What the run has done so far: saved (as JSON) with every checkpoint, read by the report.

  ``history``: one record per pruning step; ``baseline``: test metrics and size before pruning;
  ``prune_start_step`` / ``prune_end_step``: global steps; ``*_wall_s``: wall time of a phase in
  the process that ran it; ``method``: a registered method's own results; ``latency_table``:
  ``rank_by='score_per_latency'``'s measurements (kept so a resumed run ranks with them);
  ``config_changes``: fields changed on resume under ``--allow_config_change``.
  """
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  baseline: Optional[dict[str, Any]] = None
  prune_start_step: Optional[int] = None
  prune_end_step: Optional[int] = None
  prune_wall_s: Optional[float] = None
  finetune_wall_s: Optional[float] = None
  method: Optional[dict[str, Any]] = None
  latency_table: Optional[dict[str, dict[str, float]]] = None
  config_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> 'RunRecord':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
      raise IncompatibleCheckpointError(
          f'the checkpoint\'s run record has fields this version does not know: {unknown}')
    return cls(**saved)


class _Job:
  """State of one run of the main job; methods are its phases."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, full: pruner.FullSize):
    self.config, self.workdir, self.full = config, workdir, full
    self.record = RunRecord()
    self.step = 0  # the global step, counted on the host (set by _start)
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
    self.constraints = engine.Constraints.from_config(c.prune)
    self.target = engine.Target.from_config(c.prune)
    self.schedule = pruner.Schedule.from_config(c.prune) if c.prune.enabled else None
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
        self.model, self.tx, self.mesh, self.estimator if phase == 'prune' else None, self.groups,
        dropout_seed=self.config.seed)
    self.eval_step = train.make_eval_step(self.model, self.mesh)

  def fresh_state(self, widths, phase: str, seed: int):
    model = models.create(self.config.model, self.info.num_classes, widths,
                          input_shape=self.input_shape)
    # one program (eager init compiles every initializer op on its own: 12 s for ResNet-8)
    variables = model_common.run_once(model.init, jax.random.key(seed),
                                      np.zeros((1,) + self.input_shape, np.float32))
    return train.create_train_state(variables, self.tx_for(phase), widths=widths)

  def meta(self, phase: str) -> dict[str, Any]:
    return {'phase': phase, 'widths': self.widths, 'num_classes': self.info.num_classes,
            'model': self.config.model, 'input_shape': list(self.input_shape),
            'config': json.loads(self.config.to_json_best_effort()),
            'record': self.record.to_json(),
            # The normalisation trained with (a user dataset's: from its training images), so that
            # evaluate_workdir normalises the test images the same way.
            'data_mean': list(self.train_split.mean), 'data_std': list(self.train_split.std)}

  def save(self, state, phase: str, force: bool = False) -> None:
    if force:
      # A phase boundary that took no step (SNIP, 0 fine-tuning epochs, ...) lands on the step of
      # the previous checkpoint, and orbax refuses two saves at one step: the new one replaces it
      # (killed in between, the run resumes from the one before and redoes the phase).
      self.mngr.wait_until_finished()
      if self.step in self.mngr.all_steps():
        self.mngr.delete(self.step)
    checkpoint.save(self.mngr, self.step, state, self.meta(phase), force=force)

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
      nets['full'] = (full, model_common.run_once(full.init, jax.random.key(0), x), None)
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


def _method_context(job: _Job, state) -> methods.MethodContext:
  """What a registered method gets from the job (see taylor_jax/methods/__init__.py)."""
  c, full = job.config, job.full

  def costs_fn(model, masks):
    small = model.clone(widths=surgery.new_widths(model.widths, masks))
    shapes = jax.eval_shape(lambda: small.init(jax.random.key(0),
                                               np.zeros((1,) + job.input_shape, np.float32)))
    return {'flops': costs.flops(small, job.input_shape),
            'params': costs.count_params(shapes['params'])}

  def target_reached(model, masks):
    if job.target is None:
      return False
    cst = costs_fn(model, masks)
    return job.target.reached(full.units, methods.units_kept(model.groups(), masks),
                              cst['flops'] / full.flops, cst['params'] / full.params)

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
      train_size=job.train_split.num_examples, mesh=job.mesh, full_flops=full.flops,
      full_params=full.params, batches=job.batches_from, evaluate=evaluate, costs=costs_fn,
      target_reached=target_reached, log=lambda rec: _log_metrics(job.workdir, rec))


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
  checks.check_runs_narrower(job.model, job.input_shape)
  variables = {'params': host_state.params, 'batch_stats': host_state.batch_stats}
  diff = checks.probe_surgery(job.model, variables, job.input_shape, seed=seed)
  rec = {'phase': 'group_check', 'groups': len(job.groups),
         'prunable': sum(g.prunable for g in job.groups),
         'marked': [g.name for g in job.groups if g.marked],
         'kept_whole': {g.name: g.reason for g in job.groups if not g.prunable},
         'probe_max_rel_diff': diff, 'seconds': time.time() - t0}
  _log_metrics(job.workdir, rec)
  logging.info('groups checked: %s', rec)


# --- start: resume or begin ------------------------------------------------------------------------

def _resume(job: _Job, allow_config_change: bool):
  """``(state, phase)`` of the workdir's newest checkpoint that restores, or None."""
  c, changes = job.config, {}

  def check_meta(meta):
    changes.clear()
    changes.update(_check_compatible(meta, c, job.workdir, allow_config_change))

  restored = checkpoint.restore_newest(
      job.mngr, lambda m: job.fresh_state(m['widths'], m['phase'], c.seed), check_meta)
  if restored is None:
    return None
  if restored.damaged:
    moved = checkpoint.set_aside(job.mngr, job.workdir, [d[0] for d in restored.damaged])
    for (step, _, why), dest in zip(restored.damaged, moved):
      logging.warning('checkpoint step %d of %s does not restore: %s. Moved to %s (kept, not '
                      'deleted); resuming from step %d.', step, job.workdir, why, dest,
                      restored.step)
  meta = restored.meta
  # 'extra': the untyped record of checkpoints written before RunRecord.
  job.record = RunRecord.from_json(meta.get('record', meta.get('extra', {})))
  job.build(meta['widths'], meta['phase'])
  if changes:
    logging.warning('resuming %s at step %d under a changed config (--allow_config_change): %s',
                    job.workdir, restored.step, changes)
    job.record.config_changes.append(
        {'step': restored.step, 'changes': {k: list(v) for k, v in changes.items()}})
  logging.info('resumed %s at step %d (phase %s)', job.workdir, restored.step, meta['phase'])
  return restored.state, meta['phase']


def _from_init_checkpoint(job: _Job):
  """The baseline of ``train.init_checkpoint`` (another workdir's run) as this run's baseline."""
  c = job.config
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
  job.build(w, 'baseline')
  return fresh.replace(params=init.state.params, batch_stats=init.state.batch_stats)


def _start(job: _Job, allow_config_change: bool):
  """``(replicated state, phase)``: resumed from the workdir, or a new run (from scratch, another
  run's baseline or torchvision weights), checked before its first step."""
  c = job.config
  resumed = _resume(job, allow_config_change)
  if resumed is not None:
    state, phase = resumed
  else:
    job.record = RunRecord()
    if c.train.init_checkpoint:
      state, phase = _from_init_checkpoint(job), 'baseline_done'
    elif c.train.get('init_torchvision'):
      state, phase = _init_from_torchvision(job), 'baseline_done'
    else:
      phase = 'baseline'
      job.build(job.full_widths, phase)
      state = job.fresh_state(job.full_widths, phase, c.seed)
  if c.prune.enabled and c.prune.method == methods.TAYLOR and phase in (
      'baseline', 'baseline_done', 'prune'):
    _check_estimator(job, state, c.prune.estimator)
  if c.prune.enabled and resumed is None and c.prune.check_groups:
    _check_groups_before_training(job, jax.device_get(state), c.seed)
  job.step = int(jax.device_get(state.step))  # the host's step counter from here on
  return train.replicate(job.mesh, state), phase


# --- training over a step range -------------------------------------------------------------------

def _check_finite(job: _Job, window: list, phase: str) -> None:
  """Stops the run at the first step of ``window`` (``(step, metrics)`` not yet checked) whose
  loss, gradient or weights are not finite; nothing after the last checkpoint is saved."""
  for step, m in zip([s for s, _ in window], jax.device_get([m for _, m in window])):
    if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])
            and m['params_finite']):
      lr = _lr_field(phase)
      section, field = lr.split('.')
      _stop_nonfinite(job, f'the training loss is {m["loss"]} (gradient norm {m["grad_norm"]}'
                           f'{"" if m["params_finite"] else ", weights not finite after it"})',
                      step, phase, f'Lower {lr} (now {job.config[section][field]}).')


def _log_train(job: _Job, window: list, phase: str) -> None:
  m = jax.device_get([x for _, x in window])
  rec = {'step': job.step, 'phase': phase,
         'train_loss': float(np.mean([x['loss'] for x in m])),
         'train_accuracy': float(np.mean([x['accuracy'] for x in m])),
         'wall_s': time.time() - job.wall_start}
  _log_metrics(job.workdir, rec)
  job.bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['train_accuracy']:.3f}")


def _train(job: _Job, state, stop_step: int, phase: str, on_period=None, period: int = 0):
  """Trains from ``job.step`` to ``stop_step``, checkpointing every ``checkpoint_every_steps``.

  The host counts steps (no device read per step); losses are checked for NaN before every log
  record, pruning step and checkpoint, and the first bad step is named. With ``on_period``
  (``state -> (state, finished)``), it runs after every ``prune.frequency``-th step (``period``:
  steps of the current period already taken) and training stops once it says finished."""
  c = job.config.train
  it = job.batches_from(job.step)
  window, unchecked = [], 0  # (step, metrics) since the last log; how many not yet checked
  curve_every = max(1, round(c.eval_every_epochs * job.spe)) if c.eval_every_epochs else 0

  def check():
    nonlocal unchecked
    _check_finite(job, window[len(window) - unchecked:], phase)
    unchecked = 0

  while job.step < stop_step:
    state, metrics = job.train_step(state, next(it))
    job.step += 1
    job.bar.update(1)
    window.append((job.step, metrics))
    unchecked += 1
    if job.step % c.log_every_steps == 0:
      check()
      _log_train(job, window, phase)
      window = []
    if on_period is not None:
      period += 1
      if period == job.schedule.frequency:
        check()
        period = 0
        state, finished = on_period(state)
        if finished:
          return state
    if curve_every and job.step % curve_every == 0:
      check()
      _log_curve_point(job, state, phase)
    if job.step % c.checkpoint_every_steps == 0:
      check()
      job.save(state, phase)
  check()
  return state


def _log_curve_point(job: _Job, state, phase: str) -> None:
  """One point of the learning curve (``train.eval_every_epochs``): the whole test split;
  ``epoch`` counts from the start of the run (steps / steps per epoch)."""
  ev = job.evaluate(state, job.test_split)
  _log_metrics(job.workdir, {'step': job.step, 'phase': f'{phase}_curve',
                             'epoch': job.step / job.spe, 'test_accuracy': ev['accuracy'],
                             'test_loss': ev['loss'], 'wall_s': time.time() - job.wall_start})


# --- phases ---------------------------------------------------------------------------------------

def _end_baseline(job: _Job, state):
  """Evaluates the baseline (once) and moves on to pruning (fresh optimizer) or to the end."""
  c = job.config
  if job.record.baseline is None:
    ev = job.evaluate(state, job.test_split)
    job.record.baseline = {'test_accuracy': ev['accuracy'], 'test_loss': ev['loss'],
                           'test_top5_accuracy': ev['top5_accuracy'], **job.costs_of(state),
                           'step': job.step, 'wall_s': time.time() - job.wall_start}
    _log_metrics(job.workdir, {'step': job.step, 'phase': 'baseline_eval', **ev})
    logging.info('baseline: %s', job.record.baseline)
  phase = 'prune' if c.prune.enabled else 'done'
  job.record.prune_start_step = job.step
  if phase == 'prune':
    job.build(job.widths, 'prune')
    state = train.replicate(job.mesh, jax.device_get(state).replace(
        opt_state=job.tx.init(jax.device_get(state.params))))
  job.save(state, phase, force=True)
  return state, phase


def _prune_step(job: _Job, state):
  """One pruning step of the paper's schedule (pruner.prune_period) on the train state: new
  masks, surgery, a history record. Returns ``(replicated state, target reached)``."""
  c = job.config
  host = jax.device_get(state)
  masks = {k: np.asarray(v) for k, v in host.masks.items()}
  bad = [k for k, v in host.score_sum.items() if not np.all(np.isfinite(v))]
  if bad:
    _stop_nonfinite(job, f'estimator {c.prune.estimator!r} (prune.estimator) gave non-finite '
                         f'importance scores for group(s) {bad} in the pruning period ending',
                    job.step, 'prune',
                    f'(pruning step {int(host.prune_steps) + 1}; training losses were finite.) '
                    'Check the estimator for divisions by zero or overflow.')
  ema, new_masks = pruner.prune_period(
      job.model, job.input_shape, masks, host.score_sum, int(host.score_count), host.score_ema,
      first=int(host.prune_steps) == 0, target=job.target, schedule=job.schedule,
      full=job.full, unit_cost=_unit_cost(job, masks))
  host = host.replace(masks={k: np.asarray(v) for k, v in new_masks.items()},
                      score_ema={k: np.asarray(v) for k, v in ema.items()},
                      score_sum=jax.device_get(train.zeros_like_masks(new_masks)),
                      score_count=np.zeros((), np.int32), prune_steps=host.prune_steps + 1)
  cst = job.costs_of(host)
  rec = {'prune_step': int(host.prune_steps), 'step': job.step,
         'units_kept': pruner.units_kept(job.groups, new_masks),
         'flops': cst['flops'], 'params': cst['params'],
         'flops_ratio': cst['flops'] / job.full.flops, 'params_ratio': cst['params'] / job.full.params,
         'widths': surgery.new_widths(job.widths, new_masks),  # which groups lost units
         'wall_s': time.time() - job.wall_start}
  done = (job.target.reached(job.full.units, rec['units_kept'], rec['flops_ratio'],
                             rec['params_ratio'])
          or int(host.prune_steps) >= c.prune.max_pruning_iterations)
  if c.prune.surgery and (int(host.prune_steps) % c.prune.surgery_every == 0 or done):
    new_model, host = surgery.shrink_train_state(host, job.model, job.tx)
    job.build(new_model.widths, 'prune')
  if job.prune_eval_split is not None:
    ev = train.evaluate(job.eval_step, host, job.mesh, job.prune_eval_split.batches(0))
    rec['eval_accuracy'], rec['eval_loss'] = ev['accuracy'], ev['loss']
  job.record.history.append(rec)
  _log_metrics(job.workdir, {'phase': 'prune_step', **rec})
  return train.replicate(job.mesh, host), done


def _prune_taylor(job: _Job, state):
  """The 'prune' phase of the paper: SGD with scores accumulated in the step; every
  ``prune.frequency`` steps a pruning step, until the target. Returns the fine-tuning state."""
  c = job.config
  t0 = time.time()
  if c.prune.rank_by == 'score_per_latency' and job.record.latency_table is None:
    # Measured once, before the first pruning step, and kept in the checkpoint metadata: a
    # resumed run ranks with the same table (timings differ from one measurement to the next).
    job.record.latency_table = _latency_table(job)
    _log_metrics(job.workdir, {'phase': 'latency_table', 'table': job.record.latency_table})

  def on_period(state):
    state, done = _prune_step(job, state)
    if done:
      job.record.prune_end_step = job.step
    else:
      job.save(state, 'prune')
    return state, done

  # A resumed run continues the period its checkpoint was in.
  state = _train(job, state, 2**62, 'prune', on_period,
                 period=int(jax.device_get(state.score_count)))
  job.record.prune_wall_s = time.time() - t0
  job.build(job.widths, 'finetune')
  host = jax.device_get(state)
  state = train.replicate(job.mesh, host.replace(opt_state=job.tx.init(host.params)))
  job.save(state, 'finetune', force=True)
  return state


def _run_method(job: _Job, state):
  """The 'prune' phase of a registered method: one call, then on to 'finetune' as after the
  'taylor' engine (fresh optimizer, checkpoint). Returns the replicated fine-tuning state."""
  t0 = time.time()
  method = methods.get(job.config.prune.method)
  res = method.fn(_method_context(job, state))
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
  job.record.history.extend(res.history)
  job.record.method = {'name': method.name, **res.extra}
  job.step = int(host.step)
  job.record.prune_end_step = job.step
  job.record.prune_wall_s = time.time() - t0
  state = train.replicate(job.mesh, host)
  job.save(state, 'finetune', force=True)
  return state


def _finetune(job: _Job, state):
  t0 = time.time()
  state = _train(job, state, job.record.prune_end_step + job.finetune_steps, 'finetune')
  job.record.finetune_wall_s = time.time() - t0
  job.save(state, 'done', force=True)
  return state


def _report(job: _Job, state) -> dict[str, Any]:
  """Final evaluation, sizes and latencies; writes report.{json,md} and the plot."""
  c, rec = job.config, job.record
  ev = job.evaluate(state, job.test_split)
  latency, full_latency = job.latencies(state, with_full=c.prune.enabled)
  final = {'test_accuracy': ev['accuracy'], 'test_loss': ev['loss'],
           'test_top5_accuracy': ev['top5_accuracy'], **job.costs_of(state),
           **latency, 'step': job.step, 'widths': job.widths}
  _log_metrics(job.workdir, {'step': job.step, 'phase': 'final_eval', **ev})
  result = {'baseline': rec.baseline or final}
  if c.prune.enabled:
    # Baseline latency: the unpruned architecture, timed in turn with the pruned one just now.
    result['baseline'] = {**result['baseline'], **full_latency}
    result['pruned'] = final
    result['history'] = rec.history
    # Wall time of the phases as run by the processes that ran them (a resumed run counts the
    # time after its restart only).
    result['timing'] = {k: getattr(rec, k) for k in ('prune_wall_s', 'finetune_wall_s')
                        if getattr(rec, k) is not None}
    if rec.method is not None:
      result['method'] = rec.method
    if rec.latency_table is not None:
      result['latency_table'] = rec.latency_table
  result['config'] = json.loads(c.to_json_best_effort())
  if rec.config_changes:  # resumed under --allow_config_change: the saved values differ
    result['config_changes'] = rec.config_changes
  result['wall_s_this_process'] = time.time() - job.wall_start
  if jax.process_index() == 0:
    report.write(job.workdir, result)
  return result


def run(config: ml_collections.ConfigDict, workdir: str,
        allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the main job in ``workdir``; returns the report dict.

  Phases, each ending in a checkpoint: 'baseline' -> 'baseline_done' -> 'prune' -> 'finetune'
  -> 'done' -> report. A resumed run's config must equal the saved one on every field that
  changes the result (configlib.result_changes) unless ``allow_config_change``; the changes are
  then recorded.
  """
  configlib.validate(config)
  full, _ = _full_size(config)
  job = _Job(config, workdir, full)
  state, phase = _start(job, allow_config_change)
  # The pruning phase's length is unknown until its target is reached: not in the total.
  job.bar = tqdm.tqdm(total=job.baseline_steps + (job.finetune_steps if config.prune.enabled
                                                  else 0), initial=job.step,
                      desc=phase, mininterval=5.0, disable=jax.process_index() != 0)
  if phase == 'baseline':
    state = _train(job, state, job.baseline_steps, 'baseline')
    phase = 'baseline_done'
  if phase == 'baseline_done':
    state, phase = _end_baseline(job, state)
  if phase == 'prune':
    job.bar.set_description(config.prune.method)
    state = (_prune_taylor if config.prune.method == methods.TAYLOR else _run_method)(job, state)
    phase = 'finetune'
  if phase == 'finetune':
    job.bar.set_description('finetune')
    state = _finetune(job, state)
  job.bar.close()
  job.mngr.wait_until_finished()
  return _report(job, state)


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
    variables = model_common.run_once(model_of(meta).init, jax.random.key(0),
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
