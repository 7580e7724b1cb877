"""Entry point: ``python -m taylor_jax.main --config=configs/default.py --workdir=runs/default``.

Override any config field on the command line, e.g. ``--config.train.epochs=3``. Re-running
with the same workdir resumes from its last checkpoint (with the same config, unless
``--allow_config_change``); ``--mode=evaluate`` restores a saved (possibly pruned) model from the
workdir and evaluates it.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                  'train: run/resume the job; evaluate: restore the workdir\'s model and test it.')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir although fields of the config that change the result differ '
                  'from the saved run\'s (the changes are recorded in the report).')
flags.mark_flags_as_required(['config', 'workdir'])


def _config_path(argv) -> str:
  """The --config value as given (without a ':argument' suffix)."""
  for i, arg in enumerate(argv):
    for name in ('--config', '-config'):
      if arg.startswith(name + '='):
        return arg[len(name) + 1:].split(':', 1)[0]
      if arg == name and i + 1 < len(argv):
        return argv[i + 1].split(':', 1)[0]
  return ''


def _parse_flags(argv):
  """absl's flag parsing, except that a config file that does not load stops here, named:
  ml_collections defers that error until the config is first used (or its first override is
  applied), where it surfaces as 'Configuration is not available because of an earlier
  failure to load' under a long traceback."""
  try:
    args = app.parse_flags_with_usage(argv)
    FLAGS.config.keys()
    return args
  except OSError as e:
    path = _config_path(argv)
    if not os.path.isfile(path):
      sys.exit(f'FATAL: --config={path}: no such file (relative to {os.getcwd()}); give one of '
               'the files under configs/, e.g. --config=configs/default.py')
    cause = e.__cause__ or e
    sys.exit(f'FATAL: --config={path} cannot be loaded: {str(cause).splitlines()[0]}')
  except (AttributeError, KeyError) as e:
    sys.exit(f'FATAL: {_unknown_override(argv) or e}')


def _unknown_override(argv) -> str:
  """'--config.a.b=v: section a has no field b; its fields: ...' for the first override that
  names no field of the config file (ml_collections says only ``AttributeError: 'b'``)."""
  import runpy
  import ml_collections
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  path, _, arg = spec.partition(':')
  try:
    get_config = runpy.run_path(path)['get_config']
    config = get_config(arg) if arg else get_config()
  except Exception:  # noqa: BLE001 (the original error is reported instead)
    return ''
  for a in argv:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(parts[:i]) or 'the config'
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f'--config.{key}: {where} has no field {part!r}' +
                (f'; its fields: {", ".join(fields)}' if fields else ''))
      node = node[part]
  return ''


def main(argv):
  del argv
  config = FLAGS.config
  if config.distributed.initialize:
    import jax
    jax.distributed.initialize(config.distributed.coordinator_address,
                               config.distributed.num_processes, config.distributed.process_id)
  from taylor_jax import run
  logging.set_verbosity(logging.INFO)
  if FLAGS.mode == 'evaluate':
    result = run.evaluate_workdir(config, FLAGS.workdir)
  else:
    result = run.run(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  print(run.summary(result))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
