"""Variational CNN pruning (Zhao et al., CVPR 2019) in channel groups.

The paper rewrites BatchNorm as ``y = gamma * (x_hat + beta~)``: one *channel saliency* ``gamma``
scales the whole normalised output of a channel, and ``gamma`` gets a Gaussian variational
posterior ``q(gamma) = N(mu, sigma^2)``. Here every prunable group ``g`` (:mod:`taylor_jax.groups`)
gets one saliency per unit, ``z_g ~ N(mu_g, sigma_g^2)``, which multiplies the scale AND the bias of
EVERY BatchNorm of the group (its ``'norm'`` slices): ``scale = z * scale0``, ``bias = z * bias``,
with ``scale0`` the BatchNorm scale at the start of the method, FROZEN (1 from initialisation, so
the layer is exactly the paper's form; a trained ``scale0`` when starting from a checkpoint, so
the run starts from the trained function). A residual stream shares one ``z`` across the
BatchNorms that feed it (stem, every block's bn2, projections), so ``z_c = 0`` zeroes channel
``c`` everywhere and removing it is exact.

Training (``prune.variational.epochs``, SGD as ``optim``, cosine): the reparameterisation trick,
one ``eps ~ N(0, 1)`` per unit per step (shared by the minibatch), ``z = mu + sigma eps``; loss =
minibatch-mean cross-entropy + ``kl_weight * sum_units KL(q || p)`` with the sparsity prior
``p = N(0, prior_sigma^2)`` (a narrow spike at zero), in closed form::

    KL(N(mu, s^2) || N(0, p^2)) = log(p / s) + (s^2 + mu^2) / (2 p^2) - 1/2

(``kl_weight = 1 / train_size`` is the per-example ELBO; larger values prune harder). ``mu``
starts at 1, ``log sigma`` at ``log(init_sigma)``; neither gets weight decay.

Pruning (``rule``): ``'target'`` -- the units with the smallest ``|mu|`` go, globally, until the
``prune.target_*`` is reached (:func:`taylor_jax.methods.prune_to_target`, the engine's
constraints); ``'threshold'`` (the paper's rule, any target is ignored) -- every unit whose
posterior sits near zero goes, ``|mu| < mean_threshold`` and ``sigma^2 < var_threshold``, as far as
the constraints allow (each group keeps its highest-``|mu|`` units, kept width rounded up to the
alignment); ``'auto'`` (default) -- 'target' when a target is set, else 'threshold'. Surgery folds the posterior mean into the kept
channels (``scale = mu * scale0``, ``bias = mu * bias``; removed units have ``z = 0``), so the
pruned network computes exactly the variational network's eval-time output (``z = mu`` on kept
units, 0 on removed ones). No retraining is needed; ``prune.finetune_epochs > 0`` fine-tunes.

Every prunable group needs a BatchNorm (validated): the zoo's LeNet3 has none.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from taylor_jax import engine, losses, methods, models, train
from taylor_jax.groups import ChannelGroup, Path, get_path

OPTIONS = {'epochs': 10.0, 'kl_weight': 1e-4, 'prior_sigma': 0.1, 'init_sigma': 0.05,
           'rule': 'auto', 'mean_threshold': 0.05, 'var_threshold': 0.04, 'seed': 0}
RULES = ('auto', 'target', 'threshold')


def _validate(c) -> None:
  o = c.prune.variational
  for key in ('prior_sigma', 'init_sigma'):
    if not o[key] > 0:
      raise ValueError(f'invalid config: prune.variational.{key}={o[key]}: must be > 0')
  for key in ('epochs', 'kl_weight', 'mean_threshold', 'var_threshold'):
    if not o[key] >= 0:
      raise ValueError(f'invalid config: prune.variational.{key}={o[key]}: must be >= 0')
  if o.rule not in RULES:
    raise ValueError(f'invalid config: prune.variational.rule={o.rule!r}: use one of {list(RULES)}')
  if o.rule == 'target' and not _has_target(c):
    raise ValueError("invalid config: prune.variational.rule='target' but no prune.target_* is "
                     "set; set one, or use rule='threshold'")
  model = models.create(c.model, 10)
  bare = [g.name for g in model.groups() if g.prunable and not _norm_slices(g)]
  if bare:
    raise ValueError(f'invalid config: prune.method=variational puts the channel saliency on '
                     f'BatchNorm, but model {c.model!r} has prunable groups without one: '
                     f'{bare[:4]}{"..." if len(bare) > 4 else ""}; use a model with BatchNorm '
                     'on every prunable group (ResNets, VGG-BN, DenseNet)')


# --- the posterior and its KL ------------------------------------------------------------------

def kl_normal(mu, log_sigma, prior_sigma: float):
  """Elementwise ``KL(N(mu, sigma^2) || N(0, prior_sigma^2))`` in closed form."""
  var = jnp.exp(2 * log_sigma)
  return (jnp.log(prior_sigma) - log_sigma + (var + jnp.square(mu)) / (2 * prior_sigma ** 2)
          - 0.5)


def init_posterior(groups: Sequence[ChannelGroup], init_sigma: float) -> dict[str, dict]:
  """``{'mu': {group: ones}, 'log_sigma': {group: log(init_sigma)}}`` for every prunable group."""
  prunable = [g for g in groups if g.prunable]
  return {'mu': {g.name: jnp.ones((g.width,), jnp.float32) for g in prunable},
          'log_sigma': {g.name: jnp.full((g.width,), np.log(init_sigma), jnp.float32)
                        for g in prunable}}


def total_kl(post: Mapping[str, Mapping[str, Any]], prior_sigma: float):
  return sum(jnp.sum(kl_normal(post['mu'][k], post['log_sigma'][k], prior_sigma))
             for k in post['mu'])


# --- the saliency on BatchNorm -------------------------------------------------------------------

def _norm_slices(g: ChannelGroup):
  return [s for s in g.slices if s.role == 'norm' and s.path[0] == 'params'
          and s.path[-1] in ('scale', 'bias')]


def _set_path(tree: Mapping[str, Any], path: Path, value: Any) -> dict:
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set_path(tree[path[0]], path[1:], value)
  return out


def apply_saliency(groups: Sequence[ChannelGroup], params: Mapping[str, Any],
                   scale0: Mapping[Path, Any], z: Mapping[str, Any]) -> dict:
  """``params`` with every BatchNorm of the groups in ``z`` scaled per unit: ``scale = z *
  scale0``, ``bias = z * bias`` (``scale0``: path -> frozen scale; positions of other groups keep
  factor 1)."""
  factors: dict[Path, Any] = {}
  for g in groups:
    if g.name not in z:
      continue
    for s in _norm_slices(g):
      n = scale0[s.path[:-1] + ('scale',)].shape[0]
      f = factors.get(s.path[:-1], jnp.ones((n,), jnp.float32))
      factors[s.path[:-1]] = f.at[s.positions(np.arange(g.width), n)].set(z[g.name])
  out = {'params': params}
  for bn, f in factors.items():
    scale, bias = scale0[bn + ('scale',)], get_path(out, bn + ('bias',))
    out = _set_path(out, bn + ('scale',), (f * scale).astype(scale.dtype))
    out = _set_path(out, bn + ('bias',), (f * bias).astype(bias.dtype))
  return out['params']


def frozen_scales(groups: Sequence[ChannelGroup], params: Mapping[str, Any]) -> dict[Path, Any]:
  """Path of every BatchNorm scale a prunable group touches -> its current value."""
  return {s.path[:-1] + ('scale',): get_path({'params': params}, s.path[:-1] + ('scale',))
          for g in groups if g.prunable for s in _norm_slices(g)}


# --- training ------------------------------------------------------------------------------------

@flax.struct.dataclass
class VarState:
  step: jax.Array
  params: Any
  batch_stats: Any
  post: Any  # {'mu': {group: (w,)}, 'log_sigma': {group: (w,)}}
  opt_state: Any
  post_opt_state: Any


def make_step(model, groups, tx, post_tx, mesh, kl_weight: float, prior_sigma: float, seed: int):
  """Jitted data-parallel step ``(state, scale0, batch) -> (state, metrics)`` of the
  variational net (``scale0``: :func:`frozen_scales`, replicated)."""
  sync_model = model.clone(axis_name=train.DATA_AXIS)
  names = sorted(g.name for g in groups if g.prunable)

  def per_device(vs: VarState, scale0, batch):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), vs.step)  # same on every device

    def loss_fn(params, post):
      z = {k: post['mu'][k] + jnp.exp(post['log_sigma'][k]) *
           jax.random.normal(jax.random.fold_in(key, i), post['mu'][k].shape)
           for i, k in enumerate(names)}
      logits, upd = sync_model.apply(
          {'params': apply_saliency(groups, params, scale0, z), 'batch_stats': vs.batch_stats},
          batch['image'], train=True, mutable=['batch_stats'])
      ce = jnp.mean(losses.cross_entropy(logits, batch['label']))
      kl = total_kl(post, prior_sigma)
      return ce + kl_weight * kl, (ce, kl, logits, upd['batch_stats'])

    (loss, (ce, kl, logits, bs)), (gp, gq) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(vs.params, vs.post)
    gp, gq, bs = jax.lax.pmean((gp, gq, bs), train.DATA_AXIS)
    up, opt_state = tx.update(gp, vs.opt_state, vs.params)
    uq, post_opt_state = post_tx.update(gq, vs.post_opt_state, vs.post)
    new = vs.replace(step=vs.step + 1, params=optax.apply_updates(vs.params, up),
                     post=optax.apply_updates(vs.post, uq), batch_stats=bs, opt_state=opt_state,
                     post_opt_state=post_opt_state)
    acc = jnp.mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32))
    metrics = jax.lax.pmean({'loss': loss, 'ce': ce, 'kl': kl, 'accuracy': acc},
                            train.DATA_AXIS)
    return new, metrics

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(train.DATA_AXIS)),
                       out_specs=(P(), P()), check_vma=False)
  return jax.jit(step, donate_argnums=(0,))


# --- pruning decision ----------------------------------------------------------------------------

def threshold_masks(mu: Mapping[str, Any], sigma: Mapping[str, Any],
                    groups: Sequence[ChannelGroup], full_widths: Mapping[str, int], constraints,
                    mean_threshold: float, var_threshold: float) -> dict[str, np.ndarray]:
  """Masks without the units whose posterior sits near zero (``|mu| < mean_threshold`` and
  ``sigma^2 < var_threshold``), as far as the constraints allow: a group keeps at least
  ``constraints.min_kept`` units, its kept width rounded UP to a multiple of ``align`` (for
  groups at least ``align`` wide), its highest-``|mu|`` units."""
  out = {}
  for g in groups:
    m = np.ones(g.width, np.float32)
    if g.prunable:
      a, s = np.abs(np.asarray(mu[g.name])), np.asarray(sigma[g.name])
      near_zero = (a < mean_threshold) & (np.square(s) < var_threshold)
      keep = max(g.width - int(near_zero.sum()), constraints.floor_of(g, full_widths[g.name]))
      k = constraints.align_of(g)
      if k > 1 and full_widths[g.name] >= k:
        keep = min(g.width, -(-keep // k) * k)
      m[np.argsort(a, kind='stable')[:g.width - keep]] = 0.0
    out[g.name] = m
  return out


def _has_target(c) -> bool:
  return engine.Target.from_config(c.prune) is not None


@methods.register('variational', options=OPTIONS, validate=_validate, needs_target=False)
def variational(ctx: methods.MethodContext) -> methods.MethodResult:
  """Train a variational-saliency network, prune near-zero saliencies, fold, surgery."""
  c, o = ctx.config, ctx.options
  model, state = ctx.model, ctx.state
  groups = tuple(model.groups())
  steps = int(round(o.epochs * ctx.steps_per_epoch))
  tx = train.create_optimizer(c.optim, ctx.steps_per_epoch, max(steps, 1))
  post_optim = ml_collections.ConfigDict(c.optim.to_dict())
  post_optim.weight_decay = 0.0  # the KL is the posterior's only regulariser
  post_tx = train.create_optimizer(post_optim, ctx.steps_per_epoch, max(steps, 1))
  scale0 = frozen_scales(groups, state.params)
  post = init_posterior(groups, o.init_sigma)
  vs = VarState(step=jnp.asarray(state.step), params=state.params, batch_stats=state.batch_stats,
                post=post, opt_state=tx.init(state.params), post_opt_state=post_tx.init(post))
  vs = train.replicate(ctx.mesh, vs)
  scale0_dev = train.replicate(ctx.mesh, scale0)
  step_fn = make_step(model, groups, tx, post_tx, ctx.mesh, o.kl_weight, o.prior_sigma, o.seed)
  start, t0 = int(state.step), time.time()
  it, logged = ctx.batches(start), []
  log_every = c.train.log_every_steps
  for i in range(steps):
    vs, metrics = step_fn(vs, scale0_dev, next(it))
    logged.append(metrics)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      m = jax.device_get(logged)
      ctx.log({'step': start + i + 1, 'phase': 'variational',
               **{k: float(np.mean([x[k] for x in m])) for k in m[0]},
               'wall_s': time.time() - t0})
      logged = []
  vs = jax.device_get(vs)
  mu = {k: np.asarray(v) for k, v in vs.post['mu'].items()}
  sigma = {k: np.exp(np.asarray(v)) for k, v in vs.post['log_sigma'].items()}

  # The variational net at eval time (z = mu), as a plain network of the zoo.
  folded = state.replace(step=vs.step, params=jax.device_get(
      apply_saliency(groups, vs.params, scale0, mu)), batch_stats=vs.batch_stats)
  ev_var = ctx.evaluate(model, folded)
  if o.rule == 'target' or (o.rule == 'auto' and _has_target(c)):
    masks = methods.prune_to_target(ctx, model, {k: np.abs(v) for k, v in mu.items()})
  else:
    masks = threshold_masks(mu, sigma, groups, ctx.full_widths, ctx.constraints,
                            o.mean_threshold, o.var_threshold)
  z = {k: mu[k] * masks[k] for k in mu}
  pruned = folded.replace(params=jax.device_get(apply_saliency(groups, vs.params, scale0, z)))
  rec = methods.history_record(ctx, 1, int(vs.step), model, masks, pruned)
  small, small_state = methods.shrink(model, pruned, masks)
  near_zero = {k: int(((np.abs(mu[k]) < o.mean_threshold) &
                       (np.square(sigma[k]) < o.var_threshold)).sum()) for k in mu}
  extra = {'near_zero_units': near_zero,
           'mu': {k: v.tolist() for k, v in mu.items()},
           'sigma': {k: v.tolist() for k, v in sigma.items()}}
  if ev_var is not None:
    extra['eval_accuracy_variational'] = ev_var['accuracy']
  return methods.MethodResult(small, small_state, [rec], extra)
