"""Discovery: the channel groups of any Flax model, found from the jaxpr of its apply function.

:func:`discover_groups` traces ``apply_fn(variables, x)`` with :func:`jax.make_jaxpr` (abstract
values: nothing is computed) and propagates *which units each array axis holds* through every
equation. An axis holds a *layout*: a sequence of *atoms* (runs of units that must be pruned
together), so that a concatenation's output axis is ``[A, B]`` and a flatten's output axis is
``[C] * (H * W)``. Equations join atoms (an add joins the two operands' channel axes; a
convolution joins the input's feature axis with the kernel's input axis) with a union-find;
splits and slices refine atoms at their boundaries. At the end every atom that reaches a
parameter axis is a :class:`~taylor_jax.groups.ChannelGroup`, with one
:class:`~taylor_jax.groups.Slice` per (variable, axis) it occupies: ``offset`` from its position
in the axis' period, ``repeat`` from the number of periods (a flatten).

What is never pruned: atoms that reach the model's input or output (image channels, logits),
spatial axes, grouped convolutions other than depthwise, merged reshapes' major axes (heads
merged into features), and whatever ``keep_whole`` names. Atoms reduced over their own axis
(LayerNorm, GroupNorm, RMSNorm, a mean over channels) are *marked*: zeroing such a unit is not
the same as removing it, so they are kept whole unless ``prune_marked=True``.

Sub-jaxprs (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``, ``scan``, ``cond``,
``while``) are walked once per call site under their own key prefix: JAX caches and shares
sub-jaxprs across call sites, so keying by ``Var`` alone would merge unrelated channels.

A primitive without a rule is an error (:class:`DiscoveryError`) naming the primitive, the
source line, the module and the parameters whose channels reach it; never a guess.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.extend.core as jex
import numpy as np
from jax._src import source_info_util

from taylor_jax.groups import ChannelGroup, Path, Slice


class DiscoveryError(ValueError):
  """The analysis cannot follow the model; the message says where and what to do."""


# =============================================================================================
# Atoms: a union-find over runs of units, with refinement (splits) at the roots
# =============================================================================================

class _Atoms:

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.children: dict[int, tuple[int, ...]] = {}

  def new(self, size: int) -> int:
    self.parent.append(len(self.parent))
    self.size.append(int(size))
    return len(self.parent) - 1

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def leaves(self, layout: Iterable[int]) -> list[int]:
    out = []
    for a in layout:
      r = self.find(a)
      if r in self.children:
        out.extend(self.leaves(self.children[r]))
      else:
        out.append(r)
    return out

  def split(self, a: int, at: int) -> None:
    r = self.find(a)
    assert r not in self.children and 0 < at < self.size[r]
    self.children[r] = (self.new(at), self.new(self.size[r] - at))

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      assert self.size[ra] == self.size[rb] and ra not in self.children and rb not in self.children
      self.parent[rb] = ra

  def refine(self, layout: Sequence[int], cuts: Iterable[int]) -> None:
    """Splits atoms of ``layout`` so that each position in ``cuts`` is an atom boundary."""
    for cut in sorted(set(cuts)):
      pos = 0
      for leaf in self.leaves(layout):
        if pos < cut < pos + self.size[leaf]:
          self.split(leaf, cut - pos)
          break
        pos += self.size[leaf]

  def boundaries(self, layout: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for leaf in self.leaves(layout):
      pos += self.size[leaf]
      out.append(pos)
    return out

  def unify(self, l1: Sequence[int], l2: Sequence[int]) -> None:
    """Makes two layouts of one axis length hold the same units, position by position."""
    while True:
      b1, b2 = self.boundaries(l1), self.boundaries(l2)
      if b1 == b2:
        break
      self.refine(l1, b2)
      self.refine(l2, b1)
    for x, y in zip(self.leaves(l1), self.leaves(l2)):
      self.union(x, y)

  def sub(self, layout: Sequence[int], start: int, stop: int) -> tuple[int, ...]:
    """The atoms holding positions ``[start, stop)`` of ``layout`` (refined to fit exactly)."""
    self.refine(layout, (start, stop))
    out, pos = [], 0
    for leaf in self.leaves(layout):
      if start <= pos < stop:
        out.append(leaf)
      pos += self.size[leaf]
    return tuple(out)


Layout = tuple[int, ...]  # atom ids; () for an axis of length 1 (it holds no prunable unit)


@dataclasses.dataclass
class _Mark:
  atoms: tuple[int, ...]
  kind: str    # 'io' | 'keep' | 'reduced'
  reason: str


@dataclasses.dataclass
class _VarInfo:
  path: Path
  shape: tuple[int, ...]
  layouts: list[Layout]
  uses: dict[int, set[str]] = dataclasses.field(default_factory=dict)  # axis -> {'in','out','ew'}
  scales: bool = False  # multiplies, divides or feeds an rsqrt: a normalisation's variable
  first_use: float = float('inf')  # index of the first equation using it as a kernel
  passthrough: bool = False  # a depthwise kernel: passes channels through, not a producer


# =============================================================================================
# The propagation
# =============================================================================================

_ELEMENTWISE = {
    'add', 'sub', 'mul', 'div', 'max', 'min', 'pow', 'atan2', 'rem', 'nextafter', 'select_n',
    'neg', 'abs', 'sign', 'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic', 'sin', 'cos',
    'tan', 'asin', 'acos', 'atan', 'sinh', 'cosh', 'asinh', 'acosh', 'atanh', 'sqrt', 'rsqrt',
    'cbrt', 'square', 'integer_pow', 'erf', 'erfc', 'erf_inv', 'lgamma', 'digamma', 'floor',
    'ceil', 'round', 'is_finite', 'convert_element_type', 'stop_gradient', 'reduce_precision',
    'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'and', 'or', 'not', 'xor', 'clamp', 'copy', 'copy_p',
    'imag', 'real', 'conj', 'optimization_barrier',
}
_REDUCTIONS = {'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'reduce_and',
               'reduce_or', 'argmax', 'argmin', 'reduce_xor'}
_SCANS = {'cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp'}
# Ops through which a variable keeps being "that variable" (for roles).
_SHAPE_ONLY = {'convert_element_type', 'reshape', 'squeeze', 'expand_dims', 'broadcast_in_dim',
               'transpose', 'slice', 'copy', 'copy_p', 'reduce_precision'}


def _where(eqn) -> str:
  line = source_info_util.summarize(eqn.source_info)
  stack = str(eqn.source_info.name_stack)
  return f'{line}' + (f' (module {stack})' if stack else '')


class _Tracer:
  """Walks a jaxpr, giving every array axis a layout and joining atoms equation by equation."""

  def __init__(self, vars_info: list[_VarInfo]):
    self.atoms = _Atoms()
    self.env: dict[tuple, list[Layout]] = {}
    self.marks: list[_Mark] = []
    self.vars = vars_info
    # (ctx, var) -> (variable index, axis map: operand axis -> variable axis or None)
    self.origin: dict[tuple, tuple[int, tuple[Optional[int], ...]]] = {}
    self.activation: set[tuple] = set()   # values that depend on the model input
    self.counter = 0  # equations seen, in program order (nested ones included)

  # -- layouts -----------------------------------------------------------------------------
  def fresh(self, shape: Sequence[int]) -> list[Layout]:
    return [(self.atoms.new(n),) if n > 1 else () for n in shape]

  def layouts(self, ctx, v) -> list[Layout]:
    if isinstance(v, jex.Literal):
      return self.fresh(np.shape(v.val))
    key = (ctx, v)
    if key not in self.env:
      self.env[key] = self.fresh(v.aval.shape)
    return self.env[key]

  def bind(self, ctx, v, layouts: list[Layout]) -> None:
    key = (ctx, v)
    if key in self.env:
      for a, b in zip(self.env[key], layouts):
        self.join(a, b)
    else:
      self.env[key] = list(layouts)

  def join(self, a: Layout, b: Layout) -> None:
    if a and b:
      self.atoms.unify(a, b)

  def mark(self, layouts: Iterable[Layout], kind: str, reason: str) -> None:
    atoms = tuple(a for lay in layouts for a in lay)
    if atoms:
      self.marks.append(_Mark(atoms, kind, reason))

  def is_act(self, ctx, v) -> bool:
    return not isinstance(v, jex.Literal) and (ctx, v) in self.activation

  # -- the walk ----------------------------------------------------------------------------
  def run(self, jaxpr, ctx: tuple) -> None:
    for i, eqn in enumerate(jaxpr.eqns):
      self.equation(eqn, ctx + (i,), ctx)

  def equation(self, eqn, sub_ctx: tuple, ctx: tuple) -> None:
    name = eqn.primitive.name
    self.counter += 1
    ins = [self.layouts(ctx, v) for v in eqn.invars]
    if any(self.is_act(ctx, v) for v in eqn.invars):
      for o in eqn.outvars:
        self.activation.add((ctx, o))
    self.track_origin(eqn, ctx)
    rule = _RULES.get(name)
    if rule is None:
      if name in _ELEMENTWISE:
        rule = _elementwise
      elif name in _REDUCTIONS:
        rule = _reduction
      elif name in _SCANS:
        rule = _cumulative
    if rule is None:
      raise DiscoveryError(self.unknown_message(eqn, ctx))
    rule(self, eqn, ins, ctx, sub_ctx)

  def out(self, eqn, ctx, layouts_list: Sequence[list[Layout]]) -> None:
    for v, lays in zip(eqn.outvars, layouts_list):
      self.bind(ctx, v, lays)

  def call(self, closed_or_open, in_layouts: Sequence[list[Layout]], sub_ctx: tuple,
           outer_ins: Sequence = (), ctx: tuple = ()) -> list[list[Layout]]:
    """Walks a sub-jaxpr at its own call path; returns its outputs' layouts."""
    jaxpr = getattr(closed_or_open, 'jaxpr', closed_or_open)
    for cv in jaxpr.constvars:
      self.layouts(sub_ctx, cv)
    for k, (v, lays) in enumerate(zip(jaxpr.invars, in_layouts)):
      self.bind(sub_ctx, v, lays)
      if k < len(outer_ins):
        outer = outer_ins[k]
        if self.is_act(ctx, outer):
          self.activation.add((sub_ctx, v))
        if not isinstance(outer, jex.Literal) and (ctx, outer) in self.origin:
          self.origin[(sub_ctx, v)] = self.origin[(ctx, outer)]
    self.run(jaxpr, sub_ctx)
    outs = [self.layouts(sub_ctx, v) for v in jaxpr.outvars]
    return outs

  def call_outputs_activation(self, eqn, ctx, jaxpr, sub_ctx) -> None:
    jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
    for o, inner in zip(eqn.outvars, jaxpr.outvars):
      if self.is_act(sub_ctx, inner):
        self.activation.add((ctx, o))

  # -- roles ---------------------------------------------------------------------------------
  def track_origin(self, eqn, ctx) -> None:
    """Follows model variables through shape-only ops, so a kernel is known at its use."""
    name = eqn.primitive.name
    if name not in _SHAPE_ONLY or not eqn.invars:
      return
    src = eqn.invars[0]
    if isinstance(src, jex.Literal) or (ctx, src) not in self.origin:
      return
    idx, amap = self.origin[(ctx, src)]
    in_shape, out_shape = src.aval.shape, eqn.outvars[0].aval.shape
    if name == 'transpose':
      new = tuple(amap[p] for p in eqn.params['permutation'])
    elif name == 'broadcast_in_dim':
      new = [None] * len(out_shape)
      for i, d in enumerate(eqn.params['broadcast_dimensions']):
        new[d] = amap[i]
      new = tuple(new)
    elif name in ('reshape', 'squeeze', 'expand_dims'):
      kept_in = [a for a, n in zip(amap, in_shape) if n > 1]
      if [n for n in in_shape if n > 1] != [n for n in out_shape if n > 1]:
        return  # a real reshape: roles are read at the variable itself
      it = iter(kept_in)
      new = tuple(next(it) if n > 1 else None for n in out_shape)
    else:
      new = amap
    self.origin[(ctx, eqn.outvars[0])] = (idx, new)

  def use(self, ctx, v, axis: int, kind: str) -> None:
    if isinstance(v, jex.Literal) or (ctx, v) not in self.origin:
      return
    idx, amap = self.origin[(ctx, v)]
    if axis < len(amap) and amap[axis] is not None:
      self.vars[idx].uses.setdefault(amap[axis], set()).add(kind)
      self.vars[idx].first_use = min(self.vars[idx].first_use, self.counter)

  def variable_of(self, ctx, v) -> Optional[int]:
    if isinstance(v, jex.Literal) or (ctx, v) not in self.origin:
      return None
    return self.origin[(ctx, v)][0]

  # -- errors --------------------------------------------------------------------------------
  def params_reaching(self, layouts: Iterable[Layout]) -> list[str]:
    roots = {r for lay in layouts for r in self.atoms.leaves(lay)}
    names = []
    for info in self.vars:
      for lay in info.layouts:
        if roots & set(self.atoms.leaves(lay)):
          names.append('/'.join(map(str, info.path)))
          break
    return names

  def unknown_message(self, eqn, ctx) -> str:
    reach = self.params_reaching(lay for v in eqn.invars for lay in self.layouts(ctx, v))
    shown = ', '.join(reach[:6]) + (f' and {len(reach) - 6} more' if len(reach) > 6 else '')
    return (f"discovery has no rule for primitive '{eqn.primitive.name}' at {_where(eqn)}; "
            f"channels of {shown or 'no parameter'} reach it. Without a rule the analysis cannot "
            'tell which units it mixes, so it does not guess. What you can do: keep the channels '
            "that reach it whole (discover_groups(..., unknown_primitives='keep_whole'), or "
            'keep_whole=[module paths]), or rewrite that op with standard jax.numpy/lax ops.')


# --- rules ------------------------------------------------------------------------------------

def _elementwise(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  shape = eqn.outvars[0].aval.shape
  out = t.fresh(shape)
  for v, lays in zip(eqn.invars, ins):
    if len(lays) != len(shape):
      continue  # scalars (rank 0) broadcast; jaxprs have no other implicit broadcasting
    for ax, (lay, n) in enumerate(zip(lays, v.aval.shape)):
      if n == shape[ax]:
        t.join(out[ax], lay)
  # Roles: a variable that multiplies or divides (a norm's scale; Flax folds it into
  # rsqrt(var + eps) before it meets the activations) marks its module as a normalisation.
  if eqn.primitive.name in ('mul', 'div', 'rsqrt', 'sqrt'):
    for v in eqn.invars:
      idx = t.variable_of(ctx, v)
      if idx is not None:
        t.vars[idx].scales = True
  t.out(eqn, ctx, [out] * len(eqn.outvars))


def _reduction(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  axes = set(eqn.params['axes'])
  lays = ins[0]
  reduced = [lays[a] for a in axes]
  t.mark(reduced, 'reduced', f'{eqn.primitive.name} over this axis at {_where(eqn)}')
  kept = [lay for a, lay in enumerate(lays) if a not in axes]
  t.out(eqn, ctx, [kept] * len(eqn.outvars))


def _cumulative(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  ax = eqn.params['axis']
  t.mark([ins[0][ax]], 'keep', f'{eqn.primitive.name} mixes positions along it at {_where(eqn)}')
  t.out(eqn, ctx, [ins[0]])


def _passthrough(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  t.out(eqn, ctx, [ins[0]])


def _broadcast_in_dim(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  shape = eqn.params['shape']
  out = t.fresh(shape)
  for i, d in enumerate(eqn.params['broadcast_dimensions']):
    if eqn.invars[0].aval.shape[i] == shape[d]:
      t.join(out[d], ins[0][i])
  t.out(eqn, ctx, [out])


def _transpose(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  t.out(eqn, ctx, [[ins[0][p] for p in eqn.params['permutation']]])


def _squeeze(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  dims = {d % len(ins[0]) for d in eqn.params['dimensions']}
  t.out(eqn, ctx, [[lay for a, lay in enumerate(ins[0]) if a not in dims]])


def _expand_dims(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  out = list(ins[0])
  for d in sorted(eqn.params['dimensions']):
    out.insert(d, ())
  t.out(eqn, ctx, [out])


def _reshape(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  src = [(a, n) for a, n in enumerate(in_shape) if n > 1]
  dst = [(a, n) for a, n in enumerate(out_shape) if n > 1]
  out: list[Layout] = [()] * len(out_shape)
  i = j = 0
  while i < len(src) or j < len(dst):
    bi, bj = [src[i]], [dst[j]]
    pi, pj = src[i][1], dst[j][1]
    i, j = i + 1, j + 1
    while pi != pj:
      if pi < pj:
        bi.append(src[i]); pi *= src[i][1]; i += 1
      else:
        bj.append(dst[j]); pj *= dst[j][1]; j += 1
    in_lays = [ins[0][a] for a, _ in bi]
    if len(bi) == 1 and len(bj) == 1:
      out[bj[0][0]] = in_lays[0]
    elif len(bj) == 1:
      # Merge (a flatten): the minor axis repeats once per position of the major ones.
      majors = int(np.prod([n for _, n in bi[:-1]]))
      out[bj[0][0]] = tuple(in_lays[-1]) * majors
      t.mark(in_lays[:-1], 'keep', f'merged as the major axes of a reshape at {_where(eqn)} '
             '(positions, not units)')
    elif len(bi) == 1:
      # Split (features -> heads x head_dim): every period of the minor size holds the same
      # units (the coarsest consistent reading), the major axes are positions.
      minor = bj[-1][1]
      lay = in_lays[0]
      t.atoms.refine(lay, range(minor, pi, minor))
      chunks = [t.atoms.sub(lay, s, s + minor) for s in range(0, pi, minor)]
      for c in chunks[1:]:
        t.atoms.unify(chunks[0], c)
      fresh = t.fresh([n for _, n in bj[:-1]])
      for (a, _), f in zip(bj[:-1], fresh):
        out[a] = f
      t.mark(fresh, 'keep', f'split off as major axes of a reshape at {_where(eqn)}')
      out[bj[-1][0]] = chunks[0]
    else:
      fresh = t.fresh([n for _, n in bj])
      for (a, _), f in zip(bj, fresh):
        out[a] = f
      t.mark(in_lays + fresh, 'keep', f'reshaped across axes at {_where(eqn)}')
  t.out(eqn, ctx, [out])


def _concatenate(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  dim = eqn.params['dimension']
  shape = eqn.outvars[0].aval.shape
  out = t.fresh(shape)
  cat: list[int] = []
  for v, lays in zip(eqn.invars, ins):
    n = v.aval.shape[dim]
    cat.extend(lays[dim] if n > 1 else (t.atoms.new(1),))
    for ax in range(len(shape)):
      if ax != dim:
        t.join(out[ax], lays[ax])
  out[dim] = tuple(cat)
  t.out(eqn, ctx, [out])


def _split(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  ax, sizes = eqn.params['axis'], eqn.params['sizes']
  outs, pos = [], 0
  for n in sizes:
    lays = list(ins[0])
    lays[ax] = t.atoms.sub(ins[0][ax], pos, pos + n) if n > 1 and ins[0][ax] else ()
    pos += n
    outs.append(lays)
  t.out(eqn, ctx, outs)


def _slice(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  p = eqn.params
  strides = p['strides'] or (1,) * len(ins[0])
  out = []
  for a, lay in enumerate(ins[0]):
    n = eqn.invars[0].aval.shape[a]
    lo, hi, st = p['start_indices'][a], p['limit_indices'][a], strides[a]
    if (lo, hi, st) == (0, n, 1):
      out.append(lay)
    elif st == 1 and lay and hi - lo > 1:
      out.append(t.atoms.sub(lay, lo, hi))
    else:
      t.mark([lay], 'keep', f'strided slice at {_where(eqn)}')
      out.append(t.fresh([eqn.outvars[0].aval.shape[a]])[0])
  t.out(eqn, ctx, [out])


def _pad(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  out = []
  for a, (lo, hi, interior) in enumerate(eqn.params['padding_config']):
    lay = ins[0][a]
    if (lo, hi, interior) == (0, 0, 0):
      out.append(lay)
    else:  # a padded axis is spatial: its positions are not units
      t.mark([lay], 'keep', f'padded at {_where(eqn)}')
      out.append(t.fresh([eqn.outvars[0].aval.shape[a]])[0])
  t.out(eqn, ctx, [out])


def _spatial_window(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  """reduce_window / pooling: axes with a window or stride > 1 are positions."""
  p = eqn.params
  dims, strides = p['window_dimensions'], p['window_strides']
  pads = p.get('padding', ((0, 0),) * len(dims))
  n_ops = len(ins) // 2 if eqn.primitive.name == 'reduce_window' else len(ins)
  outs = []
  for k in range(len(eqn.outvars)):
    lays = ins[k % max(1, n_ops)]
    out = []
    for a, lay in enumerate(lays):
      if dims[a] == 1 and strides[a] == 1 and tuple(pads[a]) == (0, 0):
        out.append(lay)
      else:
        t.mark([lay], 'keep', f'pooled over at {_where(eqn)}')
        out.append(t.fresh([eqn.outvars[k].aval.shape[a]])[0])
    outs.append(out)
  t.out(eqn, ctx, outs)


def _dot_general(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs = ins
  for a, b in zip(lc, rc):
    t.join(lhs[a], rhs[b])
  if t.is_act(ctx, eqn.invars[0]) and t.is_act(ctx, eqn.invars[1]):
    # Two activations contracted (attention scores q.k): such products are scaled by a width-
    # dependent literal (1/sqrt(head_dim)), so zeroing a unit is not removing it.
    t.mark([lhs[a] for a in lc], 'reduced', f'contracted between two activations at '
           f'{_where(eqn)} (attention scores are scaled by 1/sqrt(width))')
  for a, b in zip(lb, rb):
    t.join(lhs[a], rhs[b])
  lfree = [a for a in range(len(lhs)) if a not in lc and a not in lb]
  rfree = [b for b in range(len(rhs)) if b not in rc and b not in rb]
  out = [lhs[a] for a in lb] + [lhs[a] for a in lfree] + [rhs[b] for b in rfree]
  for v, contracted, free in ((eqn.invars[0], lc, lfree), (eqn.invars[1], rc, rfree)):
    for a in contracted:
      t.use(ctx, v, a, 'in')
    for a in free:
      t.use(ctx, v, a, 'out')
  t.out(eqn, ctx, [out])


def _conv(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  p = eqn.params
  dn = p['dimension_numbers']
  lhs, rhs = ins
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  out_shape = eqn.outvars[0].aval.shape
  out = t.fresh(out_shape)
  lb, lf = lhs_spec[0], lhs_spec[1]
  ro, ri = rhs_spec[0], rhs_spec[1]
  ob, of = out_spec[0], out_spec[1]
  t.join(out[ob], lhs[lb])
  groups, bgroups = p['feature_group_count'], p['batch_group_count']
  cin = eqn.invars[0].aval.shape[lf]
  rin = eqn.invars[1].aval.shape[ri]
  cout = eqn.invars[1].aval.shape[ro]
  for spec_l, spec_r, spec_o in zip(lhs_spec[2:], rhs_spec[2:], out_spec[2:]):
    t.mark([lhs[spec_l], rhs[spec_r], out[spec_o]], 'keep', 'spatial axis of a convolution')
  if groups == 1 and bgroups == 1:
    t.join(lhs[lf], rhs[ri])
    t.join(out[of], rhs[ro])
    t.use(ctx, eqn.invars[1], ri, 'in')
    t.use(ctx, eqn.invars[1], ro, 'out')
  elif bgroups == 1 and groups == cin and rin == 1 and cout == cin:
    # Depthwise: channel c in -> channel c out; pruning c shrinks feature_group_count with it.
    t.join(lhs[lf], rhs[ro])
    t.join(out[of], rhs[ro])
    t.use(ctx, eqn.invars[1], ro, 'out')
    idx = t.variable_of(ctx, eqn.invars[1])
    if idx is not None:
      t.vars[idx].passthrough = True
  else:
    kind = ('depthwise convolution with channel multiplier '
            f'{cout // max(cin, 1)}' if groups == cin else
            f'grouped convolution (feature_group_count={groups}, batch_group_count={bgroups})')
    t.mark([lhs[lf], rhs[ri], rhs[ro], out[of]], 'keep', f'{kind} at {_where(eqn)} is kept whole')
    t.use(ctx, eqn.invars[1], ro, 'out')
  t.out(eqn, ctx, [out])


def _gather(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  """Embedding look-ups (``table[ids]``): the table's feature axes pass to the output; every
  other axis is treated as positions (kept whole)."""
  dn = eqn.params['dimension_numbers']
  operand, = ins[:1]
  out_shape = eqn.outvars[0].aval.shape
  out = t.fresh(out_shape)
  offset_dims = tuple(dn.offset_dims)
  collapsed = set(dn.collapsed_slice_dims) | set(getattr(dn, 'operand_batching_dims', ()))
  slice_sizes = eqn.params['slice_sizes']
  kept_operand = [a for a in range(len(operand)) if a not in collapsed]
  for od, oa in zip(offset_dims, kept_operand):
    if slice_sizes[oa] == eqn.invars[0].aval.shape[oa]:
      t.join(out[od], operand[oa])
      t.use(ctx, eqn.invars[0], oa, 'out')
    else:
      t.mark([operand[oa], out[od]], 'keep', f'partly gathered at {_where(eqn)}')
  for a in collapsed:
    t.mark([operand[a]], 'keep', f'indexed (gathered) at {_where(eqn)}')
  t.mark(ins[1], 'keep', f'gather indices at {_where(eqn)}')
  t.out(eqn, ctx, [out])


def _iota(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  t.out(eqn, ctx, [t.fresh(eqn.outvars[0].aval.shape)])


def _select_and_gather_add(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  _spatial_window(t, eqn, ins[:1], ctx, sub_ctx)


def _closed_call(param: str):
  def rule(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
    inner = eqn.params[param]
    outs = t.call(inner, ins, sub_ctx, eqn.invars, ctx)
    t.call_outputs_activation(eqn, ctx, inner, sub_ctx)
    t.out(eqn, ctx, outs)
  return rule


def _custom_vjp(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  inner = eqn.params['call_jaxpr']
  outs = t.call(inner, ins, sub_ctx, eqn.invars, ctx)
  t.call_outputs_activation(eqn, ctx, inner, sub_ctx)
  t.out(eqn, ctx, outs)


def _scan(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  p = eqn.params
  nc, ncarry = p['num_consts'], p['num_carry']
  consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
  for lays in xs:
    t.mark([lays[0]], 'keep', 'scanned-over axis')
  inner_in = list(consts) + list(carry) + [lays[1:] for lays in xs]
  outs = t.call(p['jaxpr'], inner_in, sub_ctx, eqn.invars, ctx)
  t.call_outputs_activation(eqn, ctx, p['jaxpr'], sub_ctx)
  carry_out, ys = outs[:ncarry], outs[ncarry:]
  for a, b in zip(carry, carry_out):  # the carry is the same value at every iteration
    for la, lb in zip(a, b):
      t.join(la, lb)
  length = p['length']
  ys_out = []
  for y in ys:
    lead = t.fresh([length])
    t.mark(lead, 'keep', 'stacked scan output axis')
    ys_out.append(lead + list(y))
  t.out(eqn, ctx, list(carry) + ys_out)


def _while(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  p = eqn.params
  cn, bn = p['cond_nconsts'], p['body_nconsts']
  cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
  t.call(p['cond_jaxpr'], list(cconsts) + list(carry), sub_ctx + ('cond',),
         eqn.invars[:cn] + eqn.invars[cn + bn:], ctx)
  outs = t.call(p['body_jaxpr'], list(bconsts) + list(carry), sub_ctx + ('body',),
                eqn.invars[cn:], ctx)
  t.call_outputs_activation(eqn, ctx, p['body_jaxpr'], sub_ctx + ('body',))
  for a, b in zip(carry, outs):
    for la, lb in zip(a, b):
      t.join(la, lb)
  t.out(eqn, ctx, carry)


def _cond(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  ops = ins[1:]
  results = None
  for k, br in enumerate(eqn.params['branches']):
    outs = t.call(br, ops, sub_ctx + (k,), eqn.invars[1:], ctx)
    t.call_outputs_activation(eqn, ctx, br, sub_ctx + (k,))
    if results is None:
      results = outs
    else:
      for a, b in zip(results, outs):
        for la, lb in zip(a, b):
          t.join(la, lb)
  t.out(eqn, ctx, results)


def _stack(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  ax = eqn.params['axis']
  base = ins[0]
  for lays in ins[1:]:
    for la, lb in zip(base, lays):
      t.join(la, lb)
  new = t.fresh([len(ins)])
  t.mark(new, 'keep', f'stacked at {_where(eqn)}')
  out = list(base)
  out.insert(ax, new[0])
  t.out(eqn, ctx, [out])


def _sort(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  ax = eqn.params['dimension']
  for lays in ins:
    t.mark([lays[ax]], 'keep', f'sorted along at {_where(eqn)}')
  t.out(eqn, ctx, ins)


def _top_k(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  t.mark([ins[0][-1]], 'keep', f'top_k over it at {_where(eqn)}')
  out = list(ins[0][:-1]) + t.fresh([eqn.outvars[0].aval.shape[-1]])
  t.out(eqn, ctx, [out, out])


def _rng(t: _Tracer, eqn, ins, ctx, sub_ctx) -> None:
  t.out(eqn, ctx, [t.fresh(v.aval.shape) for v in eqn.outvars])


_RULES: dict[str, Callable] = {
    'broadcast_in_dim': _broadcast_in_dim,
    'transpose': _transpose,
    'squeeze': _squeeze,
    'expand_dims': _expand_dims,
    'reshape': _reshape,
    'concatenate': _concatenate,
    'split': _split,
    'slice': _slice,
    'pad': _pad,
    'reduce_window': _spatial_window,
    'reduce_window_sum': _spatial_window,
    'reduce_window_max': _spatial_window,
    'reduce_window_min': _spatial_window,
    'dot_general': _dot_general,
    'conv_general_dilated': _conv,
    'gather': _gather,
    'iota': _iota,
    'jit': _closed_call('jaxpr'),
    'pjit': _closed_call('jaxpr'),
    'closed_call': _closed_call('call_jaxpr'),
    'core_call': _closed_call('call_jaxpr'),
    'custom_jvp_call': _closed_call('call_jaxpr'),
    'custom_vjp_call': _custom_vjp,
    'custom_vjp_call_jaxpr': _closed_call('fun_jaxpr'),
    'remat2': _closed_call('jaxpr'),
    'checkpoint': _closed_call('jaxpr'),
    'scan': _scan,
    'while': _while,
    'cond': _cond,
    'stack': _stack,
    'sort': _sort,
    'top_k': _top_k,
    'random_bits': _rng, 'random_seed': _rng, 'random_wrap': _rng, 'random_unwrap': _rng,
    'threefry2x32': _rng, 'random_fold_in': _rng, 'random_split': _rng,
}


# =============================================================================================
# Groups from atoms
# =============================================================================================

def _path_keys(path) -> Path:
  out = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _module_of(path: Path, collections: bool) -> Path:
  return tuple(path[1:-1]) if collections else tuple(path[:-1])


def _path_str(path: Path) -> str:
  return '/'.join(map(str, path))


def _matches(module: Path, patterns: Sequence[str]) -> bool:
  s = _path_str(module)
  return any(fnmatch.fnmatchcase(s, p) or s == p or s.startswith(p.rstrip('/') + '/')
             for p in patterns)


def _periodic(leaves: list[int], root: int, sizes: list[int]) -> Optional[tuple[int, int]]:
  """(offset, repeat) of ``root`` in a layout that repeats a period holding it once."""
  count = leaves.count(root)
  if count == 0 or len(leaves) % count:
    return None
  period = len(leaves) // count
  head = leaves[:period]
  if head * count != leaves or head.count(root) != 1:
    return None
  return sum(sizes[a] for a in head[:head.index(root)]), count


@dataclasses.dataclass(frozen=True)
class Discovery:
  """What :func:`discover_groups` found.

  Attributes:
    groups: every group that reaches a parameter (prunable or not), ordered as their first
      slice appears in the variables.
    excluded: variable axes that reach the model's input or output (never pruned), as
      ``'path[axis]'`` strings, for reports.
  """
  groups: tuple[ChannelGroup, ...]
  excluded: tuple[str, ...]

  @property
  def prunable(self) -> tuple[ChannelGroup, ...]:
    return tuple(g for g in self.groups if g.prunable)

  @property
  def marked(self) -> tuple[ChannelGroup, ...]:
    return tuple(g for g in self.groups if g.marked)


def discover_groups(apply_fn: Callable[[Any, Any], Any], variables: Any, example_input: Any, *,
                    keep_whole: Sequence[str] = (), prune_marked: bool = False,
                    unknown_primitives: str = 'error',
                    collections: Optional[bool] = None) -> Discovery:
  """The channel groups of ``apply_fn(variables, x)``, from its jaxpr.

  Args:
    apply_fn: ``(variables, x) -> outputs`` in inference mode, e.g.
      ``lambda v, x: module.apply(v, x)``; outputs may be any pytree (all are model outputs).
    variables: the model's variables (arrays or ``jax.ShapeDtypeStruct``); slices are named by
      their pytree paths (dict keys; ints for list items).
    example_input: one batch (array or ``ShapeDtypeStruct``), or a pytree of them.
    keep_whole: module paths (``'stage1/conv'``, fnmatch patterns allowed) whose output channels
      are kept whole: every group with a producer there is reported ``prunable=False``.
    prune_marked: prune groups that a normalisation reduces over (LayerNorm, GroupNorm, ...)
      anyway (zeroing then differs from removing; the group stays ``marked``).
    unknown_primitives: ``'error'`` (default) or ``'keep_whole'``: every channel reaching a
      primitive without a rule is kept whole (stated in its groups' ``reason``).
    collections: whether the top level of ``variables`` are Linen collections (``params``,
      ``batch_stats``); default: True when ``variables`` has a ``'params'`` key.
  Returns:
    :class:`Discovery`.
  Raises:
    DiscoveryError: a primitive without a rule (with ``unknown_primitives='error'``), a model
      that does not trace, or a group whose slices cannot be described.
  """
  if unknown_primitives not in ('error', 'keep_whole'):
    raise ValueError(f"unknown_primitives must be 'error' or 'keep_whole', got "
                     f'{unknown_primitives!r}')
  if collections is None:
    collections = isinstance(variables, Mapping) and 'params' in variables
  abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), getattr(x, 'dtype', np.float32))
  vars_abs = jax.tree.map(abstract, variables)
  x_abs = jax.tree.map(abstract, example_input)
  try:
    closed = jax.make_jaxpr(apply_fn)(vars_abs, x_abs)
  except DiscoveryError:
    raise
  except Exception as e:  # noqa: BLE001 -- re-raised with what to check
    raise DiscoveryError(
        f'the model does not trace with jax.make_jaxpr ({type(e).__name__}: {e}). Discovery '
        'needs apply_fn(variables, x) to run on abstract arrays: check that it accepts the '
        'variables as given and the example input shape, and that it does not convert '
        'arrays to Python numbers (float(x), x.item(), numpy calls on traced values).') from e

  leaves_with_path = jax.tree_util.tree_flatten_with_path(vars_abs)[0]
  infos = [_VarInfo(_path_keys(p), tuple(leaf.shape), []) for p, leaf in leaves_with_path]
  t = _Tracer(infos)
  jaxpr = closed.jaxpr
  n_vars = len(infos)
  for k, (v, info) in enumerate(zip(jaxpr.invars[:n_vars], infos)):
    info.layouts = t.layouts((), v)
    t.origin[((), v)] = (k, tuple(range(len(info.shape))))
  for v in jaxpr.invars[n_vars:]:
    t.activation.add(((), v))
    t.mark(t.layouts((), v), 'io', 'reaches the model input')
  for v in jaxpr.constvars:
    t.layouts((), v)

  if unknown_primitives == 'keep_whole':
    t.unknown_message = _keep_whole_unknown(t)  # type: ignore[method-assign]
  try:
    t.run(jaxpr, ())
  except DiscoveryError:
    raise
  for v in jaxpr.outvars:
    t.mark(t.layouts((), v), 'io', 'reaches the model output')
  return _groups_from_atoms(t, collections, keep_whole, prune_marked)


def _keep_whole_unknown(t: _Tracer):
  original = _Tracer.equation

  def equation(eqn, sub_ctx, ctx):
    name = eqn.primitive.name
    if name in _RULES or name in _ELEMENTWISE or name in _REDUCTIONS or name in _SCANS:
      return original(t, eqn, sub_ctx, ctx)
    ins = [t.layouts(ctx, v) for v in eqn.invars]
    reason = f"primitive '{name}' has no rule ({_where(eqn)}); kept whole"
    t.mark(ins and [lay for lays in ins for lay in lays], 'keep', reason)
    outs = [t.fresh(o.aval.shape) for o in eqn.outvars]
    t.mark([lay for lays in outs for lay in lays], 'keep', reason)
    if any(t.is_act(ctx, v) for v in eqn.invars):
      for o in eqn.outvars:
        t.activation.add((ctx, o))
    t.out(eqn, ctx, outs)
  t.equation = equation  # type: ignore[method-assign]
  return _Tracer.unknown_message


def _groups_from_atoms(t: _Tracer, collections: bool, keep_whole: Sequence[str],
                       prune_marked: bool) -> Discovery:
  atoms = t.atoms
  marks: dict[int, dict[str, str]] = {}
  for m in t.marks:
    for leaf in atoms.leaves(m.atoms):
      marks.setdefault(leaf, {}).setdefault(m.kind, m.reason)

  norm_modules = {_module_of(i.path, collections) for i in t.vars if i.scales and
                  not any('in' in u or 'out' in u for u in i.uses.values())}
  producer_modules = {_module_of(i.path, collections) for i in t.vars
                      if any('in' in u or 'out' in u for u in i.uses.values())}

  # root -> list of (slice, module) in variable order
  found: dict[int, list[tuple[Slice, Path, str]]] = {}
  irregular: dict[int, tuple[Path, int, Path]] = {}
  excluded = []
  for info in t.vars:
    module = _module_of(info.path, collections)
    for axis, lay in enumerate(info.layouts):
      leaves = atoms.leaves(lay)
      for root in dict.fromkeys(leaves):
        if 'io' in marks.get(root, {}):
          excluded.append(f'{_path_str(info.path)}[{axis}]')
          continue
        pr = _periodic(leaves, root, atoms.size)
        if pr is None:
          irregular.setdefault(root, (info.path, axis, module))
          continue
        offset, repeat = pr
        uses = info.uses.get(axis, set())
        if 'in' in uses:
          role = 'in'
        elif 'out' in uses:
          role = 'out'
        elif module in producer_modules:
          role = 'out'
        elif module in norm_modules:
          role = 'norm'
        else:
          role = 'out'
        s = Slice(tuple(info.path), _axis_convention(axis, len(info.shape), role), role, offset,
                  repeat)
        found.setdefault(root, []).append((s, module, role, bool(uses & {'in', 'out'})))

  info_of = {i.path: i for i in t.vars}
  out_axes = {i.path: sum(1 for u in i.uses.values() if 'out' in u) for i in t.vars}

  def first_use(entries) -> float:
    return min([info_of[s.path].first_use for s, _, r, used in entries if used] or [float('inf')])

  groups = []
  names: dict[str, int] = {}
  for root, entries in sorted(found.items(), key=lambda kv: first_use(kv[1])):
    slices = tuple(e[0] for e in entries)
    if not any(used for *_, used in entries):
      # Not a channel axis of any layer: a kernel's spatial axis, a positional embedding's
      # token axis. Never pruned.
      continue
    if root in irregular:
      path, axis, module = irregular[root]
      raise DiscoveryError(
          f'channels of {_path_str(path)} (axis {axis}) occupy positions that are not one offset '
          'per repeated period (an interleaving reshape?), so no slice can describe them. Keep '
          f'that module whole: keep_whole=["{_path_str(module)}"].')
    kernels = sorted((s for s, m, r, used in entries if r == 'out' and used),
                     key=lambda s: info_of[s.path].first_use)
    producers = list(dict.fromkeys(s.path[:-1] for s in kernels
                                   if not info_of[s.path].passthrough))
    norms = [s for s, m, r, _ in entries if r == 'norm']
    reasons = marks.get(root, {})
    reason, marked = reasons.get('keep', ''), ''
    if 'reduced' in reasons:
      marked = (f'normalised or reduced over its own channels ({reasons["reduced"]}): zeroing a '
                'unit is not the same as removing it')
      if not prune_marked and not reason:
        reason = marked + '; kept whole (prune_marked=True prunes it anyway)'
    if not kernels and not reason:
      reason = 'no producer in the parameters (nothing to remove the channels from)'
    modules = [_module_of(s.path, collections) for s in kernels]
    kept_by_user = [m for m in modules if _matches(m, keep_whole)]
    if kept_by_user and not reason:
      reason = f'kept whole by keep_whole ({_path_str(kept_by_user[0])})'
    if kernels:
      first = kernels[0]
      base = _path_str(_module_of(first.path, collections))
      if out_axes[first.path] > 1:
        base += f'[{first.axis % len(info_of[first.path].shape)}]'
    else:
      base = _path_str(entries[0][1])
    name = base if base not in names else f'{base}#{names[base] + 1}'
    names[base] = names.get(base, 0) + 1
    kernel_nd = {len(info_of[s.path].shape) for s in kernels if s.path[-1] != 'bias'}
    heads = any(s.axis % len(info_of[s.path].shape) != len(info_of[s.path].shape) - 1
                for s in kernels)
    kind = ('heads' if heads else 'residual' if len(producers) > 1 else
            'concat' if any(s.offset for s in slices) else
            'neuron' if kernel_nd == {2} else 'channel')
    gate = 'scales ' + ("its norms' scale and bias" if norms else "its producers' outputs")
    groups.append(ChannelGroup(
        name=name, width=atoms.size[root], slices=slices, kind=kind, gate=gate,
        prunable=not reason, gate_after_norm=bool(norms), reason=reason, marked=marked))
  return Discovery(tuple(groups), tuple(excluded))


def _axis_convention(axis: int, ndim: int, role: str) -> int:
  """Kernel axes as the zoo declares them: the output axis counted from the end (-1), a conv
  kernel's input axis as -2; everything else from the front."""
  if ndim >= 2 and role == 'out' and axis == ndim - 1:
    return -1
  if ndim >= 3 and role == 'in' and axis == ndim - 2:
    return -2
  return axis
