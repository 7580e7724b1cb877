"""Runs 3 data-parallel train steps of a small ResNet and saves every parameter, BatchNorm
statistic and accumulated score to a .npz. Used by tests/test_data_parallel.py in subprocesses:

  python tests/workers/train_steps.py OUT.npz [--processes N --process_id I --port P]

Each process feeds its contiguous slice of the same global batch; XLA_FLAGS may simulate
several CPU devices per process.
"""

import argparse

import jax

parser = argparse.ArgumentParser()
parser.add_argument('out')
parser.add_argument('--processes', type=int, default=1)
parser.add_argument('--process_id', type=int, default=0)
parser.add_argument('--port', type=int, default=0)
args = parser.parse_args()
if args.processes > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{args.port}', args.processes, args.process_id)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from taylor_jax import estimators, models, train  # noqa: E402

GLOBAL_BATCH = 16
model = models.create('resnet8', 10, {'stage1': 8, 'stage1.block0': 6, 'stage2': 8,
                                      'stage2.block0': 6, 'stage3': 8, 'stage3.block0': 6})
rng = np.random.default_rng(0)
images = rng.normal(size=(3, GLOBAL_BATCH, 12, 12, 1)).astype(np.float32)
labels = rng.integers(0, 10, size=(3, GLOBAL_BATCH)).astype(np.int32)
# Jitted: one compile instead of one per primitive of an eager init (~2x less CPU); every
# process compared runs this same program.
variables = jax.jit(model.init)(jax.random.key(0), images[0, :2])
optim = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9,
                                       nesterov=True, weight_decay=5e-4, schedule='cosine'))
tx = train.create_optimizer(optim, 10, 100)
mesh = train.create_mesh()
masks = {k: np.ones(w, np.float32) for k, w in model.widths.items()}
masks['stage2'][[1, 5]] = 0.0  # a residual group partly pruned
state = train.replicate(mesh, train.create_train_state(variables, tx, masks=masks))
step = train.make_train_step(model, tx, mesh, estimators.get('taylor_fo_bn'))
local = GLOBAL_BATCH // jax.process_count()
part = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
for i in range(3):
  state, metrics = step(state, train.shard_batch(mesh, {'image': images[i, part],
                                                        'label': labels[i, part]}))
leaves = jax.tree_util.tree_leaves_with_path((state.params, state.batch_stats, state.score_sum))
arrays = {jax.tree_util.keystr(p): np.asarray(a.addressable_data(0)) for p, a in leaves}
arrays['loss'] = np.asarray(metrics['loss'].addressable_data(0))
arrays['devices'] = np.asarray(jax.device_count())
if jax.process_index() == 0:
  np.savez(args.out, **arrays)
