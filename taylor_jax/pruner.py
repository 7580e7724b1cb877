"""Pruning inside your own training loop: ``init`` / ``accumulate`` / ``step``.

The paper's schedule (scores every minibatch; every ``frequency`` minibatches the period mean,
an EMA across pruning steps, the lowest units removed globally, then surgery) as library API
for any Flax model, Linen or NNX, with your optimizer and your data::

    pruner = taylor_jax.Pruner(model, x_example, target=taylor_jax.Target(flops=0.4))
    pstate = pruner.init()
    for batch in data:
      variables, opt_state, pstate = my_step(variables, opt_state, pstate, batch)  # jitted;
      #   inside it, after the gradient:  pstate = pruner.accumulate(pstate, params, grads)
      pruned = pruner.step(pstate, variables, opt_state)   # host side, cheap when not due
      if pruned:
        variables, opt_state, pstate = pruned.variables, pruned.opt_state, pruned.state
      if pruner.done: break

Where things live: the model's channel groups come from discovery
(:func:`taylor_jax.discovery.discover_groups`, through :mod:`taylor_jax.models.any_model`);
:meth:`Pruner.accumulate` is pure and jittable (it turns the gradients your step already has
into per-unit scores with a registered estimator); :meth:`Pruner.step` runs on the host: it
counts calls (no device read until a pruning step is due), ranks (:mod:`taylor_jax.engine`), and
rebuilds smaller variables and optimizer state (:mod:`taylor_jax.surgery`). After a pruning step
``pruner.model`` is the smaller model; :meth:`Pruner.apply` always runs the current one, and an
NNX model you passed in is pruned in place, so the object you hold stays usable.

Every pruning step ends with surgery, so no masks enter your forward pass: the network you train
between pruning steps is the smaller one.

Also here: NNX loops as NNX users write them (``accumulate(pstate, model, grads)``,
``step(pstate, model, nnx_optimizer)``: model and optimizer pruned in place); resuming an
interrupted loop (:meth:`Pruner.state_dict` / :meth:`Pruner.restore`); one-shot pruning of a
trained model (:func:`prune_once`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from taylor_jax import checks, costs, engine, estimators, masking, resize, surgery
from taylor_jax.engine import Constraints, Target
from taylor_jax.models import any_model

__all__ = ['Pruner', 'PrunerState', 'PruneStep', 'Schedule', 'Target', 'Constraints',
           'nnx_variables', 'prune_once', 'prune_period', 'check_target_feasible']


@flax.struct.dataclass
class PrunerState:
  """Device state of the pruner (a pytree: pass it through ``jax.jit``, checkpoint it).

  ``score_sum``: group -> ``(width,)`` sum of this period's scores; ``score_count``: minibatches
  in the sum; ``score_ema``: group -> ``(width,)`` EMA of the period means of earlier periods.
  """
  score_sum: dict[str, jax.Array]
  score_count: jax.Array
  score_ema: dict[str, jax.Array]


@dataclasses.dataclass
class PruneStep:
  """What one pruning step returns: the smaller ``variables`` (``{'params', 'batch_stats'}``),
  ``opt_state`` (None if none was given), the pruner ``state`` for the new widths, and its
  ``record`` (also appended to ``Pruner.history``)."""
  variables: dict[str, Any]
  opt_state: Any
  state: PrunerState
  record: dict[str, Any]


class _NoBatch(Mapping):
  """Stands for the minibatch when :meth:`Pruner.accumulate` got none."""

  def __init__(self, estimator: str):
    self.estimator = estimator

  def __getitem__(self, key):
    raise ValueError(
        f"estimator {self.estimator!r} runs the model on the minibatch (key {key!r}); pass "
        "batch={'image': x, 'label': y} to Pruner.accumulate, or use an estimator computed from "
        "the gradients alone (taylor_fo_bn, taylor_fo_weight, bn_scale, bn_scale_grad, ...)")

  def __iter__(self):
    return iter(())

  def __len__(self):
    return 0


def nnx_variables(model: nnx.Module) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` pure dicts of an NNX model (the layout the pruner,
  its estimators and surgery speak; ``nnx.Param`` and ``nnx.BatchStat`` states)."""
  return any_model._split(model)[1]


def _pure_params(tree: Any) -> Any:
  """An ``nnx.State`` (of ``nnx.grad``, ``nnx.state``) as the nested dict of arrays that
  :func:`nnx_variables` gives; anything else as it is."""
  return tree.to_pure_dict() if isinstance(tree, nnx.State) else tree


def _nnx_opt_state(optimizer: nnx.Optimizer) -> Any:
  """The optax state of an ``nnx.Optimizer`` with its parameter mirrors as nested dicts (the
  tree ``tx.init(nnx_variables(model)['params'])`` makes)."""
  is_state = lambda x: isinstance(x, nnx.State)
  return jax.tree.map(lambda s: s.to_pure_dict() if is_state(s) else s,
                      nnx.as_pure(optimizer.opt_state), is_leaf=is_state)


def _set_nnx_opt_state(optimizer: nnx.Optimizer, model: nnx.Module, new: Any) -> None:
  """Puts ``new`` (:func:`_nnx_opt_state`'s form, of the pruned model) into ``optimizer``."""
  from flax.nnx.training.optimizer import to_opt_state
  is_state = lambda x: isinstance(x, nnx.State)
  template = jax.eval_shape(optimizer.tx.init, nnx.as_pure(nnx.state(model, optimizer.wrt)))

  def fill(t, v):
    if is_state(t):
      t.replace_by_pure_dict(v)
      return t
    return v
  optimizer.opt_state = nnx.data(to_opt_state(jax.tree.map(fill, template, new,
                                                           is_leaf=is_state)))


def _put_like(tree: Any, shardings: Any) -> Any:
  """``tree`` on the devices, each array with the sharding of the same leaf of ``shardings``
  (None: the default device); raises naming the array a sharding can no longer split."""
  def put(path, x, sharding):
    if sharding is None:
      return jax.device_put(x)
    try:
      return jax.device_put(x, sharding)
    except ValueError as e:
      raise ValueError(
          f'after pruning, {jax.tree_util.keystr(path)} has shape {np.shape(x)}, which its '
          f'sharding {sharding} cannot split ({e}). Keep the widths of sharded axes a multiple '
          f'of the mesh axis: Constraints(align=...) or keep_whole=[...].') from None
  return jax.tree_util.tree_map_with_path(put, tree, shardings,
                                          is_leaf=lambda x: x is None)


def _adapter(model: Any, example_input: Any, *, train_kwarg: Optional[str],
             keep_whole: Sequence[str], prune_marked: bool):
  """The model behind the library's model protocol (groups, widths, clone, apply)."""
  opts = dict(keep_whole=tuple(keep_whole), prune_marked=prune_marked)
  if all(hasattr(model, a) for a in ('groups', 'clone', 'apply', 'widths')):
    return model  # already speaks the protocol (a zoo model, a LinenModel/NNXModel)
  if isinstance(model, nnx.Module):
    # A full-width snapshot of the structure: the adapter rebuilds modules from it (abstractly)
    # while the user's object is pruned in place.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a, state)  # new containers: pruning in place leaves it alone
    # (and new ones per call, made in the caller's trace: NNX refuses to mutate a variable
    # created outside it)
    build = lambda rngs: nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    return any_model.NNXModel(build, example_input, **opts)
  if isinstance(model, nn.Module):
    return any_model.LinenModel(model, example_input, train_kwarg=train_kwarg, **opts)
  raise TypeError(f'Pruner needs a Flax Linen module, an NNX module or a taylor_jax model; got '
                  f'{type(model).__name__}')


def check_target_feasible(target: Target, model: Any, input_shape: Sequence[int],
                          constraints: Constraints) -> None:
  """Raises ValueError, before any training, when ``constraints`` cannot let ``model`` (at full
  width) reach ``target``."""
  groups, full = model.groups(), dict(model.widths)
  constraints.check_patterns(groups)
  where = (f'min_width={constraints.min_width}, max_share={constraints.max_share}, '
           f'align={constraints.align}' + (f', max_share_per_group={dict(constraints.max_share_per_group)}'
                                          if constraints.max_share_per_group else ''))
  full_units = sum(full[g.name] for g in groups if g.prunable)
  if full_units == 0:
    raise ValueError('the model has no prunable channel group (every group is kept whole: see '
                     'each group\'s reason in Pruner.groups)')
  removable = engine.removable_units(groups, full, {k: np.ones(w) for k, w in full.items()},
                                     constraints)
  need = target.units_to_remove(full_units, full_units)
  if need is not None and need > removable:
    raise ValueError(f'the target removes {need} units but only {removable} of the {full_units} '
                     f'prunable units can go under {where}. Lower the target or relax them.')
  if target.is_cost:
    small = model.clone(widths=surgery.new_widths(full, engine.minimal_masks(groups, full,
                                                                             constraints)))
    cost = costs.flops if target.flops is not None else costs.params
    best = 1 - cost(small, input_shape) / cost(model, input_shape)
    want = target.flops if target.flops is not None else target.params
    if best < want:
      raise ValueError(
          f'the target asks for {target.describe()}, but every group at its minimum under the '
          f'constraints ({where}) removes only {best:.1%}. Lower the target or relax them.')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When and how much to prune (defaults: the reference's, except ``units_per_step``).

  ``frequency``: minibatches per pruning period; ``units_per_step``: units removed per pruning
  step (a cost target's last step may remove fewer); ``ema_momentum``: EMA of the period means
  across steps; ``normalize``: ``'l2'`` divides each group's period mean by its L2 norm;
  ``tolerance``: a FLOPs/params target's last step may overshoot by this share of the full
  cost; ``max_steps``: pruning steps at most; ``rank_by``: ``'score'`` (the paper) or
  ``'score_per_flop'``; ``constraints``: min width, max pruned share, width alignment;
  ``scope``: ``'global'`` (the paper: units ranked across all groups) or ``'local'`` (every group
  loses the same share of its width, its lowest-scoring units: Torch-Pruning's default,
  ``global_pruning=False``).
  """
  frequency: int = 30
  units_per_step: int = 16
  ema_momentum: float = 0.9
  normalize: str = 'none'
  tolerance: float = 0.05
  max_steps: int = 1000
  rank_by: str = 'score'
  constraints: Constraints = Constraints()
  scope: str = 'global'

  def __post_init__(self):
    for name, ok in (('frequency', self.frequency >= 1),
                     ('units_per_step', self.units_per_step >= 1),
                     ('ema_momentum', 0 <= self.ema_momentum < 1),
                     ('tolerance', 0 <= self.tolerance < 1),
                     ('max_steps', self.max_steps >= 1),
                     ('normalize', self.normalize in ('none', 'l2')),
                     ('scope', self.scope in ('global', 'local'))):
      if not ok:
        raise ValueError(f'Schedule({name}={getattr(self, name)!r}): out of range')
    if self.scope == 'local' and self.rank_by != 'score':
      raise ValueError(f"Schedule(scope='local', rank_by={self.rank_by!r}): a local scope ranks "
                       "within each group; cost-aware ranking needs scope='global'")

  @classmethod
  def from_config(cls, prune) -> 'Schedule':
    """The schedule of a ``config.prune`` section (``rank_by='score_per_latency'`` is the main
    job's own: it passes its latency table as ``unit_cost``)."""
    return cls(frequency=prune.frequency, units_per_step=prune.prune_per_iteration,
               ema_momentum=prune.ema_momentum, normalize=prune.normalize,
               tolerance=prune.target_tolerance, max_steps=prune.max_pruning_iterations,
               rank_by='score', constraints=Constraints.from_config(prune),
               scope=prune.get('scope', 'global'))


@dataclasses.dataclass(frozen=True)
class FullSize:
  """The unpruned network, which targets and constraints are relative to."""
  widths: Mapping[str, int]
  units: int
  flops: int
  params: int

  @classmethod
  def of(cls, model: Any, input_shape: Sequence[int]) -> 'FullSize':
    widths = dict(model.widths)
    return cls(widths, sum(widths[g.name] for g in model.groups() if g.prunable),
               costs.flops(model, input_shape), costs.params(model, input_shape))


def units_kept(groups, masks: Mapping[str, Any]) -> int:
  return int(sum(int(np.asarray(masks[g.name]).sum()) for g in groups if g.prunable))


def flops_unit_cost(model: Any, input_shape: Sequence[int],
                    masks: Mapping[str, Any]) -> engine.UnitCost:
  """MACs one unit of each group saves now (``rank_by='score_per_flop'``)."""
  base = costs.flops(model, input_shape, masks)
  per_unit = {}
  for g in model.groups():
    alive = np.flatnonzero(np.asarray(masks[g.name]))
    if g.prunable and alive.size > 1:
      fewer = {k: np.asarray(v, np.float32).copy() for k, v in masks.items()}
      fewer[g.name][alive[0]] = 0.0
      per_unit[g.name] = max(base - costs.flops(model, input_shape, fewer), 1)
  return lambda name, width, chunk: chunk * per_unit.get(name, 1)


def prune_period(model: Any, input_shape: Sequence[int], masks: Mapping[str, Any],
                 score_sum: Mapping[str, Any], score_count: int, score_ema: Mapping[str, Any], *,
                 first: bool, target: Target, schedule: Schedule, full: FullSize,
                 unit_cost: Optional[engine.UnitCost] = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """One pruning step of the paper's schedule, on the host: ``(ema, new_masks)``.

  The period mean of the scores, smoothed into the EMA (``first``: the mean itself), ranks the
  live units globally (``engine.prune_lowest``); ``schedule.units_per_step`` go, fewer where
  ``target`` needs fewer, and a cost target stops within ``schedule.tolerance``. The main job
  and :class:`Pruner` both prune through here. ``unit_cost`` overrides ``schedule.rank_by``.
  """
  masks = {k: np.asarray(v, np.float32) for k, v in masks.items()}
  ema = engine.period_mean_and_ema(score_sum, score_count, score_ema, masks, first,
                                   schedule.ema_momentum, schedule.normalize)
  groups = model.groups()
  n = target.units_this_step(schedule.units_per_step, full.units, units_kept(groups, masks))
  excess = target.excess(lambda m: costs.flops(model, input_shape, m) / full.flops,
                         lambda m: costs.params(model, input_shape, m) / full.params)
  if unit_cost is None and schedule.rank_by == 'score_per_flop':
    unit_cost = flops_unit_cost(model, input_shape, masks)
  ranking = ema
  if schedule.scope == 'local':
    if unit_cost is not None:
      raise ValueError("scope='local' ranks within each group: it cannot rank by cost")
    ranking = engine.local_keys(ema, masks, groups, full.widths)
  new = engine.prune_lowest(ranking, masks, groups, full.widths, n, schedule.constraints,
                            excess=excess, tolerance=schedule.tolerance, unit_cost=unit_cost)
  return ema, new


def size_record(model: Any, input_shape: Sequence[int], params: Any,
                full: FullSize) -> dict[str, Any]:
  """Units kept, FLOPs (MACs) and parameters of a surgered ``model`` with ``params``, and their
  ratios to the unpruned network's."""
  flops, n_params = costs.flops(model, input_shape), costs.count_params(params)
  kept = sum(int(model.widths[g.name]) for g in model.groups() if g.prunable)
  return {'units_kept': kept, 'flops': flops,
          'params': n_params, 'flops_ratio': flops / full.flops,
          'params_ratio': n_params / full.params}


class Pruner:
  """Iterative pruning of one model to a target, driven from your own loop (module doc).

  Args:
    model: a Flax Linen module, an NNX module (pruned in place at every pruning step), or a
      taylor_jax model (zoo, ``any_model.LinenModel``/``NNXModel``).
    example_input: one batch, e.g. ``x[:2]`` (shape and dtype matter, not values).
    target: where to stop (:class:`taylor_jax.engine.Target`).
    estimator: a registered estimator name (``estimators.names()``) or a function
      ``ScoreContext -> {group: (width,) scores}``. Default: Taylor-FO-BN, ``(dL/dz)^2`` with
      ``z`` scaling each group's norms (or producers), from the parameter gradients.
    tx: your optax optimizer; needed to shrink ``opt_state`` in :meth:`step`.
    train_kwarg: name of a Linen module's train/eval argument (None: it has none).
    keep_whole, prune_marked: see :func:`taylor_jax.discovery.discover_groups`.
    schedule options (:class:`Schedule`): ``frequency``, ``units_per_step``, ``ema_momentum``,
      ``normalize``, ``tolerance``, ``max_steps``, ``rank_by``, ``constraints``.
  """

  def __init__(self, model: Any, example_input: Any, *, target: Target,
               estimator: Union[str, Callable[..., Any]] = 'taylor_fo_bn_stream',
               tx: Optional[optax.GradientTransformation] = None,
               train_kwarg: Optional[str] = 'train', keep_whole: Sequence[str] = (),
               prune_marked: bool = False, **schedule: Any):
    if not isinstance(target, Target):
      raise TypeError(f'target must be a taylor_jax.Target, e.g. Target(flops=0.4); got {target!r}')
    unknown = set(schedule) - {f.name for f in dataclasses.fields(Schedule)}
    if unknown:
      raise TypeError(f'Pruner got unknown option(s) {sorted(unknown)}; schedule options are '
                      f'{[f.name for f in dataclasses.fields(Schedule)]}')
    self.schedule = Schedule(**schedule)
    if self.schedule.rank_by not in ('score', 'score_per_flop'):
      raise ValueError(f"Pruner(rank_by={self.schedule.rank_by!r}): use 'score' or "
                       "'score_per_flop'")
    self.estimator_name = estimator if isinstance(estimator, str) else getattr(
        estimator, '__name__', repr(estimator))
    self.estimator = estimators.get(estimator) if isinstance(estimator, str) else estimator
    self.target, self.tx = target, tx
    self.user_model = model if isinstance(model, nnx.Module) else None
    self.input_shape = tuple(np.shape(example_input))[1:]
    self.model = _adapter(model, example_input, train_kwarg=train_kwarg, keep_whole=keep_whole,
                          prune_marked=prune_marked)
    # Before anything is counted at smaller widths: the groups describe the parameters and the
    # network runs narrower (abstractly: nothing compiled), else an error names the group.
    checks.check_coverage(self.model, self.input_shape)
    checks.check_runs_narrower(self.model, self.input_shape)
    check_target_feasible(target, self.model, self.input_shape, self.schedule.constraints)
    self.full = FullSize.of(self.model, self.input_shape)
    # primitives of the full forward pass: every smaller network must run the same ones
    self.structure = checks.structure(self.model, self.input_shape)
    self.calls = 0          # host-side: calls of step() so far
    self.prune_steps = 0
    self.done = False
    self.history: list[dict[str, Any]] = []

  # -- what the model is now -------------------------------------------------------------------
  @property
  def groups(self):
    """The channel groups at the current widths (each with ``prunable`` and ``reason``)."""
    return self.model.groups()

  @property
  def widths(self) -> dict[str, int]:
    return dict(self.model.widths)

  def apply(self, variables, x, *, train: bool = False, mutable: Any = False, rngs: Any = None):
    """The current (possibly pruned) network: ``apply({'params', 'batch_stats'}, x)``; with
    ``train=True, mutable=['batch_stats']`` returns ``(out, {'batch_stats': ...})``. Jit a step
    that calls it again after a pruning step (shapes change, so jit retraces on its own).
    ``rngs``: for a model with dropout, a new key each training step (Linen: the ``'dropout'``
    stream; NNX: every RNG stream, reseeded from it) or ``{stream: key}``."""
    return self.model.apply(variables, x, train=train, mutable=mutable,
                            **({} if rngs is None else {'rngs': rngs}))

  # -- device side ---------------------------------------------------------------------------------
  def init(self) -> PrunerState:
    """Zero scores for the current widths."""
    zeros = {k: jnp.zeros((w,), jnp.float32) for k, w in self.model.widths.items()}
    return PrunerState(score_sum=zeros, score_count=jnp.zeros((), jnp.int32),
                       score_ema=dict(zeros))

  def scores(self, params, grads, *, batch_stats: Any = None, batch: Any = None,
             axis_name: Optional[str] = None, step: Any = None, rngs: Any = None
             ) -> dict[str, jax.Array]:
    """One minibatch's per-unit scores (jittable). ``grads``: ``dL/dparams`` of your step
    (same tree as ``params``; inside a data-parallel step, give ``axis_name`` and un-averaged
    per-device gradients, or averaged ones and no ``axis_name``). ``batch``
    (``{'image', 'label'}``) only for estimators that run the model (Hessian products, FG);
    ``rngs``: then the step's dropout key, as given to :meth:`apply`. In an ``nnx.jit`` step,
    ``params`` may be the NNX model itself and ``grads`` the ``nnx.State`` of ``nnx.grad``."""
    if isinstance(params, nnx.Module):
      v = nnx_variables(params)
      params, batch_stats = v['params'], batch_stats or v['batch_stats']
    params, grads = _pure_params(params), _pure_params(grads)
    groups = self.model.groups()
    grads = jax.lax.pmean(grads, axis_name) if axis_name is not None else grads
    ctx = estimators.ScoreContext(
        self.model, groups, params, batch_stats or {},
        {k: jnp.ones((w,), jnp.float32) for k, w in self.model.widths.items()},
        batch if batch is not None else _NoBatch(self.estimator_name), train=True,
        axis_name=axis_name, step=step, rngs=rngs)
    ctx.set_grads(grads, masking.gate_grads_from_params(groups, params, grads))
    return {k: jnp.asarray(v, jnp.float32) for k, v in self.estimator(ctx).items()}

  def accumulate(self, state: PrunerState, params, grads, **kwargs) -> PrunerState:
    """``state`` with this minibatch's :meth:`scores` added (jittable; kwargs as there)."""
    s = self.scores(params, grads, **kwargs)
    return state.replace(score_sum={k: state.score_sum[k] + s[k] for k in state.score_sum},
                         score_count=state.score_count + 1)

  # -- host side -----------------------------------------------------------------------------------
  def step(self, state: PrunerState, variables: Any, opt_state: Any = None
           ) -> Optional[PruneStep]:
    """Call once per training step, after it. Every ``frequency``-th call (until the target is
    reached) prunes: ranks the period's scores, removes the lowest units from ``variables`` and
    ``opt_state`` and returns a :class:`PruneStep`; otherwise returns None without reading
    anything from the device.

    NNX objects as they are: ``step(pstate, model, optimizer)`` with the model given to the
    Pruner and its ``nnx.Optimizer`` prunes both in place (the PruneStep's variables and
    opt_state are then the same arrays in pure form)."""
    # Checked at every call (cheap), not only when a pruning step is due.
    optimizer = opt_state if isinstance(opt_state, nnx.Optimizer) else None
    if isinstance(variables, nnx.Module) and variables is not self.user_model:
      raise ValueError('Pruner.step got an NNX model other than the one the Pruner was built '
                       'with (the Pruner prunes that object in place): pass that model')
    if optimizer is not None and not isinstance(variables, nnx.Module):
      raise ValueError('Pruner.step got an nnx.Optimizer: pass the NNX model with it, '
                       'step(pstate, model, optimizer)')
    self.calls += 1
    if self.done or self.calls % self.schedule.frequency:
      return None
    if isinstance(variables, nnx.Module):
      variables = nnx_variables(variables)
    if optimizer is not None:
      if self.tx is not None and self.tx is not optimizer.tx:
        raise ValueError('the nnx.Optimizer has another tx than Pruner(tx=...): pass the same '
                         'one, or none to the Pruner')
      self.tx = optimizer.tx
      opt_state = _nnx_opt_state(optimizer)
    if opt_state is not None and self.tx is None:
      raise ValueError('Pruner.step got an opt_state but the Pruner has no tx: pass '
                       'Pruner(..., tx=your_optimizer) so its state can be shrunk')
    host = jax.device_get(state)
    groups = self.model.groups()
    estimators.check_scores(self.estimator_name, host.score_sum, groups,
                            f'summed over the pruning period ending at call {self.calls}')
    ones = {k: np.ones((w,), np.float32) for k, w in self.model.widths.items()}
    ema, masks = prune_period(self.model, self.input_shape, ones, host.score_sum,
                              int(host.score_count), host.score_ema, first=self.prune_steps == 0,
                              target=self.target, schedule=self.schedule, full=self.full)
    smaller = self.model.clone(widths=surgery.new_widths(self.model.widths, masks))
    # before anything changes: a layer that decides its structure from its widths (a shortcut
    # added when in_ch == out_ch) would silently compute something else after surgery
    checks.check_structure(self.structure, smaller, self.input_shape)
    new_vars, new_opt = self._shrink(groups, variables, opt_state, masks)
    self.model = smaller
    self.prune_steps += 1
    self.load(new_vars)
    if optimizer is not None:
      _set_nnx_opt_state(optimizer, self.user_model, new_opt)
    record = {'prune_step': self.prune_steps, 'call': self.calls,
              **size_record(self.model, self.input_shape, new_vars['params'], self.full),
              'widths': self.widths,
              'removed': {k: np.flatnonzero(m == 0).tolist() for k, m in masks.items()
                          if not np.all(m)}}
    self.done = (self.target.reached(self.full.units, record['units_kept'],
                                     record['flops_ratio'], record['params_ratio'])
                 or self.prune_steps >= self.schedule.max_steps)
    record['done'] = self.done
    self.history.append(record)
    new_state = PrunerState(
        score_sum={k: jnp.zeros((w,), jnp.float32) for k, w in self.model.widths.items()},
        score_count=jnp.zeros((), jnp.int32),
        score_ema={k: jnp.asarray(v[np.flatnonzero(masks[k])], jnp.float32)
                   for k, v in ema.items()})
    return PruneStep(new_vars, new_opt, new_state, record)

  # -- saving and resuming -------------------------------------------------------------------------
  def state_dict(self) -> dict[str, Any]:
    """The host-side progress (widths, call and pruning-step counters, history), JSON-ready.

    Save it with your checkpoint of ``variables``, ``opt_state`` and the :class:`PrunerState`
    (their shapes follow the widths); to resume, build the Pruner as before and :meth:`restore`."""
    return json.loads(json.dumps(
        {'setup': self._setup(), 'widths': self.widths, 'calls': self.calls,
         'prune_steps': self.prune_steps, 'done': self.done, 'history': self.history},
        default=lambda o: o.item() if isinstance(o, np.generic) else o.tolist()))

  def restore(self, saved: Mapping[str, Any]) -> None:
    """Brings a Pruner just built (same model, example input, target, estimator, schedule)
    to the progress of :meth:`state_dict`: the network takes the saved widths (an NNX model
    given to the Pruner is shrunk in place; its weights are placeholders until
    ``load(your restored variables)``) and the counters and history continue. Restore your
    checkpoint's arrays with the shapes of :meth:`abstract_variables` (and ``tx.init`` of them).
    Raises, naming the difference, if the Pruner was built otherwise or has already stepped."""
    if self.calls or self.history:
      raise ValueError(f'Pruner.restore needs a Pruner just built; this one has been called '
                       f'{self.calls} time(s)')
    diff = {k: (v, self._setup().get(k)) for k, v in saved['setup'].items()
            if self._setup().get(k) != v}
    if diff:
      raise ValueError('the saved pruning progress is of another Pruner set-up: ' + '; '.join(
          f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in diff.items()) +
          '. Build the Pruner with the same model, example input, target, estimator and schedule.')
    widths = {k: int(v) for k, v in saved['widths'].items()}
    self.model = self.model.clone(widths=widths)
    if self.user_model is not None:
      sliced = self.model._slice_to_widths(nnx_variables(self.user_model))
      self.load(sliced)
    self.calls, self.prune_steps = int(saved['calls']), int(saved['prune_steps'])
    self.done, self.history = bool(saved['done']), list(saved['history'])

  def abstract_variables(self) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of the current widths as ``jax.ShapeDtypeStruct`` (what a
    checkpoint restore needs, e.g. ``orbax``'s ``args.StandardRestore``)."""
    v = checks.abstract_init(self.model, self.input_shape)
    return {'params': v['params'], 'batch_stats': v.get('batch_stats', {})}

  def _setup(self) -> dict[str, Any]:
    return {'full_widths': dict(self.full.widths), 'input_shape': list(self.input_shape),
            'target': self.target.describe(), 'estimator': self.estimator_name,
            'schedule': repr(self.schedule)}

  def load(self, variables: Mapping[str, Any]) -> Optional[nnx.Module]:
    """Puts ``variables`` (of the current widths) into the NNX model given to the Pruner and
    returns it (its structure already follows every pruning step; its weights are those of the
    last pruning step until this call). For a Linen module, returns None: run
    ``pruner.apply(variables, x)``, or ``taylor_jax.resize.linen_apply(module, variables, x)``."""
    if self.user_model is None:
      return None
    merged = jax.tree.map(lambda a: a, dict(variables['params']))
    any_model._deep_update(merged, variables.get('batch_stats', {}))
    resize.nnx_load_state(self.user_model, merged)
    return self.user_model

  def _shrink(self, groups, variables, opt_state, masks):
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    # The smaller arrays go back with the shardings the old ones had (replicated over a
    # data-parallel mesh stays replicated, not gathered onto one device).
    shardings = jax.tree.map(lambda a: getattr(a, 'sharding', None), (variables, opt_state))
    # on the host, in numpy: eager jax gathers would compile one program per array shape
    variables, opt_state = jax.device_get((variables, opt_state))
    sels = surgery.axis_selections(groups, variables, masks)
    new_vars = surgery.apply_selections(variables, sels)
    new_opt = (None if opt_state is None else
               surgery.shrink_opt_state(self.tx, opt_state, variables['params'], sels))
    return _put_like((new_vars, new_opt), shardings)

  def summary(self) -> str:
    """The pruning history and every group's width now, as markdown tables."""
    lines = [f'Target: {self.target.describe()}; estimator {self.estimator_name}; '
             f'{self.full.units} prunable units, {self.full.flops:,} MACs at the start.', '',
             '| step | call | units kept | MACs | FLOPs cut | params |', '|---|---|---|---|---|---|']
    for r in self.history:
      lines.append(f"| {r['prune_step']} | {r['call']} | {r['units_kept']} | {r['flops']:,} | "
                   f"{1 - r['flops_ratio']:.1%} | {r['params']:,} |")
    lines += ['', '| group | kind | width (full -> now) | pruned | kept whole because |',
              '|---|---|---|---|---|']
    for g in self.model.groups():
      full = self.full.widths[g.name]
      lines.append(f'| {g.name} | {g.kind} | {full} -> {g.width} | {1 - g.width / full:.0%} | '
                   f'{"" if g.prunable else g.reason.split(" (")[0]} |')  # full: Pruner.groups
    return '\n'.join(lines)


def prune_once(model: Any, variables: Optional[Mapping[str, Any]], batches: Iterable[Any], *,
               target: Target, loss_fn: Optional[Callable[[Any, Any], Any]] = None,
               train: bool = False, max_rounds: int = 100, **options: Any
               ) -> tuple[dict[str, Any], Pruner]:
  """One-shot pruning of a trained model: scores summed over ``batches`` (``(x, y)`` pairs),
  then the lowest units removed (across groups, or per group with ``scope='local'``) until
  ``target`` is crossed, in one surgery. With a ``tolerance`` option a step may stop short of a
  cost target; the smaller network is then scored again on the same batches, up to
  ``max_rounds`` rounds.

  Args:
    model: a Linen module, an NNX module (``variables=None``: its own; pruned in place) or a
      taylor_jax model.
    variables: ``{'params', 'batch_stats'}`` of the trained model (Linen, zoo).
    batches: iterable of ``(x, y)``; ``x[:2]`` of the first is the example input.
    target: where to stop (:class:`Target`); reached, or an error says why.
    loss_fn: ``(logits, y) -> scalar``; default: softmax cross-entropy, integer labels.
    train: BatchNorm mode while scoring (default False: the trained statistics).
    max_rounds: scoring rounds at most (see above).
    options: :class:`Pruner` arguments (``estimator``, ``train_kwarg``, ``keep_whole``,
      ``constraints``, ``normalize``, ``rank_by``, ...).

  Returns ``(smaller variables, pruner)``: ``pruner.apply`` runs the smaller network,
  ``pruner.history[-1]`` is the record (widths, MACs, parameters, removed units).
  """
  loss_fn = loss_fn or (lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
      logits, y).mean())
  batches = iter(batches)
  try:
    x0, y0 = next(batches)
  except StopIteration:
    raise ValueError('prune_once needs at least one (x, y) batch to score the units on') from None
  unknown = {'frequency', 'units_per_step', 'max_steps'} & set(options)
  if unknown:
    raise TypeError(f'prune_once prunes in one step: {sorted(unknown)} do not apply to it; '
                    'leave them out (or use Pruner for an iterative schedule)')
  # One shot: units go in score order until the target is crossed (tolerance ~1: the crossing
  # chunk goes however far it overshoots; a smaller tolerance replaces it by chunks that fall
  # short, one per round, which can empty a small layer: engine.prune_lowest).
  options.setdefault('tolerance', 0.999)
  pr = Pruner(model, np.asarray(x0)[:2], target=target, frequency=1,
              units_per_step=np.iinfo(np.int32).max, **options)
  if variables is None:
    if pr.user_model is None:
      raise ValueError('prune_once needs the variables of a Linen or zoo model')
    variables = nnx_variables(pr.user_model)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

  @jax.jit  # variables as an argument: captured, they would be compiled in as constants
  def accumulate(pstate, variables, x, y):
    def loss(params):
      out = pr.apply({**variables, 'params': params}, x, train=train,
                     mutable=['batch_stats'] if train else False)
      return loss_fn(out[0] if train else out, y)
    grads = jax.grad(loss)(variables['params'])
    return pr.accumulate(pstate, variables['params'], grads,
                         batch_stats=variables['batch_stats'], batch={'image': x, 'label': y})

  # Usually one step. A cost target that every chunk left would overshoot by more than the
  # tolerance stops short, taking a small chunk that falls short (engine.prune_lowest), one per
  # step: the rest is scored again on the smaller network until the target is reached.
  batches = list(itertools.chain([(x0, y0)], batches))
  for _ in range(max_rounds):
    pstate = pr.init()
    for x, y in batches:
      pstate = accumulate(pstate, variables, x, y)
    variables = pr.step(pstate, variables).variables
    if pr.done:
      break
  if not pr.done:
    last = pr.history[-1]
    raise ValueError(f'prune_once stopped short of {target.describe()} after '
                     f'{len(pr.history)} steps: {last["units_kept"]} units kept, '
                     f'{1 - last["flops_ratio"]:.1%} fewer FLOPs (the constraints leave no more '
                     f'units to remove, or the target tolerance no chunk that fits)')
  return variables, pr
