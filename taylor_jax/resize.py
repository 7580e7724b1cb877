"""Run a user's unchanged Flax model (Linen or NNX) on a smaller, sliced parameter tree.

After surgery removes units, the parameter arrays are smaller but the model code still says the
old widths (``nn.Dense(64)``, ``nnx.Conv(16, 32, ...)``, ``num_heads=4``). This module makes the
model run really smaller without the user editing it:

**Linen** (:func:`linen_apply`): same contract as ``module.apply``. Inside, a method interceptor
(``nn.intercept_methods``) runs every method of each standard layer with its width fields taken
from the layer's (sliced) parameters, and restores the fields afterwards:

* ``nn.Dense`` (``features``), ``nn.DenseGeneral`` (``features``, int or tuple), ``nn.Einsum``
  (``shape``), ``nn.Embed`` (``num_embeddings``, ``features``), ``nn.ConvTranspose``
  (``features``);
* ``nn.Conv`` / ``nn.ConvLocal`` (``features``; a grouped conv's ``feature_group_count`` becomes
  ``in_channels / kernel.shape[-2]``, read from the actual input, which for a depthwise conv is
  ``old_groups * new_out / old_out``: the channel multiplier is kept);
* ``nn.MultiHeadDotProductAttention`` (``num_heads`` from the query kernel's head axis,
  ``qkv_features = num_heads * q/k head_dim``, ``out_features`` when set); its q/k/v/out
  ``DenseGeneral`` children are resized themselves, so the value/out head_dim may differ from the
  query/key head_dim;
* norms (``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``) take their shapes from the input;
  ``GroupNorm`` keeps whichever of ``num_groups`` / ``group_size`` the user set, so the new
  width must be divisible by it (else :class:`ResizeError`).

Subclasses of these layers are covered (their fields are set the same way). A parameter whose
shape is hard-coded in a custom layer raises :class:`HardcodedWidthError` (naming the module and
the parameter) instead of Flax's ``ScopeParamShapeError``.

**NNX** (:func:`nnx_load_state`): prunes an NNX model in place: every variable gets its new value
(``Variable.set_value``) and the static attributes of the standard layers are recomputed from
their new variable shapes (``in_features``, ``out_features``, ``feature_group_count``,
``kernel_shape``, ``num_features``, ``num_groups`` / ``group_size``, ``num_heads``,
``qkv_features``, ``head_dim``, ...). Integer attributes of other (custom) modules that equal an
old width which changed are reported with a :class:`StaleAttributeWarning`; ``overrides`` sets
attributes by hand, and ``example_input`` runs an abstract forward pass whose failure is
re-raised naming the innermost module that failed.

Caveat (both): a norm over the channel axis (LayerNorm, GroupNorm, RMSNorm) and attention's
``1/sqrt(head_dim)`` depend on the width itself, so removing units there is not the same function
as zeroing them (removing whole attention heads, or value/out head_dim units, is).
"""

from __future__ import annotations

import contextlib
import re
import traceback
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import flax.linen as nn
from flax import errors as flax_errors
from flax import nnx
from flax import traverse_util
from flax.core import meta

__all__ = [
    'ResizeError', 'HardcodedWidthError', 'StaleAttributeWarning', 'linen_apply',
    'resizing', 'nnx_load_state', 'nnx_pure_state', 'nnx_apply_fn', 'nnx_check_forward',
]


class ResizeError(ValueError):
  """A layer cannot run at the widths of its (sliced) parameters."""


class HardcodedWidthError(ResizeError):
  """A custom layer creates a parameter with a width that does not follow its input."""


class StaleAttributeWarning(UserWarning):
  """An NNX module keeps an integer attribute equal to a width that pruning changed."""


# ------------------------------------------------------------------------------------------
# Linen
# ------------------------------------------------------------------------------------------

def _leaf_shape(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(meta.unbox(x)))


def _module_path(module: nn.Module) -> str:
  try:
    path = module.path
  except Exception:  # unbound
    return f'<unbound {type(module).__name__}>'
  return '/' + '/'.join(str(p) for p in path)


def _own_params(module: nn.Module) -> Mapping[str, Any]:
  """The module's 'params' subtree ({} when unbound or when it has none)."""
  if module.scope is None:
    return {}
  try:
    return module.variables.get('params', {})
  except Exception:  # pylint: disable=broad-except
    return {}


def _first_input(args: Sequence[Any], kwargs: Mapping[str, Any], *names: str) -> Any:
  if args:
    return args[0]
  for n in names:
    if n in kwargs:
      return kwargs[n]
  return None


def _canon(features: Any) -> tuple[int, ...]:
  return tuple(features) if isinstance(features, Iterable) else (features,)


def _linen_fields(module: nn.Module, method_name: str, args: Sequence[Any],
                  kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Field values that make a standard layer match its parameters ({} when nothing to do)."""
  params = _own_params(module)
  if not params:
    return {}
  path = _module_path(module)

  if isinstance(module, nn.MultiHeadDotProductAttention):
    q = params.get('query', {}).get('kernel')
    out = params.get('out', {}).get('kernel')
    fields: dict[str, Any] = {}
    if q is not None:
      heads, head_dim = _leaf_shape(q)[-2:]
      fields['num_heads'] = heads
      fields['qkv_features'] = heads * head_dim  # (None meant "the input width")
    if out is not None and module.out_features is not None:
      fields['out_features'] = _leaf_shape(out)[-1]
    return fields

  if isinstance(module, nn.DenseGeneral):
    kernel = params.get('kernel')
    if kernel is None:
      return {}
    n = len(_canon(module.features))
    new = _leaf_shape(kernel)[-n:]
    return {'features': new if isinstance(module.features, Iterable) else new[0]}

  if isinstance(module, nn.Dense):
    kernel = params.get('kernel')
    return {} if kernel is None else {'features': _leaf_shape(kernel)[-1]}

  if isinstance(module, nn.Einsum):
    kernel = params.get('kernel')
    return {} if kernel is None else {'shape': _leaf_shape(kernel)}

  if isinstance(module, nn.Embed):
    emb = params.get('embedding')
    if emb is None:
      return {}
    n, f = _leaf_shape(emb)
    return {'num_embeddings': n, 'features': f}

  if isinstance(module, nn.ConvTranspose):
    kernel = params.get('kernel')
    if kernel is None:
      return {}
    if module.mask is not None and tuple(module.mask.shape) != _leaf_shape(kernel):
      raise ResizeError(f'{path} ({type(module).__name__}): its `mask` field has shape '
                        f'{tuple(module.mask.shape)} but the kernel is {_leaf_shape(kernel)}; '
                        'a masked ConvTranspose cannot be resized (slice the mask yourself).')
    shape = _leaf_shape(kernel)
    return {'features': shape[-2] if module.transpose_kernel else shape[-1]}

  if isinstance(module, nn.linear._Conv):  # Conv, ConvLocal and subclasses
    kernel = params.get('kernel')
    if kernel is None:
      return {}
    shape = _leaf_shape(kernel)
    if module.mask is not None and tuple(module.mask.shape) != shape:
      raise ResizeError(f'{path} ({type(module).__name__}): its `mask` field has shape '
                        f'{tuple(module.mask.shape)} but the kernel is {shape}; a masked conv '
                        'cannot be resized (slice the mask yourself).')
    fields = {'features': shape[-1]}
    groups = module.feature_group_count
    if groups != 1 and method_name == '__call__':
      x = _first_input(args, kwargs, 'inputs')
      if x is not None:
        in_ch, per_group = int(np.shape(x)[-1]), shape[-2]
        if in_ch % per_group:
          raise ResizeError(
              f'{path} ({type(module).__name__}): grouped conv (feature_group_count={groups}) '
              f'gets {in_ch} input channels but its kernel holds {per_group} input channels per '
              f'group; {in_ch} is not a multiple of {per_group}, so no group count fits. Remove '
              'whole groups, or the same number of units from every group.')
        new_groups = in_ch // per_group
        if shape[-1] % new_groups:
          raise ResizeError(
              f'{path} ({type(module).__name__}): grouped conv with {in_ch} input channels '
              f'({per_group} per group -> {new_groups} groups) has {shape[-1]} output channels, '
              f'not a multiple of {new_groups} groups (was feature_group_count={groups}, '
              f'features={module.features}). For a depthwise conv, remove the same channels '
              'from its input and its output.')
        fields['feature_group_count'] = new_groups
    return fields

  return {}


_PARAM_ERR = re.compile(r'For parameter "(?P<name>[^"]*)" in "(?P<path>[^"]*)", the given '
                        r'initializer is expected to generate shape (?P<init>\(.*?\)), but the '
                        r'existing parameter it received has shape (?P<given>\(.*?\))')


def _hardcoded_error(err: Exception, module: nn.Module) -> HardcodedWidthError:
  m = _PARAM_ERR.search(str(err))
  if m:
    name, path, init, given = m['name'], m['path'] or '/', m['init'], m['given']
  else:
    name, path, init, given = '?', _module_path(module), '?', '?'
  standard = (isinstance(module, _STANDARD) and type(module).__module__.startswith('flax.')
              and _module_path(module) == path)
  what = (f'the standard layer {type(module).__name__} could not be resized to its parameter '
          '(please report this)' if standard else
          f'module {path!r} ({type(module).__name__}) computes the shape of parameter {name!r} '
          'from a hard-coded width (a constructor field or a constant), not from its input')
  return HardcodedWidthError(
      f'Parameter {name!r} of module {path!r} has the pruned shape {given}, but the module code '
      f'asks for shape {init}: {what}. To prune it, derive the width from the input '
      "(e.g. `self.param(name, init, (x.shape[-1],))`) or from a standard Flax layer, or mark the "
      'module not prunable so its units are kept whole.')


_STANDARD = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed, nn.ConvTranspose, nn.linear._Conv,
             nn.MultiHeadDotProductAttention, nn.BatchNorm, nn.LayerNorm, nn.RMSNorm,
             nn.GroupNorm)
_RESIZED = _STANDARD[:7]  # the layers with width fields (norms take theirs from the input)


def _interceptor(next_fun: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
                 context: Any) -> Any:
  module = context.module
  fields = (_linen_fields(module, context.method_name, args, kwargs)
            if isinstance(module, _RESIZED) else {})
  fields = {k: v for k, v in fields.items() if getattr(module, k) != v}
  old = {k: getattr(module, k) for k in fields}
  for k, v in fields.items():
    object.__setattr__(module, k, v)
  try:
    return next_fun(*args, **kwargs)
  except flax_errors.ScopeParamShapeError as e:
    raise _hardcoded_error(e, module) from e
  except ValueError as e:
    if isinstance(module, nn.GroupNorm) and not isinstance(e, ResizeError):
      raise ResizeError(
          f'{_module_path(module)} (GroupNorm, num_groups={module.num_groups}, '
          f'group_size={module.group_size}) cannot normalise the pruned width: {e}. GroupNorm '
          'keeps the num_groups or group_size the model sets, so remove the same number of '
          'units from every group (num_groups set) or whole groups (group_size set).') from e
    raise
  finally:
    for k, v in old.items():
      object.__setattr__(module, k, v)


@contextlib.contextmanager
def resizing():
  """Context in which standard Linen layers take their widths from their parameters (what
  :func:`linen_apply` uses; for calling ``module.apply`` or ``nn.jit`` code yourself)."""
  with nn.intercept_methods(_interceptor):
    yield


def linen_apply(module: nn.Module, variables: Any, *args: Any, method: Any = None,
                mutable: Any = False, rngs: Any = None, **kwargs: Any) -> Any:
  """``module.apply(variables, *args, ...)`` where every standard layer's widths come from its
  (possibly sliced) parameters; same arguments and return value as ``Module.apply``."""
  with resizing():
    return module.apply(variables, *args, method=method, mutable=mutable, rngs=rngs, **kwargs)


# ------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------

def _path_str(path: Sequence[Any]) -> str:
  return '/'.join(str(p) for p in path) or '<root>'


def _shape(x: Any) -> tuple[int, ...]:
  """Shape of an array or of an abstract value (jax.ShapeDtypeStruct)."""
  return tuple(x.shape) if hasattr(x, 'shape') else tuple(np.shape(x))


def _var_shape(var: Any) -> Optional[tuple[int, ...]]:
  if var is None or not isinstance(var, nnx.Variable):
    return None
  return _shape(var.get_value())


def _set(module: Any, updates: dict[str, Any], name: str, value: Any) -> None:
  """Sets an attribute the layer derives from its variables (recorded even when unchanged: the
  stale-attribute check skips the attributes that are kept right here)."""
  if getattr(module, name, None) != value:
    setattr(module, name, value)
  updates[name] = value


def _fix_nnx_module(path: str, module: Any) -> dict[str, Any]:
  """Recomputes a standard NNX layer's static attributes from its variables; returns what
  changed."""
  up: dict[str, Any] = {}
  g = lambda name: _var_shape(getattr(module, name, None))

  if isinstance(module, nnx.MultiHeadAttention):
    q, k, o = (_var_shape(getattr(getattr(module, n), 'kernel', None))
               for n in ('query', 'key', 'out'))
    if q is not None:
      _set(module, up, 'in_features', q[0])
      _set(module, up, 'num_heads', q[-2])
      _set(module, up, 'head_dim', q[-1])
      _set(module, up, 'qkv_features', q[-2] * q[-1])
    if k is not None:
      _set(module, up, 'in_kv_features', k[0])
      _set(module, up, 'num_kv_heads', k[-2])
      if module.num_heads % module.num_kv_heads:
        raise ResizeError(f'{path} (MultiHeadAttention): {module.num_heads} query heads are not '
                          f'a multiple of {module.num_kv_heads} key/value heads after pruning.')
    if o is not None:
      _set(module, up, 'out_features', o[-1])
    v = _var_shape(getattr(getattr(module, 'value'), 'kernel', None))
    if (q is not None and v is not None and q[-1] != v[-1] and module.dropout_rate == 0.0 and
        module.attention_fn is nnx.dot_product_attention):
      raise ResizeError(
          f'{path} (MultiHeadAttention): query/key head_dim {q[-1]} != value head_dim {v[-1]}; '
          'without dropout nnx.dot_product_attention calls jax.nn.dot_product_attention, which '
          'needs one head_dim for q, k and v: prune q/k/v/out head_dim units together (or '
          'whole heads).')
    return up

  if isinstance(module, nnx.LinearGeneral):
    k = g('kernel')
    if k is not None:
      nb, ni = len(module.batch_axis), len(module.in_features)
      _set(module, up, 'in_features', tuple(k[nb:nb + ni]))
      _set(module, up, 'out_features', tuple(k[nb + ni:]))
      if nb:
        new_batch = type(module.batch_axis)(zip(module.batch_axis.keys(), k[:nb]))
        if dict(new_batch) != dict(module.batch_axis):
          _set(module, up, 'batch_axis', new_batch)
    return up

  if isinstance(module, nnx.Linear):
    k = g('kernel')
    if k is not None:
      _set(module, up, 'in_features', k[-2])
      _set(module, up, 'out_features', k[-1])
    return up

  if isinstance(module, nnx.Einsum):
    k, b = g('kernel'), g('bias')
    if k is not None:
      _set(module, up, 'kernel_shape', k)
    if b is not None:
      _set(module, up, 'bias_shape', b)
    return up

  if isinstance(module, nnx.Embed):
    e = g('embedding')
    if e is not None:
      _set(module, up, 'num_embeddings', e[0])
      _set(module, up, 'features', e[1])
    return up

  if isinstance(module, nnx.ConvTranspose):
    k = g('kernel')
    if k is not None:
      _check_mask(path, module, k)
      _set(module, up, 'kernel_shape', k)
      out_ax, in_ax = (-2, -1) if module.transpose_kernel else (-1, -2)
      _set(module, up, 'out_features', k[out_ax])
      _set(module, up, 'in_features', k[in_ax])
    return up

  if isinstance(module, nnx.Conv):
    k = g('kernel')
    if k is not None:
      _check_mask(path, module, k)
      old_groups = module.feature_group_count
      old_out, old_in = module.out_features, module.in_features
      old_per_group = old_in // old_groups
      per_group, out = k[-2], k[-1]
      if old_groups == 1:
        groups = 1
      elif per_group == old_per_group and (old_groups * out) % old_out == 0:
        # Depthwise (or whole groups removed): the channel multiplier old_out/old_groups stays.
        # (The kernel does not show the input width, so removing the same number of outputs
        # from every group while keeping every input is read this way too when it fits; pass
        # overrides or example_input to settle it.)
        groups = old_groups * out // old_out
      elif out % old_groups == 0:
        # Units removed inside every group: the group count stays.
        groups = old_groups
      else:
        raise ResizeError(
            f'{path} ({type(module).__name__}): grouped conv (feature_group_count={old_groups}, '
            f'{old_in}->{old_out} channels) now has {per_group} input channels per group and '
            f'{out} outputs: neither whole groups removed (a multiple of '
            f'{old_out // old_groups} outputs per group) nor the same number of units from every '
            'group. For a depthwise conv, remove the same channels from its input and output.')
      _set(module, up, 'kernel_shape', k)
      _set(module, up, 'feature_group_count', groups)
      _set(module, up, 'in_features', per_group * groups)
      _set(module, up, 'out_features', out)
    return up

  if isinstance(module, nnx.GroupNorm):
    s = g('scale') or g('bias')
    if s is not None:
      c = s[-1]
      if c % module.num_groups == 0:
        _set(module, up, 'group_size', c // module.num_groups)
        _set(module, up, 'num_groups', module.num_groups)
      elif c % module.group_size == 0:
        _set(module, up, 'num_groups', c // module.group_size)
        _set(module, up, 'group_size', module.group_size)
      else:
        raise ResizeError(
            f'{path} (GroupNorm, num_groups={module.num_groups}, group_size='
            f'{module.group_size}): {c} channels fit neither; remove the same number of units '
            'from every group or whole groups, or pass overrides={path: {"num_groups": ...}}.')
    return up

  if isinstance(module, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.InstanceNorm)):
    s = g('scale') or g('bias') or g('mean')
    if s is not None and hasattr(module, 'num_features'):
      _set(module, up, 'num_features', s[-1])
    return up
  return up


def _check_mask(path: str, module: Any, kernel_shape: tuple[int, ...]) -> None:
  mask = getattr(module, 'mask', None)
  if mask is not None and tuple(np.shape(mask)) != kernel_shape:
    raise ResizeError(f'{path} ({type(module).__name__}): its `mask` has shape '
                      f'{tuple(np.shape(mask))} but the kernel is now {kernel_shape}; slice the '
                      'mask too (overrides={path: {"mask": ...}}).')


def _flatten(tree: Mapping[Any, Any]) -> dict[tuple, Any]:
  return traverse_util.flatten_dict(dict(tree))


def _norm_key(path: Sequence[Any]) -> tuple:
  return tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in path)


def nnx_pure_state(model: nnx.Module) -> dict[Any, Any]:
  """The model's variables as a pure nested dict (``nnx.state(model).to_pure_dict()``)."""
  return nnx.state(model).to_pure_dict()


def nnx_load_state(model: nnx.Module, state_dict: Mapping[Any, Any], *,
                   overrides: Optional[Mapping[Any, Mapping[str, Any]]] = None,
                   example_input: Any = None, strict: bool = True) -> nnx.Module:
  """Prunes ``model`` in place: loads the (smaller) arrays of ``state_dict`` (structure of
  :func:`nnx_pure_state`) and updates the standard layers' static attributes; returns ``model``.

  Args:
    model: the NNX model, changed in place (the same Python object keeps working).
    state_dict: pure nested dict of arrays; keys are attribute names, ints for list items
      (digit strings are accepted too). Variables it does not name keep their value.
    overrides: module path (tuple, or '/'-joined string) -> attributes to set after loading, for
      custom modules or to choose e.g. a GroupNorm's ``num_groups``.
    example_input: if given (an array, or a tuple of positional arguments), runs an abstract
      forward pass afterwards (:func:`nnx_check_forward`); a failure is re-raised as a
      :class:`ResizeError` naming the innermost module that failed (the model stays loaded:
      fix it with ``overrides`` and load again).

  An error while loading or fixing attributes (e.g. a grouped conv whose new widths fit no
  group count) leaves the model as it was.
    strict: raise if ``state_dict`` names something that is not a variable of the model.
  """
  flat = {_norm_key(k): v for k, v in _flatten(state_dict).items()}
  variables: dict[tuple, Any] = {}
  modules: list[tuple[tuple, Any]] = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      variables[tuple(path)] = node
    elif isinstance(node, nnx.Module):
      modules.append((tuple(path), node))
  unknown = sorted(set(flat) - set(variables), key=str)
  if unknown and strict:
    raise ResizeError(f'state_dict names {len(unknown)} entries that are not variables of the '
                      f'model, e.g. {[_path_str(p) for p in unknown[:5]]}')

  by_path = dict(modules)
  targets = {}
  for key in overrides or {}:
    path = tuple(_norm_key(key.split('/') if isinstance(key, str) else key))
    if path not in by_path:
      raise ResizeError(f'overrides: no module at {_path_str(path)}')
    targets[path] = overrides[key]

  # Check every value first; old sizes of every axis that changes (for the stale check).
  changed: dict[tuple, list[tuple[int, int, int]]] = {}
  for path, value in flat.items():
    var = variables.get(path)
    if var is None:
      continue
    old, new = _var_shape(var), _shape(value)
    if len(old) != len(new):
      raise ResizeError(f'{_path_str(path)}: new value has shape {new}, the variable {old} '
                        '(different rank)')
    diffs = [(ax, o, n) for ax, (o, n) in enumerate(zip(old, new)) if o != n]
    if any(n > o for _, o, n in diffs):
      raise ResizeError(f'{_path_str(path)}: new value {new} is larger than the variable {old} '
                        'on some axis; nnx_load_state only shrinks')
    if diffs:
      changed[path] = diffs

  # Load, fix the attributes; on an error, put the old values and attributes back.
  old_values = {p: variables[p].get_value() for p in flat if p in variables}
  old_attrs = {p: dict(vars(m)) for p, m in modules}
  updated: dict[tuple, dict[str, Any]] = {}
  try:
    for path, value in flat.items():
      if path in variables:
        variables[path].set_value(value if isinstance(value, jax.Array)
                                  else jax.numpy.asarray(value))
    for path, module in modules:
      up = _fix_nnx_module(_path_str(path), module)
      if up:
        updated[path] = up
    for path, attrs in targets.items():
      for name, value in attrs.items():
        setattr(by_path[path], name, value)
        updated.setdefault(path, {})[name] = value
  except Exception:
    for p, v in old_values.items():
      variables[p].set_value(v)
    for p, m in modules:
      for name in updated.get(p, {}):
        if name in old_attrs[p]:
          object.__setattr__(m, name, old_attrs[p][name])
    raise

  _warn_stale(modules, changed, updated)
  if example_input is not None:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    nnx_check_forward(model, *args)
  return model


# Integer attributes of standard layers that are not widths (or that _fix_nnx_module sets).
_NOT_WIDTHS = {'axis', 'feature_axis', 'feature_axes', 'reduction_axes', 'kernel_size', 'strides',
               'padding', 'input_dilation', 'kernel_dilation'}


def _warn_stale(modules: list[tuple[tuple, Any]], changed: Mapping[tuple, list],
                updated: Mapping[tuple, Mapping[str, Any]]) -> None:
  """Warns about integer attributes equal to an old width that changed below the module."""
  for path, module in modules:
    old_sizes: dict[int, str] = {}
    for vpath, diffs in changed.items():
      if vpath[:len(path)] == path:
        for ax, o, n in diffs:
          old_sizes.setdefault(o, f'axis {ax} of {_path_str(vpath)} ({o} -> {n})')
    if not old_sizes:
      continue
    for name, value in vars(module).items():
      if (name.startswith('_') or name in _NOT_WIDTHS or name in updated.get(path, {}) or
          isinstance(value, (bool, nnx.Variable, nnx.Module))):
        continue
      vals = value if isinstance(value, tuple) else (value,)
      hits = [old_sizes[v] for v in vals
              if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v in old_sizes]
      if hits:
        warnings.warn(
            f'module {_path_str(path)} ({type(module).__name__}) keeps attribute {name}={value!r}, '
            f'which equals an old width that pruning changed: {hits[0]}. If it is a width, '
            'the module now breaks or computes something else: derive it from the input or the '
            'variable shapes, or set it with nnx_load_state(..., overrides={path: {name: new}}).',
            StaleAttributeWarning, stacklevel=3)


def nnx_check_forward(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
  """Runs ``model(*args, **kwargs)`` abstractly (``jax.eval_shape`` on a copy, the model is not
  changed); returns the output shapes, or raises :class:`ResizeError` naming the innermost
  module whose code failed (e.g. a custom module with a stale width)."""
  graphdef, state = nnx.split(model)
  by_id: dict[int, str] = {}

  def run(state, args, kwargs):
    copy = nnx.merge(graphdef, state)
    for path, node in nnx.iter_graph(copy):
      if isinstance(node, nnx.Module):
        by_id[id(node)] = _path_str(path)
    return copy(*args, **kwargs)

  filtering = jax.config.jax_traceback_filtering
  jax.config.update('jax_traceback_filtering', 'off')  # keep the module frames
  try:
    return jax.eval_shape(run, state, args, kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
      obj = frame.f_locals.get('self')
      if obj is not None and id(obj) in by_id:
        where = (by_id[id(obj)], type(obj).__name__)
    if where is None:
      raise
    raise ResizeError(
        f'the pruned model fails in module {where[0]} ({where[1]}): {type(e).__name__}: {e}. '
        'If this module keeps a width as an attribute or constant, derive it from its input or '
        'its variables, or set it with nnx_load_state(..., overrides=...).') from e
  finally:
    jax.config.update('jax_traceback_filtering', filtering)


def nnx_apply_fn(model: nnx.Module) -> Callable[..., Any]:
  """``fn(state_dict, *args, **kwargs) -> model(*args, **kwargs)`` with the model's variables
  replaced by the pure dict ``state_dict`` (same shapes as the model's now; jit-able). Build it
  after :func:`nnx_load_state`: a GraphDef keeps the static attributes of the time it was
  made."""
  graphdef, state = nnx.split(model)

  def fn(state_dict: Mapping[Any, Any], *args: Any, **kwargs: Any) -> Any:
    st = jax.tree.map(lambda x: x, state)
    st.replace_by_pure_dict(state_dict)
    return nnx.merge(graphdef, st)(*args, **kwargs)

  return fn
