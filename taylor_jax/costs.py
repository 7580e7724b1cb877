"""What a network costs: parameters, FLOPs (as MACs) and measured latency.

Conventions (those of the paper's and most pruning papers' FLOPs tables):

* :func:`flops` counts **multiply-accumulates (MACs)** of one forward pass of **one example**,
  of the convolutions and dense layers only (every ``conv_general_dilated`` and ``dot_general``
  of the traced eval-mode forward pass); BatchNorm, ReLU, pooling, adds and gates are not
  counted. A conv's MACs are ``output elements * kernel spatial size * in-channels /
  feature_group_count``: every kernel tap counts, padded ones included (the usual convention).
  Note that every ``dot_general`` counts, e.g. the ``einsum`` of VGG's adaptive 7x7 average pool
  when the last feature map is not already 7x7 (negligible: ``49 * C`` MACs per example).
* ``count_padding=False`` counts only kernel taps that fall inside the (unpadded) input, which is
  the convention of XLA's ``HloCostAnalysis``. XLA reports **flops = 2 x MACs** for convolutions
  and dots (one multiply + one add per MAC) plus one flop per element of every elementwise op
  (BN, ReLU, gates, adds) and reductions. So ``xla_flops ~= 2 * flops(count_padding=False) +
  elementwise`` (exact for the module as lowered; the optimised module can count a few percent
  more, see :func:`xla_flops`); elementwise work is 0.2-1.6% of the total for the zoo.
  :func:`xla_conv_dot_flops` is XLA's count for just the conv/dot ops, which equals
  ``2 * flops(count_padding=False)``.
* With ``masks``, FLOPs are those of the surgered network (the model rebuilt with the widths of
  the kept units, :func:`taylor_jax.surgery.new_widths`), i.e. what a masked network costs once the
  masked units are removed.

:func:`latency_ms` measures instead of counting: FLOPs drop does not imply latency drop (odd
channel counts, memory-bound layers), so report both.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from taylor_jax import surgery
from taylor_jax.models import common as model_common

Shape = Sequence[int]


def count_params(variables_or_params: Mapping[str, Any]) -> int:
  """Number of parameters (entries of ``params``; a variables dict counts its 'params' only)."""
  tree = variables_or_params
  if isinstance(tree, Mapping) and 'params' in tree:
    tree = tree['params']
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


# --- counting from the jaxpr -------------------------------------------------------------------

def _conv_valid_taps(in_size: int, out_size: int, k: int, stride: int, pad_lo: int,
                     lhs_dil: int, rhs_dil: int) -> int:
  """Number of (output position, kernel tap) pairs of one spatial axis that read a real input
  element (not padding, not a hole of input dilation), as XLA's HloCostAnalysis counts them."""
  dilated_in = (in_size - 1) * lhs_dil + 1 if in_size > 0 else 0
  o = np.arange(out_size)[:, None]
  t = np.arange(k)[None, :]
  pos = o * stride - pad_lo + t * rhs_dil
  ok = (pos >= 0) & (pos < dilated_in) & (pos % lhs_dil == 0)
  return int(ok.sum())


def _conv_macs(eqn, count_padding: bool) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  p = eqn.params
  dn = p['dimension_numbers']
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  kernel_in = rhs.shape[rhs_spec[1]]  # == in-channels / feature_group_count
  ksp = [rhs.shape[d] for d in rhs_spec[2:]]
  if count_padding:
    return int(math.prod(out.shape) * math.prod(ksp) * kernel_in)
  n = out.shape[out_spec[0]]
  cout = out.shape[out_spec[1]]
  valid = 1
  for i, k in enumerate(ksp):
    valid *= _conv_valid_taps(lhs.shape[lhs_spec[2 + i]], out.shape[out_spec[2 + i]], k,
                              p['window_strides'][i], p['padding'][i][0],
                              p['lhs_dilation'][i], p['rhs_dilation'][i])
  return int(n * cout * kernel_in * valid)


def _dot_macs(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  return int(math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract))


def _walk(jaxpr, count_padding: bool, mult: int, out: list) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      out.append((eqn, mult * _conv_macs(eqn, count_padding)))
    elif name == 'dot_general':
      out.append((eqn, mult * _dot_macs(eqn)))
    subs = list(jcore.jaxprs_in_params(eqn.params))
    if not subs:
      continue
    if name == 'scan':
      sub_mult = mult * int(eqn.params['length'])
    else:  # jit, custom_jvp/vjp, remat, while (body counted once), cond (every branch)
      sub_mult = mult
    if name == 'cond':  # count the most expensive branch
      branches = []
      for sub in subs:
        acc: list = []
        _walk(sub, count_padding, sub_mult, acc)
        branches.append(acc)
      out.extend(max(branches, key=lambda a: sum(m for _, m in a)))
      continue
    for sub in subs:
      _walk(sub, count_padding, sub_mult, out)


def jaxpr_macs(closed_jaxpr, count_padding: bool = True) -> int:
  """MACs of every conv/dot of a (closed) jaxpr, nested calls included; a ``vmap``-ed op
  counts its whole batch. Trace models under :func:`model_common.reference_convolutions`."""
  out: list = []
  _walk(closed_jaxpr.jaxpr, count_padding, 1, out)
  return int(sum(m for _, m in out))


def _abstract_variables(model, input_shape: Shape):
  x = model_common.example_input(model, input_shape)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype))), x


def _eval_jaxpr(model, input_shape: Shape):
  variables, x = _abstract_variables(model, input_shape)
  fn = lambda v, xx: model.apply(v, xx, train=False)
  with model_common.reference_convolutions():  # count the grayscale stem as the conv it is
    return jax.make_jaxpr(fn)(variables, x)


def _surgered(model, masks: Optional[Mapping[str, Any]]):
  if masks is None:
    return model
  return model.clone(widths=surgery.new_widths(model.widths, jax.device_get(masks)))


def conv_dot_ops(model, input_shape: Shape, masks: Optional[Mapping[str, Any]] = None,
                 count_padding: bool = True) -> list[tuple[Any, int]]:
  """``(jaxpr equation, MACs)`` of every conv/dot of one example's eval forward pass."""
  out: list = []
  _walk(_eval_jaxpr(_surgered(model, masks), input_shape).jaxpr, count_padding, 1, out)
  return out


# Counting traces the model (about 0.25 s for ResNet-20), and a pruning step with a cost target
# counts a dozen candidate widths, several again: counts of Linen models are kept, keyed by
# their class and field values (widths included); a model with an unhashable field is not kept.
_COUNTS: collections.OrderedDict = collections.OrderedDict()
_COUNTS_MAX = 512


def _count_key(model, *rest) -> Optional[tuple]:
  if not isinstance(model, nn.Module):
    return None
  fields = []
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    v = getattr(model, f.name)
    if isinstance(v, Mapping):
      v = tuple(sorted(v.items()))
    try:
      hash(v)
    except TypeError:
      return None
    fields.append((f.name, v))
  return (type(model), tuple(fields), *rest)


def _counted(kind: str, model, input_shape: Shape, count, *options) -> int:
  key = _count_key(model, kind, tuple(input_shape), *options)
  if key is None:
    return count()
  if key not in _COUNTS:
    _COUNTS[key] = count()
    if len(_COUNTS) > _COUNTS_MAX:
      _COUNTS.popitem(last=False)
  return _COUNTS[key]


def flops(model, input_shape: Shape, masks: Optional[Mapping[str, Any]] = None,
          count_padding: bool = True) -> int:
  """MACs of one eval forward pass of one example (convs + dense only; see module doc).

  Args:
    model: a zoo model (its ``widths`` decide the cost; no variables needed).
    input_shape: one example's shape, without the batch axis, e.g. ``(32, 32, 3)``.
    masks: group -> 0/1 mask; if given, the MACs of the surgered model (masked units removed).
    count_padding: count kernel taps over padding (default, the papers' convention); False
      gives XLA's convention (only taps that read real input).
  """
  small = _surgered(model, masks)
  return _counted('flops', small, input_shape, lambda: int(sum(
      m for _, m in conv_dot_ops(small, input_shape, None, count_padding))), count_padding)


def params(model, input_shape: Shape, masks: Optional[Mapping[str, Any]] = None) -> int:
  """Parameters of ``model`` (with ``masks``: of the surgered model), from its widths alone."""
  small = _surgered(model, masks)
  return _counted('params', small, input_shape,
                  lambda: count_params(_abstract_variables(small, input_shape)[0]))


def _xla_cost_flops(stage) -> float:
  """'flops' of XLA's HloCostAnalysis of a ``Lowered`` (module as emitted) or ``Compiled``
  (optimised module) stage."""
  ca = stage.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per device/program
    ca = ca[0]
  return float(ca.get('flops', 0.0))


def xla_flops(model, variables: Mapping[str, Any], input_shape: Shape,
              optimized: bool = True) -> float:
  """XLA's cost analysis ('flops') of the jitted eval forward pass of one example.

  XLA counts 2 flops per MAC of convs and dots (kernel taps over padding excluded) plus one per
  element of elementwise ops and reductions (BN, ReLU, gates, adds, pooling), so
  ``xla_flops(optimized=False) == 2 * flops(count_padding=False) + elementwise`` exactly.

  Args:
    optimized: True: the compiled (optimised) module, ``jit(...).lower(...).compile()``. Its
      count can exceed the unoptimised one by a few percent because XLA's fusion duplicates
      cheap elementwise producers into several consumers (measured: +2.3% on ResNet-56,
      +2.6% on ResNet-101 at 32x32), a property of the compiled program, not of the network.
      False: the module as lowered from JAX (``jit(...).lower(...)``), one count per op.
  """
  x = model_common.example_input(model, input_shape)
  fn = lambda v, xx: model.apply(v, xx, train=False)
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), variables)
  with model_common.reference_convolutions():
    lowered = jax.jit(fn).lower(variables, x)
  return _xla_cost_flops(lowered.compile() if optimized else lowered)


def xla_conv_dot_flops(model, input_shape: Shape,
                       masks: Optional[Mapping[str, Any]] = None) -> float:
  """XLA's cost analysis of just the conv/dot ops of one example's eval forward pass.

  Every conv/dot equation of the traced forward pass is lowered alone (same primitive, same
  parameters, same operand shapes) and XLA's 'flops' of it summed. Equals
  ``2 * flops(..., count_padding=False)`` when our MAC formula matches XLA's.
  """
  total, cache = 0.0, {}
  for eqn, _ in conv_dot_ops(model, input_shape, masks):
    avals = [v.aval for v in eqn.invars]
    key = (eqn.primitive.name, tuple((a.shape, str(a.dtype)) for a in avals),
           repr(sorted(eqn.params.items())))
    if key not in cache:
      prim, params = eqn.primitive, dict(eqn.params)
      fn = lambda *args: prim.bind(*args, **params)
      args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
      cache[key] = _xla_cost_flops(jax.jit(fn).lower(*args))
    total += cache[key]
  return total


# --- measuring -----------------------------------------------------------------------------

# Latency is timed on the program deployment runs: XLA's default backend optimisation (level 3),
# even where the process compiles at a lower level (the test suite: tests/conftest.py), under
# which a ResNet-18 forward pass runs 5x slower (experiments/bench_compile_once.py; CPU only,
# where it was measured: other backends compile latency programs with XLA's defaults).
_DEPLOYED = {'xla_backend_optimization_level': 3}


def latency_ms(model, variables: Mapping[str, Any], masks: Optional[Mapping[str, Any]],
               batch_size: int, input_shape: Shape, repeats: int = 20,
               warmup: int = 3) -> dict[str, float]:
  """Wall-clock milliseconds of one jitted eval forward pass of ``batch_size`` examples.

  Each of ``repeats`` timed calls is synchronised with ``block_until_ready`` (after ``warmup``
  untimed calls that include compilation). ``masks`` (or None) are passed as the gates: time the
  surgered model (masks None) to see what pruning buys, the masked one to see the dense cost.

  Returns:
    ``{'median': ..., 'p10': ..., 'p90': ..., 'mean': ..., 'min': ..., 'batch_size': ...,
    'repeats': ...}`` (milliseconds per batch).
  """
  return compare_latency({'net': (model, variables, masks)}, batch_size, input_shape,
                         repeats=repeats, rounds=1, warmup=warmup)['net']


def compare_latency(nets: Mapping[str, tuple[Any, Mapping[str, Any], Optional[Mapping[str, Any]]]],
                    batch_size: int, input_shape: Shape, repeats: int = 20, rounds: int = 3,
                    warmup: int = 3) -> dict[str, dict[str, float]]:
  """Latencies of several networks measured under the same conditions, for ratios.

  ``nets``: name -> ``(model, variables, masks or None)``. Every network is compiled and warmed
  up first; then ``rounds`` rounds each time every network in turn (``repeats`` synchronised
  calls), so load that comes and goes hits all of them alike. Per network: the statistics of the
  round with the lowest median (the least disturbed), in ms per batch, plus ``round_medians``.
  """
  first = next(iter(nets.values()))[0]
  x = model_common.example_input(first, input_shape, batch_size, np.random.default_rng(0))
  calls = {}
  for name, (model, variables, masks) in nets.items():
    gates = None if masks is None else jax.device_put(
        {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()})
    args = (jax.device_put(variables), gates, x)
    fn = jax.jit(lambda v, g, xx, m=model: m.apply(v, xx, gates=g, train=False)).lower(
        *args).compile(compiler_options=_DEPLOYED if jax.default_backend() == 'cpu' else None)
    for _ in range(max(1, warmup)):
      jax.block_until_ready(fn(*args))
    calls[name] = (fn, args)
  per_round: dict[str, list[np.ndarray]] = {name: [] for name in nets}
  for _ in range(max(1, rounds)):
    for name, (fn, args) in calls.items():
      times = []
      for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
      per_round[name].append(np.asarray(times))
  out = {}
  for name, rs in per_round.items():
    medians = [float(np.median(t)) for t in rs]
    t = rs[int(np.argmin(medians))]
    out[name] = {'median': float(np.median(t)), 'p10': float(np.percentile(t, 10)),
                 'p90': float(np.percentile(t, 90)), 'mean': float(t.mean()),
                 'min': float(t.min()), 'batch_size': int(batch_size), 'repeats': int(t.size),
                 'round_medians': medians}
  return out


def latency_table(model, input_shape: Shape, widths: Mapping[str, Sequence[int]],
                  batch_size: int = 64, repeats: int = 10, rounds: int = 3
                  ) -> dict[str, dict[int, float]]:
  """Measured latency (ms per batch) of ``model`` with ONE group at a time at each of its
  candidate ``widths`` (the other groups as in ``model.widths``): ``{group: {width: ms}}``.

  A per-group lookup table for latency-aware ranking (HALP, Shen et al. 2022, measure per
  layer; whole-network timing here also catches the backend's per-shape choices, e.g. which
  convolutions XLA:CPU hands to YNNPACK). Every network is timed in turn with the others
  (:func:`compare_latency`); weights are zeros, as latency depends on shapes only.
  """
  x = jnp.zeros((1,) + tuple(input_shape), model_common.input_dtype(model))

  def zeros_like_init(m):
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  nets = {'base': (model, zeros_like_init(model), None)}
  for name, ws in widths.items():
    for w in ws:
      if int(w) != model.widths[name]:
        m = model.clone(widths={**model.widths, name: int(w)})
        nets[f'{name}={int(w)}'] = (m, zeros_like_init(m), None)
  lat = compare_latency(nets, batch_size, input_shape, repeats=repeats, rounds=rounds)
  base = lat['base']['median']
  ms = lambda name, w: base if w == model.widths[name] else lat[f'{name}={w}']['median']
  return {name: {int(w): ms(name, int(w)) for w in sorted(ws)} for name, ws in widths.items()}


def interpolate(table: Mapping[int, float], width: float) -> float:
  """Piecewise-linear value of a ``{width: value}`` table at ``width`` (constant outside)."""
  ws = sorted(int(w) for w in table)
  return float(np.interp(width, ws, [table[w] for w in ws]))


def summary(model, variables: Mapping[str, Any], input_shape: Shape) -> dict[str, int]:
  """``{'params': count_params(variables), 'flops': flops(model, input_shape)}`` (MACs)."""
  return {'params': count_params(variables), 'flops': flops(model, input_shape)}
