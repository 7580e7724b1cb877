"""The model zoo, by name. Every model is built from a ``widths`` dict (group -> units), so a
pruned model is the same class with smaller widths; see :mod:`taylor_jax.models.common`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from taylor_jax.models.cifar_resnet import CifarResNet
from taylor_jax.models.densenet import DenseNet
from taylor_jax.models.imagenet_resnet import ImageNetResNet
from taylor_jax.models.lenet import LeNet3
from taylor_jax.models.preact_resnet import PreActResNet
from taylor_jax.models.vgg import VGG

# name -> (class, fixed constructor kwargs). Widths come from ``cls.full_widths(**kwargs)``
# (only the kwargs full_widths accepts are passed to it).
_ZOO: dict[str, tuple[Any, dict[str, Any]]] = {
    'lenet3': (LeNet3, {}),
    'resnet8': (CifarResNet, {'blocks_per_stage': 1}),
    'resnet20': (CifarResNet, {'blocks_per_stage': 3}),
    'resnet56': (CifarResNet, {'blocks_per_stage': 9}),
    'preact_resnet18': (PreActResNet, {}),
    'vgg16_bn': (VGG, {'cfg': 'vgg16', 'head': 'cifar'}),
    # ImageNet (torchvision layouts)
    'resnet18': (ImageNetResNet, {'depth': 18}),
    'resnet34': (ImageNetResNet, {'depth': 34}),
    'resnet50': (ImageNetResNet, {'depth': 50}),
    'resnet101': (ImageNetResNet, {'depth': 101}),
    'vgg11_bn': (VGG, {'cfg': 'vgg11', 'head': 'imagenet'}),
    'densenet121': (DenseNet, {}),
}


def register(name: str, cls: Any, **kwargs: Any) -> None:
  """Adds a model class to the zoo (it must follow the protocol in models/common.py)."""
  _ZOO[name] = (cls, kwargs)


def names() -> list[str]:
  return sorted(_ZOO)


def is_user_model(name: str) -> bool:
  """``'package.module:Factory'``: a user's Linen or NNX model (see models/any_model.py)."""
  return ':' in name


def _lookup(name: str):
  if name not in _ZOO:
    raise ValueError(f'unknown model {name!r}; choose one of {names()} '
                     '(or add one with taylor_jax.models.register)')
  return _ZOO[name]


def full_widths(name: str, num_classes: Optional[int] = None,
                input_shape: Optional[Sequence[int]] = None) -> dict[str, int]:
  """Unpruned widths (group name -> units) of a zoo model, or of a user model (which needs
  ``num_classes`` and ``input_shape`` for its discovery)."""
  if is_user_model(name):
    from taylor_jax.models import any_model
    return any_model.from_spec(name, num_classes, tuple(input_shape)).full_widths
  cls, kwargs = _lookup(name)
  import inspect
  accepted = inspect.signature(cls.full_widths).parameters
  return cls.full_widths(**{k: v for k, v in kwargs.items() if k in accepted})


def create(name: str, num_classes: int, widths: Optional[Mapping[str, int]] = None,
           axis_name: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
           **overrides: Any):
  """Builds zoo model ``name`` with ``widths`` (default: unpruned).

  ``input_shape`` (one example, e.g. ``(32, 32, 3)``) sets ``image_size`` for the models whose
  channel groups depend on it (LeNet3: the flatten before fc1); others ignore it.
  """
  if is_user_model(name):
    if input_shape is None:
      raise ValueError(f'model {name!r} is a user model: create() needs its input_shape')
    from taylor_jax.models import any_model
    base = any_model.from_spec(name, num_classes, tuple(input_shape))
    return base.clone(widths=widths, axis_name=axis_name)
  cls, kwargs = _lookup(name)
  if input_shape is not None and 'image_size' in getattr(cls, '__dataclass_fields__', {}):
    overrides = {'image_size': int(input_shape[0]), **overrides}
  widths = dict(full_widths(name) if widths is None else widths)
  missing = set(full_widths(name)) - set(widths)
  if missing:
    raise ValueError(f'widths for model {name!r} lack groups {sorted(missing)}')
  return cls(widths=widths, num_classes=num_classes, axis_name=axis_name, **{**kwargs, **overrides})
