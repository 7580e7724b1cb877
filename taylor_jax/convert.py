"""torchvision state dicts -> our ``{'params', 'batch_stats'}`` variables.

Converts the torchvision checkpoints of ``resnet18/34/50/101``, ``vgg11_bn`` and ``densenet121``
(e.g. ``resnet50-19c8e357.pth``, the reference's starting point) into the zoo models of the same
name, at full widths:

* conv ``weight`` (O, I, kH, kW) -> ``kernel`` (kH, kW, I, O); linear ``weight`` (out, in) ->
  ``kernel`` (in, out); ``bias`` as is;
* BatchNorm ``weight``/``bias`` -> ``params`` ``scale``/``bias``, ``running_mean``/
  ``running_var`` -> ``batch_stats`` ``mean``/``var`` (``num_batches_tracked`` is dropped);
* VGG's ``classifier.0`` reads torch's NCHW flatten ``(C, 7, 7)``, ours flattens NHWC ``(7, 7, C)``:
  its input rows are permuted accordingly.

Every key, shape and width is checked first; a mismatch raises :class:`ConversionError` naming the
key, the expected and the found shape, and which zoo model / widths the state dict fits.

torch is needed only to read ``.pth`` files (``.npz`` files of torch-named arrays and in-memory
mappings need numpy only):

  python -m taylor_jax.convert resnet50-19c8e357.pth resnet50.npz --model=resnet50
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import Any, Mapping, Optional

import numpy as np

from taylor_jax import models
from taylor_jax.models.densenet import DenseNet
from taylor_jax.models.imagenet_resnet import ImageNetResNet
from taylor_jax.models.vgg import POOL_SIDE, VGG

# Zoo models with a torchvision layout (the only ones :func:`convert` accepts).
CONVERTIBLE = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn', 'densenet121')
_MAX_LISTED = 8  # problems listed in one error message


class ConversionError(ValueError):
  """A state dict that does not fit the requested model (key, shape or width mismatch)."""


# --- reading ----------------------------------------------------------------------------------

def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, 'detach'):  # a torch tensor
    return v.detach().cpu().float().numpy()
  return np.asarray(v)


# Old torchvision DenseNet keys ('denselayer1.norm.1.weight', as in densenet121-a639ec97.pth);
# torchvision's loader renames them the same way.
_OLD_DENSENET = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.'
    r'((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """numpy arrays under torchvision's current key names.

  Strips ``module.`` (DataParallel) prefixes, renames old DenseNet keys (``norm.1`` -> ``norm1``).
  """
  out = {}
  for k, v in state_dict.items():
    if k.startswith('module.'):
      k = k[len('module.'):]
    m = _OLD_DENSENET.match(k)
    if m:
      k = m.group(1) + m.group(2)
    out[k] = _to_numpy(v)
  return out


# Library messages that advise loading an untrusted file with pickling enabled (code execution).
_UNSAFE_ADVICE = ('allow_pickle', 'weights_only', 'pickle.load', 'unsafe', 'trusted source')


def _damaged(path: str, kind: str, e: BaseException) -> ConversionError:
  """A ConversionError naming ``path`` and what is wrong with it, without the reader's own
  message when that suggests loading the file unsafely."""
  if (isinstance(e, ValueError) and 'pickle' in str(e)) or type(e).__name__ == 'UnpicklingError':
    what = ('it is damaged, or holds pickled Python objects besides arrays, which are never '
            'loaded (unpickling an untrusted file can run code)')
  else:
    first = (str(e).strip().splitlines() or [''])[0]
    detail = '' if any(w in first for w in _UNSAFE_ADVICE) else f': {first[:200]}'
    what = f'it is truncated or damaged ({type(e).__name__}{detail})'
  return ConversionError(
      f'{path!r} is not a readable {kind}: {what}. Download the torchvision weights again, or '
      'write the .npz again with `python -m taylor_jax.convert IN.pth OUT.npz --model=NAME`.')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a ``.pth``/``.pt`` (torch) or ``.npz`` (numpy) file of torch-named arrays.

  Never unpickles: a file that is damaged, or holds more than arrays, raises ConversionError.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such file: {path!r}')
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as f:
        return normalize_keys({k: f[k] for k in f.files})
    except Exception as e:  # noqa: zipfile, zlib, numpy format errors alike
      raise _damaged(path, '.npz archive of arrays', e) from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'reading {path!r} needs PyTorch (pip install torch==2.13.0, or '
        '`pip install -r requirements-test.txt`); or convert it to .npz where torch is installed: '
        f'python -m taylor_jax.convert {path} OUT.npz --model=NAME') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: torch raises RuntimeError, OSError, UnpicklingError, ...
    raise _damaged(path, 'PyTorch state dict (torch.save of name -> tensor)', e) from None
  if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']  # a training checkpoint wrapping the weights
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path!r} holds a {type(obj).__name__}, not a state dict '
                          '(name -> tensor)')
  return normalize_keys(obj)


# --- naming -----------------------------------------------------------------------------------

_LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
               ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


def _module_name(family: str, path: tuple[str, ...]) -> str:
  """torchvision module name of our module ``path`` (e.g. ('layer1_0', 'downsample_conv'))."""
  parts = []
  for p in path:
    if family == 'resnet':
      p = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(p, p)
      p = re.sub(r'^(layer\d+)_(\d+)$', r'\1.\2', p)
    elif family == 'vgg':
      p = re.sub(r'^(features|classifier)_(\d+)$', r'\1.\2', p)
    elif family == 'densenet':
      p = re.sub(r'^(denseblock\d+)_(denselayer\d+)$', r'\1.\2', p)
    parts.append(p)
  if family == 'densenet' and path[0] != 'classifier':
    parts.insert(0, 'features')
  return '.'.join(parts)


def torch_key(model_name: str, path: tuple[str, ...]) -> str:
  """torchvision state-dict key of our variable ``path`` = (collection, *modules, leaf)."""
  collection, *modules, leaf = path
  return f'{_module_name(_family(model_name), tuple(modules))}.{_LEAF_NAMES[(collection, leaf)]}'


def _family(model_name: str) -> str:
  if model_name not in CONVERTIBLE:
    raise ConversionError(f'no torchvision layout for model {model_name!r}; convertible zoo '
                          f'models: {list(CONVERTIBLE)}')
  cls = models._lookup(model_name)[0]  # pylint: disable=protected-access
  return {ImageNetResNet: 'resnet', VGG: 'vgg', DenseNet: 'densenet'}[cls]


# --- layouts ----------------------------------------------------------------------------------

def _is_vgg_flatten(model_name: str, path: tuple[str, ...]) -> bool:
  return _family(model_name) == 'vgg' and path[1:] == ('classifier_0', 'kernel')


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a variable of ``flax_shape`` (HWIO -> OIHW, (in, out) -> (out, in))."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def to_flax(model_name: str, path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  """Torch array ``w`` in our layout for variable ``path`` (float32)."""
  w = np.asarray(w, np.float32)
  if w.ndim == 4:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  if w.ndim == 2 and _is_vgg_flatten(model_name, path):
    # torch input index c*49 + h*7 + w; ours (h*7 + w)*C + c.
    out, n = w.shape
    c = n // (POOL_SIDE * POOL_SIDE)
    w = w.reshape(out, c, POOL_SIDE, POOL_SIDE).transpose(2, 3, 1, 0)
    return np.ascontiguousarray(w.reshape(POOL_SIDE * POOL_SIDE * c, out))
  if w.ndim == 2:
    return np.ascontiguousarray(w.T)
  return w


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def variable_shapes(model_name: str, num_classes: int = 1000,
                    widths: Optional[Mapping[str, int]] = None) -> dict[tuple[str, ...], tuple]:
  """(collection, *modules, leaf) -> our shape, for the model at ``widths`` (default: full)."""
  key = None if widths is None else tuple(sorted(widths.items()))
  return dict(_variable_shapes(model_name, num_classes, key))


@functools.lru_cache(maxsize=32)
def _variable_shapes(model_name: str, num_classes: int, widths_key) -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  model = models.create(model_name, num_classes, None if widths_key is None else dict(widths_key))
  # The zoo's ImageNet models are size-agnostic (VGG pools adaptively to 7x7): 64x64 suffices.
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
  return tuple((p, tuple(v.shape)) for p, v in _flatten(tree).items())


# --- diagnosis --------------------------------------------------------------------------------

def _expected_torch(model_name: str, num_classes: int, widths) -> dict[str, tuple]:
  return {torch_key(model_name, p): torch_shape(s)
          for p, s in variable_shapes(model_name, num_classes, widths).items()}


def _fitting_models(sd: Mapping[str, np.ndarray]) -> list[str]:
  """Convertible zoo models whose torchvision key set equals the state dict's."""
  keys = {k for k in sd if not k.endswith('num_batches_tracked')}
  return [m for m in CONVERTIBLE if set(_expected_torch(m, 1000, None)) == keys]


def infer_widths(model_name: str, sd: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Widths (group -> units) the state dict's shapes imply for ``model_name``'s groups.

  Read off each group's first producer (the output axis of a conv / linear / BN of the group).
  """
  model = models.create(model_name, 1000)
  out = {}
  for g in model.groups():
    for s in g.slices:
      if s.role not in ('out', 'norm') or s.offset:
        continue
      key = torch_key(model_name, s.path)
      if key in sd:
        w = sd[key]
        # Torch's output axis is 0 for conv / linear weights and BN vectors.
        out[g.name] = int(np.shape(w)[0])
        break
  return out


def _num_classes_of(model_name: str, sd: Mapping[str, np.ndarray]) -> Optional[int]:
  key = {'resnet': 'fc.bias', 'vgg': 'classifier.6.bias',
         'densenet': 'classifier.bias'}[_family(model_name)]
  return int(np.shape(sd[key])[0]) if key in sd else None


def _fits_message(model_name: str, sd: Mapping[str, np.ndarray], widths) -> str:
  fits = _fitting_models(sd)
  lines = []
  if fits and model_name not in fits:
    lines.append(f'the state dict\'s keys are those of zoo model(s) {fits}, not {model_name!r}')
  elif not fits:
    lines.append('the state dict\'s keys fit none of the convertible zoo models '
                 f'{list(CONVERTIBLE)}')
  if model_name in fits:
    found = infer_widths(model_name, sd)
    want = dict(models.full_widths(model_name) if widths is None else widths)
    diff = {g: (want[g], n) for g, n in found.items() if want.get(g) != n}
    full = models.full_widths(model_name)
    if not diff:
      lines.append(f'its widths are {model_name!r}\'s requested widths')
    else:
      shown = ', '.join(f'{g}: {w} wanted, {n} found' for g, (w, n) in list(diff.items())[:6])
      what = ('the full (torchvision) widths' if found == full else
              f'reduced widths in {len(diff)} group(s) ({shown})')
      lines.append(f'its widths are {what}' + ('' if widths is None else
                                               '; torchvision weights are full-width models'))
    nc = _num_classes_of(model_name, sd)
    if nc is not None:
      lines.append(f'its classifier has {nc} classes')
  return '; '.join(lines)


def _problems(model_name: str, sd: Mapping[str, np.ndarray], shapes) -> list[str]:
  expected = {torch_key(model_name, p): torch_shape(s) for p, s in shapes.items()}
  found = {k for k in sd if not k.endswith('num_batches_tracked')}
  problems = [f'missing key {k!r} (expected shape {expected[k]})'
              for k in expected if k not in found]
  problems += [f'unexpected key {k!r} (shape {tuple(np.shape(sd[k]))})'
               for k in sorted(found - set(expected))]
  problems += [f'key {k!r}: expected shape {expected[k]}, got {tuple(np.shape(sd[k]))}'
               for k in expected if k in found and tuple(np.shape(sd[k])) != expected[k]]
  return problems


# --- conversion -------------------------------------------------------------------------------

def convert(model_name: str, state_dict: Mapping[str, Any] | str, num_classes: int = 1000,
            widths: Optional[Mapping[str, int]] = None) -> dict[str, Any]:
  """Our ``{'params', 'batch_stats'}`` (nested dicts of float32 numpy arrays) from a torchvision
  state dict (a mapping name -> tensor/array, or a ``.pth``/``.npz`` path).

  ``widths`` (default: the model's full widths, as every torchvision checkpoint) must be the
  widths the state dict has. Raises :class:`ConversionError` on any missing / unexpected key or
  wrong shape, naming the key, both shapes and which zoo model / widths the state dict fits.
  """
  _family(model_name)
  sd = load_state_dict(state_dict) if isinstance(state_dict, str) else normalize_keys(state_dict)
  shapes = variable_shapes(model_name, num_classes, widths)
  problems = _problems(model_name, sd, shapes)
  if problems:
    at = 'full widths' if widths is None else 'the given widths'
    listed = '\n  '.join(problems[:_MAX_LISTED])
    more = f'\n  ... and {len(problems) - _MAX_LISTED} more' if len(problems) > _MAX_LISTED else ''
    raise ConversionError(
        f'the state dict does not fit {model_name!r} ({num_classes} classes, {at}): '
        f'{len(problems)} problem(s):\n  {listed}{more}\n'
        f'Diagnosis: {_fits_message(model_name, sd, widths)}.')
  flat = {p: to_flax(model_name, p, sd[torch_key(model_name, p)]) for p in shapes}
  for p, s in shapes.items():  # a layout bug must not pass silently
    assert flat[p].shape == s, (p, flat[p].shape, s)
  return _unflatten(flat)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description='Checks a torchvision checkpoint against a zoo '
                                   'model and saves it as .npz (readable without torch).')
  parser.add_argument('input', help='.pth / .npz state dict')
  parser.add_argument('output', help='.npz file of torch-named numpy arrays')
  parser.add_argument('--model', required=True, choices=CONVERTIBLE)
  parser.add_argument('--num_classes', type=int, default=1000)
  args = parser.parse_args(argv)
  sd = load_state_dict(args.input)
  convert(args.model, sd, args.num_classes)  # validates keys, shapes and widths
  np.savez(args.output, **{k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')})
  print(f'[convert] {args.input} fits {args.model}; wrote {args.output} ({len(sd)} arrays)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
