"""Train state, optimizer, and the data-parallel train and eval steps.

The train step is ``jax.jit`` of a ``jax.shard_map``-ped per-device step over a 1-D ``data``
mesh of all devices (what ``jax.pmap`` lowers to today): every device gets its slice of the
global batch, BatchNorm synchronises batch statistics over ``data`` (so N devices compute what
one device computes on the whole batch), and gradients are ``pmean``-ed. The pruning masks are
part of the state and enter the forward pass as the gates of :mod:`taylor_jax.groups`; the
gradient with respect to the gates comes out of the same backward pass (for a gate right after
a BatchNorm, from that BN's scale and bias gradients), so an importance estimator can accumulate
its scores inside the step for almost nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from taylor_jax import estimators as est_lib
from taylor_jax import losses, masking

DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a checkpoint saves exactly this (plus JSON metadata).

  Attributes:
    step: global optimizer step (int32 scalar).
    params, batch_stats: network variables (shapes follow the current widths).
    opt_state: optax state (mirrors params).
    masks: group -> ``(width,)`` float32 0/1 gates.
    score_sum: group -> ``(width,)`` importance summed over the current pruning period.
    score_count: number of minibatches in ``score_sum`` (int32 scalar).
    score_ema: group -> ``(width,)`` EMA of the period means across pruning steps.
    prune_steps: pruning steps done so far (int32 scalar).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  masks: Any
  score_sum: Any
  score_count: jax.Array
  score_ema: Any
  prune_steps: jax.Array


def zeros_like_masks(masks: Mapping[str, Any]) -> dict[str, jax.Array]:
  return {k: jnp.zeros_like(v) for k, v in masks.items()}


def create_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


# --- optimizer -------------------------------------------------------------------------------

def create_learning_rate(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                         total_steps: int) -> optax.Schedule:
  """``optim.schedule``: 'constant', 'cosine' (to 0 over ``total_steps``, optional linear
  warmup of ``optim.warmup_epochs``) or 'step' (x ``optim.decay_factor`` at each epoch in
  ``optim.decay_epochs``)."""
  lr = optim.learning_rate
  warmup = int(round(optim.get('warmup_epochs', 0) * steps_per_epoch))
  if optim.schedule == 'constant':
    sched = optax.constant_schedule(lr)
  elif optim.schedule == 'cosine':
    sched = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
  elif optim.schedule == 'step':
    sched = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warmup: optim.decay_factor for e in optim.decay_epochs})
  else:
    raise ValueError(f"unknown optim.schedule {optim.schedule!r}: use 'constant', 'cosine' or "
                     "'step'")
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
  return sched


def create_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and L2 weight decay added to the gradient (as torch.optim.SGD)."""
  sched = create_learning_rate(optim, steps_per_epoch, total_steps)
  if optim.name == 'sgd':
    opt = optax.sgd(sched, momentum=optim.momentum or None, nesterov=optim.get('nesterov', False))
  elif optim.name == 'adam':
    opt = optax.adam(sched)
  else:
    raise ValueError(f"unknown optim.name {optim.name!r}: use 'sgd' or 'adam'")
  return optax.chain(optax.add_decayed_weights(optim.weight_decay), opt)


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
                       masks: Optional[Mapping[str, Any]] = None,
                       widths: Optional[Mapping[str, int]] = None) -> TrainState:
  """A fresh state; masks default to all ones of ``widths``."""
  if masks is None:
    masks = {k: jnp.ones((w,), jnp.float32) for k, w in widths.items()}
  masks = {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), masks=masks,
      score_sum=zeros_like_masks(masks), score_count=jnp.zeros((), jnp.int32),
      score_ema=zeros_like_masks(masks), prune_steps=jnp.zeros((), jnp.int32))


# --- steps -------------------------------------------------------------------------------------

def _top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  k = min(k, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


# XLA:CPU options of the jitted train step: YNNPACK for reductions only. By default XLA:CPU gives
# YNNPACK the convolutions' weight gradients (convolutions with a whole-image window), which took
# 44% of ResNet-20's train step; its Eigen convolutions run them faster. Reductions stay on
# YNNPACK: without it BatchNorm's statistics become slow reduce-window loops
# (experiments/results/profile_train_step.md, experiments/README.md "Train-step speed").
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


def compiler_options(options: Any = 'auto') -> Optional[dict[str, Any]]:
  """``'auto'``: :data:`CPU_COMPILER_OPTIONS` on the CPU backend, none elsewhere."""
  if isinstance(options, str) and options == 'auto':
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == 'cpu' else None
  return options


def make_train_step(model, tx: optax.GradientTransformation, mesh: Mesh,
                    estimator: Optional[est_lib.Estimator] = None,
                    groups=None, xla_options: Any = 'auto', dropout_seed: int = 0
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted data-parallel train step ``(state, batch) -> (state, metrics)``.

  ``batch`` holds global arrays sharded over ``data`` (see :func:`shard_batch`); ``metrics``:
  ``loss``, ``accuracy``, ``grad_norm`` (global norm of the gradient) and ``params_finite``
  (whether every updated weight is finite). With an
  ``estimator``, its per-unit scores of this minibatch (zeroed at pruned units) are added to
  ``state.score_sum``. ``xla_options``: compiler options of the jit (see
  :func:`compiler_options`). A model whose ``apply`` takes ``rngs`` (a user's Linen or NNX model:
  dropout) gets the key ``fold_in(fold_in(key(dropout_seed), step), device index)``: a new mask
  every step and device, the same again after a resume.
  """
  sync_model = model.clone(axis_name=DATA_AXIS)
  takes_rngs = est_lib.takes_rngs(model)
  groups = tuple(model.groups()) if groups is None else tuple(groups)
  after_norm = {g.name for g in groups if g.gate_after_norm}

  def per_device(state: TrainState, batch):
    rngs = {}
    if takes_rngs:
      key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
      rngs = {'rngs': jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))}
    ctx = est_lib.ScoreContext(sync_model, groups, state.params, state.batch_stats, state.masks,
                               batch, train=True, axis_name=DATA_AXIS, step=state.step,
                               rngs=rngs.get('rngs'))

    # Gates right after a BN get dL/dz from the BN gradients (masking.gate_grads_from_norm);
    # only the others are differentiated, which saves a reduction over their activations.
    fixed_gates = {k: v for k, v in state.masks.items() if k in after_norm}
    diff_gates = {k: v for k, v in state.masks.items() if k not in after_norm}

    def loss_fn(params, diff_gates):
      logits, updates = sync_model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
          gates={**fixed_gates, **diff_gates}, train=True, mutable=['batch_stats'], **rngs)
      loss = jnp.mean(losses.cross_entropy(logits, batch['label']))
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), (grads, gate_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, diff_gates)
    grads, gate_grads, batch_stats = jax.lax.pmean((grads, gate_grads, batch_stats), DATA_AXIS)
    gate_grads = {**gate_grads, **masking.gate_grads_from_norm(groups, state.params, grads)}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state)
    if estimator is not None:
      ctx.set_grads(grads, gate_grads)
      scores = estimator(ctx)
      new = new.replace(
          score_sum={k: state.score_sum[k] + scores[k].astype(jnp.float32) * state.masks[k]
                     for k in state.score_sum},
          score_count=state.score_count + 1)
    metrics = jax.lax.pmean({'loss': loss,
                             'accuracy': jnp.mean(_top_k_correct(logits, batch['label'], 1))},
                            DATA_AXIS)
    # Of the device-averaged gradient and the updated weights (the same on every device): a
    # NaN gradient, or an update that overflows, leaves this step's loss finite but the weights
    # not; run.py stops at the step, before saving them.
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['params_finite'] = jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params),
        jnp.asarray(True))
    return new, metrics

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                       out_specs=(P(), P()), check_vma=False)
  # Shardings declared: a state still on the host (numpy, after surgery) is placed by the jit
  # and runs the program a replicated state runs, instead of compiling a second one for it.
  return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options(xla_options),
                 in_shardings=(_replicated(mesh), NamedSharding(mesh, P(DATA_AXIS))),
                 out_shardings=_replicated(mesh))


def make_eval_step(model, mesh: Mesh) -> Callable[..., dict[str, jax.Array]]:
  """Jitted ``(params, batch_stats, masks, batch) -> sums`` of loss, top-1, top-5 and weight
  over the global batch (padding examples have weight 0)."""

  def per_device(params, batch_stats, masks, batch):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                         gates=masks, train=False)
    w = batch['weight']
    sums = {'loss': jnp.sum(losses.cross_entropy(logits, batch['label'], w)),
            'top1': jnp.sum(_top_k_correct(logits, batch['label'], 1) * w),
            'top5': jnp.sum(_top_k_correct(logits, batch['label'], 5) * w),
            'count': jnp.sum(w)}
    return jax.lax.psum(sums, DATA_AXIS)

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(DATA_AXIS)),
                       out_specs=P(), check_vma=False)
  rep = _replicated(mesh)
  return jax.jit(step, in_shardings=(rep, rep, rep, NamedSharding(mesh, P(DATA_AXIS))),
                 out_shardings=rep)


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's part of a global batch -> global arrays sharded over ``data``."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a host tree on every device of ``mesh`` (replicated)."""
  return jax.device_put(tree, _replicated(mesh))


def evaluate(eval_step, state: TrainState, mesh: Mesh, batches) -> dict[str, float]:
  """Mean loss, top-1 and top-5 accuracy over every batch of an eval split."""
  total = None
  for local in batches:
    sums = eval_step(state.params, state.batch_stats, state.masks, shard_batch(mesh, local))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  total = jax.device_get(total)
  n = max(float(total['count']), 1.0)
  return {'loss': float(total['loss']) / n, 'accuracy': float(total['top1']) / n,
          'top5_accuracy': float(total['top5']) / n, 'examples': int(total['count'])}
