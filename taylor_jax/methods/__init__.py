"""Pruning methods: how the main job gets from the baseline (trained or freshly initialised)
network to the pruned one. ``c.prune.method`` picks one by name.

``'taylor'`` (the default) is the paper's iterative schedule: scores accumulated inside the
train step, every ``prune.frequency`` minibatches one :func:`taylor_jax.pruner.prune_period`
(the pruning step the public :class:`taylor_jax.pruner.Pruner` also takes) and surgery; it
takes any registered estimator by name (``prune.estimator``: ``taylor_fo_bn``,
``bn_scale_grad``, ...). It interleaves pruning with the job's own SGD steps and checkpoints,
so it is the 'prune' phase of :mod:`taylor_jax.run` (``_prune_taylor``) rather than one call.
Every other method replaces that phase with one function call.

The phases of a run with a registered method: 'baseline' (``train.epochs`` of ordinary training;
0 for methods that start from the initialisation, or ``train.init_checkpoint``) -> 'prune' (the
method's function, ONE call) -> 'finetune' (``prune.finetune_epochs`` with a fresh optimizer,
cosine from ``prune.finetune_learning_rate``) -> report. Checkpoints are written at the phase
boundaries: a run killed inside the method's call resumes by calling it again from the state
saved at the start of the 'prune' phase (methods are deterministic given the config's seed).

Registering a method (a module ``taylor_jax/methods/<name>.py``; add its module name to
``BUILTIN_MODULES`` below so that configs and the command line find it)::

    from taylor_jax import methods

    def _validate(c):                  # optional; raise ValueError('invalid config: ...')
      if c.prune.my_method.threshold <= 0:
        raise ValueError('invalid config: prune.my_method.threshold=... must be > 0')

    @methods.register('my_method', options={'threshold': 0.1}, validate=_validate)
    def my_method(ctx: methods.MethodContext) -> methods.MethodResult:
      ...
      return methods.MethodResult(model=small_model, state=small_state, history=[...])

* ``options``: the defaults of ``c.prune.<name>`` (a ConfigDict that
  :func:`taylor_jax.configlib.base_config` creates for every registered method, so
  ``--config.prune.my_method.threshold=0.2`` works with the locked config). Values must be
  int/float/bool/str/None or tuples of them (``None`` fields get type ``float`` unless given as
  an ``ml_collections.FieldReference``).
* ``needs_target=False``: the method may run with no ``prune.target_*`` set (it prunes by its
  own rule, e.g. a threshold); then ``ctx.target_reached`` is always False.
* ``validate(config)``: called by :func:`taylor_jax.configlib.validate` (when
  ``prune.enabled``) before any data is read or file written.
* The function receives a :class:`MethodContext` (the network after the 'baseline' phase, on the
  host, and what the job offers: batches, evaluation, costs, the target test) and returns a
  :class:`MethodResult`: the pruned model (the zoo model with its new ``widths``) and its host
  :class:`~taylor_jax.train.TrainState` (surgered, i.e. masks all ones of the new widths;
  ``step`` advanced by the training steps the method took, which also fixes the data position of
  fine-tuning; ``opt_state`` is ignored, fine-tuning starts a fresh optimizer), plus the history
  (one dict per pruning step, :func:`history_record` makes them; the report plots them).
  The method must honour ``ctx.constraints`` (min-width, max-share, alignment) and the target
  (``ctx.target_reached``); :func:`prune_to_target` does both for fixed scores.
* Do not import :mod:`taylor_jax.run` from a method module (run imports this package).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

# Method modules that register themselves on import (a missing module is skipped, so a method
# under development elsewhere does not break the others).
BUILTIN_MODULES = ('variational', 'snip', 'kernel_budget', 'cascaded_projection')

TAYLOR = 'taylor'


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  fn: Optional[Callable[['MethodContext'], 'MethodResult']]  # None: the inlined 'taylor' engine
  options: Mapping[str, Any]
  validate: Optional[Callable[[Any], None]] = None
  doc: str = ''
  needs_target: bool = True  # False: the method may run without a prune.target_* (a threshold)


_REGISTRY: dict[str, Method] = {
    TAYLOR: Method(TAYLOR, None, {}, None,
                   'iterative pruning by prune.estimator inside the train step (run.py)')}
_LOADED = False


def register(name: str, options: Optional[Mapping[str, Any]] = None,
             validate: Optional[Callable[[Any], None]] = None, needs_target: bool = True):
  """Decorator: registers ``fn(ctx) -> MethodResult`` as method ``name`` (see module doc)."""
  if name == TAYLOR:
    raise ValueError(f'{TAYLOR!r} is the built-in engine; choose another method name')

  def wrap(fn):
    _REGISTRY[name] = Method(name, fn, dict(options or {}), validate, (fn.__doc__ or '').strip(),
                             needs_target)
    return fn
  return wrap


def _load_builtins() -> None:
  global _LOADED
  if _LOADED:
    return
  _LOADED = True
  for mod in BUILTIN_MODULES:
    full = f'{__name__}.{mod}'
    try:
      importlib.import_module(full)
    except ModuleNotFoundError as e:
      if e.name != full:  # a missing dependency inside an existing module is a real error
        raise


def names() -> list[str]:
  _load_builtins()
  return sorted(_REGISTRY)


def get(name: str) -> Method:
  """The registered method ``name``; ValueError naming the choices otherwise."""
  _load_builtins()
  if name not in _REGISTRY:
    raise ValueError(f'invalid config: prune.method={name!r} is not a registered method; choose '
                     f'one of {names()} (or register one, see taylor_jax/methods/__init__.py)')
  return _REGISTRY[name]


def default_options() -> dict[str, dict[str, Any]]:
  """Method name -> its option defaults (for ``c.prune.<name>``), registered methods only."""
  _load_builtins()
  return {k: dict(m.options) for k, m in sorted(_REGISTRY.items()) if k != TAYLOR}


# --- what a method receives and returns --------------------------------------------------------

@dataclasses.dataclass
class MethodContext:
  """The job as a method sees it, at the start of the 'prune' phase.

  Attributes:
    config: the run's config (``config.prune.<method name>`` holds the method's options).
    workdir: the run's directory (metrics.jsonl, checkpoints).
    model: the zoo model after the baseline phase (full widths unless the init checkpoint
      was already pruned); ``model.groups()`` are its channel groups.
    state: host :class:`~taylor_jax.train.TrainState` of ``model`` (numpy leaves, masks all ones).
    full_widths: the unpruned widths (constraints are relative to them).
    constraints: :class:`taylor_jax.engine.Constraints` from ``prune.min_width/max_share/align``.
    input_shape: ``(H, W, C)`` of one example.
    num_classes, steps_per_epoch, train_size: of the training split.
    mesh: the 1-D ``data`` mesh of :func:`taylor_jax.train.create_mesh`.
    full_flops, full_params: of the unpruned model.
    batches: ``batches(step)`` iterates global train batches (sharded over ``mesh``) from the data
      position of global step ``step`` (the same order as the other phases).
    evaluate: ``evaluate(model, state)`` -> ``{'accuracy', 'loss', ...}`` on the
      ``prune.eval_examples`` test subset, or None when that is 0.
    costs: ``costs(model, masks)`` -> ``{'flops', 'params'}`` of the surgered network.
    target_reached: ``target_reached(model, masks)`` -> whether the config's target is met.
    log: ``log(record)`` appends a JSON record to ``metrics.jsonl``.
  """

  config: Any
  workdir: str
  model: Any
  state: Any
  full_widths: Mapping[str, int]
  constraints: Any
  input_shape: tuple[int, ...]
  num_classes: int
  steps_per_epoch: int
  train_size: int
  mesh: Any
  full_flops: int
  full_params: int
  batches: Callable[[int], Iterator[Mapping[str, Any]]]
  evaluate: Callable[[Any, Any], Optional[dict[str, float]]]
  costs: Callable[[Any, Mapping[str, Any]], dict[str, int]]
  target_reached: Callable[[Any, Mapping[str, Any]], bool]
  log: Callable[[dict[str, Any]], None]

  @property
  def options(self):
    """This run's ``config.prune.<method>`` section."""
    return self.config.prune[self.config.prune.method]


@dataclasses.dataclass
class MethodResult:
  """The pruned ``model`` and its surgered host ``state``; ``history`` of pruning steps."""
  model: Any
  state: Any
  history: list[dict[str, Any]]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # kept in the report


# --- helpers shared by methods -------------------------------------------------------------------

def units_kept(groups: Sequence[Any], masks: Mapping[str, Any]) -> int:
  return int(sum(int(np.asarray(masks[g.name]).sum()) for g in groups if g.prunable))


def history_record(ctx: MethodContext, prune_step: int, step: int, model: Any,
                   masks: Mapping[str, Any], state: Any = None, **extra: Any) -> dict[str, Any]:
  """One history entry in the format of the 'taylor' path (report and plot read it); with a
  ``state`` of ``model`` (masks applied as gates) the prune-eval subset is evaluated too."""
  cst = ctx.costs(model, masks)
  rec = {'prune_step': int(prune_step), 'step': int(step),
         'units_kept': units_kept(model.groups(), masks), 'flops': cst['flops'],
         'params': cst['params'], 'flops_ratio': cst['flops'] / ctx.full_flops,
         'params_ratio': cst['params'] / ctx.full_params, **extra}
  if state is not None:
    ev = ctx.evaluate(model, state.replace(masks={k: np.asarray(v, np.float32)
                                                  for k, v in masks.items()}))
    if ev is not None:
      rec['eval_accuracy'], rec['eval_loss'] = ev['accuracy'], ev['loss']
  return rec


def prune_to_target(ctx: MethodContext, model: Any, scores: Mapping[str, Any],
                    masks: Optional[Mapping[str, Any]] = None,
                    units_per_step: Optional[int] = None) -> dict[str, np.ndarray]:
  """Masks with the lowest-scoring units removed (global ranking, ``engine.prune_lowest`` under
  ``ctx.constraints``), ``units_per_step`` at a time (default ``prune.prune_per_iteration``)
  until ``ctx.target_reached``; the scores stay fixed (one-shot pruning).

  Raises ValueError when the constraints stop pruning before the target is reached.
  """
  from taylor_jax import engine
  groups = model.groups()
  masks = {g.name: np.ones(g.width, np.float32) for g in groups} if masks is None else \
      {k: np.asarray(v, np.float32) for k, v in masks.items()}
  n = units_per_step or ctx.config.prune.prune_per_iteration
  while not ctx.target_reached(model, masks):
    new = engine.prune_lowest(scores, masks, groups, ctx.full_widths, n, ctx.constraints)
    if units_kept(groups, new) == units_kept(groups, masks):
      raise ValueError('the constraints (prune.min_width, prune.max_share, prune.align) stop '
                       'pruning before the target is reached; lower the target or relax them')
    masks = new
  return masks


def shrink(model: Any, state: Any, masks: Mapping[str, Any]):
  """``(small_model, small_state)``: the masked units of a host state physically removed
  (params and batch statistics; the optimizer state is dropped, fine-tuning starts afresh)."""
  from taylor_jax import surgery
  groups = model.groups()
  variables = surgery.shrink_variables(
      groups, {'params': state.params, 'batch_stats': state.batch_stats}, masks)
  small = model.clone(widths=surgery.new_widths(model.widths, masks))
  ones = {k: np.ones((w,), np.float32) for k, w in small.widths.items()}
  return small, state.replace(params=variables['params'], batch_stats=variables['batch_stats'],
                              opt_state=(), masks=ones)


def estimator_scores(ctx: MethodContext, model: Any, state: Any, estimator: Callable[..., Any],
                     num_batches: int, start_step: Optional[int] = None) -> dict[str, np.ndarray]:
  """Mean over ``num_batches`` training minibatches (from the data position of ``start_step``,
  default ``state.step``; no update is made) of an estimator's per-unit scores, with BatchNorm in
  train mode as inside the train step. Pruned units (mask 0) score 0."""
  import jax
  from taylor_jax import estimators
  groups = tuple(model.groups())

  @jax.jit
  def one(params, batch_stats, masks, batch, step):
    sc = estimators.ScoreContext(model, groups, params, batch_stats, masks, batch, train=True,
                                 step=step)
    return {k: v.astype(np.float32) * masks[k] for k, v in estimator(sc).items()}

  step0 = int(state.step) if start_step is None else start_step
  it = ctx.batches(step0)
  total = None
  for i in range(num_batches):
    s = one(state.params, state.batch_stats, state.masks, next(it), np.int32(step0 + i))
    total = s if total is None else jax.tree.map(np.add, total, s)
  return {k: np.asarray(v, np.float64) / num_batches for k, v in jax.device_get(total).items()}
