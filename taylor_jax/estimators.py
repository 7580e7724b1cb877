"""Importance estimators: pure functions from one minibatch to one score per unit of every group.

An estimator is ``fn(ctx: ScoreContext) -> {group name: (width,) float32 scores}``; register it
with :func:`register` and the engine, configs and notebooks find it by name::

    @estimators.register('my_gamma_grad')
    def my_gamma_grad(ctx):
      g = ctx.param_grads()
      return {name: ... for name in ctx.group_names()}

:class:`ScoreContext` computes the usual ingredients lazily and once per trace (the gate and
parameter gradients of the minibatch-mean loss; Hessian-vector products), so an estimator
that runs inside the train step reuses the gradients the step already took. Inside the
data-parallel step every ingredient is already reduced across devices (``axis_name``).

Loss convention: ``L`` is the minibatch-MEAN cross-entropy (of the global batch in the
data-parallel step). Gates ``z`` are the per-unit multipliers of :mod:`taylor_jax.groups`,
evaluated at the current masks.

Device reductions: quantities linear in the mean-loss gradient (``dL/dz``, ``dL/dw``, ``H v``)
are ``mean_over_devices``-ed BEFORE any square; per-example sums (FG) are squared per example
and ``sum_over_devices``-ed. Inside the step (``shard_map``, ``check_vma=False``) the gradient a
device takes of its own mean loss is that of the SUM of the device losses through the
synchronised BatchNorm (pmap semantics), i.e. ``n`` times the global-mean gradient for that
device's examples; per-example criteria divide by ``n = ctx.num_devices()``.

Registered criteria (reference ids of NVlabs/Taylor_pruning in brackets):

=========================  ================================================================
``taylor_fo_bn`` [22]      ``(dL/dz)^2`` (sum over batch/space, then square)
``taylor_fo_bn_stream``    ``(dL/dz)^2``, ``z`` scaling the group's norms (a stream once)
``taylor_fo_bn_fg`` [23]   ``sum_b (dL_b/dz)^2``, one backward pass with per-example gates
``taylor_fo_weight`` [0]   ``sum (w g)^2`` over the producer ('out') slices
``taylor_fo_weight_exact`` ``(sum w g)^2`` over every slice of the group (paper's group form)
``taylor_so`` [11]         ``(g z - 1/2 z (H z))^2`` (one HVP); ``on='weights'``: group form
``obd`` [10]               ``1/2 z^2 diag(H)``, Hutchinson diagonal; ``obd_exact``: jax.hessian
``weight_l2`` [2]          ``sum w^2`` over 'out' slices; ``weight_l1``: ``sum |w|``
``bn_scale`` [30]          ``|gamma|``; ``bn_taylor`` [31] ``(gamma g_gamma + beta g_beta)^2``;
                           ``bn_scale_grad``: ``|gamma g_gamma|``
``activation_taylor`` [6]  ``mean_{b,h,w} |a dL/da|`` / L2 norm of the group (spatial gate)
``random`` [1]             uniform
=========================  ================================================================

Weight criteria reduce parameter trees to units with :func:`taylor_jax.masking.per_unit_sum`;
the loss is :func:`taylor_jax.losses.cross_entropy`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from taylor_jax import losses, masking
from taylor_jax.groups import ChannelGroup

Scores = dict[str, jax.Array]
Estimator = Callable[['ScoreContext'], Scores]

_REGISTRY: dict[str, Callable[..., Scores]] = {}


def register(name: str) -> Callable[[Callable[..., Scores]], Callable[..., Scores]]:
  """Decorator: registers ``fn(ctx, **options)`` under ``name`` (re-registering replaces it)."""
  def wrap(fn):
    _REGISTRY[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str, **options: Any) -> Estimator:
  """The estimator ``name`` with its options bound (e.g. ``get('obd', num_probes=8)``)."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown estimator {name!r}; registered: {names()} '
                     '(add one with @taylor_jax.estimators.register(name))')
  fn = _REGISTRY[name]
  return functools.partial(fn, **options) if options else fn


class EstimatorError(ValueError):
  """An estimator's output is not one finite score per unit of every group it is asked for."""


def check_scores(name: str, scores: Any, groups: Sequence[ChannelGroup], when: str) -> None:
  """Raises EstimatorError unless ``scores`` (host values) holds, for every group, a finite
  ``(width,)`` real array; ``when`` says where they came from (for the message)."""
  what = f'estimator {name!r} (prune.estimator)'
  if not isinstance(scores, Mapping):
    raise EstimatorError(f'{what} returned a {type(scores).__name__} {when}; it must return a '
                         'dict group name -> (width,) scores (see ScoreContext.group_names())')
  for g in groups:
    want = (g.width,)
    if g.name not in scores:
      raise EstimatorError(
          f'{what} returned no scores for group {g.name!r} {when}: expected shape {want} '
          f'(it returned groups {sorted(scores)}; the model has {[x.name for x in groups]})')
    v = np.asarray(scores[g.name])
    if v.shape != want or not (np.issubdtype(v.dtype, np.floating) or
                               np.issubdtype(v.dtype, np.integer)):
      raise EstimatorError(f'{what} returned scores of shape {v.shape} ({v.dtype}) for group '
                           f'{g.name!r} {when}: expected shape {want}, one real score per unit')
    bad = int(np.sum(~np.isfinite(v)))
    if bad:
      raise EstimatorError(f'{what} returned {bad} non-finite score(s) of {g.width} for group '
                           f'{g.name!r} {when}')


def takes_rngs(model) -> bool:
  """Whether ``model.apply`` takes a dropout key (a user's Linen or NNX model; zoo models
  have no dropout)."""
  return 'rngs' in inspect.signature(model.apply).parameters


def probe(name: str, estimator: Estimator, model, groups: Sequence[ChannelGroup], params,
          batch_stats, masks: Mapping[str, Any], batch: Mapping[str, Any],
          step: int = 0) -> None:
  """Runs ``estimator`` once on ``batch`` (outside the train step, one device) and checks its
  output with :func:`check_scores`: a wrong estimator fails here, named, instead of deep inside
  the jitted step after the baseline has trained."""
  when = 'on the first batch (checked before training)'

  def scores_of(params, batch_stats, masks, batch):
    ctx = ScoreContext(model, groups, params, batch_stats, masks, batch, train=True,
                       step=jnp.asarray(step, jnp.int32),
                       rngs=jax.random.key(0) if takes_rngs(model) else None)
    return estimator(ctx)

  try:
    scores = jax.device_get(jax.jit(scores_of)(params, batch_stats, dict(masks), dict(batch)))
  except Exception as e:  # noqa: whatever the user's code raises, say which estimator it was
    raise EstimatorError(f'estimator {name!r} (prune.estimator) failed {when}: '
                         f'{type(e).__name__}: {e}') from e
  check_scores(name, scores, groups, when)


@dataclasses.dataclass
class ScoreContext:
  """One minibatch and the network state an estimator scores.

  Attributes:
    model: the zoo model (``axis_name`` set when inside the data-parallel step).
    groups: the model's channel groups.
    params, batch_stats: the network's variables.
    masks: group -> ``(width,)`` 0/1 gates.
    batch: ``{'image': (B,H,W,C), 'label': (B,)}`` (this device's part inside the step).
    train: BatchNorm mode of the forward passes (batch statistics when True).
    axis_name: mesh axis to reduce over (None on one device / outside shard_map).
    step: optional int32 scalar (the train step) that seeds the randomised estimators
      (``random``, Hutchinson ``obd``) so that they draw new numbers every minibatch, the same on
      every device.
    rngs: the dropout key of this step and device for a model whose ``apply`` takes ``rngs``
      (the train step's), so that re-running the model sees the step's own dropout masks.
  """

  model: Any
  groups: Sequence[ChannelGroup]
  params: Any
  batch_stats: Any
  masks: Mapping[str, jax.Array]
  batch: Mapping[str, jax.Array]
  train: bool = True
  axis_name: Optional[str] = None
  step: Optional[jax.Array] = None
  rngs: Optional[jax.Array] = None
  cache: dict = dataclasses.field(default_factory=dict)

  # -- reductions across devices ---------------------------------------------------------
  def mean_over_devices(self, tree):
    return tree if self.axis_name is None else jax.lax.pmean(tree, self.axis_name)

  def sum_over_devices(self, tree):
    return tree if self.axis_name is None else jax.lax.psum(tree, self.axis_name)

  def num_devices(self) -> int:
    """Number of devices along ``axis_name`` (1 outside the data-parallel step)."""
    return 1 if self.axis_name is None else jax.lax.axis_size(self.axis_name)

  def rng(self, seed: int = 0) -> jax.Array:
    """A PRNG key from ``seed`` and ``step``: identical on every device, new every step."""
    key = jax.random.PRNGKey(seed)
    return key if self.step is None else jax.random.fold_in(key, self.step)

  def group_names(self) -> list[str]:
    return [g.name for g in self.groups]

  # -- the loss ----------------------------------------------------------------------------
  def logits(self, params, gates) -> jax.Array:
    variables = {'params': params, 'batch_stats': self.batch_stats}
    if self.train:
      rngs = {} if self.rngs is None else {'rngs': self.rngs}
      out, _ = self.model.apply(variables, self.batch['image'], gates=gates, train=True,
                                mutable=['batch_stats'], **rngs)
      return out
    return self.model.apply(variables, self.batch['image'], gates=gates, train=False)

  def example_losses(self, params, gates) -> jax.Array:
    """``(B,)`` per-example losses of this device's examples."""
    return losses.cross_entropy(self.logits(params, gates), self.batch['label'])

  def loss(self, params, gates) -> jax.Array:
    """This device's minibatch-mean loss (its gradient, device-averaged, is the global one)."""
    return jnp.mean(self.example_losses(params, gates))

  # -- cached ingredients (device-reduced) ---------------------------------------------------
  def _cached(self, key: str, compute: Callable[[], Any]) -> Any:
    if key not in self.cache:
      self.cache[key] = compute()
    return self.cache[key]

  def set_grads(self, param_grads, gate_grads) -> None:
    """Hands in device-reduced gradients already computed by the train step."""
    self.cache['param_grads'] = param_grads
    self.cache['gate_grads'] = gate_grads

  def _grads(self):
    gp, gz = jax.grad(self.loss, argnums=(0, 1))(self.params, dict(self.masks))
    self.cache['param_grads'], self.cache['gate_grads'] = self.mean_over_devices((gp, gz))

  def gate_grads(self) -> Scores:
    """``dL/dz`` per group, ``(width,)``."""
    if 'gate_grads' not in self.cache:
      self._grads()
    return self.cache['gate_grads']

  def param_grads(self) -> Any:
    """``dL/dparams``, same tree as ``params``."""
    if 'param_grads' not in self.cache:
      self._grads()
    return self.cache['param_grads']


# --- Taylor-FO-BN (reference id 22): the paper's best criterion ----------------------------

@register('taylor_fo_bn')
def taylor_fo_bn(ctx: ScoreContext) -> Scores:
  """``(dL/dz)^2`` at the gate after BN: sum over batch and space first, square once."""
  return {k: jnp.square(g) for k, g in ctx.gate_grads().items()}


@register('taylor_fo_bn_stream')
def taylor_fo_bn_stream(ctx: ScoreContext) -> Scores:
  """``(dL/dz)^2`` with ``z`` scaling each group's norms (or producers when it has none), from the
  parameter gradients (:func:`taylor_jax.masking.gate_grads_from_params`). Equals
  ``taylor_fo_bn`` except on a residual stream gated more than once, where ``z`` scales the
  whole stream once instead of multiplying it again after every block (the reference's shared
  skip gate); this is the gate of models without gate code (discovered groups) and the Pruner's
  default. Chosen by measurement: against the squared oracle on ResNet-20 (3 seeds, 1-epoch
  baselines, experiments/results/oracle_correlation_stream.md) Spearman 0.939 +- 0.015 vs the
  shared skip gate's 0.934 +- 0.012, Pearson 0.662 vs 0.509: the stream derivative ranks at
  least as well and tracks the size of the loss change better."""
  grads = masking.gate_grads_from_params(ctx.groups, ctx.params, ctx.param_grads())
  return {k: jnp.square(g) for k, g in grads.items()}


def _param_sum(ctx: 'ScoreContext', fn, roles, leaves=None, with_grads: bool = True) -> Scores:
  """:func:`taylor_jax.masking.per_unit_sum` of ``fn(w, g)`` (``fn(w)`` without grads) over the
  parameters (and their device-averaged gradients)."""
  trees = (ctx.params, ctx.param_grads()) if with_grads else ctx.params
  return masking.per_unit_sum(ctx.groups, trees, fn, roles=roles, leaves=leaves,
                              prefix=('params',))


def _require_slices(ctx: 'ScoreContext', roles, leaves, what: str) -> None:
  for g in ctx.groups:
    if not any(s.role in roles and s.path[-1] in leaves for s in g.slices):
      raise ValueError(f'estimator {what!r}: group {g.name!r} has no BatchNorm slice '
                       f'({"/".join(leaves)}); use it only on models with BN on every group')


# =============================================================================================
# Gate-based criteria
# =============================================================================================

def _gates(ctx: 'ScoreContext') -> Scores:
  return dict(ctx.masks)


@register('taylor_fo_bn_fg')
def taylor_fo_bn_fg(ctx: ScoreContext) -> Scores:
  """Reference id 23 ("FG"): ``sum_b (dL_b/dz)^2``, squared per example, then summed.

  ``L_b`` is example ``b``'s share of the minibatch-mean loss ``L = sum_b L_b`` (``l_b / B`` with
  ``B`` the GLOBAL batch), so ``sum_b dL_b/dz = dL/dz`` and a batch of one gives Taylor-FO-BN.

  One backward pass: every gate gets a per-example copy (``(B, width)``, broadcast over space by
  the model) and the gradient of the loss with respect to copy ``b`` is example ``b``'s gradient.
  Exact when examples do not interact (no BN, eval-mode BN); with train-mode BN the gradient
  also carries example ``b``'s effect on the other examples' losses through the batch statistics
  of the BatchNorms after the gate -- what the reference's hook-based per-example gradient is.
  Inside the data-parallel step the device's gradient is that of the sum of the device losses
  (``n`` times the global-mean one), hence the ``1/n``; squares are summed over devices.
  """
  batch = ctx.batch['image'].shape[0]
  zpe = {k: jnp.broadcast_to(m, (batch,) + m.shape) for k, m in _gates(ctx).items()}
  gpe = jax.grad(lambda z: ctx.loss(ctx.params, z))(zpe)
  n = ctx.num_devices()
  local = {k: jnp.sum(jnp.square(v / n), axis=0) for k, v in gpe.items()}
  return ctx.sum_over_devices(local)


def _gate_hvp(ctx: 'ScoreContext', tangent: Scores):
  """``(dL/dz, H_z tangent)`` at the current gates, both device-averaged."""
  f = lambda z: ctx.loss(ctx.params, z)
  g, hv = jax.jvp(jax.grad(f), (_gates(ctx),), (tangent,))
  return ctx.mean_over_devices((g, hv))


@register('taylor_so')
def taylor_so(ctx: ScoreContext, on: str = 'gates',
              roles: Sequence[str] = masking.ALL_ROLES) -> Scores:
  """Taylor second order (paper's SO; reference id 11 keeps only diag(H)).

  ``on='gates'``: per unit ``(g_z z - 1/2 z (H z))^2`` with ``g_z = dL/dz``, ``H`` the Hessian of
  ``L`` with respect to all gates (every group together) and ``H z`` ONE forward-over-reverse
  Hessian-vector product with tangent = the gates themselves. At live units ``z = 1``; pruned
  units score 0.

  ``on='weights'``: per parameter ``t = g w - 1/2 w (H w)`` with ``H`` the Hessian of ``L`` with
  respect to ALL parameters and ``H w`` one HVP with tangent = the parameters; per unit
  ``(sum of t over the group's slices with role in roles)^2`` (the paper's group form; default:
  every slice of the group: producer, BN and consumer parameters).
  ``g`` and ``H v`` are device-averaged before they are combined and squared.
  """
  if on == 'gates':
    z = _gates(ctx)
    g, hz = _gate_hvp(ctx, z)
    return {k: jnp.square(g[k] * z[k] - 0.5 * z[k] * hz[k]) for k in z}
  if on == 'weights':
    f = lambda p: ctx.loss(p, _gates(ctx))
    g, hw = jax.jvp(jax.grad(f), (ctx.params,), (ctx.params,))
    g, hw = ctx.mean_over_devices((g, hw))
    t = jax.tree.map(lambda w, gw, h: gw * w - 0.5 * w * h, ctx.params, g, hw)
    return {k: jnp.square(v) for k, v in
            masking.per_unit_sum(ctx.groups, t, roles=roles, prefix=('params',)).items()}
  raise ValueError(f"taylor_so: on must be 'gates' or 'weights', not {on!r}")


@register('obd')
def obd(ctx: ScoreContext, num_probes: int = 8, seed: int = 0,
        probe_batch: Optional[int] = None) -> Scores:
  """Reference id 10 (Optimal Brain Damage on the gates): ``1/2 z^2 diag(H)``.

  ``diag(H)`` of the gate Hessian is a Hutchinson estimate ``mean_p v_p * (H v_p)`` over
  ``num_probes`` Rademacher probes ``v_p`` (one HVP each; ``probe_batch`` probes at a time via
  ``lax.map``, default all at once). Probes come from ``ctx.rng(seed)`` (same on every device,
  new every step when the context knows the step). Unbiased; error ~ 1/sqrt(num_probes).
  Raw (signed) values: diag(H) may be negative.
  """
  z = _gates(ctx)
  flat, unravel = jax.flatten_util.ravel_pytree(z)
  v = jax.random.rademacher(ctx.rng(seed), (num_probes, flat.size), dtype=flat.dtype)
  f = lambda zz: ctx.loss(ctx.params, zz)

  def one(vp):
    _, hv = jax.jvp(jax.grad(f), (z,), (unravel(vp),))
    return vp * jax.flatten_util.ravel_pytree(hv)[0]

  est = jnp.mean(jax.lax.map(one, v, batch_size=probe_batch or num_probes), axis=0)
  diag = unravel(ctx.mean_over_devices(est))
  return {k: 0.5 * jnp.square(z[k]) * diag[k] for k in z}


def gate_hessian(ctx: 'ScoreContext') -> tuple[jax.Array, Callable[[jax.Array], Scores]]:
  """The exact Hessian of ``L`` over the concatenated gate vector (device-averaged) and the
  function that splits a concatenated vector back into groups. Small models only."""
  z = _gates(ctx)
  flat, unravel = jax.flatten_util.ravel_pytree(z)
  h = jax.hessian(lambda v: ctx.loss(ctx.params, unravel(v)))(flat)
  return ctx.mean_over_devices(h), unravel


@register('obd_exact')
def obd_exact(ctx: ScoreContext) -> Scores:
  """``1/2 z^2 diag(H)`` with the exact gate-Hessian diagonal (``jax.hessian``; small models)."""
  z = _gates(ctx)
  h, unravel = gate_hessian(ctx)
  diag = unravel(jnp.diagonal(h))
  return {k: 0.5 * jnp.square(z[k]) * diag[k] for k in z}


# =============================================================================================
# Weight- and BN-based criteria
# =============================================================================================

@register('taylor_fo_weight')
def taylor_fo_weight(ctx: ScoreContext, roles: Sequence[str] = masking.PRODUCER_ROLES) -> Scores:
  """Reference id 0: ``sum_s (w_s g_s)^2`` over the group's producer ('out': kernel output
  axis and bias) parameters (square then sum), ``g`` the device-averaged gradient."""
  return _param_sum(ctx, lambda w, g: jnp.square(w * g), roles)


@register('taylor_fo_weight_exact')
def taylor_fo_weight_exact(ctx: ScoreContext, roles: Sequence[str] = masking.ALL_ROLES) -> Scores:
  """The paper's group form ``(sum_s w_s g_s)^2`` over EVERY parameter slice of the group
  (producer, BN scale/bias and consumer input slices): sum then square."""
  s = _param_sum(ctx, lambda w, g: w * g, roles)
  return {k: jnp.square(v) for k, v in s.items()}


@register('weight_l2')
def weight_l2(ctx: ScoreContext, roles: Sequence[str] = masking.PRODUCER_ROLES) -> Scores:
  """Reference id 2: ``sum w^2`` over the group's producer ('out') parameters."""
  return _param_sum(ctx, jnp.square, roles, with_grads=False)


@register('weight_l1')
def weight_l1(ctx: ScoreContext, roles: Sequence[str] = masking.PRODUCER_ROLES) -> Scores:
  """``sum |w|`` over the group's producer ('out') parameters."""
  return _param_sum(ctx, jnp.abs, roles, with_grads=False)


@register('bn_scale')
def bn_scale(ctx: ScoreContext) -> Scores:
  """Reference id 30: ``|gamma|``; a group fed by several BatchNorms (a residual stream) gets
  the sum of ``|gamma|`` over them. ValueError if a group has no BatchNorm scale."""
  _require_slices(ctx, ('norm',), ('scale',), 'bn_scale')
  return _param_sum(ctx, jnp.abs, ('norm',), ('scale',), with_grads=False)


@register('bn_taylor')
def bn_taylor(ctx: ScoreContext) -> Scores:
  """Reference id 31: ``(gamma g_gamma + beta g_beta)^2``; several BatchNorms of one group are
  summed inside the square (group form)."""
  _require_slices(ctx, ('norm',), ('scale', 'bias'), 'bn_taylor')
  s = _param_sum(ctx, lambda w, g: w * g, ('norm',), ('scale', 'bias'))
  return {k: jnp.square(v) for k, v in s.items()}


@register('bn_scale_grad')
def bn_scale_grad(ctx: ScoreContext) -> Scores:
  """The seed notes' idea: ``|gamma dL/dgamma|`` (several BatchNorms of a group: ``|sum|``)."""
  _require_slices(ctx, ('norm',), ('scale',), 'bn_scale_grad')
  s = _param_sum(ctx, lambda w, g: w * g, ('norm',), ('scale',))
  return {k: jnp.abs(v) for k, v in s.items()}


# =============================================================================================
# Activation-based criterion (Molchanov et al., ICLR 2017) and random
# =============================================================================================

class _SiteProbe:
  """Stands in for a gate while tracing to record the shape of the activation it multiplies
  (JAX arrays return NotImplemented for unknown operand types, so ``x * probe`` lands here)."""

  ndim = 0

  def __init__(self, name: str, record: dict):
    self.name, self.record = name, record

  def astype(self, dtype):
    return self

  def __rmul__(self, x):
    self.record.setdefault(self.name, []).append(tuple(x.shape))
    return x

  __mul__ = __rmul__


class _ProbeGates(dict):
  def __init__(self, names, record):
    super().__init__({n: _SiteProbe(n, record) for n in names})


def gate_site_shapes(model, variables, images, groups, train: bool = False
                     ) -> dict[str, list[tuple[int, ...]]]:
  """Shape of the activation at every site where each group's gate multiplies (by tracing)."""
  record: dict = {}

  def run(variables, images):
    kw = {'mutable': ['batch_stats']} if train else {}
    model.apply(variables, images, gates=_ProbeGates([g.name for g in groups], record),
                train=train, **kw)
    return 0

  jax.eval_shape(run, variables, images)
  return record


@register('activation_taylor')
def activation_taylor(ctx: ScoreContext, normalize: bool = True) -> Scores:
  """Reference id 6 (ICLR'17): ``mean_{b,h,w} |a dL/da|`` at the gate site, then divided by the
  group's L2 norm over its units (when ``normalize``).

  Computed exactly through a SPATIAL gate: the group's gate is replaced by ``Z`` of the shape of
  the gated activation (``(B, H, W, C)`` or ``(B, C)``), equal to the mask everywhere; at ``Z = 1``
  ``dL/dZ[b,h,w,c] = a[b,h,w,c] dL/da[b,h,w,c]``. A group gated at several sites (a residual
  stream) needs one shape at all of them and gets ``a dL/da`` SUMMED over its sites before
  ``|.|``. ``L`` is the global minibatch-mean loss (device gradients scaled by ``1/n``).
  """
  variables = {'params': ctx.params, 'batch_stats': ctx.batch_stats}
  shapes = gate_site_shapes(ctx.model, variables, ctx.batch['image'], ctx.groups, ctx.train)
  z = {}
  for k, m in _gates(ctx).items():
    site = set(shapes.get(k, []))
    if len(site) != 1:
      raise ValueError(f'activation_taylor: group {k!r} is gated at sites of shapes '
                       f'{sorted(site)}; needs exactly one shape')
    z[k] = jnp.broadcast_to(m, next(iter(site)))
  gz = jax.grad(lambda zz: ctx.loss(ctx.params, zz))(z)
  n = ctx.num_devices()
  local = {k: jnp.mean(jnp.abs(v / n).reshape(-1, v.shape[-1]), axis=0) for k, v in gz.items()}
  scores = ctx.mean_over_devices(local)
  if normalize:
    scores = {k: v / (jnp.linalg.norm(v) + 1e-12) for k, v in scores.items()}
  return scores


@register('random')
def random(ctx: ScoreContext, seed: int = 0, rng: Optional[jax.Array] = None) -> Scores:
  """Reference id 1: uniform [0, 1) scores from ``rng`` (default ``ctx.rng(seed)``)."""
  key = ctx.rng(seed) if rng is None else rng
  return {g.name: jax.random.uniform(jax.random.fold_in(key, i), (g.width,))
          for i, g in enumerate(ctx.groups)}
