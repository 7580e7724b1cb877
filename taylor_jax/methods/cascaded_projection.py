"""Cascaded Projection (CaP; Minnehan & Savakis, CVPR 2019): learnt low-rank projections between
the two layers of every residual block, then surgery to a physically smaller network.

For each compressed group (``kind == 'channel'``: in the zoo's residual networks exactly the
groups inside residual blocks, e.g. ``stage{s}.block{b}`` = conv1 output / bn1 / conv2 input;
the residual streams are left alone, as in the paper) an orthonormal ``P`` (width x rank) maps the
producer's outputs and the consumer's inputs into one rank-dimensional space: ``W1' = W1 P``
(output axis), ``W2' = P^T W2`` (input axis).

Where P sits (``placement``):

* ``'pre'`` (default): P acts on the block's pre-activations ``u`` (bn1's output, where the gate
  sits): the trained network IS the compressed one, ``relu(u P)`` read by conv2 through ``P^T``;
  it is built by the matrix surgery of :mod:`taylor_jax.projection`
  (``GroupSelection(projection=P)``), differentiable in P. Exact: the compressed network (conv1'
  -> bn1' -> ReLU -> conv2', same architecture, width ``rank``) computes in eval mode exactly what
  was trained (bn1 is folded: bn1'(conv1'(x)) = u P for any P). Approximate: the ReLU acts on
  ``u P`` instead of ``u``, so even a full-rank P equals the original network only when it is a
  permutation (the orthogonal matrices that commute with ReLU); the reconstruction loss pulls the
  next layer's features back to the original's.
* ``'post'``: P acts on the layer outputs ``a = relu(u)`` (the paper's "project the outputs"
  read literally): trained is the full-width network whose conv2 reads ``a P P^T``, exactly the
  original for any full-rank orthogonal P. The compressed network is then the same surgery as
  for ``'pre'``, exact only where ``relu(u P) = relu(u) P`` (0/1 column selections): the step from
  the trained network to the deployed one is an approximation (measured, ResNet-8 on
  Fashion-MNIST at -42% FLOPs, 150 steps from ``init='select'``: 57% test accuracy after that
  step, against 88.5% for ``'pre'``): an ablation, not the method.

Steps of :func:`cascaded_projection` (one call, the 'prune' phase of the main job):

1. Statistics of the baseline network (BN in eval mode) over ``stat_batches`` training batches:
   per group the mean, second moment and covariance of ``u`` and the second moment of ``a``.
2. Ranks from the target (:func:`choose_ranks`): the largest keep fraction (``rank_rule='uniform'``:
   rank = fraction x width) or feature-energy threshold (``'energy'``: the fewest principal
   directions holding that share of the second moment) whose widths meet the config's target,
   FLOPs counted by :func:`taylor_jax.costs.flops` of the network with those widths; ranks honour
   ``prune.min_width`` / ``max_share`` / ``align``.
3. Initial P (:func:`initial_projection`): identity columns of the units with the most output
   energy ``E[a_c^2] |W2[..., c, :]|^2`` (``init='select'``, default: P starts as index
   pruning), or the top-rank principal directions of the features P acts on (``init='pca'``).
4. ``steps`` SGD (momentum) steps on an unconstrained proxy, re-orthonormalised after every step
   (polar factor ``U V^T`` of its SVD: the nearest orthonormal matrix, no column sign flips) so
   that P is the proxy itself at every forward pass. Loss (:func:`cap_loss`): mean cross-entropy
   of the projected network + ``recon_weight`` x :func:`reconstruction_loss` of the consumer
   layers' outputs (conv2: "the next layer's features") against the uncompressed network on the
   same batch. BatchNorm uses its running statistics (frozen) in both networks, so the objective
   is the compressed network as it is evaluated. ``train_weights``: also train every parameter
   (SGD, ``weights_learning_rate``, the optimizer's weight decay).
5. Surgery with the trained P (``cov`` sets the new BN's running variance) -> the smaller network;
   the main job fine-tunes it ('finetune' phase).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylor_jax import losses, methods, models, projection, surgery
from taylor_jax.groups import ChannelGroup, Path, get_path

OPTIONS = {
    'placement': 'pre',  # 'pre': P on bn1's output (trained == deployed); 'post': on relu output
    # 'select' (P starts as index pruning) | 'pca'. With the ReLU acting in P's basis a PCA
    # start is far from the original network (ResNet-8 at -42% FLOPs: 10% test accuracy at init
    # vs 40%; 83% vs 88.5% after 150 projection steps), so the default starts from a selection.
    'init': 'select',
    'rank_rule': 'uniform',  # 'uniform' | 'energy'
    'stat_batches': 8,  # training batches for the feature statistics
    'steps': 200,  # SGD steps on the projections
    'learning_rate': 0.01,  # of the proxies (SGD, momentum 0.9)
    'recon_weight': 1.0,  # weight of the reconstruction loss
    'train_weights': False,  # also train every parameter during the projection steps
    'weights_learning_rate': 0.001,
    'log_every': 50,
}


def _validate(c) -> None:
  o = c.prune.cascaded_projection
  checks = [
      (o.placement in ('pre', 'post'), f"placement={o.placement!r}: use 'pre' or 'post'"),
      (o.init in ('pca', 'select'), f"init={o.init!r}: use 'pca' or 'select'"),
      (o.rank_rule in ('uniform', 'energy'),
       f"rank_rule={o.rank_rule!r}: use 'uniform' or 'energy'"),
      (o.stat_batches >= 1, f'stat_batches={o.stat_batches}: must be >= 1'),
      (o.steps >= 0, f'steps={o.steps}: must be >= 0'),
      (o.learning_rate > 0, f'learning_rate={o.learning_rate}: must be > 0'),
      (o.recon_weight >= 0, f'recon_weight={o.recon_weight}: must be >= 0'),
      (o.weights_learning_rate > 0, f'weights_learning_rate={o.weights_learning_rate}: > 0'),
      (o.log_every >= 1, f'log_every={o.log_every}: must be >= 1')]
  for ok, msg in checks:
    if not ok:
      raise ValueError(f'invalid config: prune.cascaded_projection.{msg}')
  model = models.create(c.model, 10)
  if not compressed_groups(model):
    raise ValueError(f'invalid config: prune.method=cascaded_projection compresses the groups '
                     f"inside blocks (kind 'channel'); model={c.model!r} has none")


# --- groups and the modules around them ----------------------------------------------------------

def compressed_groups(model) -> tuple[ChannelGroup, ...]:
  """The prunable ``channel`` groups whose matrix surgery is defined (one producer, at most one
  BatchNorm): for the zoo's residual networks, the layers inside residual blocks."""
  out = []
  for g in model.groups():
    if g.kind != 'channel' or not g.prunable:
      continue
    try:
      projection._check_matrix_group(g, surgery.GroupSelection(projection=np.zeros((g.width, 1))))
    except ValueError:
      continue
    out.append(g)
  return tuple(out)


def _modules(g: ChannelGroup, role: str) -> list[Path]:
  return sorted({s.path[1:-1] for s in g.slices if s.role == role})


def feature_module(g: ChannelGroup) -> Path:
  """Module whose output is the group's pre-activation ``u``: its BatchNorm, else its producer."""
  return (_modules(g, 'norm') or _modules(g, 'out'))[0]


def consumer_modules(g: ChannelGroup) -> list[Path]:
  """Modules that read the group (conv2 of a block): their outputs are the next layer's
  features."""
  return _modules(g, 'in')


def _captured(inter: Mapping[str, Any], path: Path) -> Any:
  node = inter
  for k in path:
    node = node[k]
  return node['__call__'][0]


def apply_capturing(model, variables, x, paths: Sequence[Path]):
  """``(logits, {path: output})`` of an eval-mode forward pass, capturing the outputs of the
  modules at ``paths``."""
  wanted = set(paths)
  logits, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                              capture_intermediates=lambda m, name: name == '__call__' and
                              tuple(m.path) in wanted)
  return logits, {p: _captured(state['intermediates'], p) for p in paths}


# --- statistics, ranks, initial projections ----------------------------------------------------

def feature_stats(model, variables, batches, groups: Sequence[ChannelGroup],
                  num_batches: int) -> dict[str, dict[str, np.ndarray]]:
  """Per group, over ``num_batches`` batches x every spatial position: ``mean`` (C,), ``second``
  (C, C) ``E[u u^T]``, ``cov`` (C, C), ``second_post`` ``E[a a^T]`` with ``a = relu(u)``
  (float64)."""
  paths = [feature_module(g) for g in groups]

  @jax.jit
  def moments(variables, x):
    _, feats = apply_capturing(model, variables, x, paths)
    out = []
    for p in paths:
      u = feats[p].reshape(-1, feats[p].shape[-1])
      a = jax.nn.relu(u)
      hi = jax.lax.Precision.HIGHEST
      out.append((jnp.sum(u, 0), jnp.matmul(u.T, u, precision=hi),
                  jnp.matmul(a.T, a, precision=hi), u.shape[0]))
    return out

  acc = None
  for _ in range(num_batches):
    m = jax.device_get(moments(variables, next(batches)['image']))
    m = [[np.asarray(t, np.float64) for t in row] for row in m]
    acc = m if acc is None else [[x + y for x, y in zip(r0, r1)] for r0, r1 in zip(acc, m)]
  out = {}
  for g, (s, ss, aa, n) in zip(groups, acc):
    mean, second = s / n, ss / n
    out[g.name] = {'mean': mean, 'second': second, 'cov': second - np.outer(mean, mean),
                   'second_post': aa / n}
  return out


def _principal(second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a second moment."""
  w, v = np.linalg.eigh((second + second.T) / 2)
  order = np.argsort(w)[::-1]
  return np.clip(w[order], 0, None), v[:, order]


def _align_up(x: float, align: int, width: int) -> int:
  r = int(np.ceil(x - 1e-9))
  if align > 1 and width >= align:
    r = int(np.ceil(r / align) * align)
  return min(width, max(r, 1))


def ranks_at(knob: float, groups: Sequence[ChannelGroup], constraints, rule: str,
             energies: Mapping[str, np.ndarray] = None) -> dict[str, int]:
  """Ranks for a knob in [0, 1] (larger: more kept): ``'uniform'``: ``knob x width``;
  ``'energy'``: the fewest principal directions whose eigenvalues (``energies``, descending)
  hold a ``knob`` share of the total. Rounded up to ``constraints.align``, at least
  ``constraints.min_kept(width)``."""
  out = {}
  for g in groups:
    if rule == 'uniform':
      want = knob * g.width
    else:
      e = np.asarray(energies[g.name], np.float64)
      share = np.cumsum(e) / max(e.sum(), 1e-30)
      want = 1 + int(np.searchsorted(share, knob - 1e-12)) if knob > 0 else 0
    out[g.name] = max(_align_up(want, constraints.align_of(g), g.width),
                      constraints.floor_of(g, g.width))
  return out


def choose_ranks(groups: Sequence[ChannelGroup], constraints, rule: str,
                 reached: Callable[[Mapping[str, int]], bool],
                 energies: Mapping[str, np.ndarray] = None, iters: int = 14) -> dict[str, int]:
  """The ranks at the largest knob (:func:`ranks_at`) whose widths meet the target
  (``reached(ranks)``), by bisection (the cost falls as the knob falls).

  Raises:
    ValueError: when even the smallest ranks the constraints allow miss the target.
  """
  cache: dict[tuple, bool] = {}

  def ok(ranks):  # many knobs give the same ranks; each test counts FLOPs
    key = tuple(sorted(ranks.items()))
    if key not in cache:
      cache[key] = bool(reached(ranks))
    return cache[key]

  lo_ranks = ranks_at(0.0, groups, constraints, rule, energies)
  if not ok(lo_ranks):
    raise ValueError('cascaded_projection compresses only the layers inside residual blocks; at '
                     f'their smallest ranks under the constraints ({lo_ranks}) the target is not '
                     'reached. Lower the target or relax prune.min_width / max_share / align.')
  lo, hi = 0.0, 1.0  # reached(lo), not known at hi
  best = lo_ranks
  if ok(ranks_at(hi, groups, constraints, rule, energies)):
    return ranks_at(hi, groups, constraints, rule, energies)
  for _ in range(iters):
    mid = (lo + hi) / 2
    r = ranks_at(mid, groups, constraints, rule, energies)
    if ok(r):
      lo, best = mid, r
    else:
      hi = mid
  return best


def consumer_energy(g: ChannelGroup, variables: Mapping[str, Any]) -> np.ndarray:
  """``(width,)``: per unit, the sum of squares of every consumer weight that reads it."""
  out = np.zeros(g.width)
  for s in g.slices:
    if s.role != 'in':
      continue
    k = np.moveaxis(np.asarray(get_path(variables, s.path), np.float64), s.axis, 0)
    k = s.unit_view(k.reshape(k.shape[0], -1), g.width)  # (repeat, width, rest)
    out += np.sum(k ** 2, axis=(0, 2))
  return out


def initial_projection(g: ChannelGroup, stats: Mapping[str, np.ndarray], rank: int, init: str,
                       placement: str, out_energy: np.ndarray) -> np.ndarray:
  """``(width, rank)`` orthonormal start for group ``g``.

  ``'pca'``: top-``rank`` eigenvectors of the (uncentred) second moment of the features P acts
  on (``u`` for ``'pre'``, ``relu(u)`` for ``'post'``), each signed so the mean feature projects
  positively (ReLU then passes the mean part). ``'select'``: identity columns of the ``rank``
  units with the largest ``E[a_c^2] * out_energy_c`` (:func:`consumer_energy`; sorted by unit
  index).
  """
  if init == 'pca':
    _, vecs = _principal(stats['second'] if placement == 'pre' else stats['second_post'])
    p = vecs[:, :rank]
    sign = np.where(stats['mean'] @ p < 0, -1.0, 1.0)
    return (p * sign).astype(np.float32)
  score = np.diag(stats['second_post']) * out_energy
  units = np.sort(np.argsort(-score, kind='stable')[:rank])
  return surgery._one_hot(units, g.width)


def polar(q: jax.Array) -> jax.Array:
  """Nearest matrix with orthonormal columns (Frobenius): ``U V^T`` of the thin SVD of ``q``."""
  u, _, vt = jnp.linalg.svd(q, full_matrices=False)
  return jnp.matmul(u, vt, precision=jax.lax.Precision.HIGHEST)


# --- the projected networks and the loss ------------------------------------------------------

def projected_variables(groups: Sequence[ChannelGroup], variables: Mapping[str, Any],
                        projections: Mapping[str, Any],
                        covs: Mapping[str, Any] = None) -> dict[str, Any]:
  """Variables of the compressed network (``'pre'``): the matrix surgery with ``P``."""
  covs = covs or {}
  sel = {k: surgery.GroupSelection(projection=p, cov=covs.get(k)) for k, p in projections.items()}
  return projection.shrink_variables_projected(groups, variables, sel)


def lifted_variables(groups: Sequence[ChannelGroup], variables: Mapping[str, Any],
                     projections: Mapping[str, Any]) -> dict[str, Any]:
  """Full-width variables whose consumers read ``a P P^T`` (``'post'``): every ``in`` slice of a
  projected group contracted with ``P P^T`` on its input axis."""
  by_name = {g.name: g for g in groups}
  sels: dict[Path, list] = {}
  for k, p in projections.items():
    for s in by_name[k].slices:
      if s.role != 'in':
        continue
      if s.offset or s.repeat != 1:
        raise ValueError(f'group {k!r}: a consumer reads it from part of an axis ({s.path})')
      shape = np.shape(get_path(variables, s.path))
      sels.setdefault(s.path, []).append(
          (s.axis % len(shape), surgery.AxisSelection(matrix=_outer(p))))
  return surgery.apply_selections(variables, {k: tuple(v) for k, v in sels.items()})


def _outer(p: Any) -> Any:
  """``P P^T`` (numpy for numpy, else full-precision jax)."""
  if isinstance(p, np.ndarray):
    return p @ p.T
  return jnp.matmul(p, p.T, precision=jax.lax.Precision.HIGHEST)


def reconstruction_loss(student: Mapping[Path, jax.Array],
                        teacher: Mapping[Path, jax.Array]) -> jax.Array:
  """Mean over the consumer layers ``l`` of ``sum (F_l - T_l)^2 / sum T_l^2`` (the relative
  squared error of the next layer's features against the uncompressed network's)."""
  errs = [jnp.sum((student[p] - teacher[p]) ** 2) / jnp.maximum(jnp.sum(teacher[p] ** 2), 1e-30)
          for p in teacher]
  return sum(errs) / len(errs)


def cap_loss(model, small, groups, placement: str, recon_weight: float, params, batch_stats,
             projections, covs, teacher_logits_feats, x, labels):
  """``(loss, (cross_entropy, reconstruction, logits))`` of the projected network on one batch
  (BatchNorm in eval mode); ``teacher_logits_feats`` = the uncompressed network's
  ``(logits, consumer outputs)`` on ``x``."""
  _, t_feats = teacher_logits_feats
  variables = {'params': params, 'batch_stats': batch_stats}
  if placement == 'pre':
    small_vars = projected_variables(groups, variables, projections, covs)
    logits, feats = apply_capturing(small, small_vars, x, list(t_feats))
  else:
    logits, feats = apply_capturing(model, lifted_variables(groups, variables, projections), x,
                                    list(t_feats))
  ce = jnp.mean(losses.cross_entropy(logits, labels))
  rec = reconstruction_loss(feats, t_feats)
  return ce + recon_weight * rec, (ce, rec, logits)


def make_step(model, small, groups, placement: str, recon_weight: float, tx,
              train_weights: bool):
  """Jitted ``(trainable, opt_state, params, batch_stats, covs, teacher_variables, batch) ->
  (trainable, opt_state, metrics)``; ``trainable = {'proj': {group: P}}`` plus ``'params'``
  when ``train_weights`` (then the ``params`` argument is ignored). After the update every P is
  replaced by its polar factor."""
  paths = sorted({p for g in compressed_groups(model) for p in consumer_modules(g)})

  def step(trainable, opt_state, params, batch_stats, covs, teacher_variables, batch):
    x, labels = batch['image'], batch['label']
    teacher = jax.lax.stop_gradient(apply_capturing(model, teacher_variables, x, paths))

    def loss_fn(tr):
      return cap_loss(model, small, groups, placement, recon_weight, tr.get('params', params),
                      batch_stats, tr['proj'], covs, teacher, x, labels)

    (loss, (ce, rec, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    new = dict(new, proj={k: polar(q) for k, q in new['proj'].items()})
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return new, opt_state, {'loss': loss, 'cross_entropy': ce, 'reconstruction': rec,
                            'accuracy': acc}

  return jax.jit(step)


def make_tx(learning_rate: float, weights_learning_rate: float, weight_decay: float,
            train_weights: bool) -> optax.GradientTransformation:
  """SGD (momentum 0.9) on the proxies; on the params too (with weight decay) if trained."""
  if not train_weights:
    return optax.multi_transform({'proj': optax.sgd(learning_rate, momentum=0.9)},
                                 {'proj': 'proj'})
  weights = optax.chain(optax.add_decayed_weights(weight_decay),
                        optax.sgd(weights_learning_rate, momentum=0.9))
  return optax.multi_transform(
      {'proj': optax.sgd(learning_rate, momentum=0.9), 'params': weights},
      {'proj': 'proj', 'params': 'params'})


# --- the method -------------------------------------------------------------------------------

def _masks_for(model, ranks: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Masks whose surgered widths are ``ranks`` (first units kept): for costs and targets."""
  out = {}
  for g in model.groups():
    m = np.ones(g.width, np.float32)
    if g.name in ranks:
      m[ranks[g.name]:] = 0.0
    out[g.name] = m
  return out


def compress(model, variables, groups, projections, covs):
  """``(small_model, small_variables)``: the surgery with the projections (host numpy)."""
  small_vars = jax.device_get(projected_variables(groups, variables, projections, covs))
  small_vars = jax.tree.map(np.asarray, small_vars)
  widths = dict(model.widths, **{k: int(np.shape(p)[1]) for k, p in projections.items()})
  return model.clone(widths=widths), small_vars


@methods.register('cascaded_projection', options=OPTIONS, validate=_validate)
def cascaded_projection(ctx: methods.MethodContext) -> methods.MethodResult:
  """Cascaded Projection: learnt orthonormal projections inside residual blocks, then surgery."""
  o = ctx.options
  t0 = time.time()
  model, state = ctx.model, ctx.state
  groups = compressed_groups(model)
  all_groups = tuple(model.groups())
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  step0 = int(state.step)
  stats = feature_stats(model, variables, ctx.batches(step0), groups, o.stat_batches)
  energies = {g.name: _principal(stats[g.name]['second' if o.placement == 'pre' else
                                              'second_post'])[0] for g in groups}
  ranks = choose_ranks(groups, ctx.constraints, o.rank_rule,
                       lambda r: ctx.target_reached(model, _masks_for(model, r)), energies)
  proj = {g.name: initial_projection(g, stats[g.name], ranks[g.name], o.init, o.placement,
                                     consumer_energy(g, variables)) for g in groups}
  covs = {k: np.asarray(v['cov'], np.float32) for k, v in stats.items()}
  small = model.clone(widths=dict(model.widths, **ranks))

  def surgered(projections, params, step):
    sm, sv = compress(model, {'params': params, 'batch_stats': state.batch_stats}, all_groups,
                      projections, covs)
    ones = {k: np.ones((w,), np.float32) for k, w in sm.widths.items()}
    return sm, state.replace(step=np.asarray(step, np.int32), params=sv['params'],
                             batch_stats=sv['batch_stats'], opt_state=(), masks=ones)

  ev_init = ctx.evaluate(*surgered(proj, state.params, step0))
  tx = make_tx(o.learning_rate, o.weights_learning_rate, ctx.config.optim.weight_decay,
               o.train_weights)
  trainable = {'proj': {k: jnp.asarray(v) for k, v in proj.items()}}
  if o.train_weights:
    trainable['params'] = state.params
  opt_state = tx.init(trainable)
  step = make_step(model, small, all_groups, o.placement, o.recon_weight, tx, o.train_weights)
  teacher = jax.device_put(variables)
  it = ctx.batches(step0)
  log, window = [], []
  for i in range(o.steps):
    trainable, opt_state, metrics = step(trainable, opt_state, teacher['params'],
                                         teacher['batch_stats'], covs, teacher, next(it))
    window.append(metrics)
    if (i + 1) % o.log_every == 0 or i + 1 == o.steps:
      m = {k: float(np.mean([w[k] for w in jax.device_get(window)])) for k in window[0]}
      rec = {'phase': 'cap_step', 'step': step0 + i + 1, **m, 'wall_s': time.time() - t0}
      ctx.log(rec)
      log.append(rec)
      window = []
  proj = {k: np.asarray(v, np.float32) for k, v in jax.device_get(trainable['proj']).items()}
  params = jax.tree.map(np.asarray, jax.device_get(trainable.get('params', state.params)))
  small, small_state = surgered(proj, params, step0 + o.steps)
  ev = ctx.evaluate(small, small_state)
  rec = methods.history_record(ctx, 1, step0 + o.steps, model, _masks_for(model, ranks))
  if ev is not None:
    rec['eval_accuracy'], rec['eval_loss'] = ev['accuracy'], ev['loss']
  orth = max(float(np.max(np.abs(p.T @ p - np.eye(p.shape[1])))) for p in proj.values())
  extra = {'ranks': ranks, 'placement': o.placement, 'init': o.init, 'rank_rule': o.rank_rule,
           'steps': o.steps, 'max_orthonormality_error': orth,
           'eval_at_init': ev_init, 'eval_after_projection': ev, 'log': log,
           'wall_s': time.time() - t0}
  return methods.MethodResult(small, small_state, [rec], extra)
