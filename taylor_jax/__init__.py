"""taylor_jax: structured pruning of Flax models by importance estimation.

The public pruning API for your own loop is ``taylor_jax.Pruner`` with ``taylor_jax.Target``
(see :mod:`taylor_jax.pruner`); the main job is ``python -m taylor_jax.main``.
"""

_PUBLIC = {'Pruner': 'pruner', 'PrunerState': 'pruner', 'PruneStep': 'pruner', 'Schedule': 'pruner',
           'Target': 'engine', 'Constraints': 'engine', 'prune_once': 'pruner'}


def __getattr__(name):
  # Lazy: importing a submodule (e.g. taylor_jax.data) does not pull in the whole library.
  if name in _PUBLIC:
    import importlib
    return getattr(importlib.import_module(f'taylor_jax.{_PUBLIC[name]}'), name)
  raise AttributeError(f'module taylor_jax has no attribute {name!r}')
