"""Defaults every experiment config starts from, and the validation run before any work starts.

A config file under ``configs/`` calls :func:`base_config` and overrides fields; the command
line overrides further (``--config.train.epochs=3``). :func:`validate` raises a ValueError that
names the field, the bad value and what to use instead.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'resnet20'
  c.dataset = 'fashion_mnist'  # 'fashion_mnist' | 'cifar10' | 'imagenet2012' | 'synthetic'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir (None: default)
  c.image_size = ml_collections.FieldReference(None, field_type=int)  # None: dataset's own
  c.seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global, split over all devices
  c.train.epochs = 10.0  # baseline training (0: start from init_checkpoint or untrained)
  c.train.augment = True
  c.train.crop_pad = 4  # pad-and-random-crop of 28/32 px images (0: flip only)
  c.train.limit_examples = ml_collections.FieldReference(None, field_type=int)  # smoke runs
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
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
  c.prune.align = 1
  # Ranking: 'score' (the paper: lowest importance first), 'score_per_flop' / 'score_per_latency'
  # (importance per MAC / per millisecond a unit saves; latency from a table measured on this
  # machine before the first pruning step, engine.py).
  c.prune.rank_by = 'score'
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


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError on values that cannot work, before any data or model is touched."""
  from taylor_jax import estimators, models  # noqa: deferred to keep config files light
  from taylor_jax.data import input_pipeline
  if models.is_user_model(c.model):
    from taylor_jax.models import any_model
    any_model.load_factory(c.model)  # importable and present, before any data is read
  else:
    models._lookup(c.model)
  input_pipeline.check_dataset_name(c.dataset)
  _check(c.train.batch_size >= 1, f'train.batch_size={c.train.batch_size}: must be >= 1')
  _check(c.train.epochs >= 0, f'train.epochs={c.train.epochs}: must be >= 0')
  _check(c.train.eval_batch_size >= 1, f'train.eval_batch_size={c.train.eval_batch_size}')
  _check(c.optim.learning_rate > 0, f'optim.learning_rate={c.optim.learning_rate}: must be > 0')
  _check(0 <= c.optim.momentum < 1, f'optim.momentum={c.optim.momentum}: must be in [0, 1)')
  _check(c.optim.weight_decay >= 0, f'optim.weight_decay={c.optim.weight_decay}: must be >= 0')
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
    _check(0 <= p.target_tolerance < 1,
           f'prune.target_tolerance={p.target_tolerance}: must be in [0, 1) (a share of the '
           'full FLOPs or parameters)')
    _check(0 <= p.ema_momentum < 1, f'prune.ema_momentum={p.ema_momentum}: must be in [0, 1)')
    _check(p.normalize in ('none', 'l2'), f"prune.normalize={p.normalize!r}: use 'none' or 'l2'")
    _check(p.rank_by in RANK_BY, f'prune.rank_by={p.rank_by!r}: use one of {RANK_BY}')
    _check(p.surgery_every >= 1, f'prune.surgery_every={p.surgery_every}: must be >= 1')
    _check(p.finetune_epochs >= 0, f'prune.finetune_epochs={p.finetune_epochs}: must be >= 0')
    _check(p.finetune_schedule in ('constant', 'cosine', 'step'),
           f"prune.finetune_schedule={p.finetune_schedule!r}: use 'constant', 'cosine' or 'step'")
    from taylor_jax.engine import Constraints
    Constraints(p.min_width, p.max_share, p.align)
    if method.validate is not None:
      method.validate(c)
