"""Entry point: ``python -m taylor_jax.main --config=configs/default.py --workdir=runs/default``.

Override any config field on the command line, e.g. ``--config.train.epochs=3``. Re-running
with the same workdir resumes from its last checkpoint; ``--mode=evaluate`` restores a saved
(possibly pruned) model from the workdir and evaluates it.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                  'train: run/resume the job; evaluate: restore the workdir\'s model and test it.')
flags.mark_flags_as_required(['config', 'workdir'])


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
    result = run.run(config, FLAGS.workdir)
  print(run.summary(result))


if __name__ == '__main__':
  app.run(main)
