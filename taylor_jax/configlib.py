"""Defaults every experiment config starts from, and the validation run before any work starts.

A config file under ``configs/`` calls :func:`base_config` and overrides fields; the command
line overrides further (``--config.train.epochs=3``). :func:`validate` raises a ValueError that
names the field, the bad value and what to use instead. :func:`result_changes` says which
fields of a resumed run's saved config differ from the new one in a way that changes the result.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'resnet20'
  # 'fashion_mnist' | 'cifar10' | 'imagenet2012' | 'synthetic', or your own arrays: a .npz path,
  # a directory of .npy files or 'package.module:function' (taylor_jax/data/user_data.py)
  c.dataset = 'fashion_mnist'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir (None: default)
  c.image_size = ml_collections.FieldReference(None, field_type=int)  # None: dataset's own
  # Per-channel normalisation (one value or one per channel; uint8 pixels count as /255).
  # None: the dataset's own (your own data's: computed from its training images).
  c.data_mean = ml_collections.FieldReference(None, field_type=tuple)
  c.data_std = ml_collections.FieldReference(None, field_type=tuple)
  c.seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global, split over all devices
  c.train.epochs = 10.0  # baseline training (0: start from init_checkpoint or untrained)
  c.train.augment = True
  c.train.crop_pad = 4  # pad-and-random-crop of 28/32 px images (0: flip only)
  c.train.limit_examples = ml_collections.FieldReference(None, field_type=int)  # smoke runs
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  # Test-set evaluation every this many epochs of any training phase, logged to metrics.jsonl
  # as '<phase>_curve' records (learning curves); 0: only at the end of the baseline and run.
  c.train.eval_every_epochs = 0.0
  c.train.eval_batch_size = 500
  c.train.limit_eval_examples = ml_collections.FieldReference(None, field_type=int)
  c.train.init_checkpoint = ml_collections.FieldReference(None, field_type=str)  # a workdir
  # A torchvision state dict (.pth, or .npz from taylor_jax.convert) to start from instead of a
  # baseline: the full-width model's params + BN statistics (taylor_jax/convert.py).
  c.train.init_torchvision = ml_collections.FieldReference(None, field_type=str)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.0
  c.optim.decay_epochs = (10, 20)
  c.optim.decay_factor = 0.1

  c.prune = ml_collections.ConfigDict()
  c.prune.enabled = False
  # 'taylor': iterative pruning by prune.estimator (run.py); others: taylor_jax/methods/, each
  # with its options under c.prune.<method name> (added below).
  c.prune.method = 'taylor'
  c.prune.estimator = 'taylor_fo_bn'
  c.prune.estimator_options = ml_collections.ConfigDict()
  c.prune.frequency = 30  # minibatches per pruning step
  c.prune.prune_per_iteration = 100  # units removed per pruning step
  # Target: exactly one of these is used, in this order of precedence when several are set.
  c.prune.target_flops_reduction = ml_collections.FieldReference(None, field_type=float)
  c.prune.target_params_reduction = ml_collections.FieldReference(None, field_type=float)
  c.prune.target_keep_share = ml_collections.FieldReference(None, field_type=float)
  c.prune.target_units = ml_collections.FieldReference(None, field_type=int)
  # FLOPs/params targets: the last step may overshoot by at most this share of the full cost
  # when some chunk allows it (taylor_jax.engine.prune_lowest); aligned chunks are coarse.
  c.prune.target_tolerance = 0.05
  c.prune.max_pruning_iterations = 1000
  c.prune.ema_momentum = 0.9
  c.prune.normalize = 'none'  # 'none' | 'l2' (per-group L2 normalisation of period means)
  c.prune.min_width = 1
  c.prune.max_share = 1.0
  c.prune.max_share_per_group = ''  # e.g. 'stage1=0.2,stage3.*=0.5': overrides max_share
  c.prune.align = 1
  # Ranking: 'score' (the paper: lowest importance first), 'score_per_flop' / 'score_per_latency'
  # (importance per MAC / per millisecond a unit saves; latency from a table measured on this
  # machine before the first pruning step, engine.py).
  c.prune.rank_by = 'score'
  c.prune.scope = 'global'  # 'global' (the paper) | 'local': every group loses the same share
  c.prune.surgery = True  # physically shrink the network (False: mask only, as the reference)
  # Before the first step: the groups cover the model and surgery == masking at random widths;
  # at every surgery: the smaller network runs the same primitives (taylor_jax/checks.py).
  c.prune.check_groups = True
  c.prune.surgery_every = 1  # pruning steps between surgeries
  c.prune.learning_rate = 0.01  # constant SGD lr while pruning
  c.prune.eval_examples = 2000  # test examples evaluated after each pruning step (0: none)
  c.prune.finetune_epochs = 2.0
  c.prune.finetune_learning_rate = 0.02  # cosine from here during fine-tuning
  # 'step': x optim.decay_factor at each of optim.decay_epochs (counted from the fine-tuning start)
  c.prune.finetune_schedule = 'cosine'

  _add_method_options(c.prune)

  c.report = ml_collections.ConfigDict()
  c.report.latency_repeats = 20
  c.report.latency_rounds = 5  # rounds over the nets compared; the least disturbed round counts

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # jax.distributed.initialize before anything else
  c.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  c.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
  c.distributed.process_id = ml_collections.FieldReference(None, field_type=int)
  return c


def _add_method_options(prune: ml_collections.ConfigDict) -> None:
  """``prune.<method>`` = that registered method's option defaults (see taylor_jax/methods)."""
  from taylor_jax import methods  # noqa: deferred: registers the method modules
  for name, options in methods.default_options().items():
    section = ml_collections.ConfigDict()
    for key, value in options.items():
      section[key] = (ml_collections.FieldReference(None, field_type=float) if value is None
                      else value)
    prune[name] = section


RANK_BY = ('score', 'score_per_flop', 'score_per_latency')


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(f'invalid config: {msg}')


def _check_init_torchvision(c: ml_collections.ConfigDict) -> None:
  """train.init_torchvision: a convertible model, an existing file, torch for a .pth."""
  path = c.train.init_torchvision
  if not path:
    return
  import os
  from taylor_jax import convert
  _check(c.model in convert.CONVERTIBLE,
         f'train.init_torchvision is set, but model={c.model!r} has no torchvision layout; '
         f'use one of {list(convert.CONVERTIBLE)}')
  _check(os.path.isfile(path),
         f'train.init_torchvision={path!r}: no such file (give a torchvision state dict such as '
         'resnet50-19c8e357.pth, or an .npz written by `python -m taylor_jax.convert`)')
  _check(not c.train.init_checkpoint,
         'set only one of train.init_torchvision and train.init_checkpoint')
  if not path.endswith('.npz'):
    import importlib.util
    _check(importlib.util.find_spec('torch') is not None,
           f'train.init_torchvision={path!r} needs PyTorch to read (pip install torch==2.13.0), or '
           f'convert it to .npz where torch is installed: python -m taylor_jax.convert {path} '
           f'OUT.npz --model={c.model}')


def flat_items(tree: Any, prefix: str = '') -> dict[str, Any]:
  """``{'train.epochs': 3.0, ...}`` of a ConfigDict or nested dict (leaves as they are)."""
  out = {}
  items = tree.items() if hasattr(tree, 'items') else []
  for k, v in items:
    key = f'{prefix}{k}'
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_items(v, key + '.'))
    else:
      out[key] = v
  return out


def _check_finite(c: ml_collections.ConfigDict) -> None:
  """Every float field (method options included) is a finite number: NaN passes every range
  comparison below as False and inf as True, and either would train to a NaN network."""
  for key, v in flat_items(c).items():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(x, float) and not math.isfinite(x):
        _check(False, f'{key}={x}: must be a finite number')


def check_devices(c: ml_collections.ConfigDict, devices: int | None = None,
                  processes: int | None = None) -> None:
  """Global batches are split evenly over every device of every process (train.py's mesh);
  ``devices``/``processes`` default to ``jax.device_count()``/``jax.process_count()``."""
  if devices is None or processes is None:
    import jax  # noqa: deferred: config files import this module
    devices, processes = jax.device_count(), jax.process_count()
  n = math.lcm(devices, processes)
  where = (f'the {devices} device(s) of {processes} process(es)' if processes > 1
           else f'the {devices} device(s) (jax.device_count())')
  for key in ('batch_size', 'eval_batch_size'):
    v = c.train[key]
    if v % n:
      lo, hi = v // n * n, (v // n + 1) * n
      _check(False, f'train.{key}={v}: must be a multiple of {n}, to split evenly over {where}; '
                    f'use {hi}' + (f' or {lo}' if lo else ''))


def validate(c: ml_collections.ConfigDict, devices: int | None = None,
             processes: int | None = None) -> None:
  """Raises ValueError on values that cannot work, before any data or model is touched.

  ``devices``/``processes`` (default: ``jax.device_count()``/``jax.process_count()``) are what
  the batch sizes must divide.
  """
  from taylor_jax import estimators, models  # noqa: deferred to keep config files light
  from taylor_jax.data import input_pipeline
  if models.is_user_model(c.model):
    from taylor_jax.models import any_model
    any_model.load_factory(c.model)  # importable and present, before any data is read
  else:
    models._lookup(c.model)
  input_pipeline.check_dataset_name(c.dataset, c.image_size, c.get('data_mean'),
                                    c.get('data_std'))
  _check_finite(c)
  _check(c.train.batch_size >= 1, f'train.batch_size={c.train.batch_size}: must be >= 1')
  _check(c.train.epochs >= 0, f'train.epochs={c.train.epochs}: must be >= 0')
  _check(c.train.eval_batch_size >= 1, f'train.eval_batch_size={c.train.eval_batch_size}')
  for key in ('checkpoint_every_steps', 'log_every_steps'):
    _check(c.train[key] >= 1, f'train.{key}={c.train[key]}: must be >= 1')
  _check(c.train.eval_every_epochs >= 0,
         f'train.eval_every_epochs={c.train.eval_every_epochs}: must be >= 0 (0: off)')
  _check(c.train.crop_pad >= 0, f'train.crop_pad={c.train.crop_pad}: must be >= 0')
  for key in ('limit_examples', 'limit_eval_examples'):
    v = c.train[key]
    _check(v is None or v >= 1, f'train.{key}={v}: must be >= 1 (None: the whole split)')
  _check(c.image_size is None or c.image_size >= 1, f'image_size={c.image_size}: must be >= 1')
  check_devices(c, devices, processes)
  _check(c.optim.learning_rate > 0, f'optim.learning_rate={c.optim.learning_rate}: must be > 0')
  _check(0 <= c.optim.momentum < 1, f'optim.momentum={c.optim.momentum}: must be in [0, 1)')
  _check(c.optim.weight_decay >= 0, f'optim.weight_decay={c.optim.weight_decay}: must be >= 0')
  _check(c.optim.warmup_epochs >= 0, f'optim.warmup_epochs={c.optim.warmup_epochs}: must be >= 0')
  _check(c.optim.decay_factor > 0, f'optim.decay_factor={c.optim.decay_factor}: must be > 0')
  _check(all(e >= 0 for e in c.optim.decay_epochs),
         f'optim.decay_epochs={tuple(c.optim.decay_epochs)}: epochs must be >= 0')
  for key in ('latency_repeats', 'latency_rounds'):
    _check(c.report[key] >= 1, f'report.{key}={c.report[key]}: must be >= 1')
  _check(c.optim.schedule in ('constant', 'cosine', 'step'),
         f"optim.schedule={c.optim.schedule!r}: use 'constant', 'cosine' or 'step'")
  _check(c.optim.name in ('sgd', 'adam'), f"optim.name={c.optim.name!r}: use 'sgd' or 'adam'")
  _check_init_torchvision(c)
  p = c.prune
  if p.enabled:
    from taylor_jax import methods
    method = methods.get(p.method)
    estimators.get(p.estimator)
    _check(p.frequency >= 1, f'prune.frequency={p.frequency}: must be >= 1')
    _check(p.prune_per_iteration >= 1,
           f'prune.prune_per_iteration={p.prune_per_iteration}: must be >= 1')
    targets = [p.target_flops_reduction, p.target_params_reduction, p.target_keep_share,
               p.target_units]
    _check(any(t is not None for t in targets) or not method.needs_target,
           'prune.enabled but no target: set one of prune.target_flops_reduction, '
           'prune.target_params_reduction, prune.target_keep_share, prune.target_units')
    for name in ('target_flops_reduction', 'target_params_reduction'):
      v = p[name]
      _check(v is None or 0 < v < 1, f'prune.{name}={v}: must be in (0, 1)')
    _check(p.target_keep_share is None or 0 < p.target_keep_share < 1,
           f'prune.target_keep_share={p.target_keep_share}: must be in (0, 1)')
    _check(p.target_units is None or p.target_units >= 1,
           f'prune.target_units={p.target_units}: must be >= 1')
    given = [f'prune.{k}={p[k]}' for k in ('target_flops_reduction', 'target_params_reduction',
                                           'target_keep_share', 'target_units')
             if p[k] is not None]
    _check(len(given) <= 1, f'{" and ".join(given)}: set one pruning target, not {len(given)} '
           '(override the other with None, e.g. --config.prune.target_flops_reduction=None)')
    _check(0 <= p.target_tolerance < 1,
           f'prune.target_tolerance={p.target_tolerance}: must be in [0, 1) (a share of the '
           'full FLOPs or parameters)')
    _check(0 <= p.ema_momentum < 1, f'prune.ema_momentum={p.ema_momentum}: must be in [0, 1)')
    _check(p.normalize in ('none', 'l2'), f"prune.normalize={p.normalize!r}: use 'none' or 'l2'")
    _check(p.rank_by in RANK_BY, f'prune.rank_by={p.rank_by!r}: use one of {RANK_BY}')
    _check(p.get('scope', 'global') in ('global', 'local'),
           f"prune.scope={p.get('scope')!r}: use 'global' or 'local'")
    _check(p.get('scope', 'global') == 'global' or p.rank_by == 'score',
           f"prune.scope='local' ranks within each group: use prune.rank_by='score' "
           f"(not {p.rank_by!r})")
    _check(p.surgery_every >= 1, f'prune.surgery_every={p.surgery_every}: must be >= 1')
    _check(p.finetune_epochs >= 0, f'prune.finetune_epochs={p.finetune_epochs}: must be >= 0')
    for key in ('learning_rate', 'finetune_learning_rate'):
      _check(p[key] > 0, f'prune.{key}={p[key]}: must be > 0')
    _check(p.max_pruning_iterations >= 1,
           f'prune.max_pruning_iterations={p.max_pruning_iterations}: must be >= 1')
    _check(p.eval_examples >= 0, f'prune.eval_examples={p.eval_examples}: must be >= 0 (0: none)')
    _check(p.finetune_schedule in ('constant', 'cosine', 'step'),
           f"prune.finetune_schedule={p.finetune_schedule!r}: use 'constant', 'cosine' or 'step'")
    from taylor_jax.engine import Constraints
    Constraints.from_config(p)
    if method.validate is not None:
      method.validate(c)


# Fields that change where or how verbosely a run runs, never its result (resume is bit-identical
# whatever the checkpoint interval): a resumed run may change them freely.
RESULT_NEUTRAL = ('data_dir', 'train.log_every_steps', 'train.checkpoint_every_steps',
                  'train.eval_every_epochs',
                  'report.latency_repeats', 'report.latency_rounds', 'distributed.')


# Fields added after runs were saved, with the value that does what those runs did: a saved
# config without them resumes as if it had them at these values.
ADDED_LATER = {'data_mean': None, 'data_std': None, 'prune.max_share_per_group': '',
               'prune.scope': 'global'}


def _matters(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
  """Whether field ``key`` can change the result of a run saved as ``old`` resumed as ``new``
  (flat JSON configs): not a RESULT_NEUTRAL field, nor a pruning field when either run does not
  prune (``prune.enabled`` itself differs then), nor the options of a method neither runs."""
  from taylor_jax import methods  # noqa: deferred, as in validate
  if any(key == n or (n.endswith('.') and key.startswith(n)) for n in RESULT_NEUTRAL):
    return False
  if not key.startswith('prune.') or key == 'prune.enabled':
    return True
  if not (old.get('prune.enabled') and new.get('prune.enabled')):
    return False
  section = key.split('.')[1] if key.count('.') >= 2 else None
  if section in methods.default_options():
    return section == old.get('prune.method') == new.get('prune.method')
  return True


def result_changes(saved: dict[str, Any], config: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
  """``{field: (saved value, new value)}`` for every field that changes the result and differs
  between ``saved`` (a checkpoint's JSON config) and ``config``; a field present on one side
  only (a run saved by another version) differs too, with ``'<absent>'`` for the missing side,
  except a field of ADDED_LATER missing from ``saved`` at the value that reproduces older runs."""
  new = flat_items(json.loads(config.to_json_best_effort()))
  old = {**{k: v for k, v in ADDED_LATER.items() if k in new}, **flat_items(saved)}
  absent = '<absent>'
  return {k: (old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
          if _matters(k, old, new) and old.get(k, absent) != new.get(k, absent)}
