"""Any Flax model, Linen or NNX, behind the zoo's protocol, unchanged.

The library (train step, estimators, engine, surgery, costs, methods, the main job) speaks to a
model through five things: ``widths`` (group -> units), ``groups()``, ``clone(widths=...)``,
``init(rng, x)`` and ``apply(variables, x, gates=None, train=False, mutable=False)``. The zoo
writes them by hand; :class:`LinenModel` and :class:`NNXModel` derive them for a user's model:

* groups come from :func:`taylor_jax.discovery.discover_groups` at full width, once; at smaller
  widths the same groups are re-laid out (widths and concatenation offsets follow the widths);
* gates are parameter scalings (:mod:`taylor_jax.masking`): ``apply(..., gates=m)`` zeroes every
  slice of the units a 0 removes and scales each group's gate site by its gate, so the masked
  network computes what the surgered one computes and ``dL/dz`` comes out of autodiff;
* a smaller network runs through :mod:`taylor_jax.resize`: Linen layers take their widths from
  their parameters, NNX models are loaded in place and re-split.

Variables always look like Linen's: ``{'params': ..., 'batch_stats': ...}`` (for NNX: the
``nnx.Param`` and ``nnx.BatchStat`` states as pure dicts), so slices are named the same way.

BatchNorm inside the data-parallel step: a user's BatchNorm normalises over each device's part of
the batch unless the user gave it an ``axis_name`` (as with PyTorch DDP without SyncBN); the step
averages the running statistics over devices.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taylor_jax import discovery, masking, resize
from taylor_jax.groups import ChannelGroup, Path, Slice
from taylor_jax.models import common as model_common


# --- groups at any widths ----------------------------------------------------------------------

def relayout(full: Sequence[ChannelGroup], widths: Mapping[str, int]) -> tuple[ChannelGroup, ...]:
  """The full-width groups at ``widths``: each slice's offset becomes the sum of the current
  widths of the groups before it in its axis' period (concatenation order is kept)."""
  order: dict[tuple[Path, int], list[tuple[int, str]]] = {}
  for g in full:
    for s in g.slices:
      order.setdefault((s.path, s.axis), []).append((s.offset, g.name))
  offsets = {}
  for key, entries in order.items():
    pos = 0
    for _, name in sorted(entries):
      offsets[(key, name)] = pos
      pos += widths[name]
  return tuple(dataclasses.replace(
      g, width=int(widths[g.name]),
      slices=tuple(dataclasses.replace(s, offset=offsets[((s.path, s.axis), g.name)])
                   for s in g.slices)) for g in full)


def first_units(full: Sequence[ChannelGroup], widths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Masks keeping the first ``widths[g]`` units of every group (to slice fresh variables)."""
  return {g.name: (np.arange(g.width) < widths[g.name]).astype(np.float32) for g in full}


@dataclasses.dataclass(frozen=True)
class _Found:
  """What discovery found at full width (shared by every clone)."""
  groups: tuple[ChannelGroup, ...]
  excluded: tuple[str, ...]

  @property
  def full_widths(self) -> dict[str, int]:
    return {g.name: g.width for g in self.groups}


def _gated_params(params, groups, gates):
  if gates is None:
    return params
  if any(jnp.ndim(z) != 1 for z in gates.values()):
    raise ValueError('per-example gates ((batch, width), e.g. the taylor_fo_bn_fg estimator) '
                     'need a model with gates in its code (the zoo); a discovered model has '
                     'one gate per unit: use taylor_fo_bn or another per-minibatch estimator')
  masks = {k: jax.lax.stop_gradient(v) for k, v in gates.items()}
  params = masking.apply_masks(params, groups, masks, prefix=('params',))
  return masking.apply_gates(params, groups, gates, prefix=('params',))


class _Adapter:
  """Shared by the Linen and NNX adapters: the zoo protocol over discovered groups."""

  found: _Found
  widths: dict[str, int]

  def groups(self) -> tuple[ChannelGroup, ...]:
    return relayout(self.found.groups, self.widths)

  @property
  def full_widths(self) -> dict[str, int]:
    return self.found.full_widths

  @property
  def input_dtype(self):
    """The example input's dtype (token ids: an integer type), which costs and checks use."""
    return self.example_input.dtype

  def _slice_to_widths(self, variables):
    from taylor_jax import surgery
    if self.widths == self.full_widths:
      return variables
    return surgery.shrink_variables(self.found.groups, variables,
                                    first_units(self.found.groups, self.widths))


class LinenModel(_Adapter):
  """A user's Linen module behind the zoo protocol (see the module doc).

  Args:
    module: the user's module, unchanged; called as ``module.apply(v, x, **{train_kwarg: train})``.
    example_input: one batch (shape and dtype matter, not values).
    train_kwarg: the name of the module's train/eval switch (``None``: it has none).
    keep_whole, prune_marked, unknown_primitives: see :func:`discovery.discover_groups`.
  """

  def __init__(self, module: nn.Module, example_input: Any, *, train_kwarg: Optional[str] = 'train',
               keep_whole: Sequence[str] = (), prune_marked: bool = False,
               unknown_primitives: str = 'error', widths: Optional[Mapping[str, int]] = None,
               axis_name: Optional[str] = None, _found: Optional[_Found] = None):
    if _found is None:  # built by a user, not cloned
      _check_train_kwarg(module, train_kwarg)
    self.module = module
    self.example_input = jax.ShapeDtypeStruct(np.shape(example_input),
                                              getattr(example_input, 'dtype', jnp.float32))
    self.train_kwarg = train_kwarg
    self.axis_name = axis_name
    self.options = dict(keep_whole=tuple(keep_whole), prune_marked=prune_marked,
                        unknown_primitives=unknown_primitives)
    if _found is None:
      variables = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x,
                                                       **self._mode(False)), self.example_input)
      d = discovery.discover_groups(lambda v, x: module.apply(v, x, **self._mode(False)),
                                    variables, self.example_input, **self.options)
      _found = _Found(d.groups, d.excluded)
    self.found = _found
    self.widths = dict(self.full_widths if widths is None else widths)

  def _mode(self, train: bool) -> dict[str, Any]:
    return {self.train_kwarg: train} if self.train_kwarg else {}

  def clone(self, *, widths: Optional[Mapping[str, int]] = None, axis_name: Any = ...) -> 'LinenModel':
    return LinenModel(self.module, self.example_input, train_kwarg=self.train_kwarg,
                      widths=self.widths if widths is None else widths,
                      axis_name=self.axis_name if axis_name is ... else axis_name,
                      _found=self.found, **self.options)

  def init(self, rng, x) -> dict[str, Any]:
    variables = model_common.run_once(functools.partial(self.module.init, **self._mode(False)),
                                      rng, jnp.asarray(x))
    return self._slice_to_widths(jax.tree.map(lambda a: a, dict(variables)))

  def apply(self, variables, x, gates=None, train: bool = False, mutable: Any = False,
            rngs: Any = None):
    """``rngs``: a key (the ``'dropout'`` stream) or ``{stream: key}``, for a module that draws
    random numbers in training."""
    params = _gated_params(variables['params'], self.groups(), gates)
    if rngs is not None and not isinstance(rngs, Mapping):
      rngs = {'dropout': rngs}
    return resize.linen_apply(self.module, {**variables, 'params': params}, x,
                              mutable=mutable, rngs=rngs, **self._mode(train))


class NNXModel(_Adapter):
  """A user's NNX model behind the zoo protocol (see the module doc).

  Args:
    build: ``rngs -> model`` (e.g. ``lambda rngs: MyNet(10, rngs=rngs)``); ``init`` builds a new
      model with ``nnx.Rngs(seed)`` and slices it to the current widths.
    example_input: one batch.
    keep_whole, prune_marked, unknown_primitives: see :func:`discovery.discover_groups`.
  """

  def __init__(self, build: Callable[[nnx.Rngs], nnx.Module], example_input: Any, *,
               keep_whole: Sequence[str] = (), prune_marked: bool = False,
               unknown_primitives: str = 'error', widths: Optional[Mapping[str, int]] = None,
               axis_name: Optional[str] = None, _found: Optional[_Found] = None,
               _template: Any = None):
    self.build = build
    self.example_input = jax.ShapeDtypeStruct(np.shape(example_input),
                                              getattr(example_input, 'dtype', jnp.float32))
    self.axis_name = axis_name
    self.options = dict(keep_whole=tuple(keep_whole), prune_marked=prune_marked,
                        unknown_primitives=unknown_primitives)
    full_template = _template or nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    self._full_template = full_template
    if _found is None:
      graphdef, variables = _split(full_template)
      d = discovery.discover_groups(
          lambda v, x: _merge(graphdef, _states(full_template), v, train=False)(x),
          variables, self.example_input, **self.options)
      _found = _Found(_attention_head_dims_whole(full_template, d.groups), d.excluded)
    self.found = _found
    self.widths = dict(self.full_widths if widths is None else widths)
    # Built abstractly (nothing computed) and outside any trace: the static attributes (in/out
    # features, group counts, head counts) of the model at these widths, and state templates.
    model = nnx.eval_shape(lambda: self._at_widths(build(nnx.Rngs(0))))
    self._graphdef = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

  def clone(self, *, widths: Optional[Mapping[str, int]] = None, axis_name: Any = ...) -> 'NNXModel':
    return NNXModel(self.build, self.example_input,
                    widths=self.widths if widths is None else widths,
                    axis_name=self.axis_name if axis_name is ... else axis_name,
                    _found=self.found, _template=self._full_template, **self.options)

  def _at_widths(self, model: nnx.Module) -> nnx.Module:
    """``model`` (full width) pruned in place to the first units of every group."""
    if self.widths != self.full_widths:
      _, variables = _split(model)
      small = self._slice_to_widths(variables)
      merged = {**small.get('params', {})}
      _deep_update(merged, small.get('batch_stats', {}))
      resize.nnx_load_state(model, merged)
    return model

  def init(self, rng, x) -> dict[str, Any]:
    del x  # an NNX model is built with its shapes
    return _split(self._at_widths(self.build(nnx.Rngs(rng))))[1]

  def apply(self, variables, x, gates=None, train: bool = False, mutable: Any = False,
            rngs: Any = None):
    """``rngs``: a key, or ``{stream: key}``, for a model with RNG streams (``nnx.Dropout``):
    in training they are reseeded from it on every call (the model's own RNG state is not
    carried between jitted calls, so a missing key would repeat one dropout mask)."""
    graphdef, *states = self._graphdef
    params = _gated_params(variables['params'], self.groups(), gates)
    model = _merge(graphdef, states, {**variables, 'params': params}, train=train)
    tags = sorted({n.key.tag for _, n in nnx.iter_graph(model) if isinstance(n, nnx.RngStream)})
    if train and tags:
      nnx.reseed(model, **_stream_keys(rngs, tags))
    out = model(x)
    if not mutable:
      return out
    return out, {'batch_stats': nnx.state(model, nnx.BatchStat).to_pure_dict()}


def _stream_keys(rngs: Any, tags: Sequence[str]) -> dict[str, Any]:
  """One key per RNG stream of an NNX model: ``rngs[tag]``, or ``fold_in(rngs, i)`` for the
  i-th stream name in sorted order."""
  if rngs is None:
    raise ValueError(
        f'this NNX model draws random numbers in training (RNG streams {list(tags)}, e.g. '
        f'nnx.Dropout): pass a new key every step, apply(..., train=True, rngs=key) '
        f'(taylor_jax.Pruner.apply). Estimators that run the model themselves (taylor_so, '
        f'the oracle) need a model without them.')
  if isinstance(rngs, Mapping):
    missing = [t for t in tags if t not in rngs]
    if missing:
      raise ValueError(f'rngs has no key for the RNG stream(s) {missing} of the NNX model '
                       f'(it has {sorted(rngs)}); pass one key, or one per stream')
    return {t: rngs[t] for t in tags}
  return {t: jax.random.fold_in(rngs, i) for i, t in enumerate(tags)}


def _attention_head_dims_whole(model: nnx.Module, groups):
  """``nnx.MultiHeadAttention`` calls ``jax.nn.dot_product_attention``, which requires the value
  head_dim to equal the query/key head_dim: a check in Python that the jaxpr cannot show. Both
  head_dim groups of such a module are kept whole; its heads stay prunable."""
  kernels = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.MultiHeadAttention):
      kernels |= {('params',) + tuple(path) + (n, 'kernel') for n in ('query', 'key', 'value')}
  out = []
  for g in groups:
    head_dim = any(s.path in kernels and s.axis % 3 == 2 for s in g.slices)
    if head_dim and g.prunable:
      g = dataclasses.replace(g, prunable=False, reason=(
          'head_dim of an nnx.MultiHeadAttention: jax.nn.dot_product_attention needs the value '
          'head_dim to equal the query/key head_dim; kept whole (its heads are prunable)'))
    out.append(g)
  return tuple(out)


def _split(model: nnx.Module):
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  leftovers = jax.tree.leaves(rest)
  if any(np.size(a) > 1 for a in leftovers):
    paths = [p for p, _ in nnx.to_flat_state(rest)][:4] if hasattr(nnx, 'to_flat_state') else []
    raise ValueError(f'the NNX model has variables other than nnx.Param and nnx.BatchStat '
                     f'({paths or "e.g. RNG state or caches"}); a discovered model needs '
                     'deterministic inference (drop dropout RNG streams or pass deterministic=True)')
  return graphdef, {'params': params.to_pure_dict(), 'batch_stats': stats.to_pure_dict()}


def _states(model):
  return nnx.split(model, nnx.Param, nnx.BatchStat, ...)[1:]


def _deep_update(base: dict, new: Mapping) -> None:
  for k, v in new.items():
    if isinstance(v, Mapping) and isinstance(base.get(k), Mapping):
      _deep_update(base[k], v)
    else:
      base[k] = v


def _merge(graphdef, states, variables, *, train: bool) -> nnx.Module:
  params, stats, rest = [jax.tree.map(lambda a: a, s) for s in states]
  params.replace_by_pure_dict(variables['params'])
  if variables.get('batch_stats'):
    stats.replace_by_pure_dict(variables['batch_stats'])
  model = nnx.merge(graphdef, params, stats, rest)
  model.train() if train else model.eval()
  return model


# --- user models by name -------------------------------------------------------------------------

def load_factory(spec: str) -> Callable[..., Any]:
  """``'package.module:Factory'`` -> the callable (a Linen module class, an NNX class, or a
  function returning either)."""
  if ':' not in spec:
    raise ValueError(f"a user model is named 'package.module:Factory', got {spec!r}")
  mod, _, attr = spec.partition(':')
  try:
    module = importlib.import_module(mod)
  except ImportError as e:
    raise ValueError(f'cannot import {mod!r} for model {spec!r} ({e}); is it on PYTHONPATH?') from e
  if not hasattr(module, attr):
    raise ValueError(f'{mod!r} has no attribute {attr!r} (model {spec!r})')
  return getattr(module, attr)


@functools.lru_cache(maxsize=16)
def from_spec(spec: str, num_classes: int, input_shape: tuple[int, ...],
              options: tuple = ()) -> _Adapter:
  """The adapter of a user model named ``'package.module:Factory'``, built for ``num_classes``
  and one-example ``input_shape``; discovery runs once per process and spec."""
  factory = load_factory(spec)
  opts = dict(options)
  x = jax.ShapeDtypeStruct((2,) + tuple(input_shape), jnp.float32)
  takes_rngs = 'rngs' in _signature_params(factory)
  if takes_rngs:
    return NNXModel(lambda rngs: factory(num_classes=num_classes, rngs=rngs), x, **opts)
  module = factory(num_classes=num_classes)
  if isinstance(module, nnx.Module):
    raise ValueError(f'{spec}: an NNX factory must take rngs (Factory(num_classes, rngs=...)) so '
                     'that each run initialises from its seed')
  if not isinstance(module, nn.Module):
    raise ValueError(f'{spec} returned {type(module).__name__}, not a Flax Linen or NNX module')
  train_kwarg = 'train' if 'train' in _signature_params(type(module).__call__) else None
  return LinenModel(module, x, train_kwarg=train_kwarg, **opts)


# Flax's own switches that are True in inference: passing train=True through them would run
# dropout at evaluation and freeze BatchNorm in training.
_INVERTED_SWITCHES = ('deterministic', 'use_running_average')


def _check_train_kwarg(module: nn.Module, train_kwarg: Optional[str]) -> None:
  """Raises (before any tracing) when ``module.__call__`` cannot take ``train_kwarg``."""
  name = type(module).__name__
  if train_kwarg in _INVERTED_SWITCHES:
    raise ValueError(
        f'train_kwarg={train_kwarg!r} is True in inference, but taylor_jax passes True in training. '
        f'Give {name}.__call__ a `train` argument (e.g. nn.Dropout(deterministic=not train)), or '
        f'wrap it in a module that takes one.')
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return  # no signature to read: the first call will tell
  if train_kwarg is None or train_kwarg in params or any(
      p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  raise TypeError(
      f'{name}.__call__ has no {train_kwarg!r} argument (it takes {[n for n in params if n != "self"]}). '
      f'For a module without a train/eval switch pass train_kwarg=None (e.g. '
      f'taylor_jax.Pruner(..., train_kwarg=None)); otherwise pass the name of its switch.')


def _signature_params(fn) -> set[str]:
  try:
    return set(inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters)
  except (TypeError, ValueError):
    return set()
